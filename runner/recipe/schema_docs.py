"""The recipe reference (docs/recipe-reference.md), generated from the pydantic schema."""

from __future__ import annotations

import types
import typing
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from runner.recipe.schema import Recipe

HEADER = """# Recipe reference

Generated from `runner/recipe/schema.py` by `recipe schema --markdown -o docs/recipe-reference.md`; a test
fails when this file is out of date. Unknown keys are errors everywhere. For `extends:`, merging and
`${...}` interpolation see [writing-recipes.md](writing-recipes.md).
"""


def _type_name(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Annotated:
        return _type_name(args[0])
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if origin is typing.Literal:
        return " | ".join(f"`{a}`" for a in args)
    if origin is list:
        return f"list of {_type_name(args[0])}"
    if origin is dict:
        return f"mapping of {_type_name(args[0])} to {_type_name(args[1])}"
    if annotation is type(None):
        return "null"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return f"[{annotation.__name__}](#{annotation.__name__.lower()})"
    return getattr(annotation, "__name__", str(annotation))


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    found: list[type[BaseModel]] = []
    for arg in typing.get_args(annotation):
        found.extend(_models_in(arg))
    return found


def _default(field: Any) -> str:
    if field.is_required():
        return "**required**"
    if field.default_factory is not None:
        value = field.default_factory()
        if isinstance(value, BaseModel):
            return "(defaults below)"
        return f"`{value!r}`" if value not in ([], {}) else f"`{value}`"
    if field.default is PydanticUndefined:
        return ""
    return f"`{field.default!r}`"


def recipe_reference() -> str:
    lines = [HEADER]
    seen: set[type[BaseModel]] = set()
    queue: list[type[BaseModel]] = [Recipe]
    while queue:
        model = queue.pop(0)
        if model in seen:
            continue
        seen.add(model)
        lines.append(f"## {model.__name__}\n")
        doc = (model.__doc__ or "").strip()
        if doc:
            lines.append(doc + "\n")
        lines.append("| key | type | default | description |")
        lines.append("|---|---|---|---|")
        for name, field in model.model_fields.items():
            desc = (field.description or "").replace("|", "\\|").replace("\n", " ")
            type_name = _type_name(field.annotation).replace("|", "\\|")
            lines.append(f"| `{name}` | {type_name} | {_default(field)} | {desc} |")
            queue.extend(m for m in _models_in(field.annotation) if m not in seen)
        lines.append("")
    return "\n".join(lines)
