"""Calibration batches: chat conversations rendered with the model's own chat template.

Batches are sized in tokens, not samples: a batch computes rows x padded width tokens, and a token
budget (fitted to free memory by the quantize worker) bounds that product. Samples are sorted by
length and cut into a few buckets (`plan_token_batches`), each padded to its longest sample: the
fewest buckets that hold padding under `MAX_PADDING` of the computed tokens, so compiled and Triton
kernels (flash-linear-attention's, for DeltaNet layers) tune once per width, not once per batch. A
sample longer than the budget forms a batch of its own. Batches run longest first, so an out-of-memory shows at once.
The attention mask keeps padding out of attention, and the summary reports real tokens, padding and
batches (`BatchPlan.summary`). A fixed number of samples per batch (`batch_size: N`) still works.
"""

from __future__ import annotations

import contextlib
import json
import random
from collections import Counter
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

# Padding allowed, as a share of the tokens a plan computes (real + padding): the bound. The
# plan is exact (no noise), so the cap can sit at the bound itself.
MAX_PADDING = 0.10
# What one more batch costs, in tokens' worth of compute: a forward's fixed work (kernel launches,
# DeltaNet's per-chunk loop, weight statistics). From facts.md (9B shape): a 1 x 512 forward took
# ~0.15 s (H100), a 32 x 512 one 0.83 s (H200), i.e. ~0.13 s fixed a forward, ~3000 tokens' worth;
# 2048 leans towards less padding.
BATCH_OVERHEAD_TOKENS = 2048
# AWQ's search fake-quantizes every weight once per alpha (11 of them) per batch, whatever the batch
# holds: fitted to the hf_ptq comparison at 9B (bench/quantize_gpu.py, H200: ~6 s a batch against
# ~0.32 ms a token), a batch costs ~19 k tokens' worth. Fewer, fuller batches, up to the padding cap.
AWQ_BATCH_OVERHEAD_TOKENS = 16384


def batch_overhead_tokens(algorithm: str | None) -> int:
    """The per-batch cost to plan with, for a calibration algorithm (ModelOpt's name; None = max)."""
    return AWQ_BATCH_OVERHEAD_TOKENS if algorithm and algorithm.startswith("awq") else BATCH_OVERHEAD_TOKENS


@dataclass
class CalibrationSet:
    token_ids: list[list[int]]  # one list of ids per sample, truncated to max_length
    pad_id: int
    # Conversations of the same file never used for calibration, for measuring what a change costs
    # (e.g. folding AWQ scales); empty when the file has no conversation to spare.
    held_out_ids: list[list[int]] = field(default_factory=list)
    # How many of the samples are different (a file with fewer rows than `samples` is reused, and a
    # file may hold the same row twice), and the most times one of them is used: 256 samples of 42
    # distinct conversations are not 256 conversations. None: not counted (built from ids directly).
    distinct: int | None = None
    most_uses: int = 1

    def counts(self) -> dict[str, int]:
        """The record's view of the samples: total, distinct, and the most uses of one (1 = no repeats)."""
        distinct = len(self.token_ids) if self.distinct is None else self.distinct
        return {"calibration_samples": len(self.token_ids), "calibration_distinct_samples": distinct,
                "calibration_repeated_samples": len(self.token_ids) - distinct,
                "calibration_most_uses": self.most_uses}

    def describe(self) -> str:
        """"256 samples (42 distinct, each used up to 7 times)" or "34 samples (all distinct)"."""
        counts = self.counts()
        if counts["calibration_repeated_samples"] == 0:
            return f"{counts['calibration_samples']} samples (all distinct)"
        return (f"{counts['calibration_samples']} samples ({counts['calibration_distinct_samples']} distinct, "
                f"each used up to {self.most_uses} times)")

    @property
    def tokens(self) -> int:
        return sum(len(ids) for ids in self.token_ids)

    @property
    def longest(self) -> int:
        return max(len(ids) for ids in self.token_ids)

    @property
    def lengths(self) -> list[int]:
        return [len(ids) for ids in self.token_ids]

    def plan(self, token_budget: int | None = None, batch_size: int | None = None,
             batch_overhead: int = BATCH_OVERHEAD_TOKENS) -> BatchPlan:
        """How the samples would be batched (no tensors): by token budget, or `batch_size` samples a batch."""
        if (token_budget is None) == (batch_size is None):
            raise ValueError("give exactly one of token_budget and batch_size")
        if batch_size is not None:
            return plan_fixed_batches(self.lengths, batch_size)
        return plan_token_batches(self.lengths, token_budget, batch_overhead=batch_overhead)

    def build(self, plan: BatchPlan, device: Any) -> list[dict[str, Any]]:
        """The batches of a plan (of these samples) as right-padded input_ids and attention_mask tensors."""
        return build_batches(self.token_ids, self.pad_id, plan, device)

    def batches(self, batch_size: int, device: Any) -> list[dict[str, Any]]:
        """Right-padded batches of similar-length samples, each with input_ids and attention_mask."""
        return pad_batches(self.token_ids, self.pad_id, batch_size, device)

    def held_out_batches(self, batch_size: int, device: Any) -> list[dict[str, Any]]:
        return pad_batches(self.held_out_ids, self.pad_id, batch_size, device)



