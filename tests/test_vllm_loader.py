"""vLLM's own loader on the exports (runner/vllm_env): the demo's real ModelOpt exports load; six broken
checkpoints are each refused with vLLM's reason; the verify step records the check (pass, or "not run"
without an environment, never a pass); `validate` reads serve.args with vLLM's own parser.

The tests that need vLLM use the environment .ci/setup builds (.venv-vllm, containers/vllm-loader-env.sh)
and skip without it, except in CI (RECIPE_RUNNER_REQUIRE_VLLM=1)."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import MINIMAL, REPO, build_tiny_llama, placeholder_model, recipe, recipe_cli_env, record
from runner.recipe.schema import VllmLoaderCheck
from runner.vllm_env import environment

LAYER = "model.layers.1.self_attn"


def load_check(checkpoints: list[Path], tmp_path: Path) -> dict:
    env, why = environment.find(VllmLoaderCheck())
    assert env is not None, why
    return asyncio.run(environment.load_check(env, checkpoints, tmp_path / "out.json", tmp_path / "vllm.log", 900))


def test_the_demos_exports_load_in_vllm(demo_run, vllm_python, tmp_path):
    checkpoints = [demo_run / "steps" / f"export.{s}" / "checkpoint" for s in ("nvfp4_max", "fp8")]
    found = load_check(checkpoints, tmp_path)
    assert found["vllm_version"] == "0.33.0" and found["device"] == "cpu"
    nvfp4, fp8 = found["results"]
    assert nvfp4["ok"] and fp8["ok"], (nvfp4["error"], fp8["error"])
    assert nvfp4["quant_config"] == "ModelOptNvFp4Config" and fp8["quant_config"] == "ModelOptFp8Config"
    # SmolLM2: 30 layers x 7 projections; the first and last layers stay BF16 (the demo's exclusions)
    assert nvfp4["modules"]["quantized"] > 0 and nvfp4["modules"]["unquantized"] > 0
    assert nvfp4["unused_tensors"] == [] and nvfp4["unloaded_params"] == []
    # FP8's post-processing (requantizing fused q/k/v to one scale) calls an op only vLLM's GPU builds have:
    # the weights loaded, and the result says what was not run rather than pass it silently
    assert nvfp4["post_load_skipped"] is None
    assert "compiled op _C.static_scaled_fp8_quant" in fp8["post_load_skipped"]


def broken_copies(good: Path, into: Path) -> dict[str, Path]:
    """Six ways an export goes wrong, each a copy of a good NVFP4 export with one thing changed."""
    import torch
    from safetensors.torch import load_file, save_file

    def clone(name: str) -> tuple[Path, dict]:
        folder = into / name
        shutil.copytree(good, folder)
        return folder, load_file(folder / "model.safetensors")

    def save(folder: Path, tensors: dict) -> None:
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})

    def edit_quant(folder: Path, change) -> None:
        config = json.loads((folder / "config.json").read_text())
        change(config["quantization_config"], "ignore")
        (folder / "config.json").write_text(json.dumps(config))
        quant = json.loads((folder / "hf_quant_config.json").read_text())
        change(quant["quantization"], "exclude_modules")
        (folder / "hf_quant_config.json").write_text(json.dumps(quant))

    out = {}
    folder, t = clone("extra_tensor")
    t[f"{LAYER}.q_proj.bogus_scale"] = torch.ones(())
    save(folder, t)
    out["extra_tensor"] = folder
    folder, t = clone("missing_weight_scale_2")
    del t[f"{LAYER}.o_proj.weight_scale_2"]
    save(folder, t)
    out["missing_weight_scale_2"] = folder
    folder, _ = clone("exclude_mismatch")  # layer 0 stays BF16 but is no longer listed as excluded
    edit_quant(folder, lambda q, key: q.__setitem__(key, [m for m in q[key] if m != "model.layers.0*"]))
    out["exclude_mismatch"] = folder
    folder, _ = clone("unknown_quant_algo")
    edit_quant(folder, lambda q, key: q.__setitem__("quant_algo", "NVFP5"))
    out["unknown_quant_algo"] = folder
    folder, t = clone("block32_scale")  # scales for blocks of 32: in/32 columns instead of in/16
    scale = t[f"{LAYER}.q_proj.weight_scale"]
    t[f"{LAYER}.q_proj.weight_scale"] = scale[:, : scale.shape[1] // 2].contiguous()
    save(folder, t)
    out["block32_scale"] = folder
    # q/k/v, which vLLM fuses into one layer, in two precisions: q NVFP4, k and v FP8 (MIXED_PRECISION)
    folder, t = clone("mixed_qkv")
    config = json.loads((folder / "config.json").read_text())
    old = config.pop("quantization_config")
    (folder / "config.json").write_text(json.dumps(config))
    layers = {name.removesuffix(".weight_scale_2"): {"quant_algo": "NVFP4", "group_size": 16}
              for name in t if name.endswith(".weight_scale_2")}
    for proj in ("k_proj", "v_proj"):
        prefix = f"{LAYER}.{proj}"
        out_features = t[f"{prefix}.weight"].shape[0]
        in_features = t[f"{prefix}.weight"].shape[1] * 2
        for suffix in ("weight", "weight_scale", "weight_scale_2", "input_scale"):
            t.pop(f"{prefix}.{suffix}")
        t[f"{prefix}.weight"] = (torch.randn(out_features, in_features) * 0.1).to(torch.float8_e4m3fn)
        t[f"{prefix}.weight_scale"] = torch.tensor(0.01)
        t[f"{prefix}.input_scale"] = torch.tensor(0.01)
        layers[prefix] = {"quant_algo": "FP8"}
    save(folder, t)
    (folder / "hf_quant_config.json").write_text(json.dumps({"producer": old["producer"], "quantization": {
        "quant_algo": "MIXED_PRECISION", "kv_cache_quant_algo": None, "exclude_modules": old["ignore"],
        "quantized_layers": layers}}))
    out["mixed_qkv"] = folder
    return out


def test_six_broken_checkpoints_are_refused_each_with_vllms_reason(demo_run, vllm_python, tmp_path):
    good = demo_run / "steps" / "export.nvfp4_max" / "checkpoint"
    broken = broken_copies(good, tmp_path / "broken")
    # One process, a good export last: a refused load leaves nothing behind that spoils the next one
    found = load_check([*broken.values(), good], tmp_path)
    results = dict(zip([*broken, "good"], found["results"], strict=True))
    assert results["good"]["ok"], results["good"]["error"]
    assert not any(results[name]["ok"] for name in broken), {n: r["error"] for n, r in results.items()}
    assert f"{LAYER}.q_proj.bogus_scale" in results["extra_tensor"]["unused_tensors"]
    assert results["missing_weight_scale_2"]["unloaded_params"] == [f"{LAYER}.o_proj.weight_scale_2"]
    assert "model.layers.0.mlp.gate_proj.weight" in results["exclude_mismatch"]["unused_tensors"]
    assert "ModelOpt currently only supports" in results["unknown_quant_algo"]["error"]
    for name in ("block32_scale", "mixed_qkv"):
        assert results[name]["error"], results[name]


TINY = """
name: tiny-vllm
model:
  name: Tiny
  source: {{kind: local, path: {model}}}
