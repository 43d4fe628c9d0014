"""The `verify.S` step: the exported checkpoint checked for what its engine loads (the worker reads
every tensor) and by vLLM's own loader where a vLLM environment is found (runner/vllm_env)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from runner.errors import RunnerError
from runner.recipe.fixups import tensor_accounting
from runner.recipe.schema import SlurmResources
from runner.serving import engine_for
from runner.steps import ids
from runner.steps.base import StepContext, StepKind, StepResult, input_of
from runner.steps.inputs import VerifyInput
from runner.vllm_env import environment as vllm_environment

WORKER = "verify"  # runner/worker/verify.py


async def run(ctx: StepContext) -> StepResult:
    inputs = input_of(ctx, VerifyInput)
    quantized = ctx.input_record(ids.quantize(ctx.strategy)).get("summary", {})
    checkpoint = ctx.input(ids.export(ctx.strategy), "checkpoint")
    params = {
        "exclude": inputs.exclude, "rules": engine_for(inputs.engine).verify_rules.to_params(),
        "checkpoint": str(checkpoint),
        "model_dir": str(ctx.input(ids.SOURCE, "model_dir")),
        # Folded AWQ scales leave per-channel factors in the weights that the decoder check must allow.
        "smoothed": bool(quantized.get("awq_fold")),
        "accounting": tensor_accounting(inputs.fixups).to_params(),
    }
    result = await ctx.run_worker(WORKER, params)
    check = await vllm_load_check(ctx, inputs, checkpoint)
    result.summary["vllm_load"] = check
    result.summary.setdefault("checks", {})["vllm_load"] = check["status"]
    if check["status"] != "pass":
        result.summary.setdefault("details", {})["vllm_load"] = check["detail"]
    result.outputs |= {name: name for name in ("vllm_load.json", "vllm_load.log") if (ctx.scratch / name).is_file()}
    ctx.log.info("vllm_load %s: %s", check["status"], check["detail"])
    if check["status"] == "fail" and engine_for(inputs.engine).runs_vllm:
        raise RunnerError(f"vLLM's own loader refuses the export: {check['detail']}")
    if check["status"] == "not_run" and inputs.vllm_loader.required:
        raise RunnerError(f"vLLM's loader check could not run (verify.vllm_loader.required): {check['detail']}")
    return result


async def vllm_load_check(ctx: StepContext, inputs: VerifyInput, checkpoint: Path) -> dict[str, Any]:
    """vLLM's own loader on the export (runner/vllm_env): pass, fail (vLLM's error or the tensors and
    parameters that did not meet) or not_run (no environment, another version, or the check itself broke:
    never scored as the checkpoint's fault). A failure is a warning where another engine serves."""
    env = inputs.vllm
    if env is None:
        return {"status": "not_run", "detail": inputs.vllm_not_run}
    try:
        found = await vllm_environment.load_check(env, [checkpoint], ctx.scratch / "vllm_load.json",
                                                  ctx.scratch / "vllm_load.log", inputs.vllm_loader.timeout_s,
                                                  language_model_only=inputs.language_model_only)
    except RuntimeError as exc:
        return {"status": "not_run", "vllm_version": env.version,
                "detail": f"the check itself failed, so nothing is known of the export: {exc} (log: vllm_load.log)"}
    return vllm_environment.verdict(found, inputs.engine, engine_for(inputs.engine).runs_vllm)


KIND = StepKind("verify", run, input=VerifyInput,
                modules=("steps/verify.py", "worker/verify.py", "vllm_env/load_check.py"),
                worker=WORKER, container_role="verify", slurm=SlurmResources())
