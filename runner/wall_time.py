"""Predict each step's wall time before a run, and the run's total, on a target machine.

Every prediction is arithmetic on what the plan already knows, with the rates it assumes named:

- teacher generation: the tokens the categories ask (count x turns x max_tokens x ANSWER_FILL) / the
  endpoint's throughput (declared as `calibration.source.throughput_tok_s`, or measured by a finished
  calibrate step in this run directory);
- calibration, held-out fidelity, sensitivity and auto_quantize: forwards x tokens x the model's FLOPs a
  token / (the machine's bf16 rate x its measured calibration efficiency), each algorithm's cost as a
  multiple of max calibration (ALGORITHM_COST, measured), auto_quantize's scoring from the forwards it
  runs (one per layer group and format per scored sample, SCORE_FORWARDS_PER_GROUP fitted);
- loading, exporting and verifying: bytes / disk rates;
- serving: bytes / the disk rate + the engine's start-up; benchmarks: the answers' tokens / the predicted
  decode speed (memory bandwidth, DECODE_EFFICIENCY of it), at the suites' concurrency.

The total runs the plan's steps through the scheduler's own rules (a GPU step at a time per GPU, at most
`max_parallel` steps) with these durations. Each finished step's record keeps the prediction beside the
measured time (`predicted_s`), so a run says how far off this model was. Host side: no torch.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from typing import Any

from runner.plan import Plan

# --- rates this model assumes, each with where it comes from -----------------------------------------

# Of the machine's bf16 matmul rate, what a calibration forward (quantizer statistics included) reaches.
# H100: bench/calibration_forward_9b.py + bench/quantize_gpu.py (ISSUE 29's note); elsewhere assumed equal.
CALIBRATION_EFFICIENCY_DEFAULT = 0.24
# A calibration algorithm's time as a multiple of max calibration's on the same batches (bench/quantize_gpu.py,
# 9B shape, mixed set: max 13.7 s, AWQ-lite 62.2 s on an H200). Others: assumed, named in the basis.
ALGORITHM_COST = {"max": 1.0, "awq_lite": 4.5}
ALGORITHM_COST_ASSUMED = {"awq_full": 9.0, "awq_clip": 6.0, "smoothquant": 2.0, "mse": 3.0, "gptq": 6.0,
                          "svdquant": 6.0}
# auto_quantize's kl_div scoring runs a forward per layer group and candidate format for every scored token,
# each cheaper than a full one (it starts at the group's layer): 0.58 of a full forward on average, fitted
# to ~107 s per ~9 k scored tokens at the 9B shape on an H200 (152 groups, 2 formats; bench/plan_9b.py).
SCORE_FORWARDS_PER_GROUP = 0.58
# Samples fill this share of max_length on average (the plan's chats: ~half); teacher answers this share
# of max_tokens; benchmark answers this share of their cap.
SAMPLE_FILL = 0.5
ANSWER_FILL = 0.5
# Disk and network (GB/s): a local NVMe read through the page cache, safetensors writes with packing,
# an assumed 100 MB/s download.
DISK_READ_GBS = 2.0
EXPORT_WRITE_GBS = 0.8
NETWORK_GBS = 0.1
# Fixed costs (s): a worker's Python, torch and ModelOpt imports; vLLM's start (CUDA graphs, compile);
# vLLM's own loader check in verify; the local engine's start.
WORKER_START_S = 15.0
VLLM_START_S = 90.0
VLLM_LOADER_CHECK_S = 8.0  # + the checkpoint read again at the disk rate (the demo's: ~8 s)
LOCAL_START_S = 5.0
# The local engine (runner/worker/local_server.py) decodes one token per Python step: bounded by its own
# overhead, not bandwidth (bench/local_engine_throughput.py: ~32 tok/s on an H100, ~25 on 2 CPU cores).
LOCAL_ENGINE_TOK_S = 25.0
# Single-stream decode reaches this share of the bandwidth bound (runner/quantization/decode.py).
DECODE_EFFICIENCY = 0.75
CONCURRENCY_EXPONENT = 0.7  # c requests at once decode c ** 0.7 times as fast (8 -> 4.3)
HOST_STEP_S = 2.0  # gates, report, publish's own work, a fix-up: seconds


@dataclass(frozen=True)
class Machine:
    """Where the steps run: its bf16 matmul rate, calibration efficiency, memory bandwidth and size."""

    name: str
    bf16_tflops: float
    calibration_efficiency: float
    memory_bandwidth_gbs: float
    efficiency_measured: bool = False
    memory_gb: float | None = None

    @property
    def calibration_flops(self) -> float:
        return self.bf16_tflops * 1e12 * self.calibration_efficiency


def machine(name: str) -> Machine:
    """A target of recipes/hardware/targets.yaml with its compute rates."""
    from runner.errors import RunnerError
    from runner.recipe.resources import hardware_targets

    table = hardware_targets()
    if name not in table:
        raise RunnerError(f"hardware {name!r} (recipe plan --hardware, execution.hardware or benchmark.hardware) is "
                          f"not in recipes/hardware/targets.yaml; known: {', '.join(table)}")
    entry = table[name]
    measured = entry.get("calibration_efficiency")
    return Machine(name, float(entry.get("bf16_tflops", 100)), float(measured or CALIBRATION_EFFICIENCY_DEFAULT),
                   float(entry["memory_bandwidth_gbs"]), efficiency_measured=measured is not None,
                   memory_gb=float(entry["memory_gb"]) if entry.get("memory_gb") else None)


@dataclass
class StepTime:
    step: str
    seconds: float | None  # None: cannot be predicted (the reason is the basis)
    basis: str
    parts: dict[str, float] = field(default_factory=dict)
    strategy: str | None = None  # the strategy whose branch the step is (None: shared steps, the baseline)

    def to_json(self) -> dict[str, Any]:
        return {"seconds": None if self.seconds is None else round(self.seconds, 1), "basis": self.basis,
                "parts": {k: round(v, 1) for k, v in self.parts.items()}}


@dataclass
class WallTime:
    machine: Machine
    steps: dict[str, StepTime]
    total_s: float | None  # the run's predicted length under the scheduler's rules; None if a step is unknown
    unknown: list[str]
    gpu_needs: dict[str, int] = field(default_factory=dict)  # what each GPU step holds (gpu_memory_need)

    def per_strategy(self) -> dict[str, float]:
        """Seconds of each strategy's own steps (quantize ... benchmark), in plan order."""
        out: dict[str, float] = {}
        for time in self.steps.values():
            if time.strategy is not None and time.seconds is not None:
                out[time.strategy] = out.get(time.strategy, 0.0) + time.seconds
        return out

    def to_json(self) -> dict[str, Any]:
        return {"machine": self.machine.name, "bf16_tflops": self.machine.bf16_tflops,
                "calibration_efficiency": self.machine.calibration_efficiency,
                "efficiency_measured": self.machine.efficiency_measured,
                "total_s": None if self.total_s is None else round(self.total_s),
                "unknown": self.unknown, "steps": {sid: t.to_json() for sid, t in self.steps.items()},
                "per_strategy_s": {k: round(v) for k, v in self.per_strategy().items()}}


