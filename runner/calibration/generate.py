"""Generate calibration conversations from a teacher endpoint (the plan's Phase 1).

Each conversation is identified by its category and index; its prompts are fixed by the recipe
(see prompts.py). Conversations are generated concurrently (at most `concurrency` requests in
flight) and appended, one JSON line each and flushed to disk, to a partial file that outlives the
step: an interrupted run skips what is already there and generates only the rest. The partial
file is keyed by what determines the content (model, prompts, tools, sampling, seed), so
changing the filters or the counts reuses every conversation already generated.

When the teacher answers with tool calls, each gets the recipe's canned result and the teacher
answers again, as the plan asks, until it answers in text (at most MAX_TOOL_ROUNDS times).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import statistics
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp

from runner.calibration.conversations import write_conversations
from runner.calibration.prompts import PromptPool
from runner.calibration.teacher_client import TeacherClient, TeacherError
from runner.calibration.validate import (
    MARKDOWN,
    THINKING,
    Filter,
    histogram_png,
    token_counter,
    tool_call_problem,
    verification,
)
from runner.errors import RunnerError
from runner.recipe.schema import Category, TeacherSource
from runner.run_dir import write_json_atomic

MAX_TOOL_ROUNDS = 3


def generation_key(spec: TeacherSource, seed: int) -> str:
    """Hash of what decides the generated text: the teacher's model name, prompts, tools and sampling.

    Not the filters, the counts or the connection settings (a teacher restarted on another port
    still serves the same model).
    """
    data = spec.model_dump(mode="json", exclude={"validation", "concurrency", "timeout_s", "retries", "endpoint",
                                                 "api_key_env"})
    for category in data["categories"]:
        category.pop("count")
    blob = json.dumps({"spec": data, "seed": seed}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


class PartialFile:
    """Append-only JSONL of finished conversations, each line flushed and fsynced."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self.records = self._read_good_lines()
        self._fh = path.open("a", encoding="utf-8")

    def _read_good_lines(self) -> dict[str, dict[str, Any]]:
        if not self.path.exists():
            return {}
        good, lines = {}, []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a line cut short by a crash: regenerated
            if isinstance(record, dict) and "id" in record and record["id"] not in good:
                good[record["id"]] = record
                lines.append(line)
        # Rewrite without the broken line, so that appends start on a line of their own.
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        os.replace(tmp, self.path)
        return good

    def append(self, record: dict[str, Any]) -> None:
        self._fh.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._fh.flush()
        os.fsync(self._fh.fileno())
        self.records[record["id"]] = record

    def close(self) -> None:
        self._fh.close()


def _assistant_message(reply: dict[str, Any], conv_id: str, round_: int) -> dict[str, Any]:
    """The teacher's reply in the plan's message format (tool-call arguments as JSON strings)."""
    message: dict[str, Any] = {"role": "assistant", "content": reply.get("content")}
    for key in ("reasoning_content", "reasoning"):
        if reply.get(key):
            message[key] = reply[key]  # kept for the thinking filter, dropped from the output
    calls = []
    for i, call in enumerate(reply.get("tool_calls") or []):
        fn = dict(call.get("function") or {})
        if not isinstance(fn.get("arguments"), str):
            fn["arguments"] = json.dumps(fn.get("arguments"))
        calls.append({"id": call.get("id") or f"call_{conv_id}_{round_}_{i}", "type": "function", "function": fn})
    if calls:
        message["tool_calls"] = calls
    return message


