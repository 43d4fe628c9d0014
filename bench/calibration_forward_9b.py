"""The calibration forward at the Qwen3.5-9B shape: tokens/s against the card's bf16 roofline, by batching.

Model: `Qwen3_5TextConfig()` defaults (8.95 B parameters, 24 DeltaNet + 8 attention layers), random bf16
weights on the GPU, forwards as calibration runs them (no KV cache, no logits but the last). Set: the
plan's kind of mix, 128 samples of uniform 64..2048 tokens (what bench/quantize_gpu.py calls "mixed").
Each batching runs the whole set twice in one process: pass 1 pays compiles and Triton autotuning for
every shape it meets, pass 2 is the steady state. Batchings:

  bucketed   this project's plan (runner/worker/calib_data.plan_token_batches): a few padded widths
  exact      the same token budget, every batch padded only to its own longest (one shape a batch):
             what the plan did before buckets
  hf_ptq     every sample left-padded to the longest, batch 32 (ModelOpt's hf_ptq path)

The roofline is measured here: the card's bf16 matmul rate (a 8192^3 GEMM loop) over 2 FLOP per Linear
weight a token (lm_head excluded: calibration computes no logits; attention's quadratic part left out,
so the share errs high by ~2 % at these lengths). The issue's fixed 44 k tokens/s (790 TFLOP/s at
2 x 9e9 FLOP a token) is printed beside it.

    PYTHONPATH=. python bench/calibration_forward_9b.py [--budget 131072] [--layers N]

Run it once with flash-linear-attention importable and once without (PYTHONPATH) to compare the
DeltaNet kernels. Needs CUDA, torch, transformers with qwen3_5.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import random
import time

import torch

from runner.worker.calib_data import CalibrationSet, plan_fixed_batches, plan_token_batches
from runner.worker.quantize import calibration_kwargs

ISSUE_ROOFLINE_TOKENS_S = 44_000


def matmul_tflops(device: str) -> float:
    size, n = (8192, 40) if device == "cuda" else (1024, 4)
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    sync(device)
    t0 = time.perf_counter()
    for _ in range(n):
        a @ b
    sync(device)
    return 2 * size**3 * n / (time.perf_counter() - t0) / 1e12


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", type=int, default=131_072, help="token budget a batch (rows x width)")
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--device", default="cuda", help="cpu: a smoke test of the script (use --layers 1)")
    parser.add_argument("--batchings", nargs="+", default=["bucketed", "exact", "hf_ptq"])
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM, Qwen3_5TextConfig

    config = Qwen3_5TextConfig()
    if args.layers:
        config.num_hidden_layers = args.layers
        config.layer_types = config.layer_types[:args.layers]
    torch.manual_seed(0)
    device = args.device
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    linear = sum(m.weight.numel() for n, m in model.named_modules()
                 if isinstance(m, torch.nn.Linear) and "lm_head" not in n)
    tflops = matmul_tflops(device)
    roofline = tflops * 1e12 / (2 * linear)
    fla = importlib.util.find_spec("fla") is not None
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    print(f"# {name}, torch {torch.__version__}, flash-linear-attention "
          f"{'importable' if fla else 'absent'}; {config.num_hidden_layers} layers, {linear / 1e9:.2f} B Linear "
          f"weights (lm_head excluded); bf16 matmul {tflops:.0f} TFLOP/s -> roofline {roofline:,.0f} tok/s",
          flush=True)
    rng = random.Random(0)
    lengths = [rng.randint(64, 2048) for _ in range(args.samples)]
    calib = CalibrationSet([[rng.randrange(config.vocab_size) for _ in range(n)] for n in lengths], 0)
    kwargs = calibration_kwargs(model)
    for batching in args.batchings:
        if batching == "bucketed":
            plan = plan_token_batches(lengths, args.budget)
        elif batching == "exact":  # the same batches, each padded only to its own longest sample
            plan = dataclasses.replace(plan_token_batches(lengths, args.budget), padded_to=())
        else:
            plan = plan_fixed_batches([calib.longest] * len(lengths), 32)
        if batching == "hf_ptq":
            ids = torch.full((len(lengths), calib.longest), 0, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for row, sample in enumerate(calib.token_ids):
                ids[row, calib.longest - len(sample):] = torch.tensor(sample)
                mask[row, calib.longest - len(sample):] = 1
            batches = [{"input_ids": ids[s:s + 32].to(device), "attention_mask": mask[s:s + 32].to(device)}
                       for s in range(0, len(lengths), 32)]
            computed = ids.numel()
        else:
            batches = calib.build(plan, device)
            computed = plan.computed_tokens
        shapes = sorted({tuple(b["input_ids"].shape) for b in batches}, reverse=True)
        for attempt in (1, 2):
            sync(device)
            t0 = time.perf_counter()
            with torch.no_grad():
                for number, batch in enumerate(batches, start=1):
                    started = time.perf_counter()
                    model(**batch, **kwargs)
                    if attempt == 1:  # where a first pass's time goes (compiles, autotuning), even if cut short
                        sync(device)
                        print(f"#   pass 1 batch {number}/{len(batches)} {tuple(batch['input_ids'].shape)}: "
                              f"{time.perf_counter() - started:.2f} s", flush=True)
            sync(device)
            seconds = time.perf_counter() - t0
            real = sum(lengths)
            row = {"batching": batching, "pass": attempt, "fla": fla, "seconds": round(seconds, 2),
                   "batches": len(batches), "shapes": len(shapes), "widths": len({s[1] for s in shapes}),
                   "padding": round(1 - real / computed, 4), "real_tok_s": round(real / seconds),
                   "computed_tok_s": round(computed / seconds),
                   "share_of_roofline": round(real / seconds / roofline, 3),
                   "share_of_44k": round(real / seconds / ISSUE_ROOFLINE_TOKENS_S, 3)}
            print(json.dumps(row), flush=True)
        del batches
        if device == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
