"""Which source files execute each step kind: their hash is part of the step's cache key.

Each kind names its own modules (StepKind.modules: its step module and its worker module);
`code_files` adds every runner module they import, directly or not (function-level imports
included), except the FRAMEWORK modules, whose changes do not change a step's result (the recipe
schema and step inputs already reach the key as the input itself), and the PRESENTATION modules,
which only lay out what a result says (tables, plots, card words): editing a plot's colour re-renders,
it does not re-serve a candidate. So editing a helper a step uses re-runs that step, without a
hand-kept list to forget it in; a kind whose output is presentation names those modules itself.
"""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

RUNNER_DIR = Path(__file__).resolve().parent.parent

# Plumbing and the recipe's own shape: what a step reads of them is its input, hashed as such.
FRAMEWORK = frozenset({
    "errors.py", "run_dir.py", "plan.py", "scheduler.py", "cli.py", "processes.py",
    "recipe/__init__.py", "recipe/schema.py", "recipe/schema_base.py", "recipe/schema_walk.py",
    "recipe/loader.py", "recipe/yaml_tree.py", "recipe/resources.py",
    "steps/__init__.py", "steps/base.py", "steps/code.py", "steps/inputs.py", "steps/ids.py",
    "executors/__init__.py", "executors/base.py",
})


# What only lays results out. A kind whose output they make lists them in its own StepKind.modules.
PRESENTATION = frozenset({
    "benchmark/presentation.py",  # the gate tables and plots
    "quantization/export_words.py",  # a format's name, tags and description on the card
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
    """A kind's own modules and everything they import but plumbing and presentation, sorted."""
    from runner.steps.registry import step_kinds

    own = step_kinds()[kind].modules if kind in step_kinds() else ()
    seen: set[str] = set()
    stack = list(own)
    while stack:
        relative = stack.pop()
        if relative in seen or (relative in FRAMEWORK | PRESENTATION and relative not in own):
            continue
        seen.add(relative)
        stack.extend(imported_modules(relative, root))
    return sorted(seen)
