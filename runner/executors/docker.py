"""The docker executor: the worker runs inside the step's container plugin, driven with the docker SDK.

The container sees only what the step needs: the runner package (read-only), the step's scratch
folder (read-write), the input paths named in its parameters (read-only), the plugin's own mounts
and the Hugging Face cache when the recipe declares one. Its environment is the plugin's variables
and the ones `execution.env` names. Logs stream into the step log as they come. The container is
removed when the step ends, fails or is cancelled.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

from runner.containers import docker_api
from runner.containers.launcher import launched
from runner.containers.plugin import ContainerPlugin
from runner.executors.base import Executor, read_result, worker_failure
from runner.run_dir import write_json_atomic
from runner.steps.base import StepResult
from runner.worker_contract import SPEC_FILE


def input_paths(params: dict[str, Any]) -> list[Path]:
    """Existing absolute paths among a worker's parameters (the step's inputs), to mount read-only."""
    found = []

    def walk(value: Any) -> None:
        if isinstance(value, dict):
            for v in value.values():
                walk(v)
        elif isinstance(value, list):
            for v in value:
                walk(v)
        elif isinstance(value, str) and value.startswith("/") and Path(value).exists():
            found.append(Path(value))

    walk(params)
    return found


class DockerExecutor(Executor):
    name = "docker"
    uses_containers = True

    def __init__(self, run_dir: Path, env_names: list[str], hf_cache: Path | None):
        self.api = docker_api.client()
        self.run_dir = run_dir
        self.env_names = env_names
        self.hf_cache = hf_cache

    def cleanup(self) -> None:
        """A safety net: whatever happened, no container of this run outlives it."""
        docker_api.remove_containers(self.api, self.run_dir)

    async def run_worker(self, *, worker_kind: str, params: dict[str, Any], scratch: Path, log_path: Path,
                         container: ContainerPlugin | None) -> StepResult:
        assert container is not None
        if container.runtime == "local":
            from runner.executors.local import LocalExecutor

            return await LocalExecutor().run_worker(worker_kind=worker_kind, params=params, scratch=scratch,
                                                    log_path=log_path, container=container)
        spec_path = scratch / SPEC_FILE
        write_json_atomic(spec_path, {"kind": worker_kind, "params": params, "output_dir": str(scratch)})
        mounts = [(scratch, True)] + [(p, False) for p in input_paths(params) if not _inside(p, scratch)]
        env = {}
        if self.hf_cache is not None:
            mounts.append((self.hf_cache, False))
            env["HF_HUB_CACHE"] = str(self.hf_cache)
        async with launched(self.api, container, "worker", [container.python, "-m", "runner.worker", str(spec_path)],
                            run_dir=self.run_dir, step=scratch.name, same_path_mounts=mounts,
                            env_names=self.env_names, env=env, user=f"{os.getuid()}:{os.getgid()}",
                            working_dir=str(scratch)) as handle:
            tail = await asyncio.to_thread(_follow_logs, handle, log_path)
            status = await asyncio.to_thread(handle.wait)
        if status.get("StatusCode") != 0:
            raise worker_failure(scratch, status.get("StatusCode"), tail)
        return read_result(scratch, tail)


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _follow_logs(handle: Any, log_path: Path) -> list[str]:
    tail: list[str] = []
    with log_path.open("a", encoding="utf-8") as log:
        for raw in handle.logs(stream=True, follow=True):
            text = raw.decode("utf-8", errors="replace")
            log.write(text)
            log.flush()
            tail.extend(text.splitlines())
            del tail[:-40]
    return tail

