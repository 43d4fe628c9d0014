"""Calibration sets: alternatives a strategy names, the held-out conversations every strategy's
fidelity is measured on (never calibrated on), and the three sample forms the worker reads."""

from __future__ import annotations

import json
import time

import pytest

from conftest import MINIMAL, RECIPES, recipe, record
from runner.errors import RecipeError
from runner.plan import build_plan
from runner.recipe.loader import load_recipe

EXPERIMENT = RECIPES / "experiments" / "calibration-sets.yaml"


def conversations(n: int) -> list[dict]:
    return [{"messages": [{"role": "user", "content": f"question {i}"},
                          {"role": "assistant", "content": f"answer {i}"}]} for i in range(n)]


def write_jsonl(path, rows) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def test_experiment_plans_one_calibrate_step_per_set():
    plan = build_plan(load_recipe(EXPERIMENT).recipe)
    assert {"calibrate", "calibrate.prose", "calibrate.random"} <= set(plan.steps)
    assert plan.steps["quantize.prose_awq"].deps == ("source", "calibrate", "calibrate.prose")
    assert plan.steps["quantize.chat_max"].deps == ("source", "calibrate")
    # Every strategy measures fidelity on the same held-out conversations of the recipe's set.
    held = {(s.inputs.held_out, s.inputs.held_out_after) for s in plan.steps.values() if s.kind == "quantize"}
    assert held == {(12, 24)}


def test_unknown_alternative_is_refused_with_its_line(write):
    write("calib.jsonl", json.dumps(conversations(1)[0]) + "\n")
    path = write("r.yaml", MINIMAL.replace("      preset: NVFP4_DEFAULT_CFG",
                                           "      preset: NVFP4_DEFAULT_CFG\n      calibration: prosa")
                 .replace("  samples: 4", "  samples: 4\n  alternatives:\n    prose: {kind: text, path: p.txt}"))
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    message = str(err.value)
    assert "r.yaml:" in message and "strategies[0].calibration" in message and "'prose'" in message


def test_held_out_rows_are_never_calibrated_on_and_are_the_same_for_every_set(demo_tokenizer, tmp_path):
    from transformers import AutoTokenizer

    from runner.worker.calib_data import load_calibration

    tokenizer = AutoTokenizer.from_pretrained(demo_tokenizer)
    chat = tmp_path / "chat.jsonl"
    write_jsonl(chat, conversations(30))
    prose = tmp_path / "prose.jsonl"
    write_jsonl(prose, [{"text": f"paragraph number {i} about rivers"} for i in range(5)])
    own = load_calibration(chat, tokenizer, 40, 64, seed=3, held_out=6, held_out_after=20)
    assert len(own.token_ids) == 40 and len(own.held_out_ids) == 6
    # 40 samples from 30 conversations reuse them, but never one of the 6 held out
    assert not {tuple(ids) for ids in own.held_out_ids} & {tuple(ids) for ids in own.token_ids}
    other = load_calibration(prose, tokenizer, 8, 64, seed=3, held_out=6, held_out_from=chat, held_out_after=20)
    assert other.held_out_ids == own.held_out_ids
    assert all(tokenizer.decode(ids).startswith("paragraph number") for ids in other.token_ids)  # no template


def test_token_id_rows_are_used_as_they_are_and_long_lines_are_cut_before_tokenizing(demo_tokenizer, tmp_path):
    from transformers import AutoTokenizer

    from runner.worker.calib_data import load_calibration

    tokenizer = AutoTokenizer.from_pretrained(demo_tokenizer)
    ids = tmp_path / "ids.jsonl"
    write_jsonl(ids, [{"token_ids": list(range(100, 200))}])
    assert load_calibration(ids, tokenizer, 1, 64, seed=0).token_ids == [list(range(100, 164))]
    huge = tmp_path / "huge.jsonl"
    write_jsonl(huge, [{"text": "word " * 2_000_000}])  # 10 MB a line
    t0 = time.monotonic()
    loaded = load_calibration(huge, tokenizer, 1, 128, seed=0)
    assert len(loaded.token_ids[0]) == 128
    assert time.monotonic() - t0 < 20  # tokenizing all 2 M words takes minutes


def test_random_and_text_sets_quantize_and_measure_fidelity_on_the_chat_held_out(tmp_path):
    """The experiment's prose and random strategies through quantize on the real demo model."""
    pytest.importorskip("modelopt")
    run_dir = tmp_path / "run"
    result = recipe("run", str(EXPERIMENT), "--until", "quantize", "--strategy", "prose_max",
                    "--strategy", "random_max", "--run-dir", str(run_dir))
    assert result.returncode == 0, result.stderr[-3000:]
    random_set = record(run_dir, "calibrate.random")["summary"]
    assert random_set["kind"] == "random_tokens" and random_set["tokens_per_sample"] == 96
    assert record(run_dir, "calibrate.prose")["summary"]["paragraphs"] == 24
    fidelity = [record(run_dir, f"quantize.{s}")["summary"]["fidelity"] for s in ("prose_max", "random_max")]
    assert all(f["measured_on"].startswith("12 held-out conversations") for f in fidelity)
    assert fidelity[0]["tokens"] == fidelity[1]["tokens"] > 0  # the same conversations for both
    assert all(f["kl"] > 0 for f in fidelity)
