"""The `local` serving engine: an OpenAI-compatible chat server for machines without vLLM.

    python -m runner.worker.local_server --model DIR --port PORT [--name NAME]

It serves an exported ModelOpt checkpoint with the export's numerics (see quantized_linear.py:
NVFP4 W4A4 with activations quantized as Blackwell kernels do, W4A16, FP8 and the mixed per-layer
forms) or an unquantized model as it is. Endpoints: GET /health, GET /v1/models, GET
/v1/models/{id}, POST /v1/chat/completions, streaming or not.

What it does with a request, as the OpenAI API documents it: `max_tokens` (or
`max_completion_tokens`, at least 1; default 256), `temperature` (0 or absent: greedy), `stop` (up to
4 strings, not included in the answer), `n` (1 only: anything else is a 400), `stream` and
`stream_options.include_usage` (the usage chunk, with an empty `choices`, only when asked), `tools`
and `tool_choice` ("auto" or "none"), assistant `tool_calls` and `role: tool` messages in the
history, text content given as a string or as a list of text parts. `finish_reason` is `length`
when max_tokens cut the answer, `tool_calls` when it holds tool calls, else `stop`. A bad request
gets a 4xx with an OpenAI-style JSON error (404 for another model's name), and `tools` on a model
whose chat template has no tools section is a 400 rather than tools silently dropped. A request
that fails while generating gets a 500 JSON error and leaves the server serving; SIGTERM stops it
within a couple of seconds, a generation in progress included.

Answers repeat: generation is greedy unless a request asks for a temperature, torch runs with a
fixed number of threads (`--threads`; the float summation order of a CPU matmul depends on it) and
deterministic algorithms, so the same checkpoint gives the same answers on the same machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

TOOL_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)
DEFAULT_THREADS = min(4, os.cpu_count() or 1)  # fixed, so answers repeat across runs on one machine
DEFAULT_MAX_TOKENS = 256
ROLES = ("system", "developer", "user", "assistant", "tool")


def make_deterministic(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    torch.set_num_interop_threads(1)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(0)


class ApiError(Exception):
    """A request the API refuses: its HTTP status and OpenAI's error fields."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def response(self) -> web.Response:
        return web.json_response({"error": {"message": self.message, "type": self.kind, "param": self.param,
                                            "code": self.code}}, status=self.status)


@dataclass
class ChatRequest:
    messages: list[dict[str, Any]]
    max_tokens: int = DEFAULT_MAX_TOKENS
    temperature: float = 0.0
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    tools: list[dict[str, Any]] | None = None
    template_kwargs: dict[str, Any] = field(default_factory=dict)


