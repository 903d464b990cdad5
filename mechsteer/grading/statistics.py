"""The paper's metrics over per-problem grades.

``wilson_interval``, ``accuracy`` (with its Wilson interval), ``gap_recovered`` (None when
thinking == base, where the ratio is undefined), ``paired_bootstrap_gap``, ``seed_spread`` (a
metric's mean and standard deviation over runs that differ only in their seed) and
``fisher_exact_greater`` (one-sided Fisher's exact test of two proportions).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval for ``k`` successes in ``n`` trials (95% for z=1.96)."""
    if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
        raise ValueError(f"n must be a positive int, got {n!r}")
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= n:
        raise ValueError(f"k must be an int in [0, n={n}], got {k!r}")
    if not z > 0:
        raise ValueError(f"z must be positive, got {z!r}")
    p = k / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half_width = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return max(0.0, centre - half_width), min(1.0, centre + half_width)


@dataclass(frozen=True)
class SeedSpread:
    mean: float
    sd: float | None  # the sample standard deviation (n - 1); None for a single run
    n: int


def seed_spread(values: Sequence[float]) -> SeedSpread:
    """The mean and sample standard deviation of one metric over runs with different seeds."""
    if not values:
        raise ValueError("seed_spread needs at least one value")
    n = len(values)
    mean = sum(values) / n
    sd = math.sqrt(sum((value - mean) ** 2 for value in values) / (n - 1)) if n > 1 else None
    return SeedSpread(mean, sd, n)


def fisher_exact_greater(k_a: int, n_a: int, k_b: int, n_b: int) -> float:
    """One-sided Fisher's exact test that group a's rate exceeds group b's: ``k_a`` successes of
    ``n_a`` against ``k_b`` of ``n_b``.

    The p-value is P(X >= k_a) for X hypergeometric with the table's margins: ``n_a`` draws from
    ``n_a + n_b`` trials, ``k_a + k_b`` of them successes. Computed exactly with integer binomial
    coefficients (the same value as ``scipy.stats.fisher_exact(..., alternative="greater")``).
    """
    for name, value in (("n_a", n_a), ("n_b", n_b)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    for name, value, n in (("k_a", k_a, n_a), ("k_b", k_b, n_b)):
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= n:
            raise ValueError(f"{name} must be an int in [0, {n}], got {value!r}")
    successes = k_a + k_b
    tail = sum(math.comb(successes, x) * math.comb(n_a + n_b - successes, n_a - x)
               for x in range(k_a, min(successes, n_a) + 1))
    return min(1.0, tail / math.comb(n_a + n_b, n_a))


# Per-problem grades: bools, or 0/1, as a sequence or a 1-D numpy array.
Grades = Sequence[bool] | Sequence[int] | np.ndarray


@dataclass(frozen=True)
class AccuracySummary:
    """Accuracy ``correct / total`` with its Wilson interval ``[ci_low, ci_high]``."""

    correct: int
    total: int
    accuracy: float
    ci_low: float
    ci_high: float


def accuracy(correct: Grades, z: float = 1.96) -> AccuracySummary:
    """Accuracy of a list of per-problem grades, with a Wilson interval (95% by default)."""
    grades = _as_bool_array(correct, "correct")
    k, n = int(grades.sum()), int(grades.size)
    low, high = wilson_interval(k, n, z)
    return AccuracySummary(correct=k, total=n, accuracy=k / n, ci_low=low, ci_high=high)


def gap_recovered(hybrid: float, base: float, thinking: float) -> float | None:
    """(hybrid - base) / (thinking - base), or None when thinking == base (undefined).

    Accuracies may be fractions or percentages (the ratio does not care). The result is not
    clipped: below 0 the hybrid is worse than the base, above 1 better than the thinking model.
    """
    for name, value in (("hybrid", hybrid), ("base", base), ("thinking", thinking)):
        if not isinstance(value, int | float) or not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
    if math.isclose(thinking, base, rel_tol=0.0, abs_tol=1e-12):
        return None
    return (hybrid - base) / (thinking - base)


@dataclass(frozen=True)
class GapBootstrap:
    """A paired bootstrap of the gap recovered.

    ``estimate`` is the gap on the full data (None if undefined). ``ci_low``/``ci_high`` are
    percentile bounds over the resamples where the gap is defined (None if none is);
    ``n_undefined`` counts the resamples where thinking == base.
    """

    estimate: float | None
    ci_low: float | None
    ci_high: float | None
    confidence: float
    n_resamples: int
    n_undefined: int


def paired_bootstrap_gap(
    base_correct: Grades,
    thinking_correct: Grades,
    hybrid_correct: Grades,
    n_resamples: int = 10_000,
    seed: int = 0,
    confidence: float = 0.95,
) -> GapBootstrap:
    """Bootstrap interval for the gap recovered, resampling problems (pairs kept together).

    The three lists grade the same problems in the same order.
    """
    base = _as_bool_array(base_correct, "base_correct")
    thinking = _as_bool_array(thinking_correct, "thinking_correct")
    hybrid = _as_bool_array(hybrid_correct, "hybrid_correct")
    if not base.size == thinking.size == hybrid.size:
        raise ValueError(
            f"the grade lists must have equal lengths, got {base.size}, {thinking.size}, {hybrid.size}"
        )
    if isinstance(n_resamples, bool) or not isinstance(n_resamples, int) or n_resamples < 1:
        raise ValueError(f"n_resamples must be a positive int, got {n_resamples!r}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    estimate = gap_recovered(float(hybrid.mean()), float(base.mean()), float(thinking.mean()))

    # Per-problem grades as integers; the gap only needs the sums of each resample.
    grades = np.stack([base, thinking, hybrid]).astype(np.int64)
    rng = np.random.default_rng(seed)
    gaps: list[np.ndarray] = []
    n_undefined = 0
    size = base.size
    chunk = max(1, 1_000_000 // size)
    for start in range(0, n_resamples, chunk):
        count = min(chunk, n_resamples - start)
        indices = rng.integers(0, size, size=(count, size))
        sums = grades[:, indices].sum(axis=2)  # (3, count)
        denominator = sums[1] - sums[0]
        defined = denominator != 0
        n_undefined += int((~defined).sum())
        gaps.append((sums[2][defined] - sums[0][defined]) / denominator[defined])
    defined_gaps = np.concatenate(gaps)
    if defined_gaps.size == 0:
        low = high = None
    else:
        tail = (1 - confidence) / 2 * 100
        low, high = (float(value) for value in np.percentile(defined_gaps, [tail, 100 - tail]))
    return GapBootstrap(
        estimate=estimate,
        ci_low=low,
        ci_high=high,
        confidence=confidence,
        n_resamples=n_resamples,
        n_undefined=n_undefined,
    )


def _as_bool_array(values: Grades, name: str) -> np.ndarray:
    array = np.asarray(values)
    if array.ndim != 1 or array.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D sequence of bools")
    if array.dtype != np.bool_:
        if not np.isin(array, (0, 1)).all():
            raise ValueError(f"{name} must hold bools (or 0/1), got values {np.unique(array)[:5]}")
        array = array.astype(bool)
    return array
