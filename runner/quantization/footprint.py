"""What a strategy will weigh, known before any GPU work: formats per Linear, effective bits, checkpoint
size, decode speed, and the effective-bits range an auto_quantize strategy can reach.

Read from the model folder's config.json and safetensors headers only (names, dtypes, shapes; no
torch). Which Linear gets which format follows ModelOpt's own rules, read as data:

- a preset (`NVFP4_AWQ_LITE_CFG`) or a ModelOpt recipe (`general/ptq/...`) is the ordered quant_cfg
  list of its YAML in the installed `modelopt_recipes` package (ModelOpt >= 0.44 defines its presets
  there), with the recipe's exclusions appended as `{quantizer_name: GLOB, enable: false}` exactly as
  the worker does; the entries are applied in order to `<module>.weight_quantizer` and
  `<module>.input_quantizer` (fnmatch, later entries win), as `set_quantizer_by_cfg` does. Without
  `modelopt_recipes` on the host, presets fall back to their family (PRESET_FAMILY below) and
  ModelOpt recipes are "unknown".
- auto_quantize ignores a preset's own exclusions: the worker passes DEFAULT_DISABLED + the recipe's
  exclusions as `disabled_layers` (module-name globs), and the search may give every other Linear
  any of the candidate formats. ModelOpt's effective-bits count (what its constraint enforces) is
  reproduced in `auto_range`: see runner/quantization/bits.py for both definitions.

Source tensors that the worker's causal-LM load drops (MTP heads, a Qwen3.5 vision tower: transformers'
`_keys_to_ignore_on_load_unexpected`) are not part of the export and are left out (and counted in
`dropped_bytes`).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runner.quantization.bits import (
    DEFINITION,
    DTYPE_BITS,
    LAYOUTS,
    MODELOPT_DEFINITION,
    base_format,
    bits_of,
    format_name,
)
from runner.quantization.modelopt_recipes import parse_yaml_file, recipes_root
from runner.quantization.safetensors_headers import Tensor, has_safetensors, read_headers

# Module-name globs that auto_quantize must never quantize (its `disabled_layers`; ModelOpt's presets
# disable the same through configs/ptq/units/default_disabled_quantizers.yaml, but auto_quantize
# ignores the presets' exclusions). ModelOpt 0.47's own list for auto_quantize recipes
# (configs/auto_quantize/units/base_disabled_layers.yaml) plus the output head, vision towers and MTP
# heads, and routers named exactly `mlp.gate` (a module name has no trailing dot).
DEFAULT_DISABLED = [
    "*lm_head*", "*router*", "*mlp.gate", "*mlp.gate.*", "*block_sparse_moe.gate*", "*shared_expert_gate*",
    "*mlp.shared_expert_gate.*", "*linear_attn.conv1d*", "*self_attention.conv1d*", "*mixer.conv1d*",
    "*linear_attn.in_proj_a*", "*linear_attn.in_proj_b*", "*visual*", "*vision*", "*embed_vision*",
    "*vision_tower*", "*multi_modal_projector*", "*mtp*", "*output_layer*", "*proj_out.*", "output.*",
]

# Tensors a causal-LM load ignores (transformers' Qwen3_5ForCausalLM: `^mtp.*`, `^model.visual.*`).
DROPPED_ON_LOAD = ["mtp.*", "model.mtp.*", "model.visual.*"]

# ModelOpt 0.47's presets -> their YAML under modelopt_recipes/ (modelopt/torch/quantization/config.py
# loads each preset from one of these files; tests/test_footprint.py checks the table against it).
PRESET_FILES = {
    "FP8_DEFAULT_CFG": "model/fp8", "FP8_PER_CHANNEL_PER_TOKEN_CFG": "model/fp8_per_channel_per_token",
    "FP8_2D_BLOCKWISE_WEIGHT_ONLY_CFG": "model/fp8_2d_blockwise_weight_only", "FP8_KV_CFG": "kv/fp8",
    "FP8_AFFINE_KV_CFG": "kv/fp8_affine", "INT8_DEFAULT_CFG": "model/int8",
    "INT8_SMOOTHQUANT_CFG": "model/int8_smoothquant", "INT8_WEIGHT_ONLY_CFG": "model/int8_weight_only",
    "INT4_AWQ_CFG": "model/int4_awq", "INT4_BLOCKWISE_WEIGHT_ONLY_CFG": "model/int4_blockwise_weight_only",
    "W4A8_AWQ_BETA_CFG": "model/w4a8_awq_beta", "MXFP8_DEFAULT_CFG": "model/mxfp8",
    "MXFP4_DEFAULT_CFG": "model/mxfp4", "MXINT8_DEFAULT_CFG": "model/mxint8", "NVFP4_DEFAULT_CFG": "model/nvfp4",
    "NVFP4_AWQ_LITE_CFG": "model/nvfp4_awq_lite", "NVFP4_AWQ_CLIP_CFG": "model/nvfp4_awq_clip",
    "NVFP4_AWQ_FULL_CFG": "model/nvfp4_awq_full", "NVFP4_MLP_ONLY_CFG": "model/nvfp4_mlp_only",
    "NVFP4_OMLP_ONLY_CFG": "model/nvfp4_omlp_only", "NVFP4_MLP_WEIGHT_ONLY_CFG": "model/nvfp4_mlp_weight_only",
    "NVFP4_EXPERTS_ONLY_CFG": "model/nvfp4_experts_only", "NVFP4_SVDQUANT_DEFAULT_CFG": "model/nvfp4_svdquant",
    "W4A16_NVFP4_CFG": "model/w4a16_nvfp4", "NVFP4_KV_CFG": "kv/nvfp4", "NVFP4_AFFINE_KV_CFG": "kv/nvfp4_affine",
    "NVFP4_KV_ROTATE_CFG": "kv/nvfp4_rotate", "NVFP4_FP8_MHA_CONFIG": "model/nvfp4_fp8_mha",
}

# The fallback when modelopt_recipes is not installed on the host: a preset's family decides its
# weight format, whether activations are quantized, and which Linears it covers (first match wins).
_NVFP4 = {"num_bits": (2, 1), "block_sizes": {-1: 16, "type": "dynamic", "scale_bits": (4, 3)}, "effective_bits": 4.5}
_FP8 = {"num_bits": (4, 3)}
_MXFP8 = {"num_bits": (4, 3), "block_sizes": {-1: 32, "type": "dynamic", "scale_bits": (8, 0)}}
_MXFP4 = {"num_bits": (2, 1), "block_sizes": {-1: 32, "type": "dynamic", "scale_bits": (8, 0)}}
_INT4 = {"num_bits": 4, "block_sizes": {-1: 128, "type": "static"}}
PRESET_FAMILY: list[tuple[str, dict[str, Any] | None, bool, tuple[str, ...]]] = [
    # (preset name regex, weight cfg (None: quantizes no Linear), activations too, module scopes)
    (r".*_KV(_.*)?_CFG$", None, False, ()),
    (r"^NVFP4_MLP_WEIGHT_ONLY_CFG$", {**_NVFP4, "block_sizes": {-1: 32, "type": "dynamic", "scale_bits": (4, 3)}},
     False, ("*mlp*", "*block_sparse_moe*")),
    (r"^NVFP4_MLP_ONLY_CFG$", _NVFP4, True, ("*mlp*", "*block_sparse_moe*", "*.experts.*")),
    (r"^NVFP4_OMLP_ONLY_CFG$", _NVFP4, True, ("*o_proj*", "*mlp*", "*block_sparse_moe*")),
    (r"^NVFP4_EXPERTS_ONLY_CFG$", _NVFP4, True, ("*block_sparse_moe*", "*.experts.*")),
    (r"^W4A16_NVFP4_CFG$", _NVFP4, False, ("*",)),
    (r"^NVFP4_", _NVFP4, True, ("*",)),
    (r"^FP8_2D_BLOCKWISE_WEIGHT_ONLY_CFG$", _FP8, False, ("*",)),
    (r"^FP8_", _FP8, True, ("*",)),
    (r"^MXFP8_", _MXFP8, True, ("*",)),
    (r"^MXFP4_", _MXFP4, True, ("*",)),
    (r"^(INT4_|W4A8_AWQ)", _INT4, False, ("*",)),
    (r"^(INT8_|MXINT8_)", {"num_bits": 8}, True, ("*",)),
]

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

_EMBEDDING = re.compile(r"(embed|(^|\.)(wte|wpe)$)")


def is_embedding(module: str) -> bool:
    """An embedding table (never a Linear: not counted in bits, never quantized by vLLM's ModelOpt loader)."""
    return bool(_EMBEDDING.search(module))
_EXMY = re.compile(r"^[Ee](\d+)[Mm](\d+)$")
UNKNOWN_UNTIL_SOURCE = "footprint: unknown until the source step has run"


class Unknown(Exception):
    """The footprint cannot be predicted; the message says why (never a guessed number)."""


# --- the model, from its headers -------------------------------------------------------------


@dataclass
class Weights:
    """A model folder as the worker will load it: its tensors, Linear and Conv weights."""

    tensors: dict[str, Tensor]  # what the causal-LM load keeps
    linears: dict[str, Tensor]  # module name -> 2-D weight (a tied lm_head included: it counts in bits)
    convs: dict[str, Tensor]  # module name -> weight of a convolution (ModelOpt counts these)
    dropped_bytes: int = 0
    expert_fraction: float | None = None  # a MoE token reads this share of the routed experts' bytes
    # What was computed from these weights, by what decides it (strategy_footprint, strategy_formats):
    # thousands of strategies that differ only in name cost one computation.
    memo: dict[Any, Any] = field(default_factory=dict, repr=False, compare=False)


LISTING = "tensors.json"


def load_weights(folder: Path) -> Weights:
    """The model's weights from its safetensors headers, or, in a folder without weights, from the
    tensor listing the worker made on the meta device (recipes/models/*/tensors.json)."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise Unknown(f"{folder} has no config.json")
    everything = read_headers(folder)
    if not everything and (folder / LISTING).is_file():
        everything = read_listing(folder / LISTING)
    if not everything:
        raise Unknown(f"no safetensors in {folder}")
    tensors = {n: t for n, t in everything.items() if not any(fnmatch.fnmatchcase(n, p) for p in DROPPED_ON_LOAD)}
    linears: dict[str, Tensor] = {}
    convs: dict[str, Tensor] = {}
    for name, tensor in tensors.items():
        if not name.endswith(".weight"):
            continue
        module = name.removesuffix(".weight")
        if len(tensor.shape) == 2 and not is_embedding(module):
            linears[module] = tensor
        elif 3 <= len(tensor.shape) <= 5 and "conv" in module.rsplit(".", 1)[-1]:
            convs[module] = tensor
    if not any(m == "lm_head" or m.endswith(".lm_head") for m in linears):
        embedding = next((t for n, t in tensors.items() if n.endswith("embed_tokens.weight")), None)
        if embedding is not None:  # the head exists in the model, sharing the embedding's weight
            linears["lm_head"] = Tensor("lm_head.weight", embedding.dtype, embedding.shape)
    dropped = sum(t.nbytes for n, t in everything.items() if n not in tensors)
    from runner.benchmark.prediction import active_expert_fraction

    return Weights(tensors, linears, convs, dropped, active_expert_fraction(folder / "config.json"))


def read_listing(path: Path) -> dict[str, Tensor]:
    """A tensor listing (runner/worker/model_loading.py) as the export names its tensors.

    transformers keeps a MoE layer's experts fused (`experts.gate_up_proj` [E, 2I, H],
    `experts.down_proj` [E, H, I]); ModelOpt quantizes and exports them as one Linear per expert and
    projection (`experts.0.gate_proj`, ...), which is what formats and sizes are counted over.
    """
    import json

    listing = json.loads(path.read_text(encoding="utf-8"))
    out: dict[str, Tensor] = {}
    for name, (dtype, shape) in listing["tensors"].items():
        prefix, _, leaf = name.rpartition(".")
        if prefix.endswith(".experts") and len(shape) == 3:
            experts, rows, cols = shape
            parts = [("gate_proj", rows // 2), ("up_proj", rows // 2)] if leaf == "gate_up_proj" else [(leaf, rows)]
            for e in range(experts):
                for part, part_rows in parts:
                    key = f"{prefix}.{e}.{part}.weight"
                    out[key] = Tensor(key, dtype, (part_rows, cols))
        else:
            out[name] = Tensor(name, dtype, tuple(shape))
    return out


# --- ModelOpt's configs, read as data ----------------------------------------------------------


def _exmy(obj: Any) -> Any:
    """`e2m1` -> (2, 1) under num_bits / scale_bits, as ModelOpt's loader does."""
    if isinstance(obj, dict):
        return {k: (_parse_exmy(v) if k in ("num_bits", "scale_bits") and isinstance(v, str) else _exmy(v))
                for k, v in obj.items()}
    if isinstance(obj, list):
        return [_exmy(v) for v in obj]
    return obj


