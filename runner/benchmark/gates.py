"""Quality gates per strategy, the selection of the best one, and the comparison table and plots.

A metric is `SUITE.passed|failed|total|pass_rate`, `speed.NAME` (from the shortest prompt of the
sweep at the first concurrency level) or `size.bytes|gb`. A gate relative to the baseline compares
the metric with value x the baseline's metric.

Suites are small (5 to 25 prompts), so a pass rate is an estimate, not a fact. Each suite metric
carries a 95 % Wilson interval, and an inequality gate on it is judged on the interval of
`candidate - threshold`: "pass" when the whole interval is on the right side, "fail" when the whole
interval is on the wrong side, "inconclusive" when it straddles (noise could flip it). For a gate
relative to the baseline the baseline's own noise counts too: the interval of `p1 - k * p2` is
built from both Wilson intervals (Newcombe's / Zou's MOVER method). `==` gates, speed and size are
compared as measured, except a relative speed gate of a candidate measured interleaved with the
baseline (speed.paired_baseline): it judges the per-pair ratios, "inconclusive" when they disagree.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from runner.recipe.metrics import Metric
from runner.recipe.schema import Gate, Preference

OPS = {"<": operator.lt, "<=": operator.le, "==": operator.eq, ">=": operator.ge, ">": operator.gt}
Z95 = 1.959964  # two-sided 95 %
VERDICTS = ("pass", "fail", "inconclusive", "missing")


def wilson(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of a proportion: sensible at n = 5 and at 0 or n successes."""
    if n <= 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def _interval(sample: tuple[int, int, bool]) -> tuple[float, float, float]:
    """(rate, low, high) of a sample."""
    count, n, _ = sample
    low, high = wilson(count, n)
    return count / n, low, high


def margin(op: str, threshold: float, sample: tuple[int, int, bool] | None,
           base_sample: tuple[int, int, bool] | None, factor: float | None) -> tuple[float, float] | None:
    """The 95 % interval of `candidate - threshold` in rate units; None where the gate is exact."""
    if op == "==" or sample is None:
        return None
    p1, l1, u1 = _interval(sample)
    if factor is None:  # absolute threshold, in the metric's own units
        t = threshold if sample[2] else threshold / sample[1]
        return l1 - t, u1 - t
    if base_sample is None:
        return None
    p2, l2, u2 = _interval(base_sample)
    diff = p1 - factor * p2
    low = diff - math.sqrt((p1 - l1) ** 2 + (factor * (u2 - p2)) ** 2)
    high = diff + math.sqrt((u1 - p1) ** 2 + (factor * (p2 - l2)) ** 2)
    return low, high


def judge(op: str, value: float, threshold: float, interval: tuple[float, float] | None) -> str:
    """pass / fail / inconclusive; a measured value without an interval is judged as it is."""
    if interval is None:
        return "pass" if OPS[op](value, threshold) else "fail"
    low, high = interval
    eps = 1e-12
    sure = {">=": low >= -eps, ">": low > eps, "<=": high <= eps, "<": high < -eps}[op]
    wrong = {">=": high < -eps, ">": high <= eps, "<=": low > eps, "<": low >= -eps}[op]
    return "pass" if sure else "fail" if wrong else "inconclusive"


def _paired_ratio(metric: Metric, result: dict[str, Any]) -> tuple[float, dict[str, Any]] | None:
    """(the baseline's value, the candidate/baseline ratio's median, min, max and pairs) where the
    candidate's speed was measured interleaved with the baseline (speed.paired_baseline)."""
    paired = (result.get("speed") or {}).get("paired_baseline")
    if metric.group != "speed" or not paired:
        return None
    base = paired["summary"].get(metric.name)
    ratio = (paired.get("ratios") or {}).get(metric.name)
    if not isinstance(base, (int, float)) or not ratio:
        return None
    return float(base), {**ratio, "pairs": paired.get("pairs")}


def judge_spread(op: str, factor: float, spread: dict[str, Any]) -> str:
    """A relative speed gate on per-pair ratios: pass when every pair is on the right side of the
    factor, fail when none is, inconclusive when the pairs disagree (the machine's noise decides)."""
    if op == "==":
        return "pass" if spread["median"] == factor else "fail"
    ends = [OPS[op](spread["min"], factor), OPS[op](spread["max"], factor)]
    return "pass" if all(ends) else "fail" if not any(ends) else "inconclusive"


# Per-pair decode ratios (candidate / baseline, measured alternating) further apart than this factor
# disagree: whatever slowed the machine hit some requests and not others, so no single figure stands.
PAIR_SPREAD_LIMIT = 2.0


