"""The `score.H` step: auto_quantize's search state (format calibration and per-layer sensitivity scores),
made once by the worker and restored by every auto_quantize strategy that shares its settings."""

from __future__ import annotations

from runner.recipe.schema import SlurmResources
from runner.steps import ids
from runner.steps.base import StepContext, StepKind, StepResult, input_of
from runner.steps.inputs import ScoreInput

WORKER = "score"  # runner/worker/score.py


async def run(ctx: StepContext) -> StepResult:
    inputs = input_of(ctx, ScoreInput)
    params = {
        **inputs.key_payload(),
        "model_dir": str(ctx.input(ids.SOURCE, "model_dir")),
        "calibration": str(ctx.input(ids.calibrate(inputs.calibration), "calibration")),
    }
    return await ctx.run_worker(WORKER, params)


KIND = StepKind("score", run, input=ScoreInput, modules=("steps/score.py", "worker/score.py"),
                worker=WORKER, container_role="quantize", gpu=True, slurm=SlurmResources(gpus=1))
