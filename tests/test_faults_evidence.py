"""Issue 30, items 3, 4 and 10 (counts): the documents say only what the run measured.

- calibration and evaluation sets are checked for overlap (exact and near-duplicate prompts) at
  validate/plan time and in the report; the shipped demo's sets are disjoint;
- the blog's claims follow the run's verdicts, an unreliable speed is printed as such, each strategy's
  calibration set is named, and the embedded recipe runs from its upload;
- calibration counts are true: distinct samples vs repeats, answered vs failed teacher requests, and a
  JSONL tool call whose arguments are not JSON is refused as the teacher path refuses it.

Fast: no model runs (the tokenizer test reads the demo's GGUF tokenizer, seconds).
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
from pathlib import Path

import pytest

from conftest import MINIMAL, RECIPES, placeholder_model, recipe
from runner.calibration.overlap import Item, file_overlaps, find_overlaps, recipe_overlaps
from runner.errors import RunnerError
from runner.recipe.loader import load_recipe
from runner.recipe.resources import shipped_suites
from runner.recipe.schema import SuiteRef
from runner.steps.report import environment, portable_recipe, speed_text

SYSTEM = {"role": "system", "content": "Be brief."}
TOOLS = [{"type": "function", "function": {"name": "search_memory", "parameters": {
    "type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]}}}]


def chat(user: str, answer: str = "Sure.") -> dict:
    return {"messages": [SYSTEM, {"role": "user", "content": user}, {"role": "assistant", "content": answer}]}


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# --- item 3: overlap ------------------------------------------------------------------------------


def test_overlap_flags_copies_and_rewordings_but_not_other_questions_in_one_template():
    prompts = [Item("s #1", "What did Priya say about the trip?"),
               Item("s #2", "Which is heavier, a kilogram of feathers or a kilogram of iron?"),
               Item("s #3", "What is the capital of France?"),
               Item("s #4", "What did Mom say about dinner on Sunday?")]
    turns = [Item("c:1", "what did priya say about the TRIP"),  # exact after normalising
             Item("c:2", "Which is heavier, a kilo of feathers or a kilo of iron?"),  # reworded
             Item("c:3", "What is the capital of Karnataka?"),  # another question, same template
             Item("c:4", "Quick one before I go: what did Mom say about dinner on Sunday? Thanks!"),  # quoted
             Item("c:5", "What did Priya say about the doctor visit?"),  # another question, same template
             Item("c:6", " ".join(["The river runs slowly through the valley in summer and farmers cut the hay"] * 5))]
    found = {(o.suite_item, o.calibration_item): o.kind for o in find_overlaps(prompts, turns)}
    assert found == {("s #1", "c:1"): "exact", ("s #2", "c:2"): "reworded", ("s #4", "c:4"): "quoted"}


def test_the_shipped_calibration_sets_are_disjoint_from_every_shipped_suite():
    suites = [SuiteRef(name=n) for n in shipped_suites()]
    assert file_overlaps(RECIPES / "demo" / "calibration.jsonl", suites) == []
    assert file_overlaps(RECIPES / "experiments" / "prose.txt", suites, kind="text") == []
    for path in (RECIPES / "demo" / "smollm2-cpu.yaml", RECIPES / "experiments" / "calibration-sets.yaml"):
        overlaps = recipe_overlaps(load_recipe(path).recipe)
        assert overlaps and all(found == [] for found in overlaps.values()), path
    # The demo still has the rows its recipe counts on: 34 samples and 8 held out.
    assert len((RECIPES / "demo" / "calibration.jsonl").read_text().splitlines()) == 42


def test_validate_and_plan_warn_naming_the_suite_prompt_and_the_calibration_line(write, tmp_path):
    placeholder_model(tmp_path / "model")
    write_jsonl(tmp_path / "calib.jsonl", [chat("Tell me a joke."), chat("What did Priya say about the trip?"),
                                           chat("Which ocean is the biggest?")])
    path = write("r.yaml", MINIMAL + "benchmark:\n  suites:\n    - {name: tool_calling}\n")
    result = recipe("validate", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "warning: calibration.source: 1 calibration prompt overlap" in result.stderr
    assert "tool_calling #1 'What did Priya say about the trip?'" in result.stderr
    assert "calib.jsonl:2" in result.stderr and "(exact, 1.00)" in result.stderr
    planned = recipe("plan", str(path), "--run-dir", str(tmp_path / "run"))
    assert "tool_calling #1" in planned.stderr and "calib.jsonl:2" in planned.stderr
    as_json = recipe("plan", str(path), "--run-dir", str(tmp_path / "run"), "--json")
    warned = json.loads(as_json.stdout)["warnings"]["calibration.source"]
    assert len(warned) == 1 and "calib.jsonl:2" in warned[0] and "tool_calling #1" in warned[0]
    # Disjoint: no warning.
    write_jsonl(tmp_path / "calib.jsonl", [chat("Tell me a joke.")])
    assert "overlap" not in recipe("validate", str(path)).stderr


def test_teacher_prompts_are_checked_before_anything_is_generated(write, tmp_path):
    placeholder_model(tmp_path / "model")
    path = write("r.yaml", MINIMAL.replace(
        "  source: {kind: jsonl, path: calib.jsonl}",
        "  source:\n    kind: teacher\n    endpoint: http://127.0.0.1:9/v1\n    model: t\n    categories:\n"
        "      - {name: memory, count: 2, prompts: ['What did my manager say about the review?', 'Hello']}")
        + "benchmark:\n  suites:\n    - {name: tool_calling}\n")
    [(key, found)] = recipe_overlaps(load_recipe(path).recipe).items()
    assert key == "calibration.source" and len(found) == 1
    assert found[0].calibration_item == "calibration.source.categories[0] (memory).prompts[0]"


# --- item 10: counts that are true ----------------------------------------------------------------


def test_calibration_counts_say_distinct_samples_and_repeats(demo_tokenizer, tmp_path):
    from transformers import AutoTokenizer

    from runner.worker.calib_data import load_calibration

    tokenizer = AutoTokenizer.from_pretrained(demo_tokenizer)
    one = write_jsonl(tmp_path / "one.jsonl", [chat("Tell me a joke.")])
    calib = load_calibration(one, tokenizer, 43, 64, seed=0)
    assert calib.counts() == {"calibration_samples": 43, "calibration_distinct_samples": 1,
                              "calibration_repeated_samples": 42, "calibration_most_uses": 43}
    assert calib.describe() == "43 samples (1 distinct, each used up to 43 times)"
    many = write_jsonl(tmp_path / "many.jsonl", [chat(f"question {i}") for i in range(42)])
    calib = load_calibration(many, tokenizer, 256, 64, seed=0)
    assert calib.counts()["calibration_distinct_samples"] == 42 and calib.counts()["calibration_most_uses"] == 7
    calib = load_calibration(many, tokenizer, 34, 64, seed=0, held_out=8)
    assert calib.describe() == "34 samples (all distinct)"


def test_teacher_progress_counts_a_failed_request_as_failed(tmp_path, caplog):
    from runner.calibration.generate import generate
    from runner.recipe.schema import TeacherSource
    from runner.testing.scripted_server import ScriptedServer

    server = ScriptedServer()
    prompts = ["one", "two", "three", "four", "[fail:400:1] five"]

    async def main():
        await server.start()
        try:
            teacher = TeacherSource.model_validate({
                "kind": "teacher", "endpoint": server.url, "model": "scripted-teacher", "retries": 0,
                "categories": [{"name": "chat", "count": 5, "prompts": prompts}],
                "validation": {"min_tokens": 1, "min_conversations": 1, "min_tool_call_conversations": 0,
                               "enforce": False}})
            return await generate(teacher, 0, tmp_path, tmp_path / "partial", None, logging.getLogger("t"))
        finally:
            await server.stop()

    with caplog.at_level(logging.INFO):
        summary = asyncio.run(main())
    assert summary["failed_requests"] == {"http_400": 1}
    progress = [r.getMessage() for r in caplog.records if r.getMessage().startswith("teacher: ")]
    assert progress[-1].startswith("teacher: 4/5 conversations answered, 1 failed ("), progress


@pytest.mark.parametrize(("arguments", "tools", "reason"), [
    ("{not json", TOOLS, "tool_args_not_json"),
    ('{"person": "Priya"}', TOOLS, "tool_args_schema"),  # the required query is missing
    ('["a", "list"]', None, "tool_args_not_json"),  # no tools declared: the JSON is still checked
    ('{"query": "trip"}', [], "tool_unknown"),
])
def test_jsonl_tool_call_arguments_are_checked_as_generated_ones_are(tmp_path, arguments, tools, reason):
    from runner.calibration.conversations import read_conversations

    call = {"id": "c1", "type": "function", "function": {"name": "search_memory", "arguments": arguments}}
    bad = {"messages": [{"role": "user", "content": "What did Priya say?"},
                        {"role": "assistant", "content": None, "tool_calls": [call]}]}
    if tools is not None:
        bad["tools"] = tools
    path = write_jsonl(tmp_path / "c.jsonl", [chat("hello"), bad])
    with pytest.raises(RunnerError) as err:
        read_conversations(path)
    message = str(err.value)
    assert message.startswith(f"{path}:2: messages[1].tool_calls[0] (search_memory)") and reason in message
    good = {**bad, "tools": TOOLS, "messages": [bad["messages"][0], {**bad["messages"][1], "tool_calls": [
        {**call, "function": {"name": "search_memory", "arguments": '{"query": "trip"}'}}]}]}
    assert len(read_conversations(write_jsonl(tmp_path / "ok.jsonl", [good]))) == 1


# --- item 4: the documents --------------------------------------------------------------------------


def paired_result(value: float, low: float, high: float) -> dict:
    return {"speed": {"summary": {"decode_tok_s": value}, "paired_baseline": {
        "summary": {"decode_tok_s": 11.0}, "pairs": 3,
        "ratios": {"decode_tok_s": {"median": 0.5, "min": low, "max": high}}}}}


def test_a_speed_the_pairs_disagree_on_is_printed_unreliable_with_its_spread():
    from runner.benchmark.gates import evaluate

    gate = [{"name": "decode_speed", "metric": "speed.decode_tok_s", "op": ">=", "value": 0.25,
             "relative_to": "baseline"}]
    noisy = paired_result(1.1, 0.1, 1.0)  # another process slowed some requests
    verdicts = evaluate(gate, noisy, {"speed": {"summary": {"decode_tok_s": 11.0}}})
    assert verdicts[0]["verdict"] == "inconclusive"
    text = speed_text(noisy, verdicts)
    assert not text["reliable"] and text["text"].startswith("unreliable (1.1 measured; x0.10-x1.00 of the baseline "
                                                            "over 3 pairs")
    assert "gate decode_speed" in text["text"]
    steady = paired_result(10.6, 0.9, 1.02)
    assert speed_text(steady, evaluate(gate, steady, None))["text"] == "10.6"
    assert speed_text(paired_result(5.0, 0.3, 0.9), [])["reliable"] is False  # spread over x2, no gate
    assert speed_text({"speed": {"summary": {"decode_tok_s": 4.0}}}, [])["text"] == "4.0"  # not paired


def document_facts(behaviour: dict) -> dict:
    return {
        "recipe": {"name": "mini", "description": "", "gates": [{}, {}]}, "recipe_yaml": "name: mini\n",
        "recipe_files": [], "required_inputs": [], "calibration_sets": {}, "behaviour": behaviour,
        "model": {"name": "Mini"}, "title": "Mini NVFP4", "best": None,
        "selection": {"rule": "no gate fails", "failing": {}}, "strategies": {}, "chosen": None,
        "failed": {}, "baseline": None, "baseline_name": None, "gate_table": "| gate |\n",
        "speed": {}, "calibration": {}, "source_bytes": None, "usage": None, "hardware": "h",
        "hardware_description": None, "repo_id": None, "suggested_repo_id": None, "verify_rows": [],
        "base_model": None, "source_description": "a local bfloat16 checkpoint", "format": None,
        "baseline_description": None,
    }


def test_the_blog_claims_only_what_the_verdicts_say():
    blog = environment(None).get_template("blog_post.md.j2")
    checks = ["thinking leaking into answers", "tool calls that stop parsing"]
    calm = blog.render(**document_facts({"checks": checks, "gates": ["thinking_leak", "tools"], "failed": {},
                                          "inconclusive": {"max": ["tools"]}, "passed": {"max": ["thinking_leak"]}}))
    assert "breaks" not in calm and "thinking leaks into answers" not in calm
    assert "no behaviour gate (thinking_leak, tools) rejected a strategy" in calm
    assert "`max` on tools stayed inconclusive" in calm
    broken = blog.render(**document_facts({"checks": checks, "gates": ["thinking_leak"],
                                           "failed": {"max": ["thinking_leak"]}, "inconclusive": {}, "passed": {}}))
    assert "quantization did change behaviour: `max` did not pass thinking_leak" in broken
    silent = blog.render(**document_facts({"checks": [], "gates": [], "failed": {}, "inconclusive": {},
                                           "passed": {}}))
    assert "says nothing about behaviour" in silent


def test_the_embedded_recipe_runs_from_its_upload(write, tmp_path):
    placeholder_model(tmp_path / "model")
    (tmp_path / "data").mkdir()
    write_jsonl(tmp_path / "data" / "calib.jsonl", [chat("Tell me a joke.")])
    shutil.copyfile(RECIPES / "suites" / "factual.yaml", tmp_path / "data" / "mine.yaml")
    path = write("r.yaml", MINIMAL.replace("path: calib.jsonl", "path: data/calib.jsonl")
                 + "benchmark:\n  suites:\n    - {name: mine, path: data/mine.yaml}\n")
    portable = portable_recipe(load_recipe(path).recipe, reserved={"config.json", "calib.jsonl"})
    assert str(tmp_path) not in portable.yaml
    # calib.jsonl is taken (say, by a checkpoint file): the input gets a name of its own
    assert portable.files == {"calib-2.jsonl": tmp_path / "data" / "calib.jsonl",
                              "mine.yaml": tmp_path / "data" / "mine.yaml"}
    assert portable.required == [{"key": "model.source.path", "name": "model",
                                  "what": "the source model (its folder, or the .gguf file)"}]
    upload = tmp_path / "upload"
    upload.mkdir()
    (upload / "recipe.yaml").write_text(portable.yaml, encoding="utf-8")
    for name, source in portable.files.items():
        shutil.copyfile(source, upload / name)
    placeholder_model(upload / "model")  # the required input, brought by the user
    again = load_recipe(upload / "recipe.yaml").recipe
    assert again.calibration.source.path == upload / "calib-2.jsonl"
    assert again.benchmark.suites[0].path == upload / "mine.yaml"
    assert recipe("validate", str(upload / "recipe.yaml")).returncode == 0


def test_the_blog_does_not_count_a_negative_control_as_behaviour_quantization_changed(tmp_path):
    from runner.recipe.loader import load_recipe
    from runner.steps.report import behaviour

    recipe = load_recipe(RECIPES / "demo" / "smollm2-cpu.yaml").recipe
    verdict = {"gate": "knowledge", "metric": "easy_facts.pass_rate", "verdict": "fail"}
    strategies = {"nvfp4_max": {"spec": {"negative_control": False}, "verdicts": [{**verdict, "verdict": "pass"}]},
                  "negative_control": {"spec": {"negative_control": True}, "verdicts": [verdict]}}
    facts = behaviour(recipe, strategies)
    assert facts["failed"] == {} and facts["passed"] == {"nvfp4_max": ["knowledge"]}
    assert facts["controls"] == {"negative_control": ["knowledge"]}
