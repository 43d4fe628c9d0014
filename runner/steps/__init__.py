"""Step kinds: what each node of the plan does when it runs.

A step kind is a host-side coroutine. Steps that need torch (quantize, verify, GGUF conversion)
hand their work to the worker (`python -m runner.worker`) through `ctx.run_worker`, which the
executor runs as a local subprocess or inside the step's container. A kind that is not built yet
says so through `pending`, and the runner stops before it rather than pretend.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runner.plan import Plan, Step
from runner.run_dir import RunDir


@dataclass
class StepResult:
    outputs: dict[str, str] = field(default_factory=dict)  # name -> path relative to the step folder
    summary: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str] = field(default_factory=dict)


@dataclass
class StepContext:
    step: Step
    plan: Plan
    run_dir: RunDir
    scratch: Path
    log: logging.Logger
    run_worker: Callable[[str, dict[str, Any]], Awaitable[StepResult]]

    def input(self, step_id: str, name: str) -> Path:
        """A committed output of a step this one depends on."""
        if step_id not in self.step.deps:
            raise KeyError(f"{self.step.id} does not depend on {step_id}")
        return self.run_dir.output(step_id, name)

    def input_record(self, step_id: str) -> dict[str, Any]:
        return self.run_dir.record(step_id) or {}


@dataclass(frozen=True)
class StepKind:
    name: str
    run: Callable[[StepContext], Awaitable[StepResult]] | None
    pending: str | None = None  # why it cannot run yet
    container_role: str | None = None  # which execution.containers entry runs its worker part


def step_kinds() -> dict[str, StepKind]:
    from runner.steps import calibrate, export, model_source, report_publish, serve_bench, worker_steps

    return {
        "source": StepKind("source", model_source.run, container_role="quantize"),
        "calibrate": StepKind("calibrate", calibrate.run),
        "quantize": StepKind("quantize", worker_steps.quantize, container_role="quantize"),
        "export": StepKind("export", export.run),
        "verify": StepKind("verify", worker_steps.verify, container_role="verify"),
        "serve": StepKind("serve", serve_bench.serve, container_role="serve"),
        "benchmark": StepKind("benchmark", serve_bench.benchmark),
        "gates": StepKind("gates", serve_bench.gates),
        "report": StepKind("report", report_publish.report),
        "publish": StepKind("publish", report_publish.publish),
    }


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))
