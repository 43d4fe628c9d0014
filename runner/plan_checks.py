"""The located recipe errors that `recipe validate`, `plan` and `run` report before any step, from what
runner/quantization predicts: an auto_quantize target outside the range its formats and exclusions can
reach, a strategy that cannot run on this model here (runner/quantization/preflight.py says why), and a
served baseline whose unquantized source does not fit the serving target's memory. Also the exclusion
patterns that name no module of the model (`unmatched_exclusions`, warnings: the quantize worker says
the same after loading it).
Here, not in runner/quantization, because each points into the recipe's YAML (runner/recipe) and asks
where the worker will run (runner/containers)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from runner.containers.plugin import load_container
from runner.errors import Problem
from runner.quantization import Unknown
from runner.quantization.bits import DEFINITION, MODELOPT_DEFINITION
from runner.quantization.exclusions import names_module
from runner.quantization.footprint import Footprint, source_footprint
from runner.quantization.preflight import host_has_gpu, strategy_refusal
from runner.quantization.weights import Weights, load_weights
from runner.recipe.loader import locate
from runner.recipe.resources import hardware_targets
from runner.serving import engine_for


def feasibility_problems(loaded: Any, footprints: list[Footprint]) -> list[Any]:
    """An error per auto_quantize strategy whose target lies outside what it can reach, located."""
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


def worker_gpus(recipe: Any) -> tuple[int, str]:
    """The GPUs the quantize worker will have, known on the host before anything runs, and how that is
    known when it is none: a local worker has this machine's; a container, its plugin's `gpus` (and this
    machine's); a Slurm job, what `execution.slurm` asks for the quantize step."""
    execution = recipe.execution
    if execution.executor == "slurm":
        from runner.steps.registry import step_kinds

        gpus = execution.slurm.resources_for("quantize", step_kinds()["quantize"].slurm).gpus
        return gpus, "its Slurm job asks for no GPU (execution.slurm resources for quantize: gpus 0)"
    here = host_has_gpu()
    if execution.executor == "docker":
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
    recipe = loaded.recipe
    gpus, no_gpu = worker_gpus(recipe)
    weights = _weights(model_dir)
    problems = []
    chosen = set(names)
    for i, strategy in enumerate(recipe.quantization.strategies):
        if strategy.name not in chosen:
            continue
        why = strategy_refusal(strategy, recipe.quantization.exclusions(strategy), model_dir, gpus=gpus,
                               engine=engine_for(recipe.serve.engine), weights=weights, no_gpu=no_gpu)
        if why is not None:
            path = ("quantization", "strategies", i)
            problems.append(Problem(_named(strategy.name, why), path, locate(loaded.locations, path),
                                    hint="fix the strategy, or leave it out of this run (--strategy NAME, or "
                                    "enabled: false)"))
    return problems + baseline_problems(loaded, weights)


def _named(name: str, why: str) -> str:
    """`strategy 'x': ...`, once (a refusal may name the strategy itself)."""
    return f"strategy {name!r} {why.removeprefix(f'strategy {name} ')}" if why.startswith(f"strategy {name} ") \
        else f"strategy {name!r}: {why}"


def _weights(model_dir: Path | None) -> Weights | None:
    if model_dir is None or not (model_dir / "config.json").is_file():
        return None
    try:
        return load_weights(model_dir)
    except (Unknown, OSError, ValueError):
        return None


def recipe_problems(loaded: Any, model_dir: Path | None, weights: Weights | None = None) -> list[Any]:
    """A located error per enabled strategy that cannot run on this model here (recipe validate/plan).
    `weights`: model_dir's, if already read."""
    recipe = loaded.recipe
    weights = weights or _weights(model_dir)  # once for every strategy
    problems = []
    for i, strategy in enumerate(recipe.quantization.strategies):
        if not strategy.enabled:
            continue
        why = strategy_refusal(strategy, recipe.quantization.exclusions(strategy), model_dir,
                               engine=engine_for(recipe.serve.engine), check_machine=False,
                               weights=weights)
        if why is not None:
            path = ("quantization", "strategies", i)
            problems.append(Problem(_named(strategy.name, why), path, locate(loaded.locations, path)))
    return problems + baseline_problems(loaded, weights)


def _memory_fraction(recipe: Any) -> tuple[float, str]:
    """The share of the target's memory the serving engine may fill, and how that is known: vLLM's
    `--gpu-memory-utilization` in serve.args (its default 0.9 when absent), else all of it."""
    if not engine_for(recipe.serve.engine).runs_vllm:
        return 1.0, ""
    args = [str(a) for a in recipe.serve.args]
    for i, arg in enumerate(args):
        value = arg.split("=", 1)[1] if arg.startswith("--gpu-memory-utilization=") else (
            args[i + 1] if arg == "--gpu-memory-utilization" and i + 1 < len(args) else None)
        if value is not None:
            try:
                return float(value), f"--gpu-memory-utilization {value}"
            except ValueError:
                break
    return 0.9, "vLLM's default --gpu-memory-utilization 0.9"


def baseline_problems(loaded: Any, weights: Weights | None) -> list[Any]:
    """An error when the recipe serves its baseline (`benchmark.baseline.kind: served`: the unquantized
    source, started by the recipe's serving engine on the serving target) and the source's weights alone
    are predicted to exceed the memory the engine may use on `benchmark.hardware` (memory_gb in
    recipes/hardware/targets.yaml): that server would never start, after every quantize step has run.
    Unknown shapes or a target without memory_gb: nothing is said."""
    recipe = loaded.recipe
    baseline = recipe.benchmark.baseline
    if weights is None or baseline is None or baseline.kind != "served":
        return []
    target = recipe.benchmark.hardware
    memory_gb = (hardware_targets().get(target) or {}).get("memory_gb")
    if not memory_gb:
        return []
    fraction, said = _memory_fraction(recipe)
    usable = float(memory_gb) * fraction
    source = source_footprint(recipe, weights, None).checkpoint_bytes or 0
    if source / 1e9 <= usable:
        return []
    path = ("benchmark", "baseline")
    return [Problem(
        f"the served baseline is the unquantized source ({recipe.model.dtype}, {source / 1e9:.1f} GB of weights "
        f"alone), and the serving target {target} has {float(memory_gb):g} GB of memory"
        + (f", {usable:.1f} GB of it for the engine at {said}" if said else "")
        + ": it would not start there (after every quantize step had run)",
        path, locate(loaded.locations, path),
        hint="serve the source on a machine that holds it (e.g. the machine that quantizes it, vLLM "
             "--tensor-parallel-size over its GPUs) and point the baseline at it: `benchmark.baseline: {kind: "
             "endpoint, name: BF16, url: ..., model: ...}`; a teacher (calibration.source) must run there too")]


def unmatched_exclusions(recipe: Any, weights: Weights) -> list[str]:
    """A warning per exclusion pattern (quantization.exclude and each strategy's) that names no module of the
    model in either of ModelOpt's readings (runner/quantization/exclusions.py): a typo, or a layer this
    model does not have. The modules are those of the model's tensors (embeddings and norms included,
    which ModelOpt never quantizes but a recipe may name) and its Linear and Conv layers (fused experts
    split as the worker loads them)."""
    modules = {name.rsplit(".", 1)[0] for name in weights.tensors if "." in name}
    modules.update(weights.linears)
    modules.update(weights.convs)
    patterns: dict[str, list[str]] = {}
    for strategy in recipe.quantization.strategies:
        for pattern in recipe.quantization.exclusions(strategy):
            patterns.setdefault(pattern, []).append(strategy.name)
    warnings = []
    for pattern, strategies in patterns.items():
        if not any(names_module(pattern, m) for m in modules):
            warnings.append(f"exclusion {pattern!r} (strategies {', '.join(strategies)}) matches nothing in this "
                            "model: no module is named so, nor any quantizer of one (a typo, or a layer it does "
                            "not have)")
    return warnings
