"""The runner core: selection, concurrency limits, caching, failure and atomic commits.

These tests drive the real Runner and RunDir with step kinds defined here (small async functions
that write real files), so scheduling is tested without a model. Interruption of a real worker
subprocess is tested in test_cli_run.py.
"""

from __future__ import annotations

import asyncio
import json

import pytest

from conftest import MINIMAL
from runner.engine import Runner, RunOptions, select_steps
from runner.errors import NotImplementedStep, RunnerError
from runner.executors.local import LocalExecutor
from runner.plan import build_plan
from runner.recipe_loader import load_recipe
from runner.run_dir import RunDir
from runner.steps import StepKind, StepResult

THREE = MINIMAL + """
    - {name: b, preset: FP8_DEFAULT_CFG}
    - {name: c, preset: NVFP4_AWQ_LITE_CFG}
execution:
  max_parallel: 2
  gpus: 1
"""


class Recorder:
    """Step kinds that record what ran, concurrently with what, and can be told to fail."""

    def __init__(self, fail: set[str] | None = None, delay: float = 0.05):
        self.ran: list[str] = []
        self.running: set[str] = set()
        self.max_running = 0
        self.max_heavy = 0
        self.fail = fail or set()
        self.delay = delay

    def kinds(self, plan) -> dict[str, StepKind]:
        async def run(ctx) -> StepResult:
            sid = ctx.step.id
            self.running.add(sid)
            self.max_running = max(self.max_running, len(self.running))
            heavy = [s for s in self.running if plan.steps[s].heavy]
            self.max_heavy = max(self.max_heavy, len(heavy))
            try:
                await asyncio.sleep(self.delay)
                if sid in self.fail:
                    raise RuntimeError(f"{sid} was told to fail")
                (ctx.scratch / "out.txt").write_text(sid)
                self.ran.append(sid)
                return StepResult(outputs={"out": "out.txt"}, summary={"id": sid})
            finally:
                self.running.discard(sid)

        return {kind: StepKind(kind, run) for kind in {s.kind for s in plan.steps.values()}}


def make(write, tmp_path, text=THREE, strategies=None):
    recipe = load_recipe(write("r.yaml", text), env={}).recipe
    plan = build_plan(recipe, strategies)
    return plan, RunDir(tmp_path / "run")


def run(plan, run_dir, recorder, **options):
    runner = Runner(plan, run_dir, LocalExecutor(), kinds=recorder.kinds(plan))
    return asyncio.run(runner.run(RunOptions(**options)))


def test_plan_has_one_branch_per_strategy(write, tmp_path):
    plan, _ = make(write, tmp_path)
    assert list(plan.steps)[:2] == ["source", "calibrate"]
    for s in ("max", "b", "c"):
        assert plan.steps[f"quantize.{s}"].deps == ("source", "calibrate")
        assert plan.steps[f"benchmark.{s}"].deps == (f"serve.{s}", f"export.{s}")
    assert plan.steps["gates"].deps == ("benchmark.max", "benchmark.b", "benchmark.c")
    assert list(plan.steps)[-3:] == ["gates", "report", "publish"]
    only_b, _ = make(write, tmp_path, strategies=["b"])
    assert [s for s in only_b.steps if s.startswith("quantize")] == ["quantize.b"]
    with pytest.raises(RunnerError, match="no strategy named z"):
        make(write, tmp_path, strategies=["z"])


def test_cache_keys_change_only_downstream_of_a_change(write, tmp_path):
    plan, _ = make(write, tmp_path)
    changed, _ = make(write, tmp_path, THREE.replace("{name: b, preset: FP8_DEFAULT_CFG}",
                                                     "{name: b, preset: FP8_DEFAULT_CFG, batch_size: 2}"))
    differ = {s for s in plan.steps if plan.keys[s] != changed.keys[s]}
    assert differ == {"quantize.b", "export.b", "verify.b", "serve.b", "benchmark.b", "gates", "report", "publish"}


def test_runs_everything_then_nothing_when_current(write, tmp_path):
    plan, run_dir = make(write, tmp_path)
    first = Recorder()
    outcome = run(plan, run_dir, first)
    assert outcome.status == "complete" and outcome.exit_code == 0
    assert sorted(first.ran) == sorted(plan.steps)
    for sid in plan.steps:
        record = run_dir.record(sid)
        assert record["status"] == "complete" and record["key"] == plan.keys[sid]
        assert (run_dir.step_dir(sid) / "out.txt").read_text() == sid
        assert record["deps"] == {d: plan.keys[d] for d in plan.steps[sid].deps}
    second = Recorder()
    assert run(plan, run_dir, second).status == "complete"
    assert second.ran == []


def test_concurrency_and_heavy_step_limits(write, tmp_path):
    plan, run_dir = make(write, tmp_path)
    recorder = Recorder(delay=0.1)
    run(plan, run_dir, recorder)
    assert recorder.max_running == 2  # execution.max_parallel
    assert recorder.max_heavy == 1  # execution.gpus


