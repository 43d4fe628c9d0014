"""Tool calls read from a model's text as vLLM's hermes and qwen3_coder parsers read a finished answer
(runner/benchmark/tool_calls.py), the one place for the rules the local engine and the tool_call scorer use."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO
from runner.benchmark.tool_calls import (
    call_start,
    parse_hermes,
    parse_qwen3_coder,
    parse_tool_calls,
    parser_from_args,
    partial_start,
    regions,
    unsupported_parser,
)

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
    assert unsupported_parser("hermes") is None and unsupported_parser("qwen3_coder") is None
    for name in ("llama3_json", "pythonic", "mistral", "qwen3_xml", ""):
        why = unsupported_parser(name)
        assert repr(name) in why and "hermes, qwen3_coder" in why and "\n" not in why
    with pytest.raises(ValueError, match="'pythonic' is not supported"):
        parse_tool_calls("x", "pythonic")
    # the local engine says so at start, before loading anything, in one line
    done = subprocess.run([sys.executable, "-m", "runner.worker.local_server", "--model", "unused", "--port", "1",
                           "--tool-call-parser", "llama3_json"], cwd=REPO, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 2 and "'llama3_json' is not supported" in done.stderr
    assert "hermes, qwen3_coder" in done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_the_parser_is_read_from_vllm_style_flags():
    assert parser_from_args(["--enable-auto-tool-choice", "--tool-call-parser", "qwen3_coder"]) == "qwen3_coder"
    assert parser_from_args(["--tool-call-parser=qwen3_coder", "--max-model-len", "8192"]) == "qwen3_coder"
    assert parser_from_args(["--tool-call-parser", "hermes", "--tool-call-parser=qwen3_coder"]) == "qwen3_coder"
    assert parser_from_args(["--reasoning-parser", "qwen3"]) is None and parser_from_args([]) is None
    assert parser_from_args(["--tool-call-parser"]) == ""  # a flag without its value: refused as ''


def test_parse_tool_calls_picks_the_parser():
    hermes_text, coder_text = f"<tool_call>{CALL}</tool_call>", "<tool_call>\n<function=f>\n</function>\n</tool_call>"
    assert [c["function"]["name"] for c in parse_tool_calls(hermes_text).calls] == ["web_search"]  # default hermes
    assert parse_tool_calls(hermes_text, "qwen3_coder").calls == []  # JSON in the tags is not a qwen3_coder call
    assert parse_tool_calls(coder_text, "hermes").calls == []
    assert [c["function"]["name"] for c in parse_tool_calls(coder_text, "qwen3_coder").calls] == ["f"]


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
    # with the server's parser: qwen3_coder reads XML (typed by the suite's tools), not hermes JSON
    xml = "Sure.\n<function=web_search>\n<parameter=query>\ncats\n</parameter>\n</function>"
    unparsed = score(suite, item, RequestResult(ok=True, content=xml), "qwen3_coder")
    assert "holds a qwen3_coder call to ['web_search']" in unparsed[1] and "--tool-call-parser qwen3_coder" in unparsed[1]
    assert score(suite, item, RequestResult(ok=True, content=xml))[1] == "expected web_search, called nothing"
    broken = score(suite, item, RequestResult(ok=True, content="<tool_call><function=web_search"), "qwen3_coder")
    assert "the answer's <tool_call> text is not a qwen3_coder call: tool call 1: no '>'" in broken[1]
    json_call = score(suite, item, RequestResult(ok=True, content=f"<tool_call>{CALL}</tool_call>"), "qwen3_coder")
    assert "not a qwen3_coder call: a <tool_call> without <function=" in json_call[1]


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


# --- qwen3_coder -------------------------------------------------------------------------------------
# vLLM's own finished-answer cases for Qwen3CoderToolParser (tests/tool_parsers/test_qwen3coder_tool_parser.py
# of vllm-project/vllm at c8e462c487ef33d25414e838b308e6f76bb01286: test_extract_tool_calls_no_tools,
# test_extract_tool_calls[...], _fallback_no_tags, _type_conversion, _missing_closing_parameter_tag,
# _complex_type_with_single_quote), with the tools and what vLLM returns for each.

WEATHER = {"type": "function", "function": {
    "name": "get_current_weather", "description": "Get the current weather",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "description": "The city name"},
        "state": {"type": "string", "description": "The state code"},
        "unit": {"type": "string", "enum": ["fahrenheit", "celsius"]}}, "required": ["city", "state"]}}}
AREA = {"type": "function", "function": {
    "name": "calculate_area", "description": "Calculate area of a shape",
    "parameters": {"type": "object", "properties": {
        "shape": {"type": "string"}, "dimensions": {"type": "object"}, "precision": {"type": "integer"}}}}}
SAMPLE_TOOLS = [WEATHER, AREA]
TYPES = [{"type": "function", "function": {"name": "test_types", "parameters": {"type": "object", "properties": {
    "int_param": {"type": "integer"}, "float_param": {"type": "float"}, "bool_param": {"type": "boolean"},
    "str_param": {"type": "string"}, "obj_param": {"type": "object"}}}}}]


def weather(city: str, state: str, unit: str = "fahrenheit") -> str:
    return (f"<tool_call>\n<function=get_current_weather>\n<parameter=city>\n{city}\n</parameter>\n"
            f"<parameter=state>\n{state}\n</parameter>\n<parameter=unit>\n{unit}\n</parameter>\n</function>\n"
            "</tool_call>")


def area(shape: str, dimensions: str, precision: int) -> str:
    return (f"<tool_call>\n<function=calculate_area>\n<parameter=shape>\n{shape}\n</parameter>\n"
            f"<parameter=dimensions>\n{dimensions}\n</parameter>\n<parameter=precision>\n{precision}\n</parameter>\n"
            "</function>\n</tool_call>")


DALLAS = ("get_current_weather", {"city": "Dallas", "state": "TX", "unit": "fahrenheit"})
VLLM_CODER_CASES = [
    ("single_tool", weather("Dallas", "TX"), [DALLAS], None),
    ("single_tool_with_content", "Sure! Let me check the weather for you." + weather("Dallas", "TX"), [DALLAS],
     "Sure! Let me check the weather for you."),
    ("single_tool_multiline_param", area("rectangle", '{"width": 10, \n "height": 20}', 2),
     [("calculate_area", {"shape": "rectangle", "dimensions": {"width": 10, "height": 20}, "precision": 2})], None),
    ("parallel_tools", weather("Dallas", "TX") + "\n" + weather("Orlando", "FL"),
     [DALLAS, ("get_current_weather", {"city": "Orlando", "state": "FL", "unit": "fahrenheit"})], None),
    ("tool_with_typed_params", "Let me calculate that area for you." + area("circle", '{"radius": 15.5}', 3),
     [("calculate_area", {"shape": "circle", "dimensions": {"radius": 15.5}, "precision": 3})],
     "Let me calculate that area for you."),
    ("fallback_no_tags", "<function=get_current_weather>\n<parameter=city>\nDallas\n</parameter>\n"
     "<parameter=state>\nTX\n</parameter>\n</function>",
     [("get_current_weather", {"city": "Dallas", "state": "TX"})], None),
    ("missing_closing_parameter_tag", "Let me check the weather for you:\n" + weather("Dallas", "TX").replace(
        "Dallas\n</parameter>", "Dallas", 1), [DALLAS], "Let me check the weather for you:\n"),
]


def calls_of(parsed) -> list[tuple[str, dict]]:
    return [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in parsed.calls]


@pytest.mark.parametrize(("text", "expected", "content"), [c[1:] for c in VLLM_CODER_CASES],
                         ids=[c[0] for c in VLLM_CODER_CASES])
def test_vllms_own_qwen3_coder_cases(text, expected, content):
    parsed = parse_qwen3_coder(text, SAMPLE_TOOLS)
    assert calls_of(parsed) == expected and parsed.content == content and parsed.problem is None
    assert [c["index"] for c in parsed.calls] == list(range(len(expected)))
    assert all(c["type"] == "function" and c["id"].startswith("call_") for c in parsed.calls)


def test_vllms_qwen3_coder_no_tools_and_type_cases():
    text = "This is a test response without any tool calls"
    assert parse_qwen3_coder(text).calls == [] and parse_qwen3_coder(text).content == text
    typed = parse_qwen3_coder("<tool_call>\n<function=test_types>\n<parameter=int_param>\n42\n</parameter>\n"
                              "<parameter=float_param>\n3.14\n</parameter>\n<parameter=bool_param>\ntrue\n</parameter>\n"
                              "<parameter=str_param>\nhello world\n</parameter>\n<parameter=obj_param>\n"
                              '{"key": "value"}\n</parameter>\n</function>\n</tool_call>', TYPES)
    assert calls_of(typed) == [("test_types", {"int_param": 42, "float_param": 3.14, "bool_param": True,
                                               "str_param": "hello world", "obj_param": {"key": "value"}})]
    quoted = parse_qwen3_coder("<tool_call>\n<function=test_types>\n<parameter=obj_param>\n{'key': 'value'}\n"
                               "</parameter>\n</function>\n</tool_call>", TYPES)
    assert calls_of(quoted) == [("test_types", {"obj_param": {"key": "value"}})]  # json fails, literal_eval reads it


def convert(value: str, schema: dict | None) -> object:
    """One parameter's value as qwen3_coder converts it, the parameter typed by `schema` (None: not in it)."""
    props = {"p": schema} if schema is not None else {"other": {"type": "integer"}}
    text = f"<tool_call>\n<function=f>\n<parameter=p>\n{value}\n</parameter>\n</function>\n</tool_call>"
    parsed = parse_qwen3_coder(text, [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": props}}}])
    return json.loads(parsed.calls[0]["function"]["arguments"])["p"]


@pytest.mark.parametrize(("value", "schema", "expected"), [
    ("null", {"type": "integer"}, None), ("NULL", {"type": "string"}, None), ("Null", None, None),
    ("42", None, "42"),  # a parameter the schema does not name stays a string
    ("42", {"description": "no type"}, "42"), ("42", {"type": "enum"}, "42"), ("42", {"type": "STRING "}, "42"),
    ("42", {"type": "integer"}, 42), (" 42 ", {"type": "int64"}, 42), ("4.2", {"type": "integer"}, "4.2"),
    ("7", {"type": "unsigned"}, 7), ("x", {"type": "long"}, "x"),
    ("3.0", {"type": "number"}, 3), ("3.5", {"type": "number"}, 3.5), ("1e3", {"type": "float"}, 1000),
    ("nan", {"type": "number"}, "nan"),  # int(nan) is a ValueError: the string stays
    ("True", {"type": "boolean"}, True), ("yes", {"type": "boolean"}, False), ("FALSE", {"type": "bool"}, False),
    ('[1, "a"]', {"type": "array"}, [1, "a"]), ("[1, 'a']", {"type": "array"}, [1, "a"]),
    ("{1: 2", {"type": "object"}, "{1: 2"),  # neither JSON nor a literal: the string
    ("(1, 2)", {"type": "list"}, [1, 2]),  # a tuple from literal_eval, a JSON list in the arguments
    ("None", {"type": "null"}, None), ("'s'", {"type": "any"}, "s"), ("hello", {"type": "any"}, "hello"),
    ("5", {"type": ["integer", "null"]}, 5),  # a list of types: str() of it, then literal_eval
    ("line one\n\nline three", {"type": "string"}, "line one\n\nline three"),
])
def test_qwen3_coder_converts_values_by_the_schema_type(value, schema, expected):
    assert convert(value, schema) == expected


def test_qwen3_coder_schema_lookup():
    text = "<function=f>\n<parameter=n>\n5\n</parameter>\n</function>"
    as_int = [("f", {"n": 5})]
    no_properties = [{"type": "function", "function": {"name": "f", "parameters": {"n": {"type": "integer"}}}}]
    assert calls_of(parse_qwen3_coder(text, no_properties)) == as_int  # parameters read as the properties
    untyped_tool = [{"function": {"name": "f", "parameters": {"properties": {"n": {"type": "integer"}}}}}]
    assert calls_of(parse_qwen3_coder(text, untyped_tool)) == as_int  # type defaults to function, as in vLLM
    for tools in (None, [], [{"type": "function", "function": {"name": "g", "parameters": no_properties}}],
                  [{"type": "function", "function": {"name": "f"}}]):
        assert calls_of(parse_qwen3_coder(text, tools)) == [("f", {"n": "5"})], tools


def test_qwen3_coder_missing_closing_tags_and_whitespace():
    # an answer cut after a value: the parameter, function and region run to the end (before a final newline)
    assert calls_of(parse_qwen3_coder("<tool_call>\n<function=f>\n<parameter=q>\ncats\n")) == [("f", {"q": "cats"})]
    # (the region stops before the final newline, the value's own newline is dropped: both go)
    assert calls_of(parse_qwen3_coder("<tool_call>\n<function=f>\n<parameter=q>\ncats\n\n")) == [("f", {"q": "cats"})]
    assert calls_of(parse_qwen3_coder("<function=f>\n<parameter=q>\ncats\n\n\n")) == [("f", {"q": "cats\n"})]
    assert calls_of(parse_qwen3_coder("<tool_call><function=f><parameter=q>cats</function></tool_call>")) == \
        [("f", {"q": "cats"})]
    assert calls_of(parse_qwen3_coder("<function=f>")) == [("f", {})]
    # only one newline is dropped at each end; the name is not stripped
    assert calls_of(parse_qwen3_coder("<function=f><parameter=q>\n\n a \n\n</parameter></function>")) == \
        [("f", {"q": "\n a \n"})]
    assert calls_of(parse_qwen3_coder("<function= f >\n</function>")) == [(" f ", {})]
    # a name given twice keeps the last value; text between parameters is dropped
    assert calls_of(parse_qwen3_coder("<function=f><parameter=q>a</parameter>junk<parameter=q>b</parameter>"
                                      "</function>")) == [("f", {"q": "b"})]


def test_qwen3_coder_calls_content_and_dropped_text():
    two = "<function=f>\n</function>\n<function=g>\n</function>"
    parsed = parse_qwen3_coder(f"Let me see.\n<tool_call>\n{two}\n</tool_call>\nDone.")
    assert [c["function"]["name"] for c in parsed.calls] == ["f", "g"] and parsed.content == "Let me see.\n"
    # content stops at the first <tool_call> even when the function is elsewhere
    parsed = parse_qwen3_coder("A <function=f></function> B <tool_call><function=g></function></tool_call>")
    assert [c["function"]["name"] for c in parsed.calls] == ["g"] and parsed.content == "A <function=f></function> B "
    parsed = parse_qwen3_coder("Checking. <function=f></function> trailing")
    assert parsed.content == "Checking. " and [c["function"]["name"] for c in parsed.calls] == ["f"]


@pytest.mark.parametrize(("text", "problem"), [
    ('<tool_call>{"name": "f", "arguments": {}}</tool_call>', "without <function="),  # hermes JSON
    ("<function=f></function> then <tool_call>nothing</tool_call>", "no <function=NAME> inside"),
    ("<tool_call><function=f</tool_call>", "no '>' after the function name"),
    ("<tool_call><function=f><parameter=q</function></tool_call>", "no '>' after a parameter name"),
    ("<function=f><parameter=x>inf</parameter></function>", "OverflowError"),  # float('inf') has no int
    ("<function=f><parameter=x>{1, 2}</parameter></function>", "TypeError"),  # a set JSON cannot hold
    ("<function=f></function><function=g", "tool call 2"),  # one bad call spoils all
])
def test_qwen3_coder_invalid_text_means_no_calls_and_the_whole_text_as_content(text, problem):
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"properties": {"x": {"type": "any"}}}}}]
    if "inf" in text:
        tools[0]["function"]["parameters"]["properties"]["x"]["type"] = "number"
    parsed = parse_qwen3_coder(text, tools)
    assert parsed.calls == [] and parsed.content == text and problem in parsed.problem


