"""Declarative fix-ups applied to an exported checkpoint (recipe `export.fixups`).

Each operation edits JSON files or copies a file; none knows any model. The plan's Qwen3.5 wrapping
(config nested under text_config with Qwen3_5ForConditionalGeneration on top, a
preprocessor_config.json, tokenizer_class Qwen2Tokenizer) is three of these in a recipe.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from runner.errors import RunnerError


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def apply_fixups(checkpoint: Path, fixups: list[dict[str, Any]], model_dir: Path | None) -> list[str]:
    """Apply fix-ups in order to the checkpoint folder; returns one line per operation done."""
    done = []
    for i, op in enumerate(fixups):
        kind = op["op"]
        where = f"export.fixups[{i}] ({kind})"
        if kind == "set_json":
            path = checkpoint / op["file"]
            _write(path, deep_merge(_read(path, where) if path.exists() else {}, op["values"]))
            done.append(f"set {', '.join(op['values'])} in {op['file']}")
        elif kind == "wrap_config":
            path = checkpoint / op["file"]
            inner = _read(path, where)
            wrapped = {key: inner[key] for key in op["keep_top"] if key in inner}
            wrapped[op["under"]] = inner
            wrapped = deep_merge(wrapped, op["set"])
            _write(path, wrapped)
            done.append(f"wrapped {op['file']} under {op['under']!r}")
        elif kind == "write_json":
            _write(checkpoint / op["file"], op["content"])
            done.append(f"wrote {op['file']}")
        elif kind == "copy_file":
            source = op["source"]
            if source.startswith("model:"):
                if model_dir is None:
                    raise RunnerError(f"{where}: {source} needs the source model, which is not available")
                src = model_dir / source.removeprefix("model:")
            else:
                src = Path(source)
            if not src.is_file():
                raise RunnerError(f"{where}: source file {src} does not exist")
            target = checkpoint / op["to"]
            target.unlink(missing_ok=True)  # may be a hard link into the quantize step's output
            shutil.copyfile(src, target)
            done.append(f"copied {src.name} to {op['to']}")
        else:
            raise RunnerError(f"{where}: unknown operation {kind!r}")
    return done


def _read(path: Path, where: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RunnerError(f"{where}: {path.name} is not in the exported checkpoint") from None
    except ValueError as exc:
        raise RunnerError(f"{where}: {path.name} is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise RunnerError(f"{where}: {path.name} does not hold a JSON object")
    return data


def _write(path: Path, data: dict[str, Any]) -> None:
    # Never write through a hard link into another step's committed output.
    path.unlink(missing_ok=True)
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
