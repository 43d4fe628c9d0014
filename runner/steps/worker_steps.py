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
    export_id = ctx.step.deps[0]
    quantize_record = ctx.run_dir.record(f"quantize.{ctx.step.strategy}") or {}
    params = {
        **ctx.step.params,
        "checkpoint": str(ctx.input(export_id, "checkpoint")),
        "quantize_summary": quantize_record.get("summary", {}),
    }
    return await ctx.run_worker("verify", params)
