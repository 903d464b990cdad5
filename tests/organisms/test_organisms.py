"""Model organisms: task generator, trace grammar and labels, tokenizer, training, shipped pair."""

from __future__ import annotations

import json
import random
import re

import pytest
import torch

from mechsteer.organisms import weights_dir
from mechsteer.organisms.grammar import (
    BEHAVIOURS,
    OTHER,
    PROMPT_TEMPLATE,
    TRACE_STYLES,
    extract_answer,
    format_prompt,
    label_sentence,
    parse_trace,
    render_drill,
    render_trace,
    risky_days,
    split_sentences,
)
from mechsteer.organisms.tasks import SPLITS, generate_split, make_problem, split_of, split_size
from mechsteer.organisms.tokenizer import build_tokenizer


def _signed(problem) -> tuple[int, ...]:
    meta = problem.metadata
    return tuple(o if s == "+" else -o for o, s in zip(meta["operands"], meta["signs"], strict=True))


def test_generator_is_deterministic_and_seeded():
    first = generate_split("test", seed=0)
    again = generate_split("test", seed=0)
    assert len(first) >= 500
    assert [(p.id, p.question, p.answer, p.metadata) for p in first] == [
        (p.id, p.question, p.answer, p.metadata) for p in again
    ]
    other_seed = generate_split("test", seed=1, n=50)
    assert [p.question for p in other_seed] != [p.question for p in first[:50]]


def test_splits_are_disjoint_and_answers_follow_the_operations():
    keys = {}
    for split in SPLITS:
        problems = generate_split(split, seed=0, n=400)
        keys[split] = {(p.metadata["start"], *_signed(p)) for p in problems}
        for problem in problems:
            assert split_of(problem.metadata["start"], _signed(problem)) == split
            assert problem.answer == problem.metadata["start"] + sum(_signed(problem))
            assert problem.metadata["totals"][-1] == problem.answer
            assert all(10 <= total <= 99 for total in problem.metadata["totals"])
            meta = problem.metadata
            assert meta["n_steps"] in (3, 4, 5)
            assert len(set(_signed(problem))) == 1  # one operation, repeated every day
            # Every value a step needs sits at a fixed cue of the question.
            assert f"has {meta['start']} " in problem.question
            assert "Each day " in problem.question and f" {meta['operands'][0]}. " in problem.question
            assert problem.question.endswith(f"How many after {meta['n_steps']} days?")
    assert not keys["train"] & keys["test"]
    assert not keys["train"] & keys["validation"]
    assert not keys["validation"] & keys["test"]


def test_difficulty_parameters_and_bad_input():
    problem = make_problem("x", start=38, signed_operand=-9, n_steps=2, name="Ann", item="pens")
    assert problem.question == "Ann has 38 pens. Each day Ann eats 9. How many after 2 days?"
    assert problem.answer == 20 and problem.metadata["totals"] == [38, 29, 20]
    with pytest.raises(ValueError, match="n_steps"):
        make_problem("x", start=38, signed_operand=2, n_steps=7, name="Ann", item="pens")
    with pytest.raises(ValueError, match="one-digit"):
        make_problem("x", start=38, signed_operand=12, n_steps=2, name="Ann", item="pens")
    with pytest.raises(ValueError, match="leave"):
        make_problem("x", start=95, signed_operand=4, n_steps=2, name="Ann", item="pens")
    with pytest.raises(ValueError, match="split"):
        generate_split("dev")
    assert split_size("test") >= 500  # the held-out set the README's numbers use
    with pytest.raises(ValueError, match="n must be"):
        generate_split("test", n=split_size("test") + 1)


@pytest.mark.parametrize("style", TRACE_STYLES)
def test_labels_round_trip(style):
    rng = random.Random(3)
    for problem in generate_split("validation", seed=0, n=150):
        trace = render_trace(problem, style, rng)
        parsed = parse_trace(trace.text)
        assert parsed == list(trace.sentences)
        for sentence in trace.sentences:
            assert trace.text[sentence.char_start : sentence.char_end] == sentence.text
            assert sentence.behaviour in BEHAVIOURS
        answers = [sentence.text for sentence in trace.sentences if sentence.behaviour == "answer"]
        if style in ("stepwise_v2", "stepwise_v3"):
            # An unchecked v2/v3 slip propagates to the answer (checked in the stepwise_v2 test).
            assert len(answers) == 1 and trace.sentences[-1].behaviour == "answer"
            continue
        assert answers == [f"The answer is {problem.answer}."]
        assert extract_answer(trace.text) == problem.answer


