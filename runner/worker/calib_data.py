"""Calibration batches: chat conversations rendered with the model's own chat template.

Samples are sorted by length before batching so that padding stays small; the attention mask keeps
padding out of attention, and the summary reports how many padding tokens there were.
"""

from __future__ import annotations

import contextlib
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class CalibrationSet:
    token_ids: list[list[int]]  # one list of ids per sample, truncated to max_length
    pad_id: int

    @property
    def tokens(self) -> int:
        return sum(len(ids) for ids in self.token_ids)

    @property
    def longest(self) -> int:
        return max(len(ids) for ids in self.token_ids)

    def batches(self, batch_size: int, device: Any) -> list[dict[str, Any]]:
        """Right-padded batches of similar-length samples, each with input_ids and attention_mask."""
        import torch

        order = sorted(range(len(self.token_ids)), key=lambda i: len(self.token_ids[i]), reverse=True)
        out = []
        for start in range(0, len(order), batch_size):
            group = [self.token_ids[i] for i in order[start:start + batch_size]]
            width = max(len(ids) for ids in group)
            ids = torch.full((len(group), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(group), width), dtype=torch.long)
            for row, sample in enumerate(group):
                ids[row, :len(sample)] = torch.tensor(sample, dtype=torch.long)
                mask[row, :len(sample)] = 1
            out.append({"input_ids": ids.to(device), "attention_mask": mask.to(device)})
        return out

    def padding_tokens(self, batch_size: int) -> int:
        lengths = sorted((len(ids) for ids in self.token_ids), reverse=True)
        return sum(max(lengths[i:i + batch_size]) * len(lengths[i:i + batch_size]) - sum(lengths[i:i + batch_size])
                   for i in range(0, len(lengths), batch_size))


def render(tokenizer: Any, conversation: dict[str, Any]) -> str:
    """One conversation as the model sees it, tools included where the template supports them."""
    messages = []
    for msg in conversation["messages"]:
        msg = dict(msg)
        # Templates expect tool-call arguments as a mapping; the OpenAI format carries a JSON string.
        for call in msg.get("tool_calls") or []:
            fn = call.get("function", {})
            if isinstance(fn.get("arguments"), str):
                with contextlib.suppress(ValueError):
                    fn["arguments"] = json.loads(fn["arguments"])
        if msg.get("content") is None:
            msg["content"] = ""
        messages.append(msg)
    return tokenizer.apply_chat_template(messages, tools=conversation.get("tools") or None, tokenize=False)


def load_calibration(path: Path, tokenizer: Any, samples: int, max_length: int, seed: int) -> CalibrationSet:
    conversations = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    random.Random(seed).shuffle(conversations)
    # Fewer conversations than samples: reuse them (the record says how many were distinct).
    chosen = [conversations[i % len(conversations)] for i in range(samples)]
    token_ids = []
    for conv in chosen:
        text = render(tokenizer, conv)
        ids = tokenizer(text, add_special_tokens=False, truncation=True, max_length=max_length)["input_ids"]
        token_ids.append(list(ids))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    return CalibrationSet(token_ids, pad_id)
