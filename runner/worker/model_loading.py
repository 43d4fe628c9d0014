"""Which transformers class loads a model for quantization, and its tensor listing without weights.

Text models load as causal LMs. A vision-language config that transformers does not map to a causal
LM (Mistral 3) loads as image-text-to-text; the vision tower comes along and stays unquantized
(ModelOpt disables vision quantizers by default; the family bases exclude them too).

`python -m runner.worker.model_loading CONFIG_DIR OUT.json` writes the tensors of the model a config
describes, built on the meta device (no memory, no download): names as the loaded model has them,
dtype and shape. `recipe list`, `plan` and `init` predict sizes from this listing before any weight
is downloaded (recipes/models/*/tensors.json).

The listing also says what the real checkpoint holds that the causal-LM load drops
(runner/quantization/weights.py `DROPPED_ON_LOAD`), under `dropped_on_load`, named as the checkpoint
names them: a Qwen3.5 vision tower (`model.visual.*`, built by the image-text-to-text class on the
meta device) and a Qwen MTP head (`mtp.*`, which transformers has no module for: built here in the
layout vLLM's qwen3_5_mtp.py / qwen3_next_mtp.py load, `mtp_layers`). The prediction counts those an
export's `carry_tensors` fix-ups carry back.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def model_class(config: Any) -> Any:
    """The Auto class whose mapping knows this config: causal LM first, else image-text-to-text."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
    )

    if config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return AutoModelForCausalLM
    if config.model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        return AutoModelForImageTextToText
    raise ValueError(f"transformers has no causal-LM or image-text-to-text class for model_type "
                     f"{config.model_type!r}")


def load_model(model_dir: Path, dtype: Any, architecture: str | None = None, **kwargs: Any) -> Any:
    """kwargs go to from_pretrained (device_map and max_memory when the model is spread over GPUs)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    return with_architectures(model_class(config).from_pretrained(model_dir, dtype=dtype, **kwargs), architecture)


def with_architectures(model: Any, architecture: str | None = None) -> Any:
    """ModelOpt's export needs config.architectures (None raises in is_multimodal_model): a text model
    loaded out of a vision-language checkpoint has a text config without it."""
    if not getattr(model.config, "architectures", None):
        model.config.architectures = [architecture or type(model).__name__]
    return model


# Model types whose checkpoints store Qwen's MTP head (vLLM's qwen3_5_mtp.py, qwen3_next_mtp.py), and the
# number of MTP layers vLLM assumes when the config does not say (Qwen3-Next's Hub config has no
# num_nextn_predict_layers: `getattr(config, "num_nextn_predict_layers", 1)`).
QWEN_MTP_DEFAULT_LAYERS = {"qwen3_5": 1, "qwen3_5_text": 1, "qwen3_5_moe": 1, "qwen3_5_moe_text": 1,
                           "qwen3_next": 1}


def tensor_listing(config_dir: Path) -> dict[str, Any]:
    """The model's parameters as {name: [dtype, shape]}, built on the meta device from config.json, and
    what the checkpoint holds besides that the causal-LM load drops (`dropped_on_load`, when any)."""
    import torch
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(config_dir)
    dtype = getattr(torch, str(getattr(config, "dtype", None) or "bfloat16").removeprefix("torch."))
    cls = model_class(config)
    with torch.device("meta"):
        model = cls.from_config(config, dtype=dtype)
    tensors = _listed(model)
    dropped = {**vision_tower(config, cls, dtype), **mtp_layers(config, tensors)}
    listing = {"model_class": type(model).__name__, "model_type": config.model_type,
               "tied_embeddings": bool(getattr(config.get_text_config(), "tie_word_embeddings", False)),
               "tensors": tensors}
    if dropped:
        listing["dropped_on_load"] = dropped
    return listing


def _listed(model: Any) -> dict[str, list[Any]]:
    import torch

    names = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}
    return {name: [names.get(p.dtype, str(p.dtype)), list(p.shape)] for name, p in model.named_parameters()}


def _dropped(name: str) -> bool:
    from runner.quantization.weights import is_dropped_on_load

    return is_dropped_on_load(name)


def vision_tower(config: Any, cls: Any, dtype: Any) -> dict[str, list[Any]]:
    """The vision tower a vision-language checkpoint holds and the causal-LM load drops: the parameters
    of transformers' image-text-to-text class for this config, built on the meta device, that match
    DROPPED_ON_LOAD (`model.visual.*`: named as the checkpoint stores them). Empty for a model loaded
    as image-text-to-text already (its listing has the tower) or without one."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    if cls is not AutoModelForCausalLM or config.model_type not in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        return {}
    with torch.device("meta"):
        full = AutoModelForImageTextToText.from_config(config, dtype=dtype)
    return {name: entry for name, entry in _listed(full).items() if _dropped(name)}


