"""Serving engines behind one interface: start a candidate, wait until it answers, stop it.

- `local`: runner.worker.local_server as a subprocess of this Python environment (CPU or CUDA; the
  export's numerics emulated layer by layer: NVFP4 W4A4, W4A16, FP8, mixed). Of serve.args it takes
  the `--tool-call-parser` (vLLM's flag, `--tool-call-parser X` or `=X`), so that it reads tool calls
  as vLLM would serve the recipe; the other flags are vLLM's own and not passed.
- `vllm`: a server in the recipe's serve container plugin (the `vllm` image by default), started
  with `--model /model` and the recipe's flags verbatim, health-checked, labelled, and removed after.

Use as `async with serving(spec, model_dir, run_dir, step_id, name) as server: ... server.url ...`
(spec: step_inputs.ServingInput); the server is stopped on every way out, errors and cancellation
included, and its output goes to the step's log.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import socket
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from runner.benchmark.tool_calls import parser_from_args
from runner.errors import RunnerError
from runner.processes import die_with_parent, tagged_env, terminate_group
from runner.run_dir import RunDir
from runner.steps.inputs import ServingInput


@dataclass
class RunningServer:
    url: str  # base URL ending in /v1
    model: str  # the name to send as "model"
    engine: str


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def host_port(wanted: int | None) -> int:
    """`serve.port` when it is free, else a clear error; a free port when the recipe names none."""
    if wanted is None:
        return free_port()
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", wanted))
        except OSError:
            raise RunnerError(f"serve.port {wanted} is in use by another process on this machine; stop it, pick "
                              "another port, or leave serve.port unset to use a free one") from None
    return wanted


async def wait_healthy(base: str, timeout_s: float, proc: asyncio.subprocess.Process | None, log_path: Path,
                       health: str = "/health", container: object | None = None, interval_s: float = 0.5,
                       token: str | None = None) -> float:
    """Seconds until GET /health answers 200 (asked every interval_s); a clear error with the log's
    tail when it never does. With `token`, the answer must echo it: a server on the port that is not
    the one we started (another process got there first) is an error, never measured."""
    t0 = time.monotonic()
    async with aiohttp.ClientSession() as session:
        while time.monotonic() - t0 < timeout_s:
            if proc is not None and proc.returncode is not None:
                raise RunnerError(f"the server exited with status {proc.returncode} before answering; "
                                  f"last lines of {log_path}:\n      " + _tail(log_path))
            if container is not None:
                await asyncio.to_thread(container.reload)  # type: ignore[attr-defined]
                if container.status in ("exited", "dead"):  # type: ignore[attr-defined]
                    logs = (await asyncio.to_thread(container.logs, tail=12)).decode(errors="replace")  # type: ignore[attr-defined]
                    raise RunnerError("the server container exited before answering; its last lines:\n      "
                                      + "\n      ".join(logs.splitlines()))
            try:
                async with session.get(f"{base}{health}", timeout=aiohttp.ClientTimeout(total=2)) as resp:
                    if resp.status == 200:
                        if token is not None:
                            echoed = await _echoed_token(resp)
                            if echoed != token:
                                raise RunnerError(
                                    f"something else answers {base}{health} (it does not echo this run's server "
                                    f"token: {'a different token' if echoed else 'no token'}); another process "
                                    "listens on that port: stop it or change serve.port")
                        return time.monotonic() - t0
            except (aiohttp.ClientError, TimeoutError):
                pass
            await asyncio.sleep(interval_s)
    if container is not None:
        logs = (await asyncio.to_thread(container.logs, tail=12)).decode(errors="replace")  # type: ignore[attr-defined]
        raise RunnerError(f"the server container did not answer {health} within {timeout_s:.0f}s; its last lines:"
                          "\n      " + "\n      ".join(logs.splitlines()))
    raise RunnerError(f"the server did not answer /health within {timeout_s:.0f}s (serve.startup_timeout_s); "
                      f"last lines of {log_path}:\n      " + _tail(log_path))


@contextlib.asynccontextmanager
async def _serve_in_container(spec: ServingInput, model_dir: Path, run_dir: RunDir, step_id: str, name: str,
                              pin_port: bool) -> AsyncIterator[RunningServer]:
    """The recipe's server flags, verbatim after `--model /model`, in the serve container plugin."""
    from runner.containers import docker_api
    from runner.containers.launcher import launched
    from runner.containers.plugin import load_container

    log_path = run_dir.log_path(step_id)
    plugin = load_container(spec.container)
    if plugin.runtime != "docker":
        raise RunnerError(f"serve.container {plugin.name!r} is not a docker plugin; the vllm engine serves in a "
                          "container (use serve.engine: local to serve without one)")
    api = await asyncio.to_thread(docker_api.client)
    port = host_port(spec.serve.port if pin_port else None)
    args = list(spec.serve.args)
    if "--served-model-name" not in args:
        args += ["--served-model-name", name]
    async with launched(api, plugin, "server", ["--model", "/model", *args], run_dir=run_dir.root, step=name,
                        binds={model_dir: "/model"}, env_names=spec.env_names, env=spec.serve.env,
                        ports={f"{plugin.port}/tcp": ("127.0.0.1", port)}) as container:
        health = plugin.health.path if plugin.health else "/health"
        timeout = min(spec.serve.startup_timeout_s, plugin.health.timeout_s if plugin.health else 900)
        try:
            await wait_healthy(f"http://127.0.0.1:{port}", timeout, None, log_path, health, container,
                               plugin.health.interval_s if plugin.health else 0.5)
        finally:
            logs = await asyncio.to_thread(container.logs)
            log_path.parent.mkdir(parents=True, exist_ok=True)
            with log_path.open("a", encoding="utf-8") as log:
                log.write(logs.decode("utf-8", errors="replace"))
        await check_served_name(f"http://127.0.0.1:{port}/v1", name)
        yield RunningServer(f"http://127.0.0.1:{port}/v1", name, engine="vllm")


