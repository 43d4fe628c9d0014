"""Tool calls in a model's text, read as the serving engine's tool-call parser reads them.

One place for the rules, used by the local engine (runner/worker/local_server.py) to answer with
`tool_calls` and by the tool_call scorer (runner/benchmark/suites.py) to explain an answer that
holds call text the server did not return as a call.

Supported parsers, named as vLLM's `--tool-call-parser` names them (`parse_tool_calls(text, parser,
tools)` picks one; `hermes` when the recipe names none):

`hermes`: the Qwen2.5/Qwen3/Hermes `<tool_call>{"name": ..., "arguments": ...}</tool_call>` format. The
rules follow what vLLM's hermes parser does with a finished answer: `Hermes2ProToolParser.extract_tool_calls`
in vllm/tool_parsers/hermes_tool_parser.py (formerly vllm/entrypoints/openai/tool_parsers/), which
finds regions with `<tool_call>(.*?)</tool_call>|<tool_call>(.*)` (DOTALL), `json.loads` each,
reads `["name"]` and `["arguments"]` and falls back to plain content on any error; its own cases
(tests/tool_parsers/test_hermes_tool_parser.py: no call, call between tags, call until eos, invalid
JSON) are in tests/test_tool_call_parser.py:

- no `<tool_call>` in the text: no calls, the whole text is the content;
- every `<tool_call>...</tool_call>` region is one call, in order; a final `<tool_call>` without
  its closing tag runs to the end of the text (an answer cut by max_tokens or an end-of-turn token
  right after the JSON still calls);
- each region is JSON (whitespace and newlines around it are fine) with a string `name` and an
  `arguments` member of any JSON value, re-serialised as the call's `arguments` string; a
  `parameters` member is not read as arguments;
- one region that is not such an object (invalid JSON, no `name`, no `arguments`, an empty
  region) and the answer has no calls at all: the whole text, tags included, is the content;
- with calls, the content is the text before the first `<tool_call>` (None when empty); text
  between or after calls is dropped.

`qwen3_coder`: the Qwen3-Coder / Qwen3.5 / Qwen3-Next XML format

    <tool_call>
    <function=get_weather>
    <parameter=city>
    Paris
    </parameter>
    </function>
    </tool_call>

The rules follow `Qwen3CoderToolParser.extract_tool_calls` in vllm/tool_parsers/qwen3coder_tool_parser.py
(vllm-project/vllm at 0b13f933b50e82c737922f22455d2392d48b8584; the finished-answer path is the same in
vllm/entrypoints/openai/tool_parsers/qwen3coder_tool_parser.py at 1936cf3841edb9781b06c50fc4daf4bac9d3b23e),
written here without its code; its finished-answer cases (tests/tool_parsers/test_qwen3coder_tool_parser.py)
are in tests/test_tool_call_parser.py. vLLM reads the text with three DOTALL patterns, which the scanner
below reproduces (Python's `$`: the end of the text, or just before a final newline):
regions `<tool_call>(.*?)</tool_call>|<tool_call>(.*?)$`, functions `<function=(.*?)</function>|<function=(.*)$`,
parameters `<parameter=(.*?)(?:</parameter>|(?=<parameter=)|(?=</function>)|$)`.

- no `<function=` in the text: no calls, the whole text is the content (a `<tool_call>` holding JSON, the
  hermes format, is not a call here);
- the `<tool_call>` regions as for hermes, except that an unclosed last one stops before a final newline;
  with no `<tool_call>` at all, the whole text is the one region (a bare `<function=...>` still calls);
- every `<function=...</function>` in a region is one call, in order, an unclosed last one running to the
  end of its region; no function in any region: no calls, the whole text is the content;
- the name is the text up to the first `>` (not stripped), the parameters each `<parameter=NAME>` up to
  `</parameter>`, the next `<parameter=`, a `</function>`, or the end; a missing `</parameter>` is no
  error. One newline is dropped at each end of a value; a name given twice keeps the last value;
- values are converted by the type the request's tool schema gives the parameter
  (`function.parameters.properties`, or `function.parameters` itself when it has no `properties`):
  `null` (any case) is None whatever the type; a parameter the schema does not name, or a tool not in the
  request, stays a string; string/str/text/varchar/char/enum stay strings; int*/uint*/long*/short*/unsigned*
  go through `int()`, num*/float* through `float()` (a whole number becomes an int), each left a string
  when that fails; boolean/bool/binary are `value.lower() == "true"`; object/array/arr/dict*/list* go through
  `json.loads`, and those and any other type (a list of types included) then through `ast.literal_eval`,
  the string kept when that fails;
- arguments are `json.dumps(params, ensure_ascii=False)`;
- any error on the way (a function or parameter without `>` after its name, a value `float()` reads as
  infinite, a literal JSON cannot hold such as a set) and the answer has no calls: the whole text is the
  content;
- with calls, the content is the text before the first `<tool_call>`, or before the first `<function=`
  when there is none (None when empty); text between or after calls is dropped.

vLLM's streaming paths extract name and arguments piecewise and may differ from the finished-answer rules
on malformed text; the local engine holds a streamed call back from its first start marker (`call_start`)
and parses the finished text, so it follows the rules above in both modes.

Other vLLM parsers (llama3_json, pythonic, mistral, ...) read other formats; the local engine refuses
them by name at start (`unsupported_parser`), and `recipe validate` refuses a recipe that would serve
with one on the local engine, rather than parse a format it does not know.
"""

