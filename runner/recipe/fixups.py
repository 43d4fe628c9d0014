"""Declarative fix-ups applied to an exported checkpoint (recipe `export.fixups`).

Each operation is a recipe model (SetJson, WrapConfig, WriteJson, CopyFile, RenameTensors) that carries its own
`apply()`; `apply_fixups` applies a list of them in order. None knows any model. The plan's
Qwen3.5 wrapping (config nested under text_config with Qwen3_5ForConditionalGeneration on top, a
preprocessor_config.json, tokenizer_class Qwen2Tokenizer) is three of these in a recipe.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, TypeAdapter, ValidationError

from runner.errors import RunnerError
from runner.recipe.schema_base import MODEL_FILE_PREFIX, CheckpointFile, Section, _resolve_file_ref, unreadable


class SetJson(Section):
    """Deep-merge `values` into a JSON file of the exported checkpoint."""

    op: Literal["set_json"]
    file: CheckpointFile
    values: dict[str, Any]

    def apply(self, checkpoint: Path, model_dir: Path | None, where: str) -> str:
        path = checkpoint / self.file
        write_json_object(path, deep_merge(read_json_object(path, where) if path.exists() else {}, self.values))
        return f"set {', '.join(self.values)} in {self.file}"


class WrapConfig(Section):
    """Nest a config under a key (e.g. a text config inside a vision-language wrapper)."""

    op: Literal["wrap_config"]
    file: CheckpointFile = "config.json"
    under: str = Field(description="Key that receives the original config, e.g. text_config.")
    keep_top: list[str] = Field(default_factory=list, description="Keys copied to the top level as well.")
    set: dict[str, Any] = Field(default_factory=dict, description="Top-level keys of the wrapper.")

    def apply(self, checkpoint: Path, model_dir: Path | None, where: str) -> str:
        path = checkpoint / self.file
        inner = read_json_object(path, where)
        wrapped = {key: inner[key] for key in self.keep_top if key in inner}
        wrapped[self.under] = inner
        write_json_object(path, deep_merge(wrapped, self.set))
        return f"wrapped {self.file} under {self.under!r}"


class WriteJson(Section):
    """Write a JSON file into the checkpoint."""

    op: Literal["write_json"]
    file: CheckpointFile
    content: dict[str, Any]

    def apply(self, checkpoint: Path, model_dir: Path | None, where: str) -> str:
        write_json_object(checkpoint / self.file, self.content)
        return f"wrote {self.file}"


class CopyFile(Section):
    """Copy a file into the checkpoint: from a path (relative to the recipe) or from the source model."""

    op: Literal["copy_file"]
    source: Annotated[str, BeforeValidator(_resolve_file_ref)] = Field(
        description="A path (relative to the recipe), or `model:NAME` for a file of the source model.")
    to: CheckpointFile

    @property
    def model_file(self) -> str | None:
        """NAME for `model:NAME` (a file of the source model); None for a path."""
        return self.source.removeprefix(MODEL_FILE_PREFIX) if self.source.startswith(MODEL_FILE_PREFIX) else None

    def apply(self, checkpoint: Path, model_dir: Path | None, where: str) -> str:
        if self.model_file is not None:
            if model_dir is None:
                raise RunnerError(f"{where}: {self.source} needs the source model, which is not available")
            src = model_dir / self.model_file
            folders = [model_dir]
            if model_dir.parent.name == "snapshots":  # the Hugging Face cache: files link to the repo's blobs
                folders.append(model_dir.parent.parent / "blobs")
        else:
            # Checked against the recipe's folder when the recipe was loaded, and kept with every symbolic link
            # resolved: a folder above it that resolves elsewhere now was replaced by a link since, and the file
            # itself may link only within its folder (unreadable, below).
            src = Path(self.source)
            folders = [src.parent]
            if src.is_absolute() and src.parent.resolve() != src.parent:
                raise RunnerError(f"{where}: {self.source} is refused: its folder now resolves to "
                                  f"{src.parent.resolve()} through a symbolic link made after the recipe was "
                                  "checked; copy the file in instead of linking to it")
        if not src.is_file():
            raise RunnerError(f"{where}: source file {src} does not exist")
        why = unreadable(src, folders)
        if why:
            raise RunnerError(f"{where}: {self.source} is refused: {why}")
        replace_file(src, checkpoint / self.to)
        return f"copied {src.name} to {self.to}"


class RenameTensors(Section):
    """Rename tensors in the checkpoint's safetensors files (headers rewritten, data copied as is).

    For names the export spells differently from what the engine's loader reads, e.g. transformers
    5.14 saving Nemotron-H's `backbone.embeddings.weight` as `backbone.embedding.weight`."""

    op: Literal["rename_tensors"]
    rename: dict[str, str] = Field(description="Old tensor name -> new name.")

    def apply(self, checkpoint: Path, model_dir: Path | None, where: str) -> str:
        done: list[str] = []
        for file in sorted(checkpoint.glob("*.safetensors")):
            done += rename_in_safetensors(file, self.rename)
        missing = [old for old, new in self.rename.items() if old not in done]
        index = checkpoint / "model.safetensors.index.json"
        if index.is_file() and done:
            data = read_json_object(index, where)
            data["weight_map"] = {self.rename.get(k, k): v for k, v in (data.get("weight_map") or {}).items()}
            write_json_object(index, data)
        if not done:
            return f"renamed no tensor ({', '.join(missing)}: not in the export)"
        return f"renamed {', '.join(f'{old} -> {self.rename[old]}' for old in done)}"


