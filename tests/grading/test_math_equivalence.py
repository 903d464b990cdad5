"""MATH answer equivalence: a table of what answers look like, and robustness to any input."""

from __future__ import annotations

import random
import threading
import time

import pytest

from mechsteer.grading import sympy_client
from mechsteer.grading.answers import extract_answer, is_correct
from mechsteer.grading.latex import LatexParseError, parse_latex
from mechsteer.grading.math_equivalence import math_answers_equivalent, normalize_math_answer
from mechsteer.grading.sympy_client import SympyWorker
from mechsteer.grading.sympy_worker import compare as sympy_compare

# (prediction, reference, equivalent?). References are written as MATH-500 writes them.
EQUIVALENCE_TABLE = [
    # fractions in their different forms
    ("\\frac{1}{2}", "\\frac12", True),
    ("\\dfrac{3}{56}", "\\frac{3}{56}", True),
    ("\\tfrac{14}{3}", "\\frac{14}{3}", True),
    ("3/56", "\\frac{3}{56}", True),
    ("\\frac 59", "\\frac{5}{9}", True),
    ("\\frac{270}{7}", "\\frac{270}7\\text{ degrees}", True),
    ("-\\frac{35}{9}", "\\frac{-35}{9}", True),
    ("\\frac{6}{12}", "\\frac{1}{2}", True),
    ("\\frac{9}{5}", "1\\frac{4}{5}", True),
    ("137.5", "137 \\frac{1}{2}", True),
    ("\\frac{2}{3}", "\\frac{3}{2}", False),
    # decimals versus fractions
    ("0.15", "\\frac{3}{20}", True),
    ("\\frac{3}{20}", "0.15", True),
    ("0.0000672", ".0000672", True),
    ("1.250", "1.25", True),
    ("0.333", "\\frac{1}{3}", False),
    ("4.50", "4.5", True),
    # integers, thousands separators, dollars
    ("10080", "10,\\!080", True),
    ("11111111100", "11,\\! 111,\\! 111,\\! 100", True),
    ("\\$32,348", "\\$32,\\!348", True),
    ("18.90", "\\$18.90", True),
    ("2220", "2221", False),
    # radicals
    ("\\sqrt{8}", "2\\sqrt{2}", True),
    ("\\frac{1}{\\sqrt{3}}", "\\frac{\\sqrt{3}}{3}", True),
    ("11\\sqrt{2}", "11\\sqrt2", True),
    ("\\sqrt{2}\\cdot 11", "11\\sqrt2", True),
    ("\\frac{3\\sqrt3}{4}", "\\frac{3\\sqrt{3}}{4}", True),
    ("\\sqrt{52}", "2\\sqrt{13}", True),
    ("\\sqrt{51}", "\\sqrt{52}", False),
    ("\\sqrt[3]{8}", "2", True),
    # pi
    ("\\pi", "\\pi", True),
    ("2\\pi", "2 \\pi", True),
    ("\\frac{\\pi}{2}", "\\pi/2", True),
    ("288\\pi", "288 \\pi", True),
    ("-\\frac{\\pi}{6}", "-\\pi/6", True),
    ("3.14", "\\pi", False),
    # degrees
    ("90", "90^\\circ", True),
    ("145^{\\circ}", "145^\\circ", True),
    ("30\\degree", "30^\\circ", True),
    ("31^\\circ", "30^\\circ", False),
    # percentages
    ("50\\%", "50", True),
    ("15%", "15", True),
    ("16\\%", "15\\%", False),
    # intervals
    ("(3, 4]", "(3,4]", True),
    ("[3,4]", "(3,4]", False),
    ("(-\\infty,0]", "(-\\infty, 0]", True),
    ("\\left(\\frac35, \\frac83\\right]", "\\left(\\frac{3}{5},\\frac{8}{3}\\right]", True),
    ("(-\\infty,2)\\cup(3,\\infty)", "(-\\infty, 2) \\cup (3, \\infty)", True),
    ("(3,\\infty)\\cup(-\\infty,2)", "(-\\infty, 2) \\cup (3, \\infty)", False),
    ("[-2,7]", "x \\in [-2,7]", True),
    # tuples
    ("(3, \\frac{\\pi}{2})", "\\left( 3, \\frac{\\pi}{2} \\right)", True),
    ("(6, 31, -1)", "(6,31,-1)", True),
    ("(31, 6, -1)", "(6,31,-1)", False),
    ("(\\frac{3}{2},-13)", "\\left( \\frac{3}{2}, -13 \\right)", True),
    ("(1.5,-13)", "\\left( \\frac{3}{2}, -13 \\right)", True),
    ("6,31,-1", "(6,31,-1)", False),
    # unordered lists and sets, and plus-minus
    ("7, 5, 3", "3, 5, 7", True),
    ("3, 5", "3, 5, 7", False),
    ("-2, 1", "1,-2", True),
    ("x=1, x=-2", "1,-2", True),
    ("1+\\sqrt{19}, 1-\\sqrt{19}", "1 \\pm \\sqrt{19}", True),
    ("-2, 1+\\sqrt5, 1-\\sqrt5", "\\{1\\pm\\sqrt{5},-2\\}", True),
    ("3+2\\sqrt{2}", "3 \\pm 2 \\sqrt{2}", False),
    ("\\{5\\}", "5", True),
    ("\\{5\\}", "6", False),
    # matrices and vectors
    ("\\begin{pmatrix} -\\frac13 \\\\ \\frac23 \\\\ \\frac53 \\end{pmatrix}", "\\begin{pmatrix} -1/3 \\\\ 2/3 \\\\ 5/3 \\end{pmatrix}", True),
    ("\\begin{bmatrix}-1&0\\\\0&-1\\end{bmatrix}", "\\begin{pmatrix} -1 & 0 \\\\ 0 & -1 \\end{pmatrix}", True),
    ("\\begin{pmatrix} -2 \\\\ -14 \\\\ 7 \\end{pmatrix}", "\\begin{pmatrix} -2 \\\\ -14 \\\\ -7 \\end{pmatrix}", False),
    ("\\begin{pmatrix} -2 \\\\ -14 \\end{pmatrix}", "\\begin{pmatrix} -2 \\\\ -14 \\\\ -7 \\end{pmatrix}", False),
    # text answers
    ("\\text{Evelyn}", "\\text{Evelyn}", True),
    ("Evelyn", "\\text{Evelyn}", True),
    ("\\textbf{east}", "\\text{east}", True),
    ("EVEN", "\\text{even}", True),
    ("\\text{odd}", "\\text{even}", False),
    ("(C)", "\\text{(C)}", True),
    ("C", "\\text{(C)}", True),
    ("\\text{(B)}", "\\text{(C)}", False),
    # x = ..., equations, expressions
    ("x=5", "5", True),
    ("5", "x=5", True),
    ("y=2x+3", "y = 2x + 3", True),
    ("3+2x", "y = 2x + 3", True),
    ("-2x", "y = -2x", True),
    ("x=4", "x=5", False),
    ("\\theta = 30^\\circ", "30^\\circ", True),
    ("-5x+7y-11z-4=0", "5x - 7y + 11z + 4 = 0", True),
    ("5x-7y+11z+5=0", "5x - 7y + 11z + 4 = 0", False),
    ("-q+p", "p - q", True),
    ("(x-1)(x^4+x^2+1)", "x^5 - x^4 + x^3 - x^2 + x - 1", True),
    ("x^3+3x-5", "x^3+3x-6", False),
    ("2(k+1)", "2k+2", True),
    ("\\frac{9a+11}{20}", "\\frac{11+9a}{20}", True),
    ("\\frac{\\cos x}{\\sin x}", "\\cot x", True),
    ("6r^2-4r-24", "6r^2-4r-24", True),
    ("(a+5)(b+2)", "ab+2a+5b+10", True),
    ("3R^{2}", "3R^2", True),
    # complex numbers
    ("-5i+6", "6 - 5i", True),
    ("6+5i", "6 - 5i", False),
    ("(1+i)^2", "2i", True),
    # units
    ("864", "864 \\mbox{ inches}^2", True),
    ("15", "15\\mbox{ cm}^2", True),
    ("5.4", "5.4 \\text{ cents}", True),
    ("54 miles", "54", True),
    # bases keep their subscripts
    ("52_{8}", "52_8", True),
    ("42", "52_8", False),
    # a whole box, and delimiters
    ("\\boxed{\\frac{14}{3}}", "\\frac{14}{3}", True),
    ("$\\frac{14}{3}$", "\\frac{14}{3}", True),
    ("\\(\\frac{14}{3}\\)", "\\frac{14}{3}", True),
]


