"""Deciding whether two MATH-style LaTeX answers are equivalent, without an LLM judge.

``math_answers_equivalent(prediction, reference)`` runs three stages, cheapest first:

1. ``normalize_math_answer``: the usual MATH normalisation (``\\left``/``\\right``,
   ``\\dfrac``/``\\tfrac``, spaces, units, ``^\\circ``, ``\\%``, ``\\$``, ``x=`` prefixes,
   ``\\text{}``, ``\\frac12``, ``a/b``, ``.5``, thousands separators, mixed numbers).
   Equal strings are equivalent.
2. Structure: matrices are compared cell by cell, tuples and intervals element by element
   with matching brackets, sets and bare comma lists as unordered collections, and an
   answer with one ``\\pm`` as the two values it stands for.
3. Scalars: a small recursive-descent parser of our own turns LaTeX into a tuple AST (no
   ``eval``, no antlr4). Pure rational arithmetic is compared exactly in-process with
   ``Fraction``. Anything else (radicals, pi, symbols, functions, ``i``, ``e``) goes to
   sympy in a child process (``mechsteer.grading.sympy_worker``) under a hard per-call timeout:
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

import atexit
import json
import logging
import math
import os
import re
import select
import subprocess
import sys
import threading
import time
from fractions import Fraction
from functools import lru_cache
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

MAX_ANSWER_CHARS = 2000  # longer answers are compared only verbatim
MAX_PARSE_CHARS = 400  # longer scalars are not parsed
MAX_DEPTH = 24  # nesting depth of the parser
MAX_NODES = 300  # AST nodes per expression
MAX_EXPONENT = 1000  # |numeric exponent|
MAX_FACTORIAL = 500
MAX_RESULT_DIGITS = 5000  # decimal digits of a constant power
MAX_TOWER_HEIGHT = 2  # x^{y^{z}} is refused: sympy can take minutes on such towers
MAX_LITERAL_DIGITS = 60
MAX_ITEMS = 24  # elements of a tuple, set or matrix
SYMPY_TIMEOUT_S = 3.0
WORKER_START_TIMEOUT_S = 120.0

AST = tuple  # nested tuples: ("num", "3.5"), ("add", (a, b)), ...


class LatexParseError(ValueError):
    """The string is not a LaTeX expression this parser understands (or is too big)."""


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
    result = _sympy_equal(ast_pred, ast_ref, timeout_s)
    return result is True


# ---------------------------------------------------------------------------------------
# LaTeX -> AST

_TOKEN = re.compile(
    r"(?P<number>\d+(?:\.\d+)?)|(?P<command>\\[a-zA-Z]+|\\[{}|])|(?P<letter>[a-zA-Z])"
    r"|(?P<symbol>[-+*/^_()\[\]{}|!=,])|(?P<space>\s+)|(?P<other>.)"
)
_FUNCTIONS = {
    "sin", "cos", "tan", "cot", "sec", "csc", "arcsin", "arccos", "arctan", "sinh", "cosh",
    "tanh", "log", "ln", "exp",
}
_CONSTANTS = {"pi": "pi", "infty": "oo", "infinity": "oo"}
_GREEK = {
    "alpha", "beta", "gamma", "delta", "epsilon", "varepsilon", "zeta", "eta", "theta",
    "vartheta", "iota", "kappa", "lambda", "mu", "nu", "xi", "rho", "sigma", "tau", "phi",
    "varphi", "chi", "psi", "omega", "Gamma", "Delta", "Theta", "Lambda", "Sigma", "Phi",
    "Psi", "Omega",
}
_MULTIPLY = {"\\cdot", "\\times", "*", "\\ast"}
_DIVIDE = {"/", "\\div"}


class _Parser:
    """Recursive descent over LaTeX tokens. Grammar (loosest first):

    relation := expr ('=' expr)?
    expr     := ['+'|'-'] term (('+'|'-') term)*
    term     := unary ((mul|div) unary | <implicit> power)*
    unary    := ('-'|'+') unary | power
    power    := postfix ('^' exponent)?        (right-associative)
    postfix  := atom '!'*
    atom     := number | letter[_sub] | (expr) | [expr] | {expr} | |expr| | \\frac | \\sqrt
              | \\binom | constant | greek | function argument
    """

    def __init__(self, text: str) -> None:
        tokens: list[tuple[str, str]] = []
        for match in _TOKEN.finditer(text):
            kind = match.lastgroup
            value = match.group(0)
            if kind == "space":
                continue
            if kind == "other":
                raise LatexParseError(f"unexpected character {value!r}")
            if kind == "number" and len(value) > MAX_LITERAL_DIGITS:
                raise LatexParseError("number literal too long")
            tokens.append((kind, value))
        if not tokens:
            raise LatexParseError("empty expression")
        self.tokens = tokens
        self.position = 0
        self.depth = 0
        self.nodes = 0

    # -- helpers
    def peek(self) -> tuple[str, str] | None:
        return self.tokens[self.position] if self.position < len(self.tokens) else None

    def peek_value(self) -> str | None:
        token = self.peek()
        return token[1] if token else None

    def take(self) -> tuple[str, str]:
        token = self.peek()
        if token is None:
            raise LatexParseError("unexpected end of expression")
        self.position += 1
        return token

    def expect(self, value: str) -> None:
        token = self.take()
        if token[1] != value:
            raise LatexParseError(f"expected {value!r}, found {token[1]!r}")

    def node(self, *parts: Any) -> AST:
        self.nodes += 1
        if self.nodes > MAX_NODES:
            raise LatexParseError("expression too large")
        return tuple(parts)

    def enter(self) -> None:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise LatexParseError("expression nested too deeply")

    # -- grammar
    def parse(self) -> AST:
        left = self.expr()
        if self.peek_value() == "=":
            self.take()
            right = self.expr()
            left = self.node("eq", left, right)
        if self.peek() is not None:
            raise LatexParseError(f"unexpected token {self.peek_value()!r}")
        return left

    def expr(self) -> AST:
        self.enter()
        terms: list[AST] = []
        sign = 1
        if self.peek_value() in ("+", "-"):
            sign = -1 if self.take()[1] == "-" else 1
        term = self.term()
        terms.append(term if sign == 1 else self.node("neg", term))
        while self.peek_value() in ("+", "-"):
            operator = self.take()[1]
            term = self.term()
            terms.append(term if operator == "+" else self.node("neg", term))
        self.depth -= 1
        return terms[0] if len(terms) == 1 else self.node("add", tuple(terms))

    def term(self) -> AST:
        factors = [self.unary()]
        while True:
            value = self.peek_value()
            if value in _MULTIPLY:
                self.take()
                factors.append(self.unary())
            elif value in _DIVIDE:
                self.take()
                factors = [self.node("div", self.product(factors), self.unary())]
            elif self.starts_atom():
                factors.append(self.power())
            else:
                return self.product(factors)

    def product(self, factors: list[AST]) -> AST:
        return factors[0] if len(factors) == 1 else self.node("mul", tuple(factors))

    def unary(self) -> AST:
        value = self.peek_value()
        if value in ("-", "+"):
            self.take()
            self.enter()
            operand = self.unary()
            self.depth -= 1
            return operand if value == "+" else self.node("neg", operand)
        return self.power()

    def power(self) -> AST:
        base = self.postfix()
        if self.peek_value() == "^":
            self.take()
            self.enter()
            exponent = self.exponent()
            self.depth -= 1
            return self.node("pow", base, exponent)
        return base

    def exponent(self) -> AST:
        token = self.peek()
        if token is None:
            raise LatexParseError("missing exponent")
        if token[1] == "{":
            return self.group("{", "}")
        if token[0] == "number":
            # TeX takes one character: x^23 is x^2 * 3.
            self.take()
            digits = token[1]
            if len(digits) > 1:
                self.tokens.insert(self.position, ("number", digits[1:]))
            return self.node("num", digits[0])
        if token[1] in ("-", "+"):
            # x^-1: not valid TeX but common in model output.
            return self.unary()
        return self.postfix()

    def postfix(self) -> AST:
        result = self.atom()
        while self.peek_value() == "!":
            self.take()
            result = self.node("fact", result)
        return result

    def starts_atom(self) -> bool:
        token = self.peek()
        if token is None:
            return False
        kind, value = token
        if kind in ("number", "letter"):
            return True
        if value in ("(", "[", "{"):
            return True
        if kind == "command":
            name = value[1:]
            return (
                name in ("frac", "sqrt", "binom")
                or name in _CONSTANTS
                or name in _GREEK
                or name in _FUNCTIONS
            )
        return False

    def group(self, opener: str, closer: str) -> AST:
        self.expect(opener)
        inner = self.expr()
        self.expect(closer)
        return inner

    def atom(self) -> AST:
        kind, value = self.take()
        if kind == "number":
            return self.node("num", value)
        if kind == "letter":
            name = value
            if self.peek_value() == "_":
                self.take()
                name += "_" + self.subscript()
            return self.node("sym", name)
        if value in ("(", "[", "{"):
            self.position -= 1
            return self.group(value, {"(": ")", "[": "]", "{": "}"}[value])
        if value == "|":
            self.enter()
            inner = self.expr()
            self.depth -= 1
            self.expect("|")
            return self.node("abs", inner)
        if kind != "command":
            raise LatexParseError(f"unexpected token {value!r}")
        name = value[1:]
        if name == "frac":
            numerator = self.group("{", "}")
            denominator = self.group("{", "}")
            return self.node("div", numerator, denominator)
        if name == "binom":
            top = self.group("{", "}")
            bottom = self.group("{", "}")
            return self.node("binom", top, bottom)
        if name == "sqrt":
            if self.peek_value() == "[":
                index = self.group("[", "]")
                radicand = self.group("{", "}")
                return self.node("root", radicand, index)
            return self.node("sqrt", self.group("{", "}"))
        if name in _CONSTANTS:
            return self.node("const", _CONSTANTS[name])
        if name in _GREEK:
            return self.node("sym", name)
        if name in _FUNCTIONS:
            return self.function(name)
        raise LatexParseError(f"unsupported command {value!r}")

    def subscript(self) -> str:
        token = self.take()
        if token[1] == "{":
            parts = []
            while self.peek_value() not in ("}", None):
                part = self.take()
                if part[0] not in ("number", "letter"):
                    raise LatexParseError("unsupported subscript")
                parts.append(part[1])
            self.expect("}")
            if not parts:
                raise LatexParseError("empty subscript")
            return "".join(parts)
        if token[0] == "number":
            digits = token[1]
            if len(digits) > 1:
                self.tokens.insert(self.position, ("number", digits[1:]))
            return digits[0]
        if token[0] == "letter":
            return token[1]
        raise LatexParseError("unsupported subscript")

    def function(self, name: str) -> AST:
        power: AST | None = None
        base: AST | None = None
        if name == "log" and self.peek_value() == "_":
            self.take()
            token = self.peek()
            if token is not None and token[1] == "{":
                base = self.group("{", "}")
            else:
                base = self.atom()
        if self.peek_value() == "^":
            # \sin^2 x means (\sin x)^2.
            self.take()
            power = self.exponent()
        self.enter()
        if self.peek_value() in ("(", "{", "["):
            opener = self.peek_value()
            argument = self.group(opener, {"(": ")", "[": "]", "{": "}"}[opener])
        else:
            argument = self.power()
        self.depth -= 1
        result = self.node("func", name, argument) if base is None else self.node("log", argument, base)
        return result if power is None else self.node("pow", result, power)


def parse_latex(text: str) -> AST:
    """Parse a normalised LaTeX scalar (or one equation) into a tuple AST.

    Raises ``LatexParseError`` on anything unsupported, too long, too deep, too big, or with
    an exponent or factorial large enough to make sympy hang.
    """
    if len(text) > MAX_PARSE_CHARS:
        raise LatexParseError("expression too long")
    ast = _Parser(text).parse()
    _check_magnitudes(ast)
    if _tower_height(ast) > MAX_TOWER_HEIGHT:
        raise LatexParseError("power tower too high")
    return ast


def _tower_height(ast: AST) -> int:
    """How many powers are stacked in exponents: x^2 is 1, x^{y^2} is 2."""
    if ast[0] == "pow":
        return max(_tower_height(ast[1]), 1 + _tower_height(ast[2]))
    return max((_tower_height(child) for child in _children(ast)), default=0)


def _children(ast: AST) -> list[AST]:
    """The sub-expressions of a node: ("add", (a, b)) and ("div", a, b) both give [a, b]."""
    children: list[AST] = []
    for part in ast[1:]:
        if isinstance(part, tuple) and part and isinstance(part[0], str):
            children.append(part)
        elif isinstance(part, tuple):
            children.extend(part)
    return children


def _check_magnitudes(ast: AST) -> None:
    """Reject numeric exponents beyond ``MAX_EXPONENT`` and factorials beyond ``MAX_FACTORIAL``."""
    kind = ast[0]
    if kind == "pow":
        exponent = _float_value(ast[2])
        if exponent is not None and not abs(exponent) <= MAX_EXPONENT:
            raise LatexParseError("exponent too large")
        base = _float_value(ast[1])
        if exponent is not None and base is not None:
            # Bound the size of the exact result: at most MAX_RESULT_DIGITS decimal digits.
            if not abs(exponent) * math.log10(max(2.0, abs(base))) <= MAX_RESULT_DIGITS:
                raise LatexParseError("power too large")
    if kind in ("fact", "binom"):
        argument = _float_value(ast[1])
        if argument is None or not abs(argument) <= MAX_FACTORIAL:
            raise LatexParseError("factorial/binomial argument too large or symbolic")
    for child in _children(ast):
        _check_magnitudes(child)


def _float_value(ast: AST) -> float | None:
    """A float estimate of a constant AST (inf when it overflows); None when symbolic."""
    try:
        return _float_eval(ast)
    except (OverflowError, ZeroDivisionError, ValueError):
        return math.inf


def _float_eval(ast: AST) -> float | None:
    kind = ast[0]
    if kind == "num":
        return float(ast[1])
    if kind == "const":
        return {"pi": math.pi, "oo": math.inf}.get(ast[1], math.inf)
    if kind == "sym":
        return {"e": math.e}.get(ast[1])
    if kind == "neg":
        value = _float_eval(ast[1])
        return None if value is None else -value
    if kind in ("add", "mul"):
        values = [_float_eval(child) for child in ast[1]]
        if any(value is None for value in values):
            return None
        if kind == "add":
            return math.fsum(values)  # type: ignore[arg-type]
        product = 1.0
        for value in values:
            product *= value  # type: ignore[operator]
        return product
    if kind == "div":
        numerator, denominator = _float_eval(ast[1]), _float_eval(ast[2])
        if numerator is None or denominator is None:
            return None
        return numerator / denominator
    if kind == "pow":
        base, exponent = _float_eval(ast[1]), _float_eval(ast[2])
        if base is None or exponent is None:
            return None
        if abs(exponent) > MAX_EXPONENT:
            return math.inf
        return math.pow(abs(base), exponent)
    if kind in ("sqrt", "abs"):
        value = _float_eval(ast[1])
        return None if value is None else math.sqrt(abs(value))
    if kind == "fact":
        value = _float_eval(ast[1])
        return None if value is None else math.exp(math.lgamma(abs(value) + 1))
    if kind == "binom":
        top = _float_eval(ast[1])
        return None if top is None else math.exp(math.lgamma(abs(top) + 1))  # an upper bound
    return None


def rational_value(ast: AST) -> Fraction | None:
    """The exact value of pure rational arithmetic, or None (symbols, radicals, huge powers)."""
    kind = ast[0]
    if kind == "num":
        return Fraction(ast[1])
    if kind == "neg":
        value = rational_value(ast[1])
        return None if value is None else -value
    if kind in ("add", "mul"):
        values = [rational_value(child) for child in ast[1]]
        if any(value is None for value in values):
            return None
        if kind == "add":
            return sum(values, Fraction(0))  # type: ignore[arg-type]
        product = Fraction(1)
        for value in values:
            product *= value  # type: ignore[operator]
        return product
    if kind == "div":
        numerator, denominator = rational_value(ast[1]), rational_value(ast[2])
        if numerator is None or denominator is None or denominator == 0:
            return None
        return numerator / denominator
    if kind == "pow":
        base, exponent = rational_value(ast[1]), rational_value(ast[2])
        if base is None or exponent is None or exponent.denominator != 1:
            return None
        if base == 0 and exponent < 0:
            return None
        bits = max(abs(base.numerator), base.denominator).bit_length()
        if abs(exponent) > MAX_EXPONENT or bits * abs(exponent) > 20_000:
            return None
        return base ** int(exponent)
    return None


# ---------------------------------------------------------------------------------------
# The sympy worker process (client side; the server is mechsteer/grading/sympy_worker.py)


def _sympy_equal(ast_pred: AST, ast_ref: AST, timeout_s: float) -> bool | None:
    return _cached_sympy_equal(ast_pred, ast_ref, timeout_s)


@lru_cache(maxsize=8192)
def _cached_sympy_equal(ast_pred: AST, ast_ref: AST, timeout_s: float) -> bool | None:
    return SYMPY_WORKER.compare(ast_pred, ast_ref, timeout_s)


class SympyWorker:
    """A ``python -m mechsteer.grading.sympy_worker`` child process, killed and replaced on timeout.

    A plain subprocess (not ``multiprocessing``) so that the caller's ``__main__`` is never
    re-imported and no ``if __name__ == "__main__"`` guard is needed. Requests and replies are
    JSON lines over the child's stdin/stdout; the parent waits with ``select`` (POSIX only).

    ``compare`` returns True/False, or None when the comparison timed out, the child crashed
    or could not start; the caller treats None as "not equivalent".
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._process: subprocess.Popen[bytes] | None = None
        self._buffer = b""
        self.calls = 0
        self.timeouts = 0
        self.starts = 0

    def _ensure_started(self) -> bool:
        if self._process is not None and self._process.poll() is None:
            return True
        self._stop()
        environment = dict(os.environ)
        # The child must import this very package, even if it is not installed.
        package_root = str(Path(__file__).resolve().parents[1])
        environment["PYTHONPATH"] = os.pathsep.join(
            part for part in (package_root, environment.get("PYTHONPATH")) if part
        )
        try:
            self._process = subprocess.Popen(
                [sys.executable, "-m", "mechsteer.grading.sympy_worker"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                env=environment,
            )
        except OSError as error:
            logger.warning("cannot start the sympy grading worker: %s", error)
            self._process = None
            return False
        self.starts += 1
        try:
            ready = self._read_line(time.monotonic() + WORKER_START_TIMEOUT_S)
        except (EOFError, OSError):
            ready = None
        if ready != b"ready":
            logger.warning("the sympy grading worker did not start (got %r)", ready)
            self._stop()
            return False
        return True

    def _read_line(self, deadline: float) -> bytes | None:
        """One line from the child, or None at the deadline; EOFError if the child died."""
        assert self._process is not None and self._process.stdout is not None
        descriptor = self._process.stdout.fileno()
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            readable, _, _ = select.select([descriptor], [], [], remaining)
            if not readable:
                return None
            chunk = os.read(descriptor, 65536)
            if not chunk:
                raise EOFError("the sympy worker exited")
            self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line

    def _stop(self) -> None:
        process, self._process, self._buffer = self._process, None, b""
        if process is None:
            return
        if process.poll() is None:
            process.kill()
        process.wait(timeout=10)
        for stream in (process.stdin, process.stdout):
            if stream is not None:
                stream.close()

    def compare(self, ast_pred: AST, ast_ref: AST, timeout_s: float) -> bool | None:
        with self._lock:
            self.calls += 1
            if not self._ensure_started():
                return None
            assert self._process is not None and self._process.stdin is not None
            request = json.dumps([ast_pred, ast_ref]).encode("utf-8") + b"\n"
            try:
                self._process.stdin.write(request)
                self._process.stdin.flush()
                reply = self._read_line(time.monotonic() + timeout_s)
            except (EOFError, OSError):
                self._stop()
                return None
            if reply is None:
                self.timeouts += 1
                logger.info("sympy comparison timed out after %.1f s; restarting worker", timeout_s)
                self._stop()
                return None
            try:
                result = json.loads(reply)
            except ValueError:
                # The protocol is out of step (should not happen: the child keeps its stdout
                # for replies only); start afresh.
                self._stop()
                return None
            return result if isinstance(result, bool) else None

    def close(self) -> None:
        with self._lock:
            self._stop()


SYMPY_WORKER = SympyWorker()
atexit.register(SYMPY_WORKER.close)
