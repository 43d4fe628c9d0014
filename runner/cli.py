"""The `recipe` command line: validate, plan, run, list, schema."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import signal
import sys
import tempfile
from collections import Counter
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from runner.errors import RecipeError, RunnerError
from runner.steps import ids

# soft_wrap: long paths and messages stay on one line, so logs and pipes read (and grep) whole.
console = Console(stderr=True, highlight=False, soft_wrap=True)
out = Console(highlight=False, soft_wrap=True)

EXIT_INVALID = 2


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return EXIT_INVALID
    try:
        return args.func(args)
    except RecipeError as exc:
        console.print(f"[bold red]invalid recipe[/] ({len(exc.problems)} problem"
                      f"{'s' if len(exc.problems) != 1 else ''}):")
        for problem in exc.problems:
            console.print(f"  {problem}", markup=False)
        return EXIT_INVALID
    except RunnerError as exc:
        console.print(f"[bold red]error:[/] {escape(str(exc))}")
        return 1
    except OSError as exc:  # a read-only or full disk, a missing folder: the path and the cause, no traceback
        from runner.run_dir import disk_error

        clear = disk_error(Path(exc.filename), exc) if exc.filename else exc
        text = str(clear) if isinstance(clear, RunnerError) else (
            f"{exc.strerror or type(exc).__name__}: {exc.filename}" if exc.filename else f"{type(exc).__name__}: {exc}")
        console.print(f"[bold red]error:[/] {escape(text)}")
        return 1
    except ExceptionGroup as group:  # each real cause on its own line, never "unhandled errors in a TaskGroup"
        from runner.errors import causes

        for line in causes(group):
            console.print(f"[bold red]error:[/] {escape(line)}")
        return 1


@contextlib.contextmanager
def _gc_paused():
    """Load a recipe and build its plan without the cyclic garbage collector.

    A recipe with 10,000 strategies is a few hundred thousand small objects and no cycles; Python's
    full collections, triggered by the allocations, walked them again and again (half of the time
    of `plan` at that size). Afterwards they are frozen out of later collections, which the
    long-lived plan of `recipe run` would otherwise pay for during the whole run.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if was_enabled:
            gc.enable()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="recipe", description=__doc__)
    sub = parser.add_subparsers(dest="command")

    p = sub.add_parser("validate", help="check recipes; nothing runs")
    p.add_argument("recipes", nargs="+", type=Path)
    p.add_argument("--schema-only", action="store_true",
                   help="check the recipe alone, not what it needs from this machine (its model and calibration "
                   "files, the publish token, the serve flags against the installed vLLM)")
    p.add_argument("--strict", action="store_true",
                   help="the local inputs this machine lacks (model folder, calibration and prompt files, the "
                   "publish token) are errors, not warnings: for CI on the machine that will run the recipe")
    p.set_defaults(func=cmd_validate)

    p = sub.add_parser("plan", help="show the step graph with each step's executor and cache state")
    _plan_arguments(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--hardware", default=None, help="the machine the steps run on, for the wall-time prediction "
                   "(recipes/hardware/targets.yaml; default: execution.hardware, else benchmark.hardware)")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("run", help="run the recipe's steps; completed steps are reused")
    _plan_arguments(p)
    p.add_argument("--only", action="append", default=[], metavar="STEP",
                   help="run only these steps (id, kind or glob; repeatable)")
    p.add_argument("--from", dest="from_steps", action="append", default=[], metavar="STEP",
                   help="re-run these steps and everything after them")
    p.add_argument("--until", action="append", default=[], metavar="STEP",
                   help="stop after these steps (and what they need)")
    p.add_argument("--force", action="store_true", help="re-run the selected steps even if current")
    p.add_argument("--fail-fast", action="store_true",
                   help="stop starting new steps at the first failure (default: a failure stops only its "
                        "strategy's branch; the others, gates, report and publish still run; exit 1)")
    p.add_argument("--dry-run", action="store_true", help="say what would run; run nothing")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("card", help="re-render the model card, blog post and research section of a finished run")
    p.add_argument("run_dir", type=Path)
    p.set_defaults(func=cmd_card)

    p = sub.add_parser("clean", help="remove containers left behind by crashed runs, and scratch folders")
    p.add_argument("--run-dir", type=Path, help="only this run's containers and scratch (default: every run's)")
    p.set_defaults(func=cmd_clean)

    p = sub.add_parser("init", help="write a starter recipe for a model (a folder, a config.json or a Hub id): "
                       "family base, last_layer, predicted size and speed of each strategy")
    p.add_argument("model", help="a model folder, its config.json, or owner/name on the Hugging Face Hub")
    p.add_argument("-o", "--output", type=Path, help="the recipe file to write (default: NAME.yaml here)")
    p.add_argument("--name", help="the recipe's name (default: from the model's)")
    p.add_argument("--hardware", default="dgx-spark-gb10", help="the target the predictions are for "
                   "(recipes/hardware/targets.yaml; default dgx-spark-gb10)")
    p.add_argument("--force", action="store_true", help="overwrite the recipe file (and its .shapes folder)")
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("list", help="the shipped recipes, each strategy's predicted size and GB10 decode speed")
    p.add_argument("--markdown", action="store_true", help="the catalogue page (docs/recipes.md) instead")
    p.add_argument("-o", "--output", type=Path, help="write to this file")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("schema", help="JSON Schema of recipe files (for editor validation)")
    p.add_argument("--markdown", action="store_true", help="the recipe reference as markdown instead")
    p.add_argument("-o", "--output", type=Path, help="write to this file")
    p.set_defaults(func=cmd_schema)
    return parser