def test_the_table_is_big_and_covers_both_outcomes():
    assert len(EQUIVALENCE_TABLE) >= 40
    assert sum(expected for _, _, expected in EQUIVALENCE_TABLE) >= 40
    assert sum(not expected for _, _, expected in EQUIVALENCE_TABLE) >= 20


@pytest.mark.parametrize(("prediction", "reference", "expected"), EQUIVALENCE_TABLE)
def test_equivalence_table(prediction, reference, expected):
    assert is_correct(prediction, reference, "math500") is expected
    # Equivalence is symmetric for every row of the table.
    assert math_answers_equivalent(reference, prediction) is expected


@pytest.mark.parametrize(
    ("raw", "normalised"),
    [
        ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3,\\frac{\\pi}{2})"),
        ("\\dfrac{17}{50}", "\\frac{17}{50}"),
        ("\\$32,\\!348", "32348"),
        ("90^\\circ", "90"),
        ("x \\in [-2,7]", "[-2,7]"),
        ("\\text{(C)}", "C"),
        ("\\frac{270}7\\text{ degrees}", "\\frac{270}{7}"),
        ("\\cot x", "\\cot x"),
        ("1\\frac{4}{5}", "\\frac{9}{5}"),
        ("4210_{5}", "4210_5"),
        ("\\boxed{ 5. }", "5"),
    ],
)
def test_normalisation(raw, normalised):
    assert normalize_math_answer(raw) == normalised
    assert normalize_math_answer(normalised) == normalised  # idempotent


