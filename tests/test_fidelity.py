"""Held-out fidelity (runner/worker/fidelity.py): KL and top-1 agreement per conversation, pooled over
tokens, with intervals from a bootstrap over conversations (stats.bootstrap_weighted_mean).

Mechanics on a tiny random Llama on the CPU: the intervals hold the point estimate and are seeded,
per-conversation tokens add up, the top-K reduction is exact when K covers the vocabulary and a lower
bound otherwise, the token cap takes whole conversations, and two perturbations of clearly different
size give KL intervals that do not overlap.
"""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest

from conftest import build_tiny_llama
from runner.benchmark.stats import bootstrap_mean, bootstrap_weighted_mean

# --- the ratio bootstrap (pure Python) -------------------------------------------------------------


def test_weighted_bootstrap_holds_the_ratio_and_is_seeded():
    rng = random.Random(1)
    values = [rng.expovariate(10) for _ in range(20)]
    weights = [rng.randrange(50, 2000) for _ in range(20)]
    ratio = sum(v * w for v, w in zip(values, weights, strict=True)) / sum(weights)
    low, high = bootstrap_weighted_mean(values, weights)
    assert low < ratio < high
    assert (low, high) == bootstrap_weighted_mean(values, weights)  # seeded
    assert (low, high) != bootstrap_weighted_mean(values, weights, seed=1)
    # Narrower at 80 % than at 95 %
    low80, high80 = bootstrap_weighted_mean(values, weights, alpha=0.2)
    assert low <= low80 < high80 <= high


def test_weighted_bootstrap_with_equal_weights_is_the_mean_bootstrap():
    values = [0.1, 0.4, 0.2, 0.9, 0.3, 0.05]
    assert bootstrap_weighted_mean(values, [7] * 6) == pytest.approx(bootstrap_mean(values))


def test_weighted_bootstrap_weights_travel_with_their_values():
    # One long conversation with a high value dominates the ratio, and every resample that holds it.
    values, weights = [1.0, 0.0, 0.0, 0.0], [1000, 1, 1, 1]
    low, high = bootstrap_weighted_mean(values, weights)
    assert high > 0.99 and low == 0.0  # a resample without it (a third of them) is 0
    assert bootstrap_weighted_mean([0.25], [10]) == (0.25, 0.25)


@pytest.mark.parametrize(("values", "weights"), [([], []), ([1.0], [0]), ([1.0, 2.0], [1])])
def test_weighted_bootstrap_refuses_what_it_cannot_bootstrap(values, weights):
    with pytest.raises(ValueError):
        bootstrap_weighted_mean(values, weights)


# --- the cap and the held-out set ------------------------------------------------------------------


def test_conversations_within_takes_leading_whole_conversations():
    from runner.worker.fidelity import conversations_within

    assert conversations_within([40, 30, 30, 10], 100) == 3
    assert conversations_within([40, 30, 31, 10], 100) == 2  # the third crosses: it and the rest stay out
    assert conversations_within([500, 10], 100) == 1  # the first always counts (cut at the cap)
    assert conversations_within([], 100) == 0


def test_held_out_set_says_when_the_cap_cut_conversations(monkeypatch):
    from runner.worker import fidelity
    from runner.worker.calib_data import CalibrationSet
    from runner.worker.quantize import held_out_set

    calib = CalibrationSet([[1] * 10], 0, [[2] * 40, [3] * 30, [4] * 50, [5] * 10])
    batches, measured_on = held_out_set(calib, "cpu")
    assert measured_on == "4 held-out conversations of the recipe's calibration set"
    monkeypatch.setattr(fidelity, "MAX_TOKENS", 100)
    batches, measured_on = held_out_set(calib, "cpu")
    assert measured_on == "2 held-out conversations of the recipe's calibration set (the first 2 of 4: 100 tokens at most)"
    assert sorted(int(b["attention_mask"].sum()) for b in batches) == [70]


def test_the_schema_states_the_cap_the_worker_uses():
    from runner.recipe.schema import CalibrationSpec
    from runner.worker.fidelity import MAX_TOKENS

    assert str(MAX_TOKENS) in CalibrationSpec.model_fields["held_out"].description


