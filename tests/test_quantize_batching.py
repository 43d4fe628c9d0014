"""quantize_model's batching on the CPU: the token budget, what the record says, what calibration gets.

auto_batch_size's CUDA branch runs here against a stand-in for torch.cuda (no GPU on this machine):
it checks the probe's shape and arguments and the arithmetic of the budget. One real ModelOpt run
on a tiny random Qwen3.5 checks the whole path (seconds).
"""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch

from runner.worker import quantize
from runner.worker.calib_data import CalibrationSet

GIB = 2**30


def mixed_calib(samples: int = 40, seed: int = 0, high: int = 200) -> CalibrationSet:
    rng = random.Random(seed)
    return CalibrationSet([[rng.randrange(1, 500) for _ in range(rng.randint(8, high))] for _ in range(samples)], 0)


class ProbeModel:
    """Records the probe forward and 'allocates' bytes_per_token for each token it sees."""

    def __init__(self, cuda: SimpleNamespace, bytes_per_token: int):
        self.cuda, self.bytes_per_token, self.calls = cuda, bytes_per_token, []

    def forward(self, input_ids=None, attention_mask=None, labels=None, use_cache=None, logits_to_keep=0):
        raise AssertionError("called through __call__")

    def __call__(self, **kwargs):
        self.calls.append({**kwargs, "grad": torch.is_grad_enabled()})
        self.cuda.peak = self.cuda.allocated + self.bytes_per_token * kwargs["input_ids"].shape[1]
        return object()


@pytest.fixture
def fake_cuda(monkeypatch):
    state = SimpleNamespace(free=60 * GIB, allocated=18 * GIB, peak=18 * GIB, events=[])
    cuda = SimpleNamespace(
        synchronize=lambda: state.events.append("sync"),
        empty_cache=lambda: state.events.append("empty_cache"),
        mem_get_info=lambda device=None: (state.free, 80 * GIB),
        reset_peak_memory_stats=lambda: setattr(state, "peak", state.allocated),
        memory_allocated=lambda: state.allocated,
        max_memory_allocated=lambda: state.peak,
    )
    monkeypatch.setattr(torch, "cuda", cuda)
    real_full = torch.full
    monkeypatch.setattr(torch, "full", lambda *a, device=None, **k: real_full(*a, **k))
    return state


