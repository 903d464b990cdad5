"""The causal checks' criterion: Fisher's exact test, grammar-valid contexts, n per condition."""

import dataclasses
import math

import pytest
import torch

from mechsteer.causal.criterion import ALPHA, RateCount, one_sided_p, passes
from mechsteer.causal.necessity import necessity_at_contexts
from mechsteer.causal.stage import AblationSettings, grammar_filter
from mechsteer.causal.sufficiency import SteeringContext, sufficiency
from mechsteer.core.errors import ConfigError
from mechsteer.data.labels import GroundTruth, ground_truth_for, register_ground_truth
from mechsteer.experiment.config import DEMO_CONFIG, RunConfig
from mechsteer.experiment.keys import key_defaults
from mechsteer.grading.statistics import fisher_exact_greater
from tests.causal.test_ablations import char_labeller, unembedding_set


@pytest.mark.parametrize(("k_a", "n_a", "k_b", "n_b", "expected"), [
    (3, 32, 0, 32, 4960 / 41664),  # the example: 3/32 against 0/32, p = 0.119
    (3, 4, 1, 4, 17 / 70),  # the lady tasting tea, one-sided (R: fisher.test(..., alternative = "greater"))
    (10, 13, 2, 17, 0.0004652),  # R's Convictions example, alternative = "less" seen from the other row
    (0, 10, 5, 10, 1.0),
    (5, 5, 0, 5, 1 / 252),  # all of a, none of b: 1 / C(10, 5)
])
def test_fisher_exact_one_sided_known_values(k_a, n_a, k_b, n_b, expected):
    assert math.isclose(fisher_exact_greater(k_a, n_a, k_b, n_b), expected, rel_tol=1e-4)


def test_fisher_refuses_impossible_counts():
    for args in ((3, 2, 0, 2), (0, 0, 0, 2), (-1, 2, 0, 2), (True, 2, 0, 2)):
        with pytest.raises(ValueError, match="must be"):
            fisher_exact_greater(*args)


def test_the_floored_ratio_case_fails_the_criterion():
    # The old criterion: 3/32 against 0/32 is 3/32 / max(0, 1/32) = 3x, a pass. Fisher: p = 0.12.
    steered, random = RateCount.of([True] * 3 + [False] * 29), RateCount.of([False] * 32)
    assert not passes(one_sided_p(steered, random))
    assert (steered.k, steered.n, steered.rate) == (3, 32, 3 / 32) and steered.ci[0] < steered.rate < steered.ci[1]
    strong = RateCount.of([True] * 30 + [False] * 2)
    assert passes(one_sided_p(strong, random)) and ALPHA == 0.01


def register_fake_grammar(name: str) -> GroundTruth:
    """A benchmark plug-in's ground truth whose grammar forbids Z after a reasoning line that says so."""

    def allowed_next(reasoning: str) -> frozenset[str]:
        return frozenset({"Y"}) if reasoning.endswith("no Z next\n") else frozenset({"Z", "Y"})

    ground_truth = GroundTruth(benchmark=name, behaviours=("Z", "Y"), label_reasoning=lambda text: {},
                               descriptions={}, source="test", allowed_next=allowed_next)
    register_ground_truth(ground_truth, replace=True)
    return ground_truth


def recording_labeller(model, seen):
    label = char_labeller(model)

    def record(contexts, continuations):
        seen.extend(contexts)
        return label(contexts, continuations)

    return record


def test_sufficiency_contexts_exclude_where_the_grammar_forbids_the_behaviour(tiny_models):
    model = tiny_models["llama"]
    directions = unembedding_set(model)
    register_fake_grammar("fake-grammar")
    possible = grammar_filter(ground_truth_for("fake-grammar"), {"0": "Z", "1": "Y"})
    forbidden = {i for i in range(12) if i % 3 == 0}
    contexts = [SteeringContext(f"Q: item {i} of the list\n", 1 if i % 2 else 0, i, 0,
                                reasoning="no Z next\n" if i in forbidden else "anything\n") for i in range(12)]
    seen: list[str] = []
    (row,) = sufficiency(model, directions, contexts, recording_labeller(model, seen), coeffs=(60.0,), n_contexts=100,
                         max_new_tokens=3, stop_strings=(), behaviour_ids=[0], possible=possible)
    assert row.contexts == "grammar" and row.base_on_its_own is not None and row.base_on_its_own.n == 8
    assert row.n_contexts == 8 - row.base_on_its_own.k == row.steered.n == row.random.n
    assert set(seen) == {c.text for c in contexts if c.trace_index not in forbidden}
    # Y is allowed everywhere, whatever the trace wrote next (half of the contexts are Y already).
    (y_row,) = sufficiency(model, directions, contexts, char_labeller(model), coeffs=(60.0,), n_contexts=100,
                           max_new_tokens=3, stop_strings=(), behaviour_ids=[1], possible=possible)
    assert y_row.base_on_its_own is not None and y_row.base_on_its_own.n == 12
    # Without a grammar: the contexts whose next sentence is another behaviour, and the rows say so.
    assert grammar_filter(None, {}) is None
    (unfiltered,) = sufficiency(model, directions, contexts, char_labeller(model), coeffs=(60.0,), n_contexts=100,
                                max_new_tokens=3, stop_strings=(), behaviour_ids=[0])
    assert unfiltered.contexts == "another behaviour next" and unfiltered.n_contexts == 6
    only_forbidden = [c for c in contexts if c.trace_index in forbidden]
    with pytest.raises(ConfigError, match=r"behaviour\(s\) 0 .*grammar allows it next"):
        sufficiency(model, directions, only_forbidden, char_labeller(model), behaviour_ids=[0], possible=possible)