def _parse_exmy(text: str) -> Any:
    m = _EXMY.match(text)
    return (int(m.group(1)), int(m.group(2))) if m else text


def load_modelopt_yaml(root: Path, name: str) -> Any:
    """A ModelOpt config file with its `imports:` / `$import` resolved (list snippets spliced)."""
    return _load_yaml(root, name, ())


def _load_yaml(root: Path, name: str, seen: tuple[str, ...]) -> Any:
    path = next((root / f"{name}{ext}" for ext in ("", ".yaml", ".yml") if (root / f"{name}{ext}").is_file()), None)
    if path is None:
        raise Unknown(f"ModelOpt config {name!r} is not in {root}")
    if str(path) in seen:
        raise Unknown(f"ModelOpt config {name!r} imports itself")
    docs = parse_yaml_file(path)
    if not docs or docs[0] is None:
        return {}
    if len(docs) == 2:
        header, body = docs
        if isinstance(body, list):
            imports = (header or {}).get("imports") or {}
        else:
            body = {**(header or {}), **(body or {})}
            imports = body.pop("imports", None) or {}
    else:
        body = dict(docs[0]) if isinstance(docs[0], dict) else docs[0]  # the parsed documents are shared
        imports = (body.pop("imports", None) or {}) if isinstance(body, dict) else {}
    body = _exmy(body)
    loaded = {key: _load_yaml(root, ref, (*seen, str(path))) for key, ref in imports.items()}
    return _resolve(body, loaded)


