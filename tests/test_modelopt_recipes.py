"""Every PTQ recipe shipped in the installed ModelOpt wheel, as a user would name it in a strategy,
on a tiny random Llama on this CPU (bench/modelopt_recipes_cpu.py does the work and prints the
table): each ends verified, or refused before any worker starts with a reason that names the cause.
None may crash, fail inside a worker, or export something verify rejects."""

from __future__ import annotations

import importlib.util
import re
import tempfile
from pathlib import Path

import pytest

from conftest import REPO
from runner.quantization.modelopt_recipes import check_recipe_name, ptq_recipes, recipes_root

pytestmark = pytest.mark.slow

# What a refusal may say: each names its cause and what to do instead.
REASONS = {
    "architecture": re.compile(r"is written for \w+ models .* this model is \w+: use"),
    "nothing quantized": re.compile(r"would quantize no layer: .* pick one written for it"),
    "needs a GPU": re.compile(r"runs only on a CUDA GPU, and this machine has none: run it on a GPU machine"),
    "not loadable by vLLM": re.compile(r"(which vLLM's ModelOpt loader does not load|vLLM's ModelOpt FP8 path "
                                       r"cannot load).*serve.engine: local"),
}


def bench_module():
    spec = importlib.util.spec_from_file_location("modelopt_recipes_cpu", REPO / "bench" / "modelopt_recipes_cpu.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_shipped_ptq_recipe_is_verified_or_refused_up_front():
    pytest.importorskip("modelopt")
    root = recipes_root()
    assert root is not None
    names = ptq_recipes(root)
    assert len(names) >= 40  # ModelOpt 0.47 ships 54
    bench = bench_module()
    ends: dict[str, list[str]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "model"
        bench.build_tiny_llama(model_dir)
        for name in names:
            result = bench.try_recipe(name, model_dir, Path(tmp) / "work")
            ends.setdefault(result["end"], []).append(name)
            if result["end"] == "refused":
                assert any(p.search(result["why"]) for p in REASONS.values()), result
            else:
                assert result["end"] == "verified", result
                assert result["formats"] and all(not f.startswith("unknown") for f in result["formats"]), result
    print({end: len(found) for end, found in ends.items()})
    assert len(ends.get("verified", [])) >= 15  # the general NVFP4 / FP8 recipes run on a CPU


def test_recipe_names_are_checked_without_torch():
    assert check_recipe_name("general/ptq/nvfp4_default-kv_fp8") is None
    typo = check_recipe_name("general/ptq/nvfp4_defualt-kv_fp8")
    assert typo is not None and "general/ptq/nvfp4_default-kv_fp8" in typo.hint
    fragment = check_recipe_name("huggingface/qwen3_5/ptq/w4a16_nvfp4-fp8_attn-kv_fp8_cast.quant_cfg")
    assert fragment is not None and "fragment" in fragment.message
    assert "huggingface/qwen3_5/ptq/w4a16_nvfp4-fp8_attn-kv_fp8_cast" in fragment.hint
    auto = check_recipe_name("general/auto_quantize/nvfp4_fp8_at_5p4bits")
    assert auto is not None and "auto_quantize:" in auto.hint
    other = check_recipe_name("general/speculative_decoding/eagle3")
    assert other is not None and "not a quantization (PTQ) recipe" in other.message
