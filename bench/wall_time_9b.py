"""The flagship at the Qwen3.5-9B shape through verify on one GPU: predicted against measured wall time,
with independent quantize steps sharing the GPU and one at a time.

Builds a Qwen3.5-9B-shaped model (random bf16 weights, saved once), writes multi-turn calibration chats as
bench/plan_9b.py does, and for each mode writes a recipe extending recipes/qwen35-9b-opus.yaml with only the
model, the calibration file, the strategies chosen and the execution settings changed, then

    recipe plan RECIPE --json          (each step's prediction on this machine: execution.hardware)
    recipe run RECIPE --until verify   (the real CLI, local executor)

Printed per mode: each step's predicted and measured seconds and their ratio, the run's predicted total
(runner/wall_time.schedule over the steps that ran) and its measured wall time; then shared against
sequential. Modes: `shared` (execution.share_gpus: true, nvidia-smi's memory) and `sequential`
(share_gpus: false: one GPU step at a time).

    PYTHONPATH=. python bench/wall_time_9b.py --work DIR --tokenizer DIR [--samples 120]
        [--strategy awq_lite --strategy mlp_only] [--score-steps 8] [--modes shared sequential]

`--strategy search_first` is the flagship search's first candidate (MLPs W4A16, sensitivity on 4 held-out
conversations): what one search candidate costs at 9B (quantize + sensitivity + export + verify).

Needs CUDA, torch, transformers with qwen3_5, ModelOpt, ~60 GB of disk. Weights are random: times and
sizes are real, quality numbers are not.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from plan_9b import REPO, SHIPPED, build_model, cli, write_calibration  # noqa: E402


def machine_name() -> str:
    out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                         text=True).stdout
    return "h200" if "H200" in out else "h100-sxm"


def write_recipe(path: Path, model_dir: Path, calibration: Path, samples: int, score_steps: int | None,
                 share: bool, hardware: str) -> None:
    # Strategies merge by name into the flagship's; --strategy picks which run. The search's first candidate
    # (docs/search.md: the MLPs at W4A16, max, FP8 KV, nothing kept) with the sensitivity the search asks.
    entries = []
    if score_steps:
        entries.append(f"    - name: auto_mixed\n      auto_quantize: {{num_score_steps: {score_steps}}}\n")
    entries.append("    - name: search_first\n      layout: {formats: {mlp: w4a16_nvfp4}, kv_cache: fp8}\n"
                   "      sensitivity: 4\n      inherit_exclude: false\n")
    scoring = "quantization:\n  strategies:\n" + "".join(entries)
    path.write_text(f"""extends: {SHIPPED}
name: qwen35-9b-wall-time
model:
  source: {{kind: local, path: {model_dir}}}
calibration:
  source: {{kind: jsonl, path: {calibration}}}
  samples: {samples}
  max_length: 2048
{scoring}benchmark:
  suites: []  # the flagship's held-out teacher suite needs a teacher; this run stops at verify
gates: []
execution:
  executor: local
  max_parallel: 4
  gpus: 1
  share_gpus: {str(share).lower()}
  hardware: {hardware}
