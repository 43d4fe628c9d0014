"""Worker: quantize one strategy with ModelOpt and export a Hugging Face checkpoint.

Steps: load the model, render the calibration conversations with its chat template, pick a batch
size that fits memory, build the ModelOpt config (a preset by name, a ModelOpt recipe, or
auto_quantize) with the recipe's exclusions appended in ModelOpt 0.47's list format, calibrate,
export with `export_hf_checkpoint`, copy the tokenizer, and summarise which layer got which format.
"""

from __future__ import annotations

import copy
import inspect
import resource
import shutil
import time
from pathlib import Path
from typing import Any

from runner.quantization.bits import effective_bits as bits_per_weight
from runner.quantization.bits import logical_numel

# DEFAULT_DISABLED: ModelOpt's default exclusions, which auto_quantize ignores.
from runner.quantization.footprint import DEFAULT_DISABLED, Unknown, format_of
from runner.recipe.schema import AutoQuantizeSpec, Strategy
from runner.steps.inputs import QuantizeInput
from runner.worker.calib_data import CalibrationSet, batch_overhead_tokens, load_calibration, pad_batches

HELD_OUT = 8  # conversations kept out of calibration to measure what folding AWQ scales costs


def run(params: dict[str, Any], output_dir: Path) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # The planner's QuantizeInput, validated again here: the worker reads models, not dicts.
    inputs = QuantizeInput.model_validate({name: params[name] for name in QuantizeInput.model_fields})
    strategy = inputs.strategy
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, inputs.dtype)
    model_dir = Path(params["model_dir"])
    t0 = time.monotonic()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    if not getattr(model.config, "architectures", None):
        model.config.architectures = [inputs.architecture or type(model).__name__]
    load_s = time.monotonic() - t0
    print(f"[quantize] loaded {model_dir.name} on {device} in {load_s:.1f}s", flush=True)

    calib = load_calibration(Path(params["calibration"]), tokenizer, inputs.calib_samples, inputs.max_length,
                             inputs.seed, held_out=HELD_OUT)
    print(f"[quantize] {len(calib.token_ids)} samples, {calib.tokens} tokens", flush=True)
    from runner.worker import fidelity

    # One set of held-out samples and one snapshot per model state: the source, the quantized model,
    # and the model after folding AWQ scales (when there were any).
    eval_batches, measured_on = held_out_set(calib, device)
    logits_kwargs = full_logits_kwargs(model)
    source = fidelity.snapshot(model, eval_batches, logits_kwargs)
    result = quantize_model(model, calib, strategy, inputs.exclude, device)
    print(f"[quantize] calibrated in {result['quantize_s']:.1f}s: {result['batches']} batches of up to "
          f"{result['batch_size']} samples (token budget {result['token_budget']}), "
          f"{result['padding_fraction']:.1%} of computed tokens padding", flush=True)
    quantized = fidelity.snapshot(model, eval_batches, logits_kwargs)
    # What the exported model gives up against the source, on the same samples (fake-quant forward).
    exported = fidelity.compare(source, quantized)
    fold = fold_scales(model, calib, device, logits_kwargs, norms_only=not strategy.fold_awq_scales)
    if fold is not None:
        folded = fidelity.snapshot(model, eval_batches, logits_kwargs)
        before, exported = exported, fidelity.compare(source, folded)
        fold["cost"] = {**fidelity.compare(quantized, folded), "measured_on": measured_on,
                        "kl_to_source_before": before.get("kl"), "kl_to_source_after": exported.get("kl")}
        result["awq_fold"] = fold
        print(f"[quantize] AWQ scales folded ({fold['mode']}) in {fold['fold_s']:.1f}s: {fold['actions']}; "
              f"KL {fold['cost'].get('kl')}, top-1 {fold['cost'].get('top1_agreement')}", flush=True)
        del folded
    result["fidelity"] = {**exported, "measured_on": measured_on}
    del source, quantized

    from modelopt.torch.export import export_hf_checkpoint

    t2 = time.monotonic()
    checkpoint = output_dir / "checkpoint"
    export_hf_checkpoint(model, export_dir=checkpoint)
    tokenizer.save_pretrained(checkpoint)
    for extra in ("chat_template.jinja", "tokenizer_config.json"):
        if (model_dir / extra).exists():
            shutil.copyfile(model_dir / extra, checkpoint / extra)
    export_s = time.monotonic() - t2
    print(f"[quantize] exported in {export_s:.1f}s", flush=True)

    layers = layer_formats(model)
    summary = {
        "strategy": strategy.name,
        **result,  # batching (BatchPlan.summary: tokens, padding, batches, budget), time, memory
        "calibration_samples": len(calib.token_ids),
        "load_s": round(load_s, 3),
        "export_s": round(export_s, 3),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "checkpoint_bytes": sum(p.stat().st_size for p in checkpoint.rglob("*") if p.is_file()),
        "formats": format_counts(layers),
        "effective_bits": effective_bits(model, layers),
        "layers": layers,
    }
    return {"outputs": {"checkpoint": "checkpoint"}, "summary": summary}


