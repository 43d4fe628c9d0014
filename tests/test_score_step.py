"""auto_quantize scores once: the score worker saves ModelOpt's search state, and each auto_quantize
strategy's quantize worker restores it and only solves for its own effective_bits (a real tiny Llama on
the CPU, real ModelOpt auto_quantize), and the plan shares one score step between strategies that score alike."""

from __future__ import annotations

import hashlib
import json

import pytest

from conftest import DEMO, build_tiny_llama
from runner.plan import build_plan
from runner.recipe.loader import load_recipe
from runner.recipe.schema import AutoQuantizeSpec, Strategy
from runner.steps import ids

FORMATS = ["NVFP4_DEFAULT_CFG", "FP8_DEFAULT_CFG"]


def auto(name: str, bits: float, **spec) -> Strategy:
    return Strategy(name=name, auto_quantize=AutoQuantizeSpec(effective_bits=bits, **spec))


def test_strategies_that_score_alike_share_one_score_step():
    recipe = load_recipe(DEMO).recipe
    recipe.quantization.strategies = [*recipe.quantization.strategies, auto("auto5", 5.0), auto("auto8", 8.0),
                                      auto("auto_more", 8.0, num_score_steps=64)]
    plan = build_plan(recipe)
    scores = [sid for sid, step in plan.steps.items() if step.kind == "score"]
    assert len(scores) == 2  # auto5 and auto8 share; more scored samples is another score
    shared = plan.steps[ids.quantize("auto5")].inputs.score_step
    assert shared == plan.steps[ids.quantize("auto8")].inputs.score_step in scores
    assert plan.steps[ids.quantize("auto_more")].inputs.score_step != shared
    assert shared in plan.steps[ids.quantize("auto5")].deps
    assert plan.steps[ids.quantize("nvfp4_max")].inputs.score_step is None
    # The effective_bits target is not in the score's key: a new target re-solves, it does not re-score.
    recipe.quantization.strategies[-3] = auto("auto5", 6.0)
    assert build_plan(recipe).keys[shared] == plan.keys[shared]
    assert build_plan(recipe).keys[ids.quantize("auto5")] != plan.keys[ids.quantize("auto5")]


@pytest.mark.slow
def test_the_quantize_worker_restores_the_scores_and_solves_each_target(tmp_path, demo_tokenizer, monkeypatch):
    pytest.importorskip("modelopt")
    from modelopt.torch.quantization.algorithms import AutoQuantizeKLDivSearcher

    from runner.worker import quantize, score

    model_dir = build_tiny_llama(tmp_path / "model", demo_tokenizer)
    calibration = tmp_path / "calibration.jsonl"
    calibration.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": f"Question {i}: what is {i} + {i}?"},
        {"role": "assistant", "content": f"It is {2 * i}, since {i} and {i} make {2 * i}."}]}) + "\n"
        for i in range(12)), encoding="utf-8")
    common = {"exclude": [], "calib_samples": 8, "max_length": 64, "seed": 0, "dtype": "bfloat16",
              "architecture": None, "model_dir": str(model_dir), "calibration": str(calibration)}
    out = tmp_path / "score"
    out.mkdir()
    result = score.run({**common, "formats": FORMATS, "method": "kl_div", "num_calib_steps": 8,
                        "num_score_steps": 8, "calibration_name": None}, out)
    state = out / result["outputs"]["search_state"]
    assert state.is_file() and result["summary"]["scored_samples"] == 8
    scores = json.loads((out / "scores.json").read_text())
    assert scores["groups"] and sorted(scores["ranking"]) == sorted(scores["groups"])
    assert all(set(g["scores"]) for g in scores["groups"].values())
    before = hashlib.sha256(state.read_bytes()).hexdigest()

    # From here on any scoring pass is a failure: the quantize steps must only restore and solve.
    def scored_again(self):
        raise AssertionError("auto_quantize scored again instead of restoring the search state")

    monkeypatch.setattr(AutoQuantizeKLDivSearcher, "estimate_sensitivity_scores", scored_again)

    achieved = {}
    # The tiny model's lm_head (49 k x 64, never quantized) holds most weights: its reachable range is ~15.74-16.
    for bits in (15.76, 15.9):
        target = tmp_path / f"q{bits}"
        target.mkdir()
        summary = quantize.run({**common, "strategy": auto(f"auto{bits}", bits, formats=FORMATS, num_calib_steps=8,
                                                           num_score_steps=8).model_dump(mode="json"),
                                "held_out": 2, "held_out_after": 8, "held_out_from": str(calibration),
                                "search_state": str(state)}, target)["summary"]
        assert summary["auto_quantize"]["restored_search_state"] is True
        achieved[bits] = summary["effective_bits"]
    assert achieved[15.76] < achieved[15.9]  # two targets, two solves, from one scoring
    assert hashlib.sha256(state.read_bytes()).hexdigest() == before  # the score step's output is never written


def test_a_missing_search_state_is_an_error_not_a_silent_rescore(tmp_path):
    from runner.worker import quantize

    with pytest.raises(SystemExit, match="search state .* is missing"):
        quantize.run({"strategy": auto("a", 5.0).model_dump(mode="json"), "exclude": [], "calib_samples": 2,
                      "max_length": 8, "seed": 0, "dtype": "bfloat16", "architecture": None,
                      "model_dir": str(tmp_path), "calibration": str(tmp_path / "c.jsonl"),
                      "search_state": str(tmp_path / "gone.pth")}, tmp_path)
