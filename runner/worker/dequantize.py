"""Load an exported ModelOpt checkpoint as a plain transformers model, its weights dequantized.

`load_quantized` is what the `local` serving engine runs: every weight layout ModelOpt exports decoded
with the independent decoders of weight_formats.py, and each quantized Linear's input quantized as
the format's kernels do (quantized_linear.py). `load_dequantized` is the weight-only view (AWQ's
pre_quant_scale and SVDQuant's low-rank part folded into the weights, inputs unquantized): what vLLM
runs for NVFP4 below Blackwell (W4A16 through Marlin).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from runner.worker.weight_formats import Layout, decode, identify

DROP_SUFFIXES = (".weight_scale", ".weight_scale_2", ".input_scale", ".pre_quant_scale", ".k_scale", ".v_scale",
                 "._svdquant_lora_a", "._svdquant_lora_b")


SAFETENSORS_DTYPES = {"uint8": "U8", "int8": "I8", "float8_e4m3fn": "F8_E4M3", "float32": "F32", "float16": "F16",
                      "bfloat16": "BF16"}


def read_checkpoint(checkpoint: Path) -> tuple[dict[str, Any], dict[str, tuple[str, tuple[int, ...]]]]:
    """Every tensor of the export, and its safetensors dtype and shape (what weight_formats reads)."""
    from safetensors.torch import load_file

    tensors: dict[str, Any] = {}
    for file in sorted(checkpoint.glob("*.safetensors")):
        tensors.update(load_file(file))
    meta = {key: (SAFETENSORS_DTYPES.get(str(t.dtype).removeprefix("torch."), str(t.dtype)), tuple(t.shape))
            for key, t in tensors.items()}
    return tensors, meta


def decoded_weight(module: str, layout: Layout, tensors: dict[str, Any], fold_pre_quant_scale: bool) -> Any:
    weight = decode(layout, {s: tensors[f"{module}.{s}"] for s in ("weight", "weight_scale", "weight_scale_2")
                             if f"{module}.{s}" in tensors})
    lora_a = tensors.get(f"{module}.weight_quantizer._svdquant_lora_a")
    if lora_a is not None:
        weight = weight + tensors[f"{module}.weight_quantizer._svdquant_lora_b"].float() @ lora_a.float()
    if fold_pre_quant_scale and f"{module}.pre_quant_scale" in tensors:
        # The layer computes (x * pre_quant_scale) @ W^T: fold the scale into W's columns.
        weight = weight * tensors[f"{module}.pre_quant_scale"].float().unsqueeze(0)
    return weight


def dequantized_state_dict(checkpoint: Path, dtype: Any, fold_pre_quant_scale: bool = True
                           ) -> tuple[dict[str, Any], dict[str, Layout], dict[str, Any]]:
    """The export as a plain state dict (weights decoded), the layout of each quantized layer, and
    the raw tensors (for the scales a QuantizedLinear needs)."""
    tensors, meta = read_checkpoint(checkpoint)
    out, layouts = {}, {}
    for key, tensor in tensors.items():
        if key.endswith(DROP_SUFFIXES):
            continue
        module = key.removesuffix(".weight")
        layout = identify(module, meta) if key.endswith(".weight") else None
        if isinstance(layout, str):
            raise SystemExit(f"{module}: {layout} is a layout this engine cannot decode")
        if layout is not None:
            layouts[module] = layout
            tensor = decoded_weight(module, layout, tensors, fold_pre_quant_scale)
        out[key] = tensor.to(dtype)
    return out, layouts, tensors


def text_config_dict(checkpoint: Path) -> dict[str, Any]:
    """The language model's config: the checkpoint's, or its text_config when wrapped for a VL loader."""
    config = json.loads((checkpoint / "config.json").read_text(encoding="utf-8"))
    if "text_config" in config:
        inner = dict(config["text_config"])
        arch = inner.get("architectures") or [a.replace("ForConditionalGeneration", "ForCausalLM")
                                             for a in config.get("architectures") or []]
        inner["architectures"] = arch
        config = inner
    config.pop("quantization_config", None)
    return config


def _build(checkpoint: Path, dtype_name: str, state: dict[str, Any]) -> tuple[Any, dict[str, str]]:
    """A transformers model from the export's config with `state` loaded; and the key renames applied."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    dtype = getattr(torch, dtype_name)
    config_dict = text_config_dict(checkpoint)
    model_type = config_dict.pop("model_type")
    config = AutoConfig.for_model(model_type, **config_dict)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    # A Qwen3.5 export nests the text model under language_model; the CausalLM class does not.
    expected = set(model.state_dict())
    renames = {k: (k if k in expected else k.replace("model.language_model.", "model.")) for k in state}
    missing, unexpected = model.load_state_dict({renames[k]: v for k, v in state.items()}, strict=False)
    missing = [k for k in missing if not k.endswith("lm_head.weight") or not config.tie_word_embeddings]
    if missing or unexpected:
        raise SystemExit(f"checkpoint does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    return model.eval(), renames


def load_dequantized(checkpoint: Path, dtype_name: str = "bfloat16") -> Any:
    """The export as a plain transformers model, weights decoded, inputs unquantized (weight-only)."""
    state, _, _ = dequantized_state_dict(checkpoint, _dtype(dtype_name))
    return _build(checkpoint, dtype_name, state)[0]


def load_quantized(checkpoint: Path, dtype_name: str = "bfloat16") -> tuple[Any, str]:
    """The export with its real numerics: every quantized Linear replaced by a QuantizedLinear that
    quantizes its input as the format's kernels do (quantized_linear.py). Returns the model and a
    sentence naming the numerics."""
    import torch

    from runner.worker.quantized_linear import LastInput, QuantizedLinear, activation_quant, numerics_summary

    dtype = _dtype(dtype_name)
    state, layouts, tensors = dequantized_state_dict(checkpoint, dtype, fold_pre_quant_scale=False)
    model, renames = _build(checkpoint, dtype_name, state)
    replaced: dict[str, QuantizedLinear] = {}
    last_input = LastInput()
    for module, layout in layouts.items():
        name = renames[f"{module}.weight"].removesuffix(".weight")
        linear = model.get_submodule(name)
        if not isinstance(linear, torch.nn.Linear):
            continue  # fused experts: decoded weights, inputs as they come
        scale = tensors.get(f"{module}.input_scale")
        quant = activation_quant(layout.family, scale is not None, float(scale) if scale is not None else None)
        pqs = tensors.get(f"{module}.pre_quant_scale")
        layer = QuantizedLinear(linear.weight.data, None if linear.bias is None else linear.bias.data, quant,
                                None if pqs is None else pqs.to(dtype), layout.name, last_input)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, layer)
        replaced[name] = layer
    return model, numerics_summary(replaced)


def _dtype(name: str) -> Any:
    import torch

    return getattr(torch, name)
