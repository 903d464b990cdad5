"""The end-to-end run: configs, stage bookkeeping, report statistics, and (slow) a short
organism run that is killed mid-way and resumed."""

import dataclasses
import json

import pytest

from mechsteer.core.store import read_jsonl
from mechsteer.experiment.config import DEMO_CONFIG, DEMO_GRID_CONFIG, RunConfig
from mechsteer.experiment.report import behaviour_statistics
from mechsteer.experiment.state import RunState
from mechsteer.hybrid.records import HybridRecord
from tests.experiment.conftest import SHORT_RUN  # the short_run fixture (conftest) runs this config
from tests.experiment.killing import REPO, run_killed

REPORT_KEYS = {"base_accuracy", "thinking_accuracy", "hybrid_accuracy", "gap_recovered", "tokens_steered_fraction",
               "controls", "taxonomy", "ablations", "timings"}


def test_every_experiment_config_parses():
    paths = sorted((REPO / "experiments").glob("*.yaml"))
    assert len(paths) >= 19
    for path in paths:
        config = RunConfig.from_yaml(path)
        assert config.base_model and config.thinking_model and config.benchmark in {"gsm8k", "math500", "organism"}


def test_demo_yamls_are_the_embedded_demo_configs():
    assert RunConfig.from_yaml(REPO / "experiments" / "organism-demo.yaml") == DEMO_CONFIG
    assert RunConfig.from_yaml(REPO / "experiments" / "organism-demo-grid.yaml") == DEMO_GRID_CONFIG
    # the grid run differs only in having no tuning stage
    assert {key for key, value in vars(DEMO_CONFIG).items() if vars(DEMO_GRID_CONFIG)[key] != value} == {
        "name", "tune_split"}


def test_unknown_config_key_is_rejected():
    with pytest.raises(ValueError, match="unknown config keys \\['n_layerz'\\]"):
        RunConfig.from_dict({"name": "x", "base_model": "a", "thinking_model": "b", "benchmark": "gsm8k",
                             "n_layerz": 3})


def test_run_folder_refuses_a_config_that_changes_a_finished_stage(tmp_path):
    state = RunState(tmp_path, DEMO_CONFIG)
    state.run("traces_thinking_train", lambda: {"n": 1}, log=lambda message: None)
    state.run("taxonomy", lambda: {"n": 1}, log=lambda message: None)  # the taxonomy reads the seed
    with pytest.raises(ValueError, match=r"holds a run of another config.*seed: 0 -> 1 \(read by traces_thinking_train, taxonomy\)"):
        RunState(tmp_path, dataclasses.replace(DEMO_CONFIG, seed=1))
    again = RunState(tmp_path, DEMO_CONFIG)  # the same config reopens fine
    assert again.done("taxonomy") and not again.done("eval_hybrid")
    # A key that only stages not run yet read: the folder continues under the new config.
    changed = dataclasses.replace(DEMO_CONFIG, coefficients=[4.0], name="renamed")
    RunState(tmp_path, changed)
    recorded = json.loads((tmp_path / "stages.json").read_text())
    assert recorded["config"]["coefficients"] == [4.0] and recorded["config_digest"] == changed.digest()
    assert set(recorded["stages"]) == {"traces_thinking_train", "taxonomy"}
    assert recorded["config_changes"][-1]["keys"] == ["name", "coefficients"]


def test_a_refused_folder_or_config_leaves_the_folder_untouched(tmp_path):
    from mechsteer.core.errors import ConfigError
    from mechsteer.experiment.pipeline import run_pipeline

    with pytest.raises(ConfigError, match="n_eval = 'ten' is not an int"):
        run_pipeline(dataclasses.replace(DEMO_CONFIG, n_eval="ten"), tmp_path / "new")
    with pytest.raises(ConfigError, match="n_eval = 0 must be >= 1"):
        run_pipeline(dataclasses.replace(DEMO_CONFIG, n_eval=0), tmp_path / "new")
    assert not (tmp_path / "new").exists()
    # After the fix, the same folder takes the corrected config (nothing was locked).
    RunState(tmp_path / "new", DEMO_CONFIG)
    assert (tmp_path / "new" / "stages.json").is_file()


