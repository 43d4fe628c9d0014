"""The `local` serving engine: an OpenAI-compatible chat server for CPU machines.

    python -m runner.worker.local_server --model DIR --port PORT [--name NAME]

It serves an exported ModelOpt checkpoint dequantized to bf16 (see dequantize.py: weight-only
emulation, W4A16 for NVFP4) or an unquantized model as it is. Endpoints: GET /health,
GET /v1/models, POST /v1/chat/completions (streaming or not, `tools`, `chat_template_kwargs`,
`max_tokens`, `temperature`), with `<tool_call>{...}</tool_call>` blocks in the output returned
as parsed tool_calls. One request generates at a time.

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
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from aiohttp import web

TOOL_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)


DEFAULT_THREADS = min(4, os.cpu_count() or 1)  # fixed, so answers repeat across runs on one machine


def make_deterministic(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    torch.set_num_interop_threads(1)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(0)


class LocalModel:
    def __init__(self, model_dir: Path, name: str, dtype: str, threads: int = DEFAULT_THREADS):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        make_deterministic(threads)
        torch.set_grad_enabled(False)
        self.threads = threads
        self.name = name
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        if (model_dir / "hf_quant_config.json").exists():
            from runner.worker.dequantize import load_dequantized

            self.model = load_dequantized(model_dir, dtype)
            self.numerics = "dequantized weights in bf16 (weight-only emulation)"
        else:
            self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).eval()
            self.numerics = "unquantized"
        self.lock = asyncio.Lock()

    def prompt_ids(self, body: dict[str, Any]) -> Any:
        kwargs = dict(body.get("chat_template_kwargs") or {})
        return self.tokenizer.apply_chat_template(
            body["messages"], tools=body.get("tools") or None, add_generation_prompt=True, return_tensors="pt",
            return_dict=True, **kwargs)["input_ids"]

    def generate(self, ids: Any, body: dict[str, Any], streamer: Any) -> Any:
        temperature = float(body.get("temperature") or 0)
        return self.model.generate(
            ids, attention_mask=ids.new_ones(ids.shape), max_new_tokens=int(body.get("max_tokens") or 256),
            do_sample=temperature > 0, temperature=temperature or None, top_p=None, top_k=None, streamer=streamer,
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


def make_app(local: LocalModel) -> web.Application:
    from transformers import TextIteratorStreamer

    async def health(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "numerics": local.numerics, "threads": local.threads})

    async def models(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": local.name, "object": "model"}]})

    async def chat(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        async with local.lock:
            ids = local.prompt_ids(body)
            streamer = TextIteratorStreamer(local.tokenizer, skip_prompt=True, skip_special_tokens=True)
            holder: dict[str, Any] = {}
            thread = threading.Thread(target=lambda: holder.update(out=local.generate(ids, body, streamer)))
            thread.start()
            created = int(time.time())
            cid = f"chatcmpl-{uuid.uuid4().hex[:16]}"
            loop = asyncio.get_running_loop()
            pieces = iter(streamer)
            text = ""
            resp: web.StreamResponse | None = None
            if body.get("stream"):
                resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
                await resp.prepare(request)
                await _send(resp, cid, created, local.name, {"role": "assistant"})
            while True:
                piece = await loop.run_in_executor(None, next, pieces, None)
                if piece is None:
                    break
                text += piece
                # Hold text back once a tool call starts: it is sent parsed, at the end.
                if resp is not None and piece and "<tool_call>" not in text:
                    await _send(resp, cid, created, local.name, {"content": piece})
            await loop.run_in_executor(None, thread.join)
            completion_tokens = int(holder["out"].shape[-1] - ids.shape[-1])
            content, calls = split_tool_calls(text)
            usage = {"prompt_tokens": int(ids.shape[-1]), "completion_tokens": completion_tokens,
                     "total_tokens": int(ids.shape[-1]) + completion_tokens}
            finish = "tool_calls" if calls else "stop"
            if resp is not None:
                if calls:
                    await _send(resp, cid, created, local.name, {"tool_calls": calls})
                await _send(resp, cid, created, local.name, {}, finish)
                await resp.write(f"data: {json.dumps({'id': cid, 'choices': [], 'usage': usage})}\n\n".encode())
                await resp.write(b"data: [DONE]\n\n")
                await resp.write_eof()
                return resp
            message: dict[str, Any] = {"role": "assistant", "content": content or None}
            if calls:
                message["tool_calls"] = [{k: v for k, v in c.items() if k != "index"} for c in calls]
            return web.json_response({"id": cid, "object": "chat.completion", "created": created,
                                      "model": local.name, "usage": usage,
                                      "choices": [{"index": 0, "message": message, "finish_reason": finish}]})

    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/chat/completions", chat)
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
    print(f"[local_server] {args.model} ({local.numerics}, {local.threads} threads) on "
          f"http://{args.host}:{args.port}/v1", flush=True)
    web.run_app(make_app(local), host=args.host, port=args.port, print=None)


if __name__ == "__main__":
    main()
