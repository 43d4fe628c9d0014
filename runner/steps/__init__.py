"""Step kinds: what each node of the plan does when it runs.

A step kind is a host-side coroutine that gets a StepContext: its typed input (`ctx.inputs`, see
runner/steps/inputs.py), the committed outputs of the steps it depends on, a scratch folder and a
log. Steps that need torch (quantize, verify, GGUF conversion) hand their work to the worker
(`python -m runner.worker`) through `ctx.run_worker`, which the executor runs as a local subprocess
or inside the step's container. A kind that is not built yet says so through `pending`, and the
runner stops before it rather than pretend.

runner/steps/base.py defines the context and result types, runner/steps/code.py finds the source
files whose hash is part of each kind's cache key; this module is the registry of kinds.
"""

from __future__ import annotations

from runner.steps.base import StepContext, StepKind, StepResult, input_of

__all__ = ["StepContext", "StepKind", "StepResult", "input_of", "step_kinds"]


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