def _plan_arguments(p: argparse.ArgumentParser) -> None:
    """What `plan` and `run` share: the recipe and the choices that shape its step graph."""
    p.add_argument("recipe", type=Path)
    p.add_argument("--strategy", action="append", default=[], help="only this strategy's branch (repeatable)")
    p.add_argument("--executor", choices=["local", "docker", "slurm"], help="overrides execution.executor")
    p.add_argument("--run-dir", type=Path, help="overrides execution.run_dir (default ./runs/NAME)")


def cmd_validate(args: argparse.Namespace) -> int:
    from runner.recipe.loader import input_problems, load_recipe

    failed = 0
    for path in args.recipes:
        problems = []
        try:
            with _gc_paused():
                loaded = load_recipe(path)
        except RecipeError as exc:
            # every problem of the file at once: what the schema refused, and what the rest (without
            # the refused keys) still shows; a file that does not get that far has only the first
            problems = list(exc.problems)
            loaded = getattr(exc, "partial", None)
        footprints, vllm_line, missing, unmatched = [], "", [], []
        if loaded is not None:
            from runner.steps.registry import slurm_step_problems

            more, footprints, unmatched = _model_problems(loaded, path)
            more = slurm_step_problems(loaded) + more
            # What this machine lacks (a model folder, a calibration file, the token) says nothing about
            # whether the recipe is valid: a warning, an error with --strict; `run` and `plan` refuse it.
            missing = [] if args.schema_only else input_problems(loaded)
            problems += (missing + more) if args.strict else more
            if args.strict:
                missing = []
            if not args.schema_only:
                from runner.serving import engine_for
                from runner.vllm_env.environment import serve_args_problems

                refused, vllm_line = serve_args_problems(loaded, engine_for(loaded.recipe.serve.engine).runs_vllm)
                problems += refused
        if problems:
            failed += 1
            console.print(f"[bold red]✗ {path}[/] ({len(problems)} problem{'s' if len(problems) != 1 else ''})")
            for problem in problems:
                console.print(f"  {problem}", markup=False)
            _print_missing(path, missing)
            continue
        recipe = loaded.recipe
        names = ", ".join(s.name for s in recipe.enabled_strategies())
        out.print(f"[green]✓[/] {path}: {recipe.name} ({len(loaded.files)} file"
                  f"{'s' if len(loaded.files) != 1 else ''}; strategies: {names})")
        for fp in footprints:
            if fp.auto is not None:
                out.print(f"  {fp.strategy}: effective_bits {fp.auto.target:g} is reachable "
                          f"({fp.auto.modelopt_min:.4f} to {fp.auto.modelopt_max:.4f} as auto_quantize counts; "
                          f"{fp.auto.min_bits:.2f} to {fp.auto.max_bits:.2f} in this project's effective bits)")
        if recipe.search is not None:
            for line in _search_lines(recipe, _shapes_of(recipe)):
                out.print(f"  {line}", markup=False)
        if vllm_line:
            out.print(f"  {escape(vllm_line)}")
        for line in unmatched:
            console.print(f"[yellow]![/] {escape(str(path))}: warning: {escape(line)}")
        _print_missing(path, missing)
        _print_overlap_warnings(path, recipe)
        _print_power(path, recipe, lines=False)
        if (missing := _bfcl_missing(recipe)) is not None:
            console.print(f"[yellow]![/] {escape(str(path))}: warning: its BFCL suite cannot run here: "
                          f"{escape(missing)}")
    return EXIT_INVALID if failed else 0


def _print_missing(path: Path, missing: list) -> None:
    """validate's warnings for the inputs this machine lacks (the recipe is valid without them)."""
    for problem in missing:
        console.print(f"[yellow]![/] {escape(str(path))}: warning: not on this machine (`recipe run` and `recipe plan` "
                      "refuse it; `validate --strict` makes it an error):")
        console.print(f"  {problem}", markup=False)


def _refuse_missing(problems: list, command: str) -> int:
    """`plan` and `run` before any work: each input this machine lacks, with its file, key and fix."""
    n = len(problems)
    console.print(f"[bold red]recipe {command} refused[/]: {n} input{'s' if n != 1 else ''} the recipe names "
                  f"{'are' if n != 1 else 'is'} not on this machine (the recipe itself may be valid: "
                  "`recipe validate` says so); nothing was run or written:")
    for problem in problems:
        console.print(f"  {problem}", markup=False)
    return EXIT_INVALID


def _model_problems(loaded, path: Path) -> tuple[list, list, list[str]]:
    """auto_quantize feasibility and what each strategy does to this model (pre-flight), from its
    headers, when the model is already on disk or its shapes are named; the footprints; and a warning
    per exclusion pattern that names nothing in the model."""
    from runner.benchmark.prediction import hardware_target
    from runner.plan_checks import feasibility_problems, recipe_problems, unmatched_exclusions
    from runner.quantization import Unknown, footprint
    from runner.quantization.weights import load_weights

    recipe = loaded.recipe
    folder, _ = footprint.model_folder(recipe)
    footprints, weights = [], None
    if folder is None:
        return [], [], []
    try:
        weights = load_weights(folder)  # the headers, read once for every strategy
        footprints = footprint.recipe_footprints(recipe, weights, hardware_target(recipe.benchmark.hardware))
    except (Unknown, OSError, ValueError) as exc:
        console.print(f"[yellow]![/] {path}: footprint not checked: {escape(str(exc))}")
    unmatched = unmatched_exclusions(recipe, weights) if weights is not None else []
    return feasibility_problems(loaded, footprints) + recipe_problems(loaded, folder, weights), footprints, unmatched


