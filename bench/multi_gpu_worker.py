"""The quantize worker's own placement path on a busy GPU: a model that no longer fits GPU 0 is
spread over the machine's GPUs by `python -m runner.worker` itself (from_pretrained with the device
map and max_memory of runner/worker/placement.py), then exported and verified.

Writes a random Llama-3.1-8B-shaped checkpoint (16 GB) with a small word-level tokenizer, holds
`--hold-gb` of GPU 0 in this process (another job on the same GPU, as on a shared node), and runs the
real worker entry point on a quantize spec (W4A16, the llama3 family's exclusions). Prints the
placement the worker recorded, its times and the export's verify verdict.

    python bench/multi_gpu_worker.py [--hold-gb 135] [--shape 8b|tiny] [--work DIR]

`--shape tiny` runs the same on a CPU in seconds (no GPU: placement `cpu`), to check the script.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

SHAPES = {
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=2048),
}


def write_tokenizer(folder: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = set()
    for line in (REPO / "recipes" / "demo" / "calibration.jsonl").read_text(encoding="utf-8").splitlines():
        for message in json.loads(line).get("messages", []):
            words.update(str(message.get("content") or "").split())
    vocab = {w: i for i, w in enumerate(["[UNK]", "[PAD]", "[EOS]", *sorted(words)[:2000]])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", eos_token="[EOS]")
    fast.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    fast.save_pretrained(folder)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hold-gb", type=float, default=135.0)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="8b")
    ap.add_argument("--work", type=Path, default=None)
    args = ap.parse_args()

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from runner.recipe.schema import Strategy
    from runner.serving.vllm import VllmEngine
    from runner.steps.inputs import QuantizeInput
    from runner.worker.verify import verify_checkpoint

    work = args.work or Path(tempfile.mkdtemp(prefix="multi-gpu-worker-"))
    model_dir = work / "model"
    t0 = time.monotonic()
    if not (model_dir / "config.json").exists():
        config = LlamaConfig(**SHAPES[args.shape], architectures=["LlamaForCausalLM"])
        device = "cuda" if torch.cuda.is_available() else "cpu"
        with torch.device(device):
            model = LlamaForCausalLM(config).to(torch.bfloat16)
        model.save_pretrained(model_dir)
        write_tokenizer(model_dir)
        del model
        if device == "cuda":
            torch.cuda.empty_cache()
    print(f"checkpoint {sum(p.stat().st_size for p in model_dir.glob('*.safetensors')) / 1e9:.1f} GB in "
          f"{time.monotonic() - t0:.1f}s", flush=True)

    held = None
    if torch.cuda.is_available() and args.hold_gb > 0:
        held = torch.empty(int(args.hold_gb * 1e9), dtype=torch.uint8, device="cuda:0")
        free = [round(torch.cuda.mem_get_info(i)[0] / 1e9, 1) for i in range(torch.cuda.device_count())]
        print(f"holding {args.hold_gb:.0f} GB of GPU 0 in this process; free now {free} GB", flush=True)

    exclude = ["*layers.0.*", f"*layers.{SHAPES[args.shape]['num_hidden_layers'] - 1}.*", "*embed_tokens*"]
    inputs = QuantizeInput(strategy=Strategy(name="w4a16", preset="W4A16_NVFP4_CFG"), exclude=exclude,
                           calib_samples=16, max_length=256, seed=0, dtype="bfloat16",
                           architecture="LlamaForCausalLM", held_out=4, held_out_after=16)
    out = work / "quantize"
    out.mkdir(exist_ok=True)
    spec = {"kind": "quantize", "output_dir": str(out),
            "params": {**inputs.model_dump(mode="json"), "model_dir": str(model_dir),
                       "calibration": str(REPO / "recipes" / "demo" / "calibration.jsonl")}}
    (out / "spec.json").write_text(json.dumps(spec), encoding="utf-8")
    t1 = time.monotonic()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-m", "runner.worker", str(out / "spec.json")], env=env,
                          capture_output=True, text=True)
    print("\n".join(line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("[")), flush=True)
    if proc.returncode != 0:
        print(proc.stderr[-3000:])
        raise SystemExit(f"worker failed ({proc.returncode})")
    summary = json.loads((out / "worker_result.json").read_text())["summary"]
    print(f"worker done in {time.monotonic() - t1:.1f}s: placement {summary['placement']}; load "
          f"{summary['load_s']}s, quantize {summary['quantize_s']}s, export {summary['export_s']}s; formats "
          f"{summary['formats']}; KL vs source {summary.get('fidelity', {}).get('kl')}", flush=True)
    del held
    report = verify_checkpoint(out / "checkpoint", exclude, VllmEngine().verify_rules, model_dir)
    print("verify:", {c["name"]: c["status"] for c in report["checks"]}, flush=True)


if __name__ == "__main__":
    main()