def _resolve(obj: Any, imports: dict[str, Any]) -> Any:
    if isinstance(obj, dict):
        if "$import" in obj:
            refs = obj["$import"] if isinstance(obj["$import"], list) else [obj["$import"]]
            merged: dict[str, Any] = {}
            for ref in refs:
                if ref not in imports or not isinstance(imports[ref], dict):
                    raise Unknown(f"cannot resolve $import {ref!r}")
                merged.update(imports[ref])
            merged.update({k: v for k, v in obj.items() if k != "$import"})
            return _resolve(merged, imports)
        return {k: _resolve(v, imports) for k, v in obj.items()}
    if isinstance(obj, list):
        out: list[Any] = []
        for item in obj:
            if isinstance(item, dict) and set(item) == {"$import"} and isinstance(item["$import"], str):
                if item["$import"] not in imports:
                    raise Unknown(f"cannot resolve $import {item['$import']!r}")
                value = imports[item["$import"]]
                out.extend(value if isinstance(value, list) else [value])  # splice a list, append a dict
            else:
                out.append(_resolve(item, imports))
        return out
    return obj


@dataclass
class QuantConfig:
    """A quantization config as ModelOpt applies it: ordered quant_cfg entries, algorithm."""

    name: str
    entries: list[dict[str, Any]]
    algorithm: Any = None
    effective_bits: float | None = None  # a recipe-level override of ModelOpt's cost
    source: str = "modelopt_recipes"  # or "preset family" (the fallback)

    def with_exclusions(self, exclude: list[str]) -> QuantConfig:
        extra = [{"quantizer_name": p, "enable": False} for p in exclude]
        return QuantConfig(self.name, [*self.entries, *extra], self.algorithm, self.effective_bits, self.source)