def _print_overlap_warnings(path: Path, recipe) -> None:
    """Calibration prompts that duplicate the suites' prompts (runner/calibration/overlap.py): a warning."""
    from runner.calibration.overlap import overlap_warnings

    for i, line in enumerate(overlap_warnings(recipe)):
        console.print(f"[yellow]![/] {escape(str(path))}: warning: {escape(line)}" if i == 0 or not line.startswith(" ")
                      else escape(line))


def _bfcl_missing(recipe) -> str | None:
    """Why a recipe's BFCL suites cannot be asked on this machine (bfcl-eval missing), or None."""
    if not any(ref.bfcl for ref in recipe.benchmark.suites):
        return None
    from runner.benchmark.bfcl import unavailable

    return unavailable()


def _print_vllm_loader(plan) -> None:
    """Which vLLM loads each export in verify (runner/vllm_env), or why none will."""
    verify = next((step.inputs for sid, step in plan.steps.items() if sid.startswith("verify.")), None)
    if verify is None:
        return
    if verify.vllm is not None:
        out.print(f"verify: each export is loaded by {escape(verify.vllm.describe())} (vLLM's own loader, on CPU)")
    else:
        out.print(f"verify: vLLM's own loader check will not run: {escape(verify.vllm_not_run)}")


def _print_power(path: Path, recipe, lines: bool) -> None:
    """What each suite gate can decide at its suite's size (runner/benchmark/power.py): a line per gate
    (`plan`), a warning per gate that cannot decide (`plan` and `validate`)."""
    from runner.benchmark.power import POWER, recipe_power

    powers = recipe_power(recipe)
    if lines and powers:
        out.print(f"gate power (the smallest drop each gate fails with {POWER:.0%} probability, at its suite's "
                  "size and the stated baseline rate):", markup=False)
        for power in powers:
            out.print(f"  {power.describe()}", markup=False)
    for power in powers:
        if (warning := power.warning()) is not None:
            console.print(f"[yellow]![/] {escape(str(path))}: warning: {escape(warning)}")


def _overlap_json(recipe) -> dict[str, list[str]]:
    """{calibration set key: its prompts that overlap the suites} for `plan --json` (only sets that do)."""
    from runner.calibration.overlap import recipe_overlaps

    return {key: [o.describe() for o in found] for key, found in recipe_overlaps(recipe).items() if found}


def _load_plan(args: argparse.Namespace):
    from runner.plan import build_plan, with_rivals
    from runner.recipe.loader import load_recipe
    from runner.run_dir import RunDir

    with _gc_paused():
        loaded = load_recipe(args.recipe)
        recipe = loaded.recipe
        if args.executor:
            recipe.execution.executor = args.executor
        plan = build_plan(recipe, args.strategy or None)
    root = args.run_dir or recipe.execution.run_dir or Path("runs") / recipe.name
    run_dir = RunDir(Path(root))
    # --strategy limits what runs, not what competes: gates judges the others' current benchmarks too
    return loaded, with_rivals(plan, run_dir.is_complete), run_dir


def _where(plan, step, kinds) -> str:
    from runner.serving.engine import engine_for

    kind = kinds[step.kind]
    if kind.container_role is None or (step.kind == "source" and plan.recipe.model.source.kind != "gguf"):
        return "host"  # a local folder is used as is and a Hub download runs here: only GGUF needs the worker
    if kind.container_role == "serve":
        return engine_for(plan.recipe.serve.engine).where(plan.recipe)
    execution = plan.recipe.execution
    if execution.executor == "local":
        return "local worker"
    if execution.executor == "slurm":
        resources = execution.slurm.resources_for(step.kind, kind.slurm)
        return (f"slurm job ({resources.partition or 'default partition'}"
                + (f", {resources.gpus} GPU" if resources.gpus else "") + ")")
    return f"container {plan.recipe.container_for(kind.container_role)}"


