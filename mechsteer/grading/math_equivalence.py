"""Deciding whether two MATH-style LaTeX answers are equivalent, without an LLM judge.

``math_answers_equivalent(prediction, reference)`` runs three stages, cheapest first:

1. ``normalize_math_answer``: the usual MATH normalisation (``\\left``/``\\right``,
   ``\\dfrac``/``\\tfrac``, spaces, units, ``^\\circ``, ``\\%``, ``\\$``, ``x=`` prefixes,
   ``\\text{}``, ``\\frac12``, ``a/b``, ``.5``, thousands separators, mixed numbers).
   Equal strings are equivalent.
2. Structure: matrices are compared cell by cell, tuples and intervals element by element
   with matching brackets, sets and bare comma lists as unordered collections, and an
   answer with one ``\\pm`` as the two values it stands for.
3. Scalars: a small recursive-descent parser of our own (``mechsteer.grading.latex``) turns
   LaTeX into a tuple AST (no ``eval``, no antlr4). Pure rational arithmetic is compared exactly in-process with
   ``Fraction``. Anything else (radicals, pi, symbols, functions, ``i``, ``e``) goes to
   sympy in a child process (``mechsteer.grading.sympy_worker``, driven by
   ``mechsteer.grading.sympy_client``) under a hard per-call timeout:
   constants agree to 1e-25 relative at 40 digits, expressions at five fixed probe points,
   equations when their ``lhs - rhs`` have a constant nonzero ratio.

Never hanging and never crashing: answers are length-capped before any regex; the parser
caps nesting depth, node count and literal length, and refuses numeric exponents above
``MAX_EXPONENT``, constant powers above ``MAX_RESULT_DIGITS`` digits, power towers higher
than ``MAX_TOWER_HEIGHT`` and big factorials (so ``9^{9^{9}}`` never reaches sympy).
Whatever still runs long is killed: the parent waits for the child's reply with ``select``
and a deadline, kills the child on timeout and starts a fresh one on the next call. This is
thread-safe (a lock serialises calls), needs no signals (so works off the main thread and
inside pytest), needs no ``__main__`` guard (a plain subprocess, not ``multiprocessing``),
and survives a child crash. Anything the parser or sympy cannot handle, or that times out,
counts as "not equivalent".
"""

from __future__ import annotations

import re
from fractions import Fraction
from typing import Any

from mechsteer.grading.latex import LatexParseError, parse_latex, rational_value
from mechsteer.grading.sympy_client import SYMPY_TIMEOUT_S, sympy_equal

MAX_ANSWER_CHARS = 2000  # longer answers are compared only verbatim
MAX_ITEMS = 24  # elements of a tuple, set or matrix


# ---------------------------------------------------------------------------------------
# Normalisation

_UNIT_WORDS = (
    "cm|mm|km|m|meters?|metres?|centimeters?|kilometers?|inch|inches|in|feet|foot|ft|yards?|"
    "yds?|miles?|mi|units?|degrees?|deg|radians?|dollars?|cents?|hours?|hrs?|minutes?|mins?|"
    "seconds?|secs?|days?|weeks?|months?|years?|mph|pounds?|lbs?|ounces?|oz|gallons?|"
    "liters?|litres?|grams?|g|kg|students?|people|persons?|ways|points?|square|sq|cubic"
)
_TRAILING_TEXT_UNIT = re.compile(
    r"^(?P<value>.*?[^\s\\])\s*\\(?:text|mbox|textrm|mathrm)\s*\{\s*[a-zA-Z][a-zA-Z .]*\}"
    r"\s*(?:\^\s*\{?\s*[23]\s*\}?)?\s*$"
)
_TRAILING_BARE_UNIT = re.compile(
    # A space before each unit word (so "5m" stays 5*m) also keeps the regex linear.
    r"^(?P<value>.*?[\d}])(?:\s+(?:" + _UNIT_WORDS + r")\b\.?)+(?:\^\s*\{?\s*[23]\s*\}?)?\s*$"
)
_TEXT_WRAPPER = re.compile(
    r"\\(?:text|textbf|textit|textrm|textnormal|mbox|mathrm|mathbf|mathit|mathsf|operatorname)"
    r"\s*\{([^{}]*)\}"
)
_VARIABLE_PREFIX = re.compile(
    r"^\s*(?:[a-zA-Z]|\\[a-zA-Z]+)(?:_\{?\w{1,3}\}?)?\s*(?:=|\\in(?![a-zA-Z]))\s*(?P<rest>.+)$"
)
_THOUSANDS = re.compile(r"^-?\d{1,3}(?:,\d{3})+(?:\.\d+)?$")
_MIXED_NUMBER = re.compile(r"^(-?)(\d+)\\frac\{(\d+)\}\{(\d+)\}$")


