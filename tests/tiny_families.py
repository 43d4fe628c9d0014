"""Tiny random models of each catalogue family, scaled down from the shipped real configs
(recipes/models/*/config.json): the same classes, layer pattern (hybrid layer types, MoE experts,
vision towers, tied or untied embeddings) and module names, small enough to quantize on a CPU in
seconds. Used by tests/test_families.py."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from conftest import REPO

MODELS = REPO / "recipes" / "models"

_TEXT = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2,
         "head_dim": 16}
_QWEN35 = {**_TEXT, "num_hidden_layers": 4, "layer_types": ["linear_attention"] * 3 + ["full_attention"],
           "linear_num_key_heads": 2, "linear_num_value_heads": 4, "linear_key_head_dim": 16,
           "linear_value_head_dim": 16, "mtp_num_hidden_layers": 0}
_QWEN_VISION = {"depth": 1, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "out_hidden_size": 64,
                "num_position_embeddings": 64}
_MOE = {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32}
_GEMMA4 = {**_TEXT, "num_hidden_layers": 6, "layer_types": ["sliding_attention"] * 5 + ["full_attention"],
           "sliding_window": 16, "global_head_dim": 32, "num_global_key_value_heads": 1}
_GEMMA4_VISION = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "num_key_value_heads": 2,
                  "head_dim": 16, "global_head_dim": 16, "num_hidden_layers": 1}

# recipe file -> (models/ folder, changes to its config: top level, text_config, vision_config)
FAMILIES: dict[str, tuple[str, dict[str, Any], dict[str, Any], dict[str, Any]]] = {
    "qwen35-27b.yaml": ("qwen35-27b", {}, _QWEN35, _QWEN_VISION),
    "qwen35-35b-a3b.yaml": ("qwen35-35b-a3b", {}, {**_QWEN35, **_MOE, "shared_expert_intermediate_size": 32},
                            _QWEN_VISION),
    "qwen3-next-80b-a3b.yaml": ("qwen3-next-80b-a3b", {**_QWEN35, **_MOE, "shared_expert_intermediate_size": 32,
                                                        "intermediate_size": 128}, {}, {}),
    "qwen3-30b-a3b.yaml": ("qwen3-30b-a3b", {**_TEXT, **_MOE, "num_hidden_layers": 2, "max_window_layers": 2}, {}, {}),
    "llama31-8b-instruct.yaml": ("llama31-8b-instruct", {**_TEXT, "num_hidden_layers": 3}, {}, {}),
    "gemma3-12b-it.yaml": ("gemma3-12b-it", {"mm_tokens_per_image": 4},
                           {**_TEXT, "num_hidden_layers": 6, "sliding_window": 16, "query_pre_attn_scalar": 16,
                            "sliding_window_pattern": 6},
                           {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2,
                            "num_hidden_layers": 1, "image_size": 28, "patch_size": 14}),
    "mistral-small-32-24b.yaml": ("mistral-small-32-24b", {},
                                  {**_TEXT, "num_hidden_layers": 3},
                                  {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2,
                                   "num_hidden_layers": 1, "head_dim": 16, "image_size": 56, "patch_size": 14}),
    # The real pattern's first seven layers: Mamba and MoE alternating, attention at 5 fed by the Mamba
    # layer 4 that the model recipe keeps in BF16, as in the real model.
    "nemotron3-nano-30b-a3b.yaml": ("nemotron3-nano-30b-a3b", {
        **_TEXT, "num_hidden_layers": 7, "hybrid_override_pattern": "MEMEM*E", "mamba_num_heads": 4,
        "mamba_head_dim": 16, "n_groups": 1, "ssm_state_size": 16, "chunk_size": 16, "n_routed_experts": 4,
        "num_experts_per_tok": 2, "moe_intermediate_size": 32, "moe_shared_expert_intermediate_size": 32}, {}, {}),
    # Issue 27's additions. Qwen3.6 has Qwen3.5's shapes; the 122B-A10B is the 35B-A3B's family.
    "qwen36-27b.yaml": ("qwen36-27b", {}, _QWEN35, _QWEN_VISION),
    "qwen36-35b-a3b.yaml": ("qwen36-35b-a3b", {}, {**_QWEN35, **_MOE, "shared_expert_intermediate_size": 32},
                            _QWEN_VISION),
    "qwen35-122b-a10b.yaml": ("qwen35-122b-a10b", {}, {**_QWEN35, **_MOE, "shared_expert_intermediate_size": 32},
                              _QWEN_VISION),
    # Gemma 4: five sliding layers then a global one (global heads of their own width, K = V), a
    # SigLIP-style tower; the 26B-A4B adds routed experts beside the dense MLP of every layer.
    "gemma4-31b-it.yaml": ("gemma4-31b-it", {}, _GEMMA4, _GEMMA4_VISION),
    "gemma4-26b-a4b-it.yaml": ("gemma4-26b-a4b-it", {}, {**_GEMMA4, "num_experts": 4, "top_k_experts": 2,
                                                        "moe_intermediate_size": 32, "intermediate_size": 64},
                               _GEMMA4_VISION),
    # Super's first nine layers: Mamba and LatentMoE alternating, attention at 7 (latent width 32).
    "nemotron3-super-120b-a12b.yaml": ("nemotron3-super-120b-a12b", {
        **_TEXT, "num_hidden_layers": 9, "hybrid_override_pattern": "MEMEMEM*E", "mamba_num_heads": 4,
        "mamba_head_dim": 16, "n_groups": 1, "ssm_state_size": 16, "chunk_size": 16, "n_routed_experts": 4,
        "num_experts_per_tok": 2, "moe_intermediate_size": 32, "moe_shared_expert_intermediate_size": 32,
        "moe_latent_size": 32}, {}, {}),
    # gpt-oss: a sliding and a full layer, fused biased experts.
    "gpt-oss-120b.yaml": ("gpt-oss-120b", {**_TEXT, "num_hidden_layers": 2, "layer_types": ["sliding_attention",
                          "full_attention"], "sliding_window": 16, "num_local_experts": 4, "num_experts_per_tok": 2,
                          "intermediate_size": 32}, {}, {}),
}
# The last decoder layer of each tiny model (the recipes' `last_layer` var) and the layers the model
# recipe itself excludes, renumbered for the tiny pattern.
LAST_LAYER = {"qwen3-next-80b-a3b.yaml": 3, "qwen35-27b.yaml": 3, "qwen35-35b-a3b.yaml": 3, "qwen3-30b-a3b.yaml": 1, "llama31-8b-instruct.yaml": 2,
              "gemma3-12b-it.yaml": 5, "mistral-small-32-24b.yaml": 2, "nemotron3-nano-30b-a3b.yaml": 6,
              "qwen36-27b.yaml": 3, "qwen36-35b-a3b.yaml": 3, "qwen35-122b-a10b.yaml": 3, "gemma4-31b-it.yaml": 5,
              "gemma4-26b-a4b-it.yaml": 5, "nemotron3-super-120b-a12b.yaml": 8, "gpt-oss-120b.yaml": 1}


def _scale_mrope_section(text: dict[str, Any]) -> None:
    """Rescale a multimodal-RoPE mrope_section (T/H/W frequency split) to the tiny rotary dim.

    The real section sums to rotary_dim // 2 of the real head (Qwen3.5: 256 * 0.25 // 2 = 32 =
    11 + 11 + 10); the tiny head has a smaller rotary dim, and vLLM asserts the sum (MRotaryEmbedding).
    Keep the real proportions (largest remainder), so only the sum changes."""
    for key in ("rope_parameters", "rope_scaling"):
        rope = text.get(key)
        if not isinstance(rope, dict) or not rope.get("mrope_section"):
            continue
        factor = rope.get("partial_rotary_factor", text.get("partial_rotary_factor", 1.0))
        head_dim = text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"]
        half = int(head_dim * factor) // 2
        section = rope["mrope_section"]
        exact = [s * half / sum(section) for s in section]
        scaled = [int(x) for x in exact]
        for i in sorted(range(len(exact)), key=lambda i: (scaled[i] - exact[i], i))[: half - sum(scaled)]:
            scaled[i] += 1
        rope["mrope_section"] = scaled


def tiny_config(recipe_file: str, vocab_size: int) -> dict[str, Any]:
    folder, top, text, vision = FAMILIES[recipe_file]
    config = json.loads((MODELS / folder / "config.json").read_text(encoding="utf-8"))
    config.update(top)
    target = config.get("text_config", config)
    target.update(text)
    target["vocab_size"] = vocab_size
    if "vision_config" in config:
        config["vision_config"].update(vision)
        if "out_hidden_size" in config["vision_config"]:
            config["vision_config"]["out_hidden_size"] = target["hidden_size"]
    if "num_hidden_layers" in text and "layer_types" in target and "layer_types" not in text:
        target.pop("layer_types")  # let the config derive the pattern for the new depth
    _scale_mrope_section(target)
    for key in ("image_token_id", "image_token_index", "video_token_id", "vision_start_token_id",
                "vision_end_token_id", "boi_token_index", "eoi_token_index"):
        if key in config:
            config[key] = vocab_size - 1 - ["image_token_id", "image_token_index", "video_token_id",
                                            "vision_start_token_id", "vision_end_token_id", "boi_token_index",
                                            "eoi_token_index"].index(key)
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        for section in (config, target):
            if key in section:
                section[key] = 0 if key != "eos_token_id" else [0]
    return config


# Tensor-name prefixes the published checkpoints carry and a model built from scratch does not save
# (transformers writes its own module names unless it loaded a checkpoint with the other layout): the
# tiny models get the Hub's names, so the exports meet vLLM's loader as the real ones do.
HUB_PREFIXES = {"qwen35-27b.yaml": {"model.": "model.language_model."},
                "qwen36-27b.yaml": {"model.": "model.language_model."},
                "gemma3-12b-it.yaml": {"vision_tower.": "vision_tower.vision_model."}}


def _hub_layout(recipe_file: str, folder: Path) -> None:
    renames = HUB_PREFIXES.get(recipe_file)
    if not renames:
        return
    from safetensors.torch import load_file, save_file

    (file,) = folder.glob("*.safetensors")
    tensors = load_file(file)
    renamed = {}
    for name, tensor in tensors.items():
        old = next((p for p in renames if name.startswith(p)), None)
        renamed[renames[old] + name[len(old):] if old else name] = tensor
    save_file(renamed, file, metadata={"format": "pt"})


def build(recipe_file: str, folder: Path, tokenizer_dir: Path) -> Path:
    """Save a tiny random model of the recipe's family, with the demo's tokenizer, into `folder`."""
    import torch
    from transformers import AutoConfig, AutoTokenizer

    from runner.worker.model_loading import model_class

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(tiny_config(recipe_file, len(tokenizer) + 8)), encoding="utf-8")
    config = AutoConfig.from_pretrained(folder)
    torch.manual_seed(0)
    model = model_class(config).from_config(config, dtype=torch.bfloat16)
    for name, param in model.named_parameters():
        if name.endswith("norm.weight") and param.dim() == 1:  # trained norms are not all one value
            param.data.uniform_(0.7, 1.3)
    model.save_pretrained(folder)
    _hub_layout(recipe_file, folder)
    tokenizer.save_pretrained(folder)
    if recipe_file.startswith("mistral"):
        # Stands in for Mistral's tekken.json, which the family base copies into the export.
        (folder / "tekken.json").write_text('{"note": "placeholder for the test"}\n', encoding="utf-8")
    return folder