def cmd_plan(args: argparse.Namespace) -> int:
    from runner.benchmark.power import recipe_power
    from runner.recipe.loader import missing_input_problems
    from runner.steps.registry import step_kinds

    loaded, plan, run_dir = _load_plan(args)
    if missing := missing_input_problems(loaded):
        return _refuse_missing(missing, "plan")
    kinds = step_kinds()
    rows = []
    for sid, step in plan.steps.items():
        record = run_dir.record(sid)
        if kinds[step.kind].run is None:
            state = "not built"
        elif record and record.get("status") == "complete" and record.get("key") == plan.keys[sid]:
            state = "current"
        elif record:
            state = "stale"
        else:
            state = "to run"
        rows.append({"step": sid, "kind": step.kind, "needs": list(step.deps), "runs_in": _where(plan, step, kinds),
                     "state": state, "key": plan.keys[sid]})
    # What each strategy will weigh, from the model's headers (no torch), before anything runs.
    from runner.benchmark.prediction import hardware_target
    from runner.plan_checks import feasibility_problems, recipe_problems
    from runner.plan_table import footprint_table
    from runner.quantization import Unknown, footprint
    from runner.quantization.bits import DEFINITION, MODELOPT_DEFINITION
    from runner.quantization.weights import load_weights

    recipe = plan.recipe
    folder, read_from = footprint.model_folder(recipe, run_dir, plan.keys[ids.SOURCE])
    names = [s.name for s in recipe.quantization.strategies if ids.quantize(s.name) in plan.steps]
    footprints, problems, source, weights = [], [], None, None
    if folder is not None:
        try:
            weights = load_weights(folder)  # the headers, read once for every strategy
            hardware = hardware_target(recipe.benchmark.hardware)
            footprints = footprint.recipe_footprints(recipe, weights, hardware, names)
            source = footprint.source_footprint(recipe, weights, hardware)
        except (Unknown, OSError, ValueError) as exc:
            read_from = f"footprint: unknown ({exc})"
        problems = feasibility_problems(loaded, footprints) + recipe_problems(loaded, folder, weights)
    wall = _wall_time(plan, run_dir, weights, footprints,
                      args.hardware or recipe.execution.hardware or recipe.benchmark.hardware)
    for row in rows:
        record = run_dir.record(row["step"]) if row["state"] == "current" else None
        row["predicted_s"] = None if wall is None else wall.steps[row["step"]].to_json()["seconds"]
        row["measured_s"] = record.get("duration_s") if record else None
    if args.json:
        out.print_json(json.dumps({
            "recipe": recipe.name, "run_dir": str(run_dir.root), "steps": rows,
            "footprint": {fp.strategy: fp.to_json() for fp in footprints},
            "wall_time": wall.to_json() if wall is not None else None,
            "footprint_info": {"read_from": read_from, "hardware": recipe.benchmark.hardware,
                               "effective_bits": DEFINITION, "auto_quantize_effective_bits": MODELOPT_DEFINITION,
                               "source": source.to_json() if source else None},
            "problems": [str(p) for p in problems], "warnings": _overlap_json(recipe),
            "power": [p.to_json() for p in recipe_power(recipe)]}))
        return EXIT_INVALID if problems else 0
    table = Table(title=f"{recipe.name}: {len(rows)} steps, run dir {run_dir.root}")
    colors = {"current": "green", "to run": "cyan", "stale": "yellow", "not built": "red"}
    if len(rows) <= STEP_TABLE_ROWS:
        from runner.wall_time import describe

        for col in ("step", "needs", "runs in", "cache", "predicted", "took"):
            table.add_column(col)
        for row in rows:
            table.add_row(row["step"], ", ".join(row["needs"]), row["runs_in"],
                          f"[{colors[row['state']]}]{row['state']}[/]",
                          describe(row["predicted_s"]) if wall is not None else "-",
                          describe(row["measured_s"]) if row["measured_s"] is not None else "")
    else:  # thousands of rows help nobody (and take rich seconds to lay out): one row per kind of step
        for col in ("steps", "kind", "runs in", "cache"):
            table.add_column(col)
        groups = Counter((row["kind"], row["runs_in"], row["state"]) for row in rows)
        for (kind, runs_in, state), count in groups.items():
            table.add_row(str(count), kind, runs_in, f"[{colors[state]}]{state}[/]")
        table.caption = "`recipe plan --json` lists every step"
    out.print(table)
    if folder is None or source is None:
        out.print(escape(read_from))
    else:
        out.print(footprint_table([source, *footprints], f"predicted footprint on {recipe.benchmark.hardware}, "
                                                         f"read from {escape(read_from)}"))
        out.print(f"effective bits: {DEFINITION}.", markup=False)
        if any(fp.auto is not None for fp in footprints):
            out.print(f"auto_quantize targets are checked as {MODELOPT_DEFINITION}.", markup=False)
    if wall is not None:
        for line in _wall_time_lines(wall):
            out.print(line, markup=False)
    if recipe.search is not None:
        for line in _search_lines(recipe, weights):
            out.print(line, markup=False)
    _print_overlap_warnings(args.recipe, recipe)
    _print_power(args.recipe, recipe, lines=True)
    _print_vllm_loader(plan)
    if problems:
        console.print(f"[bold red]invalid recipe[/] ({len(problems)} problem{'s' if len(problems) != 1 else ''}):")
        for problem in problems:
            console.print(f"  {problem}", markup=False)
        return EXIT_INVALID
    return 0


def _wall_time(plan, run_dir, weights, footprints, hardware: str):
    """The wall-time prediction for this plan on `hardware` (runner/wall_time.py), None without the model's
    headers; a finished calibrate step's measured teacher rate and finished exports' sizes take the place of
    what is assumed."""
    if weights is None:
        return None
    from runner import wall_time
    from runner.steps import ids

    teacher = None
    record = run_dir.record(ids.CALIBRATE)
    if record and record.get("status") == "complete" and record.get("duration_s"):
        lengths = (record.get("summary") or {}).get("token_lengths") or {}
        conversations = (record.get("summary") or {}).get("generated") or 0
        if lengths.get("median") and conversations:
            teacher = conversations * float(lengths["median"]) / float(record["duration_s"])
    sizes = {}
    for strategy in {step.strategy for step in plan.steps.values() if step.kind == "quantize"}:
        done = run_dir.record(ids.quantize(strategy))
        if done and done.get("status") == "complete" and (done.get("summary") or {}).get("checkpoint_bytes"):
            sizes[strategy] = int(done["summary"]["checkpoint_bytes"])
    return wall_time.predict(plan, weights, wall_time.machine(hardware), {fp.strategy: fp for fp in footprints},
                             measured_teacher_tok_s=teacher, checkpoint_bytes=sizes)


def _predicted_seconds(plan, run_dir) -> tuple[dict[str, float], dict[str, int]]:
    """Each step's predicted seconds on the recipe's hardware, which the run's records keep beside the
    measured time, and each GPU step's predicted memory (the scheduler shares GPUs by it); empty when the
    model's headers cannot be read yet (a Hub model before its download)."""
    from runner.benchmark.prediction import hardware_target
    from runner.quantization import Unknown, footprint
    from runner.quantization.weights import load_weights
    from runner.steps import ids

    recipe = plan.recipe
    folder, _ = footprint.model_folder(recipe, run_dir, plan.keys[ids.SOURCE])
    if folder is None:
        return {}, {}
    try:
        weights = load_weights(folder)
        names = [s.name for s in recipe.quantization.strategies if ids.quantize(s.name) in plan.steps]
        footprints = footprint.recipe_footprints(recipe, weights, hardware_target(recipe.benchmark.hardware), names)
        wall = _wall_time(plan, run_dir, weights, footprints, recipe.execution.hardware or recipe.benchmark.hardware)
    except (Unknown, OSError, ValueError, RunnerError):
        return {}, {}
    if wall is None:
        return {}, {}
    return {sid: t.seconds for sid, t in wall.steps.items() if t.seconds is not None}, wall.gpu_needs


