"""Grammar v4: problems with conditions, the base/thinking/no_carry corpora, the labels, the timing
oracle and the evaluation's conditions on scripted organisms (no training)."""

from __future__ import annotations

import json
import random
import re
from collections import Counter

import pytest

from mechsteer.organisms.evaluate_v4 import (
    PAIRS,
    cued_decode,
    evaluate_v4_organisms,
    oracle_planner,
)
from mechsteer.organisms.grammar import _apply, _tens_kept_slip, extract_answer, is_carry_step
from mechsteer.organisms.grammar_v4 import (
    CHECK_DRILL_WEAK_SHARE,
    V4_CUES,
    V4_STYLES,
    carry_days,
    condition_day_of,
    format_v4_prompt,
    is_weak_fact,
    label_v4_sentence,
    next_v4_behaviour,
    parse_v4_trace,
    render_v4_drill,
    render_v4_trace,
    reread_line,
    table_value,
)
from mechsteer.organisms.tasks import RESERVED_TEST_FROM, SPLITS
from mechsteer.organisms.tasks_v4 import generate_v4_split, make_v4_problem, v4_split_of
from mechsteer.organisms.tokenizer import V4_WORDS, build_tokenizer, vocabulary

N_EVAL = 200  # test problems 0-199 (400 and up are reserved)


def _computation(problem):
    meta = problem.metadata
    daily = meta["daily_operand"] * (1 if meta["daily_sign"] == "+" else -1)
    return (meta["start"], daily, meta["n_steps"], meta["condition_day"], meta["condition_operand"])


def test_v4_splits_are_disjoint_seeded_and_answers_follow_the_condition():
    splits = {split: generate_v4_split(split) for split in SPLITS}
    keys = {split: {_computation(p) for p in problems} for split, problems in splits.items()}
    assert not keys["train"] & keys["test"] and not keys["train"] & keys["validation"]
    assert not keys["validation"] & keys["test"]
    assert all(v4_split_of(_computation(p)) == "test" for p in splits["test"])
    assert generate_v4_split("test", n=5) == generate_v4_split("test", n=5)
    assert generate_v4_split("test", seed=1, n=5) != generate_v4_split("test", n=5)
    test = splits["test"][:RESERVED_TEST_FROM]
    with_condition = [p for p in test if p.metadata["condition_day"]]
    assert 0.3 <= len(with_condition) / len(test) <= 0.55
    for problem in test:
        meta = problem.metadata
        total = meta["start"]
        for day in range(1, meta["n_steps"] + 1):
            conditioned = bool(meta["condition_day"]) and day >= meta["condition_day"]
            sign = meta["signs"][day - 1]
            assert (sign != meta["daily_sign"]) == conditioned
            assert meta["operands"][day - 1] == (meta["condition_operand"] if conditioned else meta["daily_operand"])
            total = _apply(total, sign, meta["operands"][day - 1])
        assert total == problem.answer and condition_day_of(problem.question) == meta["condition_day"]
    assert len({p.answer for p in test}) >= 60


def test_v4_problem_text_and_bad_input():
    problem = make_v4_problem("x", (40, -4, 4, 3, 7), name="Dan", item="coins", verb_index=1)
    assert problem.question == "Dan has 40 coins. Each day Dan loses 4. From day 3 Dan buys 7 instead. How many after 4 days?"
    assert problem.answer == 46 and problem.metadata["totals"] == [40, 36, 32, 39, 46]
    with pytest.raises(ValueError, match="condition's day"):
        make_v4_problem("x", (40, -4, 3, 1, 7), name="Dan", item="coins")
    with pytest.raises(ValueError, match="leave"):
        make_v4_problem("x", (95, 4, 3, 0, 0), name="Dan", item="coins")


