"""Independent decoders for every weight layout ModelOpt 0.47 exports, written from the formats'
definitions (not from ModelOpt), and the rule that tells a layer's format from its tensors.

- nvfp4 (also w4a16_nvfp4, nvfp4_awq; any block): weight U8 [out, in/2], two E2M1 codes a byte, low
  nibble first; weight_scale F8_E4M3 [out, in/block]; weight = code x scale x weight_scale_2 (fp32).
- mxfp4: weight as NVFP4; weight_scale U8 [out, in/32], E8M0 exponents; weight = code x 2^(e - 127).
- mxfp8: weight F8_E4M3 [out, in]; weight_scale U8 [out, in/32] (E8M0); weight = value x 2^(e - 127).
- fp8: weight F8_E4M3; weight_scale an fp32 scalar.  fp8_pc_pt: weight_scale fp32 [out], one a row.
- fp8_pb_wo: weight F8_E4M3 [out, in]; weight_scale fp32 [out/B, 1, in/B, 1], one per B x B block (B 128).
- int4_awq (W4A16_AWQ) and w4a8_awq: weight U8 [out/2, in], rows 2r (low nibble) and 2r+1 (high),
  signed 4-bit codes; weight_scale fp32 [out, in/block]; weight = code x scale; w4a8_awq then rounds
  that to FP8 in units of weight_scale_2 (its kernel's FP8 GEMM), as ModelOpt's second stage does.

AWQ's pre_quant_scale (when kept) multiplies the layer's input; it is not part of the weight.

One decoder per stored layout of runner/quantization/formats.py (a format's `stored_as`), registered
in DECODERS; importing this module fails when a layout has none.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from runner.quantization import formats
from runner.quantization.bits import format_name

E8M0_BIAS = 127
FLOATS = ("F32", "F16", "BF16")


@dataclass(frozen=True)
class Layout:
    """What a quantized layer's tensors say about it."""

    family: str  # its stored layout (formats.layouts(): nvfp4 | mxfp4 | mxfp8 | fp8 | fp8_pc_pt | ...)
    block: int | None  # weights a scale covers along the input (B of B x B for fp8_pb_wo)
    in_features: int
    out_features: int

    @property
    def name(self) -> str:
        return format_name(self.family, self.block)


