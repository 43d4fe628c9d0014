"""The model card, blog post and research-document section, rendered from the run's records only.

Templates are jinja2, rendered in a sandbox (a recipe may bring its own, from `report.templates_dir`;
the shipped ones in templates/ fill any gap). The card's metadata is built with huggingface_hub's
ModelCardData (base_model, license, tags, pipeline_tag, a model-index with the gate results), so the
Hub understands it and `huggingface_hub.ModelCard.load` reads it back. Every number in the
documents comes from a step record; nothing is typed in.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shlex
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jinja2 import ChoiceLoader, FileSystemLoader, StrictUndefined
from jinja2.sandbox import SandboxedEnvironment

from runner.benchmark.gates import recovery, speed_reliability
from runner.benchmark.presentation import first_line, recovery_markdown
from runner.calibration.overlap import Overlap, file_overlaps
from runner.errors import RunnerError
from runner.quantization.export_words import FORMAT_TAGS, export_format, repo_name_mismatch
from runner.quantization.footprint import strategy_method
from runner.recipe.loader import dump_yaml
from runner.recipe.metrics import Metric
from runner.recipe.resources import hardware_targets, shipped_dir
from runner.recipe.schema import Recipe
from runner.serving import engine_for
from runner.serving.engine import CardServing
from runner.serving.vllm import QUANT_ALGOS as VLLM_QUANT_ALGOS
from runner.steps import ids
from runner.steps.base import RunView, StepContext, StepKind, StepResult, input_of
from runner.steps.inputs import ReportInput

# The pictures the documents show: (step, its output) -> the file's name beside the card.
PICTURES = {(ids.GATES, "gate_plot"): "gate_scores.png", (ids.GATES, "ttft_plot"): "ttft_curve.png",
            (ids.CALIBRATE, "histogram"): "token_lengths.png"}


def optional_output(run: RunView, step_id: str, name: str) -> Path | None:
    """An output of a step the documents may show: None where the step is not in the run (a failed
    branch, no baseline) or did not write it."""
    try:
        return run.output(step_id, name)
    except KeyError:
        return None


def read_json(path: Path | None) -> Any:
    return json.loads(path.read_text(encoding="utf-8")) if path is not None and path.exists() else None


def source_description(recipe: Recipe, source_summary: dict[str, Any]) -> str:
    """Where the weights that were quantized came from, in words."""
    source = recipe.model.source
    if source.kind == "huggingface":
        return f"[{source.repo}](https://huggingface.co/{source.repo}) at revision `{source.revision}`"
    if source.kind == "gguf":
        types = source_summary.get("gguf_weight_types") or {}
        stored = ", ".join(f"{n} tensors in {k}" for k, n in types.items())
        lossy = [k for k in types if k.startswith(("Q", "IQ"))]
        return (f"the GGUF file `{source_summary.get('gguf_file') or source.file or Path(str(source.path)).name}`"
                + (f" ({stored})" if stored else "")
                + (f": its weights were already quantized ({', '.join(lossy)}) and were dequantized to "
                   f"{recipe.model.dtype} before this quantization, so this model and the baseline carry that "
                   "earlier rounding too" if lossy else "")
                + tokenizer_repairs(source_summary))
    return f"a local {recipe.model.dtype} checkpoint"


def tokenizer_repairs(source_summary: dict[str, Any]) -> str:
    """The repairs the source step made to the tokenizer transformers converted from the GGUF, in words."""
    repairs = (source_summary.get("tokenizer") or {}).get("repairs") or []
    if not repairs:
        return ""
    return (f". The tokenizer transformers converted from it differed from the one the GGUF declares and was "
            f"repaired to match it ({len(repairs)} change{'s' if len(repairs) != 1 else ''}: "
            + "; ".join(repairs).replace("|", "\\|") + ")")  # a table cell: tokens like <|im_end|> hold pipes


def source_bytes(run: RunView) -> int | None:
    """The safetensors bytes of the model as the source step wrote it (what was quantized)."""
    folder = optional_output(run, ids.SOURCE, "model_dir")
    if folder is None:  # no source output: the card says n/a
        return None
    return sum(f.stat().st_size for f in Path(folder).glob("*.safetensors")) or None


def human_bytes(n: float | None) -> str:
    if n is None:
        return "n/a"
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def gather(recipe: Recipe, run: RunView) -> dict[str, Any]:
    """Everything the templates may use, read from committed step records and outputs: the report step's
    dependencies (its context), or a whole run directory (`recipe card`)."""
    gates_record = run.record(ids.GATES)
    if gates_record is None:
        raise RunnerError(f"{getattr(run, 'root', 'the run')} has no completed gates step: run the recipe first")
    selection = gates_record["summary"]["selection"]
    best = selection["best"]
    strategies = {}
    judged = gates_record["summary"]["verdicts"]  # the strategies this run compared
    for strategy in recipe.quantization.strategies:
        name = strategy.name
        if name not in judged:
            continue
        quantize = run.record(ids.quantize(name))
        if quantize is None:
            continue
        verdicts = gates_record["summary"]["verdicts"].get(name, [])
        benchmark = read_json(optional_output(run, ids.benchmark(name), "results"))
        strategies[name] = {
            "spec": strategy.model_dump(mode="json"),
            # How it quantized, in words (a layout's kept layers as the worker resolved them)
            "method": quantize["summary"].get("method") or strategy_method(strategy),
            "calibration_set": calibration_key(strategy.calibration),
            "speed": speed_text(benchmark, verdicts),
            # What the worker applied (records written before it recorded them: the recipe's)
            "exclude": quantize["summary"].get("exclude", recipe.quantization.exclusions(strategy)),
            "quantize": {k: v for k, v in quantize["summary"].items() if k != "layers"},
            "verify": (run.record(ids.verify(name)) or {}).get("summary", {}),
            "serve": (run.record(ids.serve(name)) or {}).get("summary", {}),
            "benchmark": benchmark,
            "verdicts": verdicts,
        }
    portable = portable_recipe(recipe, reserved_names(run, best))
    # Strategies whose branch failed before gates: named in the documents with where and why.
    failed = {name: {**why, "reason": first_line(why.get("error"))}
              for name, why in (gates_record["summary"].get("failed") or {}).items()}
    calibrate = run.record(ids.CALIBRATE) or {}
    source_summary = (run.record(ids.SOURCE) or {}).get("summary", {})
    chosen = strategies.get(best) if best else None
    baseline_result = read_json(optional_output(run, ids.BASELINE_BENCHMARK, "results")) \
        if recipe.benchmark.baseline is not None else None
    baseline_label = recipe.benchmark.baseline.name if recipe.benchmark.baseline else "baseline"
    for name, facts in strategies.items():
        facts["recovery"] = recovery(facts["benchmark"] or {}, baseline_result)
        facts["recovery_table"] = recovery_markdown(facts["recovery"], baseline_label, name)
    # Named once, by gates (its selection record); records written before it named it: from verify's.
    fmt = (selection.get("export") or {}).get("format") or (
        export_format(chosen["verify"].get("quant_algo"), chosen["quantize"].get("formats")) if chosen else None)
    title = recipe.report.title or (f"{recipe.model.name} {fmt['name']}" if fmt else
                                    f"{recipe.model.name} (no strategy passed the gates)")
    baseline = recipe.benchmark.baseline
    baseline_description = (
        None if baseline is None else
        f"`{baseline.name}`: the source model as this run loaded it ({recipe.model.dtype}"
        + (", dequantized from the GGUF file" if recipe.model.source.kind == "gguf" else "")
        + f"), served by the same `{recipe.serve.engine}` engine" if baseline.kind == "served" else
        f"`{baseline.name}`: an OpenAI-compatible endpoint the user runs (model `{baseline.model}`)")
    repo_id = recipe.publish.repo_id
    return {
        "recipe": scrub_paths(recipe.model_dump(mode="json")),
        "recipe_yaml": portable.yaml,
        "recipe_files": sorted(portable.files),
        "required_inputs": portable.required,
        "calibration_sets": calibration_sets(recipe, run, strategies, portable),
        "behaviour": behaviour(recipe, strategies),
        "model": scrub_paths(recipe.model.model_dump(mode="json")),
        "base_model": recipe.model.hub_base_model(),
        "source_description": source_description(recipe, source_summary),
        "title": title,
        "format": fmt,
        "best": best,
        "selection": selection,
        "strategies": strategies,
        "chosen": chosen,
        "failed": failed,
        "baseline": baseline_result,
        "baseline_name": baseline.name if baseline else None,
        "baseline_description": baseline_description,
        "gate_table": run.output(ids.GATES, "table").read_text(encoding="utf-8"),
        "speed": gates_record["summary"].get("speed", {}),
        "calibration": calibrate.get("summary", {}),
        "source_bytes": source_bytes(run),
        "usage": usage(recipe, repo_id, chosen, card_args(served_with(run, best).get("args") or []) if chosen else []),
        "hardware": recipe.benchmark.hardware,
        "hardware_description": hardware_targets().get(recipe.benchmark.hardware or "", {}).get("description"),
        "repo_id": repo_id,
        "suggested_repo_id": repo_name_mismatch(repo_id, fmt["name"]) if fmt else None,
        "verify_rows": verify_rows(chosen["verify"]) if chosen else [],
        "validation": validation(run, best, chosen) if chosen else None,
    }


# How the card names an engine in `validated_on`.
ENGINE_WORDS = {"vllm": "vLLM", "local": "recipe-runner's local engine (transformers, the export's numerics)"}
REDACTED = "REDACTED"


def served_with(run: RunView, name: str) -> dict[str, Any]:
    """How the serve step served `name`: its record's `served_with` (engine, version, image, flags); for
    records written before it, the flags and container from the step's parameters (version and image
    unknown, never guessed from today's plugin)."""
    record = run.record(ids.serve(name)) or {}
    summary = record.get("summary") or {}
    if summary.get("served_with"):
        return summary["served_with"]
    serving = (record.get("params") or {}).get("serving") or {}
    spec = serving.get("serve") or {}
    return {"engine": spec.get("engine") or summary.get("engine"), "version": None,
            "container": serving.get("container"), "image": None, "args": list(spec.get("args") or [])}


