"""What a strategy will weigh, known before any GPU work: formats per Linear, effective bits, checkpoint
size, decode speed, and the effective-bits range an auto_quantize strategy can reach.

Read from the model's weights (runner/quantization/weights.py: headers only, no torch). Which Linear
gets which format follows ModelOpt's own rules, read as data (runner/quantization/modelopt_config.py):

- a preset or a ModelOpt recipe is its ordered quant_cfg with the recipe's exclusions appended as
  `{quantizer_name: GLOB, enable: false}` exactly as the worker does;
- auto_quantize ignores a preset's own exclusions: the worker passes DEFAULT_DISABLED + the recipe's
  exclusions as `disabled_layers` (module-name globs, runner/quantization/exclusions.py), and the
  search may give every other Linear any of the candidate formats. ModelOpt's effective-bits count
  (what its constraint enforces) is reproduced in `auto_range`: see runner/quantization/bits.py for
  both definitions.

Tensors of the source that the worker's causal-LM load drops (an MTP head, a vision tower:
weights.DROPPED_ON_LOAD) are not quantized; those the recipe's `carry_tensors` export fix-ups carry back
are counted in the checkpoint, in the dtype the fix-up stores them in (`carried_tensors`, the one place
that decides it), and the others are left out. Neither is read per generated token (decode.py).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runner.quantization import Unknown
from runner.quantization import formats as registry
from runner.quantization.bits import DTYPE_BITS, base_format, bits_of
from runner.quantization.decode import Hardware, bytes_per_token_of, decode_tok_s
from runner.quantization.exclusions import DEFAULT_DISABLED, matches
from runner.quantization.layout import describe_layout, layout_config
from runner.quantization.modelopt_config import (
    QuantConfig,
    modelopt_cost_bits,
    module_format,
    module_formats,
    preset_config,
    recipe_config,
)
from runner.quantization.modelopt_recipes import recipes_root
from runner.quantization.safetensors_headers import Tensor, has_safetensors
from runner.quantization.weights import DROPPED_ON_LOAD, LISTING, Weights

# (fnmatch pattern of source tensor names, the dtype the export stores them in), in fix-up order:
# TensorAccounting.carried of the recipe's export fix-ups (runner/recipe/fixups.py `tensor_accounting`).
Carried = Sequence[tuple[str, str]]

# ModelOpt's auto_quantize decides these together (algorithms.py, quant_grouping_rules).
_GROUP_RULES = [
    re.compile(r"^(.*?)\.(q_proj|k_proj|v_proj)$"),
    re.compile(r"^(.*?\.mlp\.experts)\.\d+\.(gate_proj|up_proj|down_proj)$"),
    re.compile(r"^(.*?\.mixer\.experts)\.\d+\.(up_proj|down_proj)$"),
    re.compile(r"^(.*?\.mlp\.experts\.local_experts)\.\d+\.(linear_fc1|linear_fc2)$"),
    re.compile(r"^(.*?)\.(gate_proj|up_proj)$"),
    re.compile(r"^(.*?)\.(\d+\.(w1|w2|w3))$"),
    re.compile(r"^(.*?)\.((w1_linear|w2_linear|w3_linear)\.\d+)$"),
]
_LINEAR_ATTN_QKVZ = re.compile(r"^(.*?\.linear_attn)\.(?:in_proj_qkv|in_proj_z)$")
_LINEAR_ATTN_BA = re.compile(r"^(.*?\.linear_attn)\.(?:in_proj_a|in_proj_b)$")

UNKNOWN_UNTIL_SOURCE = "footprint: unknown until the source step has run"


def strategy_formats(weights: Weights, base: QuantConfig, exclude: list[str]) -> dict[str, str | None]:
    """module_formats of every Linear under `base` with `exclude` appended, computed once per distinct
    (config, exclusions) for these weights. Shared: read it, never change it."""
    key = ("formats", base.name, base.source, tuple(exclude))
    formats = weights.memo.get(key)
    if formats is not None:
        return formats
    if not exclude:
        formats = module_formats(base, list(weights.linears))
    else:
        # The exclusions are appended `enable: false` entries: they only disable. A module none of them
        # names keeps the format it has without them; the few they name are worked out in full.
        plain = strategy_formats(weights, base, [])
        full = base.with_exclusions(exclude)
        formats = {m: module_format(full, m) if f is not None and any(
            matches(p, f"{m}.weight_quantizer") or matches(p, f"{m}.input_quantizer") for p in exclude)
            else f for m, f in plain.items()}
    weights.memo[key] = formats
    return formats


# --- predictions -----------------------------------------------------------------------------


@dataclass
class AutoRange:
    """What an auto_quantize strategy can reach, and where its target lands."""

    target: float
    modelopt_min: float  # ModelOpt's count: what its `effective_bits` constraint enforces
    modelopt_max: float
    min_bits: float  # this project's effective bits at the two ends
    max_bits: float
    min_bytes: int
    max_bytes: int
    cheapest: str
    dearest: str
    quantizable: int  # Linear modules the search may quantize
    disabled: int  # Linear/Conv modules it must leave alone
    low: dict[str, str | None] = field(default_factory=dict, repr=False)  # Linear -> format at each end
    high: dict[str, str | None] = field(default_factory=dict, repr=False)

    @property
    def feasible(self) -> bool:
        return self.modelopt_min - 5e-5 <= self.target <= self.modelopt_max + 5e-5


@dataclass
class Footprint:
    strategy: str
    method: str
    known: bool = True
    reason: str = ""
    checkpoint_bytes: int | None = None
    effective_bits: float | None = None
    decode_tok_s: float | None = None
    bytes_per_token: int | None = None  # what one decoded token reads (active experts only), the search's objective
    hardware: str | None = None
    formats: dict[str, int] = field(default_factory=dict)  # format (or dtype) -> Linear modules
    auto: AutoRange | None = None
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "strategy": self.strategy, "method": self.method, "known": self.known, "reason": self.reason or None,
            "checkpoint_bytes": self.checkpoint_bytes,
            "size_gb": round(self.checkpoint_bytes / 1e9, 2) if self.checkpoint_bytes else None,
            "effective_bits": self.effective_bits, "decode_tok_s": self.decode_tok_s,
            "bytes_per_token": self.bytes_per_token, "hardware": self.hardware,
            "formats": self.formats, "notes": self.notes}
        if self.auto is not None:
            a = self.auto
            out["auto_quantize"] = {
                "target": a.target, "feasible": a.feasible, "modelopt_min_bits": round(a.modelopt_min, 4),
                "modelopt_max_bits": round(a.modelopt_max, 4), "min_bits": round(a.min_bits, 3),
                "max_bits": round(a.max_bits, 3), "min_bytes": a.min_bytes, "max_bytes": a.max_bytes,
                "cheapest": a.cheapest, "dearest": a.dearest, "quantizable_modules": a.quantizable,
                "disabled_modules": a.disabled}
        return out


def _stored_bits(tensor: Tensor, dtype: str | None) -> float:
    """Bits of an unquantized weight as exported: the load dtype for floating tensors, else as stored."""
    if dtype and tensor.dtype in ("F32", "F16", "BF16"):
        return bits_of(dtype)
    return float(DTYPE_BITS.get(tensor.dtype, 16))


def _scalar_bytes(fmt: str) -> int:
    """Per-tensor scales the export adds to a quantized Linear (weight_scale_2 / input_scale, fp32)."""
    entry = registry.by_name(base_format(fmt))
    return entry.scalar_bytes if entry is not None else 0


def carried_tensors(weights: Weights, carried: Carried) -> dict[str, tuple[Tensor, str]]:
    """The tensors the causal-LM load drops that the export's carry_tensors fix-ups put back, each with the
    dtype it is stored in: matched as the fix-up matches them (fnmatchcase on the source name; the first
    fix-up that names a tensor carries it, a later one finds it exported already)."""
    out: dict[str, tuple[Tensor, str]] = {}
    for name, tensor in weights.dropped.items():
        stored = next((dt for pattern, dt in carried if fnmatch.fnmatchcase(name, pattern)), None)
        if stored is not None:
            out[name] = (tensor, stored)
    return out


def predict(weights: Weights, formats: dict[str, str | None], dtype: str | None,
            extra: dict[str, int] | None = None, carried: Carried = ()) -> tuple[dict[str, int], float]:
    """Predicted export (tensor name -> bytes) and effective bits for a Linear -> format assignment, with
    the dropped-on-load tensors the fix-ups carry (`carried_tensors`) stored unquantized. Effective bits
    are over the quantized model's Linears, as ModelOpt counts them: carried tensors are not among them."""
    sizes: dict[str, int] = {name: tensor.numel * int(bits_of(stored)) // 8
                             for name, (tensor, stored) in carried_tensors(weights, carried).items()}
    for name, tensor in weights.tensors.items():
        if tensor.dtype in ("F32", "F16", "BF16") and dtype:
            sizes[name] = tensor.numel * int(bits_of(dtype)) // 8
        else:
            sizes[name] = tensor.nbytes
    used: list[tuple[float, int]] = []
    for module, tensor in weights.linears.items():
        fmt = formats.get(module)
        if fmt is None:
            used.append((_stored_bits(tensor, dtype), tensor.numel))
            continue
        used.append((bits_of(fmt), tensor.numel))
        # a tied head that gets quantized is exported as a tensor of its own
        sizes[tensor.name] = math.ceil(tensor.numel * bits_of(fmt) / 8) + _scalar_bytes(fmt)
    for name, nbytes in (extra or {}).items():
        sizes[name] = sizes.get(name, 0) + nbytes
    total = sum(n for _, n in used)
    bits = round(sum(b * n for b, n in used) / total, 3) if total else 16.0
    return sizes, bits


