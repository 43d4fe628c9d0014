"""What re-runs a step: exactly what its typed input reads, its files, its code and its upstream.

Plans are built twice from the shipped demo recipe with one field changed; the keys say which steps
a real run would redo. No step runs here.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from conftest import DEMO
from runner import plan as plan_module
from runner.plan import build_plan
from runner.recipe.loader import load_recipe
from runner.recipe.schema import Recipe
from runner.steps.inputs import QuantizeInput, ReportInput

UPSTREAM_OF_REPORT = ("source", "calibrate", "quantize.", "export.", "verify.", "serve.", "benchmark.", "gates")


@pytest.fixture(scope="module")
def recipe() -> Recipe:
    return load_recipe(DEMO).recipe


def changed(recipe: Recipe, section: str, **update) -> dict[str, str]:
    """The plan's keys after `recipe.<section>` gets `update`."""
    edited = recipe.model_copy(update={section: getattr(recipe, section).model_copy(update=update)})
    return build_plan(edited).keys


def rekeyed(before: dict[str, str], after: dict[str, str]) -> set[str]:
    assert before.keys() == after.keys()
    return {sid for sid in before if before[sid] != after[sid]}


def test_the_same_recipe_gives_the_same_keys(recipe):
    assert build_plan(recipe).keys == build_plan(recipe).keys


@pytest.mark.parametrize(("section", "update"), [
    ("model", {"license": "mit"}),
    ("model", {"name": "Another display name"}),
    ("publish", {"private": True}),
])
def test_a_field_only_the_documents_print_leaves_every_upstream_step_alone(recipe, section, update):
    moved = rekeyed(build_plan(recipe).keys, changed(recipe, section, **update))
    assert moved == {"report", "publish"}


def test_the_description_reruns_only_the_documents(recipe):
    before = build_plan(recipe).keys
    after = build_plan(recipe.model_copy(update={"description": "something else"})).keys
    assert rekeyed(before, after) == {"report", "publish"}


def test_repo_id_which_the_card_prints_rekeys_the_card(recipe):
    moved = rekeyed(build_plan(recipe).keys, changed(recipe, "publish", repo_id="someone/else"))
    assert "report" in moved and not any(sid.startswith(UPSTREAM_OF_REPORT) for sid in moved)


def test_calibration_size_rekeys_calibrate_and_everything_after(recipe):
    plan = build_plan(recipe)
    moved = rekeyed(plan.keys, changed(recipe, "calibration", samples=recipe.calibration.samples + 1))
    assert "source" not in moved and "benchmark.baseline" not in moved
    assert {"calibrate", "gates", "report", "publish"} <= moved
    assert all(sid in moved for sid in plan.keys if sid.startswith(("quantize.", "export.", "benchmark.nvfp4")))


def test_serve_threads_rekey_serving_not_quantization(recipe):
    moved = rekeyed(build_plan(recipe).keys, changed(recipe, "serve", threads=3))
    assert not any(sid.startswith(("source", "calibrate", "quantize.", "export.", "verify.")) for sid in moved)
    assert {sid for sid in moved if sid.startswith(("serve.", "benchmark."))}
    assert "benchmark.baseline" in moved  # the baseline is served by the same engine


def test_each_step_gets_only_its_own_input(recipe):
    plan = build_plan(recipe)
    quantize = next(s for s in plan.steps.values() if s.kind == "quantize")
    assert isinstance(quantize.inputs, QuantizeInput)
    assert set(quantize.params) == {"strategy", "exclude", "calib_samples", "max_length", "seed", "dtype",
                                    "architecture", "held_out", "held_out_after", "sensitivity", "score_step"}
    assert isinstance(plan.steps["report"].inputs, ReportInput)
    with pytest.raises(ValueError):  # frozen: a step cannot change what its key was computed from
        quantize.inputs.seed = 1  # type: ignore[misc]


def rekeyed_by_editing(relative: str, recipe, tmp_path, monkeypatch) -> set[str]:
    """The steps whose keys change when one runner source file (relative to runner/) is edited."""
    code = tmp_path / "runner"
    shutil.copytree(Path(plan_module.__file__).parent, code, ignore=shutil.ignore_patterns("__pycache__"))
    monkeypatch.setattr(plan_module, "RUNNER_DIR", code)
    monkeypatch.setattr(plan_module, "_code_hashes", {})
    before = build_plan(recipe).keys
    with (code / relative).open("a") as fh:
        fh.write("\n# an edit\n")
    monkeypatch.setattr(plan_module, "_code_hashes", {})
    return rekeyed(before, build_plan(recipe).keys)


