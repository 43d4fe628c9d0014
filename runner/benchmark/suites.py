"""Behavioural suites: prompts shipped as data (recipes/suites/NAME.yaml) and the scorers that judge answers.

Scorers:
- no_thinking: no <think> tags, no reasoning phrases, no reasoning field, while thinking is disabled;
- no_markdown: plain prose (no bold, headings, bullets, code, tables, links);
- tool_call: the expected function was called with JSON arguments that match its schema;
- contains: the answer names one of the accepted answers (a whole word, case-insensitive, not negated:
  "not Paris" fails) and names none of the prompt's `reject` answers ("Jupiter, but it's actually
  Saturn" fails on Saturn; "Le Grand Paris" fails when `Grand Paris` is listed).
"""

from __future__ import annotations

import asyncio
import json
import random
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import aiohttp
from pydantic import Field

from runner.benchmark.harness import RequestResult, answers_hash, stream_chat
from runner.benchmark.stats import look_alphas, look_sizes
from runner.benchmark.tool_calls import DEFAULT_PARSER, FUNCTION, START, call_start, other_form_call, parse_tool_calls
from runner.calibration.validate import MARKDOWN, THINKING, tool_call_problem
from runner.errors import RunnerError
from runner.recipe.metrics import Metric
from runner.recipe.resources import shipped_dir, shipped_suites
from runner.recipe.schema import Gate, Recipe, Section, SuiteRef, ToolDefinition

# The start of a failed item's `why` when the answer holds a tool call in a form the parser does not read.
OTHER_FORM = "tool call in another form"

# The plan's Phase 4 hardened prompt, appended to the system prompt when a suite asks for it.
HARDENED_PROMPT = """CRITICAL RULES (violations will cause errors):
1. NEVER output thinking, reasoning, or analysis text
2. NEVER use markdown: no **, no #, no -, no `, no numbered lists
3. When tools are needed, emit ONLY the tool_call JSON — no explanatory text
4. Respond in 1-3 sentences maximum"""


class SuitePrompt(Section):
    prompt: str
    expect: list[str] = Field(default_factory=list, description="Accepted answers (scorer contains).")
    reject: list[str] = Field(default_factory=list, description=(
        "Wrong answers that fail the item wherever they appear, even next to an accepted one (scorer contains)."))
    expect_tool: str | None = Field(None, description="The function that must be called (scorer tool_call).")


class Suite(Section):
    name: str
    description: str = ""
    scorer: Literal["no_thinking", "no_markdown", "tool_call", "contains"]
    chat_template_kwargs: dict[str, Any] = Field(default_factory=dict)
    max_tokens: int = 256
    tools: list[ToolDefinition] = Field(default_factory=list)
    prompts: list[str | SuitePrompt] = Field(min_length=1)

    def items(self) -> list[SuitePrompt]:
        return [p if isinstance(p, SuitePrompt) else SuitePrompt(prompt=p) for p in self.prompts]


def suites_dir() -> Path:
    return shipped_dir("recipes") / "suites"


def load_suite(ref: SuiteRef) -> Suite:
    from runner.recipe.loader import load_yaml_model

    path = ref.path or suites_dir() / f"{ref.name}.yaml"
    if not path.is_file():
        raise RunnerError(f"suite {ref.name!r}: {path} not found; shipped suites: {', '.join(shipped_suites())}")
    return load_yaml_model(path, Suite)


def score(suite: Suite, item: SuitePrompt, result: RequestResult, parser: str = DEFAULT_PARSER) -> tuple[bool, str]:
    """(passed, why) for one answer. `parser`: the server's --tool-call-parser, which explains call text
    left in the answer (the verdict is the server's calls either way)."""
    if not result.ok:
        return False, f"request failed: {result.error}"
    text = result.content
    if suite.scorer == "no_thinking":
        if result.reasoning:
            return False, "reasoning field present"
        match = THINKING.search(text)
        return (False, f"thinking: {match.group(0)!r}") if match else (True, "no thinking")
    if suite.scorer == "no_markdown":
        match = MARKDOWN.search(text)
        return (False, f"markdown: {match.group(0)!r}") if match else (True, "plain")
    if suite.scorer == "tool_call":
        tools = {t.function.name: t.function.model_dump() for t in suite.tools}
        calls = [c for c in result.tool_calls if (c.get("function") or {}).get("name") == item.expect_tool]
        if not calls:
            called = [c.get("function", {}).get("name") for c in result.tool_calls]
            form = None if result.tool_calls else other_form_call(text, set(tools))
            if form is not None:
                return False, f"{OTHER_FORM}: {form} naming a tool, which the server's tool-call parser does not read"
            return False, (f"expected {item.expect_tool}, called {called or 'nothing'}"
                           + unparsed_call(text, parser, [t.model_dump() for t in suite.tools]))
        problem = tool_call_problem(calls[0], tools)
        return (False, problem) if problem else (True, f"called {item.expect_tool}")
    return score_answer(text, item.expect, item.reject)


