"""The words the documents and the scorers use (fast: no run needed)."""

from __future__ import annotations

from runner.quantization.export_words import export_format, repo_name_mismatch
from runner.steps.report import scrub_paths


def test_title_words_and_tags_follow_the_export_format():
    assert export_format("FP8", {"fp8": 196})["name"] == "FP8"
    assert export_format("FP8", {"fp8": 196})["tags"] == ["fp8"]
    assert export_format("W4A16_NVFP4", None)["name"] == "NVFP4-W4A16"
    mixed = export_format("MIXED_PRECISION", {"nvfp4": 99, "fp8": 17, "bfloat16": 133})
    assert mixed["name"] == "NVFP4-FP8-Mixed" and {"nvfp4", "fp8"} <= set(mixed["tags"])
    assert "99 in nvfp4" in mixed["description"] and "bfloat16" not in mixed["description"]
    assert export_format("SOMETHING_NEW", None)["name"] == "SOMETHING_NEW"


def test_a_repo_name_that_claims_another_format_gets_a_truthful_one():
    assert repo_name_mismatch("demo/SmolLM2-135M-Instruct-NVFP4", "FP8") == "demo/SmolLM2-135M-Instruct-FP8"
    assert repo_name_mismatch("demo/SmolLM2-135M-Instruct-NVFP4", "NVFP4") is None
    assert repo_name_mismatch("u/Qwen3.5-9B-NVFP4-W4A16", "NVFP4") == "u/Qwen3.5-9B-NVFP4"
    assert repo_name_mismatch("u/my-model", "FP8") is None  # claims nothing
    assert repo_name_mismatch(None, "FP8") is None


def test_absolute_paths_become_file_names():
    data = {"calibration": {"source": {"path": "/home/me/data/calib.jsonl"}}, "tags": ["/x/y", "a/b"], "n": 3}
    assert scrub_paths(data) == {"calibration": {"source": {"path": "calib.jsonl"}}, "tags": ["y", "a/b"], "n": 3}


def test_factual_answers_are_checked_not_searched_for_a_keyword():
    from runner.benchmark.suites import score_answer

    assert score_answer("The capital of France is Paris.", ["Paris"], ["Grand Paris"])[0]
    assert not score_answer("Le Grand Paris is the capital of France", ["Paris"], ["Grand Paris"])[0]
    assert not score_answer("Jupiter, but it's actually Saturn that's the largest", ["Jupiter"], ["Saturn"])[0]
    assert not score_answer("It is not Paris, it is Lyon.", ["Paris"], [])[0]
    assert not score_answer("Parisian cafés are lovely.", ["Paris"], [])[0]  # a whole word, not a substring
    assert score_answer("A leap year has 366 days.", ["366"], [])[0]
    assert not score_answer("It has 1366 days.", ["366"], [])[0]
