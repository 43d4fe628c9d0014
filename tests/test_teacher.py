"""Calibration generation from a teacher, against a real OpenAI-compatible server on loopback.

The server (runner.testing.scripted_server) answers according to markers in each prompt: tool
calls, markdown, leaked thinking, malformed JSON, slow answers and HTTP errors.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import subprocess
import time

import pytest

from conftest import MINIMAL, PYTHON, REPO, placeholder_model, recipe_cli_env
from runner.calibration.generate import generate
from runner.errors import RunnerError
from runner.recipe.schema import TeacherSource
from runner.testing.scripted_server import ScriptedServer, ServerThread

LOG = logging.getLogger("test")
TOOLS = [
    {"function": {"name": "search_memory", "description": "Search memory.",
                  "parameters": {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]}}},
    {"function": {"name": "web_search", "parameters": {"type": "object", "properties": {"query": {"type": "string"}},
                                                       "required": ["query"]}}},
]
RESULTS = {"search_memory": '{"results": ["Priya moved the trip to April."]}', "web_search": '{"results": []}'}


def spec(url: str, categories: list[dict], **extra) -> TeacherSource:
    data = {"kind": "teacher", "endpoint": url, "model": "scripted-teacher", "system_prompt": "Be brief.",
            "tools": TOOLS, "tool_results": RESULTS, "categories": categories, "retries": 3, "timeout_s": 5,
            "validation": {"min_tokens": 5, "max_tokens": 2048, "min_conversations": 1,
                           "min_tool_call_conversations": 0, "enforce": False}}
    data.update(extra)
    return TeacherSource.model_validate(data)


def run_generation(server: ScriptedServer, teacher_spec_fn, tmp_path, **kwargs):
    async def main():
        await server.start()
        try:
            return await generate(teacher_spec_fn(server.url), 0, tmp_path / "out", tmp_path / "partial", None, LOG,
                                  **kwargs)
        finally:
            await server.stop()

    (tmp_path / "out").mkdir(exist_ok=True)
    return asyncio.run(main())


def lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_generation_follows_tool_calls_and_filters_with_counted_reasons(tmp_path):
    categories = [
        {"name": "chat", "count": 6, "prompts": [f"tell me about topic {i}" for i in range(6)]},
        {"name": "memory", "count": 4, "templates": ["[tool:search_memory] what did {who} say?"],
         "fill": {"who": ["Priya", "Ravi", "Mom", "Arjun"]}, "expect_tool": "search_memory"},
        {"name": "markdown", "count": 2, "prompts": ["[markdown] list things", "[markdown] more things"]},
        {"name": "thinking", "count": 3, "prompts": ["[think] hello", "[think] hi", "[reasoning] hey"]},
        {"name": "badjson", "count": 2, "prompts": ["[badjson] a", "[badjson] b"]},
        {"name": "badargs", "count": 1, "prompts": ["[badargs] c"]},
        {"name": "wrongtool", "count": 1, "prompts": ["[tool:calendar] d"]},
        {"name": "notool", "count": 1, "prompts": ["no tool here"], "expect_tool": "web_search"},
        {"name": "dupes", "count": 3, "prompts": ["always the same"]},
        {"name": "multi", "count": 2, "turns": 5, "prompts": [f"turn prompt {i}" for i in range(7)],
         "languages": ["English", "Kannada"]},
    ]
    summary = run_generation(ScriptedServer(), lambda url: spec(url, categories), tmp_path)
    assert summary["requested"] == summary["generated"] == 25
    assert summary["rejected"] == {"markdown": 2, "thinking": 3, "tool_args_not_json": 2, "tool_args_schema": 1,
                                   "tool_unknown": 1, "expected_tool_not_called": 1, "duplicate": 2}
    assert summary["conversations"] == 6 + 4 + 1 + 2
    assert summary["with_tool_calls"] == 4
    assert summary["per_category"]["memory"] == {"generated": 4, "kept": 4, "with_tool_calls": 4}
    kept = lines(tmp_path / "out" / "calibration.jsonl")
    assert len(kept) == summary["conversations"]
    memory = next(c for c in kept if c["category"] == "memory")
    roles = [m["role"] for m in memory["messages"]]
    assert roles == ["system", "user", "assistant", "tool", "assistant"]
    call = memory["messages"][2]["tool_calls"][0]
    assert call["function"]["name"] == "search_memory" and json.loads(call["function"]["arguments"])["query"]
    assert memory["messages"][3]["tool_call_id"] == call["id"]
    assert memory["messages"][3]["content"] == RESULTS["search_memory"]
    assert "Priya moved the trip" in memory["messages"][4]["content"]
    multi = [c for c in kept if c["category"] == "multi"]
    assert all(sum(m["role"] == "user" for m in c["messages"]) == 5 for c in multi)
    assert all("Answer in" in c["messages"][0]["content"] for c in multi)
    assert all("reasoning_content" not in m for c in kept for m in c["messages"])
    assert (tmp_path / "out" / "token_lengths.png").read_bytes()[:4] == b"\x89PNG"
    assert summary["verification"]["conversations"]["pass"] is True
    assert summary["token_counts"].startswith("estimate")


def test_retries_429_and_5xx_with_backoff_and_gives_up_on_4xx_and_timeouts(tmp_path):
    categories = [
        {"name": "flaky", "count": 3, "prompts": ["[fail:500:2] a", "[fail:429:1] b", "[fail:503:3] c"]},
        {"name": "bad", "count": 1, "prompts": ["[fail:400:1] d"]},
        {"name": "slow", "count": 1, "prompts": ["[slow:3] e"]},
    ]
    summary = run_generation(ScriptedServer(), lambda url: spec(url, categories, timeout_s=0.5, retries=3), tmp_path)
    assert summary["per_category"]["flaky"]["kept"] == 3
    assert summary["retries"] >= 2 + 1 + 3
    assert summary["failed_requests"] == {"http_400": 1, "timeout": 1}


def test_unreachable_teacher_fails_fast(tmp_path):
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there
    teacher = spec(f"http://127.0.0.1:{port}/v1", [{"name": "a", "count": 2, "prompts": ["x"]}])
    (tmp_path / "out").mkdir()
    t0 = time.monotonic()
    with pytest.raises(RunnerError, match=r"unreachable.*calibration.source.endpoint"):
        asyncio.run(generate(teacher, 0, tmp_path / "out", tmp_path / "partial", None, LOG))
    assert time.monotonic() - t0 < 5


def test_interrupted_generation_resumes_without_duplicates(tmp_path):
    categories = [{"name": "chat", "count": 20, "prompts": [f"question number {i}" for i in range(20)]}]
    teacher = spec("", categories, concurrency=2)
    server = ScriptedServer(delay_s=0.05)

    async def interrupted():
        await server.start()
        task = asyncio.create_task(generate(teacher.model_copy(update={"endpoint": server.url}), 0,
                                            tmp_path / "out", tmp_path / "partial", None, LOG))
        partial = tmp_path / "partial"
        while not any(p.exists() and len(p.read_text().splitlines()) >= 6 for p in partial.glob("*.jsonl")):
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await server.stop()

    (tmp_path / "out").mkdir()
    asyncio.run(interrupted())
    [partial_file] = (tmp_path / "partial").glob("*.jsonl")
    done_before = len(partial_file.read_text().splitlines())
    with partial_file.open("a") as fh:
        fh.write('{"id": "chat-00019", "messa')  # a line cut short by a crash
    second = ScriptedServer()
    summary = run_generation(second, lambda url: teacher.model_copy(update={"endpoint": url}), tmp_path)
    assert summary["reused_from_earlier_attempts"] == done_before
    assert second.requests == 20 - done_before
    kept = lines(tmp_path / "out" / "calibration.jsonl")
    assert len(kept) == 20 and len({c["messages"][1]["content"] for c in kept}) == 20


def test_failed_checks_fail_the_step_but_keep_the_work(tmp_path):
    categories = [{"name": "chat", "count": 3, "prompts": ["a question", "another question", "a third one"]}]
    strict = {"min_tokens": 100, "max_tokens": 200, "min_conversations": 10, "min_tool_call_conversations": 1}
    with pytest.raises(RunnerError, match=r"conversations = 3 \(required >= 10\).*Raise the category counts"):
        run_generation(ScriptedServer(), lambda url: spec(url, categories, validation=strict), tmp_path)
    relaxed = strict | {"min_conversations": 3, "min_tool_call_conversations": 0}
    again = ScriptedServer()
    summary = run_generation(again, lambda url: spec(url, categories, validation=relaxed), tmp_path)
    assert again.requests == 0 and summary["conversations"] == 3


def test_concurrency_is_bounded_by_the_recipe(tmp_path):
    categories = [{"name": "chat", "count": 24, "prompts": [f"q{i}" for i in range(24)]}]
    server = ScriptedServer(delay_s=0.1)
    t0 = time.monotonic()
    run_generation(server, lambda url: spec(url, categories, concurrency=8), tmp_path)
    assert server.peak_in_flight == 8
    assert time.monotonic() - t0 < 24 * 0.1 / 2  # far faster than one at a time


def test_recipe_run_generates_calibration_from_a_teacher(write, tmp_path):
    placeholder_model(tmp_path / "model")
    with ServerThread(ScriptedServer()) as server:
        teacher = (f"{{kind: teacher, endpoint: '{server.url}', model: scripted-teacher, "
                   "tools: [{function: {name: search_memory, parameters: {type: object, properties: {query: {type: string}}}}}], "
                   "tool_results: {search_memory: '{\"hits\": 1}'}, "
                   "categories: [{name: chat, count: 4, prompts: [a, b, c, d]}, "
                   "{name: mem, count: 2, prompts: ['[tool:search_memory] x', '[tool:search_memory] y'], expect_tool: search_memory}], "
                   "validation: {min_tokens: 40, max_tokens: 150, min_conversations: 6, min_tool_call_conversations: 2}}")
        path = write("r.yaml", MINIMAL.replace("{kind: jsonl, path: calib.jsonl}", teacher))
        result = subprocess.run([PYTHON, "-m", "runner.cli", "run", str(path), "--until", "calibrate",
                                 "--run-dir", str(tmp_path / "run")], capture_output=True, text=True,
                                env=recipe_cli_env(), cwd=REPO, timeout=120)
    assert result.returncode == 0, result.stderr
    record = json.loads((tmp_path / "run" / "steps" / "calibrate" / "record.json").read_text())
    assert record["summary"]["conversations"] == 6 and record["summary"]["with_tool_calls"] == 2
    assert all(check["pass"] for check in record["summary"]["verification"].values())
    assert record["outputs"]["histogram"] == "token_lengths.png"
    assert len(lines(tmp_path / "run" / "steps" / "calibrate" / "calibration.jsonl")) == 6


@pytest.mark.slow
def test_the_demo_model_served_locally_as_the_teacher(demo_run, tmp_path):
    """The real SmolLM2 behind the local engine is a teacher like any other."""
    from conftest import DEMO
    from runner.recipe.loader import load_recipe
    from runner.run_dir import RunDir
    from runner.serving.engine import serving
    from runner.steps.inputs import ServingInput

    recipe = load_recipe(DEMO).recipe
    spec_of_serving = ServingInput(serve=recipe.serve, container=recipe.container_for("serve"), dtype=recipe.model.dtype)
    model_dir = demo_run / "steps" / "source" / "model"
    categories = [{"name": "chat", "count": 3, "prompts": ["Say hello to Priya.", "What is 2 plus 2?",
                                                          "Name a fruit that is yellow."]}]

    async def main():
        async with serving(spec_of_serving, model_dir, RunDir(tmp_path), "teacher", "smollm2") as server:
            teacher = spec(server.url, categories, tools=[], tool_results={}, timeout_s=120, concurrency=1,
                           sampling={"temperature": 0, "max_tokens": 40})
            teacher = teacher.model_copy(update={"model": server.model})
            return await generate(teacher, 0, tmp_path / "out", tmp_path / "partial", model_dir, LOG)

    (tmp_path / "out").mkdir()
    summary = asyncio.run(main())
    assert summary["generated"] == 3 and summary["failed_requests"] == {}
    assert summary["token_counts"] == "model tokenizer"
    kept = lines(tmp_path / "out" / "calibration.jsonl")
    assert all(c["messages"][-1]["role"] == "assistant" and c["messages"][-1]["content"] for c in kept)


def test_non_json_replies_are_retried_and_counted_huge_replies_refused_before_parsing(tmp_path):
    categories = [
        {"name": "proxy", "count": 1, "prompts": ["[html:2] a"]},  # two HTML pages, then a real answer
        {"name": "html", "count": 1, "prompts": ["[html:9] b"]},  # never JSON: counted, named
        {"name": "huge", "count": 1, "prompts": ["[huge:3] c"]},  # 3 MB over a 1 MB cap
    ]
    summary = run_generation(ScriptedServer(), lambda url: spec(url, categories, retries=3,
                                                                max_reply_bytes=1024 * 1024), tmp_path)
    assert summary["per_category"]["proxy"]["kept"] == 1
    assert summary["failed_requests"] == {"bad_json": 1, "too_large": 1}
    assert summary["retries"] >= 2 + 3


def test_a_silent_teacher_trips_the_circuit_breaker_and_keeps_what_was_generated(tmp_path, caplog):
    categories = [{"name": "fine", "count": 2, "prompts": ["a"]},
                  {"name": "silent", "count": 40, "prompts": ["[slow:3] b"]}]
    server = ScriptedServer()
    t0 = time.monotonic()
    with caplog.at_level(logging.INFO), pytest.raises(RunnerError) as err:
        run_generation(server, lambda url: spec(url, categories, timeout_s=0.3, retries=1, concurrency=4,
                                                circuit_breaker=6), tmp_path)
    assert time.monotonic() - t0 < 10  # 40 silent conversations x 2 attempts x 0.3 s would be 24 s
    message = str(err.value)
    assert "failed 6 attempts in a row" in message and server.url.removesuffix("/v1") in message
    assert "2 conversations are kept" in message
    assert "timeout" in message
    assert any("teacher:" in r.getMessage() and "failed" in r.getMessage() for r in caplog.records)  # progress
    assert any("retrying" in r.getMessage() for r in caplog.records)  # no silent retries
