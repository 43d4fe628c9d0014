"""The base of every recipe model: unknown keys are errors, and paths resolve against the recipe
file that wrote them. Shared by runner/recipe/schema.py and the models that live next to their behaviour
(runner/steps/fixups.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

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
    """`model:NAME` names a file of the source model; anything else is a path like RecipePath."""
    if isinstance(value, str) and not value.startswith(MODEL_FILE_PREFIX):
        return str(_resolve_path(value))
    return value
Identifier = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")
