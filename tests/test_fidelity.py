"""Held-out fidelity: the bootstrap over conversations of a token-weighted mean (stats.bootstrap_weighted_mean)."""

from __future__ import annotations

import random

import pytest

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