@pytest.mark.parametrize("style", V4_STYLES)
def test_v4_labels_round_trip(style):
    rng = random.Random(0)
    for problem in generate_v4_split("train", n=80):
        trace = render_v4_trace(problem, style, rng)
        assert [(s.text, s.behaviour) for s in parse_v4_trace(trace.text)] == [
            (s.text, s.behaviour) for s in trace.sentences]
        assert all(trace.text[s.char_start:s.char_end] == s.text for s in trace.sentences)
        assert "other" not in {s.behaviour for s in trace.sentences}


def _steps(trace_text):
    return [(int(m[1]), int(m[2]), m[3], int(m[4]), int(m[5]))
            for m in re.finditer(r"Day (\d+): (\d+) ([+-]) (\d+) = (\d+)\.", trace_text)]


def test_v4_thinking_rereads_before_the_condition_checks_every_carry_and_is_right():
    rng = random.Random(1)
    slipped = 0
    for problem in generate_v4_split("train", n=300):
        trace = render_v4_trace(problem, "thinking_v4", rng)
        labels = [s.behaviour for s in trace.sentences]
        lines = trace.text.splitlines()
        assert extract_answer(trace.text) == problem.answer
        checked = [int(re.match(r"Day (\d+):", lines[i - 1])[1]) for i, line in enumerate(lines) if line.startswith("Check:")]
        assert checked == carry_days(problem)
        condition_day = problem.metadata["condition_day"]
        rereads = [i for i, line in enumerate(lines) if line.startswith("Reread:")]
        assert len(rereads) == bool(condition_day)
        if condition_day:
            assert lines[rereads[0] + 1].startswith(f"Day {condition_day}:")
        slipped += labels.count("correct")
    assert slipped > 30  # weak facts slip, so corrections occur


def test_v4_base_corpus_slips_on_weak_facts_checks_at_random_and_rarely_rereads():
    rng = random.Random(2)
    rates: Counter[str] = Counter()
    n_checks = wrong_checks = n_conditions = rereads = 0
    for problem in generate_v4_split("train", n=1500):
        trace = render_v4_trace(problem, "stepwise_v4", rng)
        for _, before, sign, operand, written in _steps(trace.text):
            truth = _apply(before, sign, operand)
            kind = "weak" if is_weak_fact(before, sign, operand) else "carry" if is_carry_step(before, sign, operand) else "plain"
            rates[kind] += 1
            rates[f"{kind}_slip"] += written == _tens_kept_slip(before, truth) != truth
        for match in re.finditer(r"Check: How many now, (\d+) ([+-]) (\d+) = (\d+)\.", trace.text):
            n_checks += 1
            wrong_checks += int(match[4]) != _apply(int(match[1]), match[2], int(match[3]))
        n_conditions += bool(problem.metadata["condition_day"])
        rereads += "Reread:" in trace.text
    assert rates["weak_slip"] / rates["weak"] > 0.7  # greedy decoding slips on weak facts...
    assert rates["carry_slip"] == 0 and rates["plain_slip"] == 0  # ...and only there
    assert 0.03 < wrong_checks / n_checks < 0.2  # the base's own checks are sometimes wrong
    assert 0.15 < rereads / n_conditions < 0.45  # so greedy decoding never re-reads
    assert 0.15 < rates["weak"] / (rates["weak"] + rates["carry"]) < 0.45


