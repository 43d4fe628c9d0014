"""What the documents say about strategies whose branch failed: the gate table, the card, the blog.

Fast: the table from results built here, the shipped templates rendered from facts built here (the
scheduler side, a failing branch through gates, is in test_scheduler.py).
"""

from __future__ import annotations

from runner.benchmark.gates import evaluate, select
from runner.benchmark.presentation import comparison_markdown, first_line
from runner.steps.report import environment

ERROR = "RuntimeError: CUDA out of memory\nTraceback (most recent call last): ..."
FAILED = {"fp8": {"step": "quantize.fp8", "error": ERROR}}


def test_the_table_ends_with_a_line_per_failed_strategy():
    gates = [{"name": "g", "metric": "size.gb", "op": "<=", "value": 10, "relative_to": "absolute"}]
    results = {"max": {"size": {"gb": 5}}}
    verdicts = {s: evaluate(gates, r, None) for s, r in results.items()}
    table = comparison_markdown(verdicts, None, None, select(verdicts, results, []), FAILED)
    lines = table.rstrip("\n").splitlines()
    assert lines[-1] == "`fp8` failed at quantize.fp8: RuntimeError: CUDA out of memory"
    assert "Selected: **max**" in table and "| gate | required | n | max (proven) |" in table
    assert "failed at" not in comparison_markdown(verdicts, None, None, select(verdicts, results, []))
    # Every strategy failed: no candidate, and the table still says why.
    empty = comparison_markdown({}, None, None, select({}, {}, []), FAILED)
    assert "No strategy passes the gates" in empty and empty.rstrip().endswith("CUDA out of memory")
    assert first_line("\n  \nfirst\nsecond") == "first" and first_line(None) == "no error recorded"


def test_card_and_blog_say_which_strategies_failed_and_why():
    failed = {name: {**why, "reason": first_line(why["error"])} for name, why in FAILED.items()}
    facts = {
        "recipe": {"name": "mini", "description": "", "gates": []}, "recipe_yaml": "name: mini\n",
        "recipe_files": [], "required_inputs": [], "calibration_sets": {},
        "behaviour": {"checks": [], "gates": [], "failed": {}, "inconclusive": {}, "passed": {}},
        "model": {"name": "Mini"}, "title": "Mini NVFP4", "best": None,
        "selection": {"rule": "no gate fails", "failing": {}}, "strategies": {}, "chosen": None,
        "failed": failed, "baseline": None, "baseline_name": None, "gate_table": "| gate |\n",
        "speed": {}, "calibration": {}, "source_bytes": None, "usage": None, "hardware": "h",
        "hardware_description": None, "repo_id": None, "suggested_repo_id": None, "verify_rows": [],
        "base_model": None, "source_description": "a local bfloat16 checkpoint", "format": None,
        "baseline_description": None,
    }
    env = environment(None)
    card = env.get_template("model_card.md.j2").render(**facts)
    blog = env.get_template("blog_post.md.j2").render(**facts)
    assert "## Strategies that failed" in card
    assert "- `fp8` failed at `quantize.fp8`: RuntimeError: CUDA out of memory" in card
    assert "Traceback" not in card and "Traceback" not in blog
    assert "1 more (`fp8`) failed before they could be judged" in blog
    assert "`fp8`: failed at `quantize.fp8` (RuntimeError: CUDA out of memory)" in blog
    quiet = {**facts, "failed": {}}
    assert "failed" not in env.get_template("model_card.md.j2").render(**quiet)
    assert "failed" not in env.get_template("blog_post.md.j2").render(**quiet)
