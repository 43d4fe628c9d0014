"""Train/test leakage: calibration prompts that are (near-)duplicates of the benchmark suites' prompts.

Compared are the user turns of a calibration set (each conversation's user messages, a text set's
paragraphs, a teacher's prompts) with the prompts the recipe's suites ask (after `limit`). Text is
normalised first: Unicode NFKC, lower case, apostrophes dropped ("what's" = "whats"), every other
non-letter/digit a word break, and a plural "s" dropped from words of four letters or more.

A pair overlaps when
- **exact**: the normalised texts are equal;
- **quoted**: at least half of the suite prompt's word 3-grams occur in the turn and at least 80 % of
  its content words (stop words removed) do: the prompt is copied into a longer turn, maybe edited;
- **reworded**: the content words of the two share at least 60 % of the larger set
  (|A & B| / max(|A|, |B|)), with at least two shared: the same request in other words.

The thresholds come from the shipped demo set as it was (before it was made disjoint) against every
shipped suite: at them, the 18 pairs flagged are the same request or greeting (exact copies, e.g. "What
did Priya say about the trip?"; rewordings such as "Which is heavier, a kilo of feathers ..." for
"... a kilogram of feathers ...", 0.75, or "What did Arjun say about the school fees?" for "Did
Arjun mention when the school fees are due?", 0.6). Lowering `REWORDED_WORDS` to 0.5 adds
different questions in one template ("What did Priya say about the doctor visit?" for "... about
the trip?", "How many minutes are in a day?" for "How many days are in a leap year?") along with
a few true rewordings ("What did Ravi say about the budget?" for "Remind me what Ravi told me about
the budget."): 0.6 is where no false pair is flagged. 3-grams alone would flag "What is the
capital of Karnataka?" for "... of France?" (0.75), hence the content-word condition on quoting.
The larger-set denominator keeps a long prose paragraph, which holds many words, from matching
every short prompt by chance.

Cost: an index from content words to turns, so each suite prompt is compared with the turns that
share a word with it; results are cached per calibration file (path, size, mtime) and suite set,
so `recipe validate` with 10,000 strategies on one file checks it once.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from runner.errors import RunnerError

QUOTED_GRAMS = 0.5
QUOTED_WORDS = 0.8
REWORDED_WORDS = 0.6
N = 3

_STOP = """
a an the and or but if then so of in on at to for from by with about into over under up down out off as
is are was were be been being am do does did done have has had having will would can could shall should
may might must i me my mine we us our you your yours he him his she her hers it its they them their
this that these those there here what whats which who whom whose when where why how than too very just
also not no nor only own same such some any all each both few more most other s t don doesnt isnt arent
please tell let lets yet now right
"""
STOP_WORDS = frozenset(_STOP.split())


def words(text: str) -> list[str]:
    """The normalised words of a text (see the module docstring)."""
    text = unicodedata.normalize("NFKC", text).lower().replace("\u2019", "'").replace("'", "")
    return [w[:-1] if len(w) >= 4 and w.endswith("s") and not w.endswith("ss") else w
            for w in re.findall(r"[^\W_]+", text)]


def grams(tokens: list[str], n: int = N) -> frozenset[tuple[str, ...]]:
    """Word n-grams; a text shorter than n words is one gram of all its words."""
    if len(tokens) < n:
        return frozenset({tuple(tokens)}) if tokens else frozenset()
    return frozenset(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def content(tokens: list[str]) -> frozenset[str]:
    return frozenset(t for t in tokens if t not in STOP_WORDS)


@dataclass(frozen=True)
class Item:
    """A text with where it is: a suite prompt ("tool_calling #1") or a calibration turn ("file:line")."""

    where: str
    text: str


@dataclass(frozen=True)
class Overlap:
    suite_item: str  # "tool_calling #3"
    prompt: str
    calibration_item: str  # "recipes/demo/calibration.jsonl:25"
    turn: str
    kind: str  # exact | quoted | reworded
    score: float  # the measure that decided (1.0 for exact)

    def describe(self) -> str:
        return (f"{self.suite_item} {_first_words(self.prompt)!r} ~ {self.calibration_item} "
                f"{_first_words(self.turn)!r} ({self.kind}, {self.score:.2f})")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _first_words(text: str, count: int = 8) -> str:
    parts = text.split()
    return " ".join(parts[:count]) + (" ..." if len(parts) > count else "")


class _Prepared:
    __slots__ = ("item", "norm", "grams", "content")

    def __init__(self, item: Item):
        tokens = words(item.text)
        self.item, self.norm, self.grams, self.content = item, " ".join(tokens), grams(tokens), content(tokens)


def find_overlaps(prompts: Iterable[Item], turns: Iterable[Item]) -> list[Overlap]:
    """Every (suite prompt, calibration turn) pair that overlaps, at most one entry per pair."""
    prepared = [_Prepared(t) for t in turns]
    exact: dict[str, list[int]] = defaultdict(list)
    by_word: dict[str, list[int]] = defaultdict(list)
    for i, turn in enumerate(prepared):
        exact[turn.norm].append(i)
        for word in turn.content:
            by_word[word].append(i)
    found = []
    for prompt in map(_Prepared, prompts):
        if not prompt.norm:
            continue
        hits: dict[int, tuple[str, float]] = {i: ("exact", 1.0) for i in exact.get(prompt.norm, ())}
        shared: dict[int, int] = defaultdict(int)
        for word in prompt.content:
            for i in by_word.get(word, ()):
                shared[i] += 1
        for i, common in shared.items():
            if i in hits:
                continue
            turn = prepared[i]
            reworded = common / max(len(prompt.content), len(turn.content))
            if common >= 2 and reworded >= REWORDED_WORDS:
                hits[i] = ("reworded", reworded)
                continue
            quoted = len(prompt.grams & turn.grams) / len(prompt.grams)
            if quoted >= QUOTED_GRAMS and common / len(prompt.content) >= QUOTED_WORDS:
                hits[i] = ("quoted", quoted)
        for i, (kind, score) in sorted(hits.items()):
            turn = prepared[i].item
            found.append(Overlap(prompt.item.where, prompt.item.text, turn.where, turn.text, kind, round(score, 3)))
    return found


# --- what is compared: suite prompts and calibration turns -------------------------------------


def suite_items(suites: Iterable[Any]) -> list[Item]:
    """The prompts the recipe's suites ask (SuiteRef models; `limit` applied), as "SUITE #N" items."""
    from runner.benchmark.suites import load_suite

    items = []
    for ref in suites:
        if ref.bfcl is not None or ref.teacher_eval:
            # BFCL's public questions (the card names the benchmark), and the teacher's held-out prompts,
            # which no calibration conversation asks by construction (calibration/prompts.PromptPool)
            continue
        suite = load_suite(ref)
        asked = suite.items()[:ref.limit] if ref.limit else suite.items()
        items += [Item(f"{ref.name} #{i}", p.prompt) for i, p in enumerate(asked, start=1)]
    return items


