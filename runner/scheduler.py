"""Run a plan: pick the steps to run, run independent ones concurrently, commit, resume.

A step runs when every step it depends on is complete. At most `execution.max_parallel` steps run at
once and at most max(gpus, 1) heavy steps (quantize, serve) at once. A step whose key matches its
committed record is not run again, so a run that was interrupted resumes at the first incomplete
step. A failed step stops its strategy's branch (the steps after it are blocked, naming it) while
the other strategies' branches run to the end; gates then judges the candidates that exist, report
and publish follow, and the run still fails (exit 1). With `fail_fast` the first failure stops new
steps from starting instead; running ones finish and commit. A step that is not built yet stops its
branch with a message that says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import os
import time
import traceback
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape

from runner.containers.plugin import load_container
from runner.errors import NotImplementedStep, RunnerError, causes
from runner.executors import Executor
from runner.gpu_pool import GpuPool, Lease, probe_gpu_memory
from runner.plan import Plan, Step, step_key, with_rivals
from runner.run_dir import RUN_JSON_FORMAT, RunDir, disk_error, host_versions, now, write_json_atomic
from runner.steps import StepContext, StepKind, StepResult, ids
from runner.steps.registry import step_kinds
from runner.worker_contract import GPU_LEASE_PARAM


class StepFailed(RunnerError):
    """A step ran and failed; the message says why and where its log is."""


@dataclass
class RunOptions:
    only: list[str] = field(default_factory=list)
    from_steps: list[str] = field(default_factory=list)
    until: list[str] = field(default_factory=list)
    force: bool = False
    dry_run: bool = False
    fail_fast: bool = False  # the first failure stops new steps from starting, in every branch


@dataclass
class RunOutcome:
    status: str  # complete | unproven | no-candidate | failed | stopped | interrupted | dry-run
    states: dict[str, str]
    messages: list[str] = field(default_factory=list)
    blocked_by: dict[str, str] = field(default_factory=dict)  # blocked step -> the failed step that stopped it

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.status]


# "no-candidate": every step ran, but no strategy passed the gates, so nothing was published. It has
# its own code so that automation can tell "the pipeline broke" (1) from "no candidate was good enough".
# "unproven": every step ran and the selected strategy is unproven (no gate failed, some could not
# decide; selection.accept_unproven let it through): not the same as a candidate every gate passed.
EXIT_CODES = {"complete": 0, "dry-run": 0, "failed": 1, "stopped": 3, "no-candidate": 4, "unproven": 5,
              "interrupted": 130}


def target_steps(plan: Plan, options: RunOptions) -> list[str]:
    """The steps the options ask for (--only, --until, --from), in plan order, run or not."""
    targets = list(plan.steps)
    if options.only:
        chosen = set(plan.match(options.only))
        targets = [s for s in targets if s in chosen]
    if options.until:
        wanted: set[str] = set()
        for sid in plan.match(options.until):
            wanted |= {sid} | plan.ancestors(sid)
        targets = [s for s in targets if s in wanted]
    if options.from_steps:
        start: set[str] = set()
        for sid in plan.match(options.from_steps):
            start |= {sid} | plan.dependents(sid)
        targets = [s for s in targets if s in start]
    return targets


def select_steps(plan: Plan, run_dir: RunDir, options: RunOptions) -> tuple[list[str], set[str]]:
    """(steps to run in order, steps forced). Raises RunnerError when a needed input is missing."""
    targets = target_steps(plan, options)
    forced: set[str] = set(targets) if options.from_steps else set()
    if options.force:
        forced |= set(targets)
    to_run = [s for s in targets if s in forced or not run_dir.is_complete(s, plan.keys[s])]
    running = set(to_run)
    # Everything a selected step needs must be selected too, or already complete and current.
    for sid in to_run:
        for dep in plan.steps[sid].deps:
            if dep not in running and not run_dir.is_complete(dep, plan.keys[dep]):
                raise RunnerError(
                    f"step {sid} needs {dep}, which has no current result in {run_dir.root}; "
                    f"run without --only/--from, or add {dep} to --only")
    return to_run, forced


class Runner:
    def __init__(self, plan: Plan, run_dir: RunDir, executor: Executor, console: Console | None = None,
                 kinds: dict[str, StepKind] | None = None):
        # --strategy limits what runs, not what competes: gates also judges the current benchmarks of the rest
        self.plan = plan = with_rivals(plan, run_dir.is_complete)
        self.run_dir = run_dir
        self.executor = executor
        self.console = console or Console(stderr=True, soft_wrap=True)
        self.kinds = kinds or step_kinds()
        execution = plan.recipe.execution
        self._slots = PrioritySlots(execution.max_parallel)
        memory = int(execution.gpu_memory_gb * 1e9) if execution.gpu_memory_gb and execution.share_gpus else None
        self._gpu_memory_probed = execution.gpu_memory_gb is None and execution.share_gpus
        self._heavy = GpuPool(execution.gpus, memory)
        self._priority = branch_first_order(plan)
        self._fail_fast = False
        self._halt: str | None = None  # with fail_fast: the step whose failure stops new steps
        # This run's keys: the plan's, except where a step ran without a failed branch (see _inputs).
        self.keys = dict(plan.keys)
        self.states: dict[str, str] = {}
        self.blocked_by: dict[str, str] = {}
        self.messages: list[str] = []
        self._started: dict[str, float] = {}  # when each step began (the live view's clock)
        # Each step's predicted seconds (runner/wall_time.py), kept in its record beside the measured time.
        self.predicted: dict[str, float] = {}
        # What each GPU step is predicted to hold of a GPU (runner/wall_time.gpu_memory_need): steps whose
        # needs fit share one. A step not named takes a whole GPU.
        self.gpu_needs: dict[str, int] = {}

    async def run(self, options: RunOptions) -> RunOutcome:
        to_run, forced = select_steps(self.plan, self.run_dir, options)
        self._fail_fast = options.fail_fast
        self.states = {sid: ("current" if self.run_dir.is_complete(sid, key) else "missing")
                       for sid, key in self.plan.keys.items()}
        if options.dry_run:
            for sid in to_run:
                self.states[sid] = "would run" + (" (forced)" if sid in forced else "")
            return RunOutcome("dry-run", self.states)
        # Forced steps keep their old result until the new one is committed over it: an interrupted
        # forced run loses nothing.
        self.run_dir.root.mkdir(parents=True, exist_ok=True)
        for sid in to_run:
            self.states[sid] = "queued"
        done = {sid: asyncio.Event() for sid in self.plan.keys}  # the steps, and the rivals gates judges
        for sid, state in self.states.items():
            if state == "current":
                done[sid].set()
        self._write_status("running")
        self._probe_gpu_memory(to_run)
        tasks = [asyncio.create_task(self._run_when_ready(sid, done), name=sid) for sid in to_run]
        ticker = asyncio.create_task(self._show_progress()) if self.console.is_terminal else None
        try:
            await asyncio.gather(*tasks)
        except asyncio.CancelledError:
            await self._stop(tasks, "interrupted")
            self._write_status("interrupted")
            return RunOutcome("interrupted", self.states, ["interrupted: completed steps are kept; "
                                                           "run again to resume"], self.blocked_by)
        except Exception as exc:  # noqa: BLE001 - the scheduler itself broke (not a step): say why, record it
            await self._stop(tasks, "failed")
            self.messages.extend(causes(exc))
            self._write_status("failed")
            raise RunnerError("; ".join(causes(exc))) from None
        finally:
            if ticker is not None:
                ticker.cancel()
                await asyncio.gather(ticker, return_exceptions=True)
        status = "complete"
        failed = [sid for sid, state in self.states.items() if state == "failed"]
        if failed:
            status = "failed"
            ran_on = " (gates, report and publish ran over the strategies that finished)" if (
                self.states.get(ids.GATES) == "complete") else ""
            self.messages.append(f"failed: {', '.join(failed)}{ran_on}; fix and run again to resume "
                                 "at the failed steps")
        elif any(s in ("not built", "blocked") for s in self.states.values()):
            status = "stopped"
        elif ids.GATES in target_steps(self.plan, options) and self._selection() is not None:
            selection = self._selection() or {}
            if selection.get("best") is None:
                status = "no-candidate"
                undecided = ", ".join(selection.get("unproven") or {})
                self.messages.append("no strategy passed the gates, so nothing was published"
                                     + (f" ({undecided}: no gate failed, but some could not decide; larger suites "
                                        "decide, selection.accept_unproven: true publishes one anyway)"
                                        if undecided else "") + ": see steps/gates/comparison.md and the report")
            elif selection.get("proven") is False:
                status = "unproven"
                self.messages.append(f"selected {selection['best']} UNPROVEN: no gate failed, but "
                                     f"{', '.join((selection.get('unproven') or {}).get(selection['best'], []))} "
                                     "could not decide at these sample sizes (selection.accept_unproven: true)")
        self._write_status(status)
        return RunOutcome(status, self.states, self.messages, self.blocked_by)

    async def _stop(self, tasks: list[asyncio.Task[None]], state: str) -> None:
        """Cancel the steps still running or waiting; they end in `state` (run.json says so)."""
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for sid, current in self.states.items():
            if current in ("queued", "running"):
                self.states[sid] = state

    async def _show_progress(self) -> None:
        """A live view (terminals only) of the running steps: elapsed time and the last line each one
        logged (teacher progress, quantize batches, benchmark answers)."""
        from rich.live import Live

        with Live(console=self.console, transient=True, refresh_per_second=2) as live:
            while True:
                live.update(self._progress_view())
                await asyncio.sleep(0.5)

    def _progress_view(self) -> Any:
        from rich.table import Table
        from rich.text import Text

        view = Table.grid(padding=(0, 1))
        for sid, started in sorted(self._started.items()):
            if self.states.get(sid) == "running":
                view.add_row(Text(f"▶ {sid}", style="cyan"), Text(f"{time.monotonic() - started:.0f}s", style="dim"),
                             Text(last_line(self.run_dir.log_path(sid)), style="dim", overflow="ellipsis",
                                  no_wrap=True))
        return view

    def _selection(self) -> dict[str, Any] | None:
        """The gates step's selection (best, proven, unproven), None before gates has run."""
        record = self.run_dir.record(ids.GATES)
        return None if record is None else record.get("summary", {}).get("selection", {})

    async def _run_when_ready(self, sid: str, done: dict[str, asyncio.Event]) -> None:
        step = self.plan.steps[sid]
        for dep in step.deps:
            await done[dep].wait()
        try:
            runnable, blocker = self._inputs(step)
            if runnable is None:
                self.states[sid] = "blocked"
                if blocker is not None:
                    self.blocked_by[sid] = blocker
                return
            kind = self.kinds[step.kind]
            if kind.run is None:
                self.states[sid] = "not built"
                self.messages.append(f"{sid}: stopped here: {kind.pending}")
                return
            priority = self._priority[sid]
            # A worker step that a remote executor (a Slurm job) runs uses none of this machine's GPUs.
            local_heavy = bool(step.heavy) and not (self.executor.remote and kind.worker is not None)
            await self._slots.acquire(priority)
            try:
                lease = None
                if local_heavy:
                    need = self.gpu_needs.get(sid)
                    lease = await self._heavy.acquire(priority, need, on_wait=lambda: self.console.print(
                        f"[dim]{sid} waits for {escape(self._heavy.waiting_for(need))}[/]"))
                try:
                    if self._halt is not None:
                        self.states[sid] = "blocked"
                        self.blocked_by[sid] = self._halt
                        return
                    await self._run_step(sid, kind, runnable, lease)
                    done[sid].set()
                finally:
                    if lease is not None:
                        self._heavy.release(lease)
            finally:
                self._slots.release()
        finally:
            done[sid].set()

    def _failure(self, sid: str) -> str | None:
        """The failed step behind a step that failed or was blocked; None for other states."""
        return sid if self.states.get(sid) == "failed" else self.blocked_by.get(sid)

    def _inputs(self, step: Step) -> tuple[Step | None, str | None]:
        """(the step to run, or None when it is blocked; the failed step that blocks it, if any).

        A step outside any branch (gates) runs without a dependency whose own strategy's branch
        failed: it judges the candidates that exist. Anything else missing blocks it: a failure
        outside that dependency's branch (benchmark.baseline, source, calibrate), a step not built,
        or a stop by fail_fast.
        """
        missing = [d for d in step.deps if self.states.get(d) not in ("current", "complete")]
        if not missing:
            return step, None
        failed: dict[str, str] = {}
        for dep in missing:
            cause = self._failure(dep)
            branch = self.plan.steps[dep].strategy
            if (step.strategy is not None or branch is None or cause is None
                    or self.plan.steps[cause].strategy != branch):
                return None, cause
            failed[branch] = cause
        # The result of a step run without some branches is not the plan's result: its key must
        # differ, or once the branch is fixed the old partial result (and report's and publish's
        # after it) would count as current. So the failed branches go into its input, which
        # step_key hashes, and the keys of the steps after it are chained from that key as plan.py
        # does. The record keeps this key, so the next run (whose plan has the full key again)
        # re-runs gates and what follows; a different set of failed branches gives a different key.
        reduced = replace(step, deps=tuple(d for d in step.deps if d not in missing),
                          inputs=step.inputs.model_copy(update={"failed_branches": dict(sorted(failed.items()))}))
        self.keys[step.id] = step_key(reduced, [self.keys[d] for d in reduced.deps])
        after = self.plan.dependents(step.id)
        for sid, later in self.plan.steps.items():
            if sid in after:
                self.keys[sid] = step_key(later, [self.keys[d] for d in later.deps])
        return reduced, None

    def _probe_gpu_memory(self, to_run: list[str]) -> None:
        """Once, before any step starts: the GPUs' memory from nvidia-smi, when the recipe does not give it
        and a GPU step will run."""
        if not self._gpu_memory_probed:
            return
        self._gpu_memory_probed = False
        memory = probe_gpu_memory() if self.gpu_needs and any(self.plan.steps[s].heavy for s in to_run) else None
        if memory is not None:
            self._heavy = GpuPool(self._heavy.gpus, memory)
            self.console.print(f"[dim]GPU steps share a GPU while their predicted needs fit its {memory / 1e9:.0f} GB"
                               " (nvidia-smi)[/]")
        elif self.gpu_needs:
            self.console.print("[dim]the GPUs' memory is unknown (no nvidia-smi, no execution.gpu_memory_gb): one GPU "
                               "step per GPU[/]")

    async def _run_step(self, sid: str, kind: StepKind, step: Step, lease: Lease | None = None) -> None:
        self.states[sid] = "running"
        self._write_status("running")
        log_path = self.run_dir.log_path(sid)
        started, t0 = now(), time.monotonic()
        try:
            log_path.parent.mkdir(parents=True, exist_ok=True)
            logger = _step_logger(sid, log_path)
            scratch = self.run_dir.new_scratch(sid)
        except OSError as exc:  # a full or read-only disk before the step could start
            self._failed(sid, disk_error(exc.filename and Path(exc.filename) or self.run_dir.root, exc), None,
                         log_path, started, t0, None)
            return
        self._started[sid] = t0
        self.console.print(f"[bold cyan]▶[/] {sid} [dim]started[/]")
        logger.info("step %s (key %s) started; scratch %s", sid, self.keys[sid], scratch)

        async def run_worker(worker_kind: str, params: dict[str, Any]) -> StepResult:
            if lease is not None:  # the worker runs on its GPU only, capped at its share (worker/__main__.py)
                params = {**params, GPU_LEASE_PARAM: lease.to_params()}
            container = None
            if self.executor.uses_containers and kind.container_role:
                container = load_container(self.plan.recipe.container_for(kind.container_role))
            return await self.executor.run_worker(
                worker_kind=worker_kind, params=params, scratch=scratch, log_path=log_path,
                container=container)

        ctx = StepContext(step, self.run_dir, scratch, logger, run_worker)
        try:
            assert kind.run is not None
            result = await kind.run(ctx)
        except asyncio.CancelledError:
            logger.info("step %s interrupted", sid)
            self.states[sid] = "interrupted"
            raise
        except NotImplementedStep as exc:
            self.states[sid] = "not built"
            self.messages.append(f"{sid}: stopped here: {exc}")
            self.console.print(f"[bold yellow]■[/] {sid} not built: {escape(str(exc))}")
            return
        except Exception as exc:  # noqa: BLE001 - any failure of a step fails the run, with its message
            logger.error("step %s failed: %s\n%s", sid, exc, traceback.format_exc())
            if isinstance(exc, OSError):
                exc = disk_error(Path(exc.filename or scratch), exc)  # a full disk, said plainly
            self._failed(sid, exc, logger, log_path, started, t0, scratch)
            return
        finally:
            _close_logger(logger)
        record = {
            "step": sid,
            "kind": step.kind,
            "strategy": step.strategy,
            "key": self.keys[sid],
            "status": "complete",
            "params": step.params,
            "deps": {d: self.keys[d] for d in step.deps},
            "outputs": result.outputs,
            "summary": result.summary,
            "versions": {**host_versions(), **result.versions},
            "executor": self.executor.name,
            "started_at": started,
            "finished_at": now(),
            "duration_s": round(time.monotonic() - t0, 3),
            "predicted_s": round(self.predicted[sid], 1) if sid in self.predicted else None,
        }
        try:
            self.run_dir.commit(sid, scratch, record)
            (self.run_dir.logs_dir / f"{sid}.failed.json").unlink(missing_ok=True)
        except (OSError, RunnerError) as exc:  # a full or read-only disk: the step did not complete
            if isinstance(exc, OSError):
                exc = disk_error(Path(exc.filename or scratch), exc)
            self._failed(sid, exc, None, log_path, started, t0, scratch)
            return
        self.states[sid] = "complete"
        self._write_status("running")
        self.console.print(f"[bold green]✓[/] {sid} [dim]{record['duration_s']:.1f}s[/]")

    def _failed(self, sid: str, exc: BaseException, logger: logging.Logger | None, log_path: Path, started: str,
                t0: float, scratch: Path | None) -> None:
        """Mark a step failed: its reason (each cause of an exception group on a line of its own) in the
        run's closing messages and logs/ID.failed.json; the traceback is in its log."""
        if self._fail_fast and self._halt is None:
            self._halt = sid
        self.states[sid] = "failed"
        if logger is None:  # failed outside the step's own code (its scratch or its commit)
            with contextlib.suppress(OSError), log_path.open("a", encoding="utf-8") as fh:
                fh.write(f"{now()} ERROR step {sid} failed: {exc}\n")
        lines = causes(exc)
        detail = "\n    ".join(lines)
        self.messages.append(f"{sid} failed: {detail}\n    log (with the traceback): {log_path}")
        try:
            write_json_atomic(self.run_dir.logs_dir / f"{sid}.failed.json", {
                "step": sid, "key": self.keys[sid], "error": detail, "causes": lines, "started_at": started,
                "failed_at": now(), "scratch": str(scratch) if scratch else None})
        except (OSError, RunnerError) as exc2:  # a full disk: the message still reaches the console
            self.messages.append(f"{sid}: could not record the failure: {exc2}")
        # The reason is printed once, in the run's closing messages; the traceback is in the log.
        self.console.print(f"[bold red]✗[/] {sid} failed after {time.monotonic() - t0:.1f}s")

    def _write_status(self, status: str) -> None:
        if not self.run_dir.root.exists():
            return
        try:
            self._write_status_file(status)
        except (OSError, RunnerError) as exc:
            # A full disk must not turn a step's clear failure into a traceback; run.json keeps its last
            # status, and `recipe run` on it later sees that no process holds the directory.
            self.console.print(f"[bold red]could not update run.json:[/] {escape(str(exc))}")

    def _write_status_file(self, status: str) -> None:
        self.run_dir.save_status({
            "format": RUN_JSON_FORMAT, "recipe": self.plan.recipe.name, "status": status, "updated_at": now(),
            "pid": os.getpid(),
            "steps": {sid: {"state": self.states.get(sid, "?"), "key": self.keys[sid],
                            **({"blocked_by": self.blocked_by[sid]} if sid in self.blocked_by else {})}
                      for sid in self.plan.steps},
            "messages": self.messages,
            **({"selection": {"strategy": sel.get("best"), "proven": sel.get("proven")}}
               if (sel := self._selection()) is not None else {}),
        })


