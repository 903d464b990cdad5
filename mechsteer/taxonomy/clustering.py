"""Clustering baselines for the taxonomy, behind the SAE's labelling interface.

Every clusterer has ``fit(vectors) -> self``, ``classify(vectors) -> labels``,
``reconstruct(vectors)`` (for the reconstruction FVU) and ``directions`` (one unit vector
per cluster), so taxonomy code can swap methods through :func:`make_clusterer`:

* ``"sae"``: :class:`SAEClusterer`, the paper's top-k SAE (:mod:`mechsteer.taxonomy.sae`);
* ``"kmeans"``: :class:`~mechsteer.taxonomy.kmeans.SphericalKMeans`, cosine k-means with
  k-means++ seeding;
* ``"gmm"``: :class:`DiagonalGMM`, a Gaussian mixture with diagonal covariances fitted
  by EM in float64.

All are deterministic given ``seed`` (a private ``torch.Generator``, never the global RNG).
"""

from __future__ import annotations

import math
from typing import Any, Literal, Protocol, get_args, runtime_checkable

import torch
import torch.nn.functional as F

from mechsteer.core.tensor_types import Float, Int, Tensor, typechecked
from mechsteer.taxonomy.kmeans import (
    SphericalKMeans,
    check_fitted,
    check_vectors,
    kmeans_plus_plus_seeds,
)
from mechsteer.taxonomy.sae import SAEConfig, TopKSAE, TrainReport, train_sae

ClusteringMethod = Literal["sae", "kmeans", "gmm"]
CLUSTERING_METHODS: tuple[ClusteringMethod, ...] = get_args(ClusteringMethod)


@runtime_checkable
class Clusterer(Protocol):
    """What taxonomy code needs from a labelling method."""

    n_clusters: int

    def fit(self, vectors: Tensor) -> Clusterer: ...

    def classify(self, vectors: Tensor) -> Tensor: ...

    def reconstruct(self, vectors: Tensor) -> Tensor: ...

    @property
    def directions(self) -> Tensor: ...


