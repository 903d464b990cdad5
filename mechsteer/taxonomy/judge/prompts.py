"""Every prompt the LLM judge sees, in one versioned module, plus the parsers for its answers.

The paper's protocol (method notes, "Titles and descriptions" and "Metrics (LLM judge)"):

- ``describe_behaviour``: ~200 example sentences of one cluster -> a Title and a Description
  of the sentences' cognitive function;
- ``consistency``: does a sentence match a behaviour's description? yes/no;
- ``completeness``: 0-10, how well a sentence fits its assigned behaviour;
- ``pair_similarity``: 0-10, how similar two behaviours are.

Prompt layout is machine-readable on purpose, so that :class:`mechsteer.taxonomy.judge.oracle.OracleJudge`
can answer the very same prompts a real judge gets: the user message starts with a
``Task: <name>`` line, and every free-text field sits on its own line as ``Key: "<json>"``
(a JSON string literal, so sentences with newlines or quotes stay on one line and parse back
exactly). Instruction lines never start with a field key. :func:`parse_prompt` inverts
:func:`render_messages` (it reads the last user message).

``describe_behaviour`` and ``pair_similarity`` show two worked examples first (earlier
user/assistant turns in the same layout, answered in the asked format): without them a small chat
model (SmolLM2-135M-Instruct behind ``transformers serve``) echoes the prompt (``Task:
describe_behaviour``, ``Title A: ...``) instead of answering; with them it answers every such
prompt of the real-server test (tests/engines/test_server.py) in the format. A description answer
that copies an example's description, the format's ``<placeholders>`` or one of the sentences is
refused as an echo of the prompt.

Bump ``PROMPT_VERSION`` whenever a template's wording changes: the HTTP judge's on-disk cache
key includes it, so cached answers to old wording are never reused.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

PROMPT_VERSION = "2"

# Field keys that may appear as `Key: "<json string>"` lines in a user message.
FIELD_KEYS: tuple[str, ...] = (
    "Sentence",
    "Title",
    "Description",
    "Title A",
    "Description A",
    "Title B",
    "Description B",
)


@dataclass(frozen=True)
class WorkedExample:
    """An earlier user turn (the template's layout with these fields) and the answer it shows."""

    fields: tuple[tuple[str, str], ...]
    answer: str


@dataclass(frozen=True)
class PromptTemplate:
    """One named prompt: a system message, instructions, the fields it carries, its answer budget,
    and the worked examples shown before the request (none for most templates)."""

    name: str
    system: str
    instructions: str
    answer_instruction: str
    max_tokens: int
    examples: tuple[WorkedExample, ...] = ()


SYSTEM_ANALYST = (
    "You are an expert analyst of the chain-of-thought reasoning of language models. "
    "You answer exactly in the format you are asked for."
)

DESCRIBE_BEHAVIOUR = PromptTemplate(
    name="describe_behaviour",
    system=SYSTEM_ANALYST,
    instructions=(
        "Below are sentences taken from the chain-of-thought reasoning of a language model. "
        "They were grouped together because they perform the same kind of reasoning step. "
        "Identify the cognitive function these sentences share in the reasoning (what the "
        "model is doing at that step, for example checking a result or setting up a plan), "
        "not their topic or subject matter."
    ),
    answer_instruction=(
        "Reply with exactly two lines and nothing else:\n"
        "Title: <a short title of two to five words>\n"
        "Description: <one or two sentences describing the shared cognitive function>"
    ),
    max_tokens=256,
    # Two functions, so that the format is shown and not one title to copy (a 135M model copies a
    # single example's title, or the later of two examples that share a domain).
    examples=(
        WorkedExample(
            fields=tuple(("Sentence", sentence) for sentence in (
                "Then 12 + 5 = 17.",
                "So 17 - 4 = 13 apples remain.",
                "Next, 13 times 2 is 26.",
                "Adding the two parts gives 26 + 9 = 35.",
                "Subtracting the fee, 35 - 6 = 29.",
            )),
            answer="Title: Doing arithmetic\n"
                   "Description: The model carries out one arithmetic operation on the running value.",
        ),
        WorkedExample(
            fields=tuple(("Sentence", sentence) for sentence in (
                "So the question asks how many apples are left after the sale.",
                "Let me restate: we need the total cost of three tickets.",
                "In other words, we want the time when the two trains meet.",
                "The problem wants the area of the remaining garden.",
                "So we are asked for the speed of the second car.",
            )),
            answer="Title: Restating the problem\n"
                   "Description: The model restates what the question asks in its own words before solving it.",
        ),
    ),
)

CONSISTENCY = PromptTemplate(
    name="consistency",
    system=SYSTEM_ANALYST,
    instructions=(
        "Here is a category of reasoning steps, given by a title and a description, and one "
        "sentence from the chain-of-thought reasoning of a language model. Decide whether the "
        "sentence matches the description of the category."
    ),
    answer_instruction="Does the sentence match the description? Answer with one word: yes or no.",
    max_tokens=8,
)

COMPLETENESS = PromptTemplate(
    name="completeness",
    system=SYSTEM_ANALYST,
    instructions=(
        "Here is a category of reasoning steps, given by a title and a description, and one "
        "sentence from the chain-of-thought reasoning of a language model that was assigned "
        "to this category. Rate how well the sentence fits the category, from 0 (does not fit "
        "at all) to 10 (fits perfectly)."
    ),
    answer_instruction="Answer with a single integer from 0 to 10 and nothing else.",
    max_tokens=8,
)

PAIR_SIMILARITY = PromptTemplate(
    name="pair_similarity",
    system=SYSTEM_ANALYST,
    instructions=(
        "Here are two categories of reasoning steps from the chain-of-thought reasoning of a "
        "language model, each given by a title and a description. Rate how similar the two "
        "categories are, from 0 (completely different cognitive functions) to 10 (the same "
        "cognitive function)."
    ),
    answer_instruction="Answer with a single integer from 0 to 10 and nothing else.",
    max_tokens=8,
    # The two ends of the scale; without them SmolLM2-135M echoes "Title A: ..." instead of a number.
    examples=(
        WorkedExample(
            fields=(
                ("Title A", "Doing arithmetic"),
                ("Description A", "The model carries out one arithmetic operation on the running value."),
                ("Title B", "Restating the problem"),
                ("Description B", "The model restates what the question asks in its own words before solving it."),
            ),
            answer="1",
        ),
        WorkedExample(
            fields=(
                ("Title A", "Checking a result"),
                ("Description A", "The model verifies a value it computed earlier."),
                ("Title B", "Verifying a computation"),
                ("Description B", "The model recomputes an earlier step to confirm that it is right."),
            ),
            answer="9",
        ),
    ),
)

TEMPLATES: dict[str, PromptTemplate] = {
    template.name: template
    for template in (DESCRIBE_BEHAVIOUR, CONSISTENCY, COMPLETENESS, PAIR_SIMILARITY)
}

Messages = list[dict[str, str]]


def _user_content(template: PromptTemplate, fields: Sequence[tuple[str, str]]) -> str:
    lines = [f"Task: {template.name}", "", template.instructions, ""]
    for key, value in fields:
        if key not in FIELD_KEYS:
            raise ValueError(f"unknown prompt field {key!r}; expected one of {FIELD_KEYS}")
        if not isinstance(value, str):
            raise ValueError(f"prompt field {key!r} must be a str, got {type(value).__name__}")
        lines.append(f"{key}: {json.dumps(value, ensure_ascii=False)}")
    lines += ["", template.answer_instruction]
    return "\n".join(lines)


def render_messages(template: PromptTemplate, fields: Sequence[tuple[str, str]]) -> Messages:
    """Chat messages (OpenAI format) for ``template`` carrying ``fields`` in the given order:
    the system message, the template's worked examples as earlier turns, then the request."""
    messages = [{"role": "system", "content": template.system}]
    for example in template.examples:
        messages += [
            {"role": "user", "content": _user_content(template, example.fields)},
            {"role": "assistant", "content": example.answer},
        ]
    messages.append({"role": "user", "content": _user_content(template, fields)})
    return messages


def describe_behaviour_messages(sentences: Sequence[str]) -> Messages:
    if not sentences:
        raise ValueError("describe_behaviour needs at least one example sentence")
    return render_messages(DESCRIBE_BEHAVIOUR, [("Sentence", s) for s in sentences])


def consistency_messages(title: str, description: str, sentence: str) -> Messages:
    return render_messages(
        CONSISTENCY, [("Title", title), ("Description", description), ("Sentence", sentence)]
    )


def completeness_messages(title: str, description: str, sentence: str) -> Messages:
    return render_messages(
        COMPLETENESS, [("Title", title), ("Description", description), ("Sentence", sentence)]
    )


def pair_similarity_messages(
    title_a: str, description_a: str, title_b: str, description_b: str
) -> Messages:
    return render_messages(
        PAIR_SIMILARITY,
        [
            ("Title A", title_a),
            ("Description A", description_a),
            ("Title B", title_b),
            ("Description B", description_b),
        ],
    )


@dataclass(frozen=True)
class ParsedPrompt:
    """A judge prompt read back: the template name and each field's values, in order."""

    task: str
    fields: Mapping[str, tuple[str, ...]]

    def one(self, key: str) -> str:
        values = self.fields.get(key, ())
        if len(values) != 1:
            raise ValueError(f"{self.task} prompt must carry exactly one {key!r} field, got {len(values)}")
        return values[0]


_FIELD_LINE = re.compile(r"^(" + "|".join(re.escape(k) for k in FIELD_KEYS) + r'): (".*")$')


def parse_prompt(messages: Sequence[Mapping[str, str]]) -> ParsedPrompt:
    """Invert :func:`render_messages`: read the task and fields from the last user message."""
    user_messages = [m for m in messages if m.get("role") == "user"]
    if not user_messages:
        raise ValueError("no user message in the judge prompt")
    content = user_messages[-1].get("content", "")
    lines = content.split("\n")
    if not lines or not lines[0].startswith("Task: "):
        raise ValueError("judge prompt does not start with a 'Task: <name>' line; not a mechsteer prompt")
    task = lines[0][len("Task: ") :].strip()
    if task not in TEMPLATES:
        raise ValueError(f"unknown judge task {task!r}; expected one of {sorted(TEMPLATES)}")
    fields: dict[str, list[str]] = {}
    for line in lines[1:]:
        match = _FIELD_LINE.match(line)
        if match is None:
            continue
        fields.setdefault(match.group(1), []).append(json.loads(match.group(2)))
    return ParsedPrompt(task=task, fields={k: tuple(v) for k, v in fields.items()})


# ---- answers ----------------------------------------------------------------------------------


def format_description_answer(title: str, description: str) -> str:
    """The answer layout DESCRIBE_BEHAVIOUR asks for (used by the oracle and scripted judges)."""
    return f"Title: {title}\nDescription: {description}"


# Markdown decoration judges like to add around keys and values: **Title:**, "# Title", quotes.
_DECORATION = "*_`#>\"' \t"
_KEYED_LINE = re.compile(r"^[\W_]*(title|description)[\W_]*?:\s*(.*)$", re.IGNORECASE)


def _normalised(text: str) -> str:
    return " ".join(text.lower().split()).strip(_DECORATION + ".")


def parse_description_answer(text: str, sentences: Sequence[str] = ()) -> tuple[str, str] | None:
    """(title, description) from a DESCRIBE_BEHAVIOUR answer, or None if either is missing or
    echoes the prompt.

    Tolerates markdown bold/headers, quotes and case in the keys, and a description that runs
    over several lines (everything after ``Description:`` up to a further key line). An echo
    (case, spacing and a final full stop aside) is a title or description that is the format's
    ``<placeholder>`` or one of the described ``sentences``, or a worked example's description. A
    worked example's title alone is kept: it may be the apt title, written with an own description.
    """
    parsed = _read_description_answer(text)
    if parsed is None:
        return None
    title, description = parsed
    shown = {_normalised(sentence) for sentence in sentences}
    if any(part.startswith("<") or _normalised(part) in shown for part in parsed):
        return None
    if _normalised(description) in _EXAMPLE_DESCRIPTIONS:
        return None
    return title, description


def _read_description_answer(text: str) -> tuple[str, str] | None:
    title: str | None = None
    description_lines: list[str] | None = None
    for line in text.splitlines():
        match = _KEYED_LINE.match(line)
        if match is not None:
            key, value = match.group(1).lower(), match.group(2)
            if key == "title" and title is None:
                title = value.strip(_DECORATION)
                continue
            if key == "description" and description_lines is None:
                description_lines = [value]
                continue
        if description_lines is not None and line.strip():
            description_lines.append(line)
    if not title or description_lines is None:
        return None
    description = " ".join(part.strip() for part in description_lines).strip(_DECORATION)
    if not description:
        return None
    return title, description


# What a copied worked example would hold (parse_description_answer refuses it).
_EXAMPLE_DESCRIPTIONS = frozenset(
    _normalised(parsed[1])
    for parsed in (_read_description_answer(example.answer) for example in DESCRIBE_BEHAVIOUR.examples)
    if parsed is not None
)

_YES_NO = re.compile(r"\b(yes|no)\b", re.IGNORECASE)


def parse_yes_no(text: str) -> bool | None:
    """True for yes, False for no, None if the answer contains neither word.

    Case and punctuation are ignored ("**Yes.**", "Answer: no"). When both words appear the
    first one wins, since judges lead with the verdict. "none"/"not" do not count as "no".
    """
    match = _YES_NO.search(text)
    if match is None:
        return None
    return match.group(1).lower() == "yes"


_NUMBER = r"(-?\d+(?:\.\d+)?)"
_OUT_OF_TEN = re.compile(_NUMBER + r"\s*(?:/|out of)\s*10\b", re.IGNORECASE)
_LABELLED = re.compile(r"\b(?:score|rating|similarity|fit)\b\W{0,3}(?:is\s+)?" + _NUMBER, re.IGNORECASE)
_ANY_NUMBER = re.compile(_NUMBER)
# "from 0 to 10", "0-10", "(0–10)": the scale, not the verdict.
_SCALE = re.compile(r"\b0\s*(?:-|–|to)\s*10\b", re.IGNORECASE)


def parse_score(text: str) -> float | None:
    """A 0-10 score from a judge answer; None if the text has no number, or its number is no score
    (outside 0-10: "503" from an error page is not a 10, and is never cached).

    Mentions of the scale itself ("0 to 10", "0-10") are ignored, so "on a scale of 0 to 10
    I give 7" reads as 7. Preference order: "N/10" or "N out of 10", then "score: N" /
    "rating is N", then the first number.
    """
    text = _SCALE.sub(" ", text)
    for pattern in (_OUT_OF_TEN, _LABELLED, _ANY_NUMBER):
        match = pattern.search(text)
        if match is not None:
            score = float(match.group(1))
            return score if 0.0 <= score <= 10.0 else None
    return None


# What an answer to each task looks like when it is one (the prompt asks for one word, or one
# integer "and nothing else"): only such answers are cached (mechsteer.taxonomy.judge.http). The
# readers above are lenient ("**Yes.**", "I'd say 7/10"); a cache must not keep an error page's
# "no healthy upstream" as a "no", or a sentence that merely contains a number as a score.
_VERDICT_SHAPE = re.compile(r"(?:answer\s*:\s*)?(?:yes|no)", re.IGNORECASE)
_SCORE_SHAPE = re.compile(r"(?:(?:score|rating|similarity|fit)\s*(?::|is)\s*)?" + _NUMBER + r"(?:\s*(?:/|out of)\s*10)?",
                          re.IGNORECASE)
_AROUND_AN_ANSWER = " \t\r\n*_`\"'.!"


def _is_verdict(answer: str) -> bool:
    return _VERDICT_SHAPE.fullmatch(answer.strip(_AROUND_AN_ANSWER)) is not None


def _is_score(answer: str) -> bool:
    match = _SCORE_SHAPE.fullmatch(answer.strip(_AROUND_AN_ANSWER))
    return match is not None and 0.0 <= float(match.group(1)) <= 10.0


ANSWER_SHAPES: dict[str, Callable[[str, ParsedPrompt], bool]] = {
    DESCRIBE_BEHAVIOUR.name: lambda answer, prompt: parse_description_answer(
        answer, prompt.fields.get("Sentence", ())) is not None,
    CONSISTENCY.name: lambda answer, _prompt: _is_verdict(answer),
    COMPLETENESS.name: lambda answer, _prompt: _is_score(answer),
    PAIR_SIMILARITY.name: lambda answer, _prompt: _is_score(answer),
}


def answer_has_shape(messages: Sequence[Mapping[str, str]], answer: str) -> bool | None:
    """Whether ``answer`` has the shape the task of ``messages`` (a mechsteer prompt) asks for: a
    title and description, the word yes or no, a score 0-10 as a number; None for a prompt of
    another kind, which this module cannot judge."""
    try:
        prompt = parse_prompt(messages)
    except ValueError:
        return None
    return ANSWER_SHAPES[prompt.task](answer, prompt)