def rename_in_safetensors(file: Path, rename: dict[str, str]) -> list[str]:
    """Rewrite one safetensors file with renamed header keys; returns the old names renamed."""
    import struct

    with file.open("rb") as fh:
        (length,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(length))
        found = [name for name in header if name in rename]
        if not found:
            return []
        header = {rename.get(k, k): v for k, v in header.items()}
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # the format pads the header to 8 bytes
        tmp = file.with_name(file.name + ".tmp")
        with tmp.open("wb") as out:
            out.write(struct.pack("<Q", len(blob)) + blob)
            shutil.copyfileobj(fh, out, 1 << 24)
    tmp.replace(file)  # a new inode: the quantize step's hard-linked original is untouched
    return found


Fixup = Annotated[SetJson | WrapConfig | WriteJson | CopyFile | RenameTensors, Field(discriminator="op")]


def apply_fixups(checkpoint: Path, fixups: Sequence[Any], model_dir: Path | None) -> list[str]:
    """Apply fix-ups (schema models, or their mappings) in order to the checkpoint folder; one line each."""
    adapter = TypeAdapter(Fixup)
    done = []
    for i, fixup in enumerate(fixups):
        where = f"export.fixups[{i}] ({fixup['op'] if isinstance(fixup, dict) else fixup.op})"
        if isinstance(fixup, dict):
            try:
                fixup = adapter.validate_python(fixup)
            except ValidationError as exc:
                raise RunnerError(f"{where}: {exc.errors()[0]['msg']}") from None
        done.append(fixup.apply(checkpoint, model_dir, where))
    return done


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def read_json_object(path: Path, where: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RunnerError(f"{where}: {path.name} is not in the exported checkpoint") from None
    except ValueError as exc:
        raise RunnerError(f"{where}: {path.name} is not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise RunnerError(f"{where}: {path.name} does not hold a JSON object")
    return data


def write_json_object(path: Path, data: dict[str, Any]) -> None:
    # Never write through a hard link into another step's committed output.
    path.unlink(missing_ok=True)
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def replace_file(source: Path, target: Path) -> None:
    target.unlink(missing_ok=True)  # may be a hard link into the quantize step's output
    shutil.copyfile(source, target)
