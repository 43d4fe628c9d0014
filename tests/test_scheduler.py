"""The runner core: selection, concurrency limits, caching, failure and atomic commits.

These tests drive the real Runner and RunDir with step kinds defined here (small async functions
that write real files), so scheduling is tested without a model. Interruption of a real worker
subprocess is tested in test_pipeline_cpu.py (and of a container in test_docker.py); what re-keys
a step is tested in test_step_keys.py.
"""

from __future__ import annotations

import asyncio
import json

import pytest

from conftest import MINIMAL
from runner.errors import NotImplementedStep, RunnerError
from runner.executors.local import LocalExecutor
from runner.plan import build_plan
from runner.recipe.loader import load_recipe
from runner.run_dir import RunDir
from runner.scheduler import Runner, RunOptions, select_steps
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
                outputs, summary = {"out": "out.txt"}, {"id": sid}
                if ctx.step.kind == "benchmark":  # what the real gates step reads
                    (ctx.scratch / "results.json").write_text(json.dumps({"name": sid, "suites": {}, "speed": {}}))
                    outputs["results"] = "results.json"
                if ctx.step.kind == "gates":
                    # Like the real step: the first candidate that exists is selected (no gates here).
                    candidates = [d.removeprefix("benchmark.") for d in ctx.step.deps if d != "benchmark.baseline"]
                    summary["selection"] = {"best": candidates[0] if candidates else None}
                return StepResult(outputs=outputs, summary=summary)
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
        # quantize too: the kl metrics are its fidelity to the source; verify: the format it read
        assert plan.steps[f"benchmark.{s}"].deps == (f"serve.{s}", f"export.{s}", f"quantize.{s}", f"verify.{s}")
    assert plan.steps["gates"].deps == ("benchmark.max", "benchmark.b", "benchmark.c")
    # report reads every step before it, publish the selected export and the card
    assert set(plan.steps["report"].deps) == set(plan.steps) - {"report", "publish"}
    assert plan.steps["publish"].deps == ("gates", "report", "export.max", "export.b", "export.c")
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


TWO = MINIMAL + """
    - {name: b, preset: FP8_DEFAULT_CFG}
execution:
  max_parallel: 2
  gpus: 1
"""
BRANCH_B = ["quantize.b", "export.b", "verify.b", "serve.b", "benchmark.b"]


def run_with_real_gates(plan, run_dir, recorder, **options):
    """The fake kinds, but the real gates step (over the fake benchmarks' results.json)."""
    from runner.steps.registry import step_kinds

    kinds = recorder.kinds(plan)
    kinds["gates"] = step_kinds()["gates"]
    return asyncio.run(Runner(plan, run_dir, LocalExecutor(), kinds=kinds).run(RunOptions(**options)))


def test_a_failed_branch_stops_only_itself_and_gates_judges_the_rest(write, tmp_path):
    plan, run_dir = make(write, tmp_path, TWO)
    recorder = Recorder(fail={"quantize.b"})
    outcome = run_with_real_gates(plan, run_dir, recorder)
    assert outcome.status == "failed" and outcome.exit_code == 1
    assert outcome.states["quantize.b"] == "failed"
    for sid in BRANCH_B[1:]:
        assert outcome.states[sid] == "blocked" and outcome.blocked_by[sid] == "quantize.b"
    for sid in ("quantize.max", "export.max", "verify.max", "serve.max", "benchmark.max", "gates", "report",
                "publish"):
        assert outcome.states[sid] == "complete", sid
    assert {"report", "publish"} <= set(recorder.ran)
    error = "RuntimeError: quantize.b was told to fail"
    gates = run_dir.record("gates")
    assert gates["summary"]["failed"] == {"b": {"step": "quantize.b", "error": error}}
    assert json.loads((run_dir.step_dir("gates") / "gates.json").read_text())["failed"] == gates["summary"]["failed"]
    assert gates["summary"]["selection"]["best"] == "max" and set(gates["summary"]["verdicts"]) == {"max"}
    assert gates["deps"] == {"benchmark.max": plan.keys["benchmark.max"]}
    table = (run_dir.step_dir("gates") / "comparison.md").read_text()
    assert table.rstrip("\n").splitlines()[-1] == f"`b` failed at quantize.b: {error}"
    # Its key says that b was left out, so the result is not current for the full plan.
    assert gates["key"] != plan.keys["gates"] and not run_dir.is_complete("gates", plan.keys["gates"])
    # report reads what exists: every step but the failed branch's, gates with its reduced key
    report_deps = run_dir.record("report")["deps"]
    assert report_deps["gates"] == gates["key"] and not set(report_deps) & set(BRANCH_B)
    assert set(run_dir.record("publish")["deps"]) == {"gates", "report", "export.max"}
    status = json.loads((run_dir.root / "run.json").read_text())
    assert status["status"] == "failed" and status["steps"]["benchmark.b"]["blocked_by"] == "quantize.b"
    assert status["steps"]["gates"]["key"] == gates["key"]
    assert any(m.startswith("quantize.b failed") for m in outcome.messages)
    assert any(m.startswith("failed: quantize.b") for m in outcome.messages)

    from runner.steps.report import gather

    facts = gather(plan.recipe, run_dir)
    assert facts["failed"] == {"b": {"step": "quantize.b", "error": error, "reason": error}}

    # Fixed: only the failed branch runs, then gates (over both now), report and publish.
    again = Recorder()
    outcome = run_with_real_gates(plan, run_dir, again)
    assert outcome.status == "complete" and outcome.exit_code == 0
    assert set(again.ran) == {*BRANCH_B, "report", "publish"}  # gates is the real step, not recorded
    assert outcome.states["gates"] == "complete"
    gates = run_dir.record("gates")
    assert gates["key"] == plan.keys["gates"] and gates["summary"]["failed"] == {}
    assert set(gates["summary"]["verdicts"]) == {"max", "b"}
    assert "failed at" not in (run_dir.step_dir("gates") / "comparison.md").read_text()
    assert not (run_dir.logs_dir / "quantize.b.failed.json").exists()
    third = Recorder()
    assert run_with_real_gates(plan, run_dir, third).status == "complete" and third.ran == []