# --- the benchmark result carries the intervals -----------------------------------------------------


def test_benchmark_results_carry_the_intervals():
    from runner.steps.benchmark import fidelity_to_source

    fidelity = {"kl": 0.02, "top1_agreement": 0.9, "tokens": 900, "kl_interval": [0.015, 0.026],
                "top1_interval": [0.88, 0.92], "conversations": 12, "measured_on": "12 held-out conversations",
                "per_conversation": [{"tokens": 75, "kl": 0.02, "top1_agreement": 0.9}] * 12}
    ctx = SimpleNamespace(step=SimpleNamespace(strategy="fp8"), strategy="fp8",
                          input_record=lambda step: {"summary": {"fidelity": fidelity}})
    assert fidelity_to_source(ctx) == {k: v for k, v in fidelity.items() if k != "per_conversation"}
    old = {"kl": 0.02, "top1_agreement": 0.9, "tokens": 900, "measured_on": "8 held-out conversations"}
    ctx.input_record = lambda step: {"summary": {"fidelity": old}}  # a record from before the intervals
    assert fidelity_to_source(ctx)["kl_interval"] is None


# --- the worker on a tiny model ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(demo_tokenizer, tmp_path_factory):
    """A tiny random Llama whose output head is scaled up, so its next-token distributions are peaked
    like a trained model's (a random head gives near-uniform ones), and 12 held-out conversations."""
    import torch
    from transformers import AutoModelForCausalLM

    from runner.worker.calib_data import pad_batches

    folder = build_tiny_llama(tmp_path_factory.mktemp("tiny-llama") / "model", demo_tokenizer)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(40)
    rng = random.Random(0)
    vocab = model.config.vocab_size
    ids = [[rng.randrange(vocab) for _ in range(rng.randrange(20, 90))] for _ in range(12)]
    return model, pad_batches(ids, 0, 4, torch.device("cpu")), ids


def _perturbed(model, scale: float, seed: int):
    """A copy of the model with every weight moved by Gaussian noise of `scale` x its own spread."""
    import copy

    import torch

    other = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in other.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * scale * float(param.std()))
    return other


def _exact(model_p, model_q, batches) -> list[tuple[int, float, int]]:
    """(tokens, KL sum, agreeing tokens) per conversation from the full distributions, in batch order."""
    import torch

    out = []
    with torch.no_grad():
        for batch in batches:
            p = model_p(**batch).logits.float().log_softmax(-1)
            q = model_q(**batch).logits.float().log_softmax(-1)
            for row in range(p.shape[0]):
                mask = batch["attention_mask"][row].bool()
                pr, qr = p[row][mask], q[row][mask]
                out.append((int(mask.sum()), float((pr.exp() * (pr - qr)).sum(-1).clamp_min(0).sum()),
                            int((pr.argmax(-1) == qr.argmax(-1)).sum())))
    return out


def test_the_model_against_itself_is_exact_and_intervals_are_points(tiny):
    from runner.worker import fidelity

    model, batches, ids = tiny
    source = fidelity.snapshot(model, batches, {})
    assert len(source.conversations) == 12 and source.tokens == sum(len(c) for c in ids)
    _, (same,) = fidelity.measure(model, batches, {}, [source])
    assert same["kl"] == 0 and same["top1_agreement"] == 1
    assert same["kl_interval"] == [0, 0] and same["top1_interval"] == [1, 1]


