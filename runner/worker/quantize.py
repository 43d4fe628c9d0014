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

from runner.worker.calib_data import CalibrationSet, load_calibration

# ModelOpt's own default exclusions (configs/ptq/units/default_disabled_quantizers.yaml), which
# auto_quantize ignores unless they are passed as disabled_layers.
DEFAULT_DISABLED = ["*lm_head*", "*router*", "*mlp.gate.*", "*linear_attn.conv1d*", "*linear_attn.in_proj_a*",
                    "*linear_attn.in_proj_b*", "*visual*", "*vision*", "*mtp*", "*output_layer*"]
# Bits a weight costs in each format, scales included (NVFP4: 4-bit code + one FP8 scale per 16).
BITS = {"nvfp4": 4.5, "w4a16_nvfp4": 4.5, "fp8": 8.0, "int8": 8.0, "int4": 4.25, "mxfp4": 4.25, "mxfp8": 8.25}


def run(params: dict[str, Any], output_dir: Path) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    strategy = params["strategy"]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, params["dtype"])
    model_dir = Path(params["model_dir"])
    t0 = time.monotonic()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    if not getattr(model.config, "architectures", None):
        model.config.architectures = [params.get("architecture") or type(model).__name__]
    load_s = time.monotonic() - t0
    print(f"[quantize] loaded {model_dir.name} on {device} in {load_s:.1f}s", flush=True)

    calib = load_calibration(Path(params["calibration"]), tokenizer, params["calib_samples"], params["max_length"],
                             params["seed"])
    print(f"[quantize] {len(calib.token_ids)} samples, {calib.tokens} tokens", flush=True)
    result = quantize_model(model, calib, strategy, params["exclude"], device)
    print(f"[quantize] calibrated in {result['quantize_s']:.1f}s at batch size {result['batch_size']}", flush=True)

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
        "strategy": strategy["name"],
        **result,
        "calibration_samples": len(calib.token_ids),
        "calibration_tokens": calib.tokens,
        "padding_tokens": calib.padding_tokens(result["batch_size"]),
        "load_s": round(load_s, 3),
        "export_s": round(export_s, 3),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "checkpoint_bytes": sum(p.stat().st_size for p in checkpoint.rglob("*") if p.is_file()),
        "formats": format_counts(layers),
        "effective_bits": effective_bits(model, layers),
        "layers": layers,
    }
    return {"outputs": {"checkpoint": "checkpoint"}, "summary": summary}


def quantize_model(model: Any, calib: CalibrationSet, strategy: dict[str, Any], exclude: list[str],
                   device: Any) -> dict[str, Any]:
    """Calibrate and quantize in place; returns batch size, time, peak GPU memory (and auto_quantize's choice)."""
    import torch

    batch_size = strategy.get("batch_size", "auto")
    if batch_size == "auto":
        batch_size = auto_batch_size(model, calib, device)
    batches = calib.batches(batch_size, device)
    if device.type == "cpu":
        from runner.worker.nvfp4_cpu import install_cpu_nvfp4

        install_cpu_nvfp4()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.monotonic()
    result: dict[str, Any] = {"device": str(device), "batch_size": batch_size}
    if strategy.get("auto_quantize"):
        result["auto_quantize"] = quantize_auto(model, batches, strategy["auto_quantize"], exclude)
    else:
        quantize_with_config(model, build_config(strategy, exclude), batches)
    if device.type == "cuda":
        torch.cuda.synchronize()
        result["peak_gpu_bytes"] = torch.cuda.max_memory_allocated()
    result["quantize_s"] = round(time.monotonic() - t0, 3)
    return result


def build_config(strategy: dict[str, Any], exclude: list[str]) -> dict[str, Any]:
    """A ModelOpt quantization config: preset or ModelOpt recipe, algorithm override, exclusions appended."""
    import modelopt.torch.quantization as mtq

    if strategy.get("preset"):
        config = copy.deepcopy(getattr(mtq, strategy["preset"]))
    else:
        config = load_modelopt_recipe(strategy["modelopt_recipe"])
    if strategy.get("algorithm"):
        config["algorithm"] = strategy["algorithm"]
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