def _decode(sizes: dict[str, int], hardware: Hardware | None, weights: Weights) -> float | None:
    if hardware is None:
        return None
    return decode_tok_s(bytes_per_token_of(sizes, weights.expert_fraction), hardware)


def _counts(weights: Weights, formats: dict[str, str | None], dtype: str | None) -> dict[str, int]:
    counts: dict[str, int] = {}
    for module, tensor in weights.linears.items():
        fmt = formats.get(module) or (dtype if dtype and tensor.dtype in ("F32", "F16", "BF16") else tensor.dtype)
        counts[fmt] = counts.get(fmt, 0) + 1
    return dict(sorted(counts.items()))


def content_key(strategy: Any) -> tuple[Any, ...]:
    """What of a strategy (schema.Strategy) decides what it does to the weights: not its name,
    description, calibration set or batch size."""
    auto, layout = strategy.auto_quantize, getattr(strategy, "layout", None)
    return (strategy.preset, strategy.modelopt_recipe, auto.model_dump_json() if auto is not None else None,
            layout.model_dump_json() if layout is not None else None, strategy.algorithm, strategy.fold_awq_scales)


def strategy_footprint(weights: Weights, strategy: Any, exclude: list[str], hardware: Hardware | None = None,
                       dtype: str | None = None, carried: Carried = ()) -> Footprint:
    """The footprint of one recipe strategy (schema.Strategy) with the recipe's exclusions appended and the
    dropped-on-load tensors its export fix-ups carry (`carried`: `carry_patterns(recipe)`). Computed once
    per distinct content (content_key, exclusions, hardware, dtype, carried, ModelOpt's configs) for these
    weights; every strategy gets its own copy under its own name."""
    carried = tuple(tuple(c) for c in carried)
    key = ("footprint", content_key(strategy), tuple(exclude), hardware, dtype, carried, recipes_root())
    fp = weights.memo.get(key)
    if fp is None:
        fp = weights.memo[key] = _strategy_footprint(weights, strategy, exclude, hardware, dtype, carried)
    return dataclasses.replace(fp, strategy=strategy.name, formats=dict(fp.formats), notes=list(fp.notes))


