"""Model card, blog post, research section and publishing, from a real demo run's records."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest

from conftest import DEMO, REPO, recipe, recipe_cli_env, record
from runner.testing.fake_hub import FakeHub

pytestmark = pytest.mark.slow
# A fake token, built at run time so the source holds nothing that looks like a real one.
CANARY = "hf_" + "Canary0" * 6


@pytest.fixture(scope="module")
def finished_run(demo_run) -> Path:
    result = recipe("run", str(DEMO), "--strategy", "nvfp4_max", "--run-dir", str(demo_run))
    assert result.returncode == 0, result.stderr
    return demo_run


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
    assert "transformers on the CPU" in text  # speed labelled with the kernel path it was measured on
    assert "python -m runner.worker.local_server" in text  # the exact serving command
    assert "preset: NVFP4_DEFAULT_CFG" in text and "*layers.29.*" in text  # the recipe, for reproduction
    blog = (report / "blog.md").read_text()
    for heading in ("## The problem", "## The journey", "## The finding", "## The fix", "## The recipe"):
        assert heading in blog
    assert "](gate_scores.png)" in blog and (report / "gate_scores.png").exists()


def test_dry_run_publish_lists_exactly_what_would_be_uploaded(finished_run):
    summary = record(finished_run, "publish")["summary"]
    assert summary["dry_run"] is True and summary["strategy"] == "nvfp4_max"
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
    publish_recipe = REPO / "tests" / "recipes" / "demo-publish.yaml"
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
    assert summary["dry_run"] is False and summary["commit"].startswith("0123abc")
    # The research section is appended once, however often the report runs.
    text = research.read_text()
    assert text.startswith("# Research\n\nEarlier notes.") and text.count("recipe-runner:demo-smollm2:start") == 1
    # The canary token is nowhere: not in any file of the run, the research doc, or the output.
    for path in [*finished_run.rglob("*"), research]:
        if path.is_file():
            assert CANARY.encode() not in path.read_bytes(), path
    assert CANARY not in first.stdout + first.stderr + again.stdout + again.stderr
