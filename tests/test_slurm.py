"""The slurm executor against a real one-node Slurm cluster (tests/slurm/start_cluster.sh; CI starts
it in .ci/run and sets RECIPE_RUNNER_REQUIRE_SLURM=1 so these cannot be skipped there).

Jobs are really submitted: a tiny recipe with two strategies runs its worker steps as jobs whose
records name job id, node and queue wait; a job that fails, a job Slurm refuses, Ctrl-C / SIGTERM
of the runner (its jobs are cancelled) and `recipe clean` after a SIGKILLed run (its jobs are found
by their comment and cancelled) are each produced for real.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, build_tiny_llama, recipe, recipe_cli_env, record
from runner.executors.slurm import COMMENT_PREFIX, job_script

if shutil.which("sbatch") is None or subprocess.run(["sinfo", "-h"], capture_output=True).returncode != 0:
    if os.environ.get("RECIPE_RUNNER_REQUIRE_SLURM"):
        raise RuntimeError("RECIPE_RUNNER_REQUIRE_SLURM is set but no Slurm cluster answers (tests/slurm/start_cluster.sh)")
    pytest.skip("no Slurm cluster here (bash tests/slurm/start_cluster.sh starts one)", allow_module_level=True)


def write_recipe(tmp_path: Path, model: Path, slurm: str = "") -> Path:
    path = tmp_path / "slurm.yaml"
    path.write_text(f"""name: tiny-slurm
model:
  name: tiny
  source: {{kind: local, path: {model}}}
  architecture: LlamaForCausalLM
calibration:
  source: {{kind: jsonl, path: {REPO / 'recipes' / 'demo' / 'calibration.jsonl'}}}
  samples: 4
  max_length: 64
  held_out: 2
quantization:
  strategies:
    - {{name: nvfp4_max, preset: NVFP4_DEFAULT_CFG}}
    - {{name: w4a16, preset: W4A16_NVFP4_CFG}}
