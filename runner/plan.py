"""Expand a recipe into a graph of steps, each with its parameters and cache key.

    source -> calibrate -> quantize.S -> export.S -> verify.S -> serve.S -> benchmark.S -+
                                                                 benchmark.baseline ------+-> gates -> report -> publish

One quantize/export/verify/serve/benchmark branch per enabled strategy. A step's cache key is the
hash of its kind, parameters, input fingerprints and the keys of the steps it depends on, so a
change anywhere upstream re-runs everything downstream of it and nothing else.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runner import __version__
from runner.errors import RunnerError
from runner.schema import Recipe


@dataclass(frozen=True)
class Step:
    id: str
    kind: str
    deps: tuple[str, ...]
    params: dict[str, Any]
    strategy: str | None = None
    # Files whose content the step reads (fingerprinted into the key).
    input_files: tuple[Path, ...] = ()
    heavy: bool = False  # needs the GPU (or, on a CPU machine, most of the cores and memory)


@dataclass
class Plan:
    recipe: Recipe
    steps: dict[str, Step]  # in topological order
    keys: dict[str, str] = field(default_factory=dict)

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
    source = recipe.model.source
    source_files: tuple[Path, ...] = ()
    if source.kind == "gguf" and source.path is not None or source.kind == "local":
        source_files = (source.path,)
    steps.append(Step("source", "source", (), {"model": recipe.model.model_dump(mode="json")},
                      input_files=source_files))

    calib = recipe.calibration
    calib_files: tuple[Path, ...] = ()
    if calib.source.kind == "jsonl":
        calib_files = (calib.source.path,)
    steps.append(Step("calibrate", "calibrate", ("source",), {"calibration": calib.model_dump(mode="json")},
                      input_files=calib_files))

    bench_ids = []
    for strategy in chosen:
        s = strategy.name
        quant_params = {
            "strategy": strategy.model_dump(mode="json"),
            "exclude": recipe.quantization.exclusions(strategy),
            "calib_samples": strategy.calib_samples or calib.samples,
            "max_length": calib.max_length,
            "seed": calib.seed,
            "dtype": recipe.model.dtype,
            "architecture": recipe.model.architecture,
        }
        steps.append(Step(f"quantize.{s}", "quantize", ("source", "calibrate"), quant_params, s, heavy=True))
        fixup_files = tuple(
            Path(f.source) for f in recipe.export.fixups
            if f.op == "copy_file" and not f.source.startswith("model:"))
        steps.append(Step(f"export.{s}", "export", (f"quantize.{s}", "source"),
                          {"fixups": [f.model_dump(mode="json") for f in recipe.export.fixups]}, s,
                          input_files=fixup_files))
        steps.append(Step(f"verify.{s}", "verify", (f"export.{s}", "source", f"quantize.{s}"),
                          {"exclude": quant_params["exclude"], "engine": recipe.serve.engine}, s))
        steps.append(Step(f"serve.{s}", "serve", (f"verify.{s}", f"export.{s}"),
                          {"serve": recipe.serve.model_dump(mode="json"), "hardware": recipe.benchmark.hardware},
                          s, heavy=True))
        steps.append(Step(f"benchmark.{s}", "benchmark", (f"serve.{s}", f"export.{s}"),
                          {"benchmark": recipe.benchmark.model_dump(mode="json"),
                           "serve": recipe.serve.model_dump(mode="json")}, s, heavy=True))
        bench_ids.append(f"benchmark.{s}")

    if recipe.benchmark.baseline is not None:
        steps.append(Step("benchmark.baseline", "benchmark", ("source",),
                          {"benchmark": recipe.benchmark.model_dump(mode="json"), "baseline": True,
                           "serve": recipe.serve.model_dump(mode="json")},
                          heavy=recipe.benchmark.baseline.kind == "served"))
        bench_ids.append("benchmark.baseline")

    steps.append(Step("gates", "gates", tuple(bench_ids),
                      {"gates": [g.model_dump(mode="json") for g in recipe.gates],
                       "selection": recipe.selection.model_dump(mode="json")}))
    steps.append(Step("report", "report", ("gates",), {"report": recipe.report.model_dump(mode="json")}))
    steps.append(Step("publish", "publish", ("report",), {"publish": recipe.publish.model_dump(mode="json")}))

    plan = Plan(recipe, {step.id: step for step in steps})
    plan.keys = {sid: "" for sid in plan.steps}
    for sid, step in plan.steps.items():
        plan.keys[sid] = step_key(step, [plan.keys[d] for d in step.deps])
    return plan


def step_key(step: Step, dep_keys: list[str]) -> str:
    payload = {
        "kind": step.kind,
        "params": step.params,
        "deps": dep_keys,
        "files": {str(p): fingerprint(p) for p in step.input_files},
        "runner": __version__,
    }
    blob = json.dumps(payload, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:20]


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