def test_grammar_contexts_leave_out_where_the_base_writes_the_behaviour_on_its_own(tiny_models):
    model = tiny_models["llama"]
    directions = unembedding_set(model)
    register_fake_grammar("fake-grammar")
    possible = grammar_filter(ground_truth_for("fake-grammar"), {"0": "Z", "1": "Y"})
    contexts = [SteeringContext(f"Q: item {i} {'already' if i < 5 else 'fresh'}\n", 1, i, 0, reasoning="x\n")
                for i in range(16)]
    steered_label = char_labeller(model)
    seen: list[str] = []

    def labeller(texts, continuations):  # the base writes Z on its own after "already"
        seen.extend(texts)
        labels = steered_label(texts, continuations)
        return [[0] if "already" in text else label for text, label in zip(texts, labels, strict=True)]

    (row,) = sufficiency(model, directions, contexts, labeller, coeffs=(60.0,), n_contexts=11, max_new_tokens=3,
                         stop_strings=(), behaviour_ids=[0], possible=possible)
    assert row.base_on_its_own is not None and (row.base_on_its_own.k, row.base_on_its_own.n) == (5, 16)
    assert row.n_contexts == 11 and row.unsteered.k == 0
    steered_texts = seen[row.base_on_its_own.n:]
    assert steered_texts and not any("already" in text for text in steered_texts)


def test_a_direction_no_better_than_random_fails(tiny_models):
    model = tiny_models["llama"]
    directions = unembedding_set(model)
    contexts = [SteeringContext(f"Q: item {i} of the list\n", 1, i, 0) for i in range(16)]
    # The "behaviour direction" is the norm-matched random control itself.
    as_random = directions.random_like(0)
    assert torch.allclose(as_random.random_like(0).directions, as_random.directions)
    (row,) = sufficiency(model, as_random, contexts, char_labeller(model), coeffs=(60.0,), n_contexts=16,
                         max_new_tokens=3, stop_strings=(), behaviour_ids=[0])
    assert row.steered.k == row.random.k and row.p_value >= 0.5 and not row.passed
    (real,) = sufficiency(model, directions, contexts, char_labeller(model), coeffs=(60.0,), n_contexts=16,
                          max_new_tokens=3, stop_strings=(), behaviour_ids=[0])
    assert real.steered.rate == 1.0 and real.passed and real.p_value < ALPHA  # the criterion can pass


def test_n_per_condition_is_honoured(tiny_models):
    model = tiny_models["llama"]
    directions = unembedding_set(model)
    contexts = [SteeringContext(f"Q: item {i} of the list\n", 1, i, 0, next_sentence="Z." if i % 2 else "Y.")
                for i in range(20)]
    (row,) = sufficiency(model, directions, contexts, char_labeller(model), coeffs=(60.0,), n_contexts=5, n_random=2,
                         max_new_tokens=3, stop_strings=(), behaviour_ids=[0])
    assert (row.n_contexts, row.unsteered.n, row.steered.n, row.random.n) == (5, 5, 5, 10)
    assert len(row.random_rates) == 2
    rows = necessity_at_contexts(model, {"unembedding": directions}, contexts, char_labeller(model), n_contexts=4,
                                 max_new_tokens=3, stop_strings=(), variants=("layer",))
    assert [(r.title, r.n_contexts, r.unablated.n, r.ablated.n) for r in rows] == [("Z", 4, 4, 4), ("Y", 4, 4, 4)]
    # The defaults: at least 100 contexts per behaviour and condition, in a run and in the demo.
    assert key_defaults(RunConfig)["ablation_contexts"] >= 100 and DEMO_CONFIG.ablation_contexts >= 100
    assert AblationSettings(thinking_template="t", max_new_tokens=1).n_contexts >= 100


def test_necessity_is_measured_where_the_thinking_model_shows_the_behaviour(tiny_models):
    model = tiny_models["llama"]
    directions = unembedding_set(model)
    # Contexts 0-5 were followed by a Z sentence in the thinking trace, 6-9 by Y, 10-11 by nothing labelled.
    nexts = ["Z then."] * 6 + ["Y then."] * 4 + ["other."] * 2
    contexts = [SteeringContext(f"Q: item {i} of the list\n", None, i, 0, next_sentence=text)
                for i, text in enumerate(nexts)]
    seen: list[str] = []
    per_layer = {layer: dataclasses.replace(directions, layer=layer) for layer in range(model.cfg.n_layers)}
    rows = necessity_at_contexts(model, {"unembedding": directions, "again": directions}, contexts,
                                 recording_labeller(model, seen), n_contexts=100, max_new_tokens=3, stop_strings=(),
                                 variants=("layer", "all"), layer_directions={"again": per_layer})
    assert [(r.title, r.directions, r.variant, r.n_contexts) for r in rows] == [
        ("Z", "unembedding", "layer 2", 6), ("Z", "unembedding", "all layers", 6),
        ("Z", "again", "layer 2", 6), ("Z", "again", "all layers", 6),
        ("Z", "again", "all layers, per-layer directions", 6),
        ("Y", "unembedding", "layer 2", 4), ("Y", "unembedding", "all layers", 4),
        ("Y", "again", "layer 2", 4), ("Y", "again", "all layers", 4),
        ("Y", "again", "all layers, per-layer directions", 4)]
    for row in rows:
        assert math.isclose(row.p_value, one_sided_p(row.unablated, row.ablated))
        assert row.passed == (row.p_value < ALPHA)
    generated = set(seen[len(contexts):])  # after labelling the recorded next sentences
    assert generated == {c.text for c in contexts[:10]}
    with pytest.raises(ConfigError, match=r"writes behaviour\(s\) \[1\]"):
        necessity_at_contexts(model, {"unembedding": directions}, contexts[:6], char_labeller(model))