# --- the model's arithmetic ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelCost:
    """What a token costs the model: FLOPs of a calibration forward (no logits) and of a full one."""

    body_flops: float  # 2 x the Linear weights a token multiplies, lm_head excluded (MoE: active experts)
    head_flops: float  # 2 x lm_head
    bf16_bytes: int  # the weights as loaded
    layers: int
    groups: int  # auto_quantize's decisions (q/k/v and gate/up count once)

    @property
    def full_flops(self) -> float:
        return self.body_flops + self.head_flops


def model_cost(weights: Any) -> ModelCost:
    from runner.quantization.footprint import _group_key

    expert = weights.expert_fraction
    body = head = 0.0
    groups = set()
    for module, tensor in weights.linears.items():
        n = 1
        for dim in tensor.shape:
            n *= dim
        if module == "lm_head" or module.endswith(".lm_head"):
            head += 2 * n
            continue
        share = expert if expert is not None and ".experts." in module else 1.0
        body += 2 * n * share
        groups.add(_group_key(module))
    # Loaded in bf16: floating tensors at 2 bytes an element, the rest as stored.
    loaded = sum(2 * t.numel if t.dtype in ("BF16", "F16", "F32") else t.nbytes for t in weights.tensors.values())
    return ModelCost(body, head, int(loaded), weights.num_layers or 1, len(groups))


