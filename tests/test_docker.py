"""The docker executor and containerised serving on a real Docker engine (.ci/run starts one).

The image is a minimal Debian with python3 built without a registry (tests/docker/build_test_image.sh);
this project's .venv is mounted read-only into it for torch, transformers and ModelOpt. The tests
run real pipeline steps in containers (quantize, verify, a server the benchmark talks to) and
check that no container is left behind.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sysconfig
import textwrap
from pathlib import Path

import pytest

from conftest import PYTHON, REPO, build_tiny_llama, recipe_cli_env

IMAGE = "recipe-runner-test/python:bookworm"
pytestmark = pytest.mark.slow


def docker_ready() -> str | None:
    if shutil.which("docker") is None:
        return "docker CLI not installed"
    probe = subprocess.run(["docker", "info"], capture_output=True, text=True)
    if probe.returncode != 0:
        return "no Docker engine answers"
    if subprocess.run(["docker", "image", "inspect", IMAGE], capture_output=True).returncode != 0:
        build = subprocess.run(["bash", str(REPO / "tests" / "docker" / "build_test_image.sh"), IMAGE],
                               capture_output=True, text=True, timeout=900)
        if build.returncode != 0:
            return f"could not build {IMAGE}: {build.stderr[-500:]}"
    return None


@pytest.fixture(scope="module")
def docker_env(tmp_path_factory) -> dict[str, str]:
    why = docker_ready()
    if why:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the docker tests: {why}")
        pytest.skip(why)
    plugins = tmp_path_factory.mktemp("containers")
    site = sysconfig.get_paths()["purelib"]
    common = f"""
        runtime: docker
        image: {IMAGE}
        python: python3
        mounts: [{{host: {site}, container: {site}}}]
        env: {{PYTHONPATH: {site}, HOME: /tmp}}
    """
    (plugins / "test-worker.yaml").write_text(f"name: test-worker\n{textwrap.dedent(common)}")
    (plugins / "test-server.yaml").write_text(
        f"name: test-server\n{textwrap.dedent(common)}entrypoint: [python3, -m, runner.worker.local_server]\n"
        "port: 8000\nhealth: {path: /health, timeout_s: 300}\n")
    (plugins / "test-gpu.yaml").write_text(f"name: test-gpu\n{textwrap.dedent(common)}gpus: all\n")
    (plugins / "test-missing.yaml").write_text("name: test-missing\nruntime: docker\nimage: recipe-runner-test/none:0\n")
    return recipe_cli_env() | {"RECIPE_RUNNER_CONTAINERS": str(plugins)}


def leftovers() -> list[str]:
    out = subprocess.run(["docker", "ps", "-a", "-q", "--filter", "label=recipe-runner.run"], capture_output=True,
                         text=True, check=True).stdout
    return out.split()


def write_recipe(tmp_path: Path, model_dir: Path, containers: str, serve_container: str = "test-server") -> Path:
    path = tmp_path / "docker.yaml"
    path.write_text(textwrap.dedent(f"""
        name: docker-test
        model:
          name: tiny
          source: {{kind: local, path: {model_dir}}}
        calibration:
          source: {{kind: jsonl, path: {REPO / 'recipes' / 'demo' / 'calibration.jsonl'}}}
          samples: 4
          max_length: 64
        quantization:
          exclude: ["*layers.0.*"]
          strategies: [{{name: nvfp4_max, preset: NVFP4_DEFAULT_CFG}}]
        serve:
          engine: vllm
          container: {serve_container}
          args: [--port, "8000", --host, 0.0.0.0]
          startup_timeout_s: 300
        benchmark:
          suites: [{{name: factual, limit: 2}}]
          speed: {{warmup_requests: 0, requests: 2, prompt_tokens: [16], output_tokens: 8}}
          hardware: cpu
        execution:
          executor: docker
          containers: {{quantize: {containers}, verify: {containers}}}
          max_parallel: 1
          gpus: 0
    """))
    return path


def recipe(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, "-m", "runner.cli", *args], capture_output=True, text=True, env=env, cwd=REPO,
                          timeout=1200)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, demo_tokenizer) -> Path:
    """A tiny random Llama with the demo model's tokenizer, small enough to quantize in seconds."""
    pytest.importorskip("torch")
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), demo_tokenizer)


