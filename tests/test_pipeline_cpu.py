"""The real pipeline on the CPU, through the `recipe` command: a real model, real ModelOpt calls.

- The demo recipe (SmolLM2-135M-Instruct from the PyPI GGUF) through source, calibrate, quantize,
  export and verify for NVFP4 (max) and FP8.
- A tiny random Qwen3.5 through the shipped Qwen3.5 base: linear-attention exclusions, the
  vision-language config wrapping, and AWQ-lite on the CPU through the pure-PyTorch NVFP4 path.
- Interrupting a real run: the worker is stopped, nothing committed is lost, the next run resumes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest

from conftest import DEMO, PYTHON, REPO, build_tiny_qwen35, recipe, recipe_cli_env, record

pytest.importorskip("modelopt")
pytestmark = pytest.mark.slow


def test_demo_quantize_record_says_which_layer_got_which_format(demo_run):
    summary = record(demo_run, "quantize.nvfp4_max")["summary"]
    layers = summary["layers"]
    assert layers["model.layers.5.self_attn.q_proj"] == "nvfp4"
    assert layers["model.layers.0.mlp.down_proj"] == "bfloat16"  # excluded: first layer
    assert layers["model.layers.29.self_attn.o_proj"] == "bfloat16"  # excluded: last layer
    assert summary["formats"]["nvfp4"] == 28 * 7
    assert 4.5 < summary["effective_bits"] < 16
    assert summary["calibration_samples"] == 34 and summary["calibration_tokens"] > 1000
    assert summary["quantize_s"] > 0 and summary["peak_rss_bytes"] > 0
    fp8 = record(demo_run, "quantize.fp8")["summary"]
    assert fp8["layers"]["model.layers.5.self_attn.q_proj"] == "fp8"
    versions = record(demo_run, "quantize.nvfp4_max")["versions"]
    assert versions["nvidia-modelopt"].startswith("0.47")


def test_demo_exports_verify(demo_run):
    for strategy, algo in (("nvfp4_max", "NVFP4"), ("fp8", "FP8")):
        summary = record(demo_run, f"verify.{strategy}")["summary"]
        assert summary["quant_algo"] == algo
        # vllm_load: "not run" where no vLLM environment is built (tests/test_vllm_loader.py checks it)
        assert all(status in ("pass", "warn") for name, status in summary["checks"].items()
                   if name != "vllm_load"), summary["checks"]
        assert summary["checks"]["exclusions"] == "pass"
        checkpoint = demo_run / "steps" / f"export.{strategy}" / "checkpoint"
        quant = json.loads((checkpoint / "hf_quant_config.json").read_text())["quantization"]
        assert "model.layers.0*" in quant["exclude_modules"]
        assert (checkpoint / "tokenizer.json").exists()
    nvfp4 = record(demo_run, "verify.nvfp4_max")["summary"]
    assert nvfp4["checks"]["weights_decode"] == "pass"
    assert 0 < max(nvfp4["decode_errors"].values()) < 0.25
    assert abs(nvfp4["size_overhead_pct"]) < 5


def test_second_run_reuses_every_step(demo_run):
    t0 = time.monotonic()
    result = recipe("run", str(DEMO), "--until", "verify", "--strategy", "nvfp4_max", "--strategy", "fp8",
                    "--run-dir", str(demo_run))
    assert result.returncode == 0, result.stderr
    assert "started" not in result.stderr
    assert time.monotonic() - t0 < 30


def test_interrupted_forced_step_loses_nothing_and_resumes(demo_run):
    before = record(demo_run, "quantize.fp8")
    log = demo_run / "logs" / "quantize.fp8.log"
    size_before = log.stat().st_size
    proc = subprocess.Popen([PYTHON, "-m", "runner.cli", "run", str(DEMO), "--strategy", "fp8", "--from", "quantize.fp8",
                             "--until", "quantize.fp8", "--run-dir", str(demo_run)],
                            cwd=REPO, env=recipe_cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while "[worker] quantize starting" not in log.read_text()[size_before:]:
        assert time.monotonic() < deadline, "worker did not start"
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "interrupted" in stderr
    # The committed result is untouched, no worker is left behind, no scratch is taken as complete.
    assert record(demo_run, "quantize.fp8") == before
    leftover = subprocess.run(["pgrep", "-f", f"runner.worker {demo_run}"], capture_output=True, text=True)
    assert leftover.stdout.strip() == ""
    status = json.loads((demo_run / "run.json").read_text())
    assert status["status"] == "interrupted"
    again = recipe("run", str(DEMO), "--until", "verify", "--strategy", "fp8", "--run-dir", str(demo_run))
    assert again.returncode == 0 and "started" not in again.stderr


TINY_STRATEGIES = {  # strategy -> (quant_algo, format of model.layers.1.mlp.up_proj)
    "nvfp4_max": ("NVFP4", "nvfp4"),
    "nvfp4_awq": ("NVFP4", "nvfp4"),  # AWQ scales folded away (awq_fold.py)
    "mlp_only": ("NVFP4", "nvfp4"),
    "svdquant": ("NVFP4_SVD", "nvfp4_svdquant"),  # ModelOpt's own name for the format
    "modelopt_recipe": ("NVFP4", "nvfp4"),
    "auto_mixed": ("FP8", None),  # auto_quantize picks per layer; at this budget FP8 only
}


def test_tiny_qwen35_every_strategy_kind_exclusions_and_wrapping(demo_run, tmp_path):
    model_dir = tmp_path / "tiny-qwen35"
    build_tiny_qwen35(model_dir, demo_run / "steps" / "source" / "model")
    env = recipe_cli_env() | {"TINY_QWEN35_DIR": str(model_dir)}
    run_dir = tmp_path / "run"
    result = recipe("run", str(REPO / "tests" / "recipes" / "tiny-qwen35.yaml"), "--until", "verify",
                    "--run-dir", str(run_dir), env=env)
    assert result.returncode == 0, result.stderr + "".join(
        p.read_text()[-3000:] for p in (run_dir / "logs").glob("*.log"))
    for strategy, (algo, up_proj) in TINY_STRATEGIES.items():
        summary = record(run_dir, f"quantize.{strategy}")["summary"]
        layers = summary["layers"]
        assert all(fmt == "bfloat16" for name, fmt in layers.items() if "linear_attn" in name), strategy
        assert layers["model.layers.3.self_attn.q_proj"] == "bfloat16"  # last layer excluded
        assert layers["model.layers.0.mlp.up_proj"] == "bfloat16"  # first layer excluded
        if up_proj:
            assert layers["model.layers.1.mlp.up_proj"] == up_proj, strategy
        verify = record(run_dir, f"verify.{strategy}")["summary"]
        assert verify["quant_algo"] == algo and verify["checks"]["exclusions"] == "pass", (strategy, verify)
        if "NVFP4" in algo:
            assert verify["checks"]["weights_decode"] == "pass", (strategy, verify)
        checkpoint = run_dir / "steps" / f"export.{strategy}" / "checkpoint"
        config = json.loads((checkpoint / "config.json").read_text())
        assert config["architectures"] == ["Qwen3_5ForConditionalGeneration"]
        assert config["text_config"]["model_type"] == "qwen3_5_text"
        assert config["quantization_config"]["quant_algo"] == algo
        assert json.loads((checkpoint / "tokenizer_config.json").read_text())["tokenizer_class"] == "Qwen2Tokenizer"
        assert (checkpoint / "preprocessor_config.json").exists()
    auto = record(run_dir, "quantize.auto_mixed")["summary"]
    assert auto["formats"].get("fp8", 0) > 0
    assert auto["auto_quantize"]["achieved"]["effective_bits"] <= 15.9


def test_vllm_engine_rejects_an_awq_export(demo_run, tmp_path):
    """verify names the quant_algos vLLM loads when an export's is not one of them."""
    from runner.serving.vllm import VllmEngine
    from runner.worker.verify import verify_checkpoint

    checkpoint = tmp_path / "ckpt"
    source = demo_run / "steps" / "export.nvfp4_max" / "checkpoint"
    checkpoint.mkdir()
    for item in source.iterdir():
        os.link(item, checkpoint / item.name)
    quant = json.loads((source / "hf_quant_config.json").read_text())
    quant["quantization"]["quant_algo"] = "NVFP4_AWQ"
    (checkpoint / "hf_quant_config.json").unlink()
    (checkpoint / "hf_quant_config.json").write_text(json.dumps(quant))
    report = verify_checkpoint(checkpoint, ["*layers.0.*"], VllmEngine().verify_rules, None)
    check = next(c for c in report["checks"] if c["name"] == "quant_algo_supported")
    assert check["status"] == "fail" and "NVFP4, W4A16_NVFP4" in check["detail"]


