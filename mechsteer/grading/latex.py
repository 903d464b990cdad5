"""A small LaTeX expression parser of our own (no ``eval``, no antlr4): LaTeX -> tuple AST.

``parse_latex`` turns a normalised MATH scalar (or one equation) into nested tuples such as
``("add", (("num", "1"), ("div", ("num", "1"), ("num", "2"))))``; ``rational_value`` evaluates
pure rational arithmetic exactly. The ASTs are what the sympy worker
(``mechsteer.grading.sympy_worker``) compares.

Never hanging: the parser caps the input length, nesting depth, node count and literal length,
and refuses numeric exponents above ``MAX_EXPONENT``, constant powers above
``MAX_RESULT_DIGITS`` digits, power towers higher than ``MAX_TOWER_HEIGHT`` and big factorials
(so ``9^{9^{9}}`` never reaches sympy).
"""

from __future__ import annotations

import math
import re
from fractions import Fraction
from typing import Any

MAX_PARSE_CHARS = 400  # longer scalars are not parsed
MAX_DEPTH = 24  # nesting depth of the parser
MAX_NODES = 300  # AST nodes per expression
MAX_EXPONENT = 1000  # |numeric exponent|
MAX_FACTORIAL = 500
MAX_RESULT_DIGITS = 5000  # decimal digits of a constant power
MAX_TOWER_HEIGHT = 2  # x^{y^{z}} is refused: sympy can take minutes on such towers
MAX_LITERAL_DIGITS = 60

AST = tuple  # nested tuples: ("num", "3.5"), ("add", (a, b)), ...


class LatexParseError(ValueError):
    """The string is not a LaTeX expression this parser understands (or is too big)."""


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
            assert kind is not None  # every alternative of the token pattern is a named group
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
            assert opener is not None
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
        maybe_values = [rational_value(child) for child in ast[1]]
        values = [value for value in maybe_values if value is not None]
        if len(values) != len(maybe_values):
            return None
        if kind == "add":
            return sum(values, Fraction(0))
        product = Fraction(1)
        for value in values:
            product *= value
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