def test_quantize_verify_and_serve_in_containers(docker_env, tiny_model, tmp_path):
    path = write_recipe(tmp_path, tiny_model, "test-worker")
    run_dir = tmp_path / "run"
    result = recipe("run", str(path), "--until", "benchmark", "--run-dir", str(run_dir), env=docker_env)
    assert result.returncode == 0, result.stderr + "".join(p.read_text()[-2000:] for p in (run_dir / "logs").glob("*.log"))
    for step in ("quantize.nvfp4_max", "verify.nvfp4_max", "serve.nvfp4_max", "benchmark.nvfp4_max"):
        record = json.loads((run_dir / "steps" / step / "record.json").read_text())
        assert record["executor"] == "docker" and record["status"] == "complete"
    quantize_log = (run_dir / "logs" / "quantize.nvfp4_max.log").read_text()
    assert "[worker] quantize done" in quantize_log  # streamed from the container
    verify = json.loads((run_dir / "steps" / "verify.nvfp4_max" / "record.json").read_text())["summary"]
    assert verify["quant_algo"] == "NVFP4" and verify["checks"]["exclusions"] == "pass"
    bench = json.loads((run_dir / "steps" / "benchmark.nvfp4_max" / "results.json").read_text())
    assert bench["engine"] == "vllm" and bench["suites"]["factual"]["total"] == 2
    assert bench["speed"]["summary"]["successful"] == 2
    assert leftovers() == []


def test_clear_errors_for_gpus_missing_images_and_no_daemon(docker_env, tiny_model, tmp_path):
    gpu = recipe("run", str(write_recipe(tmp_path, tiny_model, "test-gpu")), "--until", "quantize", "--run-dir",
                 str(tmp_path / "gpu"), env=docker_env)
    assert gpu.returncode == 1 and "no GPU runtime" in gpu.stderr and "--executor local" in gpu.stderr
    missing = recipe("run", str(write_recipe(tmp_path, tiny_model, "test-missing")), "--until", "quantize",
                     "--run-dir", str(tmp_path / "missing"), env=docker_env)
    assert missing.returncode == 1 and "could not be pulled" in missing.stderr
    no_daemon = recipe("run", str(write_recipe(tmp_path, tiny_model, "test-worker")), "--until", "quantize",
                       "--run-dir", str(tmp_path / "nodaemon"), env=docker_env | {"DOCKER_HOST": "unix:///nonexistent.sock"})
    assert no_daemon.returncode == 1 and "daemon is not running" in no_daemon.stderr
    assert leftovers() == []


def test_interrupt_removes_the_container_and_clean_removes_leftovers(docker_env, tiny_model, tmp_path):
    import signal
    import time

    path = write_recipe(tmp_path, tiny_model, "test-worker")
    run_dir = tmp_path / "run"
    proc = subprocess.Popen([PYTHON, "-m", "runner.cli", "run", str(path), "--until", "quantize", "--run-dir",
                             str(run_dir)], env=docker_env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.monotonic() + 300
    while not leftovers():
        assert time.monotonic() < deadline and proc.poll() is None, "no container started"
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=120)
    assert proc.returncode == 130
    assert leftovers() == []
    # A leftover of a crashed run (simulated: a container labelled with its run directory, which no live
    # process holds) goes with `recipe clean`; one of an earlier runner (its label a hash of the run
    # directory) names no run, so plain `clean` leaves it, saying why, and `clean --run-dir` removes it.
    import hashlib

    hashed = hashlib.sha256(str(run_dir.resolve()).encode()).hexdigest()[:16]
    for label in (str(run_dir.resolve()), hashed):
        subprocess.run(["docker", "create", "--label", f"recipe-runner.run={label}", IMAGE, "true"], check=True,
                       capture_output=True)
    assert len(leftovers()) == 2
    cleaned = recipe("clean", env=docker_env)
    assert cleaned.returncode == 0 and "removed 1 container" in cleaned.stdout, cleaned.stdout + cleaned.stderr
    assert "left container" in cleaned.stdout and "clean --run-dir" in cleaned.stdout
    assert len(leftovers()) == 1
    cleaned = recipe("clean", "--run-dir", str(run_dir), env=docker_env)
    assert cleaned.returncode == 0 and "removed 1 container" in cleaned.stdout, cleaned.stdout + cleaned.stderr
    assert leftovers() == []
    # A live run's container is never touched: this process holds the run's lock, as `recipe run` does.
    from runner.run_dir import RunDir

    live = RunDir(tmp_path / "live")
    live.claim()
    with live.locked():
        subprocess.run(["docker", "create", "--label", f"recipe-runner.run={live.root.resolve()}", IMAGE, "true"],
                       check=True, capture_output=True)
        cleaned = recipe("clean", env=docker_env)
        assert "removed 0 container" in cleaned.stdout and "is live" in cleaned.stdout, cleaned.stdout
        refused = recipe("clean", "--run-dir", str(live.root), env=docker_env)
        assert refused.returncode == 1 and "is writing to" in refused.stdout + refused.stderr
        assert len(leftovers()) == 1
    assert "removed 1 container" in recipe("clean", env=docker_env).stdout  # the run is over: it goes
    assert leftovers() == []
