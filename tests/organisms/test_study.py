"""The organism study: ground-truth causal validation of the shipped organism pair."""

import pytest

from mechsteer.data.labels import require_ground_truth
from mechsteer.steering.labels import ground_truth_behaviour_labeller


def test_organism_labeller_uses_the_grammar():
    labeller = ground_truth_behaviour_labeller(require_ground_truth("organism"), ["plan", "compute", "verify"],
                                               [10, 11, 12])
    text = "Plan: start at 4, add 3 for 1 days.\nDay 1: 4 + 3 = 7.\nCheck: 7 - 3 = 4.\nThe answer is 7.\nhello there.\n"
    assert labeller(["Q"], [text]) == [[10, 11, 12, None, None]]


# --------------------------------------------------------------------------------------------
# Organism acceptance (slow, about 65 s): the shipped organisms, ground-truth labels from the grammar.
#
# The bars are: ablation cuts each behaviour's rate by >= 50% while moving every other
# behaviour's rate by less than half as much; steering makes each behaviour the next sentence
# >= 3x as often as a norm-matched random direction. On the retrained organisms (one daily
# operation) they hold only in part (numbers in the closing note): on 32 test
# problems, half of them calling for a check, the per-layer ablation removes plan, verify and
# correct (-100%) and answer (-69%) but moves other behaviours by more; ablating compute makes
# the thinking organism loop on compute lines. Steering reaches 17x (compute) and 31x
# (answer); plan, verify and correct 0x. These tests check what holds, so a regression in directions,
# ablation or steering fails them; the full per-behaviour numbers are printed (run with -s).


def run_organism_study(tmp_path_factory, **settings):
    from mechsteer.core.models import load_model
    from mechsteer.organisms.study import organism_study

    try:
        base, thinking = load_model("organism-base"), load_model("organism-thinking")
    except FileNotFoundError as error:
        pytest.skip(f"organism weights not shipped yet: {error}")
    study = organism_study(base, thinking, tmp_path_factory.mktemp("organism_study"), **settings)
    method = study.settings["direction_method"]
    for row in study.necessity:
        print(f"[{method}] necessity {row.title} ({row.variant}): {row.rate_before:.2f} -> {row.rate_after:.2f} "
              f"({row.relative_change:+.0%}), others max {row.max_other_relative_change:.0%}")
    for where, rows in (("thinking contexts", study.sufficiency), ("base contexts", study.sufficiency_base_contexts)):
        for row in rows:
            print(f"[{method}] sufficiency, {where}, {row.title}: unsteered {row.unsteered.rate:.2f}, "
                  f"random {row.random.rate:.2f}, steered {row.steered.rate:.2f} (p = {row.p_value:.2g})")
    return study


@pytest.fixture(scope="module")
def organism_results(tmp_path_factory):
    return run_organism_study(tmp_path_factory)


@pytest.fixture(scope="module")
def organism_optimised_results(tmp_path_factory):
    from mechsteer.steering.optimise import OptimisationConfig

    # the demo's optimisation settings; coefficient 2 of the demo's grid (1, 2, 4)
    return run_organism_study(tmp_path_factory, direction_method="optimised", coeff=2.0,
                              optimisation=OptimisationConfig(lr=0.1, steps=100, init_norm=8.0))


@pytest.mark.slow
def test_organism_ablation_removes_behaviours(organism_results):
    per_layer = [row for row in organism_results.necessity if row.variant.endswith("per-layer directions")]
    assert len(per_layer) == len(organism_results.directions.behaviour_ids)
    removed = [row.title for row in per_layer if row.relative_change <= -0.5]
    assert {"plan", "verify", "correct", "answer"} <= set(removed), per_layer


@pytest.mark.slow
def test_organism_steering_invokes_behaviours(organism_results):
    invoked = [row.title for row in organism_results.sufficiency if row.passed]
    assert {"compute", "answer"} <= set(invoked), organism_results.sufficiency
    for row in organism_results.sufficiency:
        assert row.n_contexts == 32 and row.random.rate <= 0.5, row


@pytest.mark.slow
def test_organism_optimised_vectors_invoke_plan_and_verify(organism_optimised_results):
    # Optimised vectors (with their bias) do what difference-of-means directions cannot: start a
    # plan where the base organism would answer directly (its prompt), and insert a check
    # mid-trace. Measured: plan 32x at the base's contexts, verify 11x at the thinking traces'.
    at_base = {row.title: row for row in organism_optimised_results.sufficiency_base_contexts}
    mid_trace = {row.title: row for row in organism_optimised_results.sufficiency}
    assert "answer" not in at_base  # every base context is followed by an answer: nothing to steer away from
    assert at_base["plan"].passed and at_base["plan"].steered.rate >= 0.8, at_base["plan"]
    assert mid_trace["verify"].passed, mid_trace["verify"]
    assert organism_optimised_results.settings["sufficiency_with_bias"] is True
    assert organism_optimised_results.directions.method == "optimised"


def test_necessity_problems_include_the_ones_that_call_for_a_check():
    from mechsteer.organisms.grammar import RISKY_OPERAND
    from mechsteer.organisms.study import necessity_problems

    problems = necessity_problems(32)
    risky = [p for p in problems if p.metadata["operands"][0] == RISKY_OPERAND]
    assert len(problems) == 32 and len(risky) == 16
    assert len({p.id for p in problems}) == 32 and all(p.id.startswith("test-") for p in problems)
