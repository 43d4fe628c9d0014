"""The local serving engine: the export's real numerics, and the OpenAI API as the official `openai`
client uses it.

Numerics: a tiny random Llama is quantized by ModelOpt on the CPU (the project's CPU NVFP4 path) and
exported; the engine's layer (QuantizedLinear, built from the export alone) must give ModelOpt's own
fake-quant layer output for the same input: relative RMS difference under 3 % (the decoded weight
and ModelOpt's fake-quantized weight can differ by one E2M1 step where bf16 rounds a tie; the
activation quantization is the same arithmetic), and closer to ModelOpt than the weight-only view.

API: the engine runs as a real server on loopback with the same tiny model and a chat template
with a tools section; what it answers is random text, so the tests assert mechanics only: every
error as OpenAI-style JSON naming the field, prompts beyond the context refused, a disconnected
client's generation stopped, tool calls read as vLLM's hermes parser reads them.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

pytest.importorskip("modelopt")
openai = pytest.importorskip("openai")

from conftest import REPO  # noqa: E402
from runner.serving.server import free_port  # noqa: E402

LAYER = "model.layers.1.mlp.down_proj"
TOOLS_TEMPLATE = (
    "{% if tools %}<|im_start|>system\nTools: {{ tools | tojson }}<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
    "{% if m.tool_calls %}{% for c in m.tool_calls %}<tool_call>{{ c.function | tojson }}</tool_call>{% endfor %}"
    "{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def tiny_export(folder: Path, tokenizer_dir: Path, preset: str, probe: torch.Tensor | None = None
                ) -> torch.Tensor | None:
    """A tiny random Llama quantized by ModelOpt with `preset` and exported to `folder`; returns
    ModelOpt's fake-quant output of LAYER for `probe` (computed before the export packs the weights)."""
    import modelopt.torch.quantization as mtq
    from modelopt.torch.export import export_hf_checkpoint
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from runner.worker.nvfp4_cpu import install_cpu_nvfp4

    install_cpu_nvfp4()
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                         architectures=["LlamaForCausalLM"])
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    cfg = copy.deepcopy(getattr(mtq, preset))
    cfg["quant_cfg"] = [*cfg["quant_cfg"], {"quantizer_name": "*lm_head*", "enable": False}]
    ids = torch.randint(0, 500, (4, 48))
    mtq.quantize(model, cfg, forward_loop=lambda m: m(ids))
    reference = None
    if probe is not None:
        with torch.no_grad():
            reference = model.get_submodule(LAYER)(probe)
    export_hf_checkpoint(model, export_dir=folder)
    tokenizer.chat_template = TOOLS_TEMPLATE
    tokenizer.save_pretrained(folder)
    return reference


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.parametrize(("preset", "activations"), [
    ("NVFP4_DEFAULT_CFG", "nvfp4"), ("W4A16_NVFP4_CFG", None), ("FP8_DEFAULT_CFG", "fp8")])
def test_engine_layers_compute_what_modelopt_fake_quant_computes(preset, activations, tmp_path, demo_tokenizer):
    from runner.worker.dequantize import load_dequantized, load_quantized
    from runner.worker.quantized_linear import QuantizedLinear

    torch.manual_seed(1)
    x = torch.randn(3, 7, 256, dtype=torch.bfloat16) * 0.5  # down_proj's input: intermediate_size 256
    reference = tiny_export(tmp_path / "export", demo_tokenizer, preset, probe=x)
    engine, numerics = load_quantized(tmp_path / "export")
    layer = engine.get_submodule(LAYER)
    assert isinstance(layer, QuantizedLinear) and (layer.quant.kind if layer.quant else None) == activations
    with torch.no_grad():
        ours = layer(x)
        weight_only = load_dequantized(tmp_path / "export").get_submodule(LAYER)(x)
    assert relative(ours, reference) < 0.03, (preset, relative(ours, reference))
    if activations:  # the activation quantization is what the weight-only view misses
        assert relative(ours, reference) < 0.5 * relative(weight_only, reference)
        assert "activations" in numerics


