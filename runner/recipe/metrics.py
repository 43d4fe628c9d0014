"""Metric names, parsed once: `SUITE.passed|failed|total|pass_rate`, `speed.NAME`, `size.bytes|gb`,
`kl.kl|top1_agreement` (a candidate's logits against the source model's on held-out conversations,
computed in the quantize worker; the baseline is the source itself: KL 0, agreement 1).

The schema checks a recipe's metrics with `Metric.parse` + `problem`, and the gate code reads values
from benchmark results with `Metric.value` and `Metric.sample`: one reading of the name for both.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

SPEED_METRICS = ("ttft_p50_ms", "ttft_p95_ms", "itl_p50_ms", "itl_p95_ms", "tpot_p50_ms", "decode_tok_s",
                 "e2e_p50_ms")
SUITE_METRICS = ("passed", "failed", "total", "pass_rate")
SIZE_METRICS = ("bytes", "gb")
KL_METRICS = ("kl", "top1_agreement")
SAMPLED = ("passed", "failed", "pass_rate")  # suite metrics that are proportions of `total`


@dataclass(frozen=True)
class Metric:
    group: str  # "speed", "size", "kl", or a suite's name
    name: str

    @classmethod
    def parse(cls, text: str) -> Metric:
        group, _, name = text.partition(".")
        return cls(group, name)

    def __str__(self) -> str:
        return f"{self.group}.{self.name}"

    def known_names(self, suites: list[str]) -> tuple[str, ...] | None:
        """The names this metric's group offers; None when the group is neither speed, size nor a suite."""
        if self.group == "speed":
            return SPEED_METRICS
        if self.group == "size":
            return SIZE_METRICS
        if self.group == "kl":
            return KL_METRICS
        return SUITE_METRICS if self.group in suites else None

    def value(self, result: dict[str, Any]) -> float | None:
        """The metric's value in a benchmark result (results.json); None where it was not measured."""
        if self.group == "speed":
            value = (result.get("speed") or {}).get("summary", {}).get(self.name)
        elif self.group in ("size", "kl"):
            value = (result.get(self.group) or {}).get(self.name)
        else:
            value = (result.get("suites") or {}).get(self.group, {}).get(self.name)
        return float(value) if isinstance(value, (int, float)) else None

    def sample(self, result: dict[str, Any]) -> tuple[int, int, bool] | None:
        """(count, n, is_rate) behind a suite proportion; None for metrics measured directly."""
        suite = (result.get("suites") or {}).get(self.group)
        if self.name not in SAMPLED or not suite or not suite.get("total"):
            return None
        count = suite["failed"] if self.name == "failed" else suite["passed"]
        return int(count), int(suite["total"]), self.name == "pass_rate"

    def category_samples(self, result: dict[str, Any]) -> dict[str, tuple[int, int]]:
        """{category: (count, n)} behind a suite proportion whose items have categories (BFCL, the
        held-out teacher suite); empty for a suite without them or a metric measured directly."""
        suite = (result.get("suites") or {}).get(self.group)
        if self.name not in SAMPLED or not suite:
            return {}
        out = {}
        for category, counts in (suite.get("per_category") or {}).items():
            total = int(counts.get("total") or 0)
            passed = int(counts.get("passed") or 0)
            if total:
                out[category] = (total - passed if self.name == "failed" else passed, total)
        return out

    def outcomes(self, result: dict[str, Any]) -> dict[tuple[str, int], bool] | None:
        """{(prompt, occurrence): counted} per item of a suite proportion (counted: passed, or failed for
        `failed`), for comparing two models on the same prompts; None for metrics measured directly."""
        suite = (result.get("suites") or {}).get(self.group)
        if self.name not in SAMPLED or not suite or not suite.get("items"):
            return None
        out: dict[tuple[str, int], bool] = {}
        seen: dict[str, int] = {}
        for item in suite["items"]:
            seen[item["prompt"]] = seen.get(item["prompt"], -1) + 1
            out[(item["prompt"], seen[item["prompt"]])] = bool(item["passed"]) != (self.name == "failed")
        return out