def _wall_time_lines(wall) -> list[str]:
    from runner.wall_time import describe

    m = wall.machine
    lines = [f"predicted wall time on {m.name}: {describe(wall.total_s)} in all, the scheduler's order "
             f"({m.bf16_tflops:.0f} bf16 TFLOP/s at {m.calibration_efficiency:.0%} for calibration"
             f"{'' if m.efficiency_measured else ', efficiency assumed from the H100'}; runner/wall_time.py says "
             "what each rate assumes)"]
    if wall.unknown:
        lines.append(f"  not predicted: {', '.join(wall.unknown)}: " + "; ".join(
            wall.steps[s].basis for s in wall.unknown))
    for strategy, seconds in wall.per_strategy().items():
        quantize = wall.steps[f"quantize.{strategy}"]
        lines.append(f"  {strategy}: {describe(seconds)} (quantize {describe(quantize.seconds)}: {quantize.basis})")
    for sid, time in wall.steps.items():
        if sid.startswith("score."):
            lines.append(f"  {sid}: {describe(time.seconds)} ({time.basis})")
    return lines


def cmd_run(args: argparse.Namespace) -> int:
    from runner.executors import make_executor
    from runner.recipe.loader import missing_input_problems, token_problems
    from runner.scheduler import Runner, RunOptions

    loaded, plan, run_dir = _load_plan(args)
    if missing := missing_input_problems(loaded):  # before anything is written, a dry run included
        return _refuse_missing(missing, "run")
    execution = plan.recipe.execution
    executor = (make_executor(execution.executor, run_dir.root, execution.env, execution.hf_cache, execution.slurm)
                if not args.dry_run else make_executor("local", run_dir.root))
    runner = Runner(plan, run_dir, executor, console)
    runner.predicted, runner.gpu_needs = _predicted_seconds(plan, run_dir)
    options = RunOptions(only=args.only, from_steps=args.from_steps, until=args.until, force=args.force,
                         dry_run=args.dry_run, fail_fast=args.fail_fast)
    if args.dry_run:  # writes nothing: no claim, no lock
        outcome = asyncio.run(_run_cancellable(runner.run(options)))
        _print_outcome(outcome, run_dir.root)
        if plan.recipe.search is not None:
            console.print("the recipe's search adds its candidates as it runs (each round from the last one's "
                          "results), so they are not listed; `recipe plan` says how many at most")
        return outcome.exit_code
    # The token stops the run before anything is written, when publish will run.
    problems = [] if (args.until or args.only) else token_problems(loaded)
    if not (args.until or args.only):
        problems += _preflight(loaded, plan, run_dir)
    if problems:
        raise RecipeError(problems)
    run_dir.claim()
    previous = run_dir.run_status()  # before the lock: our own lock would read as a live holder
    with run_dir.locked():
        if previous and previous.get("status") == "died":
            console.print(f"[yellow]the previous run here died without a word[/] ({escape(previous['note'])}); "
                          "resuming at the first step it did not finish")
        _save_resolved_recipe(loaded, run_dir.root / "recipe.yaml")
        try:
            if plan.recipe.search is not None and not (args.until or args.only or args.strategy):
                searched = _search(plan.recipe, run_dir, executor)
                runner = Runner(searched, run_dir, executor, console)
                runner.predicted, runner.gpu_needs = _predicted_seconds(searched, run_dir)
            outcome = asyncio.run(_run_cancellable(runner.run(options)))
        finally:
            executor.cleanup()
    _print_outcome(outcome, run_dir.root)
    return outcome.exit_code


def _shapes_of(recipe):
    """The model's tensor headers where a local folder or the recipe's shapes name them, else None."""
    from runner.quantization import footprint
    from runner.quantization.weights import load_weights

    folder, _ = footprint.model_folder(recipe)
    try:
        return load_weights(folder) if folder is not None else None
    except (OSError, ValueError):
        return None


def _search_lines(recipe, weights) -> list[str]:
    """What `recipe plan` says of a search: the space's size, the procedure's bound, the budget, and the
    objective's predicted range from the first candidate to every family at its smallest format."""
    from runner.benchmark.prediction import hardware_target
    from runner.quantization import Unknown, footprint
    from runner.quantization.families import family_of
    from runner.search.driver import candidate_strategy
    from runner.search.procedure import Candidate, family_order, format_ladder, procedure_bound, space_size
    from runner.search.report import OBJECTIVE_KEYS, OBJECTIVE_WORDS

    spec = recipe.search
    space, budget = spec.space, spec.budget
    present = {f for m in weights.linears if (f := family_of(m))} if weights is not None else None
    families = family_order(space.formats, present)
    over = ", ".join(families) or "no family the model has"
    lines = [f"search ({spec.procedure}): objective {OBJECTIVE_WORDS[spec.objective][0]}; space of "
             f"{space_size(space, present)} layouts over {over}; the procedure quantizes at most "
             f"{procedure_bound(space, present)} of them, the budget {budget.candidates} (served: {budget.served}"
             + (f", {budget.gpu_hours} GPU hours" if budget.gpu_hours else "") + ")."]
    if weights is None or not families:
        return lines
    start = Candidate((), space.algorithms[0], space.kv_cache[0], space.keep_first[0], space.keep_last[0])
    first = start.with_format(families[0], format_ladder(space.formats[families[0]])[0])
    widest = start
    for family in families:
        widest = widest.with_format(family, format_ladder(space.formats[family])[0])
    hardware = hardware_target(recipe.benchmark.hardware)
    values = []
    for candidate in (first, widest):
        strategy = candidate_strategy(candidate, spec)
        try:
            fp = footprint.strategy_footprint(weights, strategy, recipe.quantization.exclusions(strategy), hardware,
                                              recipe.model.dtype, footprint.carry_patterns(recipe))
        except (Unknown, OSError, ValueError) as exc:
            return [*lines, f"  predicted objective: unknown ({exc})"]
        value = fp.to_json().get(OBJECTIVE_KEYS[spec.objective])
        values.append((strategy.name, f"{value / 1e9:.2f} GB" if value and spec.objective != "decode_tok_s"
                       else f"{value} tok/s"))
    lines.append("  predicted " + OBJECTIVE_WORDS[spec.objective][0] + ": from "
                 + " to ".join(f"{value} ({name})" for name, value in values)
                 + ": the first candidate, and every family at its smallest format")
    return lines


