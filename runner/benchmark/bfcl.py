"""The Berkeley Function Calling Leaderboard (BFCL) against any OpenAI-compatible endpoint, scored by BFCL's
own checker, with no model registration.

What is BFCL's and what is ours:
- data: the question, function-doc and possible-answer files shipped in the `bfcl-eval` wheel, read with
  its loaders (`bfcl_eval.utils.load_dataset_entry`, `load_ground_truth_entry`);
- request: what BFCL's OpenAI-completions FC handler (`OpenAICompletionsHandler`, `is_fc_model=True`)
  sends: `question[0]` as given (a system message stays; no prompt is added) and `tools` built by
  BFCL's `convert_to_tool(docs, GORILLA_TO_OPENAPI, ModelStyle.OPENAI_COMPLETIONS)` from the docs *with*
  BFCL's language hint (`load_dataset_entry(cat)`); temperature 0. Ours: the request is streamed and
  carries `max_tokens`;
- scoring: BFCL's pipeline (`eval_runner._evaluate_single_ast_entry` and
  `_evaluate_single_relevance_entry`): the raw result is `[{name: arguments_json}, ...]` when the answer
  has tool calls, else the answer's text; it is decoded as `OpenAICompletionsHandler.decode_ast` does
  (json.loads of each call's arguments; a text answer does not decode), checked with
  `is_function_calling_format_output`, then BFCL's `ast_checker` judges it against the docs *without*
  the hint (`include_language_specific_hint=False`), or, for irrelevance categories, the item passes iff
  the decoded output is empty (`is_empty_output`) or does not decode. Every verdict is BFCL's code;
  only the five-line decode and the three-step glue are restated here (tests/test_bfcl.py checks the
  decode against BFCL's handler when `openai` is installed).

Import isolation (bfcl-eval is installed with --no-deps: its declared dependencies pull torch, a pinned
numpy and a dozen vendor SDKs):
- `ast_checker` imports `bfcl_eval.constants.model_config`, which imports every vendor's handler. While
  we import, that module is a stub whose `MODEL_CONFIG_MAPPING` answers every model name with
  `underscore_to_dot=True`; the stub is removed from sys.modules afterwards (ast_checker keeps its own
  reference). underscore_to_dot=True is what BFCL uses for its OpenAI FC models: the tools we send have
  `.` replaced by `_` in their names (OpenAI's name pattern forbids dots), so the checker compares the
  model's call against the expected name with `.` -> `_` too (`math.factorial` is expected as
  `math_factorial`; a call named `math.factorial` fails, as on the leaderboard);
- importing `bfcl_eval.constants.eval_config` creates `result/`, `score/` and `.file_locks/` under
  `$BFCL_PROJECT_ROOT`, by default inside site-packages, and BFCL's CLI reads `.env` there. While we
  import it, BFCL_PROJECT_ROOT points at a fresh temporary directory this process owns (removed at
  exit); the caller's environment is restored afterwards and a user's own BFCL root is never touched.

Supported: the single-turn AST categories and the irrelevance ones (SUPPORTED). Multi-turn categories
need BFCL's simulated APIs executed with eval() on model-written call strings across turns; they are
refused, as are web search and memory (live backends) and the Java/JavaScript and format categories.
"""

from __future__ import annotations

import asyncio
import atexit
import copy
import json
import os
import random
import shutil
import sys
import tempfile
import types
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from importlib import metadata
from typing import Any

import aiohttp

from runner.benchmark.harness import answers_hash, stream_chat
from runner.errors import RunnerError, closest

# The version this module is checked against, and the packages it needs from bfcl-eval's dependency list
# (the rest only serve BFCL's own CLI, vendor SDKs and multi-turn/web-search/memory categories).
BFCL_VERSION = "2026.3.23"
BFCL_PACKAGES = (f"bfcl-eval=={BFCL_VERSION}", "tree_sitter==0.21.3", "tree-sitter-java==0.21.0",
                 "tree-sitter-javascript==0.21.4", "tenacity==9.2.1", "filelock>=3.20")
