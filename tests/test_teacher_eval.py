"""The held-out teacher split: prompts the calibrate step sets aside (never calibrated on), the teacher's
replies as references, and a candidate scored against them; a real scripted teacher on loopback."""

from __future__ import annotations

import json

from test_teacher import lines, run_generation, spec

from conftest import MINIMAL, placeholder_model, recipe
from runner.benchmark.harness import RequestResult
from runner.benchmark.suites import OTHER_FORM, load_eval_items, score_reference
from runner.calibration.prompts import PromptPool
from runner.recipe.schema import Category, SuiteRef

CATEGORIES = [
    {"name": "chat", "count": 6, "prompts": [f"tell me about topic {i}" for i in range(10)]},
    {"name": "memory", "count": 4, "templates": ["[tool:search_memory] what did {who} say?"],
     "fill": {"who": ["Priya", "Ravi", "Mom", "Arjun", "Ana", "Lee"]}},
    {"name": "markdown", "count": 2, "prompts": ["[markdown] list things", "[markdown] more", "[markdown] again"]},
    {"name": "single", "count": 2, "prompts": ["only one prompt"]},
]


def test_the_split_is_seeded_disjoint_and_never_takes_every_prompt():
    category = Category.model_validate(CATEGORIES[0])
    pool = PromptPool(category, 7, 0.2)
    assert len(pool.eval_prompts) == 2 and not set(pool.eval_prompts) & set(pool.prompts)
    assert pool.eval_prompts == PromptPool(category, 7, 0.2).eval_prompts != PromptPool(category, 8, 0.2).eval_prompts
    assert all(set(pool.for_conversation(i)[0]) <= set(pool.prompts) for i in range(50))
    single = PromptPool(Category.model_validate(CATEGORIES[3]), 7, 0.5)
    assert single.eval_prompts == [] and single.prompts == ["only one prompt"]  # nothing left to calibrate on
    assert PromptPool(category, 7, 0.0).eval_prompts == []


def test_generation_writes_the_held_out_references_and_drops_replies_that_are_no_reference(tmp_path):
    from runner.testing.scripted_server import ScriptedServer

    summary = run_generation(ScriptedServer(), lambda url: spec(url, CATEGORIES, eval_split=0.5), tmp_path)
    items = lines(tmp_path / "out" / "eval.jsonl")
    held = {i["messages"][-1]["content"] for i in items}
    calibrated = {m["content"] for c in lines(tmp_path / "out" / "calibration.jsonl") for m in c["messages"]
                  if m["role"] == "user"}
    assert held and not held & calibrated  # never calibrated on
    per = summary["eval"]["per_category"]
    assert per["chat"]["kept"] == 5 and per["memory"]["kept"] == 3
    assert per["markdown"] == {"kept": 0, "rejected_not_plain": 2}  # a markdown reply is no reference
    memory = next(i for i in items if i["category"] == "memory")
    assert memory["reference"] == {"tool": "search_memory", "argument_names": ["query"]}
    assert next(i for i in items if i["category"] == "chat")["reference"] == {"text": True}
    report = json.loads((tmp_path / "out" / "generation_report.json").read_text())
    assert report["eval"]["items"] == len(items) == 8 and report["eval"]["with_tool_reference"] == 3
    ref = SuiteRef(name="held_out", teacher_eval=True, seed=1, limit=5)
    asked = load_eval_items(tmp_path / "out" / "eval.jsonl", ref)
    assert len(asked) == 5 and asked == load_eval_items(tmp_path / "out" / "eval.jsonl", ref)


def call(name: str, args: dict) -> dict:
    return {"id": "c", "type": "function", "function": {"name": name, "arguments": json.dumps(args)}}


def test_a_reply_is_scored_against_the_teachers():
    tools = [{"type": "function", "function": {"name": "search_memory", "parameters": {
        "type": "object", "properties": {"query": {"type": "string"}, "person": {"type": "string"}},
        "required": ["query"]}}}]
    tool_item = {"reference": {"tool": "search_memory", "argument_names": ["query"]}, "tools": tools}
    text_item = {"reference": {"text": True}, "tools": tools}

    def ok(**kw) -> RequestResult:
        return RequestResult(ok=True, **kw)

    assert score_reference(tool_item, ok(tool_calls=[call("search_memory", {"query": "trip"})]))[0]
    passed, why = score_reference(tool_item, ok(tool_calls=[call("search_memory", {"query": "x", "person": "P"})]))
    assert not passed and "the teacher's ['query']" in why
    passed, why = score_reference(tool_item, ok(content='{"name": "search_memory", "arguments": {"query": "x"}}'))
    assert not passed and why.startswith(OTHER_FORM)
    assert not score_reference(tool_item, ok(content="I don't know."))[0]
    assert score_reference(text_item, ok(content="The trip moved to April."))[0]
    assert not score_reference(text_item, ok(content="**The trip** moved."))[0]
    assert not score_reference(text_item, ok(content="Sure.", tool_calls=[call("search_memory", {"query": "x"})]))[0]
    assert not score_reference(text_item, ok(content="Fine.", reasoning="Let me think"))[0]
    assert not score_reference(text_item, RequestResult(ok=False, error="HTTP 500"))[0]


def test_a_recipe_plans_the_held_out_suite_after_calibrate_and_validate_refuses_it_without_a_split(write, tmp_path):
    placeholder_model(tmp_path / "model")
    teacher = """
name: mini
model:
  name: Mini
  source: {kind: local, path: model}
calibration:
  source:
    kind: teacher
    endpoint: http://127.0.0.1:9/v1
    model: t
    eval_split: 0.25
    categories:
      - {name: chat, count: 40, prompts: [PROMPTS]}
quantization:
  strategies:
    - {name: max, preset: NVFP4_DEFAULT_CFG}
benchmark:
  baseline: {kind: served}
  suites:
    - {name: held_out, teacher_eval: true}
gates:
  - {name: held_out, metric: held_out.pass_rate, op: ">=", relative_to: baseline, margin: 0.05}
""".replace("PROMPTS", ", ".join(f"q{i}" for i in range(160)))
    good = write("good.yaml", teacher)
    plan = json.loads(recipe("plan", str(good), "--json", "--run-dir", str(tmp_path / "run")).stdout)
    steps = {row["step"]: row for row in plan["steps"]}
    assert "calibrate" in steps["benchmark.max"]["needs"] and "calibrate" in steps["benchmark.baseline"]["needs"]
    assert "benchmark.baseline" in steps["benchmark.max"]["needs"]  # 40 held-out items: two sequential looks
    (power,) = plan["power"]
    assert power["n"] == 40
    (tmp_path / "calib.jsonl").write_text('{"messages": [{"role": "user", "content": "Hi"}]}\n')
    bad = write("bad.yaml", MINIMAL + "benchmark:\n  suites:\n    - {name: held_out, teacher_eval: true}\n")
    result = recipe("validate", str(bad))
    assert result.returncode != 0 and "sets none aside" in result.stdout + result.stderr
    assert "eval_split: 0.2" in result.stdout + result.stderr
