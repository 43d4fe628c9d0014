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

Imports nothing but the standard library and the format registry: the worker (torch side) and the host
both use it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from runner.quantization import formats

DEFINITION = ("bits per Linear weight over all Linear weights (lm_head included, embeddings not), per-block "
              "scales included, global scales ignored, unquantized weights at their dtype's bits (16 for bf16)")
MODELOPT_DEFINITION = ("auto_quantize counts them: every Linear and Conv weight (lm_head included, embeddings not), "
                       "disabled or excluded layers at 16 bits whatever their dtype, NVFP4 at 4.5, FP8 at 8")

# Weight formats, named as ModelOpt's export names them (runner/quantization/formats.py): (bits a code,
# bits a block scale, weights a block by default). A block size other than the default is written as a
# suffix: `nvfp4_b32` is NVFP4 with one scale per 32 weights. Formats without block scales (fp8,
# fp8_pc_pt, int8) have per-tensor or per-row scales, negligible; per-tensor global scales
# (weight_scale_2, input_scale) are ignored.
LAYOUTS: dict[str, tuple[int, int, int]] = {f.name: (f.code_bits, f.scale_bits, f.block) for f in formats.FORMATS}
SQUARE_BLOCKS = tuple(f.name for f in formats.FORMATS if f.square_block)  # the block is N x N weights
_BLOCK_SUFFIX = re.compile(r"^(.*)_b(\d+)$")


def format_name(fmt: str, block: int | None) -> str:
    """`nvfp4` with 32-weight blocks is `nvfp4_b32`; the default block size adds nothing."""
    if block is None or fmt not in LAYOUTS or LAYOUTS[fmt][1] == 0 or block == LAYOUTS[fmt][2]:
        return fmt
    return f"{fmt}_b{block}"


def split_format(fmt: str) -> tuple[str, int | None]:
    """`nvfp4_b32` -> ("nvfp4", 32); a name without a block suffix -> (name, None)."""
    match = _BLOCK_SUFFIX.match(fmt)
    if match and match.group(1) in LAYOUTS:
        return match.group(1), int(match.group(2))
    return fmt, None


# Formats whose export packs whole blocks of a row (ModelOpt 0.47 export/quant_utils.py,
# pack_int4_in_uint8): the input dimension must be a multiple of the block and the output dimension
# even, else the worker stops in the export ("Cannot pack weight with input dimension 64 and block size 128").
WHOLE_BLOCKS_ONLY = tuple(f.name for f in formats.FORMATS if f.whole_blocks_only)


def block_of(fmt: str) -> int | None:
    """Weights a block of `fmt` (its suffix, else its default); None for an unknown format."""
    base, block = split_format(fmt)
    return block or (LAYOUTS[base][2] if base in LAYOUTS else None)


def base_format(fmt: str) -> str:
    """The format without its block-size suffix (`nvfp4_b32` -> `nvfp4`)."""
    return split_format(fmt)[0]


def _format_bits(fmt: str) -> float | None:
    base, block = split_format(fmt)
    if base not in LAYOUTS:
        return None
    code, scale, default = LAYOUTS[base]
    weights = (block or default) ** (2 if base in SQUARE_BLOCKS else 1)
    return code + (scale / weights if scale else 0.0)


BITS: dict[str, float] = {fmt: _format_bits(fmt) or 0.0 for fmt in LAYOUTS}

# Bits of unquantized storage, by torch dtype name and by safetensors dtype name.
DTYPE_BITS: dict[str, float] = {
    "float64": 64, "float32": 32, "float16": 16, "bfloat16": 16, "float8_e4m3fn": 8, "float8_e5m2": 8,
    "int64": 64, "int32": 32, "int16": 16, "int8": 8, "uint8": 8, "bool": 8,
    "F64": 64, "F32": 32, "F16": 16, "BF16": 16, "F8_E4M3": 8, "F8_E5M2": 8, "I64": 64, "I32": 32, "I16": 16,
    "I8": 8, "U8": 8, "BOOL": 8,
}

# Logical weights per stored element when a format is exported packed (two 4-bit codes a byte).
PACKED_FAMILIES = tuple(f.name for f in formats.FORMATS if f.packed)


def bits_of(fmt: str) -> float:
    """Bits a weight costs: a quantization format (BITS) or a storage dtype (`bfloat16`, `BF16`)."""
    key = fmt.removeprefix("torch.")
    bits = _format_bits(key)
    if bits is not None:
        return bits
    if key in DTYPE_BITS:
        return float(DTYPE_BITS[key])
    raise KeyError(f"unknown weight format or dtype {fmt!r}; known: {', '.join([*LAYOUTS, *DTYPE_BITS])}")


def logical_numel(stored_numel: int, fmt: str) -> int:
    """Weights a stored tensor holds: an NVFP4 weight exported as uint8 [out, in/2] holds out x in."""
    return stored_numel * (2 if base_format(fmt) in PACKED_FAMILIES else 1)


def effective_bits(weights: Iterable[tuple[str, int]]) -> float:
    """DEFINITION over (format or dtype, logical weight count) of every Linear weight; 16 for none."""
    total = bits = 0.0
    for fmt, numel in weights:
        total += numel
        bits += numel * bits_of(fmt)
    return round(bits / total, 3) if total else 16.0