INSTALL = "pip install --no-deps " + " ".join(f"'{p}'" if ">" in p else p for p in BFCL_PACKAGES)

AST_CATEGORIES = ("simple_python", "multiple", "parallel", "parallel_multiple", "live_simple", "live_multiple",
                  "live_parallel", "live_parallel_multiple")
IRRELEVANCE_CATEGORIES = ("irrelevance", "live_irrelevance")
SUPPORTED = AST_CATEGORIES + IRRELEVANCE_CATEGORIES

# Any name: the stub registry answers every name alike. Spelled without "_" (BFCL maps "_" to "/").
MODEL_NAME = "recipe-runner"
MAX_TOKENS = 512  # an answer's cap unless the suite reference sets max_tokens
_STUB = "bfcl_eval.constants.model_config"


class _AnyModel(dict):
    """MODEL_CONFIG_MAPPING for the stub: every model name gets underscore_to_dot=True."""

    def __missing__(self, key: str) -> types.SimpleNamespace:
        return types.SimpleNamespace(underscore_to_dot=True)


def unavailable() -> str | None:
    """Why BFCL cannot be asked here (bfcl-eval missing or not importable, with the install command), or
    None. validate warns with it; `recipe run` refuses before any step (runner/cli.py)."""
    try:
        _bfcl()
    except RunnerError as exc:
        return str(exc)
    return None


@cache
def _bfcl() -> types.SimpleNamespace:
    """BFCL's loaders and checker, imported once in isolation (see the module docstring)."""
    try:
        import bfcl_eval  # noqa: F401
    except ImportError as exc:
        raise RunnerError(f"bfcl-eval is not installed ({exc}); install it without its declared dependencies "
                          f"(torch, a pinned numpy, vendor SDKs), which BFCL's scoring does not need: "
                          f"{INSTALL}") from exc
    root = tempfile.mkdtemp(prefix="recipe-runner-bfcl.")
    atexit.register(shutil.rmtree, root, True)
    saved_root = os.environ.get("BFCL_PROJECT_ROOT")
    stub = None
    if _STUB not in sys.modules:
        stub = types.ModuleType(_STUB)
        stub.MODEL_CONFIG_MAPPING = _AnyModel()  # type: ignore[attr-defined]
        sys.modules[_STUB] = stub
    os.environ["BFCL_PROJECT_ROOT"] = root
    try:
        from bfcl_eval.constants.enums import Language, ModelStyle
        from bfcl_eval.constants.eval_config import PROJECT_ROOT
        from bfcl_eval.constants.type_mappings import GORILLA_TO_OPENAPI
        from bfcl_eval.eval_checker.ast_eval import ast_checker as checker_module
        from bfcl_eval.model_handler.utils import convert_to_tool
        from bfcl_eval.utils import (
            is_empty_output,
            is_function_calling_format_output,
            load_dataset_entry,
            load_ground_truth_entry,
        )
    except ImportError as exc:
        raise RunnerError(f"bfcl-eval is installed but cannot be imported ({exc}); its scoring needs: {INSTALL}") \
            from exc
    finally:
        if saved_root is None:
            os.environ.pop("BFCL_PROJECT_ROOT", None)
        else:
            os.environ["BFCL_PROJECT_ROOT"] = saved_root
        if stub is not None and sys.modules.get(_STUB) is stub:
            del sys.modules[_STUB]
    # Someone imported BFCL in this process before us, with the real registry or another root: the
    # verdicts would then depend on that registry's entry for our name, so refuse rather than guess.
    mapping = checker_module.MODEL_CONFIG_MAPPING
    if not isinstance(mapping, _AnyModel) or str(PROJECT_ROOT) != root:
        raise RunnerError("bfcl_eval was imported in this process before runner.benchmark.bfcl (its model "
                          "registry or project root is not the runner's); run the BFCL suite in a fresh process")
    return types.SimpleNamespace(
        Language=Language, ModelStyle=ModelStyle, GORILLA_TO_OPENAPI=GORILLA_TO_OPENAPI,
        ast_checker=checker_module.ast_checker, convert_to_tool=convert_to_tool, is_empty_output=is_empty_output,
        is_function_calling_format_output=is_function_calling_format_output, load_dataset_entry=load_dataset_entry,
        load_ground_truth_entry=load_ground_truth_entry, project_root=root)


