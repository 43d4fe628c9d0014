"""A layout strategy (a format per module family) compiled to ModelOpt quant_cfg entries
(runner/quantization/layout.py): which quantizer gets which format on the demo model's real module names,
the kept layers, what the host predicts, and a real ModelOpt quantize + export + verify on the CPU whose
formats equal the prediction layer by layer."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import DEMO, REPO, recipe, record
from runner.quantization import Unknown, footprint
from runner.quantization.exclusions import DEFAULT_DISABLED
from runner.quantization.layout import describe_layout, kept_layers, layout_config, num_hidden_layers
from runner.quantization.modelopt_config import QuantConfig, module_formats, preset_config, quantizer_cfg
from runner.quantization.modelopt_recipes import recipes_root
from runner.quantization.preflight import strategy_refusal
from runner.quantization.weights import load_weights
from runner.recipe.schema import LayoutSpec, Strategy

SHAPES = REPO / "recipes" / "models" / "smollm2-135m-instruct"  # SmolLM2-135M: 30 layers, tied lm_head
LAYERS = 30

pytestmark = pytest.mark.skipif(recipes_root() is None, reason="modelopt_recipes is not installed")


@pytest.fixture(scope="module")
def weights():
    return load_weights(SHAPES)


def formats_of(weights, **layout) -> dict[str, str | None]:
    return module_formats(layout_config(LayoutSpec(**layout), LAYERS), list(weights.linears))


def test_the_shapes_say_how_many_layers(weights):
    assert weights.num_layers == LAYERS
    assert num_hidden_layers({"text_config": {"num_hidden_layers": 40}}) == 40  # a VL model's language model
    assert num_hidden_layers({}, ["model.layers.0.mlp.up_proj", "model.layers.11.mlp.up_proj"]) == 12
    with pytest.raises(ValueError):
        num_hidden_layers({}, ["lm_head"])


def test_each_family_gets_its_format_and_the_rest_stays_bf16(weights):
    formats = formats_of(weights, formats={"mlp": "w4a16_nvfp4", "attention": "fp8"})
    assert formats["model.layers.3.mlp.down_proj"] == "w4a16_nvfp4"
    assert formats["model.layers.3.mlp.gate_proj"] == "w4a16_nvfp4"
    assert formats["model.layers.3.self_attn.k_proj"] == "fp8"
    assert formats["lm_head"] is None  # not named, and DEFAULT_DISABLED besides
    assert sum(f == "fp8" for f in formats.values()) == LAYERS * 4
    assert sum(f == "w4a16_nvfp4" for f in formats.values()) == LAYERS * 3
    # A family not named stays BF16; a format of the family's own
    only_mlp = formats_of(weights, formats={"mlp": "nvfp4"})
    assert only_mlp["model.layers.3.self_attn.q_proj"] is None
    assert only_mlp["model.layers.3.mlp.up_proj"] == "nvfp4"
    bf16_named = formats_of(weights, formats={"mlp": "nvfp4", "attention": "bf16"})
    assert bf16_named == only_mlp


def test_each_format_reads_its_presets_cfg():
    layout = LayoutSpec(formats={"mlp": "nvfp4", "attention": "w4a16_nvfp4", "lm_head": "fp8"}, kv_cache="bf16")
    config = layout_config(layout, LAYERS)
    nvfp4 = preset_config("NVFP4_DEFAULT_CFG")
    mlp, attn = "model.layers.4.mlp.up_proj", "model.layers.4.self_attn.o_proj"
    for q in ("weight_quantizer", "input_quantizer"):
        assert quantizer_cfg(config, f"{mlp}.{q}") == quantizer_cfg(nvfp4, f"{mlp}.{q}")
    assert quantizer_cfg(config, f"{attn}.weight_quantizer") == quantizer_cfg(nvfp4, f"{attn}.weight_quantizer")
    assert quantizer_cfg(config, f"{attn}.input_quantizer") is None  # W4A16: activations stay BF16
    # lm_head is a family: naming it overrides the default `*lm_head*` disable, and only that one
    assert quantizer_cfg(config, "lm_head.weight_quantizer") == {"num_bits": (4, 3), "axis": None}
    assert {"quantizer_name": "*router*", "enable": False} in config.entries
    # no KV cache quantizer without kv_cache: fp8
    assert quantizer_cfg(config, "model.layers.4.self_attn.k_bmm_quantizer") is None


def test_kv_cache_fp8_comes_from_fp8_kv_cfg():
    config = layout_config(LayoutSpec(formats={"mlp": "nvfp4"}, kv_cache="fp8"), LAYERS)
    assert quantizer_cfg(config, "model.layers.4.self_attn.k_bmm_quantizer") == {"num_bits": (4, 3), "axis": None}
    assert quantizer_cfg(config, "model.layers.4.self_attn.v_bmm_quantizer") == {"num_bits": (4, 3), "axis": None}
    assert config.entries[0] == {"quantizer_name": "*", "enable": False}
    assert sum(e == {"quantizer_name": "*", "enable": False} for e in config.entries) == 1


def test_default_disabled_stays_unquantized_whatever_the_layout():
    config = layout_config(LayoutSpec(formats={f: "nvfp4" for f in ("routed_experts", "shared_experts", "mlp",
                                                                     "linear_attention", "attention")}), LAYERS)
    for module in ("model.layers.2.mlp.gate", "model.layers.2.mlp.shared_expert_gate", "model.visual.blocks.0.qkv",
                   "model.layers.2.linear_attn.in_proj_a", "model.layers.2.linear_attn.in_proj_b",
                   "model.layers.2.linear_attn.in_proj_ba", "mtp.layers.0.mlp.up_proj", "lm_head"):
        assert quantizer_cfg(config, f"{module}.weight_quantizer") is None, module
    assert quantizer_cfg(config, "model.layers.2.linear_attn.in_proj_qkvz.weight_quantizer") is not None
    assert quantizer_cfg(config, "model.layers.2.mlp.experts.7.down_proj.weight_quantizer") is not None
    assert quantizer_cfg(config, "model.layers.2.mlp.experts.gate_up_proj_weight_quantizer") is not None  # fused
    disables = {e["quantizer_name"] for e in config.entries if e.get("enable") is False}
    assert all((g if g.endswith("*") else f"{g}.*") in disables for g in DEFAULT_DISABLED)


def test_keep_first_last_and_layers_and_layer_1_is_not_layer_10(weights):
    formats = formats_of(weights, formats={"mlp": "nvfp4", "attention": "fp8"}, keep_first=2, keep_last=1,
                         keep_layers=[1, 15])
    kept = {int(m.split(".")[2]) for m, f in formats.items() if m.startswith("model.layers.") and f is None}
    assert kept == {0, 1, 15, 29}
    assert formats["model.layers.10.mlp.up_proj"] == "nvfp4"  # layers.1 kept, layers.10 not
    assert formats["model.layers.19.self_attn.q_proj"] == "fp8"
    assert kept_layers(LayoutSpec(formats={"mlp": "fp8"}, keep_first=20, keep_last=20), LAYERS) == list(range(30))
    with pytest.raises(Unknown, match="beyond this model's 30 decoder layers"):
        layout_config(LayoutSpec(formats={"mlp": "fp8"}, keep_layers=[30]), LAYERS)


def test_described_in_words():
    layout = LayoutSpec(formats={"attention": "fp8", "routed_experts": "w4a16_nvfp4", "mlp": "bf16"},
                        keep_first=1, keep_last=1, keep_layers=[5, 6, 7])
    assert describe_layout(layout, 32) == ("layout: routed_experts w4a16_nvfp4, attention fp8; KV fp8; "
                                           "layers 0, 5-7, 31 BF16")
    assert describe_layout(layout) == ("layout: routed_experts w4a16_nvfp4, attention fp8; KV fp8; first 1 layers, "
                                       "last 1 layers, layers 5-7 BF16")


def test_the_footprint_predicts_a_layout_as_it_does_a_preset(weights):
    strategy = Strategy(name="mixed", layout={"formats": {"mlp": "w4a16_nvfp4", "attention": "fp8"}, "keep_last": 1})
    fp = footprint.strategy_footprint(weights, strategy, [], None, "bfloat16")
    assert fp.known, fp.reason
    assert fp.method == "layout: mlp w4a16_nvfp4, attention fp8; KV fp8; layers 29 BF16"
    assert fp.formats == {"bfloat16": 8, "fp8": 29 * 4, "w4a16_nvfp4": 29 * 3}
    # the same formats as a preset gives where they agree: everything FP8 either way
    everything = Strategy(name="all", layout={"formats": {"mlp": "fp8", "attention": "fp8"}, "kv_cache": "bf16"})
    preset = Strategy(name="p", preset="FP8_DEFAULT_CFG")
    a, b = (footprint.strategy_footprint(weights, s, [], None, "bfloat16") for s in (everything, preset))
    assert (a.formats, a.checkpoint_bytes, a.effective_bits) == (b.formats, b.checkpoint_bytes, b.effective_bits)
    # two layouts differing only in kept layers are two predictions (the memo keys on the layout)
    other = Strategy(name="o", layout={"formats": {"mlp": "w4a16_nvfp4", "attention": "fp8"}, "keep_last": 2})
    assert footprint.strategy_footprint(weights, other, [], None, "bfloat16").formats["bfloat16"] == 15


def test_preflight_names_a_kept_layer_the_model_lacks_and_a_family_it_lacks(weights):
    beyond = Strategy(name="far", layout={"formats": {"mlp": "fp8"}, "keep_layers": [31]})
    why = strategy_refusal(beyond, [], SHAPES, check_machine=False, weights=weights)
    assert why is not None and "keep_layers [31]" in why and "30 decoder layers" in why
    experts = Strategy(name="moe", layout={"formats": {"routed_experts": "nvfp4"}})
    why = strategy_refusal(experts, [], SHAPES, check_machine=False, weights=weights)
    assert why is not None and "would quantize no layer" in why and "routed_experts nvfp4" in why
    fine = Strategy(name="ok", layout={"formats": {"mlp": "nvfp4"}})
    assert strategy_refusal(fine, [], SHAPES, check_machine=False, weights=weights) is None


def test_the_worker_compiles_the_same_entries_from_modelopts_own_presets():
    pytest.importorskip("modelopt")
    from runner.worker.quantize import build_config

    strategy = Strategy(name="s", layout={"formats": {"mlp": "w4a16_nvfp4", "attention": "fp8", "lm_head": "nvfp4"},
                                          "keep_first": 1, "keep_layers": [10]}, algorithm="max")
    config = build_config(strategy, ["*layers.3.*"], LAYERS)
    host = layout_config(strategy.layout, LAYERS).with_exclusions(["*layers.3.*"])
    assert config["algorithm"] == "max"
    worker = QuantConfig("worker", config["quant_cfg"])
    names = [f"model.layers.{i}.{m}.{q}" for i in (0, 1, 3, 10, 29)
             for m in ("mlp.up_proj", "self_attn.q_proj", "self_attn.k_bmm_quantizer")
             for q in ("weight_quantizer", "input_quantizer")] + ["lm_head.weight_quantizer", "lm_head.input_quantizer"]
    for name in names:
        assert _plain(quantizer_cfg(worker, name)) == _plain(quantizer_cfg(host, name)), name


def _plain(cfg):
    """A cfg with tuples and lists alike (ModelOpt's dicts and the YAML's may differ in which they use)."""
    if isinstance(cfg, dict):
        return {str(k): _plain(v) for k, v in cfg.items()}
    if isinstance(cfg, (list, tuple)):
        return [_plain(v) for v in cfg]
    return cfg


E2E = """
extends: {demo}
calibration:
  samples: 4
  max_length: 128
  held_out: 2  # the fidelity forward through fake-quant layers is what costs time on a CPU