def test_qwen3_coder_scanner_matches_vllms_patterns():
    """The scanner against the three patterns vLLM reads the format with (quoted in the module docstring),
    on random strings of the format's pieces."""
    import random
    import re

    from runner.benchmark.tool_calls import _functions, _parameters, _qwen3_regions

    region = re.compile(r"<tool_call>(.*?)</tool_call>|<tool_call>(.*?)$", re.DOTALL)
    function = re.compile(r"<function=(.*?)</function>|<function=(.*)$", re.DOTALL)
    parameter = re.compile(r"<parameter=(.*?)(?:</parameter>|(?=<parameter=)|(?=</function>)|$)", re.DOTALL)
    pieces = ["<tool_call>", "</tool_call>", "<function=", "</function>", "<parameter=", "</parameter>", "\n", "a", ">"]
    rng = random.Random(0)
    for _ in range(20000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 12)))
        assert _qwen3_regions(text) == [a or b for a, b in region.findall(text)], text
        assert _functions(text) == [a or b for a, b in function.findall(text)], text
        assert _parameters(text) == parameter.findall(text), text


def test_call_starts_per_parser():
    assert call_start("Sure <function=f>", "qwen3_coder") == 5 and call_start("Sure <function=f>", "hermes") == -1
    assert call_start("a<tool_call><function=f>", "qwen3_coder") == 1 and call_start("plain", "qwen3_coder") == -1
    assert [partial_start(t, "qwen3_coder") for t in ("Sure <", "Sure <func", "Sure <tool_c", "<function", "a")] == \
        [1, 5, 7, 9, 0]


