"""What a strategy will weigh, from header-only checkpoints (no torch): formats, effective bits, size,
decode speed, and the effective-bits range auto_quantize can reach (ModelOpt's own count)."""

from __future__ import annotations

import json
import re
import subprocess

import pytest
from header_checkpoint import qwen35_9b, write_checkpoint

from conftest import PYTHON, REPO, flagship_here, recipe, recipe_cli_env
from runner.benchmark.prediction import hardware_target
from runner.quantization import footprint, modelopt_config
from runner.quantization.bits import BITS, effective_bits, logical_numel
from runner.quantization.exclusions import DEFAULT_DISABLED
from runner.quantization.modelopt_recipes import recipes_root
from runner.quantization.weights import load_weights
from runner.recipe.resources import hardware_targets
from runner.recipe.schema import AutoQuantizeSpec, Strategy

PLAN_EXCLUDE = ["*linear_attn*", "*layers.0.*", "*layers.31.*", "*embed_tokens*"]


def tiny(folder, tied=False, shards=1, extra=None):
    """Two decoder layers (q/o attention, up/down MLP), hidden 64, vocabulary 256, bf16 (and `extra` tensors)."""
    t = {"model.embed_tokens.weight": ("BF16", [256, 64]), "model.norm.weight": ("BF16", [64])}
    for i in range(2):
        p = f"model.layers.{i}."
        t |= {p + "self_attn.q_proj.weight": ("BF16", [64, 64]), p + "self_attn.o_proj.weight": ("BF16", [64, 64]),
              p + "mlp.up_proj.weight": ("BF16", [128, 64]), p + "mlp.down_proj.weight": ("BF16", [64, 128]),
              p + "input_layernorm.weight": ("BF16", [64])}
    if not tied:
        t["lm_head.weight"] = ("BF16", [256, 64])
    t |= extra or {}
    return write_checkpoint(folder, t, {"architectures": ["LlamaForCausalLM"], "tie_word_embeddings": tied},
                            shards=shards)


# Linear weights: per layer 2 x 4096 (q, o) + 2 x 8192 (up, down) = 24576; two layers 49152; lm_head 16384.
LINEAR = 65536
ALL_BF16_BYTES = 2 * (16384 + LINEAR + 3 * 64)  # embedding, Linears, norms


def fp_of(folder, exclude=(), hardware="cpu", **strategy):
    weights = load_weights(folder)
    return footprint.strategy_footprint(weights, Strategy(name="s", **strategy), list(exclude),
                                        hardware_target(hardware) if hardware else None, "bfloat16")


@pytest.fixture(params=["modelopt_recipes", "preset family"])
def source(request, monkeypatch):
    """Every preset test runs on ModelOpt's YAML and on the family fallback (no ModelOpt on the host)."""
    if request.param == "modelopt_recipes":
        if recipes_root() is None:
            pytest.skip("modelopt_recipes is not installed")
    else:
        monkeypatch.setattr(footprint, "recipes_root", lambda: None)
    return request.param


def test_nvfp4_with_an_exclusion_by_hand(tmp_path, source):
    fp = fp_of(tiny(tmp_path / "m"), exclude=["*layers.1.*"], preset="NVFP4_DEFAULT_CFG")
    # layer 0's four Linears NVFP4 (24576 weights at 4.5); layer 1 and lm_head (ModelOpt's default
    # exclusion) bf16 (40960 at 16)
    assert fp.effective_bits == round((24576 * 4.5 + 40960 * 16) / LINEAR, 3) == 11.688
    assert fp.formats == {"bfloat16": 5, "nvfp4": 4}
    # 24576 weights at 4.5 bits = 13824 bytes, plus weight_scale_2 and input_scale (fp32) per Linear
    assert fp.checkpoint_bytes == ALL_BF16_BYTES - 2 * 24576 + 13824 + 4 * 8
    # decode reads everything but the embedding (the head is not tied): the bandwidth model of prediction.py
    bandwidth = hardware_targets()["cpu"]["memory_bandwidth_gbs"] * 1e9
    assert fp.decode_tok_s == round(bandwidth / (fp.checkpoint_bytes - 2 * 16384), 2)