def card_args(args: list[str]) -> list[str]:
    """Serve flags as a card may show them: a path of this machine becomes its file name, and a secret (a
    token-shaped value, or the value of a flag named like one, e.g. --api-key) becomes REDACTED."""
    from runner.recipe.secrets import is_secret_name, secret_values

    out: list[str] = []
    for arg in map(str, args):
        flag, eq, value = arg.partition("=") if arg.startswith("--") else ("", "", arg)
        named_secret = out and out[-1].startswith("--") and is_secret_name(out[-1].lstrip("-").replace("-", "_"))
        if eq and is_secret_name(flag.lstrip("-").replace("-", "_")) or secret_values([arg]):
            arg = f"{flag}={REDACTED}" if eq else REDACTED
        elif named_secret and not arg.startswith("--"):
            arg = REDACTED
        elif value.startswith("/") and Path(value).exists():  # a container's own path (a chat template) stays
            arg = (f"{flag}=" if eq else "") + Path(value).name
        out.append(arg)
    return out


def flag_value(args: list[str], flag: str) -> str | None:
    """The value of `flag` in server flags (`--flag X` or `--flag=X`; the last wins), or None."""
    found = None
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            found = args[i + 1]
        elif arg.startswith(flag + "="):
            found = arg.split("=", 1)[1]
    return found