def held_out_set(calib: CalibrationSet, device: Any) -> tuple[list[dict[str, Any]], str]:
    """Batches to measure fidelity on, and what they are: held-out conversations where the file has them."""
    batches = calib.held_out_batches(4, device)
    if batches:
        return batches, "held-out conversations"
    # Every conversation was used for calibration: say so rather than pretend.
    return calib.batches(4, device)[-2:], "calibration samples (the calibration file has no conversation to spare)"


def full_logits_kwargs(model: Any) -> dict[str, Any]:
    return {k: v for k, v in calibration_kwargs(model).items() if k != "logits_to_keep"}


def fold_scales(model: Any, calib: CalibrationSet, device: Any, logits_kwargs: dict[str, Any],
                norms_only: bool = False) -> dict[str, Any] | None:
    """Fold AWQ's pre_quant_scale away (see awq_fold.py); None when nothing was smoothed.

    norms_only: the raw NVFP4_AWQ export; only the folds into norms, which the export would get wrong.
    """
    from runner.worker import awq_fold

    if not any(awq_fold.has_scale(m) for m in model.modules()):
        return None
    t0 = time.monotonic()
    probe = pad_batches([calib.token_ids[0][:64]], calib.pad_id, 1, device)[0]  # the structure probe's input
    records = awq_fold.fold_awq_scales(model, probe, logits_kwargs, norms_only=norms_only)
    left = sum(awq_fold.has_scale(m) for m in model.modules())
    if left and not norms_only:
        raise SystemExit(f"{left} layers still carry an AWQ pre_quant_scale after folding; set "
                         "fold_awq_scales: false to export NVFP4_AWQ as it is")
    return {"mode": "norms_only" if norms_only else "full", **awq_fold.summarize(records),
            "kept_scales": left, "fold_s": round(time.monotonic() - t0, 3), "per_layer": records}


def quantize_model(model: Any, calib: CalibrationSet, strategy: Strategy | dict[str, Any], exclude: list[str],
                   device: Any) -> dict[str, Any]:
    """Calibrate and quantize in place.

    Returns the batching (token budget, batches, most rows in a batch as batch_size, real and padding
    tokens), time, peak GPU memory (and auto_quantize's choice). `batch_size: auto` batches by a token
    budget fitted to memory (see auto_batch_size and calib_data.plan_token_batches); an integer means
    that many samples a batch, by length. auto_quantize gets the same batches as a preset would.
    """
    import torch

    strategy = Strategy.model_validate(strategy) if isinstance(strategy, dict) else strategy
    spec = strategy.auto_quantize
    config = None if spec else build_config(strategy, exclude)
    batch_size = strategy.batch_size
    if batch_size == "auto":
        overhead = batch_overhead_tokens(None)
        if spec:  # scoring passes compute full logits (kl_div) or a loss and gradients (gradient)
            token_budget = auto_batch_size(model, calib, device, algorithm="auto_quantize", full_logits=True,
                                           grad=spec.method == "gradient")
        else:
            algorithm = config.get("algorithm", "max")
            if isinstance(algorithm, dict):
                algorithm = algorithm.get("method", "max")
            elif not (algorithm is None or isinstance(algorithm, str)):
                algorithm = "sequence"  # several algorithms in a row: count as not max
            token_budget = auto_batch_size(model, calib, device, algorithm=algorithm)
            overhead = batch_overhead_tokens(algorithm)
        plan = calib.plan(token_budget=token_budget, batch_overhead=overhead)
    else:
        plan = calib.plan(batch_size=int(batch_size))
    batches = calib.build(plan, device)
    if device.type == "cpu":
        from runner.worker.nvfp4_cpu import install_cpu_nvfp4

        install_cpu_nvfp4()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.monotonic()
    # batch_size: the most rows in a batch; token_budget: None for a fixed number of samples a batch.
    result: dict[str, Any] = {"device": str(device), **plan.summary()}
    if spec:
        steps = {"num_calib_steps": plan.batches_covering(spec.num_calib_steps),
                 "num_score_steps": plan.batches_covering(spec.num_score_steps)}
        result["auto_quantize"] = quantize_auto(model, batches, spec.model_copy(update=steps), exclude)
    else:
        quantize_with_config(model, config, batches)
    if device.type == "cuda":
        torch.cuda.synchronize()
        result["peak_gpu_bytes"] = torch.cuda.max_memory_allocated()
    result["quantize_s"] = round(time.monotonic() - t0, 3)
    return result


