"""Worker: quantize one strategy with ModelOpt and export a Hugging Face checkpoint.

Steps: load the model, render the calibration conversations with its chat template, pick a batch
size that fits memory, build the ModelOpt config (a preset by name, a ModelOpt recipe, a layout
compiled to quant_cfg entries, or auto_quantize) with the recipe's exclusions appended in ModelOpt
0.47's list format, calibrate, export with `export_hf_checkpoint`, copy the tokenizer, and summarise
which layer got which format.
"""

from __future__ import annotations

import copy
import inspect
import json
import re
import resource
import shutil
import time
from pathlib import Path
from typing import Any

from runner.quantization import exclusions
from runner.quantization.bits import effective_bits as bits_per_weight
from runner.quantization.bits import format_name, logical_numel

# DEFAULT_DISABLED: ModelOpt's default exclusions, which auto_quantize ignores.
from runner.quantization.exclusions import DEFAULT_DISABLED
from runner.recipe.schema import AutoQuantizeSpec, Strategy
from runner.steps.inputs import QuantizeInput
from runner.worker.calib_data import CalibrationSet, batch_overhead_tokens, load_calibration, pad_batches


def run(params: dict[str, Any], output_dir: Path) -> dict[str, Any]:
    # The planner's QuantizeInput, validated again here: the worker reads models, not dicts.
    inputs = QuantizeInput.model_validate({name: params[name] for name in QuantizeInput.model_fields if name in params})
    strategy = inputs.strategy
    model_dir = Path(params["model_dir"])
    search_state = Path(params["search_state"]) if params.get("search_state") else None
    if search_state is not None and not search_state.is_file():
        raise SystemExit(f"the score step's search state {search_state} is missing: run the score step again "
                         "(recipe run --from score)")
    model, tokenizer, device, place, load_s = load_for_calibration(model_dir, inputs.dtype, inputs.architecture)
    from runner.worker import placement

    calib = load_calibration(Path(params["calibration"]), tokenizer, inputs.calib_samples, inputs.max_length,
                             inputs.seed, held_out=inputs.held_out,
                             held_out_from=Path(params.get("held_out_from") or params["calibration"]),
                             held_out_after=inputs.held_out_after)
    print(f"[quantize] {calib.describe()}, {calib.tokens} tokens", flush=True)
    from runner.worker import fidelity

    # One set of held-out samples and one snapshot per model state: the source, the quantized model,
    # and the model after folding AWQ scales (when there were any).
    eval_batches, measured_on = held_out_set(calib, device)
    logits_kwargs = full_logits_kwargs(model)
    source = fidelity.snapshot(model, eval_batches, logits_kwargs)
    print(f"[quantize] fidelity measured on {measured_on}: {source.tokens} tokens", flush=True)
    sens_batches, sens_source = sensitivity_set(model, calib, device, logits_kwargs, inputs.sensitivity,
                                                eval_batches, source)
    result = quantize_model(model, calib, strategy, inputs.exclude, device, search_state)
    print(f"[quantize] calibrated in {result['quantize_s']:.1f}s: {result['batches']} batches of up to "
          f"{result['batch_size']} samples (token budget {result['token_budget']}), "
          f"{result['padding_fraction']:.1%} of computed tokens padding", flush=True)
    warnings = unmatched_patterns(model, strategy, inputs.exclude)
    for warning in warnings:
        print(f"[quantize] warning: {warning}", flush=True)
    require_quantized(model, strategy, inputs.exclude)
    # What the exported model gives up against the source, on the same samples (fake-quant forward),
    # and a snapshot of the quantized model in the same pass, should AWQ scales be folded next.
    quantized, (exported,) = fidelity.measure(model, eval_batches, logits_kwargs, [source], keep=True)
    fold = fold_scales(model, calib, device, logits_kwargs, norms_only=not strategy.fold_awq_scales)
    if fold is not None:
        assert quantized is not None
        before = exported
        _, (exported, cost) = fidelity.measure(model, eval_batches, logits_kwargs, [source, quantized])
        fold["cost"] = {**cost, "measured_on": measured_on,
                        "kl_to_source_before": before.get("kl"), "kl_to_source_after": exported.get("kl")}
        result["awq_fold"] = fold
        print(f"[quantize] AWQ scales folded ({fold['mode']}) in {fold['fold_s']:.1f}s: {fold['actions']}; "
              f"KL {fold['cost'].get('kl')}, top-1 {fold['cost'].get('top1_agreement')}", flush=True)
    result["fidelity"] = {**exported, "measured_on": measured_on,
                          **({"conversations_held_out": len(calib.held_out_ids)} if calib.held_out_ids else {})}
    print(f"[quantize] KL to source {exported.get('kl')} (95 % {exported.get('kl_interval')}), top-1 agreement "
          f"{exported.get('top1_agreement')} (95 % {exported.get('top1_interval')}) over "
          f"{exported.get('conversations')} conversations", flush=True)
    if sens_source is not None:
        from runner.worker import sensitivity

        result["sensitivity"] = sensitivity.measure_layers(
            model, sens_batches, logits_kwargs, sens_source, log=lambda line: print(line, flush=True))
    del source, quantized, sens_source

    from modelopt.torch.export import export_hf_checkpoint

    # Formats and bits from the live quantizers: the export unpacks fused MoE experts into plain
    # modules without quantizers, so after it they could not be told apart from unquantized ones.
    layers = layer_formats(model)
    bits = effective_bits(model, layers)
    t2 = time.monotonic()
    checkpoint = output_dir / "checkpoint"
    export_hf_checkpoint(model, export_dir=checkpoint)
    repaired = repair_exclude_modules(checkpoint)
    if repaired:
        print(f"[quantize] exclude_modules repaired: {repaired}", flush=True)
    tokenizer.save_pretrained(checkpoint)
    for extra in ("chat_template.jinja", "tokenizer_config.json"):
        if (model_dir / extra).exists():
            shutil.copyfile(model_dir / extra, checkpoint / extra)
    export_s = time.monotonic() - t2
    print(f"[quantize] exported in {export_s:.1f}s", flush=True)

    summary = {
        "strategy": strategy.name,
        "method": method_of(strategy, model),  # a layout's in words, its kept layers resolved (the card's)
        "exclude": list(inputs.exclude),  # the recipe's exclusions as this worker applied them (the card's)
        "placement": {**place.summary(), "device_map": placement.device_map_summary(model)},
        **result,  # batching (BatchPlan.summary: tokens, padding, batches, budget), time, memory
        **calib.counts(),  # samples, distinct samples, repeats: 256 samples of 42 conversations say so
        "load_s": round(load_s, 3),
        "export_s": round(export_s, 3),
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "checkpoint_bytes": sum(p.stat().st_size for p in checkpoint.rglob("*") if p.is_file()),
        "formats": format_counts(layers),
        "effective_bits": bits,
        "layers": layers,
        "warnings": warnings,
        **({"exclude_modules_repaired": repaired} if repaired else {}),
    }
    return {"outputs": {"checkpoint": "checkpoint"}, "summary": summary}


