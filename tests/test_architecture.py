"""The shape of the code: no runner module imports itself back (directly or through others), and each
folder imports only the folders below it (LAYERS)."""

from __future__ import annotations

import ast
from pathlib import Path

RUNNER = Path(__file__).resolve().parent.parent / "runner"


def imports() -> dict[str, set[str]]:
    """runner module -> the runner modules it imports anywhere (function level and TYPE_CHECKING too)."""
    found: dict[str, set[str]] = {}
    for path in RUNNER.rglob("*.py"):
        name = ".".join(path.relative_to(RUNNER.parent).with_suffix("").parts).removesuffix(".__init__")
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module:
                names |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
            elif isinstance(node, ast.Import):
                names |= {alias.name for alias in node.names}
        found[name] = {n for n in names if n.startswith("runner")}
    return {m: {d for d in deps if d in found and d != m} for m, deps in found.items()}


def test_no_import_cycles():
    graph = imports()
    state: dict[str, str] = {}
    cycles = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for dep in sorted(graph[module]):
            if state.get(dep) == "open":
                cycles.append(" -> ".join([*path[path.index(dep):], dep]))
            elif dep not in state:
                visit(dep, [*path, dep])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, cycles


def test_the_import_graph_is_read_right():
    graph = imports()
    assert "runner.steps.inputs" in graph["runner.plan"] and "runner.recipe.schema" in graph["runner.steps.inputs"]


# --- layering -----------------------------------------------------------------------------------
#
# Each folder of runner/ (and each top-level module, by its name; `runner` is the package's
# __init__) may import only the folders listed for it. Function-level imports count. Three rules
# hold it together:
#
# - the worker (torch) imports from the host side only `worker_contract` (the files it exchanges
#   with the executor) and `quantization`. runner/quantization is torch-free arithmetic that both sides
#   must compute identically (formats, bits, the exclusion matcher, ModelOpt's configs read as data):
#   shared code, not a copy per side, so it sits below both and imports none of them;
# - recipe/ (what a recipe says) imports nothing above it: only errors and quantization (the preset
#   names and ModelOpt recipe names it validates against);
# - quantization/ imports no other folder: not recipe/ (errors are located in the recipe by
#   runner/plan_checks.py) and not benchmark/ (the footprint's decode speed takes the hardware as a
#   value, quantization.decode.Hardware, which the host reads from the hardware table).
#
# EXCEPTIONS lists, module by module, the imports that break these rules today, each with why it
# stays for now. Remove an entry when its import goes; the test fails on one that no longer exists.
LAYERS: dict[str, set[str]] = {
    "worker_contract": set(),
    "errors": set(),
    "quantization": set(),
    "worker": {"quantization", "worker_contract"},
    "recipe": {"errors", "quantization"},
    "processes": {"errors"},
    "runner": set(),
    "run_dir": {"errors", "runner"},
    "containers": {"errors", "recipe"},
    "vllm_env": {"errors", "processes", "recipe"},
    # benchmark.suites reads the held-out teacher split (calibration.prompts), calibration.overlap
    # compares against the suites: the two folders use each other (no module cycle)
    "calibration": {"benchmark", "errors", "recipe", "run_dir"},
    "benchmark": {"calibration", "errors", "quantization", "recipe"},
    "steps": {"benchmark", "calibration", "containers", "errors", "processes", "quantization", "recipe",
              "run_dir", "search", "serving", "vllm_env"},
    "serving": {"benchmark", "containers", "errors", "processes", "quantization", "recipe", "run_dir", "steps",
                "vllm_env"},
    "executors": {"containers", "errors", "processes", "recipe", "run_dir", "steps", "worker_contract"},
    "plan": {"benchmark", "errors", "recipe", "runner", "serving", "steps", "vllm_env"},
    "gpu_pool": set(),
    "scheduler": {"containers", "errors", "executors", "gpu_pool", "plan", "run_dir", "steps", "worker_contract"},
    "plan_checks": {"containers", "errors", "quantization", "recipe", "serving", "steps"},
    "plan_table": {"quantization"},
    "wall_time": {"benchmark", "errors", "gpu_pool", "plan", "quantization", "recipe", "scheduler", "steps"},
    "catalogue": {"benchmark", "errors", "quantization", "recipe"},
    "init_recipe": {"errors"},
    "testing": set(),  # fakes for the tests (a Hub, an OpenAI-style server): standalone
    # The search drives the scheduler round by round and judges with the gates; the report step renders its
    # record (search.report, which imports no other folder).
    "search": {"benchmark", "errors", "plan", "quantization", "recipe", "run_dir", "scheduler", "steps"},
    "cli": {"benchmark", "calibration", "catalogue", "containers", "errors", "executors", "init_recipe", "plan",
            "plan_checks", "plan_table", "processes", "quantization", "recipe", "run_dir", "runner", "scheduler",
            "search", "serving", "steps", "vllm_env", "wall_time"},
}

