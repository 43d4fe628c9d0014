"""The registry of step kinds: each kind's KIND object, read from the module named after it."""

from __future__ import annotations

from functools import cache
from typing import Any

from runner.errors import Problem
from runner.steps.base import StepKind


@cache
def _kinds() -> tuple[StepKind, ...]:
    from runner.steps import (
        benchmark,
        calibrate,
        export,
        gates,
        publish,
        quantize,
        report,
        score,
        serve,
        source,
        verify,
    )

    return tuple(module.KIND for module in (source, calibrate, score, quantize, export, verify, serve, benchmark, gates,
                                            report, publish))


def step_kinds() -> dict[str, StepKind]:
    """Every step kind by name, in the order a plan runs them (a fresh dict: callers may replace entries)."""
    return {kind.name: kind for kind in _kinds()}


def worker_kinds() -> dict[str, str]:
    """{worker kind: the step kind that runs it}: each is runner/worker/WORKER.py, which `python -m
    runner.worker` runs (tests/test_step_kinds.py checks these are exactly the worker modules with run())."""
    return {kind.worker: kind.name for kind in _kinds() if kind.worker is not None}


def slurm_kinds() -> list[str]:
    """The step kinds `execution.slurm.steps` may name: those that run a worker, in plan order."""
    return sorted(worker_kinds().values(), key=list(step_kinds()).index)


def slurm_step_problems(loaded: Any) -> list[Problem]:
    """A located error per `execution.slurm.steps` entry that names no step kind with a worker (the
    schema takes any name there, since the kinds are declared here, above it)."""
    from runner.recipe.loader import locate

    known = slurm_kinds()
    problems = []
    for name in loaded.recipe.execution.slurm.steps:
        if name not in known:
            path = ("execution", "slurm", "steps", name)
            problems.append(Problem(f"no step kind {name!r} runs a worker, so it asks Slurm for nothing", path,
                                    locate(loaded.locations, path), hint=f"name one of {', '.join(known)}"))
    return problems
