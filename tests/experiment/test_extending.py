"""The extension example (examples/extending_mechsteer.py): a benchmark with its own grader, a
timing policy, a direction method and a generation engine, registered from outside the package,
run through mechsteer run."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from mechsteer.core.errors import ConfigError
from mechsteer.engines import load_tokenizer
from mechsteer.engines.base import prompt_token_ids
from mechsteer.experiment.config import RunConfig
from mechsteer.experiment.pipeline import run_pipeline
from mechsteer.grading.answers import extract_answer, is_correct
from mechsteer.steering.direction_set import DirectionSet
from tests.tiny_models import save_chat_pair

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "extending_mechsteer.py"


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("extending_mechsteer", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    module.register()
    return module


def test_a_plug_in_benchmark_is_graded_by_its_own_grader(example):
    assert extract_answer("Counting: 30, 27, 24. So we end at 21.", "countdown") == "21"
    assert is_correct("21", "21", "countdown") and not is_correct(None, "21", "countdown")
    assert extract_answer("<think>ends at 5</think> no number", "countdown") is None


def test_an_unregistered_policy_is_refused_with_the_registered_ones():
    with pytest.raises(ConfigError, match=r"unknown policy 'nope'; registered timing policies: \[.*'sae_argmax'"):
        RunConfig.from_dict(dict(name="x", base_model="organism-base", thinking_model="organism-thinking",
                                 benchmark="organism", policy="nope"))


@pytest.mark.slow
def test_the_example_runs_through_mechsteer_run(example, tmp_path):
    base, thinking = save_chat_pair(tmp_path / "models", thinking_prompt="r1")
    config = RunConfig.from_dict(dict(
        name="extending", base_model=str(base), thinking_model=str(thinking), benchmark="countdown", n_train=8,
        n_eval=4, max_new_tokens=32, batch_size=8, n_latents=[3], activation_layers=[1], tune_split="validation",
        n_tune=2, coefficients=[1.0], policy="every_other_disagreement", direction_method="median",
        engine="length_sorted", controls=["late_bias"], ablation_contexts=2, device="cpu"))
    out = tmp_path / "run"
    report = run_pipeline(config, out, log=lambda message: None)
    assert report["benchmark"] == "countdown" and report["tokens_steered_fraction"] > 0
    records = [json.loads(line) for line in (out / "eval" / "hybrid" / "results.jsonl").open()]
    steered = [position for record in records for position in record["steered_positions"]]
    assert steered and all(position % 2 == 0 for position in steered)  # the policy's own rule
    # The plug-in control ran in a stage of its own: the bias alone, LATE_BY tokens after each hybrid steer
    late = {record["problem_id"]: record for record in map(json.loads, (out / "eval" / "late_bias" / "results.jsonl").open())}
    assert set(late) == {record["problem_id"] for record in records}
    for record in records:
        shifted = [position + example.LATE_BY for position in record["steered_positions"]]
        assert late[record["problem_id"]]["steered_positions"] == [p for p in shifted
                                                                    if p < late[record["problem_id"]]["n_tokens"]]
        assert set(late[record["problem_id"]]["steered_behaviours"]) <= {-1}
    assert report["controls"]["late_bias"]["tokens_steered_fraction"] is not None
    # The hybrid steered with the plug-in's directions: medians, not means.
    directions = DirectionSet.load(out / "directions")
    assert directions.method == "median" and "n_labelled" in directions.provenance and directions.bias is not None
    assert report["directions"]["method"] == "median"
    assert "Difference-of-medians directions (`median`)" in (out / "report.md").read_text()
    # Every plain generation ran on the plug-in's engine, each completion under its own problem.
    for folder, model in (("traces/thinking_train", thinking), ("traces/base_train", base), ("eval/base", base),
                          ("eval/thinking", thinking)):
        traces = [json.loads(line) for line in (out / folder / "traces.jsonl").open()]
        assert traces and {trace["settings"]["engine"] for trace in traces} == {"length_sorted"}
        tokenizer = load_tokenizer(str(model))
        for trace in traces:
            assert trace["token_ids"][:trace["n_prompt_tokens"]] == prompt_token_ids(tokenizer, trace["prompt"])