async def converse(client: TeacherClient, spec: TeacherSource, pool: PromptPool, category: Category,
                   index: int) -> dict[str, Any]:
    conv_id = f"{category.name}-{index:05d}"
    prompts, language = pool.for_conversation(index)
    system = spec.system_prompt
    if language:
        system = f"{system}\nAnswer in {language}.".strip()
    messages: list[dict[str, Any]] = [{"role": "system", "content": system}] if system else []
    tools = [t.model_dump() for t in spec.tools] or None
    sampling = spec.sampling.model_dump()
    round_ = 0
    for prompt in prompts:
        messages.append({"role": "user", "content": prompt})
        message = _assistant_message(await client.chat(_for_request(messages), tools, sampling), conv_id, round_)
        messages.append(message)
        for _ in range(MAX_TOOL_ROUNDS):
            if not message.get("tool_calls"):
                break
            for call in message["tool_calls"]:
                name = call["function"].get("name")
                messages.append({"role": "tool", "tool_call_id": call["id"], "name": name,
                                 "content": spec.tool_results.get(name, '{"error": "unknown tool"}')})
            round_ += 1
            message = _assistant_message(await client.chat(_for_request(messages), tools, sampling), conv_id, round_)
            messages.append(message)
        round_ += 1
    conversation: dict[str, Any] = {"messages": messages, "category": category.name}
    if tools:
        conversation["tools"] = tools
    return conversation


def _for_request(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in m.items() if k not in ("reasoning_content", "reasoning")} for m in messages]


async def generate(spec: TeacherSource, seed: int, output_dir: Path, partial_dir: Path, model_dir: Path | None,
                   log: logging.Logger) -> dict[str, Any]:
    """Generate what is missing, filter, and write calibration.jsonl plus the histogram into output_dir."""
    pools = {c.name: PromptPool(c, seed, spec.eval_split) for c in spec.categories}
    partial = PartialFile(partial_dir / f"teacher-{generation_key(spec, seed)}.jsonl")
    reused = len(partial.records)
    jobs = [(c, i) for c in spec.categories for i in range(c.count) if f"{c.name}-{i:05d}" not in partial.records]
    eval_jobs = [(c, i) for c in spec.categories for i in range(len(pools[c.name].eval_prompts))
                 if eval_id(c.name, i) not in partial.records]
    log.info("teacher %s (%s): %d conversations to generate, %d already done", spec.endpoint, spec.model,
             len(jobs), reused)
    failures: Counter[str] = Counter()
    connector = aiohttp.TCPConnector(limit=spec.concurrency)
    try:
        async with aiohttp.ClientSession(connector=connector) as session:
            client = TeacherClient(spec.endpoint, spec.model, session, spec.timeout_s, spec.retries, spec.api_key_env,
                                   spec.circuit_breaker, spec.max_reply_bytes, log)
            if jobs or eval_jobs:
                await client.check_reachable()
            slots = asyncio.Semaphore(spec.concurrency)
            progress = Progress(len(jobs) + len(eval_jobs), log)

            async def one(category: Category, index: int) -> None:
                async with slots:
                    try:
                        conversation = await converse(client, spec, pools[category.name], category, index)
                    except TeacherError as exc:
                        failures[exc.reason] += 1
                        progress.step(failed=True)
                        if exc.reason != "circuit_open":
                            log.warning("%s-%05d failed: %s", category.name, index, exc)
                        return
                partial.append({"id": f"{category.name}-{index:05d}", **conversation})
                progress.step()

            async def reference(category: Category, index: int) -> None:
                async with slots:
                    try:
                        record = await reference_reply(client, spec, category, pools[category.name].eval_prompts[index])
                    except TeacherError as exc:
                        failures[exc.reason] += 1
                        progress.step(failed=True)
                        return
                partial.append({"id": eval_id(category.name, index), **record})
                progress.step()

            await asyncio.gather(*(one(c, i) for c, i in jobs), *(reference(c, i) for c, i in eval_jobs))
            retries = client.retried
    finally:
        partial.close()
    if client.broken:
        raise RunnerError(f"{client.broken}. {len(partial.records)} conversations are kept in {partial.path}; "
                          f"failed requests: {dict(failures)}")
    if (jobs or eval_jobs) and sum(failures.values()) == len(jobs) + len(eval_jobs):
        raise RunnerError(f"every request to the teacher failed ({dict(failures)}); see the step log")
    summary = _filter_and_write(spec, partial.records, output_dir, model_dir, failures, reused, retries, log)
    if spec.eval_split > 0:
        summary["eval"] = write_eval_split(spec, pools, partial.records, output_dir)
        write_json_atomic(output_dir / "generation_report.json", summary)
        log.info("held-out eval split: %d items (%s)", summary["eval"]["items"],
                 ", ".join(f"{k} {v['kept']}" for k, v in summary["eval"]["per_category"].items()))
    return summary