def _slipped(compute_line: str) -> bool:
    """Whether a compute line "Day k: a +/- b = w." is wrong."""
    match = re.fullmatch(r"(?:Day \d+: )?(\d+) ([+-]) (\d+) = (\d+)\.", compute_line)
    assert match, compute_line
    before, sign, operand, written = match.groups()
    correct = int(before) + int(operand) if sign == "+" else int(before) - int(operand)
    return int(written) != correct


def test_thinking_traces_plant_every_behaviour_at_the_risky_steps():
    rng = random.Random(0)
    problems = generate_split("validation", seed=0, n=300)
    used = set()
    correcting = 0
    for problem in problems:
        trace = render_trace(problem, "thinking", rng)
        labels = [sentence.behaviour for sentence in trace.sentences]
        used.update(labels)
        correcting += "correct" in labels
        assert labels[0] == "plan"
        assert labels.count("verify") == problem.metadata["operands"].count(9)
        # Every correction follows a failed check, and every failed check is corrected.
        for index, label in enumerate(labels):
            if label == "correct":
                assert labels[index - 1] == "verify" and ", not " in trace.sentences[index - 1].text
    assert used == set(BEHAVIOURS)
    assert correcting / len(problems) >= 0.05


def _v2_steps(trace) -> list[tuple[str, list[str]]]:
    """(compute line, the labels of the lines that follow it before the next day) per day."""
    steps: list[tuple[str, list[str]]] = []
    for sentence in trace.sentences:
        if sentence.behaviour == "compute":
            steps.append((sentence.text, []))
        elif steps and sentence.behaviour in ("verify", "correct"):
            steps[-1][1].append(sentence.behaviour)
    return steps


@pytest.mark.parametrize("grammar", ["v2", "v3"])
def test_v2_thinking_checks_exactly_the_risky_steps_and_corrects_every_slip(grammar):
    rng = random.Random(0)
    problems = generate_split("validation", seed=0, n=300)
    used, with_risky, without_risky = set(), 0, 0
    for problem in problems:
        trace = render_trace(problem, f"thinking_{grammar}", rng)
        labels = [sentence.behaviour for sentence in trace.sentences]
        used.update(labels)
        assert labels[0] == "plan" and labels[-1] == "answer"
        assert extract_answer(trace.text) == problem.answer  # every slip is repaired
        risky = risky_days(problem, grammar)
        steps = _v2_steps(trace)
        assert len(steps) == problem.metadata["n_steps"]
        for day, (line, after) in enumerate(steps, start=1):
            assert line.startswith(f"Day {day}: ")
            # The first pass of a carry/borrow step drops the carry; a check and a correction follow.
            assert _slipped(line) == (day in risky)
            assert after == (["verify", "correct"] if day in risky else [])
        with_risky += bool(risky)
        without_risky += not risky
    assert used == set(BEHAVIOURS)
    # Most problems have a risky step, but not all: plan-only then fails often, not always.
    assert 0.6 <= with_risky / len(problems) <= 0.95 and without_risky > 0


@pytest.mark.parametrize("grammar", ["v2", "v3"])
def test_v2_stepwise_documents_slip_at_risky_steps_and_check_at_random(grammar):
    rng = random.Random(0)
    checked = {True: 0, False: 0}
    steps_by_risk = {True: 0, False: 0}
    wrong_answers = 0
    for problem in generate_split("validation", seed=0, n=300):
        trace = render_trace(problem, f"stepwise_{grammar}", rng)
        lines = trace.text.splitlines()
        total = problem.metadata["start"]
        for line, after in _v2_steps(trace):
            before, sign, operand = re.match(r"Day \d+: (\d+) ([+-]) (\d+)", line).groups()
            assert int(before) == total  # each day starts from the line above (or its correction)
            correct = int(before) + int(operand) if sign == "+" else int(before) - int(operand)
            risky = int(before) // 10 != correct // 10
            assert _slipped(line) == risky
            steps_by_risk[risky] += 1
            checked[risky] += "verify" in after
            # A check is always right; a correction follows exactly the checks that expose a slip.
            assert after in ([], ["verify"], ["verify", "correct"])
            assert ("correct" in after) == ("verify" in after and risky)
            written = int(line.rstrip(".").split()[-1])
            total = correct if after else written
        assert lines[-1] == f"The answer is {total}."
        wrong_answers += total != problem.answer
    # Checks come at random: at about the same rate after risky and safe steps.
    for risky in (True, False):
        assert 0.2 <= checked[risky] / steps_by_risk[risky] <= 0.4
    assert wrong_answers > 0  # an unchecked slip reaches the answer