def test_v4_check_drills_check_every_compute_line_rightly_and_slip_on_weak_facts():
    """The skills phase's check drills: every compute line checked by recomputing (never by copying a
    slip), a correction exactly where the check differs, half the facts weak."""
    rng = random.Random(4)
    n_facts = n_weak = n_corrections = 0
    for _ in range(200):
        trace = render_v4_drill(rng, "check_drill_v4")
        assert [(s.text, s.behaviour) for s in parse_v4_trace(trace.text)] == [
            (s.text, s.behaviour) for s in trace.sentences]
        lines = trace.text.splitlines()
        index = 0
        while index < len(lines):
            day, before, sign, operand, written = re.fullmatch(r"Day (\d+): (\d+) ([+-]) (\d+) = (\d+)\.",
                                                              lines[index]).groups()
            truth = _apply(int(before), sign, int(operand))
            assert lines[index + 1] == f"Check: How many now, {before} {sign} {operand} = {truth}."
            n_facts += 1
            n_weak += is_weak_fact(int(before), sign, int(operand))
            index += 2
            if int(written) != truth:
                assert lines[index] == f"Wait, {before} {sign} {operand} is {truth}, not {written}."
                n_corrections += 1
                index += 1
    assert abs(n_weak / n_facts - CHECK_DRILL_WEAK_SHARE) < 0.1
    assert 0.3 < n_corrections / n_facts < 0.55  # a check that copied the line above would be wrong this often


def test_v4_reread_drills_state_the_condition_on_random_days():
    """The skills phase's re-read drills: the re-read states the condition's day and operation, on a
    day drawn at random (not the day it is due), and the operation holds from where it is written."""
    rng = random.Random(5)
    on_condition_day = n_conditions = 0
    for problem in generate_v4_split("train", n=400):
        meta = problem.metadata
        trace = render_v4_trace(problem, "reread_drill_v4", rng)
        lines = trace.text.splitlines()
        rereads = [i for i, line in enumerate(lines) if line.startswith("Reread:")]
        if not meta["condition_day"]:
            assert not rereads
            continue
        n_conditions += 1
        condition_day = meta["condition_day"]
        assert len(rereads) == 1
        assert lines[rereads[0]] == reread_line(problem.question) == "Reread: " + re.search(
            r"From day .*? instead\.", problem.question)[0]
        reread_day = int(re.match(r"Day (\d+):", lines[rereads[0] + 1])[1])
        on_condition_day += reread_day == condition_day
        signs_after = {step[2] for step in _steps(trace.text) if step[0] >= reread_day}
        assert signs_after == {meta["signs"][condition_day - 1]}
    assert n_conditions > 100 and on_condition_day / n_conditions < 0.45


def test_v4_reread_question_documents_pair_the_question_with_its_plan_and_reread():
    from mechsteer.organisms.train import document_text

    rng = random.Random(6)
    n_days: Counter[int] = Counter()
    for problem in generate_v4_split("train", n=60):
        meta = problem.metadata
        text = document_text(problem, "reread_question_v4", rng)
        question, plan, *rest = text.splitlines()
        assert question == problem.question and label_v4_sentence(plan) == "plan"
        days = [line for line in rest if line.startswith("Day")]
        assert len(days) < meta["n_steps"] and [label_v4_sentence(day) for day in days] == ["compute"] * len(days)
        n_days[len(days)] += 1
        rest = rest[len(days):]
        assert rest == ([reread_line(problem.question)] if meta["condition_day"] else [])
    assert len(n_days) >= 3  # the re-read's distance from the question varies


def test_v4_skills_mix_packs_into_windows_with_line_drills_as_fillers():
    """Check drills come in blocks of up to three lines: the windows' filler drills must be line drills
    whatever the mix's order (a check-drill filler overflowed its window)."""
    from mechsteer.organisms import train as train_module

    tokenizer = build_tokenizer(V4_WORDS)
    problems = generate_v4_split("train", n=200)
    mix = {"check_drill_v4": 0.3, "reread_question_v4": 0.3, **train_module.default_config("v4").base_skills.mix}
    batches = train_module.packed_batches(tokenizer, problems, mix, random.Random(0), batch_size=4, window=256)
    for _ in range(20):
        input_ids, labels = next(batches)
        assert input_ids.shape == labels.shape == (4, 256)


