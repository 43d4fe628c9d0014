"""The `recipe` command line, run as a user runs it (a subprocess), and the host/torch boundary."""

from __future__ import annotations

import json
import subprocess

from conftest import MINIMAL, PYTHON, RECIPES, REPO, placeholder_model, recipe_cli_env


def recipe(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, "-m", "runner.cli", *args], capture_output=True, text=True,
                          env=recipe_cli_env(), cwd=cwd or REPO, timeout=120)


def test_validate_ok_and_invalid_exit_codes(write):
    ok = recipe("validate", "--schema-only", str(RECIPES / "qwen35-9b-opus.yaml"))
    assert ok.returncode == 0, ok.stderr
    # Without --schema-only, the model folder this machine lacks is named with its line
    here = recipe("validate", str(RECIPES / "qwen35-9b-opus.yaml"))
    assert here.returncode == 2 and "qwen35-9b-opus.yaml:18:" in here.stderr and "does not exist" in here.stderr
    assert "awq_lite, mlp_only, auto_mixed" in ok.stdout
    bad = write("bad.yaml", MINIMAL.replace("preset: NVFP4_DEFAULT_CFG", "preset: NVFP4_DEFAULT_CFG\n      batchsize: 4"))
    result = recipe("validate", str(bad))
    assert result.returncode == 2
    assert f"{bad}:12:7" in result.stderr and "did you mean 'batch_size'?" in result.stderr


def test_invalid_recipe_runs_nothing(write, tmp_path):
    bad = write("bad.yaml", MINIMAL.replace("kind: jsonl", "kind: jsonll"))
    result = recipe("run", str(bad), "--run-dir", str(tmp_path / "run"))
    assert result.returncode == 2
    assert not (tmp_path / "run").exists()


def test_host_side_never_imports_torch():
    code = ("import sys; from runner.cli import main; "
            f"rc = main(['validate', '--schema-only', r'{RECIPES / 'qwen35-9b-opus.yaml'}']); "
            f"main(['plan', r'{RECIPES / 'qwen35-9b-opus.yaml'}']); "
            "heavy = [m for m in ('torch', 'transformers', 'modelopt') if m in sys.modules]; "
            "print('HEAVY', heavy); sys.exit(rc)")
    result = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, env=recipe_cli_env(), cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert "HEAVY []" in result.stdout


def test_plan_shows_steps_executors_and_cache_state(tmp_path):
    result = recipe("plan", str(RECIPES / "qwen35-9b-opus.yaml"), "--json", "--run-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    steps = {row["step"]: row for row in plan["steps"]}
    assert len(steps) == 26  # 5 per strategy x 4, source, calibrate, the baseline, gates, report, publish
    assert steps["quantize.awq_lite"]["runs_in"] == "container ngc-modelopt"
    assert steps["quantize.awq_lite"]["state"] == "to run"
    assert steps["serve.auto_mixed"]["runs_in"] == "vllm server in container vllm"
    assert steps["publish"]["state"] == "to run" and steps["publish"]["needs"] == [
        "gates", "report", "export.awq_lite", "export.mlp_only", "export.auto_mixed", "export.nvidia_w4a16_fp8attn"]
    assert steps["gates"]["needs"] == ["benchmark.awq_lite", "benchmark.mlp_only", "benchmark.auto_mixed",
                                       "benchmark.nvidia_w4a16_fp8attn", "benchmark.baseline"]
    local = recipe("plan", str(RECIPES / "qwen35-9b-opus.yaml"), "--json", "--executor", "local",
                   "--strategy", "mlp_only", "--run-dir", str(tmp_path))
    steps = {row["step"]: row for row in json.loads(local.stdout)["steps"]}
    assert steps["quantize.mlp_only"]["runs_in"] == "local worker"
    assert steps["source"]["runs_in"] == "host"  # a local folder: no worker (only GGUF conversion needs one)
    assert "quantize.awq_lite" not in steps
    slurm = recipe("plan", str(RECIPES / "qwen35-9b-opus.yaml"), "--json", "--executor", "slurm",
                   "--strategy", "mlp_only", "--run-dir", str(tmp_path))
    steps = {row["step"]: row for row in json.loads(slurm.stdout)["steps"]}
    assert steps["quantize.mlp_only"]["runs_in"] == "slurm job (default partition, 1 GPU)"
    assert steps["verify.mlp_only"]["runs_in"] == "slurm job (default partition)"
    assert steps["calibrate"]["runs_in"] == "host"


def test_list_shows_shipped_recipes_with_descriptions():
    result = recipe("list")
    assert result.returncode == 0, result.stderr
    assert "qwen35-9b-opus.yaml" in result.stdout and "demo" in result.stdout
    assert "(base)" in result.stdout


def test_schema_is_valid_json_schema_and_docs_are_current(tmp_path):
    result = recipe("schema")
    schema = json.loads(result.stdout)
    assert schema["title"] == "Recipe" and "quantization" in schema["properties"]
    assert schema["additionalProperties"] is False
    markdown = recipe("schema", "--markdown").stdout
    reference = (REPO / "docs" / "recipe-reference.md").read_text()
    assert markdown == reference, "docs/recipe-reference.md is stale: recipe schema --markdown -o docs/recipe-reference.md"


def test_run_stops_before_a_step_that_is_not_built(write, tmp_path):
    placeholder_model(tmp_path / "model")
    (tmp_path / "calib.jsonl").write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    path = write("r.yaml", MINIMAL.replace("{kind: jsonl, path: calib.jsonl}", "{kind: dataset, name: cnn_dailymail}"))
    result = recipe("run", str(path), "--run-dir", str(tmp_path / "run"))
    assert result.returncode == 3, result.stderr
    assert "calibrate: stopped here" in result.stderr and "export the data to JSONL" in result.stderr
    status = json.loads((tmp_path / "run" / "run.json").read_text())
    assert status["status"] == "stopped"
    assert status["steps"]["source"]["state"] == "complete"
    assert status["steps"]["quantize.max"]["state"] == "blocked"


def test_calibration_file_errors_name_the_line(write, tmp_path):
    placeholder_model(tmp_path / "model")
    (tmp_path / "calib.jsonl").write_text('{"messages": [{"role": "user", "content": "hi"}]}\n{"messages": [{"role": "robot"}]}\n')
    path = write("r.yaml", MINIMAL)
    result = recipe("run", str(path), "--run-dir", str(tmp_path / "run"), "--until", "calibrate")
    assert result.returncode == 1
    assert "calib.jsonl:2: messages[0].role is 'robot'" in result.stderr
