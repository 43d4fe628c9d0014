"""Declarative fix-ups applied to an exported checkpoint (recipe `export.fixups`).

Each operation is a recipe model (SetJson, WrapConfig, WriteJson, CopyFile, RenameTensors, CarryTensors,
DropTensors) that carries its own `apply()`; `apply_fixups` applies a list of them in order. None knows any
model. The plan's Qwen3.5 wrapping (config nested under text_config with Qwen3_5ForConditionalGeneration on
top, a preprocessor_config.json, tokenizer_class Qwen2Tokenizer) is three of these in a recipe; its MTP head,
which the text model the quantize worker loads does not have, is carried back by a fourth.

The tensor ops also say where each source tensor ends up (`tensor_accounting`): verify fails on a tensor of
the source checkpoint that is neither exported, renamed, carried nor dropped on purpose.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import shutil
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, TypeAdapter, ValidationError

from runner.errors import RunnerError
from runner.quantization.verify_rules import TensorAccounting
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


def _patterns(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


Patterns = Annotated[list[str], BeforeValidator(_patterns), Field(min_length=1)]
INDEX = "model.safetensors.index.json"
# safetensors dtypes carry_tensors converts from, and the numpy view of their bits
_FLOAT_DTYPES = {"BF16": 2, "F16": 2, "F32": 4}


class CarryTensors(Section):
    """Copy tensors of the source checkpoint that the quantized model does not have (an MTP head, a vision
    tower) into the export unquantized: a new safetensors shard (streamed tensor by tensor, never the whole
    model in memory), the shard index updated, the tensors' modules added to the quantization config's
    exclusion lists (hf_quant_config.json `exclude_modules`, config.json `quantization_config.ignore`) so the
    engine builds them unquantized, and the config entries its loader needs for them."""

    op: Literal["carry_tensors"]
    match: Patterns = Field(description="fnmatch patterns of source tensor names, e.g. `mtp.*`.")
    dtype: Literal["bfloat16"] = Field("bfloat16", description=(
        "Stored as: BF16, F16 and F32 source tensors are converted (round to nearest even)."))
    config: dict[str, Any] = Field(default_factory=dict, description=(
        "Deep-merged into the export's config.json when a tensor was carried."))
    config_from_source: list[str] = Field(default_factory=list, description=(
        "Dotted config.json keys copied from the source model's config.json to the same place in the export's "
        "when a tensor was carried and the source has the key, e.g. `text_config.mtp_num_hidden_layers` (read "
        "from the top level of a source saved as its text model)."))

    @property
    def shard(self) -> str:
        """The shard this op writes; named after its patterns, so two carry_tensors ops never share one."""
        return f"model-carried-{hashlib.sha256(' '.join(self.match).encode()).hexdigest()[:8]}.safetensors"

    def matches(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, p) for p in self.match)

    def apply(self, checkpoint: Path, model_dir: Path | None, where: str) -> str:
        if model_dir is None:
            raise RunnerError(f"{where}: carrying {', '.join(self.match)} needs the source model, which is not "
                              "available")
        source = safetensors_entries(model_dir)
        exported = set(safetensors_entries(checkpoint))
        wanted = [n for n in source if self.matches(n)]
        already = [n for n in wanted if n in exported]
        todo = [n for n in wanted if n not in exported]
        if not wanted:
            return f"carried no tensor: {', '.join(self.match)} match no tensor of the source"
        bad = sorted({source[n].dtype for n in todo} - set(_FLOAT_DTYPES))
        if bad:
            raise RunnerError(f"{where}: cannot store {', '.join(bad)} source tensors as {self.dtype} "
                              f"(it converts {', '.join(_FLOAT_DTYPES)})")
        if todo:
            write_carried(checkpoint / self.shard, [source[n] for n in todo])
            add_to_index(checkpoint, self.shard, todo, where)
        listed = exclude_from_quantization(checkpoint, self.match, where)
        set_keys = self.set_config(checkpoint, model_dir, where)
        return (f"carried {len(todo)} tensor(s) matching {', '.join(self.match)} as {self.dtype} into {self.shard}"
                + (f" ({len(already)} already exported)" if already else "")
                + (f"; unquantized in {', '.join(listed)}" if listed else "")
                + (f"; set {', '.join(set_keys)} in config.json" if set_keys else ""))

    def set_config(self, checkpoint: Path, model_dir: Path, where: str) -> list[str]:
        path = checkpoint / "config.json"
        if not (self.config or self.config_from_source) or not path.is_file():
            return []
        config = deep_merge(read_json_object(path, where), self.config)
        done = list(self.config)
        source_path = model_dir / "config.json"
        source = read_json_object(source_path, where) if source_path.is_file() else {}
        for dotted in self.config_from_source:
            *parents, leaf = dotted.split(".")
            value = _lookup(source, [*parents, leaf])
            if value is _MISSING and parents[:1] == ["text_config"]:
                value = _lookup(source, [*parents[1:], leaf])  # a source saved as its text model
            if value is _MISSING:
                continue
            target = config
            for key in parents:
                target = target.setdefault(key, {})
            target[leaf] = value
            done.append(dotted)
        write_json_object(path, config)
        return done


_MISSING = object()


def _lookup(data: Any, keys: list[str]) -> Any:
    for key in keys:
        data = data.get(key, _MISSING) if isinstance(data, dict) else _MISSING
    return data


class DropTensors(Section):
    """Declare source tensors the export leaves out on purpose, with the reason (the card and verify say it):
    verify fails on any other source tensor missing from the export."""

    op: Literal["drop_tensors"]
    match: Patterns = Field(description="fnmatch patterns of source tensor names.")
    reason: str = Field(min_length=1, description="Why the export does without them.")

    def apply(self, checkpoint: Path, model_dir: Path | None, where: str) -> str:
        count = sum(1 for n in safetensors_entries(model_dir) if any(fnmatch.fnmatchcase(n, p) for p in self.match)) \
            if model_dir is not None else 0
        return f"{count} source tensor(s) matching {', '.join(self.match)} left out on purpose: {self.reason}"


Fixup = Annotated[SetJson | WrapConfig | WriteJson | CopyFile | RenameTensors | CarryTensors | DropTensors,
                  Field(discriminator="op")]


def tensor_accounting(fixups: Sequence[Any]) -> TensorAccounting:
    """What the fix-ups declare about the source's tensors (renamed, carried, dropped), for verify."""
    fixups = [TypeAdapter(Fixup).validate_python(f) if isinstance(f, dict) else f for f in fixups]
    return TensorAccounting(
        renamed=tuple(pair for f in fixups if isinstance(f, RenameTensors) for pair in f.rename.items()),
        carried=tuple((p, f.dtype) for f in fixups if isinstance(f, CarryTensors) for p in f.match),
        dropped=tuple((p, f.reason) for f in fixups if isinstance(f, DropTensors) for p in f.match))


