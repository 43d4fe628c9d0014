"""What the verify worker checks for a serving engine, as plain data.

The engine (runner/serving/engine.py) says which rules it needs; the verify step passes them to the
worker in its params (`VerifyRules.to_params`), so the worker applies them without importing any
engine. Torch-free and import-free on purpose (the host's engines and the worker both read it).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class VerifyRules:
    engine: str  # named in the report ("loadable by the vllm engine")
    quant_algos: tuple[str, ...]  # hf_quant_config.json quant_algo values the engine loads
    layer_algos: bool = False  # MIXED_PRECISION: each layer's quant_algo must be one the engine loads
    input_scales: bool = False  # it quantizes activations: FP8/NVFP4 layers must carry input_scale
    no_pre_quant_scale: bool = False  # its loader has no place for AWQ's kept pre_quant_scale tensors
    vllm_module_rules: bool = False  # vLLM's loader rules: plain exclude_modules names, one format per fused group

    def to_params(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> VerifyRules:
        return cls(**{**params, "quant_algos": tuple(params["quant_algos"])})


@dataclass(frozen=True)
class TensorAccounting:
    """Where each tensor of the source checkpoint must be found after export and fix-ups, as declared by the
    recipe's export fix-ups (runner/recipe/fixups.py `tensor_accounting`): every source tensor is in the
    export (under its own name, or the name a `rename_tensors` fix-up gives it), carried by a
    `carry_tensors` fix-up (then unquantized, in its dtype), or dropped on purpose by a `drop_tensors`
    fix-up with its reason. Anything else is a tensor the export lost, and verify fails naming it."""

    renamed: tuple[tuple[str, str], ...] = ()  # (source name, export name)
    carried: tuple[tuple[str, str], ...] = ()  # (fnmatch pattern of source names, the dtype it is stored in)
    dropped: tuple[tuple[str, str], ...] = ()  # (fnmatch pattern of source names, why)

    def to_params(self) -> dict[str, Any]:
        return {"renamed": [list(p) for p in self.renamed], "carried": [list(p) for p in self.carried],
                "dropped": [list(p) for p in self.dropped]}

    @classmethod
    def from_params(cls, params: dict[str, Any] | None) -> TensorAccounting:
        params = params or {}
        return cls(**{key: tuple(tuple(p) for p in params.get(key, ())) for key in ("renamed", "carried", "dropped")})