def normalize_math_answer(text: str) -> str:
    """The canonical string form of a MATH answer (see the module docstring).

    Idempotent on well-formed answers; never raises on a str. Answers longer than ``MAX_ANSWER_CHARS`` are only
    stripped.
    """
    answer = text.strip()
    if len(answer) > MAX_ANSWER_CHARS:
        return answer
    if answer.startswith(("\\boxed", "\\fbox")):
        # A whole-answer box ("\\boxed{5}") is its content.
        inner = _whole_box_content(answer)
        if inner is not None:
            answer = inner.strip()
    answer = re.sub(r"[\x00-\x08\x0b-\x1f]", "", answer).replace("\n", " ")
    answer = answer.replace("\\$", "").replace("$", "")
    # \( \) \[ \] delimiters and spacing commands; the lookbehind spares a matrix row break.
    answer = re.sub(r"(?<!\\)\\[\[\]()]", "", answer)
    answer = re.sub(r"\\(?:displaystyle|quad|qquad)(?![a-zA-Z])|(?<!\\)\\[!,;:> ]|~", " ", answer)
    answer = re.sub(r"\\(?:left|right|bigl|bigr|Bigl|Bigr|big|Big)(?![a-zA-Z])", "", answer)
    answer = re.sub(r"\\[dt]frac(?![a-zA-Z])", r"\\frac", answer)
    answer = re.sub(r"\\[dt]binom(?![a-zA-Z])", r"\\binom", answer)
    answer = answer.replace("\u2212", "-").replace("\u00b0", "")
    answer = re.sub(r"\^\s*\{\s*\\circ\s*\}|\^\s*\\circ(?![a-zA-Z])|\\circ(?![a-zA-Z])|\\degree", "", answer)
    answer = answer.replace("\\%", "").replace("%", "")
    for _ in range(3):
        stripped = _TRAILING_TEXT_UNIT.sub(r"\g<value>", answer)
        stripped = _TRAILING_BARE_UNIT.sub(r"\g<value>", stripped)
        if stripped == answer:
            break
        answer = stripped
    answer = _TEXT_WRAPPER.sub(r"\1", answer)
    prefix = _VARIABLE_PREFIX.match(answer)
    if prefix and "=" not in prefix.group("rest"):
        answer = prefix.group("rest")
    answer = _fix_command_arguments(answer)
    # Keep one space only where it separates a command from a following letter (\cot x).
    answer = re.sub(r"(\\[a-zA-Z]+)\s+(?=[a-zA-Z])", "\\1\x00", answer)
    answer = re.sub(r"\s+", "", answer).replace("\x00", " ")
    answer = re.sub(r"_\{(\w{1,6})\}", r"_\1", answer)
    if answer.endswith(".") and not answer.endswith(".."):
        answer = answer[:-1]
    answer = re.sub(r"(?<![\d.])\.(\d)", r"0.\1", answer)
    answer = re.sub(r"(\d\.\d*?[1-9])0+(?![\d])", r"\1", answer)
    answer = re.sub(r"(\d)\.0+(?![\d])", r"\1", answer)
    if _THOUSANDS.match(answer):
        answer = answer.replace(",", "")
    answer = re.sub(r"(?<![\w.}^])(\d{1,30})/(\d{1,30})(?![\d.])", r"\\frac{\1}{\2}", answer)
    mixed = _MIXED_NUMBER.match(answer)
    if mixed:
        sign, whole, numerator, denominator = mixed.groups()
        if int(denominator) != 0:
            value = int(whole) + Fraction(int(numerator), int(denominator))
            answer = f"{sign}\\frac{{{value.numerator}}}{{{value.denominator}}}"
            if value.denominator == 1:
                answer = f"{sign}{value.numerator}"
    # Inside a longer answer an integer glued to a numeric fraction is still a mixed number.
    answer = re.sub(r"(?<![\d.}^_])(\d+)\\frac\{(\d+)\}\{(\d+)\}", r"(\1+\\frac{\2}{\3})", answer)
    choice = re.fullmatch(r"\(([A-Ea-e])\)", answer)
    if choice:
        answer = choice.group(1).upper()
    return answer


def _whole_box_content(text: str) -> str | None:
    """The content of ``\\boxed{...}`` when that box spans all of ``text``, else None."""
    command = re.match(r"\\(?:boxed|fbox)\s*(?=\{)", text)
    if command is None:
        return None
    argument, end = _read_argument(text, command.end())
    return argument if argument is not None and end == len(text) else None


