"""The `export` step: the quantized checkpoint plus the recipe's declarative fix-ups."""

from __future__ import annotations

import asyncio

from runner.recipe.fixups import apply_fixups
from runner.run_dir import link_tree
from runner.steps import ids
from runner.steps.base import StepContext, StepKind, StepResult, input_of
from runner.steps.inputs import ExportInput


async def run(ctx: StepContext) -> StepResult:
    source = ctx.input(ids.quantize(ctx.strategy), "checkpoint")
    model_dir = ctx.input(ids.SOURCE, "model_dir")
    target = ctx.scratch / "checkpoint"
    await asyncio.to_thread(link_tree, source, target)
    done = await asyncio.to_thread(apply_fixups, target, input_of(ctx, ExportInput).fixups, model_dir)
    for line in done:
        ctx.log.info("fix-up: %s", line)
    return StepResult(outputs={"checkpoint": "checkpoint"}, summary={"fixups": done})


KIND = StepKind("export", run, input=ExportInput, modules=("steps/export.py",))
