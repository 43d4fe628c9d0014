"""The `local` serving engine: an OpenAI-compatible chat server for machines without vLLM.

    python -m runner.worker.local_server --model DIR --port PORT [--name NAME]

It serves an exported ModelOpt checkpoint with the export's numerics (see quantized_linear.py:
NVFP4 W4A4 with activations quantized as Blackwell kernels do, W4A16, FP8 and the mixed per-layer
forms) or an unquantized model as it is. Endpoints: GET /health, GET /v1/models, GET
/v1/models/{id}, POST /v1/chat/completions, streaming or not.

What it does with a request, as the OpenAI API documents it: `max_tokens` (or
`max_completion_tokens`, at least 1; default 256, cut to what the context leaves), `temperature`
(0 to 2; 0 or absent: greedy), `top_p` (0 to 1, when sampling), `presence_penalty` and
`frequency_penalty` (-2 to 2, on the tokens generated so far), `stop` (up to 4 strings, not included
in the answer), `n` (1 only), `stream` and `stream_options.include_usage` (the usage chunk, with an
empty `choices`, only when asked), `tools` and `tool_choice` ("auto" or "none"), assistant
`tool_calls` and `role: tool` messages in the history, text content given as a string or as a list
of text parts (required for system, user and tool messages; an assistant message needs content or
tool_calls). `finish_reason` is `length` when max_tokens cut the answer, `tool_calls` when it holds
tool calls, else `stop`. Tool calls are read from the answer as vLLM's `--tool-call-parser` reads them
(runner/benchmark/tool_calls.py: hermes, the default, or qwen3_coder; any other parser is refused at
start, in one line). A streamed answer holds back everything from where a call may begin (the parser's
start markers) and sends the calls parsed, at the end; the chat template renders tools the same
whatever the parser.

Every error is OpenAI-style JSON ({"error": {"message", "type", "param", "code"}}): a bad or
out-of-range field is a 400 naming it, another model's name or an unknown path a 404, a prompt
beyond the model's context (config.json max_position_embeddings) a 400 naming both lengths, a body
over 1 MiB a 413. `tools` on a model whose chat template has no tools section is a 400 rather than
tools silently dropped. A client that disconnects stops its generation at the next token (streamed
or not), so the requests queued behind it are answered; the log says so and /health shows whether a
generation is running and the ones stopped that way. A request that fails while generating gets
a 500 JSON error and leaves the server serving; SIGTERM stops it within a couple of seconds, a
generation in progress included.

Answers repeat: generation is greedy unless a request asks for a temperature, torch runs with a
fixed number of threads (`--threads`; the float summation order of a CPU matmul depends on it) and
deterministic algorithms, so the same checkpoint gives the same answers on the same machine.

Concurrent requests are decoded together (`--max-batch`, default 8; local_batching.py): each is
prefilled alone, then joins the running batch at its next step and leaves it when done, with its
own max_tokens, stop strings, sampling, penalties, stream and cancellation. On the CPU a greedy
answer is the same token for token whatever it is batched with (bench/local_engine_throughput.py,
tests/test_local_batching.py). `--device auto` (the default) runs on the first CUDA GPU when torch
sees one, else the CPU; /health reports the device, the batching and the most requests decoded
together so far (peak_batch).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import threading
import time
import uuid
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from runner.benchmark.tool_calls import (
    DEFAULT_PARSER,
    END,
    START,
    SUPPORTED_PARSERS,
    call_start,
    parse_tool_calls,
    partial_start,
    unsupported_parser,
)
from runner.worker.local_batching import ROWS, Batch, Job, choose_token, stop_window, use_row_attention

DEFAULT_THREADS = min(4, os.cpu_count() or 1)  # fixed, so answers repeat across runs on one machine
DEFAULT_MAX_TOKENS = 256
DEFAULT_MAX_BATCH = 8  # requests decoded together (bench/local_engine_throughput.py measures the gain)
ROLES = ("system", "developer", "user", "assistant", "tool")
CLIENT_POLL_S = 0.5  # how often a request waiting for its first token checks that its client is still there
MAX_BODY = 1024 * 1024  # bytes of a request body (aiohttp's default, made explicit for the error message)
ENDPOINTS = "GET /health, GET /v1/models, GET /v1/models/{id}, POST /v1/chat/completions"


def make_deterministic(threads: int, device: str = "cpu") -> None:
    import torch

    if device.startswith("cuda"):  # cuBLAS refuses deterministic mode without a fixed workspace
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.set_num_threads(threads)
    if torch.get_num_interop_threads() != 1:  # settable once a process: a second model in one process keeps it
        torch.set_num_interop_threads(1)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(0)


class ApiError(Exception):
    """A request the API refuses: its HTTP status and OpenAI's error fields."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict[str, Any]:
        return {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}

    def response(self) -> web.Response:
        return web.json_response({"error": self.body()}, status=self.status)


