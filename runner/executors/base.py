"""The executor interface and the files a worker exchanges with it (spec in, result out)."""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING, Any

from runner.steps.base import StepResult

if TYPE_CHECKING:
    from runner.containers.plugin import ContainerPlugin

SPEC_FILE = "worker_spec.json"
RESULT_FILE = "worker_result.json"


class Executor(ABC):
    name: str
    uses_containers: bool = False

    @abstractmethod
    async def run_worker(self, *, worker_kind: str, params: dict[str, Any], scratch: Path, log_path: Path,
                         container: ContainerPlugin | None) -> StepResult:
        """Run `runner.worker` for one step; outputs land in `scratch`. Raises on failure."""

    def cleanup(self) -> None:
        """Remove anything of this run the executor may have left (called once the run ends, however)."""
        return None  # a local subprocess leaves nothing: the scheduler stops its process group


class WorkerFailed(Exception):
    pass


def read_result(scratch: Path, tail: deque[str]) -> StepResult:
    path = scratch / RESULT_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise WorkerFailed(f"worker exited 0 but wrote no readable {RESULT_FILE} ({exc})") from None
    path.unlink()
    return StepResult(outputs=data.get("outputs", {}), summary=data.get("summary", {}),
                      versions=data.get("versions", {}))
