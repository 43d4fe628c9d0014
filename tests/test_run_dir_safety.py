"""The user's files are sacred: the runner writes and deletes only in a run directory it made, one
writer at a time, and fix-ups write only inside the checkpoint. Real `recipe` processes."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import DEMO, recipe
from runner.errors import RecipeError
from runner.run_dir import MARKER, SCRATCH_MARKER, RunDir

USER_FILES = {
    "recipe.yaml": "my own recipe\n",
    "run.json": "{\"mine\": true}\n",
    "steps/quantize.x/notes.txt": "keep me\n",
    ".scratch/quantize.nvfp4_max.abc/partial.bin": "keep me too\n",
    ".scratch/mystuff/thesis.tex": "\\documentclass{article}\n",
}


def plant(folder: Path) -> None:
    for name, text in USER_FILES.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)


def intact(folder: Path) -> bool:
    return all((folder / name).read_text() == text for name, text in USER_FILES.items())


def test_run_refuses_a_folder_that_is_not_a_run_directory_and_touches_nothing(tmp_path):
    plant(tmp_path)
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    result = recipe("run", str(DEMO), "--run-dir", str(tmp_path), "--until", "calibrate", timeout=300)
    assert result.returncode != 0
    assert "is not empty and is not a run directory" in result.stdout + result.stderr
    assert intact(tmp_path) and sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


def test_clean_removes_only_the_scratch_folders_the_runner_made(tmp_path):
    plant(tmp_path)
    refused = recipe("clean", "--run-dir", str(tmp_path), timeout=120)
    assert refused.returncode != 0 and intact(tmp_path)  # not a run directory: nothing removed
    run_dir = RunDir(tmp_path / "run")
    run_dir.claim()
    plant(run_dir.root)
    ours = run_dir.new_scratch("quantize.nvfp4_max")
    (ours / "half-written.safetensors").write_text("x")
    result = recipe("clean", "--run-dir", str(run_dir.root), timeout=120)
    assert result.returncode == 0, result.stderr
    assert not ours.exists() and intact(run_dir.root)
    # A new scratch folder for a step removes that step's old ones, but only the runner's.
    again = run_dir.new_scratch("quantize.nvfp4_max")
    assert (again / SCRATCH_MARKER).is_file() and intact(run_dir.root)


def test_a_new_or_empty_folder_becomes_a_run_directory(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    RunDir(empty).claim()
    assert (empty / MARKER).is_file()
    RunDir(tmp_path / "new" / "deeper").claim()
    assert (tmp_path / "new" / "deeper" / MARKER).is_file()


def test_one_writer_per_run_directory(tmp_path):
    run_dir = RunDir(tmp_path / "run")
    run_dir.claim()
    with run_dir.locked():
        result = recipe("run", str(DEMO), "--run-dir", str(run_dir.root), "--until", "calibrate", timeout=300)
        assert result.returncode != 0
        assert "another `recipe run`" in result.stdout + result.stderr and "is writing to" in result.stdout + result.stderr
        # Read-only commands still work while it is held.
        plan = recipe("plan", str(DEMO), "--run-dir", str(run_dir.root), timeout=120)
        assert plan.returncode == 0, plan.stderr
    with run_dir.locked():  # released when its holder lets go
        pass


@pytest.mark.parametrize("fixup", [
    "{op: write_json, file: ../../../steps/calibrate/record.json, content: {}}",
    "{op: set_json, file: /etc/hosts.json, values: {a: 1}}",
    "{op: copy_file, source: 'model:../../../secret', to: x.json}",
    "{op: copy_file, source: chat_template.jinja, to: ../outside.jinja}",
])
def test_fixups_that_would_write_or_read_outside_their_folder_are_refused_at_load(write, fixup):
    from runner.recipe.loader import load_recipe

    path = write("escape.yaml", f"extends: {DEMO}\nexport:\n  fixups:\n    - {fixup}\n")
    with pytest.raises(RecipeError) as caught:
        load_recipe(path)
    text = str(caught.value)
    assert "escape.yaml:4" in text and "inside" in text