from __future__ import annotations

import ast
import json
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

START = "<tool_call>"
END = "</tool_call>"
FUNCTION, FUNCTION_END = "<function=", "</function>"
PARAMETER, PARAMETER_END = "<parameter=", "</parameter>"
DEFAULT_PARSER = "hermes"  # what the local engine reads when the recipe names no --tool-call-parser
SUPPORTED_PARSERS = ("hermes", "qwen3_coder")
# Where a call may begin in each parser's format: a stream holds its text back from the first of these.
CALL_STARTS: dict[str, tuple[str, ...]] = {"hermes": (START,), "qwen3_coder": (START, FUNCTION)}


@dataclass
class ParsedAnswer:
    content: str | None
    calls: list[dict[str, Any]] = field(default_factory=list)  # OpenAI message tool_calls, with "index"
    problem: str | None = None  # why the call text did not parse (then calls is empty)


def regions(text: str) -> list[str]:
    """The text inside each <tool_call> region, the last one possibly unclosed (to the end of the text)."""
    found, pos = [], 0
    while (start := text.find(START, pos)) >= 0:
        body = start + len(START)
        end = text.find(END, body)
        if end < 0:
            found.append(text[body:])
            break
        found.append(text[body:end])
        pos = end + len(END)
    return found


def parse_hermes(text: str) -> ParsedAnswer:
    """The content and tool calls of a finished answer, as vLLM's hermes parser returns them."""
    if START not in text:
        return ParsedAnswer(text)
    calls = []
    for i, region in enumerate(regions(text)):
        try:
            data = json.loads(region)
        except ValueError as exc:
            return ParsedAnswer(text, problem=f"tool call {i + 1} is not valid JSON ({exc})")
        if not isinstance(data, dict) or not isinstance(data.get("name"), str) or "arguments" not in data:
            return ParsedAnswer(text, problem=f"tool call {i + 1} is not an object with a string \"name\" and "
                                              f"\"arguments\": {region.strip()[:80]!r}")
        calls.append({"id": f"call_{uuid.uuid4().hex[:12]}", "type": "function", "index": i,
                      "function": {"name": data["name"],
                                   "arguments": json.dumps(data["arguments"], ensure_ascii=False)}})
    content = text[:text.find(START)]
    return ParsedAnswer(content or None, calls)


def parse_tool_calls(text: str, parser: str = DEFAULT_PARSER,
                     tools: Sequence[dict[str, Any]] | None = None) -> ParsedAnswer:
    """The content and tool calls of a finished answer, as vLLM's `--tool-call-parser PARSER` returns them.
    `tools`: the request's tool definitions (OpenAI form), which qwen3_coder converts values by."""
    if parser == "hermes":
        return parse_hermes(text)
    if parser == "qwen3_coder":
        return parse_qwen3_coder(text, tools)
    raise ValueError(unsupported_parser(parser))


class _Unparsed(Exception):
    """Call text vLLM's parser gives up on (then the whole answer is content)."""


def _dollar(text: str, pos: int) -> int:
    """Where a lazy `(.*?)$` that starts at `pos` stops: just before a final newline, else at the end."""
    return len(text) - 1 if text.endswith("\n") and len(text) - 1 >= pos else len(text)


