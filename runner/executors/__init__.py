"""Executors: WHERE a step's worker part runs. One interface, one module per executor.

`local` runs `python -m runner.worker SPEC` as a subprocess of this Python environment. A docker
executor runs the same entry point inside the step's container plugin; both exchange only a spec
file and a result file in the step's scratch folder.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, Any

from runner.errors import RunnerError

if TYPE_CHECKING:
    from runner.containers import ContainerPlugin
    from runner.steps import StepResult

SPEC_FILE = "worker_spec.json"
RESULT_FILE = "worker_result.json"


class Executor(ABC):
    name: str
    uses_containers: bool = False

    @abstractmethod
    async def run_worker(self, *, worker_kind: str, params: dict[str, Any], scratch: Path, log_path: Path,
                         container: ContainerPlugin | None, heavy: bool) -> StepResult:
        """Run `runner.worker` for one step; outputs land in `scratch`. Raises on failure."""


def make_executor(name: str, run_dir: Path, env_names: list[str] | None = None,
                  hf_cache: Path | None = None) -> Executor:
    if name == "local":
        from runner.executors.local import LocalExecutor

        return LocalExecutor()
    if name == "docker":
        from runner.executors.docker import DockerExecutor

        return DockerExecutor(run_dir, env_names or [], hf_cache)
    raise RunnerError(f"unknown executor {name!r}; known: local, docker")