# --- the recipe's parser reaches the local engine ------------------------------------------------------


def serving_input(engine: str, args: list[str]):
    from runner.recipe.schema import ServeSpec
    from runner.steps.inputs import ServingInput

    return ServingInput(serve=ServeSpec(engine=engine, container="local", args=args), container="local",
                        dtype="bfloat16")


@pytest.mark.parametrize(("args", "passed"), [
    (["--enable-auto-tool-choice", "--tool-call-parser", "qwen3_coder"], ["--tool-call-parser=qwen3_coder"]),
    (["--tool-call-parser=qwen3_coder", "--reasoning-parser", "qwen3"], ["--tool-call-parser=qwen3_coder"]),
    (["--tool-call-parser", "hermes"], ["--tool-call-parser=hermes"]),
    (["--max-model-len", "8192"], []),  # none named: the server's default (hermes); vLLM's other flags stay out
])
def test_serving_passes_the_recipes_parser_to_the_local_engine(args, passed, tmp_path):
    from runner.serving.local import local_server_command

    command = local_server_command(serving_input("local", args), tmp_path, 8000, "cand")
    assert command[1:3] == ["-m", "runner.worker.local_server"]
    assert [a for a in command if a.startswith("--tool-call-parser")] == passed
    assert "--max-model-len" not in command and "--enable-auto-tool-choice" not in command


