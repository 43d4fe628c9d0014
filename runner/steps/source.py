"""The `source` step: make the recipe's model available as a Hugging Face directory."""

from __future__ import annotations

import asyncio

from runner.errors import RunnerError
from runner.quantization.safetensors_headers import check_files
from runner.recipe.schema import SlurmResources
from runner.steps.base import StepContext, StepKind, StepResult, input_of
from runner.steps.inputs import SourceInput

WORKER = "convert_gguf"  # runner/worker/convert_gguf.py: a GGUF file to a Hugging Face folder


async def run(ctx: StepContext) -> StepResult:
    inputs: SourceInput = input_of(ctx, SourceInput)
    source = inputs.source
    if source.kind == "local":
        if not (source.path / "config.json").is_file():
            raise RunnerError(f"model.source.path {source.path} is not a Hugging Face model directory "
                              "(no config.json); point it at the folder that holds config.json")
        problems = await asyncio.to_thread(check_files, source.path)
        if problems:
            raise RunnerError("the model's weights are not whole:\n  " + "\n  ".join(problems))
        return StepResult(outputs={"model_dir": str(source.path)}, summary={"kind": "local"})
    if source.kind == "huggingface":
        return await asyncio.to_thread(_download, source.repo, source.revision, ctx)
    # GGUF: converting needs torch and transformers, so the worker does it. It compares the converted
    # tokenizer with the GGUF's own, repairs what keeps every id and refuses the rest.
    params = {"path": str(source.path) if source.path else None, "package": source.package,
              "file": source.file, "architecture": inputs.architecture, "dtype": inputs.dtype}
    result = await ctx.run_worker(WORKER, params)
    repairs = (result.summary.get("tokenizer") or {}).get("repairs") or []
    if repairs:
        ctx.log.warning("the converted tokenizer differed from the GGUF's and was repaired (%d changes, in the "
                        "record's summary.tokenizer.repairs): %s", len(repairs), "; ".join(repairs))
    return result


def _download(repo: str, revision: str, ctx: StepContext) -> StepResult:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    ctx.log.info("downloading %s@%s (or finding it in the Hugging Face cache)", repo, revision)
    try:
        path = snapshot_download(repo_id=repo, revision=revision,
                                 allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja",
                                                 "*.py", "*.tiktoken"])
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as exc:
        # huggingface_hub's messages never carry the token; keep only the first line anyway.
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise RunnerError(f"could not get {repo}@{revision} from the Hugging Face Hub: {first}. "
                          "Download it first and use `source: {kind: local, path: ...}`, or check "
                          "the network and HF_TOKEN for gated models") from None
    return StepResult(outputs={"model_dir": path}, summary={"kind": "huggingface", "repo": repo,
                                                            "revision": revision})


# A local folder is used as it is and a Hub download runs on the host: only a GGUF source needs the worker.
KIND = StepKind("source", run, input=SourceInput, modules=("steps/source.py", "worker/convert_gguf.py"),
                worker=WORKER, container_role="quantize", slurm=SlurmResources())