def test_fp8_and_mlp_only_and_w4a16_by_hand(tmp_path, source):
    folder = tiny(tmp_path / "m")
    fp8 = fp_of(folder, preset="FP8_DEFAULT_CFG")
    assert fp8.effective_bits == (49152 * 8 + 16384 * 16) / LINEAR == 10.0
    assert fp8.checkpoint_bytes == ALL_BF16_BYTES - 49152 + 8 * 8
    mlp = fp_of(folder, preset="NVFP4_MLP_ONLY_CFG", algorithm="awq_lite")
    assert mlp.formats == {"bfloat16": 5, "nvfp4": 4}
    assert mlp.effective_bits == (32768 * 4.5 + 32768 * 16) / LINEAR == 10.25
    w4a16 = fp_of(folder, preset="W4A16_NVFP4_CFG")
    assert w4a16.formats == {"bfloat16": 1, "w4a16_nvfp4": 8}
    assert w4a16.checkpoint_bytes == ALL_BF16_BYTES - 2 * 49152 + 49152 * 9 // 16 + 8 * 4


def test_sharded_and_single_file_agree_and_a_tied_head_counts_in_bits_not_bytes(tmp_path, source):
    one = fp_of(tiny(tmp_path / "one"), preset="NVFP4_DEFAULT_CFG")
    three = fp_of(tiny(tmp_path / "three", shards=3), preset="NVFP4_DEFAULT_CFG")
    assert (one.checkpoint_bytes, one.effective_bits) == (three.checkpoint_bytes, three.effective_bits)
    tied = fp_of(tiny(tmp_path / "tied", tied=True), preset="NVFP4_DEFAULT_CFG")
    assert tied.effective_bits == one.effective_bits  # lm_head counted with the embedding's shape, bf16
    assert tied.checkpoint_bytes == one.checkpoint_bytes - 2 * 16384  # stored once, as the embedding


def test_auto_quantize_range_counts_as_modelopt_does(tmp_path):
    t = {"model.embed_tokens.weight": ("BF16", [256, 64]), "lm_head.weight": ("BF16", [256, 64])}
    p = "model.layers.0."
    t |= {p + f"self_attn.{n}_proj.weight": ("BF16", [64, 64]) for n in "qkv"}
    t |= {p + "mlp.gate_proj.weight": ("BF16", [128, 64]), p + "mlp.up_proj.weight": ("BF16", [128, 64]),
          p + "mlp.down_proj.weight": ("BF16", [64, 128])}
    weights = load_weights(write_checkpoint(tmp_path / "m", t, {}))
    spec = AutoQuantizeSpec(effective_bits=11, formats=["NVFP4_DEFAULT_CFG", "FP8_DEFAULT_CFG"])
    rng = footprint.auto_range(weights, spec, ["*k_proj*"])
    # excluding k_proj disables its whole q/k/v group (12288) and lm_head is disabled (16384): 28672
    # weights at 16 bits; gate/up/down (24576) at NVFP4's 4.5 or FP8's 8; embeddings not counted
    assert rng.modelopt_min == pytest.approx((28672 * 16 + 24576 * 4.5) / 53248)  # 10.692
    assert rng.modelopt_max == pytest.approx((28672 * 16 + 24576 * 8) / 53248)  # 12.308
    assert (rng.quantizable, rng.disabled) == (3, 4) and rng.feasible
    assert not footprint.auto_range(weights, AutoQuantizeSpec(effective_bits=4.8), ["*k_proj*"]).feasible