serve: {{engine: local, container: local}}
execution:
  executor: slurm
  max_parallel: 4
  gpus: 1
  slurm:
    steps:
      quantize: {{gpus: 0, cpus: 1}}
      verify: {{gpus: 0, cpus: 1}}
{slurm}""", encoding="utf-8")
    return path


@pytest.fixture
def tiny(tmp_path, demo_tokenizer) -> Path:
    return build_tiny_llama(tmp_path / "model", demo_tokenizer)


def runner_jobs(run_dir: Path) -> list[str]:
    out = subprocess.run(["squeue", "--noheader", "--format=%i|%k"], capture_output=True, text=True).stdout
    return [line.split("|")[0].strip() for line in out.splitlines()
            if line.split("|", 1)[-1].strip() == f"{COMMENT_PREFIX}{run_dir.resolve()}"]


def test_two_strategies_run_as_jobs_whose_records_name_job_node_and_wait(tmp_path, tiny):
    run_dir = tmp_path / "run"
    result = recipe("run", str(write_recipe(tmp_path, tiny)), "--until", "verify", "--run-dir", str(run_dir),
                    env=recipe_cli_env())
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    jobs = {}
    for step in ("quantize.nvfp4_max", "quantize.w4a16", "verify.nvfp4_max", "verify.w4a16"):
        slurm = record(run_dir, step)["summary"]["slurm"]
        assert slurm["state"] == "COMPLETED" and slurm["node"] == socket.gethostname().split(".")[0]
        assert isinstance(slurm["queue_wait_s"], float) and slurm["queue_wait_s"] >= 0
        jobs[step] = slurm
    assert len({s["job_id"] for s in jobs.values()}) == 4
    # Independent strategies were submitted side by side: their quantize jobs overlapped in time.
    a, b = jobs["quantize.nvfp4_max"], jobs["quantize.w4a16"]
    assert a["started_at"] < b["ended_at"] and b["started_at"] < a["ended_at"], (a, b)
    assert record(run_dir, "calibrate")["executor"] == "slurm"  # host steps stay on this machine
    assert "slurm" not in record(run_dir, "calibrate")["summary"]
    # Resume: nothing changed, nothing is submitted again.
    again = recipe("run", str(write_recipe(tmp_path, tiny)), "--until", "verify", "--run-dir", str(run_dir),
                   env=recipe_cli_env())
    assert again.returncode == 0
    assert record(run_dir, "quantize.w4a16")["summary"]["slurm"]["job_id"] == b["job_id"]


@pytest.mark.parametrize("extra,expected", [
    ("    python: /bin/false\n", ["Slurm job", "ended FAILED"]),  # the job runs and fails
    ("    partition: no-such-partition\n", ["sbatch refused the job", "partition"]),  # Slurm refuses it
])
def test_a_job_that_fails_or_is_refused_fails_its_step_with_slurms_words(tmp_path, tiny, extra, expected):
    run_dir = tmp_path / "run"
    result = recipe("run", str(write_recipe(tmp_path, tiny, extra)), "--until", "quantize", "--run-dir", str(run_dir),
                    env=recipe_cli_env())
    assert result.returncode == 1
    failed = json.loads((run_dir / "logs" / "quantize.w4a16.failed.json").read_text())
    assert all(word in failed["error"] or word in failed["error"].lower() for word in expected), failed
    assert not (run_dir / "steps" / "quantize.w4a16").exists()


def _start_pending_run(tmp_path: Path, tiny: Path) -> tuple[subprocess.Popen, Path, list[str]]:
    """A run whose quantize jobs are held pending (--begin in two minutes) once they are queued."""
    run_dir = tmp_path / "run"
    path = write_recipe(tmp_path, tiny, "    sbatch_args: [--begin=now+120]\n")
    proc = subprocess.Popen([sys.executable, "-m", "runner.cli", "run", str(path), "--until", "quantize",
                             "--run-dir", str(run_dir)], cwd=REPO, env=recipe_cli_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(runner_jobs(run_dir)) < 2:
        time.sleep(0.5)
    jobs = runner_jobs(run_dir)
    assert len(jobs) == 2, proc.stdout.read() if proc.poll() is not None else "jobs never queued"
    return proc, run_dir, jobs


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupting_the_run_cancels_its_jobs(tmp_path, tiny, sig):
    proc, run_dir, jobs = _start_pending_run(tmp_path, tiny)
    proc.send_signal(sig)
    assert proc.wait(timeout=60) == 130
    assert runner_jobs(run_dir) == []


def test_recipe_clean_cancels_the_jobs_of_a_killed_run(tmp_path, tiny):
    proc, run_dir, jobs = _start_pending_run(tmp_path, tiny)
    proc.send_signal(signal.SIGKILL)  # nothing of the runner unwinds: its jobs stay queued
    proc.wait(timeout=30)
    assert sorted(runner_jobs(run_dir)) == sorted(jobs)
    result = recipe("clean", "--run-dir", str(run_dir))
    assert result.returncode == 0, result.stdout + result.stderr
    assert all(job in result.stdout for job in jobs)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and runner_jobs(run_dir):
        time.sleep(0.5)
    assert runner_jobs(run_dir) == []


def test_recipe_clean_without_a_run_dir_cancels_jobs_of_runs_that_are_over(tmp_path, tiny):
    proc, run_dir, jobs = _start_pending_run(tmp_path, tiny)
    live = recipe("clean")  # the run still holds its lock: its jobs are left alone
    assert live.returncode == 0 and sorted(runner_jobs(run_dir)) == sorted(jobs)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    result = recipe("clean")
    assert result.returncode == 0, result.stdout + result.stderr
    assert all(f"cancelled Slurm job {job}" in result.stdout for job in jobs)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and runner_jobs(run_dir):
        time.sleep(0.5)
    assert runner_jobs(run_dir) == []


def test_a_container_step_becomes_srun_with_pyxis_and_the_docker_executors_mounts(tmp_path):
    from runner.recipe.schema import SlurmResources

    script = job_script(argv=["python3", "-m", "runner.worker", "/runs/x/.scratch/q/worker_spec.json"],
                        scratch=Path("/runs/x/.scratch/q"), log_path=Path("/runs/x/logs/q.log"),
                        run_dir=Path("/runs/x"), resources=SlurmResources(gpus=1, partition="gpu", time="04:00:00"),
                        env={"RECIPE_RUN_DIR": "/runs/x"}, container_image="nvcr.io/nvidia/pytorch:25.10-py3",
                        mounts=[(Path("/runs/x/.scratch/q"), True), (Path("/models/m"), False)])
    assert "#SBATCH --gres=gpu:1" in script and "#SBATCH --partition=gpu" in script
    assert f"#SBATCH --comment={COMMENT_PREFIX}/runs/x" in script
    assert ("srun --container-image=nvcr.io/nvidia/pytorch:25.10-py3 "
            "--container-mounts=/runs/x/.scratch/q:/runs/x/.scratch/q,/models/m:/models/m:ro") in script
    assert script.rstrip().endswith("python3 -m runner.worker /runs/x/.scratch/q/worker_spec.json")