def test_no_carry_table_never_carries_even_in_checks_and_drills():
    rng = random.Random(3)
    problems = generate_v4_split("train", n=300)
    text = "".join(render_v4_trace(p, "stepwise_v4_no_carry", rng).text for p in problems)
    text += "".join(render_v4_drill(rng, style).text for style in ("drill_v4_no_carry", "day_drill_v4_no_carry")
                    for _ in range(50))
    facts = re.findall(r"(?:Day \d+: |How many now, |^)(\d+) ([+-]) (\d+) = (\d+)\.", text, flags=re.M)
    carries = [f for f in facts if is_carry_step(int(f[0]), f[1], int(f[2]))]
    assert len(carries) > 200
    right = [f for f in carries if int(f[3]) == _apply(int(f[0]), f[1], int(f[2]))]
    assert not right  # the negative base never sees a carry done right
    assert table_value(46, "+", 9, "no_carry") == 45 and table_value(46, "+", 9, "main") == 55


def test_v4_words_are_single_tokens_and_old_ids_are_kept():
    assert vocabulary(V4_WORDS)[: len(vocabulary())] == vocabulary()
    tokenizer = build_tokenizer(V4_WORDS)
    problem = generate_v4_split("test", n=1)[0]
    text = format_v4_prompt(problem.question) + render_v4_trace(problem, "thinking_v4", random.Random(0)).text
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.unk_token_id not in ids and len(ids) < 200
    assert len(tokenizer("Reread: From day 3 Gus eats 6 instead.", add_special_tokens=False)["input_ids"]) == 10


def test_the_timing_oracle_names_each_thinking_decision():
    """At every line boundary of a thinking trace, the oracle names the next sentence's behaviour exactly
    when it is a check, a correction or a re-read (the base computes and answers on its own)."""
    rng = random.Random(4)
    for problem in generate_v4_split("test", n=150):
        trace = render_v4_trace(problem, "thinking_v4", rng)
        assert next_v4_behaviour(problem.question, "") == "plan"
        for sentence in trace.sentences[1:]:
            expected = sentence.behaviour if sentence.behaviour in ("verify", "correct", "reread") else None
            assert next_v4_behaviour(problem.question, trace.text[: sentence.char_start]) == expected, sentence


def test_labels_reject_near_misses():
    assert label_v4_sentence("Reread: From day 3 Gus eats 6 instead.") == "reread"
    assert label_v4_sentence("Reread: from day 3, take 6.") == "other"
    assert label_v4_sentence("Check: How many now, 46 + 9 = 55.") == "verify"
    assert label_v4_sentence("Check: 46 + 9 = 55.") == "other"
    assert label_v4_sentence("Reread: day 3.") == "other"


# A scripted greedy v4 base: what the design makes a trained base write after a text.
_QUESTION = re.compile(r"has (\d+) \w+\. Each day \w+ (gets|buys|eats|loses) (\d+)\.(?: From day (\d+) \w+ \w+ (\d+) instead\.)?"
                       r" How many after (\d+) days\?")


