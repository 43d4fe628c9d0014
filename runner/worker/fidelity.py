"""How much a change to a quantized model moves its outputs: KL divergence and top-1 agreement.

Take a snapshot of the model's next-token distributions on some held-out conversations, change the
model, and measure the changed model against the snapshot: KL(before || after) per real (non-padding)
token, and the share of tokens whose most likely next token stayed the same. `kl` and
`top1_agreement` are pooled over tokens (the token-weighted mean over conversations); each
conversation's own values come with them (`per_conversation`, in the same order for every strategy,
so two strategies can be paired), and 95 % intervals from a seeded bootstrap over conversations
(`kl_interval`, `top1_interval`): tokens of one conversation are not independent, conversations are.

Memory, bounded whatever the vocabulary:

- A snapshot keeps per token only what a later comparison needs: the TOP_K most likely tokens' ids
  (int32) and log-probabilities (float32), the log of the probability mass outside them, and the
  argmax: TOP_K x 8 + 12 bytes, about 2 KB a token, on the CPU. At MAX_TOKENS (32768) tokens that is
  at most 68 MB a snapshot (the quantize worker holds two); the full bf16 distributions would take
  vocab x tokens x 2 bytes (16 GB for a 248k vocabulary).
- The changed model is never stored: its distributions are compared batch by batch as they come.
- Per batch, besides the model's own logits (rows x width x vocab, in the model's dtype): float32
  work on CHUNK_TOKENS positions at a time, a few CHUNK_TOKENS x vocab x 4-byte tensors (0.5 GB each
  at 248k).

KL is that of the two distributions coarsened to the before-model's TOP_K tokens plus one bin for the
rest: exact when the vocabulary has at most TOP_K tokens, otherwise a lower bound that misses only how
the two models share out the tail (`tail_mass`, the mean probability outside the top TOP_K, says how
much that is: 0.3 % on the tests' peaked tiny model, where the bound came within 0.6 % of the exact
KL). Everything is computed in float32, which a full bf16 snapshot was not.

At most MAX_TOKENS tokens are measured, in whole conversations: the conversations after the first one
that would cross the cap are left out (`conversations_within` picks them before batching; the record
says how many were used).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from runner.benchmark.stats import bootstrap_weighted_mean

MAX_TOKENS = 32768
TOP_K = 256
CHUNK_TOKENS = 512
BOOTSTRAP_SEED = 0  # fixed: the same measurement, the same interval


@dataclass
class Conversation:
    """What a snapshot keeps of one conversation (CPU tensors, one row a real token)."""

    top_ids: Any  # (tokens, k) int32: the k most likely next tokens
    top_logp: Any  # (tokens, k) float32: their log-probabilities
    tail_logp: Any  # (tokens,) float32: log of the probability outside them (-inf: none)
    argmax: Any  # (tokens,) int64: the most likely next token

    @property
    def tokens(self) -> int:
        return int(self.argmax.shape[0])


@dataclass
class Snapshot:
    conversations: list[Conversation] = field(default_factory=list)
    offered: int = 0  # conversations in the batches, measured or not (the cap)

    @property
    def tokens(self) -> int:
        return sum(c.tokens for c in self.conversations)


@dataclass
class _Tally:
    """One conversation's sums against one snapshot."""

    kl: float = 0.0
    agree: int = 0
    tokens: int = 0
    tail: float = 0.0


def conversations_within(lengths: Sequence[int], max_tokens: int | None = None) -> int:
    """How many leading conversations fit in max_tokens together (the first one always counts; the
    snapshot cuts it at the cap). Leading ones, not the shortest: the held-out order is a seeded
    shuffle, so the subset stays an unbiased sample and the same one for every strategy."""
    max_tokens = MAX_TOKENS if max_tokens is None else max_tokens
    total = 0
    for i, n in enumerate(lengths):
        total += n
        if total > max_tokens:
            return max(i, 1)
    return len(lengths)


def snapshot(model: Any, batches: list[dict[str, Any]], forward_kwargs: dict[str, Any]) -> Snapshot:
    """The model's next-token distributions on the batches' real tokens, reduced as the docstring says."""
    kept, _ = measure(model, batches, forward_kwargs, (), keep=True)
    assert kept is not None
    return kept


def measure(model: Any, batches: list[dict[str, Any]], forward_kwargs: dict[str, Any],
            against: Sequence[Snapshot], keep: bool = False) -> tuple[Snapshot | None, list[dict[str, Any]]]:
    """One forward pass over the batches: the model compared with each snapshot taken before (on the
    same batches), and, with keep, a snapshot of the model as it is now."""
    import torch

    kept = Snapshot() if keep else None
    tallies: list[list[_Tally]] = [[] for _ in against]
    parts: list[list[Any]] = []  # the current conversation's chunks of the new snapshot
    for conv, start, logits in _chunks(model, batches, forward_kwargs):
        logp = logits.float().log_softmax(-1)
        if start == 0:
            for tally in tallies:
                tally.append(_Tally())
            if kept is not None:
                _close(kept, parts)
                parts = []
        for ref, tally in zip(against, tallies, strict=True):
            if conv >= len(ref.conversations):
                raise ValueError("the snapshot was taken on other batches (fewer conversations)")
            _compare_chunk(ref.conversations[conv], start, logp, tally[conv])
        if kept is not None:
            parts.append(_reduce(logp))
        del logp, logits
    offered = sum(int(b["attention_mask"].shape[0]) for b in batches)
    if kept is not None:
        _close(kept, parts)
        kept.offered = offered
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    for ref, tally in zip(against, tallies, strict=True):
        if len(tally) != len(ref.conversations):
            raise ValueError("the snapshot was taken on other batches (more conversations)")
    return kept, [summarise(t, offered) for t in tallies]


