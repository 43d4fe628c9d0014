"""The benchmark harness measured against truth: a loopback server that streams with injected
delays and logs when it actually wrote each chunk."""

from __future__ import annotations

import asyncio
import statistics

import aiohttp

from runner.benchmark.harness import percentile, stream_chat, summarize
from runner.testing.scripted_server import ScriptedServer


def measure(server: ScriptedServer, prompts: list[str], max_tokens: int = 32):
    async def main():
        await server.start()
        try:
            async with aiohttp.ClientSession() as session:
                return [await stream_chat(session, server.url, server.model, [{"role": "user", "content": p}],
                                          max_tokens) for p in prompts]
        finally:
            await server.stop()

    return asyncio.run(main())


def test_ttft_and_itl_medians_match_the_servers_send_times_within_1ms():
    server = ScriptedServer(ttft_s=0.2, itl_s=0.02)
    results = measure(server, [f"[words:20] question {i}" for i in range(8)])
    assert all(r.ok for r in results)
    # Client and server share this process's clock: the server's send time of the first token,
    # counted from when the client sent the request, is the true TTFT.
    client_ttft = statistics.median(r.ttft_s for r in results) * 1000
    server_ttft = statistics.median(log["sent"][0] - r.started_at for r, log in zip(results, server.stream_log,
                                                                                     strict=True)) * 1000
    client_itl = statistics.median(g for r in results for g in r.gaps_s) * 1000
    server_itl = statistics.median(b - a for log in server.stream_log for a, b in zip(log["sent"], log["sent"][1:],
                                                                                          strict=False)) * 1000
    assert abs(client_ttft - server_ttft) < 1.0, (client_ttft, server_ttft)
    assert abs(client_itl - server_itl) < 1.0, (client_itl, server_itl)
    assert 199 < client_ttft < 215 and 19.5 < client_itl < 25
    summary = summarize(results)
    assert summary["successful"] == 8
    assert abs(summary["ttft_p50_ms"] - client_ttft) < 1e-3
    assert 35 < summary["decode_tok_s"] < 52  # one token each ~20 ms
    assert results[0].output_tokens == len(server.stream_log[0]["sent"])  # from the streamed usage


def test_a_stall_shows_in_the_per_gap_distribution():
    server = ScriptedServer(ttft_s=0.01, itl_s=0.005)
    [result] = measure(server, ["[words:20] [stall:5:0.15] hello"])
    summary = summarize([result])
    assert summary["itl_max_ms"] > 145
    assert summary["itl_p50_ms"] < 10
    # A per-request average (GuideLLM's ITL) dilutes the stall to a fraction of it.
    average = (result.e2e_s - result.ttft_s) / (result.output_tokens - 1) * 1000
    assert average < 20


def test_tool_calls_and_reasoning_are_first_tokens_too():
    server = ScriptedServer(ttft_s=0.05)
    [result] = measure(server, ["[tool:search_memory] what did Priya say"])
    assert result.ok and 45 < result.ttft_s * 1000 < 60
    assert result.tool_calls[0]["function"]["name"] == "search_memory"


def test_errors_are_counted_not_timed():
    server = ScriptedServer()
    results = measure(server, ["[fail:500:1] x", "fine"])
    assert [r.ok for r in results] == [False, True]
    assert summarize(results)["successful"] == 1 and "http_500" in summarize(results)["errors"][0]


def test_percentile_is_linear_interpolation():
    assert percentile([1, 2, 3, 4], 50) == 2.5
    assert percentile([10], 95) == 10
    assert percentile([], 50) is None


def _suite(prompts: list[str]):
    from runner.benchmark.suites import Suite

    return Suite(name="probe", scorer="no_markdown", prompts=prompts)


async def _run_suite(server: ScriptedServer, prompts: list[str]) -> dict:
    from runner.benchmark.suites import run_suite

    await server.start()
    try:
        async with aiohttp.ClientSession() as session:
            return await run_suite(session, server.url, server.model, _suite(prompts), "", False, None, 2)
    finally:
        await server.stop()


def test_a_request_error_is_never_scored_as_model_behaviour():
    from runner.errors import RunnerError

    try:
        asyncio.run(_run_suite(ScriptedServer(), ["[fail:500:9] one", "two", "[markdown] three"]))
    except RunnerError as exc:
        assert "1 of 3 requests" in str(exc) and "http_500" in str(exc) and "not committed" in str(exc)
    else:
        raise AssertionError("a failed request was scored")


def test_answers_hash_is_stable_and_changes_with_any_answer():
    first = asyncio.run(_run_suite(ScriptedServer(), ["one", "[markdown] two"]))
    again = asyncio.run(_run_suite(ScriptedServer(), ["one", "[markdown] two"]))
    other = asyncio.run(_run_suite(ScriptedServer(), ["one", "two"]))
    assert (first["passed"], first["failed"], first["total"]) == (1, 1, 2)
    assert first["answers_sha256"] == again["answers_sha256"] != other["answers_sha256"]


def test_paired_speed_alternates_with_the_baseline_and_reports_the_ratio_spread():
    from runner.benchmark.speed import speed_sweep
    from runner.recipe.schema import SpeedSpec

    candidate, baseline = ScriptedServer(model="cand", itl_s=0.02), ScriptedServer(model="base", itl_s=0.01)
    spec = SpeedSpec(warmup_requests=1, requests=4, prompt_tokens=[16, 64], output_tokens=12)

    async def main():
        await candidate.start()
        await baseline.start()
        try:
            async with aiohttp.ClientSession() as session:
                return await speed_sweep(session, candidate.url, "cand", spec, paired_with=(baseline.url, "base"))
        finally:
            await candidate.stop()
            await baseline.stop()

    speed = asyncio.run(main())
    paired = speed["paired_baseline"]
    assert paired["order"] == "ABBA" and paired["pairs"] == 4
    assert baseline.requests == 1 + 4  # warm-up and the gate's level only; the 64-token level is not paired
    assert candidate.requests == (1 + 4) * 2
    ratio = paired["ratios"]["decode_tok_s"]
    # 20 ms against 10 ms a token: 0.5, pulled up towards 1 by the same HTTP overhead on both sides
    assert 0.4 < ratio["min"] <= ratio["median"] <= ratio["max"] < 0.75
    assert speed["summary"]["decode_tok_s"] < paired["summary"]["decode_tok_s"]


def test_a_failed_speed_request_fails_the_sweep_instead_of_reporting_a_speed():
    import pytest

    from runner.benchmark.speed import speed_sweep
    from runner.errors import RunnerError
    from runner.recipe.schema import SpeedSpec
    from runner.serving.server import free_port

    spec = SpeedSpec(warmup_requests=0, requests=2, prompt_tokens=[16], output_tokens=4)

    async def main():  # nothing listens on the port: every request fails to connect
        async with aiohttp.ClientSession() as session:
            return await speed_sweep(session, f"http://127.0.0.1:{free_port()}/v1", "m", spec)

    with pytest.raises(RunnerError, match="speed requests to .* failed"):
        asyncio.run(main())