def test_behaviour_statistics_by_hand():
    def record(n_tokens: int, positions: list[int], behaviours: list[int | None]) -> HybridRecord:
        return HybridRecord(problem_id="p", text="", prediction=None, reference="1", correct=False,
                            n_tokens=n_tokens, steered_fraction=len(positions) / n_tokens, agree_fraction=0.0,
                            steered_positions=positions, steered_behaviours=behaviours,
                            steered_coeffs=[1.0] * len(positions), steered_windows=[1] * len(positions),
                            top_latents=[[0]] * n_tokens, finish_reason="stop")

    records = [record(11, [0, 5, 10], [0, 1, 0]), record(5, [4], [-1]), record(3, [], [])]
    stats = behaviour_statistics(records, {0: "plan", 1: "verify"})
    assert stats["onset"]["plan"]["n_fired"] == 2
    assert stats["onset"]["plan"]["mean_relative_position"] == pytest.approx(0.5)  # (0 + 1) / 2
    assert stats["onset"]["plan"]["mean_first_relative_position"] == 0.0
    assert stats["onset"]["verify"]["mean_relative_position"] == pytest.approx(0.5)
    assert stats["onset"]["bias"]["mean_relative_position"] == pytest.approx(1.0)
    assert stats["onset"]["plan"]["share_of_problems"] == pytest.approx(1 / 3)
    transitions = {(t["from"], t["to"]): t["count"] for t in stats["transitions"]}
    assert transitions == {("plan", "verify"): 1, ("verify", "plan"): 1}


TIMING_KEYS = {"timings", "train_seconds", "seconds", "throughput", "created", "elapsed"}


def comparable(value):
    """A report or an artefact's metadata without wall-clock measurements, which differ between any two runs."""
    if isinstance(value, dict):
        return {key: comparable(item) for key, item in value.items() if key not in TIMING_KEYS}
    if isinstance(value, list):
        return [comparable(item) for item in value]
    return value


@pytest.mark.slow
def test_short_organism_run_writes_the_full_report(short_run):
    out, report = short_run
    assert REPORT_KEYS <= set(report)
    assert set(report["controls"]) == {"only_bias", "only_bias_replayed", "random_firing", "random_vectors"}
    assert set(report["baselines"]) == {"first_token_only"}
    for entry in [*report["controls"].values(), *report["baselines"].values()]:
        assert {"accuracy", "gap_recovered", "tokens_steered_fraction"} <= set(entry)
    assert report["controls"]["random_vectors"]["norm_matched_to"] == "bias + direction"
    # the replay steers the bias alone at the hybrid's steered positions, up to where its own generation ends
    hybrid = {record["problem_id"]: record for record in read_jsonl(out / "eval" / "hybrid" / "results.jsonl")}
    replayed = read_jsonl(out / "eval" / "only_bias_replayed" / "results.jsonl")
    assert len(replayed) == len(hybrid) and sum(len(record["steered_positions"]) for record in replayed) > 0
    for record in replayed:
        steered = hybrid[record["problem_id"]]["steered_positions"]
        assert record["steered_positions"] == [position for position in steered if position < record["n_tokens"]]
        assert set(record["steered_behaviours"]) <= {-1}
    first = read_jsonl(out / "eval" / "first_token_only" / "results.jsonl")
    assert all(record["steered_positions"] in ([], [0]) for record in first)
    assert any(record["steered_positions"] == [0] for record in first)
    assert report["taxonomy"]["ari"] is not None  # ground truth exists for organisms
    assert 0 < report["tokens_steered_fraction"] < 1
    assert json.loads((out / "report.json").read_text())["hybrid_accuracy"] == report["hybrid_accuracy"]
    for name in ("report.md", "accuracy.png", "timeline.png"):
        assert (out / name).is_file()


@pytest.mark.slow
def test_short_organism_run_hybrid_beats_base(short_run):
    _, report = short_run
    assert report["hybrid_accuracy"] > report["base_accuracy"]


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_report(short_run, tmp_path):
    from mechsteer.experiment.pipeline import run_pipeline

    _, report = short_run
    config = RunConfig.from_dict(SHORT_RUN)
    # the first batch of the hybrid is on disk; it dies in the second
    run_killed(SHORT_RUN, tmp_path / "resumed", "mechsteer.hybrid.generator", "hybrid_generate", 2)
    stages = json.loads((tmp_path / "resumed" / "stages.json").read_text())["stages"]
    assert "eval_thinking" in stages and "eval_hybrid" not in stages
    hybrid_lines = (tmp_path / "resumed" / "eval" / "hybrid" / "results.jsonl").read_text().splitlines()
    assert 0 < len(hybrid_lines) < config.n_eval
    resumed = run_pipeline(config, tmp_path / "resumed", log=lambda message: None)
    assert comparable(resumed) == comparable(report)


def test_optimisation_settings_reach_the_vectors_and_unknown_keys_are_refused():
    from mechsteer.experiment.settings import optimisation_config

    config = RunConfig.from_dict({**SHORT_RUN, "optimisation": {"lr": 0.1, "steps": 7}, "seed": 3})
    settings = optimisation_config(config)
    assert (settings.lr, settings.steps, settings.seed) == (0.1, 7, 3)
    with pytest.raises(ValueError, match="unknown optimisation keys"):
        optimisation_config(RunConfig.from_dict({**SHORT_RUN, "optimisation": {"learning_rate": 0.1}}))
    # The settings change what a run computes, so they are part of its digest.
    plain = RunConfig.from_dict({**SHORT_RUN, "seed": 3})
    assert plain.digest() != config.digest()