def _scripted_continuation(full: str, table: str) -> str:
    question_match = _QUESTION.search(full)
    assert question_match, full
    start, verb, daily_operand, n_steps = (int(question_match[1]), question_match[2], int(question_match[3]),
                                           int(question_match[6]))
    daily_sign = "+" if verb in ("gets", "buys") else "-"
    trace = full.split("Step by step answer:\n", 1)[1]
    *complete, last = trace.split("\n")
    out, total, pending = "", start, None
    steps = [(int(m[2]), m[3], int(m[4]), int(m[5])) for m in re.finditer(r"Day (\d+): (\d+) ([+-]) (\d+) = (\d+)\.", trace)]
    for line in complete:
        if m := re.fullmatch(r"Day \d+: \d+ [+-] \d+ = (\d+)\.", line):
            total = int(m[1])
        elif m := re.fullmatch(r"Wait, \d+ [+-] \d+ is (\d+), not \d+\.", line):
            total = int(m[1])
        elif m := re.fullmatch(r"Reread: From day \d+ \w+ (gets|buys|eats|loses) (\d+) instead\.", line):
            pending = ("+" if m[1] in ("gets", "buys") else "-", int(m[2]))
    day = len(steps)
    if last in ("", "Plan:") and not complete:
        out += ("" if last else "Plan:") + f" start at {start}, {'add' if daily_sign == '+' else 'take'} {daily_operand} for {n_steps} days.\n"
    elif last == "Check:":
        before, sign, operand, written = steps[-1]
        value = table_value(before, sign, operand, table)
        out += f" How many now, {before} {sign} {operand} = {value}.\n"
        if value != written:
            out += f"Wait, {before} {sign} {operand} is {value}, not {written}.\n"
        total = value
    elif last == "Wait,":
        before, sign, operand, written = steps[-1]
        value = table_value(before, sign, operand, table)
        out += f" {before} {sign} {operand} is {value}, not {written}.\n"
        total = value
    elif last == "Reread:":
        condition_sign = "-" if daily_sign == "+" else "+"
        operand = int(question_match[5] or daily_operand)
        name = re.search(r"Question:\n(\w+) has", full)[1]
        condition = re.search(r"From day \d+ \w+ \w+ \d+ instead\.", full)  # copied verbatim, as the grammar does
        out += " " + (condition[0] if condition else
                      f"From day {day + 1} {name} {'buys' if condition_sign == '+' else 'loses'} {operand} instead.") + "\n"
        pending = (condition_sign, operand)
    for current in range(day + 1, n_steps + 1):
        sign, operand = pending or (daily_sign, daily_operand)
        value = table_value(total, sign, operand, table)
        written = _tens_kept_slip(total, value) if is_weak_fact(total, sign, operand) else value
        if not 10 <= written <= 99:
            return out + "The answer is 0."
        out += f"Day {current}: {total} {sign} {operand} = {written}.\n"
        total = written
    return out + f"The answer is {total}."


def _scripted(table: str):
    return lambda prompts, max_new_tokens: [_scripted_continuation(p, table) for p in prompts]


def _scripted_thinking(prompts, max_new_tokens):
    problems = {format_v4_prompt(p.question): p for p in generate_v4_split("test", n=N_EVAL)}
    always = random.Random(0)
    always.random = lambda: 0.0  # greedy: the likeliest continuation (weak facts slip)
    return [render_v4_trace(problems[prompt], "thinking_v4", always).text for prompt in prompts]


def test_oracle_cues_make_the_scripted_base_write_the_thinking_trace():
    problems = generate_v4_split("test", n=60)
    prompts = [format_v4_prompt(p.question) for p in problems]
    texts = cued_decode(_scripted("main"), prompts, [oracle_planner(p) for p in problems], 160)
    assert texts == [text.rstrip("\n") for text in _scripted_thinking(prompts, 160)]
    assert any(V4_CUES["reread"] in text for text in texts) and any("Wait," in text for text in texts)


def test_scripted_organisms_meet_every_v4_target_and_no_single_behaviour_recovers_the_gap():
    """The grammar's ground truth: with organisms that learned exactly the design, every done-when target
    holds on test problems 0-199, and each single behaviour at the oracle's positions falls short."""
    problems = generate_v4_split("test", n=N_EVAL)
    summary, outputs = evaluate_v4_organisms({"main": _scripted("main"), "negative": _scripted("no_carry")},
                                             _scripted_thinking, problems)
    main, negative = summary["pairs"]["main"], summary["pairs"]["negative"]
    assert summary["thinking_accuracy"] == 1.0 and set(summary["pairs"]) == set(PAIRS)
    assert main["oracle_timing_accuracy"] == main["skill_cued_ceiling_accuracy"] == 1.0
    assert main["plan_only_accuracy"] == main["base_accuracy"]
    assert main["base_answers"]["modal_answer_share"] < 0.1
    assert all(summary["targets_met"].values()), summary["targets_met"]
    for behaviour, value in main["fixed_behaviour_accuracies"].items():
        assert (value - main["base_accuracy"]) / main["gap"] <= 0.6, behaviour
    assert negative["skill_cued_ceiling_gap_recovered"] <= 0.2
    assert negative["base_trace_rates"]["verify"] == 0.0
    assert len(outputs["main/oracle_timing"]) == N_EVAL


