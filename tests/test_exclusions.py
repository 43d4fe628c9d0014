"""One exclusion matcher (runner/quantization/exclusions.py), decided by what ModelOpt does.

Before it, five places decided whether a recipe's exclusion pattern names a module, with different
rules: the footprint's quant_cfg emulation (fnmatch on `<module>.weight_quantizer` /
`.input_quantizer`), its auto_quantize range (fnmatch on the module name), the quantize worker's
unmatched-pattern warning (fnmatch on quantizer names, or on them with a `*` appended), its
nothing-quantized message (fnmatch on `<module>.weight_quantizer`) and verify (fnmatch on the module
name, or on it with a `.` appended). The cases below are where they disagreed; each is decided by
ModelOpt's own reading: a quant_cfg key is fnmatched against quantizer names, an auto_quantize
`disabled_layers` glob against module names.
"""

from __future__ import annotations

import fnmatch
import importlib.util
from pathlib import Path

import pytest

from runner.quantization.exclusions import DEFAULT_DISABLED, matches, names_module

HEAD = "lm_head"
GATE = "model.layers.0.mlp.gate"
DOWN = "model.layers.0.mlp.down_proj"
DOWN_10 = "model.layers.10.mlp.down_proj"


def quant_cfg(pattern: str, module: str) -> bool:
    """What a preset or ModelOpt recipe does with the pattern as an appended `enable: false` entry."""
    return matches(pattern, f"{module}.weight_quantizer")


def disabled_layers(pattern: str, module: str) -> bool:
    """What auto_quantize does with the pattern as a `disabled_layers` glob."""
    return matches(pattern, module)


@pytest.mark.parametrize(("pattern", "module", "as_quant_cfg", "as_disabled_layer"), [
    # both readings agree: a glob that crosses the quantizer suffix
    ("*lm_head*", HEAD, True, True),
    ("model.layers.0.*", DOWN, True, True),
    ("*layers.0.*", DOWN, True, True),
    # a bare module name: auto_quantize disables it, a quant_cfg key names no quantizer (the old
    # verify and unmatched-pattern rules counted it as excluded in both)
    ("lm_head", HEAD, False, True),
    (DOWN, DOWN, False, True),
    # no trailing dot or star: only the module name ends there (the shipped `*mlp.gate`)
    ("*mlp.gate", GATE, False, True),
    ("*proj", DOWN, False, True),
    # a trailing `.*`: only a quantizer name continues after the module (ModelOpt's `*mlp.gate.*`;
    # the old verify matched it on `module + "."`)
    ("*mlp.gate.*", GATE, True, False),
    # a quantizer pattern names every Linear as a quant_cfg key, none as a module glob (the old verify
    # said no module)
    ("*.weight_quantizer", DOWN, True, False),
    ("*weight_quantizer", DOWN, True, False),
    # a decoder layer is not a Linear: `model.layers.0` names nothing (the old unmatched-pattern rule
    # appended `*` and found layer 0's quantizers, and layer 0x's)
    ("model.layers.0", DOWN, False, False),
    ("*layers.1", DOWN_10, False, False),
    # `*` crosses dots, digits are not special: `*layers.1*` also names layer 10
    ("*layers.1*", DOWN_10, True, True),
    ("*layers.1.*", DOWN_10, False, False),
    # expert indices: `*experts.1.*` is expert 1 only, `*experts.1*` is 1 and 10-19, `[..]` is a set
    ("*experts.1.*", "model.layers.0.mlp.experts.1.up_proj", True, True),
    ("*experts.1.*", "model.layers.0.mlp.experts.12.up_proj", False, False),
    ("*experts.1*", "model.layers.0.mlp.experts.12.up_proj", True, True),
    ("*experts.[0-3].*", "model.layers.0.mlp.experts.2.up_proj", True, True),
    ("*experts.[0-3].*", "model.layers.0.mlp.experts.4.up_proj", False, False),
    # case-sensitive, as fnmatch is on POSIX (the old auto_range called fnmatch.fnmatch, which folds
    # case on Windows only)
    ("*LM_HEAD*", HEAD, False, False),
])
def test_each_reading_is_modelopts(pattern, module, as_quant_cfg, as_disabled_layer):
    assert quant_cfg(pattern, module) is as_quant_cfg
    assert disabled_layers(pattern, module) is as_disabled_layer
    # verify and the unmatched-pattern warning do not know which reading applied: either counts
    assert names_module(pattern, module) is (as_quant_cfg or as_disabled_layer)
    # and the rule is fnmatch's, whole name, case-sensitive
    assert matches(pattern, module) is fnmatch.fnmatchcase(module, pattern)


