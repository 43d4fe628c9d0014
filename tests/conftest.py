"""Shared fixtures: paths of the repository and a helper to write recipe files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
RECIPES = REPO / "recipes"
DEMO = RECIPES / "demo" / "smollm2-cpu.yaml"


@pytest.fixture
def write(tmp_path: Path):
    """write('name.yaml', 'yaml text') -> path, dedented."""

    def _write(name: str, text: str) -> Path:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
        return path

    return _write


MINIMAL = """
name: mini
model:
  name: Mini
  source: {kind: local, path: model}
calibration:
  source: {kind: jsonl, path: calib.jsonl}
  samples: 4
quantization:
  strategies:
    - name: max
      preset: NVFP4_DEFAULT_CFG
"""


def recipe_cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


PYTHON = sys.executable


def recipe(*args: str, env: dict[str, str] | None = None, timeout: int = 900) -> subprocess.CompletedProcess:
    """The `recipe` command as a user runs it."""
    return subprocess.run([PYTHON, "-m", "runner.cli", *args], capture_output=True, text=True,
                          env=env or recipe_cli_env(), cwd=REPO, timeout=timeout)


def record(run_dir: Path, step: str) -> dict:
    return json.loads((run_dir / "steps" / step / "record.json").read_text())


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory) -> Path:
    """The demo recipe through verify for nvfp4_max and fp8 (a real model on the CPU, a few minutes)."""
    pytest.importorskip("modelopt")
    run_dir = tmp_path_factory.mktemp("demo") / "run"
    result = recipe("run", str(DEMO), "--until", "verify", "--strategy", "nvfp4_max", "--strategy", "fp8",
                    "--run-dir", str(run_dir))
    assert result.returncode == 0, result.stderr
    return run_dir
