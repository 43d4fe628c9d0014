"""Every family base on a tiny random model of its architecture class (issue 16): the catalogue
recipe's own strategies and exclusions through quantize, export and verify for the vllm engine.

The tiny models (tests/tiny_families.py) are scaled-down copies of the real configs the recipes
predict from: same classes, hybrid layer pattern, MoE experts, vision towers and embeddings tying.
What is checked: the run passes verify (vLLM's loader rules: quant_algo, exclude_modules, fused
groups, decoders against the source weights), every exclusion pattern names modules the export
really has, and MoE experts get the format their strategy says.
"""

from __future__ import annotations

import fnmatch
import json
import re
import struct
from pathlib import Path

import pytest
from tiny_families import FAMILIES, LAST_LAYER, build

from conftest import REPO, recipe, recipe_cli_env, record, vllm_python_if_built

# Strategy -> the format routed experts must get (ModelOpt's export names).
EXPERT_FORMAT = {"w4a16": "w4a16_nvfp4", "nvfp4_awq": "nvfp4", "mlp_only": "nvfp4"}
# Verify findings that are notes, not failures: an exclude_modules entry for a module the export
# stores under another prefix (vLLM matches substrings), or a layer-index pattern beyond the tiny depth.
NOTES = {"exclude_modules_match", "exclusion_patterns_match"}
# Exports vLLM 0.33.0's loader cannot build on a CPU for want of a CPU kernel (not the export's fault):
# the check says "not run" with this reason, never pass (runner/vllm_env/load_check.py).
MOE_NVFP4 = {"qwen3-30b-a3b.yaml", "qwen3-next-80b-a3b.yaml", "qwen35-35b-a3b.yaml", "qwen36-35b-a3b.yaml",
             "qwen35-122b-a10b.yaml", "gpt-oss-120b.yaml"}
RELU2_MOE = {"nemotron3-nano-30b-a3b.yaml", "nemotron3-super-120b-a12b.yaml"}
# Families vLLM 0.33.0's model class cannot build against the loader environment's transformers (5.14):
# its gemma4.py reads `config.per_layer_config`, which transformers 5.14's Gemma4TextConfig does not
# have (vLLM's images ship a newer transformers). The check would fail on the environment, not on the
# export, so these run without it (verify's own checks still apply).
VLLM_ENV_TOO_OLD = {"gemma4-31b-it.yaml", "gemma4-26b-a4b-it.yaml"}
# gpt-oss's recipe switches mlp_only off (its experts are no nn.Linear, so the pre-flight finds nothing to
# quantize for NVFP4_MLP_ONLY_CFG); its experts export packed as one fused tensor per layer.
NO_MLP_ONLY = {"gpt-oss-120b.yaml": {"mlp_only"}}


def not_on_cpu(recipe_file: str, strategy: str) -> str | None:
    if strategy in ("w4a16", "nvidia_w4a16_fp8attn"):
        return "no CPU kernel for weight-only (W4A16) NVFP4 linears"
    if recipe_file in MOE_NVFP4:
        return "no CPU NVFP4 MoE backend"
    if recipe_file in RELU2_MOE:
        return "non-gated (relu2) MoE experts"
    return None


