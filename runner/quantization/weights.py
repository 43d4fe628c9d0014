"""A model folder as the quantize worker will load it, read from config.json and the safetensors headers
only (names, dtypes, shapes; no torch), or from a tensor listing made on the meta device.

Source tensors that the worker's causal-LM load drops (MTP heads, a Qwen3.5 vision tower: transformers'
`_keys_to_ignore_on_load_unexpected`) are not part of the quantized model: they are kept apart in
`dropped` (a listing holds them under `dropped_on_load`), and the footprint counts those an export's
`carry_tensors` fix-ups carry back (runner/quantization/footprint.py `carried_tensors`).
"""

from __future__ import annotations

import fnmatch
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runner.quantization import Unknown
from runner.quantization.decode import active_expert_fraction
from runner.quantization.safetensors_headers import Tensor, read_headers

# Tensors a causal-LM load ignores (transformers' Qwen3_5ForCausalLM: `^mtp.*`, `^model.visual.*`).
DROPPED_ON_LOAD = ["mtp.*", "model.mtp.*", "model.visual.*"]


def is_dropped_on_load(name: str) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in DROPPED_ON_LOAD)

_EMBEDDING = re.compile(r"(embed|(^|\.)(wte|wpe)$)")


def is_embedding(module: str) -> bool:
    """An embedding table (never a Linear: not counted in bits, never quantized by vLLM's ModelOpt loader)."""
    return bool(_EMBEDDING.search(module))


@dataclass
class Weights:
    """A model folder as the worker will load it: its tensors, Linear and Conv weights."""

    tensors: dict[str, Tensor]  # what the causal-LM load keeps
    linears: dict[str, Tensor]  # module name -> 2-D weight (a tied lm_head included: it counts in bits)
    convs: dict[str, Tensor]  # module name -> weight of a convolution (ModelOpt counts these)
    dropped: dict[str, Tensor] = field(default_factory=dict)  # what the causal-LM load drops (DROPPED_ON_LOAD)
    expert_fraction: float | None = None  # a MoE token reads this share of the routed experts' bytes
    num_layers: int | None = None  # decoder layers (config.json, else the `layers.N.` names): a layout's keep_*
    # What was computed from these weights, by what decides it (strategy_footprint, strategy_formats):
    # thousands of strategies that differ only in name cost one computation.
    memo: dict[Any, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def dropped_bytes(self) -> int:
        return sum(t.nbytes for t in self.dropped.values())


LISTING = "tensors.json"


def load_weights(folder: Path) -> Weights:
    """The model's weights from its safetensors headers, or, in a folder without weights, from the
    tensor listing the worker made on the meta device (recipes/models/*/tensors.json)."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise Unknown(f"{folder} has no config.json")
    everything = read_headers(folder)
    if not everything and (folder / LISTING).is_file():
        everything = read_listing(folder / LISTING)
    if not everything:
        raise Unknown(f"no safetensors in {folder}")
    tensors = {n: t for n, t in everything.items() if not is_dropped_on_load(n)}
    linears: dict[str, Tensor] = {}
    convs: dict[str, Tensor] = {}
    for name, tensor in tensors.items():
        if not name.endswith(".weight"):
            continue
        module = name.removesuffix(".weight")
        if len(tensor.shape) == 2 and not is_embedding(module):
            linears[module] = tensor
        elif 3 <= len(tensor.shape) <= 5 and "conv" in module.rsplit(".", 1)[-1]:
            convs[module] = tensor
    if not any(m == "lm_head" or m.endswith(".lm_head") for m in linears):
        embedding = next((t for n, t in tensors.items() if n.endswith("embed_tokens.weight")), None)
        if embedding is not None:  # the head exists in the model, sharing the embedding's weight
            linears["lm_head"] = Tensor("lm_head.weight", embedding.dtype, embedding.shape)
    dropped = {n: t for n, t in everything.items() if n not in tensors}
    return Weights(tensors, linears, convs, dropped, active_expert_fraction(folder / "config.json"),
                   _num_layers(folder / "config.json", list(linears)))


def _num_layers(config_path: Path, modules: list[str]) -> int | None:
    from runner.quantization.layout import num_hidden_layers

    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
        return num_hidden_layers(config if isinstance(config, dict) else {}, modules)
    except (OSError, ValueError):
        return None


def read_listing(path: Path) -> dict[str, Tensor]:
    """A tensor listing (runner/worker/model_loading.py) as the export names its tensors.

    transformers keeps a MoE layer's experts fused (`experts.gate_up_proj` [E, 2I, H],
    `experts.down_proj` [E, H, I]); ModelOpt quantizes and exports them as one Linear per expert and
    projection (`experts.0.gate_proj`, ...), which is what formats and sizes are counted over.
    `dropped_on_load` (what the checkpoint holds that the causal-LM load drops, named and stored as in
    the checkpoint) comes along: load_weights sets it apart by DROPPED_ON_LOAD.
    """
    listing = json.loads(path.read_text(encoding="utf-8"))
    out: dict[str, Tensor] = {}
    for name, (dtype, shape) in [*listing["tensors"].items(), *listing.get("dropped_on_load", {}).items()]:
        prefix, _, leaf = name.rpartition(".")
        if prefix.endswith(".experts") and len(shape) == 3:
            experts, rows, cols = shape
            parts = [("gate_proj", rows // 2), ("up_proj", rows // 2)] if leaf == "gate_up_proj" else [(leaf, rows)]
            for e in range(experts):
                for part, part_rows in parts:
                    key = f"{prefix}.{e}.{part}.weight"
                    out[key] = Tensor(key, dtype, (part_rows, cols))
        else:
            out[name] = Tensor(name, dtype, tuple(shape))
    return out


