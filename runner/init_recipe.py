"""`recipe init MODEL`: a starter recipe for a model the catalogue does not have.

Reads the model's config.json (a local folder, a config.json file, or a Hugging Face Hub id when the
Hub is reachable), picks the family base from its model_type, and writes a recipe that extends it
with the DGX Spark strategies, teacher calibration, relative gates and vLLM flags. What it detects
(layer count for `last_layer`, hybrid layer types, MoE experts, a vision tower, tied embeddings) is
written into the recipe as comments, so a reader sees why each choice was made. An architecture
without a family base gets base/generic.yaml and a comment saying what to check.

Predictions come from the folder's safetensors headers, or, when there are no weights yet, from a
tensor listing the worker builds on the meta device (needs torch and transformers where the recipe
is written; without them the sizes are unknown until the source step runs).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runner.errors import RunnerError

# model_type (top level or text_config) -> family base in recipes/base/.
FAMILY_BASES = {
    "qwen3_5": "qwen35", "qwen3_5_text": "qwen35", "qwen3_5_moe": "qwen35-moe", "qwen3_5_moe_text": "qwen35-moe",
    "qwen3_moe": "qwen3-moe", "qwen3_next": "qwen3-next", "llama": "llama3", "gemma3": "gemma3",
    "gemma3_text": "gemma3", "mistral3": "mistral3", "nemotron_h": "nemotron-h",
}
# Families whose base exclusions use `${last_layer}`.
USES_LAST_LAYER = {"qwen35", "qwen35-moe", "qwen3-next", "llama3", "gemma3", "mistral3", "generic"}


@dataclass
class Detected:
    """What config.json says about the model, and the base that fits it."""

    architecture: str
    model_type: str
    family: str
    layers: int
    notes: list[str] = field(default_factory=list)  # one comment line each, written into the recipe
    extra_exclude: list[str] = field(default_factory=list)  # model-specific additions to the base's


def _text_config(config: dict[str, Any]) -> dict[str, Any]:
    for key in ("text_config", "llm_config", "language_config"):
        if isinstance(config.get(key), dict):
            return config[key]
    return config


def detect(config: dict[str, Any]) -> Detected:
    text = _text_config(config)
    model_type = str(config.get("model_type") or text.get("model_type") or "")
    architecture = (config.get("architectures") or ["?"])[0]
    layers = int(text.get("num_hidden_layers") or text.get("n_layer") or text.get("num_layers") or 0)
    if layers <= 0:
        raise RunnerError("config.json has no num_hidden_layers: is this a decoder language model's config?")
    family = FAMILY_BASES.get(model_type) or FAMILY_BASES.get(str(text.get("model_type") or ""), "generic")
    why_generic = f"no family base knows model_type {model_type!r}"
    if family == "llama3" and int(text.get("vocab_size") or 0) != 128256:
        # A Llama-architecture model that is not Llama 3: another tokenizer, another tool-call format.
        family, why_generic = "generic", "a Llama architecture without Llama 3's 128256-token vocabulary"
    found = Detected(architecture, model_type, family, layers)
    notes = found.notes
    notes.append(f"{architecture} ({model_type}): {layers} decoder layers, hidden {text.get('hidden_size')}, "
                 f"vocab {text.get('vocab_size')}")
    if isinstance(text.get("layer_types"), list):
        kinds: dict[str, int] = {}
        for kind in text["layer_types"]:
            kinds[kind] = kinds.get(kind, 0) + 1
        notes.append("layer types: " + ", ".join(f"{n} {k}" for k, n in kinds.items()))
    pattern = text.get("hybrid_override_pattern")
    if isinstance(pattern, str):
        names = {"M": "Mamba-2", "*": "attention", "-": "MLP", "E": "MoE"}
        counts = {names.get(c, c): pattern.count(c) for c in dict.fromkeys(pattern)}
        notes.append("hybrid pattern: " + ", ".join(f"{n} {k}" for k, n in counts.items()))
        feeding = [i - 1 for i, c in enumerate(pattern) if c == "*" and i > 0 and pattern[i - 1] == "M"]
        if feeding:
            notes.append(f"Mamba layers feeding attention ({', '.join(map(str, feeding))}) stay BF16, as in NVIDIA's "
                         "NVFP4 releases")
            found.extra_exclude = [f"*layers.{i}.mixer.*" for i in feeding]
    experts = text.get("num_experts") or text.get("n_routed_experts") or text.get("num_local_experts")
    if experts:
        shared = text.get("shared_expert_intermediate_size") or text.get("n_shared_experts")
        notes.append(f"mixture of experts: {experts} routed, {text.get('num_experts_per_tok')} per token"
                     + (", with a shared expert" if shared else "") + "; routers stay BF16")
    if isinstance(config.get("vision_config"), dict):
        notes.append("vision tower: kept BF16" + ("" if family != "generic" else " (excluded below)"))
        if family == "generic":
            found.extra_exclude += ["*vision_tower*", "*visual*", "*vision_model*", "*multi_modal_projector*"]
    tied = text.get("tie_word_embeddings", config.get("tie_word_embeddings"))
    if tied:
        notes.append("tied embeddings: lm_head shares the embedding (kept BF16, read in full every token)")
    if family == "generic":
        notes.append(f"{why_generic}: base/generic.yaml excludes the first and last "
                     "layer and the embeddings. Check `recipe plan` (which Linear gets which format), add vLLM's "
                     "tool-call and reasoning parsers for this model under serve.args+, and any export fix-ups "
                     "its vLLM loader needs")
    return found


def read_config(model: str) -> tuple[dict[str, Any], Path | None, str | None]:
    """(config, local folder or None, Hub repo id or None) for a folder, a config.json or a Hub id."""
    path = Path(model).expanduser()
    if path.is_dir():
        file = path / "config.json"
        if not file.is_file():
            raise RunnerError(f"{path} has no config.json")
        return _load_json(file), path.resolve(), None
    if path.is_file():
        return _load_json(path), path.resolve().parent, None
    if re.fullmatch(r"[\w.-]+/[\w.-]+", model):
        return _hub_config(model), None, model
    raise RunnerError(f"{model}: not a folder, a config.json or a Hugging Face repo id (owner/name)")


def _load_json(file: Path) -> dict[str, Any]:
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise RunnerError(f"{file}: cannot read it as JSON ({exc})") from None
    if not isinstance(data, dict):
        raise RunnerError(f"{file}: not a JSON object")
    return data


def _hub_config(repo: str) -> dict[str, Any]:
    from huggingface_hub import hf_hub_download

    try:
        return _load_json(Path(hf_hub_download(repo, "config.json")))
    except RunnerError:
        raise
    except Exception as exc:  # noqa: BLE001 - offline, gated, missing: all mean "pass a folder instead"
        raise RunnerError(f"cannot fetch {repo}'s config.json from the Hugging Face Hub ({type(exc).__name__}): "
                          "download the model (or just its config.json) and pass the folder instead") from None


def hub_revision(repo: str) -> str:
    """The repo's current commit, to pin; `main` when the Hub cannot say."""
    try:
        from huggingface_hub import HfApi

        return HfApi().model_info(repo).sha or "main"
    except Exception:  # noqa: BLE001 - offline or gated: the recipe says main and the note says pin it
        return "main"


