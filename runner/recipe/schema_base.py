"""The base of every recipe model: unknown keys are errors, and paths resolve against the recipe
file that wrote them. Shared by runner/recipe/schema.py and the models that live next to their behaviour
(runner/recipe/fixups.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field

from runner.recipe.secrets import secret_file, secret_name

MODEL_FILE_PREFIX = "model:"  # `model:NAME` names a file of the source model (copy_file's source)


def _resolve_path(value: Any) -> Any:
    """Relative paths resolve against the directory of the recipe file that wrote them."""
    if isinstance(value, str):
        base_dir = getattr(value, "base_dir", None)
        path = Path(value).expanduser()
        if not path.is_absolute() and base_dir is not None:
            path = base_dir / path
        return path
    return value


RecipePath = Annotated[Path, BeforeValidator(_resolve_path)]


def _resolve_file_ref(value: Any) -> Any:
    """`model:NAME` names a file of the source model (inside it); anything else is a file beside the recipe
    that names it: relative, inside that recipe's folder once `~` and symbolic links are resolved, and not a
    secret. Its folder is kept resolved (the file keeps the name the recipe gives it), so that a folder
    replaced by a symbolic link later shows when the file is read (runner/recipe/fixups.py)."""
    if isinstance(value, str) and value.startswith(MODEL_FILE_PREFIX):
        _inside(value.removeprefix(MODEL_FILE_PREFIX), "the source model's folder")
        return value
    base_dir = getattr(value, "base_dir", None)
    if base_dir is None:
        # The runner's own records (the resolved recipe, a step's inputs) or a test: checked when the recipe
        # was loaded, and again where the file is read.
        return str(_resolve_path(value)) if isinstance(value, str) else value
    _inside(value, "the folder of the recipe that names it",
            fix="copy the file beside the recipe, or write model:NAME for a file of the source model")
    path = base_dir / value
    why = unreadable(path, [base_dir])
    if why:
        raise ValueError(f"{value!r} cannot be read into the checkpoint: {why}")
    return str(path.parent.resolve() / path.name)


def unreadable(path: Path, folders: list[Path]) -> str | None:
    """Why a file a recipe reads for the export or upload must not be read, or None: once `~` and symbolic
    links are resolved it lies outside `folders` (the source model, the recipe's folder, the checkpoint), or
    it is a secret by name or, when it exists, by content (runner/recipe/secrets.py). Checked when the recipe
    is loaded, where the path is known, and again when the file is read: a link made in between is caught
    there."""
    resolved = path.expanduser().resolve()
    if not any(resolved.is_relative_to(folder.expanduser().resolve()) for folder in folders):
        return (f"it resolves to {resolved}, outside {folders[0]} (a symbolic link pointing out of it); "
                "copy the file in instead of linking to it")
    why = secret_file(path) if resolved.is_file() else secret_name(path)
    return f"{why}; a secret must never reach a checkpoint or the Hub" if why else None


def _inside(value: str, folder: str, fix: str = "") -> str:
    """A relative path that stays inside `folder`: no absolute path, no `..`, no `~`."""
    parts = Path(value).parts
    if not value or Path(value).is_absolute() or value.startswith("~") or ".." in parts:
        raise ValueError(f"{value!r} must be a path inside {folder} (relative, without `..` or `~`)"
                         + (f": {fix}" if fix else ""))
    return value


def _inside_checkpoint(value: str) -> str:
    return _inside(value, "the exported checkpoint")


# A file a fix-up writes: relative to the exported checkpoint, and staying inside it.
CheckpointFile = Annotated[str, AfterValidator(_inside_checkpoint)]
Identifier = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")