def load_for_calibration(model_dir: Path, dtype_name: str, architecture: str | None,
                         tag: str = "quantize") -> tuple[Any, Any, Any, Any, float]:
    """(model, tokenizer, device, placement, load seconds): on one GPU when the model fits it with
    calibration headroom, else spread over every GPU of the allocation (placement.py)."""
    import torch
    from transformers import AutoTokenizer

    from runner.quantization.bits import bits_of
    from runner.worker import placement
    from runner.worker.model_loading import load_model

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, dtype_name)
    t0 = time.monotonic()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model_bytes = placement.model_bytes_at(model_dir, int(bits_of(dtype_name)))
    place = placement.choose(model_bytes, placement.gpu_free_bytes())
    if place.mode == "spread":
        model = load_model(model_dir, dtype, architecture, device_map="auto",
                           max_memory=dict(place.max_memory)).eval()
        device = torch.device("cuda:0")  # where the inputs go in; accelerate's hooks move them on
    else:
        model = load_model(model_dir, dtype, architecture).to(device).eval()
    load_s = time.monotonic() - t0
    where = (f"{len(place.free_bytes)} GPUs, spread ({placement.device_map_summary(model)} modules per GPU)"
             if place.mode == "spread" else str(device))
    print(f"[{tag}] loaded {model_dir.name} ({place.model_bytes / 1e9:.1f} GB) on {where} in {load_s:.1f}s",
          flush=True)
    return model, tokenizer, device, place, load_s


# `.` + NUL + a name ending in `sentinel`: what ModelOpt's name mapping leaves inside an entry.
_SENTINEL = re.compile(r"\.?\x00[^*]*")