quantization:
  strategies:
    - name: mixed
      layout: {{formats: {{mlp: w4a16_nvfp4, attention: fp8}}, kv_cache: fp8, keep_last: 1}}
      inherit_exclude: false  # not the demo's layers 0 and 29: keep_last alone keeps 29
"""


@pytest.mark.slow
def test_a_layout_quantizes_exports_and_verifies_as_predicted(tmp_path: Path, weights):
    """SmolLM2-135M through source, calibrate, quantize (real ModelOpt, CPU), export and verify."""
    pytest.importorskip("modelopt")
    path = tmp_path / "layout.yaml"
    path.write_text(E2E.format(demo=DEMO), encoding="utf-8")
    run_dir = tmp_path / "run"
    result = recipe("run", str(path), "--until", "verify", "--strategy", "mixed", "--run-dir", str(run_dir))
    assert result.returncode == 0, result.stderr[-4000:]
    summary = record(run_dir, "quantize.mixed")["summary"]
    assert summary["warnings"] == []  # the globs of other architectures' names are no news
    assert summary["method"] == "layout: mlp w4a16_nvfp4, attention fp8; KV fp8; layers 29 BF16"
    strategy = Strategy(name="mixed", layout={"formats": {"mlp": "w4a16_nvfp4", "attention": "fp8"}, "keep_last": 1})
    predicted = footprint.strategy_formats(weights, layout_config(strategy.layout, LAYERS), [])
    layers = summary["layers"]
    assert set(layers) == {f"{m}.weight" for m in predicted} or set(layers) == set(predicted)
    for module, fmt in predicted.items():
        got = layers.get(module, layers.get(f"{module}.weight"))
        assert got == (fmt or "bfloat16"), (module, got, fmt)
    fp = footprint.strategy_footprint(weights, strategy, [], None, "bfloat16")
    assert summary["formats"] == fp.formats
    verify = record(run_dir, "verify.mixed")["summary"]
    assert all(status in ("pass", "warn") for name, status in verify["checks"].items() if name != "vllm_load"), \
        verify["checks"]
