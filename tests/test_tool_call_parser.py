"""Tool calls read from a model's text as vLLM's hermes parser reads a finished answer
(runner/benchmark/tool_calls.py), the one parser the local engine and the tool_call scorer use."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO
from runner.benchmark.tool_calls import parse_hermes, partial_start, regions, unsupported_parser

CALL = '{"name": "web_search", "arguments": {"query": "cats"}}'


def names(text: str) -> list[str]:
    return [c["function"]["name"] for c in parse_hermes(text).calls]


# vLLM's own cases for its hermes parser's finished-answer path (tests/tool_parsers/
# test_hermes_tool_parser.py, test_hermes_parser_non_streaming_*; and the QwQ answer with a thinking
# block and CJK arguments of tests/entrypoints/openai/tool_parsers/test_hermes_tool_parser.py), with
# what vLLM returns for each.
TRIGGER = '{"name": "final_answer", "arguments": {"trigger": true}}'
VLLM_CASES = [
    ("This is not a tool call.", None),  # no_tool_call: tools_called False
    (f"<tool_call>\n{TRIGGER}\n</tool_call>", ("final_answer", '{"trigger": true}')),  # between_tags
    (f"<tool_call>\n{TRIGGER}", ("final_answer", '{"trigger": true}')),  # until_eos
    (f"<tool_call>\n{TRIGGER[:-1]}", None),  # invalid_json: the closing brace missing
    ('好的，我需要调用互联网搜索。\n</think>\n\n<tool_call>\n{"name": "internet_search", "arguments": '
     '{"question": "5MW燃气轮机设计参数 空气流量"}}\n</tool_call>\n\n ',
     ("internet_search", '{"question": "5MW燃气轮机设计参数 空气流量"}')),  # arguments not \u-escaped
]


@pytest.mark.parametrize(("text", "expected"), VLLM_CASES)
def test_vllms_own_hermes_cases(text, expected):
    parsed = parse_hermes(text)
    if expected is None:
        assert parsed.calls == [] and parsed.content == text
    else:
        [call] = parsed.calls
        assert (call["function"]["name"], call["function"]["arguments"]) == expected
        assert parsed.content == (text[:text.index("<tool_call>")] or None)


def test_text_without_a_tag_is_all_content():
    parsed = parse_hermes("Cats are mammals. {\"name\": \"web_search\"}")
    assert parsed.calls == [] and parsed.content == "Cats are mammals. {\"name\": \"web_search\"}"


def test_one_closed_call_with_whitespace_and_newlines_around_the_json():
    parsed = parse_hermes(f"<tool_call>\n  {CALL}\n\n</tool_call>\n")
    assert parsed.content is None and parsed.problem is None
    [call] = parsed.calls
    assert call["type"] == "function" and call["id"].startswith("call_") and call["index"] == 0
    assert call["function"] == {"name": "web_search", "arguments": '{"query": "cats"}'}


def test_an_unclosed_final_call_runs_to_the_end_of_the_text():
    # what an answer cut by max_tokens or ended by the end-of-turn token right after the JSON looks like
    assert names(f"<tool_call>\n{CALL}") == ["web_search"]
    assert names(f"<tool_call>{CALL}\n  \n") == ["web_search"]
    assert json.loads(parse_hermes(f"<tool_call>{CALL}").calls[0]["function"]["arguments"]) == {"query": "cats"}


def test_several_calls_in_order_the_last_one_unclosed():
    second = '{"name": "search_memory", "arguments": {"query": "wedding", "person": "Kavya"}}'
    third = '{"name": "get_time", "arguments": {}}'
    parsed = parse_hermes(f"<tool_call>{CALL}</tool_call>\n<tool_call>\n{second}\n</tool_call><tool_call>{third}")
    assert [c["function"]["name"] for c in parsed.calls] == ["web_search", "search_memory", "get_time"]
    assert [c["index"] for c in parsed.calls] == [0, 1, 2]
    assert len({c["id"] for c in parsed.calls}) == 3
    assert parsed.calls[2]["function"]["arguments"] == "{}"


def test_content_is_the_text_before_the_first_call_and_text_after_calls_is_dropped():
    parsed = parse_hermes(f"Let me look that up.\n<tool_call>{CALL}</tool_call>\nOne moment.")
    assert parsed.content == "Let me look that up.\n" and names("x<tool_call>" + CALL) == ["web_search"]
    assert parse_hermes(f"<tool_call>{CALL}</tool_call> trailing words").content is None


def test_invalid_json_inside_the_tags_means_no_calls_and_the_whole_text_as_content():
    for text in ("<tool_call>{name: web_search}</tool_call>",  # not JSON
                 f"<tool_call>{CALL[:-1]}</tool_call>",  # cut JSON, closed
                 f"<tool_call>{CALL[:-5]}",  # cut JSON, unclosed (max_tokens mid-call)
                 "<tool_call></tool_call>",  # empty region
                 "<tool_call>\n",
                 f"Sure.<tool_call>{CALL}</tool_call><tool_call>{{oops</tool_call>"):  # one bad call spoils all
        parsed = parse_hermes(text)
        assert parsed.calls == [] and parsed.content == text and "not valid JSON" in parsed.problem, text


def test_a_call_without_a_string_name_or_without_arguments_is_not_a_call():
    for body in ('{"arguments": {"q": 1}}', '{"name": 3, "arguments": {}}', '{"name": "f"}',
                 '{"name": "f", "parameters": {"q": 1}}', '["f", {}]', '"f"'):
        text = f"<tool_call>{body}</tool_call>"
        parsed = parse_hermes(text)
        assert parsed.calls == [] and parsed.content == text and "string \"name\"" in parsed.problem, body


def test_arguments_are_reserialised_as_the_engine_does():
    unicode = parse_hermes('<tool_call>{"name": "f", "arguments": {"city": "Zürich"}}</tool_call>')
    assert unicode.calls[0]["function"]["arguments"] == '{"city": "Zürich"}'  # not \u00fc-escaped
    string = parse_hermes('<tool_call>{"name": "f", "arguments": "{\\"q\\": 1}"}</tool_call>')
    assert string.calls[0]["function"]["arguments"] == '"{\\"q\\": 1}"'  # a JSON string stays a string


def test_a_tag_inside_an_open_region_belongs_to_that_region():
    assert regions("<tool_call>a<tool_call>b</tool_call>c") == ["a<tool_call>b"]
    assert regions("x</tool_call><tool_call> y ") == [" y "]


def test_partial_tag_at_the_end_is_held_back():
    assert [partial_start(t) for t in ("Sure <", "Sure <tool_c", "Sure <tool_call", "a < b", "<tool_call>")] == \
        [1, 7, 10, 0, 0]


def test_other_parsers_are_refused_by_name():
    assert unsupported_parser("hermes") is None
    for name in ("qwen3_coder", "llama3_json", "pythonic", "mistral"):
        assert name in unsupported_parser(name) and "hermes" in unsupported_parser(name)
    # the local engine says so at start, before loading anything, in one line
    done = subprocess.run([sys.executable, "-m", "runner.worker.local_server", "--model", "unused", "--port", "1",
                           "--tool-call-parser", "qwen3_coder"], cwd=REPO, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2 and "'qwen3_coder' is not supported" in done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_the_scorer_says_why_call_text_in_the_answer_is_not_a_call():
    from runner.benchmark.harness import RequestResult
    from runner.benchmark.suites import Suite, SuitePrompt, score

    suite = Suite(name="t", scorer="tool_call", prompts=["search cats"], tools=[
        {"type": "function", "function": {"name": "web_search", "parameters": {"type": "object"}}}])
    item = SuitePrompt(prompt="search cats", expect_tool="web_search")
    unparsed = score(suite, item, RequestResult(ok=True, content=f"<tool_call>{CALL}"))
    assert unparsed[0] is False and "did not return as a call" in unparsed[1] and "web_search" in unparsed[1]
    broken = score(suite, item, RequestResult(ok=True, content="<tool_call>{oops"))
    assert broken[0] is False and "not valid JSON" in broken[1]
    plain = score(suite, item, RequestResult(ok=True, content="no call"))
    assert plain == (False, "expected web_search, called nothing")


def test_special_tool_call_tokens_survive_decoding_when_tools_are_asked(demo_tokenizer):
    """vLLM's hermes parser decodes a request with tools without dropping special tokens; a tokenizer
    that marks <tool_call> special (Hermes-style) must still show the tags to the parser."""
    pytest.importorskip("torch")
    import torch
    from transformers import AutoTokenizer

    from runner.worker.local_server import make_streamer

    tokenizer = AutoTokenizer.from_pretrained(demo_tokenizer)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<tool_call>", "</tool_call>"]})
    ids = tokenizer.encode(f"<tool_call>{CALL}</tool_call>", add_special_tokens=False) + [tokenizer.eos_token_id]

    def decoded(keep: bool) -> str:
        pieces: list[str | None] = []
        streamer = make_streamer(tokenizer, keep, pieces.append)  # the pieces go to a sink (None at the end)
        streamer.put(torch.tensor([[1, 2, 3]]))  # the prompt, skipped
        for token in ids:
            streamer.put(torch.tensor([token]))
        streamer.end()
        assert pieces[-1] is None
        return "".join(p for p in pieces if p is not None)

    kept = decoded(True)
    assert kept.strip() == f"<tool_call>{CALL}</tool_call>"  # the eos token still left out
    assert names(kept) == ["web_search"]
    assert "<tool_call>" not in decoded(False)  # without tools, special tokens are dropped as before


@pytest.mark.parametrize(("text", "form"), [
    ('{"name": "get_weather", "arguments": {"city": "Paris"}}', "a bare JSON object"),
    ('Sure:\n```json\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n```', "a fenced JSON block"),
    ('{"function": {"name": "get_weather", "arguments": "{}"}}', "a bare JSON object"),
    ('{"name": "send_email", "arguments": {}}', None),  # not one of the suite's tools
    ("The weather in Paris is sunny.", None),
    ('{"name": "get_weather", broken', None),
])
def test_a_call_in_another_form_is_recognised_but_never_parsed_as_a_call(text, form):
    from runner.benchmark.tool_calls import other_form_call

    assert other_form_call(text, {"get_weather"}) == form
    assert parse_hermes(text).calls == []  # the verdict stays the parser's


def test_the_suite_counts_other_form_calls_and_a_floor_gate_names_the_mismatch():
    from runner.benchmark.gates import evaluate
    from runner.benchmark.harness import RequestResult
    from runner.benchmark.suites import OTHER_FORM, SuitePrompt, load_suite, score
    from runner.recipe.schema import SuiteRef

    suite = load_suite(SuiteRef(name="tool_calling"))
    item = next(i for i in suite.items() if i.expect_tool)
    bare = json.dumps({"name": item.expect_tool, "arguments": {}})
    passed, why = score(suite, item, RequestResult(ok=True, content=bare))
    assert not passed and why.startswith(OTHER_FORM)
    passed, why = score(suite, SuitePrompt(prompt="x", expect_tool=item.expect_tool),
                        RequestResult(ok=True, content="I cannot help."))
    assert not passed and not why.startswith(OTHER_FORM)
    floor = {"suites": {"tools": {"passed": 0, "failed": 10, "total": 10, "pass_rate": 0.0, "other_form_calls": 7,
                                  "items": [{"prompt": str(i), "passed": False} for i in range(10)]}}}
    (v,) = evaluate([{"name": "tools", "metric": "tools.pass_rate", "op": ">=", "relative_to": "baseline"}],
                    floor, floor)
    assert v["verdict"] == "not_measurable" and "7 of its replies hold a tool call in another form" in v["reason"]
