"""An independent NVFP4 decoder: packed E2M1 codes x E4M3 block scales x FP32 global scale.

Written from the format's definition, not from ModelOpt, so that verifying an export with it is a
real second opinion. Two E2M1 codes a byte, low nibble first; one FP8 E4M3 scale per 16 elements
along the input dimension; one FP32 scale per tensor (weight_scale_2).
"""

from __future__ import annotations

from typing import Any

BLOCK = 16
# E2M1 magnitudes for codes 0..7; bit 3 is the sign.
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


def e2m1_table() -> Any:
    import torch

    magnitudes = torch.tensor(E2M1_VALUES, dtype=torch.float32)
    return torch.cat([magnitudes, -magnitudes])


def unpack_e2m1(packed: Any) -> Any:
    """uint8 [out, in/2] -> float32 [out, in] element values (before scaling)."""
    import torch

    table = e2m1_table()
    low = (packed & 0x0F).long()
    high = (packed >> 4).long()
    codes = torch.stack([low, high], dim=-1).reshape(packed.shape[0], packed.shape[1] * 2)
    return table[codes]


def decode_nvfp4(weight: Any, weight_scale: Any, weight_scale_2: Any) -> Any:
    """The dequantized float32 weight [out, in] of an exported NVFP4 Linear."""
    import torch

    values = unpack_e2m1(weight)
    out_features, in_features = values.shape
    if in_features % BLOCK:
        raise ValueError(f"in_features {in_features} is not a multiple of {BLOCK}")
    scales = weight_scale.to(torch.float32)
    if scales.shape != (out_features, in_features // BLOCK):
        raise ValueError(f"weight_scale shape {tuple(scales.shape)} does not match weight "
                         f"[{out_features}, {in_features}] with blocks of {BLOCK}")
    block_scales = scales * weight_scale_2.to(torch.float32)
    blocks = values.reshape(out_features, in_features // BLOCK, BLOCK) * block_scales.unsqueeze(-1)
    return blocks.reshape(out_features, in_features)


def ideal_bits(numel: int) -> float:
    """4 bits a code plus 8 bits of E4M3 scale per 16 elements."""
    return numel * (4 + 8 / BLOCK)
