"""The `calibrate` step: a checked calibration set in the run directory, whatever its source.

`calibrate` makes the recipe's set (`calibration.source`); `calibrate.NAME` an alternative set a strategy
names (`calibration.alternatives`). The output is JSONL, one sample a line, in one of three forms the
quantize worker reads: a conversation ({"messages": ...}, rendered with the chat template), plain text
({"text": ...}, tokenized as it is) or token ids ({"token_ids": [...]}).
"""

from __future__ import annotations

import asyncio
import json
import random
from collections import Counter
from pathlib import Path
from typing import Any

from runner.calibration.conversations import has_tool_calls, read_conversations, write_conversations
from runner.calibration.generate import generate
from runner.errors import NotImplementedStep, RunnerError
from runner.steps import ids
from runner.steps.base import StepContext, StepKind, StepResult, input_of
from runner.steps.inputs import CalibrateInput


async def run(ctx: StepContext) -> StepResult:
    calibration = input_of(ctx, CalibrateInput).calibration
    source = calibration.source
    if source.kind == "teacher":
        model_dir = ctx.input(ids.SOURCE, "model_dir")
        summary = await generate(source, calibration.seed, ctx.scratch, ctx.run_dir.root / "partial", model_dir,
                                 ctx.log)
        outputs = {"calibration": "calibration.jsonl", "report": "generation_report.json"}
        if (ctx.scratch / "eval.jsonl").exists():
            outputs["eval"] = "eval.jsonl"
        if (ctx.scratch / "token_lengths.png").exists():
            outputs["histogram"] = "token_lengths.png"
        return StepResult(outputs=outputs, summary=summary)
    if source.kind == "dataset":
        raise NotImplementedStep("named datasets need the Hugging Face Hub, which this build does not fetch "
                                 "yet; export the data to JSONL and use `source: {kind: jsonl}`")
    if source.kind == "text":
        samples = await asyncio.to_thread(read_paragraphs, source.path)
        return _samples_result(ctx, [{"text": p} for p in samples], {"source": str(source.path), "kind": "text",
                                                                       "paragraphs": len(samples)})
    if source.kind == "random_tokens":
        vocab = vocab_size(ctx.input(ids.SOURCE, "model_dir"))
        rng = random.Random(calibration.seed)
        length = min(source.tokens or calibration.max_length, calibration.max_length)
        rows = [{"token_ids": [rng.randrange(vocab) for _ in range(length)]} for _ in range(calibration.samples)]
        return _samples_result(ctx, rows, {"kind": "random_tokens", "vocab_size": vocab,
                                           "tokens_per_sample": length})
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


def read_paragraphs(path: Path) -> list[str]:
    """The blank-line separated paragraphs of a UTF-8 text file; an error names the file (and line)."""
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as exc:
        raise RunnerError(f"cannot read the calibration text {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[:exc.start].count(b"\n") + 1
        raise RunnerError(f"{path}:{line}: not UTF-8 text (byte {exc.start}); calibration text must be UTF-8") from None
    paragraphs = [" ".join(block.split()) for block in text.split("\n\n") if block.strip()]
    if not paragraphs:
        raise RunnerError(f"{path}: no text in the file")
    return paragraphs


def vocab_size(model_dir: Path) -> int:
    """The model's vocabulary size from config.json (text_config for multimodal models)."""
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    size = config.get("vocab_size") or (config.get("text_config") or {}).get("vocab_size")
    if not isinstance(size, int) or size <= 0:
        raise RunnerError(f"{model_dir / 'config.json'} names no vocab_size: random-token calibration needs it")
    return size


def _samples_result(ctx: StepContext, rows: list[dict[str, Any]], summary: dict[str, Any]) -> StepResult:
    sha256 = write_conversations(ctx.scratch / "calibration.jsonl", rows)  # any JSON rows, one a line
    return StepResult(outputs={"calibration": "calibration.jsonl"},
                      summary={**summary, "samples": len(rows), "sha256": sha256})


KIND = StepKind("calibrate", run, input=CalibrateInput, modules=("steps/calibrate.py",))
