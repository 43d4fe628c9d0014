"""Where the quantize worker puts a model: one GPU when it fits, else spread over the GPUs of the
allocation (accelerate's device map, as ModelOpt's examples/hf_ptq does for large models).

The decision is made before loading, from the checkpoint's size at the load dtype (safetensors
headers) and each GPU's free memory: a model fits one GPU when its weights plus the calibration
headroom (activations, quantizer statistics, AWQ's search, the logits of a batch) are below that
GPU's free memory. Otherwise every visible GPU gets weights up to its free memory minus the same
headroom, in order; when even all of them together cannot hold it, the quantize step fails before
loading with the numbers, instead of an out-of-memory error an hour in.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from runner.worker_contract import GPU_MEMORY_ENV

GIB = 2**30
# Memory kept free on each GPU for calibration: a fraction of the weights it holds plus a floor.
HEADROOM_FRACTION = 0.15
HEADROOM_MIN = 6 * GIB


@dataclass
class Placement:
    mode: str  # "cpu", "single" or "spread"
    model_bytes: int
    free_bytes: list[int] = field(default_factory=list)  # per visible GPU, before loading
    max_memory: dict[int, int] = field(default_factory=dict)  # GPU index -> bytes of weights allowed (spread)

    def summary(self) -> dict[str, Any]:
        return {"mode": self.mode, "model_gb": round(self.model_bytes / 1e9, 2), "gpus": len(self.free_bytes),
                "free_gb": [round(b / 1e9, 1) for b in self.free_bytes],
                "max_memory_gb": {str(k): round(v / 1e9, 1) for k, v in self.max_memory.items()}}


class DoesNotFit(Exception):
    pass


def headroom(model_bytes: int) -> int:
    return max(HEADROOM_MIN, int(HEADROOM_FRACTION * model_bytes))


def choose(model_bytes: int, free_bytes: list[int]) -> Placement:
    """The placement for a model of `model_bytes` given each GPU's free memory (empty: no GPU)."""
    if not free_bytes:
        return Placement("cpu", model_bytes)
    reserve = headroom(model_bytes)
    if model_bytes + reserve <= free_bytes[0]:
        return Placement("single", model_bytes, list(free_bytes))
    per_gpu_reserve = max(HEADROOM_MIN, reserve // len(free_bytes))
    allowed = {i: max(0, free - per_gpu_reserve) for i, free in enumerate(free_bytes)}
    if sum(allowed.values()) < model_bytes:
        raise DoesNotFit(
            f"the model's {model_bytes / 1e9:.1f} GB do not fit the {len(free_bytes)} GPU(s) of this allocation "
            f"({', '.join(f'{b / 1e9:.1f}' for b in free_bytes)} GB free, {per_gpu_reserve / 1e9:.1f} GB of each kept "
            "for calibration): ask for more GPUs (execution.slurm.steps.quantize.gpus, or a bigger machine)")
    return Placement("spread", model_bytes, list(free_bytes), allowed)


def gpu_free_bytes() -> list[int]:
    import torch

    if not torch.cuda.is_available():
        return []
    return [capped_free_bytes(i) for i in range(torch.cuda.device_count())]


def capped_free_bytes(device: int = 0) -> int:
    """Free memory of a GPU as this worker may use it: the driver's free bytes, and where the scheduler
    leased only part of a shared GPU (GPU_MEMORY_ENV), no more than the lease less what this process already
    holds."""
    import torch

    free = torch.cuda.mem_get_info(device)[0]
    lease = os.environ.get(GPU_MEMORY_ENV)
    if lease:
        free = min(free, max(0, int(lease) - torch.cuda.memory_reserved(device)))
    return free


def model_bytes_at(model_dir: Any, dtype_bits: int) -> int:
    """The checkpoint's weights at the load dtype (floating tensors converted, others as stored)."""
    from runner.quantization.safetensors_headers import read_headers

    total = 0
    for tensor in read_headers(model_dir).values():
        total += tensor.numel * dtype_bits // 8 if tensor.dtype in ("F32", "F16", "BF16") else tensor.nbytes
    return total


def device_map_summary(model: Any) -> dict[str, int]:
    """Modules per device of a dispatched model (hf_device_map), for the record."""
    counts: dict[str, int] = {}
    for device in (getattr(model, "hf_device_map", None) or {}).values():
        counts[str(device)] = counts.get(str(device), 0) + 1
    return counts
