"""Errors that point at the recipe: file, line, column, key, what was expected and the fix."""

from __future__ import annotations

import difflib
from dataclasses import dataclass


@dataclass(frozen=True)
class Location:
    """Where a value came from: a file and a 1-based line and column."""

    file: str
    line: int
    column: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.column}"


def format_path(path: tuple[str | int, ...]) -> str:
    """('quantization', 'strategies', 0, 'preset') -> 'quantization.strategies[0].preset'."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "(top level)"


def closest(word: str, choices: list[str] | tuple[str, ...]) -> str | None:
    """The closest valid spelling of `word`, if one is close enough to be a likely typo."""
    matches = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.6)
    return matches[0] if matches else None


@dataclass
class Problem:
    """One thing wrong with a recipe."""

    message: str
    path: tuple[str | int, ...] = ()
    location: Location | None = None
    hint: str | None = None

    def __str__(self) -> str:
        where = f"{self.location}: " if self.location else ""
        key = f"{format_path(self.path)}: " if self.path else ""
        text = f"{where}{key}{self.message}"
        if self.hint:
            text += f"\n    hint: {self.hint}"
        return text


class RecipeError(Exception):
    """A recipe (or a container plugin) is invalid. Carries every problem found, each located."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


class RunnerError(Exception):
    """A run cannot go on: a step failed, an input is missing, a tool is not installed."""


class NotImplementedStep(RunnerError):
    """A step of the plan has no implementation yet; the run stops before it instead of faking it."""


def causes(exc: BaseException) -> list[str]:
    """One line per real cause of a failure: an exception group (a TaskGroup's "unhandled errors in a
    TaskGroup") is unwrapped into the exceptions inside it, nested groups included; a RunnerError is its
    message, anything else `Type: message`."""
    if isinstance(exc, BaseExceptionGroup):
        return [line for inner in exc.exceptions for line in causes(inner)]
    text = str(exc).strip()
    if isinstance(exc, RunnerError):
        return [text or type(exc).__name__]
    return [f"{type(exc).__name__}: {text}" if text else type(exc).__name__]
