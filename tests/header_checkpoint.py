"""Header-only safetensors checkpoints for tests: real names, dtypes and shapes, no weights.

A safetensors file is an 8-byte little-endian header length, the JSON header, then the data; here
the data region is a sparse hole (`truncate`), so a 9B-shaped checkpoint costs a few kB of disk.
No torch: the Qwen3.5 layout below is what transformers' Qwen3_5ForCausalLM's state dict holds
(checked against it on the meta device: 427 tensors, 8.95 B parameters at the default config).
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "U8": 1, "I8": 1, "I32": 4, "I64": 8}


def write_checkpoint(folder: Path, tensors: dict[str, tuple[str, list[int]]], config: dict,
                     shards: int = 1) -> Path:
    """config.json and `shards` safetensors files holding `tensors` (name -> (dtype, shape))."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config), encoding="utf-8")
    names = list(tensors)
    per = math.ceil(len(names) / shards)
    weight_map = {}
    for i in range(shards):
        part = names[i * per:(i + 1) * per]
        file = "model.safetensors" if shards == 1 else f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name in part:
            dtype, shape = tensors[name]
            size = math.prod(shape) * BYTES[dtype]
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
            weight_map[name] = file
        blob = json.dumps(header).encode()
        blob += b" " * (-len(blob) % 8)
        with (folder / file).open("wb") as fh:
            fh.write(struct.pack("<Q", len(blob)) + blob)
            fh.truncate(8 + len(blob) + offset)
    if shards > 1:
        (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return folder


def qwen35_config(**overrides) -> dict:
    """transformers' Qwen3_5TextConfig() defaults: the Qwen3.5-9B shape."""
    config = {"model_type": "qwen3_5_text", "architectures": ["Qwen3_5ForCausalLM"], "vocab_size": 248320,
              "hidden_size": 4096, "intermediate_size": 12288, "num_hidden_layers": 32, "num_attention_heads": 16,
              "num_key_value_heads": 4, "head_dim": 256, "linear_conv_kernel_dim": 4, "linear_key_head_dim": 128,
              "linear_value_head_dim": 128, "linear_num_key_heads": 16, "linear_num_value_heads": 32,
              "full_attention_interval": 4, "tie_word_embeddings": False, "torch_dtype": "bfloat16"}
    config.update(overrides)
    config.setdefault("layer_types", [
        "full_attention" if (i + 1) % config["full_attention_interval"] == 0 else "linear_attention"
        for i in range(config["num_hidden_layers"])])
    return config


def qwen35_tensors(config: dict, dtype: str = "BF16") -> dict[str, tuple[str, list[int]]]:
    """The state dict of Qwen3_5ForCausalLM(config): names, dtypes, shapes."""
    h, inter, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    key_dim = config["linear_num_key_heads"] * config["linear_key_head_dim"]
    value_dim = config["linear_num_value_heads"] * config["linear_value_head_dim"]
    heads, kv, hd = config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"]
    t: dict[str, tuple[str, list[int]]] = {"model.embed_tokens.weight": (dtype, [v, h])}
    for i, kind in enumerate(config["layer_types"]):
        p = f"model.layers.{i}."
        if kind == "linear_attention":
            t |= {p + "linear_attn.dt_bias": (dtype, [config["linear_num_value_heads"]]),
                  p + "linear_attn.A_log": (dtype, [config["linear_num_value_heads"]]),
                  p + "linear_attn.conv1d.weight": (dtype, [2 * key_dim + value_dim, 1,
                                                            config["linear_conv_kernel_dim"]]),
                  p + "linear_attn.norm.weight": (dtype, [config["linear_value_head_dim"]]),
                  p + "linear_attn.out_proj.weight": (dtype, [h, value_dim]),
                  p + "linear_attn.in_proj_qkv.weight": (dtype, [2 * key_dim + value_dim, h]),
                  p + "linear_attn.in_proj_z.weight": (dtype, [value_dim, h]),
                  p + "linear_attn.in_proj_b.weight": (dtype, [config["linear_num_value_heads"], h]),
                  p + "linear_attn.in_proj_a.weight": (dtype, [config["linear_num_value_heads"], h])}
        else:  # q_proj carries the output gate: twice the query width
            t |= {p + "self_attn.q_proj.weight": (dtype, [2 * heads * hd, h]),
                  p + "self_attn.k_proj.weight": (dtype, [kv * hd, h]),
                  p + "self_attn.v_proj.weight": (dtype, [kv * hd, h]),
                  p + "self_attn.o_proj.weight": (dtype, [h, heads * hd]),
                  p + "self_attn.q_norm.weight": (dtype, [hd]),
                  p + "self_attn.k_norm.weight": (dtype, [hd])}
        t |= {p + "mlp.gate_proj.weight": (dtype, [inter, h]), p + "mlp.up_proj.weight": (dtype, [inter, h]),
              p + "mlp.down_proj.weight": (dtype, [h, inter]), p + "input_layernorm.weight": (dtype, [h]),
              p + "post_attention_layernorm.weight": (dtype, [h])}
    t["model.norm.weight"] = (dtype, [h])
    if not config.get("tie_word_embeddings"):
        t["lm_head.weight"] = (dtype, [v, h])
    return t


def qwen35_9b(folder: Path, shards: int = 4) -> Path:
    """A header-only Qwen3.5-9B-shaped checkpoint (bf16, 17.9 GB of sparse holes)."""
    config = qwen35_config()
    return write_checkpoint(folder, qwen35_tensors(config), config, shards=shards)