def test_verify_catches_an_exclusion_the_export_did_not_honour(demo_run):
    from runner.serving.vllm import VllmEngine
    from runner.worker.verify import verify_checkpoint

    checkpoint = demo_run / "steps" / "export.nvfp4_max" / "checkpoint"
    report = verify_checkpoint(checkpoint, ["*layers.5.*", "*no_such_module*"], VllmEngine().verify_rules, None)
    checks = {c["name"]: c for c in report["checks"]}
    assert checks["exclusions"]["status"] == "fail"
    assert "model.layers.5." in checks["exclusions"]["detail"] and "stored quantized" in checks["exclusions"]["detail"]


def test_verify_decoder_check_catches_a_wrong_nibble_order(demo_run, tmp_path):
    """Swap the two codes of every byte: per-channel scale fitting cannot hide it, the check fails."""
    from safetensors.torch import load_file, save_file

    from runner.serving.vllm import VllmEngine
    from runner.worker.verify import verify_checkpoint

    source = demo_run / "steps" / "export.nvfp4_max" / "checkpoint"
    broken = tmp_path / "broken"
    broken.mkdir()
    for item in source.iterdir():
        if item.suffix != ".safetensors":
            os.link(item, broken / item.name)
    tensors = load_file(source / "model.safetensors")
    for key, tensor in tensors.items():
        if key.endswith(".weight") and str(tensor.dtype) == "torch.uint8":
            tensors[key] = (tensor >> 4) | ((tensor & 0x0F) << 4)
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    model_dir = demo_run / "steps" / "source" / "model"
    good = verify_checkpoint(source, [], VllmEngine().verify_rules, model_dir)
    bad = verify_checkpoint(broken, [], VllmEngine().verify_rules, model_dir)
    assert next(c for c in good["checks"] if c["name"] == "weights_decode")["status"] == "pass"
    assert next(c for c in bad["checks"] if c["name"] == "weights_decode")["status"] == "fail"
    assert min(bad["decode_errors"].values()) > 0.5


