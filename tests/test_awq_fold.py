"""Folding AWQ scales: exact where the structure allows, a plain NVFP4 export that verifies for vLLM.

A tiny random Qwen3.5 whose full-attention layer is quantized: 4 query heads over 2 KV heads, so
o_proj's scales must be averaged per KV head to fold into v_proj; norms compute x * (1 + w).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import REPO, build_tiny_qwen35, recipe, recipe_cli_env, record

pytest.importorskip("modelopt")
pytestmark = pytest.mark.slow
LAYER_TYPES = ["linear_attention", "full_attention", "linear_attention", "full_attention"]
EXCLUDE = ["*linear_attn*", "*layers.0.*", "*layers.3.*", "*embed_tokens*"]
GQA_RECIPE = REPO / "tests" / "recipes" / "tiny-qwen35-gqa.yaml"


@pytest.fixture(scope="module")
def tiny_gqa(demo_tokenizer, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tiny-gqa") / "model"
    build_tiny_qwen35(folder, demo_tokenizer, LAYER_TYPES)
    return folder


def _quantizers(model):
    return [m for m in model.modules() if hasattr(m, "disable") and hasattr(m, "is_enabled")]


def _awq_quantized(tiny_gqa: Path):
    """The tiny model after AWQ-lite, its calibration set, and W·x as a function (quantizers off)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from runner.worker.calib_data import load_calibration
    from runner.worker.quantize import quantize_model

    tokenizer = AutoTokenizer.from_pretrained(tiny_gqa)
    model = AutoModelForCausalLM.from_pretrained(tiny_gqa, dtype=torch.bfloat16).eval()
    calib = load_calibration(REPO / "recipes" / "demo" / "calibration.jsonl", tokenizer, 8, 128, 0, held_out=4)
    quantize_model(model, calib, {"name": "awq", "preset": "NVFP4_AWQ_LITE_CFG", "batch_size": 4}, EXCLUDE,
                   torch.device("cpu"))
    batch = calib.held_out_batches(4, torch.device("cpu"))[0]

    def logprobs_unquantized():
        states = [q.is_enabled for q in _quantizers(model)]
        for q in _quantizers(model):
            q.disable()
        with torch.no_grad():
            out = model(**batch, use_cache=False).logits.float().log_softmax(-1)[batch["attention_mask"].bool()]
        for q, on in zip(_quantizers(model), states, strict=True):
            if on:
                q.enable()
        return out

    probe = {k: v[:1, :32] for k, v in calib.batches(1, torch.device("cpu"))[0].items()}
    return model, probe, logprobs_unquantized


def test_fold_keeps_the_unquantized_function_and_says_what_it_did(tiny_gqa):
    """With quantizers off, the model computes W x before and after: every fold is exact arithmetic."""
    from runner.worker.awq_fold import fold_awq_scales, has_scale
    from runner.worker.quantize import calibration_kwargs

    model, probe, logprobs_unquantized = _awq_quantized(tiny_gqa)
    before = logprobs_unquantized()
    smoothed = sorted(n for n, m in model.named_modules() if has_scale(m))
    assert "model.layers.1.self_attn.o_proj" in smoothed and "model.layers.2.mlp.down_proj" in smoothed
    records = {r["layer"]: r for r in fold_awq_scales(model, probe, calibration_kwargs(model))}
    after = logprobs_unquantized()

    assert sorted(records) == smoothed and not any(has_scale(m) for m in model.modules())
    # The structure was read from the model, not from class names:
    for proj in ("q_proj", "k_proj", "v_proj"):
        assert records[f"model.layers.1.self_attn.{proj}"]["into"] == "model.layers.1.input_layernorm"
    o_proj = records["model.layers.1.self_attn.o_proj"]
    assert o_proj["action"] == "averaged" and o_proj["into"] == "model.layers.1.self_attn.v_proj"
    assert "2 input channels per" in o_proj["note"]  # 4 query heads share 2 KV heads
    for layer in (1, 2):
        assert records[f"model.layers.{layer}.mlp.down_proj"] == {
            "layer": f"model.layers.{layer}.mlp.down_proj", "action": "folded_linear",
            "into": f"model.layers.{layer}.mlp.up_proj"}
        assert records[f"model.layers.{layer}.mlp.up_proj"]["into"] == f"model.layers.{layer}.post_attention_layernorm"
    # Exact up to bf16 rounding of the rescaled weights (a norm folded as x * w instead of
    # x * (1 + w), or a wrong head mapping, moves these by whole units).
    assert float((before - after).abs().max()) < 0.05
    assert float((before.argmax(-1) == after.argmax(-1)).float().mean()) > 0.97


