"""Module families: the groups of Linears a quantization layout (and the search over layouts) sets a format
for, each named once with the module-name globs that find it in the catalogue's architectures.

A family's globs name MODULES (`*mlp.experts*`, fused or per expert); a quantizer of that module is
`<module>.weight_quantizer`, `<module>.input_quantizer` (or `<module>.<param>_weight_quantizer` for fused
experts), so a quantizer belongs to a family when its name matches `<glob>*`. The vision tower, MTP heads,
routers, convolutions and other modules in runner/quantization/exclusions.py DEFAULT_DISABLED are never in
a family: a layout cannot quantize them.

Ordered from the narrowest scope to the widest, as ModelOpt's PTQ guidance widens a recipe (experts first
for MoE, the MLP first for dense models; attention and the output head last).
Imports nothing but the standard library: host and worker both read it.
"""

from __future__ import annotations

from typing import Literal

Family = Literal["routed_experts", "shared_experts", "mlp", "linear_attention", "attention", "lm_head"]

FAMILIES: dict[str, tuple[str, ...]] = {
    # Routed experts: per-expert Linears (`mlp.experts.3.down_proj`) and transformers 5's fused experts
    # (`mlp.experts` holding gate_up_proj/down_proj), Mixtral's block_sparse_moe, Nemotron-H's mixer.
    "routed_experts": ("*mlp.experts*", "*block_sparse_moe.experts*", "*mixer.experts*"),
    "shared_experts": ("*mlp.shared_expert.*", "*mlp.shared_experts.*", "*mixer.shared_experts.*"),
    # A dense MLP (and a MoE model's dense layers): never an expert, which `mlp.experts.` names.
    "mlp": ("*mlp.gate_proj", "*mlp.up_proj", "*mlp.down_proj", "*mlp.fc1", "*mlp.fc2", "*mlp.gate_up_proj",
            "*mixer.up_proj", "*mixer.down_proj"),
    # Gated DeltaNet (Qwen3.5, Qwen3-Next) and Mamba-2 (Nemotron-H) projections.
    "linear_attention": ("*linear_attn.in_proj_qkvz", "*linear_attn.in_proj_qkv", "*linear_attn.in_proj_z",
                         "*linear_attn.in_proj_ba", "*linear_attn.out_proj", "*mixer.in_proj", "*mixer.out_proj"),
    "attention": ("*self_attn.q_proj", "*self_attn.k_proj", "*self_attn.v_proj", "*self_attn.o_proj",
                  "*self_attn.qkv_proj", "*mixer.q_proj", "*mixer.k_proj", "*mixer.v_proj", "*mixer.o_proj"),
    "lm_head": ("*lm_head",),
}

# The layer formats a layout may give a family (runner/quantization/formats.py names them), and bf16 for
# "left unquantized"; with the ModelOpt preset whose weight (and input) quantizer cfg makes each.
LayoutFormat = Literal["nvfp4", "w4a16_nvfp4", "fp8", "bf16"]
FORMAT_PRESETS: dict[str, str | None] = {
    "nvfp4": "NVFP4_DEFAULT_CFG", "w4a16_nvfp4": "W4A16_NVFP4_CFG", "fp8": "FP8_DEFAULT_CFG", "bf16": None}
# Bits a weight occupies, for ordering formats by what they save (scales included).
FORMAT_BITS: dict[str, float] = {"nvfp4": 4.5, "w4a16_nvfp4": 4.5, "fp8": 8.0, "bf16": 16.0}
# Among formats of equal size, the one that keeps more of the model first (W4A16 keeps activations).
FORMAT_FIDELITY_RANK: dict[str, int] = {"bf16": 0, "fp8": 1, "w4a16_nvfp4": 2, "nvfp4": 3}

KvCacheFormat = Literal["fp8", "bf16"]
KV_PRESETS: dict[str, str | None] = {"fp8": "FP8_KV_CFG", "bf16": None}


def family_of(module: str) -> str | None:
    """The family a module (or quantizer) name belongs to, the first in FAMILIES order; None: none, or a
    module no layout quantizes (DEFAULT_DISABLED: the vision tower's MLP is no `mlp`)."""
    from runner.quantization.exclusions import matches

    if any(matches(p, module) or matches(p, f"{module}.weight_quantizer") for p in never_quantized()):
        return None
    for family, globs in FAMILIES.items():
        if any(matches(f"{glob}*", module) for glob in globs):
            return family
    return None


def never_quantized() -> list[str]:
    """ModelOpt's default-disabled patterns a layout keeps disabled: all of them but the output head's, which
    the `lm_head` family may quantize (ModelOpt leaves it BF16 by default, as NVIDIA's checkpoints do)."""
    from runner.quantization.exclusions import DEFAULT_DISABLED

    return [p for p in DEFAULT_DISABLED if p != "*lm_head*"]
