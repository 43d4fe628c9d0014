"""Which source files execute each step kind: their hash is part of the step's cache key.

STEP_ENTRIES names each kind's own modules (its host step module and its worker module);
`code_files` adds every runner module they import, directly or not (function-level imports
included), except the FRAMEWORK modules, whose changes do not change a step's result (the recipe
schema and step inputs already reach the key as the input itself). So editing a helper a step uses
re-runs that step, without a hand-kept list to forget it in.
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

RUNNER_DIR = Path(__file__).resolve().parent.parent

STEP_ENTRIES: dict[str, tuple[str, ...]] = {
    "source": ("steps/model_source.py", "worker/convert_gguf.py"),
    "calibrate": ("steps/calibrate.py",),
    "quantize": ("steps/worker_steps.py", "worker/quantize.py"),
    "export": ("steps/export.py",),
    "verify": ("steps/worker_steps.py", "worker/verify.py", "vllm_env/load_check.py"),
    "serve": ("steps/serve_bench.py", "worker/local_server.py"),
    "benchmark": ("steps/serve_bench.py", "worker/local_server.py"),
    "gates": ("steps/serve_bench.py",),
    "report": ("steps/report_publish.py",),
    "publish": ("steps/report_publish.py",),
}

# Plumbing and the recipe's own shape: what a step reads of them is its input, hashed as such.
FRAMEWORK = frozenset({
    "errors.py", "run_dir.py", "plan.py", "scheduler.py", "cli.py", "processes.py",
    "recipe/__init__.py", "recipe/schema.py", "recipe/schema_base.py", "recipe/schema_walk.py",
    "recipe/loader.py", "recipe/yaml_tree.py", "recipe/resources.py",
    "steps/__init__.py", "steps/base.py", "steps/code.py", "steps/inputs.py",
    "executors/__init__.py", "executors/base.py",
})


@cache
def imported_modules(relative: str, root: Path = RUNNER_DIR) -> frozenset[str]:
    """The runner source files (relative to root) one file imports, anywhere in it."""
    found = set()
    for node in ast.walk(ast.parse((root / relative).read_text(encoding="utf-8"))):
        if not (isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("runner")):
            continue
        for name in (node.module, *(f"{node.module}.{alias.name}" for alias in node.names)):
            path = name.removeprefix("runner").lstrip(".").replace(".", "/")
            for candidate in (f"{path}.py", f"{path}/__init__.py"):
                if path and (root / candidate).is_file():
                    found.add(candidate)
    return frozenset(found)


def code_files(kind: str, root: Path = RUNNER_DIR) -> list[str]:
    """A kind's entry modules and everything they import but the FRAMEWORK, sorted."""
    seen: set[str] = set()
    stack = list(STEP_ENTRIES.get(kind, ()))
    while stack:
        relative = stack.pop()
        if relative in seen or (relative in FRAMEWORK and relative not in STEP_ENTRIES.get(kind, ())):
            continue
        seen.add(relative)
        stack.extend(imported_modules(relative, root))
    return sorted(seen)
