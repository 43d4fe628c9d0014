"""Quality gates per strategy and the selection of the best one (tables and plots: presentation.py).

A metric is `SUITE.passed|failed|total|pass_rate`, `speed.NAME` (from the shortest prompt of the
sweep at the first concurrency level), `size.bytes|gb` or `kl.kl|top1_agreement`. A gate relative
to the baseline compares the metric with `value x the baseline's metric`, less (or, for `<=`, plus)
its `margin` in rate units: `margin: 0.05` with `value: 1` is the field's "no worse than the
baseline by more than 5 points".

Suites are samples, so every suite gate is judged on a 95 % interval (runner/benchmark/stats.py):
- against the baseline, on the same prompts (paired): the interval of `candidate - value x baseline`
  from which prompts flipped (Newcombe's paired method), with McNemar's exact p-value of the flips;
- absolute: the Wilson interval of the candidate's rate against the threshold.
"pass" when the whole interval is on the right side of the threshold, "fail" when it is all on the
wrong side, "inconclusive" when it straddles (too few prompts to tell), and "not measurable" when
the suite cannot show the regression at all: the baseline itself scored at the gate's worst end
(0 of 10 tool calls parsed), so there is nothing to lose. A candidate every gate passes is
*proven*; one whose gates only failed to decide is *unproven*, ranked after every proven one and
selected only with `selection.accept_unproven: true`. `==` gates, speed and size are compared as
measured, except a relative speed gate of a candidate measured interleaved with the baseline
(speed.paired_baseline): it judges the per-pair ratios, "inconclusive" when they disagree.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any

from runner.benchmark.stats import ALPHA, Paired, wilson
from runner.recipe.metrics import Metric
from runner.recipe.schema import Gate, Preference

OPS = {"<": operator.lt, "<=": operator.le, "==": operator.eq, ">=": operator.ge, ">": operator.gt}
VERDICTS = ("pass", "fail", "inconclusive", "not_measurable", "missing")
UNDECIDED = ("inconclusive", "not_measurable")  # a candidate with these (and no failure) is unproven


def judge(op: str, value: float, threshold: float, interval: tuple[float, float] | None) -> str:
    """pass / fail / inconclusive; a measured value without an interval is judged as it is."""
    if interval is None:
        return "pass" if OPS[op](value, threshold) else "fail"
    low, high = interval
    eps = 1e-12
    sure = {">=": low >= -eps, ">": low > eps, "<=": high <= eps, "<": high < -eps}[op]
    wrong = {">=": high < -eps, ">": high <= eps, "<=": low > eps, "<": low >= -eps}[op]
    return "pass" if sure else "fail" if wrong else "inconclusive"


def _paired_ratio(metric: Metric, result: dict[str, Any]) -> tuple[float, dict[str, Any]] | None:
    """(the baseline's value, the candidate/baseline ratio's median, min, max and pairs) where the
    candidate's speed was measured interleaved with the baseline (speed.paired_baseline)."""
    paired = (result.get("speed") or {}).get("paired_baseline")
    if metric.group != "speed" or not paired:
        return None
    base = paired["summary"].get(metric.name)
    ratio = (paired.get("ratios") or {}).get(metric.name)
    if not isinstance(base, (int, float)) or not ratio:
        return None
    return float(base), {**ratio, "pairs": paired.get("pairs")}


def judge_spread(op: str, factor: float, spread: dict[str, Any]) -> str:
    """A relative speed gate on per-pair ratios: pass when every pair is on the right side of the
    factor, fail when none is, inconclusive when the pairs disagree (the machine's noise decides)."""
    if op == "==":
        return "pass" if spread["median"] == factor else "fail"
    ends = [OPS[op](spread["min"], factor), OPS[op](spread["max"], factor)]
    return "pass" if all(ends) else "fail" if not any(ends) else "inconclusive"


# Per-pair decode ratios (candidate / baseline, measured alternating) further apart than this factor
# disagree: whatever slowed the machine hit some requests and not others, so no single figure stands.
PAIR_SPREAD_LIMIT = 2.0


def speed_reliability(result: dict[str, Any], verdicts: Sequence[dict[str, Any]] = ()) -> dict[str, Any]:
    """A candidate's measured decode speed and whether the documents may print it as a figure.

    Unreliable when a relative speed gate judged on the pairs is inconclusive (the pairs disagree
    about the gate), or when the per-pair ratios span more than PAIR_SPREAD_LIMIT. Without paired
    measurement there is nothing to tell, and the figure stands as measured."""
    speed = result.get("speed") or {}
    value = (speed.get("summary") or {}).get("decode_tok_s")
    paired = speed.get("paired_baseline") or {}
    ratio = (paired.get("ratios") or {}).get("decode_tok_s")
    why = []
    for v in verdicts:
        if v.get("paired") and v.get("verdict") == "inconclusive":
            why.append(f"the pairs disagree on gate {v['gate']}")
    if ratio and ratio.get("min") and ratio["max"] / ratio["min"] > PAIR_SPREAD_LIMIT:
        why.append(f"the per-pair ratios span more than x{PAIR_SPREAD_LIMIT:g}")
    return {"value": value, "ratio": ratio, "pairs": paired.get("pairs"), "reliable": not why, "why": why}