def server_log(folder: Path, client: openai.OpenAI) -> Path:
    """Where the server on client's port writes its log."""
    return folder.parent / f"server-{client.base_url.port}.log"


def start_server(folder: Path, threads: int) -> tuple[subprocess.Popen, openai.OpenAI]:
    """The engine as a real server on a free loopback port (its log: server_log), and an openai
    client once it answers."""
    port = free_port()
    with (folder.parent / f"server-{port}.log").open("w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "runner.worker.local_server", "--model", str(folder),
                                 "--port", str(port), "--name", "tiny", "--threads", str(threads)], cwd=REPO,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=300)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            client.models.list()
            break
        except openai.APIConnectionError:
            time.sleep(0.5)
    return proc, client


@pytest.fixture(scope="module")
def server(tmp_path_factory, demo_tokenizer):
    folder = tmp_path_factory.mktemp("engine") / "export"
    tiny_export(folder, demo_tokenizer, "NVFP4_DEFAULT_CFG")
    proc, client = start_server(folder, threads=2)
    yield client, proc, folder
    proc.terminate()
    proc.wait(timeout=30)


HELLO = [{"role": "user", "content": "hello"}]
LONG = 2000  # tokens: within the tiny model's context (2048), longer than any test waits for


def test_models_and_unknown_model_names(server):
    client, _, _ = server
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="gpt-4o", messages=HELLO, max_tokens=2)
    assert caught.value.body["code"] == "model_not_found"


def test_bad_requests_are_4xx_json_errors_and_leave_the_server_serving(server):
    client, _, _ = server
    for kwargs in ({"messages": [], "max_tokens": 2}, {"messages": HELLO, "max_tokens": -5},
                   {"messages": HELLO, "max_tokens": 0}, {"messages": HELLO, "n": 2},
                   {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
                   {"messages": HELLO, "stop": ["a", "b", "c", "d", "e"]}):
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(model="tiny", **kwargs)
        assert caught.value.status_code == 400 and caught.value.body["message"], kwargs
    # out of OpenAI's ranges, or a message OpenAI refuses: a 400 naming the field
    for param, kwargs in (
            ("top_p", {"top_p": 2}), ("top_p", {"top_p": -0.1}), ("temperature", {"temperature": 2.5}),
            ("presence_penalty", {"presence_penalty": 2.5}), ("frequency_penalty", {"frequency_penalty": -3}),
            ("temperature", {"temperature": -0.5}), ("n", {"n": 0}), ("n", {"n": 2}),
            ("max_tokens", {"max_tokens": 1.5}), ("max_tokens", {"max_tokens": 0}),
            ("max_completion_tokens", {"max_completion_tokens": 0}), ("stream", {"stream": "yes"}),
            ("messages", {"messages": []}), ("messages[0].role", {"messages": [{"role": "robot", "content": "hi"}]}),
            ("messages[0].content", {"messages": [{"role": "user"}]}),
            ("messages[0].content", {"messages": [{"role": "user", "content": None}]}),
            ("messages[1].content", {"messages": [*HELLO, {"role": "assistant"}]}),
            ("messages[0].content", {"messages": [{"role": "system"}, *HELLO]}),
            ("messages[2].tool_call_id", {"messages": [*HELLO, {"role": "assistant", "content": "x"},
                                                       {"role": "tool", "content": "{}"}]})):
        kwargs = {"messages": HELLO, "max_tokens": 2, **kwargs}
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(model="tiny", **kwargs)
        assert caught.value.body["param"] == param and caught.value.body["type"] == "invalid_request_error", kwargs
    edges = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=2, temperature=2, top_p=0.5,
                                           presence_penalty=-2, frequency_penalty=2)
    assert edges.usage.completion_tokens <= 2  # the ends of each range are accepted
    edges = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=2, temperature=1, top_p=0,
                                           presence_penalty=2, frequency_penalty=-2, n=1)
    assert edges.usage.completion_tokens <= 2
    request = urllib.request.Request(str(client.base_url) + "chat/completions", data=b"{not json",
                                     headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as raw:
        urllib.request.urlopen(request)
    assert raw.value.code == 400 and "error" in json.loads(raw.value.read())
    answer = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=3)
    assert answer.choices[0].finish_reason in ("length", "stop") and answer.usage.completion_tokens <= 3


