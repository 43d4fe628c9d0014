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
    if not probe.ok:
        raise RunnerError(f"the served candidate did not answer a first request: {probe.error}")
    return StepResult(summary={"engine": inputs.serving.serve.engine, "startup_s": round(startup_s, 2),
                               "first_answer": probe.content[:200], "prediction": prediction,
                               "server_args": server_args.args, "server_arg_notes": server_args.notes})


KIND = StepKind("serve", run, input=ServeInput, modules=("steps/serve.py", "worker/local_server.py"),
                container_role="serve", gpu=True)
