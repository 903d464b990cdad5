"""The reasoning-trace grammar of the model organisms, with out-of-band behaviour labels.

Every trace sentence sits on its own line and ends with "." and a newline, so the generic
sentence splitter (split after . ! ? ; or a newline, decimals protected) finds exactly the
grammar's sentences. Each behaviour is recognisable from its own text, by the cue at the
sentence start:

========  ======================================  =====================================
label     example                                 role
========  ======================================  =====================================
plan      ``Plan: start at 38, add 9 for 3 days.`` restate the goal: start, operation, days
compute   ``Day 1: 38 + 9 = 47.``                 one day's step
verify    ``Check: 47 - 9 = 38.``                 undo the step and compare
correct   ``Wait, 38 + 9 is 47, not 37.``         repair a step that failed its check
answer    ``The answer is 45.``                   the final answer (graders extract it)
========  ======================================  =====================================

Three trace styles exist:

* ``direct``: the answer sentence alone, right after the prompt. Most pretraining
  documents do this, so the base organism answers in one shot when prompted normally.
* ``stepwise``: the base corpus's step-by-step documents. Plan, then one compute per
  step; checks follow random steps; rare random slips are always caught by a failing
  check and corrected. The base organism knows all behaviours from these (the HOW).
* ``thinking``: the post-training traces (the WHEN). Always plan; check exactly the
  risky steps (operand 9); the trace writer's first pass on the first ±9 day keeps the tens
  digit (38 + 9 = 37 instead of 47), which the check exposes and a correction repairs.
  This planted, deterministic slip is what makes "correct" occur under greedy decoding.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

from mechsteer.organisms.tasks import OrganismProblem

PROMPT_TEMPLATE = "Q: {question}\nA:\n"
# The forced-format prefix: `forced_base_accuracy` appends it to the prompt, which puts
# the base organism into its step-by-step mode (the plan cue of every stepwise document).
FORCED_PREFIX = "Plan:"
BEHAVIOURS: tuple[str, ...] = ("plan", "compute", "verify", "correct", "answer")
OTHER = "other"
TRACE_STYLES: tuple[str, ...] = ("direct", "stepwise", "thinking")

# Base-corpus stepwise documents: probability of a check after a step, and of a random slip.
STEPWISE_CHECK_RATE = 0.2
STEPWISE_SLIP_RATE = 0.06
# Thinking traces check (and may first slip on) exactly the steps with this operand.
RISKY_OPERAND = 9

_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("plan", re.compile(r"Plan: start at \d+, (?:add|take) \d+ for \d+ days\.")),
    ("compute", re.compile(r"(?:Day \d+: )?\d+ [+-] \d+ = -?\d+\.")),
    ("verify", re.compile(r"Check: \d+ [+-] \d+ = -?\d+(?:, not -?\d+)?\.")),
    ("correct", re.compile(r"Wait, \d+ [+-] \d+ is -?\d+, not -?\d+\.")),
    ("answer", re.compile(r"The answer is -?\d+\.")),
)
_ANSWER = re.compile(r"the answer is (-?\d+)", re.IGNORECASE)


@dataclass(frozen=True)
class LabelledSentence:
    """A sentence of a trace with its behaviour and its span: ``trace[char_start:char_end] == text``."""

    text: str
    behaviour: str
    char_start: int
    char_end: int


@dataclass(frozen=True)
class OrganismTrace:
    """The reasoning text after the prompt, and its ground-truth sentence labels."""

    text: str
    sentences: tuple[LabelledSentence, ...]
    style: str


def format_prompt(question: str) -> str:
    """The normal prompt, shared by the base and the thinking organism."""
    return PROMPT_TEMPLATE.format(question=question)


def _apply(value: int, sign: str, operand: int) -> int:
    return value + operand if sign == "+" else value - operand


def _inverse(sign: str) -> str:
    return "-" if sign == "+" else "+"


def _random_slip(rng: random.Random, correct: int) -> int:
    # A tens-digit error, the commonest slip of column arithmetic.
    candidates = [value for value in (correct - 10, correct + 10) if 10 <= value <= 99]
    return rng.choice(candidates)


def _tens_kept_slip(before: int, correct: int) -> int:
    # The planted first-pass slip on a risky step: units right, tens digit not carried/borrowed.
    return (before // 10) * 10 + correct % 10


class _TraceWriter:
    def __init__(self, style: str) -> None:
        self.style = style
        self.parts: list[str] = []
        self.sentences: list[LabelledSentence] = []
        self.length = 0

    def sentence(self, text: str, behaviour: str) -> None:
        self.sentences.append(LabelledSentence(text, behaviour, self.length, self.length + len(text)))
        self.parts.append(text + "\n")
        self.length += len(text) + 1

    def step(self, day: int, before: int, sign: str, operand: int, written: int, checked: bool) -> None:
        correct = _apply(before, sign, operand)
        self.sentence(f"Day {day}: {before} {sign} {operand} = {written}.", "compute")
        if not checked:
            return
        undone = _apply(written, _inverse(sign), operand)
        mismatch = f", not {before}" if undone != before else ""
        self.sentence(f"Check: {written} {_inverse(sign)} {operand} = {undone}{mismatch}.", "verify")
        if written != correct:
            self.sentence(f"Wait, {before} {sign} {operand} is {correct}, not {written}.", "correct")

    def finish(self) -> OrganismTrace:
        return OrganismTrace("".join(self.parts), tuple(self.sentences), self.style)


def render_trace(problem: OrganismProblem, style: str, rng: random.Random) -> OrganismTrace:
    """A labelled trace of ``problem`` in ``style`` (see the module docstring)."""
    if style not in TRACE_STYLES:
        raise ValueError(f"style must be one of {TRACE_STYLES}, got {style!r}")
    writer = _TraceWriter(style)
    meta = problem.metadata
    if style == "direct":
        writer.sentence(f"The answer is {problem.answer}.", "answer")
        return writer.finish()
    operation = "add" if meta["signs"][0] == "+" else "take"
    writer.sentence(f"Plan: start at {meta['start']}, {operation} {meta['operands'][0]} for {meta['n_steps']} days.", "plan")
    total = meta["start"]
    for day, (operand, sign) in enumerate(zip(meta["operands"], meta["signs"], strict=True), start=1):
        correct = _apply(total, sign, operand)
        if style == "stepwise":
            slipped = rng.random() < STEPWISE_SLIP_RATE
            written = _random_slip(rng, correct) if slipped else correct
            checked = slipped or rng.random() < STEPWISE_CHECK_RATE
        else:
            risky = operand == RISKY_OPERAND
            # The slip comes on the first risky day only: one correction per trace is
            # enough to plant the behaviour and keeps traces short.
            written = _tens_kept_slip(total, correct) if risky and day == 1 else correct
            checked = risky
        writer.step(day, total, sign, operand, written, checked)
        total = correct
    writer.sentence(f"The answer is {problem.answer}.", "answer")
    return writer.finish()


def render_drill(rng: random.Random, n_lines: int = 12) -> OrganismTrace:
    """A drill document: independent one-step facts (two-digit ± one-digit), one per line."""
    writer = _TraceWriter("drill")
    for _ in range(n_lines):
        before = rng.randint(10, 99)
        operand = rng.randint(1, 9)
        sign = rng.choice("+-")
        if not 10 <= _apply(before, sign, operand) <= 99:
            sign = _inverse(sign)
        writer.sentence(f"{before} {sign} {operand} = {_apply(before, sign, operand)}.", "compute")
    return writer.finish()


def split_sentences(text: str) -> list[tuple[int, int]]:
    """Spans of the sentences of ``text``, by the project's generic rule.

    A sentence ends at a newline, or after a run of ``. ! ? ;`` followed by whitespace or
    the end of the text (so ``3.14`` stays whole). Spans exclude surrounding whitespace;
    empty pieces are dropped. On organism traces this agrees with
    `mechsteer.data.sentences.split_sentences` (checked in the tests).
    """
    cuts: list[tuple[int, int]] = []  # (end of a piece, start of the next piece)
    index = 0
    while index < len(text):
        char = text[index]
        if char == "\n":
            cuts.append((index, index + 1))
        elif char in ".!?;":
            run_end = index
            while run_end + 1 < len(text) and text[run_end + 1] in ".!?;":
                run_end += 1
            if run_end + 1 == len(text) or text[run_end + 1].isspace():
                cuts.append((run_end + 1, run_end + 1))
            index = run_end
        index += 1
    spans: list[tuple[int, int]] = []
    piece_start = 0
    for piece_end, next_start in [*cuts, (len(text), len(text))]:
        piece = text[piece_start:piece_end]
        stripped = piece.strip()
        if stripped:
            offset = piece_start + (len(piece) - len(piece.lstrip()))
            spans.append((offset, offset + len(stripped)))
        piece_start = next_start
    return spans


def label_sentence(sentence: str) -> str:
    """The behaviour of one sentence, from its text alone; ``"other"`` if it fits none."""
    for behaviour, pattern in _PATTERNS:
        if pattern.fullmatch(sentence):
            return behaviour
    return OTHER


def parse_trace(text: str) -> list[LabelledSentence]:
    """Ground-truth labels for any text (e.g. a model's generation), sentence by sentence."""
    return [
        LabelledSentence(text[start:end], label_sentence(text[start:end]), start, end)
        for start, end in split_sentences(text)
    ]


def extract_answer(text: str) -> int | None:
    """The integer N of the first "the answer is N" in ``text`` (None if absent)."""
    match = _ANSWER.search(text)
    return int(match.group(1)) if match else None