def test_an_input_quantizer_pattern_leaves_the_weight_quantized():
    """`*input_quantizer` makes a Linear weight-only; it does not exclude it (verify must not expect it
    stored unquantized)."""
    assert matches("*input_quantizer", f"{DOWN}.input_quantizer")
    assert not names_module("*input_quantizer", DOWN)


def test_default_disabled_names_routers_both_ways():
    """auto_quantize reads DEFAULT_DISABLED as module globs; the preset fallback turns each into a
    quantizer glob (`g.*` unless it ends in `*`): a router named exactly `mlp.gate` is caught both ways,
    a `gate_proj` neither way."""
    as_quantizer_globs = [g if g.endswith("*") else f"{g}.*" for g in DEFAULT_DISABLED]
    assert any(disabled_layers(g, GATE) for g in DEFAULT_DISABLED)
    assert any(quant_cfg(g, GATE) for g in as_quantizer_globs)
    gate_proj = "model.layers.0.mlp.gate_proj"
    assert not any(disabled_layers(g, gate_proj) for g in DEFAULT_DISABLED)
    assert not any(quant_cfg(g, gate_proj) for g in as_quantizer_globs)


def test_an_expert_index_pattern_tells_experts_apart_in_the_footprint():
    """module_formats matches one expert per layer when no entry can tell experts apart; a pattern
    with an expert index must switch that off."""
    from runner.quantization.modelopt_config import module_formats, preset_config

    experts = [f"model.layers.0.mlp.experts.{e}.down_proj" for e in range(12)]
    config = preset_config("NVFP4_DEFAULT_CFG").with_exclusions(["*experts.1.*"])
    formats = module_formats(config, experts)
    assert formats[experts[1]] is None
    assert all(formats[m] == "nvfp4" for i, m in enumerate(experts) if i != 1)


def test_modelopt_matches_with_fnmatch_on_these_names():
    """The rule above is ModelOpt's: its quant_cfg matcher fnmatches quantizer names, auto_quantize's
    disabled_layers fnmatch module names (read from the installed source, as tests/test_footprint.py
    reads its presets)."""
    spec = importlib.util.find_spec("modelopt")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("modelopt is not installed")
    quantization = Path(next(iter(spec.submodule_search_locations))) / "torch" / "quantization"
    conversion = (quantization / "conversion.py").read_text(encoding="utf-8")
    algorithms = (quantization / "algorithms.py").read_text(encoding="utf-8")
    assert "fnmatch.fnmatch(name, wildcard_or_filter_func)" in conversion
    assert "if fnmatch.fnmatch(name, pattern):" in algorithms and "disabled_layers" in algorithms


def test_modelopt_itself_reads_a_bare_module_name_as_no_quantizer():
    """The disagreement that matters most, run through ModelOpt: a preset with the exclusion
    `model.layers.0.mlp.down_proj` (a module name, no quantizer suffix) still quantizes that Linear;
    `*layers.0.mlp.down_proj*` leaves it in 16 bits. The worker's unmatched-pattern warning follows the
    same rule: a pattern names a quantizer or a quantized module, or it is reported."""
    pytest.importorskip("modelopt")
    torch = pytest.importorskip("torch")
    from transformers import LlamaConfig, LlamaForCausalLM

    from runner.recipe.schema import Strategy
    from runner.worker import quantize
    from runner.worker.calib_data import CalibrationSet

    strategy = Strategy(name="s", preset="NVFP4_DEFAULT_CFG")

    def quantized(exclude: list[str]):
        config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False)
        torch.manual_seed(0)
        model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
        calib = CalibrationSet([[1 + (i * 7 + j) % 249 for j in range(16)] for i in range(4)], 0)
        quantize.quantize_model(model, calib, strategy, exclude, torch.device("cpu"))
        return model

    module = "model.layers.0.mlp.down_proj"
    assert not quant_cfg(module, module) and quant_cfg(f"*{module}*", module)
    model = quantized([module])
    assert quantize.layer_formats(model)[module] == "nvfp4"
    assert quantize.layer_formats(quantized([f"*{module}*"]))[module] == "bfloat16"

    patterns = ["lm_head", module, "*mlp.down_proj", "*layers.0.*", "*.weight_quantizer", "model.layers.0",
                "*layers.1"]
    warned = " ".join(quantize.unmatched_patterns(model, strategy, patterns))
    assert "'model.layers.0'" in warned and "'*layers.1'" in warned  # a decoder layer; no module ends there
    assert not any(f"{p!r}" in warned for p in patterns[:5])