def test_budget_is_free_memory_share_over_probe_bytes_per_token(fake_cuda):
    calib = mixed_calib()
    model = ProbeModel(fake_cuda, bytes_per_token=256 * 1024)
    budget = quantize.auto_batch_size(model, calib, torch.device("cuda"))
    assert budget == min(calib.longest * len(calib.token_ids), quantize.MAX_TOKEN_BUDGET,
                         int(60 * GIB * 0.5 // (256 * 1024)))
    # Less free memory than the cap needs: the memory decides.
    fake_cuda.free = 2 * GIB
    assert quantize.auto_batch_size(model, calib, torch.device("cuda")) == int(2 * GIB * 0.5 // (256 * 1024))
    call = model.calls[0]
    assert call["input_ids"].shape == (1, calib.longest)
    assert call["use_cache"] is False and call["logits_to_keep"] == 1 and "labels" not in call
    assert call["grad"] is False


def test_budget_for_awq_counts_a_token_double_and_is_clamped(fake_cuda):
    calib = mixed_calib(samples=100, high=2048)
    model = ProbeModel(fake_cuda, bytes_per_token=256 * 1024)
    cuda = torch.device("cuda")
    fake_cuda.free = 24 * GIB  # under the cap either way
    max_budget = quantize.auto_batch_size(model, calib, cuda, algorithm="max")
    awq_budget = quantize.auto_batch_size(model, calib, cuda, algorithm="awq_lite")
    assert max_budget == int(24 * GIB * 0.5 // (256 * 1024)) == 49_152
    assert awq_budget == int(24 * GIB * 0.25 // (256 * 1024)) == max_budget // 2
    fake_cuda.free = 60 * GIB  # more memory than the cap needs: the cap decides (no speed to gain)
    assert quantize.auto_batch_size(model, calib, cuda, algorithm="max") == quantize.MAX_TOKEN_BUDGET
    fake_cuda.free = 24 * GIB
    assert quantize.auto_batch_size(model, calib, cuda, algorithm=None) == max_budget
    fake_cuda.free = GIB // 4  # little memory (a 512-token budget): never below one longest sample
    assert quantize.auto_batch_size(model, calib, cuda) == calib.longest


def test_budget_for_auto_quantize_probes_full_logits_and_gradients(fake_cuda):
    calib = mixed_calib()
    model = ProbeModel(fake_cuda, bytes_per_token=10 * 2**20)
    quantize.auto_batch_size(model, calib, torch.device("cuda"), algorithm="auto_quantize", full_logits=True,
                             grad=True)
    call = model.calls[0]
    assert "logits_to_keep" not in call and call["grad"] is True
    assert call["labels"] is call["input_ids"]


def test_cpu_budget():
    calib = mixed_calib()
    assert quantize.auto_batch_size(None, calib, torch.device("cpu")) == 4096
    small = CalibrationSet([[1] * 10, [2] * 20], 0)
    assert quantize.auto_batch_size(None, small, torch.device("cpu")) == 40


@pytest.fixture
def captured(monkeypatch):
    """quantize_model with ModelOpt's calls replaced by recorders of the batches they get."""
    seen = {}
    monkeypatch.setattr(quantize, "quantize_with_config", lambda model, config, batches: seen.update(
        config=config, batches=batches))
    monkeypatch.setattr(quantize, "quantize_auto", lambda model, batches, spec, exclude, search_state=None: seen.update(
        spec=spec, batches=batches) or {"score": None})
    monkeypatch.setattr("runner.worker.nvfp4_cpu.install_cpu_nvfp4", lambda: None)
    return seen


def test_auto_batches_by_token_budget_and_reports_it(captured):
    calib = mixed_calib()
    result = quantize.quantize_model(None, calib, {"name": "max", "preset": "NVFP4_DEFAULT_CFG"}, ["*x*"],
                                     torch.device("cpu"))
    plan = calib.plan(token_budget=4096)
    assert result["token_budget"] == 4096
    assert result["batches"] == plan.batches == len(captured["batches"])
    assert result["calibration_tokens"] == calib.tokens
    assert result["padding_tokens"] == plan.padding_tokens
    assert 0 <= result["padding_fraction"] <= 0.10
    assert result["batch_size"] == max(b["input_ids"].shape[0] for b in captured["batches"])
    assert sum(int(b["attention_mask"].sum()) for b in captured["batches"]) == calib.tokens
    assert all(b["input_ids"].numel() <= 4096 for b in captured["batches"])
    assert captured["config"]["quant_cfg"][-1] == {"quantizer_name": "*x*", "enable": False}


def test_explicit_batch_size_means_samples(captured):
    calib = mixed_calib()
    result = quantize.quantize_model(None, calib, {"name": "max", "preset": "NVFP4_DEFAULT_CFG", "batch_size": 4},
                                     [], torch.device("cpu"))
    assert result["batch_size"] == 4 and result["token_budget"] is None and result["batches"] == 10
    assert [b["input_ids"].shape[0] for b in captured["batches"]] == [4] * 10
    assert result["padding_tokens"] == calib.plan(batch_size=4).padding_tokens


def test_auto_quantize_gets_the_same_batches_and_counts_steps_in_samples(captured):
    calib = mixed_calib()
    spec = {"formats": ["NVFP4_DEFAULT_CFG"], "effective_bits": 6.0, "method": "kl_div",
            "num_calib_steps": 1000, "num_score_steps": 7}
    result = quantize.quantize_model(None, calib, {"name": "aq", "auto_quantize": spec}, [], torch.device("cpu"))
    plan = calib.plan(token_budget=4096)
    expected = calib.build(plan, "cpu")
    assert result["auto_quantize"] == {"score": None}
    assert [b["input_ids"].tolist() for b in captured["batches"]] == [b["input_ids"].tolist() for b in expected]
    # ModelOpt gets batches: all of them for calibration, the fewest leading ones holding 7 samples to score.
    score = captured["spec"].num_score_steps
    assert captured["spec"].num_calib_steps == plan.batches
    assert sum(len(g) for g in plan.groups[:score]) >= 7 > sum(len(g) for g in plan.groups[:score - 1])


def test_tiny_qwen35_max_on_cpu():
    """The real path: ModelOpt max calibration of a tiny random Qwen3.5 with token-budget batches."""
    pytest.importorskip("modelopt")
    from transformers import Qwen3_5ForCausalLM, Qwen3_5TextConfig

    config = Qwen3_5TextConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=32, linear_num_key_heads=1, linear_num_value_heads=2,
        linear_key_head_dim=32, linear_value_head_dim=32, layer_types=["linear_attention", "full_attention"],
        architectures=["Qwen3_5ForCausalLM"], tie_word_embeddings=False)
    torch.manual_seed(0)
    model = Qwen3_5ForCausalLM(config).to(torch.bfloat16).eval()
    calib = mixed_calib(samples=12, high=64)
    result = quantize.quantize_model(model, calib, {"name": "max", "preset": "NVFP4_DEFAULT_CFG"},
                                     ["*linear_attn*"], torch.device("cpu"))
    assert result["token_budget"] == calib.longest * len(calib.token_ids)  # under the CPU default: all at once
    assert result["calibration_tokens"] == calib.tokens and result["padding_fraction"] <= 0.10
    amaxes = [m.amax for n, m in model.named_modules() if n.endswith("mlp.down_proj.weight_quantizer")]
    assert amaxes and all(a is not None for a in amaxes)
