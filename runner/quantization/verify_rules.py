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
