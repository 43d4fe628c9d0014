"""How much a change to a quantized model moves its outputs: KL divergence and top-1 agreement.

Take a snapshot of the model's next-token distributions on some batches, change the model, and
compare: mean KL(before || after) per real (non-padding) token, and the share of tokens whose most
likely next token stayed the same. Logits are kept in bf16 and capped at MAX_TOKENS tokens, so a
248k-vocabulary model costs about 1 GB.
"""

from __future__ import annotations

from typing import Any

MAX_TOKENS = 2048


def snapshot(model: Any, batches: list[dict[str, Any]], forward_kwargs: dict[str, Any]) -> list[Any]:
    """Log-probabilities of every real token position, batch by batch (bf16)."""
    import torch

    out = []
    kept = 0
    with torch.no_grad():
        for batch in batches:
            if kept >= MAX_TOKENS:
                break
            logits = model(**batch, **forward_kwargs).logits
            mask = batch["attention_mask"].bool()
            rows = logits[mask][: MAX_TOKENS - kept].float().log_softmax(-1)
            kept += rows.shape[0]
            out.append(rows.to(torch.bfloat16))
    return out


def compare(before: list[Any], after: list[Any]) -> dict[str, float | int]:
    import torch

    kl_sum = 0.0
    agree = tokens = 0
    for p_log, q_log in zip(before, after, strict=True):
        p_log, q_log = p_log.float(), q_log.float()
        kl_sum += float((p_log.exp() * (p_log - q_log)).sum(-1).clamp_min(0).sum())
        agree += int((p_log.argmax(-1) == q_log.argmax(-1)).sum())
        tokens += p_log.shape[0]
        del p_log, q_log
    if not tokens:
        return {"tokens": 0}
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return {"tokens": tokens, "kl": round(kl_sum / tokens, 6), "top1_agreement": round(agree / tokens, 4)}
