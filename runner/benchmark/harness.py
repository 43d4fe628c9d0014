"""Streamed chat-completion measurements: TTFT, inter-token latency, TPOT, decode speed, end-to-end.

Definitions follow `vllm bench serve` and GuideLLM:
- TTFT: from sending the request to the first chunk that carries content, reasoning or a tool call
  (role-only chunks do not count);
- ITL: every gap between consecutive content-bearing chunks, kept per gap (so a stall shows in the
  p95), not only the per-request average GuideLLM reports;
- TPOT: (end-to-end - TTFT) / (output tokens - 1), per request;
- decode tokens/s: 1 / TPOT, per request; the summary gives medians;
- output tokens: the server's streamed `usage` when it sends one, else the number of content chunks.
"""

from __future__ import annotations

import hashlib
import json
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import aiohttp


@dataclass
class RequestResult:
    ok: bool
    error: str | None = None
    started_at: float = 0.0  # time.perf_counter() when the request was sent
    ttft_s: float | None = None
    e2e_s: float | None = None
    gaps_s: list[float] = field(default_factory=list)
    output_tokens: int = 0
    prompt_tokens: int | None = None
    content: str = ""
    reasoning: str = ""
    tool_calls: list[dict[str, Any]] = field(default_factory=list)

    @property
    def tpot_s(self) -> float | None:
        if self.ttft_s is None or self.e2e_s is None or self.output_tokens < 2:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_tokens - 1)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self) | {"tpot_s": self.tpot_s}


async def stream_chat(session: aiohttp.ClientSession, base_url: str, model: str, messages: list[dict[str, Any]],
                      max_tokens: int, tools: list[dict[str, Any]] | None = None,
                      extra_body: dict[str, Any] | None = None, timeout_s: float = 600) -> RequestResult:
    """One streamed chat completion, timed chunk by chunk."""
    body: dict[str, Any] = {"model": model, "messages": messages, "max_tokens": max_tokens, "stream": True,
                            "stream_options": {"include_usage": True}, "temperature": 0}
    if tools:
        body["tools"] = tools
    body.update(extra_body or {})
    result = RequestResult(ok=False)
    calls: dict[int, dict[str, Any]] = {}
    chunks = 0
    last: float | None = None
    t0 = result.started_at = time.perf_counter()
    try:
        async with session.post(base_url.rstrip("/") + "/chat/completions", json=body,
                                timeout=aiohttp.ClientTimeout(total=timeout_s)) as resp:
            if resp.status != 200:
                result.error = f"http_{resp.status}: {(await resp.text())[:200]}"
                return result
            async for raw in resp.content:
                line = raw.decode("utf-8", errors="replace").strip()
                if not line.startswith("data:"):
                    continue
                payload = line[5:].strip()
                if payload == "[DONE]":
                    break
                now = time.perf_counter()
                chunk = json.loads(payload)
                if chunk.get("usage"):
                    result.output_tokens = chunk["usage"].get("completion_tokens") or result.output_tokens
                    result.prompt_tokens = chunk["usage"].get("prompt_tokens")
                for choice in chunk.get("choices") or []:
                    delta = choice.get("delta") or {}
                    text = delta.get("content") or ""
                    thought = delta.get("reasoning_content") or delta.get("reasoning") or ""
                    if not (text or thought or delta.get("tool_calls")):
                        continue
                    if last is None:
                        result.ttft_s = now - t0
                    else:
                        result.gaps_s.append(now - last)
                    last = now
                    chunks += 1
                    result.content += text
                    result.reasoning += thought
                    for call in delta.get("tool_calls") or []:
                        slot = calls.setdefault(call.get("index", 0), {"id": None, "type": "function",
                                                                      "function": {"name": "", "arguments": ""}})
                        slot["id"] = call.get("id") or slot["id"]
                        fn = call.get("function") or {}
                        slot["function"]["name"] += fn.get("name") or ""
                        slot["function"]["arguments"] += fn.get("arguments") or ""
    except (aiohttp.ClientError, TimeoutError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
        return result
    result.e2e_s = time.perf_counter() - t0
    result.tool_calls = [calls[i] for i in sorted(calls)]
    result.output_tokens = result.output_tokens or chunks
    result.ok = result.ttft_s is not None
    if not result.ok:
        result.error = "no content in the stream"
    return result


def percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile (q in 0..100), as numpy's default."""
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def summarize(results: list[RequestResult]) -> dict[str, Any]:
    """Speed metrics over successful requests, in milliseconds and tokens per second."""
    ok = [r for r in results if r.ok]
    ttft = [r.ttft_s * 1000 for r in ok if r.ttft_s is not None]
    gaps = [g * 1000 for r in ok for g in r.gaps_s]
    tpot = [r.tpot_s * 1000 for r in ok if r.tpot_s]
    e2e = [r.e2e_s * 1000 for r in ok if r.e2e_s is not None]
    decode = [1000 / t for t in tpot if t > 0]

    def rnd(x: float | None) -> float | None:
        return round(x, 3) if x is not None else None

    return {
        "requests": len(results),
        "successful": len(ok),
        "errors": sorted({r.error for r in results if r.error})[:5],
        "ttft_p50_ms": rnd(percentile(ttft, 50)),
        "ttft_p95_ms": rnd(percentile(ttft, 95)),
        "itl_p50_ms": rnd(percentile(gaps, 50)),
        "itl_p95_ms": rnd(percentile(gaps, 95)),
        "itl_max_ms": rnd(max(gaps)) if gaps else None,
        "tpot_p50_ms": rnd(percentile(tpot, 50)),
        "decode_tok_s": rnd(statistics.median(decode)) if decode else None,
        "e2e_p50_ms": rnd(percentile(e2e, 50)),
        "output_tokens_mean": rnd(statistics.mean(r.output_tokens for r in ok)) if ok else None,
        "prompt_tokens_mean": rnd(statistics.mean(r.prompt_tokens for r in ok if r.prompt_tokens))
        if any(r.prompt_tokens for r in ok) else None,
    }


def answers_hash(answers: list[dict[str, Any]]) -> str:
    """A fingerprint of what the model said (full text and tool calls, not ids): equal hashes, equal answers."""
    canonical = [[a["prompt"], a["full_answer"],
                  [[(c.get("function") or {}).get("name"), (c.get("function") or {}).get("arguments")]
                   for c in a["tool_calls"]]] for a in answers]
    return hashlib.sha256(json.dumps(canonical, ensure_ascii=False).encode()).hexdigest()