def eval_id(category: str, index: int) -> str:
    return f"eval:{category}-{index:05d}"


async def reference_reply(client: TeacherClient, spec: TeacherSource, category: Category, prompt: str
                          ) -> dict[str, Any]:
    """The teacher's single reply to a held-out prompt, at temperature 0: the reference a candidate's
    behaviour is scored against (runner/benchmark/suites.py, scorer `reference`)."""
    messages = ([{"role": "system", "content": spec.system_prompt}] if spec.system_prompt else []) + [
        {"role": "user", "content": prompt}]
    tools = [t.model_dump() for t in spec.tools] or None
    sampling = spec.sampling.model_dump() | {"temperature": 0.0}
    reply = _assistant_message(await client.chat(messages, tools, sampling), "eval", 0)
    return {"category": category.name, "messages": messages, "reply": reply}


def write_eval_split(spec: TeacherSource, pools: dict[str, PromptPool], records: dict[str, dict[str, Any]],
                     output_dir: Path) -> dict[str, Any]:
    """eval.jsonl: one held-out item per line (its messages, the tools, and the reference the teacher's
    reply gives: `tool` + `argument_names`, or `text`), in category order. A reply that is itself not the
    behaviour wanted (markdown, reasoning, an unusable tool call) is no reference: dropped and counted."""
    tools = {t.function.name: t.function.model_dump() for t in spec.tools}
    per_category: dict[str, Counter[str]] = {}
    lines = []
    for category in spec.categories:
        counts = per_category.setdefault(category.name, Counter())
        for i in range(len(pools[category.name].eval_prompts)):
            record = records.get(eval_id(category.name, i))
            if record is None:
                counts["failed"] += 1
                continue
            reply = record["reply"]
            calls = reply.get("tool_calls") or []
            text = reply.get("content") or ""
            if calls:
                problem = tool_call_problem(calls[0], tools)
                if problem:
                    counts[f"rejected_{problem}"] += 1
                    continue
                fn = calls[0]["function"]
                reference = {"tool": fn["name"], "argument_names": sorted(json.loads(fn["arguments"]))}
            elif MARKDOWN.search(text) or THINKING.search(text) or reply.get("reasoning_content") or not text.strip():
                counts["rejected_not_plain"] += 1
                continue
            else:
                reference = {"text": True}
            counts["kept"] += 1
            lines.append({"id": eval_id(category.name, i), "category": category.name,
                          "messages": record["messages"], "tools": [t.model_dump() for t in spec.tools],
                          "reference": reference, "teacher_reply": text[:500]})
    with (output_dir / "eval.jsonl").open("w", encoding="utf-8") as fh:
        for line in lines:
            fh.write(json.dumps(line, ensure_ascii=False) + "\n")
    return {"items": len(lines), "split": spec.eval_split,
            "per_category": {name: {"kept": counts["kept"], **dict(counts)} for name, counts in per_category.items()},
            "with_tool_reference": sum("tool" in line["reference"] for line in lines)}


class Progress:
    """Answered and failed conversations of the total, and the rate, in the step log: every 10 % and
    at least every 30 s. A failed request is counted as failed, never as answered."""

    def __init__(self, total: int, log: logging.Logger, every_s: float = 30.0):
        self.total, self.log, self.every_s = total, log, every_s
        self.done = self.failed = 0
        self.started = self.last = time.monotonic()
        self.next_share = 0.1

    @property
    def answered(self) -> int:
        return self.done - self.failed

    def line(self, rate: float) -> str:
        return (f"teacher: {self.answered}/{self.total} conversations answered, {self.failed} failed"
                + (f", {self.total - self.done} to go" if self.done < self.total else "") + f" ({rate:.2f}/s)")

    def step(self, failed: bool = False) -> None:
        self.done += 1
        self.failed += failed
        now = time.monotonic()
        if self.done == self.total or self.done >= self.next_share * self.total or now - self.last >= self.every_s:
            rate = self.done / max(now - self.started, 1e-9)
            self.log.info("%s", self.line(rate))
            self.last = now
            self.next_share = (int(self.done * 10 / max(self.total, 1)) + 1) / 10


