"""Expand a recipe into a graph of steps, each with its parameters and cache key.

    source -> calibrate -> [score.H ->] quantize.S -> export.S -> verify.S -> serve.S -> benchmark.S -+
                                                                 benchmark.baseline ------+-> gates -> report -> publish

One quantize/export/verify/serve/benchmark branch per enabled strategy; auto_quantize strategies that
share their scoring settings share one score step (runner/steps/score.py). Each step gets a typed input
(step_inputs.py) holding exactly what it reads. Its cache key is the hash of its kind, that input,
the files it reads, its code and the keys of the steps it depends on, so a change re-runs the steps
that read it and everything downstream of them, and nothing else.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from runner import __version__
from runner.benchmark.suites import sequential_gates
from runner.errors import RunnerError
from runner.recipe.fixups import CopyFile
from runner.recipe.schema import Recipe
from runner.serving.engine import engine_for
from runner.steps import ids
from runner.steps.base import Step
from runner.steps.code import code_files
from runner.steps.inputs import (
    BenchmarkInput,
    CalibrateInput,
    ExportInput,
    GatesInput,
    PublishInput,
    QuantizeInput,
    ReportInput,
    ScoreInput,
    ServeInput,
    ServingInput,
    SourceInput,
    VerifyInput,
)
from runner.steps.registry import slurm_kinds, step_kinds
from runner.vllm_env.environment import find as find_vllm

RUNNER_DIR = Path(__file__).resolve().parent


@dataclass
class Plan:
    recipe: Recipe
    steps: dict[str, Step]  # in topological order
    keys: dict[str, str] = field(default_factory=dict)
    # With --strategy: the steps of the recipe's other enabled strategies that gates, report and publish
    # read ({id: key in the full plan}), and those three steps' deps in the full plan. They do not run
    # here, but their current results still compete at gates and reach the card (with_rivals).
    rivals: dict[str, str] = field(default_factory=dict)
    full_deps: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def dependents(self, step_id: str) -> set[str]:
        """Every step that depends on `step_id`, directly or not."""
        out: set[str] = set()
        for sid, step in self.steps.items():
            if step_id in step.deps or out.intersection(step.deps):
                out.add(sid)
        return out

    def ancestors(self, step_id: str) -> set[str]:
        out: set[str] = set()
        stack = list(self.steps[step_id].deps)
        while stack:
            dep = stack.pop()
            if dep not in out:
                out.add(dep)
                if dep in self.steps:  # not a rival's benchmark, which is no step of this plan
                    stack.extend(self.steps[dep].deps)
        return out

    def match(self, patterns: list[str]) -> list[str]:
        """Step ids matching any pattern: an id, a kind (`quantize`) or a glob (`*.awq_lite`)."""
        found = [sid for sid, step in self.steps.items()
                 if any(p in (sid, step.kind) or fnmatch.fnmatchcase(sid, p) for p in patterns)]
        unknown = [p for p in patterns if not any(
            p in (sid, s.kind) or fnmatch.fnmatchcase(sid, p) for sid, s in self.steps.items())]
        if unknown:
            raise RunnerError(f"no step matches {', '.join(unknown)}; steps: {', '.join(self.steps)}")
        return found


def build_plan(recipe: Recipe, strategies: list[str] | None = None, search: dict[str, Any] | None = None) -> Plan:
    """The step graph of a recipe, restricted to the named strategies when given; `search` is the record of the
    recipe's search (runner/search/driver.py), which the card shows."""
    unknown = [name for name in recipe.execution.slurm.steps if name not in slurm_kinds()]
    if unknown:  # recipe validate says where (slurm_step_problems); a run refuses it too
        raise RunnerError(f"execution.slurm.steps: no step kind {', '.join(unknown)} runs a worker; name one of "
                          f"{', '.join(slurm_kinds())}")
    chosen = recipe.enabled_strategies()
    if strategies:
        names = [s.name for s in recipe.quantization.strategies]
        missing = [s for s in strategies if s not in names]
        if missing:
            raise RunnerError(f"no strategy named {', '.join(missing)} in the recipe; strategies: {', '.join(names)}")
        chosen = [s for s in recipe.quantization.strategies if s.name in strategies]

    steps: list[Step] = []
    model, calib = recipe.model, recipe.calibration
    source_files: tuple[Path, ...] = ()
    if model.source.kind in ("gguf", "local") and model.source.path is not None:
        source_files = (model.source.path,)
    steps.append(Step(ids.SOURCE, "source", (), SourceInput(
        source=model.source, architecture=model.architecture, dtype=model.dtype), input_files=source_files))
    # The recipe's set, and each alternative set a chosen strategy names: one calibrate step each.
    sets = {None: calib.source} | {s.calibration: calib.alternatives[s.calibration]
                                   for s in chosen if s.calibration is not None}
    for name, source in sets.items():
        files = (source.path,) if source.kind in ("jsonl", "text") else ()
        spec = calib.model_copy(update={"source": source, "alternatives": {}})
        steps.append(Step(ids.calibrate(name), "calibrate", (ids.SOURCE,), CalibrateInput(calibration=spec),
                          input_files=files))

    serving = ServingInput(serve=recipe.serve, container=recipe.container_for("serve"), dtype=model.dtype,
                           env_names=recipe.execution.env)
    bench = recipe.benchmark
    bench_inputs = {"serving": serving, "system_prompt": bench.system_prompt, "suites": bench.suites,
                    "speed": bench.speed, "concurrency": bench.concurrency}
    bench_ids = []
    looked_gates = sequential_gates(recipe)
    # A held-out teacher suite asks what the calibrate step set aside (calibration.source.eval_split).
    eval_split = (ids.CALIBRATE,) if any(ref.teacher_eval for ref in bench.suites) else ()
    vllm, vllm_why = find_vllm(recipe.verify.vllm_loader) if chosen else (None, "")
    for strategy in chosen:
        s = strategy.name
        exclude = recipe.quantization.exclusions(strategy)
        calib_deps = tuple(dict.fromkeys((ids.CALIBRATE, ids.calibrate(strategy.calibration))))
        samples = strategy.calib_samples or calib.samples
        score_step = None
        if strategy.auto_quantize is not None:  # scored once per setting, re-solved by each strategy
            spec = strategy.auto_quantize
            score = ScoreInput(formats=spec.formats, method=spec.method, num_calib_steps=spec.num_calib_steps,
                               num_score_steps=spec.num_score_steps, exclude=exclude,
                               calibration=strategy.calibration, calib_samples=samples, max_length=calib.max_length,
                               seed=calib.seed, dtype=model.dtype, architecture=model.architecture)
            score_step = ids.score(hashlib.sha256(json.dumps(score.key_payload(), sort_keys=True).encode())
                                   .hexdigest()[:8])
            if not any(step.id == score_step for step in steps):
                steps.append(Step(score_step, "score", (ids.SOURCE, ids.calibrate(strategy.calibration)), score))
        steps.append(Step(ids.quantize(s), "quantize", (ids.SOURCE, *calib_deps, *(
            (score_step,) if score_step else ())), QuantizeInput(
            strategy=strategy, exclude=exclude, calib_samples=samples,
            max_length=calib.max_length, seed=calib.seed, dtype=model.dtype, architecture=model.architecture,
            held_out=calib.held_out, held_out_after=calib.samples, sensitivity=strategy.sensitivity,
            score_step=score_step), s))
        fixup_files = tuple(Path(f.source) for f in recipe.export.fixups
                            if isinstance(f, CopyFile) and f.model_file is None)
        steps.append(Step(ids.export(s), "export", (ids.quantize(s), ids.SOURCE),
                          ExportInput(fixups=recipe.export.fixups), s, input_files=fixup_files))
        steps.append(Step(ids.verify(s), "verify", (ids.export(s), ids.SOURCE, ids.quantize(s)),
                          VerifyInput(exclude=exclude, engine=recipe.serve.engine,
                                      vllm_loader=recipe.verify.vllm_loader, vllm=vllm, vllm_not_run=vllm_why,
                                      language_model_only="--language-model-only" in recipe.serve.args,
                                      fixups=recipe.export.fixups), s))
        steps.append(Step(ids.serve(s), "serve", (ids.verify(s), ids.export(s)),
                          ServeInput(serving=serving, hardware=bench.hardware), s))
        paired = paired_speed(recipe)
        # Sequential looks judge relative gates against the baseline's answers: it benchmarks first.
        after_baseline = (ids.BASELINE_BENCHMARK,) if bench.baseline is not None and any(
            g.relative_to == "baseline" for g in looked_gates) else ()
        steps.append(Step(ids.benchmark(s), "benchmark",
                          (ids.serve(s), ids.export(s), ids.quantize(s), ids.verify(s),
                           *((ids.SOURCE,) if paired else ()),
                           *after_baseline, *eval_split),
                          BenchmarkInput(**bench_inputs, paired_baseline=paired, sequential_gates=looked_gates),
                          s))
        bench_ids.append(ids.benchmark(s))

    if bench.baseline is not None:
        # The user's endpoint runs elsewhere: its benchmark holds no GPU here.
        steps.append(Step(ids.BASELINE_BENCHMARK, "benchmark", (ids.SOURCE, *eval_split),
                          BenchmarkInput(**bench_inputs, baseline=bench.baseline),
                          heavy=bench.baseline.kind == "served"))
        bench_ids.append(ids.BASELINE_BENCHMARK)

    steps.append(Step(ids.GATES, "gates", tuple(bench_ids), GatesInput(
        gates=recipe.gates, selection=recipe.selection,
        baseline_name=bench.baseline.name if bench.baseline else None,
        negative_controls=[s.name for s in recipe.quantization.strategies if s.negative_control])))
    # The card documents the whole run: report reads every step before it (ctx.input, never sideways).
    steps.append(Step(ids.REPORT, "report", tuple(step.id for step in steps),
                      ReportInput(recipe=recipe, search=search)))
    # Publish uploads the selected export with the card: gates names it, report wrote the card.
    steps.append(Step(ids.PUBLISH, "publish", (ids.GATES, ids.REPORT, *(ids.export(s.name) for s in chosen)),
                      PublishInput(recipe=recipe)))

    kinds = step_kinds()
    steps = [step if step.heavy is not None else replace(step, heavy=kinds[step.kind].gpu) for step in steps]
    plan = Plan(recipe, {step.id: step for step in steps})
    plan.keys = {sid: "" for sid in plan.steps}
    for sid, step in plan.steps.items():
        plan.keys[sid] = step_key(step, [plan.keys[d] for d in step.deps])
    if strategies:
        full = build_plan(recipe)
        plan.full_deps = {sid: full.steps[sid].deps for sid in JUDGING}
        plan.rivals = {d: full.keys[d] for sid in JUDGING for d in full.steps[sid].deps if d not in plan.steps}
    return plan