def repair_exclude_modules(checkpoint: Path) -> list[str]:
    """Cut the sentinel ModelOpt leaves on exclude_modules entries when it maps module names back
    through transformers' checkpoint renaming (seen with Nemotron-H: `lm_head.\x00backbone.pt_name_sentinel`
    for `lm_head`, ModelOpt 0.47 + transformers 5.14). vLLM matches these names against its modules;
    a mangled one leaves the module (a Mamba conv1d, the head) expected quantized. Fixed in both
    hf_quant_config.json and config.json's quantization_config; returns the entries changed."""
    changed: list[str] = []

    def clean(entries: list[Any]) -> list[Any]:
        out = []
        for entry in entries:
            if isinstance(entry, str) and "\x00" in entry:
                fixed = _SENTINEL.sub("", entry)
                changed.append(f"{entry!r} -> {fixed!r}")
                entry = fixed
            out.append(entry)
        return out

    for name, keys in (("hf_quant_config.json", ("quantization",)), ("config.json", ("quantization_config",))):
        path = checkpoint / name
        if not path.is_file():
            continue
        data = json.loads(path.read_text(encoding="utf-8"))
        section = data
        for key in keys:
            section = section.get(key) if isinstance(section, dict) else None
        if not isinstance(section, dict):
            continue
        before = len(changed)
        for field_name in ("exclude_modules", "ignore"):
            if isinstance(section.get(field_name), list):
                section[field_name] = clean(section[field_name])
        if len(changed) > before:
            path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    return sorted(set(changed))


def quantizer_names(model: Any) -> list[str]:
    """The names ModelOpt's quant_cfg patterns are matched against (`...down_proj.weight_quantizer`)."""
    return [name for name, module in model.named_modules() if type(module).__name__.endswith("Quantizer")]


def unmatched_patterns(model: Any, strategy: Strategy, exclude: list[str]) -> list[str]:
    """Patterns that name no quantizer of this model: the recipe's exclusions, and the ModelOpt
    config's entries that ask for quantization (a disable that matches nothing is harmless)."""
    names = quantizer_names(model)
    modules = [name.removesuffix(".weight_quantizer") for name in names if name.endswith(".weight_quantizer")]

    def matches(pattern: str) -> bool:
        return any(exclusions.matches(pattern, name) for name in names)

    warnings = [f"exclusion {pattern!r} matches no layer of this model (a typo, or a module it does not have)"
                for pattern in exclude if not matches(pattern)
                and not any(exclusions.matches(pattern, module) for module in modules)]
    if strategy.layout is not None:
        # A family's globs cover every architecture's names: only a family with none of its modules here is news.
        from runner.quantization.families import FAMILIES

        absent = [family for family, fmt in strategy.layout.formats.items() if fmt != "bf16"
                  and not any(matches(f"{glob}*weight_quantizer") for glob in FAMILIES[family])]
        if absent:
            warnings.append(f"{method_of(strategy, model)}: this model has no module of {', '.join(absent)} "
                            "(runner/quantization/families.py), so no layer gets that family's format")
    elif strategy.auto_quantize is None:
        source = method_of(strategy, model)
        missed: list[str] = []
        for entry in build_config(strategy, [], decoder_layers(model))["quant_cfg"]:
            if not isinstance(entry, dict) or entry.get("enable") is False or entry.get("parent_class"):
                continue
            pattern, cfg = entry.get("quantizer_name"), entry.get("cfg")
            if pattern and cfg is not None and not (isinstance(cfg, dict) and cfg.get("enable") is False) \
                    and not matches(pattern):
                # one line for a module pattern, whichever of its quantizers the entries name
                stem = pattern.removesuffix("weight_quantizer").removesuffix("input_quantizer").rstrip(".") or pattern
                missed += [] if stem in missed else [stem]
        if missed:
            shown = ", ".join(repr(m) for m in missed[:4]) + (f" and {len(missed) - 4} more" if len(missed) > 4 else "")
            warnings.append(f"{source}: {len(missed)} of its patterns match no layer of this model ({shown}); the "
                            "layers they were written for are missing, so nothing of this model gets their format")
    return warnings


def require_quantized(model: Any, strategy: Strategy, exclude: list[str]) -> None:
    """Fail, naming the cause, when the strategy left every weight unquantized."""
    if not any(weight_format(module, name) for name, module, _ in quantized_weights(model)):
        raise SystemExit(nothing_quantized(model, strategy, exclude))


