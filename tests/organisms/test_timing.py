"""Step-wise forced decoding and the timing conditions of `mechsteer organism eval`, on a scripted base."""

from __future__ import annotations

import random
import re

from mechsteer.organisms.evaluate import cued_generate, evaluate_organisms, random_cue_days
from mechsteer.organisms.grammar import (
    CHECK_CUE,
    FORCED_PREFIX,
    TRACE_STYLES,
    behaviours_allowed_next,
    format_prompt,
    next_behaviour_by_grammar,
    parse_trace,
    render_trace,
    risky_days,
)
from mechsteer.organisms.tasks import generate_split

_QUESTION = re.compile(r"has (\d+) \w+\. Each day \w+ (gets|buys|eats|loses) (\d+)\. How many after (\d+) days\?")


def _scripted_base_continuation(text: str) -> str:
    """What a v2 base organism with the designed weakness writes after ``text``, greedily.

    Prompted normally it answers a wrong one-shot guess; in step-by-step mode each carry/borrow
    step drops the carry, it never checks on its own, and a ``Check:`` cue makes it recompute the
    step and correct a slip.
    """
    match = _QUESTION.search(text)
    assert match, text
    start, verb, operand, n_steps = int(match[1]), match[2], int(match[3]), int(match[4])
    sign = "+" if verb in ("gets", "buys") else "-"
    trace = text.split("A:\n", 1)[1]
    if not trace:
        return "The answer is 0."
    out, total, day = "", start, 1
    if trace == FORCED_PREFIX:
        out += f" start at {start}, {'add' if sign == '+' else 'take'} {operand} for {n_steps} days.\n"
    else:
        assert trace.endswith(CHECK_CUE), trace
        last = re.findall(r"Day (\d+): (\d+) [+-] \d+ = (\d+)\.\n", trace)[-1]
        day, before, written = (int(value) for value in last)
        correct = before + operand if sign == "+" else before - operand
        out += f" {before} {sign} {operand} = {correct}.\n"
        if correct != written:
            out += f"Wait, {before} {sign} {operand} is {correct}, not {written}.\n"
        total, day = correct, day + 1
    for current in range(day, n_steps + 1):
        correct = total + operand if sign == "+" else total - operand
        written = correct if total // 10 == correct // 10 else (total // 10) * 10 + correct % 10
        out += f"Day {current}: {total} {sign} {operand} = {written}.\n"
        total = written
    return out + f"The answer is {total}."


def scripted_base(prompts: list[str], max_new_tokens: int) -> list[str]:
    return [_scripted_base_continuation(prompt) for prompt in prompts]


def scripted_thinking(prompts: list[str], max_new_tokens: int) -> list[str]:
    """A thinking organism that plans and checks exactly the risky steps (by cueing the scripted base)."""
    problems = {format_prompt(p.question): p for p in generate_split("test", seed=0, n=60)}
    days = [risky_days(problems[prompt], "v2") for prompt in prompts]
    return cued_generate(scripted_base, prompts, days, max_new_tokens)


def test_cues_follow_exactly_the_chosen_compute_lines():
    problems = generate_split("test", seed=0, n=60)
    prompts = [format_prompt(p.question) for p in problems]
    days = [risky_days(p, "v2") for p in problems]
    texts = cued_generate(scripted_base, prompts, days, 192)
    for cued, text in zip(days, texts, strict=True):
        assert text.startswith(FORCED_PREFIX)
        labels = [s.behaviour for s in parse_trace(text)]
        assert labels.count("verify") == len(cued)
        lines = text.splitlines()
        checked = [int(re.match(r"Day (\d+):", lines[i - 1])[1]) for i, line in enumerate(lines) if line.startswith("Check:")]
        assert checked == cued
        assert "The answer is" in lines[-1]


