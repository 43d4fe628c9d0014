"""Child processes (workers, local servers): they die with the runner, and stop with their group."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import Callable

PR_SET_PDEATHSIG = 1  # linux/prctl.h


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
