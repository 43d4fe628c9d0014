"""The `local` engine: runner.worker.local_server as a subprocess of this Python environment (CPU or
CUDA; the export's numerics emulated layer by layer: NVFP4 W4A4, W4A16, FP8, mixed). Of serve.args it
takes the `--tool-call-parser` (vLLM's flag, `--tool-call-parser X` or `=X`), so that it reads tool
calls as vLLM would serve the recipe; the other flags are vLLM's own and not passed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING

from runner.benchmark.tool_calls import parser_from_args
from runner.errors import RunnerError
from runner.processes import die_with_parent, tagged_env, terminate_group
from runner.quantization import formats
from runner.serving.engine import Engine
from runner.serving.server import RunningServer, host_port, log_tail, wait_healthy

if TYPE_CHECKING:
    from runner.run_dir import RunDir
    from runner.steps.inputs import ServingInput

# What runner/worker/local_server.py serves (dequantize, then serve with transformers). Not every format
# the registry has a decoder for: W4A8_NVFP4_FP8 and W4A8_MXFP4_FP8 decode, but their FP8 inputs are not
# emulated as their kernels quantize them, so the local engine does not claim them.
QUANT_ALGOS = ("FP8", "FP8_PER_CHANNEL_PER_TOKEN", "FP8_PB_WO", "MXFP8", "MXFP4", "NVFP4", "NVFP4_AWQ",
               "NVFP4_SVD", "W4A16_NVFP4", "W4A16_AWQ", "W4A8_AWQ", formats.MIXED_PRECISION)


class LocalEngine(Engine):
    name = "local"
    quant_algos = QUANT_ALGOS
    kernels = ("transformers on this machine, the export's numerics emulated layer by layer (runner/worker/"
               "quantized_linear.py): the quantized values, not the speed of quantized kernels")
    pairs_speed_by_default = True
    parses_tool_calls_here = True

    @contextlib.asynccontextmanager
    async def serve(self, spec: ServingInput, model_dir: Path, run_dir: RunDir, step_id: str, name: str,
                    pin_port: bool = True) -> AsyncIterator[RunningServer]:
        log_path = run_dir.log_path(step_id)
        port = host_port(spec.serve.port if pin_port else None)
        token = secrets.token_hex(16)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log = log_path.open("a", encoding="utf-8")
        proc = await asyncio.create_subprocess_exec(
            *local_server_command(spec, model_dir, port, name),
            stdout=log, stderr=asyncio.subprocess.STDOUT,
            start_new_session=True, preexec_fn=die_with_parent(),
            env=tagged_env(run_dir.root, {**os.environ, **spec.serve.env, "RECIPE_SERVER_TOKEN": token}))
        try:
            await wait_healthy(f"http://127.0.0.1:{port}", spec.serve.startup_timeout_s, proc, log_path, token=token)
            try:
                yield RunningServer(f"http://127.0.0.1:{port}/v1", name, self.name, numerics_on_health=True)
            except RunnerError as exc:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(proc.wait(), 1)  # a dead server is reaped within a moment
                if proc.returncode is None:
                    raise
                # The server died under the step: say so, with its last words, not just "requests failed".
                raise RunnerError(f"{exc}\n    the server exited with status {proc.returncode} during the step; "
                                  f"last lines of {log_path}:\n      " + log_tail(log_path)) from None
        finally:
            await terminate_group(proc, grace_s=15)
            log.close()


def local_server_command(spec: ServingInput, model_dir: Path, port: int, name: str) -> list[str]:
    """The local engine's command line: the recipe's tool-call parser passed on (the server refuses one
    it does not implement, and `recipe validate` says so first: recipe.schema.ServeSpec)."""
    parser = parser_from_args(spec.serve.args)
    return [sys.executable, "-m", "runner.worker.local_server", "--model", str(model_dir), "--port", str(port),
            "--name", name, "--dtype", spec.dtype,
            *(["--threads", str(spec.serve.threads)] if spec.serve.threads else []),
            *([f"--tool-call-parser={parser}"] if parser is not None else [])]  # "=": a value may start with "-"
