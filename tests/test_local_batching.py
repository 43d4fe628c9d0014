"""The local engine batches concurrent requests: mechanics only (the tiny models answer random text).

Each scenario holds the engine's generator thread while its requests arrive, so that they are all
queued when it is released and are decoded together (the engine's peak batch proves it); the
engine is the real one (in process, behind aiohttp's test server), with the tests' tiny models:
the NVFP4 export the server tests use, and an unquantized tiny Llama.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time

import pytest

pytest.importorskip("modelopt")

from test_local_engine import tiny_export  # noqa: E402

from conftest import build_tiny_llama  # noqa: E402

PROMPTS = ["hello", "what is two and two, in a long and careful answer?", "hi",
           "tell me about cats and dogs and birds and fish", "a", "why?", "list three colours", "bye now"]


@pytest.fixture(scope="module", params=["nvfp4", "unquantized"])
def local(request, tmp_path_factory, demo_tokenizer):
    from runner.worker.local_server import LocalModel

    folder = tmp_path_factory.mktemp(f"batching-{request.param}") / "model"
    if request.param == "nvfp4":
        tiny_export(folder, demo_tokenizer, "NVFP4_DEFAULT_CFG")
    else:
        build_tiny_llama(folder, demo_tokenizer)
    model = LocalModel(folder, "tiny", "bfloat16", threads=2, max_batch=8)
    assert model.max_batch == 8 and model.device == "cpu", model.batching
    return model


def body(prompt: str, **kwargs) -> dict:
    return {"model": "tiny", "messages": [{"role": "user", "content": prompt}], "temperature": 0, **kwargs}


async def together(local, client, requests: list) -> list:
    """Send the requests (coroutine functions of the client) while the engine is held, release it
    once all are queued: they are admitted into one batch."""
    holding, gate = threading.Event(), threading.Event()

    def hold() -> None:
        holding.set()
        gate.wait()

    local.generator.submit(hold)
    try:
        while not holding.is_set():  # the engine loop of earlier requests may still be finishing
            await asyncio.sleep(0.01)
        tasks = [asyncio.ensure_future(send(client)) for send in requests]
        deadline = time.monotonic() + 60
        while len(local.pending) < len(requests) and time.monotonic() < deadline:
            if failed := [task for task in tasks if task.done()]:  # answered while held: an error
                await failed[0]
                raise AssertionError(f"answered before its batch ran: {failed[0].result()}")
            await asyncio.sleep(0.02)
        assert len(local.pending) == len(requests)
    finally:
        gate.set()
    return await asyncio.gather(*tasks)


def ask(payload: dict):
    async def send(client) -> dict:
        response = await client.post("/v1/chat/completions", json=payload)
        answer = await response.json()
        assert response.status == 200, answer
        choice = answer["choices"][0]
        return {"content": choice["message"]["content"], "finish": choice["finish_reason"],
                "tokens": answer["usage"]["completion_tokens"]}
    return send


def stream(payload: dict):
    async def send(client) -> dict:
        response = await client.post("/v1/chat/completions", json={**payload, "stream": True})
        assert response.status == 200
        pieces, finish, done = [], None, False
        async for line in response.content:
            if line.startswith(b"data: [DONE]"):
                done = True
            elif line.startswith(b"data: {"):
                chunk = json.loads(line[6:])
                if chunk["choices"]:
                    pieces.append(chunk["choices"][0]["delta"].get("content") or "")
                    finish = chunk["choices"][0]["finish_reason"] or finish
        return {"content": "".join(pieces) or None, "finish": finish, "pieces": len([p for p in pieces if p]),
                "done": done}
    return send


def serve(local, scenario) -> object:
    from aiohttp.test_utils import TestClient, TestServer

    from runner.worker.local_server import make_app

    async def run() -> object:
        local.stopping.clear()  # the previous test server's shutdown set it
        async with TestClient(TestServer(make_app(local))) as client:
            return await scenario(client)
    return asyncio.run(asyncio.wait_for(run(), 600))


def record_tokens(local) -> dict[str, list[int]]:
    """Every chosen token, by the request's prompt (the engine's choice wrapped, not changed)."""
    seen: dict[str, list[int]] = {}
    real = local.choose

    def choose(job, logits):
        token = real(job, logits)
        seen.setdefault(job.request.messages[0]["content"], []).append(token)
        return token
    local.choose = choose
    return seen


def test_concurrent_greedy_answers_are_the_sequential_ones_token_for_token(local):
    # Prompts of different lengths (the batch's rows are padded differently), with their own
    # penalties and stop strings; one sampled request rides along.
    payloads = [body(p, max_tokens=20, **({"frequency_penalty": 1.5} if i % 3 == 1 else {}),
                     **({"stop": ["e"]} if i == 2 else {}))
                for i, p in enumerate(PROMPTS[:7])]
    sampled = body("sample me", max_tokens=20, temperature=1.0, top_p=0.9, presence_penalty=0.5)
    seen = record_tokens(local)
    try:
        alone = serve(local, lambda client: _sequential(client, payloads))
        alone_tokens = {k: list(v) for k, v in seen.items()}
        seen.clear()
        local.peak_batch = 0
        batched = serve(local, lambda client: together(local, client, [ask(p) for p in [*payloads, sampled]]))
    finally:
        del local.choose
    # all of them were decoded together (one done at its first token, by a stop string or the end
    # of text, leaves before the first decode step)
    assert local.peak_batch == sum(answer["tokens"] > 1 for answer in batched) >= 6
    assert batched[:7] == alone
    assert {k: v for k, v in seen.items() if k != "sample me"} == alone_tokens  # token for token
    assert 1 <= batched[7]["tokens"] <= 20


async def _sequential(client, payloads: list[dict]) -> list[dict]:
    return [await ask(p)(client) for p in payloads]


def test_each_request_in_a_batch_stops_at_its_own_max_tokens(local):
    limits = [1, 3, 7, 12, 20]
    sizes: list[int] = []
    real = local.forward

    def forward(**inputs):
        if "past_key_values" in inputs:  # a decode step: how many rows it carries
            sizes.append(int(inputs["input_ids"].shape[0]))
        return real(**inputs)
    local.forward = forward
    try:
        answers = serve(local, lambda client: together(local, client, [ask(body("hello", max_tokens=n))
                                                                       for n in limits]))
    finally:
        del local.forward
    for n, answer in zip(limits, answers, strict=True):
        assert answer["tokens"] == n or answer["finish"] == "stop", (n, answer)
        assert answer["tokens"] <= n and (answer["finish"] == "length") == (answer["tokens"] == n), (n, answer)
    # a request leaves the batch when it is done: the batch only shrinks, the longest ends alone
    assert sizes == sorted(sizes, reverse=True) and max(sizes) <= len(limits) - 1, sizes
    if all(a["finish"] == "length" for a in answers):  # no end-of-text token cut one short
        assert len(sizes) == max(limits) - 1 and sizes[-1] == 1, sizes  # the first token comes from the prefill
        assert sizes.count(4) == 2 and sizes.count(3) == 4 and sizes.count(2) == 5, sizes


def test_a_client_that_disconnects_leaves_its_batch_mates_answering(local):
    """Three requests decoded together; the first client goes away after its first content chunk:
    its row stops (recorded as abandoned, well short of max_tokens), the other two answer in full,
    with the answers they get alone."""
    long, others = 2000, [body(PROMPTS[1], max_tokens=30), body(PROMPTS[3], max_tokens=30)]

    async def disconnecting(client) -> str:
        response = await client.post("/v1/chat/completions", json=body("hello", max_tokens=long, stream=True))
        async for line in response.content:
            if b'"content": "' in line and b'"content": ""' not in line:
                break
        response.close()
        return "gone"

    async def scenario(client) -> tuple[list, list, dict]:
        alone = await _sequential(client, others)
        got = await together(local, client, [disconnecting, *(ask(p) for p in others)])
        for _ in range(200):  # the abandoned row leaves at the engine's next step
            state = await (await client.get("/health")).json()
            if state["abandoned_total"] > before and not state["generating"]:
                break
            await asyncio.sleep(0.05)
        return alone, got, state

    before = local.abandoned_total
    alone, got, state = serve(local, scenario)
    assert got[1:] == alone and all(a["tokens"] == 30 or a["finish"] == "stop" for a in got[1:])
    assert state["abandoned_total"] == before + 1 and not state["generating"], state
    assert state["abandoned"][-1]["max_tokens"] == long and state["abandoned"][-1]["generated"] < long / 4, state


def test_streaming_requests_batched_with_others_stream_their_own_answers(local):
    """Streamed and plain requests in one batch: each stream sends its answer in several deltas, ends
    with a finish_reason and [DONE], and its text is the plain answer to the same prompt."""
    prompts = PROMPTS[:6]
    senders = [stream(body(p, max_tokens=16)) if i % 2 == 0 else ask(body(p, max_tokens=16))
               for i, p in enumerate(prompts)]

    async def scenario(client) -> tuple[list, list]:
        alone = await _sequential(client, [body(p, max_tokens=16) for p in prompts])
        local.peak_batch = 0
        return alone, await together(local, client, senders)

    alone, got = serve(local, scenario)
    assert local.peak_batch == sum(answer["tokens"] > 1 for answer in alone)
    for i, (single, answer) in enumerate(zip(alone, got, strict=True)):
        assert answer["content"] == single["content"] and answer["finish"] == single["finish"], (i, answer, single)
        if i % 2 == 0:
            assert answer["done"] and (answer["pieces"] > 2 or single["tokens"] <= 2), answer


def test_health_reports_device_and_batching(local):
    async def scenario(client) -> dict:
        return await (await client.get("/health")).json()

    state = serve(local, scenario)
    assert state["device"] == "cpu" and state["max_batch"] == 8 and "up to 8" in state["batching"]
    assert state["queued"] == 0 and state["generating"] == 0

