"""Container plugins: WHERE a step runs, declared as YAML in containers/ (one file a container).

A plugin names an image (or `runtime: local` for the current Python environment), optional setup
that derives an image once, GPU and shared-memory needs, and a health check for servers. Executors
read these; adding a container is adding a file, not code.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

from pydantic import Field

from runner.recipe.resources import available_containers
from runner.recipe.schema import Identifier, Section


class ContainerSetup(Section):
    """Added on top of the image; a derived image is built once, keyed by this definition's hash."""

    apt: list[str] = Field(default_factory=list)
    pip: list[str] = Field(default_factory=list)
    pip_args: list[str] = Field(default_factory=list, description="e.g. --no-deps, --extra-index-url ...")


class Mount(Section):
    """An extra bind mount (e.g. a local wheel cache, or a Python environment to reuse)."""

    host: Path
    container: str
    read_only: bool = True


class HealthCheck(Section):
    path: str = "/health"
    interval_s: float = Field(2.0, gt=0)
    timeout_s: float = Field(900.0, gt=0)


class ContainerPlugin(Section):
    name: Identifier
    description: str = ""
    runtime: Literal["docker", "local"] = "docker"
    image: str | None = Field(None, description="Image reference; required for runtime docker.")
    setup: ContainerSetup = Field(default_factory=ContainerSetup)
    gpus: Literal["all", "none"] | int = "none"
    shm_size: str | None = Field(None, description="e.g. 16g")
    ipc: Literal["host", "private", "shareable"] | None = None
    python: str = Field("python3", description="Interpreter that runs `-m runner.worker` inside.")
    health: HealthCheck | None = None
    env: dict[str, str] = Field(default_factory=dict)
    mounts: list[Mount] = Field(default_factory=list)
    port: int = Field(8000, description="The port a server listens on inside the container.")
    entrypoint: list[str] | None = Field(
        None, description="Overrides the image's entrypoint; a server gets `--model /model` and serve.args after it.")

    def definition_hash(self) -> str:
        """Hash of what makes the (derived) image: image and setup."""
        payload = json.dumps({"image": self.image, "setup": self.setup.model_dump()}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


def load_container(name: str) -> ContainerPlugin:
    from runner.errors import Problem, RecipeError
    from runner.recipe.loader import load_yaml_model

    path = available_containers().get(name)
    if path is None:
        raise RecipeError([Problem(f"no container plugin named {name!r}",
                                   hint=f"known: {', '.join(available_containers())}")])
    plugin = load_yaml_model(path, ContainerPlugin)
    if plugin.name != name:
        raise RecipeError([Problem(f"plugin file {path.name} declares name {plugin.name!r}; they must match")])
    if plugin.runtime == "docker" and not plugin.image:
        raise RecipeError([Problem(f"container {name!r} runs on docker but names no image", ("image",))])
    return plugin