def _raw(url: str, method: str, data: bytes | None = None) -> tuple[int, dict, dict]:
    """status, JSON body and headers of a request the openai client cannot make."""
    request = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request) as response:
            return response.status, json.loads(response.read()), dict(response.headers)
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read()), dict(error.headers)


def test_every_error_is_openai_json(server):
    client, _, _ = server
    base = str(client.base_url)  # http://127.0.0.1:PORT/v1/
    cases = {"body over 1 MiB": (413, base + "chat/completions", "POST", b"{" + b" " * 2_000_000 + b"}"),
             "unknown path": (404, base + "completions", "POST", b"{}"),
             "unknown path outside /v1": (404, base.replace("/v1/", "/nothing"), "GET", None),
             "wrong method": (405, base + "chat/completions", "GET", None)}
    for label, (status, url, method, data) in cases.items():
        code, body, headers = _raw(url, method, data)
        assert code == status and set(body["error"]) == {"message", "type", "param", "code"}, label
        assert headers["Content-Type"].startswith("application/json") and body["error"]["message"], label
    assert "1048576 bytes" in _raw(*cases["body over 1 MiB"][1:])[1]["error"]["message"]
    assert "POST /v1/chat/completions" in _raw(*cases["unknown path"][1:])[1]["error"]["message"]
    assert _raw(*cases["wrong method"][1:])[2]["Allow"] == "POST"
    assert client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=2).usage.completion_tokens <= 2


def test_a_prompt_beyond_the_context_is_refused_naming_both_lengths(server):
    client, _, folder = server
    context = json.loads((folder / "config.json").read_text())["max_position_embeddings"]
    long = [{"role": "user", "content": "hello " * (context + 50)}]
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="tiny", messages=long, max_tokens=2)
    error = caught.value.body
    prompt = int(error["message"].split(" tokens; ")[0].split()[-1])
    assert error["param"] == "messages" and error["code"] == "context_length_exceeded"
    assert f"maximum context length is {context} tokens" in error["message"] and prompt > context
    with pytest.raises(openai.BadRequestError) as caught:  # the prompt fits, prompt + max_tokens does not
        client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=context)
    assert caught.value.body["param"] == "max_tokens" and f"{context} in the completion" in caught.value.body["message"]


