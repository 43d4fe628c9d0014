"""Sequential looks: a suite stops once every gate that reads it is decided, each look judged at its share
of the error budget; real HTTP against scripted servers on loopback."""

from __future__ import annotations

import asyncio

import aiohttp

from runner.benchmark.gates import evaluate
from runner.benchmark.stats import look_alphas, look_sizes, spending
from runner.benchmark.suites import Suite, SuiteRun, ask_in_looks, ask_items, sampled_items, summarize
from runner.recipe.schema import Gate, SuiteRef
from runner.testing.scripted_server import ScriptedServer

SUITE = Suite(name="plain", scorer="no_markdown", prompts=[f"Question {i}?" for i in range(200)])
REF = SuiteRef(name="plain", seed=3)
GATE = Gate(name="plain", metric="plain.pass_rate", op=">=", relative_to="baseline", margin=0.1)


def ask(always: str, gates: list[Gate], baseline: dict | None) -> tuple[dict, int]:
    async def go() -> tuple[dict, int]:
        server = await ScriptedServer(always=always).start()
        try:
            async with aiohttp.ClientSession() as session:
                run = SuiteRun("plain", sampled_items(SUITE, REF),
                               lambda some, on_answer: ask_items(session, server.url, server.model, SUITE, some, "",
                                                                 False, 4, on_answer),
                               lambda answers: summarize(SUITE, answers, False))
                result = await ask_in_looks(run, gates, baseline)
            return result, server.requests
        finally:
            await server.stop()

    return asyncio.run(go())


def test_looks_spend_the_error_budget_and_never_more():
    sizes = look_sizes(200)
    assert sizes == [50, 100, 200]
    alphas = look_alphas(sizes)
    assert abs(sum(alphas) - 0.05) < 1e-12 and alphas[0] < 0.001 < alphas[1] < 0.01 < alphas[2] < 0.05
    assert spending(1.0) == 0.05 and look_sizes(30) == [30]  # too small for two looks 20 items apart


def test_a_clear_regression_stops_at_the_first_look_and_a_faithful_candidate_at_the_second():
    baseline, asked = ask("", [], None)
    assert asked == 200 and baseline["total"] == 200 and "looks" not in baseline  # the baseline answers all
    broken, asked = ask("[markdown]", [GATE], {"suites": {"plain": baseline}})
    assert asked == 50 and broken["total"] == 50 and broken["stopped_early"] and broken["cap"] == 200
    assert [look["verdicts"]["plain"] for look in broken["looks"]] == ["fail"]
    faithful, asked = ask("", [GATE], {"suites": {"plain": baseline}})
    assert asked == 100 and [look["verdicts"]["plain"] for look in faithful["looks"]] == ["inconclusive", "pass"]
    # The gates step judges what was asked at the alpha of the look that decided: the same verdicts.
    for result, verdict in ((broken, "fail"), (faithful, "pass")):
        (v,) = evaluate([GATE], {"suites": {"plain": result}}, {"suites": {"plain": baseline}})
        assert v["verdict"] == verdict and v["alpha"] == result["alpha"] and v["n"] == result["total"]


def test_the_prompts_are_asked_in_the_seeded_order_and_every_look_is_a_prefix():
    order = [i.prompt for i in sampled_items(SUITE, REF)]
    assert order == [i.prompt for i in sampled_items(SUITE, REF)] and order != [p for p in SUITE.prompts]
    broken, _ = ask("[markdown]", [GATE], {"suites": {"plain": ask("", [], None)[0]}})
    assert [item["prompt"] for item in broken["items"]] == order[:50]
