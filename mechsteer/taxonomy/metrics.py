"""Geometric and ground-truth metrics of a taxonomy (labelled sentence vectors).

Geometric: reconstruction FVU, mean 1 - |cos| between behaviour directions, the
cluster-size distribution, and the cosine silhouette of the assignments. Ground truth (organisms, where planted labels exist): adjusted
Rand index, normalised mutual information (arithmetic-mean normalisation, natural log;
the value does not depend on the log base), and a behaviour-to-label matching with
per-behaviour precision and recall.

ARI and NMI are implemented here (scikit-learn is not a dependency) and follow
scikit-learn's conventions for degenerate partitions: ARI = 1 when both partitions are
the same trivial one (a single cluster, or all singletons); NMI = 1 when both partitions
have zero entropy.

The matching maps each behaviour to the planted label most of its sentences carry
(several behaviours may map to one label, as happens when the SAE has more latents than
there are planted behaviours). scipy's Hungarian solver is not installed, so a one-to-one
matching is not offered. Precision of behaviour b matched to label l = the share of b's
sentences that carry l; recall = the share of l's sentences that b holds.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from mechsteer.activations import SentenceRecord
from mechsteer.core.tensor_types import Float, Int, Tensor, typechecked

Labels = Tensor | np.ndarray | Sequence[Hashable]
# The silhouette is computed on a seeded sample of at most this many sentences.
SILHOUETTE_MAX_POINTS = 2000


# --- geometric ---------------------------------------------------------------------


@typechecked
def reconstruction_fvu(
    vectors: Float[Tensor, "n d_in"], reconstruction: Float[Tensor, "n d_in"]
) -> float:
    """sum((vectors - reconstruction)^2) / sum((vectors - mean of vectors)^2), in float64."""
    vectors, reconstruction = vectors.double(), reconstruction.double()
    error = (vectors - reconstruction).pow(2).sum()
    variance = (vectors - vectors.mean(dim=0, keepdim=True)).pow(2).sum()
    if variance <= 0:
        raise ValueError("vectors have zero variance, so the FVU is undefined")
    return (error / variance).item()


@typechecked
def mean_direction_dissimilarity(directions: Float[Tensor, "n_behaviours d_in"]) -> float:
    """Mean over pairs i < j of 1 - |cos(direction_i, direction_j)|: 1 = all orthogonal."""
    n_behaviours = directions.shape[0]
    if n_behaviours < 2:
        raise ValueError(f"need at least 2 directions for pairwise dissimilarity, got {n_behaviours}")
    if (directions.norm(dim=-1) == 0).any():
        raise ValueError("a direction has zero norm, so its cosine is undefined")
    unit = F.normalize(directions.double(), dim=-1)
    cosine = unit @ unit.T
    upper = torch.triu_indices(n_behaviours, n_behaviours, offset=1)
    return (1.0 - cosine[upper[0], upper[1]].abs()).mean().item()


@dataclass(frozen=True)
class ClusterSizes:
    """How the sentences spread over behaviours."""

    counts: list[int]
    fractions: list[float]
    n_empty: int
    largest_fraction: float
    normalised_entropy: float  # entropy of the fractions / log(n_behaviours); 1 = uniform

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@typechecked
def cluster_size_distribution(labels: Int[Tensor, " n"], n_behaviours: int) -> ClusterSizes:
    if labels.numel() == 0:
        raise ValueError("no labels given")
    if labels.min() < 0 or labels.max() >= n_behaviours:
        raise ValueError(
            f"labels must lie in [0, {n_behaviours}), got range [{labels.min()}, {labels.max()}]"
        )
    counts = torch.bincount(labels, minlength=n_behaviours).tolist()
    total = sum(counts)
    fractions = [count / total for count in counts]
    entropy = -sum(p * math.log(p) for p in fractions if p > 0)
    return ClusterSizes(
        counts=counts,
        fractions=fractions,
        n_empty=sum(count == 0 for count in counts),
        largest_fraction=max(fractions),
        normalised_entropy=entropy / math.log(n_behaviours) if n_behaviours > 1 else 1.0,
    )


@typechecked
def cosine_silhouette(
    vectors: Float[Tensor, "n d"],
    labels: Int[Tensor, " n"],
    *,
    max_points: int = SILHOUETTE_MAX_POINTS,
    seed: int = 0,
) -> float:
    """Mean silhouette with cosine distance (1 - cos), as scikit-learn defines it.

    s(i) = (b - a) / max(a, b), a = mean distance to the rest of i's cluster, b = the lowest
    mean distance to another cluster; s = 0 for a sentence alone in its cluster. Computed on a
    seeded random sample of ``max_points`` sentences when there are more.
    """
    if vectors.shape[0] > max_points:
        sample = torch.randperm(vectors.shape[0], generator=torch.Generator().manual_seed(seed))[:max_points]
        vectors, labels = vectors[sample], labels[sample]
    clusters, codes = torch.unique(labels, return_inverse=True)
    if len(clusters) < 2:
        raise ValueError(f"the silhouette needs at least 2 non-empty clusters, got {len(clusters)}")
    unit = F.normalize(vectors.double(), dim=-1)
    distance = (1.0 - unit @ unit.T).clamp_min(0.0)
    one_hot = F.one_hot(codes, len(clusters)).double()
    sums = distance @ one_hot  # (n, n_clusters): summed distance to each cluster
    counts = one_hot.sum(dim=0)
    own_count = counts[codes]
    own = (sums.gather(1, codes[:, None]).squeeze(1) / (own_count - 1).clamp_min(1))
    mean_to = sums / counts
    mean_to.scatter_(1, codes[:, None], math.inf)
    nearest = mean_to.min(dim=1).values
    score = (nearest - own) / torch.maximum(own, nearest).clamp_min(1e-12)
    score = torch.where(own_count > 1, score, torch.zeros_like(score))
    return score.mean().item()


# --- ground truth ------------------------------------------------------------------


def _encode(labels: Labels, name: str) -> tuple[np.ndarray, list[Any]]:
    """Integer codes 0..k-1 and the distinct label values, in sorted order when sortable."""
    if isinstance(labels, Tensor):
        labels = labels.detach().cpu().numpy()
    values = list(labels.tolist() if isinstance(labels, np.ndarray) else labels)
    if isinstance(labels, np.ndarray) and labels.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {labels.shape}")
    distinct = list(dict.fromkeys(values))
    try:
        distinct.sort()
    except TypeError:
        pass  # mixed types: keep first-seen order
    index = {value: code for code, value in enumerate(distinct)}
    return np.array([index[value] for value in values], dtype=np.int64), distinct


def contingency_table(labels_true: Labels, labels_pred: Labels) -> tuple[np.ndarray, list, list]:
    """Counts of (true label, predicted label) pairs, rows true, columns predicted."""
    true_codes, true_values = _encode(labels_true, "labels_true")
    pred_codes, pred_values = _encode(labels_pred, "labels_pred")
    if len(true_codes) != len(pred_codes):
        raise ValueError(
            f"labels_true and labels_pred differ in length: {len(true_codes)} vs {len(pred_codes)}"
        )
    if len(true_codes) == 0:
        raise ValueError("no labels given")
    table = np.zeros((len(true_values), len(pred_values)), dtype=np.int64)
    np.add.at(table, (true_codes, pred_codes), 1)
    return table, true_values, pred_values


def _pairs(counts: np.ndarray) -> float:
    counts = counts.astype(np.float64)
    return float((counts * (counts - 1) / 2).sum())


def adjusted_rand_index(labels_true: Labels, labels_pred: Labels) -> float:
    """Hubert-Arabie adjusted Rand index: 1 = identical partitions, ~0 = chance."""
    table, _, _ = contingency_table(labels_true, labels_pred)
    n = int(table.sum())
    index = _pairs(table)
    true_pairs, pred_pairs = _pairs(table.sum(axis=1)), _pairs(table.sum(axis=0))
    total_pairs = n * (n - 1) / 2
    expected = true_pairs * pred_pairs / total_pairs if total_pairs > 0 else 0.0
    maximum = (true_pairs + pred_pairs) / 2
    if maximum == expected:  # both partitions trivial and equal (one cluster, or singletons)
        return 1.0
    return (index - expected) / (maximum - expected)


def _entropy(counts: np.ndarray) -> float:
    probabilities = counts[counts > 0] / counts.sum()
    return float(-(probabilities * np.log(probabilities)).sum())


def mutual_information(labels_true: Labels, labels_pred: Labels) -> float:
    """Mutual information in nats."""
    table, _, _ = contingency_table(labels_true, labels_pred)
    joint = table / table.sum()
    outer = np.outer(joint.sum(axis=1), joint.sum(axis=0))
    nonzero = joint > 0
    return float((joint[nonzero] * np.log(joint[nonzero] / outer[nonzero])).sum())


def normalized_mutual_info(labels_true: Labels, labels_pred: Labels) -> float:
    """MI / mean(H(true), H(pred)); 1 when both partitions have zero entropy."""
    table, _, _ = contingency_table(labels_true, labels_pred)
    true_entropy, pred_entropy = _entropy(table.sum(axis=1)), _entropy(table.sum(axis=0))
    if true_entropy == 0 and pred_entropy == 0:
        return 1.0
    mi = mutual_information(labels_true, labels_pred)
    return max(0.0, mi / ((true_entropy + pred_entropy) / 2))


@dataclass(frozen=True)
class BehaviourMatch:
    """One behaviour (predicted cluster) matched to the planted label most of it carries."""

    behaviour: Hashable
    size: int
    label: Hashable
    precision: float
    recall: float

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def match_behaviours_to_labels(labels_true: Labels, labels_pred: Labels) -> list[BehaviourMatch]:
    """Majority-label matching of every non-empty behaviour, with precision and recall.

    Ties go to the label that sorts first. Behaviours with no sentences do not appear.
    """
    table, true_values, pred_values = contingency_table(labels_true, labels_pred)
    label_sizes = table.sum(axis=1)
    matches = []
    for column, behaviour in enumerate(pred_values):
        members = table[:, column]
        size = int(members.sum())
        row = int(members.argmax())
        matches.append(
            BehaviourMatch(
                behaviour=behaviour,
                size=size,
                label=true_values[row],
                precision=float(members[row] / size),
                recall=float(members[row] / label_sizes[row]),
            )
        )
    return matches


def behaviour_holding_most(labels_true: Labels, labels_pred: Labels) -> dict[Hashable, Hashable]:
    """For each planted label, the behaviour (predicted cluster) that holds most of its sentences.

    Unlike the majority matching above, every label gets a behaviour, also one that is nowhere a
    majority (ties: the behaviour that sorts first). Measurement only: the oracle-timing baseline.
    """
    table, true_values, pred_values = contingency_table(labels_true, labels_pred)
    return {label: pred_values[int(table[row].argmax())] for row, label in enumerate(true_values)}


@dataclass(frozen=True)
class GroundTruthMetrics:
    ari: float
    nmi: float
    matches: list[BehaviourMatch]

    def to_dict(self) -> dict[str, Any]:
        return {"ari": self.ari, "nmi": self.nmi, "matches": [m.to_dict() for m in self.matches]}


def ground_truth_metrics(labels_true: Labels, labels_pred: Labels) -> GroundTruthMetrics:
    return GroundTruthMetrics(
        ari=adjusted_rand_index(labels_true, labels_pred),
        nmi=normalized_mutual_info(labels_true, labels_pred),
        matches=match_behaviours_to_labels(labels_true, labels_pred),
    )


def sentence_labels(sentences: Sequence[SentenceRecord]) -> list[str] | None:
    """The ground-truth labels, or None when the sentences carry none; mixed is an error."""
    labels = [sentence.label for sentence in sentences]
    n_missing = sum(label is None for label in labels)
    if n_missing == len(labels):
        return None
    if n_missing:
        raise ValueError(f"{n_missing} of {len(labels)} sentences have no ground-truth label; expected all or none")
    return [label for label in labels if label is not None]


@dataclass(frozen=True)
class GeometricMetrics:
    fvu: float
    mean_direction_dissimilarity: float
    sizes: ClusterSizes

    def to_dict(self) -> dict[str, Any]:
        return {
            "fvu": self.fvu,
            "mean_direction_dissimilarity": self.mean_direction_dissimilarity,
            "sizes": self.sizes.to_dict(),
        }


@typechecked
def geometric_metrics(
    vectors: Float[Tensor, "n d_in"],
    reconstruction: Float[Tensor, "n d_in"],
    labels: Int[Tensor, " n"],
    directions: Float[Tensor, "n_behaviours d_in"],
) -> GeometricMetrics:
    """All geometric metrics of one labelling, e.g. from a fitted clusterer:
    ``geometric_metrics(x, c.reconstruct(x), c.classify(x), c.directions)``."""
    return GeometricMetrics(
        fvu=reconstruction_fvu(vectors, reconstruction),
        mean_direction_dissimilarity=mean_direction_dissimilarity(directions),
        sizes=cluster_size_distribution(labels, directions.shape[0]),
    )


__all__ = [
    "BehaviourMatch",
    "ClusterSizes",
    "GeometricMetrics",
    "GroundTruthMetrics",
    "adjusted_rand_index",
    "cluster_size_distribution",
    "contingency_table",
    "cosine_silhouette",
    "geometric_metrics",
    "ground_truth_metrics",
    "match_behaviours_to_labels",
    "mean_direction_dissimilarity",
    "mutual_information",
    "normalized_mutual_info",
    "reconstruction_fvu",
    "sentence_labels",
    "behaviour_holding_most",
]
