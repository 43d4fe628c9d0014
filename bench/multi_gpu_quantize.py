"""A model larger than one GPU, quantized across the GPUs of one machine.

Builds the Qwen3-Next-80B-A3B shape (transformers' `Qwen3NextConfig()` defaults: 79.7 B parameters,
148 GiB in bf16, more than one H200's 140 GiB) with random weights, decides its placement with the
quantize worker's own rule (runner/worker/placement.py: one GPU when weights + calibration headroom
fit, else spread with accelerate's device map), materializes each weight directly on its GPU,
calibrates and quantizes it with the worker's `quantize_model` (the recipe-style exclusions of the
Qwen3.5-MoE family: DeltaNet, routers, shared-expert gates, embeddings), and prints the placement,
times, per-GPU peak memory and the formats. `--export DIR` also exports and verifies (needs ~45 GB
of disk for W4A16).

    python bench/multi_gpu_quantize.py [--strategy w4a16|nvfp4] [--samples 16] [--tokens 512] [--export DIR]

The worker does the same from a checkpoint on disk (from_pretrained with the device map and
max_memory this rule gives); building in memory keeps the bench within a machine's disk.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

EXCLUDE = ["*linear_attn*", "*mlp.gate", "*shared_expert_gate*", "*embed_tokens*"]
PRESETS = {"w4a16": "W4A16_NVFP4_CFG", "nvfp4": "NVFP4_DEFAULT_CFG"}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--strategy", choices=sorted(PRESETS), default="w4a16")
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--export", type=Path, default=None)
    args = ap.parse_args()

    import torch
    from accelerate import dispatch_model, infer_auto_device_map, init_empty_weights
    from accelerate.utils import set_module_tensor_to_device
    from transformers import AutoModelForCausalLM, Qwen3NextConfig

    from runner.recipe.schema import Strategy
    from runner.worker import placement
    from runner.worker.calib_data import CalibrationSet
    from runner.worker.model_loading import with_architectures
    from runner.worker.quantize import layer_formats, quantize_model

    config = Qwen3NextConfig(architectures=["Qwen3NextForCausalLM"])
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    free = placement.gpu_free_bytes()
    need_one = model_bytes + placement.headroom(model_bytes)
    print(f"Qwen3-Next-80B-A3B shape: {model_bytes / 1e9:.1f} GB in bf16; {len(free)} GPU(s) with "
          f"{', '.join(f'{b / 1e9:.1f}' for b in free)} GB free; one GPU would need {need_one / 1e9:.1f} GB",
          flush=True)
    place = placement.choose(model_bytes, free)
    print(f"placement: {place.summary()}", flush=True)
    if place.mode != "spread":
        raise SystemExit("this machine holds the model on one GPU: run on two or more smaller ones")

    t0 = time.monotonic()
    device_map = infer_auto_device_map(model, max_memory=dict(place.max_memory),
                                       no_split_module_classes=model._no_split_modules, dtype=torch.bfloat16)
    prefixes = sorted(device_map, key=len, reverse=True)
    for name, param in list(model.named_parameters()):
        prefix = next(p for p in prefixes if p == "" or name == p or name.startswith(p + "."))
        device = device_map[prefix]
        value = torch.empty(param.shape, dtype=torch.bfloat16, device=f"cuda:{device}")
        if param.dim() >= 2:
            value.normal_(0, 0.02)
        else:
            value.fill_(1.0 if name.endswith("norm.weight") else 0.0)
        set_module_tensor_to_device(model, name, f"cuda:{device}", value=value)
    model = with_architectures(dispatch_model(model, device_map=device_map).eval())
    per_device: dict[str, int] = {}
    for device in device_map.values():
        per_device[str(device)] = per_device.get(str(device), 0) + 1
    print(f"built and spread in {time.monotonic() - t0:.1f}s: modules per GPU {per_device}; weights per GPU "
          f"{[round(torch.cuda.memory_allocated(i) / 1e9, 1) for i in range(len(free))]} GB", flush=True)

    strategy = Strategy(name=args.strategy, preset=PRESETS[args.strategy])
    ids = [torch.randint(0, config.vocab_size, (args.tokens,)).tolist() for _ in range(args.samples)]
    for i in range(len(free)):
        torch.cuda.reset_peak_memory_stats(i)
    result = quantize_model(model, CalibrationSet(token_ids=ids, pad_id=0), strategy, EXCLUDE, torch.device("cuda:0"))
    peaks = [round(torch.cuda.max_memory_allocated(i) / 2**30, 1) for i in range(len(free))]
    formats: dict[str, int] = {}
    for fmt in layer_formats(model).values():
        formats[fmt] = formats.get(fmt, 0) + 1
    print(f"quantized ({strategy.preset}) in {result['quantize_s']:.1f}s: {result['batches']} batches of up to "
          f"{result['batch_size']} samples, {args.samples * args.tokens} tokens; peak GiB per GPU {peaks}; "
          f"formats {formats}", flush=True)

    if args.export:
        from modelopt.torch.export import export_hf_checkpoint

        from runner.serving.vllm import VllmEngine
        from runner.worker.quantize import repair_exclude_modules
        from runner.worker.verify import verify_checkpoint

        t1 = time.monotonic()
        export_hf_checkpoint(model, export_dir=args.export)
        repair_exclude_modules(args.export)
        size = sum(p.stat().st_size for p in args.export.glob("*.safetensors"))
        print(f"exported in {time.monotonic() - t1:.1f}s: {size / 1e9:.2f} GB", flush=True)
        report = verify_checkpoint(args.export, EXCLUDE, VllmEngine().verify_rules, None)
        print({c["name"]: c["status"] for c in report["checks"]}, flush=True)


if __name__ == "__main__":
    main()
