"""Check a mapping of settings against a dataclass's type hints, before any work starts.

Every field's annotation says what it takes: ``int``, ``float``, ``bool``, ``str``, ``None``,
``Literal`` choices, ``list[...]``, ``dict[..., ...]``, unions (``int | None``), and
``Annotated[T, Range(...)]`` / ``Annotated[list[T], NonEmpty()]`` for ranges. A field added
later is checked by its annotation alone. Nothing is coerced: ``"no"`` is not a bool, ``"10"``
is not an int, ``1`` is not a list, ``True`` is not a number.

:func:`check_fields` returns every :class:`Problem` found; ``kind`` tells a value of the wrong
type (``"type"``) from a value of the right type outside what the field allows (``"value"``:
an unknown choice or a number out of range).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal, get_args, get_origin, get_type_hints

ProblemKind = Literal["type", "value"]


@dataclass(frozen=True)
class Problem:
    key: str  # the field, with an index for list items: "n_latents[2]"
    message: str  # a full sentence about the value, e.g. "n_eval = 'ten' is not an int"
    kind: ProblemKind


@dataclass(frozen=True)
class Range:
    """A number within ``[min, max]`` (either bound may be open)."""

    min: float | None = None
    max: float | None = None

    def problem(self, value: Any) -> str | None:
        if self.min is not None and value < self.min:
            return f"must be >= {_bound(self.min)}"
        if self.max is not None and value > self.max:
            return f"must be <= {_bound(self.max)}"
        return None


def _bound(value: float) -> str:
    return str(value) if isinstance(value, int) else f"{value:g}"


@dataclass(frozen=True)
class Registered:
    """A name in a registry (``names()``, read when the value is checked): a plug-in's names count."""

    names: Callable[[], Sequence[str]]
    key: str  # the key as the message names it
    listing: str  # what the registered names are called
    full_message = True  # the message names the key itself

    def problem(self, value: Any) -> str | None:
        known = list(self.names())
        return None if value in known else f"unknown {self.key} {value!r}; {self.listing}: {known}"


@dataclass(frozen=True)
class NonEmpty:
    """A list (or string) with at least one item."""

    def problem(self, value: Any) -> str | None:
        return "must not be empty" if len(value) == 0 else None


def describe(hint: Any) -> str:
    """A type hint as a person reads it: ``list[float]``, ``int | None``, ``one of 'a', 'b'``."""
    origin = get_origin(hint)
    if origin is Annotated:
        return describe(get_args(hint)[0])
    if origin is Literal:
        return "one of " + ", ".join(repr(choice) for choice in get_args(hint))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(describe(arg) for arg in get_args(hint))
    if origin is list:
        return f"list[{describe(get_args(hint)[0])}]" if get_args(hint) else "list"
    if origin is dict:
        args = get_args(hint)
        return f"dict[{describe(args[0])}, {describe(args[1])}]" if args else "dict"
    if hint is type(None) or hint is None:
        return "None"
    if hint is Any:
        return "any value"
    return getattr(hint, "__name__", str(hint))


def _is_not(shown: str, hint: Any) -> str:
    """``"x = 1 is not a str"``, ``"... is not an int"``, ``"... is not one of 'a', 'b'"``."""
    text = describe(hint)
    if text.startswith("one of"):
        return f"{shown} is not {text}"
    return f"{shown} is not {'an' if text[:1] in 'aeiou' else 'a'} {text}"


def _number_text_hint(value: Any) -> str:
    """A hint for YAML's 1e-3, which YAML 1.1 (PyYAML) reads as text."""
    if isinstance(value, str):
        try:
            float(value)
        except ValueError:
            return ""
        return " (it is text: YAML reads 1e-3 as a string; write 1.0e-3)"
    return ""


