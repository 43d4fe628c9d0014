"""Publish the selected checkpoint with its card and recipe to the Hugging Face Hub (dry run by default).

The upload folder is staged with hard links: the selected strategy's checkpoint, the model card
(README.md), the resolved recipe, the data files it reads (calibration sets, prompt files, suite
files: beside recipe.yaml, which names them there, so it runs as uploaded) and the plots. A dry run
lists exactly those files. The token
comes from the environment variable the recipe names (publish.token_env, HF_TOKEN by default) or
from the Hugging Face login cache; it is handed to huggingface_hub and never written, logged or put
in an error message.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path
from typing import Any

from runner.errors import RunnerError
from runner.recipe.schema import Recipe
from runner.recipe.schema_base import unreadable
from runner.recipe.secrets import secret_name
from runner.run_dir import link_tree
from runner.steps import ids
from runner.steps.base import StepContext, StepKind, StepResult, input_of
from runner.steps.inputs import PublishInput
from runner.steps.report import portable_recipe, reserved_names


def stage(checkpoint: Path, report_dir: Path, recipe_yaml: str, target: Path,
          inputs: dict[str, Path] | None = None) -> list[dict[str, Any]]:
    """The folder to upload; returns its files with sizes. `inputs`: {name beside recipe.yaml: the
    file the recipe reads}, copied (a later edit of the user's file does not change the staged one).
    Nothing leaves by a symbolic link out of the checkpoint or the report, and every staged file is
    checked for secrets by name and content (runner/recipe/secrets.py) before anything is uploaded."""
    for root, dirs, files in os.walk(checkpoint):  # link_tree copies what a link points at: refuse links out
        for name in (*dirs, *files):
            if os.path.islink(os.path.join(root, name)):
                _refuse(Path(root, name), checkpoint)
    link_tree(checkpoint, target)
    for name in ("README.md", "gate_scores.png", "ttft_curve.png", "token_lengths.png"):
        if (report_dir / name).exists():
            _refuse(report_dir / name, report_dir)
            (target / name).unlink(missing_ok=True)
            os.link(report_dir / name, target / name)
    (target / "recipe.yaml").write_text(recipe_yaml, encoding="utf-8")
    for name, source in (inputs or {}).items():
        # The data files the run read, from wherever the recipe names them. They are staged as copies, so
        # their names and what they link to are judged here (a link to ~/.netrc would stage as
        # calibration.jsonl), and their content with every other staged file below.
        why = secret_name(source)
        if why:
            raise RunnerError(f"publish: {source}, which the recipe reads, is not uploaded: {why}. Nothing was "
                              "uploaded; point the recipe at a file that holds no secret and run again")
        try:
            shutil.copyfile(source, target / name)
        except OSError as exc:
            raise RunnerError(f"cannot stage {source}, which the recipe reads, as {name} beside recipe.yaml: "
                              f"{exc.strerror or exc}") from None
    staged = [p for p in sorted(target.rglob("*")) if p.is_file()]
    for path in staged:
        _refuse(path, target)
    return [{"path": str(p.relative_to(target)), "bytes": p.stat().st_size} for p in staged]


def _refuse(path: Path, folder: Path) -> None:
    """Stop the publish step (before any upload) at a file that leads out of `folder` or is a secret."""
    why = unreadable(path, [folder])
    if why:
        raise RunnerError(f"publish: {path} is not uploaded: {why}. Nothing was uploaded; remove the file from "
                          "the checkpoint (or the export.fixups entry or recipe key that put it there) and run again")


def token_for(recipe: Recipe) -> str:
    token = os.environ.get(recipe.publish.token_env)
    if not token:
        from huggingface_hub import get_token

        token = get_token()
    if not token:
        raise RunnerError(f"no Hugging Face token: set {recipe.publish.token_env} (publish.token_env) or log in "
                          "with `hf auth login`; or keep publish.dry_run: true")
    return token


def upload(recipe: Recipe, folder: Path, message: str) -> dict[str, Any]:
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    repo_id = recipe.publish.repo_id
    assert repo_id is not None
    token = token_for(recipe)
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=recipe.publish.private, exist_ok=True, repo_type="model")
        commit = api.upload_folder(folder_path=folder, repo_id=repo_id, repo_type="model", commit_message=message)
    except HfHubHTTPError as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise RunnerError(f"uploading to {repo_id} failed: {first.replace(token, '***')}") from None
    return {"repo_id": repo_id, "commit_url": str(commit.commit_url), "commit": commit.oid}


# --- the step ---------------------------------------------------------------------------------


async def run(ctx: StepContext) -> StepResult:
    recipe = input_of(ctx, PublishInput).recipe
    spec = recipe.publish
    selection = ctx.input_record(ids.GATES).get("summary", {}).get("selection", {})
    best, export = selection.get("best"), selection.get("export")
    if best is None:
        # Not a failure of the pipeline: the run completes and exits with its own status (4).
        reason = "no strategy passed the gates; see steps/gates/comparison.md"
        ctx.log.info("publish skipped: %s", reason)
        return StepResult(summary={"published": False, "skipped": reason, "strategy": None,
                                   "repo_id": spec.repo_id, "dry_run": spec.dry_run})
    if spec.repo_id is None:
        raise RunnerError("publish.repo_id is not set: name the Hub repository (user/name) to publish to")
    suggested = ctx.input_record(ids.REPORT).get("summary", {}).get("suggested_repo_id")
    if suggested is not None and not spec.dry_run:
        raise RunnerError(f"publish.repo_id {spec.repo_id} names another format than the selected strategy {best} "
                          f"exported: set publish.repo_id to {suggested} (or a name of your own that does not "
                          "claim another format)")
    if export is None:
        raise RunnerError("the gates record names no export for the selected strategy (written by an older "
                          "runner): run the recipe again to re-judge, then publish")
    checkpoint = ctx.input(export["step"], export["output"])
    # The recipe as the card embeds it, with the data files it reads beside it: it runs as uploaded.
    portable = portable_recipe(recipe, reserved_names(ctx, best))
    files = await asyncio.to_thread(stage, checkpoint, ctx.input(ids.REPORT, "card").parent, portable.yaml,
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


KIND = StepKind("publish", run, input=PublishInput, modules=("steps/publish.py",))
