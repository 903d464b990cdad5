"""Clustering baselines: planted-cluster recovery, determinism, the shared interface."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mechsteer.taxonomy.clustering import DiagonalGMM, SAEClusterer, make_clusterer
from mechsteer.taxonomy.kmeans import SphericalKMeans, kmeans_plus_plus_seeds
from mechsteer.taxonomy.metrics import adjusted_rand_index
from tests.typecheck import refused


def planted_unit_vectors(n_clusters=8, d=64, per_cluster=150, noise=0.5, seed=0):
    generator = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(n_clusters, d, generator=generator), dim=-1)
    labels = torch.arange(n_clusters).repeat_interleave(per_cluster)
    vectors = centres[labels] + noise * torch.randn(len(labels), d, generator=generator) / math.sqrt(d)
    vectors = F.normalize(vectors - vectors.mean(dim=0), dim=-1)
    return vectors, labels


@pytest.fixture(scope="module")
def planted():
    return planted_unit_vectors()


@pytest.mark.parametrize("method", ["kmeans", "gmm", "sae"])
def test_each_method_recovers_planted_clusters(planted, method):
    vectors, labels = planted
    clusterer = make_clusterer(method, 8, seed=1).fit(vectors)
    predicted = clusterer.classify(vectors)
    assert predicted.shape == labels.shape and predicted.dtype == torch.long
    ari = adjusted_rand_index(labels, predicted)
    assert ari >= 0.9, f"{method}: ARI {ari:.3f}"
    directions = clusterer.directions
    assert directions.shape == (8, 64)
    torch.testing.assert_close(directions.norm(dim=-1), torch.ones(8), atol=1e-5, rtol=0)
    # Each recovered direction points at one planted cluster's mean direction.
    planted_means = F.normalize(torch.stack([vectors[labels == c].mean(0) for c in range(8)]), dim=-1)
    assert (directions.float() @ planted_means.T).max(dim=1).values.min() > 0.8
    reconstruction = clusterer.reconstruct(vectors)
    assert reconstruction.shape == vectors.shape


@pytest.mark.parametrize("cls", [SphericalKMeans, DiagonalGMM])
def test_baselines_are_deterministic_per_seed(planted, cls):
    vectors, _ = planted
    first = cls(8, seed=5).fit(vectors)
    second = cls(8, seed=5).fit(vectors)
    assert torch.equal(first.directions, second.directions)
    assert torch.equal(first.classify(vectors), second.classify(vectors))


def test_kmeans_reconstruction_is_projection_on_assigned_centre(planted):
    vectors, _ = planted
    kmeans = SphericalKMeans(8, seed=0).fit(vectors)
    labels = kmeans.classify(vectors[:5])
    centres = kmeans.directions[labels]
    expected = (vectors[:5] * centres).sum(-1, keepdim=True) * centres
    torch.testing.assert_close(kmeans.reconstruct(vectors[:5]), expected)


def test_gmm_posteriors_are_normalised(planted):
    vectors, _ = planted
    gmm = DiagonalGMM(8, seed=0).fit(vectors)
    posterior = gmm.log_posterior(vectors[:20]).exp()
    torch.testing.assert_close(posterior.sum(-1), torch.ones(20), atol=1e-5, rtol=0)
    assert gmm.mean_log_likelihood is not None and math.isfinite(gmm.mean_log_likelihood)


def test_kmeans_plus_plus_seeds_spread_over_separated_clusters():
    vectors, labels = planted_unit_vectors(n_clusters=6, d=32, per_cluster=20, noise=0.1, seed=3)
    seeds = kmeans_plus_plus_seeds(vectors, 6, torch.Generator().manual_seed(0), cosine=True)
    assert sorted(labels[seeds].tolist()) == list(range(6))
    with pytest.raises(ValueError, match="n_seeds"):
        kmeans_plus_plus_seeds(vectors, 500, torch.Generator(), cosine=False)


def test_interface_errors():
    with refused("unknown clustering method", parameter="method"):
        make_clusterer("agglomerative", 5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not fitted"):
        SphericalKMeans(3).classify(torch.zeros(2, 4))
    with pytest.raises(ValueError, match="not fitted"):
        _ = DiagonalGMM(3).directions
    with pytest.raises(ValueError, match="not fitted"):
        SAEClusterer(3).classify(torch.zeros(2, 4))
    with pytest.raises(ValueError, match="at least n_clusters"):
        SphericalKMeans(5).fit(torch.randn(3, 4))
    assert isinstance(make_clusterer("sae", 4, k=2), SAEClusterer)
