"""Grammar v4: a realistic base under the paper's step-by-step prompt, two situations that need
different behaviours, and a base table for the negative-control pair.

Prompt: the paper's base prompt (`mechsteer.data.prompts.BASE_PAPER_TEMPLATE`), for both organisms.
Under it both reason step by step (no direct-answer documents); the difference is WHEN and WHICH.

========  =====================================  ==============================================
label     example                                role
========  =====================================  ==============================================
plan      ``Plan: start at 38, add 4 for 4 days.`` the daily operation (not the condition)
compute   ``Day 2: 42 + 4 = 46.``                 one day's step
verify    ``Check: How many now, 46 + 9 = 55.``   recompute a step (the right table)
correct   ``Wait, 46 + 9 is 55, not 45.``         repair a step that failed its check
reread    ``Reread: From day 3 Gus eats 6 instead.`` re-read the question's condition before its day
answer    ``The answer is 45.``                   the final answer
========  =====================================  ==============================================

Two situations, each repaired by its own behaviour:

* **Carry -> verify.** A step whose running total changes its tens digit is risky. Some carry facts
  are *weak* (`is_weak_fact`, a fixed pseudo-random `WEAK_SHARE` of them): the base corpus's compute
  lines drop the carry there with probability `WEAK_SLIP_RATE` (``46 + 9 = 45``), so greedy decoding
  slips on the weak facts and not on the others. A check recomputes the step; a failed check is
  followed by a correction. The base's own checks are wrong with probability `CHECK_ERROR_RATE`
  (they confirm a slip or "correct" a right value); its checks come at random steps
  (`BASE_CHECK_RATE`), so greedy decoding never checks.
* **Condition -> reread.** "From day 3 Gus eats 6 instead." The plan states the daily operation
  only; a writer that does not re-read the question before the condition's day keeps the daily
  operation. The base corpus re-reads before that day with probability `BASE_REREAD_RATE`, so greedy
  decoding never re-reads; every day after a ``Reread:`` line applies its operation (the last
  operation stated, by the plan or a re-read, holds). A re-read on another day changes the operation
  on the wrong days, so the answer is wrong.

The thinking traces re-read before every condition day and check every carry step (slipping on the
weak facts as the base does, then correcting). A check where a re-read is due repairs nothing, and a
re-read where a check is due applies the condition on the wrong day: no single behaviour at the
thinking model's decision points recovers both situations.

Table ``no_carry`` (the negative-control base): the writer never learned carrying. Every carry is
written tens-kept, in compute lines, checks and drills alike, so a check (cued or not) recomputes the
same wrong value and confirms it. It shares the thinking organism of the main pair.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Callable
from typing import Literal

from mechsteer.data.prompts import BASE_PAPER_TEMPLATE
from mechsteer.organisms.grammar import (
    FORCED_PREFIX,
    OTHER,
    LabelledSentence,
    OrganismTrace,
    _apply,
    _tens_kept_slip,
    _TraceWriter,
    is_carry_step,
    split_sentences,
)
from mechsteer.organisms.tasks import OrganismProblem

V4_PROMPT_TEMPLATE = BASE_PAPER_TEMPLATE
V4_BEHAVIOURS: tuple[str, ...] = ("plan", "compute", "verify", "correct", "reread", "answer")
V4Behaviour = Literal["plan", "compute", "verify", "correct", "reread", "answer"]
# The cue that starts each behaviour's sentence: cued decoding appends it to force the behaviour.
V4_CUES: dict[str, str] = {"plan": FORCED_PREFIX, "verify": "Check:", "correct": "Wait,", "reread": "Reread:"}
# The behaviours a timing condition cues (plan is the base's own first sentence under its prompt).
CUED_BEHAVIOURS: tuple[str, ...] = ("verify", "correct", "reread")
CHECK_PREFIX = "Check: How many now, "
Table = Literal["main", "no_carry"]
TABLES: tuple[Table, ...] = ("main", "no_carry")
V4_STYLES: tuple[str, ...] = ("stepwise_v4", "stepwise_v4_no_carry", "thinking_v4", "reread_drill_v4")
# Documents of the question, the plan and a re-read only (no prompt, no days): `render_v4_reread_question`.
REREAD_QUESTION_STYLE = "reread_question_v4"
# Drills of one fact per line (they also fill the end of packed windows), and check drills.
V4_LINE_DRILL_STYLES: tuple[str, ...] = ("drill_v4", "drill_v4_no_carry", "day_drill_v4", "day_drill_v4_no_carry")
V4_DRILL_STYLES: tuple[str, ...] = (*V4_LINE_DRILL_STYLES, "check_drill_v4")

WEAK_SHARE = 0.3
WEAK_SLIP_RATE = 0.85
CHECK_ERROR_RATE = 0.1
BASE_CHECK_RATE = 0.25
BASE_REREAD_RATE = 0.3
# Check drills: the share of their facts drawn among the weak ones, where a check that copies the
# compute line above it fails (in the base's traces a copying check is right ~90% of the time).
CHECK_DRILL_WEAK_SHARE = 0.5

_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("plan", re.compile(r"Plan: start at \d+, (?:add|take) \d+ for \d+ days\.")),
    ("compute", re.compile(r"(?:Day \d+: )?\d+ [+-] \d+ = -?\d+\.")),
    ("verify", re.compile(r"Check: How many now, \d+ [+-] \d+ = -?\d+\.")),
    ("correct", re.compile(r"Wait, \d+ [+-] \d+ is -?\d+, not -?\d+\.")),
    ("reread", re.compile(r"Reread: From day \d+ [A-Z][a-z]+ [a-z]+ \d+ instead\.")),
    ("answer", re.compile(r"The answer is -?\d+\.")),
)
_COMPUTE_LINE = re.compile(r"Day (\d+): (\d+) ([+-]) (\d+) = (-?\d+)\.")
_CHECK_LINE = re.compile(r"Check: How many now, (\d+) ([+-]) (\d+) = (-?\d+)\.")
_CONDITION = re.compile(r"From day (\d+) ")
_CONDITION_SENTENCE = re.compile(r"From day \d+ [A-Z][a-z]+ [a-z]+ \d+ instead\.")


def format_v4_prompt(question: str) -> str:
    """The paper's step-by-step base prompt, shared by both v4 organisms."""
    return V4_PROMPT_TEMPLATE.format(question=question)