def nothing_quantized(model: Any, strategy: Strategy, exclude: list[str], modelopt_says: str = "") -> str:
    """Why a strategy quantized no weight: the recipe's exclusions when they cover every layer, else
    the preset's or recipe's patterns (with the ones ModelOpt names)."""
    names = [name for name, _, _ in quantized_weights(model)]
    if exclude and all(any(exclusions.matches(p, f"{n}.weight_quantizer") for p in exclude) for n in names):
        return (f"strategy {strategy.name} quantized no layer: the recipe's exclusions {exclude} "
                "(quantization.exclude and the strategy's exclude) cover every layer; narrow them")
    if strategy.auto_quantize is not None:
        return (f"strategy {strategy.name} quantized no layer: auto_quantize kept every layer in 16 bits "
                f"(effective_bits {strategy.auto_quantize.effective_bits} leaves it no reason to quantize)")
    asked = [line.strip() for line in modelopt_says.splitlines()[1:] if line.startswith("  ")][:4]
    if strategy.layout is not None:
        return (f"strategy {strategy.name} quantized no layer: its {method_of(strategy, model)} names no family "
                + (f"({', '.join(asked)}) " if asked else "")
                + "this model has (runner/quantization/families.py); give a format to a family it has")
    what = f"preset {strategy.preset}" if strategy.preset else f"ModelOpt recipe {strategy.modelopt_recipe}"
    return (f"strategy {strategy.name} quantized no layer: the {what}'s patterns"
            + (f" ({', '.join(asked)})" if asked else "")
            + " match none of this model's layers; pick a preset or recipe written for this architecture")


def decoder_layers(model: Any) -> int:
    """The model's decoder-layer count as the host reads it (runner/quantization/layout.py): its config
    (text_config for a VL model), else its `layers.N.` module names."""
    from runner.quantization.layout import num_hidden_layers

    config = getattr(model, "config", None)
    try:
        return num_hidden_layers(config.to_dict() if config is not None else {},
                                 [name for name, _ in model.named_modules()])
    except ValueError as exc:
        raise SystemExit(f"cannot place a layout's kept layers: {exc}") from None


def method_of(strategy: Strategy, model: Any = None) -> str:
    """How the strategy quantizes, in words (the footprint's `method`, a layout's kept layers resolved)."""
    from runner.quantization.footprint import strategy_method

    return strategy_method(strategy, decoder_layers(model) if model is not None and strategy.layout else None)


def held_out_set(calib: CalibrationSet, device: Any) -> tuple[list[dict[str, Any]], str]:
    """Batches to measure fidelity on, and what they are: held-out conversations where the file has them,
    the leading ones that fit fidelity.MAX_TOKENS (whole conversations, in the held-out order)."""
    from runner.worker import fidelity

    held, cap = calib.held_out_ids, fidelity.MAX_TOKENS
    used = fidelity.conversations_within([len(ids) for ids in held], cap)
    batches = pad_batches([ids[:cap] for ids in held[:used]], calib.pad_id, 4, device)
    if batches:
        cut = f" (the first {used} of {len(held)}: {cap} tokens at most)" if used < len(held) else ""
        return batches, f"{used} held-out conversations of the recipe's calibration set{cut}"
    # Every conversation was used for calibration: say so rather than pretend.
    return calib.batches(4, device)[-2:], "calibration samples (the calibration file has no conversation to spare)"


def sensitivity_set(model: Any, calib: CalibrationSet, device: Any, logits_kwargs: dict[str, Any], n: int,
                    eval_batches: list[dict[str, Any]], source: Any) -> tuple[list[dict[str, Any]], Any]:
    """Batches for the per-layer sensitivity (sensitivity.py) and the source's snapshot on them, taken
    now, before quantizing: the first n held-out conversations (each layer costs a forward over them).
    Without held-out conversations, fidelity's own set. ([], None) when n is 0."""
    from runner.worker import fidelity, sensitivity

    if n <= 0:
        return [], None
    if not calib.held_out_ids:
        return eval_batches, source
    batches = pad_batches(sensitivity.subset(calib.held_out_ids, n), calib.pad_id, 4, device)
    return batches, fidelity.snapshot(model, batches, logits_kwargs)


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
                   device: Any, search_state: Path | None = None) -> dict[str, Any]:
    """Calibrate and quantize in place.

    Returns the batching (token budget, batches, most rows in a batch as batch_size, real and padding
    tokens), time, peak GPU memory (and auto_quantize's choice). `batch_size: auto` batches by a token
    budget fitted to memory (see auto_batch_size and calib_data.plan_token_batches); an integer means
    that many samples a batch, by length. auto_quantize gets the same batches as a preset would.
    """
    import torch

    strategy = Strategy.model_validate(strategy) if isinstance(strategy, dict) else strategy
    spec = strategy.auto_quantize
    config = None if spec else build_config(strategy, exclude, decoder_layers(model) if strategy.layout else None)
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
        result["auto_quantize"] = quantize_auto(model, batches, spec.model_copy(update=steps), exclude, search_state)
    else:
        try:
            quantize_with_config(model, config, batches)
        except RuntimeError as exc:  # ModelOpt 0.47 refuses a config that quantizes no weight
            if "nothing would be quantized" not in str(exc):
                raise
            raise SystemExit(nothing_quantized(model, strategy, exclude, str(exc))) from None
    if device.type == "cuda":
        torch.cuda.synchronize()
        result["peak_gpu_bytes"] = torch.cuda.max_memory_allocated()
    result["quantize_s"] = round(time.monotonic() - t0, 3)
    return result


