"""Predict decode speed before serving: bytes read per generated token / the hardware's memory bandwidth.

Single-stream decode is memory-bound: each new token reads every weight once. The bytes per
token are the checkpoint's tensors (read from the safetensors headers, no torch needed) minus the
input embedding, of which a token reads one row; when the output head is tied to the embedding, the
embedding is read in full after all. KV-cache reads are left out, so the prediction is an upper
bound that is tight for short contexts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from runner.errors import RunnerError
from runner.quantization.safetensors_headers import read_headers
from runner.recipe.resources import hardware_targets


def tensor_bytes(checkpoint: Path) -> dict[str, int]:
    """Bytes of every tensor, from the safetensors headers alone."""
    return {name: tensor.nbytes for name, tensor in read_headers(checkpoint).items()}


def bytes_per_token(checkpoint: Path) -> int:
    sizes = tensor_bytes(checkpoint)
    if not sizes:
        raise RunnerError(f"no safetensors in {checkpoint}")
    return bytes_per_token_of(sizes)


def bytes_per_token_of(sizes: dict[str, int]) -> int:
    """Bytes one decoded token reads, from tensor name -> bytes (a checkpoint's, or a predicted one's)."""
    embeddings = {k: v for k, v in sizes.items() if k.endswith("embed_tokens.weight")}
    tied = not any(k.endswith("lm_head.weight") for k in sizes)
    skipped = 0 if tied else sum(embeddings.values())
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
