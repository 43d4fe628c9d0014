"""Loading recipes: extends, merging, interpolation, path resolution and located errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import DEMO, MINIMAL, RECIPES
from runner.errors import RecipeError
from runner.recipe.loader import load_recipe


def problems_of(path: Path, env: dict[str, str] | None = None) -> list:
    with pytest.raises(RecipeError) as info:
        load_recipe(path, env=env)
    return info.value.problems


def test_minimal_recipe_loads_with_defaults(write):
    path = write("r.yaml", MINIMAL)
    recipe = load_recipe(path, env={}).recipe
    assert recipe.name == "mini"
    assert recipe.quantization.strategies[0].batch_size == "auto"
    assert recipe.publish.dry_run is True
    # Relative paths resolve against the recipe's own folder.
    assert recipe.model.source.path == path.parent / "model"
    assert recipe.calibration.source.path == path.parent / "calib.jsonl"


def test_unknown_key_names_file_line_column_and_suggests(write):
    path = write("r.yaml", MINIMAL + "      presett: x\n")
    [problem] = problems_of(path, env={})
    text = str(problem)
    assert f"{path}:12:7" in text
    assert "quantization.strategies[0].presett" in text
    assert "did you mean 'preset'?" in text


def test_misspelt_enum_value_suggests_closest(write):
    path = write("r.yaml", MINIMAL.replace("kind: jsonl", "kind: jsnl"))
    [problem] = problems_of(path, env={})
    assert "did you mean 'jsonl'?" in str(problem)
    assert problem.location.line == 6


def test_misspelt_preset_is_caught_without_modelopt(write):
    path = write("r.yaml", MINIMAL.replace("NVFP4_DEFAULT_CFG", "NVFP4_AWQ_LTE_CFG"))
    [problem] = problems_of(path, env={})
    assert "NVFP4_AWQ_LITE_CFG" in str(problem)
    assert problem.location.line == 11


def test_missing_required_key_is_reported_at_its_parent(write):
    path = write("r.yaml", MINIMAL.replace("  name: Mini\n", ""))
    [problem] = problems_of(path, env={})
    assert problem.path == ("model", "name")
    assert "required" in problem.message
    assert problem.location.line == 3


def test_yaml_syntax_error_is_located(write):
    path = write("r.yaml", "name: x\nmodel: [unclosed\n")
    [problem] = problems_of(path, env={})
    assert problem.location.file == str(path)
    assert "YAML syntax error" in problem.message


def test_yaml_reading_keeps_yaml_12_scalars_merge_keys_and_refuses_duplicates(tmp_path):
    from runner.recipe.yaml_tree import read_yaml, to_plain

    path = tmp_path / "r.yaml"
    path.write_text("a: yes\nb: 0o12\nc: 1_000\nd: on\ne: '7'\nf: ~\n"
                    "base: &b {k: 1, j: 2}\nmerged:\n  <<: *b\n  j: 3\n", encoding="utf-8")
    data, locs = to_plain(read_yaml(path))
    # YAML 1.2: yes/on are strings, 0o12 is octal, quoted numbers stay strings.
    assert data["a"] == "yes" and data["d"] == "on" and data["b"] == 10 and data["c"] == 1000
    assert data["e"] == "7" and data["f"] is None
    assert data["merged"] == {"k": 1, "j": 3}
    assert (locs[("b",)].line, locs[("b",)].column) == (2, 4)
    assert (locs[("merged", "j", "<key>")].line, locs[("merged", "j", "<key>")].column) == (10, 3)

    # Valid YAML 1.2 that libyaml (a 1.1 parser) refuses: read by ruamel's own parser instead.
    path.write_text("prompts:\n  - {prompt: Why is the sky blue?, expect: [light]}\n", encoding="utf-8")
    data, _ = to_plain(read_yaml(path))
    assert data == {"prompts": [{"prompt": "Why is the sky blue?", "expect": ["light"]}]}

    path.write_text("name: x\nmodel: {}\nname: y\n", encoding="utf-8")
    with pytest.raises(RecipeError) as info:
        read_yaml(path)
    [problem] = info.value.problems
    assert "duplicate key 'name'" in problem.message and "line 1" in problem.message
    assert (problem.location.line, problem.location.column) == (3, 1)


def test_every_problem_is_reported_at_once(write):
    text = MINIMAL.replace("samples: 4", "samples: -1").replace("name: max", "name: max\n      bogus: 1")
    path = write("r.yaml", text)
    problems = problems_of(path, env={})
    assert len(problems) == 2


def test_extends_merges_named_lists_by_name_and_replaces_plain_lists(write):
    write("base.yaml", """
        description: base
        quantization:
          exclude: ["*a*", "*b*"]
          strategies:
            - {name: max, preset: NVFP4_DEFAULT_CFG, batch_size: 4}
            - {name: fp8, preset: FP8_DEFAULT_CFG}
        """)
    path = write("child.yaml", MINIMAL.replace("name: mini", "extends: base.yaml\nname: mini").replace(
        "    - name: max\n      preset: NVFP4_DEFAULT_CFG\n",
        "    - name: max\n      calib_samples: 2\n    - name: awq\n      preset: NVFP4_AWQ_LITE_CFG\n"
    ).replace("quantization:\n", "quantization:\n  exclude: ['*c*']\n"))
    recipe = load_recipe(path, env={}).recipe
    names = [s.name for s in recipe.quantization.strategies]
    assert names == ["max", "fp8", "awq"]
    merged = recipe.quantization.strategies[0]
    assert (merged.preset, merged.batch_size, merged.calib_samples) == ("NVFP4_DEFAULT_CFG", 4, 2)
    assert recipe.quantization.exclude == ["*c*"]
    assert recipe.description == "base"


def test_plus_key_appends_to_the_inherited_list(write):
    write("base.yaml", "quantization:\n  exclude: ['*a*']\n")
    path = write("child.yaml", MINIMAL.replace("name: mini", "extends: base.yaml\nname: mini").replace(
        "quantization:\n", "quantization:\n  exclude+: ['*b*']\n"))
    assert load_recipe(path, env={}).recipe.quantization.exclude == ["*a*", "*b*"]


def test_paths_in_a_base_resolve_against_the_base(write, tmp_path):
    write("bases/paths.yaml", "calibration:\n  source: {kind: jsonl, path: data/c.jsonl}\n")
    path = write("child.yaml", MINIMAL.replace("name: mini", "extends: bases/paths.yaml\nname: mini").replace(
        "  source: {kind: jsonl, path: calib.jsonl}\n", ""))
    recipe = load_recipe(path, env={}).recipe
    assert recipe.calibration.source.path == tmp_path / "bases" / "data" / "c.jsonl"


def test_error_in_a_base_names_the_base_file(write):
    base = write("base.yaml", "serve:\n  engin: vllm\n")
    path = write("child.yaml", MINIMAL.replace("name: mini", "extends: base.yaml\nname: mini"))
    [problem] = problems_of(path, env={})
    assert problem.location.file == str(base)
    assert problem.location.line == 2
    assert "did you mean 'engine'?" in str(problem)


def test_extends_cycle_and_missing_base(write):
    write("a.yaml", "extends: b.yaml\n")
    write("b.yaml", "extends: a.yaml\n")
    assert "cycle" in problems_of(Path(write("c.yaml", "extends: a.yaml\n")), env={})[0].message
    [missing] = problems_of(write("d.yaml", "extends: nowhere.yaml\n"), env={})
    assert "base recipe not found" in missing.message and missing.location.line == 1


def test_variables_keep_their_type_and_interpolate_inside_strings(write):
    path = write("r.yaml", MINIMAL.replace("samples: 4", "samples: ${n}").replace(
        "name: mini", "name: mini\nvars: {n: 7, layer: 31}").replace(
        "quantization:\n", "quantization:\n  exclude: ['*layers.${layer}.*', 'literal $${x}']\n"))
    recipe = load_recipe(path, env={}).recipe
    assert recipe.calibration.samples == 7
    assert recipe.quantization.exclude == ["*layers.31.*", "literal ${x}"]


def test_env_interpolation_with_default_and_missing(write):
    text = MINIMAL.replace("{kind: local, path: model}", "\n    kind: local\n    path: ${env:MODELS:-/opt/models}/m")
    assert load_recipe(write("r.yaml", text), env={}).recipe.model.source.path == Path("/opt/models/m")
    assert load_recipe(write("r.yaml", text), env={"MODELS": "/x"}).recipe.model.source.path == Path("/x/m")
    missing = MINIMAL.replace("{kind: local, path: model}", "\n    kind: local\n    path: ${env:NOPE}")
    [problem] = problems_of(write("r2.yaml", missing), env={})
    assert "NOPE is not set" in problem.message and problem.location.line == 6


def test_secrets_cannot_be_interpolated_into_a_recipe(write):
    path = write("r.yaml", MINIMAL.replace("name: Mini", "name: ${env:HF_TOKEN}"))
    [problem] = problems_of(path, env={"HF_TOKEN": "hf_canary_should_never_appear"})
    assert "secret" in problem.message
    assert "hf_canary" not in str(problem)


def test_unknown_variable_suggests_a_defined_one(write):
    text = MINIMAL.replace("samples: 4", "samples: ${nn}").replace("name: mini", "name: mini\nvars: {n: 7}")
    path = write("r.yaml", text)
    [problem] = problems_of(path, env={})
    assert "${n}" in problem.hint


def test_gate_metric_must_name_a_suite(write):
    path = write("r.yaml", MINIMAL + """
