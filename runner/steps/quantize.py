"""The `quantize.S` step: one strategy's quantized checkpoint, made by the worker (torch, ModelOpt)."""

from __future__ import annotations

import asyncio

from runner.errors import RunnerError
from runner.quantization.preflight import strategy_refusal
from runner.recipe.schema import SlurmResources
from runner.steps import ids
from runner.steps.base import StepContext, StepKind, StepResult, input_of
from runner.steps.inputs import QuantizeInput

WORKER = "quantize"  # runner/worker/quantize.py


async def run(ctx: StepContext) -> StepResult:
    inputs = input_of(ctx, QuantizeInput)
    model_dir = ctx.input(ids.SOURCE, "model_dir")
    # Refused here, before a worker loads the model: a recipe for another architecture, one that
    # quantizes nothing of this model, a CUDA-only calibration on a machine without a GPU.
    refusal = await asyncio.to_thread(strategy_refusal, inputs.strategy, inputs.exclude, model_dir)
    if refusal is not None:
        raise RunnerError(refusal)
    params = {
        **inputs.key_payload(),
        "model_dir": str(model_dir),
        "calibration": str(ctx.input(ids.calibrate(inputs.strategy.calibration), "calibration")),
        "held_out_from": str(ctx.input(ids.CALIBRATE, "calibration")),
    }
    if inputs.score_step is not None:  # auto_quantize restores the shared scores instead of scoring again
        params["search_state"] = str(ctx.input(inputs.score_step, "search_state"))
    return await ctx.run_worker(WORKER, params)


KIND = StepKind("quantize", run, input=QuantizeInput, modules=("steps/quantize.py", "worker/quantize.py"),
                worker=WORKER, container_role="quantize", gpu=True, slurm=SlurmResources(gpus=1))
