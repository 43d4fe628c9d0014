"""The report and publish steps (see runner/steps/report.py and runner/steps/publish.py)."""

from __future__ import annotations

import asyncio

from runner.errors import RunnerError
from runner.steps.base import StepContext, StepResult, input_of
from runner.steps.inputs import PublishInput, ReportInput
from runner.steps.publish import stage, upload
from runner.steps.report import (
    append_research_section,
    calibration_overlaps,
    name_for_export,
    portable_recipe,
    render_documents,
    reserved_names,
)


async def report(ctx: StepContext) -> StepResult:
    recipe = input_of(ctx, ReportInput).recipe
    outputs = await asyncio.to_thread(render_documents, recipe, ctx.run_dir, ctx.scratch)
    summary: dict = {"documents": list(outputs.values()), "warnings": []}
    # Whether each calibration set of the run is disjoint from the suites' prompts (the card says it too).
    overlap = await asyncio.to_thread(calibration_overlaps, recipe, ctx.run_dir)
    summary["calibration_overlap"] = overlap
    for key, found in overlap.items():
        if found.get("count"):
            warning = (f"{key}: {found['count']} calibration prompts overlap the evaluation suites' prompts "
                       f"(first: {found['items'][0]}); the card says so")
            summary["warnings"].append(warning)
            ctx.log.warning(warning)
    suggested = name_for_export(recipe, ctx.run_dir)
    if suggested is not None:
        warning = (f"publish.repo_id {recipe.publish.repo_id} names another format than the selected export holds; "
                   f"a name that says what it holds: {suggested}")
        summary["warnings"].append(warning)
        ctx.log.warning(warning)
    if recipe.report.research_doc is not None:
        section = (ctx.scratch / "research_section.md").read_text(encoding="utf-8")
        changed = append_research_section(recipe.report.research_doc, recipe.name, section)
        summary["research_doc"] = {"path": str(recipe.report.research_doc), "changed": changed}
    return StepResult(outputs=outputs, summary=summary)


async def publish(ctx: StepContext) -> StepResult:
    recipe = input_of(ctx, PublishInput).recipe
    spec = recipe.publish
    gates = ctx.run_dir.record("gates") or {}  # complete: report, which publish needs, needs it
    best = gates.get("summary", {}).get("selection", {}).get("best")
    if best is None:
        # Not a failure of the pipeline: the run completes and exits with its own status (4).
        reason = "no strategy passed the gates; see steps/gates/comparison.md"
        ctx.log.info("publish skipped: %s", reason)
        return StepResult(summary={"published": False, "skipped": reason, "strategy": None,
                                   "repo_id": spec.repo_id, "dry_run": spec.dry_run})
    if spec.repo_id is None:
        raise RunnerError("publish.repo_id is not set: name the Hub repository (user/name) to publish to")
    suggested = name_for_export(recipe, ctx.run_dir)
    if suggested is not None and not spec.dry_run:
        raise RunnerError(f"publish.repo_id {spec.repo_id} names another format than the selected strategy {best} "
                          f"exported: set publish.repo_id to {suggested} (or a name of your own that does not "
                          "claim another format)")
    checkpoint = ctx.run_dir.output(f"export.{best}", "checkpoint")
    # The recipe as the card embeds it, with the data files it reads beside it: it runs as uploaded.
    portable = portable_recipe(recipe, reserved_names(ctx.run_dir, best))
    files = await asyncio.to_thread(stage, checkpoint, ctx.run_dir.step_dir("report"), portable.yaml,
                                    ctx.scratch / "upload", portable.files)
    total = sum(f["bytes"] for f in files)
    summary = {"published": not spec.dry_run, "repo_id": spec.repo_id, "private": spec.private, "strategy": best,
               "dry_run": spec.dry_run, "files": files, "total_bytes": total,
               "recipe_inputs": sorted(portable.files), "required_inputs": portable.required}
    if spec.dry_run:
        ctx.log.info("dry run: would upload %d files (%d bytes) to %s", len(files), total, spec.repo_id)
        for f in files:
            ctx.log.info("  %s (%d bytes)", f["path"], f["bytes"])
    else:
        summary |= await asyncio.to_thread(upload, recipe, ctx.scratch / "upload",
                                           f"recipe-runner: {recipe.name} ({best})")
    return StepResult(outputs={"upload": "upload"}, summary=summary)
