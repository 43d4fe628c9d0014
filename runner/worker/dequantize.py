"""Load an exported ModelOpt checkpoint as a plain transformers model, its weights dequantized.

This is what the `local` serving engine runs on a CPU: every weight layout ModelOpt exports decoded
with the independent decoders of weight_formats.py (with AWQ's pre_quant_scale and SVDQuant's
low-rank part folded back). Activations stay in bf16, so it emulates weight-only quantization (W4A16 for NVFP4),
which is also what vLLM runs below Blackwell; it does not emulate NVFP4 activations (W4A4).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from runner.worker.weight_formats import decode, identify

DROP_SUFFIXES = (".weight_scale", ".weight_scale_2", ".input_scale", ".pre_quant_scale", ".k_scale", ".v_scale",
                 "._svdquant_lora_a", "._svdquant_lora_b")


SAFETENSORS_DTYPES = {"uint8": "U8", "int8": "I8", "float8_e4m3fn": "F8_E4M3", "float32": "F32", "float16": "F16",
                      "bfloat16": "BF16"}


def dequantized_state_dict(checkpoint: Path, dtype: Any) -> dict[str, Any]:
    from safetensors.torch import load_file

    tensors: dict[str, Any] = {}
    for file in sorted(checkpoint.glob("*.safetensors")):
        tensors.update(load_file(file))
    meta = {key: (SAFETENSORS_DTYPES.get(str(t.dtype).removeprefix("torch."), str(t.dtype)), tuple(t.shape))
            for key, t in tensors.items()}
    out = {}
    for key, tensor in tensors.items():
        if key.endswith(DROP_SUFFIXES):
            continue
        module = key.removesuffix(".weight")
        layout = identify(module, meta) if key.endswith(".weight") else None
        if isinstance(layout, str):
            raise SystemExit(f"{module}: {layout} is a layout this engine cannot decode")
        if layout is not None:
            weight = decode(layout, {s: tensors[f"{module}.{s}"] for s in ("weight", "weight_scale", "weight_scale_2")
                                     if f"{module}.{s}" in tensors})
            lora_a = tensors.get(f"{module}.weight_quantizer._svdquant_lora_a")
            if lora_a is not None:
                weight = weight + tensors[f"{module}.weight_quantizer._svdquant_lora_b"].float() @ lora_a.float()
            if f"{module}.pre_quant_scale" in tensors:
                # The layer computes (x * pre_quant_scale) @ W^T: fold the scale into W's columns.
                weight = weight * tensors[f"{module}.pre_quant_scale"].float().unsqueeze(0)
            tensor = weight
        out[key] = tensor.to(dtype)
    return out


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


def load_dequantized(checkpoint: Path, dtype_name: str = "bfloat16") -> Any:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    dtype = getattr(torch, dtype_name)
    config_dict = text_config_dict(checkpoint)
    model_type = config_dict.pop("model_type")
    config = AutoConfig.for_model(model_type, **config_dict)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    state = dequantized_state_dict(checkpoint, dtype)
    # A Qwen3.5 export nests the text model under language_model; the CausalLM class does not.
    expected = set(model.state_dict())
    state = {(k if k in expected else k.replace("model.language_model.", "model.")): v for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("lm_head.weight") or not config.tie_word_embeddings]
    if missing or unexpected:
        raise SystemExit(f"checkpoint does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    return model.eval()
