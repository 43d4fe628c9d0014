"""Chat conversations in OpenAI message format, as JSONL: reading, checking, writing.

One conversation a line: {"messages": [{"role": ..., "content": ..., "tool_calls": [...]}, ...],
"tools": [...]} (tools optional). This is the calibration format the plan asks for.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from runner.calibration.validate import tool_call_problem
from runner.errors import RunnerError

ROLES = ("system", "user", "assistant", "tool")


def check_conversation(conv: Any) -> str | None:
    """What is wrong with one conversation, or None."""
    if not isinstance(conv, dict) or not isinstance(conv.get("messages"), list) or not conv["messages"]:
        return 'expected an object with a non-empty "messages" list'
    for i, msg in enumerate(conv["messages"]):
        if not isinstance(msg, dict):
            return f"messages[{i}] is not an object"
        if msg.get("role") not in ROLES:
            return f"messages[{i}].role is {msg.get('role')!r}; expected one of {', '.join(ROLES)}"
        content = msg.get("content")
        if content is not None and not isinstance(content, str):
            return f"messages[{i}].content must be a string or null"
        if content is None and not msg.get("tool_calls"):
            return f"messages[{i}] has neither content nor tool_calls"
        for j, call in enumerate(msg.get("tool_calls") or []):
            fn = call.get("function") if isinstance(call, dict) else None
            if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                return f"messages[{i}].tool_calls[{j}] needs function.name"
    if "tools" in conv and not isinstance(conv["tools"], list):
        return '"tools" must be a list of tool definitions'
    return tool_calls_problem(conv)


# What the teacher path's filter calls each tool-call problem (validate.tool_call_problem), in words.
TOOL_CALL_PROBLEMS = {
    "tool_unknown": "calls a function the conversation's \"tools\" do not declare",
    "tool_args_not_json": "has arguments that are not a JSON object",
    "tool_args_schema": "has arguments that do not match the function's parameters schema",
}


def tool_calls_problem(conv: dict[str, Any]) -> str | None:
    """Each tool call checked as generated conversations are (validate.tool_call_problem): arguments a
    JSON object matching the declared function's schema. Without "tools", only the JSON is checked."""
    declared = conv.get("tools")
    tools: dict[str, dict[str, Any]] = {}
    for tool in declared or []:
        fn = tool.get("function") if isinstance(tool, dict) else None
        if isinstance(fn, dict) and isinstance(fn.get("name"), str):
            tools[fn["name"]] = fn
    for i, msg in enumerate(conv["messages"]):
        for j, call in enumerate(msg.get("tool_calls") or []):
            name = call["function"]["name"]
            known = tools if declared is not None else {name: {}}  # nothing declared: the JSON only
            problem = tool_call_problem(call, known)
            if problem:
                return (f"messages[{i}].tool_calls[{j}] ({name}) {TOOL_CALL_PROBLEMS.get(problem, problem)} "
                        f"({problem}: the same check generated conversations pass); fix or remove the conversation")
    return None


def read_conversations(path: Path) -> list[dict[str, Any]]:
    """All conversations of a JSONL file; the first bad line raises with file:line and the reason."""
    if not path.is_file():
        raise RunnerError(f"calibration file not found: {path} (calibration.source.path)")
    out = []
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise RunnerError(f"{path}:{lineno}: not UTF-8 text (byte {exc.start} of the line); a calibration "
                                  "file is JSONL, one conversation a line") from None
            if not line.strip():
                continue
            try:
                conv = json.loads(line)
            except ValueError as exc:
                raise RunnerError(f"{path}:{lineno}: not valid JSON ({exc})") from None
            problem = check_conversation(conv)
            if problem:
                raise RunnerError(f"{path}:{lineno}: {problem}")
            out.append(conv)
    if not out:
        raise RunnerError(f"{path}: no conversations in the file")
    return out


def has_tool_calls(conv: dict[str, Any]) -> bool:
    return any(m.get("tool_calls") for m in conv["messages"])


def write_conversations(path: Path, conversations: list[dict[str, Any]]) -> str:
    """Write JSONL and return its sha256."""
    digest = hashlib.sha256()
    with path.open("w", encoding="utf-8") as fh:
        for conv in conversations:
            line = json.dumps(conv, ensure_ascii=False, sort_keys=True) + "\n"
            fh.write(line)
            digest.update(line.encode("utf-8"))
    return digest.hexdigest()
