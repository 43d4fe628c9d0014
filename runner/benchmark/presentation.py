"""How gate verdicts are shown: the comparison table, the recovery table and the plots.

Presentation only (runner/steps/code.py PRESENTATION): editing a column title or a plot's colour
re-renders the gates step's table and the card, and re-runs nothing that measured anything.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from runner.benchmark.stats import ALPHA


def recovery_markdown(rows: Sequence[dict[str, Any]], baseline_name: str, candidate_name: str) -> str:
    """The recovery table of the documents."""
    if not rows:
        return ""
    lines = [f"| suite | n | {baseline_name} | {candidate_name} | recovery | difference (paired interval) | flips |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        recovered = f"{r['recovery_pct']:.1f} %" if r["recovery_pct"] is not None else "n/a (baseline 0)"
        lo, hi = r["difference"]
        level = f" ({r['confidence'] * 100:.4g} %)" if r["confidence"] != 1 - ALPHA else ""
        lines.append(f"| {r['suite']} | {r['n']} | {r['baseline'] * 100:.1f} % | {r['candidate'] * 100:.1f} % | "
                     f"{recovered} | [{lo * 100:+.1f}, {hi * 100:+.1f}] pts{level} | -{r['lost']} / +{r['gained']} |")
    return "\n".join(lines) + "\n"


def _fmt(value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:.0f}" if abs(value) >= 100 or float(value).is_integer() else f"{value:.3g}"


MARKS = {"pass": "pass", "fail": "FAIL", "inconclusive": "inconclusive", "not_measurable": "not measurable",
         "missing": "missing"}


def _cell(v: dict[str, Any]) -> str:
    mark = MARKS[v["verdict"]]
    value = _fmt(v["value"])
    if v.get("flips"):  # paired with the baseline: what flipped, and the difference's interval
        f = v["flips"]
        lo, hi = f["difference"]
        value += (f" (-{f['lost']}/+{f['gained']} vs baseline, diff [{lo * 100:+.1f}, {hi * 100:+.1f}] pts, "
                  f"McNemar p={_fmt(f['mcnemar_p'])})")
    elif v.get("interval"):
        value += f" [{_fmt(v['interval'][0])}, {_fmt(v['interval'][1])}]"
    if v.get("paired"):
        p = v["paired"]
        value += (f" (x{_fmt(p['median'])} of the baseline's {_fmt(v['baseline'])} in the same run, "
                  f"x{_fmt(p['min'])}-{_fmt(p['max'])} over {p['pairs']} pairs)")
    return f"{value} {mark}"


def _required(gate: dict[str, Any]) -> str:
    if gate["relative_to"] != "baseline":
        return f"{gate['op']} {_fmt(gate['declared'])}"
    less = f" {'-' if gate['op'] in ('>=', '>') else '+'} {_fmt(gate['margin'])}" if gate.get("margin") else ""
    if gate.get("paired"):  # each candidate has its own baseline measurement
        return f"{gate['op']} {_fmt(gate['declared'])} x baseline{less} (in the same run)"
    return f"{gate['op']} {_fmt(gate['declared'])} x baseline{less}"


def comparison_markdown(verdicts: dict[str, list[dict[str, Any]]], baseline_name: str | None,
                        baseline: dict[str, Any] | None, selection: dict[str, Any],
                        failed: dict[str, dict[str, str]] | None = None,
                        not_judged: dict[str, str] | None = None) -> str:
    """The gate table (a row per gate, a column per strategy with its status), the selection, a line per
    verdict that could not be measured, per strategy whose branch failed (`failed`: {strategy: {step,
    error}}) and per strategy not judged (`not_judged`: {strategy: why}, e.g. not benchmarked in this run),
    so the table never silently drops a strategy."""
    strategies = list(verdicts)
    gates = verdicts[strategies[0]] if strategies else []
    status = selection.get("status") or {}
    controls = selection.get("negative_controls") or {}
    header = ["gate", "required", "n"] + ([f"{baseline_name} (baseline)"] if baseline else []) + [
        f"{s} (negative control, {status[s]})" if s in controls else f"{s} ({status[s]})" if s in status else s
        for s in strategies]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for i, gate in enumerate(gates):
        row = [gate["gate"], _required(gate), str(gate["n"]) if gate.get("n") else "-"]
        if baseline:
            row.append(_fmt(gate["baseline"]))
        row.extend(_cell(verdicts[s][i]) for s in strategies)
        lines.append("| " + " | ".join(row) + " |")
    best = selection["best"]
    lines.append("")
    every = [v for vs in verdicts.values() for v in vs]
    if any(v.get("flips") for v in every):
        lines.append("Relative suite gates compare candidate and baseline on the same prompts: -lost/+gained are the "
                     "prompts the baseline passed and the candidate failed and the reverse, diff the 95 % interval "
                     "of `candidate - factor x baseline` in rate points (Newcombe's paired method), McNemar p the "
                     "exact test of whether the flips lean one way.")
        lines.append("")
    if any(v.get("interval") and not v.get("flips") for v in every):
        lines.append("Absolute suite values show the 95 % Wilson interval.")
        lines.append("")
    if any(v["verdict"] == "inconclusive" for v in every):
        lines.append("A gate whose interval straddles its threshold is inconclusive: too few prompts to tell.")
        lines.append("")
    if any(v.get("paired") for v in every):
        lines.append("Relative speed gates compare each candidate with the baseline served alongside it in the same "
                     "run, requests alternating; the spread is the per-pair ratio's, and a gate the pairs disagree "
                     "on is inconclusive.")
        lines.append("")
    unmeasured = {(v["gate"], v.get("reason")) for v in every if v["verdict"] in ("not_measurable", "missing")}
    for gate_name, reason in sorted(unmeasured, key=str):
        lines.append(f"Gate {gate_name} is not measured: {reason}.")
        lines.append("")
    for control, facts in controls.items():
        if facts["status"] == "rejected":
            lines.append(f"Negative control `{control}` (built to damage behaviour) is rejected by "
                         f"{', '.join(facts['rejected_by'])}: the gates can tell a damaged model at these sizes.")
        else:
            lines.append(f"Negative control `{control}` (built to damage behaviour) is NOT rejected by any gate: "
                         "the gates cannot tell a damaged model at these sizes, so nothing is selected.")
        lines.append("")
    if selection.get("toothless"):
        lines.append(f"Nothing is selected: {selection['rule']}.")
    elif best and selection.get("proven"):
        lines.append(f"Selected: **{best}**, proven: every gate passed ({selection['rule']}).")
    elif best:
        lines.append(f"Selected: **{best}**, UNPROVEN: no gate failed, but "
                     f"{', '.join(selection['unproven'].get(best, []))} could not decide at these sample sizes "
                     f"({selection['rule']}).")
    elif selection.get("unproven"):
        lines.append(f"No strategy is proven, and none unproven is selected ({selection['rule']}): "
                     + "; ".join(f"`{s}` undecided on {', '.join(g)}" for s, g in selection["unproven"].items())
                     + ". Larger suites decide; `selection.accept_unproven: true` publishes the first anyway.")
    else:
        lines.append(f"No strategy passes the gates ({selection['rule']}).")
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