# --- the shipped recipes' exclusions, on their own models' tensor listings ---------------------------


def _shipped_recipes() -> list[Path]:
    from conftest import REPO
    from runner.catalogue import NOT_RECIPES

    root = REPO / "recipes"
    return sorted(p for p in root.rglob("*.yaml") if p.relative_to(root).parts[0] not in NOT_RECIPES)


def _recipe_and_weights(path: Path):
    from runner.quantization import footprint
    from runner.quantization.weights import load_weights
    from runner.recipe.loader import load_recipe

    recipe = load_recipe(path, env={}).recipe
    folder, _ = footprint.model_folder(recipe)
    if folder is None:
        pytest.skip(f"{path.name}: no model shapes to match against")
    return recipe, load_weights(folder)


@pytest.mark.parametrize("path", _shipped_recipes(), ids=lambda p: p.name)
def test_every_exclusion_of_a_shipped_recipe_names_something_of_its_model(path):
    """Each pattern of quantization.exclude and of each strategy's exclude names a module or a quantizer of
    the recipe's own model (its tensor listing, recipes/models/*/tensors.json), by the one matcher: the
    warning `recipe validate` would give ("matches nothing") is given for no shipped recipe."""
    from runner.plan_checks import unmatched_exclusions

    recipe, weights = _recipe_and_weights(path)
    assert unmatched_exclusions(recipe, weights) == []


@pytest.mark.parametrize("path", _shipped_recipes(), ids=lambda p: p.name)
def test_a_shipped_recipes_exclusions_mean_the_same_under_both_readings(path):
    """The worker hands a strategy's exclusions to ModelOpt as quant_cfg keys (presets, ModelOpt recipes)
    or as auto_quantize disabled_layers; each list must leave the same Linears and convolutions in 16 bits
    either way. The routers were `*mlp.gate` / `*mixer.gate` alone: a module name, so as quant_cfg keys
    they named nothing, and the routers stayed BF16 only because ModelOpt's own defaults disable
    `*mlp.gate.*`."""
    recipe, weights = _recipe_and_weights(path)
    modules = [*weights.linears, *weights.convs]
    for strategy in recipe.quantization.strategies:
        exclude = recipe.quantization.exclusions(strategy)
        as_quant_cfg = {m for m in modules if any(quant_cfg(p, m) for p in exclude)}
        as_disabled_layers = {m for m in modules if any(disabled_layers(p, m) for p in exclude)}
        assert as_quant_cfg == as_disabled_layers, (strategy.name, sorted(as_quant_cfg ^ as_disabled_layers)[:5])


def test_the_old_router_pattern_reads_one_way_only():
    """What the test above catches: `*mlp.gate` alone excludes the router as a disabled_layers glob and
    names no quantizer as a quant_cfg key; with `*mlp.gate.*` beside it both readings agree."""
    modules = [GATE, "model.layers.0.mlp.experts.0.gate_proj", "model.layers.0.mlp.shared_expert.gate_proj"]
    old, new = ["*mlp.gate"], ["*mlp.gate", "*mlp.gate.*"]
    assert {m for m in modules if any(quant_cfg(p, m) for p in old)} == set()
    assert {m for m in modules if any(disabled_layers(p, m) for p in old)} == {GATE}
    for readings in (quant_cfg, disabled_layers):
        assert {m for m in modules if any(readings(p, m) for p in new)} == {GATE}
