"""Quality gates per strategy, the selection of the best one, and the comparison table and plots.

A metric is `SUITE.passed|failed|total|pass_rate`, `speed.NAME` (from the shortest prompt of the
sweep at the first concurrency level) or `size.bytes|gb`. A gate relative to the baseline compares
the metric with value x the baseline's metric.
"""

from __future__ import annotations

import operator
from pathlib import Path
from typing import Any

OPS = {"<": operator.lt, "<=": operator.le, "==": operator.eq, ">=": operator.ge, ">": operator.gt}


def metric_value(result: dict[str, Any], metric: str) -> float | None:
    group, _, name = metric.partition(".")
    if group == "speed":
        value = (result.get("speed") or {}).get("summary", {}).get(name)
    elif group == "size":
        value = (result.get("size") or {}).get(name)
    else:
        value = (result.get("suites") or {}).get(group, {}).get(name)
    return float(value) if isinstance(value, (int, float)) else None


def evaluate(gates: list[dict[str, Any]], result: dict[str, Any], baseline: dict[str, Any] | None
             ) -> list[dict[str, Any]]:
    """One verdict per gate: value, threshold, pass (None when the metric is missing)."""
    verdicts = []
    for gate in gates:
        value = metric_value(result, gate["metric"])
        threshold = gate["value"]
        base = metric_value(baseline, gate["metric"]) if baseline else None
        if gate["relative_to"] == "baseline":
            threshold = gate["value"] * base if base is not None else None
        passed = None if value is None or threshold is None else OPS[gate["op"]](value, threshold)
        verdicts.append({"gate": gate["name"], "metric": gate["metric"], "op": gate["op"], "declared": gate["value"],
                         "value": value,
                         "threshold": threshold, "baseline": base, "relative_to": gate["relative_to"],
                         "pass": passed})
    return verdicts


def select(verdicts: dict[str, list[dict[str, Any]]], results: dict[str, dict[str, Any]],
           prefer: list[dict[str, str]]) -> dict[str, Any]:
    """Strategies passing every gate, ranked by the preferences in order; the first is the choice."""
    passing = [s for s, vs in verdicts.items() if all(v["pass"] for v in vs)]

    def key(strategy: str) -> tuple[float, ...]:
        out = []
        for pref in prefer:
            value = metric_value(results[strategy], pref["metric"])
            if value is None:
                value = float("-inf") if pref["order"] == "max" else float("inf")
            out.append(-value if pref["order"] == "max" else value)
        return tuple(out)

    ranking = sorted(passing, key=key)
    failing = {s: [v["gate"] for v in vs if not v["pass"]] for s, vs in verdicts.items() if s not in passing}
    return {"best": ranking[0] if ranking else None, "ranking": ranking, "failing": failing,
            "rule": "all gates pass, then " + ", ".join(f"{p['order']} {p['metric']}" for p in prefer)}


def _fmt(value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:.0f}" if abs(value) >= 100 or float(value).is_integer() else f"{value:.3g}"


def comparison_markdown(verdicts: dict[str, list[dict[str, Any]]], baseline_name: str | None,
                        baseline: dict[str, Any] | None, selection: dict[str, Any]) -> str:
    strategies = list(verdicts)
    gates = verdicts[strategies[0]] if strategies else []
    header = ["gate", "required"] + ([f"{baseline_name} (baseline)"] if baseline else []) + strategies
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for i, gate in enumerate(gates):
        required = f"{gate['op']} {_fmt(gate['threshold'])}"
        if gate["relative_to"] == "baseline":
            required = f"{gate['op']} {_fmt(gate['declared'])} x baseline = {_fmt(gate['threshold'])}"
        row = [gate["gate"], required]
        if baseline:
            row.append(_fmt(gate["baseline"]))
        for s in strategies:
            v = verdicts[s][i]
            mark = {True: "pass", False: "FAIL", None: "missing"}[v["pass"]]
            row.append(f"{_fmt(v['value'])} {mark}")
        lines.append("| " + " | ".join(row) + " |")
    best = selection["best"]
    lines.append("")
    lines.append(f"Selected: **{best}** ({selection['rule']})." if best else
                 f"No strategy passes every gate ({selection['rule']}).")
    return "\n".join(lines) + "\n"


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
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
