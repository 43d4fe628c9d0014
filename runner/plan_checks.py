"""The located recipe errors that `recipe validate`, `plan` and `run` report before any step, from what
runner/quantization predicts: an auto_quantize target outside the range its formats and exclusions can
reach, and a strategy that cannot run on this model here (runner/quantization/preflight.py says why).
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
from runner.quantization.footprint import Footprint
from runner.quantization.preflight import host_has_gpu, strategy_refusal
from runner.quantization.weights import Weights, load_weights
from runner.recipe.loader import locate
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
    return problems


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
    return problems
