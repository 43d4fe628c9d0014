"""Serving engines behind one interface (runner/serving/): a third engine, defined here in a few lines,
is registered and the demo's graph runs through it; an engine nobody registered is refused by name.

The fake engine serves a scripted OpenAI server (runner/testing/scripted_server.py) under the step's
name. The demo's steps before serving (source .. export) are stand-ins that write a one-tensor model
and checkpoint; verify is the real step with the worker replaced, so what it hands the worker is
checked; serve, benchmark and gates are the real steps. Fast: no model runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import struct
from pathlib import Path

import pytest

from conftest import DEMO
from runner.errors import RecipeError
from runner.executors.local import LocalExecutor
from runner.plan import build_plan
from runner.recipe.loader import load_recipe
from runner.run_dir import RunDir
from runner.scheduler import Runner, RunOptions
from runner.serving.engine import Engine, engine_for, known_engines, register, unregister
from runner.serving.server import RunningServer
from runner.steps import StepKind, StepResult
from runner.steps.registry import step_kinds
from runner.testing.scripted_server import ScriptedServer


class ScriptedEngine(Engine):
    """A third engine: a scripted OpenAI server per start, named as the step asks."""

    name = "scripted"
    quant_algos = ("NVFP4",)
    kernels = "a scripted OpenAI server (tests/test_engines.py)"

    def __init__(self) -> None:
        self.served: list[tuple[str, str]] = []  # (name, model folder) of every start

    @contextlib.asynccontextmanager
    async def serve(self, spec, model_dir, run_dir, step_id, name, pin_port=True):
        server = await ScriptedServer(model=name).start()
        self.served.append((name, Path(model_dir).name))
        try:
            yield RunningServer(server.url, name, self.name)
        finally:
            await server.stop()


@pytest.fixture
def scripted():
    engine = ScriptedEngine()
    register(engine)
    yield engine
    unregister(engine.name)


def demo_served_by(write, engine: str) -> Path:
    """The demo with one strategy, served by `engine`."""
    return write("demo.yaml", f"""
        extends: {DEMO}
        serve: {{engine: {engine}}}
        quantization:
          strategies:
            - {{name: nvfp4_awq, enabled: false}}
            - {{name: negative_control, enabled: false}}
        """)


def one_tensor_safetensors(folder: Path) -> Path:
    """A folder with config.json and a safetensors file holding one 8 x 8 BF16 tensor (zeros)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text("{}")
    header = json.dumps({"model.layers.0.mlp.down_proj.weight": {
        "dtype": "BF16", "shape": [8, 8], "data_offsets": [0, 128]}}).encode()
    header += b" " * (-len(header) % 8)
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + bytes(128))
    return folder


def stand_ins(worker_params: list[dict]) -> dict[str, StepKind]:
    """The real step kinds, with source .. export writing placeholders and verify's worker replaced."""
    async def source(ctx) -> StepResult:
        one_tensor_safetensors(ctx.scratch / "model")
        return StepResult(outputs={"model_dir": "model"})

    async def nothing(ctx) -> StepResult:
        return StepResult()

    async def export(ctx) -> StepResult:
        one_tensor_safetensors(ctx.scratch / "checkpoint")
        return StepResult(outputs={"checkpoint": "checkpoint"})

    async def verify(ctx) -> StepResult:
        async def worker(kind: str, params: dict) -> StepResult:
            worker_params.append(params)
            return StepResult(summary={"quant_algo": "NVFP4", "checks": {"quant_algo_supported": "pass"}})

        ctx.run_worker = worker
        return await step_kinds()["verify"].run(ctx)

    kinds = step_kinds()
    return kinds | {"source": StepKind("source", source), "calibrate": StepKind("calibrate", nothing),
                    "quantize": StepKind("quantize", nothing), "export": StepKind("export", export),
                    "verify": StepKind("verify", verify)}


def test_a_registered_engine_serves_the_demos_graph(write, tmp_path, scripted, capsys):
    from runner.cli import main

    recipe = load_recipe(demo_served_by(write, "scripted")).recipe
    assert recipe.serve.engine == "scripted" and "scripted" in known_engines()
    plan = build_plan(recipe)
    # The engine, not its name, decides: the local engine pairs speed with the baseline, this one not.
    assert not plan.steps["benchmark.nvfp4_max"].inputs.paired_baseline
    assert build_plan(load_recipe(DEMO).recipe, ["nvfp4_max"]).steps["benchmark.nvfp4_max"].inputs.paired_baseline

    worker_params: list[dict] = []
    run_dir = RunDir(tmp_path / "run")
    runner = Runner(plan, run_dir, LocalExecutor(), kinds=stand_ins(worker_params))
    outcome = asyncio.run(runner.run(RunOptions(until=["gates"])))
    assert outcome.states["gates"] == "complete", outcome.messages

    # Both servers came from the engine: the candidate from its checkpoint, the baseline from the source.
    assert sorted(scripted.served) == sorted([("nvfp4_max", "checkpoint"), ("nvfp4_max", "checkpoint"),
                                              ("baseline", "model")])
    assert run_dir.record("serve.nvfp4_max")["summary"]["engine"] == "scripted"
    results = json.loads((run_dir.step_dir("benchmark.nvfp4_max") / "results.json").read_text())
    assert results["engine"] == "scripted"
    assert results["measured_on"]["kernel_path"] == ScriptedEngine.kernels
    assert results["suites"]["thinking_leak"]["total"] == 5
    # verify handed the worker this engine's rules, as data.
    [params] = worker_params
    assert json.loads(json.dumps(params["rules"])) == {
        "engine": "scripted", "quant_algos": ["NVFP4"], "layer_algos": False, "input_scales": False,
        "no_pre_quant_scale": False, "vllm_module_rules": False}
    # `recipe plan` says where it serves.
    assert main(["plan", str(demo_served_by(write, "scripted")), "--run-dir", str(tmp_path / "planned"), "--json"]) == 0
    rows = {row["step"]: row for row in json.loads(capsys.readouterr().out)["steps"]}
    assert rows["serve.nvfp4_max"]["runs_in"] == "scripted server"


def test_an_unknown_engine_is_refused_naming_the_key_and_the_known_engines(write):
    with pytest.raises(RecipeError) as refused:
        load_recipe(demo_served_by(write, "vlm"))
    [problem] = refused.value.problems
    assert problem.path == ("serve", "engine")
    assert "unknown serving engine 'vlm'" in problem.message and "local, vllm" in problem.message
    assert "did you mean 'vllm'?" in problem.message
    with pytest.raises(KeyError, match="the known engines are local, vllm"):
        engine_for("scripted")  # registered only inside the test above


def test_the_builtin_engines_answer_as_the_branches_did():
    vllm, local = engine_for("vllm"), engine_for("local")
    assert vllm.runs_vllm and not local.runs_vllm
    assert local.pairs_speed_by_default and not vllm.pairs_speed_by_default
    assert local.parses_tool_calls_here and not vllm.parses_tool_calls_here
    assert "NVFP4_AWQ" in local.quant_algos and "NVFP4_AWQ" not in vllm.quant_algos
    assert vllm.verify_rules.vllm_module_rules and not local.verify_rules.vllm_module_rules
    assert vllm.export_refusal("preset X", {"NVFP4_AWQ"}, []).startswith("preset X exports NVFP4_AWQ")
    assert local.export_refusal("preset X", {"NVFP4_AWQ"}, ["m"]) is None
