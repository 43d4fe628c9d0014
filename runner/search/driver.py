"""Run a recipe's `search`: the procedure (runner/search/procedure.py) proposes rounds of candidates; each round is
quantized (held-out KL and top-1 agreement from the quantize worker: minutes), the cheap signal prunes, the
rest are served, benchmarked and judged by the recipe's gates (the acceptance rule), and the outcomes go back
to the procedure. Every candidate is an ordinary strategy, so its steps are cached in the run directory:
an interrupted search resumes, and a rerun with a larger budget replays what ran (in seconds) and goes on.

The record (search/search.json, search/pareto.md, search/pareto.svg, search/selected-strategy.yaml) says, for
every candidate, why it was proposed, what it measured, and whether the KL proxy pruned it; a few pruned
candidates are served anyway (prune.audit) and the record says whether the gates agreed with the pruning.
The served candidates then compete with the hand-written strategies in the recipe's own gates step.

An infrastructure failure (a worker crash, a server that did not start) is recorded as `failed`, never as a
model verdict; one candidate failing never stops the others.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runner.benchmark.gates import evaluate, status_of
from runner.quantization.families import family_of
from runner.recipe.schema import LayoutSpec, Recipe, SearchSpec, Strategy
from runner.run_dir import RunDir, write_json_atomic
from runner.search.procedure import ACCEPTED, FAILED, PRUNED, REJECTED, SKIPPED, WIDEN, Candidate, Outcome, ptq_order
from runner.steps import ids

SEARCH_DIR = "search"


@dataclass
class Entry:
    """One candidate as the search record shows it."""

    name: str
    round: int
    move: str
    layout: dict[str, Any]
    algorithm: str
    description: str
    status: str = SKIPPED
    why: str = ""  # what decided the status: the gate that failed, the KL threshold, the failed step
    kl: float | None = None
    kl_interval: list[float] | None = None
    top1: float | None = None
    served: bool = False
    audit: bool = False  # pruned by KL, served anyway to check the proxy
    gates: list[dict[str, Any]] = field(default_factory=list)  # verdicts (served candidates)
    gate_status: str | None = None  # proven | unproven | rejected (served candidates)
    seconds: float = 0.0  # quantize (+ serve + benchmark) wall time from the steps' records
    predicted: dict[str, Any] = field(default_factory=dict)  # footprint: size, bytes per token, tok/s

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def candidate_strategy(candidate: Candidate, spec: SearchSpec) -> Strategy:
    """The ordinary strategy a candidate runs as: its name encodes every choice (so its cache key does)."""
    return Strategy(name=candidate.name(spec.prefix), description=f"search candidate: {candidate.describe()}",
                    layout=LayoutSpec.model_validate(candidate.layout()), algorithm=candidate.algorithm,
                    sensitivity=spec.sensitivity if candidate.move.startswith(WIDEN) else 0,
                    inherit_exclude=spec.inherit_exclude)


def with_strategies(recipe: Recipe, extra: list[Strategy]) -> Recipe:
    """The recipe with the candidates appended to its hand-written strategies."""
    quantization = recipe.quantization.model_copy(update={"strategies": [*recipe.quantization.strategies, *extra]})
    return recipe.model_copy(update={"quantization": quantization})


def prune_threshold(spec: SearchSpec, judged: list[Entry]) -> tuple[float, str]:
    """(KL above which a candidate is not served, how it was set). `auto`: from this run's gate history:
    above the lowest KL the gates rejected and above the highest they accepted; infinite (nothing pruned)
    until the gates have rejected one."""
    if spec.prune.max_kl != "auto":
        return float(spec.prune.max_kl), f"prune.max_kl {spec.prune.max_kl}"
    failed = [e.kl for e in judged if e.gate_status == "rejected" and e.kl is not None]
    passed = [e.kl for e in judged if e.gate_status in ("proven", "unproven") and e.kl is not None]
    if not failed:
        return float("inf"), "no candidate rejected by the gates yet"
    threshold = max(min(failed), max(passed, default=0.0))
    return threshold, (f"auto: lowest KL the gates rejected {min(failed):.4g}"
                       + (f", highest they accepted {max(passed):.4g}" if passed else ""))


class SearchDriver:
    def __init__(self, recipe: Recipe, run_dir: RunDir, executor: Any, console: Any) -> None:
        assert recipe.search is not None
        self.recipe, self.spec = recipe, recipe.search
        self.run_dir, self.executor, self.console = run_dir, executor, console
        # a strategy's predicted size, bytes per token, decode speed (predictor()), once the source is there
        self.predict: Callable[[Strategy], dict[str, Any]] | None = None
        self.entries: dict[str, Entry] = {}
        self.candidates: dict[str, Candidate] = {}
        self.baseline: dict[str, Any] | None = None
        self.thresholds: list[dict[str, Any]] = []
        self.stopped_by: str | None = None

    # --- the steps ----------------------------------------------------------------------------------

    def plan(self):
        from runner.plan import build_plan

        strategies = [candidate_strategy(c, self.spec) for c in self.candidates.values()]
        return build_plan(with_strategies(self.recipe, strategies))

    async def _run_until(self, targets: list[str]) -> Any:
        from runner.scheduler import Runner, RunOptions

        plan = self.plan()
        runner = Runner(plan, self.run_dir, self.executor, self.console)
        await runner.run(RunOptions(until=targets))
        return plan

    def _current(self, plan: Any, sid: str) -> dict[str, Any] | None:
        record = self.run_dir.record(sid)
        if record and record.get("status") == "complete" and record.get("key") == plan.keys.get(sid):
            return record
        return None

    def _failure(self, sid: str) -> str:
        path = self.run_dir.logs_dir / f"{sid}.failed.json"
        try:
            return f"{sid} failed: {json.loads(path.read_text(encoding='utf-8')).get('error')}"
        except (OSError, ValueError):
            return f"{sid} did not complete"

    # --- budget -------------------------------------------------------------------------------------

    def _budget_left(self) -> tuple[int, int, str | None]:
        """(candidates that may still be quantized, served, why the search stops or None)."""
        budget = self.spec.budget
        quantized = sum(1 for e in self.entries.values() if e.status != SKIPPED)
        served = sum(1 for e in self.entries.values() if e.served)
        hours = sum(e.seconds for e in self.entries.values()) / 3600
        if budget.gpu_hours is not None and hours >= budget.gpu_hours:
            return 0, 0, f"budget.gpu_hours {budget.gpu_hours} spent ({hours:.2f} h)"
        if quantized >= budget.candidates:
            return 0, 0, f"budget.candidates {budget.candidates} spent"
        return budget.candidates - quantized, budget.served - served, None

    # --- one round ----------------------------------------------------------------------------------

    async def run_round(self, number: int, proposed: list[Candidate]) -> dict[Candidate, Outcome]:
        outcomes: dict[Candidate, Outcome] = {}
        quantize_left, serve_left, stop = self._budget_left()
        todo: list[Candidate] = []
        for candidate in proposed:
            name = candidate.name(self.spec.prefix)
            entry = self.entries.setdefault(name, Entry(
                name, number, candidate.move, candidate.layout(), candidate.algorithm, candidate.describe()))
            if len(todo) < quantize_left:
                todo.append(candidate)
                self.candidates[name] = candidate
            else:
                entry.why = stop or f"budget.candidates {self.spec.budget.candidates} spent"
                outcomes[candidate] = Outcome(SKIPPED)
        if not todo:
            return outcomes
        names = [c.name(self.spec.prefix) for c in todo]
        self.console.print(f"[bold]search round {number}[/]: {', '.join(names)}")
        plan = await self._run_until([ids.quantize(n) for n in names])
        quantized: list[Candidate] = []
        for candidate, name in zip(todo, names, strict=True):
            entry = self.entries[name]
            record = self._current(plan, ids.quantize(name))
            if record is None:
                entry.status, entry.why = FAILED, self._failure(ids.quantize(name))
                outcomes[candidate] = Outcome(FAILED)
                continue
            summary = record.get("summary") or {}
            fidelity = summary.get("fidelity") or {}
            entry.kl, entry.kl_interval = fidelity.get("kl"), fidelity.get("kl_interval")
            entry.top1 = fidelity.get("top1_agreement")
            entry.seconds += float(record.get("duration_s") or 0)
            entry.predicted = self.predict(candidate_strategy(candidate, self.spec)) if self.predict else {}
            quantized.append(candidate)
        # The cheap signal first: only candidates under the KL threshold reach the gates (plus audits).
        judged = [e for e in self.entries.values() if e.gate_status is not None]
        threshold, how = prune_threshold(self.spec, judged)
        self.thresholds.append({"round": number, "max_kl": None if threshold == float("inf") else threshold,
                                "set_by": how})
        serve: list[Candidate] = []
        pruned: list[Candidate] = []
        for candidate in quantized:
            entry = self.entries[candidate.name(self.spec.prefix)]
            if entry.kl is not None and entry.kl > threshold:
                pruned.append(candidate)
            else:
                serve.append(candidate)
        audits_left = self.spec.prune.audit - sum(1 for e in self.entries.values() if e.audit)
        for candidate in sorted(pruned, key=lambda c: self.entries[c.name(self.spec.prefix)].kl or 0.0):
            entry = self.entries[candidate.name(self.spec.prefix)]
            entry.status, entry.why = PRUNED, f"held-out KL {entry.kl:.4g} > {threshold:.4g} ({how})"
            outcomes[candidate] = Outcome(PRUNED, entry.kl)
            if audits_left > 0:  # the lowest-KL pruned ones: the likeliest to be a winner the proxy dropped
                entry.audit, audits_left = True, audits_left - 1
                serve.append(candidate)
        # The gates are the expensive part: at most budget.served candidates reach them, audits included.
        for candidate in serve[max(serve_left, 0):]:
            entry = self.entries[candidate.name(self.spec.prefix)]
            if entry.audit:
                entry.audit = False  # stays pruned, unaudited
            else:
                entry.status = SKIPPED
                entry.why = f"quantized, not served: budget.served {self.spec.budget.served} spent"
                outcomes[candidate] = Outcome(SKIPPED, entry.kl)
        serve = serve[:max(serve_left, 0)]
        if serve:
            served_names = [c.name(self.spec.prefix) for c in serve]
            plan = await self._run_until([*(ids.benchmark(n) for n in served_names), ids.BASELINE_BENCHMARK])
            self.baseline = self._results(plan, ids.BASELINE_BENCHMARK)
            for candidate, name in zip(serve, served_names, strict=True):
                self._judge(plan, candidate, name, outcomes)
        for candidate in quantized:
            entry = self.entries[candidate.name(self.spec.prefix)]
            outcomes.setdefault(candidate, Outcome(entry.status, entry.kl))
            outcomes[candidate].sensitivity = self._sensitivity(plan, candidate.name(self.spec.prefix))
        for candidate in todo:
            entry = self.entries[candidate.name(self.spec.prefix)]
            kl = f"KL {entry.kl:.4g}, " if entry.kl is not None else ""
            from rich.markup import escape

            self.console.print(f"  {escape(entry.name)}: [bold]{entry.status}[/] ({escape(kl + entry.why)})",
                               highlight=False)
        return outcomes

    def _results(self, plan: Any, sid: str) -> dict[str, Any] | None:
        if self._current(plan, sid) is None:
            return None
        try:
            return json.loads(self.run_dir.output(sid, "results").read_text(encoding="utf-8"))
        except (KeyError, OSError, ValueError):
            return None

    def _sensitivity(self, plan: Any, name: str) -> list[dict[str, Any]]:
        record = self._current(plan, ids.quantize(name)) or {}
        return list(((record.get("summary") or {}).get("sensitivity") or {}).get("layers") or [])

    def _judge(self, plan: Any, candidate: Candidate, name: str, outcomes: dict[Candidate, Outcome]) -> None:
        entry = self.entries[name]
        entry.served = True
        for sid in (ids.serve(name), ids.benchmark(name)):
            if (record := self._current(plan, sid)) is not None:
                entry.seconds += float(record.get("duration_s") or 0)
        results = self._results(plan, ids.benchmark(name))
        if results is None or (self.recipe.benchmark.baseline and self.baseline is None):
            failed = next((sid for sid in (ids.export(name), ids.verify(name), ids.serve(name), ids.benchmark(name),
                                           ids.BASELINE_BENCHMARK) if self._current(plan, sid) is None), None)
            entry.status, entry.why = FAILED, self._failure(failed) if failed else "no benchmark results"
            outcomes[candidate] = Outcome(FAILED, entry.kl)
            return
        verdicts = evaluate(self.recipe.gates, results, self.baseline)
        entry.gates = [{k: v.get(k) for k in ("gate", "metric", "value", "interval", "threshold", "verdict")}
                       for v in verdicts]
        entry.gate_status = status_of(verdicts)
        accepted = entry.gate_status == "proven" or (
            entry.gate_status == "unproven" and self.recipe.selection.accept_unproven)
        failing = [v["gate"] for v in verdicts if v["verdict"] in ("fail", "missing")]
        undecided = [v["gate"] for v in verdicts if v["verdict"] not in ("pass", "fail", "missing")]
        if entry.audit:
            agree = not accepted
            entry.why += (f"; audit: the gates {'agree' if agree else 'DISAGREE'} "
                          f"({entry.gate_status}{': ' + ', '.join(failing) if failing else ''})")
        else:
            entry.why = (f"gates {entry.gate_status}" + (f": failed {', '.join(failing)}" if failing else "")
                         + (f"; undecided {', '.join(undecided)}" if undecided else ""))
        entry.status = ACCEPTED if accepted else REJECTED
        outcomes[candidate] = Outcome(entry.status, entry.kl)

    # --- the whole search ---------------------------------------------------------------------------

    async def run(self) -> SearchResult:
        t0 = time.monotonic()
        # The model's shapes decide which families it has (a dense model has no experts to start from) and
        # what each candidate is predicted to weigh: the source step first (cached like every step).
        await self._run_until([ids.SOURCE])
        self.predict, present = predictor(self.recipe, self.run_dir)
        procedure = ptq_order(self.spec.space, present)
        number = 0
        try:
            proposed = next(procedure)
            while True:
                _, _, stop = self._budget_left()
                if stop:
                    self.stopped_by = stop
                    break
                number += 1
                outcomes = await self.run_round(number, proposed)
                proposed = procedure.send(outcomes)
        except StopIteration:
            self.stopped_by = self.stopped_by or "the procedure tried every family"
        return SearchResult(self.spec, [e for e in self.entries.values()], self.thresholds,
                            self.stopped_by or "", number, round(time.monotonic() - t0, 1))

    def final_recipe(self, result: SearchResult) -> Recipe:
        """The recipe whose gates step judges the hand-written strategies and every served candidate."""
        served = [candidate_strategy(self.candidates[e.name], self.spec) for e in result.entries if e.served]
        return with_strategies(self.recipe, served)


@dataclass
class SearchResult:
    spec: SearchSpec
    entries: list[Entry]
    thresholds: list[dict[str, Any]]
    stopped_by: str
    rounds: int
    seconds: float

    def accepted(self) -> list[Entry]:
        return [e for e in self.entries if e.status == ACCEPTED]

    def best(self) -> Entry | None:
        """The accepted candidate best on the objective (ties: lower KL)."""
        def key(entry: Entry) -> tuple[float, float]:
            value = objective_value(entry, self.spec.objective)
            value = float("inf") if value is None else (-value if self.spec.objective == "decode_tok_s" else value)
            return value, entry.kl if entry.kl is not None else float("inf")
        accepted = self.accepted()
        return min(accepted, key=key) if accepted else None

    def audit_agreement(self) -> dict[str, int]:
        audits = [e for e in self.entries if e.audit and e.gate_status is not None]
        agree = sum(1 for e in audits if e.status != ACCEPTED)
        return {"audited": len(audits), "agree": agree, "disagree": len(audits) - agree}

    def to_json(self) -> dict[str, Any]:
        best = self.best()
        return {"objective": self.spec.objective, "procedure": self.spec.procedure,
                "budget": self.spec.budget.model_dump(), "rounds": self.rounds, "seconds": self.seconds,
                "stopped_by": self.stopped_by, "thresholds": self.thresholds,
                "audit": self.audit_agreement(), "best": best.name if best else None,
                "candidates": [e.to_json() for e in self.entries]}


def objective_value(entry: Entry, objective: str) -> float | None:
    from runner.search.report import objective_of  # the one reading of an objective from predictions

    return objective_of({"predicted": entry.predicted}, objective)


def predictor(recipe: Recipe, run_dir: RunDir
              ) -> tuple[Callable[[Strategy], dict[str, Any]] | None, set[str] | None]:
    """(A strategy's predicted footprint on the recipe's target (runner/quantization/footprint.py, no torch),
    the families the model has), from the model folder the plan reads (the run's source output, else a local
    source); (None, None) without one."""
    from runner.benchmark.prediction import hardware_target
    from runner.plan import build_plan
    from runner.quantization import Unknown, footprint
    from runner.quantization.weights import load_weights

    folder, _ = footprint.model_folder(recipe, run_dir, build_plan(recipe).keys[ids.SOURCE])
    if folder is None:
        return None, None
    weights = load_weights(folder)
    hardware = hardware_target(recipe.benchmark.hardware)
    carried = footprint.carry_patterns(recipe)

    def predict(strategy: Strategy) -> dict[str, Any]:
        try:
            fp = footprint.strategy_footprint(weights, strategy, recipe.quantization.exclusions(strategy), hardware,
                                              recipe.model.dtype, carried)
        except (Unknown, OSError, ValueError) as exc:
            return {"unknown": str(exc)}
        return {"checkpoint_bytes": fp.checkpoint_bytes, "bytes_per_token": fp.bytes_per_token,
                "decode_tok_s": fp.decode_tok_s, "effective_bits": fp.effective_bits, "hardware": fp.hardware}
    return predict, {family for module in weights.linears if (family := family_of(module)) is not None}


def write_record(run_dir: RunDir, result: SearchResult) -> Path:
    """search/search.json, pareto.md, pareto.svg and selected-strategy.yaml, each written atomically."""
    from runner.search.report import pareto_markdown, pareto_svg, strategy_snippet

    folder = run_dir.root / SEARCH_DIR
    folder.mkdir(parents=True, exist_ok=True)
    data = result.to_json()
    write_json_atomic(folder / "search.json", data)
    for name, text in (("pareto.md", pareto_markdown(data)), ("pareto.svg", pareto_svg(data)),
                       ("selected-strategy.yaml", strategy_snippet(data))):
        tmp = folder / f".{name}.tmp"
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(folder / name)
    return folder