def _forward_s(tokens: float, flops_per_token: float, machine: Machine) -> float:
    return tokens * flops_per_token / machine.calibration_flops


def predict(plan: Plan, weights: Any, machine: Machine, footprints: dict[str, Any] | None = None,
            measured_teacher_tok_s: float | None = None, checkpoint_bytes: dict[str, int] | None = None) -> WallTime:
    """Every step's predicted seconds and the run's total. `footprints`: strategy -> Footprint (sizes and
    decode speed); `checkpoint_bytes` overrides a strategy's predicted size with an export's real one."""
    footprints = footprints or {}
    cost = model_cost(weights)
    recipe = plan.recipe
    times: dict[str, StepTime] = {}
    for sid, step in plan.steps.items():
        kind = step.kind
        if kind == "source":
            times[sid] = _source(sid, recipe, cost)
        elif kind == "calibrate":
            times[sid] = _calibrate(sid, step, recipe, measured_teacher_tok_s)
        elif kind == "score":
            times[sid] = _score(sid, step, recipe, cost, machine)
        elif kind == "quantize":
            times[sid] = _quantize(sid, step, recipe, cost, machine, footprints.get(step.strategy))
        elif kind in ("export", "verify", "serve"):
            size = (checkpoint_bytes or {}).get(step.strategy or "") or _size(footprints.get(step.strategy), cost)
            times[sid] = _io_step(sid, step, recipe, size)
        elif kind == "benchmark":
            times[sid] = _benchmark(sid, step, recipe, machine, footprints, cost)
        elif kind == "publish":
            uploads = recipe.publish.repo_id is not None and not recipe.publish.dry_run
            size = max((_size(fp, cost) for fp in footprints.values()), default=cost.bf16_bytes)
            seconds = HOST_STEP_S + (size / (NETWORK_GBS * 1e9) if uploads else 0)
            times[sid] = StepTime(sid, seconds, f"upload {size / 1e9:.1f} GB at {NETWORK_GBS * 1e3:.0f} MB/s (assumed)"
                                  if uploads else "a dry run: nothing uploaded")
        else:
            times[sid] = StepTime(sid, HOST_STEP_S, "host work")
    for sid, time in times.items():
        time.strategy = plan.steps[sid].strategy
    unknown = [sid for sid, t in times.items() if t.seconds is None]
    execution = plan.recipe.execution
    memory = (execution.gpu_memory_gb or machine.memory_gb) if execution.share_gpus else None
    needs = gpu_needs(plan, cost)
    total = None if unknown else schedule(plan, {sid: t.seconds or 0.0 for sid, t in times.items()},
                                          needs, int(memory * 1e9) if memory else None)
    return WallTime(machine, times, total, unknown, needs)


# What a quantize or score worker holds of a GPU beyond the weights: activations of its calibration batches
# (the worker plans them within its share) and the fidelity pass's full logits. Half the weights, at least
# 8 GB, plus 4 GB: two 9B quantize steps (17.9 GB of weights -> 31 GB each) share an 80 GB H100.
ACTIVATION_SHARE = 0.5
ACTIVATION_FLOOR = 8e9
LOGITS_SLACK = 4e9


def gpu_memory_need(step: Any, cost: ModelCost) -> int | None:
    """The GPU memory a step is predicted to hold; None: a whole GPU (a server, a conversion)."""
    if step.kind not in ("quantize", "score"):
        return None
    return int(cost.bf16_bytes + max(ACTIVATION_SHARE * cost.bf16_bytes, ACTIVATION_FLOOR) + LOGITS_SLACK)


def gpu_needs(plan: Plan, cost: ModelCost) -> dict[str, int]:
    """Every GPU step's need that is not a whole GPU: what the scheduler shares GPUs by."""
    needs = {sid: gpu_memory_need(step, cost) for sid, step in plan.steps.items() if step.heavy}
    return {sid: need for sid, need in needs.items() if need is not None}


def _size(footprint: Any, cost: ModelCost) -> int:
    return int(footprint.checkpoint_bytes) if footprint is not None and footprint.checkpoint_bytes else cost.bf16_bytes


