"""The shipped recipe catalogue: each model recipe with its source, license, family base and the
predicted footprint of its strategies on DGX Spark (GB10).

`recipe list` prints it; `recipe list --markdown` writes docs/recipes.md from the same entries
(tests/test_catalogue.py fails when the committed page is stale). Predictions come from the
recipe's `model.shapes` folder (config.json + the meta-device tensor listing), so nothing is
downloaded and no torch is imported.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from runner.errors import RecipeError
from runner.recipe.resources import shipped_dir

LIST_HARDWARE = "dgx-spark-gb10"
# Folders of recipes/ that hold parts of recipes rather than recipes to run.
NOT_RECIPES = ("base", "suites", "hardware", "models")


@dataclass
class StrategyPrediction:
    name: str
    description: str
    size_gb: float | None
    effective_bits: float | None
    decode_tok_s: float | None
    reason: str = ""


@dataclass
class Entry:
    path: str  # relative to recipes/
    name: str
    description: str
    model: str = ""
    source: str = ""
    license: str = ""
    bases: list[str] = field(default_factory=list)  # every file it extends (transitively), relative to recipes/
    source_gb: float | None = None
    source_tok_s: float | None = None
    strategies: list[StrategyPrediction] = field(default_factory=list)
    error: str = ""
    kind: str = "recipe"  # recipe | base
    search: str = ""  # what its search tries, in words ("" without one)


def _source_text(source) -> str:
    if source.kind == "huggingface":
        return f"{source.repo}@{source.revision[:12]}"
    if source.kind == "gguf":
        return f"GGUF {source.package + ':' + source.file if source.package else source.path.name}"
    return f"local folder {source.path.name}"


def recipe_entry(path: Path, root: Path) -> Entry:
    from runner.benchmark.prediction import hardware_target
    from runner.quantization import footprint
    from runner.quantization.weights import load_weights
    from runner.recipe.loader import load_recipe

    rel = str(path.relative_to(root))
    try:
        loaded = load_recipe(path, env={})
    except RecipeError as exc:
        return Entry(rel, path.stem, "", error=str(exc.problems[0]))
    recipe = loaded.recipe
    entry = Entry(rel, recipe.name, " ".join(recipe.description.split()), recipe.model.name,
                  _source_text(recipe.model.source), recipe.model.license or "",
                  # loaded.files is the recipe itself first, then every file it extends in load order
                  [str(f.relative_to(root)) for f in loaded.files[1:] if f.is_relative_to(root)])
    if recipe.search is not None:
        space = recipe.search.space
        entry.search = (f"{recipe.search.objective} over " + "; ".join(
            f"{family} {'/'.join(formats)}" for family, formats in space.formats.items())
            + f"; calibration {'/'.join(space.algorithms)}; budget {recipe.search.budget.candidates} candidates")
    folder, read_from = footprint.model_folder(recipe)
    names = [s.name for s in recipe.enabled_strategies()]
    if folder is None:
        entry.strategies = [StrategyPrediction(s.name, s.description, None, None, None, read_from)
                            for s in recipe.enabled_strategies()]
        return entry
    hardware = hardware_target(LIST_HARDWARE)  # the catalogue's one target, whatever each recipe serves on
    weights = load_weights(folder)
    src = footprint.source_footprint(recipe, weights, hardware)
    entry.source_gb = round(src.checkpoint_bytes / 1e9, 1) if src.checkpoint_bytes else None
    entry.source_tok_s = src.decode_tok_s
    by_name = {s.name: s for s in recipe.quantization.strategies}
    for fp in footprint.recipe_footprints(recipe, weights, hardware, names):
        entry.strategies.append(StrategyPrediction(
            fp.strategy, by_name[fp.strategy].description,
            round(fp.checkpoint_bytes / 1e9, 1) if fp.known and fp.checkpoint_bytes else None,
            fp.effective_bits if fp.known else None, fp.decode_tok_s if fp.known else None, fp.reason))
    return entry


def base_entry(path: Path, root: Path) -> Entry:
    from runner.recipe.yaml_tree import read_yaml

    node = read_yaml(path)
    desc = node.value.get("description") if isinstance(node.value, dict) else None
    text = " ".join(str(desc.value).split()) if desc is not None else ""
    return Entry(str(path.relative_to(root)), path.stem, text, kind="base")


def catalogue(root: Path | None = None) -> list[Entry]:
    """Every shipped recipe (model recipes first, then the demo and experiments), then the bases."""
    root = root or shipped_dir("recipes")
    recipes, bases = [], []
    for path in sorted(root.rglob("*.yaml")):
        top = path.relative_to(root).parts[0]
        if top == "base":
            bases.append(base_entry(path, root))
        elif top not in NOT_RECIPES:
            recipes.append(recipe_entry(path, root))
    recipes.sort(key=lambda e: ("/" in e.path, e.path))
    return recipes + bases


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def markdown(entries: list[Entry]) -> str:
    """docs/recipes.md."""
    lines = [
        "# Shipped recipes",
        "",
        "<!-- Generated by `recipe list --markdown -o docs/recipes.md`; tests/test_catalogue.py fails when",
        "     this page and the recipes disagree. Edit the recipes, not this page. -->",
        "",
        "Each model recipe extends a family base (exclusions that match the architecture's module names,",
        "export fix-ups, vLLM parsers), the DGX Spark strategies, teacher-generated chat calibration,",
        "gates relative to the served BF16 model, and the DGX Spark vLLM flags. Sizes, effective bits and",
        f"decode speeds are predictions for `{LIST_HARDWARE}` (273 GB/s) from the model's config and tensor",
        "shapes (`model.shapes`, no download): single-stream decode as bytes read per token over memory",
        "bandwidth (only the routed experts a token uses count for a MoE), an upper bound that real",
        "servers reach 50-90 % of. `recipe plan` shows the same per Linear; a run measures them.",
        "",
        "Run one with `recipe run recipes/NAME.yaml` after serving the BF16 model as the calibration",
        "teacher (`TEACHER_URL`, `TEACHER_MODEL`); start a recipe for another model with",
        "`recipe init MODEL_DIR`.",
        "",
    ]
    for e in (e for e in entries if e.kind == "recipe"):
        lines.append(f"## `{e.path}`: {e.model or e.name}")
        lines.append("")
        if e.error:
            lines += [f"Invalid: {e.error}", ""]
            continue
        lines.append(e.description)
        lines.append("")
        lines.append(f"- source: `{e.source}`" + (f", license `{e.license}`" if e.license else ""))
        if e.bases:
            lines.append(f"- extends: {', '.join(f'`{b}`' for b in e.bases)}")
        if e.source_gb is not None:
            lines.append(f"- BF16 source: {e.source_gb:.1f} GB, {_num(e.source_tok_s, '.1f')} tok/s predicted")
        if e.search:
            lines.append(f"- search (docs/search.md), besides the strategies below: {e.search}")
        lines += ["", "| strategy | what | size GB | effective bits | decode tok/s (GB10) |", "|---|---|---|---|---|"]
        for s in e.strategies:
            what = s.description.replace("|", "/") or "-"
            if s.size_gb is None:
                what += f" (prediction unknown: {s.reason})"
            lines.append(f"| {s.name} | {what} | {_num(s.size_gb, '.1f')} | {_num(s.effective_bits, '.2f')} | "
                         f"{_num(s.decode_tok_s, '.1f')} |")
        lines.append("")
    lines += ["## Bases", "", "| base | what it carries |", "|---|---|"]
    lines += [f"| `{e.path}` | {e.description.replace('|', '/')} |" for e in entries if e.kind == "base"]
    return "\n".join(lines) + "\n"
