"""Predict decode speed before serving: bytes read per generated token / the hardware's memory bandwidth.

Single-stream decode is memory-bound: each new token reads every weight once. The bytes per
token are the checkpoint's tensors (read from the safetensors headers, no torch needed) minus the
input embedding, of which a token reads one row; when the output head is tied to the embedding, the
embedding is read in full after all. A vision tower is not read while decoding. A mixture-of-
experts layer reads only the experts its router picks: routed-expert weights count at
num_experts_per_tok / num_experts of their bytes (from config.json).
KV-cache reads are left out, so the prediction is an upper bound that is tight for short contexts.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from runner.errors import RunnerError
from runner.quantization.safetensors_headers import read_headers
from runner.quantization.weights import active_expert_fraction
from runner.recipe.resources import hardware_targets


def tensor_bytes(checkpoint: Path) -> dict[str, int]:
    """Bytes of every tensor, from the safetensors headers alone."""
    return {name: tensor.nbytes for name, tensor in read_headers(checkpoint).items()}


# A routed expert's tensors: `...experts.12.gate_proj.weight` (not a shared expert: `shared_expert.`).
_ROUTED_EXPERT = re.compile(r"\.experts\.\d+\.")
# A vision-language model's image side: read once per image, not per generated token.
_VISION = re.compile(r"(^|\.)(vision_tower|visual|vision_model|multi_modal_projector)\.")


def bytes_per_token(checkpoint: Path) -> int:
    sizes = tensor_bytes(checkpoint)
    if not sizes:
        raise RunnerError(f"no safetensors in {checkpoint}")
    return bytes_per_token_of(sizes, active_expert_fraction(checkpoint / "config.json"))


def bytes_per_token_of(sizes: dict[str, int], expert_fraction: float | None = None) -> int:
    """Bytes one decoded token reads, from tensor name -> bytes (a checkpoint's, or a predicted one's)."""
    embeddings = {k: v for k, v in sizes.items() if k.endswith("embed_tokens.weight")}
    tied = not any(k.endswith("lm_head.weight") for k in sizes)
    skipped = 0 if tied else sum(embeddings.values())
    skipped += sum(v for k, v in sizes.items() if _VISION.search(k))
    if expert_fraction is not None:
        experts = sum(v for k, v in sizes.items() if _ROUTED_EXPERT.search(k))
        skipped += round(experts * (1 - expert_fraction))
    return sum(sizes.values()) - skipped


def predict_decode(checkpoint: Path, hardware: str) -> dict[str, Any]:
    hardware_table_entry(hardware)  # an unknown hardware fails before the checkpoint is read
    return predict_decode_of(bytes_per_token(checkpoint), hardware)


def hardware_table_entry(hardware: str) -> dict[str, Any]:
    table = hardware_targets()
    if hardware not in table:
        raise RunnerError(f"benchmark.hardware {hardware!r} is not in recipes/hardware/targets.yaml; known: "
                          f"{', '.join(table)}")
    return table[hardware]


def predict_decode_of(per_token: int, hardware: str) -> dict[str, Any]:
    """The decode-speed prediction for `per_token` bytes read per generated token."""
    bandwidth = float(hardware_table_entry(hardware)["memory_bandwidth_gbs"]) * 1e9
    return {"hardware": hardware, "memory_bandwidth_gbs": bandwidth / 1e9, "bytes_per_token": per_token,
            "predicted_decode_tok_s": round(bandwidth / per_token, 2)}
