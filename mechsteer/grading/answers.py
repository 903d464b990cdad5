"""Answer extraction and deterministic grading (no LLM judge), one :class:`Grader` per benchmark.

The built-in benchmarks are graded in one of two ways:

- numeric (``gsm8k``): answers are numbers, compared exactly as fractions
  (so ``18``, ``18.00``, ``$18``, ``1,000`` and ``18 dollars`` all read as numbers);
- MATH (``math500``, ``math``): LaTeX answers, compared by
  ``mechsteer.grading.math_equivalence.math_answers_equivalent`` (normalisation, structure, exact
  rationals, and sympy in a sandboxed worker process under a timeout).

A plug-in benchmark registers its own grader (:func:`register_grader`; the organisms' reads
their answer sentence and compares numbers with :func:`numbers_equal`), found by name through the
plug-in entry points on a miss.

``extract_answer(text, benchmark)`` finds the final answer in a model's output;
``is_correct(prediction, reference, benchmark)`` grades an extracted answer. Neither raises
on any str content (bad argument *types* or an unknown benchmark raise ValueError).

The metrics over the grades (Wilson interval, gap recovered, bootstrap) are in
:mod:`mechsteer.grading.statistics`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction

from mechsteer.core.plugins import Registry
from mechsteer.grading.math_equivalence import math_answers_equivalent

# The tags around a thinking model's reasoning; the answer follows the closing one.
THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"

# Only the end of very long outputs is searched (a plug-in's grader may search the start): the
# final answer is there, and it bounds the regex work on pathological inputs.
MAX_SEARCH_CHARS = 50_000
MAX_NUMBER_CHARS = 200

_ANSWER_PHRASE = re.compile(r"(?:final\s+)?answer\s*(?:is|:|=)\s*:?", re.IGNORECASE)
_NUMBER = re.compile(
    r"(?<![\w.])-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?|(?<![\w.\d])-?\.\d+"
)
_FULL_NUMBER = re.compile(r"-?(?:\d+(?:\.\d*)?|\.\d+)(?:/\d+)?")


def last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` or ``\\fbox{...}`` in ``text``, braces balanced.

    Also accepts the brace-less form ``\\boxed 5`` (content up to the next space or ``$``).
    Returns None when there is no box or the last box's braces never close.
    """
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    rest = text[start + (6 if text.startswith("\\boxed", start) else 5) :]
    if rest.startswith(" ") and not rest.lstrip(" ").startswith("{"):
        # "\boxed 5": the argument is the next token.
        token = rest.lstrip(" ").split(" ", 1)[0].split("$", 1)[0]
        return token or None
    rest = rest.lstrip(" ")
    if not rest.startswith("{"):
        return None
    depth = 0
    for position, char in enumerate(rest):
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return rest[1:position]
    return None


@dataclass(frozen=True)
class Grader:
    """How one benchmark's answers are read and compared.

    ``extract`` gets the output after its last ``</think>`` and returns the final answer or None;
    ``equivalent(prediction, reference)`` compares an extracted answer with the reference. Neither
    may raise on any str content (a reference that is not an answer may: a data error)."""

    benchmark: str
    extract: Callable[[str], str | None]
    equivalent: Callable[[str, str], bool]


GRADERS: Registry[Grader] = Registry("benchmark")  # the benchmarks that have a grader


def register_grader(grader: Grader, *, replace: bool = False) -> None:
    """Add a benchmark's grader (a plug-in registers its benchmark's here)."""
    GRADERS.register(grader.benchmark, grader, replace=replace)


def grader_for(benchmark: str) -> Grader:
    """The benchmark's grader (plug-ins loaded on a miss); ConfigError naming the graded ones."""
    return GRADERS.get(benchmark)


def graded_benchmarks() -> tuple[str, ...]:
    return tuple(GRADERS.names())


# ---------------------------------------------------------------------------------------
# Extraction


def extract_answer(text: str, benchmark: str) -> str | None:
    """The final answer in ``text`` (a model output or a reference solution), or None.

    If ``text`` contains ``</think>``, only what follows the last ``</think>`` is searched
    (an unfinished thinking block therefore has no answer). A base model's continuation into
    a new question of the paper's prompt (``"\n\nQuestion:\n"`` or ``"\nTask: Answer the
    question below"``) is cut off first.

    - ``gsm8k``: the number after the last ``####``; else in the last
      ``\\boxed{}``; else after the last "the answer is"/"answer:"; else the last number.
      Commas, ``$``, units and trailing periods are dropped: ``"#### $1,000."`` -> ``"1000"``.
    - MATH benchmarks: the content of the last ``\\boxed{...}``/``\\fbox{...}`` (braces
      balanced); else what follows the last "the answer is" (a ``$...$`` span, or up to the
      end of the sentence); else, as in the paper, the last number.
    - a plug-in's benchmark: as its grader reads it.
    """
    grader = grader_for(benchmark)
    if not isinstance(text, str):
        raise ValueError(f"text must be a str, got {type(text).__name__}")
    if THINK_CLOSE in text:
        text = text.rsplit(THINK_CLOSE, 1)[1]
    return grader.extract(text)


# A base model given the paper's prompt may go on to write the next "Question:" (or a whole
# new "Task: ..." block) after answering; its numbers must not count as the answer.
_CONTINUATION_MARKERS = ("\nTask: Answer the question below", "\n\nQuestion:\n")


