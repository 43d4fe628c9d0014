"""Checks a strategy must pass before a quantize worker starts, read from the model's config.json and
safetensors headers and from ModelOpt's recipe files (no torch):

- a ModelOpt recipe written for one model type (`huggingface/qwen3_5_moe/ptq/...`) on another;
- a strategy that would quantize none of this model's Linear layers (an experts-only recipe on a
  dense model, exclusions that cover everything);
- a format whose export packs whole blocks (INT4) on layers its blocks do not fit;
- a calibration ModelOpt runs only on CUDA, where the worker will have no NVIDIA GPU.

`recipe validate` and `plan` check them where the model's shapes are known (recipe_problems), `recipe
run` before its first step (run_problems), and the quantize step again when it starts.

Each refusal is one sentence that names the cause and what to do instead.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from runner.quantization import footprint
from runner.quantization.bits import WHOLE_BLOCKS_ONLY, base_format, block_of


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


def needs_cuda(config: footprint.QuantConfig) -> str | None:
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


# Our format names (runner/quantization/bits.py) -> the quant_algo ModelOpt's exporter writes for them.
EXPORT_ALGO = {"nvfp4": "NVFP4", "w4a16_nvfp4": "W4A16_NVFP4", "nvfp4_awq": "NVFP4_AWQ", "fp8": "FP8",
               "fp8_pc_pt": "FP8_PER_CHANNEL_PER_TOKEN", "fp8_pb_wo": "FP8_PB_WO", "mxfp8": "MXFP8", "mxfp4": "MXFP4",
               "int4_awq": "W4A16_AWQ", "w4a8_awq": "W4A8_AWQ", "w4a8_nvfp4_fp8": "W4A8_NVFP4_FP8",
               "w4a8_mxfp4_fp8": "W4A8_MXFP4_FP8", "int8_sq": "W8A8_SQ_PER_CHANNEL", "int8_wo": "INT8_WO"}


def strategy_refusal(strategy: Any, exclude: list[str], model_dir: Path | None, gpus: int | None = None,
                     engine: str | None = None, check_machine: bool = True,
                     weights: footprint.Weights | None = None, no_gpu: str = "this machine has none") -> str | None:
    """Why this strategy cannot run on this model here (or serve on `engine`), or None. `gpus`: the
    GPUs the worker will have (0: none whatever this machine has); None asks this machine. `no_gpu`
    says how it is known that there is none. `check_machine` False leaves the GPU question out (recipe
    validate/plan may run on another machine than the run). `weights`: model_dir's, already read (a
    recipe's strategies share them and what was computed from them)."""
    if strategy.auto_quantize is not None:
        return None
    try:
        config = (footprint.preset_config(strategy.preset) if strategy.preset
                  else footprint.recipe_config(strategy.modelopt_recipe))
    except footprint.Unknown:
        return None  # not readable here (no modelopt_recipes on this host): the worker decides
    what = f"preset {strategy.preset}" if strategy.preset else f"ModelOpt recipe {strategy.modelopt_recipe}"
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
            weights = footprint.load_weights(model_dir)
        except (footprint.Unknown, OSError, ValueError):
            return None
    # what the layers decide, once per distinct (config, exclusions, engine) for these weights
    key = ("refusal", config.name, config.source, tuple(exclude), engine)
    if key not in weights.memo:
        weights.memo[key] = _layer_refusal(weights, config, what, exclude, engine)
    why = weights.memo[key]
    if why is None:
        return None
    named, text = why
    return f"strategy {strategy.name} {text}" if named else text


_CUDA_NEED: dict[tuple[str, str], str | None] = {}


def _needs_cuda_once(config: footprint.QuantConfig) -> str | None:
    key = (config.name, config.source)
    if key not in _CUDA_NEED:
        _CUDA_NEED[key] = needs_cuda(config)
    return _CUDA_NEED[key]


def _layer_refusal(weights: footprint.Weights, config: footprint.QuantConfig, what: str, exclude: list[str],
                   engine: str | None) -> tuple[bool, str] | None:
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
            from runner.serving.engine import engine_for

            algos = {EXPORT_ALGO.get(base_format(f), f.upper()) for f in formats.values()}
            fp8_weight_only = _weight_only_fp8(weights, config, exclude, formats)
            refusal = engine_for(engine).export_refusal(what, algos, fp8_weight_only)
            if refusal is not None:
                return False, refusal
        return None
    if exclude and any(footprint.strategy_formats(weights, config, []).values()):
        return True, (f"would quantize no layer: the recipe's exclusions {exclude} cover every layer the {what} "
                      "quantizes; narrow them")
    return True, (f"would quantize no layer: the {what}'s patterns match none of this model's Linear layers (e.g. "
                  "an experts-only recipe on a dense model); pick one written for it")


