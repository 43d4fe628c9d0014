"""A recipe's search run for real (runner/search/driver.py): the demo model on the CPU, real quantize steps
(held-out KL and each decoder layer's KL contribution), a real local server and benchmark, gates fixed by
construction (tests/recipes/demo-search.yaml) so the verdicts never depend on what the model answers here.

- every candidate is an ordinary strategy with cached steps; the record says why each was proposed, what
  pruned it, which one was audited and that the gates disagreed with that pruning;
- the served candidate competes with the hand-written strategy in the recipe's gates step, and the card
  shows the search; search/ has the table, the plot and a strategy snippet that validates as a strategy;
- a rerun replays without running a step again, and a larger budget reuses what ran and goes on: the
  back-off keeps BF16 the layers the worker measured as costliest.
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
FIRST, SECOND = "search-mlp_w4a16-max-kvbf16", "search-mlp_w4a16-at_fp4-max-kvbf16"


@pytest.fixture(scope="module")
def searched(demo_run, tmp_path_factory) -> Path:
    run_dir = linked_copy(demo_run, tmp_path_factory.mktemp("search") / "run")
    result = recipe("run", str(SEARCH), "--run-dir", str(run_dir), timeout=2400)
    assert result.returncode == 0, result.stderr
    return run_dir


def test_the_search_record_says_what_was_tried_pruned_audited_and_served(searched):
    data = json.loads((searched / "search" / "search.json").read_text())
    assert [c["name"] for c in data["candidates"]] == [FIRST, SECOND]
    assert data["stopped_by"] == "budget.candidates 2 spent" and data["rounds"] == 2
    first, second = data["candidates"]
    assert first["move"] == "widen: mlp to w4a16_nvfp4" and second["move"] == "widen: attention to nvfp4"
    # max_kl 0: every candidate is over the threshold; the first (the lowest KL of its round) is audited
    assert all(c["kl"] > 0 and "> 0 (prune.max_kl 0.0)" in c["why"] for c in data["candidates"])
    assert first["audit"] and first["served"] and first["status"] == "accepted" and first["gate_status"] == "proven"
    assert "the gates DISAGREE" in first["why"] and data["audit"] == {"audited": 1, "agree": 0, "disagree": 1}
    assert second["status"] == "pruned" and not second["served"] and not second["audit"]  # one audit only
    # predicted from the model's headers: W4A4 attention reads fewer bytes per token than BF16 attention
    assert second["predicted"]["bytes_per_token"] < first["predicted"]["bytes_per_token"]
    assert not (searched / "steps" / f"benchmark.{SECOND}").exists()
    for c in data["candidates"]:  # widenings measure each decoder layer (SmolLM2: 30)
        quantize = record(searched, f"quantize.{c['name']}")["summary"]
        assert len(quantize["sensitivity"]["layers"]) == 30 and quantize["sensitivity"]["conversations"] == 1
        assert quantize["method"].startswith("layout:")


def test_served_candidates_compete_at_the_gates_and_the_card_shows_the_search(searched):
    gates = json.loads((searched / "steps" / "gates" / "gates.json").read_text())
    assert set(gates["verdicts"]) == {"nvfp4_max", FIRST}
    card = (searched / "steps" / "report" / "README.md").read_text()
    assert "## Search" in card and f"`{FIRST}` ★" in card and "DISAGREED on 1" in card
    assert (searched / "steps" / "report" / "search_pareto.svg").read_text().startswith("<svg")
    assert (searched / "search" / "pareto.md").read_text().count("| `search-") == 2
    from ruamel.yaml import YAML

    from runner.recipe.schema import Strategy

    [pasted] = YAML(typ="safe").load((searched / "search" / "selected-strategy.yaml").read_text())
    strategy = Strategy.model_validate(pasted)
    assert strategy.name == FIRST and strategy.layout.formats == {"mlp": "w4a16_nvfp4"}


def test_a_rerun_replays_and_a_larger_budget_goes_on(searched, tmp_path):
    run_dir = linked_copy(searched, tmp_path / "run")
    before = {name: record(run_dir, f"quantize.{name}")["finished_at"] for name in (FIRST, SECOND)}
    again = recipe("run", str(SEARCH), "--run-dir", str(run_dir), timeout=900)
    assert again.returncode == 0, again.stderr
    assert "✓ quantize." not in again.stderr and "✓ benchmark." not in again.stderr  # nothing ran again
    larger = recipe("run", str(LARGER), "--run-dir", str(run_dir), timeout=2400)
    assert larger.returncode == 0, larger.stderr
    data = json.loads((run_dir / "search" / "search.json").read_text())
    third = data["candidates"][2]
    assert len(data["candidates"]) == 3 and third["move"].startswith("back off attention nvfp4")
    for name, finished in before.items():  # the two that ran were reused, not run again
        assert record(run_dir, f"quantize.{name}")["finished_at"] == finished
    # the back-off keeps BF16 the two decoder layers whose quantization cost most KL, as the worker measured
    layers = record(run_dir, f"quantize.{SECOND}")["summary"]["sensitivity"]["layers"]
    costliest = sorted((r for r in layers if r["kl_recovered"] > 0), key=lambda r: -r["kl_recovered"])[:2]
    assert third["layout"]["keep_layers"] == sorted(r["layer"] for r in costliest)
    assert "sensitivity" not in record(run_dir, f"quantize.{third['name']}")["summary"]  # back-offs skip it