def test_editing_a_step_module_rekeys_that_step_and_what_follows(recipe, tmp_path, monkeypatch):
    moved = rekeyed_by_editing("steps/export.py", recipe, tmp_path, monkeypatch)
    assert {sid for sid in moved if sid.startswith("export.")}
    assert not any(sid.startswith(("source", "calibrate", "quantize.")) for sid in moved)
    assert "benchmark.baseline" not in moved and "gates" in moved


def test_editing_a_helper_a_step_imports_rekeys_it(recipe, tmp_path, monkeypatch):
    """The code hash follows imports: fixups.py is export's helper, exclusions.py quantize's (DEFAULT_DISABLED)."""
    from runner.steps.code import code_files

    assert "quantization/exclusions.py" in code_files("quantize") and "recipe/fixups.py" in code_files("export")
    assert "recipe/schema.py" not in code_files("quantize")  # the recipe's shape reaches the key as the input
    moved = rekeyed_by_editing("recipe/fixups.py", recipe, tmp_path, monkeypatch)
    assert {sid for sid in moved if sid.startswith("export.")}
    assert not any(sid.startswith(("source", "calibrate", "quantize.")) for sid in moved)


def test_editing_presentation_leaves_every_measured_step_current(recipe, tmp_path, monkeypatch):
    """A plot's colour or a table's column title re-renders (gates, report, publish), and re-serves and
    re-quantizes nothing (runner/steps/code.py PRESENTATION)."""
    from runner.steps.code import PRESENTATION, code_files

    for kind in ("source", "calibrate", "quantize", "export", "verify", "serve", "benchmark"):
        assert not PRESENTATION & set(code_files(kind)), kind
    moved = rekeyed_by_editing("benchmark/presentation.py", recipe, tmp_path, monkeypatch)
    assert moved == {"gates", "report", "publish"}


def test_editing_the_plan_table_rekeys_nothing(recipe, tmp_path, monkeypatch):
    assert rekeyed_by_editing("plan_table.py", recipe, tmp_path, monkeypatch) == set()


def test_editing_the_quantize_worker_rekeys_quantize(recipe, tmp_path, monkeypatch):
    moved = rekeyed_by_editing("worker/quantize.py", recipe, tmp_path, monkeypatch)
    assert {sid for sid in moved if sid.startswith("quantize.")} == {
        f"quantize.{s.name}" for s in recipe.enabled_strategies()}
    assert not any(sid.startswith(("source", "calibrate")) for sid in moved) and "benchmark.baseline" not in moved


def test_a_moved_checkout_finds_its_run_current(recipe, tmp_path):
    """The same recipe planned from a copy of this checkout elsewhere gives the same keys: paths inside
    the checkout are hashed relative to it and the files it reads by content."""
    import json
    import os
    import subprocess
    import sys

    root = Path(plan_module.__file__).resolve().parent.parent
    copy = tmp_path / "elsewhere" / "checkout"
    for folder in ("runner", "recipes", "containers", "templates"):
        shutil.copytree(root / folder, copy / folder, ignore=shutil.ignore_patterns("__pycache__"))
    script = ("import json; from runner.plan import build_plan; from runner.recipe.loader import load_recipe; "
              f"print(json.dumps(build_plan(load_recipe({str(DEMO.relative_to(root))!r}).recipe).keys))")
    env = {**os.environ, "PYTHONPATH": str(copy)}
    out = subprocess.run([sys.executable, "-c", script], cwd=copy, env=env, capture_output=True, text=True,
                         check=True)
    assert json.loads(out.stdout) == build_plan(recipe).keys


def test_relocatable_writes_checkout_paths_relative():
    inside = str(plan_module.CHECKOUT / "recipes" / "demo" / "calibration.jsonl")
    climbing = str(plan_module.CHECKOUT / "recipes" / "demo" / ".." / "models" / "x")
    assert plan_module.relocatable({"a": [inside, climbing, "/data/model", "text"]}) == {
        "a": ["$CHECKOUT/recipes/demo/calibration.jsonl", "$CHECKOUT/recipes/models/x", "/data/model", "text"]}


def test_sensitivity_reaches_its_quantize_step_and_rekeys_only_that_branch(recipe):
    first = recipe.quantization.strategies[0]
    edited = recipe.model_copy(update={"quantization": recipe.quantization.model_copy(update={
        "strategies": [first.model_copy(update={"sensitivity": 4}), *recipe.quantization.strategies[1:]]})})
    plan = build_plan(edited)
    assert plan.steps[f"quantize.{first.name}"].inputs.sensitivity == 4
    moved = rekeyed(build_plan(recipe).keys, plan.keys)
    assert f"quantize.{first.name}" in moved
    assert not any(sid.startswith("quantize.") and sid != f"quantize.{first.name}" for sid in moved)
