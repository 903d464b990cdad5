"""Answer extraction, numeric grading, and the metrics (Wilson, gap recovered, bootstrap)."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest

from mechsteer.grading.answers import extract_answer, grade, is_correct, parse_number
from mechsteer.grading.statistics import (
    AccuracySummary,
    accuracy,
    gap_recovered,
    paired_bootstrap_gap,
    wilson_interval,
)
from tests.typecheck import refused


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("She makes 9 * 2 = $<<9*2=18>>18 a day.\n#### 18", "18"),
        ("#### $1,000.", "1000"),
        ("#### -3", "-3"),
        ("#### 18\nThe answer is 20", "18"),  # the marker wins
        ("Steps... so the total is \\boxed{42} dollars. Check: 40 + 2", "42"),
        ("\\boxed{\\$1,250}", "1250"),
        ("\\boxed{x = 5}", "5"),
        ("\\boxed{\\frac{3}{4}}", "3/4"),
        ("The answer is $18.00. I hope 7 is not it.", "18.00"),
        ("Final answer: 72 clips", "72"),
        ("So the answer is: **-15** degrees", "-15"),
        ("It costs 1,234,567 dollars and weighs 2.5 kg", "2.5"),
        ("From 3-4 apples we get 4", "4"),
        ("range 3-4", "4"),  # a hyphen after a digit is not a minus sign
        ("about .5 of it", ".5"),
        ("\u22127 degrees", "-7"),
        ("<think>maybe 3?</think> The answer is 4.", "4"),
        ("<think>maybe 3? still thinking</think>", None),
        ("no numbers here", None),
        ("", None),
        # A base model under the paper's prompt writing the next question after its answer.
        ("She makes 18 dollars.\n\nQuestion:\nTom has 7 apples.", "18"),
        ("So 18.\nTask: Answer the question below. Explain\n\nQuestion:\n3 cats", "18"),
    ],
)
def test_extract_gsm8k(text, expected):
    assert extract_answer(text, "gsm8k") == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("so $x = \\boxed{\\frac{1}{2}}$.", "\\frac{1}{2}"),
        ("\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}", "\\left( 3, \\frac{\\pi}{2} \\right)"),
        ("first \\boxed{1}, finally \\fbox{\\{1,2\\}}", "\\{1,2\\}"),
        ("\\boxed{\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}}", "\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}"),
        ("Thus the final answer is $\\frac{3}{4}$. Done", "\\frac{3}{4}"),
        ("The answer is 12 cm.\nBye", "12 cm"),
        ("We get 3, then 7 and finally 10", "10"),  # the paper's last-number fallback
        ("\\boxed{", None),
        ("nothing numeric", None),
        ("<think>\\boxed{2}</think>So \\boxed{3}", "3"),
    ],
)
def test_extract_math(text, expected):
    assert extract_answer(text, "math500") == expected
    assert extract_answer(text, "math") == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Plan: 3 + 4. Then 7. The answer is 7.", "7"),
        ("The answer is -12.", "-12"),
        # A small model may continue with a new problem; the first answer sentence counts.
        ("The answer is 7. Q: next? The answer is 9.", "7"),
        ("the total is 7", None),
    ],
)
def test_extract_organism(text, expected):
    assert extract_answer(text, "organism") == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("18", Fraction(18)),
        ("18.00", Fraction(18)),
        ("$18", Fraction(18)),
        ("\\$18", Fraction(18)),
        ("1,000", Fraction(1000)),
        ("18 dollars", Fraction(18)),
        ("50%", Fraction(50)),
        ("\\boxed{18}", Fraction(18)),
        ("18.", Fraction(18)),
        ("3/4", Fraction(3, 4)),
        ("\\frac{3}{4}", Fraction(3, 4)),
        (".5", Fraction(1, 2)),
        ("-7", Fraction(-7)),
        ("5/0", None),
        ("eighteen", None),
        ("1e3", None),
        ("18 or 19", None),
        ("", None),
        ("9" * 500, None),
    ],
)
def test_parse_number(text, expected):
    assert parse_number(text) == expected


@pytest.mark.parametrize("benchmark", ["gsm8k", "organism"])
def test_numeric_grading(benchmark):
    assert is_correct("18", "18", benchmark)
    assert is_correct("18.0", "18", benchmark)
    assert is_correct("$18", "18", benchmark)
    assert is_correct("1,000", "1000", benchmark)
    assert not is_correct("19", "18", benchmark)
    assert not is_correct("18.01", "18", benchmark)
    assert not is_correct(None, "18", benchmark)
    assert not is_correct("eighteen", "18", benchmark)
    assert is_correct("-3", "-3", benchmark)


def test_grade_combines_extraction_and_grading():
    assert grade("Some work.\n#### 1,200", "1200", "gsm8k")
    assert not grade("Some work.\n#### 1,201", "1200", "gsm8k")
    assert grade("<think>hmm</think>\nThus $\\boxed{\\dfrac{1}{2}}$.", "0.5", "math500")


def test_bad_arguments_raise_value_errors():
    with pytest.raises(ValueError, match="unknown benchmark"):
        is_correct("1", "1", "aime")
    with pytest.raises(ValueError, match="unknown benchmark"):
        extract_answer("1", "GSM8K")
    with pytest.raises(ValueError, match="not a number"):
        is_correct("1", "one", "gsm8k")
    with refused("prediction", parameter="prediction"):
        is_correct(1, "1", "gsm8k")  # type: ignore[arg-type]
    with refused("str", parameter="text"):
        extract_answer(None, "gsm8k")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------
# Metrics


@pytest.mark.parametrize(
    ("k", "n", "low", "high"),
    [
        (50, 100, 0.40383, 0.59617),
        (0, 10, 0.0, 0.27753),
        (10, 10, 0.72247, 1.0),
        (83, 100, 0.74452, 0.89107),  # by hand: centre 0.817791, half-width 0.073274
        (1, 1, 0.20654, 1.0),
    ],
)
def test_wilson_interval_matches_published_values(k, n, low, high):
    computed = wilson_interval(k, n)
    assert computed == pytest.approx((low, high), abs=1e-4)


def test_wilson_interval_validation_and_z():
    narrow = wilson_interval(50, 100, z=1.0)
    wide = wilson_interval(50, 100, z=2.58)
    assert wide[0] < narrow[0] < 0.5 < narrow[1] < wide[1]
    for k, n in [(1, 0), (-1, 10), (11, 10), (1.5, 10)]:
        with refused("", parameter="k"):
            wilson_interval(k, n)  # type: ignore[arg-type]


def test_accuracy_summary():
    summary = accuracy([True] * 83 + [False] * 17)
    assert isinstance(summary, AccuracySummary)
    assert (summary.correct, summary.total) == (83, 100)
    assert summary.accuracy == pytest.approx(0.83)
    assert (summary.ci_low, summary.ci_high) == pytest.approx((0.74452, 0.89107), abs=1e-4)
    assert accuracy(np.array([1, 0, 1, 1])).correct == 3
    with pytest.raises(ValueError, match="non-empty"):
        accuracy([])
    with pytest.raises(ValueError, match="bools"):
        accuracy([0, 2, 1])


def test_gap_recovered():
    # The paper's Llama-8B row: base 37.8, hybrid 63.4, thinking 83.4.
    assert gap_recovered(63.4, 37.8, 83.4) == pytest.approx(25.6 / 45.6)
    assert gap_recovered(0.5, 0.5, 0.9) == 0.0
    assert gap_recovered(0.9, 0.5, 0.9) == 1.0
    assert gap_recovered(0.4, 0.5, 0.9) == pytest.approx(-0.25)  # worse than base: not clipped
    # thinking == base: undefined, and said so explicitly (None, never NaN or a crash).
    assert gap_recovered(0.7, 0.6, 0.6) is None
    assert gap_recovered(0.6, 0.6, 0.6) is None
    with pytest.raises(ValueError, match="finite"):
        gap_recovered(float("nan"), 0.5, 0.9)


def test_paired_bootstrap_gap():
    rng = np.random.default_rng(1)
    size = 400
    base = rng.random(size) < 0.5
    thinking = base | (rng.random(size) < 0.6)
    # The hybrid recovers about half of the problems that thinking gains over base.
    gained = thinking & ~base
    hybrid = base | (gained & (rng.random(size) < 0.5))
    result = paired_bootstrap_gap(base, thinking, hybrid, n_resamples=2000, seed=0)
    expected = (hybrid.mean() - base.mean()) / (thinking.mean() - base.mean())
    assert result.estimate == pytest.approx(expected)
    assert result.ci_low < result.estimate < result.ci_high
    assert 0.1 < result.ci_high - result.ci_low < 0.5
    assert result.n_undefined == 0 and result.n_resamples == 2000 and result.confidence == 0.95
    # Deterministic in the seed; a wider confidence gives a wider interval.
    assert paired_bootstrap_gap(base, thinking, hybrid, n_resamples=2000, seed=0) == result
    wider = paired_bootstrap_gap(base, thinking, hybrid, n_resamples=2000, seed=0, confidence=0.99)
    assert wider.ci_low < result.ci_low and wider.ci_high > result.ci_high


def test_bootstrap_is_paired():
    # The hybrid solves exactly the thinking model's problems: in every paired resample the
    # gap is exactly 1. Resampling the three lists independently would spread it out.
    rng = np.random.default_rng(2)
    base = rng.random(300) < 0.4
    thinking = base | (rng.random(300) < 0.5)
    result = paired_bootstrap_gap(base, thinking, thinking.copy(), n_resamples=500, seed=3)
    assert result.estimate == 1.0
    assert result.ci_low == 1.0 and result.ci_high == 1.0


def test_bootstrap_when_thinking_equals_base():
    grades = [True, False, True, True]
    result = paired_bootstrap_gap(grades, grades, [False] * 4, n_resamples=100, seed=0)
    assert result.estimate is None
    assert result.ci_low is None and result.ci_high is None
    assert result.n_undefined == 100
    # A single differing problem: some resamples miss it and are counted as undefined.
    base = [False] + [True] * 9
    thinking = [True] * 10
    partial = paired_bootstrap_gap(base, thinking, thinking, n_resamples=1000, seed=0)
    assert 0 < partial.n_undefined < 1000
    # P(resample misses the problem) = 0.9 ** 10.
    assert partial.n_undefined / 1000 == pytest.approx(0.9**10, abs=0.05)
    assert partial.ci_low == partial.ci_high == 1.0
    assert not math.isnan(partial.ci_low)


def test_bootstrap_validation():
    with pytest.raises(ValueError, match="equal lengths"):
        paired_bootstrap_gap([True], [True, False], [True])
    with pytest.raises(ValueError, match="n_resamples"):
        paired_bootstrap_gap([True], [False], [True], n_resamples=0)
    with pytest.raises(ValueError, match="confidence"):
        paired_bootstrap_gap([True], [False], [True], confidence=1.0)