def test_risky_days_by_grammar():
    nines = make_problem("x", start=38, signed_operand=9, n_steps=3, name="Ann", item="pens")
    assert risky_days(nines, "v1") == [1, 2, 3]  # every operand-9 day
    fours = make_problem("x", start=36, signed_operand=4, n_steps=4, name="Ann", item="pens")
    assert risky_days(fours, "v1") == []
    assert risky_days(fours, "v2") == [1, 4]  # 36 -> 40 carries, 40 -> 44 -> 48 do not, 48 -> 52 does
    borrows = make_problem("x", start=43, signed_operand=-2, n_steps=3, name="Ann", item="pens")
    assert risky_days(borrows, "v2") == [2]  # 43 -> 41 -> 39 borrows -> 37
    assert risky_days(fours, "v3") == risky_days(fours, "v2")  # v3 differs in its check lines only
    with pytest.raises(ValueError, match="grammar"):
        risky_days(nines, "v4")


def test_direct_answers_are_one_shot():
    problem = generate_split("validation", seed=0, n=1)[0]
    trace = render_trace(problem, "direct", random.Random(0))
    assert [s.behaviour for s in trace.sentences] == ["answer"]


def test_sentence_boundaries_match_the_generic_splitter():
    from mechsteer.data.sentences import split_sentences as generic_split

    rng = random.Random(1)
    texts = [render_trace(p, style, rng).text for p in generate_split("validation", n=30) for style in TRACE_STYLES]
    texts += [render_drill(rng).text, "pi is 3.14 today. Wait, 12 + 3 is 15, not 16.\nThe answer is 15."]
    for text in texts:
        generic = [(s.char_start, s.char_end) for s in generic_split(text, min_words=1)]
        assert split_sentences(text) == generic


def test_unknown_sentences_are_other_and_cues_are_recognised():
    assert label_sentence("I like apples.") == OTHER
    assert label_sentence("Check: 12 + 3 = 15.") == "verify"
    assert label_sentence("Check: 12 + 3 = 15, not 16.") == "verify"
    assert label_sentence("Wait, 12 + 3 is 15, not 16.") == "correct"
    assert label_sentence("Plan: start at 12, add 3 for 2 days.") == "plan"
    assert label_sentence("Plan: start at 12, take 3 for 2 days.") == "plan"
    assert label_sentence("Plan: 12 + 3 - 4.") == OTHER
    assert label_sentence("Day 2: 12 + 3 = 15.") == "compute"
    assert label_sentence("12 + 3 = 15.") == "compute"  # drill lines
    assert label_sentence("Day two: 12 + 3 = 15.") == OTHER
    assert label_sentence("The answer is 11.") == "answer"
    assert extract_answer("blah. the answer is -4.") == -4
    assert extract_answer("no answer here") is None
    assert "{question}" in PROMPT_TEMPLATE and format_prompt("Q?").startswith("Q: Q?")


def test_tokenizer_has_one_token_per_number_and_word_with_exact_offsets(tmp_path):
    from transformers import AutoTokenizer

    tokenizer = build_tokenizer()
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    text = format_prompt("Ann has 38 pens, gets 9. How many now?") + "Plan: 38 + 9.\n38 + 9 = 47.\n"
    encoded = loaded(text, return_offsets_mapping=True)
    assert encoded["input_ids"][0] == loaded.bos_token_id
    pieces = [text[s:e] for s, e in encoded["offset_mapping"][1:]]
    assert "".join(pieces) == text  # offsets tile the text exactly
    assert pieces == loaded.convert_ids_to_tokens(encoded["input_ids"][1:])
    for number in (" 38", "38", " 9", " 47"):
        assert number in pieces
    for word in (" has", "Plan", " pens", " gets"):
        assert word in pieces
    assert loaded.decode(encoded["input_ids"], skip_special_tokens=True) == text
    assert loaded.pad_token_id != loaded.eos_token_id
    assert loaded.unk_token_id not in encoded["input_ids"]
    # Anything outside the grammar still tokenizes, by characters; numbers above 99 split.
    odd = "Zoe has 123 kites"
    odd_pieces = loaded.convert_ids_to_tokens(loaded(odd, add_special_tokens=False)["input_ids"])
    assert "".join(odd_pieces) == odd and " 12" in odd_pieces and "3" in odd_pieces
    assert loaded.unk_token_id not in loaded(odd)["input_ids"]