def test_per_conversation_values_intervals_and_their_seed(tiny):
    from runner.worker import fidelity

    model, batches, ids = tiny
    source = fidelity.snapshot(model, batches, {})
    changed = _perturbed(model, 0.05, seed=1)
    _, (result,) = fidelity.measure(changed, batches, {}, [source])
    per = result["per_conversation"]
    assert result["conversations"] == len(per) == 12
    assert sum(c["tokens"] for c in per) == result["tokens"] == sum(len(c) for c in ids)
    assert sorted(c["tokens"] for c in per) == sorted(len(c) for c in ids)
    # The pooled values are the token-weighted means of the conversations' values.
    assert result["kl"] == pytest.approx(sum(c["kl"] * c["tokens"] for c in per) / result["tokens"], abs=1e-6)
    assert result["top1_agreement"] == pytest.approx(
        sum(c["top1_agreement"] * c["tokens"] for c in per) / result["tokens"], abs=1e-4)
    low, high = result["kl_interval"]
    assert low <= result["kl"] <= high and low < high
    low, high = result["top1_interval"]
    assert low <= result["top1_agreement"] <= high
    assert "conversations_offered" not in result
    # Seeded: the same measurement again gives the same intervals, to the digit.
    _, (again,) = fidelity.measure(changed, batches, {}, [source])
    assert again == result


def test_top_k_is_exact_when_it_covers_the_vocabulary_and_a_lower_bound_otherwise(tiny, monkeypatch):
    from runner.worker import fidelity

    model, batches, _ = tiny
    changed = _perturbed(model, 0.05, seed=1)
    exact = _exact(model, changed, batches)
    tokens = sum(t for t, _, _ in exact)
    kl_exact = sum(k for _, k, _ in exact) / tokens
    reduced = fidelity.measure(changed, batches, {}, [fidelity.snapshot(model, batches, {})])[1][0]
    # Top-1 is exact either way; the default TOP_K misses only how the tail is shared out.
    assert reduced["top1_agreement"] == round(sum(a for _, _, a in exact) / tokens, 4)
    assert 0 < reduced["kl"] <= kl_exact + 1e-6 and 0 < reduced["tail_mass"] < 0.5
    monkeypatch.setattr(fidelity, "TOP_K", model.config.vocab_size)
    full = fidelity.measure(changed, batches, {}, [fidelity.snapshot(model, batches, {})])[1][0]
    assert full["kl"] == pytest.approx(kl_exact, rel=1e-4) and full["tail_mass"] == 0
    assert [c["kl"] for c in full["per_conversation"]] == pytest.approx([k / t for t, k, _ in exact], rel=1e-3)


def test_the_cap_measures_whole_conversations_and_says_how_many(tiny, monkeypatch):
    from runner.worker import fidelity

    model, batches, _ = tiny
    lengths = [int(row.sum()) for b in batches for row in b["attention_mask"]]  # batch order
    monkeypatch.setattr(fidelity, "MAX_TOKENS", lengths[0] + lengths[1] + 1)
    monkeypatch.setattr(fidelity, "CHUNK_TOKENS", 16)  # several chunks a conversation
    source = fidelity.snapshot(model, batches, {})
    assert [c.tokens for c in source.conversations] == lengths[:2]
    _, (result,) = fidelity.measure(_perturbed(model, 0.05, seed=1), batches, {}, [source])
    assert result["conversations"] == 2 and result["conversations_offered"] == 12
    assert result["tokens"] == lengths[0] + lengths[1]
    monkeypatch.setattr(fidelity, "MAX_TOKENS", 10)  # less than one conversation: its first 10 tokens
    assert [c.tokens for c in fidelity.snapshot(model, batches, {}).conversations] == [10]


def test_a_snapshot_of_other_batches_is_refused(tiny):
    from runner.worker import fidelity

    model, batches, _ = tiny
    source = fidelity.snapshot(model, batches[:1], {})
    with pytest.raises(ValueError, match="other batches"):
        fidelity.measure(model, batches, {}, [source])


def test_two_perturbations_of_clearly_different_size_have_apart_kl_intervals(tiny):
    from runner.worker import fidelity

    model, batches, _ = tiny
    source = fidelity.snapshot(model, batches, {})
    _, (small,) = fidelity.measure(_perturbed(model, 0.02, seed=1), batches, {}, [source])
    _, (large,) = fidelity.measure(_perturbed(model, 0.1, seed=2), batches, {}, [source])
    assert small["kl_interval"][1] < large["kl_interval"][0]
    assert small["top1_interval"][0] > large["top1_interval"][1]
