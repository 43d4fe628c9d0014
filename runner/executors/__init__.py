"""Executors: WHERE a step's worker part runs. One interface, one module per executor.

`local` runs `python -m runner.worker SPEC` as a subprocess of this Python environment. A docker
executor runs the same entry point inside the step's container plugin, the slurm executor as a batch
job on a cluster; all exchange only a spec file and a result file in the step's scratch folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from runner.errors import RunnerError
from runner.executors.base import Executor
from runner.worker_contract import RESULT_FILE, SPEC_FILE

__all__ = ["RESULT_FILE", "SPEC_FILE", "Executor", "make_executor"]


def make_executor(name: str, run_dir: Path, env_names: list[str] | None = None,
                  hf_cache: Path | None = None, slurm: Any = None) -> Executor:
    if name == "local":
        from runner.executors.local import LocalExecutor

        return LocalExecutor()
    if name == "docker":
        from runner.executors.docker import DockerExecutor

        return DockerExecutor(run_dir, env_names or [], hf_cache)
    if name == "slurm":
        from runner.executors.slurm import SlurmExecutor
        from runner.recipe.schema import SlurmSpec

        return SlurmExecutor(run_dir, slurm if slurm is not None else SlurmSpec())
    raise RunnerError(f"unknown executor {name!r}; known: local, docker, slurm")
