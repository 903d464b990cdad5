"""Causal validation: per-row window steering, rates, necessity and sufficiency mechanics, outputs."""

import csv
import json

import pytest
import torch

from mechsteer.causal.necessity import behaviour_rates, necessity, relative_change
from mechsteer.causal.outputs import write_outputs
from mechsteer.causal.sufficiency import (
    RowWindowSteering,
    SteeringContext,
    SufficiencyRow,
    sufficiency,
)
from mechsteer.data.benchmarks import Problem
from mechsteer.grading.statistics import fisher_exact_greater
from mechsteer.interventions.generation import generate
from mechsteer.interventions.hooks import Steering
from mechsteer.steering.direction_set import DirectionSet


def test_row_window_steering_matches_per_row_steering(tiny_models):
    model = tiny_models["llama"]
    direction = torch.randn(model.cfg.d_model, generator=torch.Generator().manual_seed(0))
    prompts = ["Q: a short one\n", "Q: a much longer context here\n"]
    lengths = [len(model.tokenizer(p)["input_ids"]) for p in prompts]
    window = RowWindowSteering(1, direction, 3.0, [n - 2 for n in lengths], [n + 3 for n in lengths])
    batched = generate(model, prompts, max_new_tokens=6, interventions=[window])
    for row, prompt in enumerate(prompts):
        positions = list(range(lengths[row] - 2, lengths[row] + 3))
        alone = generate(model, [prompt], max_new_tokens=6, interventions=[Steering(1, direction, 3.0, positions)])
        assert batched.token_ids[row] == alone.token_ids[0]
    unsteered = generate(model, prompts, max_new_tokens=6)
    assert unsteered.token_ids != batched.token_ids  # the steering did something


def test_rates_and_relative_change_by_hand():
    labels = [[0, 1, 1, None], [1], [], [2, 0]]
    assert behaviour_rates(labels, [0, 1, 2, 3]) == {0: 0.5, 1: 0.75, 2: 0.25, 3: 0.0}
    assert relative_change(2.0, 0.5) == -0.75
    assert relative_change(0.0, 0.0) == 0.0
    assert relative_change(0.0, 1.0) == float("inf")
    with pytest.raises(ValueError, match="no traces"):
        behaviour_rates([], [0])


def char_labeller(model):
    """A scripted labeller: a continuation's first character picks its behaviour (Z -> 0, Y -> 1)."""

    def label(contexts, continuations):
        return [[{"Z": 0, "Y": 1}.get(text[:1])] if text else [] for text in continuations]

    return label


def unembedding_set(model, letters=("Z", "Y")) -> DirectionSet:
    """Directions that write each letter's unembedding vector into the last block's output."""
    ids = [model.tokenizer.convert_tokens_to_ids(letter) for letter in letters]
    unembed = model.unembed.W_U.detach()  # (d_model, vocab)
    directions = torch.stack([unembed[:, i] / unembed[:, i].norm() for i in ids])
    return DirectionSet(model.cfg.model_name, model.cfg.d_model, model.cfg.n_layers, model.cfg.n_layers - 1,
                        "resid_post", "mean", [0, 1], list(letters), directions)


def test_sufficiency_counts_steered_random_and_unsteered(tiny_models, tmp_path):
    model = tiny_models["llama"]
    directions = unembedding_set(model)
    contexts = [SteeringContext(f"Q: item {i} of the list\n", 1 if i % 2 else 0, i, 0) for i in range(12)]
    rows = sufficiency(model, directions, contexts, char_labeller(model), coeffs=(0.0, 60.0), n_contexts=8,
                       max_new_tokens=3, stop_strings=(), n_random=2)
    assert [(row.title, row.coeff) for row in rows] == [("Z", 0.0), ("Z", 60.0), ("Y", 0.0), ("Y", 60.0)]
    for row in rows:
        assert row.n_contexts == 6  # only contexts whose next sentence is the other behaviour
        assert len(row.random_rates) == 2
    zero, strong = rows[0], rows[1]
    assert zero.steered.rate == zero.unsteered.rate == zero.random.rate  # coeff 0 changes nothing
    assert not zero.passed and zero.p_value >= 0.5
    assert strong.steered.rate == 1.0 and strong.random.rate < 0.5
    assert strong.passed and strong.p_value == fisher_exact_greater(6, 6, strong.random.k, 12)
    paths = write_outputs(tmp_path, [], rows, {"note": "test"})
    with paths["sufficiency"].open() as handle:
        table = list(csv.DictReader(handle))
    assert len(table) == 4 and json.loads(table[1]["steered"])["rate"] == 1.0
    document = json.loads(paths["json"].read_text())
    assert [SufficiencyRow.from_json(row) for row in document["sufficiency"]] == rows
    assert paths["plot"].stat().st_size > 0
    with pytest.raises(ValueError, match=r"no context for behaviour\(s\) 1"):
        sufficiency(model, directions, contexts[1:2], char_labeller(model), n_contexts=1, behaviour_ids=[1])


def test_necessity_rows_and_ablation_effect(tiny_models, tmp_path):
    model = tiny_models["llama"]
    directions = unembedding_set(model)
    problems = [Problem(id=f"p{i}", question=f"{i} + 1", answer=str(i + 1), solution=None, benchmark="gsm8k")
                for i in range(4)]

    # "Behaviour" 0 = every generated Z, behaviour 1 = every Y: rates are counts per trace.
    def labeller(contexts, continuations):
        return [[0] * text.count("Z") + [1] * text.count("Y") for text in continuations]

    from mechsteer.data.prompts import PromptTemplate, register_template

    register_template(PromptTemplate("test_plain", "Q: {question}\nA:"), replace=True)
    rows = necessity(model, directions, problems, labeller, template="test_plain", max_new_tokens=8, batch_size=4)
    assert [(row.title, row.variant) for row in rows] == [("Z", "layer 2"), ("Z", "all layers"),
                                                          ("Y", "layer 2"), ("Y", "all layers")]
    baseline = generate(model, [f"Q: {p.question}\nA:" for p in problems], max_new_tokens=8)
    expected = behaviour_rates(labeller(None, baseline.texts), [0, 1])
    for row in rows:
        assert row.rate_before == expected[row.behaviour_id]
        assert row.n_traces == 4
        assert set(row.other_rates_before) == {1 - row.behaviour_id}
    from mechsteer.interventions.hooks import Ablation

    ablated = generate(model, [f"Q: {p.question}\nA:" for p in problems], max_new_tokens=8,
                       interventions=[Ablation(layer, directions.direction(1)) for layer in range(3)])
    after = behaviour_rates(labeller(None, ablated.texts), [0, 1])
    assert (rows[3].rate_after, rows[3].other_rates_after) == (after[1], {0: after[0]})
    paths = write_outputs(tmp_path, rows, [], {})
    assert paths["necessity"].read_text().count("\n") == 5
