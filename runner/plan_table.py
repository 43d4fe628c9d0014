"""The predicted-footprint table of `recipe plan` and `recipe footprint` (rich markup), one row per
strategy, or one per distinct prediction when there are many."""

from __future__ import annotations

from typing import Any

from runner.quantization.bits import LAYOUTS, base_format
from runner.quantization.footprint import SOURCE, Footprint

# Above this many strategies, `footprint_table` shows one row per distinct prediction (thousands of rows help
# nobody, and take rich seconds to lay out); `recipe plan --json` has every strategy.
TABLE_ROWS = 60


def footprint_table(footprints: list[Footprint], title: str) -> Any:
    """A rich Table of predicted footprints (for `recipe plan`)."""
    from rich.table import Table

    t = Table(title=title)
    for col in ("strategy", "how", "formats (Linear modules)", "checkpoint GB", "effective bits", "decode tok/s"):
        t.add_column(col)
    rows = [_row(fp) for fp in footprints]
    if len(rows) <= TABLE_ROWS:
        for row in rows:
            t.add_row(*row)
        return t
    groups: dict[tuple[str, ...], list[str]] = {}
    for name, *rest in rows:
        groups.setdefault(tuple(rest), []).append(name)
    for rest, names in groups.items():
        label = names[0] if len(names) == 1 else f"{names[0]} and {len(names) - 1} more alike"
        t.add_row(label, *rest)
    t.caption = (f"{len(rows)} strategies, {len(groups)} distinct predictions; `recipe plan --json` lists every "
                 "strategy")
    return t


def _row(fp: Footprint) -> tuple[str, ...]:
    """A footprint's table cells: strategy, how, formats, size, bits, speed."""
    if fp.auto is not None:
        a = fp.auto
        if fp.known:
            bits = (f"<= {fp.effective_bits:.2f} (reach {a.min_bits:.2f}-{a.max_bits:.2f}); auto_quantize's "
                    f"count: target {a.target:g} of {a.modelopt_min:.2f}-{a.modelopt_max:.2f}")
        else:
            bits = f"[red]target {a.target:g} unreachable: {a.modelopt_min:.2f}-{a.modelopt_max:.2f}[/]"
        size = (f"<= {fp.checkpoint_bytes / 1e9:.1f} " if fp.known else "") + \
            f"({a.min_bytes / 1e9:.1f}-{a.max_bytes / 1e9:.1f})"
        speed = f">= {fp.decode_tok_s:.1f}" if fp.decode_tok_s else "-"
        formats = f"{a.quantizable} searched over {a.cheapest.split()[0]}..{a.dearest.split()[0]}, " \
                  f"{a.disabled} disabled"
    elif not fp.known:
        return fp.strategy, fp.method, f"unknown: {fp.reason}", "-", "-", "-"
    else:
        size = f"{fp.checkpoint_bytes / 1e9:.1f}"
        bits = f"{fp.effective_bits:.2f}"
        speed = f"{fp.decode_tok_s:.1f}" if fp.decode_tok_s else "-"
        formats = ", ".join(f"{k} {v}" for k, v in fp.formats.items())
        if fp.strategy != SOURCE and fp.formats and not any(base_format(k) in LAYOUTS for k in fp.formats):
            formats += ": [bold red]quantizes nothing[/]"
    return fp.strategy, fp.method, formats, size, bits, speed