def unparsed_call(text: str, parser: str = DEFAULT_PARSER, tools: list[dict[str, Any]] | None = None) -> str:
    """Why call text left in the answer (a <tool_call>, or qwen3_coder's <function=) is not a call, read with
    the server's parser (the verdict stays the server's: a deployed engine would not have called either)."""
    if call_start(text, parser) < 0:
        return ""
    parsed = parse_tool_calls(text, parser, tools)
    marker = START if START in text else FUNCTION
    if parsed.problem:
        return f" (the answer's {marker} text is not a {parser} call: {parsed.problem})"
    if not parsed.calls:
        return ""
    names = [c["function"]["name"] for c in parsed.calls]
    return (f" (the answer's text holds a {parser} call to {names} that the server did not return as a call: "
            f"is its tool-call parser set, e.g. vLLM --enable-auto-tool-choice --tool-call-parser {parser}?)")


def _named(text: str, answer: str) -> re.Match[str] | None:
    """`answer` as a whole word (or phrase) of `text`, case-insensitive."""
    return re.search(rf"(?<!\w){re.escape(answer)}(?!\w)", text, re.IGNORECASE)


def score_answer(text: str, expect: list[str], reject: list[str]) -> tuple[bool, str]:
    """A factual answer: names an accepted answer, does not negate it, names no wrong one."""
    wrong = next((r for r in reject if _named(text, r)), None)
    if wrong is not None:
        return False, f"names the wrong answer {wrong!r}"
    hit = next((e for e in expect if _named(text, e)), None)
    if hit is None:
        return False, f"none of {expect}"
    if re.search(rf"\b(?:not|isn't|is not|never)\s+(?:the\s+|a\s+)?{re.escape(hit)}(?!\w)", text, re.IGNORECASE):
        return False, f"negates {hit!r}"
    return True, f"names {hit!r}"


def sequential_gates(recipe: Recipe) -> list[Gate]:
    """The gates a candidate's benchmark judges between looks: those on a suite that has more than one look
    (benchmark.sequential, suites of at least 2 x stats.MIN_LOOK items); empty when sequential is off."""
    if not recipe.benchmark.sequential:
        return []
    sizes = {}
    for ref in recipe.benchmark.suites:
        try:
            sizes[ref.name] = suite_size(ref, recipe)
        except RunnerError:
            continue  # validate names the missing suite
    return [g for g in recipe.gates
            if len(look_sizes(sizes.get(Metric.parse(g.metric).group, 0) or 1)) > 1]


def suite_size(ref: SuiteRef, recipe: Recipe | None = None) -> int:
    """How many items a suite reference asks at most. A held-out teacher suite's size is planned from the
    recipe's categories (what the teacher's references will keep is known only after the calibrate step)."""
    if ref.teacher_eval:
        planned = planned_eval_items(recipe)
        return min(planned, ref.limit) if ref.limit else planned
    return len(bfcl_items(ref)) if ref.bfcl else len(sampled_items(load_suite(ref), ref))


def planned_eval_items(recipe: Recipe | None) -> int:
    """How many held-out prompts the calibrate step will set aside (calibration.source.eval_split)."""
    from runner.calibration.prompts import PromptPool

    source = recipe.calibration.source if recipe is not None else None
    if source is None or source.kind != "teacher" or not source.eval_split:
        raise RunnerError("a teacher_eval suite needs calibration.source to be a teacher with eval_split > 0 "
                          "(0.2 sets a fifth of each category's distinct prompts aside)")
    return sum(len(PromptPool(c, recipe.calibration.seed, source.eval_split).eval_prompts)
               for c in source.categories)