def _qwen3_regions(text: str) -> list[str]:
    """The <tool_call> regions as qwen3_coder finds them: like `regions`, but an unclosed last region
    stops before a final newline (the lazy `$` of its pattern)."""
    found, pos = [], 0
    while (start := text.find(START, pos)) >= 0:
        body = start + len(START)
        end = text.find(END, body)
        if end < 0:
            found.append(text[body:_dollar(text, body)])
            break
        found.append(text[body:end])
        pos = end + len(END)
    return found


def _functions(region: str) -> list[str]:
    """What follows each `<function=` of a region, up to its `</function>` or (the last) to the region's end."""
    found, pos = [], 0
    while (start := region.find(FUNCTION, pos)) >= 0:
        body = start + len(FUNCTION)
        end = region.find(FUNCTION_END, body)
        if end < 0:
            found.append(region[body:])  # greedy to the very end: a final newline included
            break
        found.append(region[body:end])
        pos = end + len(FUNCTION_END)
    return found


def _parameters(body: str) -> list[str]:
    """`NAME>value` of each `<parameter=`: the value ends at `</parameter>` (consumed), or where the next
    `<parameter=` or a `</function>` begins, or at the end (before a final newline)."""
    found, pos = [], 0
    while (start := body.find(PARAMETER, pos)) >= 0:
        at = start + len(PARAMETER)
        stops = [i for i in (body.find(PARAMETER_END, at), body.find(PARAMETER, at), body.find(FUNCTION_END, at))
                 if i >= 0]
        stop = min([*stops, _dollar(body, at)])
        found.append(body[at:stop])
        pos = stop + len(PARAMETER_END) if body.startswith(PARAMETER_END, stop) else stop
    return found


def _schema_properties(name: str, tools: Sequence[dict[str, Any]] | None) -> Any:
    """The request's schema for the named tool's parameters: `properties`, else the parameters object
    itself, else {} (no such tool, or no parameters)."""
    for tool in tools or []:
        function = tool.get("function") if isinstance(tool, dict) else None
        # vLLM's request model defaults a tool's type to "function"
        if not isinstance(function, dict) or "name" not in function or tool.get("type", "function") != "function":
            continue
        if function["name"] == name:
            params = function.get("parameters")
            if isinstance(params, dict):
                return params.get("properties", params)
            return {}
    return {}


_STRING_TYPES = ("string", "str", "text", "varchar", "char", "enum")
_INT_PREFIXES = ("int", "uint", "long", "short", "unsigned")


def _convert(value: str, name: str, properties: Any) -> Any:
    """A parameter's value as qwen3_coder types it by the schema (module docstring). Errors other than
    the ones each conversion expects propagate: vLLM then gives up on the whole answer."""
    if value.lower() == "null":
        return None
    if name not in properties:
        return value
    spec = properties[name]
    kind = str(spec["type"]).strip().lower() if isinstance(spec, dict) and "type" in spec else "string"
    if kind in _STRING_TYPES:
        return value
    if kind.startswith(_INT_PREFIXES):
        try:
            return int(value)
        except (ValueError, TypeError):
            return value
    if kind.startswith(("num", "float")):
        try:
            number = float(value)
            return number if number - int(number) != 0 else int(number)  # int(inf) raises OverflowError
        except (ValueError, TypeError):
            return value
    if kind in ("boolean", "bool", "binary"):
        return value.lower() == "true"
    if kind in ("object", "array", "arr") or kind.startswith(("dict", "list")):
        try:
            return json.loads(value)
        except (TypeError, ValueError):
            pass
    try:
        return ast.literal_eval(value)
    except (ValueError, SyntaxError, TypeError):
        return value


def _qwen3_call(i: int, function: str, tools: Sequence[dict[str, Any]] | None) -> dict[str, Any]:
    if ">" not in function:
        raise _Unparsed(f"tool call {i + 1}: no '>' after the function name <function={function.strip()[:40]!r}")
    name, body = function.split(">", 1)
    properties = _schema_properties(name, tools)
    params: dict[str, Any] = {}
    for raw in _parameters(body):
        if ">" not in raw:
            raise _Unparsed(f"tool call {i + 1} ({name}): no '>' after a parameter name <parameter={raw[:40]!r}")
        key, value = raw.split(">", 1)
        value = value.removeprefix("\n").removesuffix("\n")
        params[key] = _convert(value, key, properties)
    return {"id": f"call_{uuid.uuid4().hex[:12]}", "type": "function", "index": i,
            "function": {"name": name, "arguments": json.dumps(params, ensure_ascii=False)}}