def validation(run: RunView, best: str, chosen: dict[str, Any]) -> dict[str, Any]:
    """What the card says the selected model was validated with, as Red Hat's validated cards do, from this
    run's records: the engine, its version, the container image and the hardware it was served on
    (`validated_on`), the exact serve flags (`required_cli_args`) with their tool-call and reasoning parsers,
    and the suites the gates judged it on, each with the number of prompts it was asked (`validated_tasks`)."""
    served = served_with(run, best)
    args = card_args(served.get("args") or [])
    engine = served.get("engine") or "unknown"
    where = (chosen.get("benchmark") or {}).get("measured_on") or {}
    hardware = where.get("gpu") or where.get("cpu")
    label = ENGINE_WORDS.get(engine, engine)
    on = [f"{label} {served['version']}" if served.get("version") else label]
    on += [f"image {served['image']}"] if served.get("image") else []
    on += [str(hardware)] if hardware else []
    suites = (chosen.get("benchmark") or {}).get("suites") or {}
    tasks: dict[str, int] = {}
    for verdict in chosen.get("verdicts") or []:
        group = Metric.parse(verdict["metric"]).group
        if group in suites and group not in tasks:
            tasks[group] = suites[group].get("total")
    parser = flag_value(args, "--tool-call-parser")
    return {"engine": engine, "version": served.get("version"), "image": served.get("image"),
            "container": served.get("container"), "hardware": hardware, "validated_on": on,
            "required_cli_args": args, "flags_text": " ".join(shlex.quote(a) for a in args), "tool_call_parser": parser,
            "tool_calling_supported": bool(parser) and "--enable-auto-tool-choice" in args,
            "reasoning_parser": flag_value(args, "--reasoning-parser"), "validated_tasks": tasks}


