"""Spherical k-means and k-means++ seeding: the "kmeans" clusterer and the SAE's initialisation.

:class:`SphericalKMeans` is one of the taxonomy's clustering methods
(:mod:`mechsteer.taxonomy.clustering`) and also starts the top-k SAE's encoder rows at its
centres (:mod:`mechsteer.taxonomy.sae`); :func:`kmeans_plus_plus_seeds` seeds it and the
Gaussian mixture. Deterministic given a seed (a private ``torch.Generator``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from mechsteer.core.tensor_types import Float, Int, Tensor, typechecked


@typechecked
def kmeans_plus_plus_seeds(
    points: Float[Tensor, "n d"], n_seeds: int, generator: torch.Generator, *, cosine: bool
) -> Int[Tensor, " n_seeds"]:
    """Row indices chosen by greedy k-means++.

    Each next seed is the best (lowest total D²) of ``2 + log(n_seeds)`` candidates drawn
    with probability ∝ D², where D is the distance to the nearest chosen seed: 1 - cos
    when ``cosine``, else Euclidean. Greedy candidates avoid two seeds in one cluster far
    more often than plain k-means++ (scikit-learn does the same).
    """
    if not 1 <= n_seeds <= points.shape[0]:
        raise ValueError(f"need 1 <= n_seeds <= n points ({points.shape[0]}), got {n_seeds}")
    points = F.normalize(points, dim=-1) if cosine else points

    def distance_to(rows: Tensor) -> Tensor:  # (n_rows, n)
        if cosine:
            return (1.0 - rows @ points.T).clamp_min(0.0)
        return torch.cdist(rows, points)

    n_candidates = 2 + int(math.log(n_seeds))
    chosen = [int(torch.randint(points.shape[0], (1,), generator=generator))]
    nearest = distance_to(points[chosen]).squeeze(0).double()
    for _ in range(n_seeds - 1):
        weights = nearest.pow(2)
        if weights.sum() <= 0:  # every point coincides with a seed: pick any unchosen one
            weights = torch.ones_like(weights)
            weights[chosen] = 0
        candidates = torch.multinomial(weights, n_candidates, replacement=True, generator=generator)
        candidate_nearest = torch.minimum(nearest, distance_to(points[candidates]).double())
        best = int(candidate_nearest.pow(2).sum(dim=-1).argmin())
        chosen.append(int(candidates[best]))
        nearest = candidate_nearest[best]
    return torch.tensor(chosen, dtype=torch.long)


def check_fitted(value: Tensor | None, name: str) -> Tensor:
    if value is None:
        raise ValueError(f"{name} is not fitted yet: call fit(vectors) first")
    return value


def check_vectors(vectors: Tensor, n_clusters: int) -> None:
    if vectors.shape[0] < n_clusters:
        raise ValueError(f"need at least n_clusters={n_clusters} vectors, got {vectors.shape[0]}")


class SphericalKMeans:
    """k-means on the unit sphere: assign by cosine, centre = normalised member mean.

    The best of ``n_init`` k-means++-seeded runs (highest total cosine) is kept. An empty
    cluster is re-seeded at the point currently worst served by its centre.
    """

    def __init__(self, n_clusters: int, *, seed: int = 0, n_init: int = 4, max_iter: int = 100) -> None:
        if n_clusters < 1 or n_init < 1 or max_iter < 1:
            raise ValueError(
                f"n_clusters, n_init and max_iter must be >= 1, got {n_clusters}, {n_init}, {max_iter}"
            )
        self.n_clusters = n_clusters
        self.seed = seed
        self.n_init = n_init
        self.max_iter = max_iter
        self.centres: Tensor | None = None

    @typechecked
    def fit(self, vectors: Float[Tensor, "n d_in"]) -> SphericalKMeans:
        check_vectors(vectors, self.n_clusters)
        points = F.normalize(vectors.detach().double(), dim=-1)
        generator = torch.Generator().manual_seed(self.seed)
        best_score, best_centres = -math.inf, points[:0]
        for _ in range(self.n_init):
            centres = points[kmeans_plus_plus_seeds(points, self.n_clusters, generator, cosine=True)]
            labels = None
            for _ in range(self.max_iter):
                similarity = points @ centres.T
                new_labels = similarity.argmax(dim=-1)
                if labels is not None and torch.equal(new_labels, labels):
                    break
                labels = new_labels
                sums = torch.zeros_like(centres).index_add_(0, labels, points)
                counts = torch.bincount(labels, minlength=self.n_clusters)
                served = similarity.gather(1, labels[:, None]).squeeze(1)
                for cluster in torch.nonzero(counts == 0).flatten().tolist():
                    worst = int(served.argmin())
                    sums[cluster] = points[worst]
                    served[worst] = math.inf
                centres = F.normalize(sums, dim=-1)
            score = (points @ centres.T).max(dim=-1).values.sum().item()
            if score > best_score:
                best_score, best_centres = score, centres
        self.centres = best_centres.to(vectors.dtype)
        return self

    @torch.no_grad()
    @typechecked
    def classify(self, vectors: Float[Tensor, "n d_in"]) -> Int[Tensor, " n"]:
        centres = check_fitted(self.centres, "SphericalKMeans")
        return (F.normalize(vectors, dim=-1) @ centres.to(vectors).T).argmax(dim=-1)

    @torch.no_grad()
    @typechecked
    def reconstruct(self, vectors: Float[Tensor, "n d_in"]) -> Float[Tensor, "n d_in"]:
        """Projection of each vector onto its cluster's centre direction."""
        centres = check_fitted(self.centres, "SphericalKMeans").to(vectors)
        assigned = centres[self.classify(vectors)]
        return (vectors * assigned).sum(dim=-1, keepdim=True) * assigned

    @property
    def directions(self) -> Float[Tensor, "n_clusters d_in"]:
        return check_fitted(self.centres, "SphericalKMeans").clone()


__all__ = ["SphericalKMeans", "check_fitted", "check_vectors", "kmeans_plus_plus_seeds"]