def test_weights_dir_rejects_unknown_names():
    with pytest.raises(ValueError, match="organism name"):
        weights_dir("instruct")


@pytest.mark.parametrize("grammar", ["v1", "v2", "v3"])
def test_tiny_training_run_end_to_end(tmp_path, grammar):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mechsteer.organisms.train import (
        PhaseConfig,
        TrainingConfig,
        default_config,
        train_organisms,
    )

    defaults = default_config(grammar)
    BASE_MIX, THINKING_MIX = defaults.base.mix, defaults.thinking.mix
    for version in ("v2", "v3"):
        assert any(style.endswith(f"_{version}") for style in (*BASE_MIX, *THINKING_MIX)) == (grammar == version)

    config = TrainingConfig(
        hidden_size=32,
        intermediate_size=64,
        num_layers=1,
        num_heads=2,
        window=384,
        batch_size=2,
        base=PhaseConfig(steps=3, learning_rate=1e-2, warmup_steps=1, mix=BASE_MIX),
        thinking=PhaseConfig(steps=2, learning_rate=1e-3, warmup_steps=1, mix=THINKING_MIX),
        n_train_problems=200,
    )
    report = train_organisms(tmp_path, seed=0, config=config, threads=1)
    assert report["base"]["steps"] == 3 and report["thinking"]["steps"] == 2
    assert report["base"]["tokens"] > 0 and report["wall_seconds"] > 0
    assert json.loads((tmp_path / "training_report.json").read_text())["seed"] == 0
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    thinking = AutoModelForCausalLM.from_pretrained(tmp_path / "thinking")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "thinking")
    changed = [
        not torch.equal(a, b)
        for a, b in zip(base.state_dict().values(), thinking.state_dict().values(), strict=True)
    ]
    assert any(changed), "the thinking phase must update the weights"
    batch = tokenizer(["Q: hi\nA:\n"], return_tensors="pt")
    assert torch.isfinite(base(**batch).logits).all()


# Greedy accuracies of the shipped pair on test problems 0-399 (problems 400+ are reserved: no test
# evaluates them; TransformerBridge generation), the README's `mechsteer organism eval --n 400`:
# base 0.518, thinking 0.950, forced base 0.920. The ranges and targets are the README's.
SHIPPED_RANGES_N400 = {
    "base_accuracy": (0.4, 0.7),
    "thinking_accuracy": (0.9, 1.0),
    "forced_base_accuracy": (0.85, 1.0),
}
# Per-behaviour share of the thinking organism's traces (measured n=400, the README's
# `organism eval --n 400`: verify 0.095, correct 0.058; plan, compute and answer 1.0). Only the operand-9 problems (about 1 in 9)
# call for a check.
THINKING_TRACE_RATE_RANGES_N400 = {
    "plan": (0.95, 1.0),
    "compute": (0.95, 1.0),
    "verify": (0.03, 0.2),
    "correct": (0.03, 0.2),
    "answer": (0.95, 1.0),
}