def build_config(strategy: Strategy, exclude: list[str], num_layers: int | None = None) -> dict[str, Any]:
    """A ModelOpt quantization config: preset, ModelOpt recipe or layout (on a model of `num_layers`
    decoder layers), algorithm override, exclusions appended."""
    import modelopt.torch.quantization as mtq

    if strategy.preset:
        config = copy.deepcopy(getattr(mtq, strategy.preset))
    elif strategy.layout is not None:
        config = {"quant_cfg": layout_quant_cfg(strategy, num_layers), "algorithm": "max"}
    else:
        config = load_modelopt_recipe(strategy.modelopt_recipe)
    if strategy.algorithm:
        config["algorithm"] = strategy.algorithm
    # ModelOpt >= 0.44: quant_cfg is an ordered list and later entries win.
    config["quant_cfg"] = list(config["quant_cfg"]) + [{"quantizer_name": p, "enable": False} for p in exclude]
    return config


def layout_quant_cfg(strategy: Strategy, num_layers: int | None) -> list[dict[str, Any]]:
    """A layout's quant_cfg, compiled from ModelOpt's own preset dicts (what `mtq.quantize` is given for a
    preset), read the way the host reads the presets' YAML: the same entries, so the same formats."""
    import modelopt.torch.quantization as mtq

    from runner.quantization import Unknown
    from runner.quantization.layout import compile_layout
    from runner.quantization.modelopt_config import quant_cfg_entries

    assert strategy.layout is not None
    if num_layers is None:
        raise SystemExit(f"strategy {strategy.name}: a layout needs the model's decoder-layer count")

    def preset_entries(name: str) -> list[dict[str, Any]]:
        return quant_cfg_entries(copy.deepcopy(getattr(mtq, name)["quant_cfg"]))

    try:
        return compile_layout(strategy.layout, num_layers, preset_entries)
    except (ValueError, Unknown) as exc:
        raise SystemExit(f"strategy {strategy.name}: {exc}") from None


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
    passes = 0

    def forward_loop(m: Any) -> None:
        nonlocal passes
        passes += 1  # max calibrates in one pass; AWQ's search runs several
        with torch.no_grad():
            for i, batch in enumerate(batches, start=1):
                m(**batch, **extra)
                print(f"[quantize] calibration pass {passes}: batch {i}/{len(batches)}", flush=True)

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


def quantize_auto(model: Any, batches: list[dict[str, Any]], spec: AutoQuantizeSpec, exclude: list[str],
                  search_state: Path | None = None) -> dict:
    """ModelOpt's auto_quantize; spec's step counts are batches here (quantize_model converts samples).

    `search_state`: ModelOpt's search checkpoint. Where the file exists, the formats' calibration and the
    layer scores are restored from it and only the solve for this effective_bits runs; where it does not,
    they are computed and saved there (the score step). It is read from a private copy: ModelOpt may
    write the file again, and the score step's committed output is never written.
    """
    import tempfile

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
    restored = search_state is not None and search_state.is_file()
    with tempfile.TemporaryDirectory(prefix="auto_quantize.") as private:
        if search_state is not None:
            kwargs["checkpoint"] = str(search_state)
            if restored:
                kwargs["checkpoint"] = str(Path(private) / search_state.name)
                shutil.copyfile(search_state, kwargs["checkpoint"])
        try:
            with torch.set_grad_enabled(spec.method == "gradient"):
                _, state = mtq.auto_quantize(model, **kwargs)
        except ValueError as exc:
            if "infeasible" in str(exc):
                raise SystemExit(f"auto_quantize: {exc} Raise auto_quantize.effective_bits in the recipe, or "
                                 "exclude fewer layers.") from None
            if restored and "checkpoint" in str(exc).lower():  # a state made for other settings: say so
                raise SystemExit(f"auto_quantize: the score step's search state does not fit this strategy: "
                                 f"{exc}") from None
            raise
    best = state.get("best", {}) if isinstance(state, dict) else {}
    return {"constraints": {"effective_bits": spec.effective_bits}, "restored_search_state": restored,
            "calib_batches": kwargs["num_calib_steps"], "score_batches": kwargs["num_score_steps"],
            "achieved": {k: float(v) for k, v in (best.get("constraints") or {}).items()
                         if isinstance(v, (int, float))},
            "score": float(best["score"]) if isinstance(best.get("score"), (int, float)) else None}