def test_a_client_that_disconnects_stops_its_generation(server):
    """Before: the engine generated to max_tokens for nobody while the next request waited (32.9 s
    for 600 tokens on the demo model) and /health said ok; now the generation ends at its next token,
    streamed or not, and the server's own record (/health, its log) shows where it stopped."""
    import asyncio

    import aiohttp

    client, _, folder = server
    url = str(client.base_url) + "chat/completions"
    health = str(client.base_url).replace("/v1/", "/health")
    long = {"model": "tiny", "messages": HELLO, "max_tokens": LONG, "temperature": 0}

    async def second_after_disconnect(stream: bool) -> tuple[float, dict]:
        async with aiohttp.ClientSession() as session:
            first = aiohttp.ClientSession()
            if stream:
                response = await first.post(url, json={**long, "stream": True})
                async for line in response.content:  # the first content chunk: generating now
                    if b'"content": "' in line and b'"content": ""' not in line:
                        break
                response.close()
            else:
                pending = asyncio.ensure_future(first.post(url, json=long))
                await asyncio.sleep(1.5)  # generating now
                pending.cancel()
            await first.close()
            t0 = time.monotonic()
            async with session.post(url, json={"model": "tiny", "messages": HELLO, "max_tokens": 2}) as answer:
                assert answer.status == 200
            waited = time.monotonic() - t0
            # With batching the next request no longer waits for the abandoned one to stop (it may finish
            # first): the server's record of the stop is read once it is there, within seconds.
            deadline = time.monotonic() + 20
            while True:
                async with session.get(health) as state:
                    seen = await state.json()
                if (seen["abandoned_total"] > expected and not seen["generating"]) or time.monotonic() > deadline:
                    return waited, seen
                await asyncio.sleep(0.1)

    before = json.loads(urllib.request.urlopen(health).read())["abandoned_total"]
    for n, stream in enumerate((True, False), start=1):
        expected = before + n - 1
        waited, state = asyncio.run(asyncio.wait_for(second_after_disconnect(stream), 300))
        # the server stopped the abandoned generation well short of max_tokens, and says so
        assert state["abandoned_total"] == before + n and not state["generating"], (stream, state)
        stopped = state["abandoned"][-1]
        assert stopped["max_tokens"] == LONG and stopped["generated"] < LONG, (stream, stopped)
        assert waited < 5, f"stream={stream}: the next request waited {waited:.1f} s for a disconnected client"
    logged = [line for line in server_log(folder, client).read_text().splitlines() if "client went away" in line]
    assert len(logged) == before + 2 and f"of {LONG} tokens" in logged[-1], logged


def test_finish_reason_length_stop_strings_and_text_parts(server):
    client, _, _ = server
    parts = [{"role": "user", "content": [{"type": "text", "text": "hel"}, {"type": "text", "text": "lo"}]}]
    full = client.chat.completions.create(model="tiny", messages=parts, max_tokens=24)
    plain = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=24)
    assert full.choices[0].message.content == plain.choices[0].message.content  # parts are joined text
    text = full.choices[0].message.content
    if full.usage.completion_tokens == 24:
        assert full.choices[0].finish_reason == "length"
    words = text.split()
    if len(words) >= 3:  # greedy and deterministic: the same answer again, cut where the stop string starts
        stop = words[len(words) // 2]
        cut = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=24, stop=[stop])
        assert cut.choices[0].message.content == text[:text.find(stop)].strip() or \
            cut.choices[0].message.content == text[:text.find(stop)]
        assert cut.choices[0].finish_reason == "stop"


def test_streaming_sends_usage_only_when_asked(server):
    client, _, _ = server
    chunks = list(client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=5, stream=True))
    assert all(chunk.choices for chunk in chunks)  # the canonical chunk.choices[0] loop never breaks
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks)
    plain = client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=5)
    assert text == plain.choices[0].message.content or text.strip() == (plain.choices[0].message.content or "")
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")
    with_usage = list(client.chat.completions.create(model="tiny", messages=HELLO, max_tokens=5, stream=True,
                                                     stream_options={"include_usage": True}))
    assert with_usage[-1].choices == [] and with_usage[-1].usage.completion_tokens <= 5


