"""The causal checks' pass criterion and the contexts they are measured in.

A check compares two conditions over the same contexts, each a count of contexts whose next
sentence is the behaviour: sufficiency the steered base model against a norm-matched random
direction, necessity the unablated thinking model against the ablated one. It passes when a
one-sided Fisher exact test (:func:`mechsteer.grading.statistics.fisher_exact_greater`) gives
p < :data:`ALPHA`; each rate is reported with its 95% Wilson interval.

Where a benchmark's ground truth declares which behaviours its grammar allows next
(:attr:`mechsteer.data.labels.GroundTruth.allowed_next`), sufficiency is measured only where
the behaviour is possible; without one the contexts are unfiltered by grammar.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

from mechsteer.grading.statistics import accuracy, fisher_exact_greater

ALPHA = 0.01
# "grammar": contexts where the benchmark's grammar allows the behaviour next and the unsteered
# base model does not write it; "another behaviour next": without a grammar, contexts whose
# recorded next sentence is another behaviour (unfiltered by grammar); "behaviour next": the
# necessity contexts, whose recorded next sentence is it.
ContextRule = Literal["grammar", "another behaviour next", "behaviour next"]
CONTEXT_RULES: tuple[ContextRule, ...] = get_args(ContextRule)


@dataclass(frozen=True)
class RateCount:
    """``k`` of ``n`` contexts, the rate and its 95% Wilson interval."""

    k: int
    n: int
    rate: float
    ci: tuple[float, float]

    @classmethod
    def of(cls, hits: Sequence[bool]) -> RateCount:
        if not hits:  # no context to measure in: no evidence either way
            return cls(0, 0, 0.0, (0.0, 1.0))
        summary = accuracy(list(hits))
        return cls(summary.correct, summary.total, summary.accuracy, (summary.ci_low, summary.ci_high))

    @classmethod
    def from_json(cls, count: dict[str, Any]) -> RateCount:
        return cls(int(count["k"]), int(count["n"]), float(count["rate"]), (count["ci"][0], count["ci"][1]))


def one_sided_p(higher: RateCount, lower: RateCount) -> float:
    """Fisher's exact test that ``higher``'s rate exceeds ``lower``'s (1 where either has no context)."""
    if higher.n == 0 or lower.n == 0:
        return 1.0
    return fisher_exact_greater(higher.k, higher.n, lower.k, lower.n)


def passes(p_value: float) -> bool:
    return p_value < ALPHA


__all__ = ["ALPHA", "CONTEXT_RULES", "ContextRule", "RateCount", "one_sided_p", "passes"]
