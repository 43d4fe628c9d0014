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
    assert "--quantization" in loaded.recipe.serve.args  # and the hardware flags, appended


def test_recipe_list_prints_predictions():
    result = recipe("list")
    assert result.returncode == 0, result.stderr
    assert "qwen35-35b-a3b.yaml" in result.stdout and "w4a16" in result.stdout
    assert "predictions" in result.stdout
