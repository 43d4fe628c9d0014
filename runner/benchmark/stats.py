"""The statistics behind the gates: one-sample and paired intervals, McNemar's exact test, a paired
bootstrap, and the power a gate has at its sample size. Pure Python (the host side imports no numpy).

- A suite proportion on its own: the Wilson score interval (sensible at n = 5 and at 0 or n successes).
- A candidate against the baseline on the same items (paired): both answered every prompt, so what
  matters is which prompts flipped. Counts: `both` passed, `lost` (baseline passed, candidate failed),
  `gained` (candidate passed, baseline failed), `neither`. The interval of `p_candidate - k x p_baseline`
  is Newcombe's method 10 (1998: Wilson intervals of both margins combined with their correlation,
  MOVER), which for k = 1 is the standard interval of a paired difference; McNemar's exact test (the
  discordant prompts, binomial 1/2) says whether the flips lean one way at all.
- Per-item scores (KL per conversation, partial credit): a paired percentile bootstrap of the mean.
- A token-weighted mean over conversations (held-out KL and top-1 agreement, pooled over tokens): a
  percentile bootstrap over conversations of the ratio sum(value x tokens) / sum(tokens), since tokens
  of one conversation are not independent of each other.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from statistics import NormalDist

ALPHA = 0.05  # two-sided 95 %


def z_of(alpha: float) -> float:
    """The two-sided normal quantile: 1.96 for alpha = 0.05."""
    return NormalDist().inv_cdf(1 - alpha / 2)


def wilson(successes: int, n: int, alpha: float = ALPHA) -> tuple[float, float]:
    """The Wilson score interval of a proportion."""
    if n <= 0:
        return 0.0, 1.0
    z = z_of(alpha)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # Exactly 0 and 1 at the ends (rounding leaves 1e-17), so "0 of n" never reads as above zero.
    return (0.0 if successes == 0 else max(0.0, centre - half)), (1.0 if successes == n else min(1.0, centre + half))


@dataclass(frozen=True)
class Paired:
    """Two models' pass/fail on the same items."""

    both: int
    lost: int  # the baseline passed, the candidate failed
    gained: int  # the candidate passed, the baseline failed
    neither: int

    @property
    def n(self) -> int:
        return self.both + self.lost + self.gained + self.neither

    @property
    def candidate(self) -> int:
        return self.both + self.gained

    @property
    def baseline(self) -> int:
        return self.both + self.lost

    @classmethod
    def of(cls, candidate: Sequence[bool], baseline: Sequence[bool]) -> Paired:
        pairs = list(zip(candidate, baseline, strict=True))
        return cls(sum(c and b for c, b in pairs), sum(b and not c for c, b in pairs),
                   sum(c and not b for c, b in pairs), sum(not c and not b for c, b in pairs))

    def correlation(self) -> float:
        """The phi coefficient of the two models' outcomes, with Newcombe's continuity adjustment of a
        positive numerator (n/2), 0 where a margin is constant."""
        a, b, c, d = self.both, self.gained, self.lost, self.neither
        denom = (a + b) * (c + d) * (a + c) * (b + d)
        if denom == 0:
            return 0.0
        num = a * d - b * c
        if num > 0:
            num = max(num - self.n / 2, 0.0)
        return num / math.sqrt(denom)

    def interval(self, factor: float = 1.0, alpha: float = ALPHA) -> tuple[float, float]:
        """The interval of `p_candidate - factor x p_baseline` (MOVER with the correlation)."""
        n = self.n
        p1, p2 = self.candidate / n, self.baseline / n
        l1, u1 = wilson(self.candidate, n, alpha)
        l2, u2 = wilson(self.baseline, n, alpha)
        phi = self.correlation()
        diff = p1 - factor * p2
        dl1, du1, dl2, du2 = p1 - l1, u1 - p1, factor * (p2 - l2), factor * (u2 - p2)
        low = diff - math.sqrt(max(dl1 ** 2 - 2 * phi * dl1 * du2 + du2 ** 2, 0.0))
        high = diff + math.sqrt(max(du1 ** 2 - 2 * phi * du1 * dl2 + dl2 ** 2, 0.0))
        return max(low, -factor), min(high, 1.0)

    def mcnemar_p(self) -> float:
        """McNemar's exact two-sided p-value: do the flips lean one way? 1.0 without any flip."""
        m, k = self.lost + self.gained, min(self.lost, self.gained)
        if m == 0:
            return 1.0
        tail = sum(math.comb(m, i) for i in range(k + 1)) / 2 ** m
        return min(1.0, 2 * tail)