def speed_reliability(result: dict[str, Any], verdicts: Sequence[dict[str, Any]] = ()) -> dict[str, Any]:
    """A candidate's measured decode speed and whether the documents may print it as a figure.

    Unreliable when a relative speed gate judged on the pairs is inconclusive (the pairs disagree
    about the gate), or when the per-pair ratios span more than PAIR_SPREAD_LIMIT. Without paired
    measurement there is nothing to tell, and the figure stands as measured."""
    speed = result.get("speed") or {}
    value = (speed.get("summary") or {}).get("decode_tok_s")
    paired = speed.get("paired_baseline") or {}
    ratio = (paired.get("ratios") or {}).get("decode_tok_s")
    why = []
    for v in verdicts:
        if v.get("paired") and v.get("verdict") == "inconclusive":
            why.append(f"the pairs disagree on gate {v['gate']}")
    if ratio and ratio.get("min") and ratio["max"] / ratio["min"] > PAIR_SPREAD_LIMIT:
        why.append(f"the per-pair ratios span more than x{PAIR_SPREAD_LIMIT:g}")
    return {"value": value, "ratio": ratio, "pairs": paired.get("pairs"), "reliable": not why, "why": why}


def evaluate(gates: Sequence[Gate | dict[str, Any]], result: dict[str, Any], baseline: dict[str, Any] | None
             ) -> list[dict[str, Any]]:
    """One verdict per gate: value, its interval and n, threshold, verdict (pass/fail/inconclusive/missing).

    Gates are the recipe's Gate models (mappings are validated into them)."""
    verdicts = []
    for spec in gates:
        gate = spec if isinstance(spec, Gate) else Gate.model_validate(spec)
        metric, op = Metric.parse(gate.metric), gate.op
        value = metric.value(result)
        base = metric.value(baseline) if baseline else None
        relative = gate.relative_to == "baseline"
        threshold = (gate.value * base if base is not None else None) if relative else gate.value
        sample = metric.sample(result)
        base_sample = metric.sample(baseline) if baseline and relative else None
        # A candidate measured alongside the baseline is judged against that measurement, pair by pair.
        paired = _paired_ratio(metric, result) if relative and value is not None else None
        diff = None
        if paired is not None:
            base, spread = paired
            threshold = gate.value * base
            verdict = judge_spread(op, gate.value, spread)
        elif value is None or threshold is None:
            verdict = "missing"
        else:
            diff = margin(op, gate.value if not relative else threshold, sample, base_sample,
                          gate.value if relative else None)
            verdict = judge(op, value, threshold, diff)
        interval = None
        if sample is not None:
            low, high = wilson(sample[0], sample[1])
            scale = 1 if sample[2] else sample[1]
            interval = [round(low * scale, 4), round(high * scale, 4)]
        n = paired[1]["pairs"] if paired else sample[1] if sample else None
        verdicts.append({"gate": gate.name, "metric": gate.metric, "op": op, "declared": gate.value,
                         "value": value, "n": n, "interval": interval,
                         "threshold": threshold, "baseline": base, "relative_to": gate.relative_to,
                         "margin": [round(diff[0], 4), round(diff[1], 4)] if diff else None,
                         **({"paired": paired[1]} if paired else {}),
                         "verdict": verdict, "pass": {"pass": True, "fail": False}.get(verdict)})
    return verdicts


def select(verdicts: dict[str, list[dict[str, Any]]], results: dict[str, dict[str, Any]],
           prefer: Sequence[Preference | dict[str, str]], inconclusive: str = "accept") -> dict[str, Any]:
    """The strategies no gate rejects, ranked by the preferences in order (ties keep the recipe's
    order); the first is the choice. A missing metric rejects; an inconclusive gate rejects only
    when `inconclusive` is "reject"."""
    prefer = [p if isinstance(p, Preference) else Preference.model_validate(p) for p in prefer]
    rejecting = {"fail", "missing"} | ({"inconclusive"} if inconclusive == "reject" else set())
    passing = [s for s, vs in verdicts.items() if not any(v["verdict"] in rejecting for v in vs)]

    def key(strategy: str) -> tuple[float, ...]:
        out = []
        for pref in prefer:
            value = Metric.parse(pref.metric).value(results[strategy])
            if value is None:
                value = float("-inf") if pref.order == "max" else float("inf")
            out.append(-value if pref.order == "max" else value)
        return tuple(out)

    ranking = sorted(passing, key=key)
    failing = {s: [v["gate"] for v in vs if v["verdict"] in rejecting] for s, vs in verdicts.items()
               if s not in passing}
    doubtful = {s: [v["gate"] for v in verdicts[s] if v["verdict"] == "inconclusive"] for s in passing}
    rule = ("no gate fails" + (" or is inconclusive" if inconclusive == "reject" else
                               " (inconclusive gates accepted)")
            + (", then " + ", ".join(f"{p.order} {p.metric}" for p in prefer) if prefer else ""))
    return {"best": ranking[0] if ranking else None, "ranking": ranking, "failing": failing,
            "inconclusive": {s: g for s, g in doubtful.items() if g}, "rule": rule}


def _fmt(value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:.0f}" if abs(value) >= 100 or float(value).is_integer() else f"{value:.3g}"


