"""Judge metrics against a scripted judge whose answers are a known function of the prompt,
checked against values worked out by hand; the oracle on planted and shuffled taxonomies;
prompt round trips and answer parsing; LocalJudge on SmolLM2 (slow)."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mechsteer.taxonomy.judge import prompts as judge_prompts
from mechsteer.taxonomy.judge.metrics import (
    BehaviourDescription,
    JudgeParseError,
    completeness,
    consistency,
    describe_behaviours,
    example_sentences,
    independence,
    judge_score,
)
from mechsteer.taxonomy.judge.oracle import OracleJudge
from mechsteer.taxonomy.judge.prompts import parse_prompt


class ScriptedJudge:
    """Answers from fixed tables keyed by (task, title, sentence) read out of the prompt."""

    def __init__(self, consistency=None, completeness=None, similarity=None, describe=None):
        self.consistency = consistency or {}
        self.completeness = completeness or {}
        self.similarity = similarity or {}
        self.describe = describe  # callable(sentences, call_index) -> str
        self.prompts: list[judge_prompts.ParsedPrompt] = []

    def complete(self, messages, *, max_tokens=256, temperature=0.0):
        prompt = parse_prompt(messages)
        self.prompts.append(prompt)
        if prompt.task == "consistency":
            return self.consistency[prompt.one("Title")][prompt.one("Sentence")]
        if prompt.task == "completeness":
            return self.completeness[prompt.one("Sentence")]
        if prompt.task == "pair_similarity":
            return self.similarity[(prompt.one("Title A"), prompt.one("Title B"))]
        return self.describe(prompt.fields["Sentence"], len(self.prompts) - 1)


# Ten sentences: behaviour 0 = s0..s3, behaviour 1 = s4..s6, behaviour 2 = s7..s9.
SENTENCES = [f"s{i}" for i in range(10)]
ASSIGNMENTS = [0, 0, 0, 0, 1, 1, 1, 2, 2, 2]
DESCRIPTIONS = {
    0: BehaviourDescription(0, "A", "Category A."),
    1: BehaviourDescription(1, "B", "Category B."),
    2: BehaviourDescription(2, "C", "Category C."),
}


def yes_no_table(yes: set[str], unparsable: set[str] = frozenset()) -> dict[str, str]:
    # Answers in the shapes judges produce: punctuation, case, markdown, a lead-in.
    styles_yes = ["Yes.", "**YES**", "yes, it matches", "Answer: Yes"]
    styles_no = ["No.", "no", "**No**, it does not", "Answer: NO"]
    table = {}
    for i, sentence in enumerate(SENTENCES):
        if sentence in unparsable:
            table[sentence] = "I am not sure."
        elif sentence in yes:
            table[sentence] = styles_yes[i % 4]
        else:
            table[sentence] = styles_no[i % 4]
    return table


SCRIPTED = ScriptedJudge(
    consistency={
        # A: in-cluster s0,s1 yes, s2 no, s3 unparsable; out-of-cluster s4 yes, s5..s9 no.
        "A": yes_no_table({"s0", "s1", "s4"}, unparsable={"s3"}),
        # B: in-cluster s4,s5,s6 all yes; out-of-cluster s0 and s7 yes.
        "B": yes_no_table({"s4", "s5", "s6", "s0", "s7"}),
        # C: says no to everything.
        "C": yes_no_table(set()),
    },
    completeness={
        "s0": "10",
        "s1": "8/10",
        "s2": "Score: 6",
        "s3": "no idea",  # unparsable
        "s4": "5",
        "s5": "I would rate it 7.",
        "s6": "12",  # no score on a 0-10 scale: unparsable, never clamped
        "s7": "0",
        "s8": "3 out of 10",
        "s9": "On a scale of 0 to 10: 4",
    },
    similarity={("A", "B"): "2", ("A", "C"): "similarity: 5", ("B", "C"): "10/10"},
)

# Worked out by hand from the tables above.
# A: TP=2 (s0,s1) FN=1 (s2) FP=1 (s4) TN=5, 1 unparsable -> P=2/3, R=2/3, F1=2/3.
# B: TP=3 FN=0 FP=2 (s0,s7) TN=5 -> P=3/5, R=1, F1=2*3/(2*3+2+0)=3/4.
# C: TP=0 FN=3 FP=0 TN=7 -> P=0, R=0, F1=0.
HAND_F1 = {0: 2 / 3, 1: 3 / 4, 2: 0.0}
HAND_MEAN_F1 = (2 / 3 + 3 / 4 + 0.0) / 3
# Completeness ratings parsed: 10, 8, 6, -, 5, 7, -, 0, 3, 4 -> 43 over 8 ratings.
HAND_COMPLETENESS = 43 / 8 / 10
HAND_COMPLETENESS_PER_BEHAVIOUR = {0: 24 / 3 / 10, 1: 12 / 2 / 10, 2: 7 / 3 / 10}
# Similarities 2, 5, 10 -> orthogonality (0.8 + 0.5 + 0.0) / 3.
HAND_ORTHOGONALITY = (0.8 + 0.5 + 0.0) / 3


def test_consistency_by_hand() -> None:
    result = consistency(SCRIPTED, DESCRIPTIONS, SENTENCES, ASSIGNMENTS, n_in=100, n_out=100)
    a, b, c = (result.per_behaviour[i] for i in range(3))
    assert (a.true_positives, a.false_negatives, a.false_positives, a.true_negatives) == (2, 1, 1, 5)
    assert (b.true_positives, b.false_negatives, b.false_positives, b.true_negatives) == (3, 0, 2, 5)
    assert (c.true_positives, c.false_negatives, c.false_positives, c.true_negatives) == (0, 3, 0, 7)
    assert (a.precision, a.recall) == pytest.approx((2 / 3, 2 / 3))
    assert (b.precision, b.recall) == pytest.approx((3 / 5, 1.0))
    assert (c.precision, c.recall) == (0.0, 0.0)
    assert {i: r.f1 for i, r in result.per_behaviour.items()} == pytest.approx(HAND_F1)
    assert result.mean_f1 == pytest.approx(HAND_MEAN_F1)
    assert (a.n_unparsable, result.n_unparsable, result.n_judged) == (1, 1, 30)


def test_completeness_by_hand() -> None:
    result = completeness(SCRIPTED, DESCRIPTIONS, SENTENCES, ASSIGNMENTS, n_per_behaviour=100)
    assert result.score == pytest.approx(HAND_COMPLETENESS)
    assert result.per_behaviour == pytest.approx(HAND_COMPLETENESS_PER_BEHAVIOUR)
    assert (result.n_judged, result.n_unparsable) == (10, 2)


def test_independence_by_hand() -> None:
    result = independence(SCRIPTED, DESCRIPTIONS)
    assert result.pair_similarity == {(0, 1): 2.0, (0, 2): 5.0, (1, 2): 10.0}
    assert result.orthogonality == pytest.approx(HAND_ORTHOGONALITY)
    assert (result.n_judged, result.n_unparsable) == (3, 0)


def test_judge_score_is_the_mean_of_the_three() -> None:
    scores = judge_score(SCRIPTED, DESCRIPTIONS, SENTENCES, ASSIGNMENTS)
    assert scores.final == pytest.approx((HAND_MEAN_F1 + HAND_COMPLETENESS + HAND_ORTHOGONALITY) / 3)


def test_unparsable_pair_is_left_out_not_zero() -> None:
    judge = ScriptedJudge(similarity={("A", "B"): "2", ("A", "C"): "cannot say", ("B", "C"): "4"})
    result = independence(judge, DESCRIPTIONS)
    assert result.orthogonality == pytest.approx((0.8 + 0.6) / 2)
    assert result.n_unparsable == 1


def test_all_unparsable_raises() -> None:
    judge = ScriptedJudge(
        consistency={t: dict.fromkeys(SENTENCES, "hmm") for t in "ABC"},
        completeness=dict.fromkeys(SENTENCES, "fine"),
        similarity={("A", "B"): "?", ("A", "C"): "?", ("B", "C"): "?"},
    )
    with pytest.raises(JudgeParseError, match="yes or no"):
        consistency(judge, DESCRIPTIONS, SENTENCES, ASSIGNMENTS)
    with pytest.raises(JudgeParseError, match="number"):
        completeness(judge, DESCRIPTIONS, SENTENCES, ASSIGNMENTS)
    with pytest.raises(JudgeParseError, match="number"):
        independence(judge, DESCRIPTIONS)


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match="same length"):
        consistency(SCRIPTED, DESCRIPTIONS, SENTENCES, ASSIGNMENTS[:-1])
    with pytest.raises(ValueError, match=r"without a description: \[7\]"):
        completeness(SCRIPTED, DESCRIPTIONS, SENTENCES, ASSIGNMENTS[:-1] + [7])
    with pytest.raises(ValueError, match="at least 2 behaviours"):
        independence(SCRIPTED, {0: DESCRIPTIONS[0]})


# ---- sampling ---------------------------------------------------------------------------------


def sampled_sentences(judge: ScriptedJudge, task: str, title: str) -> list[str]:
    return [p.one("Sentence") for p in judge.prompts if p.task == task and p.one("Title") == title]


def big_taxonomy() -> tuple[list[str], list[int], dict[int, BehaviourDescription]]:
    sentences = [f"t{i}" for i in range(50)]
    assignments = [0] * 30 + [1] * 20
    descriptions = {0: BehaviourDescription(0, "A", "a"), 1: BehaviourDescription(1, "B", "b")}
    return sentences, assignments, descriptions


def always(answer: str, sentences: list[str]) -> dict[str, dict[str, str]]:
    return {title: dict.fromkeys(sentences, answer) for title in ("A", "B")}


def test_consistency_samples_n_in_and_n_out_per_behaviour() -> None:
    sentences, assignments, descriptions = big_taxonomy()

    def run(seed: int) -> ScriptedJudge:
        judge = ScriptedJudge(consistency=always("yes", sentences))
        result = consistency(judge, descriptions, sentences, assignments, n_in=5, n_out=7, seed=seed)
        assert result.n_judged == 2 * (5 + 7)
        # The judge says yes to everything: recall 1, precision = 5 / 12.
        assert result.per_behaviour[0].precision == pytest.approx(5 / 12)
        return judge

    judge = run(seed=0)
    for title, behaviour in (("A", 0), ("B", 1)):
        chosen = sampled_sentences(judge, "consistency", title)
        inside = [s for s in chosen if assignments[sentences.index(s)] == behaviour]
        assert len(chosen) == len(set(chosen)) == 12
        assert len(inside) == 5
    assert sampled_sentences(run(seed=0), "consistency", "A") == sampled_sentences(judge, "consistency", "A")
    assert sampled_sentences(run(seed=1), "consistency", "A") != sampled_sentences(judge, "consistency", "A")


def test_completeness_samples_within_the_cluster() -> None:
    sentences, assignments, descriptions = big_taxonomy()
    judge = ScriptedJudge(completeness=dict.fromkeys(sentences, "5"))
    result = completeness(judge, descriptions, sentences, assignments, n_per_behaviour=4)
    assert result.n_judged == 8
    for title, behaviour in (("A", 0), ("B", 1)):
        chosen = sampled_sentences(judge, "completeness", title)
        assert len(set(chosen)) == 4
        assert all(assignments[sentences.index(s)] == behaviour for s in chosen)


def test_example_sentences_top_then_random() -> None:
    sentences = [f"u{i}" for i in range(12)]
    assignments = [0] * 8 + [1] * 4
    activations = [0.1, 0.9, 0.5, 0.7, 0.2, 0.3, 0.0, 0.4, 1.0, 2.0, 3.0, 4.0]
    examples = example_sentences(sentences, assignments, activations, n_top=3, n_random=2, seed=0)
    assert examples[0][:3] == ["u1", "u3", "u2"]  # activations 0.9, 0.7, 0.5
    assert len(examples[0]) == 5 and len(set(examples[0])) == 5
    assert set(examples[0][3:]) <= {"u0", "u4", "u5", "u6", "u7"}
    assert examples[1] == ["u11", "u10", "u9", "u8"]  # all of a small cluster, top first
    with pytest.raises(ValueError, match="same length"):
        example_sentences(sentences, assignments, activations[:-1])


# ---- titles and descriptions -------------------------------------------------------------------


def test_describe_behaviours_majority_title_and_repeats() -> None:
    examples = {0: [f"a{i}" for i in range(6)], 1: [f"b{i}" for i in range(6)]}
    answers = {
        0: [
            "Title: Checking\nDescription: first check.",
            "I cannot tell.",
            "**Title:** checking \n**Description:** second check.",
            "Title: Planning\nDescription: a plan.",
            "Title: Planning\nDescription: another plan.",
        ],
        1: ["Title: Planning\nDescription: p.", "Title: Recall\nDescription: r."] * 2
        + ["Title: recall\nDescription: r2."],
    }
    calls = {0: 0, 1: 0}

    def describe(sentences, _index):
        behaviour = 0 if sentences[0].startswith("a") else 1
        calls[behaviour] += 1
        return answers[behaviour][calls[behaviour] - 1]

    judge = ScriptedJudge(describe=describe)
    descriptions = describe_behaviours(judge, examples, n_repeats=5, seed=0)
    # 0: "checking" x2 vs "planning" x2 -> tie -> earliest repeat, with its own description.
    assert (descriptions[0].title, descriptions[0].description) == ("Checking", "first check.")
    assert (descriptions[0].n_unparsable, len(descriptions[0].candidates)) == (1, 4)
    # 1: "recall" x3 beats "planning" x2; the first "Recall" repeat's description.
    assert (descriptions[1].title, descriptions[1].description) == ("Recall", "r.")
    # Each repeat shows all examples, in a seeded, varying order.
    orders = [p.fields["Sentence"] for p in judge.prompts[:5]]
    assert all(sorted(order) == sorted(examples[0]) for order in orders)
    assert len(set(orders)) > 1


def test_describe_behaviours_all_unparsable_raises() -> None:
    judge = ScriptedJudge(describe=lambda sentences, index: "Sorry, I can't.")
    with pytest.raises(JudgeParseError, match="behaviour 3"):
        describe_behaviours(judge, {3: ["x", "y"]}, n_repeats=2)


# ---- the oracle on planted and shuffled taxonomies ---------------------------------------------

PLANTED_LABELS = {
    "plan": "Lays out the next steps of the solution.",
    "verify": "Checks a previously computed result.",
    "backtrack": "Abandons the current approach.",
    "compute": "Carries out an arithmetic step.",
}


def planted() -> tuple[list[str], list[int], OracleJudge]:
    sentences = [f"{label} sentence number {i}." for label in PLANTED_LABELS for i in range(25)]
    labels = {s: s.split()[0] for s in sentences}
    assignments = [list(PLANTED_LABELS).index(labels[s]) for s in sentences]
    return sentences, assignments, OracleJudge(labels, PLANTED_LABELS)


def run_oracle(sentences: list[str], assignments: list[int], oracle: OracleJudge):
    activations = [random.Random(i).random() for i in range(len(sentences))]
    examples = example_sentences(sentences, assignments, activations, n_top=10, n_random=10)
    descriptions = describe_behaviours(oracle, examples, n_repeats=2)
    return descriptions, judge_score(oracle, descriptions, sentences, assignments, n_in=20, n_out=20, n_per_behaviour=20)


def test_oracle_gives_perfect_scores_on_the_planted_taxonomy() -> None:
    sentences, assignments, oracle = planted()
    descriptions, scores = run_oracle(sentences, assignments, oracle)
    assert [d.title for d in descriptions.values()] == list(PLANTED_LABELS)
    assert [d.description for d in descriptions.values()] == list(PLANTED_LABELS.values())
    assert scores.consistency.mean_f1 == 1.0
    assert scores.completeness.score == 1.0
    assert scores.independence.orthogonality == 1.0
    assert scores.final == 1.0


def test_oracle_scores_drop_on_a_shuffled_taxonomy() -> None:
    sentences, assignments, oracle = planted()
    shuffled = list(assignments)
    random.Random(0).shuffle(shuffled)
    _, scores = run_oracle(sentences, shuffled, oracle)
    assert scores.consistency.mean_f1 < 0.6
    assert scores.completeness.score < 0.6
    assert scores.final < 0.8


# ---- prompts and parsing -----------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(title=st.text(), description=st.text(), sentence=st.text())
def test_prompt_round_trip(title: str, description: str, sentence: str) -> None:
    prompt = parse_prompt(judge_prompts.consistency_messages(title, description, sentence))
    assert prompt.task == "consistency"
    assert (prompt.one("Title"), prompt.one("Description"), prompt.one("Sentence")) == (title, description, sentence)


@settings(max_examples=30, deadline=None)
@given(sentences=st.lists(st.text(), min_size=1, max_size=8))
def test_describe_prompt_round_trip(sentences: list[str]) -> None:
    prompt = parse_prompt(judge_prompts.describe_behaviour_messages(sentences))
    assert prompt.fields["Sentence"] == tuple(sentences)


def test_every_template_is_named_and_versioned() -> None:
    assert judge_prompts.PROMPT_VERSION
    assert set(judge_prompts.TEMPLATES) == {"describe_behaviour", "consistency", "completeness", "pair_similarity"}
    for name, template in judge_prompts.TEMPLATES.items():
        messages = judge_prompts.render_messages(template, [("Sentence", "x")])
        assert messages[1]["content"].startswith(f"Task: {name}\n")
        # No instruction line (e.g. "Title: <a short title>") is mistaken for a field.
        assert parse_prompt(messages).fields == {"Sentence": ("x",)}
        assert template.max_tokens >= 1


@pytest.mark.parametrize(
    ("text", "verdict"),
    [
        ("Yes", True),
        ("yes.", True),
        ("**YES**", True),
        ("Answer: no", False),
        ("No, it does not match.", False),
        ("Not really; none of it fits.", None),
        ("", None),
    ],
)
def test_parse_yes_no(text: str, verdict: bool | None) -> None:
    assert judge_prompts.parse_yes_no(text) is verdict


@pytest.mark.parametrize(
    ("text", "score"),
    [
        ("7", 7.0),
        ("Score: 3/10", 3.0),
        ("I'd say 8 out of 10.", 8.0),
        ("On a scale from 0 to 10, this is a 6.", 6.0),
        ("(0-10) rating: 9", 9.0),
        ("15", None),  # no score: never clamped into one (an error page's "503" is not a 10)
        ("-2", None),
        ("503 Service Unavailable", None),
        ("7.5", 7.5),
        ("no number here", None),
    ],
)
def test_parse_score(text: str, score: float | None) -> None:
    assert judge_prompts.parse_score(text) == score


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("Title: Verification\nDescription: Checks results.", ("Verification", "Checks results.")),
        ("**Title**: Planning\n\n**Description**: Sets up\nthe next steps.", ("Planning", "Sets up the next steps.")),
        ('## Title: "Backtracking"\nDESCRIPTION: Gives up an approach.', ("Backtracking", "Gives up an approach.")),
        ("Title: Only a title", None),
        ("Description: only a description", None),
    ],
)
def test_parse_description_answer(text: str, parsed: tuple[str, str] | None) -> None:
    assert judge_prompts.parse_description_answer(text) == parsed


def test_describe_prompt_shows_worked_examples_before_the_request() -> None:
    sentences = ["Day 1: 83 + 4 = 87.", "Day 2: 87 + 4 = 91."]
    messages = judge_prompts.describe_behaviour_messages(sentences)
    examples = judge_prompts.DESCRIBE_BEHAVIOUR.examples
    assert [m["role"] for m in messages] == ["system"] + ["user", "assistant"] * len(examples) + ["user"]
    assert len(examples) >= 2 and len({example.answer for example in examples}) == len(examples)
    for example, (question, answer) in zip(examples, zip(messages[1::2], messages[2::2], strict=False),
                                           strict=False):
        shown = parse_prompt([question])
        assert shown.task == "describe_behaviour" and shown.fields["Sentence"] == tuple(s for _, s in example.fields)
        assert answer["content"] == example.answer
        # the worked answers are in the asked format (read without the echo check)
        assert judge_prompts._read_description_answer(answer["content"]) is not None
    assert parse_prompt(messages).fields["Sentence"] == tuple(sentences)  # the request is the last user turn


@pytest.mark.parametrize(
    "answer",
    [
        # SmolLM2-135M's answers before the worked examples (tests/engines/test_server.py)
        "Task: describe_behaviour\n\nTask: describe_behaviour\n\nTask: describe_behaviour",
        "The answer is 46.",
        # the format's placeholders copied back
        "Title: <a short title of two to five words>\n"
        "Description: <one or two sentences describing the shared cognitive function>",
        # a worked example copied, or its description
        "Title: Doing arithmetic\nDescription: The model carries out one arithmetic operation on the running value.",
        "Title: Adding\nDescription: the model carries out one arithmetic operation on the running value",
        # one of the described sentences as the title
        "Title: The answer is 46.\nDescription: The model gives its final answer.",
        "Title: the answer is 46\nDescription: The model gives its final answer.",
    ],
)
def test_description_answers_that_echo_the_prompt_are_refused(answer: str) -> None:
    sentences = ["The answer is 46.", "The answer is 12."]
    assert judge_prompts.parse_description_answer(answer, sentences) is None
    assert judge_prompts.answer_has_shape(judge_prompts.describe_behaviour_messages(sentences), answer) is False


def test_an_own_title_is_kept_and_the_refusal_quotes_the_answer() -> None:
    sentences = ["The answer is 46.", "The answer is 12."]
    own = "Title: Stating the answer\nDescription: The model states its final answer."
    assert judge_prompts.parse_description_answer(own, sentences) == (
        "Stating the answer", "The model states its final answer.")
    assert judge_prompts.answer_has_shape(judge_prompts.describe_behaviour_messages(sentences), own) is True
    # an example's title may be the apt one: kept with a description of its own
    apt = "Title: **Restating  the problem**\nDescription: The model says again what is asked."
    assert judge_prompts.parse_description_answer(apt, sentences) == (
        "Restating  the problem", "The model says again what is asked.")
    # a sentence is an echo only for the prompt that showed it
    echo = "Title: The answer is 46.\nDescription: The model gives its final answer."
    assert judge_prompts.parse_description_answer(echo) == ("The answer is 46.", "The model gives its final answer.")
    judge = ScriptedJudge(describe=lambda shown, _index: echo)
    with pytest.raises(JudgeParseError, match=r"behaviour 0 .*'Title: The answer is 46\.\\nDescription"):
        describe_behaviours(judge, {0: sentences}, n_repeats=1)


# ---- LocalJudge on a real chat model -----------------------------------------------------------


@pytest.mark.slow
def test_local_judge_on_smollm2() -> None:
    from mechsteer.core.models import load_model
    from mechsteer.taxonomy.judge.base import complete_many
    from mechsteer.taxonomy.judge.local import LocalJudge

    judge = LocalJudge(load_model("smollm2"))
    messages = judge_prompts.consistency_messages(
        "Verification", "The model checks a previous result.", "Let me check: 2 + 2 = 4, correct."
    )
    prompt_text = judge.model.tokenizer.decode(judge.render(messages))
    assert prompt_text.startswith("<|im_start|>system\n")
    assert prompt_text.endswith("<|im_start|>assistant\n")
    answers = complete_many(judge, [messages, messages], max_tokens=2)
    assert len(answers) == 2 and all(isinstance(a, str) and a for a in answers)
    assert answers[0] == answers[1]  # greedy: the same prompt, the same answer
    assert "Task:" not in answers[0]  # the continuation only, not the prompt
    with pytest.raises(ValueError, match="temperature must be 0"):
        judge.complete(messages, temperature=0.7)
