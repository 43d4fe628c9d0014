"""Every tensor of the source checkpoint is accounted for after export (issue 27): exported, renamed, carried
by a `carry_tensors` fix-up (unquantized BF16, excluded from quantization, with the config vLLM's MTP
loader reads) or dropped on purpose with a reason; an untied lm_head stays untied."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
from tiny_families import build

from conftest import REPO, build_tiny_llama, recipe, recipe_cli_env, record, vllm_python_if_built
from runner.recipe.fixups import apply_fixups, tensor_accounting

CALIBRATION = REPO / "recipes" / "demo" / "calibration.jsonl"


def headers(folder: Path) -> dict[str, dict]:
    out = {}
    for file in folder.glob("*.safetensors"):
        with file.open("rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            out.update({k: v for k, v in json.loads(fh.read(n)).items() if k != "__metadata__"})
    return out


def add_tensors(folder: Path, extra) -> None:
    from safetensors.torch import load_file, save_file

    (file,) = folder.glob("*.safetensors")
    tensors = load_file(file)
    tensors.update(extra(tensors))
    save_file(tensors, file, metadata={"format": "pt"})


def with_mtp(folder: Path) -> Path:
    """The tiny Qwen3.5 source with an MTP head as Qwen's checkpoints store it: one full-attention decoder
    layer under mtp.layers.0 (copied from the last layer), mtp.fc and its norms; mtp_num_hidden_layers: 1."""
    import torch

    def mtp(tensors):
        layer = "model.language_model.layers.3."
        hidden = tensors["model.language_model.norm.weight"].shape[0]
        out = {"mtp.layers.0." + k[len(layer):]: v.clone() for k, v in tensors.items() if k.startswith(layer)}
        out["mtp.fc.weight"] = (torch.randn(hidden, 2 * hidden) * 0.02).to(torch.bfloat16)
        for norm in ("norm", "pre_fc_norm_embedding", "pre_fc_norm_hidden"):
            out[f"mtp.{norm}.weight"] = torch.ones(hidden, dtype=torch.bfloat16)
        return out

    add_tensors(folder, mtp)
    config = json.loads((folder / "config.json").read_text())
    config.get("text_config", config)["mtp_num_hidden_layers"] = 1
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def run(recipe_text: str, tmp_path: Path, *extra: str, vllm: str = "none"):
    path = tmp_path / "tiny.yaml"
    path.write_text(recipe_text, encoding="utf-8")
    run_dir = tmp_path / "run"
    env = recipe_cli_env() | {"RECIPE_VLLM_PYTHON": vllm}
    return run_dir, recipe("run", str(path), "--until", "verify", "--run-dir", str(run_dir), *extra, env=env)


def test_carry_tensors_streams_the_source_tensors_into_a_new_shard(tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    source, export = tmp_path / "source", tmp_path / "export"
    source.mkdir()
    export.mkdir()
    values = torch.randn(8, 4)
    save_file({"model.w.weight": torch.ones(2, 2, dtype=torch.bfloat16), "mtp.fc.weight": values,
               "mtp.norm.weight": torch.ones(4, dtype=torch.bfloat16)}, source / "model.safetensors")
    (source / "config.json").write_text(json.dumps({"text_config": {"mtp_num_hidden_layers": 1}}))
    save_file({"model.w.weight": torch.ones(2, 2, dtype=torch.bfloat16)}, export / "model.safetensors")
    (export / "config.json").write_text(json.dumps({"quantization_config": {"ignore": ["lm_head"]}, "text_config": {}}))
    (export / "hf_quant_config.json").write_text(json.dumps({"quantization": {"exclude_modules": ["lm_head"]}}))
    fixup = {"op": "carry_tensors", "match": "mtp.*", "config_from_source": ["text_config.mtp_num_hidden_layers"]}
    (line,) = apply_fixups(export, [fixup], model_dir=source)
    assert "carried 2 tensor(s)" in line, line
    carried = load_file(next(export.glob("model-carried-*.safetensors")))
    assert carried["mtp.fc.weight"].dtype == torch.bfloat16
    assert torch.equal(carried["mtp.fc.weight"], values.to(torch.bfloat16))  # round to nearest even, as torch
    index = json.loads((export / "model.safetensors.index.json").read_text())["weight_map"]
    assert index["model.w.weight"] == "model.safetensors" and index["mtp.fc.weight"].startswith("model-carried-")
    assert json.loads((export / "hf_quant_config.json").read_text())["quantization"]["exclude_modules"] == [
        "lm_head", "mtp.*"]
    config = json.loads((export / "config.json").read_text())
    assert config["quantization_config"]["ignore"] == ["lm_head", "mtp.*"]
    assert config["text_config"]["mtp_num_hidden_layers"] == 1
    accounting = tensor_accounting([fixup, {"op": "drop_tensors", "match": "model.visual.*", "reason": "text only"}])
    assert accounting.carried == (("mtp.*", "bfloat16"),) and accounting.dropped == (("model.visual.*", "text only"),)


TINY_QWEN35 = """extends: {recipes}/qwen35-27b.yaml
name: tiny-mtp
vars: {{last_layer: 3}}
model:
  source: {{kind: local, path: {model}}}
calibration:
  source: {{kind: jsonl, path: {calibration}}}
  samples: 4
  max_length: 64
  held_out: 2