class PrioritySlots:
    """A semaphore that wakes the waiter with the lowest priority number first."""

    def __init__(self, slots: int):
        self._free = slots
        self._waiters: list[tuple[int, int, asyncio.Future[None]]] = []
        self._counter = itertools.count()

    async def acquire(self, priority: int) -> None:
        if self._free > 0 and not self._waiters:
            self._free -= 1
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiters, (priority, next(self._counter), future))
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self.release()  # it was handed a slot just as it was cancelled: pass it on
            raise

    def release(self) -> None:
        # Hand the slot over on the next loop turn, so that steps made ready by the step that just
        # finished are already waiting and can win on priority.
        asyncio.get_running_loop().call_soon(self._hand_over)

    def _hand_over(self) -> None:
        while self._waiters:
            _, _, future = heapq.heappop(self._waiters)
            if not future.done():
                future.set_result(None)
                return
        self._free += 1


def branch_first_order(plan: Plan) -> dict[str, int]:
    """Finish one strategy's branch before starting the next: a verified checkpoint comes sooner."""
    strategies = {s.name: i for i, s in enumerate(plan.recipe.quantization.strategies)}
    position = {sid: i for i, sid in enumerate(plan.steps)}  # dicts: linear in the number of steps

    def rank(sid: str) -> tuple[int, int]:
        strategy = plan.steps[sid].strategy
        branch = strategies[strategy] if strategy in strategies else (-1 if not plan.steps[sid].deps else 0)
        return (branch, position[sid])

    return {sid: i for i, sid in enumerate(sorted(position, key=rank))}


