"""NVFP4 fake quantization on the CPU, for ModelOpt 0.47.

ModelOpt's dynamic block quantization (what an NVFP4 quantizer does in a forward pass) only runs on
CUDA: on a CPU it stops with "amax must be a CUDA tensor for dynamic block quantization". That
blocks AWQ-lite, SVDQuant, auto_quantize and evaluating the fake-quantized model on a CPU. This
module computes NVFP4 fake quantization of CPU tensors in plain PyTorch, with ModelOpt's own
arithmetic (checked bit for bit against NVFP4QTensor), and leaves CUDA tensors on ModelOpt's
kernels. It patches one module-level name that ModelOpt looks up at call time, so it is pinned to
the version it was checked against.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from runner.quantization.formats import E2M1_VALUES

CHECKED_MODELOPT = "0.47."
E2M1_MAX = 6.0
E4M3_MAX = 448.0

_installed = False


# E2M1 rounding as ModelOpt does it (NVFP4QTensor._cast_fp4): bucket by midpoints, and a value on
# an odd midpoint (0.75, 1.75, 3.5) goes up, to the even code.
E2M1_BOUNDS = (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)
ODD_BOUNDS = (0.75, 1.75, 3.5)


def nvfp4_fake_quant(inputs: Any, block_size: int, amax: Any) -> Any:
    """Quantize-dequantize `inputs` to NVFP4 in blocks along the last dim.

    The same arithmetic as ModelOpt's NVFP4QTensor.quantize + dequantize (global scale
    amax / (6 * 448), per-block scale clamped to [2^-9, 448] and cast to E4M3, E2M1 rounding),
    without packing codes into bytes: several times faster, which AWQ's search needs.
    tests/test_nvfp4_math.py checks that the results are identical.
    """
    import torch

    shape, dtype = inputs.shape, inputs.dtype
    if shape[-1] % block_size:
        return _fake_quant_via_qtensor(inputs, block_size, amax)
    x = inputs.float().reshape(-1, block_size)
    global_scale = amax.float().amax() / (E2M1_MAX * E4M3_MAX)
    # ModelOpt replaces a zero block scale by 1; the clamp's 2^-9 gives the same result, since every
    # value of such a block is 0.
    block_scale = (x.abs().amax(dim=1, keepdim=True) / (E2M1_MAX * global_scale)).clamp_(min=2**-9, max=E4M3_MAX)
    scale = block_scale.to(torch.float8_e4m3fn).float().mul_(global_scale)
    return round_e2m1(x / scale).mul_(scale).reshape(shape).to(dtype)


# Bucket bounds for torch.bucketize (a value equal to a bound goes to the lower bucket): an odd
# midpoint is moved one float below itself, so that a value on it goes up, to the even code.
_BUCKET_BOUNDS = tuple(float(np.nextafter(np.float32(b), np.float32(0))) if b in ODD_BOUNDS else b
                       for b in E2M1_BOUNDS)
_tables: dict[Any, tuple[Any, Any]] = {}


def round_e2m1(scaled: Any) -> Any:
    """The nearest E2M1 value (0, 0.5 ... 6, saturating), as ModelOpt rounds (E2M1_BOUNDS, ODD_BOUNDS):
    one bucketize and one lookup, on any device (the local engine quantizes every layer's input this
    way at each generated token, so its cost is the engine's overhead over bf16)."""
    import torch

    if scaled.device not in _tables:
        _tables[scaled.device] = (torch.tensor(_BUCKET_BOUNDS, dtype=torch.float32, device=scaled.device),
                                  torch.tensor(E2M1_VALUES, dtype=torch.float32, device=scaled.device))
    bounds, values = _tables[scaled.device]
    return values[torch.bucketize(scaled.abs(), bounds)].copysign_(scaled)


def _fake_quant_via_qtensor(inputs: Any, block_size: int, amax: Any) -> Any:
    """ModelOpt's own NVFP4 math (pads the last dim to whole blocks)."""
    import torch
    from modelopt.torch.quantization.qtensor import NVFP4QTensor

    shape = inputs.shape
    flat = inputs.float().reshape(-1, shape[-1])
    global_scale = amax.float().amax() / (E2M1_MAX * E4M3_MAX)
    qtensor, block_scale, global_scale = NVFP4QTensor.quantize(
        flat, block_size, weights_scaling_factor_2=global_scale)
    out = qtensor.dequantize(dtype=torch.float32, scale=block_scale, double_scale=global_scale,
                             block_sizes={-1: block_size})
    return out[..., :shape[-1]].reshape(shape).to(inputs.dtype)


def install_cpu_nvfp4() -> None:
    """Route CPU tensors of ModelOpt's NVFP4 fake quantization through `nvfp4_fake_quant`."""
    global _installed
    if _installed:
        return
    import modelopt
    from modelopt.torch.quantization import tensor_quant

    if not modelopt.__version__.startswith(CHECKED_MODELOPT):
        raise RuntimeError(f"the CPU NVFP4 path was checked against ModelOpt {CHECKED_MODELOPT}x, found "
                           f"{modelopt.__version__}; run on a GPU or install nvidia-modelopt 0.47")
    original = tensor_quant.dynamic_block_quantize_op

    def dynamic_block_quantize(inputs: Any, block_size: int, amax: Any, num_bits: int, exponent_bits: int,
                               scale_num_bits: int, scale_exponent_bits: int) -> Any:
        is_nvfp4 = (num_bits, exponent_bits, scale_num_bits, scale_exponent_bits) == (4, 2, 8, 4)
        if inputs.is_cuda or amax is None or not is_nvfp4:
            return original(inputs, block_size, amax, num_bits, exponent_bits, scale_num_bits,
                            scale_exponent_bits)
        return nvfp4_fake_quant(inputs, block_size, amax)

    tensor_quant.dynamic_block_quantize_op = dynamic_block_quantize
    _installed = True