def _source(sid: str, recipe: Any, cost: ModelCost) -> StepTime:
    kind = recipe.model.source.kind
    gb = cost.bf16_bytes / 1e9
    if kind == "huggingface":
        return StepTime(sid, gb / NETWORK_GBS, f"download {gb:.1f} GB at {NETWORK_GBS * 1e3:.0f} MB/s (assumed; "
                        "a cached download costs nothing)")
    if kind == "gguf":
        return StepTime(sid, WORKER_START_S + 2 * gb / DISK_READ_GBS, f"dequantize to {gb:.1f} GB")
    return StepTime(sid, HOST_STEP_S, "a local folder: linked")


def _calibrate(sid: str, step: Any, recipe: Any, measured_tok_s: float | None) -> StepTime:
    source = step.inputs.calibration.source
    if source.kind != "teacher":
        return StepTime(sid, HOST_STEP_S, f"{source.kind}: read")
    tokens = sum(c.count * c.turns for c in source.categories) * source.sampling.max_tokens * ANSWER_FILL
    rate, said = measured_tok_s, "measured by this run's calibrate step"
    if rate is None and source.throughput_tok_s:
        rate, said = source.throughput_tok_s, "declared (calibration.source.throughput_tok_s)"
    if rate is None:
        return StepTime(sid, None, f"{tokens / 1e3:.0f} k teacher tokens at an unknown rate: declare "
                        "calibration.source.throughput_tok_s (the endpoint's tokens/s at its concurrency)")
    return StepTime(sid, tokens / rate, f"{tokens / 1e3:.0f} k teacher tokens at {rate:,.0f} tok/s, {said}")


def _algorithm(step: Any, cost: ModelCost) -> str:
    """The calibration algorithm a strategy runs: its own, else its preset's, recipe's or layout's."""
    from runner.quantization import Unknown
    from runner.quantization.footprint import strategy_config

    strategy = step.inputs.strategy
    if strategy.algorithm:
        return strategy.algorithm
    try:
        algorithm = strategy_config(strategy, cost.layers).algorithm
    except (Unknown, ValueError):
        return "max"
    if isinstance(algorithm, dict):
        return str(algorithm.get("method", "max"))
    if isinstance(algorithm, list):  # several in a row: the dearest
        return max((a.get("method", "max") if isinstance(a, dict) else str(a) for a in algorithm),
                   key=lambda a: _algorithm_cost(a)[0], default="max")
    return str(algorithm or "max")


def _algorithm_cost(name: str) -> tuple[float, str]:
    if name in ALGORITHM_COST:
        return ALGORITHM_COST[name], "measured"
    return ALGORITHM_COST_ASSUMED.get(name, 4.5), "assumed"


def _score(sid: str, step: Any, recipe: Any, cost: ModelCost, machine: Machine) -> StepTime:
    spec = step.inputs  # ScoreInput: formats, method and sample counts
    formats = len(spec.formats)
    samples = min(spec.num_score_steps, spec.calib_samples)
    calib_samples = min(spec.num_calib_steps, spec.calib_samples)
    # Batches run longest first, so the first n of N samples are the longest: with lengths spread evenly up
    # to max_length, they average max_length x (1 - n / 2N).
    def longest(n: int) -> float:
        return spec.max_length * (1 - n / (2 * spec.calib_samples))

    parts = {
        "load": WORKER_START_S + cost.bf16_bytes / (DISK_READ_GBS * 1e9),
        "calibrate_formats": _forward_s(calib_samples * longest(calib_samples) * formats, cost.body_flops, machine),
        "score": _forward_s(samples * longest(samples) * cost.groups * formats * SCORE_FORWARDS_PER_GROUP,
                            cost.full_flops, machine),
    }
    return StepTime(sid, sum(parts.values()), f"{samples} scored samples x {cost.groups} layer groups x {formats} "
                    f"formats, full forwards at {machine.calibration_flops / 1e12:.0f} TFLOP/s", parts)


