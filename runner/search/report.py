"""What a search leaves for people: the Pareto table (the objective against each gate, with intervals), a
plot of the objective against held-out KL, and the selected candidate as a strategy snippet to paste into a
recipe. Read from search.json's data (runner/search/driver.py SearchResult.to_json); no torch, no plotting
library (the SVG is a few dozen elements written by hand).
"""

from __future__ import annotations

from html import escape
from typing import Any

from ruamel.yaml import YAML

OBJECTIVE_WORDS = {"bytes_per_token": ("bytes read per token", "min"), "size": ("checkpoint bytes", "min"),
                   "decode_tok_s": ("predicted decode tok/s", "max")}
OBJECTIVE_KEYS = {"bytes_per_token": "bytes_per_token", "size": "checkpoint_bytes", "decode_tok_s": "decode_tok_s"}


def objective_of(candidate: dict[str, Any], objective: str) -> float | None:
    value = (candidate.get("predicted") or {}).get(OBJECTIVE_KEYS[objective])
    return float(value) if value is not None else None


def pareto_front(data: dict[str, Any]) -> list[str]:
    """Names of the accepted candidates no other accepted one beats on both the objective and held-out KL."""
    objective = data["objective"]
    sign = -1.0 if OBJECTIVE_WORDS[objective][1] == "max" else 1.0
    points = [(c["name"], sign * v, c["kl"]) for c in data["candidates"]
              if c["status"] == "accepted" and (v := objective_of(c, objective)) is not None and c["kl"] is not None]
    front = []
    for name, cost, kl in points:
        dominated = any((o_cost <= cost and o_kl <= kl) and (o_cost < cost or o_kl < kl)
                        for _, o_cost, o_kl in points)
        if not dominated:
            front.append(name)
    return front


def _number(value: Any, digits: int = 4) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def _objective_text(value: float | None, objective: str) -> str:
    """Bytes in GB (three significant digits), speed in tok/s."""
    if value is None:
        return "—"
    return f"{value:.1f} tok/s" if objective == "decode_tok_s" else f"{value / 1e9:.3g} GB"


def _gate_cell(verdict: dict[str, Any]) -> str:
    interval = verdict.get("interval")
    around = f" [{_number(interval[0])}, {_number(interval[1])}]" if interval else ""
    return f"{verdict['verdict']} ({_number(verdict.get('value'))}{around})"


def pareto_markdown(data: dict[str, Any]) -> str:
    objective = data["objective"]
    words, order = OBJECTIVE_WORDS[objective]
    front = set(pareto_front(data))
    gates = list(dict.fromkeys(v["gate"] for c in data["candidates"] for v in c.get("gates") or []))
    audit = data["audit"]
    lines = [
        f"Search ({data['procedure']}): objective {words} ({order}); {len(data['candidates'])} candidates in "
        f"{data['rounds']} rounds, {data['seconds']:.0f} s; stopped: {data['stopped_by']}.",
        f"Best accepted: `{data['best']}`." if data["best"] else "No candidate was accepted by every gate.",
        (f"KL proxy audit: {audit['audited']} pruned candidates served anyway, the gates agreed with the pruning "
         f"on {audit['agree']}" + (f" and DISAGREED on {audit['disagree']}" if audit["disagree"] else "") + "."
         if audit["audited"] else "KL proxy audit: no pruned candidate was served (none pruned, or prune.audit 0)."),
        "",
        "| candidate | round | why proposed | status | " + words + " | held-out KL [95 %] | top-1 | "
        + " | ".join(gates) + (" | " if gates else "") + "decided by |",
        "|---|---|---|---|---|---|---|" + "---|" * len(gates) + "---|",
    ]
    for c in data["candidates"]:
        verdicts = {v["gate"]: v for v in c.get("gates") or []}
        kl = _number(c["kl"]) + (f" [{_number(c['kl_interval'][0])}, {_number(c['kl_interval'][1])}]"
                                  if c.get("kl_interval") else "")
        star = " ★" if c["name"] in front else ""
        cells = [f"`{c['name']}`{star}", str(c["round"]), c["move"], c["status"] + (" (audit)" if c["audit"] else ""),
                 _objective_text(objective_of(c, objective), objective), kl, _number(c.get("top1")),
                 *(_gate_cell(verdicts[g]) if g in verdicts else "—" for g in gates), c.get("why") or ""]
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    lines += ["", "★ on the Pareto front of the accepted candidates (objective against held-out KL).", ""]
    return "\n".join(lines)


