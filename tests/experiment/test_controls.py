"""Controls at matched steering and the baselines in a run: the replay fires at the hybrid's own
steered positions, batch by batch; report.json and report.md carry each control's and baseline's
accuracy, gap recovered and share of tokens steered."""

import pytest

from mechsteer.core.models import ModelPair, load_model
from mechsteer.data.benchmarks import Problem
from mechsteer.experiment.config import RunConfig
from mechsteer.experiment.markdown import RunView, run_markdown
from mechsteer.experiment.pipeline import evaluate_hybrid, steered_positions
from mechsteer.experiment.records import EvalSummary
from mechsteer.experiment.report import accuracy_rows, assemble_report, expected_stages
from mechsteer.hybrid.generator import HybridConfig
from mechsteer.hybrid.timing import BIAS_ONLY, RandomFiringPolicy, ReplayPolicy
from tests.experiment.conftest import SHORT_RUN
from tests.hybrid.test_hybrid import make_vectors
from tests.tiny_models import save_tiny_model

QUESTIONS = ["The cat sat", "Hi", "In the", "A much longer prompt, with some padding", "x"]
PROBLEMS = [Problem(f"p{index}", question, "1", None, "organism") for index, question in enumerate(QUESTIONS)]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("control_models")
    base = load_model(str(save_tiny_model(root / "base", "llama", seed=0)))
    thinking = load_model(str(save_tiny_model(root / "thinking", "qwen2", seed=1)))
    return ModelPair(base, thinking, str(root / "base"), str(root / "thinking"))


def test_replay_fires_at_the_hybrids_positions_in_every_batch(pair, tmp_path):
    # three batches (2 + 2 + 1 problems); every row runs to the length limit, so every position is reached
    config = HybridConfig(steer_layer=1, read_layer=2, max_new_tokens=8, batch_size=2, ignore_eos=True)
    vectors = make_vectors(pair.base.cfg.d_model)
    settings = dict(base_template="base_paper", thinking_template="base_paper", progress=lambda message: None)
    hybrid = evaluate_hybrid(pair, PROBLEMS, vectors, RandomFiringPolicy(0.3, [0, 1, 2], seed=1), config,
                             tmp_path / "hybrid" / "results.jsonl", **settings)
    positions = steered_positions(tmp_path / "hybrid" / "results.jsonl")
    assert positions == {record.problem_id: record.steered_positions for record in hybrid}
    # the problems steer at different positions, so a row given another problem's positions shows
    assert len({tuple(steps) for steps in positions.values()}) == len(PROBLEMS)
    replayed = evaluate_hybrid(pair, PROBLEMS, vectors, ReplayPolicy(positions), config,
                               tmp_path / "replayed" / "results.jsonl", **settings)
    assert [record.problem_id for record in replayed] == [problem.id for problem in PROBLEMS]
    for record in replayed:
        assert record.steered_positions == positions[record.problem_id], record.problem_id
        assert set(record.steered_behaviours) <= {BIAS_ONLY}


def comparison_run() -> tuple[RunConfig, dict[str, EvalSummary]]:
    config = RunConfig.from_dict({**SHORT_RUN, "n_eval": 4,
                                  "controls": ["only_bias", "only_bias_replayed", "random_vectors"],
                                  "baselines": ["first_token_only"]})
    evaluations = {
        "base": {"correct": [True, False, False, False]},
        "thinking": {"correct": [True, True, True, False]},
        "hybrid": {"correct": [True, True, False, False], "steered_fraction": 0.1},
        "only_bias": {"correct": [True, True, False, False], "steered_fraction": 0.12},
        "only_bias_replayed": {"correct": [True, False, False, False], "steered_fraction": 0.09},
        "random_vectors": {"correct": [False, False, False, False], "steered_fraction": 0.2,
                           "norm_matched_to": "bias + direction"},
        "first_token_only": {"correct": [True, True, True, False], "steered_fraction": 0.01},
    }
    return config, {name: EvalSummary.from_json(summary) for name, summary in evaluations.items()}


def test_report_has_each_control_and_baseline_compared_with_the_gap():
    config, evaluations = comparison_run()
    assert expected_stages(config)[-6:-2] == ["eval_only_bias", "eval_only_bias_replayed", "eval_random_vectors",
                                              "eval_first_token_only"]
    report = assemble_report(config, evaluations, None, None, None, {})
    assert list(report["controls"]) == ["only_bias", "only_bias_replayed", "random_vectors"]
    assert list(report["baselines"]) == ["first_token_only"]
    replayed, first = report["controls"]["only_bias_replayed"], report["baselines"]["first_token_only"]
    # base 0.25, thinking 0.75: gap recovered = (accuracy - 0.25) / 0.5
    assert (replayed["accuracy"], replayed["gap_recovered"], replayed["tokens_steered_fraction"]) == (0.25, 0.0, 0.09)
    assert (first["accuracy"], first["gap_recovered"], first["tokens_steered_fraction"]) == (0.75, 1.0, 0.01)
    assert report["controls"]["random_vectors"]["gap_recovered"] == -0.5
    assert report["controls"]["random_vectors"]["norm_matched_to"] == "bias + direction"
    assert "norm_matched_to" not in report["controls"]["only_bias"]
    assert [row["model"] for row in accuracy_rows(report)] == ["base", "thinking", "hybrid", "only_bias",
                                                               "only_bias_replayed", "random_vectors",
                                                               "first_token_only"]
    # without a gap (thinking = base) nothing is recovered
    flat = {**evaluations, "thinking": evaluations["base"]}
    assert assemble_report(config, flat, None, None, None, {})["baselines"]["first_token_only"]["gap_recovered"] is None


def test_report_md_headline_lists_the_controls_and_baselines():
    config, evaluations = comparison_run()
    report = assemble_report(config, evaluations, None, None, None, {})
    view = RunView(config=config, config_digest=config.digest(), stages={}, missing=["ablations", "report"],
                   report=report)
    text = run_markdown(view).replace("\\_", "_")
    headline = text[text.index("## Headline"):text.index("## Behaviours")]
    assert "| only_bias_replayed | 0.250 |" in headline and "| first_token_only | 0.750 |" in headline
    assert "| random_vectors | 0.000 |" in headline
    assert "`only_bias_replayed` steers the bias alone, at exactly the tokens the hybrid steered" in headline
    assert "each of the norm of the bias + direction it replaces" in headline
    assert "Baselines: `first_token_only` the hybrid allowed to steer at the first generated token only." in headline