def bfcl_version() -> str:
    """The installed bfcl-eval's version (RunnerError with the install command when it is missing)."""
    _bfcl()
    return metadata.version("bfcl-eval")


def decode_fc(raw: list[dict[str, str]] | str) -> list[dict[str, Any]]:
    """OpenAICompletionsHandler.decode_ast for an FC model: each {name: arguments_json} becomes
    {name: arguments}; a text answer (a str) raises, as it does in BFCL (iterating it yields str, not dict)."""
    decoded = []
    for call in raw:
        name = list(call.keys())[0]  # type: ignore[union-attr]
        decoded.append({name: json.loads(call[name])})  # type: ignore[index]
    return decoded


def raw_result(content: str, tool_calls: list[dict[str, Any]]) -> list[dict[str, str]] | str:
    """What BFCL's handler records as the model's result: the calls, else the text (`_parse_query_response_FC`)."""
    if tool_calls:
        return [{(c.get("function") or {}).get("name") or "": (c.get("function") or {}).get("arguments") or ""}
                for c in tool_calls]
    return content


def _reason(error_type: str, error: list[Any] | str | None) -> str:
    """BFCL's error_type and its first two messages (the parallel checker's second one is the first
    mismatch, {"Model Result Index i": {"sub_error": [...]}}), cut to 300 characters."""
    parts = [error_type]
    for line in (error if isinstance(error, list) else [error])[:2]:
        if isinstance(line, dict):
            sub = (next(iter(line.values()), None) or {}).get("sub_error")
            line = sub[0] if isinstance(sub, list) and sub else sub
        if line:
            parts.append(str(line))
    text = ": ".join(parts)
    return text if len(text) <= 300 else text[:297] + "..."


@dataclass
class BfclItem:
    """One BFCL test entry, ready to ask and to score."""

    id: str
    category: str
    messages: list[dict[str, Any]]  # question[0] as BFCL sends it
    tools: list[dict[str, Any]]  # convert_to_tool of the hinted docs, as BFCL's FC handler sends them
    functions: list[dict[str, Any]]  # the un-hinted docs: what BFCL's checker judges against
    ground_truth: list[dict[str, Any]] | None  # possible answers; None for irrelevance categories

    def score(self, content: str, tool_calls: list[dict[str, Any]]) -> tuple[bool, str]:
        """(valid, why) as BFCL's evaluation pipeline judges this answer."""
        bfcl = _bfcl()
        raw = raw_result(content, tool_calls)
        decode_error: Exception | None = None
        try:
            decoded = decode_fc(raw)
        except Exception as exc:  # BFCL counts any decode failure the same way
            decoded, decode_error = None, exc
        if self.ground_truth is None:  # irrelevance: passes iff there is no call
            if decoded is None or bfcl.is_empty_output(decoded):
                return True, "no function call"
            names = [next(iter(c)) for c in decoded]
            return False, f"irrelevance_error:decoder_success: called {names} when no function fits"
        if decoded is None:
            return False, f"ast_decoder:decoder_failed: Invalid syntax. Failed to decode AST. {decode_error}"[:300]
        if not bfcl.is_function_calling_format_output(decoded):
            return False, "ast_decoder:decoder_wrong_output_format"
        # Copies: BFCL reads these once per run; ours are reused across answers.
        result = bfcl.ast_checker(copy.deepcopy(self.functions), decoded, copy.deepcopy(self.ground_truth),
                                  bfcl.Language.PYTHON, self.category, MODEL_NAME)
        if result["valid"]:
            return True, "valid"
        return False, _reason(result.get("error_type", "invalid"), result.get("error"))