def sampled_items(suite: Suite, ref: SuiteRef) -> list[SuitePrompt]:
    """The items a suite reference asks, in the order it asks them: the file's order, or a shuffle by
    the reference's `seed` (so that any prefix, e.g. a sequential look, is a random sample), cut to its
    `limit`."""
    items = suite.items()
    if ref.seed is not None:
        random.Random(ref.seed).shuffle(items)
    return items[: ref.limit] if ref.limit else items


async def ask_requests(session: aiohttp.ClientSession, base_url: str, model: str, label: str,
                       requests: list[tuple[str, list[dict[str, Any]], list[dict[str, Any]] | None]],
                       max_tokens: int, extra: dict[str, Any] | None, concurrency: int,
                       judge: Callable[[int, RequestResult], tuple[bool, str]],
                       on_answer: Callable[[int, int, int], None] | None = None) -> list[dict[str, Any]]:
    """Send each (key, messages, tools) request, and score each reply with `judge(index, result)`. A
    request that failed raises: an answer that never came says nothing about the model.
    `on_answer(answered, failed, total)` is told of each reply."""
    slots = asyncio.Semaphore(concurrency)
    answered = unanswered = 0

    async def ask(i: int, key: str, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None
                  ) -> dict[str, Any]:
        nonlocal answered, unanswered
        async with slots:
            result = await stream_chat(session, base_url, model, messages, max_tokens, tools, extra)
        passed, why = judge(i, result)
        if result.ok:
            answered += 1
        else:
            unanswered += 1
        if on_answer is not None:
            on_answer(answered, unanswered, len(requests))
        return {"prompt": key, "passed": passed, "why": why, "answer": result.content[:500],
                "full_answer": result.content, "error": not result.ok,
                "tool_calls": result.tool_calls, "ttft_ms": round(result.ttft_s * 1000, 2) if result.ttft_s else None}

    answers = await asyncio.gather(*(ask(i, *r) for i, r in enumerate(requests)))
    errors = [a for a in answers if a.pop("error")]
    if errors:
        raise RunnerError(f"suite {label}: {len(errors)} of {len(answers)} requests to {base_url} failed "
                          f"(first: {errors[0]['why']}); no answer was scored, the step is not committed")
    return list(answers)


async def ask_items(session: aiohttp.ClientSession, base_url: str, model: str, suite: Suite, items: list[SuitePrompt],
                    system_prompt: str, hardened: bool, concurrency: int,
                    on_answer: Callable[[int, int, int], None] | None = None,
                    parser: str = DEFAULT_PARSER) -> list[dict[str, Any]]:
    """Ask a suite file's items (with the system prompt, and the hardened prompt when asked) and score them."""
    system = "\n\n".join(p for p in (system_prompt, HARDENED_PROMPT if hardened else "") if p)
    tools = [t.model_dump() for t in suite.tools] or None
    extra = {"chat_template_kwargs": suite.chat_template_kwargs} if suite.chat_template_kwargs else None
    requests = [(item.prompt, ([{"role": "system", "content": system}] if system else [])
                 + [{"role": "user", "content": item.prompt}], tools) for item in items]
    return await ask_requests(session, base_url, model, suite.name, requests, suite.max_tokens, extra, concurrency,
                              lambda i, result: score(suite, items[i], result, parser), on_answer)


# --- the held-out teacher split (calibration.source.eval_split) ----------------------------------------

EVAL_MAX_TOKENS = 256  # a plain answer or a tool call shows well within this


def load_eval_items(path: Path, ref: SuiteRef) -> list[dict[str, Any]]:
    """The calibrate step's eval.jsonl items in asking order: shuffled by the reference's seed (so each
    sequential look samples every category), cut to its `limit`."""
    items = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    random.Random(f"{ref.seed or 0}:teacher_eval").shuffle(items)
    return items[: ref.limit] if ref.limit else items