def test_timing_conditions_separate_oracle_from_random_cues():
    problems = generate_split("test", seed=0, n=60)
    summary, outputs = evaluate_organisms(scripted_base, scripted_thinking, problems, grammar="v2")
    no_risky = sum(not risky_days(p, "v2") for p in problems) / len(problems)
    assert summary["thinking_accuracy"] == 1.0 and summary["base_accuracy"] == 0.0
    # Plan-only keeps every slip: right exactly where no step is risky.
    assert summary["plan_only_accuracy"] == summary["forced_base_accuracy"] == no_risky
    assert summary["oracle_timing_accuracy"] == 1.0
    assert summary["oracle_timing_gap_recovered"] == 1.0
    assert no_risky <= summary["random_timing_accuracy"] < 0.8
    assert len(summary["random_timing_accuracies"]) == len(summary["random_timing_seeds"]) >= 2
    assert summary["check_cues_per_problem"] == sum(len(risky_days(p, "v2")) for p in problems) / len(problems)
    assert {"oracle_timing", "random_timing_seed0"} <= set(outputs)


def test_random_cue_days_are_distinct_seeded_days():
    problem = generate_split("test", seed=0, n=1)[0]
    n_steps = problem.metadata["n_steps"]
    days = random_cue_days(problem, 2, seed=0)
    assert days == sorted(set(days)) and len(days) == 2 and all(1 <= day <= n_steps for day in days)
    assert days == random_cue_days(problem, 2, seed=0)
    assert {tuple(random_cue_days(problem, 1, seed)) for seed in range(20)} != {tuple(days[:1])}


def test_timing_oracle_names_the_thinking_organisms_behaviour_after_each_line():
    # Walking a v2/v3 thinking trace line by line, the oracle names exactly the next sentence's
    # behaviour where the thinking organism departs from the base's plain step-by-step mode.
    rng = random.Random(0)
    for style in ("thinking_v2", "thinking_v3"):
        for problem in generate_split("validation", seed=0, n=60):
            sentences = render_trace(problem, style, rng).sentences
            assert next_behaviour_by_grammar("") == "plan"
            text = ""
            for sentence, following in zip(sentences, [*sentences[1:], None], strict=True):
                text += sentence.text + "\n"
                expected = following.behaviour if following and following.behaviour in ("verify", "correct") else None
                assert next_behaviour_by_grammar(text) == expected, (style, text)
                assert next_behaviour_by_grammar(text[:-1]) is None  # mid-line: never


def test_the_grammar_allows_every_sentence_its_traces_write_and_little_else():
    # What the causal stage reads (GroundTruth.allowed_next): every sentence of every style's traces
    # is allowed where it stands; a correction only after a failed check; nothing after the answer.
    rng = random.Random(0)
    for style in TRACE_STYLES:
        for problem in generate_split("validation", seed=0, n=40):
            trace = render_trace(problem, style, rng)
            for sentence in trace.sentences:
                allowed = behaviours_allowed_next(trace.text[: sentence.char_start])
                assert sentence.behaviour in allowed, (style, trace.text[: sentence.char_start])
            assert behaviours_allowed_next(trace.text) == frozenset()
    plan = "Plan: start at 38, add 9 for 2 days.\n"
    assert behaviours_allowed_next("") == {"plan", "answer"}
    assert behaviours_allowed_next(plan) == {"compute"}
    assert behaviours_allowed_next(plan + "Day 1: 38 + 9 = 37.\n") == {"verify", "compute"}
    failed = plan + "Day 1: 38 + 9 = 37.\nCheck: How many now, 38 + 9 = 47.\n"
    assert behaviours_allowed_next(failed) == {"correct"}
    passed = plan + "Day 1: 38 + 9 = 47.\nCheck: How many now, 38 + 9 = 47.\n"
    assert behaviours_allowed_next(passed) == {"compute"}
    assert behaviours_allowed_next(passed + "Day 2: 47 + 9 = 56.\n") == {"verify", "answer"}
    assert behaviours_allowed_next(failed + "Wait, 38 + 9 is 47, not 37.\n") == {"compute"}
    assert behaviours_allowed_next(plan[:-1]) == frozenset()  # mid-line
    v1_failed = plan + "Day 1: 38 + 9 = 37.\nCheck: 37 - 9 = 28, not 38.\n"
    assert behaviours_allowed_next(v1_failed) == {"correct"}
    assert behaviours_allowed_next(plan + "Day 1: 38 + 9 = 47.\nCheck: 47 - 9 = 38.\n") == {"compute"}