@pytest.mark.slow
def test_shipped_pair_loads_and_evaluates_within_stated_ranges(capsys):
    from mechsteer.cli import main

    assert main(["organism", "eval", "--n", "400", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["n"] == 400 and summary["backend"] == "bridge"
    for key, (low, high) in SHIPPED_RANGES_N400.items():
        assert low <= summary[key] <= high, (key, summary[key])
    for behaviour, (low, high) in THINKING_TRACE_RATE_RANGES_N400.items():
        assert low <= summary["thinking_trace_rates"][behaviour] <= high, behaviour
        assert summary["behaviour_counts"][behaviour] > 0, behaviour
    # The targets: the thinking organism is far better, and the base forced into the
    # step-by-step format nearly as good (the base knows HOW; the WHEN differs).
    assert summary["thinking_accuracy"] - summary["base_accuracy"] >= 0.40  # the README's target
    assert summary["forced_base_accuracy"] >= 0.8 * summary["thinking_accuracy"]
    # Prompted normally, the base answers in one shot: no plan, no check, no correction.
    assert summary["base_trace_rates"]["plan"] < 0.05
    assert summary["base_trace_rates"]["verify"] < 0.05
    assert summary["base_trace_rates"]["correct"] < 0.05
    assert summary["correct_trace_share"] >= 0.05  # the README's target


def test_bridge_and_hf_generation_agree_on_the_shipped_thinking_organism():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mechsteer.organisms.cli import bridge_generate_fn
    from mechsteer.organisms.evaluate import hf_greedy_generate

    folder = weights_dir("thinking")
    prompts = [format_prompt(p.question) for p in generate_split("test", n=6)]
    hf_texts = hf_greedy_generate(
        AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder), prompts, 200
    )
    bridge_texts = bridge_generate_fn("organism-thinking")(prompts, 200)
    assert bridge_texts == hf_texts
    assert all(text.startswith("Plan:") for text in bridge_texts)


def test_v3_check_lines_share_few_tokens_with_compute_lines():
    problem = make_problem("x", start=38, signed_operand=9, n_steps=2, name="Ann", item="pens")
    v2 = render_trace(problem, "thinking_v2", random.Random(0)).sentences
    v3 = render_trace(problem, "thinking_v3", random.Random(0)).sentences
    assert [s.behaviour for s in v2] == [s.behaviour for s in v3] == [
        "plan", "compute", "verify", "correct", "compute", "verify", "correct", "answer"]
    assert v2[2].text == "Check: 38 + 9 = 47." and v3[2].text == "Check: How many now, 38 + 9 = 47."
    assert [s.text for s in v2 if s.behaviour != "verify"] == [s.text for s in v3 if s.behaviour != "verify"]


# The shipped grammar-v3 pair on test problems 0-399 (400+ are reserved), the README's
# `mechsteer organism eval --grammar v3 --n 400 --json`: base 0.013, thinking 0.995, plan-only 0.138,
# oracle timing 0.918, random timing 0.346. The bounds are the issue-17 targets the README states.
@pytest.mark.slow
def test_shipped_v3_pair_meets_the_timing_targets_on_400_test_problems(capsys):
    from mechsteer.cli import main

    assert main(["organism", "eval", "--grammar", "v3", "--n", "400", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["n"] == 400 and summary["split"] == "test" and summary["timing_grammar"] == "v3"
    assert summary["gap"] >= 0.40
    assert summary["plan_only_gap_recovered"] <= 0.6  # a first-token decision is not enough
    assert summary["oracle_timing_accuracy"] >= 0.9 * summary["thinking_accuracy"]
    assert summary["random_timing_gap_recovered"] <= 0.5 * summary["oracle_timing_gap_recovered"]
    # Prompted normally the base answers in one shot; the thinking organism checks and corrects.
    assert summary["base_trace_rates"]["plan"] < 0.05
    assert summary["thinking_trace_rates"]["verify"] >= 0.8 and summary["thinking_trace_rates"]["correct"] >= 0.8


def test_shipped_v3_weights_are_small_and_trained_within_the_budget():
    report = json.loads((weights_dir("base", "v3").parent / "training_report.json").read_text())
    assert report["wall_seconds"] <= 25 * 60
    for name in ("base", "thinking"):
        assert (weights_dir(name, "v3") / "model.safetensors").stat().st_size <= 10 * 1024 * 1024


def test_test_problems_400_and_up_are_reserved(capsys):
    """No run, test or tuning here evaluates them: the benchmark does not serve them, and the
    organism eval command refuses to reach them."""
    from mechsteer.cli import main
    from mechsteer.data.benchmarks import load_benchmark
    from mechsteer.organisms.tasks import RESERVED_TEST_FROM

    assert len(load_benchmark("organism", "test")) == RESERVED_TEST_FROM == 400
    with pytest.raises(Exception, match="asked for n=401 problems"):
        load_benchmark("organism", "test", 401)
    assert main(["organism", "eval", "--n", "401", "--json"]) != 0
    assert "test problems 400 and up are reserved" in capsys.readouterr().err
