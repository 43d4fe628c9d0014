"""Gate verdicts (paired with the baseline on the same prompts, one-sample when absolute), the statistics
behind them, and the selection: fast, from results built for the test."""

from __future__ import annotations

import random

import pytest

from runner.benchmark.gates import evaluate, select, status_of
from runner.benchmark.presentation import comparison_markdown
from runner.benchmark.stats import Paired, bootstrap_mean, wilson


def suite(outcomes: list[bool]) -> dict:
    passed = sum(outcomes)
    return {"passed": passed, "failed": len(outcomes) - passed, "total": len(outcomes),
            "pass_rate": passed / len(outcomes),
            "items": [{"prompt": f"q{i}", "passed": ok} for i, ok in enumerate(outcomes)]}


def result(passed: int | list[bool], total: int = 5, *, size: int = 1000, speed: float = 20.0, leaks: int = 0
           ) -> dict:
    """`passed` prompts out of `total` pass (the first ones), or exactly the given outcomes."""
    outcomes = passed if isinstance(passed, list) else [i < passed for i in range(total)]
    return {"suites": {"factual": suite(outcomes), "thinking_leak": suite([i >= leaks for i in range(5)])},
            "speed": {"summary": {"decode_tok_s": speed}}, "size": {"bytes": size}}


def gate(metric: str, op: str, value: float | None, relative: bool = False, name: str = "g", **extra) -> dict:
    return {"name": name, "metric": metric, "op": op, "value": value,
            "relative_to": "baseline" if relative else "absolute", **extra}


def test_wilson_interval_matches_the_textbook_values():
    low, high = wilson(4, 5)
    assert (round(low, 4), round(high, 4)) == (0.3755, 0.9638)
    assert wilson(0, 5)[0] == 0.0 and round(wilson(0, 5)[1], 4) == 0.4345
    assert wilson(5, 5)[1] == 1.0 and round(wilson(5, 5)[0], 4) == 0.5655


def test_mcnemar_exact_p_values():
    assert Paired(5, 1, 9, 5).mcnemar_p() == pytest.approx(22 / 1024)  # 2 x P(X <= 1), X ~ Bin(10, 1/2)
    assert Paired(5, 5, 5, 5).mcnemar_p() == 1.0
    assert Paired(10, 0, 0, 0).mcnemar_p() == 1.0  # no flip, no evidence of a lean
    assert Paired(0, 6, 0, 0).mcnemar_p() == pytest.approx(2 / 64)


@pytest.mark.parametrize(("n", "both", "lost", "gained", "factor"), [
    (20, 0.7, 0.1, 0.1, 1.0), (100, 0.6, 0.15, 0.1, 1.0), (200, 0.8, 0.1, 0.05, 0.9), (50, 0.85, 0.05, 0.02, 1.0)])
def test_paired_interval_covers_the_true_difference_at_least_95_percent(n, both, lost, gained, factor):
    """Simulated paired samples: the interval of candidate - factor x baseline must hold the true value
    at least at its nominal rate (the method is slightly conservative at small n)."""
    rng, reps, covered = random.Random(7), 1500, 0
    truth = (both + gained) - factor * (both + lost)
    for _ in range(reps):
        counts = [0, 0, 0, 0]
        for _ in range(n):
            u = rng.random()
            counts[0 if u < both else 1 if u < both + lost else 2 if u < both + lost + gained else 3] += 1
        low, high = Paired(*counts).interval(factor)
        covered += low - 1e-12 <= truth <= high + 1e-12
    assert covered / reps >= 0.94


def test_pairing_is_what_gives_the_power():
    """The same rates: 80/100 each. Paired with two flips the interval is narrow; with forty flips wide."""
    stable = Paired(79, 1, 1, 19).interval()
    churning = Paired(60, 20, 20, 0).interval()
    assert stable[1] - stable[0] < 0.1 < 0.2 < churning[1] - churning[0]


def test_bootstrap_of_a_paired_mean_is_seeded_and_holds_the_mean():
    diffs = [0.1 * (i % 7) - 0.2 for i in range(60)]
    low, high = bootstrap_mean(diffs)
    assert low < sum(diffs) / 60 < high and (low, high) == bootstrap_mean(diffs)


@pytest.mark.parametrize(("passed", "total", "verdict"), [
    (5, 5, "inconclusive"),  # 5/5 is [0.57, 1.0]: could be below 0.6
    (2, 5, "inconclusive"),
    (0, 5, "fail"),  # [0, 0.43]: surely below 0.6
    (95, 100, "pass"),  # [0.89, 0.98]
    (40, 100, "fail"),
])
def test_absolute_rate_gate_is_judged_on_its_interval(passed, total, verdict):
    (v,) = evaluate([gate("factual.pass_rate", ">=", 0.6)], result(passed, total), None)
    assert v["verdict"] == verdict and v["n"] == total
    assert v["interval"][0] <= passed / total <= v["interval"][1]


