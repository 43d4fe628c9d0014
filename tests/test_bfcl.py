"""BFCL on loopback: BFCL's shipped items asked over real HTTP (the scripted server streams the replies a
test scripts per question) and judged by BFCL's own checker; the sample, the refusals and the install
message. Skips when bfcl-eval is not installed (see .ci/setup), except the install-message test."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from runner.errors import RunnerError
from runner.testing.scripted_server import ScriptedServer

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def bfcl():
    pytest.importorskip("bfcl_eval", reason="bfcl-eval not installed (.ci/setup installs it)")
    from runner.benchmark import bfcl

    return bfcl


@pytest.fixture(scope="module")
def items(bfcl) -> dict[str, Any]:
    return {i.id: i for i in bfcl.load_items(["simple_python", "parallel", "irrelevance", "live_simple"], None, 0)}


def call(name: str, arguments: dict[str, Any] | str) -> dict[str, Any]:
    args = arguments if isinstance(arguments, str) else json.dumps(arguments)
    return {"id": f"call_{name}", "type": "function", "function": {"name": name, "arguments": args}}


class BfclServer(ScriptedServer):
    """The scripted server, answering each question (the last user message) with what `script` says:
    text, a list of tool calls, or an HTTP status. It keeps every request body."""

    def __init__(self, script: dict[str, str | int | list[dict[str, Any]]]):
        super().__init__()
        self.script = script
        self.bodies: list[dict[str, Any]] = []

    async def _answer(self, body: dict[str, Any]) -> web.Response:
        self.bodies.append(body)
        question = next(m["content"] for m in reversed(body["messages"]) if m["role"] == "user")
        reply = self.script[question]
        if isinstance(reply, int):
            return web.json_response({"error": {"message": "scripted"}}, status=reply)
        message: dict[str, Any] = {"role": "assistant", "content": reply if isinstance(reply, str) else None}
        if isinstance(reply, list):
            message["tool_calls"] = reply
        return web.json_response({"id": "chatcmpl-1", "object": "chat.completion", "model": body.get("model"),
                                  "choices": [{"index": 0, "message": message, "finish_reason": "stop"}]})


def run(bfcl, chosen: list[Any], replies: list[str | int | list[dict[str, Any]]], **kwargs: Any):
    """run_bfcl over real HTTP; the items' questions answered with `replies` in order."""
    server = BfclServer({item.messages[-1]["content"]: reply for item, reply in zip(chosen, replies, strict=True)})

    async def main():
        await server.start()
        try:
            async with aiohttp.ClientSession() as session:
                return await bfcl.run_bfcl(session, server.url, "m", chosen, concurrency=4, **kwargs)
        finally:
            await server.stop()

    return asyncio.run(main()), server


def test_a_correct_call_passes_and_a_wrong_value_fails_with_bfcls_reason(bfcl, items):
    item = items["simple_python_1"]  # math.factorial(number=5), sent as the tool math_factorial
    result, server = run(bfcl, [item], [[call("math_factorial", {"number": 5})]])
    assert result["passed"] == 1 and result["items"][0]["why"] == "valid"
    result, _ = run(bfcl, [item], [[call("math_factorial", {"number": 6})]])
    [answer] = result["items"]
    assert not answer["passed"] and answer["prompt"] == "simple_python_1"
    assert answer["why"] == "value_error:others: Invalid value for parameter 'number': 6. Expected one of [5]."
    # What BFCL's OpenAI FC handler sends: question[0] as is, the converted tools, temperature 0.
    [body] = server.bodies
    assert body["messages"] == item.messages and body["temperature"] == 0 and body["max_tokens"] == 512
    assert body["tools"] == item.tools and item.tools[0]["function"]["name"] == "math_factorial"
    assert item.tools[0]["function"]["description"].endswith("Note that the provided function is in Python 3 syntax.")


def test_bfcls_own_rules_decide(bfcl, items):
    item, parallel = items["simple_python_1"], items["parallel_0"]
    swapped = [call("spotify_play", {"artist": "Maroon 5", "duration": 15}),
               call("spotify_play", {"artist": "taylor swift", "duration": 20})]  # any order, case-insensitive
    result, _ = run(bfcl, [item, parallel], [[call("math.factorial", {"number": 5})], swapped])
    why = {a["prompt"]: (a["passed"], a["why"]) for a in result["items"]}
    # the dotted name is expected as math_factorial (underscore_to_dot), as on the leaderboard
    assert why["simple_python_1"] == (False, "simple_function_checker:wrong_func_name: "
                                             "Function name 'math_factorial' not found in model output.")
    assert why["parallel_0"] == (True, "valid")
    assert item.score("The factorial of 5 is 120.", [])[1].startswith("ast_decoder:decoder_failed")
    assert item.score("", [call("math_factorial", "{number: 5")])[1].startswith("ast_decoder:decoder_failed")
    assert item.score("", [call("math_factorial", {"number": 5.0})]) == (
        False, "type_error:simple: Incorrect type for parameter 'number'. Expected type integer, got float. "
               "Parameter value: 5.0.")
    two = [call("math_factorial", {"number": 5})] * 2
    assert item.score("", two) == (False, "simple_function_checker:wrong_count: Wrong number of functions.")
    one = parallel.score("", swapped[:1])
    assert one == (False, "parallel_function_checker_no_order:wrong_count: Wrong number of functions.")


