"""The tuning stage: candidates, the choice on the validation split, the config checks, the report,
and a tiny organism run whose hybrid is scripted (its accuracy set per setting) end to end."""

import dataclasses
import json
from pathlib import Path

import pytest
import yaml

from mechsteer.core.errors import ConfigError
from mechsteer.data.benchmarks import load_benchmark
from mechsteer.experiment.config import DEMO_CONFIG, RunConfig
from mechsteer.experiment.report import rebuild_run_report
from mechsteer.experiment.tuning import (
    SteeringSetting,
    TuningCandidate,
    choose,
    config_setting,
    tuning_candidates,
    tuning_report,
)
from mechsteer.hybrid import generator
from mechsteer.hybrid.generator import HybridOutput, TokenLog
from mechsteer.taxonomy.sweep import selected_by
from tests.experiment.configs import OLD_DEMO

REPO = Path(__file__).resolve().parents[2]
TINY_RUN = yaml.safe_load((REPO / "experiments" / "sweeps" / "organism-tiny.yaml").read_text())["base"]


def names(config: RunConfig) -> list[str]:
    return [candidate.name for candidate in tuning_candidates(config)]


def test_candidates_are_each_pair_then_the_grid_for_each_threshold():
    config = dataclasses.replace(DEMO_CONFIG, coefficients=[1.0, 2.5], windows=[1, 0], tune_split="validation")
    assert names(config) == ["c1_w1", "c1_w0", "c2.5_w1", "c2.5_w0", "grid"]
    grid = tuning_candidates(config)[-1]
    assert (grid.coefficients, grid.windows, grid.threshold) == ((1.0, 2.5), (1, 0), None)
    # one pair: no grid (it would be the same candidate)
    assert names(dataclasses.replace(config, coefficients=[2.0], windows=[1])) == ["c2_w1"]
    thresholds = dataclasses.replace(config, windows=[1], policy="threshold", tune_thresholds=[0.0, 1.5])
    assert names(thresholds) == ["c1_w1_t0", "c2.5_w1_t0", "grid_t0", "c1_w1_t1.5", "c2.5_w1_t1.5", "grid_t1.5"]
    assert [c.threshold for c in tuning_candidates(thresholds)] == [0.0] * 3 + [1.5] * 3
    # the threshold policy without tune_thresholds keeps the config's threshold
    fixed = dataclasses.replace(thresholds, tune_thresholds=None, threshold=0.7)
    assert [(c.name, c.threshold) for c in tuning_candidates(fixed)] == [("c1_w1", 0.7), ("c2.5_w1", 0.7),
                                                                         ("grid", 0.7)]


def row(name, accuracy, steered, coefficients):
    return TuningCandidate(SteeringSetting(name, tuple(coefficients), (1,)), accuracy, steered)


def test_choice_is_the_most_accurate_then_fewer_tokens_steered_then_the_smaller_coefficient():
    assert choose([row("a", 0.5, 0.1, [1.0]), row("b", 0.75, 0.3, [4.0]), row("c", 0.6, 0.0, [0.5])]).setting.name == "b"
    assert choose([row("a", 0.5, 0.2, [1.0]), row("b", 0.5, 0.1, [4.0])]).setting.name == "b"
    assert choose([row("a", 0.5, 0.1, [4.0]), row("b", 0.5, 0.1, [1.0]), row("grid", 0.5, 0.1, [1.0, 4.0])]
                  ).setting.name == "b"


@pytest.mark.parametrize("change, message", [
    ({"tune_split": "test"}, "tune_split = 'test' is the eval_split: tuning on the split you report"),
    ({"tune_split": "train"}, "tune_split = 'train' is the train_split"),
    ({"tune_split": "dev"}, "tune_split = 'dev': benchmark 'organism' has splits"),
    ({"tune_thresholds": [0.5], "tune_split": "validation"}, "tune_thresholds are thresholds of the threshold policy"),
    ({"tune_thresholds": [0.5], "policy": "threshold"}, "tune_thresholds are compared on the validation split"),
    ({"tune_split": "validation", "n_tune": 0}, "n_tune = 0 must be >= 1"),
    ({"tune_split": "validation", "policy": "threshold", "tune_thresholds": []}, "tune_thresholds"),
])
def test_tuning_keys_are_refused_with_the_fix(change, message):
    with pytest.raises(ConfigError) as refused:
        RunConfig.from_dict({**TINY_RUN, **change})
    assert message in str(refused.value)
    if change.get("tune_split") in ("test", "train"):
        assert "use another split of 'organism' (validation)" in str(refused.value)


