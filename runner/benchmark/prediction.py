"""Predict decode speed before serving: bytes read per generated token / the hardware's memory bandwidth.

A checkpoint's bytes per token are read from its safetensors headers (no torch needed); what a token
reads of them, and the division, are runner/quantization/decode.py's (shared with the footprint). The
hardware comes from recipes/hardware/targets.yaml.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from runner.errors import RunnerError
from runner.quantization.decode import Hardware, active_expert_fraction, bytes_per_token_of, decode_tok_s
from runner.quantization.safetensors_headers import read_headers
from runner.recipe.resources import hardware_targets


def tensor_bytes(checkpoint: Path) -> dict[str, int]:
    """Bytes of every tensor, from the safetensors headers alone."""
    return {name: tensor.nbytes for name, tensor in read_headers(checkpoint).items()}


def bytes_per_token(checkpoint: Path) -> int:
    sizes = tensor_bytes(checkpoint)
    if not sizes:
        raise RunnerError(f"no safetensors in {checkpoint}")
    return bytes_per_token_of(sizes, active_expert_fraction(checkpoint / "config.json"))


def predict_decode(checkpoint: Path, hardware: str) -> dict[str, Any]:
    hardware_table_entry(hardware)  # an unknown hardware fails before the checkpoint is read
    return predict_decode_of(bytes_per_token(checkpoint), hardware)


def hardware_table_entry(hardware: str) -> dict[str, Any]:
    table = hardware_targets()
    if hardware not in table:
        raise RunnerError(f"benchmark.hardware {hardware!r} is not in recipes/hardware/targets.yaml; known: "
                          f"{', '.join(table)}")
    return table[hardware]


def hardware_target(name: str) -> Hardware:
    """A hardware target of recipes/hardware/targets.yaml, as the footprint's decode prediction takes it."""
    return Hardware(name, float(hardware_table_entry(name)["memory_bandwidth_gbs"]))


def predict_decode_of(per_token: int, name: str) -> dict[str, Any]:
    """The decode-speed prediction for `per_token` bytes read per generated token."""
    target = hardware_target(name)
    bandwidth = target.memory_bandwidth_gbs * 1e9
    return {"hardware": name, "memory_bandwidth_gbs": bandwidth / 1e9, "bytes_per_token": per_token,
            "predicted_decode_tok_s": decode_tok_s(per_token, target)}