def test_raw_mode_folds_only_into_norms_and_right_for_one_plus_w_norms(tiny_gqa):
    """ModelOpt's export would fold Qwen3.5's x * (1 + w) norms as x * w; the raw mode does it first, right."""
    from runner.worker.awq_fold import fold_awq_scales, has_scale
    from runner.worker.quantize import calibration_kwargs

    model, probe, logprobs_unquantized = _awq_quantized(tiny_gqa)
    before = logprobs_unquantized()
    records = fold_awq_scales(model, probe, calibration_kwargs(model), norms_only=True)
    after = logprobs_unquantized()
    assert {r["action"] for r in records} <= {"folded_norm", "averaged"}
    assert all(r["into"].endswith("layernorm") for r in records)
    kept = sorted(n for n, m in model.named_modules() if has_scale(m))
    assert kept == ["model.layers.1.mlp.down_proj", "model.layers.1.self_attn.o_proj", "model.layers.2.mlp.down_proj"]
    assert all(getattr(model.get_submodule(r["layer"]), "fused_with_prequant", False) for r in records)
    assert float((before - after).abs().max()) < 0.05


def test_awq_lite_exports_plain_nvfp4_that_verifies_for_vllm_and_a_mixed_export_verifies(tiny_gqa, tmp_path):
    env = recipe_cli_env() | {"TINY_QWEN35_DIR": str(tiny_gqa)}
    run_dir = tmp_path / "run"
    result = recipe("run", str(GQA_RECIPE), "--until", "verify", "--strategy", "awq_lite", "--strategy", "auto_mixed",
                    "--run-dir", str(run_dir), env=env)
    assert result.returncode == 0, result.stderr + "".join(
        p.read_text()[-3000:] for p in (run_dir / "logs").glob("*.log"))

    fold = record(run_dir, "quantize.awq_lite")["summary"]["awq_fold"]
    assert fold["layers"] == len(fold["per_layer"]) > 0 and sum(fold["actions"].values()) == fold["layers"]
    assert "held-out conversations" in fold["cost"]["measured_on"] and fold["cost"]["tokens"] > 0
    assert fold["cost"]["kl"] >= 0 and 0 <= fold["cost"]["top1_agreement"] <= 1
    assert fold["cost"]["kl_to_source_before"] >= 0 and fold["cost"]["kl_to_source_after"] >= 0
    fidelity = record(run_dir, "quantize.awq_lite")["summary"]["fidelity"]
    assert fidelity["kl"] == fold["cost"]["kl_to_source_after"] and "held-out conversations" in fidelity["measured_on"]
    verify = record(run_dir, "verify.awq_lite")["summary"]
    assert verify["quant_algo"] == "NVFP4"
    assert verify["checks"]["pre_quant_scale"] == "pass" and verify["checks"]["quant_algo_supported"] == "pass"
    assert verify["checks"]["weights_decode"] == "pass", verify  # per-channel factors allowed for, codes exact
    checkpoint = run_dir / "steps" / "export.awq_lite" / "checkpoint"
    quant = json.loads((checkpoint / "hf_quant_config.json").read_text())["quantization"]
    assert quant["quant_algo"] == "NVFP4"
    from safetensors import safe_open

    with safe_open(checkpoint / "model.safetensors", framework="pt") as fh:
        assert not [k for k in fh.keys() if k.endswith("pre_quant_scale")]  # noqa: SIM118

    mixed = record(run_dir, "verify.auto_mixed")["summary"]
    assert mixed["quant_algo"] == "MIXED_PRECISION", mixed
    assert mixed["checks"]["mixed_layers"] == "pass" and mixed["checks"]["hf_quant_config"] == "pass"
    formats = record(run_dir, "quantize.auto_mixed")["summary"]["formats"]
    assert formats.get("nvfp4", 0) > 0 and formats.get("fp8", 0) > 0  # FP8 alone cannot reach the target


def test_raw_awq_export_is_kept_on_request_and_refused_for_vllm(tiny_gqa, tmp_path):
    env = recipe_cli_env() | {"TINY_QWEN35_DIR": str(tiny_gqa)}
    run_dir = tmp_path / "run"
    result = recipe("run", str(GQA_RECIPE), "--until", "verify", "--strategy", "awq_raw", "--run-dir", str(run_dir),
                    env=env)
    assert result.returncode == 1
    fold = record(run_dir, "quantize.awq_raw")["summary"]["awq_fold"]
    assert fold["mode"] == "norms_only" and fold["kept_scales"] > 0  # o_proj, down_proj keep theirs
    assert set(fold["actions"]) <= {"folded_norm", "averaged"}
    failed = json.loads((run_dir / "logs" / "verify.awq_raw.failed.json").read_text())["error"]
    assert "pre_quant_scale tensors" in failed and "NVFP4_AWQ is NOT loadable by the vllm engine" in failed
