"""The search's procedure: which layouts to try, in which order, given what the earlier ones did.

A candidate is a layout (runner/quantization/families.py: a format per module family, the KV-cache format,
decoder layers kept BF16) and a calibration algorithm. It becomes an ordinary strategy whose name encodes
every choice (`search-re_w4a16-at_fp8-max-k0_1-kvfp8`), so its steps are cached like any other: a rerun
replays the procedure, finds each earlier candidate's steps current, and goes on where it stopped.

The procedure (`ptq_order`) follows ModelOpt's PTQ guidance (modelopt_recipes/ptq.md): start from the
narrowest scope (routed experts for a MoE, the MLP for a dense model), widen family by family while the gates
hold, and when a widening fails, recover by calibration (the space's algorithms in order) before backing off:
first the layers whose quantization costs the most KL (measured per decoder layer in the quantize worker)
stay BF16 (two more a round, up to three rounds), or more leading/trailing layers, or the next KV-cache
format, and only then the family's next, more precise format. A family none of whose candidates is accepted
stays BF16, and the search widens on.

This module does no I/O: `ptq_order` is a generator that yields rounds of candidates and is sent back their
outcomes (runner/search/driver.py runs them). Imports nothing heavy: the host plans with it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Generator
from dataclasses import dataclass, field, replace
from typing import Any

from runner.quantization.families import FAMILIES, FORMAT_BITS, FORMAT_FIDELITY_RANK

# Short words for a candidate's name: family, format and algorithm.
FAMILY_WORDS = {"routed_experts": "re", "shared_experts": "se", "mlp": "mlp", "linear_attention": "la",
                "attention": "at", "lm_head": "lm"}
FORMAT_WORDS = {"nvfp4": "fp4", "w4a16_nvfp4": "w4a16", "fp8": "fp8", "bf16": "bf16"}
ALGORITHM_WORDS = {"awq_lite": "awql", "awq_clip": "awqc", "awq_full": "awqf"}
# Layers the sensitivity back-off keeps BF16 in one step (the most costly first), and how many such steps
# (2, 4, 6 layers) it takes before the family's next format.
SENSITIVE_LAYERS = 2
SENSITIVE_ROUNDS = 3

# A widening's move starts so: only widenings measure per-layer sensitivity (the back-off reads theirs).
WIDEN = "widen:"

# What happened to a candidate, as the driver reports it to the procedure.
ACCEPTED, REJECTED, PRUNED, FAILED, SKIPPED = "accepted", "rejected", "pruned", "failed", "skipped"


@dataclass(frozen=True)
class Candidate:
    formats: tuple[tuple[str, str], ...]  # (family, format), in FAMILIES order, bf16 families left out
    algorithm: str
    kv_cache: str
    keep_first: int = 0
    keep_last: int = 0
    keep_layers: tuple[int, ...] = ()
    move: str = field(default="", compare=False)  # why the procedure proposed it (the search table says)

    def name(self, prefix: str) -> str:
        parts = [f"{FAMILY_WORDS[f]}_{FORMAT_WORDS[fmt]}" for f, fmt in self.formats]
        parts.append(ALGORITHM_WORDS.get(self.algorithm, self.algorithm))
        if self.keep_first or self.keep_last:
            parts.append(f"k{self.keep_first}_{self.keep_last}")
        if self.keep_layers:
            layers = "_".join(map(str, self.keep_layers))
            # a step id stays short: many kept layers are named by a digest of the list
            parts.append(f"L{layers}" if len(layers) <= 24 else "L" + hashlib.sha256(layers.encode()).hexdigest()[:8])
        parts.append(f"kv{FORMAT_WORDS[self.kv_cache]}")
        return "-".join([prefix, *parts])

    def layout(self) -> dict[str, Any]:
        """The strategy's `layout` section (schema.LayoutSpec), as a recipe writes it."""
        out: dict[str, Any] = {"formats": dict(self.formats), "kv_cache": self.kv_cache}
        if self.keep_first:
            out["keep_first"] = self.keep_first
        if self.keep_last:
            out["keep_last"] = self.keep_last
        if self.keep_layers:
            out["keep_layers"] = list(self.keep_layers)
        return out

    def with_format(self, family: str, fmt: str) -> Candidate:
        formats = dict(self.formats) | {family: fmt}
        ordered = tuple((f, formats[f]) for f in FAMILIES if formats.get(f, "bf16") != "bf16")
        return replace(self, formats=ordered)

    def describe(self) -> str:
        what = ", ".join(f"{f} {fmt}" for f, fmt in self.formats) or "nothing quantized"
        kept = []
        if self.keep_first:
            kept.append(f"first {self.keep_first}")
        if self.keep_last:
            kept.append(f"last {self.keep_last}")
        if self.keep_layers:
            kept.append("layers " + ", ".join(map(str, self.keep_layers)))
        return (f"{what}; {self.algorithm} calibration; KV {self.kv_cache}"
                + (f"; BF16 layers: {', '.join(kept)}" if kept else ""))


@dataclass
class Outcome:
    status: str  # ACCEPTED | REJECTED | PRUNED | FAILED | SKIPPED
    kl: float | None = None
    sensitivity: list[dict[str, Any]] = field(default_factory=list)  # the quantize worker's per-layer KL


def format_ladder(formats: list[str]) -> list[str]:
    """A family's formats to try, the smallest first; among equal sizes the more faithful first (W4A16 before
    W4A4). BF16 is never tried: it is what a family falls back to."""
    return sorted((f for f in dict.fromkeys(formats) if f != "bf16"),
                  key=lambda f: (FORMAT_BITS[f], FORMAT_FIDELITY_RANK[f]))