class _StepLog(logging.FileHandler):
    """A step's log file. A line it cannot write (a disk filled by a server's log) is dropped quietly:
    logging's default prints a traceback to the console for every such line, while the step fails on
    its own with one clear line."""

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 - logging's name
        self.dropped = getattr(self, "dropped", 0) + 1


def _step_logger(sid: str, path: Path) -> logging.Logger:
    logger = logging.getLogger(f"runner.step.{sid}")
    logger.setLevel(logging.INFO)
    logger.propagate = False
    handler = _StepLog(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logger.addHandler(handler)
    return logger


def _close_logger(logger: logging.Logger) -> None:
    for handler in list(logger.handlers):
        handler.close()
        logger.removeHandler(handler)


def last_line(path: Path, limit: int = 120) -> str:
    """The last thing a step logged (a progress bar's latest state included), without the timestamp."""
    try:
        with path.open("rb") as fh:
            fh.seek(max(0, fh.seek(0, os.SEEK_END) - 4096))
            tail = fh.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    lines = [part.strip() for line in tail.splitlines() for part in line.split("\r") if part.strip()]
    text = lines[-1] if lines else ""
    if len(text) > 24 and text[4] == "-" and text[19] == ",":  # "2026-11-28 11:18:36,344 INFO ..."
        text = text[24:].split(" ", 1)[-1]
    return text[:limit]