def build_listing(config: dict[str, Any], shapes: Path) -> str | None:
    """Write config.json + tensors.json into `shapes` with the worker (torch on the meta device);
    None when done, else why not."""
    shapes.mkdir(parents=True, exist_ok=True)
    (shapes / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    result = subprocess.run([sys.executable, "-m", "runner.worker.model_loading", str(shapes),
                             str(shapes / "tensors.json")], capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        (shapes / "tensors.json").unlink(missing_ok=True)
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        return f"the worker could not build the tensor listing ({last})"
    return None


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "model"


def _yaml_scalar(value: Any) -> str:
    """A YAML scalar: plain when it cannot be misread, JSON-quoted otherwise."""
    text = str(value)
    plain = re.fullmatch(r"[A-Za-z/_.~][\w./~-]*", text) and text not in ("true", "false", "null", "yes", "no")
    if isinstance(value, str) and plain:
        return text
    return json.dumps(value) if isinstance(value, str) else text


def recipe_text(found: Detected, name: str, display: str, source: dict[str, Any], shapes: str | None,
                hardware: str) -> str:
    lines = [f"# Starter recipe written by `recipe init` for {display}.",
             "# What config.json says:"]
    lines += [f"#   - {note}" for note in found.notes]
    lines += ["# Calibration conversations come from a teacher (the BF16 model served by vLLM, say): set",
              "# TEACHER_URL / TEACHER_MODEL. `recipe plan` shows each strategy's formats, size and speed.",
              "extends:",
              "  - base/spark-strategies.yaml",
              f"  - base/{found.family}.yaml",
              "  - base/chat-calibration.yaml",
              "  - base/relative-gates.yaml",
              "  - base/vllm-dgx-spark.yaml",
              f"name: {name}",
              f"description: {json.dumps(display + ' to NVFP4 (recipe init starter)')}"]
    if found.family in USES_LAST_LAYER:
        lines += ["vars:", f"  last_layer: {found.layers - 1}"]
    lines += ["model:", f"  name: {_yaml_scalar(display)}", "  source:"]
    lines += [f"    {k}: {_yaml_scalar(v)}" for k, v in source.items()]
    if found.architecture != "?":
        lines.append(f"  architecture: {found.architecture}")
    if shapes:
        lines.append(f"  shapes: {_yaml_scalar(shapes)}")
    if found.extra_exclude:
        lines += ["quantization:", "  exclude+:"] + [f'    - "{p}"' for p in found.extra_exclude]
    if hardware != "dgx-spark-gb10":
        lines += ["benchmark:", f"  hardware: {hardware}"]
    lines += ["publish:", f"  repo_id: ${{env:HUB_NAMESPACE:-your-name}}/{slug(display)}-nvfp4"]
    return "\n".join(lines) + "\n"