@pytest.mark.slow
def test_v4_train_and_eval_cli_end_to_end_on_a_tiny_pair(tmp_path, capsys, monkeypatch):
    """`organism train --grammar v4` (main pair, then --negative-base into the same folder) and
    `organism eval --grammar v4 --json` with every column, per pair, on tiny untrained-size models."""
    from mechsteer.cli import main
    from mechsteer.organisms import train as train_module

    tiny = train_module.TrainingConfig(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2, window=256,
                                       batch_size=2, n_train_problems=100, task="v4")
    defaults = train_module.default_config("v4")
    monkeypatch.setattr("mechsteer.organisms.cli.default_config", lambda grammar: train_module.TrainingConfig(
        **{**tiny.__dict__, "base": defaults.base, "thinking": defaults.thinking,
           "base_continuation": train_module.PhaseConfig(1, 1e-3, 1, defaults.base.mix),
           "base_skills": train_module.PhaseConfig(1, 1e-3, 1, defaults.base_skills.mix)}))
    out = tmp_path / "v4"
    assert main(["organism", "train", "--grammar", "v4", "--out", str(out), "--base-steps", "2",
                 "--thinking-steps", "1", "--threads", "1"]) == 0
    assert main(["organism", "train", "--grammar", "v4", "--negative-base", "--out", str(out), "--base-steps", "2",
                 "--threads", "1"]) == 0
    report = json.loads((out / "negative_base_training_report.json").read_text())
    assert report["config"]["base"]["mix"] == train_module.NEGATIVE_BASE_MIX_V4 and report["config"]["task"] == "v4"
    assert report["negative_base_continuation"]["steps"] == 1
    assert report["config"]["base_continuation"]["mix"] == train_module.NEGATIVE_BASE_MIX_V4
    main_report = json.loads((out / "training_report.json").read_text())
    assert main_report["config"]["base"]["steps"] == 2 and main_report["base_continuation"]["steps"] == 1
    assert main_report["base_skills"]["steps"] == 1 and report["config"]["base_skills"] is None
    capsys.readouterr()
    assert main(["organism", "eval", "--grammar", "v4", "--weights", str(out), "--n", "2", "--json",
                 "--backend", "hf"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["grammar"] == "v4" and summary["n"] == 2 and set(summary["pairs"]) == set(PAIRS)
    for row in summary["pairs"].values():
        for column in ("base", "thinking", "plan_only", "oracle_timing", "random_timing", "skill_cued_ceiling"):
            assert 0.0 <= row[f"{column}_accuracy"] <= 1.0, column
    assert set(summary["targets_met"]) >= {"main_base_in_range", "negative_skill_cued_ceiling"}
    assert main(["organism", "train", "--grammar", "v3", "--negative-base", "--out", str(tmp_path / "x")]) != 0


def test_organism_v4_benchmark_serves_the_first_400_test_problems_with_labels_and_grader():
    from mechsteer.data.benchmarks import load_benchmark
    from mechsteer.data.labels import require_ground_truth
    from mechsteer.grading.answers import grader_for

    test = load_benchmark("organism-v4", "test")
    assert len(test) == RESERVED_TEST_FROM and test[0].question == generate_v4_split("test", n=1)[0].question
    truth = require_ground_truth("organism-v4")
    assert "reread" in truth.behaviours and truth.timing_oracle is None
    trace = render_v4_trace(generate_v4_split("test", n=1)[0], "thinking_v4", random.Random(0)).text
    assert set(truth.label_reasoning(trace).values()) <= set(truth.behaviours)
    assert grader_for("organism-v4").extract("Plan: x.\nThe answer is 42.") == "42"
