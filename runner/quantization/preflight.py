"""Checks a strategy must pass before a quantize worker starts, read from the model's config.json and
safetensors headers and from ModelOpt's recipe files (no torch):

- a ModelOpt recipe written for one model type (`huggingface/qwen3_5_moe/ptq/...`) on another;
- a strategy that would quantize none of this model's Linear layers (an experts-only recipe on a
  dense model, exclusions that cover everything);
- a format whose export packs whole blocks (INT4) on layers its blocks do not fit;
- a calibration ModelOpt runs only on CUDA, where the worker will have no NVIDIA GPU.

`recipe validate` and `plan` check them where the model's shapes are known, `recipe run` before its
first step (runner/plan_checks.py locates each refusal in the recipe), and the quantize step again when
it starts.

Each refusal is one sentence that names the cause and what to do instead.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from runner.quantization import Unknown, footprint
from runner.quantization.bits import WHOLE_BLOCKS_ONLY, base_format, block_of
from runner.quantization.formats import quant_algo_of
from runner.quantization.layout import describe_layout, kept_layers
from runner.quantization.modelopt_config import QuantConfig, quantizer_cfg
from runner.quantization.weights import Weights, load_weights


def host_has_gpu() -> bool:
    """An NVIDIA GPU on this machine (both executors run their workers here)."""
    return Path("/dev/nvidia0").exists() or (shutil.which("nvidia-smi") is not None
                                             and os.environ.get("CUDA_VISIBLE_DEVICES") != "")


def model_type(model_dir: Path) -> str | None:
    try:
        config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return config.get("model_type")


def recipe_model_type(name: str) -> str | None:
    """`huggingface/qwen3_5_moe/ptq/x` is written for model_type qwen3_5_moe."""
    parts = name.split("/")
    return parts[1] if len(parts) > 2 and parts[0] == "huggingface" else None


def needs_cuda(config: QuantConfig) -> str | None:
    """What in a config ModelOpt 0.47 calibrates only on CUDA, or None."""
    algorithm = config.algorithm
    method = algorithm.get("method") if isinstance(algorithm, dict) else algorithm
    if method in CUDA_ONLY_ALGORITHMS:
        return f"the {method} calibration algorithm"
    for entry in config.entries:
        cfg = entry.get("cfg")
        for item in cfg if isinstance(cfg, list) else [cfg]:
            if not isinstance(item, dict) or entry.get("enable") is False:
                continue
            blocks = item.get("block_sizes") or {}
            bits = item.get("num_bits")
            bits = tuple(bits) if isinstance(bits, list) else bits
            scale = blocks.get("scale_bits")
            scale = tuple(scale) if isinstance(scale, list) else scale
            if bits == (2, 1) and scale == (4, 3) and blocks.get("type") == "static":
                return "static NVFP4 weight scales (ModelOpt computes them with a CUDA kernel)"
            if scale == (8, 0):
                return "MX block scaling (ModelOpt's MX kernels are a CUDA extension)"
    return None


# Calibration algorithms whose ModelOpt 0.47 implementation needs CUDA (measured with
# bench/modelopt_recipes_cpu.py on a CPU-only machine).
CUDA_ONLY_ALGORITHMS: set[str] = set()


def strategy_refusal(strategy: Any, exclude: list[str], model_dir: Path | None, gpus: int | None = None,
                     engine: Any = None, check_machine: bool = True,
                     weights: Weights | None = None, no_gpu: str = "this machine has none") -> str | None:
    """Why this strategy cannot run on this model here (or serve on `engine`, a runner/serving Engine that
    says which exports it refuses), or None. `gpus`: the
    GPUs the worker will have (0: none whatever this machine has); None asks this machine. `no_gpu`
    says how it is known that there is none. `check_machine` False leaves the GPU question out (recipe
    validate/plan may run on another machine than the run). `weights`: model_dir's, already read (a
    recipe's strategies share them and what was computed from them)."""
    if strategy.auto_quantize is not None:
        return None
    if getattr(strategy, "layout", None) is not None:
        # A layout's entries depend on the model's decoder-layer count (keep_first/keep_last/keep_layers).
        if weights is None and model_dir is not None and (model_dir / "config.json").is_file():
            try:
                weights = load_weights(model_dir)
            except (Unknown, OSError, ValueError):
                return None
        if weights is None or weights.num_layers is None:
            return None  # the model is not known yet: the quantize step checks again
        try:
            kept_layers(strategy.layout, weights.num_layers)
        except ValueError as exc:
            return f"strategy {strategy.name}: {exc}; name layers the model has"
        what = f"layout ({describe_layout(strategy.layout, weights.num_layers).removeprefix('layout: ')})"
    else:
        what = f"preset {strategy.preset}" if strategy.preset else f"ModelOpt recipe {strategy.modelopt_recipe}"
    try:
        config = footprint.strategy_config(strategy, weights.num_layers if weights is not None else None)
    except Unknown:
        return None  # not readable here (no modelopt_recipes on this host): the worker decides
    if strategy.modelopt_recipe and model_dir is not None:
        wanted, actual = recipe_model_type(strategy.modelopt_recipe), model_type(model_dir)
        # A VL model's language model alone says `<type>_text` (qwen3_5_text): the same family.
        if wanted and actual and wanted != actual.removesuffix("_text"):
            return (f"{what} is written for {wanted} models (its module names and layout); this model is "
                    f"{actual}: use a general/ptq/ recipe or one under huggingface/{actual}/")
    cuda_only = _needs_cuda_once(config)
    if cuda_only and check_machine and not (host_has_gpu() if gpus is None else gpus > 0):
        return (f"{what} uses {cuda_only}, which ModelOpt runs only on a CUDA GPU, and {no_gpu}: "
                "run it on a GPU machine, or use a dynamic-scale recipe (e.g. general/ptq/nvfp4_default-kv_fp8)")
    if model_dir is None or not (model_dir / "config.json").is_file():
        return None
    if weights is None:
        try:
            weights = load_weights(model_dir)
        except (Unknown, OSError, ValueError):
            return None
    # what the layers decide, once per distinct (config, exclusions, engine) for these weights
    key = ("refusal", config.name, config.source, tuple(exclude), getattr(engine, "name", None))
    if key not in weights.memo:
        weights.memo[key] = _layer_refusal(weights, config, what, exclude, engine)
    why = weights.memo[key]
    if why is None:
        return None
    named, text = why
    return f"strategy {strategy.name} {text}" if named else text