def mtp_layers(config: Any, tensors: dict[str, list[Any]]) -> dict[str, list[Any]]:
    """Qwen's multi-token-prediction head as its checkpoints store it and vLLM's qwen3_5_mtp.py /
    qwen3_next_mtp.py load it: `mtp.fc` [hidden, 2 hidden], `mtp.pre_fc_norm_embedding`,
    `mtp.pre_fc_norm_hidden` and `mtp.norm` [hidden], and `mtp_num_hidden_layers` /
    `num_nextn_predict_layers` decoder layers `mtp.layers.N.*`, each the model's first full-attention
    layer (attention and MLP; a MoE MLP's experts one by one, `mlp.experts.E.gate_proj.weight`, as the
    checkpoint stores them). No embeddings of its own (`mtp_use_dedicated_embeddings` true is refused)."""
    text = config.get_text_config()
    default = QWEN_MTP_DEFAULT_LAYERS.get(config.model_type)
    if default is None:
        return {}
    count = getattr(text, "mtp_num_hidden_layers", None) or getattr(text, "num_nextn_predict_layers", None)
    count = default if count is None else int(count)
    if count <= 0 or any(_dropped(name) and name.startswith("mtp.") for name in tensors):
        return {}
    if getattr(text, "mtp_use_dedicated_embeddings", False):
        raise ValueError("mtp_use_dedicated_embeddings: true: the MTP head's own embeddings are not modelled here")
    layer_types = list(getattr(text, "layer_types", None) or [])
    full = layer_types.index("full_attention") if "full_attention" in layer_types else 0
    prefix = next((f"{p}layers.{full}." for p in ("model.", "model.language_model.")
                   if any(n.startswith(f"{p}layers.{full}.") for n in tensors)), None)
    if prefix is None:
        raise ValueError(f"no decoder layer {full} in the listing to shape the MTP layer after")
    hidden = int(text.hidden_size)
    dtype = tensors[next(n for n in tensors if n.startswith(prefix))][0]
    out: dict[str, list[Any]] = {"mtp.fc.weight": [dtype, [hidden, 2 * hidden]]}
    for norm in ("pre_fc_norm_embedding", "pre_fc_norm_hidden", "norm"):
        out[f"mtp.{norm}.weight"] = [dtype, [hidden]]
    layer = {name.removeprefix(prefix): entry for name, entry in tensors.items() if name.startswith(prefix)}
    for i in range(count):
        for name, (kind, shape) in layer.items():
            out.update(_per_expert(f"mtp.layers.{i}.{name}", kind, shape))
    return out


def _per_expert(name: str, dtype: str, shape: list[int]) -> dict[str, list[Any]]:
    """A fused expert tensor (`experts.gate_up_proj` [E, 2I, H], `experts.down_proj` [E, H, I]) as the
    checkpoint stores it, one Linear per expert; any other tensor as is."""
    prefix, _, leaf = name.rpartition(".")
    if not (prefix.endswith(".experts") and len(shape) == 3):
        return {name: [dtype, list(shape)]}
    experts, rows, cols = shape
    parts = [("gate_proj", rows // 2), ("up_proj", rows // 2)] if leaf == "gate_up_proj" else [(leaf, rows)]
    return {f"{prefix}.{e}.{part}.weight": [dtype, [part_rows, cols]]
            for e in range(experts) for part, part_rows in parts}


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print("usage: python -m runner.worker.model_loading CONFIG_DIR OUT.json", file=sys.stderr)
        return 2
    listing = tensor_listing(Path(argv[1]))
    Path(argv[2]).write_text(json.dumps(listing, indent=0, separators=(",", ":")) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
