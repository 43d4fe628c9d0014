"""`recipe init`: a starter recipe from a model's config.json that validates and plans unedited."""

from __future__ import annotations

import json
import re

import pytest

from conftest import REPO, build_tiny_llama, recipe
from runner.init_recipe import detect
from runner.recipe.loader import load_recipe

MODELS = REPO / "recipes" / "models"


@pytest.mark.parametrize("folder,family,last_layer", [
    ("qwen35-27b", "qwen35", 63), ("qwen35-35b-a3b", "qwen35-moe", 39), ("gemma3-12b-it", "gemma3", 47),
    ("nemotron3-nano-30b-a3b", "nemotron-h", None), ("qwen3-30b-a3b", "qwen3-moe", None),
])
def test_init_from_a_config_json_extends_the_family_base_and_plans(tmp_path, folder, family, last_layer):
    user = tmp_path / "user"
    user.mkdir()
    (user / "config.json").write_bytes((MODELS / folder / "config.json").read_bytes())
    out = tmp_path / "recipes" / "mine.yaml"
    result = recipe("init", str(user / "config.json"), "-o", str(out))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"extends base/{family}.yaml" in result.stdout
    assert re.search(r"w4a16\s.*\d+\.\d", result.stdout), result.stdout  # a predicted size per strategy
    assert sorted(p.name for p in user.iterdir()) == ["config.json"]  # nothing written into the user's folder
    loaded = load_recipe(out, env={})
    assert (REPO / "recipes" / "base" / f"{family}.yaml") in loaded.files
    if last_layer is not None:
        assert f"last_layer: {last_layer}" in out.read_text()
    assert loaded.recipe.model.shapes == out.parent / "mine.shapes"
    assert recipe("validate", str(out)).returncode == 0
    plan = recipe("plan", str(out), "--run-dir", str(tmp_path / "run"), "--json")
    assert plan.returncode == 0, plan.stdout + plan.stderr
    footprints = json.loads(plan.stdout)["footprint"]
    assert footprints["w4a16"]["known"] and footprints["w4a16"]["size_gb"] > 1


def test_init_from_a_folder_with_weights_reads_its_headers_and_refuses_to_overwrite(tmp_path, demo_tokenizer):
    model = build_tiny_llama(tmp_path / "tiny", demo_tokenizer)
    before = sorted(p.name for p in model.iterdir())
    out = tmp_path / "tiny.yaml"
    result = recipe("init", str(model), "-o", str(out))
    assert result.returncode == 0, result.stdout + result.stderr
    assert not (tmp_path / "tiny.shapes").exists()  # the weights are there: no listing needed
    assert "from model.source.path" in result.stdout
    text = out.read_text()
    assert "base/generic.yaml" in text and "without Llama 3's 128256-token vocabulary" in text
    assert sorted(p.name for p in model.iterdir()) == before
    again = recipe("init", str(model), "-o", str(out))
    assert again.returncode == 1 and "--force" in again.stdout + again.stderr
    assert out.read_text() == text


def test_detect_reads_hybrid_patterns_experts_vision_and_unknown_architectures():
    nemotron = detect(json.loads((MODELS / "nemotron3-nano-30b-a3b" / "config.json").read_text()))
    assert nemotron.family == "nemotron-h" and nemotron.layers == 52
    assert nemotron.extra_exclude == [f"*layers.{i}.mixer.*" for i in (4, 11, 18, 25, 32, 41)]
    assert any("128 routed, 6 per token" in n for n in nemotron.notes)
    gemma = detect(json.loads((MODELS / "gemma3-12b-it" / "config.json").read_text()))
    assert gemma.family == "gemma3" and any("vision tower" in n for n in gemma.notes)
    odd = detect({"architectures": ["Phi3ForCausalLM"], "model_type": "phi3", "num_hidden_layers": 32,
                  "vision_config": {"hidden_size": 8}})
    assert odd.family == "generic" and "*vision_tower*" in odd.extra_exclude
    assert any("no family base knows model_type 'phi3'" in n for n in odd.notes)