def parse_request(body: Any, served: str, template_has_tools: bool) -> ChatRequest:
    """The request as the engine runs it, or an ApiError naming the field."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    model = body.get("model")
    if model is not None and model != served:
        raise ApiError(404, f"The model `{model}` does not exist (this server serves `{served}`)", "model",
                       "model_not_found")
    request = ChatRequest(messages=parse_messages(body.get("messages")))
    limit = body.get("max_completion_tokens", body.get("max_tokens"))
    if limit is not None:
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ApiError(400, f"max_tokens must be an integer of at least 1, got {limit!r}", "max_tokens")
        request.max_tokens = limit
    n = body.get("n")
    if n not in (None, 1):
        raise ApiError(400, f"n={n!r}: this server generates one choice a request (n must be 1)", "n")
    temperature = body.get("temperature")
    if temperature is not None:
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 <= temperature <= 2:
            raise ApiError(400, f"temperature must be a number from 0 to 2, got {temperature!r}", "temperature")
        request.temperature = float(temperature)
    stop = body.get("stop")
    if stop is not None:
        stops = [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > 4:
            raise ApiError(400, "stop must be a string or a list of up to 4 non-empty strings", "stop")
        request.stop = stops
    request.stream = bool(body.get("stream"))
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise ApiError(400, "stream_options must be an object", "stream_options")
    request.include_usage = bool(options.get("include_usage")) and request.stream
    tools, choice = body.get("tools"), body.get("tool_choice")
    if choice not in (None, "auto", "none"):
        raise ApiError(400, f"tool_choice {choice!r} is not supported here (use \"auto\" or \"none\")", "tool_choice")
    if tools and choice != "none":
        if not isinstance(tools, list) or not all(isinstance(t, dict) and t.get("type") == "function"
                                                  and isinstance(t.get("function"), dict) for t in tools):
            raise ApiError(400, "tools must be a list of {type: function, function: {...}}", "tools")
        if not template_has_tools:
            raise ApiError(400, "this model's chat template has no tools section, so the tool definitions would "
                                "be dropped without the model ever seeing them; send the request without tools",
                           "tools")
        request.tools = tools
    kwargs = body.get("chat_template_kwargs") or {}
    if not isinstance(kwargs, dict):
        raise ApiError(400, "chat_template_kwargs must be an object", "chat_template_kwargs")
    request.template_kwargs = kwargs
    return request


def parse_messages(messages: Any) -> list[dict[str, Any]]:
    """Messages in the shape chat templates read: text content as a string, tool-call arguments as
    objects (the API sends them as JSON strings)."""
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages must be a non-empty list", "messages")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise ApiError(400, f"messages[{i}] needs a role among {', '.join(ROLES)}", f"messages[{i}].role")
        content = message.get("content")
        if isinstance(content, list):
            texts = []
            for part in content:
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise ApiError(400, f"messages[{i}].content: only text parts are supported",
                                   f"messages[{i}].content")
                texts.append(part["text"])
            content = "".join(texts)
        elif content is not None and not isinstance(content, str):
            raise ApiError(400, f"messages[{i}].content must be a string or a list of text parts",
                           f"messages[{i}].content")
        role = "system" if message["role"] == "developer" else message["role"]
        entry: dict[str, Any] = {"role": role, "content": content or ""}
        if role == "assistant" and message.get("tool_calls"):
            entry["tool_calls"] = [_template_tool_call(call, i) for call in message["tool_calls"]]
        if role == "tool":
            entry["tool_call_id"] = message.get("tool_call_id")
            if message.get("name"):
                entry["name"] = message["name"]
        out.append(entry)
    return out


def _template_tool_call(call: Any, i: int) -> dict[str, Any]:
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise ApiError(400, f"messages[{i}].tool_calls: each call needs function.name", f"messages[{i}].tool_calls")
    arguments = function.get("arguments") or "{}"
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            raise ApiError(400, f"messages[{i}].tool_calls: arguments are not JSON", f"messages[{i}].tool_calls") \
                from None
    return {"id": call.get("id"), "type": "function", "function": {"name": function["name"], "arguments": arguments}}


class LocalModel:
    def __init__(self, model_dir: Path, name: str, dtype: str, threads: int = DEFAULT_THREADS):
        from transformers import AutoTokenizer

        self.threads = threads
        self.name = name
        # All torch work (loading included) on one long-lived thread: torch's OpenMP pool belongs to the
        # thread that first runs a parallel region, and a second pool (loading on the main thread,
        # generating on another) spins against the first: decode ran ~1.6x slower on 2 cores.
        self.generator = ThreadPoolExecutor(max_workers=1, thread_name_prefix="generate")
        self.model, self.numerics = self.generator.submit(self._load, model_dir, dtype, threads).result()
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.template_has_tools = "tools" in str(self.tokenizer.chat_template or "")
        self.lock = asyncio.Lock()
        self.stopping = threading.Event()  # set on shutdown: a generation in progress ends at its next token
        self.token = ""  # the runner's per-server token, echoed on /health

    @staticmethod
    def _load(model_dir: Path, dtype: str, threads: int) -> tuple[Any, str]:
        import torch

        from runner.worker.model_loading import load_model

        make_deterministic(threads)
        torch.set_grad_enabled(False)
        if (model_dir / "hf_quant_config.json").exists():
            from runner.worker.dequantize import load_quantized

            return load_quantized(model_dir, dtype)
        model = load_model(model_dir, getattr(torch, dtype)).eval()
        return model, f"unquantized {dtype}"

    def prompt_ids(self, request: ChatRequest) -> Any:
        try:
            return self.tokenizer.apply_chat_template(
                request.messages, tools=request.tools, add_generation_prompt=True, return_tensors="pt",
                return_dict=True, **request.template_kwargs)["input_ids"]
        except Exception as exc:  # noqa: BLE001 - a template that rejects these messages is the request's fault
            raise ApiError(400, f"the chat template cannot render these messages: {exc}", "messages") from None

    def generate(self, ids: Any, request: ChatRequest, streamer: Any) -> Any:
        from transformers import StoppingCriteria, StoppingCriteriaList

        stopping = self.stopping

        class OnShutdown(StoppingCriteria):
            def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> bool:
                return stopping.is_set()

        return self.model.generate(
            ids, attention_mask=ids.new_ones(ids.shape), max_new_tokens=request.max_tokens,
            do_sample=request.temperature > 0, temperature=request.temperature or None, top_p=None, top_k=None,
            streamer=streamer, stop_strings=request.stop or None, tokenizer=self.tokenizer if request.stop else None,
            stopping_criteria=StoppingCriteriaList([OnShutdown()]),
            pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id)


def split_tool_calls(text: str) -> tuple[str, list[dict[str, Any]]]:
    calls = []
    for i, match in enumerate(TOOL_CALL.finditer(text)):
        try:
            data = json.loads(match.group(1))
            name, args = data.get("name"), data.get("arguments", data.get("parameters", {}))
        except (ValueError, AttributeError):
            name, args = None, match.group(1)
        arguments = args if isinstance(args, str) else json.dumps(args)
        calls.append({"id": f"call_{uuid.uuid4().hex[:12]}", "type": "function", "index": i,
                      "function": {"name": name or "", "arguments": arguments}})
    return TOOL_CALL.sub("", text).strip(), calls


def cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """The text before the first stop string (which the answer leaves out), and whether one was found."""
    cuts = [i for i in (text.find(s) for s in stops) if i >= 0]
    return (text[:min(cuts)], True) if cuts else (text, False)


def make_app(local: LocalModel) -> web.Application:
    async def health(request: web.Request) -> web.Response:
        # `token` and `pid` let the runner tell this server from anything else on the port
        return web.json_response({"status": "ok", "numerics": local.numerics, "threads": local.threads,
                                  "token": local.token, "pid": os.getpid()})

    def model_card() -> dict[str, Any]:
        return {"id": local.name, "object": "model", "created": 0, "owned_by": "recipe-runner"}

    async def models(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [model_card()]})

    async def model(request: web.Request) -> web.Response:
        if request.match_info["model"] != local.name:
            return ApiError(404, f"The model `{request.match_info['model']}` does not exist", "model",
                            "model_not_found").response()
        return web.json_response(model_card())

    async def chat(request: web.Request) -> web.StreamResponse:
        try:
            body = await request.json()
        except ValueError:
            return ApiError(400, "the request body is not valid JSON").response()
        try:
            parsed = parse_request(body, local.name, local.template_has_tools)
        except ApiError as exc:
            return exc.response()
        async with local.lock:
            try:
                ids = local.prompt_ids(parsed)
            except ApiError as exc:
                return exc.response()
            return await respond(request, parsed, ids)

    async def respond(request: web.Request, parsed: ChatRequest, ids: Any) -> web.StreamResponse:
        from transformers import TextIteratorStreamer

        streamer = TextIteratorStreamer(local.tokenizer, skip_prompt=True, skip_special_tokens=True)
        holder: dict[str, Any] = {}

        def work() -> None:
            try:
                holder["out"] = local.generate(ids, parsed, streamer)
            except BaseException as exc:  # noqa: BLE001 - reported to the client, the server goes on
                holder["error"] = exc
                streamer.end()

        done = asyncio.get_running_loop().run_in_executor(local.generator, work)
        created, cid = int(time.time()), f"chatcmpl-{uuid.uuid4().hex[:16]}"
        loop = asyncio.get_running_loop()
        pieces = iter(streamer)
        text, sent = "", 0
        hold = max((len(s) for s in parsed.stop), default=1) - 1  # a stop string may span pieces
        resp: web.StreamResponse | None = None
        if parsed.stream:
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            await _send(resp, cid, created, local.name, {"role": "assistant", "content": ""})
        while True:
            piece = await loop.run_in_executor(None, next, pieces, None)
            if piece is None:
                break
            text += piece
            visible, _ = cut_at_stop(text, parsed.stop)
            # Hold text back once a tool call starts (it is sent parsed, at the end), and the tail a
            # stop string could still begin in.
            safe = len(visible) - (hold if len(visible) == len(text) else 0)
            if resp is not None and "<tool_call>" not in text and safe > sent:
                await _send(resp, cid, created, local.name, {"content": visible[sent:safe]})
                sent = safe
        await done
        if "error" in holder:
            error = ApiError(500, f"generation failed: {type(holder['error']).__name__}: {holder['error']}",
                             kind="server_error")
            if resp is None:
                return error.response()
            await resp.write(f"data: {json.dumps({'error': {'message': error.message, 'type': error.kind}})}\n\n"
                             .encode())
            await resp.write_eof()
            return resp
        out = holder["out"]
        completion_tokens = int(out.shape[-1] - ids.shape[-1])
        text, stopped = cut_at_stop(text, parsed.stop)
        content, calls = split_tool_calls(text)
        eos = local.tokenizer.eos_token_id
        ended = completion_tokens > 0 and int(out[0, -1]) in (eos if isinstance(eos, list) else [eos])
        finish = ("tool_calls" if calls else "stop" if stopped or ended or completion_tokens < parsed.max_tokens
                  else "length")
        usage = {"prompt_tokens": int(ids.shape[-1]), "completion_tokens": completion_tokens,
                 "total_tokens": int(ids.shape[-1]) + completion_tokens}
        if resp is not None:
            if not calls and len(text) > sent:
                await _send(resp, cid, created, local.name, {"content": text[sent:]})
            if calls:
                await _send(resp, cid, created, local.name, {"tool_calls": calls})
            await _send(resp, cid, created, local.name, {}, finish)
            if parsed.include_usage:
                chunk = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": local.name,
                         "choices": [], "usage": usage}
                await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
            await resp.write(b"data: [DONE]\n\n")
            await resp.write_eof()
            return resp
        message: dict[str, Any] = {"role": "assistant", "content": content or None}
        if calls:
            message["tool_calls"] = [{k: v for k, v in c.items() if k != "index"} for c in calls]
        return web.json_response({"id": cid, "object": "chat.completion", "created": created,
                                  "model": local.name, "usage": usage,
                                  "choices": [{"index": 0, "message": message, "finish_reason": finish,
                                               "logprobs": None}]})

    async def on_shutdown(app: web.Application) -> None:
        local.stopping.set()

    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/v1/models/{model}", model)
    app.router.add_post("/v1/chat/completions", chat)
    app.on_shutdown.append(on_shutdown)
    return app


async def _send(resp: web.StreamResponse, cid: str, created: int, model: str, delta: dict[str, Any],
                finish: str | None = None) -> None:
    chunk = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
             "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--name", "--served-model-name", dest="name", default="local")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--threads", type=int, default=DEFAULT_THREADS, help="torch CPU threads (fixed)")
    args = parser.parse_args()
    local = LocalModel(args.model, args.name, args.dtype, args.threads)
    local.token = os.environ.get("RECIPE_SERVER_TOKEN", "")
    print(f"[local_server] {args.model} ({local.numerics}, {local.threads} threads) on "
          f"http://{args.host}:{args.port}/v1", flush=True)
    web.run_app(make_app(local), host=args.host, port=args.port, print=None, shutdown_timeout=2)
    # A generation stops at its next token (on_shutdown), but a long prompt's prefill cannot be cut:
    # exit now rather than wait for the generation thread.
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