calibration:
  source: {{kind: jsonl, path: {calibration}}}
  samples: 4
  max_length: 64
  held_out: 2
quantization:
  strategies:
    - name: max
      preset: NVFP4_DEFAULT_CFG
verify:
  vllm_loader: {{required: {required}}}
execution: {{executor: local, max_parallel: 1, gpus: 0}}
"""


def tiny_recipe(tmp_path: Path, demo_tokenizer: Path, required: bool = False) -> Path:
    model = tmp_path / "model"
    if not model.exists():
        build_tiny_llama(model, demo_tokenizer)
    path = tmp_path / ("required.yaml" if required else "tiny.yaml")
    path.write_text(TINY.format(model=model, calibration=REPO / "recipes" / "demo" / "calibration.jsonl",
                                required=str(required).lower()), encoding="utf-8")
    return path


def run_until_verify(path: Path, run_dir: Path, python: str) -> subprocess.CompletedProcess:
    env = recipe_cli_env() | {"RECIPE_VLLM_PYTHON": python}
    return recipe("run", str(path), "--until", "verify", "--run-dir", str(run_dir), env=env)


def test_verify_records_vllms_verdict_and_the_card_prints_it(vllm_python, demo_tokenizer, tmp_path):
    from runner.steps.report import verify_rows

    run_dir = tmp_path / "run"
    result = run_until_verify(tiny_recipe(tmp_path, demo_tokenizer), run_dir, str(vllm_python))
    assert result.returncode == 0, result.stderr
    summary = record(run_dir, "verify.max")["summary"]
    check = summary["vllm_load"]
    assert check["status"] == "pass" and summary["checks"]["vllm_load"] == "pass", check
    assert check["vllm_version"] == "0.33.0" and check["quant_config"] == "ModelOptNvFp4Config"
    assert check["detail"].startswith("loaded by vLLM 0.33.0's loader on CPU")
    assert (run_dir / "steps" / "verify.max" / "vllm_load.json").is_file()
    (row,) = [r for r in verify_rows(summary) if r["check"].startswith("vLLM's own loader")]
    assert row["result"] == "yes" and "vLLM 0.33.0's loader on CPU" in row["note"]


def fake_vllm_env(folder: Path, version: str = "0.33.0") -> Path:
    """An interpreter whose metadata says vLLM is installed, without vLLM: the check itself breaks."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(folder)], check=True)
    site = next((folder / "lib").glob("python3*/site-packages"))
    dist = site / f"vllm-{version}.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}\n")
    return folder / "bin" / "python"


