"""User prompts for each calibration category, drawn deterministically from the recipe's sources.

Sources: inline `prompts`, `prompt_files` (JSON list, JSON object holding a list, or JSONL; strings or
records with a `field`), and `templates` with `{placeholders}` filled from `fill`. With `languages`,
each conversation asks for answers in one of them. Conversation N of a category always gets the
same prompts for the same recipe, so a resumed run regenerates exactly what is missing.
"""

from __future__ import annotations

import itertools
import json
import random
import string
from pathlib import Path
from typing import Any

from runner.errors import RunnerError
from runner.recipe.schema import Category


def read_prompt_file(path: Path, field: str | None) -> list[str]:
    """Prompt strings from a JSON or JSONL file."""
    if not path.is_file():
        raise RunnerError(f"prompt file not found: {path} (calibration.source.categories[].prompt_files)")
    text = path.read_text(encoding="utf-8")
    try:
        data: Any = json.loads(text)
        records = data if isinstance(data, list) else next(
            (v for v in data.values() if isinstance(v, list)), None) if isinstance(data, dict) else None
        if records is None:
            raise RunnerError(f"{path}: expected a JSON list of prompts (or an object holding one)")
    except json.JSONDecodeError:
        records = []
        for lineno, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise RunnerError(f"{path}:{lineno}: neither JSON nor JSONL ({exc.msg})") from None
    prompts = []
    for i, record in enumerate(records):
        value = record.get(field) if isinstance(record, dict) and field else record
        if not isinstance(value, str) or not value.strip():
            where = f"field {field!r} of " if field else ""
            raise RunnerError(f"{path}: {where}record {i} is not a non-empty string; set `field:` to the key "
                              "that holds the prompt")
        prompts.append(value.strip())
    return prompts


def expand_templates(templates: list[str], fill: dict[str, list[str]]) -> list[str]:
    """Every combination of placeholder values, for every template."""
    out = []
    for template in templates:
        names = [name for _, name, _, _ in string.Formatter().parse(template) if name]
        missing = [n for n in names if n not in fill]
        if missing:
            raise RunnerError(f"template {template!r} uses {{{missing[0]}}}, which `fill:` does not define")
        for values in itertools.product(*(fill[n] for n in names)):
            out.append(template.format(**dict(zip(names, values, strict=True))))
    return out


class PromptPool:
    """All prompts of one category; `for_conversation(i)` gives conversation i its user turns.

    With `eval_split`, a seeded share of the distinct prompts (at least one, never all) is set aside as
    `eval_prompts`: no calibration conversation asks them, so a suite built from them is held out."""

    def __init__(self, category: Category, seed: int, eval_split: float = 0.0):
        self.category = category
        self.seed = seed
        prompts = list(category.prompts)
        for source in category.prompt_files:
            prompts += read_prompt_file(source.path, source.field)
        prompts += expand_templates(category.templates, category.fill)
        if not prompts:
            raise RunnerError(f"calibration category {category.name!r} has no prompts: give `prompts`, "
                              "`prompt_files` or `templates`")
        distinct = list(dict.fromkeys(prompts))
        held: set[str] = set()
        if eval_split > 0 and len(distinct) >= 2:
            order = list(distinct)
            random.Random(f"{seed}:{category.name}:eval").shuffle(order)
            held = set(order[:min(max(1, round(len(distinct) * eval_split)), len(distinct) - 1)])
        self.eval_prompts = [p for p in distinct if p in held][:category.count]
        self.prompts = [p for p in prompts if p not in held]

    def for_conversation(self, index: int) -> tuple[list[str], str | None]:
        """(user prompts for each turn, the language to answer in or None)."""
        rng = random.Random(f"{self.seed}:{self.category.name}:{index}")
        turns = [self.prompts[(index + rng.randrange(len(self.prompts))) % len(self.prompts)]
                 if t else self.prompts[index % len(self.prompts)] for t in range(self.category.turns)]
        language = rng.choice(self.category.languages) if self.category.languages else None
        return turns, language
