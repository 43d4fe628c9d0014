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
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from runner.quantization.bits import format_name
from runner.worker.nvfp4_format import unpack_e2m1

E8M0_BIAS = 127
FLOATS = ("F32", "F16", "BF16")


@dataclass(frozen=True)
class Layout:
    """What a quantized layer's tensors say about it."""

    family: str  # nvfp4 | mxfp4 | mxfp8 | fp8 | fp8_pc_pt | fp8_pb_wo | int4_awq | w4a8_awq
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
    for NVFP4, weight_scale_2 (suffixes only)."""
    import torch

    weight, scale = tensors["weight"], tensors["weight_scale"]
    out, inn, block = layout.out_features, layout.in_features, layout.block
    if layout.family == "nvfp4":
        values = unpack_e2m1(weight)
        scales = scale.to(torch.float32) * tensors["weight_scale_2"].to(torch.float32)
        return _per_block(values, scales, block)
    if layout.family == "mxfp4":
        return _per_block(unpack_e2m1(weight), _e8m0(scale), block)
    if layout.family == "mxfp8":
        return _per_block(weight.to(torch.float32), _e8m0(scale), block)
    if layout.family == "fp8":
        return weight.to(torch.float32) * scale.to(torch.float32).reshape(())
    if layout.family == "fp8_pc_pt":
        return weight.to(torch.float32) * scale.to(torch.float32).reshape(out, 1)
    if layout.family == "fp8_pb_wo":
        assert block is not None
        blocks = scale.to(torch.float32).reshape(out // block, 1, inn // block, 1)
        return (weight.to(torch.float32).reshape(out // block, block, inn // block, block) * blocks).reshape(out, inn)
    if layout.family in ("int4_awq", "w4a8_awq"):
        low = (weight & 0x0F).to(torch.int16)
        high = (weight >> 4).to(torch.int16)
        codes = torch.stack([low, high], dim=1).reshape(out, inn)
        codes = torch.where(codes >= 8, codes - 16, codes).to(torch.float32)
        weight = _per_block(codes, scale.to(torch.float32), block)
        if layout.family == "w4a8_awq":
            # The kernel turns the INT4 weight into FP8 in units of weight_scale_2 before its FP8 GEMM.
            step = tensors["weight_scale_2"].to(torch.float32)
            weight = (weight / step).clamp(-448, 448).to(torch.float8_e4m3fn).to(torch.float32) * step
        return weight
    raise ValueError(f"no decoder for {layout.family}")


def _per_block(values: Any, scales: Any, block: int | None) -> Any:
    out, inn = values.shape
    if block is None or inn % block or scales.shape != (out, inn // block):
        raise ValueError(f"scales {tuple(scales.shape)} do not fit weight [{out}, {inn}] in blocks of {block}")
    return (values.reshape(out, inn // block, block) * scales.unsqueeze(-1)).reshape(out, inn)


def _e8m0(exponents: Any) -> Any:
    """E8M0 scales: a biased power-of-two exponent a byte (255 is NaN, which ModelOpt never writes)."""
    import torch

    return torch.exp2(exponents.to(torch.float32) - E8M0_BIAS)


# A layout's codes are 4 bits (an error of ~0.1 of the weight's norm is normal) or 8 bits (~0.03); a
# decoding or layout mistake (nibble order, scale placement, a wrong axis) gives ~1 or more.
MAX_RELATIVE_ERROR = {"nvfp4": 0.25, "mxfp4": 0.35, "int4_awq": 0.25, "w4a8_awq": 0.25, "mxfp8": 0.1, "fp8": 0.1,
                      "fp8_pc_pt": 0.1, "fp8_pb_wo": 0.1}
