"""Shared fixtures: paths of the repository and a helper to write recipe files."""

from __future__ import annotations

import os
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