@dataclass(frozen=True)
class BatchPlan:
    """Which samples go into which batch; each group lists sample indices, longest first."""

    lengths: tuple[int, ...]
    groups: tuple[tuple[int, ...], ...]
    token_budget: int | None = None  # None: a fixed number of samples per batch
    # The width each batch is padded to, by group; empty: each to its own longest sample.
    padded_to: tuple[int, ...] = ()

    @cached_property
    def _width_of(self) -> dict[tuple[int, ...], int]:
        if self.padded_to:
            return dict(zip(self.groups, self.padded_to, strict=True))
        return {group: max(1, max(self.lengths[i] for i in group)) for group in self.groups}

    def width(self, group: tuple[int, ...]) -> int:
        return self._width_of[group]

    @property
    def widths(self) -> list[int]:
        """The distinct widths the batches are padded to, widest first: the shapes the forwards meet."""
        return sorted(set(self._width_of.values()), reverse=True)

    @property
    def real_tokens(self) -> int:
        return sum(self.lengths[i] for group in self.groups for i in group)

    @property
    def computed_tokens(self) -> int:
        return sum(len(group) * self.width(group) for group in self.groups)

    @property
    def padding_tokens(self) -> int:
        return self.computed_tokens - self.real_tokens

    @property
    def padding_fraction(self) -> float:
        computed = self.computed_tokens
        return self.padding_tokens / computed if computed else 0.0

    @property
    def batches(self) -> int:
        return len(self.groups)

    @property
    def max_rows(self) -> int:
        return max((len(group) for group in self.groups), default=0)

    def batches_covering(self, samples: int) -> int:
        """The fewest leading batches holding at least `samples` samples (all batches when there are fewer).

        Recipes count auto_quantize's calibration and scoring in samples, as the plan's batch-1 loop
        did; ModelOpt counts batches, whose size depends on the GPU's memory.
        """
        covered = 0
        for count, group in enumerate(self.groups, start=1):
            covered += len(group)
            if covered >= samples:
                return count
        return len(self.groups)

    def summary(self) -> dict[str, Any]:
        """The record's view: tokens, padding, batches, budget; batch_size is the most rows in a batch."""
        return {"calibration_tokens": self.real_tokens, "padding_tokens": self.padding_tokens,
                "padding_fraction": round(self.padding_fraction, 4), "batches": self.batches,
                "batch_widths": len(self.widths),
                "batch_size": self.max_rows, "token_budget": self.token_budget}


def _by_length(lengths: list[int]) -> list[int]:
    """Sample indices, longest first (stable: equal lengths keep their order)."""
    return sorted(range(len(lengths)), key=lambda i: lengths[i], reverse=True)