def pareto_svg(data: dict[str, Any], width: int = 640, height: int = 400) -> str:
    """The objective (x) against held-out KL (y) for every quantized candidate, coloured by status."""
    objective = data["objective"]
    points = [(objective_of(c, objective), c["kl"], c["status"], c["name"]) for c in data["candidates"]]
    points = [p for p in points if p[0] is not None and p[1] is not None]
    colors = {"accepted": "#2a9d4b", "rejected": "#c0392b", "pruned": "#e08e0b", "failed": "#555", "skipped": "#aaa"}
    left, right, top, bottom = 70, 20, 30, 50
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
           'font-size="11">',
           f'<text x="{width / 2}" y="18" text-anchor="middle">{escape(OBJECTIVE_WORDS[objective][0])} against '
           'held-out KL</text>']
    if points:
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        x0, x1 = min(xs), max(xs)
        y0, y1 = 0.0, max(ys) or 1.0
        x1 = x1 if x1 > x0 else x0 + 1

        def sx(x: float) -> float:
            return left + (x - x0) / (x1 - x0) * (width - left - right)

        def sy(y: float) -> float:
            return height - bottom - (y - y0) / (y1 - y0) * (height - top - bottom)

        out.append(f'<line x1="{left}" y1="{height - bottom}" x2="{width - right}" y2="{height - bottom}" '
                   'stroke="black"/>')
        out.append(f'<line x1="{left}" y1="{top}" x2="{left}" y2="{height - bottom}" stroke="black"/>')
        for value in (x0, x1):
            out.append(f'<text x="{sx(value):.1f}" y="{height - bottom + 16}" text-anchor="middle">'
                       f'{_number(value)}</text>')
        out.append(f'<text x="{left - 6}" y="{sy(y1):.1f}" text-anchor="end">{_number(y1)}</text>')
        out.append(f'<text x="{left - 6}" y="{sy(0):.1f}" text-anchor="end">0</text>')
        for x, y, status, name in points:
            out.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="5" fill="{colors.get(status, "#000")}">'
                       f'<title>{escape(name)}: {escape(status)}, KL {y:.4g}</title></circle>')
        for i, (status, color) in enumerate(colors.items()):
            out.append(f'<circle cx="{left + 10 + i * 100}" cy="{height - 12}" r="5" fill="{color}"/>'
                       f'<text x="{left + 18 + i * 100}" y="{height - 8}">{status}</text>')
    else:
        out.append(f'<text x="{width / 2}" y="{height / 2}" text-anchor="middle">no candidate was quantized</text>')
    out.append("</svg>\n")
    return "\n".join(out)


def strategy_snippet(data: dict[str, Any]) -> str:
    """The best accepted candidate as a strategy to paste under quantization.strategies (YAML)."""
    best = next((c for c in data["candidates"] if c["name"] == data["best"]), None)
    if best is None:
        return "# No search candidate was accepted by every gate: nothing to paste.\n"
    strategy = {"name": best["name"], "description": f"from a search: {best['description']}",
                "layout": best["layout"], "algorithm": best["algorithm"]}
    yaml = YAML()
    yaml.default_flow_style = False
    import io

    buffer = io.StringIO()
    yaml.dump([strategy], buffer)
    objective = OBJECTIVE_WORDS[data["objective"]][0]
    value = _objective_text(objective_of(best, data["objective"]), data["objective"])
    return (f"# The search's best accepted candidate ({objective} {value}, held-out KL {_number(best['kl'])}):\n"
            "# paste under quantization.strategies.\n" + buffer.getvalue())
