"""Per-decoder-layer sensitivity: how much of the quantized model's KL each decoder layer causes.

For each decoder layer i, every enabled ModelOpt quantizer of that layer is disabled (the layer runs
in the source precision, the rest of the model stays quantized), the KL to the source is measured on
a few held-out conversations (fidelity.measure), and the quantizers are enabled again. A layer's
`kl_recovered = kl - kl_without` is what keeping it unquantized would win back: the layers with the
largest values are the ones a layout search raises first.

Only quantizers that were enabled are touched: ones disabled on purpose (lm_head, the recipe's
exclusions, ModelOpt's hard-disabled embedding slots) stay disabled, and every quantizer's state is
checked against the one before the loop. The full model's KL is measured again after the loop
(`kl_after_restore`): the same forward on the same batches gives the same value when nothing was
left changed.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from typing import Any

# A decoder layer's index in a module name: model.layers.3., model.language_model.layers.3.,
# backbone.layers.3., layers.3. (the first match counts: experts.<j> below it are not layers).
LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.")
# Stacks that are not the decoder's although their blocks are called layers (a vision encoder's,
# an MTP head's): their indices would collide with the decoder's.
NOT_DECODER = ("vision", "visual", "audio", "speech", "mtp")
TOP = 5  # layers printed at the end


def layer_index(name: str) -> int | None:
    """The decoder layer a quantizer (or module) name belongs to; None outside the decoder stack."""
    match = LAYER_INDEX.search(name)
    if match is None:
        return None
    prefix = name[:match.start()].lower()
    if any(word in prefix for word in NOT_DECODER):
        return None
    return int(match.group(1))


def tensor_quantizers(model: Any) -> dict[str, Any]:
    """Every leaf TensorQuantizer by name (the members of sequential and grouped containers too)."""
    from modelopt.torch.quantization.nn import TensorQuantizer

    return {name: module for name, module in model.named_modules() if isinstance(module, TensorQuantizer)}


def enabled_state(model: Any) -> dict[str, bool]:
    return {name: bool(q.is_enabled) for name, q in tensor_quantizers(model).items()}


class FrozenWeights:
    """Each enabled fake-quant weight quantizer's output computed once and stored in its weight (the
    quantizer off meanwhile), as ModelOpt's fold_weight does, but undoable: the loop forwards the
    model once a layer, and re-quantizing every weight each time was most of a forward's cost (on a
    CPU, 10 of 12 s for SmolLM2-135M in NVFP4). The same function of the same weights: the KL is the
    same (the test checks it against the worker's own measurement)."""

    def __init__(self, quantizers: dict[str, Any], model: Any) -> None:
        import torch

        self.frozen: dict[str, tuple[Any, Any, Any]] = {}  # quantizer name -> (quantizer, weight, original)
        modules = dict(model.named_modules())
        with torch.no_grad():
            for name, quantizer in quantizers.items():
                owner, _, attr = name.rpartition(".")
                module = modules.get(owner)
                # Outside a forward a QuantLinear's `weight` is the stored parameter, not quantized.
                weight = getattr(module, "weight", None) if attr == "weight_quantizer" else None
                if not (isinstance(weight, torch.nn.Parameter) and quantizer.is_enabled
                        and getattr(quantizer, "fake_quant", False)):
                    continue
                original = weight.data
                weight.data = quantizer(original).to(original.dtype)
                quantizer.disable()
                self.frozen[name] = (quantizer, weight, original)

    def source(self, names: Sequence[str]) -> None:
        """The weights of these quantizers back to the source's (for one layer's measurement)."""
        for name in names:
            if name in self.frozen:
                _, weight, original = self.frozen[name]
                weight.data, self.frozen[name] = original, (*self.frozen[name][:2], weight.data)

    def restore(self) -> None:
        """Every weight to its original and its quantizer on again."""
        for quantizer, weight, original in self.frozen.values():
            weight.data = original
            quantizer.enable()
        self.frozen = {}


def measure_layers(model: Any, batches: list[dict[str, Any]], forward_kwargs: dict[str, Any], source: Any,
                   log: Any = print) -> dict[str, Any]:
    """The sensitivity record (see the module docstring) against `source`, a snapshot of the source
    model taken on the same batches. The model is left as it came."""
    from runner.worker import fidelity

    t0 = time.monotonic()
    quantizers = tensor_quantizers(model)
    before = {name: bool(q.is_enabled) for name, q in quantizers.items()}
    by_layer: dict[int, list[str]] = {}
    for name in quantizers:
        index = layer_index(name)
        if index is None:
            continue
        by_layer.setdefault(index, [])
        if before[name]:  # only what is on now is switched off (and back on)
            by_layer[index].append(name)

    def kl_now() -> tuple[float, dict[str, Any]]:
        _, (result,) = fidelity.measure(model, batches, forward_kwargs, [source])
        return float(result.get("kl", 0.0)), result

    frozen = FrozenWeights(quantizers, model)
    layers: list[dict[str, Any]] = []
    try:
        kl_full, full = kl_now()
        for index in sorted(by_layer):
            group = by_layer[index]
            if not group:  # nothing quantized in this layer: keeping it unquantized wins nothing
                layers.append({"layer": index, "quantizers": 0, "kl_without": kl_full, "kl_recovered": 0.0})
                continue
            t1 = time.monotonic()
            switched = [quantizers[name] for name in group if name not in frozen.frozen]
            try:
                frozen.source(group)
                for quantizer in switched:
                    quantizer.disable()
                kl_without, _ = kl_now()
            finally:
                frozen.source(group)  # a swap: the quantized weights go back
                for quantizer in switched:
                    quantizer.enable()
            layers.append({"layer": index, "quantizers": len(group), "kl_without": kl_without,
                           "kl_recovered": round(kl_full - kl_without, 6)})
            log(f"[quantize] sensitivity: layer {index} ({len(group)} quantizers off) KL {kl_without} "
                f"(recovers {kl_full - kl_without:.6f} of {kl_full}) in {time.monotonic() - t1:.1f}s")
    finally:
        frozen.restore()
    after = enabled_state(model)
    if after != before:
        changed = sorted(name for name in before if after.get(name) != before[name])
        raise RuntimeError(f"sensitivity left {len(changed)} quantizers in another state: {changed[:4]}")
    kl_after, _ = kl_now()
    measured = [entry for entry in layers if entry["quantizers"]]
    seconds = time.monotonic() - t0
    top = sorted(measured, key=lambda e: e["kl_recovered"], reverse=True)[:TOP]
    log(f"[quantize] sensitivity: {len(layers)} decoder layers ({len(measured)} measured) in {seconds:.1f}s; "
        "most KL recovered by keeping one layer unquantized: "
        + ", ".join(f"layer {e['layer']} {e['kl_recovered']:.6f}" for e in top))
    return {"kl": kl_full, "kl_after_restore": kl_after, "conversations": full.get("conversations", 0),
            "tokens": full.get("tokens", 0), "seconds": round(seconds, 3),
            "seconds_per_layer": round(seconds / max(len(measured) + 2, 1), 3),  # +2: the full model twice
            "layers": layers}


def subset(held_out_ids: Sequence[list[int]], n: int) -> list[list[int]]:
    """The first n held-out conversations within fidelity's token cap (the leading ones: the held-out
    order is a seeded shuffle, the same subset for every strategy)."""
    from runner.worker import fidelity

    cap = fidelity.MAX_TOKENS
    used = fidelity.conversations_within([len(ids) for ids in held_out_ids[:n]], cap)
    return [ids[:cap] for ids in held_out_ids[:used]]