def calibration_key(alternative: str | None) -> str:
    """The recipe key of the set a strategy calibrates on."""
    return "calibration.source" if alternative is None else f"calibration.alternatives.{alternative}"


def speed_text(benchmark: dict[str, Any] | None, verdicts: list[dict[str, Any]]) -> dict[str, Any]:
    """The measured decode speed as the documents print it: a figure, or, where the paired measurement
    disagrees with itself (gates.speed_reliability), "unreliable" with the spread instead."""
    if not benchmark:
        return {"value": None, "reliable": True, "text": "n/a"}
    info = speed_reliability(benchmark, verdicts)
    value = info["value"]
    if value is None:
        return {**info, "text": "n/a"}
    if info["reliable"]:
        return {**info, "text": f"{value:.1f}"}
    ratio = info["ratio"] or {}
    spread = (f"x{ratio['min']:.2f}-x{ratio['max']:.2f} of the baseline over {info['pairs']} pairs, "
              if ratio else "")
    return {**info, "text": f"unreliable ({value:.1f} measured; {spread}{'; '.join(info['why'])})"}


# What a suite's scorer checks, in the blog's words.
SCORER_WORDS = {"no_thinking": "thinking leaking into answers", "tool_call": "tool calls that stop parsing",
                "no_markdown": "markdown creeping into spoken answers",
                "contains": "wrong answers to questions with a known answer"}