def plan_fixed_batches(lengths: list[int], batch_size: int) -> BatchPlan:
    """`batch_size` samples a batch, by length (the behaviour of an explicit `batch_size: N`)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = _by_length(lengths)
    groups = tuple(tuple(order[s:s + batch_size]) for s in range(0, len(order), batch_size))
    return BatchPlan(tuple(lengths), groups, None)


# A forward of a new (rows, width) shape costs a compile: flash-linear-attention's Triton kernels (the
# DeltaNet layers) specialise and autotune per sequence length, and did so for every new width of a
# mixed-length set (bench/quantize_gpu.py: 64 s the first time). So a plan pads to a few widths: the
# fewest (up to MAX_WIDTHS) that keep padding under the cap, each width the longest sample of its bucket.
MAX_WIDTHS = 16
# Lengths are grouped into at most this many runs before the widths are chosen: the choice is a
# dynamic programme over runs (quadratic), and 192 runs of a sorted set lose almost nothing.
MAX_RUNS = 192


@dataclass(frozen=True)
class _Run:
    """Consecutive samples of a longest-first order: [start, end) with the longest `width` and their tokens."""

    start: int
    end: int
    width: int
    tokens: int


def _runs(ordered: list[int]) -> list[_Run]:
    """A longest-first list of lengths cut into at most MAX_RUNS runs (equal lengths never split)."""
    equal: list[_Run] = []
    i = 0
    while i < len(ordered):
        j = i
        while j < len(ordered) and ordered[j] == ordered[i]:
            j += 1
        equal.append(_Run(i, j, max(1, ordered[i]), ordered[i] * (j - i)))
        i = j
    if len(equal) <= MAX_RUNS:
        return equal
    per = -(-len(equal) // MAX_RUNS)
    return [_Run(group[0].start, group[-1].end, group[0].width, sum(r.tokens for r in group))
            for group in (equal[k:k + per] for k in range(0, len(equal), per))]


def _bucket_cuts(runs: list[_Run], widths: int, budget: int, cost_per_batch: float) -> tuple[list[int], float]:
    """The best way to cut runs into at most `widths` buckets: (cut points over runs, padding tokens).

    A bucket pads every sample to its longest and runs as ceil(samples / rows) batches of rows =
    budget // width (at least one); the cuts minimise padding + cost_per_batch x batches.
    """
    m = len(runs)
    inf = float("inf")
    prefix = [0]
    for run in runs:
        prefix.append(prefix[-1] + run.tokens)

    def cost_of(i: int, j: int) -> tuple[float, int]:  # runs [i, j) as one bucket: (cost, padding)
        width = runs[i].width
        samples = runs[j - 1].end - runs[i].start
        padding = width * samples - (prefix[j] - prefix[i])
        batches = -(-samples // max(1, budget // width))
        return padding + cost_per_batch * batches, padding

    best = [[inf] * (m + 1) for _ in range(widths + 1)]
    back = [[0] * (m + 1) for _ in range(widths + 1)]
    best[0][0] = 0.0
    for k in range(1, widths + 1):
        for j in range(1, m + 1):
            for i in range(k - 1, j):
                if best[k - 1][i] == inf:
                    continue
                cost = best[k - 1][i] + cost_of(i, j)[0]
                if cost < best[k][j]:
                    best[k][j], back[k][j] = cost, i
    k = min(range(1, widths + 1), key=lambda n: best[n][m])
    cuts, j = [m], m
    while k > 0:
        j = back[k][j]
        cuts.append(j)
        k -= 1
    cuts.reverse()
    padding = sum(cost_of(a, b)[1] for a, b in zip(cuts[:-1], cuts[1:], strict=True))
    return cuts, float(padding)


def plan_token_batches(lengths: list[int], token_budget: int, max_padding: float = MAX_PADDING,
                       batch_overhead: float = BATCH_OVERHEAD_TOKENS, max_widths: int = MAX_WIDTHS) -> BatchPlan:
    """Batches of similar-length samples, each computing at most `token_budget` tokens (rows x width).

    Samples are sorted longest first and cut into buckets, every sample of a bucket padded to its
    longest, so the forwards meet only as many sequence widths as there are buckets: the fewest
    buckets (at most `max_widths`) whose padding stays under `max_padding` of the computed tokens,
    cut to minimise padding + `batch_overhead` tokens a batch (fewer, fuller batches vs. less padding).
    Should no such count exist, every distinct length is its own width (no padding at all). A bucket
    runs as batches of budget // width rows; a sample longer than the budget runs alone. Batches come
    longest first, so the widest (most memory a token) runs first.
    """
    if token_budget < 1:
        raise ValueError(f"token_budget must be >= 1, got {token_budget}")
    order = _by_length(lengths)
    ordered = [lengths[i] for i in order]
    runs = _runs(ordered)
    total = sum(ordered)

    def plan_of(cuts: list[int]) -> BatchPlan:
        groups: list[tuple[int, ...]] = []
        widths: list[int] = []
        for a, b in zip(cuts[:-1], cuts[1:], strict=True):
            first, last, width = runs[a].start, runs[b - 1].end, runs[a].width
            rows = max(1, token_budget // width)
            for s in range(first, last, rows):
                groups.append(tuple(order[s:min(s + rows, last)]))
                widths.append(width)
        return BatchPlan(tuple(lengths), tuple(groups), token_budget, tuple(widths))

    if not runs:
        return BatchPlan(tuple(lengths), (), token_budget)
    for widths in range(1, min(max_widths, len(runs)) + 1):
        # The cheapest cuts into this many widths, else the ones with the least padding.
        for overhead in (batch_overhead, 0.0):
            cuts, padding = _bucket_cuts(runs, widths, token_budget, overhead)
            if padding <= max_padding * (total + padding):
                return plan_of(cuts)
    return plan_of(list(range(len(runs) + 1)) if len(runs) <= MAX_RUNS else
                   _bucket_cuts(runs, len(runs), token_budget, 0.0)[0])


def build_batches(token_ids: list[list[int]], pad_id: int, plan: BatchPlan, device: Any) -> list[dict[str, Any]]:
    """The plan's batches as right-padded input_ids and attention_mask (1 on real tokens) tensors."""
    import torch

    if len(plan.lengths) != len(token_ids):
        raise ValueError(f"plan is for {len(plan.lengths)} samples, got {len(token_ids)}")
    out = []
    for group in plan.groups:
        width = plan.width(group)
        ids = torch.full((len(group), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(group), width), dtype=torch.long)
        for row, index in enumerate(group):
            sample = token_ids[index]
            ids[row, :len(sample)] = torch.tensor(sample, dtype=torch.long)
            mask[row, :len(sample)] = 1
        out.append({"input_ids": ids.to(device), "attention_mask": mask.to(device)})
    return out


