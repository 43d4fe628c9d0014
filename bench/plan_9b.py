"""The shipped Qwen3.5 recipe at its real size, through verify, on one GPU.

Builds a Qwen3.5-9B-shaped text model (`Qwen3_5TextConfig()` defaults, random bf16 weights, saved as
a local folder), writes calibration conversations as long as the plan's (multi-turn chats stitched
from the shipped demo conversations, 64 to ~2048 tokens), writes a recipe that extends the shipped
recipes/qwen35-9b-opus.yaml with only the model path and the calibration file changed, and runs

    recipe run RECIPE --until verify

through the real CLI (every strategy of the shipped recipe, its exclusions, the vllm engine's
verify). Then prints, per strategy: quantize s, export s, checkpoint size, effective bits (measured
and predicted by `recipe plan`), calibration padding, the AWQ fold summary and its cost, and the
verify verdict. Re-running with the same --work resumes where a previous run stopped.

    python bench/plan_9b.py --work /path/with/40GB [--samples 128] [--tokenizer DIR] [--strategy NAME ...]

Needs CUDA, torch, transformers with qwen3_5, ModelOpt. The tokenizer only renders the chats (any
chat tokenizer with a vocabulary below 248320 will do); the weights are random, so quality numbers
(KL, top-1) describe the procedure, not a real model.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHIPPED = REPO / "recipes" / "qwen35-9b-opus.yaml"


def build_model(folder: Path, tokenizer_dir: Path) -> None:
    if (folder / "config.json").exists():
        return
    import torch
    from transformers import AutoTokenizer, Qwen3_5ForCausalLM, Qwen3_5TextConfig

    t0 = time.monotonic()
    config = Qwen3_5TextConfig(architectures=["Qwen3_5ForCausalLM"])
    with torch.device("cuda"):
        model = Qwen3_5ForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(folder)
    params = sum(p.numel() for p in model.parameters())
    del model
    torch.cuda.empty_cache()
    print(f"built and saved {params / 1e9:.2f} B parameters in {time.monotonic() - t0:.1f}s", flush=True)


def write_calibration(path: Path, samples: int, seed: int = 0) -> None:
    """Multi-turn chats of 1 to 40 shipped conversations each: lengths spread like the plan's."""
    source = [json.loads(line) for line in (REPO / "recipes" / "demo" / "calibration.jsonl").read_text().splitlines()
              if line.strip()]
    rng = random.Random(seed)
    lines = []
    for _ in range(samples):
        turns = rng.randint(1, 40)
        picked = [rng.choice(source) for _ in range(turns)]
        messages = [picked[0]["messages"][0]] if picked[0]["messages"][0]["role"] == "system" else []
        for conv in picked:
            messages += [m for m in conv["messages"] if m["role"] != "system"]
        tools = next((c["tools"] for c in picked if c.get("tools")), None)
        lines.append(json.dumps({"messages": messages, **({"tools": tools} if tools else {})}))
    path.write_text("\n".join(lines) + "\n")


def write_recipe(path: Path, model_dir: Path, calibration: Path, samples: int, score_steps: int | None) -> None:
    # auto_quantize's kl_div scoring runs one forward per (layer group x format) per score batch:
    # --score-steps bounds how many batches it scores, so a 10-minute run can finish.
    scoring = ("" if score_steps is None else
               f"quantization:\n  strategies:\n    - name: auto_mixed\n      auto_quantize: "
               f"{{num_score_steps: {score_steps}}}\n")
    path.write_text(f"""# The shipped plan at 9B shape: only the model and the calibration file differ.
extends: {SHIPPED}
name: qwen35-9b-bench
model:
  source: {{kind: local, path: {model_dir}}}
calibration:
  source: {{kind: jsonl, path: {calibration}}}
  samples: {samples}
  max_length: 2048
execution:
  executor: local
  max_parallel: 1
  gpus: 1
{scoring}""")


def cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    return subprocess.run([sys.executable, "-m", "runner.cli", *args], capture_output=True, text=True, env=env,
                          cwd=REPO)


def record(run_dir: Path, step: str) -> dict | None:
    path = run_dir / "steps" / step / "record.json"
    return json.loads(path.read_text()) if path.exists() else None


def failure(run_dir: Path, step: str) -> str | None:
    path = run_dir / "logs" / f"{step}.failed.json"
    return json.loads(path.read_text()).get("error", "")[:300] if path.exists() else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True, help="folder for the model, recipe and run (~40 GB)")
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--tokenizer", type=Path, required=True, help="a chat tokenizer folder")
    parser.add_argument("--strategy", action="append", default=[], help="only these strategies (repeatable)")
    parser.add_argument("--score-steps", type=int, default=None,
                        help="auto_mixed: score on this many calibration batches (the recipe's num_score_steps)")
    args = parser.parse_args()
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    build_model(work / "model", args.tokenizer)
    calibration = work / "calibration.jsonl"
    if not calibration.exists():
        write_calibration(calibration, args.samples)
    recipe = work / "recipe.yaml"
    write_recipe(recipe, work / "model", calibration, args.samples, args.score_steps)
    run_dir = work / "run"
    selection = [a for s in args.strategy for a in ("--strategy", s)]
    plan = cli("plan", str(recipe), "--run-dir", str(run_dir), "--json", *selection)
    predicted = {}
    if plan.returncode == 0:
        with contextlib.suppress(ValueError):
            predicted = (json.loads(plan.stdout).get("footprint") or {})
    else:
        print("plan failed:", plan.stderr[-2000:], flush=True)
    t0 = time.monotonic()
    run = cli("run", str(recipe), "--until", "verify", "--run-dir", str(run_dir), *selection)
    print(f"recipe run --until verify: exit {run.returncode} in {time.monotonic() - t0:.0f}s", flush=True)
    if run.returncode:
        print(run.stderr[-3000:], flush=True)

    status = run_dir / "run.json"
    if not status.exists():
        raise SystemExit("the run did not start; see the output above")
    strategies = args.strategy or sorted({k.split(".", 1)[1] for k in json.loads(status.read_text())["steps"]
                                          if k.startswith("quantize.")})
    header = ("strategy", "quantize s", "export s", "size GB", "eff. bits", "predicted GB/bits", "padding",
              "batches", "fold", "fold KL / top-1", "KL to source before/after fold", "verify")
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for name in strategies:
        q = (record(run_dir, f"quantize.{name}") or {}).get("summary", {})
        v = (record(run_dir, f"verify.{name}") or {}).get("summary", {})
        fold = q.get("awq_fold") or {}
        cost = fold.get("cost") or {}
        pred = predicted.get(name) or {}
        verdict = ("pass (" + v.get("quant_algo", "?") + ")") if v else (
            "FAIL: " + (failure(run_dir, f"verify.{name}") or failure(run_dir, f"quantize.{name}") or "not run"))
        row = (name, q.get("quantize_s"), q.get("export_s"),
               round(q["checkpoint_bytes"] / 1e9, 2) if q.get("checkpoint_bytes") else None, q.get("effective_bits"),
               f"{pred.get('size_gb', '?')} / {pred.get('effective_bits', '?')}",
               f"{100 * q['padding_fraction']:.1f} %" if q.get("padding_fraction") is not None else q.get(
                   "padding_tokens"), q.get("batches"),
               json.dumps(fold.get("actions")) if fold else "-",
               f"{cost.get('kl')} / {cost.get('top1_agreement')}" if cost else "-",
               f"{cost.get('kl_to_source_before')} / {cost.get('kl_to_source_after')}" if cost else
               str((q.get("fidelity") or {}).get("kl")), verdict)
        print("| " + " | ".join("n/a" if c is None else str(c) for c in row) + " |", flush=True)


if __name__ == "__main__":
    main()