def jsonl_items(path: Path, label: str | None = None) -> list[Item]:
    """The user turns of a calibration JSONL file (conversations) or its text rows, as "file:line".
    Lines that are not conversations are skipped here (the calibrate step names them)."""
    label = label or str(path)
    items = []
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            try:
                row = json.loads(raw)
            except ValueError:
                continue
            if not isinstance(row, dict):
                continue
            if isinstance(row.get("text"), str):
                items.append(Item(f"{label}:{lineno}", row["text"]))
            for msg in row.get("messages") or []:
                if isinstance(msg, dict) and msg.get("role") == "user" and isinstance(msg.get("content"), str):
                    items.append(Item(f"{label}:{lineno}", msg["content"]))
    return items


def text_items(path: Path, label: str | None = None) -> list[Item]:
    """The blank-line separated paragraphs of a text file, each named by the line it starts on."""
    label = label or str(path)
    items, block, start = [], [], 0
    for lineno, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        if line.strip():
            if not block:
                start = lineno
            block.append(line.strip())
        elif block:
            items.append(Item(f"{label}:{start}", " ".join(block)))
            block = []
    if block:
        items.append(Item(f"{label}:{start}", " ".join(block)))
    return items


def teacher_items(source: Any, key: str) -> list[Item]:
    """The user prompts a teacher is asked with (its categories' prompts, prompt files and templates)."""
    from runner.calibration.prompts import expand_templates, read_prompt_file

    items = []
    for c, category in enumerate(source.categories):
        where = f"{key}.categories[{c}] ({category.name})"
        items += [Item(f"{where}.prompts[{i}]", p) for i, p in enumerate(category.prompts)]
        for spec in category.prompt_files:
            items += [Item(f"{spec.path} #{i}", p) for i, p in
                      enumerate(read_prompt_file(spec.path, spec.field), start=1)]
        items += [Item(f"{where}.templates", p) for p in expand_templates(category.templates, category.fill)]
    return items