def _fix_command_arguments(text: str) -> str:
    """Brace the arguments of ``\\frac``, ``\\sqrt`` and ``\\binom``: ``\\frac12`` -> ``\\frac{1}{2}``."""
    if "\\" not in text:
        return text
    out: list[str] = []
    position = 0
    pattern = re.compile(r"\\(frac|binom|sqrt)(?![a-zA-Z])")
    while True:
        found = pattern.search(text, position)
        if found is None:
            out.append(text[position:])
            return "".join(out)
        out.append(text[position : found.end()])
        position = found.end()
        n_args = 1 if found.group(1) == "sqrt" else 2
        if found.group(1) == "sqrt":
            rest = text[position:].lstrip(" ")
            if rest.startswith("["):
                close = rest.find("]")
                if close < 0:
                    continue
                out.append(rest[: close + 1])
                position = len(text) - len(rest) + close + 1
        for _ in range(n_args):
            argument, position = _read_argument(text, position)
            if argument is None:
                break
            out.append("{" + _fix_command_arguments(argument) + "}")


def _read_argument(text: str, position: int) -> tuple[str | None, int]:
    """One TeX macro argument at ``position``: a braced group or a single character/command."""
    while position < len(text) and text[position] == " ":
        position += 1
    if position >= len(text):
        return None, position
    char = text[position]
    if char == "{":
        depth = 0
        for end in range(position, len(text)):
            if text[end] == "{":
                depth += 1
            elif text[end] == "}":
                depth -= 1
                if depth == 0:
                    return text[position + 1 : end], end + 1
        return None, position
    if char == "\\":
        command = re.match(r"\\[a-zA-Z]+", text[position:])
        if command:
            return command.group(0), position + command.end()
        return None, position
    if char.isalnum():
        return char, position + 1
    return None, position


# ---------------------------------------------------------------------------------------
# Structure: matrices, tuples/intervals, sets and lists, \pm

_OPENERS = {"(": ")", "[": "]", "{": "}"}
_CLOSERS = {")", "]", "}"}


def _split_top_level(text: str, separator: str) -> list[str]:
    """Split on ``separator`` outside any brackets (``\\{`` and ``\\}`` count as brackets)."""
    parts: list[str] = []
    depth = 0
    start = 0
    position = 0
    while position < len(text):
        if text.startswith("\\{", position) or text.startswith("\\}", position):
            depth += 1 if text[position + 1] == "{" else -1
            position += 2
            continue
        char = text[position]
        if char in _OPENERS:
            depth += 1
        elif char in _CLOSERS:
            depth -= 1
        elif depth == 0 and text.startswith(separator, position):
            parts.append(text[start:position])
            position += len(separator)
            start = position
            continue
        position += 1
    parts.append(text[start:])
    return parts


def _encloses(text: str) -> bool:
    """True if the bracket opened by the first character closes at the last character."""
    depth = 0
    for position, char in enumerate(text):
        if char in _OPENERS:
            depth += 1
        elif char in _CLOSERS:
            depth -= 1
            if depth == 0:
                return position == len(text) - 1
    return False


_MATRIX = re.compile(
    r"^\\begin\{(?P<env>[pbvBV]?matrix|array)\}(?:\{[^{}]*\})?(?P<body>.*)\\end\{(?P=env)\}$"
)


def _structure(answer: str) -> tuple[str, Any]:
    """Classify a normalised answer: ("matrix", rows), ("seq", (open, close, items)),
    ("union", parts), ("unordered", items) or ("scalar", text)."""
    matrix = _MATRIX.match(answer)
    if matrix:
        rows = [row for row in matrix.group("body").split("\\\\") if row != ""]
        return "matrix", [row.split("&") for row in rows]
    if "\\cup" in answer:
        parts = _split_top_level(answer, "\\cup")
        if len(parts) > 1:
            return "union", parts
    if answer.startswith("\\{") and answer.endswith("\\}"):
        return "unordered", _expand_plus_minus(_split_top_level(answer[2:-2], ","))
    if len(answer) >= 2 and answer[0] in "([" and answer[-1] in ")]" and _encloses(answer):
        items = _split_top_level(answer[1:-1], ",")
        if len(items) > 1:
            return "seq", (answer[0], answer[-1], items)
    items = _split_top_level(answer, ",")
    if len(items) > 1:
        return "unordered", _expand_plus_minus(items)
    expanded = _expand_plus_minus([answer])
    if len(expanded) > 1:
        return "unordered", expanded
    return "scalar", answer


