"""A scripted OpenAI-compatible chat server on loopback, for tests and benchmarks.

It answers /v1/chat/completions according to markers in the last user message, so a test can ask
for exactly the behaviour it needs from a real HTTP server:

    [tool:NAME]      call tool NAME with {"query": <prompt>}; after the tool result, answer in text
    [markdown]       answer with markdown        [think]      leak thinking into the answer
    [reasoning]      put text in reasoning_content
    [badjson]        call a tool with arguments that are not JSON
    [badargs]        call a tool without its required arguments
    [slow:S]         wait S seconds before answering
    [fail:CODE:N]    answer HTTP CODE to the first N requests for this prompt (429 adds Retry-After)
    [words:N]        answer with about N words
    [html:N]         answer the first N requests for this prompt with a 200 HTML page (a proxy's error page)
    [huge:MB]        answer with a JSON body of about MB megabytes

Streaming (`"stream": true`): the answer goes out one word a chunk, the first after `ttft_s` and
each next one `itl_s` later; with `[stall:K:S]` the gap before chunk K is S seconds. The server
logs when it actually wrote each chunk (`stream_log`), so a client's timings can be checked
against what really happened rather than against what was asked.

Every request also waits `delay_s`, and at most `max_concurrency` are served at once (others queue),
like a real server with a fixed number of slots. It counts requests and the peak in flight.

With `metrics` set (Prometheus counter name -> value), it serves GET /metrics in Prometheus' text format,
each counter as two labelled series (engine 0 and 1) that sum to its value, and every chat request adds
`metrics_per_request` to the counters (a scripted vLLM speculating: drafts proposed and accepted).
Without, /metrics answers 404, like a server that exposes none.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

MARKER = re.compile(r"\[(\w+)(?::([^\]:]+))?(?::([^\]]+))?\]")


@dataclass
class ScriptedServer:
    model: str = "scripted-teacher"
    delay_s: float = 0.0
    max_concurrency: int = 1000
    requests: int = 0
    in_flight: int = 0
    peak_in_flight: int = 0
    ttft_s: float = 0.0
    itl_s: float = 0.0
    always: str = ""  # markers every prompt also carries: a server that always behaves so (e.g. "[markdown]")
    stream_log: list[dict[str, Any]] = field(default_factory=list)
    metrics: dict[str, float] | None = None
    metrics_per_request: dict[str, float] = field(default_factory=dict)
    failures_left: Counter[str] = field(default_factory=Counter)
    port: int = 0
    _runner: web.AppRunner | None = None
    _slots: asyncio.Semaphore | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    async def start(self) -> ScriptedServer:
        app = web.Application()
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/health", self._health)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_post("/v1/chat/completions", self._chat)
        self._slots = asyncio.Semaphore(self.max_concurrency)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        sock = socket.socket()
        sock.bind(("127.0.0.1", self.port))
        self.port = sock.getsockname()[1]
        site = web.SockSite(self._runner, sock)
        await site.start()
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": self.model, "object": "model"}]})

    async def _health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def _metrics(self, request: web.Request) -> web.Response:
        if self.metrics is None:
            return web.Response(status=404, text="404: Not Found")
        lines = []
        for name, value in self.metrics.items():
            lines += [f"# HELP {name} scripted counter", f"# TYPE {name} counter"]
            first = float(int(value / 2))
            lines += [f'{name}{{engine="0",model_name="{self.model}"}} {first}',
                      f'{name}{{engine="1",model_name="{self.model}"}} {value - first}']
        return web.Response(text="\n".join(lines) + "\n", content_type="text/plain")

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        received = time.perf_counter()
        body = await request.json()
        self.requests += 1
        if self.metrics is not None:
            for name, step in self.metrics_per_request.items():
                self.metrics[name] = self.metrics.get(name, 0.0) + step
        assert self._slots is not None
        async with self._slots:
            self.in_flight += 1
            self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
            try:
                if self.delay_s:
                    await asyncio.sleep(self.delay_s)
                response = await self._answer(body)
                if body.get("stream") and response.status == 200:
                    return await self._stream(request, body, json.loads(response.text), received)
                return response
            finally:
                self.in_flight -= 1

    async def _answer(self, body: dict[str, Any]) -> web.Response:
        messages = body.get("messages") or []
        last_user = next((m for m in reversed(messages) if m.get("role") == "user"), {"content": ""})
        prompt = str(last_user.get("content") or "") + self.always
        markers = {m.group(1): (m.group(2), m.group(3)) for m in MARKER.finditer(prompt)}
        if "fail" in markers:
            code, times = markers["fail"]
            key = f"{prompt}|{len(messages)}"
            if key not in self.failures_left:
                self.failures_left[key] = int(times or 1)
            if self.failures_left[key] > 0:
                self.failures_left[key] -= 1
                headers = {"Retry-After": "0.05"} if code == "429" else {}
                return web.json_response({"error": {"message": f"scripted {code}"}}, status=int(code),
                                         headers=headers)
        if "html" in markers:
            key = f"html|{prompt}|{len(messages)}"
            if key not in self.failures_left:
                self.failures_left[key] = int(markers["html"][0] or 1)
            if self.failures_left[key] > 0:
                self.failures_left[key] -= 1
                return web.Response(text="<html><body><h1>502 Bad Gateway</h1></body></html>",
                                    content_type="text/html")
        if "huge" in markers:
            padding = "x" * int(float(markers["huge"][0] or 20) * 1024 * 1024)
            return web.json_response({"choices": [{"message": {"role": "assistant", "content": padding}}]})
        if "slow" in markers:
            await asyncio.sleep(float(markers["slow"][0] or 1))
        clean = MARKER.sub("", prompt).strip()
        after_tool = bool(messages) and messages[-1].get("role") == "tool"
        message: dict[str, Any] = {"role": "assistant", "content": None}
        if "tool" in markers and not after_tool:
            message["tool_calls"] = [_call(markers["tool"][0] or "search", json.dumps({"query": clean}))]
        elif "badjson" in markers and not after_tool:
            message["tool_calls"] = [_call(markers["badjson"][0] or "search_memory", "{query: not json")]
        elif "badargs" in markers and not after_tool:
            message["tool_calls"] = [_call(markers["badargs"][0] or "search_memory", json.dumps({"person": 3}))]
        elif "markdown" in markers:
            message["content"] = f"**Sure!** Here is what I know about {clean}:\n- one point\n- another point"
        elif "think" in markers:
            message["content"] = f"<think>The user wants to know about {clean}.</think> It is fine."
        else:
            words = int(markers.get("words", ("12", None))[0] or 12)
            base = f"Here is a short plain answer about {clean}." if not after_tool else \
                f"I looked it up: {messages[-1].get('content')}."
            filler = " It sounds good to me." * max(0, (words - len(base.split())) // 5)
            message["content"] = base + filler
        if "reasoning" in markers:
            message["reasoning_content"] = "First I consider the question."
        return web.json_response({
            "id": f"chatcmpl-{self.requests}", "object": "chat.completion", "model": body.get("model"),
            "choices": [{"index": 0, "message": message,
                         "finish_reason": "tool_calls" if message.get("tool_calls") else "stop"}],
        })


    async def _stream(self, request: web.Request, body: dict[str, Any], answer: dict[str, Any],
                      received: float) -> web.StreamResponse:
        message = answer["choices"][0]["message"]
        prompt = next((str(m.get("content")) for m in reversed(body.get("messages") or [])
                       if m.get("role") == "user"), "")
        stalls = {int(m.group(2)): float(m.group(3)) for m in MARKER.finditer(prompt) if m.group(1) == "stall"}
        pieces: list[dict[str, Any]] = [{"role": "assistant"}]
        if message.get("reasoning_content"):
            pieces.append({"reasoning_content": message["reasoning_content"]})
        words = (message.get("content") or "").split(" ")
        pieces += [{"content": (" " if i else "") + w} for i, w in enumerate(words) if message.get("content")]
        for i, call in enumerate(message.get("tool_calls") or []):
            pieces.append({"tool_calls": [{"index": i, "id": call["id"], "type": "function",
                                           "function": call["function"]}]})
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        sent: list[float] = []
        start = time.perf_counter()
        for k, delta in enumerate(pieces):
            if k == 1:
                await _sleep_until(start + self.ttft_s)
            elif k > 1:
                await _sleep_until(sent[-1] + stalls.get(k - 1, self.itl_s))
            chunk = {"id": answer["id"], "object": "chat.completion.chunk", "model": answer["model"],
                     "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}
            await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
            if k > 0:
                sent.append(time.perf_counter())
        usage = {"prompt_tokens": sum(len(str(m.get("content") or "").split()) for m in body.get("messages") or []),
                 "completion_tokens": len(pieces) - 1}
        await resp.write(f"data: {json.dumps({'choices': [], 'usage': usage})}\n\ndata: [DONE]\n\n".encode())
        await resp.write_eof()
        self.stream_log.append({"received": received, "sent": sent})
        return resp


async def _sleep_until(deadline: float) -> None:
    delay = deadline - time.perf_counter()
    if delay > 0:
        await asyncio.sleep(delay)


def _call(name: str, arguments: str) -> dict[str, Any]:
    return {"id": f"call_{abs(hash((name, arguments))) % 10**8}", "type": "function",
            "function": {"name": name, "arguments": arguments}}


class ServerThread:
    """Run a ScriptedServer on its own event loop in a background thread (for code that runs its own loop)."""

    def __init__(self, server: ScriptedServer):
        import threading

        self.server = server
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    def __enter__(self) -> ScriptedServer:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.server.start(), self._loop).result(timeout=10)
        return self.server

    def __exit__(self, *exc: object) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