def test_qwen35_9b_shape_reproduces_modelopt_and_the_measured_exports(tmp_path):
    weights = load_weights(qwen35_9b(tmp_path / "q9b"))
    assert sum(t.numel for t in weights.tensors.values()) == 8_953_803_264
    rng = footprint.auto_range(weights, AutoQuantizeSpec(effective_bits=4.8), PLAN_EXCLUDE)
    # ModelOpt 0.47 at this shape and these exclusions: "The effective_bits target 4.8 is infeasible
    # ... The minimum achievable effective bits is 8.8406."
    assert f"{rng.modelopt_min:.4f}" == "8.8406" and not rng.feasible
    assert f"{rng.modelopt_max:.4f}" == "11.0195"
    # measured exports at this shape: awq_lite 10.8 GB, mlp_only 11.4 GB
    awq = footprint.strategy_footprint(weights, Strategy(name="a", preset="NVFP4_AWQ_LITE_CFG"), PLAN_EXCLUDE,
                                       hardware_target("dgx-spark-gb10"), "bfloat16")
    mlp = footprint.strategy_footprint(weights, Strategy(name="m", preset="NVFP4_MLP_ONLY_CFG", algorithm="awq_lite"),
                                       PLAN_EXCLUDE, hardware_target("dgx-spark-gb10"), "bfloat16")
    assert round(awq.checkpoint_bytes / 1e9, 1) == 10.8 and round(mlp.checkpoint_bytes / 1e9, 1) == 11.4
    assert (awq.effective_bits, mlp.effective_bits) == (8.84, 9.436)
    assert awq.formats["nvfp4"] == 90 + 28 and mlp.formats["nvfp4"] == 90  # layers 1..30
    assert 30 < awq.decode_tok_s < 32 and 28 < mlp.decode_tok_s < 30


def nine_b_recipe(write, tmp_path, target=None):
    """The shipped plan with its model folder a header-only 9B checkpoint (and another target, if given)."""
    qwen35_9b(tmp_path / "models" / "Qwen3.5-9B-Opus-Distilled-BF16")
    text = "name: q9b\n"
    if target is not None:
        text += f"""quantization:
          strategies:
            - name: auto_mixed
              auto_quantize:
                effective_bits: {target}
        """
    return flagship_here(write, tmp_path, text, name="q9b.yaml")


def test_validate_refuses_an_unreachable_target_naming_file_line_and_both_bounds(write, tmp_path):
    path = nine_b_recipe(write, tmp_path, 4.8)
    result = recipe("validate", str(path))
    assert result.returncode == 2
    assert f"{path}:13:" in result.stderr and "auto_quantize.effective_bits" in result.stderr
    assert "8.8406" in result.stderr and "11.0195" in result.stderr
    assert "lm_head included" in result.stderr  # the definition travels with the numbers
    plan = recipe("plan", str(path), "--run-dir", str(tmp_path / "run"), "--json")
    assert plan.returncode == 2 and "8.8406" in json.loads(plan.stdout)["problems"][0]


def test_the_shipped_target_is_reachable_and_plan_shows_the_predictions(write, tmp_path):
    path = nine_b_recipe(write, tmp_path)
    ok = recipe("validate", str(path))
    assert ok.returncode == 0, ok.stderr
    assert "auto_mixed: effective_bits 9.4 is reachable (8.8406 to 11.0195" in ok.stdout
    text = recipe("plan", str(path), "--run-dir", str(tmp_path / "run"), env=recipe_cli_env() | {"COLUMNS": "300"})
    assert text.returncode == 0, text.stderr
    for column in ("checkpoint GB", "effective bits", "decode tok/s", "predicted footprint on dgx-spark-gb10"):
        assert column in text.stdout
    assert re.search(r"awq_lite .* 10\.8 .* 8\.84 .* 31\.1", text.stdout)
    data = json.loads(recipe("plan", str(path), "--run-dir", str(tmp_path / "run"), "--json").stdout)
    fp = data["footprint"]
    assert fp["awq_lite"]["size_gb"] == 10.81 and fp["mlp_only"]["size_gb"] == 11.4
    auto = fp["auto_mixed"]["auto_quantize"]
    assert auto["feasible"] and auto["modelopt_min_bits"] == 8.8406 and fp["auto_mixed"]["size_gb"] <= 11.4
    assert data["footprint_info"]["source"]["size_gb"] == 17.91
    assert "lm_head included" in data["footprint_info"]["effective_bits"]