def score_reference(item: dict[str, Any], result: RequestResult) -> tuple[bool, str]:
    """A reply against the teacher's: the same tool with the same argument names (valid for its schema),
    or, where the teacher answered in words, a plain answer: no tool call, markdown or reasoning."""
    if not result.ok:
        return False, f"request failed: {result.error}"
    reference = item["reference"]
    tools = {t["function"]["name"]: t["function"] for t in item.get("tools") or []}
    if "tool" in reference:
        calls = [c for c in result.tool_calls if (c.get("function") or {}).get("name") == reference["tool"]]
        if not calls:
            called = [(c.get("function") or {}).get("name") for c in result.tool_calls]
            form = None if result.tool_calls else other_form_call(result.content, set(tools))
            if form is not None:
                return False, f"{OTHER_FORM}: {form} naming a tool, which the server's tool-call parser does not read"
            return False, f"the teacher called {reference['tool']}, this called {called or 'nothing'}"
        problem = tool_call_problem(calls[0], tools)
        if problem:
            return False, problem
        names = sorted(json.loads(calls[0]["function"]["arguments"]))
        if names != reference["argument_names"]:
            return False, f"arguments {names}, the teacher's {reference['argument_names']}"
        return True, f"called {reference['tool']} as the teacher did"
    if result.tool_calls:
        called = [(c.get("function") or {}).get("name") for c in result.tool_calls]
        return False, f"called {called}; the teacher answered in words"
    if result.reasoning or THINKING.search(result.content):
        return False, "reasoning in the answer"
    if match := MARKDOWN.search(result.content):
        return False, f"markdown: {match.group(0)!r}"
    if not result.content.strip():
        return False, "an empty answer"
    return True, "a plain answer, as the teacher's"


def summarize_reference(answers: list[dict[str, Any]], items: list[dict[str, Any]]) -> dict[str, Any]:
    """A held-out teacher suite's summary, with counts per category."""
    category = {i["id"]: i["category"] for i in items}
    out = _summary(answers, other_form=True)
    per_category: dict[str, dict[str, int]] = {}
    for a in out["items"]:
        counts = per_category.setdefault(category.get(a["prompt"], "?"), {"passed": 0, "total": 0})
        counts["passed"] += a["passed"]
        counts["total"] += 1
    return out | {"per_category": per_category}


def summarize(suite: Suite, answers: list[dict[str, Any]], hardened: bool) -> dict[str, Any]:
    """passed/failed/total/pass_rate, the answers' fingerprint and each item (its first 500 characters)."""
    return _summary(answers, suite.scorer == "tool_call") | {"hardened_prompt": hardened}


def _summary(answers: list[dict[str, Any]], other_form: bool) -> dict[str, Any]:
    answers = [dict(a) for a in answers]
    passed = sum(a["passed"] for a in answers)
    fingerprint = answers_hash(answers)
    for a in answers:
        a.pop("full_answer", None)  # `answer` keeps the first 500 characters; the hash covers all of it
    others = sum(a["why"].startswith(OTHER_FORM) for a in answers)
    return {"passed": passed, "failed": len(answers) - passed, "total": len(answers),
            "pass_rate": round(passed / len(answers), 4) if answers else 0.0,
            **({"other_form_calls": others} if other_form else {}),
            "answers_sha256": fingerprint, "items": answers}


Ask = Callable[[list[Any], Callable[[int, int, int], None]], Awaitable[list[dict[str, Any]]]]


@dataclass
class SuiteRun:
    """How to ask one suite reference: its items in asking order, a coroutine that asks some of them and
    scores the answers, and the summary of all answers so far. Shipped/file suites and BFCL alike."""

    name: str
    items: list[Any]
    ask: Ask
    summarize: Callable[[list[dict[str, Any]]], dict[str, Any]]


def suite_run(ref: SuiteRef, session: aiohttp.ClientSession, base_url: str, model: str, system_prompt: str,
              concurrency: int, eval_file: Path | None = None, parser: str = DEFAULT_PARSER) -> SuiteRun:
    """The SuiteRun of a reference: BFCL's data and checker for `bfcl:` categories, the calibrate step's
    held-out split (`eval_file`) for `teacher_eval`, else the suite file. `parser`: the server's
    --tool-call-parser, for the tool_call scorer's explanations."""
    if ref.teacher_eval:
        if eval_file is None:
            raise RunnerError(f"suite {ref.name}: the calibrate step wrote no eval split (calibration.source."
                              "eval_split is 0, or the source is not a teacher)")
        eval_items = load_eval_items(eval_file, ref)
        max_tokens = ref.max_tokens or EVAL_MAX_TOKENS
        return SuiteRun(ref.name, eval_items,
                        lambda some, on_answer: ask_requests(
                            session, base_url, model, ref.name, [(i["id"], i["messages"], i["tools"] or None)
                                                                 for i in some],
                            max_tokens, None, concurrency, lambda n, result: score_reference(some[n], result),
                            on_answer),
                        lambda answers: summarize_reference(answers, eval_items))
    if ref.bfcl:
        from runner.benchmark import bfcl

        items: list[Any] = bfcl_items(ref)
        max_tokens = ref.max_tokens or bfcl.MAX_TOKENS
        return SuiteRun(ref.name, items,
                        lambda some, on_answer: bfcl.ask_bfcl(session, base_url, model, some, concurrency, on_answer,
                                                              max_tokens),
                        lambda answers: bfcl.summarize_bfcl(answers, max_tokens))
    suite = load_suite(ref)
    if ref.max_tokens:
        suite = suite.model_copy(update={"max_tokens": min(ref.max_tokens, suite.max_tokens)})
    return SuiteRun(ref.name, sampled_items(suite, ref),
                    lambda some, on_answer: ask_items(session, base_url, model, suite, some, system_prompt,
                                                      ref.hardened_prompt, concurrency, on_answer, parser),
                    lambda answers: summarize(suite, answers, ref.hardened_prompt))


