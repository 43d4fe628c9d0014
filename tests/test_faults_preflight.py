"""Issue 30 items 12 and 13: validate and plan stay linear in the number of strategies with model
shapes present (ModelOpt configs parsed once, footprints computed once per distinct strategy), and
recipes that cannot run are refused before any step runs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from conftest import REPO
from runner import cli, plan_checks
from runner.quantization import footprint, modelopt_config, modelopt_recipes, preflight
from runner.quantization.weights import load_weights

sys.path.insert(0, str(REPO / "bench"))
from scale_strategies import recipe_text  # noqa: E402  (the benchmark's own recipe: the demo + N strategies)

SHAPES = REPO / "recipes" / "models" / "smollm2-135m-instruct"


def _work(monkeypatch, tmp_path: Path, n: int, command: str) -> dict[str, int]:
    """Run `recipe COMMAND` in this process on the benchmark's recipe with n strategies and count the
    work: ModelOpt config files read, per-module format look-ups, footprints reported."""
    root = modelopt_recipes.recipes_root()
    if root is None:
        pytest.skip("modelopt_recipes is not installed")
    counts = {"modelopt files read": 0, "module formats": 0, "footprints": 0}
    read_text = Path.read_text

    def counting_read(self, *args, **kwargs):  # a spy: reads the file as before
        if root in self.parents:
            counts["modelopt files read"] += 1
        return read_text(self, *args, **kwargs)

    module_format = modelopt_config.module_format
    strategy_footprint = footprint.strategy_footprint

    def counting_format(*args, **kwargs):
        counts["module formats"] += 1
        return module_format(*args, **kwargs)

    def counting_footprint(*args, **kwargs):
        counts["footprints"] += 1
        return strategy_footprint(*args, **kwargs)

    monkeypatch.setattr(Path, "read_text", counting_read)
    monkeypatch.setattr(modelopt_config, "module_format", counting_format)  # module_formats' look-ups
    monkeypatch.setattr(footprint, "module_format", counting_format)  # auto_range's and the exclusions'
    monkeypatch.setattr(footprint, "strategy_footprint", counting_footprint)
    # a fresh process's caches
    modelopt_recipes._parsed.cache_clear()
    modelopt_config._preset_config.cache_clear()
    modelopt_config._recipe_config.cache_clear()
    path = tmp_path / f"scale{n}.yaml"
    path.write_text(recipe_text(n), encoding="utf-8")
    args = [command, str(path)] + (["--run-dir", str(tmp_path / f"run{n}"), "--json"] if command == "plan" else [])
    assert cli.main(args) == 0
    monkeypatch.undo()
    return counts


@pytest.mark.parametrize("command", ["validate", "plan"])
def test_identical_strategies_cost_no_more_parsing_or_footprint_work(monkeypatch, tmp_path, command, capsys):
    small = _work(monkeypatch, tmp_path, 100, command)
    large = _work(monkeypatch, tmp_path, 1000, command)
    capsys.readouterr()
    # every strategy is reported (the demo's three enabled ones and the n added) ...
    assert small["footprints"] == 103 and large["footprints"] == 1003
    # ... but the 1000 strategies say only 30 different things, as the 100 do: the same files read and
    # the same per-module work (before: 10x, one parse of the preset and its imports and one pass over
    # every Linear per strategy, 16.5 s for validate at 1000 strategies)
    assert large["modelopt files read"] == small["modelopt files read"] > 0
    assert large["module formats"] == small["module formats"] > 0


@pytest.mark.parametrize("preset", ["NVFP4_DEFAULT_CFG", "FP8_DEFAULT_CFG", "NVFP4_MLP_ONLY_CFG", "W4A16_NVFP4_CFG",
                                    "INT4_AWQ_CFG"])
@pytest.mark.parametrize("exclude", [[], ["*layers.3.*"], ["*mlp*"], ["*layers.1.*input_quantizer"],
                                     ["*self_attn.q_proj*", "*layers.2*"], ["*"]])
def test_formats_with_exclusions_are_the_full_computation(preset, exclude):
    """strategy_formats reuses the formats without exclusions for the modules no exclusion names: it
    must give what applying every entry to every module gives."""
    weights = load_weights(SHAPES)
    config = modelopt_config.preset_config(preset)
    full = config.with_exclusions(exclude)
    expected = {m: modelopt_config.module_format(full, m) for m in weights.linears}
    assert footprint.strategy_formats(weights, config, exclude) == expected


# --- item 12: refused before any step runs; validate shows every problem ----------------------------

def narrow_model(folder: Path) -> Path:
    """A header-only Llama of hidden size 64 (two layers): too narrow for 128-weight INT4 blocks."""
    from header_checkpoint import write_checkpoint

    t = {"model.embed_tokens.weight": ("BF16", [256, 64]), "model.norm.weight": ("BF16", [64]),
         "lm_head.weight": ("BF16", [256, 64])}
    for i in range(2):
        p = f"model.layers.{i}."
        t |= {p + "self_attn.q_proj.weight": ("BF16", [64, 64]), p + "self_attn.o_proj.weight": ("BF16", [64, 64]),
              p + "mlp.up_proj.weight": ("BF16", [128, 64]), p + "mlp.down_proj.weight": ("BF16", [64, 128])}
    return write_checkpoint(folder, t, {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                                        "hidden_size": 64, "num_hidden_layers": 2})


def narrow_recipe(tmp_path: Path, strategy: str, executor: str = "local") -> Path:
    narrow_model(tmp_path / "model")
    lines = (REPO / "recipes" / "demo" / "calibration.jsonl").read_text(encoding="utf-8").splitlines()[:4]
    (tmp_path / "calib.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    path = tmp_path / "narrow.yaml"
    path.write_text(f"""name: narrow
