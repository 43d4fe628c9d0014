"""Steps whose work happens in the worker (torch, ModelOpt): quantize and verify."""

from __future__ import annotations

from runner.steps import StepContext, StepResult


async def quantize(ctx: StepContext) -> StepResult:
    params = {
        **ctx.step.params,
        "model_dir": str(ctx.input("source", "model_dir")),
        "calibration": str(ctx.input("calibrate", "calibration")),
    }
    return await ctx.run_worker("quantize", params)


async def verify(ctx: StepContext) -> StepResult:
    quantized = ctx.input_record(f"quantize.{ctx.step.strategy}").get("summary", {})
    params = {
        **ctx.step.params,
        "checkpoint": str(ctx.input(f"export.{ctx.step.strategy}", "checkpoint")),
        "model_dir": str(ctx.input("source", "model_dir")),
        # Folded AWQ scales leave per-channel factors in the weights that the decoder check must allow.
        "smoothed": bool(quantized.get("awq_fold")),
    }
    return await ctx.run_worker("verify", params)