_CUDA_NEED: dict[tuple[str, str], str | None] = {}


def _needs_cuda_once(config: QuantConfig) -> str | None:
    key = (config.name, config.source)
    if key not in _CUDA_NEED:
        _CUDA_NEED[key] = needs_cuda(config)
    return _CUDA_NEED[key]


def _layer_refusal(weights: Weights, config: QuantConfig, what: str, exclude: list[str],
                   engine: Any) -> tuple[bool, str] | None:
    """What the model's layers refuse; (True, text): the text follows "strategy NAME "."""
    formats = {m: f for m, f in footprint.strategy_formats(weights, config, exclude).items() if f}
    if formats:
        unpackable = _partial_blocks(weights, formats)
        if unpackable:
            module, fmt, (rows, cols), block = unpackable[0]
            more = f" (and {len(unpackable) - 1} more)" if len(unpackable) > 1 else ""
            return False, (f"{what} gives {module} ({rows} x {cols}) {fmt} with blocks of {block} weights, and "
                           f"ModelOpt's export packs only whole blocks ({cols} input features is not a multiple "
                           f"of {block}{'' if rows % 2 == 0 else f', or {rows} output features is odd'}){more}: "
                           "exclude such layers, or choose a format with smaller blocks (e.g. NVFP4_DEFAULT_CFG)")
        if engine is not None:
            algos = {quant_algo_of(base_format(f)) for f in formats.values()}
            fp8_weight_only = _weight_only_fp8(weights, config, exclude, formats)
            refusal = engine.export_refusal(what, algos, fp8_weight_only)
            if refusal is not None:
                return False, refusal
        return None
    if exclude and any(footprint.strategy_formats(weights, config, []).values()):
        return True, (f"would quantize no layer: the recipe's exclusions {exclude} cover every layer the {what} "
                      "quantizes; narrow them")
    return True, (f"would quantize no layer: the {what}'s patterns match none of this model's Linear layers (e.g. "
                  "an experts-only recipe on a dense model); pick one written for it")


def _partial_blocks(weights: Weights, formats: dict[str, str]) -> list[tuple[str, str, tuple[int, int], int]]:
    """The Linears whose format packs whole blocks that their shape cannot fill."""
    out = []
    for module, fmt in formats.items():
        if base_format(fmt) not in WHOLE_BLOCKS_ONLY:
            continue
        rows, cols = weights.linears[module].shape
        block = block_of(fmt) or 1
        if cols % block or rows % 2:
            out.append((module, fmt, (rows, cols), block))
    return out


def _weight_only_fp8(weights: Weights, config: QuantConfig, exclude: list[str],
                     formats: dict[str, str]) -> list[str]:
    """The FP8 Linears whose input is not quantized, once per distinct (config, exclusions)."""
    key = ("weight-only fp8", config.name, config.source, tuple(exclude))
    if key not in weights.memo:
        with_exclusions = config.with_exclusions(exclude)
        weights.memo[key] = sorted(m for m, f in formats.items() if f == "fp8" and quantizer_cfg(
            with_exclusions, f"{m}.input_quantizer") is None)
    return weights.memo[key]