async def _echoed_token(resp: aiohttp.ClientResponse) -> str | None:
    try:
        body = await resp.json(content_type=None)
    except ValueError:
        return None
    return body.get("token") if isinstance(body, dict) else None


async def check_served_name(base_v1: str, name: str) -> None:
    """A vLLM server lists the name it was started with; anything else on the port does not."""
    try:
        async with aiohttp.ClientSession() as session, session.get(
                f"{base_v1}/models", timeout=aiohttp.ClientTimeout(total=10)) as resp:
            body = await resp.json(content_type=None)
        names = [m.get("id") for m in body.get("data", [])] if isinstance(body, dict) else []
    except (aiohttp.ClientError, TimeoutError, ValueError, AttributeError):
        names = []
    if name not in names:
        raise RunnerError(f"the server at {base_v1} does not serve {name!r} (it lists {names or 'nothing'}): it is "
                          "not the one this step started; is another server on that port?")


def _tail(path: Path, lines: int = 12) -> str:
    try:
        return "\n      ".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def local_server_command(spec: ServingInput, model_dir: Path, port: int, name: str) -> list[str]:
    """The local engine's command line: the recipe's tool-call parser passed on (the server refuses one
    it does not implement, and `recipe validate` says so first: recipe.schema.ServeSpec)."""
    parser = parser_from_args(spec.serve.args)
    return [sys.executable, "-m", "runner.worker.local_server", "--model", str(model_dir), "--port", str(port),
            "--name", name, "--dtype", spec.dtype,
            *(["--threads", str(spec.serve.threads)] if spec.serve.threads else []),
            *([f"--tool-call-parser={parser}"] if parser is not None else [])]  # "=": a value may start with "-"


@contextlib.asynccontextmanager
async def serving(spec: ServingInput, model_dir: Path, run_dir: RunDir, step_id: str, name: str,
                  pin_port: bool = True) -> AsyncIterator[RunningServer]:
    """`pin_port`: listen on serve.port when the recipe sets one (False for a second server started
    alongside, e.g. the paired baseline)."""
    engine = spec.serve.engine
    if engine == "vllm":
        async with _serve_in_container(spec, model_dir, run_dir, step_id, name, pin_port) as server:
            yield server
        return
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
            yield RunningServer(f"http://127.0.0.1:{port}/v1", name, engine)
        except RunnerError as exc:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(proc.wait(), 1)  # a dead server is reaped within a moment
            if proc.returncode is None:
                raise
            # The server died under the step: say so, with its last words, not just "requests failed".
            raise RunnerError(f"{exc}\n    the server exited with status {proc.returncode} during the step; last "
                              f"lines of {log_path}:\n      " + _tail(log_path)) from None
    finally:
        await terminate_group(proc, grace_s=15)
        log.close()
