"""The one place that starts a container: a plugin, a role (worker or server) and a command.

`launched(...)` builds or reuses the plugin's image, starts the container with the run's labels,
the plugin's GPU, shared-memory, IPC, environment and mount settings, and removes it on every way
out (success, error, Ctrl-C). The docker executor runs workers through it and the vllm serving
engine runs servers through it; `recipe clean` finds leftovers by the same labels.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterable
from pathlib import Path
from typing import Any, Literal

from runner.containers import docker_api
from runner.containers.plugin import ContainerPlugin

Role = Literal["worker", "server"]


@contextlib.asynccontextmanager
async def launched(api: Any, plugin: ContainerPlugin, role: Role, command: list[str], *, run_dir: Path, step: str,
                   same_path_mounts: Iterable[tuple[Path, bool]] = (), binds: dict[Path, str] | None = None,
                   env_names: Iterable[str] = (), env: dict[str, str] | None = None,
                   ports: dict[str, tuple[str, int]] | None = None, **options: Any) -> AsyncIterator[Any]:
    """A running container of `plugin`; removed when the block ends, however it ends.

    same_path_mounts: (host path, writable) bound at the same path inside, so paths in a worker spec
    need no rewriting; binds: host path -> container path, read-only (a served model at /model).
    options pass through to the Docker SDK (user, working_dir).
    """
    image = await asyncio.to_thread(docker_api.ensure_image, api, plugin)
    volumes = docker_api.volumes_for(list(same_path_mounts), plugin)
    volumes |= {str(host): {"bind": inside, "mode": "ro"} for host, inside in (binds or {}).items()}
    handle = await asyncio.to_thread(
        api.containers.run, image, command, detach=True, entrypoint=plugin.entrypoint if role == "server" else None,
        volumes=volumes, environment=docker_api.environment(plugin, list(env_names)) | (env or {}),
        labels={docker_api.LABEL: role, docker_api.RUN_LABEL: docker_api.run_label(run_dir),
                docker_api.STEP_LABEL: step},
        ports=ports, shm_size=plugin.shm_size, ipc_mode=plugin.ipc,
        device_requests=docker_api.device_requests(api, plugin) or None, **options)
    try:
        yield handle
    finally:
        await asyncio.to_thread(docker_api.remove, handle)
