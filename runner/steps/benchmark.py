"""The `benchmark.S` step (and `benchmark.baseline`): the suites and the speed sweep against one server.

benchmark.S serves the candidate again; the baseline is the source model served the same way or the
user's own endpoint. A candidate whose gates read a suite asks it in sequential looks (the baseline
answers every item first). The results file is what the gates step judges.

A server that speculates (vLLM with `serve.speculative`) is asked for its draft counters on /metrics
before the first request and after the last, so the recorded acceptance rate is this benchmark's own;
it is null when the server exposes no such counters or proposed no drafts.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import platform
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp

from runner.benchmark.prediction import tensor_bytes
from runner.benchmark.speed import speed_sweep
from runner.benchmark.suites import ask_in_looks, suite_run
from runner.benchmark.tool_calls import DEFAULT_PARSER, parser_from_args, unsupported_parser
from runner.recipe.metrics import Metric
from runner.recipe.schema import SuiteRef
from runner.run_dir import write_json_atomic
from runner.serving import engine_for, kernel_path, serving
from runner.serving.engine import ENDPOINT
from runner.serving.server import RunningServer, draft_acceptance, spec_decode_counters
from runner.steps import ids
from runner.steps.base import StepContext, StepKind, StepResult, input_of
from runner.steps.inputs import BenchmarkInput


@contextlib.asynccontextmanager
async def _candidate(ctx: StepContext) -> AsyncIterator[tuple[RunningServer, Path | None, str]]:
    """The server to benchmark: a served candidate, the served source model, or the user's endpoint."""
    inputs: BenchmarkInput = input_of(ctx, BenchmarkInput)
    if ctx.step.strategy is None:
        baseline = inputs.baseline
        assert baseline is not None
        if baseline.kind == "endpoint":
            yield RunningServer(baseline.url, baseline.model, ENDPOINT), None, baseline.name
            return
        model_dir = ctx.input(ids.SOURCE, "model_dir")
        async with serving(inputs.serving, model_dir, ctx.run_dir, ctx.step.id, "baseline") as srv:
            yield srv, model_dir, baseline.name
        return
    checkpoint = ctx.input(ids.export(ctx.strategy), "checkpoint")
    async with serving(inputs.serving, checkpoint, ctx.run_dir, ctx.step.id, ctx.step.strategy) as srv:
        yield srv, checkpoint, ctx.step.strategy


@contextlib.asynccontextmanager
async def _paired_baseline(ctx: StepContext) -> AsyncIterator[RunningServer | None]:
    """The source model served next to the candidate, for the interleaved speed run (or None)."""
    inputs: BenchmarkInput = input_of(ctx, BenchmarkInput)
    if ctx.step.strategy is None or not inputs.paired_baseline:
        yield None
        return
    async with serving(inputs.serving, ctx.input(ids.SOURCE, "model_dir"), ctx.run_dir, ctx.step.id,
                       "baseline", pin_port=False) as srv:
        ctx.log.info("speed: interleaved with the baseline served alongside (A B B A ...)")
        yield srv


async def run(ctx: StepContext) -> StepResult:
    spec: BenchmarkInput = input_of(ctx, BenchmarkInput)
    async with contextlib.AsyncExitStack() as stack:
        # The two servers start side by side: most of a start is single-threaded imports and loading.
        async with asyncio.TaskGroup() as starting:
            candidate = starting.create_task(stack.enter_async_context(_candidate(ctx)))
            paired = starting.create_task(stack.enter_async_context(_paired_baseline(ctx)))
        (server, model_dir, name), baseline = candidate.result(), paired.result()
        session = await stack.enter_async_context(aiohttp.ClientSession())
        drafts_before = await spec_decode_counters(session, server)
        suites = {}
        for ref in spec.suites:
            suites[ref.name] = await ask_suite(ctx, session, server, ref)
            ctx.log.info("suite %s: %d/%d passed (answers %s)", ref.name, suites[ref.name]["passed"],
                         suites[ref.name]["total"], suites[ref.name]["answers_sha256"][:12])
        speed = await speed_sweep(session, server.url, server.model, spec.speed,
                                  paired_with=(baseline.url, baseline.model) if baseline else None)
        acceptance = draft_acceptance(drafts_before, await spec_decode_counters(session, server))
        where = measured_on(server.engine) | {"numerics": await served_numerics(session, server)}
    results: dict[str, Any] = {"name": name, "engine": server.engine, "suites": suites, "speed": speed,
                               "answers_sha256": combined_hash(suites), "measured_on": where,
                               # MTP / draft acceptance over this benchmark's requests; null: not speculating
                               "draft_acceptance_rate": acceptance["acceptance_rate"] if acceptance else None,
                               "speculative_decoding": acceptance}
    if model_dir is not None and server.engine != ENDPOINT:
        results["server_args"] = engine_for(server.engine).server_args(spec.serving, model_dir).args
    if model_dir is not None:
        size = sum(tensor_bytes(model_dir).values())
        results["size"] = {"bytes": size, "gb": round(size / 1e9, 3)}
    results["kl"] = fidelity_to_source(ctx)
    if ctx.step.strategy is not None:
        results["export"] = export_facts(ctx)
    if ctx.step.strategy is not None:
        serve_record = ctx.input_record(ids.serve(ctx.strategy))
        prediction = serve_record.get("summary", {}).get("prediction")
        if prediction:
            results["prediction"] = prediction
    write_json_atomic(ctx.scratch / "results.json", results)
    summary = {k: v for k, v in results.items() if k != "suites"}
    summary["suites"] = {n: {k: v for k, v in s.items() if k != "items"} for n, s in suites.items()}
    return StepResult(outputs={"results": "results.json"}, summary=summary)


