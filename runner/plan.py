"""Expand a recipe into a graph of steps, each with its parameters and cache key.

    source -> calibrate -> quantize.S -> export.S -> verify.S -> serve.S -> benchmark.S -+
                                                                 benchmark.baseline ------+-> gates -> report -> publish

One quantize/export/verify/serve/benchmark branch per enabled strategy. Each step gets a typed input
(step_inputs.py) holding exactly what it reads. Its cache key is the hash of its kind, that input,
the files it reads, its code and the keys of the steps it depends on, so a change re-runs the steps
that read it and everything downstream of them, and nothing else.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from runner import __version__
from runner.benchmark.suites import sequential_gates
from runner.errors import RunnerError
from runner.recipe.schema import Recipe
from runner.serving.engine import engine_for
from runner.steps.code import code_files
from runner.steps.fixups import CopyFile
from runner.steps.inputs import (
    BenchmarkInput,
    CalibrateInput,
    ExportInput,
    GatesInput,
    PublishInput,
    QuantizeInput,
    ReportInput,
    ServeInput,
    ServingInput,
    SourceInput,
    StepInput,
    VerifyInput,
    calibrate_step,
)
from runner.vllm_env.environment import find as find_vllm

RUNNER_DIR = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Step:
    id: str
    kind: str
    deps: tuple[str, ...]
    inputs: StepInput  # everything the step reads (step_inputs.py); its cache key hashes it
    strategy: str | None = None
    # Files whose content the step reads (fingerprinted into the key).
    input_files: tuple[Path, ...] = ()
    heavy: bool = False  # needs the GPU (or, on a CPU machine, most of the cores and memory)

    @property
    def params(self) -> dict[str, Any]:
        """The input as JSON: what the key hashes and the record keeps."""
        return self.inputs.key_payload()


@dataclass
class Plan:
    recipe: Recipe
    steps: dict[str, Step]  # in topological order
    keys: dict[str, str] = field(default_factory=dict)
    # With --strategy: the benchmark steps of the recipe's other enabled strategies ({id: key in the full
    # plan}). They do not run here, but their current results still compete at gates (with_rivals).
    rivals: dict[str, str] = field(default_factory=dict)

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


def build_plan(recipe: Recipe, strategies: list[str] | None = None) -> Plan:
    """The step graph of a recipe, restricted to the named strategies when given."""
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
    steps.append(Step("source", "source", (), SourceInput(
        source=model.source, architecture=model.architecture, dtype=model.dtype), input_files=source_files))
    # The recipe's set, and each alternative set a chosen strategy names: one calibrate step each.
    sets = {None: calib.source} | {s.calibration: calib.alternatives[s.calibration]
                                   for s in chosen if s.calibration is not None}
    for name, source in sets.items():
        files = (source.path,) if source.kind in ("jsonl", "text") else ()
        spec = calib.model_copy(update={"source": source, "alternatives": {}})
        steps.append(Step(calibrate_step(name), "calibrate", ("source",), CalibrateInput(calibration=spec),
                          input_files=files))

    serving = ServingInput(serve=recipe.serve, container=recipe.container_for("serve"), dtype=model.dtype,
                           env_names=recipe.execution.env)
    bench = recipe.benchmark
    bench_inputs = {"serving": serving, "system_prompt": bench.system_prompt, "suites": bench.suites,
                    "speed": bench.speed, "concurrency": bench.concurrency}
    bench_ids = []
    looked_gates = sequential_gates(recipe)
    # A held-out teacher suite asks what the calibrate step set aside (calibration.source.eval_split).
    eval_split = ("calibrate",) if any(ref.teacher_eval for ref in bench.suites) else ()
    vllm, vllm_why = find_vllm(recipe.verify.vllm_loader) if chosen else (None, "")
    for strategy in chosen:
        s = strategy.name
        exclude = recipe.quantization.exclusions(strategy)
        calib_deps = tuple(dict.fromkeys(("calibrate", calibrate_step(strategy.calibration))))
        steps.append(Step(f"quantize.{s}", "quantize", ("source", *calib_deps), QuantizeInput(
            strategy=strategy, exclude=exclude, calib_samples=strategy.calib_samples or calib.samples,
            max_length=calib.max_length, seed=calib.seed, dtype=model.dtype, architecture=model.architecture,
            held_out=calib.held_out, held_out_after=calib.samples), s, heavy=True))
        fixup_files = tuple(Path(f.source) for f in recipe.export.fixups
                            if isinstance(f, CopyFile) and f.model_file is None)
        steps.append(Step(f"export.{s}", "export", (f"quantize.{s}", "source"),
                          ExportInput(fixups=recipe.export.fixups), s, input_files=fixup_files))
        steps.append(Step(f"verify.{s}", "verify", (f"export.{s}", "source", f"quantize.{s}"),
                          VerifyInput(exclude=exclude, engine=recipe.serve.engine,
                                      vllm_loader=recipe.verify.vllm_loader, vllm=vllm, vllm_not_run=vllm_why,
                                      language_model_only="--language-model-only" in recipe.serve.args), s))
        steps.append(Step(f"serve.{s}", "serve", (f"verify.{s}", f"export.{s}"),
                          ServeInput(serving=serving, hardware=bench.hardware), s, heavy=True))
        paired = paired_speed(recipe)
        # Sequential looks judge relative gates against the baseline's answers: it benchmarks first.
        after_baseline = ("benchmark.baseline",) if bench.baseline is not None and any(
            g.relative_to == "baseline" for g in looked_gates) else ()
        steps.append(Step(f"benchmark.{s}", "benchmark",
                          (f"serve.{s}", f"export.{s}", f"quantize.{s}", *(("source",) if paired else ()),
                           *after_baseline, *eval_split),
                          BenchmarkInput(**bench_inputs, paired_baseline=paired, sequential_gates=looked_gates),
                          s, heavy=True))
        bench_ids.append(f"benchmark.{s}")

    if bench.baseline is not None:
        steps.append(Step("benchmark.baseline", "benchmark", ("source", *eval_split),
                          BenchmarkInput(**bench_inputs, baseline=bench.baseline),
                          heavy=bench.baseline.kind == "served"))
        bench_ids.append("benchmark.baseline")

    steps.append(Step("gates", "gates", tuple(bench_ids), GatesInput(
        gates=recipe.gates, selection=recipe.selection,
        baseline_name=bench.baseline.name if bench.baseline else None,
        negative_controls=[s.name for s in recipe.quantization.strategies if s.negative_control])))
    steps.append(Step("report", "report", ("gates",), ReportInput(recipe=recipe)))
    steps.append(Step("publish", "publish", ("report",), PublishInput(recipe=recipe)))

    plan = Plan(recipe, {step.id: step for step in steps})
    plan.keys = {sid: "" for sid in plan.steps}
    for sid, step in plan.steps.items():
        plan.keys[sid] = step_key(step, [plan.keys[d] for d in step.deps])
    if strategies:
        full = build_plan(recipe)
        plan.rivals = {d: full.keys[d] for d in full.steps["gates"].deps if d not in plan.steps}
    return plan


def with_rivals(plan: Plan, is_complete: Callable[[str, str], bool]) -> Plan:
    """The plan whose gates step judges, besides the strategies it runs, every other enabled strategy of
    the recipe with a current benchmark (`is_complete(step id, key)`), and names the ones without one
    (GatesInput.not_benchmarked): `--strategy` limits what runs, not what competes. Those benchmarks are
    deps of gates but no steps of the plan (their keys are in `keys`); once every strategy is current,
    gates has the full plan's deps, input and key, so the full plan finds its result current."""
    if not plan.rivals or "gates" not in plan.steps:
        return plan
    current = {sid: key for sid, key in plan.rivals.items() if is_complete(sid, key)}
    order = {f"benchmark.{s.name}": i for i, s in enumerate(plan.recipe.quantization.strategies)}
    gates = plan.steps["gates"]
    gates = replace(gates, deps=tuple(sorted((*gates.deps, *current), key=lambda d: order.get(d, len(order)))),
                    inputs=gates.inputs.model_copy(update={"not_benchmarked": [
                        sid.removeprefix("benchmark.") for sid in plan.rivals if sid not in current]}))
    judged = Plan(plan.recipe, {sid: gates if sid == "gates" else step for sid, step in plan.steps.items()},
                  {**plan.keys, **current})
    after = plan.dependents("gates")
    for sid, step in judged.steps.items():
        if sid == "gates" or sid in after:
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
    the steps it depends on, and the code that executes it (an edited step module re-runs the step)."""
    payload = {
        "kind": step.kind,
        "inputs": step.params,
        "deps": dep_keys,
        "files": {str(p): fingerprint(p) for p in step.input_files},
        "code": code_fingerprint(step.kind),
        "runner": __version__,
    }
    blob = json.dumps(payload, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:20]


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


def fingerprint(path: Path) -> str:
    """Content hash of a file (or, for a directory, of its files' names, sizes and mtimes)."""
    if path.is_file():
        digest = hashlib.sha256()
        with path.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
        return digest.hexdigest()
    if path.is_dir():
        # Hashing a many-GB checkpoint on every `recipe plan` would be slow; its listing is enough.
        entries = sorted((str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns)
                         for p in path.rglob("*") if p.is_file())
        return hashlib.sha256(json.dumps(entries).encode()).hexdigest()
    return "missing"
