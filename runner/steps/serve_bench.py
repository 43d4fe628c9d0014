"""The serve, benchmark and gates steps.

serve.S starts the candidate with the recipe's engine, checks that it answers, records the start-up
time and the decode speed predicted for the target hardware, and stops it. benchmark.S serves it
again for the suites and the speed sweep (the baseline is the user's endpoint or the source model
served the same way). gates judges every candidate against the recipe's gates and names the best;
a strategy whose branch failed is no candidate, and gates records where and why it failed.
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
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp

from runner.benchmark.gates import comparison_markdown, evaluate, plot_gates, plot_ttft_curve, select
from runner.benchmark.harness import stream_chat
from runner.benchmark.prediction import predict_decode, tensor_bytes
from runner.benchmark.speed import speed_sweep
from runner.benchmark.suites import ask_in_looks, suite_run
from runner.benchmark.tool_calls import DEFAULT_PARSER, parser_from_args, unsupported_parser
from runner.errors import RunnerError
from runner.recipe.metrics import Metric
from runner.recipe.schema import SuiteRef
from runner.run_dir import write_json_atomic
from runner.serving import kernel_path, serving
from runner.serving.server import RunningServer
from runner.steps.base import StepContext, StepResult, input_of
from runner.steps.inputs import NOT_BENCHMARKED, BenchmarkInput, GatesInput, ServeInput


async def serve(ctx: StepContext) -> StepResult:
    inputs: ServeInput = input_of(ctx, ServeInput)
    checkpoint = ctx.input(f"export.{ctx.step.strategy}", "checkpoint")
    prediction = predict_decode(checkpoint, inputs.hardware)
    ctx.log.info("predicted decode on %s: %.1f tok/s (%d bytes a token)", prediction["hardware"],
                 prediction["predicted_decode_tok_s"], prediction["bytes_per_token"])
    t0 = time.monotonic()
    async with serving(inputs.serving, checkpoint, ctx.run_dir, ctx.step.id, ctx.step.strategy or "model") as srv:
        startup_s = time.monotonic() - t0
        async with aiohttp.ClientSession() as session:
            probe = await stream_chat(session, srv.url, srv.model, [{"role": "user", "content": "Say hello."}], 16)
    if not probe.ok:
        raise RunnerError(f"the served candidate did not answer a first request: {probe.error}")
    return StepResult(summary={"engine": inputs.serving.serve.engine, "startup_s": round(startup_s, 2),
                               "first_answer": probe.content[:200], "prediction": prediction})


@contextlib.asynccontextmanager
async def _candidate(ctx: StepContext) -> AsyncIterator[tuple[RunningServer, Path | None, str]]:
    """The server to benchmark: a served candidate, the served source model, or the user's endpoint."""
    inputs: BenchmarkInput = input_of(ctx, BenchmarkInput)
    if ctx.step.strategy is None:
        baseline = inputs.baseline
        assert baseline is not None
        if baseline.kind == "endpoint":
            yield RunningServer(baseline.url, baseline.model, "endpoint"), None, baseline.name
            return
        model_dir = ctx.input("source", "model_dir")
        async with serving(inputs.serving, model_dir, ctx.run_dir, ctx.step.id, "baseline") as srv:
            yield srv, model_dir, baseline.name
        return
    checkpoint = ctx.input(f"export.{ctx.step.strategy}", "checkpoint")
    async with serving(inputs.serving, checkpoint, ctx.run_dir, ctx.step.id, ctx.step.strategy) as srv:
        yield srv, checkpoint, ctx.step.strategy


@contextlib.asynccontextmanager
async def _paired_baseline(ctx: StepContext) -> AsyncIterator[RunningServer | None]:
    """The source model served next to the candidate, for the interleaved speed run (or None)."""
    inputs: BenchmarkInput = input_of(ctx, BenchmarkInput)
    if ctx.step.strategy is None or not inputs.paired_baseline:
        yield None
        return
    async with serving(inputs.serving, ctx.input("source", "model_dir"), ctx.run_dir, ctx.step.id,
                       "baseline", pin_port=False) as srv:
        ctx.log.info("speed: interleaved with the baseline served alongside (A B B A ...)")
        yield srv


