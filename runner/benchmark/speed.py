"""The speed sweep: TTFT, ITL, TPOT and decode speed across prompt lengths and concurrency levels.

Plan Phase 3 saw Q4_K_M's TTFT grow from 300 to 1600 ms with context while NVFP4 stayed at 90 ms:
the sweep over prompt lengths shows that curve. Each level starts with warm-up requests that are
not counted.
"""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp

from runner.benchmark.harness import RequestResult, stream_chat, summarize
from runner.recipe.schema import SpeedSpec

WORDS = ["time", "river", "light", "table", "music", "garden", "paper", "window", "story", "morning", "city",
         "number", "family", "water", "market", "season", "letter", "station", "friend", "summer"]


def synthetic_prompt(tokens: int, salt: int) -> str:
    """About `tokens` tokens of plain words (most tokenizers give one token per common word)."""
    words = [WORDS[(i * 7 + salt) % len(WORDS)] for i in range(max(1, tokens - 12))]
    return "Summarise in one sentence: " + " ".join(words)


async def _level(session: aiohttp.ClientSession, url: str, model: str, tokens: int, concurrency: int,
                 spec: SpeedSpec, extra: dict[str, Any] | None) -> dict[str, Any]:
    async def one(i: int) -> RequestResult:
        messages = [{"role": "user", "content": synthetic_prompt(tokens, i)}]
        return await stream_chat(session, url, model, messages, spec.output_tokens, extra_body=extra)

    for i in range(spec.warmup_requests):
        await one(10_000 + i)
    slots = asyncio.Semaphore(concurrency)

    async def bounded(i: int) -> RequestResult:
        async with slots:
            return await one(i)

    results = await asyncio.gather(*(bounded(i) for i in range(spec.requests)))
    return summarize(list(results))


async def speed_sweep(session: aiohttp.ClientSession, url: str, model: str, spec: SpeedSpec,
                      extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """{"sweep": {prompt_tokens: summary}, "by_concurrency": {c: summary}, "summary": the gate's view}.

    The gates read `summary`: the shortest prompt at the first concurrency level.
    """
    first = spec.concurrency[0]
    sweep = {str(n): await _level(session, url, model, n, first, spec, extra) for n in spec.prompt_tokens}
    shortest = str(min(spec.prompt_tokens))
    by_concurrency = {str(first): sweep[shortest]}
    for c in spec.concurrency[1:]:
        by_concurrency[str(c)] = await _level(session, url, model, min(spec.prompt_tokens), c, spec, extra)
    return {"sweep": sweep, "by_concurrency": by_concurrency, "summary": sweep[shortest],
            "output_tokens": spec.output_tokens}