def _strategy_footprint(weights: Weights, strategy: Any, exclude: list[str], hardware: Hardware | None,
                        dtype: str | None, carried: Carried) -> Footprint:
    fp = Footprint(strategy.name, strategy_method(strategy, weights.num_layers),
                   hardware=hardware.name if hardware else None)
    try:
        if strategy.auto_quantize is not None:
            _auto_footprint(fp, weights, strategy.auto_quantize, exclude, hardware, dtype, carried)
            return fp
        base = strategy_config(strategy, weights.num_layers)
        if base.source != "modelopt_recipes":
            fp.notes.append(f"formats derived from the preset's family ({base.source}): modelopt_recipes is not "
                            "installed on this host")
        formats = strategy_formats(weights, base, exclude)
        extra: dict[str, int] = {}
        algorithm = strategy.algorithm or base.algorithm
        method_name = algorithm.get("method") if isinstance(algorithm, dict) else algorithm
        load_bytes = int(bits_of(dtype)) // 8 if dtype else 2
        for module, fmt in formats.items():
            if fmt is None:
                continue
            out_features, in_features = weights.linears[module].shape
            if str(method_name).startswith("awq") and not strategy.fold_awq_scales:
                extra[f"{module}.pre_quant_scale"] = in_features * load_bytes
            if method_name == "svdquant":
                rank = int(algorithm.get("lowrank", 32)) if isinstance(algorithm, dict) else 32
                extra[f"{module}.lora"] = rank * (in_features + out_features) * load_bytes
        if extra and method_name == "svdquant":
            fp.notes.append("SVDQuant's low-rank branches counted at the model dtype")
        sizes, fp.effective_bits = predict(weights, formats, dtype, extra, carried)
        fp.checkpoint_bytes = sum(sizes.values())
        fp.decode_tok_s = _decode(sizes, hardware, weights)
        fp.bytes_per_token = bytes_per_token_of(sizes, weights.expert_fraction)
        fp.formats = _counts(weights, formats, dtype)
    except Unknown as exc:
        fp.known, fp.reason = False, str(exc)
    return fp


