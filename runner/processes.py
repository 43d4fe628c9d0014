"""Child processes (workers, local servers): they die with the runner, and stop with their group."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

PR_SET_PDEATHSIG = 1  # linux/prctl.h
PACKAGE_PARENT = Path(__file__).resolve().parents[1]  # the folder that holds runner/


def worker_pythonpath(current: str | None) -> str:
    """PYTHONPATH for `python -m runner.worker` (or runner.vllm_env.*): this very runner package first,
    whatever the cwd."""
    return os.pathsep.join(filter(None, [str(PACKAGE_PARENT), current]))


def die_with_parent() -> Callable[[], None] | None:
    """A preexec_fn that has the child sent SIGTERM when the runner dies, SIGKILL included (Linux's
    parent-death signal), so no worker or local server outlives `recipe run`. None elsewhere."""
    if sys.platform != "linux":
        return None
    parent = os.getpid()

    def arm() -> None:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the runner died before the signal was armed
            os._exit(1)

    return arm


# How long a process gets to exit after SIGTERM before it is killed.
TERMINATE_GRACE_S = 10.0


async def terminate_group(proc: asyncio.subprocess.Process, grace_s: float = TERMINATE_GRACE_S) -> None:
    """SIGTERM to the process's group, SIGKILL after `grace_s` if it is still there."""
    if proc.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        await asyncio.wait_for(proc.wait(), grace_s)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()


# Every worker and local server carries its run directory in its environment, so that `recipe clean`
# can find what a crashed run left behind (should the parent-death signal not have reached it).
RUN_DIR_ENV = "RECIPE_RUN_DIR"


def tagged_env(run_dir: Path, env: dict[str, str] | None = None) -> dict[str, str]:
    return {**(env if env is not None else os.environ), RUN_DIR_ENV: str(run_dir.resolve())}


def processes_of(run_dir: Path) -> list[tuple[int, str]]:
    """(pid, command line) of this user's processes tagged with `run_dir` (Linux /proc)."""
    wanted = f"{RUN_DIR_ENV}={run_dir.resolve()}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if wanted not in (entry / "environ").read_bytes().split(b"\0"):
                continue
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:  # gone, or another user's
            continue
        found.append((int(entry.name), cmdline))
    return found


def stop_processes(pids: list[int], grace_s: float = 5.0) -> None:
    """SIGTERM, then SIGKILL what is still there after `grace_s`."""
    import time

    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.1)
    for pid in pids:
        if alive(pid):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)


def alive(pid: int) -> bool:
    """Running and not a zombie (a dead child of a dead parent waits for init to reap it)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"
