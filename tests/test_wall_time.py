"""The wall-time prediction (runner/wall_time.py): arithmetic that moves the way the work does, the
scheduler's rules in the total, `recipe plan`'s lines and JSON, and records that keep the prediction
beside the measured time. Rates themselves are measured on the GPU machine (bench/wall_time_9b.py)."""

from __future__ import annotations

import asyncio
import json

from test_scheduler import THREE, Recorder, make

from conftest import RECIPES, flagship_here, recipe
from runner import wall_time
from runner.executors.local import LocalExecutor
from runner.plan import build_plan
from runner.quantization.weights import load_weights
from runner.recipe.loader import load_recipe
from runner.scheduler import Runner, RunOptions

QWEN35_9B = RECIPES / "models" / "qwen35-9b"


TEACHER_RATE = "calibration:\n  source:\n    throughput_tok_s: 2000\n"


def flagship_path(write, tmp_path, extra: str = ""):
    """The flagship here, extended once more by `extra` (flagship_here writes calibration: itself)."""
    base = flagship_here(write, tmp_path)
    return write("more.yaml", f"extends: {base}\n{extra}") if extra else base


def flagship(write, tmp_path, extra: str = ""):
    return load_recipe(flagship_path(write, tmp_path, extra)).recipe


def predict(recipe, hardware="h100-sxm"):
    plan = build_plan(recipe)
    return plan, wall_time.predict(plan, load_weights(QWEN35_9B), wall_time.machine(hardware))


def test_the_9b_cost_is_the_models_arithmetic():
    cost = wall_time.model_cost(load_weights(QWEN35_9B))
    # Qwen3.5-9B: ~6.9 B Linear weights in the body, a 248 k x 4096 head, 32 layers, ~17.9 GB in bf16.
    assert 13e9 < cost.body_flops < 15e9 and 1.9e9 < cost.head_flops < 2.1e9
    assert cost.layers == 32 and 17e9 < cost.bf16_bytes < 19.5e9
    assert 100 < cost.groups < 300


def test_each_step_is_predicted_and_moves_with_its_work(write, tmp_path):
    recipe = flagship(write, tmp_path, TEACHER_RATE)
    plan, wall = predict(recipe)
    assert not wall.unknown and wall.total_s is not None
    assert all(t.seconds is not None and t.seconds >= 0 for t in wall.steps.values())
    awq, mlp = wall.steps["quantize.awq_lite"], wall.steps["quantize.mlp_only"]
    assert "awq_lite x4.5 (measured)" in awq.basis and awq.parts["calibrate"] > 0
    score = [t for sid, t in wall.steps.items() if sid.startswith("score.")]
    assert len(score) == 1 and score[0].parts["score"] > 60  # scoring 128 samples at 9B: minutes, not seconds
    assert "re-solved" in wall.steps["quantize.auto_mixed"].basis
    # The total runs the scheduler's rules: longer than any step, shorter than all of them in a row.
    longest = max(t.seconds for t in wall.steps.values())
    assert longest <= wall.total_s <= sum(t.seconds for t in wall.steps.values()) + 1e-6
    # Twice the calibration samples: calibration costs twice as much, loading does not.
    more = flagship(write, tmp_path, TEACHER_RATE.replace("calibration:\n", "calibration:\n  samples: 1024\n"))
    _, doubled = predict(more)
    bigger = doubled.steps["quantize.mlp_only"]
    assert bigger.parts["calibrate"] > 1.9 * mlp.parts["calibrate"]
    assert bigger.parts["load"] == mlp.parts["load"]
    # A slower machine predicts longer calibration (GB10's bf16 rate is a fraction of an H100's).
    _, spark = predict(recipe, "dgx-spark-gb10")
    assert spark.steps["quantize.awq_lite"].parts["calibrate"] > 3 * awq.parts["calibrate"]


def test_an_unknown_teacher_rate_is_said_not_guessed(write, tmp_path):
    _, wall = predict(flagship(write, tmp_path))
    assert "calibrate" in wall.unknown and wall.total_s is None
    assert "throughput_tok_s" in wall.steps["calibrate"].basis


def test_sharing_a_gpu_shortens_the_predicted_run(write, tmp_path):
    text = THREE.replace("max_parallel: 2", "max_parallel: 4")
    plan, _ = make(write, tmp_path, text)
    seconds = {sid: (100.0 if step.kind == "quantize" else 1.0) for sid, step in plan.steps.items()}
    needs = {sid: 31 * 10**9 for sid, step in plan.steps.items() if step.kind == "quantize"}
    alone = wall_time.schedule(plan, seconds, needs, None)  # memory unknown: one GPU step at a time
    shared = wall_time.schedule(plan, seconds, needs, 80 * 10**9)  # two fit an 80 GB GPU
    assert alone >= 300 and shared < alone - 90


def test_records_keep_the_prediction_beside_the_measured_time(write, tmp_path):
    plan, run_dir = make(write, tmp_path)
    recorder = Recorder()
    runner = Runner(plan, run_dir, LocalExecutor(), kinds=recorder.kinds(plan))
    runner.predicted = {"quantize.max": 42.0}
    assert asyncio.run(runner.run(RunOptions(until=["quantize"]))).status == "complete"
    assert run_dir.record("quantize.max")["predicted_s"] == 42.0
    assert run_dir.record("quantize.max")["duration_s"] >= 0
    assert run_dir.record("source")["predicted_s"] is None


def test_recipe_plan_prints_and_reports_the_prediction(write, tmp_path):
    path = flagship_path(write, tmp_path, TEACHER_RATE)
    result = recipe("plan", str(path), "--hardware", "h100-sxm", "--run-dir", str(tmp_path / "run"))
    assert result.returncode == 0, result.stderr
    assert "predicted wall time on h100-sxm" in result.stdout and "awq_lite:" in result.stdout
    data = json.loads(recipe("plan", str(path), "--json", "--hardware", "h100-sxm",
                             "--run-dir", str(tmp_path / "run")).stdout)
    assert data["wall_time"]["machine"] == "h100-sxm" and data["wall_time"]["total_s"] > 0
    assert all(row["predicted_s"] is not None for row in data["steps"])
    unknown = recipe("plan", str(path), "--hardware", "no-such-machine", "--run-dir", str(tmp_path / "run"))
    assert unknown.returncode != 0 and "no-such-machine" in unknown.stderr
