"""Controls at matched steering and the baselines in a run: the replay fires at the hybrid's own
steered positions, batch by batch; report.json and report.md carry each control's and baseline's
accuracy, gap recovered and share of tokens steered."""

import json
from collections import Counter

import pytest

from mechsteer.core.errors import ConfigError
from mechsteer.core.models import ModelPair, load_model
from mechsteer.data.benchmarks import Problem
from mechsteer.data.prompts import get_template
from mechsteer.experiment.config import RunConfig
from mechsteer.experiment.layout import stage_spec
from mechsteer.experiment.markdown import RunView, run_markdown
from mechsteer.experiment.pipeline import evaluate_hybrid, run_pipeline
from mechsteer.experiment.records import EvalSummary
from mechsteer.experiment.report import accuracy_rows, assemble_report, expected_stages
from mechsteer.experiment.state import planned
from mechsteer.hybrid.comparisons import ComparisonInputs, build_comparison
from mechsteer.hybrid.generator import HybridConfig
from mechsteer.hybrid.records import read_hybrid_records
from mechsteer.hybrid.timing import (
    BIAS_ONLY,
    FixedBehaviourPolicy,
    RandomBehaviourPolicy,
    RandomFiringPolicy,
    ReplayPolicy,
    SAEArgmaxPolicy,
    random_positions,
)
from tests.experiment.conftest import CORRECTION_RUN, SHORT_RUN
from tests.hybrid.test_hybrid import LinearClassifier, make_vectors
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
    positions = {record.problem_id: record.steered_positions
                 for record in read_hybrid_records(tmp_path / "hybrid" / "results.jsonl")}
    assert positions == {record.problem_id: record.steered_positions for record in hybrid}
    # the problems steer at different positions, so a row given another problem's positions shows
    assert len({tuple(steps) for steps in positions.values()}) == len(PROBLEMS)
    replayed = evaluate_hybrid(pair, PROBLEMS, vectors, ReplayPolicy(positions), config,
                               tmp_path / "replayed" / "results.jsonl", **settings)
    assert [record.problem_id for record in replayed] == [problem.id for problem in PROBLEMS]
    for record in replayed:
        assert record.steered_positions == positions[record.problem_id], record.problem_id
        assert set(record.steered_behaviours) <= {BIAS_ONLY}


def test_gated_behaviour_controls_keep_the_timing_and_swap_the_behaviour(pair, tmp_path):
    config = HybridConfig(steer_layer=1, read_layer=2, max_new_tokens=8, batch_size=2, ignore_eos=True)
    vectors = make_vectors(pair.base.cfg.d_model)
    settings = dict(base_template="base_paper", thinking_template="base_paper", progress=lambda message: None)
    positions = {problem.id: [1, 3, 4, 6] if index % 2 else [0, 2, 7] for index, problem in enumerate(PROBLEMS)}
    behaviours = {problem: [0] * len(steps) for problem, steps in positions.items()}
    fixed = evaluate_hybrid(pair, PROBLEMS, vectors, FixedBehaviourPolicy(ReplayPolicy(positions, behaviours), 2),
                            config, tmp_path / "fixed.jsonl", **settings)
    for record in fixed:
        assert record.steered_positions == positions[record.problem_id]
        assert set(record.steered_behaviours) == {2}
    drawn = [evaluate_hybrid(pair, PROBLEMS, vectors,
                             RandomBehaviourPolicy(ReplayPolicy(positions, behaviours), [0, 1, 2], seed=seed),
                             config, tmp_path / f"random{seed}_{repeat}.jsonl", **settings)
             for seed, repeat in ((3, 0), (3, 1), (4, 0))]
    chosen = [[b for record in records for b in record.steered_behaviours] for records in drawn]
    assert [r.steered_positions for r in drawn[0]] == [positions[problem.id] for problem in PROBLEMS]
    assert set(chosen[0]) == {0, 1, 2}  # 17 draws of three behaviours
    assert chosen[0] == chosen[1] and chosen[0] != chosen[2]  # seeded


def test_random_positions_match_the_count_of_each_problem():
    lengths, counts = {"a": 50, "b": 10, "c": 3}, {"a": 7, "b": 0, "c": 5}
    positions, behaviours = random_positions(lengths, counts, [4, 9], seed=0)
    assert [len(positions[p]) for p in "abc"] == [7, 0, 3]  # at most the problem's length
    assert all(steps == sorted(set(steps)) and all(0 <= s < lengths[p] for s in steps)
               for p, steps in positions.items())
    assert {b for values in behaviours.values() for b in values} <= {4, 9}
    assert random_positions(lengths, counts, [4, 9], seed=0) == (positions, behaviours)
    assert random_positions(lengths, counts, [4, 9], seed=1)[0]["a"] != positions["a"]
    # a problem draws the same whatever else is drawn with it (a resumed batch)
    assert random_positions({"a": 50}, {"a": 7}, [4, 9], seed=0)[0]["a"] == positions["a"]