model:
  name: Narrow
  source: {{kind: local, path: model}}
calibration:
  source: {{kind: jsonl, path: calib.jsonl}}
  samples: 4
quantization:
  strategies:
    - {{name: ok, preset: NVFP4_DEFAULT_CFG}}
    - {strategy}
serve: {{engine: local, container: local}}
execution: {{executor: {executor}, gpus: 0}}
""", encoding="utf-8")
    return path


def _untouched(run_dir: Path) -> bool:
    return not run_dir.exists() or not any(run_dir.iterdir())


def test_int4_blocks_wider_than_the_model_are_refused_by_validate_plan_and_run(tmp_path):
    from conftest import recipe

    path = narrow_recipe(tmp_path, "{name: int4, preset: INT4_BLOCKWISE_WEIGHT_ONLY_CFG}")
    validate = recipe("validate", str(path))
    # before: validate and plan passed, and the worker crashed in the export ("Cannot pack weight with
    # input dimension 64 and block size 128")
    assert validate.returncode == 2, validate.stdout
    line = next(x for x in validate.stderr.splitlines() if "strategy 'int4'" in x)
    assert f"{path}:11:" in line and "64 input features is not a multiple of 128" in line
    assert "model.layers.0.self_attn.q_proj (64 x 64)" in line and "'ok'" not in validate.stderr
    plan = recipe("plan", str(path), "--run-dir", str(tmp_path / "run"), "--json")
    assert plan.returncode == 2 and any("multiple of 128" in p for p in json.loads(plan.stdout)["problems"])
    run = recipe("run", str(path), "--run-dir", str(tmp_path / "run"))
    assert run.returncode == 2 and "multiple of 128" in run.stderr and "Traceback" not in run.stderr
    assert _untouched(tmp_path / "run")  # refused before the source step: nothing written


@pytest.mark.skipif(preflight.host_has_gpu(), reason="the machine has an NVIDIA GPU: the CUDA need is met")
def test_a_cuda_strategy_is_refused_before_the_source_step_on_a_machine_without_one(tmp_path):
    from conftest import recipe

    path = narrow_recipe(tmp_path, "{name: mx, preset: MXFP8_DEFAULT_CFG}")
    # validate/plan may run on another machine than the run: they leave the GPU question out
    assert recipe("validate", str(path)).returncode == 0
    run = recipe("run", str(path), "--run-dir", str(tmp_path / "run"))
    # before: source and calibrate ran, then quantize.mx failed (exit 1)
    assert run.returncode == 2, run.stdout + run.stderr
    assert "strategy 'mx'" in run.stderr and "CUDA" in run.stderr and "no NVIDIA GPU" in run.stderr
    assert _untouched(tmp_path / "run")
    # leaving it out of the run passes the pre-flight
    assert "strategy 'mx'" not in recipe("run", str(path), "--run-dir", str(tmp_path / "run"), "--strategy", "ok",
                                         "--dry-run").stderr


def test_a_slurm_job_without_gpus_is_known_to_have_no_cuda(tmp_path):
    path = narrow_recipe(tmp_path, "{name: mx, preset: MXFP8_DEFAULT_CFG}", executor="slurm")
    text = path.read_text(encoding="utf-8").replace(
        "execution: {executor: slurm, gpus: 0}",
        "execution: {executor: slurm, gpus: 0, slurm: {steps: {quantize: {gpus: 0}}}}")
    path.write_text(text, encoding="utf-8")
    from runner.recipe.loader import load_recipe

    loaded = load_recipe(path)
    problems = plan_checks.run_problems(loaded, ["ok", "mx"], tmp_path / "model")
    assert [p.path for p in problems] == [("quantization", "strategies", 1)]
    assert "Slurm job asks for no GPU" in problems[0].message


def test_validate_reports_every_problem_of_a_file_at_once(tmp_path):
    from conftest import recipe

    path = tmp_path / "multi.yaml"
    path.write_text("""name: multi
