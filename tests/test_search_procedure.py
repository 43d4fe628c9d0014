"""The search's procedure (runner/search/procedure.py) with scripted outcomes: the order ModelOpt's PTQ guidance gives
(narrowest scope first, widen while the gates hold, recover by calibration before backing off, then the
layers whose quantization costs most KL), the candidates' names, and the search record's tables
(runner/search/driver.py, runner/search/report.py) from scripted entries. The driver against real steps is
tests/test_search_run.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from runner.recipe.schema import SearchSpace, SearchSpec
from runner.search.driver import Entry, SearchResult, candidate_strategy, prune_threshold
from runner.search.procedure import (
    ACCEPTED,
    PRUNED,
    REJECTED,
    Candidate,
    Outcome,
    format_ladder,
    most_sensitive,
    procedure_bound,
    ptq_order,
    space_size,
)
from runner.search.report import pareto_front, pareto_markdown, pareto_svg, strategy_snippet


def space(**kw) -> SearchSpace:
    return SearchSpace.model_validate({"formats": {"routed_experts": ["nvfp4", "w4a16_nvfp4"],
                                                   "attention": ["fp8", "bf16"]}, **kw})


def drive(procedure, verdict) -> list[list[Candidate]]:
    """Run the procedure to its end, answering each candidate with verdict(candidate) -> Outcome."""
    rounds = []
    try:
        proposed = next(procedure)
        while True:
            rounds.append(proposed)
            proposed = procedure.send({c: verdict(c) for c in proposed})
    except StopIteration:
        return rounds


def test_formats_are_tried_smallest_first_and_the_more_faithful_first_among_equals():
    assert format_ladder(["fp8", "nvfp4", "bf16", "w4a16_nvfp4"]) == ["w4a16_nvfp4", "nvfp4", "fp8"]


def test_every_widening_that_holds_is_kept_and_the_search_widens_family_by_family():
    rounds = drive(ptq_order(space()), lambda c: Outcome(ACCEPTED, kl=0.01))
    assert [len(r) for r in rounds] == [1, 1]  # one widening per family, nothing to recover
    first, second = rounds[0][0], rounds[1][0]
    assert first.formats == (("routed_experts", "w4a16_nvfp4"),) and first.algorithm == "max"
    assert second.formats == (("routed_experts", "w4a16_nvfp4"), ("attention", "fp8"))
    assert second.move == "widen: attention to fp8"
    assert first.name("search") == "search-re_w4a16-max-kvfp8"
    assert second.name("search") == "search-re_w4a16-at_fp8-max-kvfp8"


def test_a_failure_is_recovered_by_calibration_before_the_format_backs_off():
    # W4A16 experts fail with max, pass with mse: never tries W4A4 experts, widens on with mse's layout.
    def verdict(c: Candidate) -> Outcome:
        if dict(c.formats).get("routed_experts") == "w4a16_nvfp4" and c.algorithm == "max":
            return Outcome(REJECTED, kl=0.3)
        return Outcome(ACCEPTED, kl=0.02 if c.algorithm == "mse" else 0.05)
    rounds = drive(ptq_order(space(algorithms=["max", "awq_lite", "mse"])), verdict)
    assert [c.algorithm for c in rounds[1]] == ["awq_lite", "mse"]  # the recovery round, together
    assert all(c.move.startswith("recover routed_experts w4a16_nvfp4") for c in rounds[1])
    # the lowest-KL accepted recovery is the new state: its algorithm carries into the next widening
    assert rounds[2][0].formats == (("routed_experts", "w4a16_nvfp4"), ("attention", "fp8"))
    assert rounds[2][0].algorithm == "max"  # a new widening starts from the first algorithm again
    assert all(fmt != "nvfp4" for r in rounds for c in r for f, fmt in c.formats if f == "routed_experts")


def test_the_sensitivity_back_off_keeps_the_costliest_layers_then_the_next_format():
    sensitivity = [{"layer": 0, "kl_without": 0.1, "kl_recovered": 0.05},
                   {"layer": 1, "kl_without": 0.14, "kl_recovered": 0.01},
                   {"layer": 2, "kl_without": 0.02, "kl_recovered": 0.13},
                   {"layer": 3, "kl_without": 0.15, "kl_recovered": -0.001}]

    def verdict(c: Candidate) -> Outcome:
        if c.keep_layers:
            return Outcome(ACCEPTED, kl=0.04)
        return Outcome(REJECTED if c.algorithm != "awq_lite" else PRUNED, kl=0.2 if c.algorithm == "max" else 0.1,
                       sensitivity=sensitivity)
    rounds = drive(ptq_order(space(algorithms=["max", "awq_lite"], keep_first=[0, 1], keep_last=[0, 1])), verdict)
    backoff = rounds[2]
    assert backoff[0].keep_layers == (0, 2) and backoff[0].algorithm == "awq_lite"  # lowest KL of the tries
    assert (backoff[1].keep_first, backoff[1].keep_last) == (1, 1)
    assert rounds[3][0].formats[0] == ("routed_experts", "w4a16_nvfp4") and rounds[3][0].keep_layers == (0, 2)
    assert most_sensitive(sensitivity, (2,), 2) == (0, 1, 2)
    assert most_sensitive(sensitivity, (), 9) == (0, 1, 2)  # a layer whose quantization costs nothing stays


def test_the_sensitivity_back_off_raises_two_more_layers_a_round_until_the_gates_pass():
    sensitivity = [{"layer": i, "kl_recovered": 0.1 * (10 - i)} for i in range(10)]  # layer 0 costs most

    def verdict(c: Candidate) -> Outcome:
        return Outcome(ACCEPTED if len(c.keep_layers) >= 6 else REJECTED, kl=0.2, sensitivity=sensitivity)
    rounds = drive(ptq_order(space(formats={"mlp": ["nvfp4"]}, algorithms=["max"])), verdict)
    assert [[c.keep_layers for c in r] for r in rounds] == [[()], [(0, 1)], [(0, 1, 2, 3)], [(0, 1, 2, 3, 4, 5)]]
    assert rounds[-1][0].move == "back off mlp nvfp4: the 6 layers costing most KL stay BF16"


def test_a_family_that_never_holds_stays_bf16_and_the_search_widens_on():
    def verdict(c: Candidate) -> Outcome:
        return Outcome(REJECTED if "attention" in dict(c.formats) else ACCEPTED, kl=0.1)
    rounds = drive(ptq_order(space(formats={"mlp": ["nvfp4"], "attention": ["fp8"], "lm_head": ["fp8"]})), verdict)
    last = rounds[-1][0]
    assert dict(last.formats) == {"mlp": "nvfp4", "lm_head": "fp8"}


def test_space_size_and_the_procedures_bound():
    s = space(algorithms=["max", "mse"], keep_first=[0, 1], keep_last=[0, 1])
    assert space_size(s) == (3 * 2 - 1) * 2 * 2 * 2 * 1
    # per family and format (3 in all): 2 algorithms, 3 sensitivity rounds, the first/last-layer step
    assert procedure_bound(s) == 3 * (2 + 3 + 1)


def test_candidate_names_are_strategy_names_and_encode_every_choice():
    c = Candidate((("mlp", "nvfp4"), ("attention", "fp8")), "awq_lite", "bf16", 1, 2, (3, 17))
    strategy = candidate_strategy(c, SearchSpec.model_validate({"space": {"formats": {"mlp": ["nvfp4"]}}}))
    assert strategy.name == "search-mlp_fp4-at_fp8-awql-k1_2-L3_17-kvbf16"
    assert strategy.layout is not None and strategy.layout.keep_layers == [3, 17]
    assert strategy.layout.formats == {"mlp": "nvfp4", "attention": "fp8"} and strategy.algorithm == "awq_lite"
    many = Candidate((("mlp", "nvfp4"),), "max", "fp8", keep_layers=tuple(range(20)))
    assert len(many.name("search")) < 60 and many.name("search") != Candidate(
        (("mlp", "nvfp4"),), "max", "fp8", keep_layers=tuple(range(21))).name("search")


def entry(name: str, status: str, kl: float, size: int, gate_status: str | None = None, **kw) -> Entry:
    return Entry(name, 1, "widen", {"formats": {"mlp": "nvfp4"}, "kv_cache": "fp8"}, "max", "mlp nvfp4",
                 status=status, kl=kl, gate_status=gate_status, predicted={"bytes_per_token": size}, **kw)


def test_auto_pruning_waits_for_a_rejection_and_then_sits_above_every_acceptance():
    spec = SearchSpec.model_validate({"space": {"formats": {"mlp": ["nvfp4"]}}})
    assert prune_threshold(spec, [entry("a", ACCEPTED, 0.1, 1, "proven")])[0] == float("inf")
    judged = [entry("a", ACCEPTED, 0.1, 1, "proven"), entry("b", REJECTED, 0.3, 1, "rejected"),
              entry("c", REJECTED, 0.05, 1, "rejected")]
    threshold, how = prune_threshold(spec, judged)
    assert threshold == 0.1 and "0.05" in how  # never below a KL the gates accepted
    fixed = SearchSpec.model_validate({"space": {"formats": {"mlp": ["nvfp4"]}}, "prune": {"max_kl": 0.2}})
    assert prune_threshold(fixed, judged)[0] == 0.2


def test_the_record_names_the_best_its_front_the_audit_and_a_snippet_to_paste():
    spec = SearchSpec.model_validate({"space": {"formats": {"mlp": ["nvfp4"]}}})
    entries = [entry("big", ACCEPTED, 0.01, 900, "proven"), entry("small", ACCEPTED, 0.05, 500, "proven"),
               entry("worse", ACCEPTED, 0.06, 700, "proven"),
               entry("audited", REJECTED, 0.4, 400, "rejected", audit=True, served=True),
               entry("pruned", PRUNED, 0.5, 300)]
    result = SearchResult(spec, entries, [], "the procedure tried every family", 3, 12.0)
    data = result.to_json()
    assert data["best"] == "small"  # the objective first, among accepted ones
    assert pareto_front(data) == ["big", "small"]  # "worse" is beaten on both
    assert data["audit"] == {"audited": 1, "agree": 1, "disagree": 0}
    table = pareto_markdown(data)
    assert "`small` ★" in table and "`worse` |" in table and "pruned" in table and "agreed with the pruning on 1" in table
    assert pareto_svg(data).count("<circle") == 5 + 5  # the points and the legend
    snippet = strategy_snippet(data)
    assert "name: small" in snippet and "layout:" in snippet and "nvfp4" in snippet
    from ruamel.yaml import YAML

    [pasted] = YAML(typ="safe").load(snippet)
    from runner.recipe.schema import Strategy

    assert Strategy.model_validate(pasted).layout.formats == {"mlp": "nvfp4"}  # a valid strategy as it stands
    none = SearchResult(spec, [entry("x", REJECTED, 0.4, 400, "rejected")], [], "", 1, 1.0).to_json()
    assert none["best"] is None and strategy_snippet(none).startswith("# No search candidate")


@pytest.mark.parametrize("bad", [{"formats": {}}, {"formats": {"mlp": ["nvfp4"]}, "algorithms": ["maxx"]},
                                 {"formats": {"vision": ["nvfp4"]}}])
def test_a_bad_space_is_refused_by_the_schema(bad):
    with pytest.raises(ValueError):
        SearchSpace.model_validate(bad)


def test_a_search_may_stand_in_for_the_strategies_but_something_must_quantize(tmp_path):
    from runner.errors import RecipeError
    from runner.plan import build_plan
    from runner.recipe.loader import load_recipe

    demo = Path(__file__).resolve().parent.parent / "recipes" / "demo" / "smollm2-search-cpu.yaml"
    off = "quantization:\n  strategies:\n    - {name: nvfp4_max, enabled: false}\n" \
          "    - {name: negative_control, enabled: false}\n"
    only_search = tmp_path / "only-search.yaml"
    only_search.write_text(f"extends: {demo}\nname: only-search\n{off}")
    plan = build_plan(load_recipe(only_search).recipe)  # no strategy branch: the search adds its candidates
    assert not [sid for sid in plan.steps if sid.startswith("quantize.")] and "gates" in plan.steps
    neither = tmp_path / "neither.yaml"
    neither.write_text(f"extends: {demo}\nname: neither\n{off}search: null\n")
    with pytest.raises(RecipeError, match="every strategy is disabled"):
        load_recipe(neither)
