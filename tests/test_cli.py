"""The `recipe` command line, run as a user runs it (a subprocess), and the host/torch boundary."""

from __future__ import annotations

import json
import subprocess

from conftest import MINIMAL, PYTHON, RECIPES, REPO, flagship_here, placeholder_model, recipe_cli_env


def recipe(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, "-m", "runner.cli", *args], capture_output=True, text=True,
                          env=recipe_cli_env(), cwd=cwd or REPO, timeout=120)


def test_validate_ok_and_invalid_exit_codes(write):
    ok = recipe("validate", "--schema-only", str(RECIPES / "qwen35-9b-opus.yaml"))
    assert ok.returncode == 0, ok.stderr
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


def test_host_side_never_imports_torch(write, tmp_path):
    here = flagship_here(write, tmp_path)
    code = ("import sys; from runner.cli import main; "
            f"rc = main(['validate', '--schema-only', r'{RECIPES / 'qwen35-9b-opus.yaml'}']); "
            f"rc = rc or main(['plan', r'{here}', '--run-dir', r'{tmp_path / 'run'}']); "
            "heavy = [m for m in ('torch', 'transformers', 'modelopt') if m in sys.modules]; "
            "print('HEAVY', heavy); sys.exit(rc)")
    result = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, env=recipe_cli_env(), cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert "HEAVY []" in result.stdout


def test_plan_shows_steps_executors_and_cache_state(write, tmp_path):
    flagship = flagship_here(write, tmp_path)
    result = recipe("plan", str(flagship), "--json", "--run-dir", str(tmp_path / "run"))
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    steps = {row["step"]: row for row in plan["steps"]}
    # 5 per strategy x 4, source, calibrate, auto_mixed's score step, the baseline, gates, report, publish
    assert len(steps) == 27
    score = next(sid for sid in steps if sid.startswith("score."))
    assert steps[score]["runs_in"] == "container ngc-modelopt" and score in steps["quantize.auto_mixed"]["needs"]
    assert steps["quantize.awq_lite"]["runs_in"] == "container ngc-modelopt"
    assert steps["quantize.awq_lite"]["state"] == "to run"
    assert steps["serve.auto_mixed"]["runs_in"] == "vllm server in container vllm"
    assert steps["publish"]["state"] == "to run" and steps["publish"]["needs"] == [
        "gates", "report", "export.awq_lite", "export.mlp_only", "export.auto_mixed", "export.nvidia_w4a16_fp8attn"]
    assert steps["gates"]["needs"] == ["benchmark.awq_lite", "benchmark.mlp_only", "benchmark.auto_mixed",
                                       "benchmark.nvidia_w4a16_fp8attn", "benchmark.baseline"]
    local = recipe("plan", str(flagship), "--json", "--executor", "local",
                   "--strategy", "mlp_only", "--run-dir", str(tmp_path / "run"))
    steps = {row["step"]: row for row in json.loads(local.stdout)["steps"]}
    assert steps["quantize.mlp_only"]["runs_in"] == "local worker"
    assert steps["source"]["runs_in"] == "host"  # a local folder: no worker (only GGUF conversion needs one)
    assert "quantize.awq_lite" not in steps
    slurm = recipe("plan", str(flagship), "--json", "--executor", "slurm",
                   "--strategy", "mlp_only", "--run-dir", str(tmp_path / "run"))
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


def test_missing_local_inputs_warn_in_validate_and_refuse_plan_and_run(write, tmp_path):
    """Issue 27 item 6: whether a recipe is valid does not depend on the machine that reads it. A model folder,
    a calibration file and a teacher's prompt file this machine lacks are warnings naming the file and the key
    (exit 0); `--strict` makes them errors (CI); `plan` and `run` refuse them before any work."""
    (tmp_path / "model").mkdir()
    path = write("r.yaml", """
        name: elsewhere
        model:
          name: Mini
          source: {kind: local, path: model}
        calibration:
          source:
            kind: teacher
            endpoint: http://localhost:1/v1
            model: teacher
            categories:
              - {name: facts, count: 4, prompt_files: [{path: prompts.json}]}
          alternatives:
            file: {kind: jsonl, path: calib.jsonl}
          samples: 4
        quantization:
          strategies:
            - {name: max, preset: NVFP4_DEFAULT_CFG}
        """)
    wanted = [("r.yaml:4:", "model.source.path", str(tmp_path / "model" / "config.json")),
              ("r.yaml:11:", "calibration.source.categories[0].prompt_files[0].path", str(tmp_path / "prompts.json")),
              ("r.yaml:13:", "calibration.alternatives.file.path", str(tmp_path / "calib.jsonl"))]
    valid = recipe("validate", str(path))
    assert valid.returncode == 0, valid.stderr
    assert "✓" in valid.stdout and valid.stderr.count("warning: not on this machine") == 3
    for line, key, file in wanted:
        assert f"{line}" in valid.stderr and f"{key}: " in valid.stderr and file in valid.stderr
    strict = recipe("validate", "--strict", str(path))
    assert strict.returncode == 2 and "(3 problems)" in strict.stderr
    for line, key, file in wanted:
        assert line in strict.stderr and key in strict.stderr and file in strict.stderr
    for command in ("plan", "run"):
        refused = recipe(command, str(path), "--run-dir", str(tmp_path / "run"))
        assert refused.returncode == 2, refused.stderr
        assert f"recipe {command} refused: 3 inputs" in refused.stderr and "hint: create it, or fix the path" in refused.stderr
        for line, key, file in wanted:
            assert line in refused.stderr and key in refused.stderr and file in refused.stderr
        assert not (tmp_path / "run").exists()  # nothing written
    # with the inputs in place, all three go through
    placeholder_model(tmp_path / "model")
    (tmp_path / "calib.jsonl").write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    (tmp_path / "prompts.json").write_text('["What is 2 + 2?"]')
    assert recipe("validate", "--strict", str(path)).returncode == 0
    planned = recipe("plan", str(path), "--run-dir", str(tmp_path / "run"))
    assert planned.returncode == 0 and "refused" not in planned.stderr, planned.stderr


def test_every_shipped_recipe_validates_on_this_machine():
    """A fresh clone: each shipped recipe is valid (exit 0), whatever local inputs this machine lacks (the
    flagship's ~/models folder and the plan's prompt files are warnings)."""
    from runner.catalogue import NOT_RECIPES

    shipped = sorted(p for p in RECIPES.rglob("*.yaml") if p.relative_to(RECIPES).parts[0] not in NOT_RECIPES)
    assert len(shipped) >= 10
    result = recipe("validate", *map(str, shipped))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("✓") == len(shipped)
    assert "matches nothing" not in result.stdout + result.stderr  # every shipped exclusion names a layer
    flagship = recipe("validate", "--strict", str(RECIPES / "qwen35-9b-opus.yaml"))
    assert flagship.returncode == 2 and "recipes/data/task_inputs.json" in flagship.stderr  # the plan's, not shipped


def test_validate_warns_of_an_exclusion_that_names_nothing_in_the_model(tmp_path):
    """A typo in an exclusion pattern quantizes the layer it meant to keep: validate says so (a warning)."""
    path = tmp_path / "typo.yaml"
    path.write_text(f"extends: [{RECIPES / 'demo' / 'smollm2-cpu.yaml'}]\n"
                    "quantization:\n  exclude+: ['*layers.29.mpl*']\n", encoding="utf-8")
    result = recipe("validate", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "exclusion '*layers.29.mpl*'" in result.stderr and "matches nothing" in result.stderr
