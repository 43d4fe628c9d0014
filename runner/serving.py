"""Serving engines behind one interface: start a candidate, wait until it answers, stop it.

- `local`: runner.worker.local_server as a subprocess of this Python environment (CPU; dequantized
  weights, weight-only emulation).
- `vllm`: the recipe's vLLM flags verbatim in the `vllm` container plugin; that needs the docker
  executor (issue #6) and says so until then.

Use as `async with serving(recipe, model_dir, log_path, name) as server: ... server.url ...`; the
server is stopped on every way out, errors and cancellation included.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from runner.errors import NotImplementedStep, RunnerError
from runner.schema import Recipe


@dataclass
class RunningServer:
    url: str  # base URL ending in /v1
    model: str  # the name to send as "model"
    engine: str


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def wait_healthy(base: str, timeout_s: float, proc: asyncio.subprocess.Process | None, log_path: Path) -> float:
    """Seconds until GET /health answers 200; a clear error with the log's tail when it never does."""
    t0 = time.monotonic()
    async with aiohttp.ClientSession() as session:
        while time.monotonic() - t0 < timeout_s:
            if proc is not None and proc.returncode is not None:
                raise RunnerError(f"the server exited with status {proc.returncode} before answering; "
                                  f"last lines of {log_path}:\n      " + _tail(log_path))
            try:
                async with session.get(f"{base}/health", timeout=aiohttp.ClientTimeout(total=2)) as resp:
                    if resp.status == 200:
                        return time.monotonic() - t0
            except (aiohttp.ClientError, TimeoutError):
                pass
            await asyncio.sleep(0.5)
    raise RunnerError(f"the server did not answer /health within {timeout_s:.0f}s (serve.startup_timeout_s); "
                      f"last lines of {log_path}:\n      " + _tail(log_path))


def _tail(path: Path, lines: int = 12) -> str:
    try:
        return "\n      ".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


@contextlib.asynccontextmanager
async def serving(recipe: Recipe, model_dir: Path, log_path: Path, name: str) -> AsyncIterator[RunningServer]:
    engine = recipe.serve.engine
    if engine == "vllm":
        raise NotImplementedStep("serving with vLLM runs in the vllm container, which needs the docker executor "
                                 "(issue #6); use `serve: {engine: local}` on a CPU machine meanwhile")
    port = free_port()
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = log_path.open("a", encoding="utf-8")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "runner.worker.local_server", "--model", str(model_dir), "--port", str(port),
        "--name", name, "--dtype", recipe.model.dtype, stdout=log, stderr=asyncio.subprocess.STDOUT,
        start_new_session=True, env={**os.environ, **recipe.serve.env})
    try:
        await wait_healthy(f"http://127.0.0.1:{port}", recipe.serve.startup_timeout_s, proc, log_path)
        yield RunningServer(f"http://127.0.0.1:{port}/v1", name, engine)
    finally:
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 15)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                await proc.wait()
        log.close()
