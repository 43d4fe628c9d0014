"""The speed sweep: TTFT, ITL, TPOT and decode speed across prompt lengths and concurrency levels.

Plan Phase 3 saw Q4_K_M's TTFT grow from 300 to 1600 ms with context while NVFP4 stayed at 90 ms:
the sweep over prompt lengths shows that curve. Each level starts with warm-up requests that are
not counted.
"""

from __future__ import annotations

import asyncio
import statistics
from typing import Any

import aiohttp

from runner.benchmark.harness import RequestResult, stream_chat, summarize
from runner.errors import RunnerError
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


async def _paired(session: aiohttp.ClientSession, candidate: Server, baseline: Server, tokens: int,
                  spec: SpeedSpec) -> tuple[dict[str, Any], dict[str, Any]]:
    """The candidate and the baseline in one run, alternating A B B A A B ..., so that whatever else
    the machine does at the time slows both alike. Returns (candidate summary, paired baseline)."""
    async def one(server: Server, i: int) -> RequestResult:
        messages = [{"role": "user", "content": synthetic_prompt(tokens, i)}]
        return await stream_chat(session, server[0], server[1], messages, spec.output_tokens)

    for i in range(spec.warmup_requests):
        await one(candidate, 10_000 + i)
        await one(baseline, 10_000 + i)
    mine: list[RequestResult] = []
    theirs: list[RequestResult] = []
    for i in range(spec.requests):
        for server in ((candidate, baseline) if i % 2 == 0 else (baseline, candidate)):
            (mine if server is candidate else theirs).append(await one(server, i))
    pairs = [(a, b) for a, b in zip(mine, theirs, strict=True) if a.ok and b.ok and a.tpot_s and b.tpot_s]
    # candidate / baseline per request pair, for the metrics a relative speed gate can judge
    per_pair = {"decode_tok_s": [b.tpot_s / a.tpot_s for a, b in pairs],  # type: ignore[operator]
                "tpot_p50_ms": [a.tpot_s / b.tpot_s for a, b in pairs],  # type: ignore[operator]
                "ttft_p50_ms": [a.ttft_s / b.ttft_s for a, b in pairs],  # type: ignore[operator]
                "e2e_p50_ms": [a.e2e_s / b.e2e_s for a, b in pairs]}  # type: ignore[operator]
    paired = {"summary": summarize(theirs), "order": "ABBA", "pairs": len(pairs),
              "ratios": {name: {"median": round(statistics.median(r), 4), "min": round(min(r), 4),
                                "max": round(max(r), 4)} for name, r in per_pair.items() if r}}
    return summarize(mine), paired


Server = tuple[str, str]  # (base URL, model name)


async def speed_sweep(session: aiohttp.ClientSession, url: str, model: str, spec: SpeedSpec,
                      extra: dict[str, Any] | None = None, paired_with: Server | None = None) -> dict[str, Any]:
    """{"sweep": {prompt_tokens: summary}, "by_concurrency": {c: summary}, "summary": the gate's view}.

    The gates read `summary`: the shortest prompt at the first concurrency level. With `paired_with`
    (the baseline's server), that level runs interleaved with the baseline and the result also holds
    `paired_baseline`: the baseline's summary from the same run and the spread of the per-pair ratios.
    """
    first = spec.concurrency[0]
    shortest = min(spec.prompt_tokens)
    sweep: dict[str, Any] = {}
    paired = None
    for n in spec.prompt_tokens:
        if n == shortest and paired_with is not None:
            sweep[str(n)], paired = await _paired(session, (url, model), paired_with, n, spec)
        else:
            sweep[str(n)] = await _level(session, url, model, n, first, spec, extra)
    by_concurrency = {str(first): sweep[str(shortest)]}
    for c in spec.concurrency[1:]:
        by_concurrency[str(c)] = await _level(session, url, model, shortest, c, spec, extra)
    levels = [(f"{n} tokens", s) for n, s in sweep.items()]
    levels += [(f"concurrency {c}", s) for c, s in by_concurrency.items()]
    failed = [f"{name}: {', '.join(s['errors'])}" for name, s in levels if s["successful"] < s["requests"]]
    if paired is not None and paired["summary"]["successful"] < paired["summary"]["requests"]:
        failed.append(f"the paired baseline: {', '.join(paired['summary']['errors'])}")
    if failed:
        # A request that failed measured nothing: fail the step rather than report a speed without it.
        raise RunnerError(f"speed requests to {url} failed ({'; '.join(failed)}); the step is not committed")
    result = {"sweep": sweep, "by_concurrency": by_concurrency, "summary": sweep[str(shortest)],
              "output_tokens": spec.output_tokens}
    if paired is not None:
        result["paired_baseline"] = paired
    return result
