"""Where the quantize worker puts a model: one GPU, spread over the allocation, or a clear refusal."""

from __future__ import annotations

import pytest

from runner.worker.placement import GIB, DoesNotFit, choose, headroom


def test_a_model_that_fits_one_gpu_with_headroom_stays_on_it():
    place = choose(20 * GIB, [140 * GIB, 140 * GIB])
    assert place.mode == "single" and place.max_memory == {}


def test_a_model_larger_than_one_gpu_is_spread_with_headroom_kept_on_each():
    # The Qwen3-Next-80B-A3B shape on two H200s (bench/multi_gpu_quantize.py measured the same split).
    model, free = 159_350_000_000, [149_600_000_000] * 2
    place = choose(model, free)
    assert place.mode == "spread"
    assert model + headroom(model) > free[0]  # one would not do
    assert sum(place.max_memory.values()) >= model
    assert all(limit <= f - 6 * GIB for limit, f in zip(place.max_memory.values(), free, strict=True))
    assert place.summary()["max_memory_gb"] == {"0": 137.6, "1": 137.6}


def test_a_model_too_large_for_the_allocation_is_refused_with_the_numbers():
    with pytest.raises(DoesNotFit) as info:
        choose(400 * GIB, [140 * GIB, 140 * GIB])
    message = str(info.value)
    assert "2 GPU(s)" in message and "ask for more GPUs" in message


def test_no_gpu_means_the_cpu():
    assert choose(GIB, []).mode == "cpu"
