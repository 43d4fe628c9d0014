"""The `export` step: the quantized checkpoint plus the recipe's declarative fix-ups."""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path

from runner.fixups import apply_fixups
from runner.steps import StepContext, StepResult


async def run(ctx: StepContext) -> StepResult:
    source = ctx.input(f"quantize.{ctx.step.strategy}", "checkpoint")
    model_dir = ctx.input("source", "model_dir")
    target = ctx.scratch / "checkpoint"
    await asyncio.to_thread(link_tree, source, target)
    done = await asyncio.to_thread(apply_fixups, target, ctx.step.params["fixups"], model_dir)
    for line in done:
        ctx.log.info("fix-up: %s", line)
    return StepResult(outputs={"checkpoint": "checkpoint"}, summary={"fixups": done})


def link_tree(source: Path, target: Path) -> None:
    """Copy a folder by hard links where possible: a 10 GB checkpoint costs no space or time.

    Fix-ups replace the files they edit (never write through a link), so the source stays intact.
    """
    def link_or_copy(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    shutil.copytree(source, target, copy_function=link_or_copy)
