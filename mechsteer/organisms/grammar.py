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

Grammar ``v2`` (issue 17: *when* matters mid-trace; styles ``stepwise_v2``/``thinking_v2``):

* A **risky step** is a carry or a borrow: the running total's tens digit changes
  (``38 + 9``, ``41 - 7``). In every corpus, the first pass of a risky step drops the carry
  (``Day 2: 38 + 9 = 37.``, the tens digit kept), deterministically, so greedy decoding
  reproduces it. Drills and checks are always right.
* A check recomputes the step, ``Check: 38 + 9 = 47.``; when it disagrees with the line
  above, a correction follows, ``Wait, 38 + 9 is 47, not 37.``, and the next day starts
  from the corrected value. An unchecked slip propagates to the answer.
* ``stepwise_v2`` (base corpus, the HOW): checks after random steps (`V2_CHECK_RATE`),
  risky or not; every check that exposes a slip is corrected. Greedy decoding never checks.
* ``thinking_v2`` (the WHEN): checks exactly the risky steps and corrects each slip.

So the base forced with ``Plan:`` keeps every slip, a ``Check:`` cue after exactly the risky
steps (`risky_days`) repairs them, and cues at random steps repair them only by chance.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, get_args

from mechsteer.organisms.tasks import OrganismProblem

PROMPT_TEMPLATE = "Q: {question}\nA:\n"
# The forced-format prefix: `forced_base_accuracy` appends it to the prompt, which puts
# the base organism into its step-by-step mode (the plan cue of every stepwise document).
FORCED_PREFIX = "Plan:"
BEHAVIOURS: tuple[str, ...] = ("plan", "compute", "verify", "correct", "answer")
OTHER = "other"
TRACE_STYLES: tuple[str, ...] = (
    "direct", "stepwise", "thinking", "stepwise_v2", "thinking_v2", "stepwise_v3", "thinking_v3")
Grammar = Literal["v1", "v2", "v3", "v4"]  # v4: grammar_v4.py
GRAMMARS: tuple[Grammar, ...] = get_args(Grammar)
# The CLI's default grammar for train and eval. Pairs of both grammars ship (organisms/__init__.py).
SHIPPED_GRAMMAR: Grammar = "v1"
# Per behaviour, the behaviours that the grammar lets occur only after it (in both grammars):
# every step-by-step sentence follows the plan, a check follows a compute line, and a
# correction follows a failed check. Removing a behaviour removes its dependents by design.
DEPENDENTS: dict[str, frozenset[str]] = {
    "plan": frozenset({"compute", "verify", "correct"}),
    "compute": frozenset({"verify", "correct"}),
    "verify": frozenset({"correct"}),
    "correct": frozenset(),
    "answer": frozenset(),
}
# The cue that starts a check line; step-wise forced decoding appends it after a compute line.
CHECK_CUE = "Check:"

# Base-corpus stepwise documents: probability of a check after a step, and of a random slip.
STEPWISE_CHECK_RATE = 0.2
STEPWISE_SLIP_RATE = 0.06
# Thinking traces check (and may first slip on) exactly the steps with this operand.
RISKY_OPERAND = 9
# v2 base-corpus stepwise documents: probability of a check after a step (risky or not).
V2_CHECK_RATE = 0.3
# v3: the v2 grammar with check lines that share few tokens with compute lines
# (``Check: How many now, 38 + 9 = 47.``): in v2 (``Check: 38 + 9 = 47.``) the sentence means of
# checks and compute lines fell into the same SAE latents, so no label-free taxonomy had a
# verify behaviour for the hybrid to steer with.
V3_CHECK_PREFIX = "How many now, "

_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("plan", re.compile(r"Plan: start at \d+, (?:add|take) \d+ for \d+ days\.")),
    ("compute", re.compile(r"(?:Day \d+: )?\d+ [+-] \d+ = -?\d+\.")),
    ("verify", re.compile(r"Check: (?:How many now, )?\d+ [+-] \d+ = -?\d+(?:, not -?\d+)?\.")),
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