def bootstrap_mean(values: Sequence[float], alpha: float = ALPHA, reps: int = 2000, seed: int = 0
                   ) -> tuple[float, float]:
    """Percentile bootstrap interval of a mean (of per-item differences, for paired scores); the items
    are resampled, so a paired difference keeps its pairing. Seeded: the same data, the same interval."""
    n = len(values)
    if n == 0:
        raise ValueError("no values to bootstrap")
    rng = random.Random(seed)
    means = sorted(sum(values[rng.randrange(n)] for _ in range(n)) / n for _ in range(reps))
    lo = means[max(0, math.floor(alpha / 2 * reps))]
    hi = means[min(reps - 1, math.ceil((1 - alpha / 2) * reps) - 1)]
    return lo, hi


def bootstrap_weighted_mean(values: Sequence[float], weights: Sequence[float], alpha: float = ALPHA,
                            reps: int = 2000, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the weighted mean sum(v_i w_i) / sum(w_i) (a ratio estimator):
    items are resampled with replacement and the ratio recomputed, so an item's weight (a conversation's
    tokens) travels with its value. Seeded: the same data, the same interval. Weights must be positive."""
    n = len(values)
    if n == 0:
        raise ValueError("no values to bootstrap")
    if len(weights) != n:
        raise ValueError(f"{n} values but {len(weights)} weights")
    if any(w <= 0 for w in weights):
        raise ValueError("weights must be positive")
    weighted = [v * w for v, w in zip(values, weights, strict=True)]
    rng = random.Random(seed)
    ratios = []
    for _ in range(reps):
        picks = [rng.randrange(n) for _ in range(n)]
        ratios.append(sum(weighted[i] for i in picks) / sum(weights[i] for i in picks))
    ratios.sort()
    lo = ratios[max(0, math.floor(alpha / 2 * reps))]
    hi = ratios[min(reps - 1, math.ceil((1 - alpha / 2) * reps) - 1)]
    return lo, hi


def binomial_pmf(n: int, p: float) -> list[float]:
    """P(X = k) for k = 0..n, X ~ Binomial(n, p)."""
    if p <= 0:
        return [1.0] + [0.0] * n
    if p >= 1:
        return [0.0] * n + [1.0]
    return [math.comb(n, k) * p ** k * (1 - p) ** (n - k) for k in range(n + 1)]


def smallest_detectable(fail_probability: Callable[[float], float], top: float, power: float = 0.8,
                        step: float = 0.005) -> float | None:
    """The smallest regression (in rate points, 0..top) that is failed with at least `power`; None when
    even the largest possible regression is not."""
    steps = int(round(top / step))
    for i in range(1, steps + 1):
        drop = i * step
        if fail_probability(drop) >= power:
            return round(drop, 4)
    return None


# --- sequential looks -------------------------------------------------------------------------------
#
# A suite is asked in looks (a quarter, half, then all of its items) and stops as soon as every gate
# that reads it is decided. Each look spends part of the error budget by an O'Brien-Fleming-shaped
# spending function, alpha(t) = 2 - 2 Phi(z_{alpha/2} / sqrt(t)) at information fraction t, and judges
# its intervals at the increment alpha(t_k) - alpha(t_{k-1}). The increments sum to alpha, so by the
# union bound the chance that any look decides wrongly is at most alpha whatever the looks' correlation
# (conservative, and exact enough: the last look of three judges at 0.0444 instead of 0.05). Early
# looks spend almost nothing, so only clear cases stop there.

MIN_LOOK = 20  # items between looks: fewer and a look cannot decide anything that the next would not


def look_sizes(n: int, fractions: Sequence[float] = (0.25, 0.5, 1.0)) -> list[int]:
    """The item counts at which a suite of n items is judged: fractions of n at least MIN_LOOK apart,
    always ending at n."""
    sizes: list[int] = []
    for fraction in fractions:
        size = max(1, round(n * fraction))
        if size >= n:
            break
        if size - (sizes[-1] if sizes else 0) >= MIN_LOOK and n - size >= MIN_LOOK:
            sizes.append(size)
    return [*sizes, n]


def spending(t: float, alpha: float = ALPHA) -> float:
    """The O'Brien-Fleming-shaped alpha spent by information fraction t (0 < t <= 1)."""
    if t >= 1:
        return alpha
    return 2 - 2 * NormalDist().cdf(z_of(alpha) / math.sqrt(t))


def look_alphas(sizes: Sequence[int], alpha: float = ALPHA) -> list[float]:
    """The alpha each look judges at: the increments of the spending function, summing to alpha."""
    n = sizes[-1]
    spent = [spending(size / n, alpha) for size in sizes]
    return [spent[0], *(b - a for a, b in zip(spent, spent[1:], strict=False))]