def check_categories(categories: list[str]) -> list[str]:
    """The categories, de-duplicated in order; RunnerError for one this module does not run, saying why."""
    out: list[str] = []
    for cat in categories:
        if cat in out:
            continue
        if cat not in SUPPORTED:
            if cat.startswith("multi_turn"):
                why = ("multi-turn categories need BFCL's simulated APIs executed with eval() on model-written "
                       "calls across turns, which this runner does not do")
            elif cat in ("web_search", "memory") or cat.startswith(("web_search", "memory", "format_sensitivity")):
                why = "it needs BFCL's live backends or prompt variations, which this runner does not run"
            elif cat == "simple":
                why = "BFCL v4 calls it 'simple_python'"
            elif cat in ("java", "javascript", "simple_java", "simple_javascript"):
                why = "Java and JavaScript items are judged on string-encoded arguments, which this runner does not do"
            else:
                hint = closest(cat, SUPPORTED)
                why = "it is not a single-turn Python AST or irrelevance category" + (
                    f" (did you mean {hint!r}?)" if hint else "")
            raise RunnerError(f"BFCL category {cat!r} is not supported: {why}; supported: {', '.join(SUPPORTED)}")
        out.append(cat)
    if not out:
        raise RunnerError(f"no BFCL category given; supported: {', '.join(SUPPORTED)}")
    return out


def _shares(counts: dict[str, int], size: int) -> dict[str, int]:
    """`size` split over the categories in proportion to their sizes (largest remainder; ties in order)."""
    total = sum(counts.values())
    exact = {cat: size * n / total for cat, n in counts.items()}
    shares = {cat: int(x) for cat, x in exact.items()}
    order = sorted(counts, key=lambda c: (-(exact[c] - shares[c]), list(counts).index(c)))
    for cat in order[:size - sum(shares.values())]:
        shares[cat] += 1
    return shares


def load_items(categories: list[str], size: int | None, seed: int) -> list[BfclItem]:
    """BFCL's items of these categories: all of them (size None), or `size` in total, spread over the
    categories in proportion to their sizes, each category's taken from a shuffle seeded by (seed,
    category), so a sample is the same on every machine and a larger one contains a smaller one.
    Read once per process for each (categories, size, seed): validate, plan and `recipe list` ask
    for the same sample of every recipe that uses it."""
    return list(_load_items(tuple(check_categories(categories)), size, seed))


@cache
def _load_items(cats: tuple[str, ...], size: int | None, seed: int) -> tuple[BfclItem, ...]:
    bfcl = _bfcl()
    entries: dict[str, list[tuple[dict, dict, dict | None]]] = {}
    for cat in cats:
        sent = bfcl.load_dataset_entry(cat)  # docs with BFCL's language hint: what the model sees
        judged = bfcl.load_dataset_entry(cat, include_language_specific_hint=False)  # what the checker reads
        answers = bfcl.load_ground_truth_entry(cat) if cat in AST_CATEGORIES else [None] * len(sent)
        for s, j, a in zip(sent, judged, answers, strict=True):
            if not (s["id"] == j["id"] and (a is None or a["id"] == s["id"])):
                raise RunnerError(f"bfcl-eval's {cat} files do not line up at {s['id']}")
        entries[cat] = list(zip(sent, judged, answers, strict=True))
    if size is not None:
        available = sum(len(e) for e in entries.values())
        if not 0 < size <= available:
            raise RunnerError(f"BFCL sample size {size}: {', '.join(cats)} have {available} items; ask for 1 to "
                              f"{available}, or none for all")
        shares = _shares({cat: len(e) for cat, e in entries.items()}, size)
    items: list[BfclItem] = []
    for cat, rows in entries.items():
        order = list(range(len(rows)))
        if size is not None:
            random.Random(f"{seed}:{cat}").shuffle(order)  # str seed: the same across processes and machines
            order = sorted(order[:shares[cat]])  # shown in BFCL's order
        for i in order:
            sent, judged, answer = rows[i]
            items.append(BfclItem(
                id=sent["id"], category=cat, messages=copy.deepcopy(sent["question"][0]),
                tools=bfcl.convert_to_tool(sent["function"], bfcl.GORILLA_TO_OPENAPI,
                                           bfcl.ModelStyle.OPENAI_COMPLETIONS),
                functions=judged["function"], ground_truth=answer["ground_truth"] if answer else None))
    return tuple(items)