def test_irrelevance_passes_on_text_and_fails_on_a_call(bfcl, items):
    item = items["irrelevance_0"]  # a triangle's area; the only tool computes a body-mass index
    bmi = [call("determine_body_mass_index", {"weight": 70, "height": 1.75})]
    result, _ = run(bfcl, [item], ["None of the tools computes a triangle's area: it is 25 square meters."])
    assert result["passed"] == 1 and result["items"][0]["why"] == "no function call"
    result, _ = run(bfcl, [item], [bmi])
    assert result["passed"] == 0
    assert result["items"][0]["why"].startswith("irrelevance_error:decoder_success: called ['determine_body_mass_index']")
    assert item.score("", [])[0]  # empty output counts as no call


def test_the_result_is_suite_like_with_per_category_counts(bfcl, items):
    from runner.benchmark.harness import answers_hash

    chosen = [items["simple_python_1"], items["irrelevance_0"], items["live_simple_58-27-0"]]
    replies = [[call("math_factorial", {"number": 5})], "No.", [call("get_movies", {"city": "Mumbai"})]]
    seen: list[tuple[int, int, int]] = []
    result, server = run(bfcl, chosen, replies, max_tokens=64, on_answer=lambda *a: seen.append(a))
    assert {k: result[k] for k in ("passed", "failed", "total", "pass_rate")} == {
        "passed": 3, "failed": 0, "total": 3, "pass_rate": 1.0}
    assert result["per_category"] == {"simple_python": {"passed": 1, "total": 1},
                                      "irrelevance": {"passed": 1, "total": 1},
                                      "live_simple": {"passed": 1, "total": 1}}
    assert result["bfcl_version"] == bfcl.bfcl_version() == "2026.3.23"
    assert [a["prompt"] for a in result["items"]] == [i.id for i in chosen]
    assert result["items"][1]["answer"] == "No." and result["items"][0]["tool_calls"][0]["function"]["name"] == \
        "math_factorial"
    assert sorted(seen)[-1] == (3, 0, 3)
    full = [dict(a, full_answer=a["answer"]) for a in result["items"]]  # every answer here is under 500 chars
    assert result["answers_sha256"] == answers_hash(full)
    # the live item's system message is sent as BFCL sends it
    live = next(b for b in server.bodies if b["messages"][0]["role"] == "system")
    assert live["messages"] == chosen[2].messages and live["max_tokens"] == 64


def test_a_failed_request_fails_the_run_and_is_never_scored(bfcl, items):
    chosen = [items["simple_python_1"], items["irrelevance_0"]]
    with pytest.raises(RunnerError, match=r"BFCL: 1 of 2 requests .* failed \(first: irrelevance_0: request failed: "
                                          r"http_500"):
        run(bfcl, chosen, [[call("math_factorial", {"number": 5})], 500])


def test_the_sample_is_seeded_and_proportional(bfcl):
    cats = ["simple_python", "multiple", "irrelevance", "live_parallel"]  # 400, 200, 240, 16 items
    a = bfcl.load_items(cats, 107, seed=7)
    assert [i.id for i in a] == [i.id for i in bfcl.load_items(cats, 107, seed=7)]
    assert [i.id for i in a] != [i.id for i in bfcl.load_items(cats, 107, seed=8)]
    counts = {c: sum(i.category == c for i in a) for c in cats}
    assert counts == {"simple_python": 50, "multiple": 25, "irrelevance": 30, "live_parallel": 2}  # 107 x n/856
    assert all(i.id.startswith(i.category) for i in a)
    smaller = {i.id for i in bfcl.load_items(cats, 54, seed=7)}
    assert smaller < {i.id for i in a}  # a larger sample contains a smaller one
    everything = bfcl.load_items(["parallel", "parallel"], None, seed=0)
    assert [i.id for i in everything] == [f"parallel_{n}" for n in range(200)]
    with pytest.raises(RunnerError, match="have 200 items"):
        bfcl.load_items(["parallel"], 201, seed=0)


