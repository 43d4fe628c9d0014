"""Each step kind is declared once, in the module named after it, and the rest is read from there."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

from conftest import DEMO
from runner.plan import build_plan
from runner.recipe.loader import load_recipe
from runner.recipe.schema import AutoQuantizeSpec, Strategy
from runner.steps.registry import slurm_step_problems, step_kinds, worker_kinds

RUNNER = Path(__file__).resolve().parent.parent / "runner"


def test_every_kind_lives_in_the_module_named_after_it():
    for name, kind in step_kinds().items():
        module = importlib.import_module(f"runner.steps.{name}")
        assert module.KIND is kind and kind.name == name
        assert kind.modules[0] == f"steps/{name}.py", name
        assert all((RUNNER / m).is_file() for m in kind.modules), kind.modules
        assert kind.run is not None and kind.input is not None


def test_the_plan_builds_each_kind_its_declared_input_and_gpu_use():
    recipe = load_recipe(DEMO).recipe
    # An auto_quantize strategy brings the score step the demo's strategies do not need.
    auto = Strategy(name="auto_mixed", auto_quantize=AutoQuantizeSpec(effective_bits=6.0))
    recipe.quantization.strategies = [*recipe.quantization.strategies, auto]
    plan = build_plan(recipe)
    kinds = step_kinds()
    assert {step.kind for step in plan.steps.values()} == set(kinds)
    for step in plan.steps.values():
        assert isinstance(step.inputs, kinds[step.kind].input), step.id
        if step.id != "benchmark.baseline":
            assert step.heavy == kinds[step.kind].gpu, step.id


def test_every_worker_a_kind_names_is_a_worker_module_and_no_other():
    """`python -m runner.worker` runs runner/worker/KIND.py's run(); the step kinds name exactly those."""
    with_run = set()
    for path in (RUNNER / "worker").glob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        if any(isinstance(node, ast.FunctionDef) and node.name == "run" for node in tree.body):
            with_run.add(path.stem)
    assert set(worker_kinds()) == with_run
    assert all(step_kinds()[k].container_role for k in worker_kinds().values())


def test_slurm_resources_default_to_the_kinds_own_and_unknown_kinds_are_located(tmp_path):
    recipe = load_recipe(DEMO).recipe
    slurm = recipe.execution.slurm
    assert slurm.resources_for("quantize", step_kinds()["quantize"].slurm).gpus == 1
    assert slurm.resources_for("verify", step_kinds()["verify"].slurm).gpus == 0
    path = tmp_path / "r.yaml"
    path.write_text(f"extends: {DEMO}\nexecution:\n  slurm:\n    steps:\n      serve: {{gpus: 1}}\n", encoding="utf-8")
    loaded = load_recipe(path)
    problems = slurm_step_problems(loaded)
    assert len(problems) == 1
    text = str(problems[0])
    assert "execution.slurm.steps.serve" in text and "source, score, quantize, verify" in text and "r.yaml" in text