# A batch's GEMMs are saturated long before this many tokens (a 9B layer's 4096-wide matmuls at 64 k rows):
# a larger budget buys no speed, only memory (hf_ptq's path peaked at 45 GiB where a half-the-free-memory
# budget took 84 GiB on an H200, for the same time).
MAX_TOKEN_BUDGET = 65_536


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
    than one longest sample, never more than every sample at the longest width or MAX_TOKEN_BUDGET.
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
    from runner.worker.placement import capped_free_bytes

    free = capped_free_bytes(device.index or 0)  # a shared GPU: this worker's lease, not the whole card
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
    return int(max(longest, min(ceiling, MAX_TOKEN_BUDGET, free * share // per_token)))


def quantized_weights(model: Any) -> list[tuple[str, Any, Any]]:
    """(name, module, weight tensor) of every weight a quantizer may cover: each Linear's `weight`
    (lm_head included) and the fused expert tensors of MoE blocks (`experts.gate_up_proj`: ModelOpt
    gives those a `<tensor>_weight_quantizers` list)."""
    import torch

    found = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            if getattr(module, "weight", None) is not None:
                found.append((name, module, module.weight))
            continue
        for child, _ in module.named_children():
            tensor_name = child.removesuffix("_weight_quantizers").removesuffix("_weight_quantizer")
            if tensor_name != child and isinstance(getattr(module, tensor_name, None), torch.Tensor):
                found.append((f"{name}.{tensor_name}", module, getattr(module, tensor_name)))
    return found


def weight_format(module: Any, tensor_name: str) -> str | None:
    """The export format ModelOpt gives this weight (its own `get_quantization_format`), with a `_bN`
    suffix for an unusual block size; None when it stays unquantized."""
    from modelopt.torch.export.quant_utils import get_quantization_format

    try:
        fmt = get_quantization_format(module)
    except (AssertionError, AttributeError, KeyError) as exc:  # a quantizer layout the exporter rejects
        return f"unknown ({type(exc).__name__})"
    if fmt is None:
        return None
    quantizer = getattr(module, "weight_quantizer", None)
    if quantizer is None:
        plural = getattr(module, f"{tensor_name.rsplit('.', 1)[-1]}_weight_quantizers", None)
        quantizer = plural[0] if plural is not None and len(plural) else None
    first = quantizer[0] if hasattr(quantizer, "__getitem__") and not hasattr(quantizer, "num_bits") else quantizer
    blocks = getattr(first, "block_sizes", None) or {}
    block = blocks.get(-1) if isinstance(blocks, dict) else None
    return format_name(fmt, int(block) if block else None)


def layer_formats(model: Any) -> dict[str, str]:
    """Weight name -> the format it was stored in (its dtype when left unquantized): every Linear
    (lm_head included) and every fused MoE expert tensor. Embeddings are not counted
    (runner/quantization/bits.py's definition)."""
    return {name: weight_format(module, name) or str(tensor.dtype).removeprefix("torch.")
            for name, module, tensor in quantized_weights(model)}


def format_counts(layers: dict[str, str]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for fmt in layers.values():
        counts[fmt] = counts.get(fmt, 0) + 1
    return counts


def effective_bits(model: Any, layers: dict[str, str]) -> float:
    """runner/quantization/bits.py's definition: bits per logical weight (packed exports unpacked),
    scales included."""
    import torch

    tensors = {name: tensor for name, _, tensor in quantized_weights(model)}
    return bits_per_weight(
        (fmt, logical_numel(tensors[name].numel(), fmt) if tensors[name].dtype in (torch.uint8, torch.int8)
         else tensors[name].numel()) for name, fmt in layers.items() if not fmt.startswith("unknown"))