def strategy_config(strategy: Any, num_layers: int | None) -> QuantConfig:
    """The QuantConfig of a preset, ModelOpt recipe or layout strategy (schema.Strategy; not auto_quantize),
    as the worker builds it before the recipe's exclusions. `num_layers`: the model's decoder layers (a
    layout's keep_first/keep_last/keep_layers need it; Unknown without)."""
    if strategy.preset:
        return preset_config(strategy.preset)
    if strategy.modelopt_recipe:
        return recipe_config(strategy.modelopt_recipe)
    if num_layers is None:
        raise Unknown("a layout needs the model's decoder-layer count (config.json num_hidden_layers)")
    return layout_config(strategy.layout, num_layers, strategy.algorithm or "max")


def strategy_method(strategy: Any, num_layers: int | None = None) -> str:
    """How a strategy quantizes, in words: `preset NVFP4_DEFAULT_CFG`, `modelopt_recipe general/ptq/...`,
    `auto_quantize`, `layout: mlp w4a16_nvfp4, attention fp8; KV fp8; layers 29 BF16`."""
    if strategy.preset:
        return f"preset {strategy.preset}"
    if strategy.modelopt_recipe:
        return f"modelopt_recipe {strategy.modelopt_recipe}"
    if getattr(strategy, "layout", None) is not None:
        try:
            return describe_layout(strategy.layout, num_layers)
        except ValueError:  # a kept layer beyond the model: the footprint says so
            return describe_layout(strategy.layout)
    return "auto_quantize"


def _group_key(module: str) -> str:
    for rule in _GROUP_RULES:
        m = rule.match(module)
        if m:
            return m.group(1)
    m = _LINEAR_ATTN_QKVZ.match(module)
    if m:
        return f"{m.group(1)}/qkvz"
    m = _LINEAR_ATTN_BA.match(module)
    return f"{m.group(1)}/ba" if m else module


