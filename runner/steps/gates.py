"""The `gates` step: every candidate judged against the recipe's gates, and the best one named.

A strategy whose branch failed is no candidate: gates records where and why it failed. The table
(comparison.md), the plots and gates.json are its outputs; the selection is its summary.
"""

from __future__ import annotations

import contextlib
import json
from typing import Any

from runner.benchmark.gates import evaluate, select
from runner.benchmark.presentation import comparison_markdown, plot_gates, plot_ttft_curve
from runner.quantization.export_words import export_format
from runner.run_dir import write_json_atomic
from runner.steps import ids
from runner.steps.base import StepContext, StepKind, StepResult, input_of
from runner.steps.inputs import NOT_BENCHMARKED, GatesInput


def failed_branches(ctx: StepContext) -> dict[str, dict[str, str]]:
    """{strategy: {step, error}} for the branches the scheduler left out of this step (they failed)."""
    failed = {}
    for strategy, sid in input_of(ctx, GatesInput).failed_branches.items():
        error = "no error recorded"
        path = ctx.run_dir.logs_dir / f"{sid}.failed.json"
        with contextlib.suppress(OSError, ValueError):
            error = json.loads(path.read_text(encoding="utf-8")).get("error") or error
        failed[strategy] = {"step": sid, "error": error}
    return failed


def selected_export(result: dict[str, Any]) -> dict[str, Any] | None:
    """The selection record's export: the step and output that hold the checkpoint publish uploads, and
    its format in words (named here once; the card's title and the repository-name check read it)."""
    export = result.get("export")
    if not export:
        return None
    return {"step": export["step"], "output": "checkpoint",
            "format": export_format(export.get("quant_algo"), export.get("layer_formats"))}


async def run(ctx: StepContext) -> StepResult:
    inputs: GatesInput = input_of(ctx, GatesInput)
    failed = failed_branches(ctx)
    for strategy, why in failed.items():
        ctx.log.info("strategy %s failed at %s, so it is not judged: %s", strategy, why["step"], why["error"])
    results = {}
    baseline = None
    for dep in ctx.step.deps:
        data = json.loads(ctx.input(dep, "results").read_text(encoding="utf-8"))
        if dep == ids.BASELINE_BENCHMARK:
            baseline = data
        else:
            results[ids.strategy_of(dep)] = data
    # The candidates compared: every strategy with a current benchmark, including the ones this run did not
    # run (--strategy); the recipe's others are named with the reason they are not judged.
    candidates = list(results)
    absent = {s: NOT_BENCHMARKED for s in inputs.not_benchmarked}
    ctx.log.info("candidates compared: %s", ", ".join(candidates) or "none")
    for strategy, why in absent.items():
        ctx.log.info("strategy %s is not judged: %s", strategy, why)
    verdicts = {s: evaluate(inputs.gates, r, baseline) for s, r in results.items()}
    selection = select(verdicts, results, inputs.selection.prefer, inputs.selection.accept_unproven,
                       inputs.negative_controls)
    selection["export"] = selected_export(results[selection["best"]]) if selection["best"] else None
    baseline_name = inputs.baseline_name
    table = comparison_markdown(verdicts, baseline_name, baseline, selection, failed, absent)
    (ctx.scratch / "comparison.md").write_text(table, encoding="utf-8")
    plot_gates(verdicts, ctx.scratch / "gate_scores.png")
    curves = dict(results)
    if baseline is not None:
        curves[f"{baseline_name} (baseline)"] = baseline
    plot_ttft_curve(curves, ctx.scratch / "ttft_curve.png")
    speed = {}
    for name, r in curves.items():
        measured = r.get("speed", {}).get("summary", {}).get("decode_tok_s")
        predicted = (r.get("prediction") or {}).get("predicted_decode_tok_s")
        speed[name] = {"measured_decode_tok_s": measured, "predicted_decode_tok_s": predicted,
                       "measured_over_predicted": round(measured / predicted, 3) if measured and predicted else None}
    write_json_atomic(ctx.scratch / "gates.json", {"verdicts": verdicts, "selection": selection, "speed": speed,
                                                   "failed": failed, "candidates": candidates,
                                                   "not_benchmarked": absent})
    for line in table.splitlines():
        ctx.log.info("%s", line)
    return StepResult(outputs={"gates": "gates.json", "table": "comparison.md", "gate_plot": "gate_scores.png",
                               "ttft_plot": "ttft_curve.png"},
                      summary={"selection": selection, "verdicts": verdicts, "speed": speed, "failed": failed,
                               "candidates": candidates, "not_benchmarked": absent})


KIND = StepKind("gates", run, input=GatesInput,
                modules=("steps/gates.py", "benchmark/presentation.py", "quantization/export_words.py"))