def _quantize(sid: str, step: Any, recipe: Any, cost: ModelCost, machine: Machine, footprint: Any) -> StepTime:
    inputs = step.inputs
    strategy = inputs.strategy
    found = file_sample_tokens(recipe, step, inputs.max_length)
    tokens_a_sample = found[0] if found else inputs.max_length * SAMPLE_FILL
    # Held out: the conversations after the calibrated ones, as many as the file has left.
    held_out = min(inputs.held_out, max(0, found[1] - inputs.held_out_after)) if found else inputs.held_out
    calib_tokens = inputs.calib_samples * tokens_a_sample * 1.1  # up to 10 % padding
    held_out_tokens = held_out * tokens_a_sample
    parts: dict[str, float] = {"load": WORKER_START_S + cost.bf16_bytes / (DISK_READ_GBS * 1e9)}
    # Fidelity: the source and the quantized model on the held-out conversations, full logits.
    parts["fidelity"] = _forward_s(2 * held_out_tokens, cost.full_flops, machine)
    if strategy.auto_quantize is not None:
        # Scores and format calibration come from the score step; what is left is the solve and restoring.
        basis = "auto_quantize re-solved from the score step's search state"
        parts["solve"] = 10.0
    else:
        name = _algorithm(step, cost)
        factor, said = _algorithm_cost(name)
        parts["calibrate"] = _forward_s(calib_tokens, cost.body_flops, machine) * factor
        basis = (f"{calib_tokens / 1e3:.0f} k calibration tokens x {cost.body_flops / 1e9:.2g} GFLOP at "
                 f"{machine.calibration_flops / 1e12:.3g} TFLOP/s ({machine.calibration_efficiency:.0%} of "
                 f"{machine.bf16_tflops:.3g}{'' if machine.efficiency_measured else ', efficiency assumed'}), "
                 f"{name} x{factor:g} ({said})")
        if name.startswith("awq"):
            parts["fold"] = _forward_s(held_out_tokens, cost.full_flops, machine)
    if inputs.sensitivity:
        parts["sensitivity"] = _forward_s(inputs.sensitivity * tokens_a_sample * cost.layers, cost.full_flops, machine)
    parts["export"] = _size(footprint, cost) / (EXPORT_WRITE_GBS * 1e9)
    return StepTime(sid, sum(parts.values()), basis, parts)


# English BPE text averages about this many characters a token (the estimate for a calibration file's rows).
CHARS_PER_TOKEN = 4.0


def file_sample_tokens(recipe: Any, step: Any, max_length: int) -> tuple[float, int] | None:
    """(the mean tokens of a calibration file's samples (characters / CHARS_PER_TOKEN, cut at max_length),
    its rows) where the strategy calibrates on a JSONL or text file that is here; None otherwise (a
    teacher's conversations do not exist before the calibrate step)."""
    import json
    from pathlib import Path

    name = getattr(step.inputs.strategy, "calibration", None)
    source = recipe.calibration.alternatives[name] if name else recipe.calibration.source
    path = getattr(source, "path", None)
    if source.kind not in ("jsonl", "text") or path is None or not Path(path).is_file():
        return None
    text = Path(path).read_text(encoding="utf-8", errors="replace")
    if source.kind == "text":
        rows = [block for block in text.split("\n\n") if block.strip()]
        chars = [len(block) for block in rows]
    else:
        chars = []
        for line in text.splitlines():
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and "token_ids" in row:
                chars.append(int(len(row["token_ids"]) * CHARS_PER_TOKEN))
            else:  # a conversation or a text: everything that is rendered, roughly
                chars.append(len(json.dumps(row.get("messages", row.get("text", row)), ensure_ascii=False)))
    if not chars:
        return None
    return sum(min(max_length, c / CHARS_PER_TOKEN) for c in chars) / len(chars), len(chars)


def _io_step(sid: str, step: Any, recipe: Any, size: int) -> StepTime:
    gb, kind = size / 1e9, step.kind
    if kind == "export":
        return StepTime(sid, HOST_STEP_S, "fix-ups on a linked copy")
    if kind == "verify":
        check = VLLM_LOADER_CHECK_S + gb / DISK_READ_GBS if getattr(step.inputs, "vllm", None) is not None else 0.0
        return StepTime(sid, WORKER_START_S + gb / DISK_READ_GBS + check,
                        f"read {gb:.1f} GB" + (f" + vLLM's loader check ~{check:.0f} s" if check else ""))
    start = VLLM_START_S if recipe.serve.engine == "vllm" else LOCAL_START_S
    return StepTime(sid, start + gb / DISK_READ_GBS, f"load {gb:.1f} GB + {recipe.serve.engine} start ~{start:.0f} s")


