"""Token-budget calibration batching (calib_data): pure Python and CPU torch, no model.

The plan's mix: 512 conversations of 64 to 2048 tokens. Batches bounded by rows x padded width must
waste at most 10 % of the computed tokens on padding, use every sample once, run longest first, and
build tensors that match the statistics the record reports.
"""

from __future__ import annotations

import random

import pytest
import torch

from runner.worker.calib_data import (
    MAX_PADDING,
    MAX_WIDTHS,
    BatchPlan,
    CalibrationSet,
    batch_overhead_tokens,
    build_batches,
    pad_batches,
    plan_fixed_batches,
    plan_token_batches,
)


def plan_mix(samples: int = 512, seed: int = 0, low: int = 64, high: int = 2048) -> list[int]:
    rng = random.Random(seed)
    return [rng.randint(low, high) for _ in range(samples)]


def calib_of(lengths: list[int], seed: int = 1) -> CalibrationSet:
    rng = random.Random(seed)
    return CalibrationSet([[rng.randrange(1, 50_000) for _ in range(n)] for n in lengths], pad_id=0)


def check_plan(plan: BatchPlan, lengths: list[int], budget: int) -> None:
    flat = [i for group in plan.groups for i in group]
    assert sorted(flat) == list(range(len(lengths))), "every sample exactly once"
    for group in plan.groups:
        assert len(group) >= 1
        assert len(group) == 1 or len(group) * plan.width(group) <= budget, "over budget with more than one sample"
        assert [lengths[i] for i in group] == sorted((lengths[i] for i in group), reverse=True)
    widths = [plan.width(group) for group in plan.groups]
    assert widths == sorted(widths, reverse=True), "batches run longest first"
    assert widths[0] == max(lengths)
    assert plan.real_tokens == sum(lengths)
    assert plan.computed_tokens == sum(len(g) * plan.width(g) for g in plan.groups)
    assert plan.padding_tokens == plan.computed_tokens - plan.real_tokens
    assert plan.padding_fraction == pytest.approx(plan.padding_tokens / plan.computed_tokens)


@pytest.mark.parametrize("budget", [16_384, 32_768, 65_536, 131_072, 262_144])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_plan_mix_pads_at_most_ten_percent(budget, seed):
    lengths = plan_mix(seed=seed)
    plan = plan_token_batches(lengths, budget)
    check_plan(plan, lengths, budget)
    assert plan.padding_fraction <= MAX_PADDING <= 0.10
    # Not one batch a sample: the batches are real batches.
    assert plan.batches <= 64 and plan.max_rows >= 16


def test_plan_mix_at_32k_summary():
    lengths = plan_mix()
    plan = plan_token_batches(lengths, 32_768)
    summary = plan.summary()
    assert summary["calibration_tokens"] == sum(lengths)
    assert summary["padding_tokens"] == plan.padding_tokens
    assert summary["padding_fraction"] <= 0.10
    assert summary["batches"] == len(plan.groups)
    assert summary["batch_size"] == max(len(g) for g in plan.groups)
    assert summary["token_budget"] == 32_768
    # Few shapes: the forwards meet at most MAX_WIDTHS sequence widths, each a bucket's longest sample.
    assert summary["batch_widths"] == len(plan.widths) <= MAX_WIDTHS
    assert len(plan.widths) < len(set(lengths)) / 10


def test_128_sample_mix_at_large_budgets_stays_under_ten_percent():
    """The bench's mixed set: one big batch would pad ~45 %; the plan keeps it under 10 %."""
    lengths = plan_mix(samples=128, seed=3)
    for budget in (131_072, 10**6):
        plan = plan_token_batches(lengths, budget)
        check_plan(plan, lengths, budget)
        assert plan.padding_fraction <= 0.10
        assert plan.batches <= 16


def test_tensors_match_the_statistics():
    lengths = plan_mix(samples=96, seed=4, high=700)
    calib = calib_of(lengths)
    plan = calib.plan(token_budget=8192)
    check_plan(plan, lengths, 8192)
    batches = calib.build(plan, torch.device("cpu"))
    assert len(batches) == plan.batches
    assert sum(int(b["attention_mask"].sum()) for b in batches) == plan.real_tokens == calib.tokens
    assert sum(b["input_ids"].numel() for b in batches) == plan.computed_tokens
    seen = []
    for batch, group in zip(batches, plan.groups, strict=True):
        ids, mask = batch["input_ids"], batch["attention_mask"]
        assert ids.shape == mask.shape == (len(group), plan.width(group))
        assert ids.dtype == mask.dtype == torch.long
        assert ids.numel() <= 8192 or len(group) == 1
        for row, index in enumerate(group):
            n = lengths[index]
            assert ids[row, :n].tolist() == calib.token_ids[index]  # right-padded, in order
            assert mask[row, :n].all() and not mask[row, n:].any()
            assert (ids[row, n:] == calib.pad_id).all()
            seen.append(ids[row, :n].tolist())
    assert sorted(seen) == sorted(calib.token_ids)


