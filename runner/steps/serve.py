"""The `serve.S` step: the candidate started with the recipe's engine, asked one question, stopped.

It records the start-up time, the first answer, the decode speed predicted for the target
hardware (runner/benchmark/prediction.py), and the exact server flags with the reason for each one the
engine derived from the checkpoint (Engine.server_args: e.g. vLLM's KV cache dtype, MTP speculative
decoding), so a checkpoint the engine cannot serve fails here, before any suite is asked, and the card
can repeat what was served.
"""

from __future__ import annotations

import time

import aiohttp

from runner.benchmark.harness import stream_chat
from runner.benchmark.prediction import predict_decode
from runner.errors import RunnerError
from runner.serving import engine_for, serving
from runner.steps import ids
from runner.steps.base import StepContext, StepKind, StepResult, input_of
from runner.steps.inputs import ServeInput


async def run(ctx: StepContext) -> StepResult:
    inputs: ServeInput = input_of(ctx, ServeInput)
    checkpoint = ctx.input(ids.export(ctx.strategy), "checkpoint")
    prediction = predict_decode(checkpoint, inputs.hardware)
    ctx.log.info("predicted decode on %s: %.1f tok/s (%d bytes a token)", prediction["hardware"],
                 prediction["predicted_decode_tok_s"], prediction["bytes_per_token"])
    server_args = engine_for(inputs.serving.serve.engine).server_args(inputs.serving, checkpoint)
    for note in server_args.notes:
        ctx.log.info("serve: %s", note)
    t0 = time.monotonic()
    async with serving(inputs.serving, checkpoint, ctx.run_dir, ctx.step.id, ctx.step.strategy or "model") as srv:
        startup_s = time.monotonic() - t0
        async with aiohttp.ClientSession() as session:
            probe = await stream_chat(session, srv.url, srv.model, [{"role": "user", "content": "Say hello."}], 16)
            version = await served_version(session, srv.url)
    if not probe.ok:
        raise RunnerError(f"the served candidate did not answer a first request: {probe.error}")
    return StepResult(summary={"engine": inputs.serving.serve.engine, "startup_s": round(startup_s, 2),
                               "first_answer": probe.content[:200], "prediction": prediction,
                               "server_args": server_args.args, "server_arg_notes": server_args.notes,
                               "served_with": served_with(inputs, version, server_args.args)})


async def served_version(session: aiohttp.ClientSession, url: str) -> str | None:
    """The server's own version, as vLLM's OpenAI server answers GET /version; None where it has none."""
    try:
        async with session.get(url.removesuffix("/v1") + "/version", timeout=aiohttp.ClientTimeout(total=10)) as resp:
            body = await resp.json(content_type=None) if resp.status == 200 else None
    except (aiohttp.ClientError, TimeoutError, ValueError):
        return None
    return str(body["version"]) if isinstance(body, dict) and body.get("version") else None


def served_with(inputs: ServeInput, version: str | None, args: list[str]) -> dict:
    """What the card's `validated_on` and `required_cli_args` say (runner/steps/report.py): the engine, its
    version, the container image it ran in (None outside a container) and the flags it was started with."""
    from runner.containers.plugin import load_container

    plugin = load_container(inputs.serving.container)
    return {"engine": inputs.serving.serve.engine, "version": version, "container": plugin.name,
            "image": plugin.image if plugin.runtime == "docker" else None, "args": list(args)}


KIND = StepKind("serve", run, input=ServeInput, modules=("steps/serve.py", "worker/local_server.py"),
                container_role="serve", gpu=True)