def test_tuning_keys_leave_existing_digests_alone():
    assert OLD_DEMO.digest() == "f2c2834c78ea8dc1"  # the digest run folders were written under
    explicit = dataclasses.replace(OLD_DEMO, tune_split=None, n_tune=100, tune_thresholds=None)
    assert explicit.digest() == OLD_DEMO.digest()
    tuned = dataclasses.replace(OLD_DEMO, tune_split="validation")
    assert tuned.digest() != OLD_DEMO.digest()
    assert dataclasses.replace(tuned, n_tune=50).digest() != tuned.digest()
    tuned.validate()


def test_report_without_tuning_says_the_config_set_it_and_names_what_selected_the_taxonomy():
    config = dataclasses.replace(OLD_DEMO, policy="threshold", threshold=0.3)
    assert tuning_report(config, None) == {"split": None, "note": "set in the config",
                                           "chosen": {"coefficients": [2.0], "windows": [1], "threshold": 0.3}}
    assert config_setting(DEMO_CONFIG).threshold is None  # the argmax policy has none
    assert selected_by("silhouette", "none") == "silhouette (no labels)"
    assert selected_by("judge_final", "oracle") == "judge final score (judge: oracle — ground-truth labels)"
    assert selected_by("judge_final", "http:gpt-4o") == "judge final score (judge: http:gpt-4o)"


# ------------------------------------------------------------------------------------------
# A tiny organism run with a scripted hybrid


GOOD = ((2.0,), (1,), 1.0)  # the setting the scripted hybrid answers every validation problem right with
TUNED_RUN = {**TINY_RUN, "coefficients": [1.0, 2.0, 4.0], "policy": "threshold", "tune_split": "validation",
             "n_tune": 6, "tune_thresholds": [0.0, 1.0], "hybrid_batch_size": 3, "controls": ["only_bias"]}


def threshold_of(policy):
    return policy.threshold if hasattr(policy, "threshold") else threshold_of(policy.timing)


class ScriptedHybrid:
    """hybrid_generate's stand-in: right answers for every validation problem under GOOD, for the
    first half under any other setting; records each call's split, setting and problems."""

    def __init__(self, fail_at_call=None):
        self.fail_at_call = fail_at_call
        self.calls = []
        validation = load_benchmark("organism", "validation", TUNED_RUN["n_tune"])
        evaluation = load_benchmark("organism", "test", TUNED_RUN["n_eval"])
        self.problems = {p.question: ("validation", p) for p in validation}
        self.problems.update({p.question: ("test", p) for p in evaluation})

    def __call__(self, base, thinking, base_prompts, thinking_prompts, directions, policy, config, coefficient_model=None):
        setting = (tuple(config.coefficients), tuple(config.windows), threshold_of(policy))
        found = [next(found for question, found in self.problems.items() if question in prompt)
                 for prompt in base_prompts]
        self.calls.append({"split": found[0][0], "setting": setting, "ids": [p.id for _, p in found],
                           "policy": policy.name})
        if len(self.calls) == self.fail_at_call:
            raise RuntimeError("scripted interruption")
        texts = []
        for _, problem in found:
            right = setting == GOOD or int(problem.id.rsplit("-", 1)[1]) < TUNED_RUN["n_tune"] // 2
            texts.append(f"The answer is {problem.answer if right else -1}.")
        steered = [TokenLog(steered=i == 0, behaviour=0 if i == 0 else None, coeff=1.0, window=1, agree=i > 0)
                   for i in range(4)]
        return HybridOutput(texts=texts, token_ids=[[0] * 4 for _ in texts], finish_reasons=["stop"] * len(texts),
                            token_logs=[list(steered) for _ in texts])