@dataclass
class ChatRequest:
    messages: list[dict[str, Any]]
    max_tokens: int = DEFAULT_MAX_TOKENS
    max_tokens_given: bool = False  # False: the default, cut to what the context leaves
    temperature: float = 0.0
    top_p: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
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
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    limit = body.get(key)
    if limit is not None:
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ApiError(400, f"{key} must be an integer of at least 1, got {limit!r}", key)
        request.max_tokens, request.max_tokens_given = limit, True
    n = body.get("n")
    if n is not None:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ApiError(400, f"n must be an integer of at least 1, got {n!r}", "n")
        if n != 1:
            raise ApiError(400, f"n={n}: this server generates one choice a request (n must be 1)", "n")
    request.temperature = _number(body, "temperature", 0, 2, request.temperature)
    request.top_p = _number(body, "top_p", 0, 1, request.top_p)
    request.presence_penalty = _number(body, "presence_penalty", -2, 2, request.presence_penalty)
    request.frequency_penalty = _number(body, "frequency_penalty", -2, 2, request.frequency_penalty)
    stop = body.get("stop")
    if stop is not None:
        stops = [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops) or len(stops) > 4:
            raise ApiError(400, "stop must be a string or a list of up to 4 non-empty strings", "stop")
        request.stop = stops
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise ApiError(400, f"stream must be true or false, got {stream!r}", "stream")
    request.stream = bool(stream)
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