def _cell(v: dict[str, Any]) -> str:
    mark = {"pass": "pass", "fail": "FAIL", "inconclusive": "inconclusive", "missing": "missing"}[v["verdict"]]
    value = _fmt(v["value"])
    if v.get("interval"):
        value += f" [{_fmt(v['interval'][0])}, {_fmt(v['interval'][1])}]"
    if v.get("paired"):
        p = v["paired"]
        value += (f" (x{_fmt(p['median'])} of the baseline's {_fmt(v['baseline'])} in the same run, "
                  f"x{_fmt(p['min'])}-{_fmt(p['max'])} over {p['pairs']} pairs)")
    return f"{value} {mark}"


def comparison_markdown(verdicts: dict[str, list[dict[str, Any]]], baseline_name: str | None,
                        baseline: dict[str, Any] | None, selection: dict[str, Any],
                        failed: dict[str, dict[str, str]] | None = None,
                        not_judged: dict[str, str] | None = None) -> str:
    """The gate table, the selection, a line per strategy whose branch failed (`failed`:
    {strategy: {step, error}}) and one per strategy not judged (`not_judged`: {strategy: why}, e.g. not
    benchmarked in this run), so the table never silently drops a strategy."""
    strategies = list(verdicts)
    gates = verdicts[strategies[0]] if strategies else []
    header = ["gate", "required", "n"] + ([f"{baseline_name} (baseline)"] if baseline else []) + strategies
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for i, gate in enumerate(gates):
        required = f"{gate['op']} {_fmt(gate['threshold'])}"
        if gate["relative_to"] == "baseline":
            required = f"{gate['op']} {_fmt(gate['declared'])} x baseline = {_fmt(gate['threshold'])}"
            if gate.get("paired"):  # each candidate has its own baseline measurement
                required = f"{gate['op']} {_fmt(gate['declared'])} x baseline (in the same run)"
        row = [gate["gate"], required, str(gate["n"]) if gate.get("n") else "-"]
        if baseline:
            row.append(_fmt(gate["baseline"]))
        row.extend(_cell(verdicts[s][i]) for s in strategies)
        lines.append("| " + " | ".join(row) + " |")
    best = selection["best"]
    lines.append("")
    if any(v.get("interval") for vs in verdicts.values() for v in vs):
        lines.append("Suite values show the 95 % Wilson interval; a gate whose interval (with the baseline's, "
                     "for relative gates) straddles its threshold is inconclusive: too few prompts to tell.")
        lines.append("")
    if any(v.get("paired") for vs in verdicts.values() for v in vs):
        lines.append("Relative speed gates compare each candidate with the baseline served alongside it in the same "
                     "run, requests alternating; the spread is the per-pair ratio's, and a gate the pairs disagree "
                     "on is inconclusive.")
        lines.append("")
    lines.append(f"Selected: **{best}** ({selection['rule']})." if best else
                 f"No strategy passes the gates ({selection['rule']}).")
    for strategy, why in (failed or {}).items():
        # A paragraph each: consecutive markdown lines would run together into one.
        lines.append("")
        lines.append(f"`{strategy}` failed at {why['step']}: {first_line(why.get('error'))}")
    for strategy, why in (not_judged or {}).items():
        lines.append("")
        lines.append(f"`{strategy}` is not judged: {why}.")
    return "\n".join(lines) + "\n"


def first_line(text: str | None) -> str:
    """The first non-empty line of an error message (tracebacks and logs follow it)."""
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    return lines[0] if lines else "no error recorded"


def plot_gates(verdicts: dict[str, list[dict[str, Any]]], path: Path) -> None:
    """Each gate's value per strategy, normalised to its threshold (1.0 = exactly on it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    strategies = list(verdicts)
    gates = [v["gate"] for v in verdicts[strategies[0]]] if strategies else []
    fig, ax = plt.subplots(figsize=(max(6, len(gates) * 1.2), 3.5), dpi=100)
    width = 0.8 / max(len(strategies), 1)
    for j, strategy in enumerate(strategies):
        ratios = []
        for v in verdicts[strategy]:
            ratio = v["value"] / v["threshold"] if v["value"] is not None and v["threshold"] else 0.0
            ratios.append(ratio)
        ax.bar([i + j * width for i in range(len(gates))], ratios, width, label=strategy)
    ax.axhline(1.0, color="grey", linestyle="--", linewidth=1)
    ax.set_xticks([i + width * (len(strategies) - 1) / 2 for i in range(len(gates))], gates, rotation=20)
    ax.set_ylabel("value / threshold")
    ax.set_title("gate results by strategy")
    if strategies:  # none when every strategy's branch failed
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_ttft_curve(results: dict[str, dict[str, Any]], path: Path) -> None:
    """TTFT p50 against prompt length, one line per strategy and the baseline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    for name, result in results.items():
        sweep = (result.get("speed") or {}).get("sweep") or {}
        points = sorted((int(n), s["ttft_p50_ms"]) for n, s in sweep.items() if s.get("ttft_p50_ms") is not None)
        if points:
            ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("prompt tokens")
    ax.set_ylabel("TTFT p50 (ms)")
    ax.set_title("time to first token by prompt length")
    if ax.get_legend_handles_labels()[0]:  # nothing to label when no result has a sweep
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