def test_without_vllm_the_check_is_not_run_never_passed(demo_tokenizer, tmp_path):
    """No environment: "not run" with the reason, the run goes on. An environment whose check breaks:
    "not run" too (an infrastructure error is no finding on the export). `required: true`: verify fails."""
    run_dir = tmp_path / "run"
    result = run_until_verify(tiny_recipe(tmp_path, demo_tokenizer), run_dir, "none")
    assert result.returncode == 0, result.stderr
    check = record(run_dir, "verify.max")["summary"]["vllm_load"]
    assert check == {"status": "not_run", "detail": "$RECIPE_VLLM_PYTHON is `none`: no vLLM environment is looked for"}

    fake = fake_vllm_env(tmp_path / "fake")
    result = run_until_verify(tiny_recipe(tmp_path, demo_tokenizer), run_dir, str(fake))
    assert result.returncode == 0, result.stderr
    check = record(run_dir, "verify.max")["summary"]["vllm_load"]
    assert check["status"] == "not_run" and "the check itself failed" in check["detail"], check
    assert "No module named 'vllm'" in (run_dir / "steps" / "verify.max" / "vllm_load.log").read_text()

    missing = str(tmp_path / "nowhere" / "python")
    result = run_until_verify(tiny_recipe(tmp_path, demo_tokenizer, required=True), run_dir, missing)
    assert result.returncode != 0
    assert "could not run (verify.vllm_loader.required)" in result.stderr + result.stdout
    assert "containers/vllm-loader-env.sh" in result.stderr + result.stdout


def test_another_vllm_version_is_not_a_check_of_the_served_one(tmp_path):
    fake = fake_vllm_env(tmp_path / "fake", "0.32.0")
    env, why = environment.find(VllmLoaderCheck(python=str(fake), version="0.33.0"))
    assert env is None and "vLLM 0.32.0" in why and "serves with 0.33.0" in why
    env, why = environment.find(VllmLoaderCheck(python=str(fake)))
    assert env is not None and env.version == "0.32.0" and why == ""


def test_validate_reads_serve_args_with_vllms_own_parser(vllm_python, write, tmp_path):
    placeholder_model(tmp_path / "model")
    (tmp_path / "calib.jsonl").write_text('{"messages": [{"role": "user", "content": "Hi"}]}\n')
    good = write("good.yaml", MINIMAL + """
serve:
  args: ["--tool-call-parser", "hermes", "--enable-auto-tool-choice", "--max-model-len", "4096",
         "--chat-template", "/vllm-workspace/examples/tool_chat_template_gemma3_pythonic.jinja"]
""")
    result = recipe("validate", str(good))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "parser registries of vLLM 0.33.0" in result.stdout
    # vLLM checks a chat template path exists; one inside the serving container cannot be seen from here
    assert "tool_chat_template_gemma3_pythonic.jinja is not on this machine" in result.stdout
    parser = write("parser.yaml", MINIMAL + """
serve:
  args: ["--tool-call-parser", "hermess", "--enable-auto-tool-choice"]
""")
    result = recipe("validate", str(parser))
    said = result.stdout + result.stderr
    assert result.returncode != 0
    assert "serve.args[0]" in said and "unknown tool call parser 'hermess'" in said, said
    assert "valid: " in said and "hermes" in said and "qwen3_coder" in said
    flag = write("flag.yaml", MINIMAL + """
serve:
  args: ["--max-model-lenght", "4096"]
""")
    result = recipe("validate", str(flag))
    said = result.stdout + result.stderr
    assert result.returncode != 0
    assert "unrecognized argument: --max-model-lenght" in said and "--max-model-len" in said, said


def test_a_refusal_names_each_tensor_once_and_another_engine_warns():
    """vLLM's error already lists the parameters it did not load; the unused tensors are added once."""
    one = {"ok": False, "error": "ValueError: Following weights were not initialized from checkpoint: {'a.w2'}",
           "unloaded_params": ["a.w2"], "unused_tensors": ["b.bogus"], "seconds": 1.0}
    found = {"vllm_version": "0.33.0", "device": "cpu", "results": [one]}
    check = environment.verdict(found, "vllm", runs_vllm=True)
    assert check["status"] == "fail" and check["detail"].count("a.w2") == 1
    assert "1 checkpoint tensors no parameter took: b.bogus" in check["detail"]
    assert environment.verdict(found, "local", runs_vllm=False)["status"] == "warn"