def test_the_gates_key_depends_on_which_branches_failed(write, tmp_path):
    plan, _ = make(write, tmp_path)
    keys = {}
    for name, fail in {"b": {"quantize.b"}, "b again": {"quantize.b"}, "b later": {"serve.b"},
                       "b and c": {"quantize.b", "export.c"}}.items():
        run_dir = RunDir(tmp_path / name.replace(" ", "-"))
        outcome = run(plan, run_dir, Recorder(fail=fail))
        assert outcome.status == "failed" and outcome.states["gates"] == "complete"
        keys[name] = run_dir.record("gates")["key"]
        assert run_dir.record("gates")["params"]["failed_branches"] == {
            sid.split(".")[1]: sid for sid in sorted(fail, key=lambda s: s.split(".")[1])}
    assert keys["b"] == keys["b again"]  # deterministic: the same failure gives the same key
    assert len({keys["b"], keys["b later"], keys["b and c"], plan.keys["gates"]}) == 4


def test_fail_fast_stops_every_branch_at_the_first_failure(write, tmp_path):
    plan, run_dir = make(write, tmp_path, TWO)
    recorder = Recorder(fail={"quantize.max"})
    outcome = run(plan, run_dir, recorder, fail_fast=True)
    assert outcome.status == "failed" and outcome.exit_code == 1
    assert recorder.ran == ["source", "calibrate"]  # b's branch started nothing
    for sid in ("quantize.b", "export.max", "gates", "report", "publish"):
        assert outcome.states[sid] == "blocked", sid
    assert outcome.blocked_by["quantize.b"] == "quantize.max"
    assert not run_dir.step_dir("gates").exists()
    # Without --fail-fast the same failure leaves b's branch, gates, report and publish running.
    plan, run_dir = make(write, tmp_path / "other", TWO)
    recorder = Recorder(fail={"quantize.max"})
    outcome = run(plan, run_dir, recorder)
    assert outcome.status == "failed"
    assert {*BRANCH_B, "gates", "report", "publish"} <= set(recorder.ran)
    assert run_dir.record("gates")["params"]["failed_branches"] == {"max": "quantize.max"}


def test_a_failure_outside_a_branch_blocks_gates(write, tmp_path):
    text = TWO + "benchmark:\n  baseline: {kind: endpoint, name: B, url: 'http://localhost:1/v1', model: m}\n"
    plan, run_dir = make(write, tmp_path, text)
    assert "benchmark.baseline" in plan.steps["gates"].deps
    recorder = Recorder(fail={"benchmark.baseline"})
    outcome = run(plan, run_dir, recorder)
    assert outcome.status == "failed" and outcome.exit_code == 1
    assert outcome.states["benchmark.max"] == outcome.states["benchmark.b"] == "complete"
    assert outcome.states["gates"] == "blocked" and outcome.blocked_by["gates"] == "benchmark.baseline"
    assert outcome.states["report"] == outcome.states["publish"] == "blocked"
    # A strategy's failure with the baseline failing too: still blocked, naming the baseline.
    plan, run_dir = make(write, tmp_path / "both", text)
    outcome = run(plan, run_dir, Recorder(fail={"benchmark.baseline", "quantize.b"}))
    assert outcome.states["gates"] == "blocked" and outcome.blocked_by["gates"] == "benchmark.baseline"
    # calibrate is no strategy's branch: everything after it is blocked.
    plan, run_dir = make(write, tmp_path / "calib", text)
    outcome = run(plan, run_dir, Recorder(fail={"calibrate"}))
    assert outcome.states["gates"] == "blocked" and outcome.blocked_by["gates"] == "calibrate"
    assert outcome.states["benchmark.baseline"] == "complete"


def test_run_help_shows_fail_fast(capsys):
    from runner.cli import main

    with pytest.raises(SystemExit):
        main(["run", "--help"])
    assert "--fail-fast" in capsys.readouterr().out