def _partial_blocks(weights: footprint.Weights, formats: dict[str, str]) -> list[tuple[str, str, tuple[int, int], int]]:
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


def _weight_only_fp8(weights: footprint.Weights, config: footprint.QuantConfig, exclude: list[str],
                     formats: dict[str, str]) -> list[str]:
    """The FP8 Linears whose input is not quantized, once per distinct (config, exclusions)."""
    key = ("weight-only fp8", config.name, config.source, tuple(exclude))
    if key not in weights.memo:
        with_exclusions = config.with_exclusions(exclude)
        weights.memo[key] = sorted(m for m, f in formats.items() if f == "fp8" and footprint.quantizer_cfg(
            with_exclusions, f"{m}.input_quantizer") is None)
    return weights.memo[key]


def worker_gpus(recipe: Any) -> tuple[int, str]:
    """The GPUs the quantize worker will have, known on the host before anything runs, and how that is
    known when it is none: a local worker has this machine's; a container, its plugin's `gpus` (and this
    machine's); a Slurm job, what `execution.slurm` asks for the quantize step."""
    execution = recipe.execution
    if execution.executor == "slurm":
        gpus = execution.slurm.resources_for("quantize").gpus
        return gpus, "its Slurm job asks for no GPU (execution.slurm resources for quantize: gpus 0)"
    here = host_has_gpu()
    if execution.executor == "docker":
        from runner.containers.plugin import load_container

        plugin = load_container(recipe.container_for("quantize"))
        if plugin.gpus in ("none", 0):
            return 0, f"its container (plugin {plugin.name}) is given no GPU (gpus: {plugin.gpus})"
        return (1 if here else 0), "this machine, where its container runs, has no NVIDIA GPU"
    return (1 if here else 0), "this machine, where the local worker runs, has no NVIDIA GPU"


def run_problems(loaded: Any, names: list[str], model_dir: Path | None) -> list[Any]:
    """Pre-flight of `recipe run`, before any step: a located error per strategy in `names` (those whose
    quantize step will run) that cannot run: one that needs CUDA where its worker will have none, and,
    where the model's shapes are known (`model_dir`: model.shapes, a local source, or the run's source
    step), one whose blocks do not fit the model's layers or that quantizes nothing."""
    from runner.errors import Problem
    from runner.recipe.loader import locate

    recipe = loaded.recipe
    gpus, no_gpu = worker_gpus(recipe)
    weights = _weights(model_dir)
    problems = []
    chosen = set(names)
    for i, strategy in enumerate(recipe.quantization.strategies):
        if strategy.name not in chosen:
            continue
        why = strategy_refusal(strategy, recipe.quantization.exclusions(strategy), model_dir, gpus=gpus,
                               engine=recipe.serve.engine, weights=weights, no_gpu=no_gpu)
        if why is not None:
            path = ("quantization", "strategies", i)
            problems.append(Problem(_named(strategy.name, why), path, locate(loaded.locations, path),
                                    hint="fix the strategy, or leave it out of this run (--strategy NAME, or "
                                    "enabled: false)"))
    return problems


def _named(name: str, why: str) -> str:
    """`strategy 'x': ...`, once (a refusal may name the strategy itself)."""
    return f"strategy {name!r} {why.removeprefix(f'strategy {name} ')}" if why.startswith(f"strategy {name} ") \
        else f"strategy {name!r}: {why}"


def _weights(model_dir: Path | None) -> footprint.Weights | None:
    if model_dir is None or not (model_dir / "config.json").is_file():
        return None
    try:
        return footprint.load_weights(model_dir)
    except (footprint.Unknown, OSError, ValueError):
        return None


def recipe_problems(loaded: Any, model_dir: Path | None, weights: footprint.Weights | None = None) -> list[Any]:
    """A located error per enabled strategy that cannot run on this model here (recipe validate/plan).
    `weights`: model_dir's, if already read."""
    from runner.errors import Problem
    from runner.recipe.loader import locate

    recipe = loaded.recipe
    weights = weights or _weights(model_dir)  # once for every strategy
    problems = []
    for i, strategy in enumerate(recipe.quantization.strategies):
        if not strategy.enabled:
            continue
        why = strategy_refusal(strategy, recipe.quantization.exclusions(strategy), model_dir,
                               engine=recipe.serve.engine, check_machine=False, weights=weights)
        if why is not None:
            path = ("quantization", "strategies", i)
            problems.append(Problem(_named(strategy.name, why), path, locate(loaded.locations, path)))
    return problems
