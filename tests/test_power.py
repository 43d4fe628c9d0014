"""Gate power before anything runs: which outcomes pass and fail each suite gate at its size, the smallest
regression it catches, and the warnings for gates that cannot decide."""

from __future__ import annotations

import json

from conftest import MINIMAL, placeholder_model, recipe
from runner.benchmark.power import gate_power
from runner.recipe.schema import Gate


def test_the_flagships_six_of_ten_fails_only_at_two_of_ten_and_passes_only_at_ten():
    power = gate_power(Gate(name="tool_calling", metric="tool_calling.passed", op=">=", value=6), 10, 0.9, False)
    assert power.passing == [10] and power.failing == [0, 1, 2]
    assert power.named_drop is not None and round(power.named_drop, 3) == 0.3
    assert power.detectable_drop is not None and power.detectable_drop > 0.6  # a 3/10 model gets through
    assert "too small to catch the regression it is there for" in (power.warning() or "")


def test_a_relative_gate_at_five_prompts_can_never_pass():
    gate = Gate(name="factual", metric="factual.passed", op=">=", value=1.0, relative_to="baseline")
    power = gate_power(gate, 5, 0.9, False)
    assert power.passing == [] and power.failing and power.base_passes == 4
    assert "can never pass at n=5" in (power.warning() or "")


def test_more_prompts_detect_smaller_regressions_and_a_margin_lets_an_equal_candidate_pass():
    gate = Gate(name="tools", metric="tools.pass_rate", op=">=", relative_to="baseline", margin=0.05)
    small, large = gate_power(gate, 40, 0.9, True), gate_power(gate, 400, 0.9, True)
    assert small.detectable_drop is not None and large.detectable_drop is not None
    assert large.detectable_drop < small.detectable_drop
    assert 0 in large.passing and large.failing  # nothing lost passes; a large loss fails
    assert large.detectable_drop <= 2 * 0.05 + 0.02  # a 400-prompt suite catches about twice its margin


def test_a_baseline_expected_at_the_floor_is_unmeasurable():
    gate = Gate(name="tools", metric="tools.pass_rate", op=">=", value=0.9, relative_to="baseline")
    power = gate_power(gate, 10, 0.0, True)
    assert power.unmeasurable and "cannot measure a regression" in (power.warning() or "")


def test_an_exact_zero_leak_gate_warns_when_the_stated_rate_makes_the_baseline_fail():
    gate = Gate(name="leak", metric="leak.failed", op="==", value=0)
    assert gate_power(gate, 25, 1.0, True).warning() is None
    assert "fails a candidate exactly as good as the baseline" in (gate_power(gate, 25, 0.9, True).warning() or "")


def test_plan_prints_each_gates_power_and_validate_warns(write, tmp_path):
    placeholder_model(tmp_path / "model")
    (tmp_path / "calib.jsonl").write_text('{"messages": [{"role": "user", "content": "Hi"}]}\n')
    path = write("r.yaml", MINIMAL + """
benchmark:
  baseline: {kind: served}
  suites:
    - {name: tool_calling, baseline_rate: 0.9}
gates:
  - {name: tools, metric: tool_calling.passed, op: ">=", value: 1.0, relative_to: baseline}
""")
    plan = recipe("plan", str(path), "--run-dir", str(tmp_path / "run"))
    assert plan.returncode == 0, plan.stderr
    assert "gate power" in plan.stdout and "tools: n=10, baseline rate 0.9:" in plan.stdout
    assert "warning: gate tools can never pass at n=10" in plan.stderr
    validate = recipe("validate", str(path))
    assert validate.returncode == 0 and "warning: gate tools can never pass at n=10" in validate.stderr
    as_json = json.loads(recipe("plan", str(path), "--json", "--run-dir", str(tmp_path / "run")).stdout)
    (power,) = as_json["power"]
    assert power["gate"] == "tools" and power["n"] == 10 and power["passing"] == [] and power["warning"]


def test_a_suite_with_categories_says_each_category_is_judged():
    """The flagship's BFCL gate pools 8 categories; the plan says a category the baseline cannot do
    makes the gate not measurable (gates._category_floor_reason), so nobody reads the pooled power alone."""
    import pytest

    pytest.importorskip("bfcl_eval", reason="bfcl-eval not installed (.ci/setup installs it)")
    from pathlib import Path

    from runner.benchmark.power import recipe_power
    from runner.recipe.loader import load_recipe

    loaded = load_recipe(Path(__file__).resolve().parent.parent / "recipes" / "qwen35-9b-opus.yaml")
    powers = {p.gate: p for p in recipe_power(loaded.recipe)}
    assert powers["bfcl"].categories and "passes no item of one of its categories" in powers["bfcl"].describe()
    assert not powers["thinking_leak"].categories
    assert "categories" not in powers["thinking_leak"].describe()