execution: {{executor: local, max_parallel: 1, gpus: 0}}
"""


def test_qwen35_mtp_head_is_carried_unquantized_and_verified(demo_tokenizer, tmp_path):
    """Carried, and loaded by vLLM's own loader where .venv-vllm is built: the main model drops `mtp.*` on
    purpose, the MTP draft model (vLLM's `mtp` speculative method) must take every one of them."""
    model = with_mtp(build("qwen35-27b.yaml", tmp_path / "model", demo_tokenizer))
    vllm = vllm_python_if_built()
    run_dir, result = run(TINY_QWEN35.format(recipes=REPO / "recipes", model=model, calibration=CALIBRATION),
                          tmp_path, "--strategy", "mlp_only", vllm=vllm)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    verify = record(run_dir, "verify.mlp_only")["summary"]
    assert verify["checks"]["tensor_accounting"] == "pass" and verify["checks"]["carried_tensors"] == "pass"
    assert verify["checks"]["lm_head"] == "pass"
    if vllm != "none":
        assert verify["checks"]["vllm_load"] == "pass", verify
        loaded = json.loads((run_dir / "steps" / "verify.mlp_only" / "vllm_load.json").read_text())
        (one,) = loaded["results"]
        assert one["draft_model"] == "Qwen3_5MTP" and one["unused_tensors"] == []
    export = run_dir / "steps" / "export.mlp_only" / "checkpoint"
    tensors = headers(export)
    mtp = {k: v for k, v in tensors.items() if k.startswith("mtp.")}
    assert len(mtp) == len([k for k in headers(model) if k.startswith("mtp.")]) > 10
    assert all(v["dtype"] == "BF16" and not k.endswith("_scale") for k, v in mtp.items())
    assert "mtp.*" in json.loads((export / "hf_quant_config.json").read_text())["quantization"]["exclude_modules"]
    config = json.loads((export / "config.json").read_text())
    assert config["text_config"]["mtp_num_hidden_layers"] == 1
    assert "mtp.*" in config["quantization_config"]["ignore"]


def test_a_source_tensor_the_export_lost_fails_verify_naming_it(demo_tokenizer, tmp_path):
    """The Mistral-Small case (issue 27): the checkpoint has its own lm_head.weight, the config lets
    transformers tie the head to the embeddings, and the export silently loses the real head."""
    import torch

    model = tmp_path / "model"
    build_tiny_llama(model, demo_tokenizer)
    config = json.loads((model / "config.json").read_text())
    config["tie_word_embeddings"] = True
    (model / "config.json").write_text(json.dumps(config))
    add_tensors(model, lambda t: {"lm_head.weight": torch.randn_like(t["model.embed_tokens.weight"])}
                if "lm_head.weight" not in t else {})
    run_dir, result = run(f"""name: tiny-lm-head
model:
  name: Tiny
  source: {{kind: local, path: {model}}}
calibration:
  source: {{kind: jsonl, path: {CALIBRATION}}}
  samples: 4
  max_length: 64
  held_out: 2
quantization:
  strategies:
    - name: max
      preset: NVFP4_DEFAULT_CFG
execution: {{executor: local, max_parallel: 1, gpus: 0}}
""", tmp_path)
    assert result.returncode == 1, result.stdout[-2000:]
    failed = (run_dir / "logs" / "verify.max.failed.json").read_text()
    # ModelOpt writes the tied head (a copy of the embeddings) as lm_head.weight, so the name is there; the
    # config that would make vLLM tie it is what verify refuses.
    assert "lm_head: the source has its own lm_head.weight (untied) but config.json says tie_word_embeddings: " \
           "true" in failed and "set tie_word_embeddings: false" in failed, failed


def test_a_source_tensor_missing_from_the_export_names_the_recipe_key(tmp_path):
    import torch
    from safetensors.torch import save_file

    from runner.quantization.verify_rules import TensorAccounting, VerifyRules
    from runner.worker.verify import verify_checkpoint

    source, export = tmp_path / "source", tmp_path / "export"
    source.mkdir()
    export.mkdir()
    weights = {"model.w.weight": torch.ones(2, 16, dtype=torch.bfloat16)}
    save_file({**weights, "mtp.fc.weight": torch.ones(2, 2, dtype=torch.bfloat16),
               "model.visual.x.weight": torch.ones(2, 2, dtype=torch.bfloat16)}, source / "model.safetensors")
    save_file(weights, export / "model.safetensors")
    rules = VerifyRules(engine="vllm", quant_algos=("NVFP4",))
    checks = {c["name"]: c for c in verify_checkpoint(export, [], rules, source)["checks"]}
    assert checks["tensor_accounting"]["status"] == "fail"
    assert "2 of the source's 3 tensors are not in the export: model.visual.x.weight, mtp.fc.weight" in \
        checks["tensor_accounting"]["detail"] and "`op: carry_tensors`" in checks["tensor_accounting"]["detail"]
    declared = TensorAccounting(dropped=(("mtp.*", "no drafter"), ("model.visual.*", "text only")))
    checks = {c["name"]: c for c in verify_checkpoint(export, [], rules, source, accounting=declared)["checks"]}
    assert checks["tensor_accounting"]["status"] == "pass", checks["tensor_accounting"]
    assert "1 left out on purpose (no drafter)" in checks["tensor_accounting"]["detail"]


@pytest.mark.parametrize("recipe_file", ["qwen35-27b.yaml", "qwen35-35b-a3b.yaml", "qwen3-next-80b-a3b.yaml"])
def test_qwen_family_bases_carry_the_mtp_head(recipe_file):
    from runner.recipe.loader import load_recipe

    accounting = tensor_accounting(load_recipe(REPO / "recipes" / recipe_file).recipe.export.fixups)
    assert ("mtp.*", "bfloat16") in accounting.carried