model:
  name: Mini
  source: {kind: local, path: nomodel}
calibration:
  source: {kind: jsonl, path: missing.jsonl}
  samples: 4
quantization:
  strategies:
    - {name: max, preset: NVFP4_DEFAULT_CFG, calib_sampels: 3}
    - {name: max, preset: FP8_DEFAULT_CFG}
""", encoding="utf-8")
    result = recipe("validate", "--strict", str(path))  # the missing files are errors with --strict only
    assert result.returncode == 2
    # before: only the first (the unknown key)
    assert "(4 problems)" in result.stderr
    for expected in (":10:", "unknown key 'calib_sampels'", ":11:", "'max' is used twice",
                     "does not exist on this machine: " + str(tmp_path / "nomodel" / "config.json"),
                     "does not exist on this machine: " + str(tmp_path / "missing.jsonl")):
        assert expected in result.stderr


def test_init_says_when_its_recipe_would_quantize_nothing_and_how_to_fix_it(tmp_path):
    from conftest import recipe, recipe_cli_env

    model = narrow_model(tmp_path / "two")  # 2 layers: the generic base leaves the first and the last in BF16
    out = tmp_path / "two.yaml"
    result = recipe("init", str(model), "-o", str(out), env=recipe_cli_env() | {"COLUMNS": "200"})
    # before: a table of 16.00 bits without a word, and a recipe that validate then refused; now a
    # warning (the starter is written, to be edited), naming the cause and the fix
    assert result.returncode == 0, result.stdout + result.stderr
    assert "warning:" in result.stderr and "next: `recipe plan" not in result.stdout
    assert "quantizes nothing" in result.stdout
    assert "two.yaml does not validate as written" in result.stderr
    assert "strategy 'w4a16' would quantize no layer" in result.stderr and "Traceback" not in result.stderr
    assert "has 2 decoder layers" in result.stderr and "quantization: {exclude: [...]}" in result.stderr
    assert recipe("validate", str(out)).returncode == 2  # kept as written, and what init said is what validate says
    # the fix init names makes it validate
    out.write_text(out.read_text() + "quantization:\n  exclude: [\"*embed_tokens*\"]\n", encoding="utf-8")
    fixed = recipe("validate", str(out))
    assert fixed.returncode == 0, fixed.stderr