def _search(recipe, run_dir, executor):
    """Run the recipe's search (runner/search/driver.py) and return the plan whose gates judge the hand-written
    strategies and every served candidate, and whose card shows the search."""
    from runner.plan import build_plan
    from runner.search.driver import SearchDriver, write_record

    driver = SearchDriver(recipe, run_dir, executor, console)
    result = asyncio.run(_run_cancellable(driver.run()))
    folder = write_record(run_dir, result)
    best = result.best()
    console.print(f"search: {len(result.entries)} candidates in {result.rounds} rounds ({result.stopped_by}); "
                  + (f"best accepted [bold]{best.name}[/]" if best else "none accepted")
                  + f"; table, plot and strategy snippet in {escape(str(folder))}")
    return build_plan(driver.final_recipe(result), search=result.to_json())


def _preflight(loaded, plan, run_dir) -> list:
    """Every strategy whose quantize step will run, checked before the source step starts (issue 30):
    CUDA where its worker will have none, and, where the model's shapes are known, blocks that do not fit
    its layers or nothing quantized. Without shapes, the quantize step checks when it starts."""
    from runner.plan_checks import run_problems
    from runner.quantization import footprint

    bench = [sid for sid, step in plan.steps.items()
             if step.kind == "benchmark" and not run_dir.is_complete(sid, plan.keys[sid])]
    if bench and (missing := _bfcl_missing(plan.recipe)) is not None:
        # Refused now, not hours later when the first benchmark step starts
        from runner.errors import Problem
        from runner.recipe.loader import locate

        i = next(i for i, ref in enumerate(plan.recipe.benchmark.suites) if ref.bfcl)
        path = ("benchmark", "suites", i, "bfcl")
        return [Problem(f"a BFCL suite cannot run here: {missing}", path, locate(loaded.locations, path))]
    serves = [sid for sid, step in plan.steps.items()
              if step.kind == "serve" and not run_dir.is_complete(sid, plan.keys[sid])]
    if serves:
        from runner.serving import engine_for
        from runner.vllm_env.environment import serve_args_problems

        # a misspelt parser, refused before hours of quantizing
        refused, _ = serve_args_problems(loaded, engine_for(loaded.recipe.serve.engine).runs_vllm)
        if refused:
            return refused
    names = [s.name for s in plan.recipe.quantization.strategies
             if (sid := ids.quantize(s.name)) in plan.steps and not run_dir.is_complete(sid, plan.keys[sid])]
    if not names:
        return []
    folder, _ = footprint.model_folder(plan.recipe, run_dir, plan.keys[ids.SOURCE])
    return run_problems(loaded, names, folder)


async def _run_cancellable(coro):
    """Run the scheduler so that SIGINT, SIGTERM and SIGHUP (a closed terminal) cancel it cleanly
    (workers stopped, state saved)."""
    task = asyncio.ensure_future(coro)
    loop = asyncio.get_running_loop()
    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, task.cancel)
    try:
        return await task
    finally:
        for sig in STOP_SIGNALS:
            loop.remove_signal_handler(sig)


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def _save_resolved_recipe(loaded, path: Path) -> None:
    from runner.recipe.loader import recipe_to_yaml
    from runner.run_dir import write_json_atomic, write_text_atomic

    write_text_atomic(path, f"# resolved from {loaded.path} ({', '.join(str(f) for f in loaded.files)})\n"
                      + recipe_to_yaml(loaded.recipe))
    write_json_atomic(path.with_name("recipe.files.json"), [str(f) for f in loaded.files])


# Beyond this many steps, `plan` and `run` print a summary instead of a row per step.
STEP_TABLE_ROWS = 120


def _print_outcome(outcome, root: Path) -> None:
    colors = {"complete": "green", "current": "green", "failed": "red", "not built": "yellow",
              "blocked": "yellow", "interrupted": "red", "missing": "dim"}
    table = Table(title=f"run {outcome.status}: {root}")
    table.add_column("step")
    table.add_column("state")
    states = outcome.states
    if len(states) > STEP_TABLE_ROWS:  # the steps that went wrong, and a count of the rest
        settled = Counter(state for state in states.values()
                          if state not in ("failed", "blocked", "interrupted", "not built"))
        states = {sid: state for sid, state in states.items() if state not in settled}
        table.caption = ", ".join(f"{n} more {state}" for state, n in settled.items()) or None
    for sid, state in states.items():
        color = colors.get(state, "cyan")
        blocker = outcome.blocked_by.get(sid) if state == "blocked" else None
        shown = f"{state} ({escape(blocker)} failed)" if blocker else state
        table.add_row(sid, f"[{color}]{shown}[/]")
    console.print(table)
    comparison = root / "steps" / ids.GATES / "comparison.md"
    if outcome.states.get(ids.GATES) in ("complete", "current") and comparison.exists():
        console.print("\n" + comparison.read_text(encoding="utf-8"), markup=False)
    for message in outcome.messages:
        console.print(message, markup=False)


