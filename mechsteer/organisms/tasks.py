"""Procedural multi-step arithmetic word problems for the model organisms.

A problem starts from a two-digit count and applies ``n_steps`` additions or
subtractions of small operands; every running total stays in [10, 99], so each step
is "two-digit ± one-digit" (learnable by a ~1M-parameter model) while answering in
one shot needs all steps at once (which it mostly cannot do).

Splits are fixed and disjoint for every seed: a problem's split is decided by a hash
of its arithmetic (start value and operations, not its names or wording), so the same
computation can never appear in two splits, whatever seed generated them.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field

SPLITS: tuple[str, ...] = ("train", "validation", "test")
SPLIT_SIZES: dict[str, int] = {"train": 40_000, "validation": 500, "test": 1_000}
# Hash buckets out of 20 assigned to each split (train 90%, validation 5%, test 5%).
_SPLIT_BUCKETS: dict[str, range] = {"train": range(0, 18), "validation": range(18, 19), "test": range(19, 20)}
# The splits use 3-4 steps: one-shot answers rarely succeed, step-by-step ones usually do.
SPLIT_STEPS: tuple[int, ...] = (3, 4)
MIN_STEPS, MAX_STEPS = 2, 5
MIN_TOTAL, MAX_TOTAL = 10, 99

NAMES: tuple[str, ...] = ("Ann", "Ben", "Cara", "Dan", "Eva", "Finn", "Gus", "Hana")
ITEMS: tuple[str, ...] = ("apples", "coins", "cards", "books", "shells", "pens")
ADD_PHRASES: tuple[str, ...] = ("gets {n}", "buys {n}")
SUB_PHRASES: tuple[str, ...] = ("eats {n}", "loses {n}")


@dataclass(frozen=True)
class OrganismProblem:
    """One word problem. ``metadata`` holds n_steps, start, operands, signs, totals."""

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


def sample_problem(
    rng: random.Random, problem_id: str, *, n_steps: int, max_operand: int = 9
) -> OrganismProblem:
    """Sample one problem with ``n_steps`` operations of size 1..``max_operand``."""
    if not MIN_STEPS <= n_steps <= MAX_STEPS:
        raise ValueError(f"n_steps must be in [{MIN_STEPS}, {MAX_STEPS}], got {n_steps}")
    if not 1 <= max_operand <= 9:
        raise ValueError(f"max_operand must be in [1, 9] (one-digit operands), got {max_operand}")
    while True:
        start = rng.randint(20, 89)
        total = start
        totals = [start]
        signed: list[int] = []
        for _ in range(n_steps):
            operand = rng.randint(1, max_operand)
            sign = rng.choice((1, -1))
            if not MIN_TOTAL <= total + sign * operand <= MAX_TOTAL:
                sign = -sign  # flip rather than resample, keeps both signs common
            total += sign * operand
            signed.append(sign * operand)
            totals.append(total)
        if all(MIN_TOTAL <= value <= MAX_TOTAL for value in totals):
            break
    name = rng.choice(NAMES)
    item = rng.choice(ITEMS)
    phrases = [
        rng.choice(ADD_PHRASES if operand > 0 else SUB_PHRASES).format(n=abs(operand))
        for operand in signed
    ]
    question = f"{name} has {start} {item}, " + ", ".join(phrases) + ". How many now?"
    metadata = {
        "n_steps": n_steps,
        "start": start,
        "operands": [abs(operand) for operand in signed],
        "signs": ["+" if operand > 0 else "-" for operand in signed],
        "totals": totals,
        "max_operand": max_operand,
    }
    return OrganismProblem(id=problem_id, question=question, answer=total, metadata=metadata)


def generate_split(split: str, seed: int = 0, n: int | None = None) -> list[OrganismProblem]:
    """The ``n`` problems (default ``SPLIT_SIZES[split]``) of a split, deterministic in ``seed``."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    count = SPLIT_SIZES[split] if n is None else n
    if count < 0:
        raise ValueError(f"n must be non-negative, got {n}")
    rng = random.Random(f"organism-{split}-{seed}")
    problems: list[OrganismProblem] = []
    seen: set[tuple[int, ...]] = set()
    while len(problems) < count:
        candidate = sample_problem(rng, "", n_steps=rng.choice(SPLIT_STEPS))
        signed = tuple(
            operand if sign == "+" else -operand
            for operand, sign in zip(candidate.metadata["operands"], candidate.metadata["signs"], strict=True)
        )
        key = (candidate.metadata["start"], *signed)
        if key in seen or split_of(candidate.metadata["start"], signed) != split:
            continue
        seen.add(key)
        problems.append(
            OrganismProblem(
                id=f"{split}-{seed}-{len(problems):05d}",
                question=candidate.question,
                answer=candidate.answer,
                metadata=candidate.metadata,
            )
        )
    return problems
