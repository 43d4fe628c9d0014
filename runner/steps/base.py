"""What a step is (a node of the plan) and what a step kind is: a coroutine that gets a StepContext and
returns a StepResult."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from runner.run_dir import RunDir

if TYPE_CHECKING:
    from runner.recipe.schema import SlurmResources
    from runner.steps.inputs import StepInput


@dataclass(frozen=True)
class Step:
    """A node of the plan: one run of a step kind, with its input (runner/plan.py builds them)."""

    id: str
    kind: str
    deps: tuple[str, ...]
    inputs: StepInput  # everything the step reads (step_inputs.py); its cache key hashes it
    strategy: str | None = None
    # Files whose content the step reads (fingerprinted into the key).
    input_files: tuple[Path, ...] = ()
    # Holds the GPU (or, on a CPU machine, most cores and memory): build_plan sets the kind's StepKind.gpu
    # unless the step says (a baseline benchmark of the user's endpoint holds none).
    heavy: bool | None = None

    @property
    def params(self) -> dict[str, Any]:
        """The input as JSON: what the key hashes and the record keeps."""
        return self.inputs.key_payload()


@dataclass
class StepResult:
    outputs: dict[str, str] = field(default_factory=dict)  # name -> path relative to the step folder
    summary: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)


class RunView(Protocol):
    """What of a run a document is written from: committed records and outputs by step id. A step's
    context shows only its dependencies; a RunDir shows everything (for `recipe card`)."""

    def record(self, step_id: str) -> dict[str, Any] | None: ...

    def output(self, step_id: str, name: str) -> Path: ...


@dataclass
class StepContext:
    step: Step
    run_dir: RunDir
    scratch: Path
    log: logging.Logger
    run_worker: Callable[[str, dict[str, Any]], Awaitable[StepResult]]

    @property
    def inputs(self) -> Any:  # the kind's StepInput subclass; typed where the step reads it
        return self.step.inputs

    @property
    def strategy(self) -> str:
        """The strategy of a step that runs once per strategy (quantize.S ... benchmark.S)."""
        if self.step.strategy is None:
            raise TypeError(f"{self.step.id} belongs to no strategy")
        return self.step.strategy

    def input(self, step_id: str, name: str) -> Path:
        """A committed output of a step this one depends on."""
        if step_id not in self.step.deps:
            raise KeyError(f"{self.step.id} does not depend on {step_id}")
        return self.run_dir.output(step_id, name)

    def input_record(self, step_id: str) -> dict[str, Any]:
        if step_id not in self.step.deps:
            raise KeyError(f"{self.step.id} does not depend on {step_id}")
        return self.run_dir.record(step_id) or {}

    # The RunView of the step's dependencies: report reads the run through this, `recipe card` through
    # the RunDir itself.
    def record(self, step_id: str) -> dict[str, Any] | None:
        if step_id not in self.step.deps:
            raise KeyError(f"{self.step.id} does not depend on {step_id}")
        return self.run_dir.record(step_id)

    def output(self, step_id: str, name: str) -> Path:
        return self.input(step_id, name)


@dataclass(frozen=True)
class StepKind:
    """One kind of step, declared once in the module named after it (runner/steps/NAME.py); the
    scheduler's registry, the code each key hashes, the worker kinds, container roles and Slurm
    defaults are all read from these objects."""

    name: str
    run: Callable[[StepContext], Awaitable[StepResult]] | None
    input: type[StepInput] | None = None  # the typed input the planner builds for it (steps/inputs.py)
    # The modules whose code decides its result, relative to runner/ (the step module itself first, then
    # its worker's). steps/code.py adds what they import, except presentation and plumbing.
    modules: tuple[str, ...] = ()
    worker: str | None = None  # runner/worker/WORKER.py, run through ctx.run_worker
    container_role: str | None = None  # which execution.containers entry runs its worker part
    gpu: bool = False  # holds the GPU (or, on a CPU machine, most cores and memory) while it runs
    slurm: SlurmResources | None = None  # what its worker asks Slurm for unless the recipe says otherwise
    pending: str | None = None  # why it cannot run yet


def input_of(ctx: StepContext, kind: type[StepInput]) -> Any:
    """ctx.inputs, checked to be the input model this step kind expects."""
    if not isinstance(ctx.inputs, kind):
        raise TypeError(f"{ctx.step.id} got {type(ctx.inputs).__name__}, expected {kind.__name__}")
    return ctx.inputs
