"""The sympy side of MATH answer grading, run as a child process from its file path (imports sympy only).

Protocol: after importing sympy the worker prints ``ready``; then, per request line
``[prediction_ast, reference_ast]`` (JSON of the tuple ASTs of
``mechsteer.grading.latex.parse_latex``) it prints ``true``, ``false`` or ``null`` (the
comparison raised). The parent enforces the time limit by killing this process, so nothing
here needs a timeout. The client is ``mechsteer.grading.sympy_client.SympyWorker``.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import sympy

AST = tuple


def _as_tuples(value: Any) -> Any:
    return tuple(_as_tuples(item) for item in value) if isinstance(value, list) else value


def serve() -> None:
    """Answer comparison requests on stdin until it closes."""
    replies = sys.stdout
    # Anything else that prints (a library warning) goes to stderr, not into the protocol.
    sys.stdout = sys.stderr
    replies.write("ready\n")
    replies.flush()
    for line in sys.stdin:
        try:
            ast_pred, ast_ref = _as_tuples(json.loads(line))
            result: bool | None = compare(ast_pred, ast_ref)
        except Exception:  # noqa: BLE001  (the sandbox boundary: any failure means "unknown")
            result = None
        replies.write(json.dumps(result) + "\n")
        replies.flush()


# Probe points for identity testing: irregular, of both signs, distinct per symbol, as
# 50-digit floats (exact rationals would make sympy factor huge integers in x^(p/q)).
_PROBE_POINTS = (
    ("5371/10000", "-12793/10000", "21134/10000", "-3187/1000"),
    ("17713/10000", "3319/10000", "-8461/10000", "2417/1000"),
    ("-24417/10000", "11287/10000", "6173/10000", "-1379/1000"),
    ("9124/10000", "26651/10000", "-15532/10000", "4111/1000"),
    ("-7043/10000", "-4481/10000", "13399/10000", "-2203/1000"),
)
_MIN_VALID_PROBES = 3
_DIGITS = 40  # working precision of numeric checks
_RELATIVE_TOLERANCE = sympy.Rational(1, 10**25)


def compare(ast_pred: AST, ast_ref: AST) -> bool:
    """Whether two ASTs denote the same value, expression, or equation."""
    if (ast_pred[0] == "eq") != (ast_ref[0] == "eq"):
        return False
    if ast_pred[0] == "eq":
        # Equations are equivalent when their (lhs - rhs) differ by a constant nonzero factor.
        left = _to_sympy(ast_pred[1]) - _to_sympy(ast_pred[2])
        right = _to_sympy(ast_ref[1]) - _to_sympy(ast_ref[2])
        ratios = [
            values[0]
            for values in _probe([left / right], left.free_symbols | right.free_symbols)
        ]
        if len(ratios) < _MIN_VALID_PROBES or _is_zero(ratios[0]):
            return False
        return all(_close(ratio, ratios[0]) for ratio in ratios)
    prediction = _to_sympy(ast_pred)
    reference = _to_sympy(ast_ref)
    if prediction == reference:
        return True
    infinities = (sympy.oo, -sympy.oo, sympy.zoo, sympy.nan)
    if prediction.has(*infinities) or reference.has(*infinities):
        return False
    if prediction.is_Rational and reference.is_Rational:
        return False  # exact and already known to differ
    symbols = prediction.free_symbols | reference.free_symbols
    if not symbols:
        return _close(prediction, reference)
    rows = _probe([prediction, reference], symbols)
    if len(rows) < _MIN_VALID_PROBES:
        return False
    return all(_close(value_pred, value_ref) for value_pred, value_ref in rows)


def _close(value: Any, target: Any) -> bool:
    """|value - target| <= 1e-25 max(1, |target|), evaluated to 40 significant digits."""
    difference = sympy.N(value - target, _DIGITS)
    scale = sympy.N(target, _DIGITS)
    if not (difference.is_number and scale.is_number):
        return False
    return bool(abs(difference) <= _RELATIVE_TOLERANCE * max(1, abs(scale)))


def _is_zero(value: Any) -> bool:
    return bool(abs(sympy.N(value, _DIGITS)) <= _RELATIVE_TOLERANCE)


def _probe(expressions: list[Any], symbols: set[Any]) -> list[tuple[Any, ...]]:
    """The expressions' values at each probe point where all of them are finite numbers."""
    ordered = sorted(symbols, key=lambda symbol: symbol.name)
    rows: list[tuple[Any, ...]] = []
    for point in _PROBE_POINTS:
        substitution = {
            symbol: sympy.Float(sympy.Rational(point[index % len(point)]) + index // len(point), _DIGITS + 10)
            for index, symbol in enumerate(ordered)
        }
        row = tuple(expression.subs(substitution) for expression in expressions)
        if all(value.is_number and value.is_finite for value in row):
            rows.append(row)
    return rows


def _to_sympy(ast: AST) -> Any:
    kind = ast[0]
    if kind == "num":
        return sympy.Rational(ast[1])
    if kind == "sym":
        name = ast[1]
        if name == "e":
            return sympy.E
        if name == "i":
            return sympy.I
        return sympy.Symbol(name)
    if kind == "const":
        return {"pi": sympy.pi, "oo": sympy.oo}[ast[1]]
    if kind == "neg":
        return -_to_sympy(ast[1])
    if kind == "add":
        return sympy.Add(*[_to_sympy(child) for child in ast[1]])
    if kind == "mul":
        return sympy.Mul(*[_to_sympy(child) for child in ast[1]])
    if kind == "div":
        return _to_sympy(ast[1]) / _to_sympy(ast[2])
    if kind == "pow":
        return sympy.Pow(_to_sympy(ast[1]), _to_sympy(ast[2]))
    if kind == "sqrt":
        return sympy.sqrt(_to_sympy(ast[1]))
    if kind == "root":
        return sympy.root(_to_sympy(ast[1]), _to_sympy(ast[2]))
    if kind == "abs":
        return sympy.Abs(_to_sympy(ast[1]))
    if kind == "fact":
        return sympy.factorial(_to_sympy(ast[1]))
    if kind == "binom":
        return sympy.binomial(_to_sympy(ast[1]), _to_sympy(ast[2]))
    if kind == "log":
        return sympy.log(_to_sympy(ast[1]), _to_sympy(ast[2]))
    if kind == "func":
        functions = {
            "sin": sympy.sin, "cos": sympy.cos, "tan": sympy.tan, "cot": sympy.cot,
            "sec": sympy.sec, "csc": sympy.csc, "arcsin": sympy.asin, "arccos": sympy.acos,
            "arctan": sympy.atan, "sinh": sympy.sinh, "cosh": sympy.cosh, "tanh": sympy.tanh,
            "log": sympy.log, "ln": sympy.log, "exp": sympy.exp,
        }
        return functions[ast[1]](_to_sympy(ast[2]))
    raise ValueError(f"unknown AST node {kind!r}")


if __name__ == "__main__":
    serve()