def _kl_interval(metric: Metric, result: dict[str, Any]) -> tuple[float, float] | None:
    """The bootstrap interval (over held-out conversations) of a `kl.*` metric, where the worker measured one."""
    if metric.group != "kl":
        return None
    key = {"kl": "kl_interval", "top1_agreement": "top1_interval"}.get(metric.name)
    interval = (result.get("kl") or {}).get(key) if key else None
    return (float(interval[0]), float(interval[1])) if isinstance(interval, list) and len(interval) == 2 else None


def _worst_end(op: str, count: int, n: int) -> bool:
    """Whether a rate sits at the end a gate guards against: nothing passed for a `>=` gate, everything
    for a `<=` gate (on `failed`: every item failed). A baseline there leaves nothing to lose."""
    return count == 0 if op in (">=", ">") else count == n if op in ("<=", "<") else False


def _other_form(metric: Metric, baseline: dict[str, Any] | None) -> str:
    other = ((baseline or {}).get("suites") or {}).get(metric.group, {}).get("other_form_calls")
    return (f" ({other} of its replies hold a tool call in another form, a bare or fenced JSON object, that the "
            "server's tool-call parser does not read: a format mismatch between the model and the parser)"
            if other else "")


def _floor_reason(metric: Metric, count: int, n: int, baseline: dict[str, Any] | None) -> str:
    """Why a gate is not measurable, with the replies that called a tool in a form the parser does not read."""
    return (f"the baseline itself scored {count}/{n} on {metric}: the suite cannot show a regression from there"
            + _other_form(metric, baseline))


def _category_floor_reason(gate: Gate, metric: Metric, baseline: dict[str, Any] | None) -> str | None:
    """Why a gate on a suite with categories (BFCL, the teacher split) is not measurable: the baseline sits
    at the guarded end in some category. The pooled rate would hide it: a model that never calls a tool
    keeps every irrelevance item, loses nothing where the baseline had nothing, and passes. None when every
    category can show a regression."""
    per_category = metric.category_samples(baseline or {})
    stuck = {c: s for c, s in per_category.items() if _worst_end(gate.op, *s)}
    if len(per_category) < 2 or not stuck:
        return None
    listed = ", ".join(f"{count}/{n} on {c}" for c, (count, n) in sorted(stuck.items()))
    keep = sorted(set(per_category) - set(stuck))
    is_bfcl = "bfcl_version" in ((baseline or {}).get("suites") or {}).get(metric.group, {})
    return (f"the baseline itself scored {listed} of {metric.group}: the suite cannot show a regression in "
            f"{'that category' if len(stuck) == 1 else 'those categories'}, and the pooled rate would hide one "
            "(a candidate that lost them entirely would score the same)" + _other_form(metric, baseline)
            + ("; fix the model's tool-call format or the serving parser"
               + (f", or ask only what the baseline can do (`bfcl: [{', '.join(keep)}]`)" if keep and is_bfcl else "")))


