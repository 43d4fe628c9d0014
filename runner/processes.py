"""Stopping a child process and everything it started (workers, local servers)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal

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