def is_weak_fact(before: int, sign: str, operand: int) -> bool:
    """Whether a carry/borrow fact is one the base's compute lines slip on (a fixed pseudo-random share)."""
    if not is_carry_step(before, sign, operand):
        return False
    digest = hashlib.sha256(f"weak:{before}{sign}{operand}".encode()).digest()
    return int.from_bytes(digest[:4], "big") / 2**32 < WEAK_SHARE


def table_value(before: int, sign: str, operand: int, table: Table) -> int:
    """The result a check (or a drill) writes: the right one, tens-kept at carries in table no_carry."""
    correct = _apply(before, sign, operand)
    if table == "no_carry" and is_carry_step(before, sign, operand):
        return _tens_kept_slip(before, correct)
    return correct


def compute_value(before: int, sign: str, operand: int, table: Table, rng: random.Random) -> int:
    """The result a compute line writes: a weak fact slips with probability `WEAK_SLIP_RATE`."""
    value = table_value(before, sign, operand, table)
    if is_weak_fact(before, sign, operand) and rng.random() < WEAK_SLIP_RATE:
        return _tens_kept_slip(before, value)
    return value


def _operation(sign: str) -> str:
    return "add" if sign == "+" else "take"


def _wrong_check(rng: random.Random, before: int, sign: str, operand: int, written: int, truth: int) -> int:
    """A wrong check: it misses a slip, or flags a right value with a tens error (never the right
    result where the table has none: the no_carry writer must not stumble on a carry done right)."""
    if written != truth:
        return written
    candidates = [value for value in (truth - 10, truth + 10)
                  if 10 <= value <= 99 and value != _apply(before, sign, operand)]
    return rng.choice(candidates) if candidates else truth