def _stamp(path: Path) -> tuple[str, int, int]:
    stat = path.stat()
    return str(path), stat.st_size, stat.st_mtime_ns


def _suite_key(suites: Iterable[Any]) -> tuple:
    from runner.benchmark.suites import suites_dir

    key = []
    for ref in suites:
        path = ref.path or suites_dir() / f"{ref.name}.yaml"
        key.append((ref.name, ref.limit, _stamp(path) if path.is_file() else str(path)))
    return tuple(key)


_CACHE: dict[tuple, list[Overlap]] = {}


def file_overlaps(path: Path, suites: Iterable[Any], kind: str = "jsonl", label: str | None = None
                  ) -> list[Overlap]:
    """Overlaps of one calibration file with the suites; computed once per file state and suite set."""
    suites = list(suites)
    label = label or str(path)
    key = (kind, _stamp(path), label, _suite_key(suites))
    if key not in _CACHE:
        turns = text_items(path, label) if kind == "text" else jsonl_items(path, label)
        _CACHE[key] = find_overlaps(suite_items(suites), turns)
    return list(_CACHE[key])


def recipe_overlaps(recipe: Any) -> dict[str, list[Overlap]]:
    """{calibration set ("calibration.source" or "calibration.alternatives.NAME"): its overlaps with the
    recipe's suites}, for every set whose prompts are on this machine (JSONL, text, a teacher's prompts).
    A set whose file is missing or unreadable is left out (validate reports the missing file)."""
    calibration, suites = recipe.calibration, tuple(recipe.benchmark.suites)
    sets = {"calibration.source": calibration.source}
    sets |= {f"calibration.alternatives.{name}": alt for name, alt in calibration.alternatives.items()}
    out: dict[str, list[Overlap]] = {}
    for key, source in sets.items():
        try:
            if source.kind in ("jsonl", "text"):
                out[key] = file_overlaps(source.path, suites, source.kind, _shown(source.path))
            elif source.kind == "teacher":
                out[key] = find_overlaps(suite_items(suites), teacher_items(source, key))
        except (OSError, ValueError, RunnerError):
            continue  # a missing or unreadable input: validate names it among its problems
    return out


def _shown(path: Path) -> str:
    """A path as a user reads it: relative to the working directory when under it."""
    try:
        return str(Path(path).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(path)


def overlap_warnings(recipe: Any, limit: int = 10) -> list[str]:
    """One line per calibration set that overlaps the suites, then up to `limit` items each."""
    lines = []
    for key, found in recipe_overlaps(recipe).items():
        if not found:
            continue
        suites = sorted({o.suite_item.split(" #")[0] for o in found})
        lines.append(f"{key}: {len(found)} calibration prompt{'s' if len(found) != 1 else ''} overlap the "
                     f"evaluation suites ({', '.join(suites)}): the suites then measure prompts the model was "
                     "calibrated on; replace those conversations (exact and near-duplicate prompts, see "
                     "runner/calibration/overlap.py)")
        lines += [f"  {o.describe()}" for o in found[:limit]]
        if len(found) > limit:
            lines.append(f"  ... and {len(found) - limit} more")
    return lines