benchmark:
  suites: [{name: factual}]
gates:
  - {name: g, metric: factul.passed, op: ">=", value: 5}
  - {name: h, metric: speed.ttft_p50, op: "<=", value: 120}
""")
    problems = problems_of(path, env={})
    assert [p.location.line for p in problems] == [16, 17]
    assert "did you mean 'factual'" in problems[0].hint
    assert "speed.ttft_p50_ms" in problems[1].hint


def test_unknown_container_is_an_error(write):
    path = write("r.yaml", MINIMAL + "serve:\n  container: vlm\n")
    [problem] = problems_of(path, env={})
    assert "did you mean 'vllm'?" in problem.hint


@pytest.mark.parametrize("path", sorted(p for p in RECIPES.rglob("*.yaml") if p.parent.name not in ("base", "suites", "hardware")))
def test_shipped_recipes_validate(path):
    assert load_recipe(path).recipe.name


def test_the_plan_recipe_has_what_the_plan_asks():
    recipe = load_recipe(RECIPES / "qwen35-9b-opus.yaml").recipe
    assert [s.name for s in recipe.quantization.strategies] == ["awq_lite", "mlp_only", "auto_mixed",
                                                                "nvidia_w4a16_fp8attn"]
    assert recipe.quantization.exclude == ["*linear_attn*", "*layers.0.*", "*layers.31.*", "*embed_tokens*"]
    nvidia = recipe.quantization.strategies[3]  # NVIDIA's layout quantizes linear attention (FP8) itself
    assert nvidia.modelopt_recipe == "huggingface/qwen3_5/ptq/w4a16_nvfp4-fp8_attn-kv_fp8_cast"
    assert recipe.quantization.exclusions(nvidia) == ["*layers.0.*", "*layers.31.*", "*embed_tokens*"]
    assert recipe.quantization.strategies[2].auto_quantize.effective_bits == 9.4  # reachable at 9B: 8.84 to 11.02
    # The plan's gates that can decide at their suites' sizes, then the two on large paired suites
    # (held-out teacher prompts, BFCL) that gate what the plan's small suites cannot (docs/gates.md)
    assert [g.name for g in recipe.gates] == ["thinking_leak", "ttft_p50", "decode_speed", "held_out", "bfcl"]
    assert [s.name for s in recipe.benchmark.suites][-2:] == ["held_out", "bfcl"]
    assert recipe.calibration.source.eval_split == 0.2
    assert recipe.benchmark.baseline.name == "Q4_K_M"
    assert "--language-model-only" in recipe.serve.args and "qwen3_coder" in recipe.serve.args
    assert {"dgx-spark", "blackwell", "nvfp4", "qwen3.5"} <= set(recipe.report.tags)
    assert [c.count for c in recipe.calibration.source.categories] == [100] * 5


def test_strategy_kinds_and_auto_quantize_formats_are_checked(write):
    both = MINIMAL + "    - {name: both, preset: FP8_DEFAULT_CFG, modelopt_recipe: x}\n"
    [problem] = problems_of(write("r.yaml", both), env={})
    assert "exactly one of preset, modelopt_recipe, auto_quantize" in problem.message
    text = MINIMAL + """    - {name: rec, modelopt_recipe: general/ptq/nvfp4_default-kv_fp8_cast}
    - name: auto
      auto_quantize: {effective_bits: 4.8, formats: [NVFP4_DEFAULT_CFG, FP8_DEFALT_CFG]}