def cmd_card(args: argparse.Namespace) -> int:
    """Documents from the run's records alone: nothing is run again."""
    from ruamel.yaml import YAML

    from runner.recipe.schema import Recipe
    from runner.run_dir import MARKER, RunDir
    from runner.steps.report import append_research_section, render_documents

    run_dir = RunDir(args.run_dir)
    saved = run_dir.root / "recipe.yaml"
    if not run_dir.is_run_dir() or not saved.exists():  # never write into a look-alike (a user's folder)
        raise RunnerError(f"{run_dir.root} is not a run directory (no {MARKER}, or no recipe.yaml); give the folder "
                          "`recipe run` made; nothing was written")
    recipe = Recipe.model_validate(YAML(typ="safe").load(saved.read_text(encoding="utf-8")))
    target = run_dir.step_dir(ids.REPORT)
    # Rendered beside the run, then each file replaced by rename: an interrupted render leaves the old
    # documents whole, and a file hard-linked elsewhere is replaced, never written through.
    scratch = run_dir.root / ".scratch"
    scratch.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="card.", dir=scratch) as rendered:
        search_record = run_dir.root / "search" / "search.json"  # written by the run's search, if it had one
        search = json.loads(search_record.read_text(encoding="utf-8")) if search_record.is_file() else None
        render_documents(recipe, run_dir, Path(rendered), search)
        target.mkdir(parents=True, exist_ok=True)
        for file in sorted(Path(rendered).iterdir()):
            os.replace(file, target / file.name)
    if recipe.report.research_doc is not None:
        section = (target / "research_section.md").read_text(encoding="utf-8")
        append_research_section(recipe.report.research_doc, recipe.name, section)
    out.print(f"wrote {target / 'README.md'}, {target / 'blog.md'}, {target / 'research_section.md'}")
    return 0


def cmd_clean(args: argparse.Namespace) -> int:
    from runner.containers import docker_api
    from runner.processes import processes_of, stop_processes
    from runner.run_dir import MARKER, RunDir

    def live(owner: Path) -> str | None:
        """Why the run at `owner` must be left alone (a live process holds its lock), or None."""
        try:
            return f"its run {owner} is live" if RunDir(owner).is_locked() else None
        except OSError as exc:  # its lock cannot be read: it may be live, so it is left
            return f"cannot tell whether its run {owner} is live ({exc.strerror})"

    def containers(run_root: Path | None) -> None:
        """Remove the runner's containers (of run_root, or of every run no live process holds)."""
        def keep(owner: Path | None) -> str | None:
            if run_root is not None:
                return None  # its lock is held here
            if owner is None:
                return "started by an earlier runner, its run directory unknown: `recipe clean --run-dir DIR`"
            return live(owner)

        try:
            removed, kept = docker_api.remove_containers(docker_api.client(), run_root, keep)
        except RunnerError as exc:
            console.print(f"[yellow]containers not checked:[/] {escape(str(exc))}")
            return
        out.print(f"removed {len(removed)} container(s)" + (f": {', '.join(removed)}" if removed else ""))
        for line in kept:
            out.print(f"left container {escape(line)}")

    # A live run is never touched: without --run-dir, containers and Slurm jobs are removed only for runs
    # no live process holds (processes are stopped only with --run-dir); with it, the run's lock is taken
    # before anything is removed, so a live run is refused first.
    if not args.run_dir:
        containers(None)
        from runner.executors.slurm import cancel_jobs, jobs_of

        orphans = [(job, owner) for job, owner in jobs_of(None) if not live(Path(owner))]
        cancel_jobs([job for job, _ in orphans])
        for job, owner in orphans:
            out.print(f"cancelled Slurm job {job} of {escape(owner)}, whose run is over")
    if args.run_dir:
        run_dir = RunDir(args.run_dir)
        if not run_dir.is_run_dir():
            raise RunnerError(f"{run_dir.root} is not a run directory (no {MARKER}); nothing was removed")
        with run_dir.locked():  # a live run is left alone: its lock says so, before anything is removed
            from runner.executors.slurm import cancel_jobs, jobs_of

            containers(run_dir.root)
            jobs = [job for job, _ in jobs_of(run_dir.root)]
            cancel_jobs(jobs)
            for job in jobs:
                out.print(f"cancelled Slurm job {job} left by a crashed run")
            stray = processes_of(run_dir.root)
            stop_processes([pid for pid, _ in stray])
            for pid, cmdline in stray:
                out.print(f"stopped process {pid} left by a crashed run: {escape(cmdline[:160])}")
            if not stray:
                out.print("no worker or server process of this run directory is left")
            run_dir.mark_died()
            removed = run_dir.remove_scratch()
        out.print(f"removed {len(removed)} scratch folder(s) the runner made under {run_dir.root / '.scratch'}")
    return 0