def summarise(tallies: list[_Tally], offered: int | None = None) -> dict[str, Any]:
    """Pooled KL and top-1 agreement, per conversation, and their bootstrap intervals over conversations."""
    tallies = [t for t in tallies if t.tokens]
    tokens = sum(t.tokens for t in tallies)
    if not tokens:
        return {"tokens": 0}
    weights = [t.tokens for t in tallies]
    kls = [t.kl / t.tokens for t in tallies]
    agreements = [t.agree / t.tokens for t in tallies]
    kl_lo, kl_hi = bootstrap_weighted_mean(kls, weights, seed=BOOTSTRAP_SEED)
    top_lo, top_hi = bootstrap_weighted_mean(agreements, weights, seed=BOOTSTRAP_SEED)
    out: dict[str, Any] = {
        "tokens": tokens,
        "kl": round(sum(t.kl for t in tallies) / tokens, 6),
        "top1_agreement": round(sum(t.agree for t in tallies) / tokens, 4),
        "kl_interval": [round(kl_lo, 6), round(kl_hi, 6)],
        "top1_interval": [round(top_lo, 4), round(top_hi, 4)],
        "conversations": len(tallies),
        "tail_mass": round(sum(t.tail for t in tallies) / tokens, 6),
        "per_conversation": [{"tokens": t.tokens, "kl": round(kl, 6), "top1_agreement": round(agree, 4)}
                             for t, kl, agree in zip(tallies, kls, agreements, strict=True)],
    }
    if offered is not None and offered > len(tallies):
        out["conversations_offered"] = offered  # the MAX_TOKENS cap left some out
    return out


def _chunks(model: Any, batches: list[dict[str, Any]], forward_kwargs: dict[str, Any]
            ) -> Iterator[tuple[int, int, Any]]:
    """(conversation index, first position, logits of up to CHUNK_TOKENS real positions), conversation
    by conversation, whole conversations up to MAX_TOKENS (the first one cut at the cap)."""
    import torch

    conv = kept = 0
    with torch.no_grad():
        for batch in batches:
            logits = model(**batch, **forward_kwargs).logits
            mask = batch["attention_mask"].bool()
            for row in range(logits.shape[0]):
                # Indices, not a masked copy: only a chunk of the row is ever copied.
                positions = mask[row].nonzero().squeeze(-1).to(logits.device)
                n = positions.shape[0]
                if not n:
                    continue
                if kept + n > MAX_TOKENS:
                    if kept:
                        return
                    n = MAX_TOKENS
                for start in range(0, n, CHUNK_TOKENS):
                    yield conv, start, logits[row, positions[start:min(n, start + CHUNK_TOKENS)]]
                kept += n
                conv += 1
            del logits


def _reduce(logp: Any) -> tuple[Any, Any, Any, Any]:
    """The part of a chunk a snapshot keeps (see the module docstring), moved to the CPU."""
    import torch

    k = min(TOP_K, logp.shape[-1])
    top_logp, top_ids = logp.topk(k, dim=-1)
    tail = logp.scatter(-1, top_ids, float("-inf")).logsumexp(-1)
    return (top_ids.to(torch.int32).cpu(), top_logp.cpu(), tail.cpu(), logp.argmax(-1).cpu())


def _close(kept: Snapshot, parts: list[Any]) -> None:
    import torch

    if parts:
        kept.conversations.append(Conversation(*(torch.cat(column) for column in zip(*parts, strict=True))))


def _compare_chunk(ref: Conversation, start: int, logp: Any, tally: _Tally) -> None:
    """Add one chunk of the changed model's log-probabilities (float32, on its device) to the tally."""
    import torch

    n = logp.shape[0]
    ids = ref.top_ids[start:start + n].to(logp.device, torch.int64)
    p_top = ref.top_logp[start:start + n].to(logp.device)
    p_tail = ref.tail_logp[start:start + n].to(logp.device)
    if ids.shape[0] != n:
        raise ValueError("the snapshot was taken on other batches (a conversation's length differs)")
    q_top = logp.gather(-1, ids)
    q_tail = logp.scatter(-1, ids, float("-inf")).logsumexp(-1)
    # KL of the coarsened distributions: sum over the top-k bins and the tail bin of p (log p - log q);
    # a bin the before-model gave no mass adds nothing (0 log 0 = 0).
    per_token = (_plogratio(p_top, q_top).sum(-1) + _plogratio(p_tail, q_tail)).clamp_min(0)
    tally.kl += float(per_token.sum())
    tally.agree += int((ref.argmax[start:start + n].to(logp.device) == logp.argmax(-1)).sum())
    tally.tokens += n
    tally.tail += float(p_tail.exp().sum())


def _plogratio(p_log: Any, q_log: Any) -> Any:
    import torch

    return torch.where(p_log > float("-inf"), p_log.exp() * (p_log - q_log), torch.zeros_like(p_log))
