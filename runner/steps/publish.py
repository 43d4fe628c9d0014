"""Publish the selected checkpoint with its card and recipe to the Hugging Face Hub (dry run by default).

The upload folder is staged with hard links: the selected strategy's checkpoint, the model card
(README.md), the resolved recipe and the plots. A dry run lists exactly those files. The token
comes from the environment variable the recipe names (publish.token_env, HF_TOKEN by default) or
from the Hugging Face login cache; it is handed to huggingface_hub and never written, logged or put
in an error message.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from runner.errors import RunnerError
from runner.recipe.schema import Recipe
from runner.run_dir import link_tree


def stage(checkpoint: Path, report_dir: Path, recipe_yaml: str, target: Path) -> list[dict[str, Any]]:
    """The folder to upload; returns its files with sizes."""
    link_tree(checkpoint, target)
    for name in ("README.md", "gate_scores.png", "ttft_curve.png", "token_lengths.png"):
        if (report_dir / name).exists():
            (target / name).unlink(missing_ok=True)
            os.link(report_dir / name, target / name)
    (target / "recipe.yaml").write_text(recipe_yaml, encoding="utf-8")
    return [{"path": str(p.relative_to(target)), "bytes": p.stat().st_size}
            for p in sorted(target.rglob("*")) if p.is_file()]


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