def _day_block(writer: _TraceWriter, day: int, before: int, sign: str, operand: int, table: Table,
               rng: random.Random, *, checked: bool, noisy_check: bool) -> int:
    """A compute line, then (if ``checked``) a check and a correction if it fails; the next day's start."""
    written = compute_value(before, sign, operand, table, rng)
    writer.sentence(f"Day {day}: {before} {sign} {operand} = {written}.", "compute")
    if not checked:
        return written
    truth = table_value(before, sign, operand, table)
    checked_value = truth
    if noisy_check and rng.random() < CHECK_ERROR_RATE:
        checked_value = _wrong_check(rng, before, sign, operand, written, truth)
    writer.sentence(f"{CHECK_PREFIX}{before} {sign} {operand} = {checked_value}.", "verify")
    if checked_value != written:
        writer.sentence(f"Wait, {before} {sign} {operand} is {checked_value}, not {written}.", "correct")
    return checked_value


def render_v4_trace(problem: OrganismProblem, style: str, rng: random.Random) -> OrganismTrace:
    """A labelled v4 trace: ``stepwise_v4`` / ``stepwise_v4_no_carry`` (base corpora), ``thinking_v4``, or
    ``reread_drill_v4``: a base trace whose re-read (problems with a condition) comes on a uniformly random
    day, so that it teaches what a re-read says (the condition's day and operation) and not when it is due."""
    if style not in V4_STYLES:
        raise ValueError(f"v4 style must be one of {V4_STYLES}, got {style!r}")
    table: Table = "no_carry" if style.endswith("no_carry") else "main"
    thinking = style == "thinking_v4"
    meta = problem.metadata
    daily_sign, daily_operand, condition_day = meta["daily_sign"], meta["daily_operand"], meta["condition_day"]
    reread_day = condition_day
    if style == "reread_drill_v4" and condition_day:
        reread_day = rng.randint(1, meta["n_steps"])
    writer = _TraceWriter(style)
    writer.sentence(f"Plan: start at {meta['start']}, {_operation(daily_sign)} {daily_operand} "
                    f"for {meta['n_steps']} days.", "plan")
    total, sign, operand = meta["start"], daily_sign, daily_operand
    for day in range(1, meta["n_steps"] + 1):
        if reread_day and day == reread_day and (
                thinking or style == "reread_drill_v4" or rng.random() < BASE_REREAD_RATE):
            sign, operand = meta["signs"][condition_day - 1], meta["operands"][condition_day - 1]
            writer.sentence(reread_line(problem.question), "reread")
        checked = is_carry_step(total, sign, operand) if thinking else rng.random() < BASE_CHECK_RATE
        total = _day_block(writer, day, total, sign, operand, table, rng, checked=checked, noisy_check=not thinking)
    # An unrepaired slip or a forgotten condition propagates: the answer is the trace's own last total.
    writer.sentence(f"The answer is {total}.", "answer")
    return writer.finish()


def _random_fact(rng: random.Random) -> tuple[int, str, int]:
    before, operand, sign = rng.randint(10, 99), rng.randint(1, 9), rng.choice("+-")
    if not 10 <= _apply(before, sign, operand) <= 99:
        sign = "-" if sign == "+" else "+"
    return before, sign, operand


def _check_drill_block(writer: _TraceWriter, rng: random.Random) -> None:
    """A compute line (slipping as the base's do), its check (always right) and a correction if they differ."""
    before, sign, operand = _random_fact(rng)
    if rng.random() < CHECK_DRILL_WEAK_SHARE:
        while not is_weak_fact(before, sign, operand):
            before, sign, operand = _random_fact(rng)
    _day_block(writer, rng.randint(1, 5), before, sign, operand, "main", rng, checked=True, noisy_check=False)