def test_a_local_recipe_on_the_qwen35_base_serves_with_qwen3_coder(monkeypatch, tmp_path):
    """tests/recipes/tiny-qwen35.yaml (serve.engine: local on recipes/base/qwen35.yaml, whose vLLM flags say
    qwen3_coder): the local engine is started with that parser, no longer hermes whatever the recipe says."""
    from runner.recipe.loader import load_recipe
    from runner.serving.local import local_server_command
    from runner.steps.inputs import ServingInput

    monkeypatch.setenv("TINY_QWEN35_DIR", str(tmp_path))
    recipe = load_recipe(REPO / "tests" / "recipes" / "tiny-qwen35.yaml").recipe
    assert recipe.serve.engine == "local" and parser_from_args(recipe.serve.args) == "qwen3_coder"
    spec = ServingInput(serve=recipe.serve, container="local", dtype="bfloat16")
    assert "--tool-call-parser=qwen3_coder" in local_server_command(spec, tmp_path, 8000, "cand")


def test_a_local_recipe_with_a_parser_the_engine_lacks_is_refused_before_any_step(tmp_path):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=r"tool-call parser 'pythonic' is not supported by the local engine"):
        serving_input("local", ["--enable-auto-tool-choice", "--tool-call-parser=pythonic"])
    with pytest.raises(ValidationError, match=r"parser '' is not supported"):
        serving_input("local", ["--tool-call-parser"])
    assert serving_input("vllm", ["--tool-call-parser", "pythonic"])  # vLLM reads it itself
    assert serving_input("local", ["--tool-call-parser", "qwen3_coder"])
    # `recipe validate` says so, located at serve.args, before anything runs
    demo = REPO / "recipes" / "demo" / "smollm2-cpu.yaml"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"extends: {demo}\nserve:\n  args: [--enable-auto-tool-choice, --tool-call-parser, llama3_json]\n")
    done = subprocess.run([sys.executable, "-m", "runner.cli", "validate", str(recipe)], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    said = done.stdout + done.stderr
    assert done.returncode != 0 and "serve.args" in said and "'llama3_json' is not supported" in said
