"""What each suite gate can decide at its suite's size, before anything runs (`recipe plan`, `validate`).

Every outcome a suite can produce is judged by the gate code itself (gates.evaluate on synthetic
answers), so the plan and the run cannot disagree. For a stated baseline pass rate r
(`benchmark.suites[].baseline_rate`, 0.9 when not stated):
- an absolute gate: the pass counts that pass and fail it, and the smallest drop of the candidate's
  true rate below r that it fails with 80 % probability;
- a gate relative to the baseline (paired): with the baseline passing round(r x n) prompts and the
  candidate losing each of them independently with some probability (and gaining none), the losses
  that pass and fail it, and the smallest expected drop it fails with 80 % probability.
A gate that no outcome can fail (or pass) is a check that cannot decide, and one whose suite cannot
fail twice the drop its threshold names (NAMED_FACTOR) is too small for its purpose: the plan warns.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from runner.benchmark.gates import evaluate
from runner.benchmark.stats import ALPHA, binomial_pmf, look_alphas, look_sizes, smallest_detectable
from runner.benchmark.suites import suite_size
from runner.errors import RunnerError
from runner.recipe.metrics import Metric
from runner.recipe.schema import Gate, Recipe

ASSUMED_RATE = 0.9
POWER = 0.8
# A drop right at a gate's threshold is failed half the time at best, whatever the size: a suite is
# large enough when it fails NAMED_FACTOR x the drop the gate names with POWER probability.
NAMED_FACTOR = 2.0


@dataclass
class GatePower:
    gate: str
    suite: str
    n: int
    rate: float
    rate_stated: bool
    relative: bool
    passing: list[int]  # absolute: pass counts that pass; relative: losses that pass
    failing: list[int]
    detectable_drop: float | None  # rate points; None: no drop is failed with 80 % probability
    base_passes: int = 0  # relative: the baseline's passes at the stated rate
    fails_at_baseline: float = 0.0  # probability that a candidate exactly as good as the baseline fails
    named_drop: float | None = None  # the regression the gate's threshold names, in rate points
    categories: bool = False  # the suite's items have categories (BFCL, the teacher split), judged one by one

    @property
    def never_fails(self) -> bool:
        return not self.failing

    @property
    def never_passes(self) -> bool:
        return not self.passing

    @property
    def unmeasurable(self) -> bool:
        return self.relative and self.base_passes == 0

    def describe(self) -> str:
        rate = f"baseline rate {self.rate:g}" + ("" if self.rate_stated else " assumed")
        if self.unmeasurable:
            return (f"{self.gate}: n={self.n}, {rate}: the baseline is expected to pass no prompt, so the gate "
                    "cannot measure a regression")
        if self.relative:
            outcomes = (f"with the baseline passing {self.base_passes}/{self.n}, "
                        + (f"passes when the candidate loses <= {max(self.passing)}" if self.passing
                           else "passes for no outcome")
                        + (f", fails when it loses >= {min(self.failing)}" if self.failing else ", fails for none"))
        else:
            outcomes = ((f"passes at >= {min(self.passing)}/{self.n} passing" if self.passing
                         else "passes for no outcome")
                        + (f", fails at <= {max(self.failing)}/{self.n}" if self.failing else ", fails for none"))
        drop = self.detectable_drop
        detect = (f"detects a drop of {drop * 100:.1f} points (to {self.rate - drop:.2f}) with {POWER:.0%} power"
                  if drop is not None else f"no drop is detected with {POWER:.0%} power")
        per_category = ("; not measurable if the baseline passes no item of one of its categories"
                        if self.categories else "")
        return f"{self.gate}: n={self.n}, {rate}: {outcomes}; {detect}{per_category}"

    def warning(self) -> str | None:
        if self.unmeasurable:
            return self.describe()
        if self.never_fails:
            return (f"gate {self.gate} can never fail at n={self.n}: no outcome of {self.suite} fails it; a larger "
                    "suite, or a threshold closer to the baseline, makes it a check")
        if self.never_passes:
            return (f"gate {self.gate} can never pass at n={self.n}: even a candidate that answers exactly as the "
                    f"baseline stays undecided on {self.suite}; add prompts or a margin")
        if self.named_drop and (self.detectable_drop is None
                                or self.detectable_drop > NAMED_FACTOR * self.named_drop + 1e-9):
            found = (f"{self.detectable_drop * 100:.1f} points" if self.detectable_drop is not None else "no drop")
            return (f"gate {self.gate} names a drop of {self.named_drop * 100:.1f} points (baseline rate "
                    f"{self.rate:g}) but at n={self.n} fails only {found} with {POWER:.0%} probability (more than "
                    f"{NAMED_FACTOR:g}x what it names): the suite is too small to catch the regression it is there for")
        if self.fails_at_baseline >= 1 - POWER:
            return (f"gate {self.gate} fails a candidate exactly as good as the baseline (rate {self.rate:g}) with "
                    f"probability {self.fails_at_baseline:.0%} at n={self.n}: state the suite's baseline_rate, or "
                    "loosen the threshold")
        return None

    def to_json(self) -> dict[str, Any]:
        return {"gate": self.gate, "suite": self.suite, "n": self.n, "baseline_rate": self.rate,
                "baseline_rate_stated": self.rate_stated, "relative": self.relative, "passing": self.passing,
                "failing": self.failing, "detectable_drop": self.detectable_drop,
                "fails_at_baseline": round(self.fails_at_baseline, 4), "summary": self.describe(),
                "warning": self.warning()}


def _result(suite: str, passes: list[bool], alpha: float) -> dict[str, Any]:
    passed = sum(passes)
    return {"suites": {suite: {"passed": passed, "failed": len(passes) - passed, "total": len(passes), "alpha": alpha,
                               "pass_rate": passed / len(passes) if passes else 0.0,
                               "items": [{"prompt": f"#{i}", "passed": p} for i, p in enumerate(passes)]}}}


def _verdict(gate: Gate, candidate: list[bool], baseline: list[bool] | None, suite: str, alpha: float) -> str:
    (v,) = evaluate([gate], _result(suite, candidate, alpha),
                    _result(suite, baseline, alpha) if baseline is not None else None)
    return str(v["verdict"])


def gate_power(gate: Gate, n: int, rate: float, rate_stated: bool, alpha: float = ALPHA) -> GatePower:
    """`alpha`: what the last look judges at (stats.look_alphas) when the suite is asked sequentially."""
    suite = Metric.parse(gate.metric).group
    if gate.relative_to == "baseline":
        m = round(rate * n)
        base = [i < m for i in range(n)]
        verdicts = [_verdict(gate, [i < m - lost for i in range(n)], base, suite, alpha) for lost in range(m + 1)]
        fails = [lost for lost, v in enumerate(verdicts) if v == "fail"]

        def fail_probability(drop: float) -> float:
            q = drop / rate if rate else 1.0
            pmf = binomial_pmf(m, min(q, 1.0))
            return sum(pmf[lost] for lost in fails)

        detect = smallest_detectable(fail_probability, rate) if m else None
        named = rate * (1 - gate.threshold_value) + (gate.margin or 0.0)
        return GatePower(gate.name, suite, n, rate, rate_stated, True,
                         [lost for lost, v in enumerate(verdicts) if v == "pass"], fails, detect, m,
                         named_drop=named if gate.op in (">=", ">") and named > 0 else None)
    verdicts = [_verdict(gate, [i < k for i in range(n)], None, suite, alpha) for k in range(n + 1)]
    fails = [k for k, v in enumerate(verdicts) if v == "fail"]

    def fail_probability_abs(drop: float) -> float:
        pmf = binomial_pmf(n, max(rate - drop, 0.0))
        return sum(pmf[k] for k in fails)

    metric = Metric.parse(gate.metric)
    threshold_rate = gate.threshold_value / (1 if metric.name == "pass_rate" else n)
    named = rate - threshold_rate if metric.name != "failed" and gate.op in (">=", ">") else None
    return GatePower(gate.name, suite, n, rate, rate_stated, False,
                     [k for k, v in enumerate(verdicts) if v == "pass"], fails,
                     smallest_detectable(fail_probability_abs, rate), fails_at_baseline=fail_probability_abs(0.0),
                     named_drop=named if named and named > 0 else None)


def recipe_power(recipe: Recipe) -> list[GatePower]:
    """The power of every gate on a suite proportion, at the sizes the recipe asks."""
    refs = {ref.name: ref for ref in recipe.benchmark.suites}
    out = []
    for gate in recipe.gates:
        metric = Metric.parse(gate.metric)
        ref = refs.get(metric.group)
        if ref is None or metric.name not in ("passed", "failed", "pass_rate") or gate.op == "==" and \
                gate.relative_to == "baseline":
            continue
        try:
            n = suite_size(ref, recipe)
        except RunnerError:
            continue  # validate reports the missing suite itself
        rate = ref.baseline_rate if ref.baseline_rate is not None else ASSUMED_RATE
        alpha = look_alphas(look_sizes(n))[-1] if recipe.benchmark.sequential else ALPHA
        power = gate_power(gate, n, rate, ref.baseline_rate is not None, alpha)
        power.categories = bool(ref.bfcl and len(ref.bfcl) > 1) or ref.teacher_eval
        out.append(power)
    return out