def test_tool_call_round_trip_and_tools_on_a_template_without_them(server, tmp_path):
    client, _, folder = server
    tools = [{"type": "function", "function": {"name": "web_search", "description": "search",
                                               "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}}}]
    history = [{"role": "user", "content": "search cats"},
               {"role": "assistant", "content": None, "tool_calls": [
                   {"id": "call_1", "type": "function", "function": {"name": "web_search", "arguments": '{"q": "cats"}'}}]},
               {"role": "tool", "tool_call_id": "call_1", "content": '{"results": ["cats are mammals"]}'}]
    answer = client.chat.completions.create(model="tiny", messages=history, tools=tools, max_tokens=4)
    assert answer.choices[0].finish_reason in ("length", "stop", "tool_calls")
    from runner.worker.local_server import ApiError, parse_request

    with pytest.raises(ApiError) as caught:
        parse_request({"messages": HELLO, "tools": tools}, "tiny", template_has_tools=False)
    assert caught.value.status == 400 and "no tools section" in caught.value.message


def test_tool_calls_returned_to_clients_are_read_as_vllms_hermes_parser_reads_them(server):
    """The engine with its token choice scripted (a given answer chosen token by token through the real
    engine loop, streamer, tokenizer and HTTP server): what a client gets for that answer, streamed or not, is what
    vLLM's hermes parser makes of it (runner/benchmark/tool_calls.py). Before: an answer whose last
    call had no </tool_call> came back as text, "called nothing"."""
    from runner.worker.local_server import LocalModel

    _, _, folder = server
    local = LocalModel(folder, "tiny", "bfloat16", threads=1)
    tools = [{"type": "function", "function": {"name": "web_search", "parameters": {"type": "object"}}}]
    call = '{"name": "web_search", "arguments": {"query": "cats"}}'
    second = '{"name": "get_time", "arguments": {"city": "Zürich"}}'
    cases = [  # answer, tools given, expected content, calls and finish_reason
        (f"Let me look.\n<tool_call>\n{call}\n", True, "Let me look.\n",
         [("web_search", '{"query": "cats"}')], "tool_calls"),  # unclosed final call (end of turn)
        (f"<tool_call>{call}</tool_call>\n<tool_call>\n  {second}", True, None,
         [("web_search", '{"query": "cats"}'), ("get_time", '{"city": "Zürich"}')], "tool_calls"),
        ("Sure.<tool_call>{oops", True, "Sure.<tool_call>{oops", [], "stop"),  # not JSON: all text
        (f"<tool_call>{call}", False, f"<tool_call>{call}", [], "stop"),  # no tools asked: no parser
    ]
    answers_match(local, tools, cases)


def test_tool_calls_are_read_with_the_qwen3_coder_parser_when_the_server_is_given_it(server):
    """The same scripted engine with --tool-call-parser qwen3_coder (what the Qwen3.5 bases give vLLM):
    XML calls come back as calls, their values typed by the request's schema, streamed or not; a bare
    <function= is held back from the stream like a <tool_call>; hermes JSON is not a call here."""
    from runner.worker.local_server import LocalModel

    _, _, folder = server
    local = LocalModel(folder, "tiny", "bfloat16", threads=1)
    local.tool_call_parser = "qwen3_coder"
    tools = [{"type": "function", "function": {"name": "web_search", "parameters": {
        "type": "object", "properties": {"query": {"type": "string"}, "count": {"type": "integer"}}}}}]
    xml = "<function=web_search>\n<parameter=query>\ncats\n</parameter>\n<parameter=count>\n3\n</parameter>\n</function>"
    cases = [
        (f"Let me look.\n<tool_call>\n{xml}\n</tool_call>", True, "Let me look.\n",
         [("web_search", '{"query": "cats", "count": 3}')], "tool_calls"),
        (f"Checking. {xml}", True, "Checking. ", [("web_search", '{"query": "cats", "count": 3}')],
         "tool_calls"),  # no <tool_call> tag: still a call, and the stream held the <function= text back
        ("<tool_call>\n<function=web_search>\n<parameter=query>\ndogs\n", True, None,
         [("web_search", '{"query": "dogs"}')], "tool_calls"),  # cut after a value: still a call
        ('<tool_call>{"name": "web_search", "arguments": {}}</tool_call>', True,
         '<tool_call>{"name": "web_search", "arguments": {}}</tool_call>', [], "stop"),  # hermes JSON: text
        (f"<tool_call>\n{xml}", False, f"<tool_call>\n{xml}", [], "stop"),  # no tools asked: no parser
    ]
    answers_match(local, tools, cases)


def answers_match(local, tools: list, cases: list) -> None:
    """Each case's answer, chosen token by token through the engine, comes back as (content, calls,
    finish_reason) to a client that streams and to one that does not."""
    import asyncio

    from aiohttp.test_utils import TestClient, TestServer

    from runner.worker.local_server import make_app

    def scripted(answer: str):
        ids_out = local.tokenizer.encode(answer, add_special_tokens=False) + [local.tokenizer.eos_token_id]

        def choose(job, logits):  # the model runs; the answer's tokens are chosen instead of its own
            return ids_out[len(job.tokens)]
        return choose

    async def ask(client, stream: bool, with_tools: bool) -> tuple[str | None, list, str]:
        body = {"model": "tiny", "messages": HELLO, "max_tokens": 200, "stream": stream,
                **({"tools": tools} if with_tools else {})}
        response = await client.post("/v1/chat/completions", json=body)
        assert response.status == 200
        if not stream:
            choice = (await response.json())["choices"][0]
            calls = [(c["function"]["name"], c["function"]["arguments"]) for c in choice["message"].get("tool_calls")
                     or []]
            return choice["message"]["content"], calls, choice["finish_reason"]
        content, calls, finish = "", [], None
        async for line in response.content:
            if line.startswith(b"data: {"):
                choice = json.loads(line[6:])["choices"][0]
                content += choice["delta"].get("content") or ""
                calls += [(c["function"]["name"], c["function"]["arguments"]) for c in choice["delta"].get("tool_calls")
                          or []]
                finish = choice["finish_reason"] or finish
        return content or None, calls, finish

    async def scenario() -> list:
        got = []
        async with TestClient(TestServer(make_app(local))) as client:
            for answer, with_tools, *_ in cases:
                local.choose = scripted(answer)
                got.append([await ask(client, stream, with_tools) for stream in (False, True)])
        return got

    results = asyncio.run(asyncio.wait_for(scenario(), 120))
    for (answer, _, content, calls, finish), answers in zip(cases, results, strict=True):
        for stream, got in zip((False, True), answers, strict=True):
            assert got == (content, calls, finish), (answer, stream, got)


def test_a_failing_generation_is_a_500_and_the_next_request_is_served(demo_tokenizer, tmp_path):
    import asyncio

    from aiohttp.test_utils import TestClient, TestServer

    from runner.worker.local_server import LocalModel, make_app

    tiny_export(tmp_path / "export", demo_tokenizer, "FP8_DEFAULT_CFG")
    local = LocalModel(tmp_path / "export", "tiny", "bfloat16", threads=2)
    real = local.forward
    calls = {"n": 0}

    def flaky(**inputs):
        calls["n"] += 1
        if calls["n"] == 2:  # the first decode step, after the prefill
            raise RuntimeError("out of memory in the middle of a generation")
        return real(**inputs)

    local.forward = flaky

    async def scenario() -> tuple[int, dict, int, int]:
        async with TestClient(TestServer(make_app(local))) as client:
            body = {"model": "tiny", "messages": HELLO, "max_tokens": 2}
            first = await client.post("/v1/chat/completions", json=body)
            error = await first.json()
            second = await client.post("/v1/chat/completions", json=body)
            health = await client.get("/health")
            return first.status, error, second.status, health.status

    status, error, next_status, health = asyncio.run(asyncio.wait_for(scenario(), 120))
    assert status == 500 and "out of memory" in error["error"]["message"]
    assert next_status == 200 and health == 200


def test_sigterm_stops_the_server_within_seconds_mid_generation(server):
    _, _, folder = server
    proc, client = start_server(folder, threads=1)
    try:
        long = threading.Thread(target=_swallow, args=(lambda: client.chat.completions.create(
            model="tiny", messages=HELLO, max_tokens=LONG),), daemon=True)
        long.start()
        time.sleep(2)  # generating now
        t0 = time.monotonic()
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
        assert time.monotonic() - t0 < 5
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def _swallow(call) -> None:
    with contextlib.suppress(Exception):  # the server goes away under it, on purpose
        call()
