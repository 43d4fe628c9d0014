"""Everything that talks to the Docker engine: connecting, images, labelled containers, cleanup.

Every container the runner starts carries the label `recipe-runner.run` (the run directory's absolute
path, so that `recipe clean` can ask whether a live run holds it) and `recipe-runner.step`; it is
removed when its step ends, fails or is cancelled, and `recipe clean` removes leftovers of crashed
runs, never a container of a run that a live process holds. Mounts are only the paths a step needs, bound at
the same path inside the container, so the worker spec's paths need no rewriting.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from runner.containers.plugin import ContainerPlugin
from runner.errors import RunnerError

LABEL = "recipe-runner"
RUN_LABEL = "recipe-runner.run"
STEP_LABEL = "recipe-runner.step"
PACKAGE_DIR = Path(__file__).resolve().parents[1]  # runner/, mounted read-only so the worker code is the host's


def client() -> Any:
    """A Docker client, or a RunnerError that says what is wrong and how to go on."""
    try:
        import docker
        from docker.errors import DockerException
    except ImportError:
        raise RunnerError("the Python package `docker` is missing: pip install docker, "
                          "or use --executor local") from None
    try:
        api = docker.from_env(timeout=120)
        api.ping()
        return api
    except DockerException as exc:
        text = str(exc)
        socket = os.environ.get("DOCKER_HOST", "/var/run/docker.sock")
        if "Permission denied" in text:
            raise RunnerError(f"cannot access the Docker socket ({socket}): permission denied. Add your user to the "
                              "`docker` group (then log in again), or use --executor local") from None
        if "No such file" in text or "Connection refused" in text or "FileNotFoundError" in text:
            raise RunnerError(f"the Docker daemon is not running (nothing answers at {socket}). Start it "
                              "(`sudo systemctl start docker`, or `dockerd &`), or use --executor local") from None
        raise RunnerError(f"cannot talk to Docker: {text.splitlines()[0] if text else type(exc).__name__}. "
                          "Is Docker installed? Or use --executor local") from None


def run_label(run_dir: Path) -> str:
    """The value of RUN_LABEL: the run directory's absolute path (earlier runners wrote a hash of it)."""
    return str(run_dir.resolve())


def _hashed_label(run_dir: Path) -> str:
    """RUN_LABEL as runners before the path label wrote it: a container of theirs names no run directory."""
    return hashlib.sha256(str(run_dir.resolve()).encode()).hexdigest()[:16]


def ensure_image(api: Any, plugin: ContainerPlugin) -> str:
    """The image to run: the plugin's, or one derived from it with its setup, built once and reused."""
    from docker.errors import APIError, BuildError, ImageNotFound

    base = plugin.image
    assert base is not None
    try:
        api.images.get(base)
    except ImageNotFound:
        try:
            api.images.pull(base)
        except APIError as exc:
            raise RunnerError(f"container {plugin.name!r}: image {base} is not on this machine and could not be "
                              f"pulled ({exc.explanation or exc}). Load or build it (docker load / docker build), or "
                              "use --executor local") from None
    if not (plugin.setup.apt or plugin.setup.pip):
        return base
    tag = f"recipe-runner/{plugin.name}:{plugin.definition_hash()}"
    try:
        api.images.get(tag)
        return tag
    except ImageNotFound:
        pass
    lines = [f"FROM {base}"]
    if plugin.setup.apt:
        lines.append("RUN apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "
                     + " ".join(plugin.setup.apt) + " && rm -rf /var/lib/apt/lists/*")
    if plugin.setup.pip:
        lines.append(f"RUN {plugin.python} -m pip install --no-cache-dir " + " ".join(
            [*plugin.setup.pip_args, *(f"'{p}'" for p in plugin.setup.pip)]))
    dockerfile = "\n".join(lines) + "\n"
    context = io.BytesIO()
    with tarfile.open(fileobj=context, mode="w") as tar:
        data = dockerfile.encode()
        info = tarfile.TarInfo("Dockerfile")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    context.seek(0)
    try:
        api.images.build(fileobj=context, custom_context=True, tag=tag, rm=True, labels={LABEL: "image"})
    except BuildError as exc:
        detail = " ".join(str(chunk.get("stream") or chunk.get("error") or "") for chunk in exc.build_log)[-800:]
        raise RunnerError(f"building the image for container {plugin.name!r} failed: {detail}") from None
    return tag


def device_requests(api: Any, plugin: ContainerPlugin) -> list[Any]:
    """GPU requests for the plugin; an error with the fix when the engine has no GPU runtime."""
    if plugin.gpus == "none" or plugin.gpus == 0:
        return []
    from docker.types import DeviceRequest

    runtimes = (api.info() or {}).get("Runtimes") or {}
    if "nvidia" not in runtimes:
        raise RunnerError(f"container {plugin.name!r} asks for GPUs, but this Docker engine has no GPU runtime "
                          f"(runtimes: {', '.join(runtimes) or 'none'}). Install the NVIDIA Container Toolkit and "
                          "restart Docker, or use --executor local on a machine with the worker extra installed")
    count = -1 if plugin.gpus == "all" else int(plugin.gpus)
    return [DeviceRequest(count=count, capabilities=[["gpu"]])]


def volumes_for(paths: list[tuple[Path, bool]], plugin: ContainerPlugin) -> dict[str, dict[str, str]]:
    """Bind mounts: the runner package (read-only), the given paths at the same place, the plugin's own."""
    volumes = {str(PACKAGE_DIR): {"bind": "/opt/recipe-runner/runner", "mode": "ro"}}
    for path, writable in paths:
        volumes[str(path)] = {"bind": str(path), "mode": "rw" if writable else "ro"}
    for mount in plugin.mounts:
        volumes[str(mount.host)] = {"bind": mount.container, "mode": "ro" if mount.read_only else "rw"}
    return volumes


def environment(plugin: ContainerPlugin, names: list[str]) -> dict[str, str]:
    """The plugin's variables and the ones the recipe names, nothing else from the host."""
    env = {"PYTHONUNBUFFERED": "1", **plugin.env}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, ["/opt/recipe-runner", plugin.env.get("PYTHONPATH")]))
    for name in names:
        if name in os.environ:
            env[name] = os.environ[name]
    return env


def remove(container: Any) -> None:
    """Stop and remove one container; already gone is fine."""
    with contextlib.suppress(Exception):
        container.remove(force=True)


def run_containers(api: Any, run_dir: Path | str | None = None) -> list[tuple[Any, Path | None]]:
    """The runner's containers (of one run directory, or all), each with the run directory its label
    names (None for a container of an earlier runner, whose label is a hash)."""
    wanted = {run_label(Path(run_dir)), _hashed_label(Path(run_dir))} if run_dir is not None else None
    found = []
    for container in api.containers.list(all=True, filters={"label": RUN_LABEL}):
        value = (container.labels or {}).get(RUN_LABEL, "")
        if wanted is None or value in wanted:
            found.append((container, Path(value) if value.startswith("/") else None))
    return found


def remove_containers(api: Any, run_dir: Path | str | None = None,
                      keep: Callable[[Path | None], str | None] | None = None) -> tuple[list[str], list[str]]:
    """Stop and remove the runner's containers (of one run directory, or all) except those `keep` gives a
    reason for, given the run directory a container's label names (`recipe clean` keeps a live run's).
    Returns (names removed, "name: reason" of those kept)."""
    removed, kept = [], []
    for container, owner in run_containers(api, run_dir):
        reason = keep(owner) if keep is not None else None
        if reason:
            kept.append(f"{container.name}: {reason}")
            continue
        remove(container)
        removed.append(container.name)
    return removed, kept