def _cut_continuation(text: str) -> str:
    cut = min((text.find(marker) for marker in _CONTINUATION_MARKERS if marker in text), default=-1)
    return text if cut < 0 else text[:cut]


def _clean_for_numbers(text: str) -> str:
    """Drop what hides numbers: LaTeX fractions become a/b, ``$`` and LaTeX spacing go."""
    text = text.replace("\u2212", "-").replace("\\$", "").replace("$", "")
    text = re.sub(r"\{,\}|\\[,!]", "", text)  # 1{,}000 and 1\,000 / 1\!000
    text = re.sub(r"\\[dt]?frac\{(-?\d+)\}\{(\d+)\}", r"\1/\2", text)
    return text


def _numbers(text: str) -> list[str]:
    return [match.group(0).replace(",", "") for match in _NUMBER.finditer(_clean_for_numbers(text))]


def _extract_number_answer(text: str) -> str | None:
    if "####" in text:
        after = text.rsplit("####", 1)[1].split("\n", 1)[0]
        numbers = _numbers(after)
        if numbers:
            return numbers[0]
    boxed = last_boxed(text)
    if boxed is not None:
        numbers = _numbers(boxed)
        if numbers:
            return numbers[-1]
    phrases = list(_ANSWER_PHRASE.finditer(text))
    if phrases:
        numbers = _numbers(text[phrases[-1].end() : phrases[-1].end() + 200])
        if numbers:
            return numbers[0]
    numbers = _numbers(text)
    return numbers[-1] if numbers else None


def _extract_math_answer(text: str) -> str | None:
    boxed = last_boxed(text)
    if boxed is not None and boxed.strip():
        return boxed.strip()
    phrases = list(_ANSWER_PHRASE.finditer(text))
    if phrases:
        after = text[phrases[-1].end() : phrases[-1].end() + 500].lstrip()
        if after.startswith("$"):
            body = after.lstrip("$")
            answer = body.split("$", 1)[0]
        else:
            answer = re.split(r"\n|\.\s|\.$", after, maxsplit=1)[0]
        answer = answer.strip().rstrip(".").strip()
        if answer:
            return answer
    numbers = _numbers(text)
    return numbers[-1] if numbers else None


# ---------------------------------------------------------------------------------------
# Grading


def parse_number(text: str) -> Fraction | None:
    """The exact value of a numeric answer, or None if it is not just a number.

    Accepts ``18``, ``-3.5``, ``.5``, ``3/4``, ``\\frac{3}{4}``, ``1,000``, ``$18.00``,
    ``50%``, ``18 dollars``, ``\\boxed{18}`` and a trailing period.
    """
    if len(text) > MAX_NUMBER_CHARS:
        return None
    cleaned = text.strip()
    boxed = last_boxed(cleaned)
    if boxed is not None and cleaned.startswith(("\\boxed", "\\fbox")):
        cleaned = boxed
    cleaned = _clean_for_numbers(cleaned)
    cleaned = re.sub(r"\\text\{[^{}]*\}|\\%|%", " ", cleaned)
    cleaned = re.sub(r"(?:\s+[A-Za-z]+\.?)+$", "", " " + cleaned).strip()  # trailing unit words
    cleaned = cleaned.rstrip(".").replace(",", "").replace(" ", "")
    if not _FULL_NUMBER.fullmatch(cleaned):
        return None
    numerator_text, _, denominator_text = cleaned.partition("/")
    numerator = Fraction(numerator_text)
    if denominator_text:
        denominator = Fraction(denominator_text)
        if denominator == 0:
            return None
        return numerator / denominator
    return numerator


def is_correct(prediction: str | None, reference: str, benchmark: str) -> bool:
    """Whether an extracted answer matches the reference answer.

    ``prediction`` None (nothing extracted) is wrong. Numeric benchmarks compare exact
    values; MATH benchmarks use ``math_answers_equivalent``. Never raises on str content;
    an unparseable prediction is wrong. A numeric reference that is not a number raises
    ValueError (that is a data error, not a model error).
    """
    grader = grader_for(benchmark)
    if not isinstance(reference, str):
        raise ValueError(f"reference must be a str, got {type(reference).__name__}")
    if prediction is None:
        return False
    if not isinstance(prediction, str):
        raise ValueError(f"prediction must be a str or None, got {type(prediction).__name__}")
    return grader.equivalent(prediction, reference)


def numbers_equal(prediction: str, reference: str) -> bool:
    """Numeric grading: both answers as exact numbers; an unparseable prediction is wrong, a
    reference that is not a number raises ValueError."""
    expected = parse_number(reference)
    if expected is None:
        raise ValueError(f"reference {reference!r} is not a number")
    return parse_number(prediction) == expected


def grade(output: str, reference: str, benchmark: str) -> bool:
    """``is_correct(extract_answer(output, benchmark), reference, benchmark)``."""
    return is_correct(extract_answer(output, benchmark), reference, benchmark)


def _cut_and_extract(extract: Callable[[str], str | None]) -> Callable[[str], str | None]:
    """A reader of the end of an output, a base model's continuation into a new question cut first."""
    return lambda text: extract(_cut_continuation(text)[-MAX_SEARCH_CHARS:])


register_grader(Grader("gsm8k", _cut_and_extract(_extract_number_answer), numbers_equal))
for _name in ("math500", "math"):
    register_grader(Grader(_name, _cut_and_extract(_extract_math_answer), math_answers_equivalent))