def test_sample_longer_than_budget_runs_alone_and_first():
    lengths = [3000, 100, 120, 2500, 90, 110]
    plan = plan_token_batches(lengths, 1000)
    check_plan(plan, lengths, 1000)
    assert plan.groups[0] == (0,) and plan.groups[1] == (3,)
    assert all(len(g) * plan.width(g) <= 1000 for g in plan.groups[2:])


def test_equal_lengths_fill_the_budget_without_padding():
    plan = plan_token_batches([512] * 64, 32_768)
    assert plan.batches == 1 and plan.max_rows == 64 and plan.padding_tokens == 0
    plan = plan_token_batches([512] * 64, 8192)
    assert plan.batches == 4 and plan.padding_tokens == 0
    assert all(len(g) * 512 <= 8192 for g in plan.groups)


def test_padding_cap_is_a_parameter():
    lengths = plan_mix(samples=200, seed=5)
    strict = plan_token_batches(lengths, 65_536, max_padding=0.02)
    loose = plan_token_batches(lengths, 65_536, max_padding=0.10)
    assert strict.padding_fraction <= 0.02 and loose.padding_fraction <= 0.10
    assert strict.batches > loose.batches


def test_fixed_batch_size_is_the_old_behaviour():
    lengths = plan_mix(samples=50, seed=6)
    calib = calib_of(lengths)
    batches = calib.batches(8, "cpu")
    assert [b["input_ids"].shape[0] for b in batches] == [8] * 6 + [2]
    order = sorted(range(len(lengths)), key=lambda i: lengths[i], reverse=True)
    assert [b["input_ids"].shape[1] for b in batches] == [lengths[order[s]] for s in range(0, 50, 8)]
    assert calib.plan(batch_size=8).token_budget is None
    assert sum(int(b["attention_mask"].sum()) for b in pad_batches(calib.token_ids, 0, 8, "cpu")) == calib.tokens
    assert calib.held_out_batches(4, "cpu") == []


def test_plan_arguments_are_checked():
    calib = calib_of([10, 20])
    with pytest.raises(ValueError):
        calib.plan()
    with pytest.raises(ValueError):
        calib.plan(token_budget=100, batch_size=2)
    with pytest.raises(ValueError):
        plan_token_batches([10], 0)
    with pytest.raises(ValueError):
        build_batches([[1, 2]], 0, plan_fixed_batches([2, 3], 1), "cpu")


def test_awq_plans_fewer_batches_within_the_cap():
    """AWQ's per-batch weight work makes a batch dearer: fewer batches, padding still capped."""
    rng = random.Random(0)
    lengths = [rng.randint(64, 2048) for _ in range(128)]
    max_plan = plan_token_batches(lengths, 200_000, batch_overhead=batch_overhead_tokens(None))
    awq_plan = plan_token_batches(lengths, 200_000, batch_overhead=batch_overhead_tokens("awq_lite"))
    assert awq_plan.batches <= max_plan.batches
    assert max_plan.padding_fraction <= MAX_PADDING and awq_plan.padding_fraction <= MAX_PADDING


def test_batches_covering_counts_samples():
    plan = BatchPlan((5, 4, 3, 2, 1), ((0, 1), (2,), (3, 4)), 10)
    assert [plan.batches_covering(n) for n in (1, 2, 3, 4, 5, 99)] == [1, 1, 2, 3, 3, 3]


@pytest.mark.parametrize("samples", [32, 128, 512, 2048])
def test_few_widths_for_many_lengths(samples):
    """A mixed set pads to the fewest widths that hold the cap (each new width costs the DeltaNet
    kernels a compile): fewer widths than the cap allows would pad more than 10 %."""
    lengths = plan_mix(samples=samples, seed=3)
    plan = plan_token_batches(lengths, 65_536)
    check_plan(plan, lengths, 65_536)
    assert plan.padding_fraction <= MAX_PADDING
    assert len(plan.widths) <= 10
    # Every batch is padded to one of the widths, and each width is some sample's length.
    assert {plan.width(g) for g in plan.groups} == set(plan.widths) <= set(lengths)
    fewer = plan_token_batches(lengths, 65_536, max_widths=len(plan.widths) - 1) if len(plan.widths) > 1 else None
    if fewer is not None:  # one width less does not hold the cap: it falls back to every length
        assert len(fewer.widths) > len(plan.widths)


def test_padding_counts_the_bucket_width():
    """A batch of a bucket's shorter samples is still padded to the bucket's width: the record counts that."""
    plan = plan_token_batches([100, 96, 95, 94], 200, max_padding=0.10)
    assert plan.widths == [100]
    calib = calib_of([100, 96, 95, 94])
    batches = calib.build(plan, "cpu")
    assert [b["input_ids"].shape for b in batches] == [torch.Size([2, 100])] * 2
    assert plan.computed_tokens == 400 and plan.padding_tokens == 400 - 385