# The steps over every strategy, which with --strategy still read the other strategies' current results.
JUDGING = (ids.GATES, ids.REPORT, ids.PUBLISH)


def with_rivals(plan: Plan, is_complete: Callable[[str, str], bool]) -> Plan:
    """The plan whose gates, report and publish steps read, besides the strategies it runs, every other
    enabled strategy of the recipe with current results (`is_complete(step id, key)`), and whose gates
    names the ones without a current benchmark (GatesInput.not_benchmarked): `--strategy` limits what runs,
    not what competes. Those steps are deps but no steps of the plan (their keys are in `keys`); once
    every strategy is current, each of the three has the full plan's deps, input and key, so the full plan
    finds its results current."""
    if not plan.rivals or ids.GATES not in plan.steps:
        return plan
    current = {sid: key for sid, key in plan.rivals.items() if is_complete(sid, key)}
    reading = {}
    for sid in JUDGING:
        if sid in plan.steps:
            step = plan.steps[sid]
            reading[sid] = replace(step, deps=tuple(d for d in plan.full_deps[sid] if d in plan.steps or d in current))
    gates = reading[ids.GATES]
    reading[ids.GATES] = replace(gates, inputs=gates.inputs.model_copy(update={"not_benchmarked": [
        ids.strategy_of(sid) for sid in plan.rivals
        if sid in plan.full_deps[ids.GATES] and sid not in current]}))
    judged = Plan(plan.recipe, {sid: reading.get(sid, step) for sid, step in plan.steps.items()},
                  {**plan.keys, **current})
    after = plan.dependents(ids.GATES)
    for sid, step in judged.steps.items():
        if sid == ids.GATES or sid in after:
            judged.keys[sid] = step_key(step, [judged.keys[d] for d in step.deps])
    return judged