def build_config(strategy: Strategy, exclude: list[str]) -> dict[str, Any]:
    """A ModelOpt quantization config: preset or ModelOpt recipe, algorithm override, exclusions appended."""
    import modelopt.torch.quantization as mtq

    if strategy.preset:
        config = copy.deepcopy(getattr(mtq, strategy.preset))
    else:
        config = load_modelopt_recipe(strategy.modelopt_recipe)
    if strategy.algorithm:
        config["algorithm"] = strategy.algorithm
    # ModelOpt >= 0.44: quant_cfg is an ordered list and later entries win.
    config["quant_cfg"] = list(config["quant_cfg"]) + [{"quantizer_name": p, "enable": False} for p in exclude]
    return config


def load_modelopt_recipe(name: str) -> dict[str, Any]:
    """A quantization config from one of ModelOpt's shipped recipes (e.g. general/ptq/nvfp4_default-kv_fp8_cast)."""
    from modelopt.recipe import load_recipe

    recipe = load_recipe(name)
    quantize = getattr(recipe, "quantize", None) or getattr(recipe, "quant_cfg", None)
    if quantize is None:
        raise SystemExit(f"ModelOpt recipe {name!r} has no quantization section")
    data = quantize.model_dump() if hasattr(quantize, "model_dump") else dict(quantize)
    return copy.deepcopy(data)


def quantize_with_config(model: Any, config: dict[str, Any], batches: list[dict[str, Any]]) -> None:
    import modelopt.torch.quantization as mtq
    import torch

    extra = calibration_kwargs(model)

    def forward_loop(m: Any) -> None:
        with torch.no_grad():
            for batch in batches:
                m(**batch, **extra)

    mtq.quantize(model, config, forward_loop=forward_loop)


def calibration_kwargs(model: Any) -> dict[str, Any]:
    """Forward arguments for calibration passes: no KV cache, and no logits where the model allows.

    Calibration needs activations, not logits: the vocabulary projection (2 GFLOP a token and
    ~1 GB of logits per 512-token sample for Qwen3.5's 248k vocabulary) is skipped.
    """
    params = inspect.signature(model.forward).parameters
    extra: dict[str, Any] = {"use_cache": False} if "use_cache" in params else {}
    if "logits_to_keep" in params:
        extra["logits_to_keep"] = 1
    return extra


def quantize_auto(model: Any, batches: list[dict[str, Any]], spec: AutoQuantizeSpec, exclude: list[str]) -> dict:
    """ModelOpt's auto_quantize; spec's step counts are batches here (quantize_model converts samples)."""
    import modelopt.torch.quantization as mtq
    import torch

    formats = [copy.deepcopy(getattr(mtq, name)) for name in spec.formats]
    if spec.method == "gradient":  # only the gradient method needs a loss; kl_div would pay for one
        for batch in batches:
            batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)

    extra = full_logits_kwargs(model)  # scoring needs every position's logits (kl_div) or a loss

    def forward_step(m: Any, batch: dict[str, Any]) -> Any:
        return m(**batch, **extra)

    def loss_func(output: Any, batch: dict[str, Any]) -> Any:
        return output.loss

    kwargs: dict[str, Any] = {
        "constraints": {"effective_bits": spec.effective_bits},
        "quantization_formats": formats,
        "data_loader": batches,
        "forward_step": forward_step,
        "num_calib_steps": spec.num_calib_steps,  # batches, at most len(batches) (BatchPlan.batches_covering)
        "num_score_steps": spec.num_score_steps,
        "method": spec.method,
        "disabled_layers": DEFAULT_DISABLED + list(exclude),
    }
    if spec.method == "gradient":
        kwargs["loss_func"] = loss_func
    else:
        # kl_div compares the quantized model's logits with the unquantized ones.
        kwargs["forward_step"] = lambda m, batch: m(**batch, **extra).logits
    try:
        with torch.set_grad_enabled(spec.method == "gradient"):
            _, state = mtq.auto_quantize(model, **kwargs)
    except ValueError as exc:
        if "infeasible" not in str(exc):
            raise
        raise SystemExit(f"auto_quantize: {exc} Raise auto_quantize.effective_bits in the recipe, or exclude "
                         "fewer layers.") from None
    best = state.get("best", {}) if isinstance(state, dict) else {}
    return {"constraints": {"effective_bits": spec.effective_bits},
            "calib_batches": kwargs["num_calib_steps"], "score_batches": kwargs["num_score_steps"],
            "achieved": {k: float(v) for k, v in (best.get("constraints") or {}).items()
                         if isinstance(v, (int, float))},
            "score": float(best["score"]) if isinstance(best.get("score"), (int, float)) else None}


