"""The model card, blog post and research-document section, rendered from the run's records only.

Templates are jinja2, rendered in a sandbox (a recipe may bring its own, from `report.templates_dir`;
the shipped ones in templates/ fill any gap). The card's metadata is built with huggingface_hub's
ModelCardData (base_model, license, tags, pipeline_tag, a model-index with the gate results), so the
Hub understands it and `huggingface_hub.ModelCard.load` reads it back. Every number in the
documents comes from a step record; nothing is typed in.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
from pathlib import Path
from typing import Any

from jinja2 import ChoiceLoader, FileSystemLoader, StrictUndefined
from jinja2.sandbox import SandboxedEnvironment

from runner.benchmark.gates import first_line
from runner.errors import RunnerError
from runner.recipe.loader import recipe_to_yaml
from runner.recipe.resources import shipped_dir
from runner.recipe.schema import Recipe
from runner.run_dir import RunDir

PLOTS = {"gates": ("gate_scores.png", "ttft_curve.png"), "calibrate": ("token_lengths.png",)}


def gather(recipe: Recipe, run_dir: RunDir) -> dict[str, Any]:
    """Everything the templates may use, read from committed step records and outputs."""
    gates_record = run_dir.record("gates")
    if gates_record is None:
        raise RunnerError(f"{run_dir.root} has no completed gates step: run the recipe first")
    selection = gates_record["summary"]["selection"]
    best = selection["best"]
    strategies = {}
    judged = gates_record["summary"]["verdicts"]  # the strategies this run compared
    for strategy in recipe.quantization.strategies:
        name = strategy.name
        quantize = run_dir.record(f"quantize.{name}")
        if name not in judged or quantize is None:
            continue
        bench_path = run_dir.step_dir(f"benchmark.{name}") / "results.json"
        strategies[name] = {
            "spec": strategy.model_dump(mode="json"),
            "exclude": recipe.quantization.exclusions(strategy),
            "quantize": {k: v for k, v in quantize["summary"].items() if k != "layers"},
            "verify": (run_dir.record(f"verify.{name}") or {}).get("summary", {}),
            "serve": (run_dir.record(f"serve.{name}") or {}).get("summary", {}),
            "benchmark": json.loads(bench_path.read_text()) if bench_path.exists() else None,
            "verdicts": gates_record["summary"]["verdicts"].get(name, []),
        }
    # Strategies whose branch failed before gates: named in the documents with where and why.
    failed = {name: {**why, "reason": first_line(why.get("error"))}
              for name, why in (gates_record["summary"].get("failed") or {}).items()}
    baseline_path = run_dir.step_dir("benchmark.baseline") / "results.json"
    calibrate = run_dir.record("calibrate") or {}
    return {
        "recipe": recipe.model_dump(mode="json"),
        "recipe_yaml": recipe_yaml(recipe),
        "model": recipe.model.model_dump(mode="json"),
        "title": recipe.report.title or f"{recipe.model.name} NVFP4 ({best or 'no strategy selected'})",
        "best": best,
        "selection": selection,
        "strategies": strategies,
        "chosen": strategies.get(best) if best else None,
        "failed": failed,
        "baseline": json.loads(baseline_path.read_text()) if baseline_path.exists() else None,
        "baseline_name": recipe.benchmark.baseline.name if recipe.benchmark.baseline else None,
        "gate_table": (run_dir.step_dir("gates") / "comparison.md").read_text(encoding="utf-8"),
        "speed": gates_record["summary"].get("speed", {}),
        "calibration": calibrate.get("summary", {}),
        "exclusions": recipe.quantization.exclude,
        "serve_command": serve_command(recipe),
        "hardware": recipe.benchmark.hardware,
        "repo_id": recipe.publish.repo_id,
    }


def recipe_yaml(recipe: Recipe) -> str:
    """The recipe as the card and the upload show it: what the user set, defaults left out."""
    return recipe_to_yaml(recipe, exclude_defaults=True)


def serve_command(recipe: Recipe) -> str:
    """The docker run line a user types to serve the published model with the recipe's flags."""
    from runner.containers.plugin import load_container

    plugin = load_container(recipe.container_for("serve")) if recipe.serve.engine == "vllm" else None
    if plugin is None or plugin.image is None:
        return (f"python -m runner.worker.local_server --model ./{recipe.model.name}-quantized --port 8000  "
                "# the CPU engine; on a GPU serve with vLLM")
    parts = ["docker run -d --name vllm-model"]
    if plugin.gpus != "none":
        parts.append("--runtime=nvidia --gpus all")
    parts.append(f"-v /path/to/model:/model -p {plugin.port}:{plugin.port}")
    if plugin.shm_size:
        parts.append(f"--shm-size={plugin.shm_size}")
    parts.append(plugin.image)
    parts.append("--model /model " + " ".join(shlex.quote(a) for a in recipe.serve.args))
    return " \\\n  ".join(parts)


