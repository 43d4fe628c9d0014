"""Quantize-step speed on a GPU: the runner's quantize path vs. calling ModelOpt directly.

A Qwen3.5-9B-shaped text model (random bf16 weights, `Qwen3_5TextConfig()`), 64 calibration samples
of 512 tokens, exclusions `*linear_attn*` and the first and last layer. "direct" is what a
hand-written script does (facts.md's baseline): `mtq.quantize` with a forward loop of batch 1 that
computes full logits. "runner" is `runner.worker.quantize.quantize_model`: automatic batch size and
no vocabulary projection during calibration. Both start from the same freshly built model.

    python bench/quantize_gpu.py --algorithms max awq_lite [--layers 32] [--export /tmp/ckpt]

Prints one line per measurement and a markdown table; needs CUDA, torch, transformers, ModelOpt.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import time

import torch

from runner.worker.calib_data import CalibrationSet
from runner.worker.quantize import build_config, quantize_model

PRESETS = {"max": "NVFP4_DEFAULT_CFG", "awq_lite": "NVFP4_AWQ_LITE_CFG"}


def build_model(layers: int | None):
    from transformers import AutoModelForCausalLM, Qwen3_5TextConfig

    config = Qwen3_5TextConfig()
    if layers:
        config.num_hidden_layers = layers
        config.layer_types = config.layer_types[:layers]
    config.architectures = ["Qwen3_5ForCausalLM"]
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    return model.eval(), config


def exclusions(config) -> list[str]:
    return ["*linear_attn*", "*layers.0.*", f"*layers.{config.num_hidden_layers - 1}.*"]


def direct(model, calib: CalibrationSet, preset: str, exclude: list[str]) -> float:
    import modelopt.torch.quantization as mtq

    config = copy.deepcopy(getattr(mtq, preset))
    config["quant_cfg"] = list(config["quant_cfg"]) + [{"quantizer_name": p, "enable": False} for p in exclude]
    samples = [torch.tensor([ids], device="cuda") for ids in calib.token_ids]

    def forward_loop(m):
        with torch.no_grad():
            for ids in samples:
                m(ids)

    torch.cuda.synchronize()
    t0 = time.monotonic()
    mtq.quantize(model, config, forward_loop=forward_loop)
    torch.cuda.synchronize()
    return time.monotonic() - t0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--algorithms", nargs="+", default=["max"], choices=list(PRESETS))
    parser.add_argument("--layers", type=int, default=None, help="fewer layers for a quick check")
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--export", default=None, help="also time export_hf_checkpoint of the runner's model here")
    args = parser.parse_args()

    rows = []
    for algorithm in args.algorithms:
        preset = PRESETS[algorithm]
        for method in ("direct", "runner"):
            model, config = build_model(args.layers)
            vocab = config.vocab_size
            gen = torch.Generator().manual_seed(1)
            ids = torch.randint(0, vocab, (args.samples, args.length), generator=gen).tolist()
            calib = CalibrationSet(ids, pad_id=0)
            exclude = exclusions(config)
            with torch.no_grad():  # warm-up: kernels, allocator
                model(torch.tensor([ids[0]], device="cuda"), logits_to_keep=1)
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            if method == "direct":
                seconds = direct(model, calib, preset, exclude)
                batch = 1
            else:
                strategy = {"name": algorithm, "preset": preset, "batch_size": "auto"}
                build_config(strategy, exclude)  # same config path as the worker
                result = quantize_model(model, calib, strategy, exclude, torch.device("cuda"))
                seconds, batch = result["quantize_s"], result["batch_size"]
            peak = torch.cuda.max_memory_allocated() / 2**30
            row = {"algorithm": algorithm, "method": method, "seconds": round(seconds, 2), "batch": batch,
                   "peak_gib": round(peak, 1), "tokens_per_s": round(args.samples * args.length / seconds)}
            if method == "runner" and args.export:
                from modelopt.torch.export import export_hf_checkpoint

                t0 = time.monotonic()
                export_hf_checkpoint(model, export_dir=f"{args.export}-{algorithm}")
                row["export_s"] = round(time.monotonic() - t0, 1)
            print(json.dumps(row), flush=True)
            rows.append(row)
            del model
            gc.collect()
            torch.cuda.empty_cache()

    print("\n| algorithm | method | quantize s | batch | peak GiB | tokens/s | runner / direct |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        base = next(r for r in rows if r["algorithm"] == row["algorithm"] and r["method"] == "direct")
        print(f"| {row['algorithm']} | {row['method']} | {row['seconds']} | {row['batch']} | {row['peak_gib']} | "
              f"{row['tokens_per_s']} | {row['seconds'] / base['seconds']:.3f} |")


if __name__ == "__main__":
    main()