def test_demo_serves_benchmarks_and_gates_against_the_baseline(demo_run):
    result = recipe("run", str(DEMO), "--strategy", "nvfp4_max", "--until", "gates", "--run-dir", str(demo_run))
    assert result.returncode in (0, 4, 5), result.stderr  # 4: none passed, 5: unproven (machine-dependent answers)
    serve = record(demo_run, "serve.nvfp4_max")["summary"]
    assert serve["engine"] == "local" and serve["first_answer"]
    assert serve["prediction"]["hardware"] == "cpu" and serve["prediction"]["predicted_decode_tok_s"] > 0
    bench = json.loads((demo_run / "steps" / "benchmark.nvfp4_max" / "results.json").read_text())
    assert bench["suites"]["easy_facts"]["cap"] == 40 and bench["suites"]["thinking_leak"]["total"] == 5
    assert bench["speed"]["summary"]["successful"] == 3 and bench["speed"]["summary"]["ttft_p50_ms"] > 0
    assert set(bench["speed"]["sweep"]) == {"32"}
    paired = bench["speed"]["paired_baseline"]  # measured alongside the baseline, requests alternating
    assert paired["pairs"] == 3 and paired["ratios"]["decode_tok_s"]["min"] > 0
    assert bench["size"]["bytes"] < json.loads((demo_run / "steps" / "benchmark.baseline" / "results.json")
                                               .read_text())["size"]["bytes"]
    gates = json.loads((demo_run / "steps" / "gates" / "gates.json").read_text())
    assert [v["gate"] for v in gates["verdicts"]["nvfp4_max"]] == ["knowledge", "thinking_leak", "decode_speed"]
    assert all(v["baseline"] is not None for v in gates["verdicts"]["nvfp4_max"] if v["relative_to"] == "baseline")
    # Whatever this machine's answers are, the selection and the exit status follow from the verdicts (the
    # demo accepts an unproven candidate, and says so with exit 5).
    verdicts = [v["verdict"] for v in gates["verdicts"]["nvfp4_max"]]
    rejected = any(v in ("fail", "missing") for v in verdicts)
    unproven = not rejected and any(v in ("inconclusive", "not_measurable") for v in verdicts)
    assert gates["selection"]["best"] == (None if rejected else "nvfp4_max")
    assert gates["selection"]["proven"] == (None if rejected else not unproven)
    assert result.returncode == (4 if rejected else 5 if unproven else 0)
    status = json.loads((demo_run / "run.json").read_text())
    assert status["selection"] == {"strategy": gates["selection"]["best"], "proven": gates["selection"]["proven"]}
    assert gates["speed"]["nvfp4_max"]["measured_over_predicted"] > 0
    for picture in ("gate_scores.png", "ttft_curve.png"):
        assert (demo_run / "steps" / "gates" / picture).read_bytes()[:4] == b"\x89PNG"
    assert "| gate | required |" in result.stderr  # the run ends with the gate table


def test_local_engine_gives_the_same_answers_in_two_fresh_processes(demo_run):
    """Fixed threads, deterministic algorithms, greedy decoding: a repeat run says the same words."""
    import asyncio

    import aiohttp

    from runner.benchmark.suites import load_suite, run_suite
    from runner.recipe.schema import SuiteRef
    from runner.serving.server import free_port

    checkpoint = demo_run / "steps" / "export.nvfp4_max" / "checkpoint"
    suite = load_suite(SuiteRef(name="factual"))

    def answers_once() -> dict:
        port = free_port()
        proc = subprocess.Popen([PYTHON, "-m", "runner.worker.local_server", "--model", str(checkpoint), "--port",
                                 str(port), "--threads", "2"], cwd=REPO, env=recipe_cli_env(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        async def ask() -> dict:
            async with aiohttp.ClientSession() as session:
                for _ in range(600):
                    try:
                        async with session.get(f"http://127.0.0.1:{port}/health") as resp:
                            if resp.status == 200:
                                assert (await resp.json())["threads"] == 2
                                break
                    except aiohttp.ClientError:
                        await asyncio.sleep(0.2)
                return await run_suite(session, f"http://127.0.0.1:{port}/v1", "local", suite, "", False, 3, 1)

        try:
            return asyncio.run(ask())
        finally:
            proc.terminate()
            proc.wait(timeout=30)

    first, second = answers_once(), answers_once()
    assert first["total"] == 3
    assert first["answers_sha256"] == second["answers_sha256"], (first["items"], second["items"])