def parse_qwen3_coder(text: str, tools: Sequence[dict[str, Any]] | None = None) -> ParsedAnswer:
    """The content and tool calls of a finished answer, as vLLM's qwen3_coder parser returns them."""
    if FUNCTION not in text:
        problem = f"a {START} without {FUNCTION}NAME> in it" if START in text else None
        return ParsedAnswer(text, problem=problem)
    functions = [f for region in (_qwen3_regions(text) or [text]) for f in _functions(region)]
    if not functions:
        return ParsedAnswer(text, problem=f"no {FUNCTION}NAME> inside a {START} region")
    try:
        calls = [_qwen3_call(i, f, tools) for i, f in enumerate(functions)]
    except _Unparsed as exc:
        return ParsedAnswer(text, problem=str(exc))
    except Exception as exc:  # noqa: BLE001 - vLLM gives up on the answer on any error, so do we
        return ParsedAnswer(text, problem=f"a parameter value could not be converted ({type(exc).__name__}: {exc})")
    at = text.find(START)
    content = text[:at if at >= 0 else text.find(FUNCTION)]
    return ParsedAnswer(content or None, calls)


def call_start(text: str, parser: str = DEFAULT_PARSER) -> int:
    """Where the first call may begin in `text` (the earliest start marker of the parser's format), or -1."""
    found = [i for i in (text.find(m) for m in CALL_STARTS[parser]) if i >= 0]
    return min(found, default=-1)


def partial_start(text: str, parser: str = DEFAULT_PARSER) -> int:
    """How many characters at the end of `text` could be the beginning of a start marker of the parser's
    format (a stream holds them back until the next piece tells)."""
    held = 0
    for marker in CALL_STARTS[parser]:
        for n in range(min(len(marker) - 1, len(text)), held, -1):
            if text.endswith(marker[:n]):
                held = n
                break
    return held


def parser_from_args(args: Sequence[str]) -> str | None:
    """The `--tool-call-parser` of vLLM-style server flags (`--tool-call-parser X` or `--tool-call-parser=X`;
    the last one wins, as with argparse), None when absent, "" when the flag has no value."""
    found = None
    for i, arg in enumerate(args):
        if arg == "--tool-call-parser":
            found = args[i + 1] if i + 1 < len(args) else ""
        elif arg.startswith("--tool-call-parser="):
            found = arg.split("=", 1)[1]
    return found


def unsupported_parser(name: str) -> str | None:
    """None for a parser this module implements, else the one-line reason."""
    if name in SUPPORTED_PARSERS:
        return None
    return (f"tool-call parser {name!r} is not supported by the local engine (it implements "
            f"{', '.join(SUPPORTED_PARSERS)}); serve this model with serve.engine: vllm, or set "
            f"--tool-call-parser to one of those if the model's chat template emits that format")


_FENCED = re.compile(r"```(?:json)?\s*(\{.*?\})\s*```", re.DOTALL)


def other_form_call(text: str, tool_names: set[str]) -> str | None:
    """A tool call written in a form the engine's parser does not read: a fenced JSON block or a bare JSON
    object naming one of the tools (`{"name": "get_weather", "arguments": {...}}`). The scorer counts these
    so that a format mismatch (the model calls, the parser does not see it) shows as such, not as a model
    that never calls; the verdict stays the parser's."""
    candidates = [("a fenced JSON block", m.group(1)) for m in _FENCED.finditer(text)]
    stripped = text.strip()
    if stripped.startswith("{") and stripped.endswith("}"):
        candidates.append(("a bare JSON object", stripped))
    for form, candidate in candidates:
        try:
            obj = json.loads(candidate)
        except ValueError:
            continue
        name = obj.get("name") if isinstance(obj, dict) else None
        if isinstance(obj, dict) and isinstance(obj.get("function"), dict):
            name = obj["function"].get("name")
        if isinstance(name, str) and name in tool_names:
            return form
    return None