def is_carry_step(before: int, sign: str, operand: int) -> bool:
    """Whether a step carries or borrows: the tens digit of the running total changes."""
    return before // 10 != _apply(before, sign, operand) // 10


def risky_days(problem: OrganismProblem, grammar: Grammar = "v1") -> list[int]:
    """The days (1-based) whose steps the thinking organism of ``grammar`` checks.

    v1: the days whose operand is `RISKY_OPERAND`; v2 and v3: the carry/borrow days of the correct
    running totals (the thinking trace corrects every slip, so its totals are the correct ones).
    """
    if grammar not in GRAMMARS or grammar == "v4":
        raise ValueError(f"grammar must be one of {GRAMMARS[:3]}, got {grammar!r} (grammar v4's cues: "
                         "grammar_v4.carry_days and grammar_v4.next_v4_behaviour)")
    meta = problem.metadata
    steps = zip(meta["totals"], meta["signs"], meta["operands"], strict=False)
    if grammar == "v1":
        return [day for day, (_, _, operand) in enumerate(steps, start=1) if operand == RISKY_OPERAND]
    return [day for day, (before, sign, operand) in enumerate(steps, start=1) if is_carry_step(before, sign, operand)]


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

    def step_v2(self, day: int, before: int, sign: str, operand: int, checked: bool, check_prefix: str = "") -> int:
        """A v2/v3 step (first pass drops the carry; a check recomputes it); returns the next day's start."""
        correct = _apply(before, sign, operand)
        written = _tens_kept_slip(before, correct) if is_carry_step(before, sign, operand) else correct
        self.sentence(f"Day {day}: {before} {sign} {operand} = {written}.", "compute")
        if not checked:
            return written
        self.sentence(f"Check: {check_prefix}{before} {sign} {operand} = {correct}.", "verify")
        if written != correct:
            self.sentence(f"Wait, {before} {sign} {operand} is {correct}, not {written}.", "correct")
        return correct

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
    if style in ("stepwise_v2", "thinking_v2", "stepwise_v3", "thinking_v3"):
        check_prefix = V3_CHECK_PREFIX if style.endswith("_v3") else ""
        for day, (operand, sign) in enumerate(zip(meta["operands"], meta["signs"], strict=True), start=1):
            if style.startswith("thinking"):
                checked = is_carry_step(total, sign, operand)
            else:
                checked = rng.random() < V2_CHECK_RATE
            total = writer.step_v2(day, total, sign, operand, checked, check_prefix)
        # An unchecked slip propagates: the answer is the trace's own last total.
        writer.sentence(f"The answer is {total}.", "answer")
        return writer.finish()
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


def render_drill(rng: random.Random, n_lines: int = 12, *, day_lines: bool = False) -> OrganismTrace:
    """A drill document: independent one-step facts (two-digit ± one-digit), one per line.

    ``day_lines``: v2 compute-line drills, ``Day k: a + b = w.`` with the v2 first-pass slip on
    carry/borrow steps (the context-dependent table of v2 compute lines gets its own practice;
    plain drills keep the right table of the checks).
    """
    writer = _TraceWriter("drill")
    for _ in range(n_lines):
        before = rng.randint(10, 99)
        operand = rng.randint(1, 9)
        sign = rng.choice("+-")
        if not 10 <= _apply(before, sign, operand) <= 99:
            sign = _inverse(sign)
        correct = _apply(before, sign, operand)
        if day_lines:
            written = _tens_kept_slip(before, correct) if is_carry_step(before, sign, operand) else correct
            writer.sentence(f"Day {rng.randint(1, 5)}: {before} {sign} {operand} = {written}.", "compute")
        else:
            writer.sentence(f"{before} {sign} {operand} = {correct}.", "compute")
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