def identify(module: str, meta: dict[str, tuple[str, tuple[int, ...]]]) -> Layout | str | None:
    """The layout of `module`'s exported weight; None when it is stored unquantized; a string naming
    the tensors when they follow no layout known here (the caller reports it as not checked)."""
    weight = meta.get(f"{module}.weight")
    scale = meta.get(f"{module}.weight_scale")
    if weight is None or scale is None:
        return None
    (wdtype, wshape), (sdtype, sshape) = weight, scale
    unknown = f"weight {wdtype}{list(wshape)} with weight_scale {sdtype}{list(sshape)}"
    if len(wshape) != 2:
        return unknown
    rows, cols = wshape
    if wdtype == "U8" and len(sshape) == 2:
        if sdtype == "F8_E4M3" and sshape[0] == rows and (2 * cols) % sshape[1] == 0:
            return Layout("nvfp4", 2 * cols // sshape[1], 2 * cols, rows)
        if sdtype == "U8" and sshape[0] == rows and (2 * cols) % sshape[1] == 0:
            return Layout("mxfp4", 2 * cols // sshape[1], 2 * cols, rows)
        if sdtype in FLOATS and sshape[0] == 2 * rows and cols % sshape[1] == 0:
            family = "w4a8_awq" if f"{module}.weight_scale_2" in meta else "int4_awq"
            return Layout(family, cols // sshape[1], cols, 2 * rows)
        return unknown
    if wdtype == "F8_E4M3":
        if sdtype == "U8" and len(sshape) == 2 and sshape[0] == rows and cols % sshape[1] == 0:
            return Layout("mxfp8", cols // sshape[1], cols, rows)
        if sdtype in FLOATS and sshape in ((), (1,)):
            return Layout("fp8", None, cols, rows)
        if sdtype in FLOATS and sshape in ((rows,), (rows, 1)):
            return Layout("fp8_pc_pt", None, cols, rows)
        if sdtype in FLOATS and len(sshape) in (2, 4) and rows % sshape[0] == 0:
            side = rows // sshape[0]
            blocks_in = sshape[2] if len(sshape) == 4 else sshape[1]
            if cols % blocks_in == 0 and cols // blocks_in == side:
                return Layout("fp8_pb_wo", side, cols, rows)
        return unknown
    return unknown


def decode(layout: Layout, tensors: dict[str, Any]) -> Any:
    """The float32 weight [out, in] of one exported layer; `tensors` holds weight, weight_scale and,
    for NVFP4 and W4A8 AWQ, weight_scale_2 (suffixes only)."""
    decoder = DECODERS.get(layout.family)
    if decoder is None:
        raise ValueError(f"no decoder for {layout.family}")
    return decoder(layout, tensors)


def unpack_e2m1(packed: Any) -> Any:
    """uint8 [out, in/2] -> float32 [out, in] E2M1 values (before scaling): low nibble first, bit 3 the sign."""
    import torch

    magnitudes = torch.tensor(formats.E2M1_VALUES, dtype=torch.float32)
    table = torch.cat([magnitudes, -magnitudes])
    low = (packed & 0x0F).long()
    high = (packed >> 4).long()
    codes = torch.stack([low, high], dim=-1).reshape(packed.shape[0], packed.shape[1] * 2)
    return table[codes]


def _nvfp4(layout: Layout, tensors: dict[str, Any]) -> Any:
    """E2M1 codes x E4M3 block scales x the FP32 weight_scale_2."""
    import torch

    scales = tensors["weight_scale"].to(torch.float32) * tensors["weight_scale_2"].to(torch.float32)
    return _per_block(unpack_e2m1(tensors["weight"]), scales, layout.block)


def _mxfp4(layout: Layout, tensors: dict[str, Any]) -> Any:
    return _per_block(unpack_e2m1(tensors["weight"]), _e8m0(tensors["weight_scale"]), layout.block)


def _mxfp8(layout: Layout, tensors: dict[str, Any]) -> Any:
    import torch

    return _per_block(tensors["weight"].to(torch.float32), _e8m0(tensors["weight_scale"]), layout.block)


def _fp8(layout: Layout, tensors: dict[str, Any]) -> Any:
    import torch

    return tensors["weight"].to(torch.float32) * tensors["weight_scale"].to(torch.float32).reshape(())


def _fp8_pc_pt(layout: Layout, tensors: dict[str, Any]) -> Any:
    import torch

    scale = tensors["weight_scale"].to(torch.float32).reshape(layout.out_features, 1)
    return tensors["weight"].to(torch.float32) * scale


def _fp8_pb_wo(layout: Layout, tensors: dict[str, Any]) -> Any:
    import torch

    out, inn, block = layout.out_features, layout.in_features, layout.block
    assert block is not None
    blocks = tensors["weight_scale"].to(torch.float32).reshape(out // block, 1, inn // block, 1)
    weight = tensors["weight"].to(torch.float32).reshape(out // block, block, inn // block, block)
    return (weight * blocks).reshape(out, inn)


def _int4_awq(layout: Layout, tensors: dict[str, Any]) -> Any:
    """Signed 4-bit codes, rows 2r (low nibble) and 2r+1 (high) a byte, x a scale per block."""
    import torch

    weight = tensors["weight"]
    low = (weight & 0x0F).to(torch.int16)
    high = (weight >> 4).to(torch.int16)
    codes = torch.stack([low, high], dim=1).reshape(layout.out_features, layout.in_features)
    codes = torch.where(codes >= 8, codes - 16, codes).to(torch.float32)
    return _per_block(codes, tensors["weight_scale"].to(torch.float32), layout.block)


def _w4a8_awq(layout: Layout, tensors: dict[str, Any]) -> Any:
    """INT4 AWQ, then rounded to FP8 in units of weight_scale_2: the kernel turns the INT4 weight into
    FP8 before its FP8 GEMM."""
    import torch

    step = tensors["weight_scale_2"].to(torch.float32)
    weight = _int4_awq(layout, tensors)
    return (weight / step).clamp(-448, 448).to(torch.float8_e4m3fn).to(torch.float32) * step


# One decoder per stored layout (formats.layouts()).
DECODERS: dict[str, Callable[[Layout, dict[str, Any]], Any]] = {
    "nvfp4": _nvfp4, "mxfp4": _mxfp4, "mxfp8": _mxfp8, "fp8": _fp8, "fp8_pc_pt": _fp8_pc_pt,
    "fp8_pb_wo": _fp8_pb_wo, "int4_awq": _int4_awq, "w4a8_awq": _w4a8_awq,
}
formats.check_registered("weight decoders", formats.layouts(), DECODERS)


def _per_block(values: Any, scales: Any, block: int | None) -> Any:
    out, inn = values.shape
    if block is None or inn % block or scales.shape != (out, inn // block):
        raise ValueError(f"scales {tuple(scales.shape)} do not fit weight [{out}, {inn}] in blocks of {block}")
    return (values.reshape(out, inn // block, block) * scales.unsqueeze(-1)).reshape(out, inn)


def _e8m0(exponents: Any) -> Any:
    """E8M0 scales: a biased power-of-two exponent a byte (255 is NaN, which ModelOpt never writes)."""
    import torch

    return torch.exp2(exponents.to(torch.float32) - E8M0_BIAS)