@pytest.mark.parametrize(("cand", "base", "verdict"), [
    ((4, 5), (4, 5), "inconclusive"),  # equal, but five prompts cannot show "not worse"
    ((3, 5), (5, 5), "inconclusive"),
    ((0, 5), (4, 5), "fail"),
    ((285, 300), (285, 300), "inconclusive"),  # ">= 1 x baseline" cannot pass: a tiny loss is possible
    ((70, 100), (95, 100), "fail"),
])
def test_relative_gate_is_paired_on_the_same_prompts(cand, base, verdict):
    (v,) = evaluate([gate("factual.passed", ">=", 1.0, relative=True)], result(*cand), result(*base))
    assert v["verdict"] == verdict, v
    assert v["threshold"] == base[0] and v["baseline"] == base[0]
    flips = v["flips"]
    assert flips["lost"] == max(base[0] - cand[0], 0) and flips["gained"] == max(cand[0] - base[0], 0)
    assert flips["n"] == cand[1] and flips["candidate"] == cand[0] and flips["baseline"] == base[0]


def test_a_gate_with_room_passes_when_nothing_flipped():
    (v,) = evaluate([gate("factual.passed", ">=", 0.95, relative=True)], result(285, 300), result(285, 300))
    assert v["verdict"] == "pass" and v["flips"]["mcnemar_p"] == 1.0


def test_the_same_rates_with_different_flips_get_different_verdicts():
    """Unpaired, 90/100 against 90/100 is the same either way; paired, which prompts flipped decides."""
    base = [i < 90 for i in range(100)]
    same = evaluate([gate("factual.pass_rate", ">=", 0.95, relative=True)], result(base), result(base))
    shuffled = base[15:] + base[:15]  # 10 lost, 10 gained
    churned = evaluate([gate("factual.pass_rate", ">=", 0.95, relative=True)], result(shuffled), result(base))
    assert same[0]["verdict"] == "pass" and churned[0]["verdict"] == "inconclusive"
    assert (churned[0]["flips"]["lost"], churned[0]["flips"]["gained"]) == (10, 10)


def test_margin_is_the_fields_within_d_points_rule():
    base = [i < 180 for i in range(400)]  # 180/400 = 45 %
    cand = [i < 160 for i in range(400)]  # 20 lost: 5 points below, [-7.2, -3.1]
    within_10 = gate("factual.pass_rate", ">=", None, relative=True, margin=0.10)
    within_5 = gate("factual.pass_rate", ">=", None, relative=True, margin=0.05)
    within_1 = gate("factual.pass_rate", ">=", None, relative=True, margin=0.01)
    v10, v5, v1 = evaluate([within_10, within_5, within_1], result(cand), result(base))
    assert (v10["verdict"], v5["verdict"], v1["verdict"]) == ("pass", "inconclusive", "fail")
    assert v10["threshold"] == pytest.approx(0.35) and v10["declared"] == 1.0


def test_a_baseline_at_the_floor_makes_the_gate_not_measurable():
    """0/10 tool calls for the baseline: the suite cannot see a regression, relative or absolute."""
    gates = [gate("factual.pass_rate", ">=", 0.9, relative=True, name="rel"),
             gate("factual.passed", ">=", 6, name="abs")]
    verdicts = evaluate(gates, result(0, 10), result(0, 10))
    assert [v["verdict"] for v in verdicts] == ["not_measurable", "not_measurable"]
    assert all("baseline itself scored 0/10" in v["reason"] for v in verdicts)
    assert all(v["pass"] is None for v in verdicts)
    assert status_of(verdicts) == "unproven"


def test_a_relative_gate_without_common_prompts_is_missing():
    other = result(5)
    for item in other["suites"]["factual"]["items"]:
        item["prompt"] += " (another suite version)"
    (v,) = evaluate([gate("factual.passed", ">=", 1.0, relative=True)], result(5), other)
    assert v["verdict"] == "missing" and "none of the candidate's prompts" in v["reason"]


def test_exact_gates_speed_size_and_equality_are_judged_as_measured():
    gates = [gate("thinking_leak.failed", "==", 0, name="leak"), gate("speed.decode_tok_s", ">=", 0.5, True, "speed"),
             gate("size.bytes", "<", 1.0, True, "size")]
    ok = evaluate(gates, result(5, size=500, speed=11.0), result(5, size=1000, speed=20.0))
    assert [v["verdict"] for v in ok] == ["pass", "pass", "pass"]
    bad = evaluate(gates, result(5, size=1000, speed=9.0, leaks=1), result(5, size=1000, speed=20.0))
    assert [v["verdict"] for v in bad] == ["fail", "fail", "fail"]
    assert bad[0]["interval"] is not None and bad[1]["interval"] is None  # the count's interval is still shown