def auto_batch_size(model: Any, calib: CalibrationSet, device: Any, algorithm: str | None = "max",
                    full_logits: bool = False, grad: bool = False, cpu_budget: int = 4096) -> int:
    """A token budget for calibration batches (rows x padded width) that fits memory, from one probe forward.

    The probe forwards [1, L] tokens, L = the longest sample, with the arguments calibration passes use
    (no KV cache, no full logits; `full_logits` and `grad` for auto_quantize's scoring passes), and
    gives the memory a token costs at the widest a batch gets (where attention makes a token dearest;
    a fixed cost of the forward counts per token too, which errs safe). Half the free memory goes to
    activations, the other half stays for quantizer statistics and the allocator. Algorithms other
    than max (AWQ's per-layer activation caches and its alpha search, SmoothQuant, SVDQuant,
    auto_quantize) count a token double, as ModelOpt's hf_ptq does (get_max_batch_size with
    sample_memory_usage_ratio 2 for AWQ and SmoothQuant). On a CPU: `cpu_budget` tokens. Never less
    than one longest sample, never more than every sample at the longest width.
    """
    import torch

    longest = calib.longest
    ceiling = longest * len(calib.token_ids)  # a larger budget would batch nothing differently
    if device.type != "cuda":
        return max(1, min(cpu_budget, ceiling))  # a CPU gains little from big batches; keep memory modest
    kwargs = full_logits_kwargs(model) if full_logits else calibration_kwargs(model)
    probe = torch.full((1, longest), 100, dtype=torch.long, device=device)
    if grad:
        kwargs["labels"] = probe
    torch.cuda.synchronize()
    torch.cuda.empty_cache()  # free memory as the driver sees it, less nothing PyTorch merely caches
    free, _ = torch.cuda.mem_get_info()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    with torch.set_grad_enabled(grad):
        output = model(input_ids=probe, **kwargs)
        del output
    torch.cuda.synchronize()
    per_token = max(torch.cuda.max_memory_allocated() - base, 1) / longest
    if full_logits:
        # auto_quantize's kl_div keeps the unquantized log-probabilities in fp32 while it computes
        # the quantized ones and their log-softmax: about three fp32 vocabulary rows a token more
        # than the probe's forward shows (at Qwen3.5's 248k vocabulary, 3 MB a token).
        config = getattr(model, "config", None)
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        per_token += 3 * 4 * int(getattr(text, "vocab_size", 0) or 0)
    share = 0.5 if algorithm in (None, "max") else 0.25
    return int(max(longest, min(ceiling, free * share // per_token)))


def _format_of(quantizer: Any) -> str | None:
    """The format a live quantizer applies (None when off), named as footprint.format_of names configs."""
    if quantizer is None or not getattr(quantizer, "is_enabled", False):
        return None
    cfg = {"num_bits": getattr(quantizer, "num_bits", None), "block_sizes": getattr(quantizer, "block_sizes", None)}
    try:
        return format_of(cfg)
    except Unknown:  # a format the bits table does not know: name it by its bits rather than guess
        return str(cfg["num_bits"])


def layer_formats(model: Any) -> dict[str, str]:
    """Linear module name -> the format its weight was stored in (its dtype when left unquantized).

    Only Linear layers (lm_head included): embeddings are not counted (runner/quantization/bits.py's definition).
    """
    import torch

    out = {}
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or getattr(module, "weight", None) is None:
            continue
        weight_format = _format_of(getattr(module, "weight_quantizer", None))
        if weight_format == "nvfp4" and _format_of(getattr(module, "input_quantizer", None)) is None:
            weight_format = "w4a16_nvfp4"  # footprint.module_format's rule
        out[name] = weight_format or str(module.weight.dtype).removeprefix("torch.")
    return out


def format_counts(layers: dict[str, str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for fmt in layers.values():
        counts[fmt] = counts.get(fmt, 0) + 1
    return counts


def effective_bits(model: Any, layers: dict[str, str]) -> float:
    """runner/quantization/bits.py's definition: bits per logical Linear weight (packed exports unpacked),
    scales included."""
    modules = dict(model.named_modules())
    return bits_per_weight((fmt, logical_numel(modules[name].weight.numel(), fmt)
                            if str(modules[name].weight.dtype) == "torch.uint8" else modules[name].weight.numel())
                           for name, fmt in layers.items())