def test_parser_refuses_what_could_hang_sympy():
    for text in ("9^{9^{9^{9}}}", "10^{10^{10}}", "2^{100000}", "(10^{400})^{900}", "100000!", "\\binom{10000}{5000}"):
        with pytest.raises(LatexParseError):
            parse_latex(text)
    for text in ("{" * 40 + "1" + "}" * 40, "-" * 60 + "1", "x" * 500):
        with pytest.raises(LatexParseError):
            parse_latex(text)
    # Moderate sizes are fine and exact.
    assert parse_latex("2^{100}") == ("pow", ("num", "2"), ("num", "100"))
    assert is_correct("2^{100}", str(2**100), "math500")
    assert not is_correct("2^{100}", str(2**100 + 1), "math500")


def test_sympy_comparison_in_process():
    # The worker's comparison function, called directly (it normally runs in the child).
    assert sympy_compare(parse_latex("\\sqrt{12}"), parse_latex("2\\sqrt{3}")) is True
    assert sympy_compare(parse_latex("x^2-1"), parse_latex("(x-1)(x+1)")) is True
    assert sympy_compare(parse_latex("\\sqrt{x^2}"), parse_latex("x")) is False
    assert sympy_compare(parse_latex("y=2x"), parse_latex("4x=2y")) is True
    assert sympy_compare(parse_latex("y=2x"), parse_latex("y=2")) is False
    assert sympy_compare(parse_latex("\\frac{1}{0}"), parse_latex("\\infty")) is False


def test_worker_timeout_kills_and_restarts_the_child():
    worker = SympyWorker()
    try:
        # 1000000! takes sympy ~10 s; built by hand because parse_latex would refuse it.
        expensive = ("fact", ("num", "1000000"))
        started = time.monotonic()
        assert worker.compare(expensive, ("num", "1"), timeout_s=0.5) is None
        assert time.monotonic() - started < 10
        assert worker.timeouts == 1
        # The next call starts a fresh child and works.
        assert worker.compare(parse_latex("\\sqrt{4}"), ("num", "2"), timeout_s=30) is True
        assert worker.starts == 2
    finally:
        worker.close()


def test_worker_survives_its_child_being_killed():
    worker = SympyWorker()
    try:
        assert worker.compare(parse_latex("\\sqrt{9}"), ("num", "3"), timeout_s=30) is True
        worker._process.kill()  # a crash, as far as the parent can tell
        worker._process.wait()
        assert worker.compare(parse_latex("\\sqrt{9}"), ("num", "4"), timeout_s=30) is False
        assert worker.starts == 2 and worker.timeouts == 0
    finally:
        worker.close()