def test_unsupported_categories_are_refused_with_the_reason(bfcl):
    with pytest.raises(RunnerError, match=r"'multi_turn_base' is not supported: .*eval\(\)"):
        bfcl.load_items(["simple_python", "multi_turn_base"], 10, 0)
    with pytest.raises(RunnerError, match=r"'simple' is not supported: BFCL v4 calls it 'simple_python'"):
        bfcl.load_items(["simple"], 10, 0)
    with pytest.raises(RunnerError, match=r"'live_simpel' is not supported: .*did you mean 'live_simple'"):
        bfcl.load_items(["live_simpel"], 10, 0)
    with pytest.raises(RunnerError, match=r"'web_search' is not supported: .*live backends"):
        bfcl.load_items(["web_search"], None, 0)


def test_the_decode_is_bfcls_handlers(bfcl):
    pytest.importorskip("openai")
    from types import SimpleNamespace

    from bfcl_eval.model_handler.api_inference.openai_completion import OpenAICompletionsHandler

    fc = SimpleNamespace(is_fc_model=True)
    for raw in ([{"f": '{"a": 1}'}, {"g": "{}"}], [], "", "some text", [{"f": "{bad"}], [{"f": "[1]"}]):
        try:
            ours: Any = bfcl.decode_fc(raw)
        except Exception as exc:
            ours = type(exc)
        try:
            theirs: Any = OpenAICompletionsHandler.decode_ast(fc, raw, None, False)
        except Exception as exc:
            theirs = type(exc)
        assert ours == theirs, raw


def isolated_python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), **env})


def test_the_import_leaves_the_environment_and_the_users_files_alone(bfcl, tmp_path):
    user_root = tmp_path / "my-bfcl"
    user_root.mkdir()
    proc = isolated_python(
        "import os, sys, bfcl_eval\n"
        "from pathlib import Path\n"
        "site = Path(bfcl_eval.__file__).parents[1]\n"
        "before = sorted(site.iterdir())\n"
        "from runner.benchmark import bfcl\n"
        "bfcl.load_items(['simple_python'], 3, 0)\n"
        "root = Path(bfcl._bfcl().project_root)\n"
        "assert os.environ['BFCL_PROJECT_ROOT'] == os.environ['USER_ROOT']\n"
        "assert 'bfcl_eval.constants.model_config' not in sys.modules\n"
        "assert sorted(site.iterdir()) == before and not root.is_relative_to(site)\n"
        "print(root)\n", BFCL_PROJECT_ROOT=str(user_root), USER_ROOT=str(user_root))
    assert proc.returncode == 0, proc.stderr
    assert list(user_root.iterdir()) == []
    assert not Path(proc.stdout.strip()).exists()  # the runner's root is removed at exit


def test_missing_bfcl_names_the_install_command():
    # None in sys.modules makes `import bfcl_eval` fail, wherever bfcl-eval is installed.
    proc = isolated_python(
        "import sys; sys.modules['bfcl_eval'] = None\n"
        "from runner.benchmark import bfcl\n"
        "from runner.errors import RunnerError\n"
        "try:\n    bfcl.load_items(['simple_python'], 3, 0)\n"
        "except RunnerError as exc:\n    print(exc)\n    print(bfcl.INSTALL)\n")
    assert proc.returncode == 0, proc.stderr
    message, install = proc.stdout.strip().splitlines()
    assert message.startswith("bfcl-eval is not installed") and message.endswith(install)
    assert install == ("pip install --no-deps bfcl-eval==2026.3.23 tree_sitter==0.21.3 tree-sitter-java==0.21.0 "
                       "tree-sitter-javascript==0.21.4 tenacity==9.2.1 'filelock>=3.20'")


def test_ci_installs_what_the_message_names():
    from runner.benchmark.bfcl import BFCL_PACKAGES

    setup = (REPO / ".ci" / "setup").read_text()
    assert all(f'"{p}"' in setup for p in BFCL_PACKAGES), BFCL_PACKAGES


