"""The NVFP4 pieces checked against ModelOpt 0.47's own NVFP4 math on the CPU.

- runner.worker.weight_formats' NVFP4 decoder is independent: it must reproduce ModelOpt's
  dequantization of ModelOpt's packed codes and scales exactly.
- runner.worker.nvfp4_cpu routes ModelOpt's CPU fake quantization through NVFP4QTensor: its output
  must equal quantize-then-dequantize with the same global scale, and must now run where ModelOpt
  alone raises.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("modelopt")

from modelopt.torch.quantization.qtensor import NVFP4QTensor  # noqa: E402

from runner.worker.nvfp4_cpu import install_cpu_nvfp4, nvfp4_fake_quant  # noqa: E402
from runner.worker.weight_formats import Layout, decode, unpack_e2m1  # noqa: E402


def packed(weight):
    qtensor, scale, scale2 = NVFP4QTensor.quantize(weight, 16)
    return qtensor, scale, scale2


def decode_nvfp4(weight, weight_scale, weight_scale_2):
    """The registry's one NVFP4 decoder, on a layer of 16-weight blocks."""
    layout = Layout("nvfp4", 16, weight.shape[1] * 2, weight.shape[0])
    return decode(layout, {"weight": weight, "weight_scale": weight_scale, "weight_scale_2": weight_scale_2})


def test_independent_decoder_matches_modelopt_dequantize():
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(64, 256, generator=gen) * 0.02
    qtensor, scale, scale2 = packed(weight)
    ours = decode_nvfp4(qtensor._quantized_data, scale, scale2)
    theirs = qtensor.dequantize(dtype=torch.float32, scale=scale, double_scale=scale2, block_sizes={-1: 16})
    assert torch.equal(ours, theirs)
    # And it is a faithful quantization: small relative error, every value on the scaled E2M1 grid.
    assert float(torch.linalg.norm(ours - weight) / torch.linalg.norm(weight)) < 0.15


def test_decoder_nibble_order_and_sign():
    # 0x71: low nibble 1 (0.5) first, high nibble 7 (6.0); 0xF9: low 9 (-0.5), high 15 (-6.0)
    values = unpack_e2m1(torch.tensor([[0x71, 0xF9]], dtype=torch.uint8))
    assert values.tolist() == [[0.5, 6.0, -0.5, -6.0]]


def test_decoder_rejects_mismatched_scales():
    qtensor, scale, scale2 = packed(torch.randn(8, 32))
    with pytest.raises(ValueError, match="do not fit weight"):
        decode_nvfp4(qtensor._quantized_data, scale[:, :1], scale2)


def modelopt_fake_quant(x, amax):
    flat = x.float().reshape(-1, x.shape[-1])
    q, s, s2 = NVFP4QTensor.quantize(flat, 16, weights_scaling_factor_2=amax.float() / (6 * 448))
    return q.dequantize(dtype=torch.float32, scale=s, double_scale=s2, block_sizes={-1: 16}).reshape(x.shape)


@pytest.mark.parametrize("case", ["normal", "bf16", "zeros_and_ties", "tiny_blocks", "calibrated_amax"])
def test_cpu_fake_quant_equals_modelopt_quantize_dequantize(case):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 5, 64, generator=gen)
    amax = x.abs().amax()
    if case == "bf16":
        x = x.to(torch.bfloat16)
    elif case == "zeros_and_ties":
        x[0, 0, :16] = 0  # an all-zero block: its scale becomes 1
        x[0, 1, :8] = torch.tensor([0.75, 1.75, 3.5, -0.75, 0.25, 5.0, 6.0, -3.5]) * (amax / 6)
    elif case == "tiny_blocks":
        x[1] *= 1e-6  # block scales that underflow E4M3 and get clamped to 2^-9
    elif case == "calibrated_amax":
        amax = amax * 0.5  # activations beyond a calibrated amax saturate
    ours = nvfp4_fake_quant(x, 16, amax)
    reference = modelopt_fake_quant(x, amax).to(x.dtype)
    assert ours.shape == x.shape and ours.dtype == x.dtype
    assert torch.equal(ours, reference)


def test_modelopt_nvfp4_forward_runs_on_cpu_with_the_fallback():
    import copy

    import modelopt.torch.quantization as mtq

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 16))
    data = torch.randn(4, 64)
    mtq.quantize(model, copy.deepcopy(mtq.NVFP4_DEFAULT_CFG), forward_loop=lambda m: m(data))
    install_cpu_nvfp4()
    out = model(data)
    assert out.shape == (4, 16) and torch.isfinite(out).all()
    # The quantized layer's effective weight equals the fake-quantized weight.
    layer = model[0]
    expected = nvfp4_fake_quant(layer.weight.detach(), 16, layer.weight_quantizer.amax)
    assert torch.equal(layer.weight_quantizer(layer.weight.detach()), expected)


def test_arithmetic_e2m1_rounding_matches_modelopt_buckets_at_every_midpoint():
    from runner.quantization.formats import E2M1_VALUES
    from runner.worker.nvfp4_cpu import E2M1_BOUNDS, ODD_BOUNDS, round_e2m1

    grid = torch.cat([torch.linspace(-7, 7, 20001), torch.tensor(E2M1_BOUNDS), -torch.tensor(E2M1_BOUNDS)])
    magnitude = grid.abs()
    codes = torch.bucketize(magnitude, torch.tensor(E2M1_BOUNDS))
    codes += torch.isin(magnitude, torch.tensor(ODD_BOUNDS)).to(codes.dtype)
    buckets = torch.tensor(E2M1_VALUES)[codes] * torch.sign(grid)
    assert torch.equal(round_e2m1(grid), buckets)