async def ask_bfcl(session: aiohttp.ClientSession, base_url: str, model: str, items: list[BfclItem],
                   concurrency: int, on_answer: Callable[[int, int, int], None] | None = None,
                   max_tokens: int = MAX_TOKENS, extra_body: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Ask these items and score every answer with BFCL's checker. A request that fails (HTTP error,
    transport error, a stream with nothing in it) fails the run with RunnerError once all are in, as the
    suites do: an answer that never came says nothing about the model. `on_answer(answered, failed,
    total)` is told of each reply."""
    slots = asyncio.Semaphore(concurrency)
    answered = unanswered = 0

    async def ask(item: BfclItem) -> dict[str, Any]:
        nonlocal answered, unanswered
        async with slots:
            result = await stream_chat(session, base_url, model, item.messages, max_tokens, item.tools, extra_body)
        if result.ok:
            answered += 1
            passed, why = item.score(result.content, result.tool_calls)
        else:
            unanswered += 1
            passed, why = False, f"request failed: {result.error}"
        if on_answer is not None:
            on_answer(answered, unanswered, len(items))
        return {"prompt": item.id, "category": item.category, "passed": passed, "why": why,
                "answer": result.content[:500], "full_answer": result.content, "error": not result.ok,
                "tool_calls": result.tool_calls}

    answers = await asyncio.gather(*(ask(item) for item in items))
    errors = [a for a in answers if a.pop("error")]
    if errors:
        raise RunnerError(f"BFCL: {len(errors)} of {len(answers)} requests to {base_url} failed "
                          f"(first: {errors[0]['prompt']}: {errors[0]['why']}); no answer was scored")
    return list(answers)


def summarize_bfcl(answers: list[dict[str, Any]], max_tokens: int) -> dict[str, Any]:
    """A suite-like result with per-category counts, BFCL's version and the answers' fingerprint."""
    answers = [dict(a) for a in answers]
    fingerprint = answers_hash(answers)
    per_category: dict[str, dict[str, int]] = {}
    for a in answers:
        a.pop("full_answer", None)  # `answer` keeps the first 500 characters; the hash covers all of it
        counts = per_category.setdefault(a["category"], {"passed": 0, "total": 0})
        counts["passed"] += a["passed"]
        counts["total"] += 1
    passed = sum(a["passed"] for a in answers)
    total = len(answers)
    return {"passed": passed, "failed": total - passed, "total": total,
            "pass_rate": round(passed / total, 4) if total else 0.0, "per_category": per_category,
            "bfcl_version": bfcl_version(), "max_tokens": max_tokens, "answers_sha256": fingerprint,
            "items": answers}


async def run_bfcl(session: aiohttp.ClientSession, base_url: str, model: str, items: list[BfclItem],
                   concurrency: int, on_answer: Callable[[int, int, int], None] | None = None,
                   max_tokens: int = MAX_TOKENS, extra_body: dict[str, Any] | None = None) -> dict[str, Any]:
    """Ask every item and summarize (ask_bfcl, summarize_bfcl)."""
    answers = await ask_bfcl(session, base_url, model, items, concurrency, on_answer, max_tokens, extra_body)
    return summarize_bfcl(answers, max_tokens)