@pytest.mark.slow
def test_state_testing_controls_in_a_run(short_run, tmp_path):
    import shutil

    out, _ = short_run
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    added = ["random_firing_per_problem", "random_vectors_with_bias", "gated_fixed_behaviour", "gated_random_behaviour"]
    config = RunConfig.from_dict({**SHORT_RUN, "controls": [*SHORT_RUN["controls"], *added]})
    report = run_pipeline(config, copy, log=lambda message: None)
    assert set(added) <= set(report["controls"])
    assert report["controls"]["random_vectors_with_bias"]["norm_matched_to"] == "direction, bias kept"
    stages = json.loads((copy / "stages.json").read_text())["stages"]
    gated = stages["eval_gated_fixed_behaviour"]["summary"]
    behaviour_ids = json.loads((copy / "directions" / "directions.json").read_text())["behaviour_ids"]
    assert set(gated["variants"]) == {f"behaviour_{b}" for b in behaviour_ids}
    best = max(entry["accuracy"] for entry in gated["variants"].values())
    assert gated["variants"][gated["chosen_variant"]]["accuracy"] == best
    assert report["controls"]["gated_fixed_behaviour"]["accuracy"] == best
    chosen = copy / "eval" / "gated_fixed_behaviour" / "variants" / gated["chosen_variant"] / "results.jsonl"
    assert (copy / "eval" / "gated_fixed_behaviour" / "results.jsonl").read_bytes() == chosen.read_bytes()
    for variant, entry in gated["variants"].items():
        records = read_hybrid_records(copy / "eval" / "gated_fixed_behaviour" / "variants" / variant / "results.jsonl")
        assert {b for r in records for b in r.steered_behaviours} <= {entry["behaviour"]}
    hybrid = {r.problem_id: r for r in read_hybrid_records(copy / "eval" / "hybrid" / "results.jsonl")}
    matched = read_hybrid_records(copy / "eval" / "random_firing_per_problem" / "results.jsonl")
    assert sum(len(r.steered_positions) for r in matched) > 0
    for record in matched:
        assert len(record.steered_positions) <= len(hybrid[record.problem_id].steered_positions)
    gated_random = read_hybrid_records(copy / "eval" / "gated_random_behaviour" / "results.jsonl")
    assert len({b for r in gated_random for b in r.steered_behaviours}) > 1


