"""Which names `modelopt_recipe:` may take, checked against the installed `modelopt_recipes` package.

Read as files (no torch, no ModelOpt import), so `recipe validate` catches a misspelt name, a
fragment (`configs/...`, `*.quant_cfg.yaml`: pieces other recipes import) or a recipe of another
kind (auto_quantize, QAD, speculative decoding) before any worker starts. ModelOpt tells the kinds
apart by `metadata.recipe_type`; a file without it is a fragment.
"""

from __future__ import annotations

import difflib
import functools
import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SUFFIXES = (".yaml", ".yml")


@functools.cache
def recipes_root() -> Path | None:
    """The installed `modelopt_recipes` package (found, not imported), or None; looked up once (each
    look-up searches sys.path, and a recipe asks for every strategy)."""
    try:
        spec = importlib.util.find_spec("modelopt_recipes")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


@dataclass(frozen=True)
class RecipeNameProblem:
    message: str
    hint: str


def ptq_recipes(root: Path) -> list[str]:
    """Names of the single-file PTQ recipes in the package (`general/ptq/nvfp4_default-kv_fp8`)."""
    return sorted(str(path.relative_to(root).with_suffix("")) for path in root.rglob("*.y*ml")
                  if path.suffix in SUFFIXES and recipe_type(path) == "ptq")


def parse_yaml_file(path: Path) -> list[Any]:
    """The YAML documents of a ModelOpt file, parsed once per process and file version (path, mtime,
    size): thousands of strategies name the same few configs, which import the same fragments. The
    documents are shared: read them, never change them."""
    stat = path.stat()
    return _parsed(str(path), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=1024)
def _parsed(path: str, mtime_ns: int, size: int) -> list[Any]:
    from ruamel.yaml import YAML

    return list(YAML(typ="safe").load_all(Path(path).read_text(encoding="utf-8")))


def recipe_type(path: Path) -> str | None:
    """`metadata.recipe_type` of a recipe file (ptq, auto_quantize, ...); None for a fragment."""
    from ruamel.yaml.error import YAMLError

    try:
        docs = parse_yaml_file(path)
    except (OSError, UnicodeDecodeError, YAMLError):
        return None
    for doc in docs:
        if isinstance(doc, dict) and isinstance(doc.get("metadata"), dict):
            kind = doc["metadata"].get("recipe_type")
            return str(kind) if kind else None
    return None


def _locate(root: Path, name: str) -> Path | None:
    for candidate in (root / name, *(root / f"{name}{ext}" for ext in SUFFIXES)):
        if candidate.is_file() or (candidate.is_dir() and (candidate / "quantize.yml").is_file()):
            return candidate
    return None


def check_recipe_name(name: str) -> RecipeNameProblem | None:
    """None when `name` is a PTQ recipe this project can use (or when there is no package to check
    against); otherwise what is wrong and which key or name to use instead."""
    root = recipes_root()
    if root is None:
        return None
    path = _locate(root, name)
    if path is None and Path(name).is_absolute():
        path = Path(name) if Path(name).is_file() else None
        if path is None:
            return RecipeNameProblem(f"ModelOpt recipe file {name} does not exist", "give an existing YAML file")
    if path is None:
        known = ptq_recipes(root)
        guesses = difflib.get_close_matches(name.removesuffix(".yaml"), known, n=3, cutoff=0.6)
        return RecipeNameProblem(
            f"unknown ModelOpt recipe {name!r} (not in the installed modelopt_recipes package)",
            f"did you mean {' or '.join(repr(g) for g in guesses)}?" if guesses else
            f"the PTQ recipes are under general/ptq/, huggingface/*/ptq/ and models/*/ptq/ in {root}")
    if path.is_dir():
        return None  # a folder recipe (metadata.yml + quantize.yml): ModelOpt's loader reads it
    kind = recipe_type(path)
    if kind == "ptq":
        return None
    if kind is None:
        users = [r for r in ptq_recipes(root) if _imports(root / f"{r}.yaml", name)]
        return RecipeNameProblem(
            f"{name!r} is a fragment that ModelOpt recipes import, not a recipe",
            f"use a recipe that imports it: {', '.join(repr(u) for u in users[:3])}" if users else
            "name a recipe with `metadata: {recipe_type: ptq}` (general/ptq/...)")
    if kind == "auto_quantize":
        return RecipeNameProblem(
            f"{name!r} is a ModelOpt auto_quantize recipe; modelopt_recipe takes PTQ recipes only",
            "use the strategy's `auto_quantize:` section (effective_bits, formats, method) instead")
    return RecipeNameProblem(f"{name!r} is a ModelOpt {kind} recipe, not a quantization (PTQ) recipe",
                             "name a PTQ recipe (general/ptq/..., huggingface/*/ptq/..., models/*/ptq/...)")


def _imports(path: Path, fragment: str) -> bool:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        return False
    stem = fragment.removesuffix(".yaml").removesuffix(".yml")
    return f": {stem}\n" in text or f": {stem}.yaml\n" in text
