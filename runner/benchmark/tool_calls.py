"""Tool calls in a model's text, read as the serving engine's tool-call parser reads them.

One place for the rules, used by the local engine (runner/worker/local_server.py) to answer with
`tool_calls` and by the tool_call scorer (runner/benchmark/suites.py) to explain an answer that
holds call text the server did not return as a call.

Supported parsers: `hermes` only (vLLM's `--tool-call-parser hermes`, the Qwen2.5/Qwen3/Hermes
`<tool_call>{"name": ..., "arguments": ...}</tool_call>` format). The rules follow what vLLM's
hermes parser does with a finished answer: `Hermes2ProToolParser.extract_tool_calls` in
vllm/tool_parsers/hermes_tool_parser.py (formerly vllm/entrypoints/openai/tool_parsers/), which
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

vLLM's streaming path extracts name and arguments piecewise and may return a call whose region is
not valid JSON; the local engine holds a streamed call back and parses the finished text, so it
follows the rules above in both modes.

Other vLLM parsers (qwen3_coder, llama3_json, pythonic, mistral, ...) read other formats; the
local engine refuses them by name at start (`unsupported_parser`) rather than parse a format it does
not know.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

START = "<tool_call>"
END = "</tool_call>"
SUPPORTED_PARSERS = ("hermes",)


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


def partial_start(text: str) -> int:
    """How many characters at the end of `text` could be the beginning of a <tool_call> tag (a
    stream holds them back until the next piece tells)."""
    for n in range(min(len(START) - 1, len(text)), 0, -1):
        if text.endswith(START[:n]):
            return n
    return 0


def unsupported_parser(name: str) -> str | None:
    """None for a parser this module implements, else the one-line reason."""
    if name in SUPPORTED_PARSERS:
        return None
    return (f"tool-call parser {name!r} is not supported by the local engine (it parses "
            f"{', '.join(SUPPORTED_PARSERS)} only: <tool_call>{{JSON}}</tool_call>); serve this model with "
            f"serve.engine: vllm, or use a model whose chat template emits the hermes format")


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
