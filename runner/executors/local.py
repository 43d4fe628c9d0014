"""The local executor: the worker runs as a subprocess of the current Python environment."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
from collections import deque
from pathlib import Path
from typing import Any

from runner.executors import RESULT_FILE, SPEC_FILE, Executor
from runner.run_dir import write_json_atomic
from runner.steps import StepResult

# How long a worker gets to exit after SIGTERM before it is killed.
TERMINATE_GRACE_S = 10.0


class WorkerFailed(Exception):
    pass


class LocalExecutor(Executor):
    name = "local"

    async def run_worker(self, *, worker_kind: str, params: dict[str, Any], scratch: Path, log_path: Path,
                         container: Any, heavy: bool) -> StepResult:
        spec_path = scratch / SPEC_FILE
        write_json_atomic(spec_path, {"kind": worker_kind, "params": params, "output_dir": str(scratch)})
        tail = await run_logged([sys.executable, "-m", "runner.worker", str(spec_path)], log_path)
        return read_result(scratch, tail)


async def run_logged(argv: list[str], log_path: Path, env: dict[str, str] | None = None) -> deque[str]:
    """Run a command in its own process group, appending its output to the log; raise on failure.

    On cancellation (Ctrl-C, SIGTERM of the runner) the whole group gets SIGTERM, then SIGKILL.
    """
    tail: deque[str] = deque(maxlen=30)
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        start_new_session=True, env=env if env is not None else dict(os.environ))
    try:
        assert proc.stdout is not None
        with log_path.open("a", encoding="utf-8") as log:
            async for raw in proc.stdout:
                line = raw.decode("utf-8", errors="replace")
                log.write(line)
                log.flush()
                tail.append(line.rstrip())
        rc = await proc.wait()
    except asyncio.CancelledError:
        await terminate_group(proc)
        raise
    if rc != 0:
        raise WorkerFailed(f"worker exited with status {rc}; last lines of its log:\n      "
                           + "\n      ".join(list(tail)[-12:]))
    return tail


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


def read_result(scratch: Path, tail: deque[str]) -> StepResult:
    path = scratch / RESULT_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise WorkerFailed(f"worker exited 0 but wrote no readable {RESULT_FILE} ({exc})") from None
    path.unlink()
    return StepResult(outputs=data.get("outputs", {}), summary=data.get("summary", {}),
                      versions=data.get("versions", {}))