def quantize_auto(model: Any, batches: list[dict[str, Any]], spec: dict[str, Any], exclude: list[str]) -> dict:
    import modelopt.torch.quantization as mtq
    import torch

    formats = [copy.deepcopy(getattr(mtq, name)) for name in spec["formats"]]
    for batch in batches:
        batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)

    def forward_step(m: Any, batch: dict[str, Any]) -> Any:
        return m(**batch, use_cache=False)

    def loss_func(output: Any, batch: dict[str, Any]) -> Any:
        return output.loss

    kwargs: dict[str, Any] = {
        "constraints": {"effective_bits": spec["effective_bits"]},
        "quantization_formats": formats,
        "data_loader": batches,
        "forward_step": forward_step,
        "num_calib_steps": min(spec["num_calib_steps"], len(batches)),
        "num_score_steps": min(spec["num_score_steps"], len(batches)),
        "method": spec["method"],
        "disabled_layers": DEFAULT_DISABLED + list(exclude),
    }
    if spec["method"] == "gradient":
        kwargs["loss_func"] = loss_func
    else:
        # kl_div compares the quantized model's logits with the unquantized ones.
        kwargs["forward_step"] = lambda m, batch: m(**batch, use_cache=False).logits
    try:
        with torch.set_grad_enabled(spec["method"] == "gradient"):
            _, state = mtq.auto_quantize(model, **kwargs)
    except ValueError as exc:
        if "infeasible" not in str(exc):
            raise
        raise SystemExit(f"auto_quantize: {exc} Raise auto_quantize.effective_bits in the recipe, or exclude "
                         "fewer layers.") from None
    best = state.get("best", {}) if isinstance(state, dict) else {}
    return {"constraints": {"effective_bits": spec["effective_bits"]},
            "achieved": {k: float(v) for k, v in (best.get("constraints") or {}).items()
                         if isinstance(v, (int, float))},
            "score": float(best["score"]) if isinstance(best.get("score"), (int, float)) else None}


def auto_batch_size(model: Any, calib: CalibrationSet, device: Any, cap: int = 64) -> int:
    """The largest batch that leaves room for calibration state, measured with one probe forward."""
    import torch

    n = len(calib.token_ids)
    if device.type != "cuda":
        return min(8, n)  # a CPU gains nothing from bigger batches; keep memory modest
    free, _ = torch.cuda.mem_get_info()
    probe = torch.ones((1, calib.longest), dtype=torch.long, device=device)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    with torch.no_grad():
        model(input_ids=probe, **calibration_kwargs(model))
    per_sample = max(torch.cuda.max_memory_allocated() - base, 1)
    # Half the free memory: AWQ keeps per-layer activation statistics and search copies.
    return max(1, min(cap, n, int(free * 0.5 // per_sample)))


def _format_of(quantizer: Any) -> str | None:
    if quantizer is None or not getattr(quantizer, "is_enabled", False):
        return None
    bits = getattr(quantizer, "num_bits", None)
    blocks = getattr(quantizer, "block_sizes", None) or {}
    if bits == (2, 1):
        return "nvfp4" if blocks.get("scale_bits") == (4, 3) else "mxfp4"
    if bits == (4, 3):
        return "fp8"
    if bits == 8:
        return "int8"
    if bits == 4:
        return "int4"
    return str(bits)


def layer_formats(model: Any) -> dict[str, str]:
    """Module name -> the format its weight was stored in (bf16 when left unquantized)."""
    import torch

    out = {}
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) and not hasattr(module, "weight_quantizer"):
            continue
        if not hasattr(module, "weight") or module.weight is None:
            continue
        weight_format = _format_of(getattr(module, "weight_quantizer", None))
        input_format = _format_of(getattr(module, "input_quantizer", None))
        if weight_format == "nvfp4" and input_format is None:
            weight_format = "w4a16_nvfp4"
        out[name] = weight_format or str(module.weight.dtype).removeprefix("torch.")
    return out


def format_counts(layers: dict[str, str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for fmt in layers.values():
        counts[fmt] = counts.get(fmt, 0) + 1
    return counts


def effective_bits(model: Any, layers: dict[str, str]) -> float:
    """Bits per Linear weight over all Linears (unquantized ones count 16), scales included."""
    total = bits = 0.0
    modules = dict(model.named_modules())
    for name, fmt in layers.items():
        n = modules[name].weight.numel()
        total += n
        bits += n * BITS.get(fmt, 16.0)
    return round(bits / total, 3) if total else 16.0