def bfcl_items(ref: SuiteRef) -> list[Any]:
    """A BFCL reference's items in asking order: BFCL's seeded sample of `limit` items over the categories,
    shuffled together with the same seed so that every sequential look is a sample of every category."""
    from runner.benchmark import bfcl

    assert ref.bfcl is not None
    items = bfcl.load_items(ref.bfcl, ref.limit, ref.seed or 0)
    random.Random(f"{ref.seed or 0}:looks").shuffle(items)
    return items


async def ask_in_looks(run: SuiteRun, gates: list[Gate], baseline: dict[str, Any] | None,
                       log: Callable[[str], None] = lambda line: None) -> dict[str, Any]:
    """Ask a suite's items, in sequential looks when gates read it (stats.look_sizes): after each look the
    gates are judged at that look's alpha (stats.look_alphas) against the baseline's answers, and the suite
    stops once every one passes or fails. The result records the looks, the cap, and the alpha of the last
    look, which the gates step judges at. Without gates (or a suite too small for two looks) every item
    is asked and judged at the full alpha."""
    from runner.benchmark.gates import evaluate

    items = run.items
    sizes = look_sizes(len(items)) if gates else [len(items)]
    alphas = look_alphas(sizes)
    log(f"suite {run.name}: {len(items)} prompts"
        + (f", judged after {', '.join(map(str, sizes))}" if len(sizes) > 1 else ""))
    answers: list[dict[str, Any]] = []
    looks: list[dict[str, Any]] = []
    result: dict[str, Any] = {}
    for size, alpha in zip(sizes, alphas, strict=True):
        asked = len(answers)
        answers += await run.ask(items[asked:size], lambda done, failed, _total, a=asked: log(
            progress_line(run.name, a + done, failed, len(items))))
        result = run.summarize(answers)
        if len(sizes) == 1:
            return result
        result["alpha"] = alpha
        verdicts = evaluate(gates, {"suites": {run.name: result}}, baseline)
        looks.append({"n": size, "alpha": round(alpha, 6), "verdicts": {v["gate"]: v["verdict"] for v in verdicts}})
        log(f"suite {run.name}, look {len(looks)} at {size} items (alpha {alpha:.4g}): "
            + ", ".join(f"{g} {v}" for g, v in looks[-1]["verdicts"].items()))
        if all(v["verdict"] in ("pass", "fail") for v in verdicts):
            break
    return result | {"looks": looks, "cap": len(items), "stopped_early": len(answers) < len(items)}


def progress_line(suite: str, answered: int, failed: int, total: int) -> str:
    """A suite's progress: replies that came, and requests that failed (never counted as answered)."""
    return f"suite {suite}: {answered}/{total} answered" + (f", {failed} failed" if failed else "")


async def run_suite(session: aiohttp.ClientSession, base_url: str, model: str, suite: Suite, system_prompt: str,
                    hardened: bool, limit: int | None, concurrency: int,
                    on_answer: Callable[[int, int, int], None] | None = None) -> dict[str, Any]:
    """Ask the first `limit` prompts (all without one), score every answer, and summarize."""
    items = suite.items()[:limit] if limit else suite.items()
    answers = await ask_items(session, base_url, model, suite, items, system_prompt, hardened, concurrency, on_answer)
    return summarize(suite, answers, hardened)