def preset_config(preset: str) -> QuantConfig:
    """A ModelOpt preset as its YAML in modelopt_recipes says (else its family), read once per process:
    the config is shared, never change it (`with_exclusions` makes a new one)."""
    return _preset_config(recipes_root(), preset)


@functools.lru_cache(maxsize=256)
def _preset_config(root: Path | None, preset: str) -> QuantConfig:
    if root is not None and preset in PRESET_FILES:
        data = load_modelopt_yaml(root, f"configs/ptq/presets/{PRESET_FILES[preset]}")
        return QuantConfig(preset, _entries(data.get("quant_cfg")), data.get("algorithm"), data.get("effective_bits"))
    for pattern, weight, activations, scopes in PRESET_FAMILY:
        if re.search(pattern, preset):
            entries: list[dict[str, Any]] = [{"quantizer_name": "*", "enable": False}]
            for scope in scopes if weight is not None else ():
                entries.append({"quantizer_name": f"{scope}weight_quantizer", "cfg": weight})
                if activations:
                    entries.append({"quantizer_name": f"{scope}input_quantizer", "cfg": weight})
            entries += [{"quantizer_name": g if g.endswith("*") else f"{g}.*", "enable": False}
                        for g in DEFAULT_DISABLED]
            return QuantConfig(preset, entries, None, None, source="preset family")
    raise Unknown(f"no rule for preset {preset!r}")


def recipe_config(name: str) -> QuantConfig:
    """A ModelOpt PTQ recipe (`general/ptq/nvfp4_default-kv_fp8_cast`) from the installed wheel, read once
    per process (shared, like preset_config's)."""
    return _recipe_config(recipes_root(), name)


@functools.lru_cache(maxsize=256)
def _recipe_config(root: Path | None, name: str) -> QuantConfig:
    if root is None:
        raise Unknown("modelopt_recipes is not installed on this host")
    if (root / name).is_dir():
        raise Unknown(f"ModelOpt recipe {name!r} is a folder recipe; only single-file recipes are read")
    data = load_modelopt_yaml(root, name)
    kind = (data.get("metadata") or {}).get("recipe_type")
    quantize = data.get("quantize")
    if kind not in (None, "ptq") or not isinstance(quantize, dict):
        raise Unknown(f"ModelOpt recipe {name!r} is not a PTQ recipe with a quantize section")
    return QuantConfig(name, _entries(quantize.get("quant_cfg")), quantize.get("algorithm"),
                       quantize.get("effective_bits"))