def comparison_run() -> tuple[RunConfig, dict[str, EvalSummary]]:
    config = RunConfig.from_dict({**SHORT_RUN, "n_eval": 4,
                                  "controls": ["only_bias", "only_bias_replayed", "random_vectors"],
                                  "baselines": ["first_token_only"]})
    evaluations = {
        "base": {"correct": [True, False, False, False]},
        "thinking": {"correct": [True, True, True, False]},
        "hybrid": {"correct": [True, True, False, False], "steered_fraction": 0.1, "steered_equal_thinking": 0.8},
        "only_bias": {"correct": [True, True, False, False], "steered_fraction": 0.12, "steered_equal_thinking": 0.25},
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
    # the share of steered tokens that are the thinking model's own, beside each share steered
    assert "| **hybrid** | 0.500 |" in headline and "| 10.0% | 80.0% |" in headline and "| 12.0% | 25.0% |" in headline
    assert report["steered_equal_thinking"] == 0.8 and report["controls"]["only_bias"]["steered_equal_thinking"] == 0.25


def test_the_papers_read_and_the_single_candidate_baselines():
    from mechsteer.hybrid.comparisons import ComparisonInputs, build_comparison
    from mechsteer.hybrid.timing import SAEArgmaxPolicy
    from mechsteer.taxonomy.sae import SAEConfig, TopKSAE

    vectors = make_vectors(16)
    sae = TopKSAE(SAEConfig(d_in=8, n_latents=3, k=1))

    def make_policy():
        return SAEArgmaxPolicy(sae, [0, 1, 2], read="next_token")

    inputs = ComparisonInputs(policy=make_policy(), make_policy=make_policy, directions=vectors, behaviour_ids=[0, 1, 2],
                              seed=0, steered_fraction=0.1, hybrid_records=list)
    paper = build_comparison("last_token_read", inputs)
    assert paper.policy.read == "last_token" and paper.configure is None
    single = build_comparison("single_candidate", inputs)
    assert single.policy.read == "next_token"
    grid = HybridConfig(steer_layer=1, read_layer=2, coefficients=(1.0, 2.0, 4.0), windows=(1, 4))
    assert single.configure(grid).candidates == [(1.0, 1)]


@pytest.mark.slow
def test_correction_vectors_in_a_run(short_run, tmp_path):
    """The paper's current method's training stages in a run: disagreements collected from the run's
    thinking traces and taxonomy, vectors and coefficient MLP trained there; resumed runs redo nothing."""
    import shutil

    from mechsteer.steering.correction import CorrectionVectors
    from mechsteer.steering.disagreements import load_disagreements

    out, _ = short_run
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    controls = ["random_firing", "without_top_behaviour"]
    config = RunConfig.from_dict({**CORRECTION_RUN, "correction_controls": controls})
    report = run_pipeline(config, copy, log=lambda message: None)
    disagreements, vectors = report["correction"]["disagreements"], report["correction"]["correction_vectors"]
    cache = load_disagreements(copy / "correction" / "disagreements")
    assert disagreements["n_positions"] == cache.n_positions > 0 and disagreements["top_k"] == 20
    assert cache.provenance.top_k == 20 and cache.provenance.layer == report["directions"]["layer"]
    trained = CorrectionVectors.load(copy / "correction" / "vectors", cache.provenance)
    assert trained.directions.bias is None and trained.mlp is not None
    assert sorted(trained.directions.behaviour_ids) == sorted(int(b) for b in disagreements["positions_per_behaviour"])
    assert set(vectors["seeds_val_kl"]) == {"1", "2"} and vectors["best_val_kl"] <= vectors["unsteered_val_kl"]
    # both methods side by side in the report, the correction vectors' ceiling beside them
    methods = report["methods"]
    assert set(methods) == {"correction", "correction_ceiling"}
    assert {"accuracy", "gap_recovered", "steered_fraction", "gap_recovered_interval"} <= set(methods["correction"])
    rows = [row["model"] for row in accuracy_rows(report)]
    assert rows[:3] == ["base", "thinking", "hybrid"]
    assert rows[-4:] == ["correction", "correction_ceiling", "correction_random_firing",
                         "correction_without_top_behaviour"]
    records = read_hybrid_records(copy / "eval" / "correction" / "results.jsonl")
    steered = [(b, c) for r in records for b, c in zip(r.steered_behaviours, r.steered_coeffs, strict=True)]
    assert steered and {b for b, _ in steered} <= set(trained.directions.behaviour_ids)
    assert all(c > 0 for _, c in steered) and len({c for _, c in steered}) > 1  # the MLP's, per position
    assert {w for r in records for w in r.steered_windows} == {1}
    # the ceiling's grid: multiples of each vector's mean learned coefficient
    ceiling = read_hybrid_records(copy / "eval" / "correction_ceiling" / "results.jsonl")
    assert {c for r in ceiling for c in r.steered_coeffs} <= set(config.correction_ceiling_coefficients)
    assert set(trained.report.mean_coefficients) == {str(b) for b in trained.directions.behaviour_ids}
    assert sum(len(r.steered_positions) for r in ceiling) > 0 and all(m for r in ceiling for m in r.steered_matching_thinking)
    assert report["methods"]["correction_ceiling"]["steered_equal_thinking"] == 1.0
    assert 0 < report["methods"]["correction"]["steered_equal_thinking"] <= 1
    # the correction vectors' controls, at their steering, beside them in report.json and report.md
    assert list(report["correction_controls"]) == [f"correction_{name}" for name in controls]
    firing = read_hybrid_records(copy / "eval" / "correction_random_firing" / "results.jsonl")
    assert {b for r in firing for b in r.steered_behaviours} <= set(trained.directions.behaviour_ids)
    assert sum(len(r.steered_positions) for r in firing) > 0
    assert all(c > 0 for r in firing for c in r.steered_coeffs) and len({c for r in firing for c in r.steered_coeffs}) > 1
    without = report["correction_controls"]["correction_without_top_behaviour"]
    counts = Counter(b for r in records for b in r.steered_behaviours)
    assert without["excluded_behaviour"] == max(sorted(counts), key=lambda b: counts[b])
    kept = read_hybrid_records(copy / "eval" / "correction_without_top_behaviour" / "results.jsonl")
    assert without["excluded_behaviour"] not in {b for r in kept for b in r.steered_behaviours}
    headline = (copy / "report.md").read_text()
    assert "| correction_random_firing |" in headline and "of its recovery" in headline
    before = json.loads((copy / "stages.json").read_text())["stages"]
    run_pipeline(config, copy, log=lambda message: None)  # finished: nothing is redone
    after = json.loads((copy / "stages.json").read_text())["stages"]
    assert {name: entry.get("outputs") for name, entry in after.items()} == \
           {name: entry.get("outputs") for name, entry in before.items()}
    with pytest.raises(Exception, match="correction: seeds must be a non-empty list of integers"):
        RunConfig.from_dict({**SHORT_RUN, "correction_vectors": True, "correction": {"seeds": "x"}})


def test_correction_controls_are_refused_without_the_method_or_with_a_bias():
    with pytest.raises(ConfigError, match="set correction_vectors: true"):
        RunConfig.from_dict({**SHORT_RUN, "correction_controls": ["random_firing"]})
    with pytest.raises(ConfigError, match="control 'only_bias' steers a bias"):
        RunConfig.from_dict({**SHORT_RUN, "correction_vectors": True, "correction_controls": ["only_bias"]})
    config = RunConfig.from_dict({**SHORT_RUN, "correction_vectors": True,
                                  "correction_controls": ["random_vectors", "gated_random_behaviour"]})
    stages = [spec.name for spec in planned(config)]
    at = stages.index("eval_correction_ceiling")
    assert stages[at + 1:at + 3] == ["eval_correction_random_vectors", "eval_correction_gated_random_behaviour"]
    spec = stage_spec("eval_correction_random_vectors")
    assert (spec.method, spec.comparison, spec.folder) == ("correction", "random_vectors", "eval/correction_random_vectors")
    assert "eval_correction" in spec.reads and "eval_hybrid" not in spec.reads


def test_the_top_behaviour_is_never_steered_without_it(pair, tmp_path):
    vectors = make_vectors(pair.base.cfg.d_model)
    positions = {problem.id: [0, 2, 4] for problem in PROBLEMS}
    behaviours = {problem.id: [1, 1, 2] for problem in PROBLEMS}
    config = HybridConfig(steer_layer=1, read_layer=2, max_new_tokens=8, batch_size=2, ignore_eos=True)
    settings = dict(base_template="base_paper", thinking_template="base_paper", progress=lambda message: None)
    hybrid = evaluate_hybrid(pair, PROBLEMS, vectors, ReplayPolicy(positions, behaviours), config,
                             tmp_path / "hybrid.jsonl", **settings)

    def make_policy():
        return ReplayPolicy(positions, behaviours)

    inputs = ComparisonInputs(policy=make_policy(), make_policy=make_policy, directions=vectors,
                              behaviour_ids=list(vectors.behaviour_ids), seed=0, steered_fraction=0.3,
                              hybrid_records=lambda: hybrid)
    built = build_comparison("without_top_behaviour", inputs)
    assert built.recorded == {"excluded_behaviour": 1, "its_steers": 2 * len(PROBLEMS)}
    without = evaluate_hybrid(pair, PROBLEMS, built.directions, built.policy, config, tmp_path / "without.jsonl",
                              **settings)
    assert all(r.steered_positions == [4] and r.steered_behaviours == [2] for r in without)


def test_a_forced_start_reaches_both_prompts_and_no_steering_is_the_base_from_it(pair, tmp_path):
    config = HybridConfig(steer_layer=1, read_layer=2, max_new_tokens=6, batch_size=2, ignore_eos=True)
    vectors = make_vectors(pair.base.cfg.d_model)
    settings = dict(base_template="base_paper", thinking_template="base_paper", progress=lambda message: None)

    def make_policy():
        return RandomFiringPolicy(0.5, [0, 1, 2], seed=2)

    inputs = ComparisonInputs(policy=make_policy(), make_policy=make_policy, directions=vectors,
                              behaviour_ids=list(vectors.behaviour_ids), seed=0, steered_fraction=0.3,
                              hybrid_records=lambda: [])
    never = build_comparison("no_steering", inputs)
    primed = evaluate_hybrid(pair, PROBLEMS, never.directions, never.policy, config, tmp_path / "primed.jsonl",
                             prefix=" The answer", **settings)
    plain = evaluate_hybrid(pair, PROBLEMS, never.directions, never.policy, config, tmp_path / "plain.jsonl",
                            **settings)
    assert all(record.steered_positions == [] for record in [*primed, *plain])
    # the same as both templates ending with the forced start
    inline = get_template("base_paper").format_string() + " The answer"
    templated = evaluate_hybrid(pair, PROBLEMS, never.directions, never.policy, config, tmp_path / "inline.jsonl",
                                base_template=inline, thinking_template=inline, progress=lambda message: None)
    assert [record.text for record in primed] == [record.text for record in templated]
    assert [record.text for record in primed] != [record.text for record in plain]
    # the thinking model reads the forced start too: a policy that reads its state steers as with the templates
    policy = SAEArgmaxPolicy(LinearClassifier(pair.thinking.cfg.d_model, 3))
    steered = evaluate_hybrid(pair, PROBLEMS, vectors, policy, config, tmp_path / "steered.jsonl", prefix=" The answer",
                              **settings)
    templated = evaluate_hybrid(pair, PROBLEMS, vectors, policy, config, tmp_path / "steered_inline.jsonl",
                                base_template=inline, thinking_template=inline, progress=lambda message: None)
    assert any(r.steered_positions for r in steered)
    assert [(r.text, r.steered_positions, r.top_latents) for r in steered] == \
           [(r.text, r.steered_positions, r.top_latents) for r in templated]