def paired_speed(recipe: Recipe) -> bool:
    """Whether candidates measure their speed interleaved with the served baseline (SpeedSpec.paired_baseline)."""
    bench = recipe.benchmark
    if bench.baseline is None or bench.baseline.kind != "served" or bench.speed.paired_baseline == "off":
        return False
    return bench.speed.paired_baseline == "on" or engine_for(recipe.serve.engine).pairs_speed_by_default


def step_key(step: Step, dep_keys: list[str]) -> str:
    """The hash of what decides a step's result: its kind, its input, the files it reads, the keys of
    the steps it depends on, and the code that executes it (an edited step module re-runs the step).
    Paths inside this checkout are hashed relative to it and files by content, so the same run
    directory planned from a moved or re-cloned checkout finds its steps current."""
    payload = {
        "kind": step.kind,
        "inputs": relocatable(step.params),
        "deps": dep_keys,
        "files": {relocatable(str(p)): fingerprint(p) for p in step.input_files},
        "code": code_fingerprint(step.kind),
        "runner": __version__,
    }
    blob = json.dumps(payload, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:20]


CHECKOUT = RUNNER_DIR.parent  # recipes/, containers/, the vLLM environment: where this checkout is


def relocatable(value: Any) -> Any:
    """`value` (a step's JSON input) with every absolute path inside this checkout written relative to it
    (`$CHECKOUT/recipes/demo/calibration.jsonl`): where the checkout lies is no part of a result."""
    if isinstance(value, dict):
        return {k: relocatable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [relocatable(v) for v in value]
    if isinstance(value, str) and value.startswith("/"):
        path = Path(os.path.normpath(value))  # recipes/demo/../models/x is recipes/models/x
        if path.is_relative_to(CHECKOUT):
            return f"$CHECKOUT/{path.relative_to(CHECKOUT).as_posix()}"
    return value


def code_fingerprint(kind: str) -> str:
    """The hash of the source files that execute a step kind (steps/code.py), read once per process."""
    if kind not in _code_hashes:
        digest = hashlib.sha256()
        for relative in code_files(kind, RUNNER_DIR):
            path = RUNNER_DIR / relative
            digest.update(relative.encode() + b"\0" + (path.read_bytes() if path.exists() else b"missing") + b"\0")
        _code_hashes[kind] = digest.hexdigest()
    return _code_hashes[kind]


_code_hashes: dict[str, str] = {}


WHOLE_FILE_BYTES = 16 << 20  # files up to this size are hashed whole
EDGE_BYTES = 1 << 20  # of a larger one (a weights shard), its size and first and last MiB


def fingerprint(path: Path) -> str:
    """Content hash of a file, or of a directory's files (names and contents). Hashing a many-GB
    checkpoint on every `recipe plan` would be slow: a file over 16 MiB counts by its size and its first
    and last MiB (a safetensors shard's header and tail), which a copy keeps and an edit changes."""
    if path.is_file():
        return _file_digest(path)
    if path.is_dir():
        entries = sorted((p.relative_to(path).as_posix(), _file_digest(p)) for p in path.rglob("*") if p.is_file())
        return hashlib.sha256(json.dumps(entries).encode()).hexdigest()
    return "missing"


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    size = path.stat().st_size
    with path.open("rb") as fh:
        if size <= WHOLE_FILE_BYTES:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
        else:
            digest.update(str(size).encode() + b"\0" + fh.read(EDGE_BYTES))
            fh.seek(size - EDGE_BYTES)
            digest.update(fh.read(EDGE_BYTES))
    return digest.hexdigest()