def behaviour(recipe: Recipe, strategies: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """What this run measured about behaviour: the suites it ran (and what each checks) and, per verdict
    of a suite gate, which strategies it rejected, left undecided (inconclusive or not measurable) or passed."""
    from runner.benchmark.suites import load_suite

    checks = []
    for ref in recipe.benchmark.suites:
        if ref.bfcl is not None:
            checks.append(f"function calls judged by BFCL's checker ({', '.join(ref.bfcl)})")
            continue
        if ref.teacher_eval:
            checks.append("replies that depart from the teacher's on held-out prompts (a different tool, "
                          "or a tool call, markdown or reasoning where it answered plainly)")
            continue
        try:
            checks.append(SCORER_WORDS.get(load_suite(ref).scorer, ref.name))
        except RunnerError:
            checks.append(ref.name)
    suites = {ref.name for ref in recipe.benchmark.suites}
    out: dict[str, Any] = {"checks": list(dict.fromkeys(checks)), "gates": [], "failed": {}, "inconclusive": {},
                           "not_measurable": {}, "passed": {}, "controls": {}}
    for name, facts in strategies.items():
        # A negative control is built to fail: its verdicts say whether the gates can see damage, not
        # whether quantization changed behaviour.
        control = facts["spec"].get("negative_control")
        if control:
            out["controls"][name] = [v["gate"] for v in facts["verdicts"] if v["verdict"] in ("fail", "missing")]
            continue
        for v in facts["verdicts"]:
            if Metric.parse(v["metric"]).group not in suites:
                continue
            if v["gate"] not in out["gates"]:
                out["gates"].append(v["gate"])
            bucket = {"fail": "failed", "missing": "failed", "inconclusive": "inconclusive",
                      "not_measurable": "not_measurable"}.get(v["verdict"], "passed")
            out[bucket].setdefault(name, []).append(v["gate"])
    return out


def reserved_names(run: RunView, best: str | None) -> set[str]:
    """File names the upload already uses (the checkpoint's, the card's, the plots'): an input file
    staged beside recipe.yaml must not take one of them."""
    names = {"README.md", "recipe.yaml", *PICTURES.values()}
    if best is not None:
        with contextlib.suppress(KeyError, OSError):  # no checkpoint: nothing of its to avoid
            names |= {p.name for p in run.output(ids.export(best), "checkpoint").iterdir()}
    return names


# Recipe keys whose file the upload carries beside recipe.yaml (data the run read); a path under any
# other key is named in the card as an input the user brings.
_UPLOADED = (("calibration", "source", "path"), ("calibration", "alternatives", "*", "path"),
             ("calibration", "*", "categories", "*", "prompt_files", "*", "path"),
             ("calibration", "alternatives", "*", "categories", "*", "prompt_files", "*", "path"),
             ("benchmark", "suites", "*", "path"))
_REQUIRED = {("model", "source", "path"): "the source model (its folder, or the .gguf file)",
             ("model", "shapes"): "optional: the model's shapes folder, for `recipe list` predictions",
             ("export", "fixups", "*", "source"): "a file the copy_file fix-up puts into the checkpoint",
             ("report", "templates_dir"): "optional: your card templates"}
# Larger input files are named, not uploaded.
MAX_UPLOADED_INPUT_BYTES = 200 * 1024 * 1024


@dataclass
class PortableRecipe:
    yaml: str  # the recipe as the card embeds it and the upload carries it
    files: dict[str, Path]  # upload name (beside recipe.yaml) -> the file this run read
    required: list[dict[str, str]]  # {"key", "name", "what"}: inputs the recipe names but the upload lacks
    shown: dict[str, str]  # absolute path -> how the portable recipe writes it


def _matches(key: tuple[Any, ...], pattern: tuple[str, ...]) -> bool:
    return len(key) == len(pattern) and all(p == "*" or p == str(k) for k, p in zip(key, pattern, strict=True))


def portable_recipe(recipe: Recipe, reserved: set[str] | None = None) -> PortableRecipe:
    """The recipe re-runnable from its upload: each data file it reads (calibration sets, prompt files,
    suites) is uploaded beside recipe.yaml and named there by a path relative to it; any other local
    path becomes its file name and is listed as a required input. No path of this machine remains."""
    taken = set(reserved or ())
    files: dict[str, Path] = {}
    required: list[dict[str, str]] = []
    shown: dict[str, str] = {}

    def upload_name(path: Path) -> str:
        for name, known in files.items():
            if known == path:
                return name
        stem, suffix, n = path.stem, path.suffix, 1
        name = path.name
        while name in taken:
            n += 1
            name = f"{stem}-{n}{suffix}"
        taken.add(name)
        files[name] = path
        return name

    def walk(value: Any, key: tuple[Any, ...]) -> Any:
        if isinstance(value, dict):
            return {k: walk(v, (*key, k)) for k, v in value.items()}
        if isinstance(value, list):
            return [walk(v, (*key, i)) for i, v in enumerate(value)]
        if not (isinstance(value, str) and value.startswith("/") and "\n" not in value):
            return value
        path = Path(value)
        if (any(_matches(key, p) for p in _UPLOADED) and path.is_file()
                and path.stat().st_size <= MAX_UPLOADED_INPUT_BYTES):
            shown[value] = upload_name(path)
            return shown[value]
        shown[value] = path.name
        what = next((w for p, w in _REQUIRED.items() if _matches(key, p)), None)
        if what is None and any(_matches(key, p) for p in _UPLOADED):
            what = "a data file too large to upload with the model (or missing when the card was written)"
        if what is not None:
            required.append({"key": ".".join(str(k) for k in key), "name": path.name, "what": what})
        return path.name

    data = walk(recipe.model_dump(mode="json", exclude_defaults=True), ())
    return PortableRecipe(dump_yaml(data), files, required, shown)


def _set_description(source: Any, shown: dict[str, str]) -> str:
    kind = source.kind
    if kind in ("jsonl", "text"):
        name = shown.get(str(source.path), Path(str(source.path)).name)
        return (f"the conversations of `{name}`" if kind == "jsonl"
                else f"the paragraphs of `{name}` (plain text, no chat template)")
    if kind == "teacher":
        return f"conversations generated by the teacher `{source.model}`"
    if kind == "random_tokens":
        return "random token ids (a control, no text)"
    return f"the dataset `{source.name}`"


def calibration_overlaps(recipe: Recipe, run: RunView, keys: list[str] | None = None) -> dict[str, dict[str, Any]]:
    """{set key: overlap of the set the run calibrated on (its committed calibrate output) with the
    prompts of the recipe's suites}: {"checked", "count", "items", "suite_prompts"} or why not checked."""
    from runner.calibration.overlap import suite_items

    alternatives = {calibration_key(None): None} | {calibration_key(n): n for n in recipe.calibration.alternatives}
    out = {}
    try:
        prompts = len(suite_items(recipe.benchmark.suites))
    except (RunnerError, OSError) as exc:
        return {key: {"checked": False, "why": f"the suites could not be read ({exc})"} for key in keys or alternatives}
    for key, name in alternatives.items():
        if keys is not None and key not in keys:
            continue
        source = recipe.calibration.source if name is None else recipe.calibration.alternatives[name]
        step = ids.calibrate(name)
        if source.kind == "random_tokens":
            out[key] = {"checked": False, "why": "random token ids hold no prompts", "suite_prompts": prompts}
            continue
        try:
            path = run.output(step, "calibration")
            found: list[Overlap] = file_overlaps(path, recipe.benchmark.suites, label=f"{step}/calibration.jsonl")
        except (KeyError, OSError) as exc:
            out[key] = {"checked": False, "why": f"no calibration set in the run ({exc})", "suite_prompts": prompts}
            continue
        out[key] = {"checked": True, "count": len(found), "suite_prompts": prompts,
                    "items": [o.describe() for o in found]}
    return out


def calibration_sets(recipe: Recipe, run: RunView, strategies: dict[str, dict[str, Any]],
                     portable: PortableRecipe) -> dict[str, dict[str, Any]]:
    """Each calibration set a judged strategy used: what it is, which strategies used it, its calibrate
    record, and whether it is disjoint from the suites' prompts."""
    used: dict[str, list[str]] = {}
    for name, facts in strategies.items():
        used.setdefault(facts["calibration_set"], []).append(name)
    overlaps = calibration_overlaps(recipe, run, list(used))
    out = {}
    for key, names in used.items():
        alt = key.removeprefix("calibration.alternatives.") if key != calibration_key(None) else None
        source = recipe.calibration.source if alt is None else recipe.calibration.alternatives[alt]
        record = run.record(ids.calibrate(alt)) or {}
        out[key] = {"name": alt or "the recipe's set", "description": _set_description(source, portable.shown),
                    "strategies": names, "summary": record.get("summary", {}), "overlap": overlaps.get(key, {})}
    return out


# Each verify check in plain words (the card's table).
VERIFY_CHECKS = {
    "safetensors": "the weight files open and every tensor is readable",
    "hf_quant_config": "hf_quant_config.json has the keys the serving engine reads",
    "quant_algo_supported": "the serving engine loads this quantization format",
    "pre_quant_scale": "no AWQ pre-quantization scales that vLLM cannot apply",
    "mixed_layers": "each per-layer format holds the tensors that format needs",
    "exclusions": "the layers the recipe keeps in 16 bits are stored unquantized",
    "exclusion_patterns_match": "every exclusion pattern matches a module of this model",
    "exclude_modules_match": "every entry of exclude_modules names a real module",
    "input_sizes": "quantized layers' input sizes fit the format's block size",
    "weights_decode": "independent decoders turn the stored weights back into the source weights",
    "formats": "every quantized layer is in a format these checks can read",
    "size": "the checkpoint is no larger than its formats should make it",
    "vllm_load": "vLLM's own loader builds the model from it (every tensor lands in a parameter, every "
                 "parameter is loaded)",
}
STATUS_WORDS = {"pass": "yes", "warn": "not fully (see note)", "fail": "no", "not_run": "not run (see note)"}


def verify_rows(verify: dict[str, Any]) -> list[dict[str, str]]:
    rows = []
    details = verify.get("details") or {}
    for name, status in (verify.get("checks") or {}).items():
        rows.append({"check": VERIFY_CHECKS.get(name, name.replace("_", " ")),
                     "result": STATUS_WORDS.get(status, status),
                     "note": details.get(name, "") if status != "pass" else
                     # which vLLM loaded it, and where, is what the reader needs of this one
                     (verify.get("vllm_load") or {}).get("detail", "") if name == "vllm_load" else ""})
    return rows


def usage(recipe: Recipe, repo_id: str | None, chosen: dict[str, Any] | None,
          served_args: list[str]) -> dict[str, str] | None:
    """How to serve the published model with vLLM, when vLLM loads its export format: with the flags this run
    served it with (`served_args`, as the card shows them)."""
    algo = ((chosen or {}).get("verify") or {}).get("quant_algo")
    if not algo or algo.upper() not in VLLM_QUANT_ALGOS:
        return None
    model = repo_id or f"./{recipe.model.name}-quantized"
    card = engine_for(recipe.serve.engine).card_serving(recipe, served_args)
    flags = " ".join(shlex.quote(a) for a in card.args)
    return {"vllm": f"vllm serve {model}" + (f" {flags}" if flags else ""),
            "docker": serve_command(card, model)}


def recipe_yaml(recipe: Recipe) -> str:
    """The recipe as the card and the upload show it: what the user set, defaults left out, and no
    path of this machine (see portable_recipe: data files become names beside recipe.yaml)."""
    return portable_recipe(recipe).yaml


def scrub_paths(value: Any) -> Any:
    """A JSON value with each absolute local path replaced by its last component."""
    if isinstance(value, dict):
        return {k: scrub_paths(v) for k, v in value.items()}
    if isinstance(value, list):
        return [scrub_paths(v) for v in value]
    if isinstance(value, str) and value.startswith("/") and "\n" not in value:
        return Path(value).name
    return value


def serve_command(card: CardServing, model: str) -> str:
    """The docker run line that serves the published model in the vLLM container the engine names."""
    from runner.containers.plugin import load_container

    plugin = load_container(card.container)
    image = plugin.image or "vllm/vllm-openai:latest"
    parts = ["docker run -d --name vllm-model"]
    if plugin.gpus != "none" or card.force_gpus:
        parts.append("--runtime=nvidia --gpus all")
    if plugin.shm_size:
        parts.append(f"--shm-size={plugin.shm_size}")
    local = model.count("/") != 1 or model.startswith(".")
    if local:
        parts.append(f"-v {model}:/model")
    else:
        parts.append("-v ~/.cache/huggingface:/root/.cache/huggingface -e HF_TOKEN")
    parts.append(f"-p {plugin.port}:{plugin.port} {image}")
    parts.append(("--model /model " if local else f"--model {model} ") + " ".join(shlex.quote(a) for a in card.args))
    return " \\\n  ".join(p.rstrip() for p in parts)


def card_data(recipe: Recipe, facts: dict[str, Any]) -> Any:
    from huggingface_hub import EvalResult, ModelCardData

    results = []
    chosen = facts["chosen"]
    if chosen and chosen["benchmark"]:
        for suite, outcome in chosen["benchmark"]["suites"].items():
            results.append(EvalResult(task_type="text-generation", dataset_type=f"recipe-runner/{suite}",
                                      dataset_name=suite, metric_type="pass_rate",
                                      metric_value=outcome["pass_rate"], metric_name=f"{suite} pass rate"))
    fmt = facts["format"]
    arch = (chosen or {}).get("quantize", {}).get("architecture") or recipe.model.architecture
    # The format tags are the export's; a recipe's own tags that name another format are dropped.
    own = [tag for tag in recipe.report.tags if tag.lower() not in FORMAT_TAGS]
    tags = list(dict.fromkeys([*own, *(fmt["tags"] if fmt else []), "modelopt", "recipe-runner"]
                              + ([arch] if arch else [])))
    base_model = facts["base_model"]
    # What Red Hat's validated cards carry in their metadata, from this run's serve and gates records.
    validated = facts["validation"]
    served = {} if validated is None else {
        "validated_on": validated["validated_on"], "required_cli_args": validated["required_cli_args"],
        **{key: validated[key] for key in ("tool_call_parser", "reasoning_parser") if validated[key]},
        "tool_calling_supported": validated["tool_calling_supported"],
        "validated_tasks": list(validated["validated_tasks"]),
        "validated_task_sizes": validated["validated_tasks"]}
    return ModelCardData(base_model=base_model, base_model_relation="quantized" if base_model else None,
                         license=recipe.model.license, tags=tags, pipeline_tag="text-generation",
                         library_name="modelopt", model_name=facts["repo_id"] or facts["title"],
                         eval_results=results or None, **served)


def environment(templates_dir: Path | None) -> SandboxedEnvironment:
    loaders = [FileSystemLoader(str(templates_dir))] if templates_dir else []
    loaders.append(FileSystemLoader(str(shipped_dir("templates"))))
    env = SandboxedEnvironment(loader=ChoiceLoader(loaders), undefined=StrictUndefined, keep_trailing_newline=True,
                               trim_blocks=True, lstrip_blocks=True, autoescape=False)
    env.filters["pct"] = lambda v: "n/a" if v is None else f"{100 * v:.0f} %"
    env.filters["num"] = lambda v, d=1: "n/a" if v is None else f"{v:.{d}f}"
    env.filters["size"] = human_bytes
    return env


def render_documents(recipe: Recipe, run: RunView, target: Path, search: dict[str, Any] | None = None
                     ) -> tuple[dict[str, str], dict[str, Any]]:
    """Write README.md (the card), blog.md, research_section.md and the plots into `target`; returns
    the outputs and the facts they were written from (gather). `search`: the run's search record."""
    from huggingface_hub import ModelCard

    from runner.search.report import pareto_markdown, pareto_svg, strategy_snippet

    facts = gather(recipe, run)
    facts["search"] = None
    if search is not None:
        facts["search"] = {"table": pareto_markdown(search), "snippet": strategy_snippet(search),
                           "best": search.get("best"), "plot": "search_pareto.svg"}
        target.mkdir(parents=True, exist_ok=True)
        (target / "search_pareto.svg").write_text(pareto_svg(search), encoding="utf-8")
    env = environment(recipe.report.templates_dir)
    data = card_data(recipe, facts)
    body = env.get_template(recipe.report.card_template).render(**facts)
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")
    target.mkdir(parents=True, exist_ok=True)
    card.save(target / "README.md")
    (target / "blog.md").write_text(env.get_template(recipe.report.blog_template).render(**facts), encoding="utf-8")
    (target / "research_section.md").write_text(env.get_template(recipe.report.research_template).render(**facts),
                                                encoding="utf-8")
    for (step, output), picture in PICTURES.items():
        source = optional_output(run, step, output)
        if source is not None and source.exists():
            shutil.copyfile(source, target / picture)
    return {"card": "README.md", "blog": "blog.md", "research": "research_section.md"}, facts


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


# --- the step ---------------------------------------------------------------------------------


async def run(ctx: StepContext) -> StepResult:
    inputs = input_of(ctx, ReportInput)
    recipe = inputs.recipe
    outputs, facts = await asyncio.to_thread(render_documents, recipe, ctx, ctx.scratch, inputs.search)
    summary: dict = {"documents": list(outputs.values()), "warnings": []}
    # Whether each calibration set of the run is disjoint from the suites' prompts (the card says it too).
    overlap = await asyncio.to_thread(calibration_overlaps, recipe, ctx)
    summary["calibration_overlap"] = overlap
    for key, found in overlap.items():
        if found.get("count"):
            warning = (f"{key}: {found['count']} calibration prompts overlap the evaluation suites' prompts "
                       f"(first: {found['items'][0]}); the card says so")
            summary["warnings"].append(warning)
            ctx.log.warning(warning)
    # Computed once, from the format gates named (gather): publish reads it from this record.
    suggested = summary["suggested_repo_id"] = facts["suggested_repo_id"]
    if suggested is not None:
        warning = (f"publish.repo_id {recipe.publish.repo_id} names another format than the selected export holds; "
                   f"a name that says what it holds: {suggested}")
        summary["warnings"].append(warning)
        ctx.log.warning(warning)
    if recipe.report.research_doc is not None:
        section = (ctx.scratch / "research_section.md").read_text(encoding="utf-8")
        changed = append_research_section(recipe.report.research_doc, recipe.name, section)
        summary["research_doc"] = {"path": str(recipe.report.research_doc), "changed": changed}
    return StepResult(outputs=outputs, summary=summary)


KIND = StepKind("report", run, input=ReportInput,
                modules=("steps/report.py", "benchmark/presentation.py", "quantization/export_words.py",
                         "search/report.py"))
