"""Fold AWQ's per-channel input scales into the model, so that the export is plain NVFP4.

AWQ leaves every smoothed Linear C with a `pre_quant_scale` s: C computes (W / s) · (x * s). vLLM's
ModelOpt loader has no place for s (it loads NVFP4 and W4A16_NVFP4, not NVFP4_AWQ), so s must be
moved into the module that produces x, which is exact when that module is linear in its output:

- a norm whose output only feeds Linears with scales (q/k/v after input_layernorm, gate/up after
  post_attention_layernorm): the group's scales are averaged (each member re-quantized for the
  average, which is what ModelOpt does for fused groups), and the norm's weight absorbs the average;
  norms that compute `x * (1 + w)` (Qwen3.5, Gemma) are told from `x * w` by a probe, not a name;
- a Linear P whose output reaches C's input through something linear in it (v_proj -> attention ->
  o_proj, up_proj -> act(gate) * up -> down_proj): P's output channels are scaled. Which C input
  channel comes from which P channel is found by probing, not assumed: with quantizers off, P's
  rows are doubled in log2(out) bit patterns and each C input channel must double exactly in the
  pattern of one P channel (powers of two are exact in floating point). Grouped-query attention maps
  several C channels to one P channel: their scales are averaged and C is re-quantized for it;
- anything else (no such producer, or the producer also feeds modules without scales): the scale is
  multiplied into C's weight, which is re-quantized ("resmoothed"): no longer smoothed, still right.

Where C's scale changes, its input amax is recomputed exactly from the per-channel activation
maxima AWQ recorded (`_amax_for_smoothing`), so no data pass is needed. The decision is made from
the module structure of the running model, so a new architecture needs no code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

RATIO_TOLERANCE = 2e-2  # a doubled activation, measured through bf16 arithmetic
EXACT_TOLERANCE = 1e-6  # scales that agree this well are "the same" (folded, not averaged)


@dataclass
class FoldRecord:
    layer: str
    action: str  # folded_norm | folded_linear | averaged | resmoothed
    into: str | None = None
    spread: float = 0.0  # largest relative difference between the scales that had to be averaged
    note: str = ""

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"layer": self.layer, "action": self.action}
        if self.into:
            out["into"] = self.into
        if self.spread:
            out["spread"] = round(self.spread, 4)
        if self.note:
            out["note"] = self.note
        return out


@dataclass
class _Trace:
    """What one probe forward saw: who consumed and produced which tensor, and each block's arguments."""

    inputs: dict[str, tuple] = field(default_factory=dict)  # unit name -> key of its first input
    outputs: dict[str, tuple] = field(default_factory=dict)  # unit name -> key of its output
    args: dict[str, tuple[tuple, dict]] = field(default_factory=dict)  # parent name -> (args, kwargs)
    keep: list[Any] = field(default_factory=list)  # keeps traced tensors alive, so addresses stay unique


def has_scale(module: Any) -> bool:
    """A Linear that AWQ smoothed. SVDQuant's are left alone: its low-rank branch reads the scaled input."""
    quantizer = getattr(module, "input_quantizer", None)
    if getattr(getattr(module, "weight_quantizer", None), "svdquant_lora_a", None) is not None:
        return False
    return (quantizer is not None and getattr(quantizer, "_pre_quant_scale", None) is not None
            and getattr(quantizer, "_enable_pre_quant_scale", True))


def fold_awq_scales(model: Any, probe: dict[str, Any], forward_kwargs: dict[str, Any],
                    norms_only: bool = False) -> list[dict[str, Any]]:
    """Remove every pre_quant_scale from `model` in place; one record per smoothed Linear.

    `norms_only` (for a raw NVFP4_AWQ export): fold only the shared-input groups into their norms,
    done right for norms of the form x * (1 + w), which ModelOpt 0.47's export folds as if they were
    x * w (it recognises such norms by class name, and Qwen3.5's is not on its list). The other
    scales stay for the engine to apply; the folded Linears are flagged the way ModelOpt flags its
    own folds, so the export still says NVFP4_AWQ.
    """
    import torch

    modules = dict(model.named_modules())
    consumers = [name for name, m in modules.items() if has_scale(m)]
    if not consumers:
        return []
    parents = {_parent(name) for name in consumers}
    with torch.no_grad():
        trace = _trace(model, modules, parents, probe, forward_kwargs)
        records: dict[str, FoldRecord] = {}
        _fold_into_norms(modules, consumers, trace, records)
        if norms_only:
            for name in records:
                modules[name].fused_with_prequant = True  # ModelOpt's mark: export as NVFP4_AWQ
        for name in consumers:
            if name not in records and not norms_only:
                records[name] = _fold_into_producer(modules, name, trace) or _resmooth(modules, name)
    trace.keep.clear()
    return [records[name].as_dict() for name in consumers if name in records]


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    counts: dict[str, int] = {}
    for r in records:
        counts[r["action"]] = counts.get(r["action"], 0) + 1
    return {"layers": len(records), "actions": counts,
            "max_spread": max((r.get("spread", 0.0) for r in records), default=0.0)}