def test_a_recipe_runs_bfcl_as_a_suite_whose_looks_sample_every_category(bfcl, write, tmp_path):
    from conftest import MINIMAL, placeholder_model, recipe
    from runner.benchmark.suites import suite_run
    from runner.recipe.schema import SuiteRef

    ref = SuiteRef(name="bfcl", bfcl=["simple_python", "multiple", "irrelevance"], limit=120, seed=5)
    run = suite_run(ref, None, "http://unused", "m", "", 1)  # type: ignore[arg-type]
    assert len(run.items) == 120 and {i.category for i in run.items[:30]} == {"simple_python", "multiple",
                                                                              "irrelevance"}
    assert [i.id for i in run.items] == [i.id for i in suite_run(ref, None, "", "", "", 1).items]  # seeded
    placeholder_model(tmp_path / "model")
    (tmp_path / "calib.jsonl").write_text('{"messages": [{"role": "user", "content": "Hi"}]}\n')
    good = write("good.yaml", MINIMAL + """
benchmark:
  baseline: {kind: served}
  suites:
    - {name: bfcl, bfcl: [simple_python, irrelevance], limit: 200, seed: 0, baseline_rate: 0.85}
gates:
  - {name: tools, metric: bfcl.pass_rate, op: ">=", relative_to: baseline, margin: 0.05}
""")
    plan = recipe("plan", str(good), "--run-dir", str(tmp_path / "run"))
    assert plan.returncode == 0, plan.stderr
    assert "tools: n=200, baseline rate 0.85:" in plan.stdout
    bad = write("bad.yaml", MINIMAL + """
benchmark:
  suites:
    - {name: bfcl, bfcl: [multi_turn_base]}
""")
    result = recipe("validate", str(bad))
    assert result.returncode != 0 and "bad.yaml:" in result.stdout + result.stderr
    assert "multi-turn categories need BFCL's simulated APIs" in result.stdout + result.stderr


def test_without_bfcl_eval_a_recipe_validates_with_a_warning_and_run_refuses_before_any_step(write, tmp_path):
    """bfcl-eval is installed with --no-deps, outside the package's dependencies: a recipe that names BFCL is
    valid without it (the shipped catalogue must validate in a plain install), but `recipe run` refuses it
    before the source step rather than after hours of quantization."""
    from conftest import MINIMAL, placeholder_model, recipe, recipe_cli_env

    shadow = tmp_path / "shadow" / "bfcl_eval"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('simulated: not installed')\n")
    env = recipe_cli_env()
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path / "shadow"), env.get("PYTHONPATH", "")])
    placeholder_model(tmp_path / "model")
    (tmp_path / "calib.jsonl").write_text('{"messages": [{"role": "user", "content": "Hi"}]}\n')
    path = write("r.yaml", MINIMAL + """
benchmark:
  baseline: {kind: served}
  suites:
    - {name: bfcl, bfcl: [simple_python], limit: 100}
gates:
  - {name: tools, metric: bfcl.pass_rate, op: ">=", relative_to: baseline, margin: 0.05}
""")
    validate = recipe("validate", str(path), env=env)
    assert validate.returncode == 0, validate.stdout + validate.stderr
    assert "warning: its BFCL suite cannot run here: bfcl-eval is not installed" in validate.stderr
    run_dir = tmp_path / "run"
    run = recipe("run", str(path), "--run-dir", str(run_dir), env=env)
    assert run.returncode == 2 and "benchmark.suites[0].bfcl: a BFCL suite cannot run here" in run.stderr
    assert "pip install --no-deps bfcl-eval" in run.stderr and not (run_dir / "steps").exists()


def test_a_baseline_that_never_calls_a_tool_makes_a_bfcl_gate_not_measurable(bfcl, items):
    """The demo's finding: a baseline at 0 on every calling category and 34/34 on irrelevance. Pooled, a
    candidate that never calls a tool matches it and a "within 3 points" gate would pass; per category the
    suite cannot show the loss, so the gate says not measurable and names the categories."""
    from runner.benchmark.gates import evaluate

    chosen = [items["simple_python_1"], items["live_simple_58-27-0"], items["irrelevance_0"], items["irrelevance_1"]]
    never_calls, _ = run(bfcl, chosen, ["I would call a function.", "Sure.", "No.", "No."], max_tokens=64)
    calls, _ = run(bfcl, chosen, [[call("math_factorial", {"number": 5})], [call("get_movies", {"city": "Mumbai"})],
                                  "No.", "No."], max_tokens=64)
    gate = {"name": "bfcl", "metric": "bfcl.pass_rate", "op": ">=", "value": None, "relative_to": "baseline",
            "margin": 0.03}
    (v,) = evaluate([gate], {"suites": {"bfcl": never_calls}}, {"suites": {"bfcl": never_calls}})
    assert v["verdict"] == "not_measurable", v
    assert "0/1 on live_simple, 0/1 on simple_python of bfcl" in v["reason"]
    assert "`bfcl: [irrelevance]`" in v["reason"]
    # A baseline that calls tools: the same candidate loses both calling items and the gate can say so.
    (v,) = evaluate([gate], {"suites": {"bfcl": never_calls}}, {"suites": {"bfcl": calls}})
    assert v["verdict"] != "not_measurable" and v["flips"]["lost"] == 2
