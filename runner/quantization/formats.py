"""The export formats: one frozen object per weight format ModelOpt exports, and the registry of them.

Three vocabularies name a format. The LAYER FORMAT is what ModelOpt's `get_quantization_format` calls a
quantized Linear (`nvfp4`, `w4a16_nvfp4`; modelopt/torch/export/model_config.py, QUANTIZATION_*): the
quantize record, `recipe plan` and effective bits use it, with a `_bN` suffix for a block size other
than the format's default (runner/quantization/bits.py). The QUANT_ALGO is what ModelOpt's exporter
writes for it in hf_quant_config.json (`NVFP4`, `W4A16_NVFP4`; quant_utils.process_layer_quant_config):
verify, the serving engines and the card read it. ModelOpt PRESETS (`NVFP4_DEFAULT_CFG`) choose layer
formats per Linear; they are read as data by runner/quantization/footprint.py, not listed here.

Everything a format's consumers need is on its entry: bits and block for effective bits and sizes,
how its codes are packed, the tensors a quantized layer stores (verify's checks), which decoder reads
them and how close the decode must come (runner/worker/weight_formats.py), the activation
quantization the local engine emulates (runner/worker/quantized_linear.py), and its words on the card
(runner/quantization/export_words.py). The worker registers one decoder per stored layout and one
emulation per activation kind, and checks them against this registry when it is imported
(tests/test_formats.py also checks every layer format the installed ModelOpt can export has an entry
here).

Imports nothing but the standard library: host and worker both read it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

# E2M1 (FP4) magnitudes for codes 0..7; bit 3 is the sign. NVFP4 and MXFP4 codes.
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)

# How an export stores its codes: one a byte or element ("none"); two 4-bit codes a byte along the
# input, low nibble first ("input_pairs": weight U8 [out, in/2]); two signed 4-bit codes a byte
# along the output, rows 2r (low nibble) and 2r+1 (high) ("row_pairs": weight U8 [out/2, in]).
Packing = Literal["none", "input_pairs", "row_pairs"]

# How the serving kernels quantize a layer's input before their GEMM, as the local engine emulates it:
# NVFP4 (dynamic E4M3 scale per 16, input_scale as the global scale), FP8 in units of input_scale,
# FP8 per token (dynamic). MX activations (MXFP4/MXFP8) are not emulated: their layers compute with
# 16-bit inputs.
Activation = Literal["nvfp4", "fp8", "fp8_per_token"]

# hf_quant_config.json keys vLLM requires, by quant_algo family.
NVFP4_CONFIG_KEYS = ("quant_algo", "group_size", "kv_cache_quant_algo", "exclude_modules")
PLAIN_CONFIG_KEYS = ("quant_algo", "exclude_modules")
# A mixed-precision export names no format of its own: it lists each quantized layer's quant_algo.
MIXED_PRECISION = "MIXED_PRECISION"
MIXED_CONFIG_KEYS = ("quant_algo", "kv_cache_quant_algo", "quantized_layers")


@dataclass(frozen=True)
class LayerTensors:
    """What an exported quantized Linear stores: its weight's safetensors dtype and the tensors next to
    it (suffixes of the module's name)."""

    weight_dtype: str
    required: tuple[str, ...]
    optional: tuple[str, ...] = ()


@dataclass(frozen=True)
class CardWords:
    """An export of one format on the model card: its name in titles and repository names, its Hub
    tags, and what the checkpoint stores."""

    name: str
    tags: tuple[str, ...]
    description: str


@dataclass(frozen=True)
class ExportFormat:
    """One layer format ModelOpt exports."""

    name: str  # the layer format (QUANTIZATION_* value)
    quant_algo: str  # what the exporter writes for it in hf_quant_config.json (upper case)
    code_bits: int  # bits a weight code
    scale_bits: int  # bits a block scale; 0: per-tensor or per-row scales only (counted as free)
    block: int  # weights a block scale covers by default along the input (1 without block scales)
    packing: Packing
    tensors: LayerTensors
    activation: Activation | None  # what the local engine emulates; None: the input as it comes
    # The layout its tensors take: the format whose decoder reads them (the tensors of w4a16_nvfp4 are
    # nvfp4's). None: no decoder here (verify reports such layers as not checked, the local engine
    # refuses them).
    stored_as: str | None
    # Relative RMS error of a decoded weight against its source above which the decode is wrong (a
    # layout mistake gives ~1): set on the formats that are their own layout, None on the others.
    max_relative_error: float | None = None
    square_block: bool = False  # the block is block x block weights (fp8_pb_wo)
    whole_blocks_only: bool = False  # the export packs whole blocks of a row (pack_int4_in_uint8)
    # fp32 per-tensor scales the export adds to a layer, as runner/quantization/footprint.py sizes it
    scalar_bytes: int = 0
    config_keys: tuple[str, ...] = PLAIN_CONFIG_KEYS  # hf_quant_config.json keys vLLM requires
    word: str | None = None  # its word in a mixed-precision export's name and tags; None: left out
    card: CardWords | None = None  # None: the card names it by its quant_algo

    @property
    def packed(self) -> bool:
        return self.packing != "none"


_NVFP4_TENSORS = LayerTensors("U8", ("weight_scale", "weight_scale_2", "input_scale"))
_AWQ = ("pre_quant_scale",)  # AWQ's smoothing scales, absent when folded into the layer before

# In the order `recipe plan` and error messages list them. Positional: name, quant_algo, code bits,
# scale bits, block, packing, tensors.
FORMATS: tuple[ExportFormat, ...] = (
    ExportFormat(
        "nvfp4", "NVFP4", 4, 8, 16, "input_pairs", _NVFP4_TENSORS,
        activation="nvfp4", stored_as="nvfp4", max_relative_error=0.25, scalar_bytes=8,
        config_keys=NVFP4_CONFIG_KEYS, word="NVFP4",
        card=CardWords("NVFP4", ("nvfp4",), "NVFP4 weights and activations (W4A4): 4-bit E2M1 values with an FP8 "
                       "scale per 16 values and one FP32 scale per tensor; activations are quantized the same way "
                       "at run time")),
    ExportFormat(
        "w4a16_nvfp4", "W4A16_NVFP4", 4, 8, 16, "input_pairs", LayerTensors("U8", ("weight_scale", "weight_scale_2")),
        activation=None, stored_as="nvfp4", scalar_bytes=4, config_keys=NVFP4_CONFIG_KEYS, word="NVFP4",
        card=CardWords("NVFP4-W4A16", ("nvfp4", "w4a16"), "NVFP4 weights (4-bit E2M1, an FP8 scale per 16 values) "
                       "with 16-bit activations: weight-only quantization")),
    ExportFormat(
        "nvfp4_awq", "NVFP4_AWQ", 4, 8, 16, "input_pairs", LayerTensors("U8", _NVFP4_TENSORS.required, _AWQ),
        activation="nvfp4", stored_as="nvfp4", config_keys=NVFP4_CONFIG_KEYS, word="NVFP4",
        card=CardWords("NVFP4-AWQ", ("nvfp4", "awq"), "NVFP4 W4A4 with AWQ's per-channel pre-quantization scales "
                       "kept in the checkpoint (pre_quant_scale), for engines that apply them")),
    ExportFormat(
        "nvfp4_svdquant", "NVFP4_SVD", 4, 8, 16, "input_pairs",
        LayerTensors("U8", (*_NVFP4_TENSORS.required, "weight_quantizer._svdquant_lora_a",
                            "weight_quantizer._svdquant_lora_b"), _AWQ),
        activation="nvfp4", stored_as="nvfp4", config_keys=NVFP4_CONFIG_KEYS),
    ExportFormat(
        "w4a8_nvfp4_fp8", "W4A8_NVFP4_FP8", 4, 8, 32, "input_pairs", _NVFP4_TENSORS,
        activation="fp8", stored_as="nvfp4", scalar_bytes=8, config_keys=NVFP4_CONFIG_KEYS),
    ExportFormat(
        "mxfp4", "MXFP4", 4, 8, 32, "input_pairs", LayerTensors("U8", ("weight_scale",)),
        activation=None, stored_as="mxfp4", max_relative_error=0.35, word="MXFP4",
        card=CardWords("MXFP4", ("mxfp4",), "MXFP4: E2M1 values with a power-of-two (E8M0) scale per 32 values")),
    ExportFormat(
        "w4a8_mxfp4_fp8", "W4A8_MXFP4_FP8", 4, 8, 32, "input_pairs", LayerTensors("U8", ("weight_scale",)),
        activation=None, stored_as="mxfp4"),
    ExportFormat(
        "mxfp8", "MXFP8", 8, 8, 32, "none", LayerTensors("F8_E4M3", ("weight_scale",)),
        activation=None, stored_as="mxfp8", max_relative_error=0.1, word="MXFP8",
        card=CardWords("MXFP8", ("mxfp8",), "MXFP8: E4M3 values with a power-of-two (E8M0) scale per 32 values")),
    ExportFormat(
        "int4_awq", "W4A16_AWQ", 4, 16, 128, "row_pairs", LayerTensors("U8", ("weight_scale",), _AWQ),
        activation=None, stored_as="int4_awq", max_relative_error=0.25, whole_blocks_only=True, word="INT4",
        card=CardWords("INT4-AWQ", ("int4", "awq", "w4a16"), "INT4 weights with a 16-bit scale per block (AWQ), "
                       "16-bit activations")),
    ExportFormat(
        "w4a8_awq", "W4A8_AWQ", 4, 16, 128, "row_pairs",
        LayerTensors("U8", ("weight_scale", "weight_scale_2", "input_scale"), _AWQ),
        activation="fp8", stored_as="w4a8_awq", max_relative_error=0.25, whole_blocks_only=True, word="INT4",
        card=CardWords("W4A8-AWQ", ("int4", "awq", "w4a8"), "INT4 weights (AWQ, scale per block) with FP8 "
                       "activations")),
    ExportFormat(
        "fp8_pb_wo", "FP8_PB_WO", 8, 32, 128, "none", LayerTensors("F8_E4M3", ("weight_scale",)),
        activation=None, stored_as="fp8_pb_wo", max_relative_error=0.1, square_block=True, word="FP8",
        card=CardWords("FP8-Block", ("fp8",), "FP8 (E4M3) weights with a scale per 128x128 block; 16-bit "
                       "activations")),
    ExportFormat(
        "fp8", "FP8", 8, 0, 1, "none", LayerTensors("F8_E4M3", ("weight_scale", "input_scale")),
        activation="fp8", stored_as="fp8", max_relative_error=0.1, scalar_bytes=8, word="FP8",
        card=CardWords("FP8", ("fp8",), "FP8 (E4M3) weights and activations with one scale per tensor")),
    ExportFormat(
        "fp8_pc_pt", "FP8_PER_CHANNEL_PER_TOKEN", 8, 0, 1, "none", LayerTensors("F8_E4M3", ("weight_scale",)),
        activation="fp8_per_token", stored_as="fp8_pc_pt", max_relative_error=0.1, word="FP8",
        card=CardWords("FP8-Dynamic", ("fp8",), "FP8 (E4M3) weights with a scale per output channel; activations "
                       "quantized per token at run time")),
    ExportFormat(
        "int8_sq", "W8A8_SQ_PER_CHANNEL", 8, 0, 1, "none", LayerTensors("I8", ("weight_scale", "input_scale"), _AWQ),
        activation=None, stored_as=None, word="INT8",
        card=CardWords("INT8-SmoothQuant", ("int8",), "INT8 weights and activations after SmoothQuant")),
    ExportFormat(
        "int8_wo", "W8A16", 8, 0, 1, "none", LayerTensors("I8", ("weight_scale",)),
        activation=None, stored_as=None, word="INT8"),
)

# Layer formats the installed ModelOpt can name that have no entry, deliberately (tests/test_formats.py
# fails on any other):
NOT_SUPPORTED = {
    # FP8 blockwise weights of a real-quantized (compressed, not fake-quantized) model: the quantize
    # worker always exports from a fake-quantized model, which gives fp8_pb_wo.
    "fp8_pb_real",
}

# Words on the card that claim a format without naming one of ours (a repository called `...-FP4`).
GENERIC_WORDS = ("FP4",)
MIXED_WORD = "Mixed"  # a mixed-precision export's name ends in it ("NVFP4-FP8-Mixed")

_BY_NAME = {f.name: f for f in FORMATS}
_BY_ALGO = {f.quant_algo: f for f in FORMATS}


def by_name(layer_format: str) -> ExportFormat | None:
    """The entry of a layer format (without its `_bN` block suffix), or None."""
    return _BY_NAME.get(layer_format)


def by_quant_algo(quant_algo: str | None) -> ExportFormat | None:
    """The entry of an hf_quant_config.json quant_algo (compared case-insensitively, as vLLM does)."""
    return _BY_ALGO.get((quant_algo or "").upper())


def names() -> tuple[str, ...]:
    return tuple(_BY_NAME)


def quant_algo_of(layer_format: str) -> str:
    """What the exporter writes for a layer format (without its block suffix); unknown ones upper-cased."""
    fmt = by_name(layer_format)
    return fmt.quant_algo if fmt else layer_format.upper()


def layouts() -> tuple[str, ...]:
    """The stored layouts: what the worker's decoders must read."""
    return tuple(dict.fromkeys(f.stored_as for f in FORMATS if f.stored_as))


def activations() -> tuple[Activation, ...]:
    """The activation quantizations the local engine must emulate."""
    return tuple(dict.fromkeys(f.activation for f in FORMATS if f.activation))


def check_registered(kind: str, wanted: Iterable[str], registered: Iterable[str]) -> None:
    """Raise when the worker registers other `kind`s than the registry needs (a format without a
    decoder, an emulation of an activation no format has)."""
    needed, have = set(wanted), set(registered)
    if needed != have:
        raise RuntimeError(f"{kind} out of step with runner/quantization/formats.py: none for "
                           f"{sorted(needed - have)}; none needed for {sorted(have - needed)}")


def card_words() -> dict[str, CardWords]:
    """quant_algo -> its words on the card, for the formats that have them."""
    return {f.quant_algo: f.card for f in FORMATS if f.card}


def layer_words() -> dict[str, str]:
    """Layer format -> its word in a mixed-precision export's name, for the formats that have one."""
    return {f.name: f.word for f in FORMATS if f.word}


def format_tags() -> set[str]:
    """Hub tags that name a format (a recipe's own tag among them is replaced by the export's)."""
    return {t for f in FORMATS if f.card for t in f.card.tags} | {w.lower() for w in layer_words().values()} \
        | {w.lower() for w in GENERIC_WORDS}


def name_words() -> set[str]:
    """Upper-cased words in a repository name that claim a format."""
    return ({part.upper() for f in FORMATS if f.card for part in f.card.name.split("-")}
            | set(layer_words().values()) | set(GENERIC_WORDS) | {MIXED_WORD.upper()})
