"""ModelOpt's quantization configs read as data, and its quant_cfg applied to module names (no torch,
no ModelOpt import).

A preset (`NVFP4_AWQ_LITE_CFG`) or a ModelOpt recipe (`general/ptq/...`) is the ordered quant_cfg list
of its YAML in the installed `modelopt_recipes` package (ModelOpt >= 0.44 defines its presets there);
the entries are applied in order to `<module>.weight_quantizer` and `<module>.input_quantizer` (fnmatch,
later entries win), as `set_quantizer_by_cfg` does, and the resulting quantizer cfgs are named as
ModelOpt's export names the format. Without `modelopt_recipes` on the host, presets fall back to their
family (PRESET_FAMILY below) and ModelOpt recipes are "unknown".
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runner.quantization import Unknown
from runner.quantization.bits import format_name
from runner.quantization.exclusions import DEFAULT_DISABLED, matches
from runner.quantization.modelopt_recipes import parse_yaml_file, recipes_root

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

# Every preset name a recipe may give (`preset:`, `auto_quantize.formats`), checked by the schema
# without importing ModelOpt (and torch).
MODELOPT_PRESETS = tuple(PRESET_FILES)

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

_EXMY = re.compile(r"^[Ee](\d+)[Mm](\d+)$")


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
        return QuantConfig(preset, quant_cfg_entries(data.get("quant_cfg")), data.get("algorithm"),
                           data.get("effective_bits"))
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
    return QuantConfig(name, quant_cfg_entries(quantize.get("quant_cfg")), quantize.get("algorithm"),
                       quantize.get("effective_bits"))


def quant_cfg_entries(quant_cfg: Any) -> list[dict[str, Any]]:
    """A quant_cfg (list form; the deprecated `{"*glob*": cfg}` entries read as ModelOpt reads them) as
    `{quantizer_name, cfg | enable}` entries."""
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


def quantizer_cfg(config: QuantConfig, quantizer: str, parent: str = "nn.Linear") -> Any | None:
    """The cfg a quantizer ends up with after the ordered entries (None: disabled)."""
    enabled, cfg = True, {"num_bits": 8}  # ModelOpt's default quantizer: 8-bit, enabled
    for entry in config.entries:
        if entry.get("parent_class") not in (None, parent):
            continue
        if not matches(entry["quantizer_name"], quantizer):
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
