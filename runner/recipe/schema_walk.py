"""Walk the pydantic schema along a key path, to list the keys and values valid at that point.

Used by error messages: a misspelt key or enum value gets the closest valid spelling.
"""

from __future__ import annotations

import re
import types
import typing
from typing import Any

from pydantic import BaseModel


def _unwrap(annotation: Any, value: Any) -> Any:
    """The model class (or container type) an annotation means for this value."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _unwrap(typing.get_args(annotation)[0], value)
    if origin in (typing.Union, types.UnionType):
        members = [a for a in typing.get_args(annotation) if a is not type(None)]
        models = [m for m in members if isinstance(m, type) and issubclass(m, BaseModel)]
        # A discriminated union: pick the member whose `kind`/`op` literal matches the value.
        for model in models:
            for tag in ("kind", "op"):
                field = model.model_fields.get(tag)
                if field is not None and isinstance(value, dict) and value.get(tag) in typing.get_args(
                        field.annotation):
                    return model
        if len(models) == 1:
            return models[0]
        return members[0] if len(members) == 1 else None
    return annotation


def _model_at(model: type[BaseModel], data: Any, path: tuple[Any, ...]) -> type[BaseModel] | None:
    current: Any = model
    for part in path:
        if isinstance(current, type) and issubclass(current, BaseModel):
            field = current.model_fields.get(part) if isinstance(part, str) else None
            if field is None:
                return None
            data = data.get(part) if isinstance(data, dict) else None
            current = _unwrap(field.annotation, data)
        elif typing.get_origin(current) in (list, dict):
            args = typing.get_args(current)
            data = data[part] if isinstance(data, (list, dict)) and _has(data, part) else None
            current = _unwrap(args[-1], data)
        else:
            return None
    current = _unwrap(current, data)
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def _has(container: Any, key: Any) -> bool:
    if isinstance(container, list):
        return isinstance(key, int) and 0 <= key < len(container)
    return key in container


def allowed_keys(root: type[BaseModel], data: Any, path: tuple[Any, ...]) -> list[str]:
    """Valid key names of the mapping at `path` (empty if the path leads nowhere known)."""
    model = _model_at(root, data, path)
    return list(model.model_fields) if model else []


def allowed_literals(error: dict[str, Any]) -> list[str]:
    """The valid values pydantic listed in a literal/enum/union-tag error."""
    ctx = error.get("ctx") or {}
    text = str(ctx.get("expected") or ctx.get("expected_tags") or "")
    return re.findall(r"'([^']*)'", text)