"""
    [problem] = problems_of(write("r2.yaml", text), env={})
    assert problem.path == ("quantization", "strategies", 2, "auto_quantize", "formats", 1)
    assert "FP8_DEFAULT_CFG" in problem.hint and problem.location.line == 14


def test_suite_and_hardware_names_are_checked(write):
    path = write("r.yaml", MINIMAL + "benchmark:\n  hardware: dgx-sprak-gb10\n  suites: [{name: factul}]\n")
    problems = problems_of(path, env={})
    assert {p.path for p in problems} == {("benchmark", "suites", 0, "name"), ("benchmark", "hardware")}
    assert any("'factual'" in p.hint for p in problems) and any("'dgx-spark-gb10'" in p.hint for p in problems)


def test_a_tagged_section_whose_kind_changes_replaces_the_inherited_one(write, tmp_path):
    # The flagship's parts without its held-out teacher suite (which needs the teacher's split)
    plan = write("teacher-parent.yaml", f"""
        extends: [{RECIPES / "base/nvfp4-strategies.yaml"}, {RECIPES / "base/qwen35.yaml"},
                  {RECIPES / "base/chat-calibration.yaml"}]
        name: parent
        vars: {{last_layer: 31}}
        model: {{name: M, source: {{kind: local, path: model}}}}
        """)
    path = write("jsonl.yaml", f"""
        extends: {plan}
        name: mine
        calibration:
          source: {{kind: jsonl, path: calib.jsonl}}
        """)
    loaded = load_recipe(path)  # before this rule: 8 "unknown key" errors from the teacher's keys
    assert set(loaded.data["calibration"]["source"]) == {"kind", "path"}
    source = loaded.recipe.calibration.source
    assert source.kind == "jsonl" and source.path == tmp_path / "calib.jsonl"
    # The rest of the inherited calibration section still merges.
    assert loaded.recipe.calibration.samples == load_recipe(plan).recipe.calibration.samples


def test_a_tagged_section_with_the_same_kind_still_merges(write):
    plan = RECIPES / "qwen35-9b-opus.yaml"
    path = write("teacher.yaml", f"""
        extends: {plan}
        name: mine
        calibration:
          source: {{kind: teacher, concurrency: 4}}
        """)
    source = load_recipe(path).recipe.calibration.source
    inherited = load_recipe(plan).recipe.calibration.source
    assert source.kind == "teacher" and source.concurrency == 4
    assert source.endpoint == inherited.endpoint and source.categories == inherited.categories


@pytest.mark.parametrize("repo_id", ["../..", "user/name.git", "user/" + "a" * 120])
def test_publish_repo_ids_are_checked_by_the_hubs_own_rule(write, repo_id):
    path = write("r.yaml", f"extends: {DEMO}\npublish:\n  repo_id: '{repo_id}'\n")
    with pytest.raises(RecipeError) as caught:
        load_recipe(path)
    assert "r.yaml:3" in str(caught.value) and "repo" in str(caught.value).lower()
