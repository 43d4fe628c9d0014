"""Model card, blog post, research section and publishing, from real demo runs' records.

The real demo's verdicts depend on what the model answers on this machine, so its test asserts the
mechanics whatever the verdicts are. Tests that need a selection or a publish run the same demo with
gates whose verdicts are fixed by construction (tests/recipes/demo-fixed-gates.yaml), and the
"no candidate" path with a gate nothing passes (tests/recipes/demo-rejects-all.yaml).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import threading
from pathlib import Path

import pytest

from conftest import DEMO, REPO, recipe, recipe_cli_env, record
from runner.benchmark.gates import VERDICTS, select
from runner.testing.fake_hub import FakeHub

pytestmark = pytest.mark.slow
# A fake token, built at run time so the source holds nothing that looks like a real one.
CANARY = "hf_" + "Canary0" * 6
TEST_RECIPES = REPO / "tests" / "recipes"
EXIT_NO_CANDIDATE = 4


def linked_copy(run_dir: Path, target: Path) -> Path:
    """A copy of a run directory made of hard links (steps commit by rename, so the source stays intact);
    logs, which are appended to, are copied."""

    def link_or_copy(source: str, dest: str) -> None:
        (shutil.copy2 if Path(source).parent.name == "logs" else os.link)(source, dest)

    shutil.copytree(run_dir, target, copy_function=link_or_copy)
    return target


@pytest.fixture(scope="module")
def real_demo(demo_run, tmp_path_factory) -> tuple[Path, int]:
    """The shipped demo end to end for nvfp4_max (its verdicts are whatever this machine's answers give)."""
    run_dir = linked_copy(demo_run, tmp_path_factory.mktemp("real") / "run")
    result = recipe("run", str(DEMO), "--strategy", "nvfp4_max", "--strategy", "negative_control",
                    "--run-dir", str(run_dir))
    assert result.returncode in (0, EXIT_NO_CANDIDATE, 5), result.stderr  # 5: an unproven candidate selected
    return run_dir, result.returncode


@pytest.fixture(scope="module")
def finished_run(real_demo, tmp_path_factory) -> Path:
    """The demo with fixed verdicts: nvfp4_max is selected on every machine."""
    run_dir = linked_copy(real_demo[0], tmp_path_factory.mktemp("fixed") / "run")
    result = recipe("run", str(TEST_RECIPES / "demo-fixed-gates.yaml"), "--strategy", "nvfp4_max",
                    "--run-dir", str(run_dir))
    assert result.returncode == 0, result.stderr
    return run_dir


def test_real_demo_runs_every_step_and_its_outcome_follows_the_verdicts(real_demo):
    run_dir, code = real_demo
    for step in ("source", "calibrate", "quantize.nvfp4_max", "export.nvfp4_max", "verify.nvfp4_max",
                 "serve.nvfp4_max", "benchmark.nvfp4_max", "benchmark.baseline", "gates", "report", "publish"):
        assert record(run_dir, step)["status"] == "complete", step
    gates = json.loads((run_dir / "steps" / "gates" / "gates.json").read_text())
    verdicts = gates["verdicts"]["nvfp4_max"]
    assert [v["gate"] for v in verdicts] == ["knowledge", "thinking_leak", "decode_speed"]
    assert all(v["verdict"] in VERDICTS for v in verdicts)
    knowledge = verdicts[0]  # paired with the baseline on the same prompts, asked in sequential looks
    easy = json.loads((run_dir / "steps" / "benchmark.nvfp4_max" / "results.json").read_text())["suites"]["easy_facts"]
    assert knowledge["n"] == easy["total"] in (20, 40) and easy["cap"] == 40 and knowledge["alpha"] == easy["alpha"]
    assert knowledge["flips"]["n"] == easy["total"] and knowledge["verdict"] in ("pass", "fail", "inconclusive")
    # The negative control is judged and never selected; a control no gate rejects withholds the selection.
    control = gates["selection"]["negative_controls"]["negative_control"]
    assert "negative_control" not in gates["selection"]["ranking"] and gates["selection"]["best"] != "negative_control"
    if control["status"] != "rejected":
        assert gates["selection"]["best"] is None and gates["selection"]["toothless"] == ["negative_control"]
    # The selection is the one the verdicts imply, recomputed from the committed results.
    results = {"nvfp4_max": json.loads((run_dir / "steps" / "benchmark.nvfp4_max" / "results.json").read_text())}
    results["negative_control"] = json.loads(
        (run_dir / "steps" / "benchmark.negative_control" / "results.json").read_text())
    expected = select(gates["verdicts"], results, [{"metric": "size.bytes", "order": "min"}], accept_unproven=True,
                      negative_controls=["negative_control"])
    selected_export = gates["selection"].pop("export")
    assert gates["selection"] == expected
    # The selection record names the selected export once: its step and its format, which the card titles.
    if expected["best"] is not None:
        assert selected_export["step"] == f"export.{expected['best']}" and selected_export["output"] == "checkpoint"
        assert selected_export["format"]["name"] == "NVFP4"
    else:
        assert selected_export is None
    best = expected["best"]
    # The documents are written either way; publish does what the verdicts imply.
    card = (run_dir / "steps" / "report" / "README.md").read_text()
    assert (run_dir / "steps" / "gates" / "comparison.md").read_text().strip() in card
    publish = record(run_dir, "publish")["summary"]
    status = json.loads((run_dir / "run.json").read_text())["status"]
    if best is None:
        assert code == EXIT_NO_CANDIDATE and status == "no-candidate"
        assert publish["published"] is False and "no strategy passed" in publish["skipped"]
        assert "No strategy passed the gates" in card
    else:
        proven = expected["proven"]
        assert (code, status) == ((0, "complete") if proven else (5, "unproven"))
        assert publish["strategy"] == best and publish["dry_run"] is True and publish["files"]
        # An unproven selection says so in the card's first lines, a proven one does not.
        title_on = card[card.index("\n# "):]
        assert ("**Unproven.**" in title_on[:title_on.index("\n## ")]) is (not proven)
    answers = results["nvfp4_max"]
    assert len(answers["answers_sha256"]) == 64
    assert all(len(s["answers_sha256"]) == 64 for s in answers["suites"].values())


def test_no_candidate_completes_the_report_skips_publish_and_exits_4(real_demo, tmp_path):
    run_dir = linked_copy(real_demo[0], tmp_path / "run")
    result = recipe("run", str(TEST_RECIPES / "demo-rejects-all.yaml"), "--strategy", "nvfp4_max",
                    "--run-dir", str(run_dir))
    assert result.returncode == EXIT_NO_CANDIDATE, result.stderr
    assert "no strategy passed the gates" in result.stderr
    assert "benchmark.nvfp4_max started" not in result.stderr and "gates started" in result.stderr
    gates = record(run_dir, "gates")["summary"]
    assert gates["selection"]["best"] is None and "decode_speed" in gates["selection"]["failing"]["nvfp4_max"]
    publish = record(run_dir, "publish")["summary"]
    assert publish == {"published": False, "skipped": publish["skipped"], "strategy": None,
                       "repo_id": "demo/SmolLM2-135M-Instruct-NVFP4", "dry_run": True}
    assert not (run_dir / "steps" / "publish" / "upload").exists()
    card = (run_dir / "steps" / "report" / "README.md").read_text()
    assert "No strategy passed the gates" in card and "`nvfp4_max` was rejected by: decode_speed" in card
    assert json.loads((run_dir / "run.json").read_text())["status"] == "no-candidate"
    # Run again: everything is current, and the status is still "no candidate", not "done".
    again = recipe("run", str(TEST_RECIPES / "demo-rejects-all.yaml"), "--strategy", "nvfp4_max",
                   "--run-dir", str(run_dir))
    assert again.returncode == EXIT_NO_CANDIDATE and "started" not in again.stderr


def test_card_metadata_reads_back_and_every_number_comes_from_records(finished_run):
    from huggingface_hub import ModelCard

    report = finished_run / "steps" / "report"
    card = ModelCard.load(report / "README.md")
    assert {"nvfp4", "demo", "cpu", "LlamaForCausalLM"} <= set(card.data.tags)
    assert card.data.license == "apache-2.0" and card.data.pipeline_tag == "text-generation"
    results = {r.dataset_name: r.metric_value for r in card.data.eval_results}
    bench = record(finished_run, "benchmark.nvfp4_max")["summary"]["suites"]
    assert results == {name: suite["pass_rate"] for name, suite in bench.items()}
    text = card.text
    gates = (finished_run / "steps" / "gates" / "comparison.md").read_text()
    assert gates.strip() in text
    quantize = record(finished_run, "quantize.nvfp4_max")["summary"]
    assert f"{quantize['calibration_tokens']} tokens" in text and str(quantize["effective_bits"]) in text
    assert "the export's numerics emulated" in text and "NVFP4 activations" in text  # speed and numerics labelled
    # What a Hub user needs: the base model linked, how to serve it, what it is for, no local paths.
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert card.data.to_dict()["base_model_relation"] == "quantized"
    assert "vllm serve demo/SmolLM2-135M-Instruct-NVFP4" in text and "docker run" in text
    assert "## Intended use and limitations" in text and "Q4_1" in text  # the source was a 4-bit GGUF
    staged_recipe = (finished_run / "steps" / "publish" / "upload" / "recipe.yaml").read_text()
    for document in (text, staged_recipe, (report / "blog.md").read_text()):
        assert str(REPO) not in document and str(finished_run) not in document
        assert "path: calibration.jsonl" in staged_recipe
    assert "preset: NVFP4_DEFAULT_CFG" in text and "*layers.29.*" in text  # the recipe, for reproduction
    blog = (report / "blog.md").read_text()
    for heading in ("## The problem", "## The journey", "## The finding", "## The fix", "## The recipe"):
        assert heading in blog
    assert "](gate_scores.png)" in blog and (report / "gate_scores.png").exists()


def test_dry_run_publish_lists_exactly_what_would_be_uploaded(finished_run):
    summary = record(finished_run, "publish")["summary"]
    assert summary["dry_run"] is True and summary["strategy"] == "nvfp4_max" and summary["published"] is False
    paths = {f["path"] for f in summary["files"]}
    assert {"README.md", "recipe.yaml", "model.safetensors", "hf_quant_config.json", "config.json"} <= paths
    staged = finished_run / "steps" / "publish" / "upload"
    assert {str(p.relative_to(staged)) for p in staged.rglob("*") if p.is_file()} == paths


def test_card_command_rerenders_without_running_anything(finished_run):
    (finished_run / "steps" / "report" / "blog.md").unlink()
    result = recipe("card", str(finished_run))
    assert result.returncode == 0, result.stderr
    assert (finished_run / "steps" / "report" / "blog.md").exists()
    assert "started" not in result.stderr


def test_publish_uploads_to_the_hub_api_and_the_token_never_leaks(finished_run, tmp_path):
    hub = FakeHub()
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(hub.start(), loop).result(timeout=10)
    research = tmp_path / "RESEARCH.md"
    research.write_text("# Research\n\nEarlier notes.\n")
    env = recipe_cli_env() | {"HF_ENDPOINT": hub.url, "HF_TOKEN": CANARY, "RESEARCH_DOC": str(research),
                              "HF_HUB_DISABLE_TELEMETRY": "1"}
    publish_recipe = TEST_RECIPES / "demo-publish.yaml"
    try:
        first = recipe("run", str(publish_recipe), "--strategy", "nvfp4_max", "--run-dir", str(finished_run), env=env)
        again = recipe("run", str(publish_recipe), "--strategy", "nvfp4_max", "--run-dir", str(finished_run),
                       "--only", "report", "--force", env=env)
    finally:
        asyncio.run_coroutine_threadsafe(hub.stop(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
    assert first.returncode == 0, first.stderr
    assert again.returncode == 0, again.stderr
    paths = [c["path"] for c in hub.calls]
    assert "/api/repos/create" in paths
    assert any(p.endswith("/commit/main") for p in paths)
    assert {"README.md", "recipe.yaml", "model.safetensors"} <= set(hub.uploaded)
    assert all(c["authorization"] == f"Bearer {CANARY}" for c in hub.calls if c["path"] != "/api/agent-harnesses")
    summary = record(finished_run, "publish")["summary"]
    assert summary["dry_run"] is False and summary["published"] is True and summary["commit"].startswith("0123abc")
    # The research section is appended once, however often the report runs.
    text = research.read_text()
    assert text.startswith("# Research\n\nEarlier notes.") and text.count("recipe-runner:demo-smollm2:start") == 1
    # The canary token is nowhere: not in any file of the run, the research doc, or the output.
    for path in [*finished_run.rglob("*"), research]:
        if path.is_file():
            assert CANARY.encode() not in path.read_bytes(), path
    assert CANARY not in first.stdout + first.stderr + again.stdout + again.stderr


def test_a_strategy_added_with_strategy_competes_and_a_worse_one_leaves_the_selection(finished_run, tmp_path):
    """Issue 30 item 2: `--strategy fp8` on a run that selected nvfp4_max judged fp8 alone and selected it
    (card and publish too). Now every strategy with a current benchmark competes: fp8 is bigger, so
    nvfp4_max stays selected, and the gates record names both candidates."""
    run_dir = linked_copy(finished_run, tmp_path / "run")
    assert record(run_dir, "gates")["summary"]["selection"]["best"] == "nvfp4_max"
    with_fp8 = TEST_RECIPES / "demo-fixed-gates-fp8.yaml"
    result = recipe("run", str(with_fp8), "--strategy", "fp8", "--run-dir", str(run_dir))
    assert result.returncode == 0, result.stderr
    assert "benchmark.fp8 started" in result.stderr and "benchmark.nvfp4_max started" not in result.stderr
    gates = record(run_dir, "gates")["summary"]
    assert gates["candidates"] == ["nvfp4_max", "fp8"] and gates["not_benchmarked"] == {}
    assert gates["selection"]["best"] == "nvfp4_max"
    assert json.loads((run_dir / "steps" / "gates" / "gates.json").read_text())["candidates"] == ["nvfp4_max", "fp8"]
    assert record(run_dir, "publish")["summary"]["strategy"] == "nvfp4_max"
    assert "Selected: **nvfp4_max**" in (run_dir / "steps" / "report" / "README.md").read_text()
    # A plain run selects the same and has nothing left to do.
    again = recipe("run", str(with_fp8), "--run-dir", str(run_dir))
    assert again.returncode == 0 and "started" not in again.stderr, again.stderr


def test_card_on_a_read_only_run_directory_is_one_line(finished_run, tmp_path):
    """Issue 30 item 10: `recipe card` on a read-only run directory ended in a raw traceback."""
    import subprocess

    view = tmp_path / "read-only"
    view.mkdir()
    if subprocess.run(["mount", "--bind", str(finished_run), str(view)], capture_output=True).returncode:
        pytest.skip("needs a bind mount (root) to make a run directory read-only for real")
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", str(view)], check=True)
        result = recipe("card", str(view))
    finally:
        subprocess.run(["umount", "-l", str(view)], check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    # the documents render beside the run first (then replace the old ones by rename): that write is named
    assert "read-only file system" in last and str(view) in last, result.stderr


def test_the_card_says_which_vllm_loaded_the_export(finished_run, tmp_path):
    """verify's vllm_load (tests/test_vllm_loader.py runs it for real) reaches the card: the Usage line and
    the checks table name vLLM's version and device; "not run" is said as such, never as a pass."""
    run_dir = linked_copy(finished_run, tmp_path / "run")
    path = run_dir / "steps" / "verify.nvfp4_max" / "record.json"
    rec = json.loads(path.read_text())
    detail = "loaded by vLLM 0.33.0's loader on CPU (ModelOptNvFp4Config: 112 quantized, 9 unquantized)"
    rec["summary"]["vllm_load"] = {"status": "pass", "vllm_version": "0.33.0", "device": "cpu", "detail": detail}
    rec["summary"]["checks"]["vllm_load"] = "pass"
    path.unlink()  # a hard link to the shared run: replace, never write through
    path.write_text(json.dumps(rec))
    assert recipe("card", str(run_dir)).returncode == 0
    card = (run_dir / "steps" / "report" / "README.md").read_text()
    assert "loaded by vLLM 0.33.0's own loader on CPU" in card
    assert "| vLLM's own loader builds the model from it" in card and detail in card
    # the shared run (no vLLM environment in tests) says "not run", and never claims vLLM loaded it
    shared = (finished_run / "steps" / "report" / "README.md").read_text()
    assert "vLLM's own loader builds the model from it (every tensor lands in a parameter, every parameter is " \
           "loaded) | not run (see note) |" in shared
    assert "own loader on CPU" not in shared


def test_the_card_says_what_it_was_validated_with_from_the_serve_record(finished_run, tmp_path):
    """Issue 27 item 5: what Red Hat's validated cards carry (validated_on, required_cli_args, tool_call_parser,
    the reasoning parser, the tasks the gates covered), in the metadata and the body, from the run's records:
    change the serve record and the card changes; never a token, never a path of this machine."""
    from huggingface_hub import ModelCard

    served = record(finished_run, "serve.nvfp4_max")["summary"]["served_with"]
    assert served["engine"] == "local" and served["args"] == [] and served["image"] is None  # what the demo ran
    card = ModelCard.load(finished_run / "steps" / "report" / "README.md").data.to_dict()
    bench = record(finished_run, "benchmark.nvfp4_max")["summary"]
    assert card["validated_on"][0].startswith("recipe-runner's local engine")
    assert card["validated_on"][-1] == bench["measured_on"]["cpu"] and card["required_cli_args"] == []
    # only the suites a gate read: the fixed-gate recipe judges thinking_leak, never easy_facts (asked, unjudged)
    assert set(bench["suites"]) == {"easy_facts", "thinking_leak"}
    assert card["validated_task_sizes"] == {"thinking_leak": bench["suites"]["thinking_leak"]["total"]} == {
        "thinking_leak": 5} and card["validated_tasks"] == ["thinking_leak"]

    run_dir = linked_copy(finished_run, tmp_path / "run")
    path = run_dir / "steps" / "serve.nvfp4_max" / "record.json"
    rec = json.loads(path.read_text())
    token = "hf_" + "Z" * 34
    host_template = tmp_path / "templates" / "tools.jinja"  # a file of this machine: the card names only the file
    host_template.parent.mkdir()
    host_template.write_text("{{ messages }}")
    rec["summary"]["served_with"] = {
        "engine": "vllm", "version": "0.33.0", "container": "vllm", "image": "vllm/vllm-openai@sha256:0123abcd",
        "args": ["--max-model-len", "65536", "--enable-auto-tool-choice", "--tool-call-parser", "qwen3_xml",
                 "--reasoning-parser=qwen3", "--chat-template", str(host_template),
                 "--tool-parser-plugin", "/vllm-workspace/examples/parser.py", "--api-key", "s3cret-value", f"--hf-token={token}"]}
    path.unlink()  # a hard link to the shared run: replace, never write through
    path.write_text(json.dumps(rec))
    assert recipe("card", str(run_dir)).returncode == 0
    readme = run_dir / "steps" / "report" / "README.md"
    data = ModelCard.load(readme).data.to_dict()
    assert data["validated_on"][:2] == ["vLLM 0.33.0", "image vllm/vllm-openai@sha256:0123abcd"]
    assert data["required_cli_args"] == ["--max-model-len", "65536", "--enable-auto-tool-choice", "--tool-call-parser",
                                         "qwen3_xml", "--reasoning-parser=qwen3", "--chat-template", "tools.jinja",
                                         # a path inside the image (no such file here) is what users pass
                                         "--tool-parser-plugin", "/vllm-workspace/examples/parser.py", "--api-key", "REDACTED", "--hf-token=REDACTED"]
    assert data["tool_call_parser"] == "qwen3_xml" and data["reasoning_parser"] == "qwen3"
    assert data["tool_calling_supported"] is True
    text = readme.read_text()
    assert "### Validated with" in text and "--tool-call-parser qwen3_xml" in text and "`qwen3`" in text
    for name, n in data["validated_task_sizes"].items():
        assert f"`{name}` ({n})" in text
    assert token not in text and "s3cret-value" not in text and str(tmp_path) not in text
