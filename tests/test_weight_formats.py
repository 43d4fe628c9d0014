"""The independent decoders (runner/worker/weight_formats.py) against ModelOpt's own dequantization.

For each weight format ModelOpt exports, a tiny random Llama is quantized on the CPU, ModelOpt's
fake-quantized weight of one layer (`weight_quantizer(weight)`: its own view of the dequantized
weight) is kept, the model is exported with ModelOpt's exporter, and the layer's exported tensors
are identified and decoded here. Tolerance: relative RMS difference under 2 % (ModelOpt fake-quantizes
in bf16, so values that round on a tie can land one code apart; a layout mistake gives ~100 %).
MXFP4 and MXFP8 fake quantization needs ModelOpt's CUDA extension, so on a CPU those two are
checked against the source weight instead (an error of 0.03 for MXFP8, 0.15 for MXFP4 is the
format's own; a wrong layout gives ~1).
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

pytest.importorskip("modelopt")

from safetensors import safe_open  # noqa: E402

from runner.quantization import formats  # noqa: E402
from runner.worker.weight_formats import Layout, decode, identify  # noqa: E402

LAYER = "model.layers.1.mlp.down_proj"


def quantize_and_export(config: dict, tmp_path) -> tuple[torch.Tensor | None, torch.Tensor, dict, dict]:
    import modelopt.torch.quantization as mtq
    from modelopt.torch.export import export_hf_checkpoint
    from transformers import LlamaConfig, LlamaForCausalLM

    from runner.worker.nvfp4_cpu import install_cpu_nvfp4

    install_cpu_nvfp4()
    llama = LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                        architectures=["LlamaForCausalLM"])
    torch.manual_seed(0)
    model = LlamaForCausalLM(llama).to(torch.bfloat16).eval()
    config = copy.deepcopy(config)
    config["quant_cfg"] = [*config["quant_cfg"], {"quantizer_name": "*lm_head*", "enable": False}]
    ids = torch.randint(0, 256, (2, 32))
    mtq.quantize(model, config, forward_loop=lambda m: m(ids))
    module = model.get_submodule(LAYER)
    source = module.weight.detach().float().clone()
    try:
        with torch.no_grad():
            ours_ref = module.weight_quantizer(module.weight).float()
    except RuntimeError:  # MX formats: ModelOpt's fake quantization is CUDA-only
        ours_ref = None
    export_hf_checkpoint(model, export_dir=tmp_path)
    tensors, meta = {}, {}
    with safe_open(tmp_path / "model.safetensors", framework="pt") as fh:
        for key in fh.keys():  # noqa: SIM118
            sl = fh.get_slice(key)
            meta[key] = (str(sl.get_dtype()), tuple(sl.get_shape()))
            if key.startswith(f"{LAYER}."):
                tensors[key.removeprefix(f"{LAYER}.")] = fh.get_tensor(key)
    quant = json.loads((tmp_path / "hf_quant_config.json").read_text())["quantization"]
    return ours_ref, source, {"tensors": tensors, "meta": meta}, quant


def nvfp4_with_block(block: int) -> dict:
    import modelopt.torch.quantization as mtq

    config = copy.deepcopy(mtq.NVFP4_DEFAULT_CFG)
    for entry in config["quant_cfg"]:
        cfg = entry.get("cfg") if isinstance(entry, dict) else None
        if isinstance(cfg, dict) and cfg.get("num_bits") == (2, 1):
            entry["cfg"] = {**cfg, "block_sizes": {**cfg["block_sizes"], -1: block}}
    return config


CASES = [
    # (preset or builder, quant_algo, layout name)
    ("NVFP4_DEFAULT_CFG", "NVFP4", "nvfp4"),
    ("NVFP4_B32", "NVFP4", "nvfp4_b32"),
    ("W4A16_NVFP4_CFG", "W4A16_NVFP4", "nvfp4"),
    ("FP8_DEFAULT_CFG", "FP8", "fp8"),
    ("FP8_PER_CHANNEL_PER_TOKEN_CFG", "FP8_PER_CHANNEL_PER_TOKEN", "fp8_pc_pt"),
    ("FP8_2D_BLOCKWISE_WEIGHT_ONLY_CFG", "FP8_PB_WO", "fp8_pb_wo"),
    ("INT4_BLOCKWISE_WEIGHT_ONLY_CFG", "W4A16_AWQ", "int4_awq"),
    ("INT4_AWQ_CFG", "W4A16_AWQ", "int4_awq"),
    ("W4A8_AWQ_BETA_CFG", "W4A8_AWQ", "w4a8_awq"),
    ("MXFP8_DEFAULT_CFG", "MXFP8", "mxfp8"),
    ("MXFP4_DEFAULT_CFG", "MXFP4", "mxfp4"),
]


@pytest.mark.parametrize(("preset", "quant_algo", "name"), CASES)
def test_decoder_reproduces_modelopt_dequantization(preset, quant_algo, name, tmp_path):
    import modelopt.torch.quantization as mtq

    config = nvfp4_with_block(32) if preset == "NVFP4_B32" else getattr(mtq, preset)
    reference, source, exported, quant = quantize_and_export(config, tmp_path)
    assert str(quant["quant_algo"]).upper() == quant_algo
    layout = identify(LAYER, exported["meta"])
    assert isinstance(layout, Layout) and layout.name == name, layout
    # The registry's entry tells what the export stores and which decoder reads it.
    fmt = formats.by_quant_algo(quant_algo)
    stored = set(exported["tensors"]) - {"weight"}
    assert fmt is not None and fmt.stored_as == layout.family
    assert exported["meta"][f"{LAYER}.weight"][0] == fmt.tensors.weight_dtype
    assert set(fmt.tensors.required) <= stored <= {*fmt.tensors.required, *fmt.tensors.optional}, stored
    decoded = decode(layout, exported["tensors"])
    assert decoded.shape == source.shape
    if reference is not None:
        difference = float((decoded - reference).norm() / reference.norm())
        assert difference < 0.02, (name, difference)
    else:
        error = float((decoded - source).norm() / source.norm())
        assert error < {"mxfp8": 0.06, "mxfp4": 0.3}[name], (name, error)


def test_an_unknown_layout_is_named_not_decoded():
    meta = {"m.weight": ("I32", (16, 4)), "m.weight_scale": ("F32", (16, 1))}
    found = identify("m", meta)
    assert isinstance(found, str) and "I32" in found
    assert identify("plain", {"plain.weight": ("BF16", (4, 4))}) is None