def _suite_verdict(gate: Gate, metric: Metric, result: dict[str, Any], baseline: dict[str, Any] | None
                   ) -> dict[str, Any]:
    """A gate on a suite proportion: paired with the baseline's answers to the same prompts when relative,
    the candidate's Wilson interval when absolute."""
    op, declared = gate.op, gate.threshold_value
    sample = metric.sample(result)
    assert sample is not None
    count, n, is_rate = sample
    scale = 1 if is_rate else n  # metric units per rate unit
    # A suite asked in sequential looks is judged at the alpha its last look spent (stats.look_alphas).
    alpha = float(((result.get("suites") or {}).get(metric.group) or {}).get("alpha") or ALPHA)
    low, high = wilson(count, n, alpha)
    out: dict[str, Any] = {"n": n, "interval": [round(low * scale, 4), round(high * scale, 4)], "alpha": alpha}
    base_sample = metric.sample(baseline) if baseline else None
    if base_sample is not None and _worst_end(op, base_sample[0], base_sample[1]):
        return out | {"verdict": "not_measurable", "reason": _floor_reason(metric, base_sample[0], base_sample[1],
                                                                           baseline)}
    if reason := _category_floor_reason(gate, metric, baseline):
        return out | {"verdict": "not_measurable", "reason": reason}
    if gate.relative_to == "absolute":
        t = declared / scale
        diff = (low - t, high - t)
        return out | {"threshold": declared, "difference": [round(d, 4) for d in diff],
                      "verdict": judge(op, count / n, t, diff)}
    mine, theirs = metric.outcomes(result), metric.outcomes(baseline or {})
    common = [k for k in (mine or {}) if k in (theirs or {})]
    if not common:
        return out | {"verdict": "missing", "reason": "the baseline answered none of the candidate's prompts"}
    pairs = Paired.of([mine[k] for k in common], [theirs[k] for k in common])  # type: ignore[index]
    if _worst_end(op, pairs.baseline, pairs.n):
        return out | {"verdict": "not_measurable", "reason": _floor_reason(metric, pairs.baseline, pairs.n, baseline)}
    lo, hi = pairs.interval(declared, alpha)
    slack = (gate.margin or 0.0) * (1 if op in (">=", ">") else -1)
    diff = (lo + slack, hi + slack)  # the interval of `candidate - threshold`, in rate units
    base_rate = pairs.baseline / pairs.n
    threshold = (declared * base_rate - slack) * scale
    verdict = judge(op, 0.0, 0.0, diff)
    return out | {
        "n": pairs.n, "threshold": round(threshold, 4), "baseline": round(base_rate * scale, 4),
        "difference": [round(d, 4) for d in diff], "verdict": verdict,
        "flips": {"n": pairs.n, "candidate": pairs.candidate, "baseline": pairs.baseline, "lost": pairs.lost,
                  "gained": pairs.gained, "mcnemar_p": round(pairs.mcnemar_p(), 4),
                  "difference": [round(lo, 4), round(hi, 4)],
                  "recovery": round(pairs.candidate / pairs.baseline, 4) if pairs.baseline else None}}


def evaluate(gates: Sequence[Gate | dict[str, Any]], result: dict[str, Any], baseline: dict[str, Any] | None
             ) -> list[dict[str, Any]]:
    """One verdict per gate: value, n, its interval, threshold, the baseline's value, and the verdict
    (pass / fail / inconclusive / not_measurable / missing, with a reason for the last two); a relative
    suite gate carries its paired counts (`flips`: lost, gained, McNemar's p, the difference's interval).

    Gates are the recipe's Gate models (mappings are validated into them)."""
    verdicts = []
    for spec in gates:
        gate = spec if isinstance(spec, Gate) else Gate.model_validate(spec)
        metric, op, declared = Metric.parse(gate.metric), gate.op, gate.threshold_value
        relative = gate.relative_to == "baseline"
        value = metric.value(result)
        base = metric.value(baseline) if baseline else None
        facts: dict[str, Any] = {"n": None, "interval": None, "threshold": None}
        # A candidate measured alongside the baseline is judged against that measurement, pair by pair.
        paired = _paired_ratio(metric, result) if relative and value is not None else None
        if paired is not None:
            base, spread = paired
            facts |= {"threshold": declared * base, "n": spread["pairs"], "paired": spread,
                      "verdict": judge_spread(op, declared, spread)}
        elif value is None:
            facts |= {"verdict": "missing", "reason": f"{gate.metric} was not measured"}
        elif relative and base is None:
            facts |= {"verdict": "missing", "reason": f"the baseline's {gate.metric} was not measured"}
        elif metric.sample(result) is not None and op != "==":
            facts |= _suite_verdict(gate, metric, result, baseline)
        elif (kl_interval := _kl_interval(metric, result)) is not None and not relative and op != "==":
            # Fidelity measured per held-out conversation: judged on its bootstrap interval like a suite rate.
            low, high = kl_interval
            facts |= {"threshold": declared, "interval": [round(low, 6), round(high, 6)],
                      "n": (result.get("kl") or {}).get("conversations"),
                      "verdict": judge(op, value, declared, (low - declared, high - declared))}
        else:
            threshold = declared * base + (gate.margin or 0) * (-1 if op in (">=", ">") else 1) \
                if relative and base is not None else declared
            facts |= {"threshold": threshold, "verdict": "pass" if OPS[op](value, threshold) else "fail"}
            if metric.sample(result) is not None:
                count, n, is_rate = metric.sample(result)  # type: ignore[misc]
                low, high = wilson(count, n)
                facts |= {"n": n, "interval": [round(low * (1 if is_rate else n), 4),
                                               round(high * (1 if is_rate else n), 4)]}
        verdicts.append({"gate": gate.name, "metric": gate.metric, "op": op, "declared": declared,
                         "margin": gate.margin, "value": value, "baseline": base, "relative_to": gate.relative_to,
                         **facts, "pass": {"pass": True, "fail": False}.get(facts["verdict"])})
    return verdicts


