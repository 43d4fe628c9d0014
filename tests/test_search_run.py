"""A recipe's search run for real (runner/search_driver.py): the demo model on the CPU, real quantize steps
(held-out KL and each decoder layer's KL contribution), a real local server and benchmark, gates fixed by
construction (tests/recipes/demo-search.yaml) so the verdicts never depend on what the model answers here.

- every candidate is an ordinary strategy with cached steps; the record says why each was proposed, what
  pruned it, which one was audited and that the gates disagreed with that pruning;
- the served candidate competes with the hand-written strategy in the recipe's gates step, and the card
  shows the search; search/ has the table, the plot and a strategy snippet that validates as a strategy;
- a rerun replays without running a step again, and a larger budget reuses what ran and goes on.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_report_publish import linked_copy

from conftest import REPO, recipe, record

pytestmark = pytest.mark.slow
SEARCH = REPO / "tests" / "recipes" / "demo-search.yaml"
LARGER = REPO / "tests" / "recipes" / "demo-search-larger.yaml"


@pytest.fixture(scope="module")
def searched(demo_run, tmp_path_factory) -> Path:
    run_dir = linked_copy(demo_run, tmp_path_factory.mktemp("search") / "run")
    result = recipe("run", str(SEARCH), "--run-dir", str(run_dir), timeout=1800)
    assert result.returncode == 0, result.stderr
    return run_dir


def test_the_search_record_says_what_was_tried_pruned_audited_and_served(searched):
    data = json.loads((searched / "search" / "search.json").read_text())
    names = [c["name"] for c in data["candidates"]]
    assert names[:2] == ["search-mlp_w4a16-max-kvbf16", "search-mlp_w4a16-at_fp4-max-kvbf16"]
    assert len(names) == 3 and data["stopped_by"] == "budget.candidates 3 spent"
    first, second, third = data["candidates"]
    assert first["move"] == "widen: mlp to w4a16_nvfp4" and second["move"] == "widen: attention to nvfp4"
    # max_kl 0: every candidate is over the threshold; the first (the lowest KL of its round) is audited
    assert all(c["kl"] > 0 and "held-out KL" in c["why"] and "> 0 (prune.max_kl 0.0)" in c["why"]
               for c in data["candidates"])
    assert first["audit"] and first["served"] and first["status"] == "accepted" and first["gate_status"] == "proven"
    assert "the gates DISAGREE" in first["why"]
    assert data["audit"] == {"audited": 1, "agree": 0, "disagree": 1}
    assert [c["status"] for c in data["candidates"][1:]] == ["pruned", "pruned"] and not second["served"]
    # the back-off keeps BF16 the two decoder layers whose quantization cost most KL, as the worker measured
    sensitivity = record(searched, f"quantize.{second['name']}")["summary"]["sensitivity"]["layers"]
    costliest = sorted(sensitivity, key=lambda row: -row["kl_recovered"])[:2]
    assert third["layout"]["keep_layers"] == sorted(row["layer"] for row in costliest)
    assert third["move"].startswith("back off attention nvfp4")
    # predicted from the shapes: W4A4 attention reads fewer bytes per token than BF16 attention
    assert second["predicted"]["bytes_per_token"] < first["predicted"]["bytes_per_token"]
    for c in data["candidates"]:
        assert record(searched, f"quantize.{c['name']}")["status"] == "complete"
        assert (c["name"] in names[:1]) == (searched / "steps" / f"benchmark.{c['name']}").is_dir()


def test_served_candidates_compete_at_the_gates_and_the_card_shows_the_search(searched):
    gates = json.loads((searched / "steps" / "gates" / "gates.json").read_text())
    assert set(gates["verdicts"]) == {"nvfp4_max", "search-mlp_w4a16-max-kvbf16"}
    card = (searched / "steps" / "report" / "README.md").read_text()
    assert "## Search" in card and "`search-mlp_w4a16-max-kvbf16` ★" in card and "DISAGREED on 1" in card
    assert (searched / "steps" / "report" / "search_pareto.svg").read_text().startswith("<svg")
    table = (searched / "search" / "pareto.md").read_text()
    assert table.count("| `search-") == 3
    from ruamel.yaml import YAML

    from runner.recipe.schema import Strategy

    [pasted] = YAML(typ="safe").load((searched / "search" / "selected-strategy.yaml").read_text())
    strategy = Strategy.model_validate(pasted)
    assert strategy.name == "search-mlp_w4a16-max-kvbf16" and strategy.layout.formats == {"mlp": "w4a16_nvfp4"}


def test_a_rerun_replays_and_a_larger_budget_goes_on(searched, tmp_path):
    run_dir = linked_copy(searched, tmp_path / "run")
    before = {c["name"]: record(run_dir, f"quantize.{c['name']}")["finished_at"]
              for c in json.loads((run_dir / "search" / "search.json").read_text())["candidates"]}
    again = recipe("run", str(SEARCH), "--run-dir", str(run_dir), timeout=900)
    assert again.returncode == 0, again.stderr
    assert "✓ quantize." not in again.stderr  # nothing quantized again
    larger = recipe("run", str(LARGER), "--run-dir", str(run_dir), timeout=1800)
    assert larger.returncode == 0, larger.stderr
    data = json.loads((run_dir / "search" / "search.json").read_text())
    assert len(data["candidates"]) == 4 and data["candidates"][3]["name"] == "search-mlp_w4a16-at_fp8-max-kvbf16"
    for name, finished in before.items():  # the three that ran were reused, not run again
        assert record(run_dir, f"quantize.{name}")["finished_at"] == finished