def test_plan_says_unknown_until_the_source_exists(write, tmp_path):
    # Without model.shapes (the shipped recipe has them: next test) nothing can be read before the source step.
    path = flagship_here(write, tmp_path, """
        model: {shapes: null, source: {kind: huggingface, repo: someone/Qwen3.5-9B, revision: abc}}
        """, name="no-shapes.yaml")
    result = recipe("plan", str(path), "--run-dir", str(tmp_path / "run"))
    assert result.returncode == 0, result.stderr
    assert footprint.UNKNOWN_UNTIL_SOURCE in result.stdout


def test_plan_reads_the_model_the_source_step_produced(write, tmp_path):
    # a Hub source is not on disk until the source step has run; then its output folder is read
    path = flagship_here(write, tmp_path, """
        name: hub
        model:
          source: {kind: huggingface, repo: someone/Qwen3.5-9B, revision: abc}
        """, name="hub.yaml")
    run_dir = tmp_path / "run"
    before = recipe("plan", str(path), "--run-dir", str(run_dir), "--json")
    # Before: the recipe's model.shapes (the 9B shape's config and tensor listing, no weights). Qwen/Qwen3.5-9B's
    # checkpoint holds a vision tower and an MTP head (699,301,104 parameters) that the recipe's carry_tensors
    # fix-ups carry in BF16: 10.81 + 1.40 GB.
    assert json.loads(before.stdout)["footprint_info"]["read_from"].startswith("model.shapes")
    assert json.loads(before.stdout)["footprint"]["awq_lite"]["size_gb"] == 12.2
    key = next(s["key"] for s in json.loads(before.stdout)["steps"] if s["step"] == "source")
    model = qwen35_9b(tmp_path / "hf-cache" / "snapshot")
    (run_dir / "steps" / "source").mkdir(parents=True)
    (run_dir / "steps" / "source" / "record.json").write_text(json.dumps(
        {"status": "complete", "key": key, "outputs": {"model_dir": str(model)}}))
    after = json.loads(recipe("plan", str(path), "--run-dir", str(run_dir), "--json").stdout)
    assert "the run's source step" in after["footprint_info"]["read_from"]
    assert after["footprint"]["awq_lite"]["size_gb"] == 10.81  # the header checkpoint has neither: nothing carried


def without_carry(recipe_, keep=()):
    """The recipe with its carry_tensors fix-ups removed (but those whose patterns are in `keep`)."""
    fixups = [f for f in recipe_.export.fixups if f.op != "carry_tensors" or set(f.match) <= set(keep)]
    return recipe_.model_copy(update={"export": recipe_.export.model_copy(update={"fixups": fixups})})