def _benchmark(sid: str, step: Any, recipe: Any, machine: Machine, footprints: dict[str, Any],
               cost: ModelCost) -> StepTime:
    from runner.benchmark.suites import suite_size
    from runner.errors import RunnerError

    bench = recipe.benchmark
    strategy = step.strategy
    footprint = footprints.get(strategy) if strategy else None
    # A candidate reads its export's bytes a token; the baseline the source's.
    per_token = footprint.bytes_per_token if footprint is not None and footprint.bytes_per_token else cost.bf16_bytes
    tok_s = machine.memory_bandwidth_gbs * 1e9 / per_token * DECODE_EFFICIENCY
    engine = f"{DECODE_EFFICIENCY:.0%} of the bandwidth bound"
    if strategy is None and bench.baseline is not None and bench.baseline.kind != "served":
        engine = "assumed: the endpoint serves the BF16 source on this machine's bandwidth"
    if recipe.serve.engine == "local" and tok_s > LOCAL_ENGINE_TOK_S:
        tok_s, engine = LOCAL_ENGINE_TOK_S, "the local engine's own rate"
    answers = 0.0
    for ref in bench.suites:
        try:
            items = suite_size(ref, recipe)
        except RunnerError:
            continue
        answers += items * (ref.max_tokens or 256) * ANSWER_FILL
    speed = bench.speed
    speed_tokens = (speed.warmup_requests + speed.requests) * len(speed.prompt_tokens) * speed.output_tokens
    # Concurrent requests batch: the local engine answered 8 at once ~4 x faster (bench/local_engine_throughput.py).
    batching = max(1.0, bench.concurrency ** CONCURRENCY_EXPONENT)
    parts = {"suites": answers / (tok_s * batching), "speed": speed_tokens / tok_s}
    return StepTime(sid, sum(parts.values()), f"{answers / 1e3:.0f} k suite tokens at {tok_s:.0f} tok/s ({engine}) "
                    f"x{batching:.1f} for {bench.concurrency} at once, {speed_tokens / 1e3:.0f} k speed tokens; "
                    "at most (sequential looks stop early)", parts)


# --- the scheduler's rules, simulated ----------------------------------------------------------------


def schedule(plan: Plan, seconds: dict[str, float], needs: dict[str, int] | None = None,
             gpu_memory: int | None = None) -> float:
    """The run's length under the scheduler's rules: steps start in its priority order once their deps are
    done, at most max_parallel at once, GPU steps on a GPU whose memory holds their need (runner/gpu_pool.py;
    a step without a need, or with the memory unknown, takes a whole GPU)."""
    from runner.gpu_pool import GpuPool
    from runner.scheduler import branch_first_order

    execution = plan.recipe.execution
    priority = branch_first_order(plan)
    pool = GpuPool(execution.gpus, gpu_memory)
    needs = needs or {}
    done_at: dict[str, float] = {}
    running: list[tuple[float, str]] = []
    leases: dict[str, Any] = {}
    waiting = set(plan.steps)
    clock = 0.0
    while waiting or running:
        ready = sorted((s for s in waiting if all(d in done_at for d in plan.steps[s].deps if d in plan.steps)),
                       key=lambda s: priority.get(s, 0))
        for sid in ready:
            if len(running) >= execution.max_parallel:
                break
            if plan.steps[sid].heavy:
                lease = pool.place(needs.get(sid))
                if lease is None:
                    break  # the first in line waits, and those behind it with it (as GpuPool does)
                leases[sid] = lease
            heapq.heappush(running, (clock + seconds.get(sid, 0.0), sid))
            waiting.discard(sid)
        if not running:  # nothing can start: a dependency outside the plan
            break
        clock, sid = heapq.heappop(running)
        done_at[sid] = clock
        if sid in leases:
            pool.release_now(leases.pop(sid))
    return clock


def describe(seconds: float | None) -> str:
    if seconds is None:
        return "unknown"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"
