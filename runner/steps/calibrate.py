"""The `calibrate` step: a checked calibration set in the run directory, whatever its source."""

from __future__ import annotations

import asyncio
from collections import Counter

from runner.calibration.conversations import has_tool_calls, read_conversations, write_conversations
from runner.calibration.generate import generate
from runner.errors import NotImplementedStep
from runner.steps.base import StepContext, StepResult, input_of
from runner.steps.inputs import CalibrateInput


async def run(ctx: StepContext) -> StepResult:
    calibration = input_of(ctx, CalibrateInput).calibration
    source = calibration.source
    if source.kind == "teacher":
        model_dir = ctx.input("source", "model_dir")
        summary = await generate(source, calibration.seed, ctx.scratch, ctx.run_dir.root / "partial", model_dir,
                                 ctx.log)
        outputs = {"calibration": "calibration.jsonl", "report": "generation_report.json"}
        if (ctx.scratch / "token_lengths.png").exists():
            outputs["histogram"] = "token_lengths.png"
        return StepResult(outputs=outputs, summary=summary)
    if source.kind == "dataset":
        raise NotImplementedStep("named datasets need the Hugging Face Hub, which this build does not fetch "
                                 "yet; export the data to JSONL and use `source: {kind: jsonl}`")
    conversations = await asyncio.to_thread(read_conversations, source.path)
    target = ctx.scratch / "calibration.jsonl"
    sha256 = await asyncio.to_thread(write_conversations, target, conversations)
    roles = Counter(m["role"] for c in conversations for m in c["messages"])
    summary = {
        "source": str(source.path),
        "conversations": len(conversations),
        "with_tool_calls": sum(has_tool_calls(c) for c in conversations),
        "messages_by_role": dict(roles),
        "sha256": sha256,
        "samples_requested": calibration.samples,
    }
    if len(conversations) < calibration.samples:
        ctx.log.warning("the file has %d conversations; calibration.samples asks for %d: all are used",
                        len(conversations), calibration.samples)
    return StepResult(outputs={"calibration": "calibration.jsonl"}, summary=summary)