def recovery(candidate: dict[str, Any], baseline: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Per suite, as model releases publish it: n, the baseline's and the candidate's pass rate on the same
    prompts, recovery (candidate / baseline) and the paired 95 % interval of the difference."""
    rows = []
    if not baseline:
        return rows
    for name in (candidate.get("suites") or {}):
        metric = Metric(name, "pass_rate")
        mine, theirs = metric.outcomes(candidate), metric.outcomes(baseline)
        common = [k for k in (mine or {}) if k in (theirs or {})]
        if not common:
            continue
        pairs = Paired.of([mine[k] for k in common], [theirs[k] for k in common])  # type: ignore[index]
        # At the alpha the gates judged the suite at (a sequential suite's last look), so the two agree.
        alpha = float((candidate["suites"][name] or {}).get("alpha") or ALPHA)
        lo, hi = pairs.interval(1.0, alpha)
        rows.append({"suite": name, "n": pairs.n, "confidence": round(1 - alpha, 4),
                     "baseline": round(pairs.baseline / pairs.n, 4),
                     "candidate": round(pairs.candidate / pairs.n, 4),
                     "recovery_pct": round(100 * pairs.candidate / pairs.baseline, 1) if pairs.baseline else None,
                     "difference": [round(lo, 4), round(hi, 4)], "lost": pairs.lost, "gained": pairs.gained})
    return rows


def status_of(verdicts: Sequence[dict[str, Any]]) -> str:
    """proven (every gate passed), unproven (none failed, some could not decide) or rejected."""
    if any(v["verdict"] in ("fail", "missing") for v in verdicts):
        return "rejected"
    return "unproven" if any(v["verdict"] in UNDECIDED for v in verdicts) else "proven"


def select(verdicts: dict[str, list[dict[str, Any]]], results: dict[str, dict[str, Any]],
           prefer: Sequence[Preference | dict[str, str]], accept_unproven: bool = False,
           negative_controls: Sequence[str] = ()) -> dict[str, Any]:
    """Rank the candidates no gate rejects: every proven one before every unproven one, each group by the
    preferences in order (ties keep the recipe's order). The first proven candidate is the choice; an
    unproven one only with `accept_unproven`. A missing metric rejects. Negative controls (strategies built
    to damage behaviour) are judged but never ranked; one that no gate rejects means the gates cannot tell
    damage at these sizes, and nothing is selected."""
    prefer = [p if isinstance(p, Preference) else Preference.model_validate(p) for p in prefer]
    status = {s: status_of(vs) for s, vs in verdicts.items()}
    controls = {s: status[s] for s in negative_controls if s in status}
    toothless = [s for s, st in controls.items() if st != "rejected"]

    def key(strategy: str) -> tuple[float, ...]:
        out = [0.0 if status[strategy] == "proven" else 1.0]
        for pref in prefer:
            value = Metric.parse(pref.metric).value(results[strategy])
            if value is None:
                value = float("-inf") if pref.order == "max" else float("inf")
            out.append(-value if pref.order == "max" else value)
        return tuple(out)

    ranking = sorted((s for s in verdicts if status[s] != "rejected" and s not in controls), key=key)
    best = next((s for s in ranking if status[s] == "proven"), None)
    if best is None and accept_unproven and ranking:
        best = ranking[0]
    if toothless:
        best = None
    failing = {s: [v["gate"] for v in vs if v["verdict"] in ("fail", "missing")] for s, vs in verdicts.items()
               if status[s] == "rejected" and s not in controls}
    unproven = {s: [v["gate"] for v in verdicts[s] if v["verdict"] in UNDECIDED] for s in ranking
                if status[s] == "unproven"}
    rule = ("proven candidates first (every gate passes), "
            + ("then unproven ones (no gate fails; accept_unproven: true)" if accept_unproven
               else "no unproven one (accept_unproven: false)")
            + (", each ranked by " + ", ".join(f"{p.order} {p.metric}" for p in prefer) if prefer else ""))
    if toothless:
        rule = (f"negative control {', '.join(toothless)} was not rejected by any gate: the gates cannot tell a "
                "damaged model at these sizes, so nothing is selected")
    return {"best": best, "proven": status.get(best) == "proven" if best else None, "ranking": ranking,
            "status": status, "failing": failing, "unproven": unproven, "rule": rule,
            "negative_controls": {s: {"status": st, "rejected_by": [v["gate"] for v in verdicts[s]
                                                                    if v["verdict"] in ("fail", "missing")]}
                                  for s, st in controls.items()},
            "toothless": toothless}