class DiagonalGMM:
    """Gaussian mixture with diagonal covariances, fitted by EM (float64).

    Each run starts from Euclidean k-means (k-means++ seeds, a few Lloyd steps), as
    scikit-learn does: means and variances from the hard clusters. The best of ``n_init``
    runs (highest log-likelihood) is kept. ``reg_covar`` is added to
    every variance so that a tight component cannot collapse.
    """

    def __init__(
        self,
        n_components: int,
        *,
        seed: int = 0,
        n_init: int = 2,
        max_iter: int = 200,
        tol: float = 1e-5,
        reg_covar: float = 1e-6,
    ) -> None:
        if n_components < 1 or n_init < 1 or max_iter < 1:
            raise ValueError(
                f"n_components, n_init and max_iter must be >= 1, got {n_components}, {n_init}, {max_iter}"
            )
        if not reg_covar > 0:
            raise ValueError(f"reg_covar must be positive, got {reg_covar}")
        self.n_clusters = n_components
        self.seed = seed
        self.n_init = n_init
        self.max_iter = max_iter
        self.tol = tol
        self.reg_covar = reg_covar
        self.means: Tensor | None = None
        self.variances: Tensor | None = None
        self.log_weights: Tensor | None = None
        self.mean_log_likelihood: float | None = None

    @staticmethod
    def _log_joint(points: Tensor, means: Tensor, variances: Tensor, log_weights: Tensor) -> Tensor:
        """log w_c + log N(x | mu_c, diag var_c), shape (n, n_components)."""
        precision = 1.0 / variances
        squared = (
            points.pow(2) @ precision.T
            - 2.0 * points @ (means * precision).T
            + (means.pow(2) * precision).sum(dim=-1)
        )
        log_norm = variances.log().sum(dim=-1) + points.shape[1] * math.log(2 * math.pi)
        return log_weights - 0.5 * (squared + log_norm)

    def _kmeans_start(
        self, points: Tensor, data_variance: Tensor, generator: torch.Generator, n_lloyd: int = 20
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Means, variances and log-weights of a Euclidean k-means partition."""
        means = points[kmeans_plus_plus_seeds(points, self.n_clusters, generator, cosine=False)]
        labels = None
        for _ in range(n_lloyd):
            new_labels = torch.cdist(points, means).argmin(dim=-1)
            if labels is not None and torch.equal(new_labels, labels):
                break
            labels = new_labels
            counts = torch.bincount(labels, minlength=self.n_clusters)
            sums = torch.zeros_like(means).index_add_(0, labels, points)
            # An empty cluster keeps its previous mean.
            means = torch.where(counts[:, None] > 0, sums / counts.clamp_min(1)[:, None], means)
        labels = torch.cdist(points, means).argmin(dim=-1)
        counts = torch.bincount(labels, minlength=self.n_clusters).double()
        one_hot = F.one_hot(labels, self.n_clusters).double()
        variances = (one_hot.T @ points.pow(2)) / counts.clamp_min(1)[:, None] - means.pow(2)
        # Singleton or empty clusters get the data variance rather than a zero variance.
        variances = torch.where(counts[:, None] > 1, variances.clamp_min(0) + self.reg_covar, data_variance)
        log_weights = ((counts + 1) / (counts + 1).sum()).log()
        return means, variances, log_weights

    @typechecked
    def fit(self, vectors: Float[Tensor, "n d_in"]) -> DiagonalGMM:
        check_vectors(vectors, self.n_clusters)
        points = vectors.detach().double()
        generator = torch.Generator().manual_seed(self.seed)
        data_variance = points.var(dim=0, unbiased=False) + self.reg_covar
        best: tuple[float, Tensor, Tensor, Tensor] | None = None
        for _ in range(self.n_init):
            means, variances, log_weights = self._kmeans_start(points, data_variance, generator)
            previous = -math.inf
            for _ in range(self.max_iter):
                log_joint = self._log_joint(points, means, variances, log_weights)
                log_evidence = torch.logsumexp(log_joint, dim=-1, keepdim=True)
                mean_log_likelihood = log_evidence.mean().item()
                responsibility = (log_joint - log_evidence).exp()
                counts = responsibility.sum(dim=0) + 10 * torch.finfo(torch.float64).eps
                means = (responsibility.T @ points) / counts[:, None]
                variances = (responsibility.T @ points.pow(2)) / counts[:, None] - means.pow(2)
                variances = variances.clamp_min(0.0) + self.reg_covar
                log_weights = (counts / counts.sum()).log()
                if abs(mean_log_likelihood - previous) < self.tol:
                    break
                previous = mean_log_likelihood
            final = torch.logsumexp(self._log_joint(points, means, variances, log_weights), dim=-1)
            score = final.mean().item()
            if best is None or score > best[0]:
                best = (score, means, variances, log_weights)
        assert best is not None  # n_init >= 1 is checked in __init__
        self.mean_log_likelihood, means, variances, log_weights = best
        self.means, self.variances, self.log_weights = means, variances, log_weights
        return self

    @torch.no_grad()
    @typechecked
    def log_posterior(self, vectors: Float[Tensor, "n d_in"]) -> Float[Tensor, "n n_clusters"]:
        means = check_fitted(self.means, "DiagonalGMM")
        variances = check_fitted(self.variances, "DiagonalGMM")
        log_weights = check_fitted(self.log_weights, "DiagonalGMM")
        log_joint = self._log_joint(vectors.double(), means, variances, log_weights)
        return (log_joint - torch.logsumexp(log_joint, dim=-1, keepdim=True)).to(vectors.dtype)

    @torch.no_grad()
    @typechecked
    def classify(self, vectors: Float[Tensor, "n d_in"]) -> Int[Tensor, " n"]:
        return self.log_posterior(vectors).argmax(dim=-1)

    @torch.no_grad()
    @typechecked
    def reconstruct(self, vectors: Float[Tensor, "n d_in"]) -> Float[Tensor, "n d_in"]:
        """The mean of each vector's most probable component."""
        means = check_fitted(self.means, "DiagonalGMM").to(vectors)
        return means[self.classify(vectors)]

    @property
    def directions(self) -> Float[Tensor, "n_clusters d_in"]:
        return F.normalize(check_fitted(self.means, "DiagonalGMM"), dim=-1).float()


class SAEClusterer:
    """The top-k SAE behind the clusterer interface; the label is the argmax latent.

    ``centring_mean`` and ``normalised`` describe how the vectors were prepared (stored
    with the SAE); other keyword arguments go to :class:`mechsteer.taxonomy.sae.SAEConfig`.
    """

    def __init__(
        self,
        n_latents: int,
        *,
        centring_mean: Tensor | None = None,
        normalised: bool = False,
        **config_kwargs: Any,
    ) -> None:
        self.n_clusters = n_latents
        self.centring_mean = centring_mean
        self.normalised = normalised
        self.config_kwargs = config_kwargs
        self.sae: TopKSAE | None = None
        self.report: TrainReport | None = None

    @classmethod
    def of(cls, sae: TopKSAE) -> SAEClusterer:
        """A clusterer around an SAE trained elsewhere (e.g. read from a SAELens folder); no fit needed."""
        clusterer = cls(sae.config.n_latents, centring_mean=sae.centring_mean, normalised=sae.normalised)
        clusterer.sae = sae
        return clusterer

    @typechecked
    def fit(self, vectors: Float[Tensor, "n d_in"]) -> SAEClusterer:
        config = SAEConfig(d_in=vectors.shape[1], n_latents=self.n_clusters, **self.config_kwargs)
        centring_mean = self.centring_mean
        if centring_mean is None:
            centring_mean = torch.zeros(vectors.shape[1])
        self.sae, self.report = train_sae(
            vectors, config, centring_mean=centring_mean, normalised=self.normalised
        )
        return self

    def fitted_sae(self) -> TopKSAE:
        if self.sae is None:
            raise ValueError("SAEClusterer is not fitted yet: call fit(vectors) first")
        return self.sae

    @typechecked
    def classify(self, vectors: Float[Tensor, "n d_in"]) -> Int[Tensor, " n"]:
        return self.fitted_sae().classify(vectors)

    @torch.no_grad()
    @typechecked
    def reconstruct(self, vectors: Float[Tensor, "n d_in"]) -> Float[Tensor, "n d_in"]:
        return self.fitted_sae()(vectors)

    @property
    def directions(self) -> Float[Tensor, "n_clusters d_in"]:
        return self.fitted_sae().decoder_directions


def make_clusterer(method: ClusteringMethod, n: int, **kwargs: Any) -> SAEClusterer | SphericalKMeans | DiagonalGMM:
    """A clusterer with ``n`` clusters: method is one of "sae", "kmeans", "gmm"."""
    if method == "sae":
        return SAEClusterer(n, **kwargs)
    if method == "kmeans":
        return SphericalKMeans(n, **kwargs)
    if method == "gmm":
        return DiagonalGMM(n, **kwargs)
    raise ValueError(f"unknown clustering method {method!r}; expected one of {CLUSTERING_METHODS}")


__all__ = [
    "CLUSTERING_METHODS",
    "Clusterer",
    "ClusteringMethod",
    "DiagonalGMM",
    "SAEClusterer",
    "make_clusterer",
]
