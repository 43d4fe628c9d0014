"""The base of every recipe model: unknown keys are errors, and paths resolve against the recipe
file that wrote them. Shared by runner/recipe/schema.py and the models that live next to their behaviour
(runner/steps/fixups.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field

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
    """`model:NAME` names a file of the source model (inside it); anything else is a path like RecipePath."""
    if isinstance(value, str) and value.startswith(MODEL_FILE_PREFIX):
        _inside(value.removeprefix(MODEL_FILE_PREFIX), "the source model's folder")
        return value
    if isinstance(value, str):
        return str(_resolve_path(value))
    return value


def _inside(value: str, folder: str) -> str:
    """A relative path that stays inside `folder`: no absolute path, no `..`, no `~`."""
    parts = Path(value).parts
    if not value or Path(value).is_absolute() or value.startswith("~") or ".." in parts:
        raise ValueError(f"{value!r} must be a path inside {folder} (relative, without `..`)")
    return value


def _inside_checkpoint(value: str) -> str:
    return _inside(value, "the exported checkpoint")


# A file a fix-up writes: relative to the exported checkpoint, and staying inside it.
CheckpointFile = Annotated[str, AfterValidator(_inside_checkpoint)]
Identifier = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")
