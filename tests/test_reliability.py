"""Faults a run meets, reproduced against real processes: each test is one row of the fault table
(issue 15) and asserts the behaviour the runner has now.

The table of faults, before and now, is docs/reliability.md.

Teacher faults (non-JSON, silent, huge replies, circuit breaker) are in test_teacher.py; run
directory safety and locks in test_run_dir_safety.py; orphans after SIGKILL in test_orphans.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import struct
import subprocess
import sys

import aiohttp
import pytest
from aiohttp import web

from conftest import MINIMAL, REPO, build_tiny_llama, recipe
from runner.errors import RunnerError
from runner.run_dir import RunDir, write_json_atomic


def serving_input(port: int | None = None):
    from runner.recipe.schema import ServeSpec
    from runner.steps.inputs import ServingInput

    return ServingInput(serve=ServeSpec(engine="local", container="local", port=port, threads=1,
                                        startup_timeout_s=120), container="local", dtype="bfloat16")


class Impostor:
    """Something else listening on a port, answering /health with 200 like any server would."""

    def __init__(self) -> None:
        self.runner: web.AppRunner | None = None
        self.port = 0

    async def __aenter__(self) -> Impostor:
        app = web.Application()
        async def health(request: web.Request) -> web.Response:
            return web.json_response({"status": "I am an impostor"})

        app.router.add_get("/health", health)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.runner is not None
        await self.runner.cleanup()


def test_a_port_taken_by_another_process_is_refused_before_start_and_an_impostor_is_never_measured(tmp_path):
    from runner.serving.engine import serving
    from runner.serving.server import wait_healthy

    run_dir = RunDir(tmp_path / "run")
    run_dir.claim()

    async def scenario() -> tuple[str, str]:
        async with Impostor() as impostor:
            with pytest.raises(RunnerError) as taken:
                async with serving(serving_input(port=impostor.port), tmp_path, run_dir, "serve.x", "x"):
                    pass
            # Should something take the port between the check and the start, the token check holds.
            with pytest.raises(RunnerError) as fooled:
                await wait_healthy(f"http://127.0.0.1:{impostor.port}", 5, None, tmp_path / "log", token="ours")
        return str(taken.value), str(fooled.value)

    taken, fooled = asyncio.run(scenario())
    assert "serve.port" in taken and "in use by another process" in taken
    assert "something else answers" in fooled and "no token" in fooled


def test_a_server_that_dies_mid_benchmark_fails_the_step_with_its_last_words(tmp_path, demo_tokenizer):
    from runner.benchmark.suites import Suite, run_suite
    from runner.serving.engine import serving

    model = build_tiny_llama(tmp_path / "model", demo_tokenizer)
    run_dir = RunDir(tmp_path / "run")
    run_dir.claim()
    suite = Suite.model_validate({"name": "factual", "scorer": "contains", "max_tokens": 4, "prompts": [
        {"prompt": f"question {i}", "expect": ["x"]} for i in range(4)]})

    async def scenario() -> None:
        async with serving(serving_input(), model, run_dir, "benchmark.x", "x") as server, \
                aiohttp.ClientSession() as session:
            pid = await server_pid(session, server.url)
            os.kill(pid, signal.SIGKILL)  # the server dies; the suite still has every prompt to ask
            await run_suite(session, server.url, server.model, suite, "", False, None, 1)

    with pytest.raises(RunnerError) as err:
        asyncio.run(scenario())
    message = str(err.value)
    assert "no answer was scored" in message  # never scored as model behaviour
    assert "the server exited with status -9" in message and "[local_server]" in message  # its log's tail


async def server_pid(session: aiohttp.ClientSession, url: str) -> int:
    async with session.get(url.removesuffix("/v1") + "/health") as resp:
        return (await resp.json())["pid"]


LEFTOVER = "import time; time.sleep(600)"


def test_clean_stops_what_a_crashed_run_left_and_run_json_stops_claiming_it_runs(tmp_path):
    from runner.processes import tagged_env

    run_dir = RunDir(tmp_path / "run")
    run_dir.claim()
    write_json_atomic(run_dir.root / "run.json", {"recipe": "r", "status": "running", "steps": {}, "pid": 999999,
                                                  "updated_at": "then"})
    assert run_dir.run_status()["status"] == "died"  # nobody holds the lock: the run is dead
    # A worker that escaped its parent-death signal (started here without it), tagged with the run dir
    stray = subprocess.Popen([sys.executable, "-c", LEFTOVER], env=tagged_env(run_dir.root), start_new_session=True)
    other = subprocess.Popen([sys.executable, "-c", LEFTOVER], env=tagged_env(tmp_path / "another-run"),
                             start_new_session=True)
    try:
        result = recipe("clean", "--run-dir", str(run_dir.root))
        assert result.returncode == 0, result.stderr
        assert f"stopped process {stray.pid}" in result.stdout
        assert stray.wait(timeout=10) is not None
        assert other.poll() is None  # another run's process is not this run's to stop
        assert json.loads((run_dir.root / "run.json").read_text())["status"] == "died"
    finally:
        for proc in (stray, other):
            if proc.poll() is None:
                proc.kill()
                proc.wait()


@pytest.mark.parametrize("text, shows", [
    ("${env:OPENAI_KEY}", "OPENAI_KEY"), ("${env:HF_AUTH}", "HF_AUTH"), ("${env:GITHUB_PAT}", "GITHUB_PAT"),
    ("hf_" + "a1B2" * 9, "looks like a secret"), ("sk-" + "x9" * 15, "looks like a secret"),
])
def test_secrets_by_name_and_by_shape_never_enter_a_recipe(write, text, shows):
    write("calib.jsonl", "")
    path = write("r.yaml", MINIMAL + f"description: '{text}'\n")
    result = recipe("validate", str(path), env={**os.environ, "PYTHONPATH": str(REPO), "OPENAI_KEY": "sk-live",
                                                "HF_AUTH": "hf_secret", "GITHUB_PAT": "ghp_secret"})
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert shows in output and "r.yaml:" in output
    if text.startswith(("hf_", "sk-")):
        assert text not in output  # never echoed
    assert "sk-live" not in output and "hf_secret" not in output


def test_validate_names_missing_inputs_and_a_missing_publish_token_with_their_lines(write):
    path = write("r.yaml", """
        name: mini
        model:
          name: Mini
          source: {kind: gguf, path: nowhere/model.gguf}
        calibration:
          source: {kind: jsonl, path: calib.jsonl}
          samples: 4
        quantization:
          strategies:
            - {name: max, preset: NVFP4_DEFAULT_CFG}
        publish: {repo_id: me/mini-nvfp4, dry_run: false}
        """)
    env = {k: v for k, v in os.environ.items() if k != "HF_TOKEN"} | {"PYTHONPATH": str(REPO)}
    # what this machine lacks is a warning (the recipe is valid), an error with --strict
    assert recipe("validate", str(path), env=env).returncode == 0
    result = recipe("validate", "--strict", str(path), env=env)
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "r.yaml:4:" in output and "the .gguf file does not exist" in output
    assert "r.yaml:6:" in output and "calibration file does not exist" in output
    assert "HF_TOKEN is not set" in output
    run = recipe("run", str(path), "--run-dir", str(path.parent / "run"), env=env)
    assert run.returncode != 0 and "does not exist" in run.stdout + run.stderr
    assert not (path.parent / "run").exists()  # refused before anything was written


def test_a_truncated_safetensors_file_fails_the_source_step_with_its_name(write, tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    header = json.dumps({"w": {"dtype": "BF16", "shape": [64, 64], "data_offsets": [0, 8192]}}).encode()
    (model / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 1000)
    write("calib.jsonl", json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    path = write("r.yaml", MINIMAL)
    result = recipe("run", str(path), "--until", "source", "--run-dir", str(tmp_path / "run"))
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "model.safetensors: truncated" in output and "7192 missing" in output


def test_a_binary_calibration_file_is_named_with_its_line(tmp_path):
    from runner.calibration.conversations import read_conversations

    path = tmp_path / "calib.jsonl"
    path.write_bytes(json.dumps({"messages": [{"role": "user", "content": "hi"}]}).encode() + b"\n\xff\xfe\x00binary")
    with pytest.raises(RunnerError, match=r"calib.jsonl:2: not UTF-8"):
        read_conversations(path)


def test_a_full_disk_is_a_clear_error_and_leaves_no_temporary_file(tmp_path):
    mount = tmp_path / "small"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True)
    if made.returncode != 0:
        pytest.skip("needs a tmpfs mount (root) to fill a disk for real")
    try:
        with pytest.raises(RunnerError) as err:
            write_json_atomic(mount / "run.json", {"blob": "x" * 200_000})
        assert f"no space left on the device writing {mount / 'run.json'}" in str(err.value)
        assert "needs 2000" in str(err.value) and "bytes free" in str(err.value)
        assert list(mount.iterdir()) == []
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def test_run_json_of_a_live_run_says_running(tmp_path):
    run_dir = RunDir(tmp_path / "run")
    run_dir.claim()
    write_json_atomic(run_dir.root / "run.json", {"status": "running", "steps": {}})
    with run_dir.locked():
        holder = subprocess.run([sys.executable, "-c", "from pathlib import Path; from runner.run_dir import RunDir; "
                                 f"print(RunDir(Path({str(run_dir.root)!r})).run_status()['status'])"],
                                capture_output=True, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert holder.stdout.strip() == "running", holder.stderr


def test_the_live_view_shows_each_running_step_with_its_latest_progress_line(tmp_path):
    from runner.scheduler import last_line

    log = tmp_path / "quantize.max.log"
    log.write_text("2026-11-28 11:18:36,344 INFO step quantize.max started\n"
                   "[quantize] calibration pass 1: batch 1/3\n"
                   "Loading weights:  10%|#  | 27/272\rLoading weights: 100%|##| 272/272\n")
    assert last_line(log) == "Loading weights: 100%|##| 272/272"  # a progress bar's latest state
    log.write_text("2026-11-28 11:18:56,217 INFO suite factual: 3/5 answered\n")
    assert last_line(log) == "suite factual: 3/5 answered"  # without the timestamp
    assert last_line(tmp_path / "missing.log") == ""
