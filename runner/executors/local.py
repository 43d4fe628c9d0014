"""The local executor: the worker runs as a subprocess of the current Python environment."""

from __future__ import annotations

import asyncio
import os
import sys
from collections import deque
from pathlib import Path
from typing import Any

from runner.executors.base import Executor, read_result, worker_failure
from runner.processes import die_with_parent, tagged_env, terminate_group, worker_pythonpath
from runner.run_dir import write_json_atomic
from runner.steps.base import StepResult
from runner.worker_contract import SPEC_FILE


class LocalExecutor(Executor):
    name = "local"

    async def run_worker(self, *, worker_kind: str, params: dict[str, Any], scratch: Path, log_path: Path,
                         container: Any) -> StepResult:
        spec_path = scratch / SPEC_FILE
        write_json_atomic(spec_path, {"kind": worker_kind, "params": params, "output_dir": str(scratch)})
        # The worker runs in its scratch folder, on this very runner package (whatever the cwd was).
        env = tagged_env(scratch.parent.parent)  # RUN/.scratch/STEP.xxx: the run directory is two up
        env["PYTHONPATH"] = worker_pythonpath(env.get("PYTHONPATH"))
        rc, tail = await run_logged([sys.executable, "-m", "runner.worker", str(spec_path)], log_path, env=env,
                                    cwd=scratch)
        if rc != 0:
            raise worker_failure(scratch, rc, list(tail))
        return read_result(scratch, tail)


async def run_logged(argv: list[str], log_path: Path, env: dict[str, str] | None = None,
                     cwd: Path | None = None) -> tuple[int, deque[str]]:
    """Run a command in its own process group, appending its output to the log; its exit status and
    last lines.

    On cancellation (Ctrl-C, SIGTERM of the runner) the whole group gets SIGTERM, then SIGKILL.
    """
    tail: deque[str] = deque(maxlen=30)
    proc = await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        start_new_session=True, env=env if env is not None else dict(os.environ), cwd=cwd,
        preexec_fn=die_with_parent())
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
    return rc, tail
