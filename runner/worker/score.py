"""Worker: auto_quantize's search state, computed once for every auto_quantize strategy that shares it.

Loads the model and the calibration set as the quantize worker does, batches them for scoring passes
(full logits), and runs ModelOpt's auto_quantize with a search checkpoint: each candidate format is
calibrated and every layer group scored (its sensitivity to each format), and ModelOpt saves that state.
The quantize steps of the strategies restore it and only solve for their own effective_bits, so a
second target, a second strategy or a search candidate costs a solve, not a scoring pass (ModelOpt checks
that the formats, method, disabled layers and model match the checkpoint, and refuses otherwise).

Outputs: `search_state` (ModelOpt's checkpoint) and `scores.json` (each group's score per format, and the
groups ranked by their score at the cheapest format: what would stay in 16 bits first).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from runner.recipe.schema import AutoQuantizeSpec
from runner.steps.inputs import ScoreInput
from runner.worker.calib_data import load_calibration
from runner.worker.quantize import auto_batch_size, load_for_calibration, quantize_auto

STATE = "search_state.pth"


def run(params: dict[str, Any], output_dir: Path) -> dict[str, Any]:
    import torch

    inputs = ScoreInput.model_validate({name: params[name] for name in ScoreInput.model_fields if name in params})
    model_dir = Path(params["model_dir"])
    model, tokenizer, device, place, load_s = load_for_calibration(model_dir, inputs.dtype, inputs.architecture,
                                                                   tag="score")
    calib = load_calibration(Path(params["calibration"]), tokenizer, inputs.calib_samples, inputs.max_length,
                             inputs.seed)
    # The effective_bits target is the strategies' business: this solve (anything from 16 bits) is discarded.
    spec = AutoQuantizeSpec(effective_bits=16, formats=inputs.formats, method=inputs.method,
                            num_calib_steps=inputs.num_calib_steps, num_score_steps=inputs.num_score_steps)
    budget = auto_batch_size(model, calib, device, algorithm="auto_quantize", full_logits=True,
                             grad=spec.method == "gradient")
    plan = calib.plan(token_budget=budget)
    batches = calib.build(plan, device)
    steps = {"num_calib_steps": plan.batches_covering(spec.num_calib_steps),
             "num_score_steps": plan.batches_covering(spec.num_score_steps)}
    if device.type == "cpu":  # ModelOpt's dynamic NVFP4 kernel is CUDA-only; the CPU one (as quantize_model)
        from runner.worker.nvfp4_cpu import install_cpu_nvfp4

        install_cpu_nvfp4()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.monotonic()
    state_path = output_dir / STATE
    result = quantize_auto(model, batches, spec.model_copy(update=steps), inputs.exclude, state_path)
    score_s = time.monotonic() - t0
    if not state_path.is_file():
        raise SystemExit(f"auto_quantize saved no search state at {state_path}")
    scores = group_scores(state_path)
    (output_dir / "scores.json").write_text(json.dumps(scores, indent=1) + "\n", encoding="utf-8")
    scored = sum(len(group) for group in plan.groups[:steps["num_score_steps"]])
    print(f"[score] {len(scores['groups'])} layer groups x {len(inputs.formats)} formats scored on {scored} samples "
          f"({steps['num_score_steps']} batches) in {score_s:.1f}s", flush=True)
    summary = {
        "load_s": round(load_s, 3), "score_s": round(score_s, 3), "placement": place.summary(),
        "scored_samples": scored, "score_batches": steps["num_score_steps"],
        "calib_batches": steps["num_calib_steps"], **plan.summary(), **calib.counts(),
        "groups": len(scores["groups"]), "most_sensitive": scores["ranking"][:10],
        "state_bytes": state_path.stat().st_size, "auto_quantize": result,
        **({"peak_gpu_bytes": torch.cuda.max_memory_allocated()} if device.type == "cuda" else {}),
    }
    return {"outputs": {"search_state": STATE, "scores": "scores.json"}, "summary": summary}


def group_scores(state_path: Path) -> dict[str, Any]:
    """Each layer group's scores by format from ModelOpt's checkpoint (`candidate_stats`), and the groups
    ranked by their score at the cheapest format (the largest loss first)."""
    import torch

    state = torch.load(state_path, map_location="cpu", weights_only=False)
    stats = state.get("candidate_stats", {}) if isinstance(state, dict) else {}
    groups: dict[str, dict[str, float]] = {}
    for name, entry in stats.items():
        formats = [str(f) for f in entry.get("formats", [])]
        values = [float(v) for v in entry.get("scores", [])]
        costs = [float(c) for c in entry.get("costs", [])]
        if len(formats) > 1 and len(values) == len(formats):  # one choice: disabled, nothing to rank
            groups[name.removesuffix(".quant_recipe")] = {"scores": dict(zip(formats, values, strict=True)),
                                                          "costs": dict(zip(formats, costs, strict=False))}

    def cheapest(group: dict[str, Any]) -> float:
        costs = group["costs"]
        if not costs:
            return max(group["scores"].values())
        return group["scores"][min(costs, key=costs.get)]

    ranking = sorted(groups, key=lambda name: cheapest(groups[name]), reverse=True)
    return {"groups": groups, "ranking": ranking}