def test_carried_tensors_add_their_bf16_bytes_to_the_prediction_and_nothing_to_decode():
    """qwen35-35b-a3b's export carries the source's vision tower and MTP head (dropped by the causal-LM load)
    in BF16: every strategy's predicted size rises by exactly their parameters x 2 bytes against the same
    recipe without the carry_tensors fix-ups; decode speed and effective bits do not move (neither is read
    per generated token, neither is a Linear of the quantized model); a tensor not carried stays out."""
    from runner.recipe.loader import load_recipe

    shipped = load_recipe(REPO / "recipes" / "qwen35-35b-a3b.yaml", env={}).recipe
    weights = load_weights(shipped.model.shapes)
    vision, mtp = 446_571_248, 844_640_768  # recipes/models/README.md's published split
    assert sum(t.numel for n, t in weights.dropped.items() if n.startswith("model.visual.")) == vision
    assert sum(t.numel for n, t in weights.dropped.items() if n.startswith("mtp.")) == mtp
    hardware = hardware_target("dgx-spark-gb10")
    carried = footprint.recipe_footprints(shipped, weights, hardware)
    bare = footprint.recipe_footprints(without_carry(shipped), weights, hardware)
    mtp_only = footprint.recipe_footprints(without_carry(shipped, keep=["mtp.*"]), weights, hardware)
    assert [f.strategy for f in carried] == [f.strategy for f in bare] and len(carried) >= 3
    for with_, without, only in zip(carried, bare, mtp_only, strict=True):
        assert with_.known and with_.checkpoint_bytes - without.checkpoint_bytes == (vision + mtp) * 2
        assert only.checkpoint_bytes - without.checkpoint_bytes == mtp * 2  # the vision tower left out
        assert with_.decode_tok_s == without.decode_tok_s == only.decode_tok_s
        assert with_.effective_bits == without.effective_bits


def test_carried_tensors_from_safetensors_headers(tmp_path, source):
    """A real model folder: the dropped-on-load tensors the carry patterns name count at BF16 (an F32 one
    too, as carry_tensors converts it), the others not at all."""
    plain = fp_of(tiny(tmp_path / "plain"), preset="NVFP4_DEFAULT_CFG")
    folder = tiny(tmp_path / "m", extra={"mtp.fc.weight": ("F32", [64, 128]), "mtp.norm.weight": ("BF16", [64]),
                                         "model.visual.proj.weight": ("BF16", [64, 64])})
    weights = load_weights(folder)
    assert set(weights.dropped) == {"mtp.fc.weight", "mtp.norm.weight", "model.visual.proj.weight"}
    strategy = Strategy(name="s", preset="NVFP4_DEFAULT_CFG")
    cpu = hardware_target("cpu")
    left_out = footprint.strategy_footprint(weights, strategy, [], cpu, "bfloat16")
    mtp = footprint.strategy_footprint(weights, strategy, [], cpu, "bfloat16", [("mtp.*", "bfloat16")])
    both = footprint.strategy_footprint(weights, strategy, [], cpu, "bfloat16",
                                        [("mtp.*", "bfloat16"), ("model.visual.*", "bfloat16")])
    assert left_out.checkpoint_bytes == plain.checkpoint_bytes
    assert mtp.checkpoint_bytes == plain.checkpoint_bytes + (64 * 128 + 64) * 2
    assert both.checkpoint_bytes == mtp.checkpoint_bytes + 64 * 64 * 2
    assert left_out.decode_tok_s == mtp.decode_tok_s == both.decode_tok_s == plain.decode_tok_s


def test_footprints_never_import_torch(write, tmp_path):
    path = nine_b_recipe(write, tmp_path)
    code = ("import sys; from runner.cli import main; "
            f"assert main(['validate', r'{path}']) == 0; "
            f"assert main(['plan', r'{path}', '--run-dir', r'{tmp_path / 'run'}']) == 0; "
            "print('HEAVY', [m for m in ('torch', 'transformers', 'modelopt', 'safetensors') if m in sys.modules])")
    result = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, env=recipe_cli_env(), cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert "HEAVY []" in result.stdout


def test_bits_definition_counts_logical_weights():
    assert BITS["nvfp4"] == 4.5 and BITS["fp8"] == 8 and BITS["int4_awq"] == 4.125 and BITS["mxfp4"] == 4.25 and BITS["mxfp8"] == 8.25
    # an NVFP4 weight exported as uint8 [out, in/2] holds out x in weights
    assert logical_numel(64 * 32, "nvfp4") == 64 * 64 and logical_numel(100, "fp8") == 100
    assert effective_bits([("nvfp4", 3000), ("bfloat16", 1000)]) == 7.375
    assert effective_bits([("BF16", 10), ("float32", 10)]) == 24.0