# --- tracing ---------------------------------------------------------------------------------


def _key(tensor: Any) -> tuple | None:
    import torch

    if not isinstance(tensor, torch.Tensor):
        return None
    return tensor.data_ptr(), tensor.numel(), tensor.dtype


def _parent(name: str) -> str:
    return name.rpartition(".")[0]


def _is_unit(module: Any) -> bool:
    """A module that owns a weight itself: a Linear, a norm, an embedding, a convolution."""
    return module._parameters.get("weight") is not None


def _trace(model: Any, modules: dict[str, Any], parents: set[str], probe: dict[str, Any],
           forward_kwargs: dict[str, Any]) -> _Trace:
    trace = _Trace()
    handles = []

    def unit_hook(name: str):
        def hook(module: Any, args: tuple, output: Any) -> None:
            if args:
                trace.inputs[name] = _key(args[0])
                trace.keep.append(args[0])
            out = output[0] if isinstance(output, tuple) else output
            trace.outputs[name] = _key(out)
            trace.keep.append(out)
        return hook

    def parent_hook(name: str):
        def hook(module: Any, args: tuple, kwargs: dict) -> None:
            trace.args[name] = (args, dict(kwargs))
        return hook

    for name, module in modules.items():
        if _is_unit(module):
            handles.append(module.register_forward_hook(unit_hook(name)))
        if name in parents:
            handles.append(module.register_forward_pre_hook(parent_hook(name), with_kwargs=True))
    try:
        model(**probe, **forward_kwargs)
    finally:
        for handle in handles:
            handle.remove()
    return trace


# --- the three ways out ----------------------------------------------------------------------


def _fold_into_norms(modules: dict[str, Any], consumers: list[str], trace: _Trace,
                     records: dict[str, FoldRecord]) -> None:
    """Groups of Linears that share one input produced by a norm that feeds nothing else."""
    import torch

    groups: dict[tuple, list[str]] = {}
    for name in consumers:
        key = trace.inputs.get(name)
        if key is not None:
            groups.setdefault(key, []).append(name)
    producers = {key: name for name, key in trace.outputs.items() if key is not None}
    for key, group in groups.items():
        norm_name = producers.get(key)
        readers = [n for n, k in trace.inputs.items() if k == key]
        if norm_name is None or sorted(readers) != sorted(group):
            continue  # not a norm's output, or read by something that has no scale to give up
        norm = modules[norm_name]
        in_features = modules[group[0]].weight.shape[1]
        if norm.weight.dim() != 1 or norm.weight.numel() != in_features:
            continue
        offset = _norm_offset(norm)
        if offset is None:
            continue
        scales = torch.stack([_scale(modules[n]) for n in group])
        target = scales.mean(dim=0)
        spread = _spread(scales, target)
        for name in group:
            _rescale_consumer(modules[name], target)
        weight = norm.weight.data.float()
        folded = (weight + offset) * target.to(weight.device) - offset
        norm.weight.data.copy_(folded.to(norm.weight.dtype))
        if getattr(norm, "bias", None) is not None:
            norm.bias.data.copy_((norm.bias.data.float() * target.to(weight.device)).to(norm.bias.dtype))
        for name in group:
            records[name] = FoldRecord(name, "folded_norm" if spread <= EXACT_TOLERANCE else "averaged",
                                       norm_name, spread if spread > EXACT_TOLERANCE else 0.0,
                                       "" if len(group) == 1 else f"shares its input with {len(group) - 1} other(s)")


