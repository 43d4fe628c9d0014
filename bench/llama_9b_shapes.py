"""The model the GPU benches quantize: a two-layer Llama with Qwen3.5-9B's Linear shapes (hidden 4096,
intermediate 12288, 16 query heads of 256 over 4 KV heads), random bf16 weights on CUDA, calibrated
by ModelOpt with `preset` on one batch of random tokens (lm_head left unquantized)."""

from __future__ import annotations

import copy
from typing import Any


def quantized_llama(preset: str) -> Any:
    import modelopt.torch.quantization as mtq
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=1024, hidden_size=4096, intermediate_size=12288, num_hidden_layers=2,
                         num_attention_heads=16, num_key_value_heads=4, head_dim=256, tie_word_embeddings=False,
                         architectures=["LlamaForCausalLM"])
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(device="cuda", dtype=torch.bfloat16).eval()
    cfg = copy.deepcopy(getattr(mtq, preset))
    cfg["quant_cfg"] = [*cfg["quant_cfg"], {"quantizer_name": "*lm_head*", "enable": False}]
    ids = torch.randint(0, 1024, (4, 256), device="cuda")
    mtq.quantize(model, cfg, forward_loop=lambda m: m(ids))
    return model


def quantized_linears(model: Any) -> dict[str, Any]:
    """Name -> Linear for every Linear whose weight quantizer is on."""
    import torch

    return {name: module for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and getattr(module, "weight_quantizer", None) is not None
            and module.weight_quantizer.is_enabled}
