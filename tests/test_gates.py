"""Gate verdicts with confidence intervals, and the selection: fast, from results built for the test."""

from __future__ import annotations

import pytest

from runner.benchmark.gates import comparison_markdown, evaluate, select, wilson


def result(passed: int, total: int = 5, *, size: int = 1000, speed: float = 20.0, leaks: int = 0) -> dict:
    return {"suites": {"factual": {"passed": passed, "failed": total - passed, "total": total,
                                   "pass_rate": passed / total},
                       "thinking_leak": {"passed": 5 - leaks, "failed": leaks, "total": 5, "pass_rate": 1 - leaks / 5}},
            "speed": {"summary": {"decode_tok_s": speed}}, "size": {"bytes": size}}


def gate(metric: str, op: str, value: float, relative: bool = False, name: str = "g") -> dict:
    return {"name": name, "metric": metric, "op": op, "value": value,
            "relative_to": "baseline" if relative else "absolute"}


def test_wilson_interval_matches_the_textbook_values():
    low, high = wilson(4, 5)
    assert (round(low, 4), round(high, 4)) == (0.3755, 0.9638)
    assert wilson(0, 5)[0] == 0.0 and round(wilson(0, 5)[1], 4) == 0.4345
    assert wilson(5, 5)[1] == 1.0 and round(wilson(5, 5)[0], 4) == 0.5655
    low, high = wilson(90, 100)
    assert 0.82 < low < 0.83 and 0.94 < high < 0.95


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


def test_count_gate_uses_the_count_scale():
    (v,) = evaluate([gate("factual.passed", ">=", 3)], result(95, 100), None)
    assert v["verdict"] == "pass" and 80 < v["interval"][0] < v["interval"][1] <= 100


@pytest.mark.parametrize(("cand", "base", "verdict"), [
    ((4, 5), (4, 5), "inconclusive"),  # equal, but five prompts cannot show "not worse"
    ((3, 5), (5, 5), "inconclusive"),  # the noise that flipped the old demo between machines
    ((0, 5), (4, 5), "fail"),
    ((98, 100), (90, 100), "pass"),
    ((70, 100), (95, 100), "fail"),
])
def test_relative_gate_counts_the_noise_of_both_sides(cand, base, verdict):
    (v,) = evaluate([gate("factual.passed", ">=", 1.0, relative=True)], result(*cand), result(*base))
    assert v["verdict"] == verdict, v
    assert v["threshold"] == base[0] and v["baseline"] == base[0]


def test_exact_gates_speed_size_and_equality_are_judged_as_measured():
    gates = [gate("thinking_leak.failed", "==", 0, name="leak"), gate("speed.decode_tok_s", ">=", 0.5, True, "speed"),
             gate("size.bytes", "<", 1.0, True, "size")]
    ok = evaluate(gates, result(5, size=500, speed=11.0), result(5, size=1000, speed=20.0))
    assert [v["verdict"] for v in ok] == ["pass", "pass", "pass"]
    bad = evaluate(gates, result(5, size=1000, speed=9.0, leaks=1), result(5, size=1000, speed=20.0))
    assert [v["verdict"] for v in bad] == ["fail", "fail", "fail"]
    assert all(v["margin"] is None for v in bad)  # judged as measured
    assert bad[0]["interval"] is not None and bad[1]["interval"] is None  # the count's interval is still shown


def test_a_missing_metric_is_missing_not_failed():
    (v,) = evaluate([gate("speed.decode_tok_s", ">=", 1.0, relative=True)], result(5), {"suites": {}})
    assert v["verdict"] == "missing" and v["pass"] is None


def test_selection_skips_failed_and_missing_ranks_by_preference_and_keeps_recipe_order_on_ties():
    results = {"a": result(5, size=900), "b": result(5, size=500), "c": result(0, size=100), "d": result(5, size=500)}
    gates = [gate("factual.passed", ">=", 1.0, relative=True, name="factual")]
    verdicts = {s: evaluate(gates, r, result(4)) for s, r in results.items()}
    assert [verdicts[s][0]["verdict"] for s in "abcd"] == ["inconclusive", "inconclusive", "fail", "inconclusive"]
    chosen = select(verdicts, results, [{"metric": "size.bytes", "order": "min"}])
    assert chosen["best"] == "b" and chosen["ranking"] == ["b", "d", "a"]
    assert chosen["failing"] == {"c": ["factual"]}
    assert chosen["inconclusive"] == {"a": ["factual"], "b": ["factual"], "d": ["factual"]}
    strict = select(verdicts, results, [{"metric": "size.bytes", "order": "min"}], inconclusive="reject")
    assert strict["best"] is None and set(strict["failing"]) == {"a", "b", "c", "d"}
    assert "inconclusive" in strict["rule"]


def test_table_shows_n_interval_and_verdict():
    gates = [gate("factual.passed", ">=", 1.0, relative=True, name="factual")]
    base = result(4)
    verdicts = {"x": evaluate(gates, result(5), base), "y": evaluate(gates, result(0), base)}
    selection = select(verdicts, {"x": result(5), "y": result(0)}, [])
    table = comparison_markdown(verdicts, "BF16", base, selection)
    assert "| gate | required | n | BF16 (baseline) | x | y |" in table
    assert "| factual | >= 1 x baseline = 4 | 5 | 4 | 5 [2.83, 5] inconclusive | 0 [0, 2.17] FAIL |" in table
    assert "Selected: **x**" in table and "Wilson" in table


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
