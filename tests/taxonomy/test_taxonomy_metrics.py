"""Geometric and ground-truth taxonomy metrics, checked on cases computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mechsteer.taxonomy.metrics import (
    adjusted_rand_index,
    behaviour_holding_most,
    cluster_size_distribution,
    contingency_table,
    geometric_metrics,
    ground_truth_metrics,
    match_behaviours_to_labels,
    mean_direction_dissimilarity,
    mutual_information,
    normalized_mutual_info,
    reconstruction_fvu,
)

# --- ARI and NMI by hand --------------------------------------------------------------


def test_ari_identical_and_relabelled_partitions():
    assert adjusted_rand_index([0, 0, 1, 1], [0, 0, 1, 1]) == 1.0
    assert adjusted_rand_index([0, 0, 1, 1], [5, 5, 2, 2]) == 1.0
    assert adjusted_rand_index(["a", "a", "b"], torch.tensor([1, 1, 0])) == 1.0


def test_ari_hand_computed_cases():
    # Contingency all ones: index 0, expected 2*2/6, max 2 -> (0 - 2/3) / (2 - 2/3).
    assert adjusted_rand_index([0, 0, 1, 1], [0, 1, 0, 1]) == pytest.approx(-0.5)
    # index 1, row pairs 1, column pairs 2, expected 1/3, max 3/2 -> 4/7.
    assert adjusted_rand_index([0, 0, 1, 2], [0, 0, 1, 1]) == pytest.approx(4 / 7)
    # index 2, row pairs 6, column pairs 3, expected 6*3/15, max 4.5 -> 0.8 / 3.3.
    assert adjusted_rand_index([0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 2, 2]) == pytest.approx(0.8 / 3.3)
    # One cluster against all singletons: index 0, expected 0, max 3 -> 0.
    assert adjusted_rand_index([0, 0, 0, 0], [0, 1, 2, 3]) == 0.0
    # Both a single cluster: the degenerate perfect match.
    assert adjusted_rand_index([1, 1, 1], [4, 4, 4]) == 1.0


def test_nmi_hand_computed_cases():
    assert normalized_mutual_info([0, 0, 1, 1], [1, 1, 0, 0]) == pytest.approx(1.0)
    assert normalized_mutual_info([0, 0, 1, 1], [0, 1, 0, 1]) == pytest.approx(0.0, abs=1e-12)
    # H(true) = 1.5 bits, H(pred) = 1 bit, MI = 1 bit -> 1 / 1.25.
    assert normalized_mutual_info([0, 0, 1, 2], [0, 0, 1, 1]) == pytest.approx(0.8)
    # MI = (2/3) ln 2, H(true) = ln 2, H(pred) = ln 3.
    assert mutual_information([0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 2, 2]) == pytest.approx(2 / 3 * math.log(2))
    assert normalized_mutual_info([0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 2, 2]) == pytest.approx(
        (2 / 3 * math.log(2)) / ((math.log(2) + math.log(3)) / 2)
    )
    assert normalized_mutual_info([2, 2, 2], [0, 0, 0]) == 1.0


def test_label_errors_and_contingency():
    with pytest.raises(ValueError, match="differ in length"):
        adjusted_rand_index([0, 1], [0, 1, 1])
    with pytest.raises(ValueError, match="no labels"):
        normalized_mutual_info([], [])
    with pytest.raises(ValueError, match="one-dimensional"):
        adjusted_rand_index(np.zeros((2, 2), dtype=int), [0, 1])
    table, true_values, pred_values = contingency_table(["b", "a", "a"], [1, 1, 0])
    assert true_values == ["a", "b"] and pred_values == [0, 1]
    assert table.tolist() == [[1, 1], [0, 1]]


def test_behaviour_matching_precision_and_recall():
    truth = ["a", "a", "a", "b", "b", "c"]
    predicted = [0, 0, 1, 1, 1, 1]
    matches = match_behaviours_to_labels(truth, predicted)
    assert [(m.behaviour, m.size, m.label) for m in matches] == [(0, 2, "a"), (1, 4, "b")]
    assert (matches[0].precision, matches[0].recall) == (1.0, pytest.approx(2 / 3))
    assert (matches[1].precision, matches[1].recall) == (0.5, 1.0)
    metrics = ground_truth_metrics(truth, predicted).to_dict()
    assert metrics["matches"][1]["label"] == "b"
    assert metrics["ari"] == adjusted_rand_index(truth, predicted)


# --- geometric ----------------------------------------------------------------------


def test_reconstruction_fvu_by_hand():
    vectors = torch.tensor([[0.0, 0.0], [2.0, 0.0]])
    # error 1, variance about the mean (1, 0): 1 + 1.
    assert reconstruction_fvu(vectors, torch.tensor([[0.0, 0.0], [1.0, 0.0]])) == pytest.approx(0.5)
    assert reconstruction_fvu(vectors, vectors.clone()) == 0.0
    assert reconstruction_fvu(vectors, vectors.mean(0).expand(2, 2)) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="zero variance"):
        reconstruction_fvu(torch.ones(3, 2), torch.ones(3, 2))


def test_mean_direction_dissimilarity_by_hand():
    assert mean_direction_dissimilarity(torch.eye(3)) == pytest.approx(1.0)
    assert mean_direction_dissimilarity(torch.tensor([[1.0, 0.0], [-2.0, 0.0]])) == pytest.approx(0.0)
    diagonal = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    expected = (1.0 + 2 * (1 - 1 / math.sqrt(2))) / 3
    assert mean_direction_dissimilarity(diagonal) == pytest.approx(expected)
    with pytest.raises(ValueError, match="at least 2"):
        mean_direction_dissimilarity(torch.ones(1, 3))


def test_cluster_size_distribution_by_hand():
    sizes = cluster_size_distribution(torch.tensor([0, 0, 1, 3]), 4)
    assert sizes.counts == [2, 1, 0, 1]
    assert sizes.fractions == [0.5, 0.25, 0.0, 0.25]
    assert sizes.n_empty == 1 and sizes.largest_fraction == 0.5
    entropy = -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25))
    assert sizes.normalised_entropy == pytest.approx(entropy / math.log(4))
    with pytest.raises(ValueError, match="labels must lie"):
        cluster_size_distribution(torch.tensor([0, 4]), 4)


def test_geometric_metrics_bundle():
    vectors = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    directions = torch.eye(2)
    labels = torch.tensor([0, 0, 1, 1])
    reconstruction = directions[labels] * (vectors * directions[labels]).sum(-1, keepdim=True)
    metrics = geometric_metrics(vectors, reconstruction, labels, directions)
    assert metrics.fvu == pytest.approx(reconstruction_fvu(vectors, reconstruction))
    assert metrics.mean_direction_dissimilarity == pytest.approx(1.0)
    assert metrics.sizes.counts == [2, 2]
    assert metrics.to_dict()["sizes"]["n_empty"] == 0


def test_behaviour_holding_most_gives_every_label_a_behaviour_even_without_a_majority():
    # "verify" is nowhere a majority (cluster 0 is mostly compute) but cluster 0 holds most of it.
    truth = ["compute"] * 5 + ["verify"] * 3 + ["compute"] * 4 + ["verify"] * 1 + ["plan"] * 2
    predicted = [0] * 8 + [1] * 5 + [2] * 2
    assert behaviour_holding_most(truth, predicted) == {"compute": 0, "verify": 0, "plan": 2}
    assert {m.label for m in match_behaviours_to_labels(truth, predicted)} == {"compute", "plan"}
