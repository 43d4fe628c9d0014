"""What a step kind is: a coroutine that gets a StepContext and returns a StepResult."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from runner.run_dir import RunDir

if TYPE_CHECKING:
    from runner.plan import Step
    from runner.steps.inputs import StepInput


@dataclass
class StepResult:
    outputs: dict[str, str] = field(default_factory=dict)  # name -> path relative to the step folder
    summary: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)


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

    def input(self, step_id: str, name: str) -> Path:
        """A committed output of a step this one depends on."""
        if step_id not in self.step.deps:
            raise KeyError(f"{self.step.id} does not depend on {step_id}")
        return self.run_dir.output(step_id, name)

    def input_record(self, step_id: str) -> dict[str, Any]:
        if step_id not in self.step.deps:
            raise KeyError(f"{self.step.id} does not depend on {step_id}")
        return self.run_dir.record(step_id) or {}


@dataclass(frozen=True)
class StepKind:
    name: str
    run: Callable[[StepContext], Awaitable[StepResult]] | None
    pending: str | None = None  # why it cannot run yet
    container_role: str | None = None  # which execution.containers entry runs its worker part


def input_of(ctx: StepContext, kind: type[StepInput]) -> Any:
    """ctx.inputs, checked to be the input model this step kind expects."""
    if not isinstance(ctx.inputs, kind):
        raise TypeError(f"{ctx.step.id} got {type(ctx.inputs).__name__}, expected {kind.__name__}")
    return ctx.inputs