def test_failure_keeps_completed_steps_and_resumes_there(write, tmp_path):
    plan, run_dir = make(write, tmp_path)
    outcome = run(plan, run_dir, Recorder(fail={"export.b"}))
    assert outcome.status == "failed" and outcome.exit_code == 1
    assert outcome.states["export.b"] == "failed"
    assert any("export.b failed" in m and "told to fail" in m for m in outcome.messages)
    assert run_dir.is_complete("quantize.b", plan.keys["quantize.b"])
    assert not run_dir.step_dir("export.b").exists()  # nothing half-written is visible
    assert json.loads((run_dir.logs_dir / "export.b.failed.json").read_text())["error"]
    assert json.loads((run_dir.root / "run.json").read_text())["status"] == "failed"
    again = Recorder()
    assert run(plan, run_dir, again).status == "complete"
    assert "quantize.b" not in again.ran and "source" not in again.ran
    assert "export.b" in again.ran
    assert not (run_dir.logs_dir / "export.b.failed.json").exists()


def test_not_built_step_stops_its_branch_and_says_so(write, tmp_path):
    plan, run_dir = make(write, tmp_path)
    recorder = Recorder()
    kinds = recorder.kinds(plan)
    kinds["serve"] = StepKind("serve", None, pending="serving is issue #5")
    outcome = asyncio.run(Runner(plan, run_dir, LocalExecutor(), kinds=kinds).run(RunOptions()))
    assert outcome.status == "stopped" and outcome.exit_code == 3
    assert outcome.states["serve.b"] == "not built"
    assert outcome.states["benchmark.b"] == "blocked" and outcome.states["gates"] == "blocked"
    assert outcome.states["verify.b"] == "complete"
    assert any("serving is issue #5" in m for m in outcome.messages)


def test_a_step_can_report_that_its_variant_is_not_built(write, tmp_path):
    plan, run_dir = make(write, tmp_path)
    recorder = Recorder()
    kinds = recorder.kinds(plan)

    async def teacher(ctx):
        raise NotImplementedStep("teacher generation is issue #4")

    kinds["calibrate"] = StepKind("calibrate", teacher)
    outcome = asyncio.run(Runner(plan, run_dir, LocalExecutor(), kinds=kinds).run(RunOptions()))
    assert outcome.status == "stopped"
    assert outcome.states["calibrate"] == "not built" and outcome.states["quantize.b"] == "blocked"


def test_only_from_until_force_and_dry_run(write, tmp_path):
    plan, run_dir = make(write, tmp_path)
    with pytest.raises(RunnerError, match="needs source"):
        select_steps(plan, run_dir, RunOptions(only=["calibrate"]))
    to_run, _ = select_steps(plan, run_dir, RunOptions(until=["export.b"]))
    assert to_run == ["source", "calibrate", "quantize.b", "export.b"]
    run(plan, run_dir, Recorder(), until=["verify"])
    to_run, _ = select_steps(plan, run_dir, RunOptions(only=["export.*"]))
    assert to_run == []
    to_run, forced = select_steps(plan, run_dir, RunOptions(only=["export.*"], force=True))
    assert to_run == ["export.max", "export.b", "export.c"] == sorted(forced, key=to_run.index)
    to_run, _ = select_steps(plan, run_dir, RunOptions(from_steps=["quantize.c"], until=["verify.c"]))
    assert to_run == ["quantize.c", "export.c", "verify.c"]
    outcome = run(plan, run_dir, Recorder(), from_steps=["quantize.c"], until=["verify.c"], dry_run=True)
    assert outcome.states["quantize.c"] == "would run (forced)" and outcome.states["quantize.b"] == "current"
    with pytest.raises(RunnerError, match="no step matches nope"):
        select_steps(plan, run_dir, RunOptions(only=["nope"]))


def test_stale_result_is_replaced_atomically(write, tmp_path):
    plan, run_dir = make(write, tmp_path)
    run(plan, run_dir, Recorder(), until=["quantize.b"])
    changed, _ = make(write, tmp_path, THREE.replace("samples: 4", "samples: 5"))
    assert not run_dir.is_complete("quantize.b", changed.keys["quantize.b"])
    recorder = Recorder()
    run(changed, run_dir, recorder, until=["quantize.b"])
    assert recorder.ran == ["calibrate", "quantize.b"]
    assert run_dir.record("quantize.b")["key"] == changed.keys["quantize.b"]
    assert not list((run_dir.root / ".scratch").glob("quantize.b.*"))


def test_one_branch_finishes_before_the_next_starts(write, tmp_path):
    plan, run_dir = make(write, tmp_path, THREE.replace("max_parallel: 2", "max_parallel: 1"))
    recorder = Recorder(delay=0.01)
    run(plan, run_dir, recorder, until=["verify"])
    assert recorder.ran == ["source", "calibrate", "quantize.max", "export.max", "verify.max",
                            "quantize.b", "export.b", "verify.b", "quantize.c", "export.c", "verify.c"]
