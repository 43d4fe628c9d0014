"""The executor interface and the files a worker exchanges with it (spec in, result out)."""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections import deque
from pathlib import Path
from typing import TYPE_CHECKING, Any

from runner.steps.base import StepResult
from runner.worker_contract import ERROR_FILE, RESULT_FILE

if TYPE_CHECKING:
    from runner.containers.plugin import ContainerPlugin


class Executor(ABC):
    name: str
    uses_containers: bool = False  # run_worker gets the step's container plugin
    remote: bool = False  # worker steps run on other machines (a cluster): they take no local GPU slot

    @abstractmethod
    async def run_worker(self, *, worker_kind: str, params: dict[str, Any], scratch: Path, log_path: Path,
                         container: ContainerPlugin | None) -> StepResult:
        """Run `runner.worker` for one step; outputs land in `scratch`. Raises on failure."""

    def cleanup(self) -> None:
        """Remove anything of this run the executor may have left (called once the run ends, however)."""
        return None  # a local subprocess leaves nothing: the scheduler stops its process group


class WorkerFailed(Exception):
    pass


def worker_failure(scratch: Path, status: int | None, tail: list[str]) -> WorkerFailed:
    """The worker's own one-line reason when it wrote one; else its exit status and the log's last lines."""
    try:
        return WorkerFailed(json.loads((scratch / ERROR_FILE).read_text(encoding="utf-8"))["error"])
    except (OSError, ValueError, KeyError, TypeError):
        return WorkerFailed(f"worker exited with status {status}; last lines of its log:\n      "
                            + "\n      ".join(tail[-12:]))


def read_result(scratch: Path, tail: deque[str]) -> StepResult:
    path = scratch / RESULT_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise WorkerFailed(f"worker exited 0 but wrote no readable {RESULT_FILE} ({exc})") from None
    path.unlink()
    return StepResult(outputs=data.get("outputs", {}), summary=data.get("summary", {}),
                      versions=data.get("versions", {}))