def _norm_offset(norm: Any) -> float | None:
    """0 for norms that compute x_hat * w, 1 for x_hat * (1 + w); None when neither scales cleanly.

    Probed on a small random input: doubling the effective weight must double the output.
    """
    import torch

    weight = norm.weight
    x = torch.randn(2, weight.numel(), device=weight.device, dtype=weight.dtype)
    original = weight.data.clone()
    try:
        base = norm(x).float()
        for offset in (0.0, 1.0):
            weight.data.copy_(((original.float() + offset) * 2 - offset).to(weight.dtype))
            doubled = norm(x).float()
            weight.data.copy_(original)
            if torch.allclose(doubled, 2 * base, rtol=RATIO_TOLERANCE, atol=1e-3):
                return offset
    finally:
        weight.data.copy_(original)
    return None


def _fold_into_producer(modules: dict[str, Any], name: str, trace: _Trace) -> FoldRecord | None:
    """Scale the output channels of the sibling Linear that feeds this one linearly."""
    import torch

    consumer = modules[name]
    parent = _parent(name)
    if parent not in trace.args:
        return None
    in_features = consumer.weight.shape[1]
    siblings = [n for n, m in modules.items() if _parent(n) == parent and n != name and _is_unit(m)
                and m.weight.dim() == 2]
    for producer_name in siblings:
        producer = modules[producer_name]
        out_features = producer.weight.shape[0]
        if in_features % out_features:
            continue
        mapping = _probe_mapping(modules, parent, producer_name, name, siblings, trace)
        if mapping is None:
            continue
        scale = _scale(consumer)
        index = torch.as_tensor(mapping, device=scale.device)
        sums = torch.zeros(out_features, device=scale.device, dtype=torch.float32).index_add_(0, index, scale)
        counts = torch.zeros(out_features, device=scale.device, dtype=torch.float32).index_add_(
            0, index, torch.ones_like(scale))
        per_channel = torch.where(counts > 0, sums / counts.clamp_min(1), torch.ones_like(sums))
        target = per_channel[index]
        spread = float(((scale - target).abs() / target).max())
        _rescale_consumer(consumer, target)
        _scale_rows(producer, per_channel)
        exact = spread <= EXACT_TOLERANCE
        note = "" if exact else f"{in_features // out_features} input channels per {producer_name} channel"
        return FoldRecord(name, "folded_linear" if exact else "averaged", producer_name, 0.0 if exact else spread,
                          note)
    return None


def _probe_mapping(modules: dict[str, Any], parent: str, producer_name: str, consumer_name: str,
                   siblings: list[str], trace: _Trace) -> list[int] | None:
    """For each consumer input channel, the producer output channel it is proportional to, or None."""
    import torch

    producer = modules[producer_name]
    out_features = producer.weight.shape[0]
    bits = max(1, math.ceil(math.log2(out_features)))
    watched = [consumer_name] + [s for s in siblings if s != producer_name]
    seen: dict[str, Any] = {}
    handles = [modules[n].register_forward_pre_hook(
        lambda m, args, n=n: seen.__setitem__(n, args[0].detach().float().clone())) for n in watched]
    quantizers = [m for n, m in modules.items() if n.startswith(parent + ".") and hasattr(m, "disable")
                  and hasattr(m, "is_enabled")]
    enabled = [q.is_enabled for q in quantizers]
    args, kwargs = trace.args[parent]
    original = producer.weight.data.clone()
    bias = producer.bias.data.clone() if getattr(producer, "bias", None) is not None else None
    try:
        for q in quantizers:
            q.disable()
        modules[parent](*args, **kwargs)
        base = dict(seen)
        if consumer_name not in base:
            return None
        reference = base[consumer_name].reshape(-1, base[consumer_name].shape[-1])
        usable = reference.abs() > 1e-4 * reference.abs().max().clamp_min(1e-30)
        mapping = torch.zeros(reference.shape[-1], dtype=torch.long, device=reference.device)
        # First every row doubled: each consumer channel must double (else it does not depend on the
        # producer alone); then one probe per bit of the producer channel's index.
        patterns = [torch.ones(out_features, dtype=torch.bool, device=original.device)]
        patterns += [((torch.arange(out_features, device=original.device) >> bit) & 1).bool() for bit in range(bits)]
        for probe, rows in enumerate(patterns):
            factor = torch.where(rows, 2.0, 1.0).to(original.dtype)
            producer.weight.data.copy_(original * factor[:, None])
            if bias is not None:
                producer.bias.data.copy_(bias * factor)
            seen.clear()
            modules[parent](*args, **kwargs)
            for other in watched[1:]:
                if other in seen and not torch.allclose(seen[other], base[other], rtol=1e-3, atol=1e-5):
                    return None  # the producer's output reaches another module too
            ratio = seen[consumer_name].reshape(reference.shape) / torch.where(usable, reference, 1.0)
            doubled = usable & ((ratio - 2).abs() <= 2 * RATIO_TOLERANCE)
            kept = usable & ((ratio - 1).abs() <= RATIO_TOLERANCE)
            if not bool((doubled | kept | ~usable).all()):
                return None  # not proportional: a nonlinearity lies between them
            column_doubled = doubled.any(0)
            if bool((column_doubled & kept.any(0)).any()):
                return None  # one input channel moved with two different producer channels
            if probe == 0:
                if bool(kept.any()):
                    return None  # some input does not come from the producer
                continue
            mapping |= column_doubled.long() << (probe - 1)
        if bool((mapping >= out_features).any()) or not bool(usable.any(0).all()):
            return None
        return mapping.tolist()
    finally:
        producer.weight.data.copy_(original)
        if bias is not None:
            producer.bias.data.copy_(bias)
        for q, on in zip(quantizers, enabled, strict=True):
            if on:
                q.enable()
        for handle in handles:
            handle.remove()