def _entries(quant_cfg: Any) -> list[dict[str, Any]]:
    if not isinstance(quant_cfg, list):
        raise Unknown("quant_cfg is not a list (ModelOpt >= 0.44 format)")
    out = []
    for entry in quant_cfg:
        if isinstance(entry, dict) and "quantizer_name" in entry:
            out.append(entry)
        elif isinstance(entry, dict) and len(entry) == 1:  # the deprecated {"*glob*": cfg} form
            (glob, cfg), = entry.items()
            out.append({"quantizer_name": glob, **({"enable": cfg["enable"]} if set(cfg) == {"enable"}
                                                   else {"cfg": cfg})})
        else:
            raise Unknown(f"unreadable quant_cfg entry {entry!r}")
    return out


@functools.cache
def _glob(pattern: str) -> Callable[[str], Any]:
    """A compiled fnmatch (ModelOpt matches quantizer names with fnmatch; on POSIX it is case-sensitive).
    A MoE model has tens of thousands of expert Linears and each is matched against every entry."""
    return re.compile(fnmatch.translate(pattern)).match


def quantizer_cfg(config: QuantConfig, quantizer: str, parent: str = "nn.Linear") -> Any | None:
    """The cfg a quantizer ends up with after the ordered entries (None: disabled)."""
    enabled, cfg = True, {"num_bits": 8}  # ModelOpt's default quantizer: 8-bit, enabled
    for entry in config.entries:
        if entry.get("parent_class") not in (None, parent):
            continue
        if not _glob(entry["quantizer_name"])(quantizer):
            continue
        if entry.get("cfg") is not None:
            cfg, enabled = entry["cfg"], entry.get("enable", True)
        elif "enable" in entry:
            enabled = entry["enable"]
    if not enabled or (isinstance(cfg, dict) and cfg.get("enable") is False):
        return None
    return cfg


def format_of(weight: Any, activation: Any = None) -> str:
    """A Linear's format from its weight and input quantizer cfgs (None: input not quantized), named as
    ModelOpt's export names it (`get_quantization_format`), with a `_bN` suffix for a block size other
    than the format's usual one. The quantize worker names live quantizers with it too."""
    first = weight[0] if isinstance(weight, list) and weight else weight
    if isinstance(weight, list):
        if len(weight) != 2:
            raise Unknown(f"a sequential weight quantizer of {len(weight)} stages has no export format")
        return format_name("w4a8_awq", _block(first))
    bits = _tuple(first.get("num_bits", 8))
    blocks = first.get("block_sizes") or {}
    scale = _tuple(blocks.get("scale_bits"))
    block = _block(first)
    act_bits = _tuple(activation.get("num_bits", 8)) if isinstance(activation, dict) else None
    if bits == 4:
        return format_name("int4_awq", block)
    if bits == 8:
        return "int8_sq" if activation is not None else "int8_wo"
    if bits == (4, 3):
        if blocks:
            return "mxfp8" if scale == (8, 0) and blocks.get("type") == "dynamic" else "fp8_pb_wo"
        return "fp8_pc_pt" if first.get("axis") == 0 else "fp8"
    if bits == (2, 1):
        if scale == (8, 0):
            return format_name("w4a8_mxfp4_fp8" if act_bits == (4, 3) else "mxfp4", block)
        if activation is None:
            return format_name("w4a16_nvfp4", block)
        return format_name("w4a8_nvfp4_fp8" if act_bits == (4, 3) else "nvfp4", block)
    raise Unknown(f"weight format num_bits={bits!r} has no export format")


