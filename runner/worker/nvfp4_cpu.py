"""NVFP4 fake quantization on the CPU, for ModelOpt 0.47.

ModelOpt's dynamic block quantization (what an NVFP4 quantizer does in a forward pass) only runs on
CUDA: on a CPU it stops with "amax must be a CUDA tensor for dynamic block quantization". That
blocks AWQ-lite, SVDQuant, auto_quantize and evaluating the fake-quantized model on a CPU. This
module routes CPU tensors through ModelOpt's own NVFP4 math (NVFP4QTensor.quantize, then
dequantize) and leaves CUDA tensors on ModelOpt's kernels. It patches one module-level name that
ModelOpt looks up at call time, so it is pinned to the version it was checked against.
"""

from __future__ import annotations

from typing import Any

CHECKED_MODELOPT = "0.47."
E2M1_MAX = 6.0
E4M3_MAX = 448.0

_installed = False


def nvfp4_fake_quant(inputs: Any, block_size: int, amax: Any) -> Any:
    """Quantize-dequantize `inputs` to NVFP4 in blocks along the last dim (ModelOpt's math)."""
    import torch
    from modelopt.torch.quantization.qtensor import NVFP4QTensor

    shape = inputs.shape
    flat = inputs.float().reshape(-1, shape[-1])
    global_scale = amax.float().amax() / (E2M1_MAX * E4M3_MAX)
    qtensor, block_scale, global_scale = NVFP4QTensor.quantize(
        flat, block_size, weights_scaling_factor_2=global_scale)
    out = qtensor.dequantize(dtype=torch.float32, scale=block_scale, double_scale=global_scale,
                             block_sizes={-1: block_size})
    return out.reshape(shape).to(inputs.dtype)


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