def _resmooth(modules: dict[str, Any], name: str) -> FoldRecord:
    import torch

    consumer = modules[name]
    _rescale_consumer(consumer, torch.ones_like(_scale(consumer)))
    return FoldRecord(name, "resmoothed", note="no exact place for its scale: multiplied into the weight")


# --- the arithmetic --------------------------------------------------------------------------


def _scale(module: Any) -> Any:
    return module.input_quantizer._pre_quant_scale.detach().float().reshape(-1)


def _spread(scales: Any, target: Any) -> float:
    return float(((scales - target[None, :]).abs() / target[None, :].abs().clamp_min(1e-30)).max())


def _rescale_consumer(module: Any, target: Any) -> None:
    """Make `module` expect its input multiplied by `target` instead of by its own scale, then drop the scale.

    Weight: (W / s) becomes (W / target), re-quantized. Input amax: that of x * target, from the
    per-channel maxima of x that AWQ recorded.
    """
    quantizer = module.input_quantizer
    scale = _scale(module).to(module.weight.device)
    target = target.to(module.weight.device, dtype=scale.dtype)
    weight = module.weight.data.float() * scale[None, :] / target[None, :]
    module.weight.data.copy_(weight.to(module.weight.dtype))
    smoothing = getattr(quantizer, "_amax_for_smoothing", None)
    if quantizer.is_enabled and getattr(quantizer, "amax", None) is not None and smoothing is not None:
        amax = (smoothing.to(target.device).float().reshape(-1) * target).amax()
        quantizer.amax = amax.to(device=quantizer.amax.device, dtype=quantizer.amax.dtype)
    delattr(quantizer, "_pre_quant_scale")
    quantizer._enable_pre_quant_scale = False
    _recalibrate_weight(module)


def _scale_rows(module: Any, per_channel: Any) -> None:
    factor = per_channel.to(module.weight.device)
    module.weight.data.copy_((module.weight.data.float() * factor[:, None]).to(module.weight.dtype))
    if getattr(module, "bias", None) is not None:
        module.bias.data.copy_((module.bias.data.float() * factor).to(module.bias.dtype))
    if hasattr(module, "weight_quantizer"):
        _recalibrate_weight(module)


def _recalibrate_weight(module: Any) -> None:
    quantizer = getattr(module, "weight_quantizer", None)
    if quantizer is None or not getattr(quantizer, "is_enabled", False):
        return
    from modelopt.torch.quantization.model_calib import enable_stats_collection, finish_stats_collection

    quantizer.reset_amax()
    enable_stats_collection(quantizer)
    quantizer(module.weight)
    finish_stats_collection(quantizer)
