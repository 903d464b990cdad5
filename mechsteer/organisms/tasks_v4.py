"""Grammar v4's word problems: the v1-v3 multi-day problem, some with a condition from one day on.

"Gus has 38 pens. Each day Gus buys 4. From day 3 Gus eats 6 instead. How many after 4 days?"
Every running total stays in [10, 99]; the condition's day is 2..n and from that day on the
operation is the opposite of the daily one, with its own one-digit operand. A share
`CONDITION_SHARE` of the problems carries a condition: a step-by-step writer that does not re-read
the question before that day keeps the daily operation and gets the answer wrong. The condition
holds from its day on (not on that day only) so that *where* it is applied matters: additions
commute, so a one-day change applied on any day would give the same answer.

Splits are disjoint for every seed, as in tasks.py: a problem's split is a hash of its
arithmetic (start, daily signed operand, days, condition), so no computation is in two splits.
The condition makes the space of computations too large to enumerate, so a split is drawn: a
seeded stream of computations, each kept if its hash falls in the split and it is new.
"""

from __future__ import annotations

import hashlib
import random
from functools import cache

from mechsteer.organisms.tasks import (
    ADD_VERBS,
    ITEMS,
    MAX_OPERAND,
    MAX_TOTAL,
    MIN_TOTAL,
    NAMES,
    RESERVED_TEST_FROM,
    SPLIT_STEPS,
    SPLITS,
    SUB_VERBS,
    OrganismProblem,
)

CONDITION_SHARE = 0.4
V4_SPLIT_STEPS: tuple[int, ...] = SPLIT_STEPS
# Problems per split (the test split's first RESERVED_TEST_FROM are served; the rest are reserved).
V4_SPLIT_SIZES: dict[str, int] = {"train": 6000, "validation": 400, "test": 2 * RESERVED_TEST_FROM}
_SPLIT_BUCKETS: dict[str, range] = {"train": range(0, 14), "validation": range(14, 16), "test": range(16, 20)}
# One daily step and one condition: (start, daily signed operand, days, condition day or 0, condition operand).
Computation = tuple[int, int, int, int, int]


def _sign(signed: int) -> str:
    return "+" if signed > 0 else "-"


def v4_split_of(computation: Computation) -> str:
    """The split of a computation (seed-independent, so splits never overlap)."""
    key = "v4:" + ",".join(str(value) for value in computation)
    bucket = int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "big") % 20
    for split, buckets in _SPLIT_BUCKETS.items():
        if bucket in buckets:
            return split
    raise AssertionError("hash buckets do not cover 0..19")


def signed_steps(computation: Computation) -> list[int]:
    """The signed operand of each day: the daily one, the condition's from its day on."""
    _, daily, n_steps, condition_day, condition_operand = computation
    opposite = -condition_operand if daily > 0 else condition_operand
    return [opposite if condition_day and day >= condition_day else daily for day in range(1, n_steps + 1)]


def make_v4_problem(problem_id: str, computation: Computation, *, name: str, item: str, verb_index: int = 0
                    ) -> OrganismProblem:
    """The problem of ``computation``; metadata as tasks.make_problem's plus the condition's day and operand."""
    start, daily, n_steps, condition_day, condition_operand = computation
    if not 1 <= abs(daily) <= MAX_OPERAND or (condition_day and not 1 <= condition_operand <= MAX_OPERAND):
        raise ValueError(f"operands must be one-digit and non-zero, got {computation}")
    if condition_day and not 2 <= condition_day <= n_steps:
        raise ValueError(f"the condition's day must be in [2, {n_steps}], got {condition_day}")
    steps = signed_steps(computation)
    totals = [start]
    for step in steps:
        totals.append(totals[-1] + step)
    if not all(MIN_TOTAL <= total <= MAX_TOTAL for total in totals):
        raise ValueError(f"running totals {totals} leave [{MIN_TOTAL}, {MAX_TOTAL}]")
    verbs, opposite_verbs = (ADD_VERBS, SUB_VERBS) if daily > 0 else (SUB_VERBS, ADD_VERBS)
    question = f"{name} has {start} {item}. Each day {name} {verbs[verb_index % 2]} {abs(daily)}."
    if condition_day:
        question += f" From day {condition_day} {name} {opposite_verbs[verb_index % 2]} {condition_operand} instead."
    question += f" How many after {n_steps} days?"
    metadata = {
        "n_steps": n_steps, "start": start, "operands": [abs(step) for step in steps],
        "signs": [_sign(step) for step in steps], "totals": totals,
        "condition_day": condition_day, "condition_operand": condition_operand if condition_day else 0,
        "daily_operand": abs(daily), "daily_sign": _sign(daily),
    }
    return OrganismProblem(id=problem_id, question=question, answer=totals[-1], metadata=metadata)


def _draw(rng: random.Random) -> Computation | None:
    start, n_steps = rng.randint(MIN_TOTAL, MAX_TOTAL), rng.choice(V4_SPLIT_STEPS)
    daily = rng.choice([*range(-MAX_OPERAND, 0), *range(1, MAX_OPERAND + 1)])
    condition_day, condition_operand = 0, 0
    if rng.random() < CONDITION_SHARE:
        condition_day, condition_operand = rng.randint(2, n_steps), rng.randint(1, MAX_OPERAND)
    computation = (start, daily, n_steps, condition_day, condition_operand)
    total = start
    for step in signed_steps(computation):
        total += step
        if not MIN_TOTAL <= total <= MAX_TOTAL:
            return None
    return computation


@cache
def _split_computations(split: str, seed: int) -> tuple[Computation, ...]:
    rng = random.Random(f"organism-v4-{split}-{seed}")
    found: dict[Computation, None] = {}
    while len(found) < V4_SPLIT_SIZES[split]:
        computation = _draw(rng)
        if computation is not None and v4_split_of(computation) == split:
            found.setdefault(computation, None)
    return tuple(found)


def generate_v4_split(split: str, seed: int = 0, n: int | None = None) -> list[OrganismProblem]:
    """``n`` problems (default: `V4_SPLIT_SIZES`) of a v4 split, deterministic in ``seed``."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    available = V4_SPLIT_SIZES[split]
    count = available if n is None else n
    if not 0 <= count <= available:
        raise ValueError(f"n must be in [0, {available}] for v4 split {split!r}, got {n}")
    rng = random.Random(f"organism-v4-names-{split}-{seed}")
    return [
        make_v4_problem(f"v4-{split}-{seed}-{index:05d}", computation, name=rng.choice(NAMES),
                        item=rng.choice(ITEMS), verb_index=rng.randrange(2))
        for index, computation in enumerate(_split_computations(split, seed)[:count])
    ]


__all__ = ["CONDITION_SHARE", "V4_SPLIT_SIZES", "generate_v4_split", "make_v4_problem", "signed_steps", "v4_split_of"]