def auto_range(weights: Weights, spec: Any, exclude: list[str], dtype: str | None = None,
               carried: Carried = ()) -> AutoRange:
    """auto_quantize's reachable effective bits, in ModelOpt's count and in this project's.

    ModelOpt (algorithms.py, 0.47): every QuantLinear/QuantConv module is a decision (lm_head
    included, embeddings not); modules matching `disabled_layers` (here DEFAULT_DISABLED + the
    recipe's exclusions, as the worker passes them) cost 16 bits per weight whatever their dtype, and
    a group (q/k/v, gate/up, linear_attn qkv/z and a/b) is disabled when any member is; the others
    cost the cheapest candidate's ModelOpt bits at the minimum. We take the most expensive candidate at
    the maximum (above it ModelOpt would rather leave quantizable layers unquantized).
    """
    disabled_globs = [*DEFAULT_DISABLED, *exclude]
    candidates = {name: preset_config(name) for name in spec.formats}
    cost = {name: modelopt_cost_bits(c) for name, c in candidates.items()}
    # This project's format for each candidate, read on a plain decoder-layer Linear (auto_quantize
    # applies a candidate without its preset's own exclusions).
    kind = {name: module_format(c, "model.layers.0.mlp.down_proj") for name, c in candidates.items()}
    for name, fmt in kind.items():
        if fmt is None:
            raise Unknown(f"auto_quantize format {name} quantizes no Linear weight")
    cheapest = min(cost, key=lambda n: (cost[n], bits_of(kind[n])))
    dearest = max(cost, key=lambda n: (cost[n], bits_of(kind[n])))

    modules = {**weights.linears, **weights.convs}
    groups: dict[str, list[str]] = {}
    for module in modules:
        groups.setdefault(_group_key(module), []).append(module)
    disabled: set[str] = set()
    for members in groups.values():
        if any(matches(g, m) for m in members for g in disabled_globs):  # disabled_layers: module names
            disabled.update(members)
    total = sum(t.numel for t in modules.values())
    fixed = sum(modules[m].numel for m in disabled) * 16.0
    free = total - sum(modules[m].numel for m in disabled)
    mo_min = (fixed + free * cost[cheapest]) / total
    mo_max = (fixed + free * cost[dearest]) / total

    low = {m: (kind[cheapest] if m not in disabled else None) for m in weights.linears}
    high = {m: (kind[dearest] if m not in disabled else None) for m in weights.linears}
    low_sizes, low_bits = predict(weights, low, dtype, carried=carried)
    high_sizes, high_bits = predict(weights, high, dtype, carried=carried)
    return AutoRange(
        target=float(spec.effective_bits), modelopt_min=mo_min, modelopt_max=mo_max, min_bits=low_bits,
        max_bits=high_bits, min_bytes=sum(low_sizes.values()), max_bytes=sum(high_sizes.values()),
        cheapest=f"{cheapest} ({kind[cheapest]})", dearest=f"{dearest} ({kind[dearest]})",
        quantizable=sum(1 for m in weights.linears if m not in disabled), disabled=len(disabled), low=low, high=high)


def _auto_footprint(fp: Footprint, weights: Weights, spec: Any, exclude: list[str], hardware: Hardware | None,
                    dtype: str | None, carried: Carried) -> None:
    rng = auto_range(weights, spec, exclude, dtype, carried)
    fp.auto = rng
    if not rng.feasible:
        fp.known, fp.reason = False, (f"effective_bits {rng.target:g} is outside what auto_quantize can reach: "
                                      f"{rng.modelopt_min:.4f} to {rng.modelopt_max:.4f}")
        return
    # The search spends at most the target's budget (ModelOpt's cost is linear in the weights):
    # interpolate between the two ends, an upper bound on size and bits (a layer the search leaves
    # unquantized costs 16 in ModelOpt's count and 16 bits a weight in bf16, so it stays a bound).
    span = rng.modelopt_max - rng.modelopt_min
    share = (rng.target - rng.modelopt_min) / span if span > 0 else 0.0
    share = min(max(share, 0.0), 1.0)
    fp.checkpoint_bytes = round(rng.min_bytes + share * (rng.max_bytes - rng.min_bytes))
    fp.effective_bits = round(rng.min_bits + share * (rng.max_bits - rng.min_bits), 3)
    if hardware is not None:
        low = bytes_per_token_of(predict(weights, rng.low, dtype, carried=carried)[0], weights.expert_fraction)
        high = bytes_per_token_of(predict(weights, rng.high, dtype, carried=carried)[0], weights.expert_fraction)
        fp.decode_tok_s = decode_tok_s(round(low + share * (high - low)), hardware)
    fp.notes.append(f"at most (decode: at least): the search fills the budget with {rng.cheapest} and "
                    f"{rng.dearest}, and may leave layers unquantized")