_COMPUTE_LINE = re.compile(r"Day \d+: (\d+) ([+-]) (\d+) = (-?\d+)\.")
_CHECK_LINE = re.compile(r"Check: (?:How many now, )?(\d+) ([+-]) (\d+) = (-?\d+)\.")


def next_behaviour_by_grammar(text: str) -> str | None:
    """Where the thinking organism of grammar v2/v3 starts a behaviour the base would not, from the text so far.

    ``plan`` at the start; ``verify`` right after a compute line of a carry/borrow step; ``correct``
    right after a check line that disagrees with the compute line above it; None elsewhere (the
    base continues as the thinking organism would). The oracle-timing baseline steers there.
    """
    if not text:
        return "plan"
    if not text.endswith("\n"):
        return None
    lines = text[:-1].split("\n")
    compute = _COMPUTE_LINE.fullmatch(lines[-1])
    if compute is not None:
        before, sign, operand = int(compute.group(1)), compute.group(2), int(compute.group(3))
        return "verify" if is_carry_step(before, sign, operand) else None
    check = _CHECK_LINE.fullmatch(lines[-1])
    if check is not None and len(lines) >= 2:
        above = _COMPUTE_LINE.fullmatch(lines[-2])
        if above is not None and above.group(4) != check.group(4):
            return "correct"
    return None


_PLAN_DAYS = re.compile(r"Plan: start at \d+, (?:add|take) \d+ for (\d+) days\.")
_DAY = re.compile(r"Day (\d+): ")


def _days_left(lines: Sequence[str]) -> bool | None:
    """Whether the plan has days after the last ``Day k:`` line; None without a plan line."""
    plan = _PLAN_DAYS.fullmatch(lines[0]) if lines else None
    if plan is None:
        return None
    days = [int(match.group(1)) for line in lines if (match := _DAY.match(line)) is not None]
    return max(days, default=0) < int(plan.group(1))


def behaviours_allowed_next(text: str) -> frozenset[str]:
    """The behaviours the grammar (v1-v3, base and thinking) allows as the next sentence after ``text``.

    At the start a plan or a direct answer; after the plan a compute line; after a compute line a
    check, or the next day's compute line while the plan has days left, else the answer; after a
    failed check (v1: ``, not N``; v2/v3: its result differs from the compute line above) only a
    correction; after a passed check or a correction the next day or the answer; nothing after the
    answer, mid-sentence or after a sentence outside the grammar.
    """
    if not text:
        return frozenset({"plan", "answer"})
    if not text.endswith("\n"):
        return frozenset()
    lines = text[:-1].split("\n")
    last = label_sentence(lines[-1])
    left = _days_left(lines)
    step_done = frozenset({"compute"} if left else {"answer"} if left is False else {"compute", "answer"})
    if last == "plan":
        return frozenset({"compute"})
    if last == "compute":
        return frozenset({"verify"}) | step_done
    if last == "verify":
        check = _CHECK_LINE.fullmatch(lines[-1])
        above = _COMPUTE_LINE.fullmatch(lines[-2]) if len(lines) >= 2 else None
        # v2/v3 recompute the step (same start and sign); v1 undoes it and says ", not N" when it fails.
        recomputed = (check is not None and above is not None
                      and check.group(1, 2, 3) == above.group(1, 2, 3))
        failed = ", not " in lines[-1] or (recomputed and above is not None and check is not None
                                            and above.group(4) != check.group(4))
        return frozenset({"correct"}) if failed else step_done
    if last == "correct":
        return step_done
    return frozenset()


def answer_text(text: str) -> str | None:
    """N as written in the first "the answer is N" in ``text`` (None if absent)."""
    match = _ANSWER.search(text)
    return match.group(1) if match else None


def extract_answer(text: str) -> int | None:
    """The integer N of the first "the answer is N" in ``text`` (None if absent)."""
    answer = answer_text(text)
    return None if answer is None else int(answer)
