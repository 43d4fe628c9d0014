"""A Linear that computes with an export's real numerics, for the local serving engine.

The weight is decoded from the export (weight_formats.py). The input is quantized the way the
format's kernels quantize it before their GEMM:

- NVFP4 W4A4 (weight U8 with an `input_scale`): per 16-element block along the input, a dynamic
  E4M3 block scale, E2M1 values, and the exported `input_scale` (calibration amax / (6 x 448)) as the
  per-tensor global scale: what Blackwell's NVFP4 kernels compute, and what ModelOpt's fake
  quantization computes in calibration (the same arithmetic as nvfp4_cpu.nvfp4_fake_quant);
- FP8 W8A8 (weight F8_E4M3 with an `input_scale`): x rounded to E4M3 in units of input_scale;
- FP8 per channel / per token (fp8_pc_pt): x rounded to E4M3 per token (dynamic amax / 448);
- W4A8 AWQ: the input rounded to FP8 in units of input_scale, like FP8;
- weight-only forms (W4A16 NVFP4, INT4 AWQ, FP8 blockwise, and MXFP4/MXFP8, whose dynamic MX
  activation quantization is not emulated here): the input as it comes.

AWQ's kept `pre_quant_scale` multiplies the input first, as the engine's kernel does. Computation
then runs in the model's dtype (bf16) on the decoded weight: the numerics of the quantized values,
not the speed of the quantized kernels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from runner.quantization import formats
from runner.worker.nvfp4_cpu import E2M1_MAX, E4M3_MAX, nvfp4_fake_quant

FP8_MAX = 448.0


# The activation quantizations emulated here (formats.Activation), each in words; importing this module
# fails when a format's activation (runner/quantization/formats.py) has none. `nvfp4` and `fp8` take
# the exported input_scale; a layer without one computes with its input as it comes.
EMULATIONS = {"nvfp4": "NVFP4 activations (dynamic E4M3 scale per 16, exported input_scale as global scale)",
              "fp8": "FP8 activations (static, exported input_scale)",
              "fp8_per_token": "FP8 activations (dynamic, per token)"}
STATIC = ("nvfp4", "fp8")  # scaled by the exported input_scale
formats.check_registered("activation emulations", formats.activations(), EMULATIONS)


@dataclass(frozen=True)
class ActivationQuant:
    """How a layer's input is quantized: kind (nvfp4 | fp8 | fp8_per_token), block, global scale."""

    kind: str
    block: int = 16
    scale: float | None = None

    def describe(self) -> str:
        return EMULATIONS[self.kind]


def activation_quant(family: str, has_input_scale: bool, input_scale: float | None) -> ActivationQuant | None:
    """The input quantization of a layer whose weight layout is `family` (weight_formats.Layout.family):
    its format's `activation` in runner/quantization/formats.py."""
    fmt = formats.by_name(family)
    kind = fmt.activation if fmt else None
    if kind is None or (kind in STATIC and not has_input_scale):
        return None
    return ActivationQuant(kind, scale=input_scale if kind in STATIC else None)


def quantize_input(x: torch.Tensor, quant: ActivationQuant, amax: torch.Tensor | None = None) -> torch.Tensor:
    if quant.kind == "nvfp4":
        assert quant.scale is not None
        if amax is None:
            amax = torch.tensor(quant.scale * E2M1_MAX * E4M3_MAX, device=x.device)
        return nvfp4_fake_quant(x, quant.block, amax)
    if quant.kind == "fp8":
        assert quant.scale is not None
        return _to_fp8(x.float() / quant.scale).mul(quant.scale).to(x.dtype)
    scale = x.float().abs().amax(dim=-1, keepdim=True).clamp_min(1e-12) / FP8_MAX
    return _to_fp8(x.float() / scale).mul(scale).to(x.dtype)


def _to_fp8(x: torch.Tensor) -> torch.Tensor:
    return x.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).to(torch.float32)


class LastInput:
    """The last quantized input of a model's layers. q/k/v (and gate/up) read the same tensor and, in
    ModelOpt's exports, share one input_scale (the fused kernels need it): quantizing it once for the
    three is the same result at a third of the cost. Holding the tensor keeps its identity unique."""

    def __init__(self) -> None:
        self.x: torch.Tensor | None = None
        self.version = -1
        self.quant: ActivationQuant | None = None
        self.out: torch.Tensor | None = None

    def get(self, x: torch.Tensor, quant: ActivationQuant) -> torch.Tensor | None:
        if self.x is x and self.version == x._version and self.quant == quant:
            return self.out
        return None

    def put(self, x: torch.Tensor, quant: ActivationQuant, out: torch.Tensor) -> None:
        self.x, self.version, self.quant, self.out = x, x._version, quant, out


class QuantizedLinear(torch.nn.Module):
    """y = quantize_input(x * pre_quant_scale) @ decoded_weight.T + bias."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, quant: ActivationQuant | None,
                 pre_quant_scale: torch.Tensor | None, fmt: str, last_input: LastInput | None = None):
        super().__init__()
        self.last_input = last_input if pre_quant_scale is None else None  # AWQ scales make each input its own
        self.weight = torch.nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else torch.nn.Parameter(bias, requires_grad=False)
        self.register_buffer("pre_quant_scale", pre_quant_scale)
        self.quant = quant
        self.fmt = fmt
        # NVFP4's global scale as the amax ModelOpt's arithmetic takes, made once, not at every token
        amax = quant.scale * E2M1_MAX * E4M3_MAX if quant is not None and quant.kind == "nvfp4" else None
        self.register_buffer("activation_amax", None if amax is None else torch.tensor(amax), persistent=False)
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pre_quant_scale is not None:
            x = x * self.pre_quant_scale.to(x.dtype)
        if self.quant is not None:
            shared = self.last_input.get(x, self.quant) if self.last_input is not None else None
            if shared is None:
                shared = quantize_input(x, self.quant, self.activation_amax)
                if self.last_input is not None:
                    self.last_input.put(x, self.quant, shared)
            x = shared
        return torch.nn.functional.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, {self.fmt}, {self.quant.kind if self.quant else 'W-only'}"


def numerics_summary(layers: dict[str, QuantizedLinear]) -> str:
    """What the served model computes with, in words (the card prints it)."""
    if not layers:
        return "unquantized"
    counts: dict[str, int] = {}
    for layer in layers.values():
        key = f"{layer.fmt} weights, " + (layer.quant.describe() if layer.quant else "16-bit activations")
        counts[key] = counts.get(key, 0) + 1
    parts = "; ".join(f"{n} layers: {k}" for k, n in sorted(counts.items(), key=lambda kv: -kv[1]))
    return f"the export's numerics ({parts}); weights decoded from the export, matmuls in bf16"
