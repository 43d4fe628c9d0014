"""Steps whose work happens in the worker (torch, ModelOpt): quantize and verify."""

from __future__ import annotations

import asyncio

from runner.errors import RunnerError
from runner.quantization.preflight import strategy_refusal
from runner.steps.base import StepContext, StepResult, input_of
from runner.steps.inputs import QuantizeInput, VerifyInput, calibrate_step


async def quantize(ctx: StepContext) -> StepResult:
    inputs = input_of(ctx, QuantizeInput)
    model_dir = ctx.input("source", "model_dir")
    # Refused here, before a worker loads the model: a recipe for another architecture, one that
    # quantizes nothing of this model, a CUDA-only calibration on a machine without a GPU.
    refusal = await asyncio.to_thread(strategy_refusal, inputs.strategy, inputs.exclude, model_dir)
    if refusal is not None:
        raise RunnerError(refusal)
    params = {
        **inputs.key_payload(),
        "model_dir": str(model_dir),
        "calibration": str(ctx.input(calibrate_step(inputs.strategy.calibration), "calibration")),
        "held_out_from": str(ctx.input("calibrate", "calibration")),
    }
    return await ctx.run_worker("quantize", params)


async def verify(ctx: StepContext) -> StepResult:
    quantized = ctx.input_record(f"quantize.{ctx.step.strategy}").get("summary", {})
    params = {
        **input_of(ctx, VerifyInput).key_payload(),
        "checkpoint": str(ctx.input(f"export.{ctx.step.strategy}", "checkpoint")),
        "model_dir": str(ctx.input("source", "model_dir")),
        # Folded AWQ scales leave per-channel factors in the weights that the decoder check must allow.
        "smoothed": bool(quantized.get("awq_fold")),
    }
    return await ctx.run_worker("verify", params)