class Entry:
    """One tensor of a safetensors file: where its bytes are, from the header alone."""

    def __init__(self, name: str, file: Path, info: dict[str, Any], data_start: int) -> None:
        self.name, self.file = name, file
        self.dtype, self.shape = info["dtype"], list(info["shape"])
        begin, end = info["data_offsets"]
        self.offset, self.nbytes = data_start + begin, end - begin


def safetensors_entries(folder: Path) -> dict[str, Entry]:
    entries: dict[str, Entry] = {}
    for file in sorted(folder.glob("*.safetensors")):
        with file.open("rb") as fh:
            (length,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(length))
        entries.update({name: Entry(name, file, info, 8 + length) for name, info in header.items()
                        if name != "__metadata__"})
    return entries


def write_carried(target: Path, entries: list[Entry], chunk_elements: int = 1 << 22) -> None:
    """A safetensors file of `entries` stored as BF16, copied (or converted) in chunks from their files."""
    import numpy as np

    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for entry in entries:
        size = entry.nbytes // _FLOAT_DTYPES[entry.dtype] * 2
        header[entry.name] = {"dtype": "BF16", "shape": entry.shape, "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    tmp = target.with_name(target.name + ".tmp")
    with tmp.open("wb") as out:
        out.write(struct.pack("<Q", len(blob)) + blob)
        for entry in entries:
            width = _FLOAT_DTYPES[entry.dtype]
            with entry.file.open("rb") as fh:
                fh.seek(entry.offset)
                left = entry.nbytes
                while left:
                    raw = fh.read(min(left, chunk_elements * width))
                    if not raw:
                        raise RunnerError(f"{entry.file.name} ends inside tensor {entry.name}")
                    left -= len(raw)
                    out.write(raw if entry.dtype == "BF16" else
                              to_bf16(np.frombuffer(raw, "<f4" if width == 4 else "<f2")))
    tmp.replace(target)


def to_bf16(values: Any) -> bytes:
    """float32 (or float16) values as BF16 bytes, rounded to nearest even; NaN stays NaN."""
    import numpy as np

    bits = values.astype("<f4").view("<u4")
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype("<u2")
    nan = (bits & 0x7FFFFFFF) > 0x7F800000
    rounded[nan] = ((bits[nan] >> 16) | 0x40).astype("<u2")
    return np.ascontiguousarray(rounded).tobytes()


def add_to_index(checkpoint: Path, shard: str, names: list[str], where: str) -> None:
    """Name the new shard's tensors in the shard index (made for every shard when the export had none: an
    engine that reads the index loads only the files it names)."""
    path = checkpoint / INDEX
    if path.is_file():
        data = read_json_object(path, where)
    else:
        data = {"metadata": {}, "weight_map": {n: e.file.name for n, e in safetensors_entries(checkpoint).items()}}
    weight_map = dict(data.get("weight_map") or {})
    weight_map.update({n: shard for n in names})
    data["weight_map"] = dict(sorted(weight_map.items()))
    data.setdefault("metadata", {})["total_size"] = sum(e.nbytes for e in safetensors_entries(checkpoint).values())
    write_json_object(path, data)


def exclude_from_quantization(checkpoint: Path, patterns: list[str], where: str) -> list[str]:
    """Add `patterns` to the export's lists of modules the engine keeps unquantized; the files changed."""
    changed = []

    def extend(section: dict[str, Any], keys: tuple[str, ...], create: str) -> bool:
        lists = [k for k in keys if isinstance(section.get(k), list)] or [create]
        grew = False
        for key in lists:
            entries = list(section.get(key) or [])
            new = [p for p in patterns if p not in entries]
            if new:
                section[key], grew = entries + new, True
        return grew

    quant = checkpoint / "hf_quant_config.json"
    if quant.is_file():
        data = read_json_object(quant, where)
        if isinstance(data.get("quantization"), dict) and extend(data["quantization"], ("exclude_modules",),
                                                                 "exclude_modules"):
            write_json_object(quant, data)
            changed.append("hf_quant_config.json exclude_modules")
    config = checkpoint / "config.json"
    if config.is_file():
        data = read_json_object(config, where)
        sections = [s for s in (data.get("quantization_config"),
                                (data.get("text_config") or {}).get("quantization_config")) if isinstance(s, dict)]
        if sum(extend(s, ("ignore", "exclude_modules"), "ignore") for s in sections):
            write_json_object(config, data)
            changed.append("config.json quantization_config")
    return changed


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