def card_data(recipe: Recipe, facts: dict[str, Any]) -> Any:
    from huggingface_hub import EvalResult, ModelCardData

    results = []
    chosen = facts["chosen"]
    if chosen and chosen["benchmark"]:
        for suite, outcome in chosen["benchmark"]["suites"].items():
            results.append(EvalResult(task_type="text-generation", dataset_type=f"recipe-runner/{suite}",
                                      dataset_name=suite, metric_type="pass_rate",
                                      metric_value=outcome["pass_rate"], metric_name=f"{suite} pass rate"))
    source = recipe.model.source
    base_model = source.repo if source.kind == "huggingface" else None
    arch = (chosen or {}).get("quantize", {}).get("architecture") or recipe.model.architecture
    tags = list(dict.fromkeys([*recipe.report.tags, "nvfp4", "modelopt", "recipe-runner"]
                              + ([arch] if arch else [])))
    return ModelCardData(base_model=base_model, license=recipe.model.license, tags=tags,
                         pipeline_tag="text-generation", library_name="transformers",
                         model_name=facts["repo_id"] or facts["title"], eval_results=results or None)


def environment(templates_dir: Path | None) -> SandboxedEnvironment:
    loaders = [FileSystemLoader(str(templates_dir))] if templates_dir else []
    loaders.append(FileSystemLoader(str(shipped_dir("templates"))))
    env = SandboxedEnvironment(loader=ChoiceLoader(loaders), undefined=StrictUndefined, keep_trailing_newline=True,
                               trim_blocks=True, lstrip_blocks=True, autoescape=False)
    env.filters["pct"] = lambda v: "n/a" if v is None else f"{100 * v:.0f} %"
    env.filters["num"] = lambda v, d=1: "n/a" if v is None else f"{v:.{d}f}"
    return env


def render_documents(recipe: Recipe, run_dir: RunDir, target: Path) -> dict[str, str]:
    """Write README.md (the card), blog.md, research_section.md and the plots into `target`."""
    from huggingface_hub import ModelCard

    facts = gather(recipe, run_dir)
    env = environment(recipe.report.templates_dir)
    data = card_data(recipe, facts)
    body = env.get_template(recipe.report.card_template).render(**facts)
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")
    target.mkdir(parents=True, exist_ok=True)
    card.save(target / "README.md")
    (target / "blog.md").write_text(env.get_template(recipe.report.blog_template).render(**facts), encoding="utf-8")
    (target / "research_section.md").write_text(env.get_template(recipe.report.research_template).render(**facts),
                                                encoding="utf-8")
    for step, pictures in PLOTS.items():
        for picture in pictures:
            source = run_dir.step_dir(step) / picture
            if source.exists():
                shutil.copyfile(source, target / picture)
    return {"card": "README.md", "blog": "blog.md", "research": "research_section.md"}


def append_research_section(document: Path, recipe_name: str, section: str) -> bool:
    """Put the section into the research document between markers: replaced if there, else appended.

    Idempotent: running it twice leaves one copy. Returns whether the file changed.
    """
    start, end = f"<!-- recipe-runner:{recipe_name}:start -->", f"<!-- recipe-runner:{recipe_name}:end -->"
    block = f"{start}\n{section.strip()}\n{end}\n"
    text = document.read_text(encoding="utf-8") if document.exists() else ""
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end) + r"\n?", re.DOTALL)
    new = pattern.sub(lambda _: block, text) if pattern.search(text) else (text.rstrip("\n") + "\n\n" + block
                                                                          if text else block)
    if new == text:
        return False
    document.parent.mkdir(parents=True, exist_ok=True)
    tmp = document.with_name(f".{document.name}.tmp")
    tmp.write_text(new, encoding="utf-8")
    os.replace(tmp, document)
    return True
