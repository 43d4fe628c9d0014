"""How many bits a weight costs, and the one definition of "effective bits" (host and worker share it).

EFFECTIVE BITS (this project's, on cards, in records, in `recipe plan`): the bits per Linear weight
over ALL Linear weights of the model, lm_head included (a tied lm_head counts with its embedding's
shape), embeddings, norms and convolutions not counted. A quantized weight costs its format's bits
with the per-block scales included and the per-tensor global scales (weight_scale_2, input_scale)
ignored; an unquantized weight costs the bits of the dtype it is stored in (16 for bfloat16).
Counts are of LOGICAL weights (out x in), never of packed storage: an NVFP4 weight exported as
uint8 [out, in/2] still counts out x in weights.

ModelOpt's auto_quantize counts differently (`modelopt/torch/quantization/algorithms.py`,
`_verify_resolved_constraint` and `QuantRecipeHparam.get_cost`), and its `effective_bits`
constraint is what it enforces, so feasibility is checked in ITS count (see MODELOPT_DEFINITION).

Imports nothing but the standard library: the worker (torch side) and the host both use it.
"""

from __future__ import annotations

from collections.abc import Iterable

DEFINITION = ("bits per Linear weight over all Linear weights (lm_head included, embeddings not), per-block "
              "scales included, global scales ignored, unquantized weights at their dtype's bits (16 for bf16)")
MODELOPT_DEFINITION = ("auto_quantize counts them: every Linear and Conv weight (lm_head included, embeddings not), "
                       "disabled or excluded layers at 16 bits whatever their dtype, NVFP4 at 4.5, FP8 at 8")

# Bits a weight costs in each format, per-block scales included, global scales ignored.
#   nvfp4 / w4a16_nvfp4: 4-bit E2M1 code + one E4M3 scale per 16 weights = 4 + 8/16
#   fp8: E4M3, per-tensor scale (ignored);  int8: per-channel scales are per row, negligible
#   int4: 4-bit code + 16-bit scale per block; 4.25 is the figure for 64-weight blocks (ModelOpt's
#         INT4 presets use 128-weight blocks, 4.125 bits: 4.25 over-counts them slightly)
#   mxfp4: E2M1 + one E8M0 scale per 32 = 4.25;  mxfp8: E4M3 + one E8M0 scale per 32 = 8.25
BITS: dict[str, float] = {"nvfp4": 4.5, "w4a16_nvfp4": 4.5, "fp8": 8.0, "int8": 8.0, "int4": 4.25, "mxfp4": 4.25,
                          "mxfp8": 8.25}

# Bits of unquantized storage, by torch dtype name and by safetensors dtype name.
DTYPE_BITS: dict[str, float] = {
    "float64": 64, "float32": 32, "float16": 16, "bfloat16": 16, "float8_e4m3fn": 8, "float8_e5m2": 8,
    "int64": 64, "int32": 32, "int16": 16, "int8": 8, "uint8": 8, "bool": 8,
    "F64": 64, "F32": 32, "F16": 16, "BF16": 16, "F8_E4M3": 8, "F8_E5M2": 8, "I64": 64, "I32": 32, "I16": 16,
    "I8": 8, "U8": 8, "BOOL": 8,
}

# Logical weights per stored element when a format is exported packed (two 4-bit codes a byte).
PACKED: dict[str, int] = {"nvfp4": 2, "w4a16_nvfp4": 2, "mxfp4": 2, "int4": 2}


def bits_of(fmt: str) -> float:
    """Bits a weight costs: a quantization format (BITS) or a storage dtype (`bfloat16`, `BF16`)."""
    key = fmt.removeprefix("torch.")
    if key in BITS:
        return BITS[key]
    if key in DTYPE_BITS:
        return float(DTYPE_BITS[key])
    raise KeyError(f"unknown weight format or dtype {fmt!r}; known: {', '.join([*BITS, *DTYPE_BITS])}")


def logical_numel(stored_numel: int, fmt: str) -> int:
    """Weights a stored tensor holds: an NVFP4 weight exported as uint8 [out, in/2] holds out x in."""
    return stored_numel * PACKED.get(fmt, 1)


def effective_bits(weights: Iterable[tuple[str, int]]) -> float:
    """DEFINITION over (format or dtype, logical weight count) of every Linear weight; 16 for none."""
    total = bits = 0.0
    for fmt, numel in weights:
        total += numel
        bits += numel * bits_of(fmt)
    return round(bits / total, 3) if total else 16.0