def test_a_missing_metric_is_missing_not_failed():
    (v,) = evaluate([gate("speed.decode_tok_s", ">=", 1.0, relative=True)], result(5), {"suites": {}})
    assert v["verdict"] == "missing" and v["pass"] is None and "not measured" in v["reason"]


def test_an_absolute_gate_needs_a_value_and_margin_is_relative_only():
    with pytest.raises(ValueError, match="absolute gate needs `value`"):
        evaluate([gate("factual.passed", ">=", None)], result(5), None)
    with pytest.raises(ValueError, match="`margin` belongs to gates with `relative_to: baseline`"):
        evaluate([gate("factual.passed", ">=", 3, margin=0.1)], result(5), None)


def test_proven_candidates_rank_before_unproven_and_unproven_is_selected_only_when_accepted():
    base = result(285, 300)
    results = {"small": result(240, 300, size=100),  # 45 lost
               "mid": result(285, 300, size=500),  # nothing flipped: proven
               "tiny": result(0, 300, size=10),
               "odd": result([i < 280 or i == 299 for i in range(300)], size=300)}  # five lost, one gained
    gates = [gate("factual.pass_rate", ">=", 0.98, relative=True, name="factual")]
    verdicts = {s: evaluate(gates, r, base) for s, r in results.items()}
    assert {s: verdicts[s][0]["verdict"] for s in results} == {
        "small": "fail", "mid": "pass", "tiny": "fail", "odd": "inconclusive"}
    chosen = select(verdicts, results, [{"metric": "size.bytes", "order": "min"}])
    assert chosen["best"] == "mid" and chosen["proven"] is True
    assert chosen["ranking"] == ["mid", "odd"]  # the proven one first although "odd" is smaller
    assert chosen["failing"] == {"small": ["factual"], "tiny": ["factual"]}
    assert chosen["unproven"] == {"odd": ["factual"]}
    only_unproven = {s: verdicts[s] for s in ("odd", "tiny")}
    refused = select(only_unproven, results, [])
    assert refused["best"] is None and refused["unproven"] == {"odd": ["factual"]}
    accepted = select(only_unproven, results, [], accept_unproven=True)
    assert accepted["best"] == "odd" and accepted["proven"] is False


def test_selection_keeps_recipe_order_on_ties():
    results = {"a": result(5, size=500), "b": result(5, size=500)}
    verdicts = {s: evaluate([gate("size.bytes", "<=", 600)], r, None) for s, r in results.items()}
    assert select(verdicts, results, [{"metric": "size.bytes", "order": "min"}])["ranking"] == ["a", "b"]


def test_table_shows_n_both_rates_flips_interval_and_status():
    gates = [gate("factual.passed", ">=", 1.0, relative=True, name="factual")]
    base = result(4)
    verdicts = {"x": evaluate(gates, result(5), base), "y": evaluate(gates, result(0), base)}
    selection = select(verdicts, {"x": result(5), "y": result(0)}, [], accept_unproven=True)
    table = comparison_markdown(verdicts, "BF16", base, selection)
    assert "| gate | required | n | BF16 (baseline) | x (unproven) | y (rejected) |" in table
    assert "| factual | >= 1 x baseline | 5 | 4 | 5 (-0/+1 vs baseline" in table
    assert "McNemar p=1" in table and "FAIL |" in table
    assert "Selected: **x**, UNPROVEN: no gate failed, but factual could not decide" in table


def test_table_says_why_a_gate_is_not_measured_and_that_nothing_unproven_was_taken():
    gates = [gate("factual.passed", ">=", 1.0, relative=True, name="tools")]
    verdicts = {"x": evaluate(gates, result(0), result(0))}
    table = comparison_markdown(verdicts, "BF16", result(0), select(verdicts, {"x": result(0)}, []))
    assert "| x (unproven) |" in table and "not measurable" in table
    assert "Gate tools is not measured: the baseline itself scored 0/5" in table
    assert "No strategy is proven, and none unproven is selected" in table and "accept_unproven: true" in table


def paired(speed: float, base: float, low: float, high: float) -> dict:
    out = result(5, speed=speed)
    out["speed"]["paired_baseline"] = {"summary": {"decode_tok_s": base}, "pairs": 3,
                                       "ratios": {"decode_tok_s": {"median": speed / base, "min": low, "max": high}}}
    return out