def _tuple(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def _block(cfg: Any) -> int | None:
    blocks = (cfg or {}).get("block_sizes") or {}
    block = blocks.get(-1, blocks.get("-1"))
    return int(block) if block else None


_EXPERT_INDEX = re.compile(r"(\.experts\.)\d+(\.)")
_DIGIT_RUN = re.compile(r"\d+")


def _blind_to_expert_index(config: QuantConfig) -> bool:
    """No entry can tell two routed experts of a layer apart: its glob has no `?` or `[`, and each digit
    run in it follows a letter (`conv1d`) or `layers.` (a layer index), neither of which can stand
    where an expert index does (after `experts.`). An expert index is then matched by `*` alone, so
    every index gives the same result."""
    for entry in config.entries:
        pattern = entry["quantizer_name"]
        if "?" in pattern or "[" in pattern:
            return False
        for m in _DIGIT_RUN.finditer(pattern):
            before = pattern[:m.start()]
            if not (before.endswith("layers.") or (before and (before[-1].isalpha() or before[-1] == "_"))):
                return False
    return True


def module_formats(config: QuantConfig, modules: list[str]) -> dict[str, str | None]:
    """module_format for many modules; a MoE layer's experts (hundreds a layer) are matched once when
    the config cannot tell them apart."""
    blind = _blind_to_expert_index(config)
    seen: dict[str, str | None] = {}
    out: dict[str, str | None] = {}
    for module in modules:
        key = _EXPERT_INDEX.sub(r"\g<1>0\g<2>", module) if blind else module
        if key not in seen:
            seen[key] = module_format(config, key)
        out[module] = seen[key]
    return out


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
        globs = [_glob(p) for p in exclude]
        formats = {m: module_format(full, m) if f is not None and any(
            g(f"{m}.weight_quantizer") or g(f"{m}.input_quantizer") for g in globs) else f for m, f in plain.items()}
    weights.memo[key] = formats
    return formats


def module_format(config: QuantConfig, module: str, parent: str = "nn.Linear") -> str | None:
    """The format a module's weight gets under `config` (None: left unquantized)."""
    weight = quantizer_cfg(config, f"{module}.weight_quantizer", parent)
    if weight is None:
        return None
    return format_of(weight, quantizer_cfg(config, f"{module}.input_quantizer", parent))


def modelopt_cost_bits(config: QuantConfig) -> float:
    """What ModelOpt's auto_quantize charges a weight in this format (`estimate_quant_compression` x 16)."""
    if config.effective_bits is not None:
        return float(config.effective_bits)

    def compression(cfg: Any) -> float:
        if isinstance(cfg, list):
            return min((compression(c) for c in cfg), default=1.0)
        if not cfg.get("enable", True):
            return 1.0
        if cfg.get("effective_bits") is not None:
            return cfg["effective_bits"] / 16
        bits = cfg.get("num_bits")
        if bits is None:
            return 1.0
        if isinstance(bits, (tuple, list)):
            return (sum(bits) + 1) / 16
        if isinstance(bits, int):
            return bits / 16
        raise Unknown(f"ModelOpt cannot cost num_bits={bits!r}")

    cfgs = [e["cfg"] for e in config.entries if e.get("enable", True) is not False and e.get("cfg") is not None]
    return 16 * min((compression(c) for c in cfgs), default=1.0)


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
    hardware: str | None = None
    formats: dict[str, int] = field(default_factory=dict)  # format (or dtype) -> Linear modules
    auto: AutoRange | None = None
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "strategy": self.strategy, "method": self.method, "known": self.known, "reason": self.reason or None,
            "checkpoint_bytes": self.checkpoint_bytes,
            "size_gb": round(self.checkpoint_bytes / 1e9, 2) if self.checkpoint_bytes else None,
            "effective_bits": self.effective_bits, "decode_tok_s": self.decode_tok_s, "hardware": self.hardware,
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
    return {"nvfp4": 8, "w4a16_nvfp4": 4, "fp8": 8, "w4a8_nvfp4_fp8": 8}.get(base_format(fmt), 0)


def predict(weights: Weights, formats: dict[str, str | None], dtype: str | None,
            extra: dict[str, int] | None = None) -> tuple[dict[str, int], float]:
    """Predicted export (tensor name -> bytes) and effective bits for a Linear -> format assignment."""
    sizes: dict[str, int] = {}
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


def _decode(sizes: dict[str, int], hardware: str | None, weights: Weights) -> float | None:
    if not hardware:
        return None
    from runner.benchmark.prediction import bytes_per_token_of, predict_decode_of

    return predict_decode_of(bytes_per_token_of(sizes, weights.expert_fraction), hardware)["predicted_decode_tok_s"]


def _counts(weights: Weights, formats: dict[str, str | None], dtype: str | None) -> dict[str, int]:
    counts: dict[str, int] = {}
    for module, tensor in weights.linears.items():
        fmt = formats.get(module) or (dtype if dtype and tensor.dtype in ("F32", "F16", "BF16") else tensor.dtype)
        counts[fmt] = counts.get(fmt, 0) + 1
    return dict(sorted(counts.items()))


def content_key(strategy: Any) -> tuple[Any, ...]:
    """What of a strategy (schema.Strategy) decides what it does to the weights: not its name,
    description, calibration set or batch size."""
    auto = strategy.auto_quantize
    return (strategy.preset, strategy.modelopt_recipe, auto.model_dump_json() if auto is not None else None,
            strategy.algorithm, strategy.fold_awq_scales)


def strategy_footprint(weights: Weights, strategy: Any, exclude: list[str], hardware: str | None = None,
                       dtype: str | None = None) -> Footprint:
    """The footprint of one recipe strategy (schema.Strategy) with the recipe's exclusions appended.
    Computed once per distinct content (content_key, exclusions, hardware, dtype, ModelOpt's configs)
    for these weights; every strategy gets its own copy under its own name."""
    key = ("footprint", content_key(strategy), tuple(exclude), hardware, dtype, recipes_root())
    fp = weights.memo.get(key)
    if fp is None:
        fp = weights.memo[key] = _strategy_footprint(weights, strategy, exclude, hardware, dtype)
    return dataclasses.replace(fp, strategy=strategy.name, formats=dict(fp.formats), notes=list(fp.notes))


def _strategy_footprint(weights: Weights, strategy: Any, exclude: list[str], hardware: str | None,
                        dtype: str | None) -> Footprint:
    method = (f"preset {strategy.preset}" if strategy.preset else
              f"modelopt_recipe {strategy.modelopt_recipe}" if strategy.modelopt_recipe else "auto_quantize")
    fp = Footprint(strategy.name, method, hardware=hardware)
    try:
        if strategy.auto_quantize is not None:
            _auto_footprint(fp, weights, strategy.auto_quantize, exclude, hardware, dtype)
            return fp
        base = preset_config(strategy.preset) if strategy.preset else recipe_config(strategy.modelopt_recipe)
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
        sizes, fp.effective_bits = predict(weights, formats, dtype, extra)
        fp.checkpoint_bytes = sum(sizes.values())
        fp.decode_tok_s = _decode(sizes, hardware, weights)
        fp.formats = _counts(weights, formats, dtype)
    except Unknown as exc:
        fp.known, fp.reason = False, str(exc)
    return fp


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


def auto_range(weights: Weights, spec: Any, exclude: list[str], dtype: str | None = None) -> AutoRange:
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
        if any(fnmatch.fnmatch(m, g) for m in members for g in disabled_globs):
            disabled.update(members)
    total = sum(t.numel for t in modules.values())
    fixed = sum(modules[m].numel for m in disabled) * 16.0
    free = total - sum(modules[m].numel for m in disabled)
    mo_min = (fixed + free * cost[cheapest]) / total
    mo_max = (fixed + free * cost[dearest]) / total

    low = {m: (kind[cheapest] if m not in disabled else None) for m in weights.linears}
    high = {m: (kind[dearest] if m not in disabled else None) for m in weights.linears}
    low_sizes, low_bits = predict(weights, low, dtype)
    high_sizes, high_bits = predict(weights, high, dtype)
    return AutoRange(
        target=float(spec.effective_bits), modelopt_min=mo_min, modelopt_max=mo_max, min_bits=low_bits,
        max_bits=high_bits, min_bytes=sum(low_sizes.values()), max_bytes=sum(high_sizes.values()),
        cheapest=f"{cheapest} ({kind[cheapest]})", dearest=f"{dearest} ({kind[dearest]})",
        quantizable=sum(1 for m in weights.linears if m not in disabled), disabled=len(disabled), low=low, high=high)


def _auto_footprint(fp: Footprint, weights: Weights, spec: Any, exclude: list[str], hardware: str | None,
                    dtype: str | None) -> None:
    rng = auto_range(weights, spec, exclude, dtype)
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
    if hardware:
        from runner.benchmark.prediction import bytes_per_token_of, predict_decode_of

        low = bytes_per_token_of(predict(weights, rng.low, dtype)[0], weights.expert_fraction)
        high = bytes_per_token_of(predict(weights, rng.high, dtype)[0], weights.expert_fraction)
        fp.decode_tok_s = predict_decode_of(round(low + share * (high - low)), hardware)["predicted_decode_tok_s"]
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


def recipe_footprints(recipe: Any, weights: Weights, names: list[str] | None = None) -> list[Footprint]:
    """Each chosen (else each enabled) strategy's footprint, with the exclusions the worker applies."""
    out = []
    chosen = set(names) if names is not None else None
    for strategy in recipe.quantization.strategies:
        if (chosen is not None and strategy.name not in chosen) or (names is None and not strategy.enabled):
            continue
        out.append(strategy_footprint(weights, strategy, recipe.quantization.exclusions(strategy),
                                      recipe.benchmark.hardware, recipe.model.dtype))
    return out


SOURCE = "(source)"  # the source footprint's row


def source_footprint(recipe: Any, weights: Weights) -> Footprint:
    """The unquantized model as the worker loads it, for comparison."""
    formats: dict[str, str | None] = {m: None for m in weights.linears}
    fp = Footprint(SOURCE, f"unquantized {recipe.model.dtype}", hardware=recipe.benchmark.hardware)
    sizes, fp.effective_bits = predict(weights, formats, recipe.model.dtype)
    fp.checkpoint_bytes = sum(sizes.values())
    fp.decode_tok_s = _decode(sizes, recipe.benchmark.hardware, weights)
    fp.formats = _counts(weights, formats, recipe.model.dtype)
    if weights.dropped_bytes:
        fp.notes.append(f"{weights.dropped_bytes / 1e9:.2f} GB of source tensors a causal-LM load drops "
                        f"({', '.join(DROPPED_ON_LOAD)}) are not counted")
    return fp


def feasibility_problems(loaded: Any, footprints: list[Footprint]) -> list[Any]:
    """An error per auto_quantize strategy whose target lies outside what it can reach, located."""
    from runner.errors import Problem
    from runner.recipe.loader import locate

    problems = []
    index = {s.name: i for i, s in enumerate(loaded.recipe.quantization.strategies)}
    for fp in footprints:
        a = fp.auto
        if a is None or a.feasible:
            continue
        path = ("quantization", "strategies", index[fp.strategy], "auto_quantize", "effective_bits")
        side = ("below the lowest" if a.target < a.modelopt_min else "above the highest")
        why = ("ModelOpt would stop with 'infeasible' after loading the model" if a.target < a.modelopt_min
               else "above it auto_quantize leaves quantizable layers unquantized rather than spend the budget")
        problems.append(Problem(
            f"strategy {fp.strategy!r}: effective_bits {a.target:g} is {side} effective bits this strategy can "
            f"reach with its formats and exclusions: lowest {a.modelopt_min:.4f} (every quantizable Linear "
            f"{a.cheapest}), highest {a.modelopt_max:.4f} (every one {a.dearest}); {why}. Counted as "
            f"{MODELOPT_DEFINITION}; in this project's effective bits ({DEFINITION}) that is "
            f"{a.min_bits:.3f} to {a.max_bits:.3f}",
            path, locate(loaded.locations, path),
            hint=f"set auto_quantize.effective_bits between {math.ceil(a.modelopt_min * 100) / 100:.2f} and "
                 f"{math.floor(a.modelopt_max * 100) / 100:.2f}, or exclude fewer layers"))
    return problems


# Above this many strategies, `table` shows one row per distinct prediction (thousands of rows help
# nobody, and take rich seconds to lay out); `recipe plan --json` has every strategy.
TABLE_ROWS = 60


def table(footprints: list[Footprint], title: str) -> Any:
    """A rich Table of predicted footprints (for `recipe plan`)."""
    from rich.table import Table

    t = Table(title=title)
    for col in ("strategy", "how", "formats (Linear modules)", "checkpoint GB", "effective bits", "decode tok/s"):
        t.add_column(col)
    rows = [_row(fp) for fp in footprints]
    if len(rows) <= TABLE_ROWS:
        for row in rows:
            t.add_row(*row)
        return t
    groups: dict[tuple[str, ...], list[str]] = {}
    for name, *rest in rows:
        groups.setdefault(tuple(rest), []).append(name)
    for rest, names in groups.items():
        label = names[0] if len(names) == 1 else f"{names[0]} and {len(names) - 1} more alike"
        t.add_row(label, *rest)
    t.caption = (f"{len(rows)} strategies, {len(groups)} distinct predictions; `recipe plan --json` lists every "
                 "strategy")
    return t


def _row(fp: Footprint) -> tuple[str, ...]:
    """A footprint's table cells: strategy, how, formats, size, bits, speed."""
    if fp.auto is not None:
        a = fp.auto
        if fp.known:
            bits = (f"<= {fp.effective_bits:.2f} (reach {a.min_bits:.2f}-{a.max_bits:.2f}); auto_quantize's "
                    f"count: target {a.target:g} of {a.modelopt_min:.2f}-{a.modelopt_max:.2f}")
        else:
            bits = f"[red]target {a.target:g} unreachable: {a.modelopt_min:.2f}-{a.modelopt_max:.2f}[/]"
        size = (f"<= {fp.checkpoint_bytes / 1e9:.1f} " if fp.known else "") + \
            f"({a.min_bytes / 1e9:.1f}-{a.max_bytes / 1e9:.1f})"
        speed = f">= {fp.decode_tok_s:.1f}" if fp.decode_tok_s else "-"
        formats = f"{a.quantizable} searched over {a.cheapest.split()[0]}..{a.dearest.split()[0]}, " \
                  f"{a.disabled} disabled"
    elif not fp.known:
        return fp.strategy, fp.method, f"unknown: {fp.reason}", "-", "-", "-"
    else:
        size = f"{fp.checkpoint_bytes / 1e9:.1f}"
        bits = f"{fp.effective_bits:.2f}"
        speed = f"{fp.decode_tok_s:.1f}" if fp.decode_tok_s else "-"
        formats = ", ".join(f"{k} {v}" for k, v in fp.formats.items())
        if fp.strategy != SOURCE and fp.formats and not any(base_format(k) in LAYOUTS for k in fp.formats):
            formats += ": [bold red]quantizes nothing[/]"
    return fp.strategy, fp.method, formats, size, bits, speed