def _filter_and_write(spec: TeacherSource, records: dict[str, dict[str, Any]], output_dir: Path,
                      model_dir: Path | None, failures: Counter[str], reused: int, retries: int,
                      log: logging.Logger) -> dict[str, Any]:
    rules = spec.validation
    count_tokens, counted_with = token_counter(model_dir)
    keep = Filter(rules.reject_markdown, rules.reject_thinking, rules.check_tool_calls, rules.min_tokens,
                  rules.max_tokens, rules.deduplicate, count_tokens,
                  tools={t.function.name: t.function.model_dump() for t in spec.tools})
    wanted = {f"{c.name}-{i:05d}" for c in spec.categories for i in range(c.count)}
    expected_tool = {c.name: c.expect_tool for c in spec.categories}
    accepted, rejected = [], Counter()
    per_category: dict[str, Counter[str]] = {c.name: Counter() for c in spec.categories}
    for conv_id in sorted(wanted & records.keys()):
        conv = {k: v for k, v in records[conv_id].items() if k != "id"}
        category = conv["category"]
        per_category[category]["generated"] += 1
        called = {c["function"].get("name") for m in conv["messages"] for c in m.get("tool_calls") or []}
        reason = keep.problem(conv)
        if reason is None and expected_tool[category] and expected_tool[category] not in called:
            reason = "expected_tool_not_called"
        if reason:
            rejected[reason] += 1
            per_category[category][f"rejected_{reason}"] += 1
            continue
        per_category[category]["kept"] += 1
        per_category[category]["with_tool_calls"] += bool(called)
        accepted.append(conv)
    lengths = [c["tokens"] for c in accepted]
    checks = verification(accepted, rules)
    clean = [{k: v for k, v in c.items() if k != "tokens"} | {"messages": [
        {k: v for k, v in m.items() if k not in ("reasoning_content", "reasoning")} for m in c["messages"]]}
        for c in accepted]
    sha256 = write_conversations(output_dir / "calibration.jsonl", clean)
    if lengths:
        histogram_png(lengths, output_dir / "token_lengths.png", rules.min_tokens, rules.max_tokens)
    summary = {
        "teacher": {"endpoint": spec.endpoint, "model": spec.model},
        "requested": len(wanted),
        "generated": len(wanted & records.keys()),
        "reused_from_earlier_attempts": reused,
        "failed_requests": dict(failures),
        "retries": retries,
        "rejected": dict(rejected),
        "conversations": len(accepted),
        "with_tool_calls": sum(1 for c in accepted if any(m.get("tool_calls") for m in c["messages"])),
        "per_category": {name: dict(counts) for name, counts in per_category.items()},
        "token_counts": counted_with,
        "token_lengths": {"min": min(lengths), "median": statistics.median(lengths), "max": max(lengths)}
        if lengths else None,
        "verification": checks,
        "sha256": sha256,
    }
    write_json_atomic(output_dir / "generation_report.json", summary)
    failed = [name for name, check in checks.items() if not check["pass"]]
    for name in failed:
        log.warning("calibration check %s failed: %s (required %s)", name, checks[name]["value"],
                    checks[name]["required"])
    if failed and rules.enforce:
        raise RunnerError(
            "the generated calibration set fails the plan's checks: "
            + "; ".join(f"{n} = {checks[n]['value']} (required {checks[n]['required']})" for n in failed)
            + f". Rejections: {dict(rejected)}. Raise the category counts (what was generated is kept and "
            "reused) or relax calibration.source.validation")
    return summary