def _expand_plus_minus(items: list[str]) -> list[str]:
    """Replace each item holding exactly one ``\\pm`` (or ``\\mp``) by the two values it means."""
    expanded: list[str] = []
    for item in items:
        for sign_command, first, second in (("\\pm", "+", "-"), ("\\mp", "-", "+")):
            if item.count(sign_command) == 1 and item.count("\\pm") + item.count("\\mp") == 1:
                expanded += [item.replace(sign_command, first), item.replace(sign_command, second)]
                break
        else:
            expanded.append(item)
    return expanded


def math_answers_equivalent(
    prediction: str, reference: str, *, timeout_s: float = SYMPY_TIMEOUT_S
) -> bool:
    """Whether two MATH answers (box contents, not whole solutions) are equivalent."""
    if prediction.strip() == reference.strip():
        return True
    if len(prediction) > MAX_ANSWER_CHARS or len(reference) > MAX_ANSWER_CHARS:
        return False
    return _equivalent(normalize_math_answer(prediction), normalize_math_answer(reference), timeout_s)


def _equivalent(prediction: str, reference: str, timeout_s: float) -> bool:
    if prediction == reference:
        return True
    kind_pred, body_pred = _structure(prediction)
    kind_ref, body_ref = _structure(reference)
    # A one-element set is its element: \{5\} and 5.
    if kind_pred == "unordered" and len(body_pred) == 1 and kind_ref == "scalar":
        kind_pred, body_pred = "scalar", normalize_math_answer(body_pred[0])
    if kind_ref == "unordered" and len(body_ref) == 1 and kind_pred == "scalar":
        kind_ref, body_ref = "scalar", normalize_math_answer(body_ref[0])
    if kind_pred != kind_ref:
        return False
    if kind_pred == "scalar":
        return _scalars_equal(body_pred, body_ref, timeout_s)
    if kind_pred == "matrix":
        if len(body_pred) != len(body_ref) or any(
            len(row_pred) != len(row_ref) for row_pred, row_ref in zip(body_pred, body_ref, strict=True)
        ):
            return False
        cells = [(a, b) for row_pred, row_ref in zip(body_pred, body_ref, strict=True) for a, b in zip(row_pred, row_ref, strict=True)]
        if len(cells) > MAX_ITEMS:
            return False
        return all(_item_equal(a, b, timeout_s) for a, b in cells)
    if kind_pred == "seq":
        open_pred, close_pred, items_pred = body_pred
        open_ref, close_ref, items_ref = body_ref
        if (open_pred, close_pred) != (open_ref, close_ref) or len(items_pred) != len(items_ref):
            return False
        if len(items_pred) > MAX_ITEMS:
            return False
        return all(_item_equal(a, b, timeout_s) for a, b in zip(items_pred, items_ref, strict=True))
    if kind_pred == "union":
        if len(body_pred) != len(body_ref) or len(body_pred) > MAX_ITEMS:
            return False
        return all(_equivalent(a, b, timeout_s) for a, b in zip(body_pred, body_ref, strict=True))
    # Unordered: match every predicted item to a distinct reference item.
    if len(body_pred) != len(body_ref) or len(body_pred) > MAX_ITEMS:
        return False
    unmatched = list(body_ref)
    for item in body_pred:
        for index, candidate in enumerate(unmatched):
            if _item_equal(item, candidate, timeout_s):
                del unmatched[index]
                break
        else:
            return False
    return True


def _item_equal(prediction: str, reference: str, timeout_s: float) -> bool:
    # Items may carry their own "x=" prefixes ("x=1,y=2"), so normalise them again.
    return _equivalent(normalize_math_answer(prediction), normalize_math_answer(reference), timeout_s)


def _scalars_equal(prediction: str, reference: str, timeout_s: float) -> bool:
    if prediction == reference:
        return True
    if prediction == "" or reference == "":
        return False
    if re.fullmatch(r"[A-Za-z]{2,}", prediction) and re.fullmatch(r"[A-Za-z]{2,}", reference):
        return prediction.lower() == reference.lower()
    if prediction.count("=") != reference.count("=") or prediction.count("=") > 1:
        return False
    try:
        ast_pred = parse_latex(prediction)
        ast_ref = parse_latex(reference)
    except LatexParseError:
        return False
    if ast_pred[0] != "eq":
        rational_pred = rational_value(ast_pred)
        rational_ref = rational_value(ast_ref)
        if rational_pred is not None and rational_ref is not None:
            return rational_pred == rational_ref
    result = sympy_equal(ast_pred, ast_ref, timeout_s)
    return result is True
