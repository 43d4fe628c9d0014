"""What the quantize worker says about a strategy before it exports: each layer's real format (as
ModelOpt's exporter names it), patterns that match nothing, and a strategy that quantizes nothing.
Real ModelOpt calls on a tiny random Llama on the CPU (seconds)."""

from __future__ import annotations

import random

import pytest
import torch

from runner.quantization.bits import bits_of
from runner.recipe.schema import Strategy
from runner.worker import quantize
from runner.worker.calib_data import CalibrationSet

pytest.importorskip("modelopt")


def tiny_llama() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).to(torch.bfloat16).eval()


def calib() -> CalibrationSet:
    rng = random.Random(0)
    return CalibrationSet([[rng.randrange(1, 250) for _ in range(rng.randint(8, 32))] for _ in range(6)], 0)


def quantized(strategy: dict, exclude: list[str]) -> torch.nn.Module:
    model = tiny_llama()
    quantize.quantize_model(model, calib(), strategy, exclude, torch.device("cpu"))
    return model


@pytest.mark.parametrize(("preset", "expected"), [
    ("NVFP4_DEFAULT_CFG", "nvfp4"),
    ("W4A16_NVFP4_CFG", "w4a16_nvfp4"),
    ("FP8_DEFAULT_CFG", "fp8"),
    ("MXFP8_DEFAULT_CFG", "mxfp8"),
    ("FP8_2D_BLOCKWISE_WEIGHT_ONLY_CFG", "fp8_pb_wo"),
    ("INT4_BLOCKWISE_WEIGHT_ONLY_CFG", "int4_awq"),
])
def test_layer_formats_name_the_export_format_and_bits_follow_it(preset, expected):
    model = quantized({"name": "s", "preset": preset}, ["*layers.0.*"])
    layers = quantize.layer_formats(model)
    assert layers["model.layers.1.mlp.down_proj"] == expected
    assert layers["model.layers.0.mlp.down_proj"] == "bfloat16"  # excluded: its dtype
    bits = quantize.effective_bits(model, layers)
    assert 4 <= bits < 16 and bits_of(expected) < 16


def test_nvfp4_with_32_weight_blocks_is_named_and_costed_as_such():
    from runner.quantization.bits import format_name

    assert format_name("nvfp4", 32) == "nvfp4_b32" and format_name("nvfp4", 16) == "nvfp4"
    assert bits_of("nvfp4_b32") == 4.25 and bits_of("nvfp4") == 4.5


def test_patterns_that_match_nothing_are_warnings():
    strategy = Strategy(name="s", preset="NVFP4_DEFAULT_CFG")
    model = quantized(strategy.model_dump(), ["*layers.0.*", "*no_such_module*"])
    warnings = quantize.unmatched_patterns(model, strategy, ["*layers.0.*", "*no_such_module*"])
    assert len(warnings) == 1 and "*no_such_module*" in warnings[0]
    # A ModelOpt config entry that asks to quantize modules this dense model lacks (MoE blocks).
    mlp = Strategy(name="m", preset="NVFP4_MLP_ONLY_CFG")
    model = quantized(mlp.model_dump(), [])
    warned = quantize.unmatched_patterns(model, mlp, [])
    assert any("*block_sparse_moe*" in w for w in warned) and not any("'*mlp*" in w for w in warned)


def test_a_strategy_that_quantizes_nothing_fails_naming_the_cause():
    with pytest.raises(SystemExit, match=r"exclusions \['\*layers\.\*', '\*lm_head\*'\].*cover every layer"):
        quantized({"name": "s", "preset": "NVFP4_DEFAULT_CFG"}, ["*layers.*", "*lm_head*"])
    with pytest.raises(SystemExit, match=r"preset NVFP4_EXPERTS_ONLY_CFG's patterns .*experts.* match none"):
        quantized({"name": "m", "preset": "NVFP4_EXPERTS_ONLY_CFG"}, [])


def test_fused_moe_experts_are_listed_with_their_format():
    """transformers' fused experts (one 3-D tensor for all experts) are quantized by ModelOpt through
    `<tensor>_weight_quantizers`; the record lists them like Linears and counts them in the bits."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    config = Qwen3MoeConfig(vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                            num_experts=4, num_experts_per_tok=2, num_hidden_layers=2, num_attention_heads=2,
                            num_key_value_heads=1, head_dim=32, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = Qwen3MoeForCausalLM(config).to(torch.bfloat16).eval()
    quantize.quantize_model(model, calib(), {"name": "e", "preset": "NVFP4_EXPERTS_ONLY_CFG"}, [], torch.device("cpu"))
    layers = quantize.layer_formats(model)
    assert layers["model.layers.0.mlp.experts.gate_up_proj"] == "nvfp4"
    assert layers["model.layers.1.mlp.experts.down_proj"] == "nvfp4"
    assert layers["model.layers.0.self_attn.q_proj"] == "bfloat16"
    assert quantize.format_counts(layers)["nvfp4"] == 4
    assert quantize.effective_bits(model, layers) < 16


def test_a_layout_warns_only_of_a_family_the_model_lacks_and_fails_when_it_has_none():
    strategy = Strategy(name="l", layout={"formats": {"mlp": "fp8", "routed_experts": "fp8"}, "kv_cache": "bf16",
                                          "keep_last": 1})
    model = quantized(strategy.model_dump(), [])
    layers = quantize.layer_formats(model)
    assert layers["model.layers.0.mlp.down_proj"] == "fp8" and layers["model.layers.0.self_attn.q_proj"] == "bfloat16"
    assert all(f == "bfloat16" for name, f in layers.items() if name.startswith("model.layers.1."))
    warnings = quantize.unmatched_patterns(model, strategy, [])
    assert len(warnings) == 1 and "no module of routed_experts" in warnings[0], warnings
    with pytest.raises(SystemExit, match=r"layout: routed_experts nvfp4; KV fp8.* names no family"):
        quantized({"name": "e", "layout": {"formats": {"routed_experts": "nvfp4"}}}, [])