@pytest.mark.parametrize("low, high, verdict", [(0.6, 0.8, "pass"), (0.3, 0.45, "fail"), (0.4, 0.7, "inconclusive")])
def test_a_paired_speed_gate_judges_the_per_pair_ratios(low, high, verdict):
    # The separately measured baseline (30 tok/s) is not used: the one measured alongside (20) is.
    (v,) = evaluate([gate("speed.decode_tok_s", ">=", 0.5, relative=True)], paired(12.0, 20.0, low, high),
                    result(5, speed=30.0))
    assert v["verdict"] == verdict and v["baseline"] == 20.0 and v["threshold"] == 10.0 and v["n"] == 3
    table = comparison_markdown({"s": [v]}, "base", result(5), select({"s": [v]}, {"s": result(5)}, []))
    assert "in the same run" in table and f"x{low:g}-{high:g} over 3 pairs" in table


@pytest.mark.parametrize(("interval", "verdict"), [((0.02, 0.04), "pass"), ((0.04, 0.07), "inconclusive"),
                                                   ((0.06, 0.09), "fail")])
def test_a_kl_gate_is_judged_on_its_interval_over_held_out_conversations(interval, verdict):
    measured = {"kl": {"kl": sum(interval) / 2, "kl_interval": list(interval), "conversations": 32}}
    (v,) = evaluate([gate("kl.kl", "<=", 0.05)], measured, None)
    assert v["verdict"] == verdict and v["n"] == 32 and v["interval"] == list(interval)
    (plain,) = evaluate([gate("kl.kl", "<=", 0.05)], {"kl": {"kl": 0.03}}, None)  # no interval: as measured
    assert plain["verdict"] == "pass" and plain["interval"] is None


def test_a_negative_control_is_judged_never_selected_and_one_the_gates_miss_withholds_the_selection():
    base = result(285, 300)
    gates = [gate("factual.pass_rate", ">=", 0.95, relative=True, name="factual")]
    results = {"good": result(285, 300, size=500), "broken": result(20, 300, size=10)}
    verdicts = {s: evaluate(gates, r, base) for s, r in results.items()}
    chosen = select(verdicts, results, [{"metric": "size.bytes", "order": "min"}], negative_controls=["broken"])
    assert chosen["best"] == "good" and chosen["ranking"] == ["good"] and "broken" not in chosen["failing"]
    assert chosen["negative_controls"] == {"broken": {"status": "rejected", "rejected_by": ["factual"]}}
    table = comparison_markdown(verdicts, "BF16", base, chosen)
    assert "broken (negative control, rejected)" in table and "Negative control `broken`" in table
    # A "control" the gates do not reject: they cannot tell damage, so nothing is selected.
    missed = {"good": verdicts["good"], "broken": evaluate(gates, result(285, 300, size=10), base)}
    toothless = select(missed, results, [], negative_controls=["broken"])
    assert toothless["best"] is None and toothless["toothless"] == ["broken"]
    assert "Nothing is selected: negative control broken was not rejected" in comparison_markdown(
        missed, "BF16", base, toothless)


def with_categories(outcomes: dict[str, list[bool]]) -> dict:
    """A suite result with per-category counts, as BFCL and the teacher split record them."""
    flat = [ok for oks in outcomes.values() for ok in oks]
    out = suite(flat)
    out["items"] = [{"prompt": f"{c}_{i}", "passed": ok} for c, oks in outcomes.items() for i, ok in enumerate(oks)]
    out["per_category"] = {c: {"passed": sum(oks), "total": len(oks)} for c, oks in outcomes.items()}
    return {"suites": {"tools": out}}


def test_a_category_at_the_floor_makes_a_pooled_gate_not_measurable():
    """Pooled 50/100 hides a category the baseline never passes: the gate cannot see it lost."""
    base = with_categories({"calls": [False] * 50, "abstains": [True] * 50})
    within = gate("tools.pass_rate", ">=", None, relative=True, margin=0.03)
    absolute = gate("tools.pass_rate", ">=", 0.4)
    verdicts = evaluate([within, absolute], base, base)
    assert [v["verdict"] for v in verdicts] == ["not_measurable", "not_measurable"]
    assert all("0/50 on calls of tools" in v["reason"] for v in verdicts)
    # The same counts with every category measurable are judged as before.
    fine = with_categories({"calls": [i < 5 for i in range(50)], "abstains": [i < 45 for i in range(50)]})
    assert evaluate([within], fine, fine)[0]["verdict"] == "pass"
    # On `failed` the guarded end is a category where every item failed.
    failed = evaluate([gate("tools.failed", "<=", None, relative=True, margin=0.03)], base, base)
    assert failed[0]["verdict"] == "not_measurable" and "50/50 on calls" in failed[0]["reason"]