def family_order(space_formats: dict[str, list[str]], present: set[str] | None = None) -> list[str]:
    """The families the space names (and the model has, when `present` is known), narrowest first."""
    return [f for f in FAMILIES if f in space_formats and format_ladder(space_formats[f])
            and (present is None or f in present)]


def most_sensitive(sensitivity: list[dict[str, Any]], kept: tuple[int, ...], count: int) -> tuple[int, ...]:
    """The `count` layers not yet kept whose quantization costs the most KL (kl_recovered: what the model's KL
    drops by when that layer alone is left unquantized), added to `kept`, sorted."""
    ranked = sorted((row for row in sensitivity if row.get("kl_recovered") is not None
                     and row["layer"] not in kept and row["kl_recovered"] > 0),
                    key=lambda row: -row["kl_recovered"])
    return tuple(sorted({*kept, *(row["layer"] for row in ranked[:count])}))


Round = list[Candidate]
Procedure = Generator[Round, dict[Candidate, Outcome], None]


def ptq_order(space: Any, present: set[str] | None = None) -> Procedure:
    """Yield rounds of candidates (run in parallel), receive their outcomes; see the module's docstring.
    `space` is a schema.SearchSpace; `present`: the families the model has (None: unknown, all)."""
    algorithms = list(dict.fromkeys(space.algorithms))
    state = Candidate((), algorithms[0], space.kv_cache[0], space.keep_first[0], space.keep_last[0])
    for family in family_order(space.formats, present):
        accepted = None
        for fmt in format_ladder(space.formats[family]):
            first = replace(state.with_format(family, fmt), algorithm=algorithms[0],
                            move=f"{WIDEN} {family} to {fmt}")
            outcomes = yield [first]
            if outcomes[first].status == ACCEPTED:
                accepted = first
                break
            # Recover by calibration before backing off the scope (the other algorithms, together).
            recover = [replace(first, algorithm=a, move=f"recover {family} {fmt} by {a} calibration")
                       for a in algorithms[1:]]
            if recover:
                outcomes = outcomes | (yield recover)
                accepted = best_accepted(recover, outcomes)
                if accepted is not None:
                    break
            # Back off within the format: the costliest layers, more edge layers, the next KV format.
            tried = [first, *recover]
            algorithm = min(tried, key=lambda c: kl_or_inf(outcomes[c])).algorithm
            base = replace(first, algorithm=algorithm)
            measured = [o.sensitivity for c in tried if (o := outcomes[c]).sensitivity]
            backoff: list[Candidate] = []
            if measured:
                kept = most_sensitive(measured[0], base.keep_layers, SENSITIVE_LAYERS)
                if kept != base.keep_layers:
                    backoff.append(replace(base, keep_layers=kept, move=f"back off {family} {fmt}: the "
                                           f"{SENSITIVE_LAYERS} layers costing most KL stay BF16"))
            for first_n, last_n in zip(space.keep_first[1:], space.keep_last[1:], strict=False):
                backoff.append(replace(base, keep_first=first_n, keep_last=last_n,
                                       move=f"back off {family} {fmt}: first {first_n} and last {last_n} layers BF16"))
            backoff += [replace(base, kv_cache=kv, move=f"back off {family} {fmt}: KV cache {kv}")
                        for kv in space.kv_cache[1:]]
            backoff = [c for c in dict.fromkeys(backoff) if c not in tried]
            if backoff:
                outcomes = outcomes | (yield backoff)
                accepted = best_accepted(backoff, outcomes)
            # Still failing: raise the precision of the next costliest layers, a round each, up to
            # SENSITIVE_ROUNDS rounds (or the budget, which the driver enforces), before the next format.
            widened = backoff[0] if measured and backoff and backoff[0].keep_layers != base.keep_layers else None
            for _ in range(SENSITIVE_ROUNDS - 1):
                if accepted is not None or widened is None:
                    break
                kept = most_sensitive(measured[0], widened.keep_layers, SENSITIVE_LAYERS)
                if kept == widened.keep_layers:
                    break
                widened = replace(widened, keep_layers=kept, move=f"back off {family} {fmt}: the {len(kept)} "
                                  "layers costing most KL stay BF16")
                outcomes = outcomes | (yield [widened])
                accepted = best_accepted([widened], outcomes)
            if accepted is not None:
                break
        if accepted is not None:
            state = replace(accepted, move="")


def kl_or_inf(outcome: Outcome) -> float:
    return outcome.kl if outcome.kl is not None else float("inf")


def best_accepted(candidates: list[Candidate], outcomes: dict[Candidate, Outcome]) -> Candidate | None:
    """The accepted candidate that kept the model closest to its source (lowest held-out KL)."""
    accepted = [c for c in candidates if outcomes[c].status == ACCEPTED]
    return min(accepted, key=lambda c: kl_or_inf(outcomes[c])) if accepted else None


def space_size(space: Any, present: set[str] | None = None) -> int:
    """Every layout the space can express (formats per family incl. BF16, algorithms, keep values, KV
    formats), before the sensitivity back-off's layer sets: what an exhaustive search would quantize."""
    size = 1
    for family in family_order(space.formats, present):
        size *= len(format_ladder(space.formats[family])) + 1
    return (size - 1) * len(set(space.algorithms)) * len(set(space.keep_first)) * len(set(space.keep_last)) \
        * len(set(space.kv_cache))


def procedure_bound(space: Any, present: set[str] | None = None) -> int:
    """The most candidates `ptq_order` can quantize: per family and format, one widening, the other
    algorithms, and its back-off round."""
    algorithms = len(set(space.algorithms))
    backoff = SENSITIVE_ROUNDS + min(len(space.keep_first), len(space.keep_last)) - 1 + len(space.kv_cache) - 1
    return sum(len(format_ladder(space.formats[f])) * (algorithms + backoff)
               for f in family_order(space.formats, present))