# --- recipes ---------------------------------------------------------------------------------


def model_folder(recipe: Any, run_dir: Any = None, source_key: str | None = None) -> tuple[Path | None, str]:
    """The model folder a footprint can be read from: the run's current source output, or a local source."""
    if run_dir is not None and source_key is not None and run_dir.is_complete("source", source_key):
        try:
            folder = run_dir.output("source", "model_dir")
        except KeyError:
            folder = None
        if folder is not None and (folder / "config.json").is_file():
            return folder, f"the run's source step ({folder})"
    source = recipe.model.source
    if source.kind == "local" and (source.path / "config.json").is_file() and (
            has_safetensors(source.path) or (source.path / LISTING).is_file()):
        return source.path, f"model.source.path ({source.path})"
    shapes = recipe.model.shapes
    if shapes is not None and (shapes / "config.json").is_file() and (shapes / LISTING).is_file():
        return shapes, f"model.shapes ({shapes}: the model's config, no weights)"
    return None, UNKNOWN_UNTIL_SOURCE


def recipe_footprints(recipe: Any, weights: Weights, hardware: Hardware | None,
                      names: list[str] | None = None) -> list[Footprint]:
    """Each chosen (else each enabled) strategy's footprint, with the exclusions the worker applies;
    decode speed on `hardware` (the recipe's benchmark.hardware, read by runner/benchmark/prediction.py)."""
    out = []
    carried = carry_patterns(recipe)
    chosen = set(names) if names is not None else None
    for strategy in recipe.quantization.strategies:
        if (chosen is not None and strategy.name not in chosen) or (names is None and not strategy.enabled):
            continue
        out.append(strategy_footprint(weights, strategy, recipe.quantization.exclusions(strategy),
                                      hardware, recipe.model.dtype, carried))
    return out


def carry_patterns(recipe: Any) -> tuple[tuple[str, str], ...]:
    """What the recipe's `carry_tensors` export fix-ups carry: (pattern, dtype) in fix-up order
    (schema.ExportSpec.accounting, the TensorAccounting verify checks the export against)."""
    return recipe.export.accounting().carried


SOURCE = "(source)"  # the source footprint's row


def source_footprint(recipe: Any, weights: Weights, hardware: Hardware | None) -> Footprint:
    """The unquantized model as the worker loads it, for comparison."""
    formats: dict[str, str | None] = {m: None for m in weights.linears}
    fp = Footprint(SOURCE, f"unquantized {recipe.model.dtype}", hardware=hardware.name if hardware else None)
    sizes, fp.effective_bits = predict(weights, formats, recipe.model.dtype)
    fp.checkpoint_bytes = sum(sizes.values())
    fp.decode_tok_s = _decode(sizes, hardware, weights)
    fp.bytes_per_token = bytes_per_token_of(sizes, weights.expert_fraction)
    fp.formats = _counts(weights, formats, recipe.model.dtype)
    if weights.dropped:
        carried = carried_tensors(weights, carry_patterns(recipe))
        fp.notes.append(f"{weights.dropped_bytes / 1e9:.2f} GB of source tensors a causal-LM load drops "
                        f"({', '.join(DROPPED_ON_LOAD)}) are not counted"
                        + (f"; the export's carry_tensors fix-ups put {len(carried)} of them back unquantized, "
                           "counted in each strategy's size" if carried else ""))
    return fp