def test_modelopt_recipes_and_the_tables_here_agree():
    root = recipes_root()
    if root is None:
        pytest.skip("modelopt_recipes is not installed")
    # every preset named here is the file ModelOpt's config.py loads it from
    config_py = (root.parent / "modelopt" / "torch" / "quantization" / "config.py").read_text()
    loaded = dict(re.findall(r'^(\w+_(?:CFG|CONFIG)): dict\[str, Any\] = _load_quantize_config_dict\(\s*'
                             r'"configs/ptq/presets/([\w/]+)"', config_py, re.M))
    assert {k: loaded[k] for k in modelopt_config.PRESET_FILES} == modelopt_config.PRESET_FILES
    # auto_quantize's disabled layers cover ModelOpt's own list for auto_quantize recipes
    base = modelopt_config.load_modelopt_yaml(root, "configs/auto_quantize/units/base_disabled_layers")
    assert set(base) <= set(DEFAULT_DISABLED)
    # ModelOpt's cost of the two default auto_quantize formats
    assert modelopt_config.modelopt_cost_bits(modelopt_config.preset_config("NVFP4_DEFAULT_CFG")) == 4.5
    assert modelopt_config.modelopt_cost_bits(modelopt_config.preset_config("FP8_DEFAULT_CFG")) == 8.0


def test_modelopt_recipe_strategies_are_read_or_unknown(tmp_path):
    folder = tiny(tmp_path / "m")
    if recipes_root() is not None:
        known = fp_of(folder, modelopt_recipe="general/ptq/nvfp4_default-kv_fp8_cast")
        assert known.known and known.effective_bits == fp_of(folder, preset="NVFP4_DEFAULT_CFG").effective_bits
    unknown = fp_of(folder, modelopt_recipe="general/ptq/no_such_recipe")
    assert not unknown.known and unknown.checkpoint_bytes is None and unknown.reason


@pytest.mark.parametrize(("layer_types", "exclude"), [
    (["linear_attention"] * 3 + ["full_attention"], ["*linear_attn*", "*layers.0.*", "*layers.3.*", "*embed_tokens*"]),
    (["linear_attention", "full_attention"] * 2, ["*k_proj*"]),  # a group disabled by one member
])
def test_the_range_matches_modelopts_own_infeasibility_check(tmp_path, layer_types, exclude):
    """ModelOpt's auto_quantize on a tiny real Qwen3.5 (CPU; it refuses before calibrating) names our minimum."""
    mtq = pytest.importorskip("modelopt.torch.quantization")
    import torch
    from transformers import Qwen3_5ForCausalLM, Qwen3_5TextConfig

    config = Qwen3_5TextConfig(
        vocab_size=1000, hidden_size=128, intermediate_size=256, num_hidden_layers=len(layer_types),
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, linear_num_key_heads=2, linear_num_value_heads=4,
        linear_key_head_dim=32, linear_value_head_dim=32, layer_types=layer_types, tie_word_embeddings=False,
        architectures=["Qwen3_5ForCausalLM"])
    model = Qwen3_5ForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "m")
    ours = footprint.auto_range(load_weights(tmp_path / "m"), AutoQuantizeSpec(effective_bits=4.1), exclude)
    batch = {"input_ids": torch.randint(0, 1000, (1, 8))}
    with pytest.raises(ValueError, match="infeasible") as info:
        mtq.auto_quantize(model, constraints={"effective_bits": 4.1},
                          quantization_formats=["NVFP4_DEFAULT_CFG", "FP8_DEFAULT_CFG"], data_loader=[batch],
                          forward_step=lambda m, b: m(**b).logits, method="kl_div", num_calib_steps=1,
                          num_score_steps=1, disabled_layers=DEFAULT_DISABLED + exclude)
    assert f"minimum achievable effective bits is {ours.modelopt_min:.4f}" in str(info.value)
