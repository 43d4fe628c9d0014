"""The shipped catalogue: model recipes with their source, license and predictions, the page
generated from them, the tensor listings they predict from, and extending every family base."""

from __future__ import annotations

import json
import re

import pytest

from conftest import REPO, recipe
from runner.catalogue import catalogue, markdown
from runner.recipe.loader import load_recipe

RECIPES = REPO / "recipes"
FAMILY_BASES = ["qwen35", "qwen35-moe", "qwen3-moe", "qwen3-next", "llama3", "gemma3", "mistral3", "nemotron-h", "generic",
                "gemma4", "gpt-oss"]
# The models DGX Spark users run that the catalogue must cover (issue 16), by recipe file.
CATALOGUE = {
    "qwen35-27b.yaml": "qwen35", "qwen35-35b-a3b.yaml": "qwen35-moe", "qwen3-30b-a3b.yaml": "qwen3-moe",
    "llama31-8b-instruct.yaml": "llama3", "gemma3-12b-it.yaml": "gemma3", "mistral-small-32-24b.yaml": "mistral3",
    "nemotron3-nano-30b-a3b.yaml": "nemotron-h", "qwen3-next-80b-a3b.yaml": "qwen3-next",
    # issue 27
    "qwen35-122b-a10b.yaml": "qwen35-moe", "qwen36-27b.yaml": "qwen35", "qwen36-35b-a3b.yaml": "qwen35-moe",
    "gemma4-31b-it.yaml": "gemma4", "gemma4-26b-a4b-it.yaml": "gemma4",
    "nemotron3-super-120b-a12b.yaml": "nemotron-h", "gpt-oss-120b.yaml": "gpt-oss",
}


@pytest.fixture(scope="module")
def entries():
    return catalogue()


def test_docs_recipes_page_is_generated_from_the_recipes(entries):
    page = (REPO / "docs" / "recipes.md").read_text(encoding="utf-8")
    assert page == markdown(entries), "docs/recipes.md is stale: run `recipe list --markdown -o docs/recipes.md`"


@pytest.mark.parametrize("name,family", sorted(CATALOGUE.items()))
def test_catalogue_recipe_names_its_source_license_family_and_predicts(entries, name, family):
    loaded = load_recipe(RECIPES / name, env={})
    model = loaded.recipe.model
    assert model.source.kind == "huggingface" and "/" in model.source.repo
    assert re.fullmatch(r"[0-9a-f]{40}", model.source.revision), "pin a commit"
    assert model.license and model.shapes is not None
    assert RECIPES / "base" / f"{family}.yaml" in loaded.files
    # The strategies and serving flags a DGX Spark recipe needs.
    names = {s.name for s in loaded.recipe.enabled_strategies()}
    assert {"w4a16", "nvfp4_awq"} <= names
    args = loaded.recipe.serve.args
    if family != "generic":
        assert "--tool-call-parser" in args and "--enable-auto-tool-choice" in args
    entry = next(e for e in entries if e.path == name)
    assert not entry.error and entry.source_gb and entry.source_gb > 10
    for s in entry.strategies:
        assert s.size_gb is not None and s.size_gb < entry.source_gb, (name, s)
        assert s.decode_tok_s is not None and s.decode_tok_s > entry.source_tok_s, (name, s)


def test_moe_decode_counts_only_the_experts_a_token_uses(entries):
    """Qwen3-30B-A3B reads 8 of 128 experts a token: its predicted decode must beat a dense model of
    half its size (Llama-3.1-8B is 16 GB against its 61 GB)."""
    qwen = next(e for e in entries if e.path == "qwen3-30b-a3b.yaml")
    llama = next(e for e in entries if e.path == "llama31-8b-instruct.yaml")
    assert qwen.source_gb > 3 * llama.source_gb
    assert qwen.source_tok_s > 2 * llama.source_tok_s


def test_shipped_tensor_listings_match_a_fresh_meta_build():
    """Every recipes/models/*/tensors.json is what the installed transformers builds from config.json."""
    pytest.importorskip("torch")
    from runner.worker.model_loading import tensor_listing

    folders = sorted(p.parent for p in (RECIPES / "models").glob("*/config.json"))
    assert len(folders) >= 9
    for folder in folders:
        shipped = json.loads((folder / "tensors.json").read_text(encoding="utf-8"))
        assert tensor_listing(folder) == shipped, (
            f"{folder.name}/tensors.json is stale: python -m runner.worker.model_loading {folder} {folder}/tensors.json")