EXCEPTIONS: dict[tuple[str, str], str] = {
    # The quantize worker validates its params with the planner's own models (QuantizeInput, Strategy,
    # AutoQuantizeSpec). Moving them into worker_contract waits for the one-module-per-step-kind split
    # (issue 26 item 3), which owns runner/steps/inputs.py; a copy in the contract would be a second
    # definition of the strategy.
    ("runner.worker.quantize", "runner.recipe.schema"): "QuantizeInput's Strategy/AutoQuantizeSpec",
    ("runner.worker.quantize", "runner.steps.inputs"): "QuantizeInput validates the spec's params",
    # The score worker is the quantize worker's scoring half, under the same rule (ScoreInput, AutoQuantizeSpec).
    ("runner.worker.score", "runner.recipe.schema"): "AutoQuantizeSpec for the shared scoring",
    ("runner.worker.score", "runner.steps.inputs"): "ScoreInput validates the spec's params",
    # Leaf modules (pure Python, no runner imports) the worker shares with the host: the bootstrap of
    # the fidelity interval, and the tool-call parser the local engine and the scorer must read alike.
    ("runner.worker.fidelity", "runner.benchmark.stats"): "bootstrap_weighted_mean, shared with the gates",
    ("runner.worker.local_server", "runner.benchmark.tool_calls"): "one tool-call parser for engine and scorer",
    # Checks run while the recipe loads (function-level): BFCL categories, and the local engine's
    # tool-call parser in serve.args (the engine registry in runner/serving/ is meant to own the latter).
    ("runner.recipe.loader", "runner.benchmark.bfcl"): "BFCL categories checked at load",
    ("runner.recipe.schema", "runner.benchmark.tool_calls"): "the local engine's parsers checked at load",
    # serve.engine is checked against the engine registry while the recipe loads (issue 26: "validated
    # against the registry"): the registry's names and flags, read at function level from the one place
    # that registers engines, instead of a second list of names in the schema.
    ("runner.recipe.schema", "runner.serving.engine"): "serve.engine checked against the registry at load",
}


def unit(module: str) -> str:
    """The layer a module belongs to: its folder under runner/, or a top-level module's own name."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "runner"


def test_every_folder_and_top_level_module_has_a_row():
    units = {unit(m) for m in imports()}
    assert units <= set(LAYERS), f"add a row to LAYERS for: {sorted(units - set(LAYERS))}"


def test_imports_follow_the_layers():
    graph = imports()
    wrong = []
    for module, deps in graph.items():
        for dep in deps:
            a, b = unit(module), unit(dep)
            if a != b and b not in LAYERS.get(a, set()) and (module, dep) not in EXCEPTIONS:
                wrong.append(f"{module} -> {dep} ({a} may import {sorted(LAYERS.get(a, set()))})")
    assert not wrong, "\n".join(wrong)


def test_every_exception_is_still_needed():
    graph = imports()
    stale = [f"{a} -> {b}" for a, b in EXCEPTIONS if b not in graph.get(a, set())]
    assert not stale, f"these imports are gone: remove them from EXCEPTIONS: {stale}"


def test_the_worker_and_quantization_never_import_torch_on_the_host_side():
    """runner/quantization and worker_contract are read by the host: no torch, at any level."""
    for path in [*(RUNNER / "quantization").rglob("*.py"), RUNNER / "worker_contract.py"]:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = ([node.module or ""] if isinstance(node, ast.ImportFrom)
                     else [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            assert not any(n.split(".")[0] in ("torch", "transformers", "modelopt") for n in names), path


# --- docs/architecture.md -------------------------------------------------------------------------


def test_the_architecture_page_names_every_module_and_only_real_ones():
    """Every module of runner/ is named on the page (by path, or by file name in a row that names its
    folder's path), and every runner/ path it names exists: the page cannot drift from the code."""
    import re

    page = (RUNNER.parent / "docs" / "architecture.md").read_text(encoding="utf-8")
    named = {p for p in re.findall(r"runner/[\w/]+(?:\.py)?", page) if "NAME" not in p}  # NAME: a placeholder
    missing_paths = sorted(p for p in named if not (RUNNER.parent / p).exists())
    assert not missing_paths, f"docs/architecture.md names paths that do not exist: {missing_paths}"
    rows = page.splitlines()
    unnamed = []
    for path in sorted(RUNNER.rglob("*.py")):
        relative = path.relative_to(RUNNER.parent).as_posix()
        if path.name == "__init__.py" or relative in page:
            continue
        folder = path.parent.relative_to(RUNNER.parent).as_posix() + "/"
        if not any(f"`{path.name}`" in row and folder in row for row in rows):
            unnamed.append(relative)
    assert not unnamed, f"add these modules to docs/architecture.md: {unnamed}"
