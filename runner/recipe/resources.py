"""Where the shipped recipes, container plugins and templates live, and the one reader of the
shipped data files (hardware targets, suite names) that validation and the steps share.

In a wheel they travel inside the package (runner/_shipped/, see pyproject.toml); in a source
checkout they are the top-level folders next to runner/.
"""

from __future__ import annotations

import os
from functools import cache
from pathlib import Path
from typing import Any

_PACKAGE_DIR = Path(__file__).resolve().parents[1]  # runner/


def shipped_dir(kind: str) -> Path:
    """The folder of shipped `recipes`, `containers` or `templates`."""
    installed = _PACKAGE_DIR / "_shipped" / kind
    if installed.is_dir():
        return installed
    return _PACKAGE_DIR.parent / kind


@cache
def hardware_targets() -> dict[str, dict[str, Any]]:
    """recipes/hardware/targets.yaml: target name -> its figures (memory_bandwidth_gbs, ...)."""
    from ruamel.yaml import YAML

    path = shipped_dir("recipes") / "hardware" / "targets.yaml"
    return dict(YAML(typ="safe").load(path.read_text(encoding="utf-8")) or {})


def shipped_suites() -> list[str]:
    """Names of the shipped behaviour suites (recipes/suites/NAME.yaml)."""
    return sorted(p.stem for p in (shipped_dir("recipes") / "suites").glob("*.yaml"))


@cache
def available_containers() -> dict[str, Path]:
    """Plugin name -> its YAML file: the shipped ones, then folders in RECIPE_RUNNER_CONTAINERS (which win)."""
    found = {p.stem: p for p in sorted(shipped_dir("containers").glob("*.yaml"))}
    for folder in filter(None, os.environ.get("RECIPE_RUNNER_CONTAINERS", "").split(os.pathsep)):
        found.update({p.stem: p for p in sorted(Path(folder).glob("*.yaml"))})
    return found