""")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--tokenizer", type=Path, required=True)
    parser.add_argument("--samples", type=int, default=120)
    parser.add_argument("--strategy", action="append", default=[])
    parser.add_argument("--score-steps", type=int, default=None, help="auto_mixed's num_score_steps")
    parser.add_argument("--modes", nargs="+", default=["shared", "sequential"], choices=["shared", "sequential"])
    args = parser.parse_args()
    strategies = args.strategy or ["awq_lite", "mlp_only"]
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    build_model(work / "model", args.tokenizer)
    calibration = work / "calibration.jsonl"
    if not calibration.exists():
        write_calibration(calibration, args.samples + 16)  # the held-out conversations after the calibrated ones
    hardware = machine_name()
    walls = {}
    for mode in args.modes:
        recipe = work / f"recipe-{mode}.yaml"
        write_recipe(recipe, work / "model", calibration, args.samples, args.score_steps, mode == "shared", hardware)
        run_dir = work / f"run-{mode}"
        selection = [a for s in strategies for a in ("--strategy", s)]
        plan = cli("plan", str(recipe), "--run-dir", str(run_dir), "--json", *selection)
        if plan.returncode:
            raise SystemExit(f"plan failed: {plan.stderr[-2000:]}")
        predicted = {row["step"]: row["predicted_s"] for row in json.loads(plan.stdout)["steps"]}
        t0 = time.monotonic()
        run = cli("run", str(recipe), "--until", "verify", "--run-dir", str(run_dir), *selection)
        wall = time.monotonic() - t0
        walls[mode] = wall
        print(f"\n## {mode}: recipe run --until verify: exit {run.returncode} in {wall:.0f} s on {hardware}",
              flush=True)
        if run.returncode:
            print(run.stderr[-3000:], flush=True)
        ran = {}
        print("| step | predicted s | measured s | measured / predicted |\n|---|---|---|---|")
        for step_dir in sorted((run_dir / "steps").iterdir()):
            record = json.loads((step_dir / "record.json").read_text())
            sid, took = record["step"], record["duration_s"]
            ran[sid] = took
            guess = predicted.get(sid)
            ratio = f"{took / guess:.2f}" if guess else "-"
            print(f"| {sid} | {guess} | {took:.1f} | {ratio} |", flush=True)
            summary = record.get("summary") or {}
            if sid.startswith(("quantize.", "score.")):
                print(f"|  ({sid}: load {summary.get('load_s')} s, calibrate/score "
                      f"{summary.get('quantize_s') or summary.get('score_s')} s, export {summary.get('export_s')} s, "
                      f"{summary.get('batches')} batches of {summary.get('batch_widths')} widths, peak "
                      f"{(summary.get('peak_gpu_bytes') or 0) / 2**30:.1f} GiB, lease "
                      f"{summary.get('gpu_lease')}) | | | |", flush=True)
        total = predicted_total(recipe, run_dir, selection, ran, predicted)
        print(f"predicted total of the steps that ran: {total:.0f} s; measured {wall:.0f} s "
              f"({wall / total:.2f} x)" if total else "no predicted total", flush=True)
        for log in sorted((run_dir / "logs").glob("quantize.*.log")):
            lease = [line for line in log.read_text(errors="replace").splitlines() if "GPU lease" in line]
            print(f"{log.name}: {lease[:1]}", flush=True)
        shutil.rmtree(run_dir / "steps", ignore_errors=True)  # the exports: disk for the next mode
    if len(walls) == 2:
        print(f"\nshared {walls['shared']:.0f} s vs sequential {walls['sequential']:.0f} s: "
              f"{walls['shared'] / walls['sequential']:.2f} x", flush=True)


def predicted_total(recipe: Path, run_dir: Path, selection: list[str], ran: dict[str, float],
                    predicted: dict[str, float | None]) -> float | None:
    """The scheduler's simulation over the steps that ran, with their predicted seconds."""
    sys.path.insert(0, str(REPO))
    from runner import wall_time
    from runner.plan import build_plan
    from runner.quantization.weights import load_weights
    from runner.recipe.loader import load_recipe

    loaded = load_recipe(recipe).recipe
    plan = build_plan(loaded, [a for a in selection if a != "--strategy"] or None)
    seconds = {sid: (predicted.get(sid) or 0.0) if sid in ran else 0.0 for sid in plan.steps}
    cost = wall_time.model_cost(load_weights(loaded.model.source.path))
    needs = wall_time.gpu_needs(plan, cost) if loaded.execution.share_gpus else {}
    memory = subprocess.run(["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
                            capture_output=True, text=True).stdout.split()
    gpu = int(float(memory[0])) * 2**20 if memory and loaded.execution.share_gpus else None
    return wall_time.schedule(plan, seconds, needs, gpu)


if __name__ == "__main__":
    main()