async def ask_suite(ctx: StepContext, session: aiohttp.ClientSession, server: RunningServer,
                    ref: SuiteRef) -> dict[str, Any]:
    """A suite's answers. A candidate whose gates read the suite asks it in sequential looks and stops once
    every such gate passes or fails (suites.ask_in_looks); the baseline answers every item."""
    spec: BenchmarkInput = input_of(ctx, BenchmarkInput)
    eval_file = None
    if ref.teacher_eval and ids.CALIBRATE in ctx.step.deps:
        with contextlib.suppress(KeyError):  # no eval output: suite_run says why
            eval_file = ctx.input(ids.CALIBRATE, "eval")
    # The recipe's parser is the one its server reads calls with (vLLM and the local engine alike); the
    # user's own endpoint's is unknown, and vLLM may have one not implemented here: hermes then, as before.
    named = parser_from_args(spec.serving.serve.args) if server.engine != ENDPOINT else None
    parser = named if named and unsupported_parser(named) is None else DEFAULT_PARSER
    run = suite_run(ref, session, server.url, server.model, spec.system_prompt, spec.concurrency, eval_file, parser)
    gates = [g for g in spec.sequential_gates if Metric.parse(g.metric).group == ref.name] \
        if ctx.step.strategy is not None else []
    baseline = (json.loads(ctx.input(ids.BASELINE_BENCHMARK, "results").read_text(encoding="utf-8"))
                if gates and ids.BASELINE_BENCHMARK in ctx.step.deps else None)
    return await ask_in_looks(run, gates, baseline, lambda line: ctx.log.info("%s", line))


def fidelity_to_source(ctx: StepContext) -> dict[str, Any] | None:
    """The `kl` metrics: the candidate's logits against the source model's, as the quantize worker
    measured them (held-out conversations where the calibration file has them); the baseline served
    from the source is the source (KL 0, top-1 agreement 1); an endpoint baseline is not measured."""
    if ctx.step.strategy is None:
        baseline = input_of(ctx, BenchmarkInput).baseline
        return {"kl": 0.0, "top1_agreement": 1.0, "kl_interval": [0.0, 0.0], "top1_interval": [1.0, 1.0],
                "measured_on": "the source itself"} \
            if baseline is not None and baseline.kind == "served" else None
    fidelity = ctx.input_record(ids.quantize(ctx.strategy)).get("summary", {}).get("fidelity") or {}
    if fidelity.get("kl") is None:
        return None
    # The intervals (a bootstrap over conversations) and how many conversations: what a gate on
    # kl.kl / kl.top1_agreement can judge uncertainty by. Absent in records written before them.
    return {"kl": fidelity["kl"], "top1_agreement": fidelity.get("top1_agreement"), "tokens": fidelity.get("tokens"),
            "kl_interval": fidelity.get("kl_interval"), "top1_interval": fidelity.get("top1_interval"),
            "conversations": fidelity.get("conversations"), "measured_on": fidelity.get("measured_on")}


def export_facts(ctx: StepContext) -> dict[str, Any]:
    """What the candidate is, from the records of what ran: its export step, the quant_algo verify read,
    the layer formats and exclusions the quantize worker applied. Gates names the selected one from it."""
    quantize = ctx.input_record(ids.quantize(ctx.strategy)).get("summary", {})
    verify = ctx.input_record(ids.verify(ctx.strategy)).get("summary", {})
    return {"step": ids.export(ctx.strategy), "quant_algo": verify.get("quant_algo"),
            "layer_formats": quantize.get("formats"), "exclude": quantize.get("exclude")}


def combined_hash(suites: dict[str, dict[str, Any]]) -> str:
    """One fingerprint of every answer of every suite: two runs with equal hashes gave equal answers."""
    joined = "".join(f"{name}:{suite['answers_sha256']};" for name, suite in sorted(suites.items()))
    return hashlib.sha256(joined.encode()).hexdigest()


async def served_numerics(session: aiohttp.ClientSession, server: RunningServer) -> str | None:
    """What the server computes with, as it says on /health (the local engine does; others: None)."""
    if not server.numerics_on_health:
        return None
    try:
        async with session.get(server.url.removesuffix("/v1") + "/health",
                               timeout=aiohttp.ClientTimeout(total=10)) as resp:
            return (await resp.json()).get("numerics")
    except (aiohttp.ClientError, TimeoutError, ValueError):
        return None


def measured_on(engine: str) -> dict[str, Any]:
    """Where the speed numbers come from: the machine and the kernel path, for honest labels."""
    gpu = None
    if shutil.which("nvidia-smi"):
        probe = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                               text=True)
        gpu = probe.stdout.strip().splitlines()[0] if probe.returncode == 0 and probe.stdout.strip() else None
    return {"engine": engine, "kernel_path": kernel_path(engine), "gpu": gpu,
            "cpu": cpu_name(), "cores": os.cpu_count()}


def cpu_name() -> str:
    """The processor's model name ("AMD EPYC 7B13"), not just its architecture."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("model name") and ":" in line:
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


KIND = StepKind("benchmark", run, input=BenchmarkInput, modules=("steps/benchmark.py", "worker/local_server.py"),
                gpu=True)