def _number(body: dict[str, Any], key: str, low: float, high: float, default: float) -> float:
    """body[key] as a float within [low, high] (OpenAI's ranges), the default when absent, else a 400."""
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise ApiError(400, f"{key} must be a number from {low} to {high}, got {value!r}", key)
    return float(value)


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
        if content is None and not (role == "assistant" and message.get("tool_calls")):
            needs = "content or tool_calls" if role == "assistant" else "content"
            raise ApiError(400, f"messages[{i}] (role {message['role']}) needs {needs}", f"messages[{i}].content")
        entry: dict[str, Any] = {"role": role, "content": content or ""}
        if role == "assistant" and message.get("tool_calls"):
            if not isinstance(message["tool_calls"], list):
                raise ApiError(400, f"messages[{i}].tool_calls must be a list", f"messages[{i}].tool_calls")
            entry["tool_calls"] = [_template_tool_call(call, i) for call in message["tool_calls"]]
        if role == "tool":
            if not isinstance(message.get("tool_call_id"), str):
                raise ApiError(400, f"messages[{i}] (role tool) needs the tool_call_id it answers",
                               f"messages[{i}].tool_call_id")
            entry["tool_call_id"] = message["tool_call_id"]
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
    def __init__(self, model_dir: Path, name: str, dtype: str, threads: int = DEFAULT_THREADS,
                 max_batch: int = DEFAULT_MAX_BATCH, device: str = "auto"):
        from transformers import AutoTokenizer

        self.threads = threads
        self.name = name
        self.device = resolve_device(device)
        # All torch work (loading included) on one long-lived thread: torch's OpenMP pool belongs to the
        # thread that first runs a parallel region, and a second pool (loading on the main thread,
        # generating on another) spins against the first: decode ran ~1.6x slower on 2 cores.
        self.generator = ThreadPoolExecutor(max_workers=1, thread_name_prefix="generate")
        self.model, self.numerics, unbatchable = self.generator.submit(
            self._load, model_dir, dtype, threads, self.device).result()
        self.context = context_length(self.model)
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.template_has_tools = "tools" in str(self.tokenizer.chat_template or "")
        self.eos = eos_ids(self.model, self.tokenizer)
        # A model whose cache cannot be left-padded (sliding windows, linear attention) decodes one
        # request at a time; /health says why.
        self.max_batch = 1 if unbatchable else max(1, max_batch)
        self.batching = unbatchable or f"up to {self.max_batch} requests decoded together"
        self.stopping = threading.Event()  # set on shutdown: a generation in progress ends at its next token
        self.token = ""  # the runner's per-server token, echoed on /health
        self.tool_call_parser = DEFAULT_PARSER  # how tool calls are read from answers (--tool-call-parser)
        self.pending: deque[Job] = deque()  # submitted, not yet prefilled (guarded by queue_lock)
        self.queue_lock = threading.Lock()
        self.running = False  # the engine loop is on the generator thread (guarded by queue_lock)
        self.batch = Batch()  # only the generator thread touches it
        # What the engine is doing, on /health and in the log, so a generation for a client that went
        # away can be seen to stop (rather than inferred from how long the next request waited)
        self.abandoned: list[dict[str, int]] = []  # the last generations stopped because their client went away
        self.abandoned_total = 0
        self.peak_batch = 0  # the most requests decoded together so far (on /health: batching seen to happen)

    @property
    def generating(self) -> int:
        """Requests being decoded now. A job is done before its client hears of it, while the batch drops it
        only after the step: counting rows would show a finished request to a /health read in between."""
        return sum(not job.done for job in list(self.batch.jobs))

    def note_abandoned(self, generated: int, max_tokens: int) -> None:
        self.abandoned = [*self.abandoned[-9:], {"generated": generated, "max_tokens": max_tokens}]
        self.abandoned_total += 1
        print(f"[local_server] client went away: generation stopped after {generated} of {max_tokens} tokens",
              flush=True)

    @staticmethod
    def _load(model_dir: Path, dtype: str, threads: int, device: str = "cpu") -> tuple[Any, str, str | None]:
        """The model on `device`, its numerics in words, and why its requests cannot be batched (None: they can)."""
        import torch

        from runner.worker.model_loading import load_model

        make_deterministic(threads, device)
        torch.set_grad_enabled(False)
        if (model_dir / "hf_quant_config.json").exists():
            from runner.worker.dequantize import load_quantized

            model, numerics = load_quantized(model_dir, dtype)
        else:
            model, numerics = load_model(model_dir, getattr(torch, dtype)).eval(), f"unquantized {dtype}"
        model.to(device)  # QuantizedLinear's weight, scales and global amax are parameters and buffers: they move
        probe = model(torch.tensor([[0, 1]], device=device), use_cache=True).past_key_values
        return model, numerics, use_row_attention(model, probe)

    def prompt_ids(self, request: ChatRequest) -> Any:
        try:
            return self.tokenizer.apply_chat_template(
                request.messages, tools=request.tools, add_generation_prompt=True, return_tensors="pt",
                return_dict=True, **request.template_kwargs)["input_ids"]
        except Exception as exc:  # noqa: BLE001 - a template that rejects these messages is the request's fault
            raise ApiError(400, f"the chat template cannot render these messages: {exc}", "messages") from None

    def fit_context(self, prompt: int, request: ChatRequest) -> None:
        """Refuse a prompt the context cannot hold (and an explicit max_tokens beyond what it leaves), as
        vLLM does; cut the default max_tokens to what it leaves."""
        if self.context is None:
            return
        if prompt >= self.context:
            raise ApiError(400, f"This model's maximum context length is {self.context} tokens, but the messages "
                                f"have {prompt} tokens; shorten the messages", "messages", "context_length_exceeded")
        room = self.context - prompt
        if request.max_tokens > room:
            if request.max_tokens_given:
                raise ApiError(400, f"This model's maximum context length is {self.context} tokens, but "
                                    f"{prompt + request.max_tokens} were requested ({prompt} in the messages, "
                                    f"{request.max_tokens} in the completion); lower max_tokens to {room} or "
                                    "shorten the messages", "max_tokens", "context_length_exceeded")
            request.max_tokens = room

    def submit(self, job: Job) -> None:
        """Queue a job (from any thread); the engine loop runs on the generator thread while there is work."""
        with self.queue_lock:
            self.pending.append(job)
            if self.running:
                return
            self.running = True
        self.generator.submit(self._serve)

    def _serve(self) -> None:
        """The engine loop: admit queued jobs while the batch has room, then one decode step for the batch."""
        while True:
            with self.queue_lock:
                room = self.max_batch - len(self.batch)
                admitted = [self.pending.popleft() for _ in range(min(room, len(self.pending)))]
                if not admitted and not self.batch.jobs:
                    self.running = False
                    return
            try:
                for job in admitted:
                    self._admit(job)
                if self.batch.jobs:
                    self._step()
            except Exception as exc:  # noqa: BLE001 - a fault in the engine's own bookkeeping fails these requests, not the server
                for job in [*admitted, *self.batch.jobs]:
                    if not job.done:
                        job.error = exc
                        self._finish(job)
                self.batch.keep([])

    def forward(self, **inputs: Any) -> Any:
        """One forward pass of the model (a seam for tests that make it fail)."""
        return self.model(**inputs, use_cache=True)

    def _admit(self, job: Job) -> None:
        """Prefill a job alone and choose its first token; it joins the batch unless already done."""
        if job.cancel.is_set() or self.stopping.is_set():
            print("[local_server] client went away while queued: nothing generated", flush=True)
            return self._finish(job)
        try:
            job.streamer.put(job.ids)  # the prompt, which the streamer skips
            out = self.forward(input_ids=job.ids.to(self.device), logits_to_keep=1)
            job.length = job.prompt_len
            logits = out.logits[:, -1].float().cpu()
        except Exception as exc:  # noqa: BLE001 - this request's failure, answered as a 500
            job.error = exc
            return self._finish(job)
        if self._take(job, self.choose(job, logits[0])):
            self.batch.add(job, out.past_key_values)

    def _step(self) -> None:
        """Every row's last token through the model at its own position; each row's next token."""
        import torch

        batch = self.batch
        gone = [i for i, job in enumerate(batch.jobs) if job.cancel.is_set() or self.stopping.is_set()]
        if gone:
            for i in gone:
                self._finish(batch.jobs[i])
            batch.keep([i for i in range(len(batch)) if i not in gone])
            if not batch.jobs:
                return
        self.peak_batch = max(self.peak_batch, len(batch))
        ROWS.valid = [job.length + 1 for job in batch.jobs]  # keys each row attends to, this step's included
        inputs = {"input_ids": torch.tensor([[job.tokens[-1]] for job in batch.jobs], device=self.device)}
        if len(batch) > 1:  # rows at their own positions; alone, the model's own count (the cache's length) is it
            inputs["position_ids"] = torch.tensor([[job.length] for job in batch.jobs], device=self.device)
        try:
            out = self.forward(**inputs, past_key_values=batch.cache)
            logits = out.logits[:, -1].float().cpu()
        except Exception as exc:  # noqa: BLE001 - the batch's requests are answered with a 500; the server goes on
            for job in batch.jobs:
                job.error = exc
                self._finish(job)
            batch.keep([])
            return
        finally:
            ROWS.valid = None
        keep = []
        for i, job in enumerate(batch.jobs):
            job.length += 1
            if self._take(job, self.choose(job, logits[i])):
                keep.append(i)
        batch.keep(keep)

    def choose(self, job: Job, logits: Any) -> int:
        """The job's next token from its row of logits (a seam for tests that script the answer)."""
        return choose_token(logits, job.request, job.tokens)

    def _take(self, job: Job, token: int) -> bool:
        """Append and stream a chosen token; True while the job goes on, else it is finished."""
        import torch

        job.tokens.append(token)
        job.streamer.put(torch.tensor([token]))
        request = job.request
        done = token in self.eos or len(job.tokens) >= request.max_tokens
        if not done and request.stop:
            tail = self.tokenizer.decode(job.tokens[-stop_window(request.stop):])
            done = any(stop in tail for stop in request.stop)
        if done:
            self._finish(job)
        return not done

    def _finish(self, job: Job) -> None:
        job.done = True
        if job.cancel.is_set() and job.tokens and not self.stopping.is_set():
            self.note_abandoned(len(job.tokens), job.request.max_tokens)
        job.streamer.end()
        job.finished()


