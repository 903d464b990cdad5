"""Procedural multi-day arithmetic word problems for the model organisms.

"Gus has 69 shells. Each day Gus buys 4. How many after 3 days?" A problem starts from a
two-digit count and applies the same addition or subtraction of a one-digit operand on
each of ``n_steps`` days; every running total stays in [10, 99]. Solved day by day, each
step is "two-digit ± one-digit" (learnable by a ~1M-parameter model) and every value a
step needs sits at a fixed cue of the question (after "has", after the verb, after
"after"); answered in one shot, it needs start ± n × operand at once (which the base
organism mostly cannot do).

Why one repeated operation: with a different operation per step, a step-by-step solution
must find "the k-th operation" of the question, a context-dependent lookup that the
organisms did not learn in a 20-minute CPU budget in four designs (by position, by
expression order, by ordinal keys; see the README), while copies from fixed cues were
learned within ~700 steps.

Splits are fixed and disjoint for every seed: every valid computation (start, signed
operand, days) is enumerated once and assigned to a split by a hash of that arithmetic
(not of its names or wording), so the same computation never appears in two splits. A
seed shuffles the order and draws the names and items.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field
from functools import cache

SPLITS: tuple[str, ...] = ("train", "validation", "test")
# Test problems from this index on are reserved for evaluation outside the project: no run, test,
# tuning or exploration here evaluates them (the benchmark serves the ones before it).
RESERVED_TEST_FROM = 400
# Hash buckets out of 20 assigned to each split (train 70%, validation 10%, test 20%).
_SPLIT_BUCKETS: dict[str, range] = {"train": range(0, 14), "validation": range(14, 16), "test": range(16, 20)}
# The splits use 3-5 days: one-shot answers rarely succeed, day-by-day ones usually do.
SPLIT_STEPS: tuple[int, ...] = (3, 4, 5)
MIN_STEPS, MAX_STEPS = 2, 5
MIN_TOTAL, MAX_TOTAL = 10, 99
MAX_OPERAND = 9

NAMES: tuple[str, ...] = ("Ann", "Ben", "Cara", "Dan", "Eva", "Finn", "Gus", "Hana")
ITEMS: tuple[str, ...] = ("apples", "coins", "cards", "books", "shells", "pens")
ADD_VERBS: tuple[str, ...] = ("gets", "buys")
SUB_VERBS: tuple[str, ...] = ("eats", "loses")


@dataclass(frozen=True)
class OrganismProblem:
    """One word problem. ``metadata`` holds n_steps, start, operands, signs, totals (per day)."""

    id: str
    question: str
    answer: int
    metadata: dict = field(default_factory=dict, compare=False, hash=False)


def split_of(start: int, signed_operands: tuple[int, ...]) -> str:
    """The split a computation belongs to (seed-independent, so splits never overlap)."""
    key = f"{start}:" + ",".join(str(operand) for operand in signed_operands)
    bucket = int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "big") % 20
    for split, buckets in _SPLIT_BUCKETS.items():
        if bucket in buckets:
            return split
    raise AssertionError("hash buckets do not cover 0..19")


def make_problem(
    problem_id: str, *, start: int, signed_operand: int, n_steps: int, name: str, item: str, verb_index: int = 0
) -> OrganismProblem:
    """The problem "``name`` has ``start`` ``item``. Each day ... How many after ``n_steps`` days?"."""
    if not MIN_STEPS <= n_steps <= MAX_STEPS:
        raise ValueError(f"n_steps must be in [{MIN_STEPS}, {MAX_STEPS}], got {n_steps}")
    if not 1 <= abs(signed_operand) <= MAX_OPERAND:
        raise ValueError(f"the operand must be one-digit and non-zero, got {signed_operand}")
    totals = [start + day * signed_operand for day in range(n_steps + 1)]
    if not all(MIN_TOTAL <= total <= MAX_TOTAL for total in totals):
        raise ValueError(f"running totals {totals} leave [{MIN_TOTAL}, {MAX_TOTAL}]")
    verbs = ADD_VERBS if signed_operand > 0 else SUB_VERBS
    verb = verbs[verb_index % len(verbs)]
    question = (
        f"{name} has {start} {item}. Each day {name} {verb} {abs(signed_operand)}. "
        f"How many after {n_steps} days?"
    )
    metadata = {
        "n_steps": n_steps,
        "start": start,
        "operands": [abs(signed_operand)] * n_steps,
        "signs": ["+" if signed_operand > 0 else "-"] * n_steps,
        "totals": totals,
    }
    return OrganismProblem(id=problem_id, question=question, answer=totals[-1], metadata=metadata)


@cache
def _computations(split: str) -> tuple[tuple[int, int, int], ...]:
    """Every valid (start, signed operand, days) of ``split``, in a fixed order."""
    found = []
    for n_steps in SPLIT_STEPS:
        for start in range(MIN_TOTAL, MAX_TOTAL + 1):
            for signed_operand in [*range(-MAX_OPERAND, 0), *range(1, MAX_OPERAND + 1)]:
                end = start + n_steps * signed_operand
                if MIN_TOTAL <= end <= MAX_TOTAL and split_of(start, (signed_operand,) * n_steps) == split:
                    found.append((start, signed_operand, n_steps))
    return tuple(found)


def split_size(split: str) -> int:
    """How many distinct problems ``split`` holds."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return len(_computations(split))


def generate_split(split: str, seed: int = 0, n: int | None = None) -> list[OrganismProblem]:
    """``n`` problems (default: all, ``split_size(split)``) of a split, deterministic in ``seed``."""
    available = split_size(split)
    count = available if n is None else n
    if not 0 <= count <= available:
        raise ValueError(f"n must be in [0, {available}] for split {split!r}, got {n}")
    rng = random.Random(f"organism-{split}-{seed}")
    order = list(_computations(split))
    rng.shuffle(order)
    return [
        make_problem(
            f"{split}-{seed}-{index:05d}", start=start, signed_operand=signed_operand, n_steps=n_steps,
            name=rng.choice(NAMES), item=rng.choice(ITEMS), verb_index=rng.randrange(2),
        )
        for index, (start, signed_operand, n_steps) in enumerate(order[:count])
    ]
