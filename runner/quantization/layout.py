"""A layout strategy (schema.LayoutSpec: a format per module family) compiled to ModelOpt quant_cfg entries.

One compiler for the host and the worker: the host hands it the presets' entries as read from
modelopt_recipes (`layout_config`), the worker ModelOpt's own preset dicts (runner/worker/quantize.py
`build_config`), so both read the same cfg out of the same preset and predict/apply the same formats.

The entries, in order (ModelOpt applies them in order, later entries win):
1. `*` disabled: what no later entry names stays BF16 (families not named, embeddings, convolutions);
2. per quantized family, per module glob: `<glob>*weight_quantizer` (and `<glob>*input_quantizer` where
   the format quantizes activations) with the cfg the format's preset gives a Linear's quantizer. The
   families are written widest first, so where two families' globs name the same module the narrower
   one (first in FAMILIES, as `family_of` says) wins; a family left BF16 that such a wider one would
   cover is disabled again;
3. the KV-cache preset's entries (its `*` disable-all left out);
4. the Linears of decoder layers kept BF16 (`*layers.N.*weight_quantizer`, `*layers.N.*input_quantizer`: fnmatch's
   `.` after N keeps layers.1 from naming layers.10; the layer's KV-cache quantizers stay as the layout says);
5. DEFAULT_DISABLED (routers, vision tower, MTP heads, ...), except a pattern that takes a whole family
   the layout quantizes (`*lm_head*` when lm_head has a format).

Host-side: no torch, no ModelOpt.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from runner.quantization import Unknown
from runner.quantization.exclusions import DEFAULT_DISABLED, matches
from runner.quantization.families import FAMILIES, FORMAT_PRESETS, KV_PRESETS
from runner.quantization.modelopt_config import QuantConfig, preset_config, quantizer_cfg

# A Linear of no particular family: where a format's cfg is read out of its preset's entries.
_PROBE = "model.layers.0.mlp.down_proj"


def compile_layout(layout: Any, num_layers: int, preset_entries: Callable[[str], list[dict[str, Any]]]
                   ) -> list[dict[str, Any]]:
    """ModelOpt quant_cfg entries for `layout` (schema.LayoutSpec) on a model of `num_layers` decoder
    layers; `preset_entries(name)` gives a ModelOpt preset's quant_cfg entries (list form). Raises
    ValueError for a kept layer the model does not have."""
    entries: list[dict[str, Any]] = [{"quantizer_name": "*", "enable": False}]
    quantized = {f: fmt for f, fmt in layout.formats.items() if fmt != "bf16"}
    order = list(FAMILIES)
    # Widest family first (FAMILIES lists narrowest first): a later entry wins, so the narrowest does.
    for family in reversed(order):
        globs = FAMILIES[family]
        if family not in quantized:
            wider = order[order.index(family) + 1:]
            if any(f in quantized for f in wider):  # a wider family's globs may name these modules too
                entries += [{"quantizer_name": f"{glob}*", "enable": False} for glob in globs]
            continue
        weight, activation = _format_cfgs(quantized[family], preset_entries)
        for glob in globs:
            entries.append({"quantizer_name": f"{glob}*weight_quantizer", "cfg": weight})
            if activation is not None:  # W4A16: the input stays BF16 (disabled by `*` above)
                entries.append({"quantizer_name": f"{glob}*input_quantizer", "cfg": activation})
    kv_preset = KV_PRESETS[layout.kv_cache]
    if kv_preset is not None:
        entries += [e for e in preset_entries(kv_preset)
                    if not (e.get("quantizer_name") == "*" and e.get("cfg") is None and not e.get("parent_class"))]
    # A kept layer's Linears only: its attention's KV-cache quantizers stay on, so an FP8 KV cache has scales in
    # every layer (vLLM would read a missing k/v scale as 1.0).
    entries += [{"quantizer_name": f"*layers.{i}.*{kind}_quantizer", "enable": False}
                for i in kept_layers(layout, num_layers) for kind in ("weight", "input")]
    for pattern in dict.fromkeys(g if g.endswith("*") else f"{g}.*" for g in DEFAULT_DISABLED):  # once each
        # `*lm_head*` would take the whole lm_head family; a pattern that takes part of one (Qwen3-Next's
        # `in_proj_ba` under `*linear_attn.in_proj_b*`) still applies: those modules stay BF16.
        if not any(all(matches(pattern, f"{_sample(g)}.weight_quantizer") for g in FAMILIES[family])
                   for family in quantized):
            entries.append({"quantizer_name": pattern, "enable": False})
    return entries


def _format_cfgs(fmt: str, preset_entries: Callable[[str], list[dict[str, Any]]]) -> tuple[Any, Any]:
    """The weight and input quantizer cfg a layer format's preset gives a plain Linear (input None:
    activations left unquantized)."""
    preset = FORMAT_PRESETS[fmt]
    assert preset is not None, fmt
    config = QuantConfig(preset, preset_entries(preset))
    weight = quantizer_cfg(config, f"{_PROBE}.weight_quantizer")
    if weight is None:
        raise Unknown(f"preset {preset} quantizes no Linear weight: it cannot make format {fmt}")
    return weight, quantizer_cfg(config, f"{_PROBE}.input_quantizer")


def _sample(glob: str) -> str:
    """A module name a family glob names (`*mlp.gate_proj` -> `mlp.gate_proj`, `*mlp.experts*` ->
    `mlp.experts`): what a DEFAULT_DISABLED pattern is tested on to see whether it takes the family."""
    return glob.strip("*").rstrip(".")


def kept_layers(layout: Any, num_layers: int) -> list[int]:
    """The decoder layers a layout keeps BF16, sorted; ValueError for an index the model does not have."""
    beyond = [i for i in layout.keep_layers if i >= num_layers]
    if beyond:
        raise ValueError(f"layout keep_layers {beyond} are beyond this model's {num_layers} decoder layers "
                         f"(0-{num_layers - 1})")
    kept = set(range(min(layout.keep_first, num_layers)))
    kept |= set(range(max(num_layers - layout.keep_last, 0), num_layers))
    kept |= set(layout.keep_layers)
    return sorted(kept)


def layout_config(layout: Any, num_layers: int, algorithm: Any = "max") -> QuantConfig:
    """The host's QuantConfig of a layout: the presets' entries read from modelopt_recipes. Its name
    says everything that decides the entries (memo keys use it). Unknown when the presets cannot be
    read here or a kept layer is beyond the model."""
    def entries(name: str) -> list[dict[str, Any]]:
        config = preset_config(name)
        if config.source != "modelopt_recipes":
            raise Unknown(f"preset {name} is not readable on this host (modelopt_recipes is not installed): "
                          "a layout's formats come from its presets")
        return config.entries

    try:
        compiled = compile_layout(layout, num_layers, entries)
    except ValueError as exc:
        raise Unknown(str(exc)) from None
    return QuantConfig(describe_layout(layout, num_layers), compiled, algorithm)


def describe_layout(layout: Any, num_layers: int | None = None) -> str:
    """`layout: mlp w4a16_nvfp4, attention fp8; KV fp8; layers 0, 29 BF16` (families in FAMILIES order;
    without num_layers, keep_first/keep_last as written)."""
    families = ", ".join(f"{f} {layout.formats[f]}" for f in FAMILIES if layout.formats.get(f, "bf16") != "bf16")
    parts = [families, f"KV {layout.kv_cache}"]
    if num_layers is not None:
        kept = kept_layers(layout, num_layers)
        if kept:
            parts.append(f"layers {_ranges(kept)} BF16")
    else:
        named = [f"first {layout.keep_first} layers"] if layout.keep_first else []
        named += [f"last {layout.keep_last} layers"] if layout.keep_last else []
        named += [f"layers {_ranges(sorted(set(layout.keep_layers)))}"] if layout.keep_layers else []
        if named:
            parts.append(f"{', '.join(named)} BF16")
    return "layout: " + "; ".join(parts)


def _ranges(indices: list[int]) -> str:
    """[0, 1, 2, 5, 29] -> `0-2, 5, 29`."""
    out: list[str] = []
    start = prev = indices[0]
    for i in [*indices[1:], None]:
        if i is not None and i == prev + 1:
            prev = i
            continue
        out.append(f"{start}-{prev}" if prev > start + 1 else ", ".join(str(j) for j in range(start, prev + 1)))
        if i is not None:
            start = prev = i
    return ", ".join(out)


_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def num_hidden_layers(config: dict[str, Any], module_names: list[str] | None = None) -> int:
    """A model's decoder-layer count from its config (a VL model's text_config, llm_config or
    language_config; `config.json`, or `model.config.to_dict()` in the worker), else from its module
    names (`...layers.N.`). ValueError when neither says."""
    for section in (config, *(config.get(k) or {} for k in ("text_config", "llm_config", "language_config"))):
        if not isinstance(section, dict):
            continue
        count = section.get("num_hidden_layers") or section.get("n_layer") or section.get("num_layers")
        if isinstance(count, int) and count > 0:
            return count
    indices = [int(m.group(1)) for name in module_names or [] for m in [_LAYER.search(name)] if m]
    if indices:
        return max(indices) + 1
    raise ValueError("the model's config has no num_hidden_layers and no module is under `layers.N.`")