def pad_batches(token_ids: list[list[int]], pad_id: int, batch_size: int, device: Any) -> list[dict[str, Any]]:
    """`batch_size` samples a batch, longest first, right-padded to each batch's longest."""
    return build_batches(token_ids, pad_id, plan_fixed_batches([len(ids) for ids in token_ids], batch_size), device)


def render(tokenizer: Any, conversation: dict[str, Any]) -> str:
    """One conversation as the model sees it, tools included where the template supports them."""
    messages = []
    for msg in conversation["messages"]:
        msg = dict(msg)
        # Templates expect tool-call arguments as a mapping; the OpenAI format carries a JSON string.
        for call in msg.get("tool_calls") or []:
            fn = call.get("function", {})
            if isinstance(fn.get("arguments"), str):
                with contextlib.suppress(ValueError):
                    fn["arguments"] = json.loads(fn["arguments"])
        if msg.get("content") is None:
            msg["content"] = ""
        messages.append(msg)
    return tokenizer.apply_chat_template(messages, tools=conversation.get("tools") or None, tokenize=False)


# No token is longer than this many characters in the tokenizers we meet (BPE merges of spaces run to
# ~16); text is cut here before tokenizing, so a 50 MB line costs what max_length tokens cost.
CHARS_PER_TOKEN_BOUND = 32


def load_calibration(path: Path, tokenizer: Any, samples: int, max_length: int, seed: int,
                     held_out: int = 0, held_out_from: Path | None = None, held_out_after: int | None = None
                     ) -> CalibrationSet:
    """`samples` samples of a calibration file (seeded shuffle; reused when the file has fewer) and
    `held_out` conversations never calibrated on: those after the first `held_out_after` of
    `held_out_from`'s shuffle (by default the ones after the chosen samples of this file)."""
    after = samples if held_out_after is None else held_out_after
    rows = read_rows(path)
    random.Random(seed).shuffle(rows)
    if held_out_from is None or held_out_from == path:
        spare = rows[after:after + held_out]
        rows = rows[:after] + rows[after + held_out:]  # the held-out ones are never calibrated on
    else:
        others = read_rows(held_out_from)
        random.Random(seed).shuffle(others)
        spare = others[after:after + held_out]
    # Fewer samples than asked: reuse them (the record says how many were distinct).
    chosen = [rows[i % len(rows)] for i in range(samples)]
    uses = Counter(json.dumps(row, sort_keys=True) for row in chosen)

    def ids_of(row: dict[str, Any]) -> list[int]:
        if "token_ids" in row:
            return [int(t) for t in row["token_ids"][:max_length]]
        text = row["text"] if "text" in row else render(tokenizer, row)
        text = text[:max_length * CHARS_PER_TOKEN_BOUND]
        return list(tokenizer(text, add_special_tokens=False, truncation=True, max_length=max_length)["input_ids"])

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    return CalibrationSet([ids_of(c) for c in chosen], pad_id, [ids_of(c) for c in spare], distinct=len(uses),
                          most_uses=max(uses.values(), default=1))


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The samples of a calibration file the calibrate step wrote (conversation, text or token ids)."""
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