@pytest.mark.slow
def test_tuned_run_chooses_on_validation_evaluates_with_the_choice_and_resumes(tmp_path, monkeypatch):
    from mechsteer.experiment.pipeline import run_pipeline

    config = RunConfig.from_dict(TUNED_RUN)
    interrupted = ScriptedHybrid(fail_at_call=6)  # candidates 1 and 2 finished, the third half-way
    monkeypatch.setattr(generator, "hybrid_generate", interrupted)
    with pytest.raises(RuntimeError, match="scripted interruption"):
        run_pipeline(config, tmp_path, log=lambda message: None)
    stages = json.loads((tmp_path / "stages.json").read_text())["stages"]
    assert "directions" in stages and "tuning" not in stages
    rebuild_run_report(tmp_path)  # an unfinished folder's report.md
    assert "The tuning stage has not finished." in (tmp_path / "report.md").read_text()
    first_two = {call["setting"] for call in interrupted.calls[:4]}

    scripted = ScriptedHybrid()
    monkeypatch.setattr(generator, "hybrid_generate", scripted)
    report = run_pipeline(config, tmp_path, log=lambda message: None)
    tuning_calls = [call for call in scripted.calls if call["split"] == "validation"]
    # resumed: the finished candidates never ran again, the third only on its missing problems
    assert not {call["setting"] for call in tuning_calls} & first_two
    assert tuning_calls[0]["setting"] == interrupted.calls[-1]["setting"]
    assert tuning_calls[0]["ids"] == interrupted.calls[-1]["ids"]
    assert len(tuning_calls) == 1 + 2 * 5

    tuning = report["tuning"]
    assert set(tuning) == {"split", "n", "candidates", "chosen"} and (tuning["split"], tuning["n"]) == ("validation", 6)
    assert [c["name"] for c in tuning["candidates"]] == [
        "c1_w1_t0", "c2_w1_t0", "c4_w1_t0", "grid_t0", "c1_w1_t1", "c2_w1_t1", "c4_w1_t1", "grid_t1"]
    accuracies = {c["name"]: c["accuracy"] for c in tuning["candidates"]}
    assert accuracies.pop("c2_w1_t1") == 1.0 and set(accuracies.values()) == {0.5}
    assert tuning["chosen"] == {"name": "c2_w1_t1", "coefficients": [2.0], "windows": [1], "threshold": 1.0}
    assert all(set(c) == {"name", "coefficients", "windows", "threshold", "accuracy", "tokens_steered_fraction"}
               and c["tokens_steered_fraction"] == 0.25 for c in tuning["candidates"])
    for candidate in tuning["candidates"]:
        lines = (tmp_path / "tuning" / candidate["name"] / "results.jsonl").read_text().splitlines()
        assert len(lines) == 6

    # the hybrid and the control on the eval split steer with the chosen setting only
    evaluation_calls = [call for call in scripted.calls if call["split"] == "test"]
    assert {call["policy"] for call in evaluation_calls} == {"threshold", "only_bias"}
    assert {call["setting"] for call in evaluation_calls} == {GOOD}
    assert report["hybrid_accuracy"] == 1.0
    assert report["taxonomy"]["selected_by"] == "silhouette (no labels)"  # judge: none
    text = (tmp_path / "report.md").read_text()
    assert "## Tuning" in text and "**c2\\_w1\\_t1**" in text and "Selected by: silhouette (no labels)." in text

    # a rerun skips the finished stage, and the folder refuses another validation split
    again = ScriptedHybrid()
    monkeypatch.setattr(generator, "hybrid_generate", again)
    assert run_pipeline(config, tmp_path, log=lambda message: None)["tuning"] == tuning and again.calls == []
    with pytest.raises(ConfigError, match=r"n_tune: 6 -> 4 \(read by tuning"):
        run_pipeline(dataclasses.replace(config, n_tune=4), tmp_path, log=lambda message: None)
