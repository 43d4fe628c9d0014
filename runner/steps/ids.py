"""Step ids: the one place that spells them.

A kind that runs once has its own name as id (`source`, `gates`); a kind that runs once per strategy
has `KIND.STRATEGY` (`quantize.awq_lite`); the baseline's benchmark is `benchmark.baseline`, an
alternative calibration set's step `calibrate.NAME`. Code builds ids with these helpers and reads
them back with `strategy_of`, never by hand.
"""

from __future__ import annotations

SOURCE = "source"
CALIBRATE = "calibrate"
GATES = "gates"
REPORT = "report"
PUBLISH = "publish"
BASELINE = "baseline"  # the benchmark of the source model or the user's endpoint


def calibrate(alternative: str | None = None) -> str:
    """The step that makes a calibration set: `calibrate`, or `calibrate.NAME` for an alternative."""
    return CALIBRATE if alternative is None else f"{CALIBRATE}.{alternative}"


def quantize(strategy: str) -> str:
    return f"quantize.{strategy}"


def score(settings: str) -> str:
    """auto_quantize's shared scoring: `score.<hash of its settings>` (runner/plan.py), one per distinct setting."""
    return f"score.{settings}"


def export(strategy: str) -> str:
    return f"export.{strategy}"


def verify(strategy: str) -> str:
    return f"verify.{strategy}"


def serve(strategy: str) -> str:
    return f"serve.{strategy}"


def benchmark(strategy: str) -> str:
    """A strategy's benchmark step; `benchmark(BASELINE)` is the baseline's."""
    return f"benchmark.{strategy}"


BASELINE_BENCHMARK = benchmark(BASELINE)


def strategy_of(step_id: str) -> str:
    """The strategy (or `baseline`, or an alternative's name) an id names after its kind."""
    return step_id.partition(".")[2]