def export_headers(checkpoint: Path) -> dict[str, dict]:
    out = {}
    for file in checkpoint.glob("*.safetensors"):
        with file.open("rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            out.update({k: v for k, v in json.loads(fh.read(n)).items() if k != "__metadata__"})
    return out


def has_experts(config: dict) -> bool:
    """A config with routed experts (a dense Gemma 4 config still names `num_experts: null`)."""
    keys = ("num_experts", "n_routed_experts", "num_local_experts")
    return any(section.get(k) for section in (config, config.get("text_config") or {}) for k in keys)


def layer_index_beyond(pattern: str, depth: int) -> bool:
    return any(int(i) >= depth for i in re.findall(r"layers\.(\d+)", pattern))


@pytest.mark.parametrize("recipe_file", sorted(FAMILIES))
def test_family_base_quantizes_exports_and_verifies_its_tiny_model(recipe_file, demo_tokenizer, tmp_path):
    model_dir = build(recipe_file, tmp_path / "model", demo_tokenizer)
    depth = LAST_LAYER[recipe_file] + 1
    path = tmp_path / "tiny.yaml"
    path.write_text(f"""extends: {REPO / 'recipes' / recipe_file}
name: tiny-family
vars: {{last_layer: {LAST_LAYER[recipe_file]}}}
model:
  source: {{kind: local, path: {model_dir}}}
calibration:
  source: {{kind: jsonl, path: {REPO / 'recipes' / 'demo' / 'calibration.jsonl'}}}
  samples: 4
  max_length: 64
  held_out: 2
execution: {{executor: local, max_parallel: 1, gpus: 0}}
""", encoding="utf-8")
    run_dir = tmp_path / "run"
    # verify loads each export with vLLM's own loader too, where its environment is built (always in CI)
    env = recipe_cli_env() | {"RECIPE_VLLM_PYTHON": "none" if recipe_file in VLLM_ENV_TOO_OLD
                              else vllm_python_if_built()}
    result = recipe("run", str(path), "--until", "verify", "--run-dir", str(run_dir), env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:] + "".join(
        p.read_text()[-2000:] for p in (run_dir / "logs").glob("verify*.log"))

    strategies = [json.loads(p.read_text())["summary"]["strategy"]
                  for p in sorted((run_dir / "steps").glob("quantize.*/record.json"))]
    assert {"w4a16", "nvfp4_awq", "mlp_only"} - NO_MLP_ONLY.get(recipe_file, set()) <= set(strategies)
    moe = has_experts(json.loads((model_dir / "config.json").read_text()))
    for strategy in strategies:
        quantize = record(run_dir, f"quantize.{strategy}")
        verify = record(run_dir, f"verify.{strategy}")["summary"]
        failed = {k: verify["details"].get(k) for k, v in verify["checks"].items() if v == "fail"}
        assert not failed, (strategy, failed)
        assert {k for k, v in verify["checks"].items() if v == "warn"} <= NOTES, (strategy, verify["checks"])
        assert verify["checks"].get("fused_groups") == "pass" and verify["checks"]["exclusions"] == "pass"
        vllm = verify["vllm_load"]
        if env["RECIPE_VLLM_PYTHON"] == "none":
            assert vllm["status"] == "not_run"
        elif (why := not_on_cpu(recipe_file, strategy)) is not None:
            assert vllm["status"] == "not_run" and why in vllm["detail"], (strategy, vllm)
        else:
            assert vllm["status"] == "pass", (strategy, vllm)

        # Every exclusion names modules the export has (patterns for layers the tiny model lacks aside).
        tensors = export_headers(run_dir / "steps" / f"export.{strategy}" / "checkpoint")
        modules = {t.removesuffix(".weight") for t in tensors if t.endswith(".weight")}
        for pattern in quantize["params"]["exclude"]:
            if layer_index_beyond(pattern, depth):
                continue
            assert any(fnmatch.fnmatchcase(m, pattern) or fnmatch.fnmatchcase(m + ".", pattern) for m in modules), \
                f"{strategy}: exclusion {pattern!r} matches no module of the export"

        # Routed experts: the strategy's format in the quantize record, packed per expert in the export.
        if moe and strategy in EXPERT_FORMAT:
            experts = {n: f for n, f in quantize["summary"]["layers"].items()
                       if re.search(r"\.experts\.(gate_up_proj|up_proj|down_proj)$", n)}
            assert experts, f"{strategy}: no fused expert tensors in the quantize record"
            kept = {n for n in experts if any(fnmatch.fnmatchcase(n, p) for p in quantize["params"]["exclude"])}
            assert all(f == EXPERT_FORMAT[strategy] for n, f in experts.items() if n not in kept), (strategy, experts)
            packed = [t for t in tensors if re.search(r"\.experts\.(\d+\.(up|down|gate)_proj\.weight|gate_up_proj|down_proj)$", t)]
            assert packed and any(tensors[t]["dtype"] == "U8" for t in packed), strategy