def test_grading_is_thread_safe():
    results: list[bool] = []
    pairs = [("\\sqrt{18}", "3\\sqrt{2}", True), ("\\sqrt{18}", "2\\sqrt{3}", False)] * 4

    def grade(prediction: str, reference: str) -> None:
        results.append(math_answers_equivalent(prediction + " ", reference))

    threads = [threading.Thread(target=grade, args=pair[:2]) for pair in pairs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert sorted(results) == sorted(expected for _, _, expected in pairs)


PATHOLOGICAL = [
    "9^9^9^9",
    "9^{9^{9^{9}}}",
    "10^{10^{10^{10}}}",
    "2^{2^{2^{2^{2^{2}}}}}",
    "x^{x^{x^{x^{x^{x}}}}}",
    "(x+y+z)^{1000}",
    "(x+y+z+w)^{999}-(w+x+y+z)^{999}",
    "\\sin(" * 200,
    "{" * 5000,
    "(" * 3000 + ")" * 3000,
    "\\frac{" * 400,
    "\\sqrt{" * 400 + "}" * 400,
    "\\left(" * 1000,
    "\\boxed{" * 1000,
    "1" * 100_000,
    "9" * 61,
    "1e999999",
    "100000!",
    "500!^{1000}",
    "\\binom{1000}{500}^{1000}",
    "e^{e^{e^{e^{e^{9}}}}}",
    "\\begin{pmatrix}" + "1&" * 500 + "\\end{pmatrix}",
    "," * 10_000,
    "\\{" * 500,
    "x=" * 1000,
    "\\pm" * 300,
    "$" * 1000,
    "\\" * 1000,
    "\x00\x01\x02\ufffd\U0001f600",
    "",
    " ",
    "\\text{" + "a" * 5000 + "}",
    "\\frac{1}{0}",
    "0^{-1}",
    "\\sqrt{-1}^{\\sqrt{-1}}",
    "\\log_{0}(0)",
    "\\tan(\\frac{\\pi}{2})",
    "10,000,000,000,000,000,000,000",
    "(1,2,3," + "4," * 2000 + "5)",
    "#### " + "9" * 5000,
    "the answer is " * 2000,
]
FRAGMENTS = [
    "\\frac", "\\dfrac", "{", "}", "^", "_", "(", ")", "[", "]", ",", "\\sqrt", "\\pi", "x", "y",
    "1", "2", "9", "0", ".", "-", "+", "*", "/", "=", "!", "\\pm", "\\cup", "\\infty", "\\left(",
    "\\right)", "\\boxed{", "\\fbox{", "\\text{", "\\\\", "&", "\\begin{pmatrix}",
    "\\end{pmatrix}", "$", "\\$", "%", "\\%", "^\\circ", "i", "e", "\\sin", "\\log", "\\cdot",
    " ", "\n", "####", "the answer is ", "</think>", "\u00e9", "\u2212", "\\{", "\\}", "|",
    "\\binom", "\\ln", "a", "\\theta", "\\cot", "999", "10^{", "!!",
]
REFERENCES = [
    ("\\frac{\\sqrt{3}}{3}", "math500"),
    ("x^2+1", "math500"),
    ("(1,2)", "math500"),
    ("\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", "math"),
    ("\\text{even}", "math"),
    ("18", "gsm8k"),
    ("-3", "organism"),
]


def random_expression(rng: random.Random, depth: int = 0) -> str:
    """A random well-formed LaTeX expression, so that many strings reach sympy."""
    if depth > 3 or rng.random() < 0.3:
        return rng.choice(["x", "y", "2", "3", "7", "\\pi", "i", "0.5", "10", "e", "a_1"])
    left = random_expression(rng, depth + 1)
    right = random_expression(rng, depth + 1)
    return rng.choice(
        [
            f"{left}+{right}",
            f"{left}-{right}",
            f"{left}\\cdot {right}",
            f"\\frac{{{left}}}{{{right}}}",
            f"\\sqrt{{{left}}}",
            f"({left})^{{{rng.randint(-3, 12)}}}",
            f"\\sin({left})",
            f"\\left({left}\\right)",
            f"|{left}|",
            f"{left}^{{{right}}}",
        ]
    )


def random_strings(count: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    strings = list(PATHOLOGICAL)
    while len(strings) < count:
        choice = rng.random()
        if choice < 0.3:
            strings.append(random_expression(rng))
        elif choice < 0.4:
            # Arbitrary characters, unicode included.
            length = rng.randint(0, 40)
            strings.append("".join(chr(rng.randint(0, 0x2FFF)) for _ in range(length)))
        else:
            length = rng.randint(1, 25)
            strings.append("".join(rng.choice(FRAGMENTS) for _ in range(length)))
    return strings


def test_grader_never_raises_or_hangs_on_a_thousand_random_strings():
    strings = random_strings(1000)
    assert len(strings) == 1000
    per_call_limit_s = sympy_client.SYMPY_TIMEOUT_S + 7.0  # a timeout plus a restart
    slowest = (0.0, "")
    calls_before = sympy_client.SYMPY_WORKER.calls
    started = time.monotonic()
    outcomes = {True: 0, False: 0}
    for index, text in enumerate(strings):
        reference, benchmark = REFERENCES[index % len(REFERENCES)]
        call_started = time.monotonic()
        extracted = extract_answer(text, benchmark)
        assert extracted is None or isinstance(extracted, str)
        outcomes[is_correct(text, reference, benchmark)] += 1
        outcomes[is_correct(extracted, reference, benchmark)] += 1
        elapsed = time.monotonic() - call_started
        assert elapsed < per_call_limit_s, f"{elapsed:.1f} s on {text[:80]!r}"
        slowest = max(slowest, (elapsed, text[:60]))
    total = time.monotonic() - started
    sympy_calls = sympy_client.SYMPY_WORKER.calls - calls_before
    print(
        f"\n1000 random strings graded in {total:.1f} s, {sympy_calls} sympy comparisons; "
        f"slowest {slowest[0]:.2f} s on {slowest[1]!r}"
    )
    assert sympy_calls >= 100  # the sandboxed sympy path really was exercised
    # Random junk is almost never right, but grading did run on every string.
    assert outcomes[True] + outcomes[False] == 2000
    assert outcomes[True] < 50
