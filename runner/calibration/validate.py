"""Filters for generated calibration conversations, each rejection counted by its reason.

A conversation is kept only if every assistant answer is free of markdown and of thinking or
reasoning text, every tool call names a declared tool with JSON arguments that match its schema,
its length in tokens is inside the configured range, and it is not a duplicate.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MARKDOWN = re.compile(
    r"(\*\*[^*\n]+\*\*|__[^_\n]+__|`|^\s{0,3}#{1,6}\s|^\s*[-*+]\s+\S|^\s*\d+[.)]\s+\S|^\s*>\s|\|\s*-{3,}|\[[^\]]+\]\([^)]+\))",
    re.MULTILINE)
THINKING = re.compile(
    r"(<think>|</think>|<\|?thinking\|?>|\bthinking process\b|^\s*(okay|alright|hmm),? (so )?(the user|let me|i need)"
    r"|\blet me think\b|\bi need to figure out\b|\bthe user (is asking|wants|asked)\b)",
    re.IGNORECASE | re.MULTILINE)

def tool_call_problem(call: dict[str, Any], tools: dict[str, dict[str, Any]]) -> str | None:
    """Why a tool call is unusable, or None: unknown tool, arguments not JSON, or not matching the schema."""
    from jsonschema import Draft202012Validator

    fn = call.get("function") or {}
    name = fn.get("name")
    if name not in tools:
        return "tool_unknown"
    args = fn.get("arguments")
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            return "tool_args_not_json"
    if not isinstance(args, dict):
        return "tool_args_not_json"
    if not Draft202012Validator(tools[name].get("parameters") or {}).is_valid(args):
        return "tool_args_schema"
    return None


@dataclass
class Filter:
    reject_markdown: bool
    reject_thinking: bool
    check_tool_calls: bool
    min_tokens: int
    max_tokens: int
    deduplicate: bool
    count_tokens: Callable[[str], int]
    tools: dict[str, dict[str, Any]] = field(default_factory=dict)
    seen: set[str] = field(default_factory=set)

    def problem(self, conv: dict[str, Any]) -> str | None:
        """The reason to reject a conversation, or None to keep it."""
        for msg in conv["messages"]:
            if msg["role"] != "assistant":
                continue
            content = msg.get("content") or ""
            if self.reject_thinking and (THINKING.search(content) or msg.get("reasoning_content")
                                         or msg.get("reasoning")):
                return "thinking"
            if self.reject_markdown and MARKDOWN.search(content):
                return "markdown"
            if self.check_tool_calls:
                for call in msg.get("tool_calls") or []:
                    problem = tool_call_problem(call, self.tools)
                    if problem:
                        return problem
        tokens = self.count_tokens(render_text(conv))
        conv["tokens"] = tokens
        if tokens < self.min_tokens:
            return "too_short"
        if tokens > self.max_tokens:
            return "too_long"
        if self.deduplicate:
            digest = hashlib.sha256(json.dumps(conv["messages"], sort_keys=True).encode()).hexdigest()
            if digest in self.seen:
                return "duplicate"
            self.seen.add(digest)
        return None


def render_text(conv: dict[str, Any]) -> str:
    """A plain rendering for counting tokens (ChatML-like; close to what chat templates produce)."""
    parts = []
    if conv.get("tools"):
        parts.append(json.dumps(conv["tools"]))
    for msg in conv["messages"]:
        text = msg.get("content") or ""
        for call in msg.get("tool_calls") or []:
            fn = call.get("function") or {}
            text += f"\n<tool_call>{fn.get('name')} {fn.get('arguments')}</tool_call>"
        parts.append(f"<|im_start|>{msg['role']}\n{text}<|im_end|>")
    return "\n".join(parts)


def token_counter(model_dir: Path | None) -> tuple[Callable[[str], int], str]:
    """The model's own tokenizer when its tokenizer.json is at hand; else ~4 characters a token."""
    if model_dir is not None and (model_dir / "tokenizer.json").is_file():
        try:
            from tokenizers import Tokenizer

            tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
            return (lambda text: len(tokenizer.encode(text, add_special_tokens=False).ids)), "model tokenizer"
        except ImportError:
            pass
    return (lambda text: max(1, len(text) // 4)), "estimate (characters / 4)"


def verification(accepted: list[dict[str, Any]], requirements: Any) -> dict[str, dict[str, Any]]:
    """The plan's Phase 1 checklist over the kept conversations, each with pass/fail and the number."""
    lengths = [c["tokens"] for c in accepted]
    with_tools = sum(1 for c in accepted if any(m.get("tool_calls") for m in c["messages"]))
    low, high = requirements.min_tokens, requirements.max_tokens
    covers = bool(lengths) and min(lengths) < 2 * low and max(lengths) >= high / 2
    return {
        "conversations": {"value": len(accepted), "required": f">= {requirements.min_conversations}",
                          "pass": len(accepted) >= requirements.min_conversations},
        "with_tool_calls": {"value": with_tools, "required": f">= {requirements.min_tool_call_conversations}",
                            "pass": with_tools >= requirements.min_tool_call_conversations},
        "markdown_free": {"value": "filtered", "required": "none kept", "pass": requirements.reject_markdown},
        "thinking_free": {"value": "filtered", "required": "none kept", "pass": requirements.reject_thinking},
        "length_coverage": {"value": [min(lengths), max(lengths)] if lengths else None,
                            "required": f"from below {2 * low} to at least {high // 2} tokens", "pass": covers},
    }


def histogram_png(lengths: list[int], path: Path, low: int, high: int) -> None:
    """A token-length histogram of the kept conversations."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=100)
    ax.hist(lengths, bins=min(40, max(5, len(lengths) // 5)), color="#4a7ab5")
    ax.axvline(low, color="grey", linestyle="--", linewidth=1)
    ax.axvline(high, color="grey", linestyle="--", linewidth=1)
    ax.set_xlabel("tokens per conversation")
    ax.set_ylabel("conversations")
    ax.set_title(f"calibration set: {len(lengths)} conversations")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
