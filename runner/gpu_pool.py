"""Which GPU steps run where: GPUs handed out by memory, so that independent quantize steps share one.

Each GPU step asks for the memory it is predicted to hold (runner/wall_time.gpu_memory_need) or, when
that is unknown or it is a server, for a whole GPU. A step starts on the first GPU whose free memory
holds its need; steps start in the scheduler's priority order, and one that does not fit anywhere yet
waits (those behind it wait too, so nobody starves). The lease (GPU index, memory) goes to the worker,
which runs on that GPU alone and caps its allocator at the memory it was given (runner/worker/__main__.py).

Without the GPUs' memory (no `execution.gpu_memory_gb` and no nvidia-smi answer) every GPU step takes a
whole GPU, as before; the run says so once.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass

# Of each GPU's memory, what leases may add up to: the CUDA context of each process (~0.5 GB) and the
# allocator's fragmentation need the rest.
USABLE_SHARE = 0.92


@dataclass(frozen=True)
class Lease:
    index: int  # which GPU, counted among those the run may use
    memory_bytes: int | None  # None: the whole GPU

    def to_params(self) -> dict[str, int | None]:
        return {"index": self.index, "memory_bytes": self.memory_bytes}


class GpuPool:
    def __init__(self, gpus: int, memory_bytes: int | None):
        self.gpus = max(gpus, 1)
        self.memory = int(memory_bytes * USABLE_SHARE) if memory_bytes else None
        self._free = [self.memory if self.memory is not None else 1 for _ in range(self.gpus)]
        self._whole = [False] * self.gpus
        self._waiters: list[tuple[int, int, int | None, asyncio.Future[Lease]]] = []
        self._counter = itertools.count()

    def fits_alone(self, need: int | None) -> bool:
        return need is None or self.memory is None or need <= self.memory

    def place(self, need: int | None) -> Lease | None:
        """A lease for `need` on the first GPU that holds it now, else None."""
        for index in range(self.gpus):
            if self._whole[index]:
                continue
            if need is None or self.memory is None or need > self.memory:
                if self._free[index] == (self.memory if self.memory is not None else 1):  # nothing on it
                    self._whole[index] = True
                    self._free[index] = 0
                    return Lease(index, None)
                continue
            if self._free[index] >= need:
                self._free[index] -= need
                return Lease(index, need)
        return None

    async def acquire(self, priority: int, need: int | None, on_wait: Callable[[], None] | None = None) -> Lease:
        if not self._waiters:
            lease = self.place(need)
            if lease is not None:
                return lease
        if on_wait is not None:
            on_wait()
        future: asyncio.Future[Lease] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiters, (priority, next(self._counter), need, future))
        try:
            return await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self.release(future.result())  # handed a lease just as it was cancelled: give it back
            raise

    def release_now(self, lease: Lease) -> None:
        if lease.memory_bytes is None:
            self._whole[lease.index] = False
            self._free[lease.index] = self.memory if self.memory is not None else 1
        else:
            self._free[lease.index] += lease.memory_bytes

    def release(self, lease: Lease) -> None:
        self.release_now(lease)
        # On the next loop turn, so that steps made ready by the one that finished can win on priority.
        asyncio.get_running_loop().call_soon(self._hand_over)

    def _hand_over(self) -> None:
        while self._waiters:
            priority, count, need, future = self._waiters[0]
            if future.done():
                heapq.heappop(self._waiters)
                continue
            lease = self.place(need)
            if lease is None:
                return  # the first in line waits for more memory, and those behind it with it
            heapq.heappop(self._waiters)
            future.set_result(lease)

    def waiting_for(self, need: int | None) -> str:
        """Why a step with this need cannot start now, in words."""
        if self.memory is None:
            return "a whole GPU (the GPUs' memory is unknown)"
        held = ", ".join(f"GPU {i}: {(self.memory - free) / 1e9:.0f} of {self.memory / 1e9:.0f} GB leased"
                         if not self._whole[i] else f"GPU {i}: held whole" for i, free in enumerate(self._free))
        what = "a whole GPU" if need is None or need > self.memory else f"{need / 1e9:.0f} GB"
        return f"{what} ({held})"


def probe_gpu_memory() -> int | None:
    """The smallest visible GPU's memory in bytes, from nvidia-smi; None where there is none to ask."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=20, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    sizes = [int(float(line)) * 2**20 for line in out.split() if line.strip()]
    return min(sizes) if sizes else None