def check_value(key: str, value: Any, hint: Any) -> list[Problem]:
    """Problems of ``value`` against ``hint`` (empty when it fits)."""
    origin = get_origin(hint)
    shown = f"{key} = {value!r}"
    if origin is Annotated:
        inner, *constraints = get_args(hint)
        problems = check_value(key, value, inner)
        if problems:
            return problems
        for constraint in constraints:
            message = constraint.problem(value) if hasattr(constraint, "problem") else None
            if message:
                return [Problem(key, message if getattr(constraint, "full_message", False) else f"{shown} {message}",
                                "value")]
        return []
    if hint is Any:
        return []
    if hint is type(None) or hint is None:
        return [] if value is None else [Problem(key, f"{shown} must be null", "type")]
    if origin is Literal:
        choices = get_args(hint)
        # Literal choices compare by type too: True is not the choice 1, "1" is not 1.
        if any(type(value) is type(choice) and value == choice for choice in choices):
            return []
        expected = ", ".join(repr(choice) for choice in choices)
        if all(isinstance(choice, str) for choice in choices) and not isinstance(value, str):
            return [Problem(key, _is_not(shown, hint), "type")]
        return [Problem(key, f"unknown {key} {value!r}; expected one of {expected}", "value")]
    if origin in (typing.Union, types.UnionType):
        options = get_args(hint)
        found = [check_value(key, value, option) for option in options]
        if any(not problems for problems in found):
            return []
        # Report the option whose type fits and whose value does not (e.g. a number out of range).
        for problems in found:
            if problems and all(problem.kind == "value" for problem in problems):
                return problems
        return [Problem(key, f"{_is_not(shown, hint)}{_number_text_hint(value)}", "type")]
    if origin is list:
        if not isinstance(value, list):
            return [Problem(key, _is_not(shown, hint), "type")]
        (item_hint,) = get_args(hint) or (Any,)
        problems = []
        for index, item in enumerate(value):
            problems += check_value(f"{key}[{index}]", item, item_hint)
        return problems
    if origin is dict:
        if not isinstance(value, dict):
            return [Problem(key, _is_not(shown, hint), "type")]
        key_hint, value_hint = get_args(hint) or (Any, Any)
        problems = []
        for item_key, item in value.items():
            problems += check_value(f"{key} key", item_key, key_hint)
            problems += check_value(f"{key}[{item_key!r}]", item, value_hint)
        return problems
    if hint is bool:
        return [] if isinstance(value, bool) else [Problem(key, f"{shown} is not a bool (true or false)", "type")]
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return []
        return [Problem(key, f"{shown} is not an int{_number_text_hint(value)}", "type")]
    if hint is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            if isinstance(value, float) and not math.isfinite(value):
                return [Problem(key, f"{shown} is not a finite number", "value")]
            return []
        return [Problem(key, f"{shown} is not a number{_number_text_hint(value)}", "type")]
    if hint is str:
        return [] if isinstance(value, str) else [Problem(key, f"{shown} is not a str", "type")]
    if isinstance(hint, type):
        return [] if isinstance(value, hint) else [Problem(key, _is_not(shown, hint), "type")]
    return []  # a hint this checker does not know is left to the code that reads the value


def field_hints(cls: type) -> dict[str, Any]:
    """The dataclass's fields and their resolved annotations (``Annotated`` kept)."""
    hints = get_type_hints(cls, include_extras=True)
    return {field.name: hints[field.name] for field in dataclasses.fields(cls)}


def required_fields(cls: type) -> list[str]:
    return [field.name for field in dataclasses.fields(cls)
            if field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING]


def check_fields(cls: type, data: Mapping[str, Any], *, partial: bool = False, noun: str = "keys") -> list[Problem]:
    """Every problem of ``data`` as the fields of dataclass ``cls``: unknown keys, missing
    required ones (unless ``partial``), and each value against its annotation. ``noun`` names
    the keys in messages ("config keys")."""
    hints = field_hints(cls)
    problems = []
    unknown = sorted(set(data) - set(hints), key=str)
    if unknown:
        problems.append(Problem(str(unknown[0]), f"unknown {noun} {unknown}; known {noun}: {sorted(hints)}", "type"))
    if not partial:
        missing = [name for name in required_fields(cls) if name not in data]
        if missing:
            problems.append(Problem(missing[0], f"missing required {noun} {missing}", "type"))
    for key, value in data.items():
        if key in hints:
            problems += check_value(str(key), value, hints[key])
    return problems


def join_problems(problems: list[Problem]) -> str:
    return "; ".join(problem.message for problem in problems)


__all__ = ["NonEmpty", "Problem", "ProblemKind", "Range", "check_fields", "check_value", "describe",
           "field_hints", "join_problems", "required_fields"]
