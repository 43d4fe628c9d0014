"""How many samples auto_quantize must score: the per-layer ranking's stability as scored samples grow.

Model: a Qwen3.5-9B-shaped text model (`Qwen3_5TextConfig()` defaults, random bf16 weights on the GPU;
`--layers K` keeps the first K decoder layers at full width), the flagship's exclusions as auto_quantize's
disabled layers. Calibration: random token ids, `--tokens` each. The formats are calibrated once (ModelOpt's
search checkpoint, as the score step saves it); then for each n in `--samples` the scores are computed
again from that state on the first n samples (the checkpoint's scores removed, its calibration kept), and
the solve runs at `--bits`. Printed per n: scoring seconds, Spearman's rank correlation of the layer
groups' scores (at the cheapest format) with the largest n's, how many of the 10 most sensitive groups
agree, and the share of groups whose solved format matches the largest n's solution.

    PYTHONPATH=. python bench/auto_quantize_samples_9b.py [--layers 8] [--samples 4 8 16 32] [--tokens 512]

Random weights: what this measures is how fast the ranking settles for this shape and these formats, not a
trained model's sensitivities; run it on the real model (model_dir) before trusting a smaller count there.
Needs CUDA, torch, transformers with qwen3_5, ModelOpt 0.47.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import tempfile
import time
from pathlib import Path

import torch

FORMATS = ["NVFP4_DEFAULT_CFG", "FP8_DEFAULT_CFG"]


def spearman(a: list[float], b: list[float]) -> float:
    def ranks(values: list[float]) -> list[float]:
        order = sorted(range(len(values)), key=lambda i: values[i])
        out = [0.0] * len(values)
        for rank, i in enumerate(order):
            out[i] = float(rank)
        return out

    ra, rb = ranks(a), ranks(b)
    n = len(a)
    mean = (n - 1) / 2
    cov = sum((x - mean) * (y - mean) for x, y in zip(ra, rb, strict=True))
    var = sum((x - mean) ** 2 for x in ra)
    return cov / var if var else 1.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--samples", type=int, nargs="+", default=[4, 8, 16, 32])
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--bits", type=float, default=9.4, help="the solve's effective_bits (the flagship's)")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--device", default="cuda", help="cpu: a smoke test of the script, with --tiny")
    parser.add_argument("--tiny", action="store_true", help="hidden 128 instead of the 9B's 4096 (smoke test)")
    args = parser.parse_args()
    import modelopt.torch.quantization as mtq
    from modelopt.torch.utils.serialization import safe_load, safe_save
    from transformers import AutoModelForCausalLM, Qwen3_5TextConfig

    from runner.quantization.exclusions import DEFAULT_DISABLED

    config = Qwen3_5TextConfig()
    if args.tiny:
        config = Qwen3_5TextConfig(vocab_size=1024, hidden_size=128, intermediate_size=256, num_attention_heads=4,
                                   num_key_value_heads=2, head_dim=32, linear_num_key_heads=2, linear_num_value_heads=4,
                                   linear_key_head_dim=32, linear_value_head_dim=32)
    device = args.device
    if device == "cpu":
        from runner.worker.nvfp4_cpu import install_cpu_nvfp4

        install_cpu_nvfp4()
    config.num_hidden_layers = args.layers
    config.layer_types = config.layer_types[:args.layers]
    exclude = ["*linear_attn*", "*layers.0.*", f"*layers.{args.layers - 1}.*"]
    rng = random.Random(0)
    largest = max(args.samples)
    batches = [{"input_ids": torch.tensor([[rng.randrange(config.vocab_size) for _ in range(args.tokens)]],
                                          device=device)} for _ in range(largest)]

    def fresh_model():
        torch.manual_seed(0)
        with torch.device(device):
            return AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()

    def run(model, samples: int, checkpoint: Path) -> tuple[float, dict[str, str]]:
        """(seconds, the solve's format per layer group)."""
        t0 = time.monotonic()
        _, search = mtq.auto_quantize(model, constraints={"effective_bits": args.bits},
                          quantization_formats=[copy.deepcopy(getattr(mtq, f)) for f in FORMATS],
                          data_loader=batches, forward_step=lambda m, b: m(**b, use_cache=False).logits,
                          num_calib_steps=min(16, largest), num_score_steps=samples, method="kl_div",
                          disabled_layers=DEFAULT_DISABLED + exclude, checkpoint=str(checkpoint), verbose=False)
        if device == "cuda":
            torch.cuda.synchronize()
        return time.monotonic() - t0, {k: str(v) for k, v in search["best"]["recipe"].items()}

    where = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    print(f"# {where}: Qwen3.5-9B shape, {args.layers} layers, {args.tokens}-token samples, "
          f"formats {FORMATS}, solve at {args.bits} bits", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "calibrated.pth"
        model = fresh_model()
        first, _ = run(model, 1, base)  # calibrates each format once, scores 1 sample
        del model
        state = safe_load(base)
        print(f"# formats calibrated + 1 sample scored in {first:.1f} s", flush=True)
        rows = {}
        for n in sorted(args.samples):
            unscored = copy.copy(state)
            unscored.pop("candidate_stats")  # absent: ModelOpt starts from its empty default and scores again
            path = Path(tmp) / f"n{n}.pth"
            safe_save(unscored, path)
            model = fresh_model()
            seconds, chosen = run(model, n, path)
            scored = safe_load(path)["candidate_stats"]
            groups = {}
            for name, entry in scored.items():
                costs, values = entry.get("costs", []), entry.get("scores", [])
                # A disabled group (excluded, or no format applies) has one choice and no score: not ranked.
                if costs and len(costs) == len(values) and len(costs) > 1:
                    groups[name] = float(values[min(range(len(costs)), key=costs.__getitem__)])
            rows[n] = {"seconds": seconds, "groups": groups, "chosen": chosen}
            print(f"n={n}: scored in {seconds:.1f} s, {len(groups)} groups; e.g. "
                  f"{[round(v, 6) for v in list(groups.values())[:3]]}", flush=True)
            del model
    reference = rows[largest]
    names = sorted(reference["groups"])
    top = sorted(names, key=lambda g: reference["groups"][g], reverse=True)[:10]
    print("\n| scored samples | scoring s | Spearman vs largest | top-10 agreement | solved formats agree |")
    print("|---|---|---|---|---|")
    out = []
    for n, row in sorted(rows.items()):
        rho = spearman([row["groups"].get(g, 0.0) for g in names], [reference["groups"][g] for g in names])
        mine = sorted(names, key=lambda g: row["groups"].get(g, 0.0), reverse=True)[:10]
        agree = sum(1 for g in mine if g in top)
        shared = [m for m in reference["chosen"] if m in row["chosen"]]
        same = sum(1 for m in shared if row["chosen"][m] == reference["chosen"][m]) / max(len(shared), 1)
        print(f"| {n} | {row['seconds']:.1f} | {rho:.3f} | {agree}/{len(top)} | {same:.0%} |", flush=True)
        out.append({"samples": n, "seconds": round(row["seconds"], 2), "spearman": round(rho, 4),
                    "top10": agree, "formats_agree": round(same, 4)})
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