@pytest.mark.parametrize("family", FAMILY_BASES)
def test_a_recipe_outside_the_repository_extends_each_family_base_by_name(tmp_path, family):
    (tmp_path / "calib.jsonl").write_text('{"messages": [{"role": "user", "content": "hi"}]}\n', encoding="utf-8")
    (tmp_path / "model").mkdir()
    path = tmp_path / "mine.yaml"
    path.write_text(f"""extends: [base/spark-strategies.yaml, base/{family}.yaml, base/vllm-dgx-spark.yaml]
name: mine
vars: {{last_layer: 11}}
model: {{name: Mine, source: {{kind: local, path: model}}}}
calibration: {{source: {{kind: jsonl, path: calib.jsonl}}}}
""", encoding="utf-8")
    loaded = load_recipe(path, env={})
    assert RECIPES / "base" / f"{family}.yaml" in loaded.files
    assert loaded.recipe.quantization.exclude  # the family's exclusions arrived
    assert "--gpu-memory-utilization" in loaded.recipe.serve.args  # and the hardware flags, appended


def test_recipe_list_prints_predictions():
    result = recipe("list")
    assert result.returncode == 0, result.stderr
    assert "qwen35-35b-a3b.yaml" in result.stdout and "w4a16" in result.stdout
    assert "predictions" in result.stdout


# The parameter-count table of recipes/models/README.md (issue 27): its header, spelled exactly, so
# that a row for a new folder lands in the table this test reads.
COUNTS_HEADER = ("| folder | listing parameters | dropped on load | published parameters | difference | "
                 "source of the published number |")
# Rows whose publisher gives no exact count (`unverified: ...` in the published column), by folder.
# None today; adding one means naming it here too.
UNVERIFIED_COUNTS: set[str] = set()


def _count(cell: str) -> int:
    """The integer a cell starts with: `24,011,361,280` or `885,429,488 vision tower + mtp`."""
    found = re.match(r"\s*(\d[\d,]*)(?:\s|$)", cell)
    assert found, f"no parameter count at the start of {cell!r}"
    return int(found.group(1).replace(",", ""))


def _part(cell: str, label: str) -> int | None:
    """The count after `label` in a cell (`... vision tower 446,571,248 + mtp 844,640,768`), if any."""
    found = re.search(rf"{label} (\d[\d,]*)", cell)
    return int(found.group(1).replace(",", "")) if found else None