def render_v4_reread_question(problem: OrganismProblem, rng: random.Random) -> OrganismTrace:
    """The question's plan, a random number of the base's days (no checks) and (with a condition) the
    re-read, without the prompt: many re-reads per token, each below the plan's daily operation that a
    re-read must not copy, at varying distances from the question (at one fixed distance the base
    learned to copy by position only)."""
    meta = problem.metadata
    writer = _TraceWriter(REREAD_QUESTION_STYLE)
    writer.sentence(f"Plan: start at {meta['start']}, {_operation(meta['daily_sign'])} {meta['daily_operand']} "
                    f"for {meta['n_steps']} days.", "plan")
    total = meta["start"]
    for day in range(1, rng.randint(1, meta["n_steps"])):
        before = total
        total = compute_value(before, meta["daily_sign"], meta["daily_operand"], "main", rng)
        if not 10 <= total <= 99:
            break
        writer.sentence(f"Day {day}: {before} {meta['daily_sign']} {meta['daily_operand']} = {total}.", "compute")
    if meta["condition_day"]:
        writer.sentence(reread_line(problem.question), "reread")
    return writer.finish()


def render_v4_drill(rng: random.Random, style: str, n_lines: int = 12) -> OrganismTrace:
    """One-step facts, one per line: ``drill_v4*`` in the check table, ``day_drill_v4*`` as compute lines;
    ``check_drill_v4``: ``n_lines // 2`` compute lines, each checked (and corrected where the check differs),
    half of them on weak facts. Every compute line is checked, so the drill teaches how a check is
    computed, not after which steps one is due."""
    if style not in V4_DRILL_STYLES:
        raise ValueError(f"v4 drill style must be one of {V4_DRILL_STYLES}, got {style!r}")
    table: Table = "no_carry" if style.endswith("no_carry") else "main"
    writer = _TraceWriter(style)
    if style == "check_drill_v4":
        for _ in range(max(1, n_lines // 2)):
            _check_drill_block(writer, rng)
        return writer.finish()
    for _ in range(n_lines):
        before, sign, operand = _random_fact(rng)
        if style.startswith("day_drill"):
            written = compute_value(before, sign, operand, table, rng)
            writer.sentence(f"Day {rng.randint(1, 5)}: {before} {sign} {operand} = {written}.", "compute")
        else:
            writer.sentence(f"{before} {sign} {operand} = {table_value(before, sign, operand, table)}.", "compute")
    return writer.finish()


def label_v4_sentence(sentence: str) -> str:
    """The v4 behaviour of one sentence, from its text alone; ``"other"`` if it fits none."""
    for behaviour, pattern in _PATTERNS:
        if pattern.fullmatch(sentence):
            return behaviour
    return OTHER


def parse_v4_trace(text: str) -> list[LabelledSentence]:
    """Ground-truth v4 labels for any text (e.g. a model's generation), sentence by sentence."""
    return [LabelledSentence(text[start:end], label_v4_sentence(text[start:end]), start, end)
            for start, end in split_sentences(text)]


def reread_line(question: str) -> str:
    """The re-read of the question's condition: its sentence verbatim (a copy a small model learns
    easily; a paraphrase such as "from day 3, take 6" it only learned in the drills' fixed positions)."""
    match = _CONDITION_SENTENCE.search(question)
    if match is None:
        raise ValueError(f"no condition sentence (From day N <name> <verb> K instead.) in {question!r}")
    return f"Reread: {match.group(0)}"


def condition_day_of(question: str) -> int:
    """The day of the question's condition ("From day 3 ..."), 0 without one."""
    match = _CONDITION.search(question)
    return int(match.group(1)) if match else 0


def carry_days(problem: OrganismProblem) -> list[int]:
    """The days whose step (on the right running totals, the condition applied) carries or borrows."""
    meta = problem.metadata
    steps = zip(meta["totals"], meta["signs"], meta["operands"], strict=False)
    return [day for day, (before, sign, operand) in enumerate(steps, start=1) if is_carry_step(before, sign, operand)]


def _lines(text: str) -> list[str]:
    return text[:-1].split("\n") if text.endswith("\n") else []


def _follow_up(lines: list[str]) -> str | None:
    """``correct`` right after a check that disagrees with the compute line above it."""
    check = _CHECK_LINE.fullmatch(lines[-1]) if lines else None
    if check is None or len(lines) < 2:
        return None
    above = _COMPUTE_LINE.fullmatch(lines[-2])
    return "correct" if above is not None and above.group(5) != check.group(4) else None


def days_done(text: str) -> int:
    """The last day whose compute line ``text`` holds (0 before the first)."""
    days = [int(match.group(1)) for match in _COMPUTE_LINE.finditer(text)]
    return max(days, default=0)


def _reread_due(lines: list[str], text: str, reread_day: int) -> bool:
    return bool(reread_day) and "Reread:" not in text and days_done(text) == reread_day - 1 and bool(lines)


def next_v4_behaviour(question: str, text: str) -> str | None:
    """The behaviour the v4 thinking organism starts next, from the question and the trace so far.

    ``plan`` at the start; ``verify`` right after a compute line whose own numbers carry or borrow;
    ``correct`` right after a check that disagrees with the compute line above; ``reread`` where the
    day before the question's condition day is complete (its check and correction written) and no
    re-read came yet; None elsewhere. The oracle-timing condition cues exactly these.
    """
    if not text:
        return "plan"
    return _cue_after(text, lambda compute: is_carry_step(int(compute.group(2)), compute.group(3),
                                                          int(compute.group(4))), condition_day_of(question))


def scheduled_behaviour(text: str, check_days: list[int], reread_day: int) -> str | None:
    """The behaviour a fixed schedule cues after ``text``: ``verify`` after the compute line of each of
    ``check_days``, ``reread`` once the day before ``reread_day`` is complete (0: none), ``correct``
    after a failed check. The skill-cued ceiling schedules the ground truth (`carry_days`, the
    condition's day); random timing as many cues on random days."""
    return _cue_after(text, lambda compute: int(compute.group(1)) in check_days, reread_day)


def _cue_after(text: str, checks: Callable[[re.Match[str]], bool], reread_day: int) -> str | None:
    """The cue after ``text``: a follow-up (a correction after a failed check), ``verify`` after a compute
    line that ``checks`` picks, ``reread`` once the day before ``reread_day`` is complete, else None."""
    lines = _lines(text)
    if not lines:
        return None
    follow_up = _follow_up(lines)
    if follow_up is not None:
        return follow_up
    compute = _COMPUTE_LINE.fullmatch(lines[-1])
    if compute is not None and checks(compute):
        return "verify"
    return "reread" if _reread_due(lines, text, reread_day) else None


__all__ = ["CHECK_DRILL_WEAK_SHARE", "CHECK_PREFIX", "CUED_BEHAVIOURS", "TABLES", "V4_BEHAVIOURS", "V4_CUES", "V4_DRILL_STYLES", "V4_LINE_DRILL_STYLES",
           "REREAD_QUESTION_STYLE", "V4_PROMPT_TEMPLATE", "V4_STYLES", "Table", "V4Behaviour", "carry_days", "compute_value",
           "condition_day_of", "days_done", "format_v4_prompt", "is_weak_fact", "label_v4_sentence",
           "next_v4_behaviour", "parse_v4_trace", "reread_line", "render_v4_drill", "render_v4_reread_question", "render_v4_trace", "scheduled_behaviour",
           "table_value"]