def cmd_init(args: argparse.Namespace) -> int:
    import shutil

    from runner import init_recipe
    from runner.benchmark.prediction import hardware_table_entry, hardware_target
    from runner.plan_checks import feasibility_problems, recipe_problems
    from runner.plan_table import footprint_table
    from runner.quantization import footprint
    from runner.quantization.safetensors_headers import has_safetensors
    from runner.quantization.weights import load_weights
    from runner.recipe.loader import load_recipe
    from runner.run_dir import write_text_atomic

    hardware_table_entry(args.hardware)  # an unknown target fails before anything is written
    config, folder, repo = init_recipe.read_config(args.model)
    found = init_recipe.detect(config)
    display = folder.name if folder is not None else str(repo).split("/")[-1]
    name = args.name or init_recipe.slug(display)
    output = (args.output or Path(f"{name}.yaml")).resolve()
    shapes_dir = output.with_name(f"{output.stem}.shapes")
    if output.exists() and not args.force:
        raise RunnerError(f"{output} exists: pass --force to overwrite it, or -o another file")
    if folder is not None:
        source = {"kind": "local", "path": str(folder)}
    else:
        source = {"kind": "huggingface", "repo": repo, "revision": init_recipe.hub_revision(str(repo))}
    shapes = None
    if not has_safetensors(folder):
        if shapes_dir.exists() and not args.force:
            raise RunnerError(f"{shapes_dir} exists: pass --force to rebuild it")
        shutil.rmtree(shapes_dir, ignore_errors=True)
        console.print(f"no weights to read: building the tensor listing from config.json in {shapes_dir.name}/ ...")
        why = init_recipe.build_listing(config, shapes_dir)
        if why is None:
            shapes = shapes_dir.name
        else:
            shutil.rmtree(shapes_dir, ignore_errors=True)
            console.print(f"[yellow]predictions unknown until the source step runs:[/] {escape(why)}")
    output.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(output, init_recipe.recipe_text(found, name, display, source, shapes, args.hardware))
    loaded = load_recipe(output)  # the starter must validate as written (a RecipeError here is our bug)
    out.print(f"wrote {output} (extends base/{found.family}.yaml)")
    for note in found.notes:
        out.print(f"  - {escape(note)}")
    recipe = loaded.recipe
    model_dir, read_from = footprint.model_folder(recipe)
    if model_dir is None:
        out.print(escape(read_from))
        return 0
    weights = load_weights(model_dir)
    hardware = hardware_target(recipe.benchmark.hardware)
    footprints = footprint.recipe_footprints(recipe, weights, hardware)
    source_fp = footprint.source_footprint(recipe, weights, hardware)
    out.print(footprint_table([source_fp, *footprints], f"predicted on {args.hardware}, from {escape(read_from)}"))
    # what validate would refuse for this model (e.g. the base's first/last-layer exclusions leave a
    # 2-layer model nothing to quantize): said here, with the fix, rather than at the user's first validate
    problems = feasibility_problems(loaded, footprints) + recipe_problems(loaded, model_dir, weights)
    if problems:
        console.print(f"[bold yellow]warning:[/] {escape(output.name)} does not validate as written for this model "
                      f"({len(problems)} problem{'s' if len(problems) != 1 else ''}); it is kept for you to edit:")
        for problem in problems:
            console.print(f"  {problem}", markup=False)
        if any("would quantize no layer" in p.message for p in problems):
            console.print(f"  fix: this model has {found.layers} decoder layer{'s' if found.layers != 1 else ''} "
                          f"and base/{found.family}.yaml leaves some in BF16 (see quantization.exclude there); give "
                          f"{output.name} its own `quantization: {{exclude: [...]}}` (it replaces the base's list) "
                          "that leaves layers to quantize", markup=False)
        return 0  # the starter is written: a warning, not a failure (validate refuses it until edited)
    out.print(f"next: `recipe plan {output.name}`, then serve the BF16 model as the teacher and `recipe run`")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from runner.catalogue import LIST_HARDWARE, catalogue, markdown
    from runner.recipe.resources import shipped_dir

    entries = catalogue()
    if args.markdown or args.output:
        text = markdown(entries)
        if args.output:
            args.output.write_text(text, encoding="utf-8")
            console.print(f"wrote {args.output}")
        else:
            out.print(text, markup=False, end="")
        return 0
    table = Table(title=f"shipped recipes ({shipped_dir('recipes')}); predictions for {LIST_HARDWARE}")
    table.add_column("recipe", no_wrap=True)  # the name to type: never cut
    for col in ("model / source", "strategy", "GB", "bits", "decode tok/s"):
        table.add_column(col, overflow="fold")  # wraps on a narrow terminal, never cut
    for e in entries:
        if e.kind == "base":
            table.add_row(f"[dim]{e.path}[/]", f"[dim](base) {escape(e.description)}[/]", "", "", "", "")
            continue
        if e.error:
            table.add_row(e.path, f"[red]invalid: {escape(e.error)}[/]", "", "", "", "")
            continue
        first = True
        license_text = f", {escape(e.license)}" if e.license else ""
        source_row = f"{escape(e.model)}\n[dim]{escape(e.source)}{license_text}[/]"
        if e.source_gb is not None:
            table.add_row(e.path, source_row, "[dim](BF16 source)[/]", f"{e.source_gb:.1f}", "16",
                          f"{e.source_tok_s:.1f}" if e.source_tok_s else "-")
            first = False
        for s in e.strategies:
            known = s.size_gb is not None
            table.add_row(e.path if first else "", source_row if first else "", s.name,
                          f"{s.size_gb:.1f}" if known else "?", f"{s.effective_bits:.2f}" if known else "?",
                          f"{s.decode_tok_s:.1f}" if known and s.decode_tok_s else "?")
            first = False
        table.add_section()
    out.print(table)
    out.print("sizes and speeds are predictions from each recipe's model.shapes (single-stream decode upper "
              "bound: bytes read per token / memory bandwidth); `?`: no shapes, known once the source step ran")
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    from runner.recipe.schema import Recipe

    if args.markdown:
        from runner.recipe.schema_docs import recipe_reference

        text = recipe_reference()
    else:
        text = json.dumps(Recipe.model_json_schema(), indent=2) + "\n"
    if args.output:
        args.output.write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
