"""A wheel built from the repository, installed in a fresh venv, lists and validates the shipped recipes."""

from __future__ import annotations

import subprocess
import sys
import venv
from pathlib import Path

import pytest

from conftest import REPO

pytestmark = pytest.mark.slow


def test_wheel_carries_recipes_containers_and_templates(tmp_path):
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(dist), str(REPO)],
                   check=True, capture_output=True, text=True, timeout=300)
    [wheel] = dist.glob("recipe_runner-*.whl")
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    install = subprocess.run([str(python), "-m", "pip", "install", "-q", str(wheel)], capture_output=True, text=True,
                             timeout=600)
    assert install.returncode == 0, install.stderr[-2000:]
    recipe = env_dir / "bin" / "recipe"
    listed = subprocess.run([str(recipe), "list"], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert listed.returncode == 0, listed.stderr
    assert "qwen35-9b-opus.yaml" in listed.stdout
    site = Path(subprocess.run([str(python), "-c", "import runner, os; print(os.path.dirname(runner.__file__))"],
                               capture_output=True, text=True, check=True, cwd=tmp_path).stdout.strip())
    shipped = site / "_shipped"
    assert (shipped / "containers" / "vllm.yaml").is_file()
    assert (shipped / "templates").is_dir()
    validated = subprocess.run([str(recipe), "validate", "--schema-only", str(shipped / "recipes" / "qwen35-9b-opus.yaml"),
                                str(shipped / "recipes" / "demo" / "smollm2-cpu.yaml")],
                               capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert validated.returncode == 0, validated.stderr
    # The host side installs without torch.
    has_torch = subprocess.run([str(python), "-c", "import torch"], capture_output=True, cwd=tmp_path)
    assert has_torch.returncode != 0
