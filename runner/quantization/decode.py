"""Decode speed from the bytes each generated token reads: the arithmetic shared by the footprint
(predicted sizes, runner/quantization/footprint.py) and runner/benchmark/prediction.py (a checkpoint's).

Single-stream decode is memory-bound: each new token reads every weight once. The bytes per token are
the checkpoint's tensors minus the input embedding, of which a token reads one row; when the output
head is tied to the embedding, the embedding is read in full after all. A vision tower is not read
while decoding, nor is a multi-token-prediction head (`mtp.*`: only a speculative draft reads it, and
that speed is not what this predicts). A mixture-of-experts layer reads only the experts its router picks: routed-expert
weights count at num_experts_per_tok / num_experts of their bytes (from config.json). KV-cache reads
are left out, so the prediction is an upper bound that is tight for short contexts.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

# A routed expert's tensors: `...experts.12.gate_proj.weight` (not a shared expert: `shared_expert.`).
_ROUTED_EXPERT = re.compile(r"\.experts\.\d+\.")
# A vision-language model's image side: read once per image, not per generated token.
_VISION = re.compile(r"(^|\.)(vision_tower|visual|vision_model|multi_modal_projector)\.")
# A multi-token-prediction head (Qwen3.5, Qwen3-Next: `mtp.fc.weight`, `mtp.layers.0...`).
_MTP = re.compile(r"(^|\.)mtp\.")


@dataclass(frozen=True)
class Hardware:
    """A decode target as the prediction needs it; the host reads it from recipes/hardware/targets.yaml
    (runner/benchmark/prediction.py, `hardware`)."""

    name: str
    memory_bandwidth_gbs: float


def active_expert_fraction(config_path: Path) -> float | None:
    """num_experts_per_tok / num_experts of a MoE model's config.json (or its text_config); None if dense."""
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    for section in (config, config.get("text_config") or {}, config.get("llm_config") or {}):
        # Gemma 4 names its top-k `top_k_experts`
        top_k = section.get("num_experts_per_tok") or section.get("moe_topk") or section.get("top_k_experts")
        total = section.get("num_experts") or section.get("n_routed_experts") or section.get("num_local_experts")
        if isinstance(top_k, int) and isinstance(total, int) and total > 0:
            return top_k / total
    return None


def bytes_per_token_of(sizes: dict[str, int], expert_fraction: float | None = None) -> int:
    """Bytes one decoded token reads, from tensor name -> bytes (a checkpoint's, or a predicted one's)."""
    embeddings = {k: v for k, v in sizes.items() if k.endswith("embed_tokens.weight")}
    tied = not any(k.endswith("lm_head.weight") for k in sizes)
    skipped = 0 if tied else sum(embeddings.values())
    skipped += sum(v for k, v in sizes.items() if _VISION.search(k) or _MTP.search(k))
    if expert_fraction is not None:
        experts = sum(v for k, v in sizes.items() if _ROUTED_EXPERT.search(k) and not _MTP.search(k))
        skipped += round(experts * (1 - expert_fraction))
    return sum(sizes.values()) - skipped


def decode_tok_s(per_token: int, hardware: Hardware) -> float:
    """Predicted single-stream decode speed: the hardware's memory bandwidth / bytes read per token."""
    return round(hardware.memory_bandwidth_gbs * 1e9 / per_token, 2)
