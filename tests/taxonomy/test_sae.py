"""Top-k SAE: planted-cluster recovery, determinism, early stopping, save/load, centring."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from mechsteer.taxonomy.metrics import adjusted_rand_index
from mechsteer.taxonomy.sae import SAE_CONFIG_FILE, SAE_WEIGHTS_FILE, SAEConfig, TopKSAE, train_sae
from tests.typecheck import refused


def planted_activations(n_clusters=8, d=64, per_cluster=150, noise=0.5, seed=0):
    """Raw "activations" with planted clusters: scaled unit directions plus noise plus an offset.

    Returns raw activations, their mean, the prepared (centred, L2-normalised) vectors and
    the planted labels.
    """
    generator = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(n_clusters, d, generator=generator), dim=-1)
    labels = torch.arange(n_clusters).repeat_interleave(per_cluster)
    directions = centres[labels] + noise * torch.randn(len(labels), d, generator=generator) / math.sqrt(d)
    offset = 3.0 * torch.randn(d, generator=generator)
    raw = 7.0 * directions + offset
    mean = raw.mean(dim=0)
    prepared = F.normalize(raw - mean, dim=-1)
    return raw, mean, prepared, labels


@pytest.fixture(scope="module")
def planted():
    return planted_activations()


@pytest.fixture(scope="module")
def trained(planted):
    _, mean, prepared, _ = planted
    config = SAEConfig(d_in=64, n_latents=8, seed=0)
    return train_sae(prepared, config, centring_mean=mean, normalised=True)


def small_problem(seed=1):
    _, mean, prepared, labels = planted_activations(n_clusters=4, d=16, per_cluster=60, seed=seed)
    config = SAEConfig(d_in=16, n_latents=4, seed=3, batch_size=32, max_epochs=40, patience=3)
    return prepared, mean, labels, config


def test_recovers_planted_clusters(planted, trained):
    _, _, prepared, labels = planted
    sae, report = trained
    ari = adjusted_rand_index(labels, sae.classify(prepared))
    assert ari >= 0.9, f"ARI {ari:.3f} on planted clusters"
    assert report.best_val_fvu < 0.5
    assert report.n_train + report.n_val == prepared.shape[0]
    assert report.n_val == math.floor(0.1 * prepared.shape[0])


def test_decoder_rows_have_unit_norm(trained):
    sae, _ = trained
    norms = sae.decoder_directions.norm(dim=-1)
    torch.testing.assert_close(norms, torch.ones(8), atol=1e-6, rtol=0)


def test_encode_keeps_exactly_k_raw_preactivations(planted, trained):
    _, _, prepared, _ = planted
    sae, _ = trained
    with torch.no_grad():
        pre = sae.encode_pre(prepared[:50])
        codes = sae.encode(prepared[:50])
    assert ((codes != 0).sum(dim=-1) == 3).all()
    top_values, _ = pre.topk(3, dim=-1)
    torch.testing.assert_close(codes.sort(dim=-1).values[:, -3:].sort(dim=-1).values,
                               top_values.sort(dim=-1).values, atol=0, rtol=0)
    torch.testing.assert_close(sae(prepared[:50]), sae.decode(codes))
    assert torch.equal(sae.classify(prepared[:50]), pre.argmax(dim=-1))


def test_classify_tokens_prepares_raw_activations_like_training(planted, trained):
    raw, mean, prepared, _ = planted
    sae, _ = trained
    # Raw activations shaped (batch, position, d_in), as a hybrid step would see them.
    raw_tokens = raw[:60].reshape(6, 10, 64)
    token_labels = sae.classify_tokens(raw_tokens, centring_mean=mean)
    assert token_labels.shape == (6, 10)
    assert torch.equal(token_labels.reshape(-1), sae.classify(prepared[:60]))


def test_different_centring_mean_raises(planted, trained):
    raw, mean, _, _ = planted
    sae, _ = trained
    sae.check_centring(mean.clone())  # the same mean passes
    shifted = mean.clone()
    shifted[5] += 0.25
    with pytest.raises(ValueError, match=r"different mean.*max abs diff 0\.25"):
        sae.check_centring(shifted)
    with pytest.raises(ValueError, match="different mean"):
        sae.classify_tokens(raw[:3], centring_mean=shifted)
    with pytest.raises(ValueError, match="d_in=64"):
        sae.check_centring(torch.zeros(63))


def test_wrong_width_raises(trained):
    sae, _ = trained
    with pytest.raises(ValueError, match="expected d_in=64"):
        sae.classify(torch.zeros(2, 32))


def test_save_load_round_trips_bitwise(planted, trained, tmp_path):
    raw, mean, prepared, _ = planted
    sae, report = trained
    sae.save(tmp_path / "sae")
    assert (tmp_path / "sae" / SAE_WEIGHTS_FILE).is_file()
    metadata = json.loads((tmp_path / "sae" / SAE_CONFIG_FILE).read_text())
    assert metadata["config"]["n_latents"] == 8 and metadata["normalised"] is True
    loaded = TopKSAE.load(tmp_path / "sae")
    assert loaded.config == sae.config
    assert loaded.normalised is True
    assert loaded.report == report
    original_state, loaded_state = sae.state_dict(), loaded.state_dict()
    assert original_state.keys() == loaded_state.keys()
    assert "centring_mean" in loaded_state
    for name, tensor in original_state.items():
        assert torch.equal(tensor, loaded_state[name]), name
    with torch.no_grad():
        assert torch.equal(loaded.encode_pre(prepared), sae.encode_pre(prepared))
        assert torch.equal(loaded(prepared), sae(prepared))
    assert torch.equal(loaded.classify_tokens(raw), sae.classify_tokens(raw))
    # The loaded SAE still refuses activations centred differently.
    with pytest.raises(ValueError, match="different mean"):
        loaded.classify_tokens(raw, centring_mean=mean + 1.0)


def test_load_rejects_a_foreign_directory(tmp_path):
    with pytest.raises(ValueError, match="not a saved SAE"):
        TopKSAE.load(tmp_path)


def test_training_is_bitwise_deterministic_per_seed():
    prepared, mean, _, config = small_problem()
    first, first_report = train_sae(prepared, config, centring_mean=mean, normalised=True)
    second, second_report = train_sae(prepared, config, centring_mean=mean, normalised=True)
    for name, tensor in first.state_dict().items():
        assert torch.equal(tensor, second.state_dict()[name]), name
    assert first_report.val_fvu == second_report.val_fvu
    other, _ = train_sae(
        prepared, SAEConfig(**{**config.to_dict(), "seed": 4}), centring_mean=mean, normalised=True
    )
    assert not torch.equal(first.W_dec, other.W_dec)


def test_early_stopping_restores_the_best_state():
    prepared, mean, _, config = small_problem()
    config = SAEConfig(**{**config.to_dict(), "init": "random", "lr": 0.05, "patience": 2})
    sae, report = train_sae(prepared, config, centring_mean=mean, normalised=True)
    assert report.stopped_early
    assert report.epochs_run == report.best_epoch + 1 + config.patience
    assert report.best_val_fvu == min(report.val_fvu) == report.val_fvu[report.best_epoch]
    assert min(report.val_fvu[report.best_epoch + 1 :]) >= report.best_val_fvu
    # A run cut off right after the best epoch follows the same trajectory, so its final
    # state must be exactly the state the full run restored.
    truncated_config = SAEConfig(**{**config.to_dict(), "max_epochs": report.best_epoch + 1})
    truncated, _ = train_sae(prepared, truncated_config, centring_mean=mean, normalised=True)
    for name, tensor in sae.state_dict().items():
        assert torch.equal(tensor, truncated.state_dict()[name]), name


def test_sharded_training_recovers_clusters_and_checks_shards():
    prepared, mean, labels, config = small_problem(seed=2)
    shards = [prepared[:100], prepared[100:170], prepared[170:]]
    sae, report = train_sae(shards, config, centring_mean=mean, normalised=True)
    assert report.n_train + report.n_val == prepared.shape[0]
    assert adjusted_rand_index(labels, sae.classify(prepared)) >= 0.9
    with pytest.raises(ValueError, match=r"shard 1 has shape \(5, 8\)"):
        train_sae([prepared[:10], torch.zeros(5, 8)], config, centring_mean=mean, normalised=True)


def test_random_init_trains():
    prepared, mean, _, config = small_problem()
    config = SAEConfig(**{**config.to_dict(), "init": "random"})
    sae, report = train_sae(prepared, config, centring_mean=mean, normalised=True)
    assert report.val_fvu[report.best_epoch] < report.val_fvu[0] or report.best_epoch == 0
    assert report.best_val_fvu < 0.9


def test_config_validation_and_learning_rate():
    assert SAEConfig(d_in=4, n_latents=2**14).learning_rate == pytest.approx(2e-4)
    assert SAEConfig(d_in=4, n_latents=2**12).learning_rate == pytest.approx(4e-4)
    assert SAEConfig(d_in=4, n_latents=10, lr=1e-3).learning_rate == 1e-3
    with pytest.raises(ValueError, match="k must be"):
        SAEConfig(d_in=4, n_latents=2, k=3)
    with refused("init must be", parameter="init"):
        SAEConfig(d_in=4, n_latents=5, init="pca")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="val_fraction"):
        SAEConfig(d_in=4, n_latents=5, val_fraction=1.0)