def parameter_count_rows() -> dict[str, dict[str, str]]:
    lines = (RECIPES / "models" / "README.md").read_text(encoding="utf-8").splitlines()
    assert COUNTS_HEADER in lines, "recipes/models/README.md has no parameter-count table"
    rows: dict[str, dict[str, str]] = {}
    names = [c.strip() for c in COUNTS_HEADER.strip("|").split("|")]
    for line in lines[lines.index(COUNTS_HEADER) + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        assert len(cells) == len(names), f"a row of the parameter-count table has {len(cells)} cells: {line}"
        row = dict(zip(names, cells, strict=True))
        assert row["folder"] not in rows, f"two rows for {row['folder']}"
        rows[row["folder"]] = row
    return rows


def _total(entries: dict) -> int:
    total = 0
    for _dtype, shape in entries.values():
        n = 1
        for d in shape:
            n *= d
        total += n
    return total


def listing_totals(folder) -> tuple[int, int, int]:
    """(the listing's `tensors`, its `dropped_on_load`, the vision tower among those) in parameters."""
    listing = json.loads((folder / "tensors.json").read_text(encoding="utf-8"))
    dropped = listing.get("dropped_on_load", {})
    vision = {n: e for n, e in dropped.items() if n.startswith("model.visual.")}
    return _total(listing["tensors"]), _total(dropped), _total(vision)


def test_every_listing_holds_the_published_parameter_count_less_what_it_leaves_out_on_purpose():
    """listing + dropped_on_load + difference == published, exactly, for every folder with a tensors.json;
    the dropped_on_load total and its vision/MTP split equal the row's `dropped on load` exactly; a folder
    without a row, a row without a folder and an unexpected `unverified` row all fail."""
    rows = parameter_count_rows()
    folders = {p.parent.name: p.parent for p in (RECIPES / "models").glob("*/tensors.json")}
    assert set(rows) - set(folders) == set(), "rows for folders that have no tensors.json"
    assert set(folders) - set(rows) == set(), "folders missing from the parameter-count table"
    unverified, wrong = set(), []
    for name, folder in sorted(folders.items()):
        row = rows[name]
        total, dropped, vision = listing_totals(folder)
        if _count(row["listing parameters"]) != total:
            wrong.append(f"{name}: the table says the listing holds {row['listing parameters']}, it holds {total:,}")
        cell = row["dropped on load"]
        if _count(cell) != dropped:
            wrong.append(f"{name}: the table says {cell} are dropped on load, the listing's dropped_on_load "
                         f"holds {dropped:,}")
        if (_part(cell, "vision tower") or 0) != vision:
            wrong.append(f"{name}: the table's vision tower ({cell}), the listing's model.visual.* {vision:,}")
        mtp = _part(cell, "mtp")
        if mtp is not None and mtp != dropped - vision:
            wrong.append(f"{name}: the table's mtp ({cell}), the listing's mtp.* {dropped - vision:,}")
        if row["published parameters"].startswith("unverified"):
            unverified.add(name)
            continue
        assert row["source of the published number"], f"{name}: no source for the published number"
        published, difference = _count(row["published parameters"]), _count(row["difference"])
        if total + dropped + difference != published:
            wrong.append(f"{name}: listing {total:,} + dropped on load {dropped:,} + difference {difference:,} = "
                         f"{total + dropped + difference:,}, published {published:,} "
                         f"(off by {published - total - dropped - difference:,})")
    assert not wrong, "\n".join(wrong)
    assert unverified == UNVERIFIED_COUNTS, f"rows without an exact published count: {sorted(unverified)}"


def test_an_untied_model_lists_its_own_lm_head():
    """Read as transformers reads it, a config that says `tie_word_embeddings: false` (top level or
    text_config) has an lm_head of its own in the listing; the top level and the text config agree
    (transformers ties on the top level: Mistral 3's Hub config omits it there and its class
    default is true, transformers#42313), and a tied model lists no separate lm_head."""
    pytest.importorskip("transformers")
    from transformers import AutoConfig

    wrong = []
    for folder in sorted(p.parent for p in (RECIPES / "models").glob("*/tensors.json")):
        config = AutoConfig.from_pretrained(folder)
        top = getattr(config, "tie_word_embeddings", None)
        text = getattr(config.get_text_config(), "tie_word_embeddings", None)
        names = json.loads((folder / "tensors.json").read_text(encoding="utf-8"))["tensors"]
        heads = [n for n in names if n == "lm_head.weight" or n.endswith(".lm_head.weight")]
        if top is not text:
            wrong.append(f"{folder.name}: tie_word_embeddings is {top} at the top level, {text} in text_config")
        if top is False or text is False:
            if len(heads) != 1:
                wrong.append(f"{folder.name}: untied, but the listing has no lm_head of its own ({heads})")
        elif heads:
            wrong.append(f"{folder.name}: tied, yet the listing has {heads}")
    assert not wrong, "\n".join(wrong)


def test_mistral_small_config_says_its_lm_head_is_untied():
    raw = json.loads((RECIPES / "models" / "mistral-small-32-24b" / "config.json").read_text(encoding="utf-8"))
    assert raw["tie_word_embeddings"] is False and raw["text_config"]["tie_word_embeddings"] is False


def test_a_served_baseline_that_cannot_fit_the_serving_target_is_refused(tmp_path):
    """Qwen3-Next-80B-A3B's BF16 source (159 GB) cannot be served on the 128 GB Spark its recipe targets:
    with `benchmark.baseline.kind: served` recipe validate/plan refuse it, naming the sizes and the fix;
    the shipped recipe points its baseline at an endpoint and passes; every other catalogue recipe's
    source fits."""
    from runner.plan_checks import baseline_problems
    from runner.quantization.weights import load_weights

    shipped = load_recipe(RECIPES / "qwen3-next-80b-a3b.yaml", env={})
    weights = load_weights(shipped.recipe.model.shapes)
    assert shipped.recipe.benchmark.baseline.kind == "endpoint"
    assert baseline_problems(shipped, weights) == []

    served = tmp_path / "served.yaml"
    served.write_text(f"extends: [{RECIPES / 'qwen3-next-80b-a3b.yaml'}]\n"
                      "benchmark:\n  baseline: {kind: served, name: BF16}\n", encoding="utf-8")
    loaded = load_recipe(served, env={})
    (problem,) = baseline_problems(loaded, weights)
    assert problem.path == ("benchmark", "baseline") and problem.location.file == str(served)
    assert "159.3 GB" in problem.message and "dgx-spark-gb10 has 128 GB" in problem.message
    assert "108.8 GB" in problem.message and "--gpu-memory-utilization 0.85" in problem.message
    assert "kind: endpoint" in problem.hint

    from runner.plan_checks import recipe_problems

    assert any(p.path == ("benchmark", "baseline") for p in recipe_problems(loaded, loaded.recipe.model.shapes, weights))
    for name in CATALOGUE:
        other = load_recipe(RECIPES / name, env={})
        assert baseline_problems(other, load_weights(other.recipe.model.shapes)) == [], name


def _extends_closure(path, root) -> list[str]:
    """Every file `path` extends, depth first in the order written, read with ruamel alone (not the
    loader): a name is relative to the file that writes it, else to the shipped recipes/ folder."""
    from ruamel.yaml import YAML

    data = YAML(typ="safe").load(path.read_text(encoding="utf-8")) or {}
    named = data.get("extends") or []
    out: list[str] = []
    for name in [named] if isinstance(named, str) else named:
        base = (path.parent / name).resolve()
        if not base.is_file():
            base = (root / name).resolve()
        out += [str(base.relative_to(root)), *_extends_closure(base, root)]
    return out


def test_docs_recipes_page_lists_what_each_recipe_extends_as_its_yaml_says():
    """docs/recipes.md checked against the recipe files themselves, not against the code that writes it
    (issue 27: every `extends:` line dropped base/vllm-dgx-spark.yaml and the staleness test, which
    regenerates the page with the same code, could not see it)."""
    root = RECIPES.resolve()
    page = (REPO / "docs" / "recipes.md").read_text(encoding="utf-8")
    sections = dict(re.findall(r"^## `([^`]+)`: .*?\n(.*?)(?=^## )", page, flags=re.S | re.M))
    shipped = sorted(p for p in root.rglob("*.yaml")
                     if p.relative_to(root).parts[0] not in ("base", "suites", "hardware", "models"))
    assert len(shipped) >= 10
    for path in shipped:
        rel = str(path.relative_to(root))
        assert rel in sections, f"docs/recipes.md has no section for {rel}"
        lines = [line for line in sections[rel].splitlines() if line.startswith("- extends: ")]
        listed = re.findall(r"`([^`]+)`", lines[0]) if lines else []
        assert listed == _extends_closure(path, root), rel
    assert "`base/vllm-dgx-spark.yaml`" in sections["qwen35-9b-opus.yaml"]


def test_every_moe_listing_has_its_active_expert_share():
    """A MoE model's decode prediction reads only the experts a token uses: every listing with routed experts
    has a top-k / experts share from its config (Gemma 4 names its top-k `top_k_experts`: missed, its 26B-A4B
    was predicted at dense speed)."""
    from runner.quantization.decode import active_expert_fraction

    models = RECIPES / "models"
    for folder in sorted(p for p in models.iterdir() if (p / "tensors.json").is_file()):
        names = json.loads((folder / "tensors.json").read_text(encoding="utf-8"))["tensors"]
        moe = any(".experts." in n for n in names)
        share = active_expert_fraction(folder / "config.json")
        assert (share is not None) is moe, (folder.name, share)
        assert share is None or 0 < share < 0.5, (folder.name, share)