def resolve_device(device: str) -> str:
    """auto: the first CUDA GPU when torch sees one, else the CPU."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"[local_server] --device {device}: torch sees no CUDA GPU")
    return device


def eos_ids(model: Any, tokenizer: Any) -> set[int]:
    """The tokens that end an answer: the generation config's (as generate stops) and the tokenizer's."""
    ids: set[int] = set()
    for value in (getattr(getattr(model, "generation_config", None), "eos_token_id", None), tokenizer.eos_token_id):
        ids.update(value if isinstance(value, list) else [] if value is None else [value])
    return ids


def context_length(model: Any) -> int | None:
    """The model's context in tokens (config max_position_embeddings, or its text config's); None if unknown."""
    config = getattr(model, "config", None)
    for cfg in (config, getattr(config, "text_config", None)):
        value = getattr(cfg, "max_position_embeddings", None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def make_streamer(tokenizer: Any, keep_tool_tags: bool, sink: Any) -> Any:
    """A streamer that passes the decoded text of the generated tokens to `sink` (None at the end),
    special tokens left out, except that a request with tools keeps <tool_call> tags its tokenizer
    marks special (vLLM's hermes parser decodes them too)."""
    import torch
    from transformers import TextStreamer

    tags = {i for i, t in tokenizer.added_tokens_decoder.items() if str(t) in (START, END)}
    special = {i for i, t in tokenizer.added_tokens_decoder.items() if t.special} | set(tokenizer.all_special_ids)
    keep = keep_tool_tags and bool(tags & special)
    skip = torch.tensor(sorted(special - tags)) if keep else None

    class Streamer(TextStreamer):
        def put(self, value: Any) -> None:
            if skip is not None and not (self.skip_prompt and self.next_tokens_are_prompt):
                value = value[~torch.isin(value, skip)]
            super().put(value)

        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            if text:
                sink(text)
            if stream_end:
                sink(None)

    return Streamer(tokenizer, skip_prompt=True, skip_special_tokens=not keep)


def cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """The text before the first stop string (which the answer leaves out), and whether one was found."""
    cuts = [i for i in (text.find(s) for s in stops) if i >= 0]
    return (text[:min(cuts)], True) if cuts else (text, False)


def client_gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


def http_error(exc: web.HTTPException, request: web.Request) -> web.Response:
    """aiohttp's own refusals (unknown path, method, body size) as OpenAI-style JSON errors."""
    if exc.status == 404:
        error = ApiError(404, f"Invalid URL ({request.method} {request.path}): this server answers {ENDPOINTS}",
                         code="unknown_url")
    elif exc.status == 405:
        allowed = ", ".join(sorted(getattr(exc, "allowed_methods", ()) or ()))
        error = ApiError(405, f"{request.method} is not allowed on {request.path} (allowed: {allowed})",
                         code="method_not_allowed")
    elif exc.status == 413:
        error = ApiError(413, f"the request body is larger than this server's limit of {MAX_BODY} bytes "
                              f"({MAX_BODY // 1024} KiB)", code="request_too_large")
    else:
        error = ApiError(exc.status, exc.reason or exc.text or f"HTTP {exc.status}")
    response = error.response()
    if "Allow" in exc.headers:
        response.headers["Allow"] = exc.headers["Allow"]
    return response


@web.middleware
async def json_errors(request: web.Request, handler: Any) -> web.StreamResponse:
    """Every error as OpenAI-style JSON, aiohttp's own 404/405/413 and unexpected failures included."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return http_error(exc, request)
    except ConnectionResetError:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure is answered as JSON; the server goes on
        return ApiError(500, f"internal error: {type(exc).__name__}: {exc}", kind="server_error").response()


def make_app(local: LocalModel) -> web.Application:
    async def health(request: web.Request) -> web.Response:
        # `token` and `pid` let the runner tell this server from anything else on the port
        return web.json_response({"status": "ok", "numerics": local.numerics, "threads": local.threads,
                                  "device": local.device, "batching": local.batching, "max_batch": local.max_batch,
                                  "token": local.token, "pid": os.getpid(), "generating": local.generating,
                                  "tool_call_parser": local.tool_call_parser,
                                  "queued": len(local.pending), "peak_batch": local.peak_batch,
                                  "abandoned": local.abandoned, "abandoned_total": local.abandoned_total})

    def model_card() -> dict[str, Any]:
        return {"id": local.name, "object": "model", "created": 0, "owned_by": "recipe-runner",
                "max_model_len": local.context}

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
            ids = local.prompt_ids(parsed)
            local.fit_context(int(ids.shape[-1]), parsed)
        except ApiError as exc:
            return exc.response()
        return await respond(request, parsed, ids)

    async def respond(request: web.Request, parsed: ChatRequest, ids: Any) -> web.StreamResponse:
        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue[str | None] = asyncio.Queue()
        done = loop.create_future()

        def from_engine(callback: Any, *args: Any) -> None:  # the engine runs on the generator thread
            with contextlib.suppress(RuntimeError):  # the loop closed (shutdown): nobody to tell
                loop.call_soon_threadsafe(callback, *args)

        def finished() -> None:
            from_engine(lambda: done.done() or done.set_result(None))

        streamer = make_streamer(local.tokenizer, parsed.tools is not None,
                                 lambda text: from_engine(pieces.put_nowait, text))
        # the client went away: the engine drops the job at its next step (or before its prefill)
        job = Job(ids, parsed, streamer, threading.Event(), finished)
        local.submit(job)
        try:
            return await answer(request, job, pieces, done)
        except BaseException:  # the handler was cancelled or failed: stop generating for nobody
            job.cancel.set()
            raise

    async def answer(request: web.Request, job: Job, pieces: asyncio.Queue, done: asyncio.Future
                     ) -> web.StreamResponse:
        parsed, cancel = job.request, job.cancel
        created, cid = int(time.time()), f"chatcmpl-{uuid.uuid4().hex[:16]}"
        text, sent = "", 0
        hold = max((len(s) for s in parsed.stop), default=1) - 1  # a stop string may span pieces
        resp: web.StreamResponse | None = None

        async def emit(delta: dict[str, Any], finish: str | None = None) -> None:
            if resp is None or cancel.is_set():
                return
            try:
                await _send(resp, cid, created, local.name, delta, finish)
            except ConnectionResetError:
                cancel.set()

        if parsed.stream:
            resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await resp.prepare(request)
            await emit({"role": "assistant", "content": ""})
        while True:
            try:  # a queued job has no pieces yet: look at the client now and then meanwhile
                piece = await asyncio.wait_for(pieces.get(), CLIENT_POLL_S)
            except TimeoutError:
                if client_gone(request):
                    cancel.set()
                continue
            if piece is None:
                break
            if cancel.is_set() or client_gone(request):
                cancel.set()  # drain what the streamer still has; the generation ends at its next token
                continue
            text += piece
            visible, _ = cut_at_stop(text, parsed.stop)
            # Hold back the tail a stop string could still begin in, and, when tools may be called,
            # everything from where a call may begin on (<tool_call>, or <function= for qwen3_coder:
            # the calls are sent parsed, at the end) and a tail that could be the start of one.
            safe = len(visible) - (hold if len(visible) == len(text) else 0)
            if parsed.tools is not None:
                at = call_start(visible, local.tool_call_parser)
                safe = min(safe, at if at >= 0 else len(visible) - partial_start(visible, local.tool_call_parser))
            if resp is not None and safe > sent:
                await emit({"content": visible[sent:safe]})
                sent = safe
        await done
        if cancel.is_set():  # nobody to answer
            return resp if resp is not None else web.Response(status=204)
        if job.error is not None:
            error = ApiError(500, f"generation failed: {type(job.error).__name__}: {job.error}", kind="server_error")
            if resp is None:
                return error.response()
            with contextlib.suppress(ConnectionResetError):
                await resp.write(f"data: {json.dumps({'error': error.body()})}\n\n".encode())
                await resp.write_eof()
            return resp
        completion_tokens, prompt_tokens = len(job.tokens), job.prompt_len
        text, stopped = cut_at_stop(text, parsed.stop)
        parsed_answer = (parse_tool_calls(text, local.tool_call_parser, parsed.tools)
                         if parsed.tools is not None else None)
        calls = parsed_answer.calls if parsed_answer else []
        content = parsed_answer.content if calls else text
        ended = completion_tokens > 0 and job.tokens[-1] in local.eos
        finish = ("tool_calls" if calls else "stop" if stopped or ended or completion_tokens < parsed.max_tokens
                  else "length")
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                 "total_tokens": prompt_tokens + completion_tokens}
        if resp is not None:
            if content and len(content) > sent:
                await emit({"content": content[sent:]})
            if calls:
                await emit({"tool_calls": calls})
            await emit({}, finish)
            with contextlib.suppress(ConnectionResetError):
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

    app = web.Application(middlewares=[json_errors], client_max_size=MAX_BODY)
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
    parser.add_argument("--max-batch", type=int, default=DEFAULT_MAX_BATCH,
                        help="requests decoded together at most (1: one at a time)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when torch sees a GPU, else cpu), cpu, cuda[:N]")
    parser.add_argument("--tool-call-parser", default=DEFAULT_PARSER,
                        help=f"how tool calls are read from the answer, as vLLM's parser of that name reads them: "
                             f"{', '.join(SUPPORTED_PARSERS)} (default {DEFAULT_PARSER})")
    args = parser.parse_args()
    if problem := unsupported_parser(args.tool_call_parser):
        parser.exit(2, f"[local_server] {problem}\n")
    local = LocalModel(args.model, args.name, args.dtype, args.threads, args.max_batch, args.device)
    local.token = os.environ.get("RECIPE_SERVER_TOKEN", "")
    local.tool_call_parser = args.tool_call_parser
    print(f"[local_server] {args.model} ({local.numerics}, {local.device}, {local.threads} threads, "
          f"batching: {local.batching}, tool calls: {local.tool_call_parser}) on "
          f"http://{args.host}:{args.port}/v1", flush=True)
    web.run_app(make_app(local), host=args.host, port=args.port, print=None, shutdown_timeout=2)
    # A generation stops at its next token (on_shutdown), but a long prompt's prefill cannot be cut:
    # exit now rather than wait for the generation thread.
    sys.stdout.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