async def benchmark(ctx: StepContext) -> StepResult:
    spec: BenchmarkInput = input_of(ctx, BenchmarkInput)
    async with contextlib.AsyncExitStack() as stack:
        # The two servers start side by side: most of a start is single-threaded imports and loading.
        async with asyncio.TaskGroup() as starting:
            candidate = starting.create_task(stack.enter_async_context(_candidate(ctx)))
            paired = starting.create_task(stack.enter_async_context(_paired_baseline(ctx)))
        (server, model_dir, name), baseline = candidate.result(), paired.result()
        session = await stack.enter_async_context(aiohttp.ClientSession())
        suites = {}
        for ref in spec.suites:
            suites[ref.name] = await ask_suite(ctx, session, server, ref)
            ctx.log.info("suite %s: %d/%d passed (answers %s)", ref.name, suites[ref.name]["passed"],
                         suites[ref.name]["total"], suites[ref.name]["answers_sha256"][:12])
        speed = await speed_sweep(session, server.url, server.model, spec.speed,
                                  paired_with=(baseline.url, baseline.model) if baseline else None)
        where = measured_on(server.engine) | {"numerics": await served_numerics(session, server)}
    results: dict[str, Any] = {"name": name, "engine": server.engine, "suites": suites, "speed": speed,
                               "answers_sha256": combined_hash(suites), "measured_on": where}
    if model_dir is not None:
        size = sum(tensor_bytes(model_dir).values())
        results["size"] = {"bytes": size, "gb": round(size / 1e9, 3)}
    results["kl"] = fidelity_to_source(ctx)
    if ctx.step.strategy is not None:
        serve_record = ctx.input_record(f"serve.{ctx.step.strategy}")
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
    if ref.teacher_eval and "calibrate" in ctx.step.deps:
        with contextlib.suppress(KeyError):  # no eval output: suite_run says why
            eval_file = ctx.input("calibrate", "eval")
    # The recipe's parser is the one its server reads calls with (vLLM and the local engine alike); the
    # user's own endpoint's is unknown, and vLLM may have one not implemented here: hermes then, as before.
    named = parser_from_args(spec.serving.serve.args) if server.engine != "endpoint" else None
    parser = named if named and unsupported_parser(named) is None else DEFAULT_PARSER
    run = suite_run(ref, session, server.url, server.model, spec.system_prompt, spec.concurrency, eval_file, parser)
    gates = [g for g in spec.sequential_gates if Metric.parse(g.metric).group == ref.name] \
        if ctx.step.strategy is not None else []
    baseline = (json.loads(ctx.input("benchmark.baseline", "results").read_text(encoding="utf-8"))
                if gates and "benchmark.baseline" in ctx.step.deps else None)
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
    fidelity = ctx.input_record(f"quantize.{ctx.step.strategy}").get("summary", {}).get("fidelity") or {}
    if fidelity.get("kl") is None:
        return None
    # The intervals (a bootstrap over conversations) and how many conversations: what a gate on
    # kl.kl / kl.top1_agreement can judge uncertainty by. Absent in records written before them.
    return {"kl": fidelity["kl"], "top1_agreement": fidelity.get("top1_agreement"), "tokens": fidelity.get("tokens"),
            "kl_interval": fidelity.get("kl_interval"), "top1_interval": fidelity.get("top1_interval"),
            "conversations": fidelity.get("conversations"), "measured_on": fidelity.get("measured_on")}


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


def failed_branches(ctx: StepContext) -> dict[str, dict[str, str]]:
    """{strategy: {step, error}} for the branches the scheduler left out of this step (they failed)."""
    failed = {}
    for strategy, sid in input_of(ctx, GatesInput).failed_branches.items():
        error = "no error recorded"
        path = ctx.run_dir.logs_dir / f"{sid}.failed.json"
        with contextlib.suppress(OSError, ValueError):
            error = json.loads(path.read_text(encoding="utf-8")).get("error") or error
        failed[strategy] = {"step": sid, "error": error}
    return failed


async def gates(ctx: StepContext) -> StepResult:
    inputs: GatesInput = input_of(ctx, GatesInput)
    failed = failed_branches(ctx)
    for strategy, why in failed.items():
        ctx.log.info("strategy %s failed at %s, so it is not judged: %s", strategy, why["step"], why["error"])
    results = {}
    baseline = None
    for dep in ctx.step.deps:
        data = json.loads(ctx.input(dep, "results").read_text(encoding="utf-8"))
        if dep == "benchmark.baseline":
            baseline = data
        else:
            results[dep.removeprefix("benchmark.")] = data
    # The candidates compared: every strategy with a current benchmark, including the ones this run did not
    # run (--strategy); the recipe's others are named with the reason they are not judged.
    candidates = list(results)
    absent = {s: NOT_BENCHMARKED for s in inputs.not_benchmarked}
    ctx.log.info("candidates compared: %s", ", ".join(candidates) or "none")
    for strategy, why in absent.items():
        ctx.log.info("strategy %s is not judged: %s", strategy, why)
    verdicts = {s: evaluate(inputs.gates, r, baseline) for s, r in results.items()}
    selection = select(verdicts, results, inputs.selection.prefer, inputs.selection.accept_unproven,
                       inputs.negative_controls)
    baseline_name = inputs.baseline_name
    table = comparison_markdown(verdicts, baseline_name, baseline, selection, failed, absent)
    (ctx.scratch / "comparison.md").write_text(table, encoding="utf-8")
    plot_gates(verdicts, ctx.scratch / "gate_scores.png")
    curves = dict(results)
    if baseline is not None:
        curves[f"{baseline_name} (baseline)"] = baseline
    plot_ttft_curve(curves, ctx.scratch / "ttft_curve.png")
    speed = {}
    for name, r in curves.items():
        measured = r.get("speed", {}).get("summary", {}).get("decode_tok_s")
        predicted = (r.get("prediction") or {}).get("predicted_decode_tok_s")
        speed[name] = {"measured_decode_tok_s": measured, "predicted_decode_tok_s": predicted,
                       "measured_over_predicted": round(measured / predicted, 3) if measured and predicted else None}
    write_json_atomic(ctx.scratch / "gates.json", {"verdicts": verdicts, "selection": selection, "speed": speed,
                                                   "failed": failed, "candidates": candidates,
                                                   "not_benchmarked": absent})
    for line in table.splitlines():
        ctx.log.info("%s", line)
    return StepResult(outputs={"gates": "gates.json", "table": "comparison.md", "gate_plot": "gate_scores.png",
                               "ttft_plot": "ttft_curve.png"},
                      summary={"selection": selection, "verdicts": verdicts, "speed": speed, "failed": failed,
                               "candidates": candidates, "not_benchmarked": absent})
