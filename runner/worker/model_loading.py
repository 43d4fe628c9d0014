"""Which transformers class loads a model for quantization, and its tensor listing without weights.

Text models load as causal LMs. A vision-language config that transformers does not map to a causal
LM (Mistral 3) loads as image-text-to-text; the vision tower comes along and stays unquantized
(ModelOpt disables vision quantizers by default; the family bases exclude them too).

`python -m runner.worker.model_loading CONFIG_DIR OUT.json` writes the tensors of the model a config
describes, built on the meta device (no memory, no download): names as the loaded model has them,
dtype and shape. `recipe list`, `plan` and `init` predict sizes from this listing before any weight
is downloaded (recipes/models/*/tensors.json).
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


def tensor_listing(config_dir: Path) -> dict[str, Any]:
    """The model's parameters as {name: [dtype, shape]}, built on the meta device from config.json."""
    import torch
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(config_dir)
    dtype = getattr(torch, str(getattr(config, "dtype", None) or "bfloat16").removeprefix("torch."))
    with torch.device("meta"):
        model = model_class(config).from_config(config, dtype=dtype)
    names = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}
    tensors = {name: [names.get(p.dtype, str(p.dtype)), list(p.shape)] for name, p in model.named_parameters()}
    return {"model_class": type(model).__name__, "model_type": config.model_type,
            "tied_embeddings": bool(getattr(config.get_text_config(), "tie_word_embeddings", False)),
            "tensors": tensors}


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print("usage: python -m runner.worker.model_loading CONFIG_DIR OUT.json", file=sys.stderr)
        return 2
    listing = tensor_listing(Path(argv[1]))
    Path(argv[2]).write_text(json.dumps(listing, indent=0, separators=(",", ":")) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
