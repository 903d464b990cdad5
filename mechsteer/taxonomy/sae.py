"""A top-k sparse autoencoder on sentence vectors: the paper's taxonomy model.

Choices follow the reference code (method notes, section 4):

* encoder ``pre = (x - b_dec) @ W_enc.T + b_enc`` (a ``Linear(d_in, n_latents)`` with bias);
* top-k (default k=3) on the *raw* pre-activations, no ReLU;
* decoder ``x_hat = codes @ W_dec + b_dec`` with unit-norm rows, renormalised after each
  optimiser step, initialised from the encoder weights (tied at init);
* encoder initialisation (our deliberate deviation): the reference draws random encoder
  rows. On planted clusters that often ends in a local minimum where one latent covers
  two clusters and another cluster is split (ARI 0.73-1.0 over 10 seeds, 8 clusters in
  d=64), so by default (``init="kmeans"``) the encoder rows start at spherical k-means
  centres of the training vectors (about the data mean, on a sample of at most
  ``init_sample`` rows). ``init="random"`` gives unit-norm Gaussian rows as the reference;
* loss: fraction of variance unexplained, ``sum(err^2) / sum((x - batch mean)^2)``;
* Adam with ``lr = 2e-4 / sqrt(n_latents / 2**14)`` unless given, batch 512, up to 300
  epochs, early stopping on a held-out split with patience 10, best state restored;
* the behaviour label of a vector is the argmax of the full pre-activation.

The SAE works on *prepared* vectors: residual activations minus the centring mean used
when the training set was built, then L2-normalised if that set was. It stores that mean
and flag, so :meth:`TopKSAE.classify_tokens` can prepare raw single-token activations the
same way, and :meth:`TopKSAE.check_centring` refuses activations centred differently.

Training is bitwise deterministic on CPU for a given seed: initialisation, the
train/validation split and every shuffle draw from one ``torch.Generator``.
(Bitwise for a fixed torch thread count. For small sets on a busy CPU, one intra-op
thread is far faster: the tests measured ~100x with ``torch.set_num_threads(1)``.)
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F
from torch import nn

from mechsteer.core.artefacts import ArtefactFormat, load_artefact, save_artefact
from mechsteer.core.tensor_types import Float, Int, Tensor, typechecked
from mechsteer.taxonomy.kmeans import SphericalKMeans

SAE_WEIGHTS_FILE = "sae.safetensors"
SAE_CONFIG_FILE = "sae.json"
SAE_FORMAT = "mechsteer.topk_sae"
SAE_FORMAT_VERSION = 1
SAE_ARTEFACT = ArtefactFormat(name=SAE_FORMAT, version=SAE_FORMAT_VERSION, json_file=SAE_CONFIG_FILE,
                              tensors_file=SAE_WEIGHTS_FILE, kind="SAE")
# Centring means are compared like torch.allclose: |a - b| <= atol + rtol * |b|.
CENTRING_ATOL = 1e-6
CENTRING_RTOL = 1e-5
SAEInit = Literal["kmeans", "random"]  # see the module docstring
SAE_INITS: tuple[SAEInit, ...] = get_args(SAEInit)


@dataclass(frozen=True)
class SAEConfig:
    """Architecture and training settings of a :class:`TopKSAE`."""

    d_in: int
    n_latents: int
    k: int = 3
    lr: float | None = None  # None: the reference formula, see `learning_rate`
    batch_size: int = 512
    max_epochs: int = 300
    patience: int = 10
    val_fraction: float = 0.1
    seed: int = 0
    init: SAEInit = "kmeans"
    init_sample: int = 8192

    def __post_init__(self) -> None:
        if self.d_in < 1 or self.n_latents < 1:
            raise ValueError(f"d_in and n_latents must be >= 1, got {self.d_in}, {self.n_latents}")
        if not 1 <= self.k <= self.n_latents:
            raise ValueError(f"k must be in [1, n_latents={self.n_latents}], got {self.k}")
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"lr must be positive or None, got {self.lr}")
        if self.batch_size < 2:
            raise ValueError(f"batch_size must be >= 2 (FVU needs a batch variance), got {self.batch_size}")
        if self.max_epochs < 1 or self.patience < 1:
            raise ValueError(f"max_epochs and patience must be >= 1, got {self.max_epochs}, {self.patience}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.init not in SAE_INITS:
            raise ValueError(f"init must be one of {SAE_INITS}, got {self.init!r}")
        if self.init_sample < 1:
            raise ValueError(f"init_sample must be >= 1, got {self.init_sample}")

    @property
    def learning_rate(self) -> float:
        """The given lr, else the reference's 2e-4 / sqrt(n_latents / 2**14)."""
        if self.lr is not None:
            return self.lr
        return 2e-4 / math.sqrt(self.n_latents / 2**14)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SAEConfig:
        return cls(**data)


@dataclass
class TrainReport:
    """What happened during :func:`train_sae`."""

    learning_rate: float
    n_train: int
    n_val: int
    epochs_run: int
    best_epoch: int
    best_val_fvu: float
    stopped_early: bool
    train_fvu: list[float] = field(default_factory=list)  # per epoch, batch-weighted mean
    val_fvu: list[float] = field(default_factory=list)  # per epoch; train FVU when n_val = 0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainReport:
        return cls(**data)


@typechecked
def fraction_of_variance_unexplained(
    reconstruction: Float[Tensor, "batch d_in"], target: Float[Tensor, "batch d_in"]
) -> Float[Tensor, ""]:
    """sum((target - reconstruction)^2) / sum((target - mean over the batch)^2)."""
    error = (target - reconstruction).pow(2).sum()
    variance = (target - target.mean(dim=0, keepdim=True)).pow(2).sum()
    return error / variance.clamp_min(torch.finfo(variance.dtype).tiny)


class TopKSAE(nn.Module):
    """Top-k SAE; see the module docstring for the exact architecture."""

    def __init__(
        self,
        config: SAEConfig,
        *,
        centring_mean: Float[Tensor, " d_in"] | None = None,
        normalised: bool = False,
    ) -> None:
        super().__init__()
        self.config = config
        self.normalised = normalised
        self.report: TrainReport | None = None
        self.W_enc = nn.Parameter(torch.zeros(config.n_latents, config.d_in))
        self.b_enc = nn.Parameter(torch.zeros(config.n_latents))
        self.W_dec = nn.Parameter(torch.zeros(config.n_latents, config.d_in))
        self.b_dec = nn.Parameter(torch.zeros(config.d_in))
        if centring_mean is None:
            centring_mean = torch.zeros(config.d_in)
        self._check_width(centring_mean, "centring_mean")
        self.centring_mean: Tensor
        self.register_buffer("centring_mean", centring_mean.detach().to(torch.float32).clone())

    def _check_width(self, tensor: Tensor, name: str) -> None:
        if tensor.shape[-1] != self.config.d_in:
            raise ValueError(
                f"{name} has last dimension {tensor.shape[-1]}, expected d_in={self.config.d_in}"
            )

    @torch.no_grad()
    @typechecked
    def initialise(
        self,
        generator: torch.Generator,
        data_mean: Float[Tensor, " d_in"],
        directions: Float[Tensor, "n_latents d_in"] | None = None,
    ) -> None:
        """Encoder rows = ``directions`` (random if None), normalised; decoder = encoder;
        b_enc = 0; b_dec = the data mean."""
        if directions is None:
            directions = torch.randn(self.config.n_latents, self.config.d_in, generator=generator)
        directions = F.normalize(directions.float(), dim=-1).to(self.W_enc)
        self.W_enc.copy_(directions)
        self.W_dec.copy_(directions)
        self.b_enc.zero_()
        self.b_dec.copy_(data_mean.to(self.b_dec))

    @torch.no_grad()
    def normalise_decoder_(self) -> None:
        self.W_dec.copy_(F.normalize(self.W_dec, dim=-1))

    @typechecked
    def encode_pre(self, x: Float[Tensor, "batch d_in"]) -> Float[Tensor, "batch n_latents"]:
        self._check_width(x, "x")
        return (x - self.b_dec) @ self.W_enc.T + self.b_enc

    @typechecked
    def encode(self, x: Float[Tensor, "batch d_in"]) -> Float[Tensor, "batch n_latents"]:
        """Sparse codes: the k largest raw pre-activations kept, the rest zero."""
        pre = self.encode_pre(x)
        values, indices = pre.topk(self.config.k, dim=-1)
        return torch.zeros_like(pre).scatter(-1, indices, values)

    @typechecked
    def decode(self, codes: Float[Tensor, "batch n_latents"]) -> Float[Tensor, "batch d_in"]:
        return codes @ self.W_dec + self.b_dec

    @typechecked
    def forward(self, x: Float[Tensor, "batch d_in"]) -> Float[Tensor, "batch d_in"]:
        """The reconstruction of prepared vectors."""
        return self.decode(self.encode(x))

    def reconstruct(self, x: Tensor) -> Tensor:
        """Same as calling the module; the name the clusterers share."""
        return self(x)

    @torch.no_grad()
    @typechecked
    def classify(self, x: Float[Tensor, "batch d_in"]) -> Int[Tensor, " batch"]:
        """Behaviour label of prepared vectors: argmax of the full pre-activation."""
        return self.encode_pre(x).argmax(dim=-1)

    @typechecked
    def check_centring(self, centring_mean: Float[Tensor, " d_in"]) -> None:
        """Raise ValueError unless ``centring_mean`` matches the one the SAE was trained with."""
        self._check_width(centring_mean, "centring_mean")
        given = centring_mean.detach().to(self.centring_mean)
        if not torch.allclose(given, self.centring_mean, rtol=CENTRING_RTOL, atol=CENTRING_ATOL):
            max_diff = (given - self.centring_mean).abs().max().item()
            raise ValueError(
                "activations were centred with a different mean than this SAE was trained with "
                f"(max abs diff {max_diff:.3g}, tolerance atol={CENTRING_ATOL:g} + "
                f"rtol={CENTRING_RTOL:g}*|mean|); use activations from the same centring or retrain"
            )

    @torch.no_grad()
    @typechecked
    def recentred(self, centring_mean: Float[Tensor, " d_in"]) -> TopKSAE:
        """The same SAE for activations centred with ``centring_mean`` instead of its own mean.

        Without L2 normalisation the change of mean is a translation of the input, taken up by
        ``b_dec`` (encode reads ``x - b_dec``, decode adds it back), so latents and
        reconstructions stay those of the original on every raw activation. With normalisation
        no weights express it: then the means must agree (:meth:`check_centring`).
        """
        self._check_width(centring_mean, "centring_mean")
        given = centring_mean.detach().to(self.centring_mean)
        if torch.allclose(given, self.centring_mean, rtol=CENTRING_RTOL, atol=CENTRING_ATOL):
            return self
        if self.normalised:
            self.check_centring(given)  # raises: a normalised SAE cannot be moved to another mean
        moved = TopKSAE(self.config, centring_mean=given, normalised=False)
        moved.load_state_dict({**self.state_dict(), "centring_mean": given,
                               "b_dec": self.b_dec + self.centring_mean - given})
        return moved

    @torch.no_grad()
    @typechecked
    def prepare(
        self,
        acts: Float[Tensor, "*batch d_in"],
        *,
        centring_mean: Float[Tensor, " d_in"] | None = None,
    ) -> Float[Tensor, "*batch d_in"]:
        """Raw activations -> the space the SAE was trained in: centre, then maybe L2-normalise.

        Pass the ``centring_mean`` recorded with the activations to have it checked.
        """
        self._check_width(acts, "acts")
        if centring_mean is not None:
            self.check_centring(centring_mean)
        prepared = acts.to(self.centring_mean) - self.centring_mean
        if self.normalised:
            prepared = F.normalize(prepared, dim=-1)
        return prepared

    @torch.no_grad()
    @typechecked
    def classify_tokens(
        self,
        acts: Float[Tensor, "*batch d_in"],
        *,
        centring_mean: Float[Tensor, " d_in"] | None = None,
    ) -> Int[Tensor, "*batch"]:
        """Behaviour labels of raw (uncentred) activations, e.g. one token's residual stream."""
        prepared = self.prepare(acts, centring_mean=centring_mean)
        flat = prepared.reshape(-1, self.config.d_in)
        return self.classify(flat).reshape(prepared.shape[:-1])

    @property
    def decoder_directions(self) -> Float[Tensor, "n_latents d_in"]:
        """Unit-norm decoder rows: one direction per behaviour."""
        return self.W_dec.detach().clone()

    @property
    def directions(self) -> Float[Tensor, "n_latents d_in"]:
        return self.decoder_directions

    @property
    def n_clusters(self) -> int:
        return self.config.n_latents

    def save(self, directory: str | Path) -> Path:
        """Write ``sae.safetensors`` (weights and centring mean) and ``sae.json``."""
        metadata = {
            "config": self.config.to_dict(),
            "normalised": self.normalised,
            "report": None if self.report is None else self.report.to_dict(),
        }
        return save_artefact(directory, SAE_ARTEFACT, metadata, dict(self.state_dict()))

    @classmethod
    def load(cls, directory: str | Path, *, device: str | torch.device = "cpu") -> TopKSAE:
        metadata, tensors = load_artefact(directory, SAE_ARTEFACT, device=device)
        sae = cls(
            SAEConfig.from_dict(metadata["config"]),
            centring_mean=tensors["centring_mean"],
            normalised=bool(metadata["normalised"]),
        ).to(device)
        sae.load_state_dict(tensors, strict=True)
        if metadata.get("report") is not None:
            sae.report = TrainReport.from_dict(metadata["report"])
        return sae


def _as_shards(vectors: Tensor | Sequence[Tensor]) -> Sequence[Tensor]:
    shards: Sequence[Tensor] = [vectors] if isinstance(vectors, Tensor) else vectors
    if len(shards) == 0:
        raise ValueError("train_sae needs at least one shard of vectors, got none")
    return shards


def _check_shard(shard: Tensor, index: int, d_in: int) -> None:
    if shard.ndim != 2 or shard.shape[1] != d_in:
        raise ValueError(f"shard {index} has shape {tuple(shard.shape)}, expected (n, d_in={d_in})")
    if not shard.is_floating_point():
        raise ValueError(f"shard {index} has dtype {shard.dtype}, expected a floating dtype")


@torch.no_grad()
def _evaluate_fvu(sae: TopKSAE, vectors: Tensor, chunk_size: int = 4096) -> float:
    """FVU over a whole set (variance about the set's mean), in chunks."""
    mean = vectors.mean(dim=0, keepdim=True)
    error = torch.zeros((), dtype=torch.float64)
    variance = torch.zeros((), dtype=torch.float64)
    for start in range(0, vectors.shape[0], chunk_size):
        chunk = vectors[start : start + chunk_size]
        error += (sae(chunk) - chunk).pow(2).sum().double()
        variance += (chunk - mean).pow(2).sum().double()
    return (error / variance.clamp_min(torch.finfo(torch.float64).tiny)).item()


def _kmeans_directions(
    shards: Sequence[Tensor],
    train_indices: list[Tensor],
    data_mean: Tensor,
    config: SAEConfig,
    generator: torch.Generator,
) -> Tensor:
    """Spherical k-means centres of (a sample of) the training vectors about their mean."""
    n_train = sum(len(indices) for indices in train_indices)
    if n_train < config.n_latents:
        raise ValueError(
            f"k-means initialisation needs >= n_latents={config.n_latents} training vectors, got {n_train}"
        )
    sample = []
    for shard_index, indices in enumerate(train_indices):
        # train_indices are already in random order, so a prefix is a random sample.
        sample_size = max(config.init_sample, config.n_latents)
        take = math.ceil(len(indices) * min(1.0, sample_size / n_train))
        sample.append(shards[shard_index][indices[:take]].detach().cpu().float())
    kmeans_seed = int(torch.randint(2**31 - 1, (1,), generator=generator))
    kmeans = SphericalKMeans(config.n_latents, seed=kmeans_seed).fit(torch.cat(sample) - data_mean)
    return kmeans.directions


@typechecked
def train_sae(
    vectors: Float[Tensor, "n d_in"] | Sequence[Tensor],
    config: SAEConfig,
    *,
    centring_mean: Float[Tensor, " d_in"],
    normalised: bool,
    device: str | torch.device | None = None,
) -> tuple[TopKSAE, TrainReport]:
    """Train a :class:`TopKSAE` on prepared sentence vectors.

    ``vectors`` is one tensor, or a sequence of shards (anything with ``len`` and indexing
    that returns an ``(n_i, d_in)`` tensor, e.g. lazily memory-mapped safetensors shards),
    so the whole set never has to be in memory: batches are drawn within one shard at a
    time, in a shuffled shard order. ``centring_mean`` and ``normalised`` describe how the
    vectors were prepared and are stored with the SAE. A validation split of
    ``val_fraction`` of each shard drives early stopping; the best state is restored.
    """
    started = time.perf_counter()
    shards = _as_shards(vectors)
    if device is None:
        device = shards[0].device
    generator = torch.Generator().manual_seed(config.seed)

    train_indices: list[Tensor] = []
    val_parts: list[Tensor] = []
    train_sum = torch.zeros(config.d_in, dtype=torch.float64)
    for index in range(len(shards)):
        shard = shards[index]
        _check_shard(shard, index, config.d_in)
        order = torch.randperm(shard.shape[0], generator=generator)
        n_val = math.floor(config.val_fraction * shard.shape[0])
        train_indices.append(order[n_val:])
        val_parts.append(shard[order[:n_val]].to(device=device, dtype=torch.float32))
        train_sum += shard[order[n_val:]].double().sum(dim=0).cpu()
    n_train = sum(len(indices) for indices in train_indices)
    validation = torch.cat(val_parts)
    if n_train < 2:
        raise ValueError(f"need at least 2 training vectors, got {n_train}")

    data_mean = (train_sum / n_train).float()
    init_directions = None
    if config.init == "kmeans":
        init_directions = _kmeans_directions(shards, train_indices, data_mean, config, generator)
    sae = TopKSAE(config, centring_mean=centring_mean, normalised=normalised).to(device)
    sae.initialise(generator, data_mean, init_directions)
    optimiser = torch.optim.Adam(sae.parameters(), lr=config.learning_rate)
    report = TrainReport(
        learning_rate=config.learning_rate,
        n_train=n_train,
        n_val=validation.shape[0],
        epochs_run=0,
        best_epoch=-1,
        best_val_fvu=math.inf,
        stopped_early=False,
    )
    best_state = {name: tensor.clone() for name, tensor in sae.state_dict().items()}
    epochs_without_improvement = 0
    for epoch in range(config.max_epochs):
        sae.train()
        weighted_loss, n_seen = 0.0, 0
        for shard_index in torch.randperm(len(shards), generator=generator).tolist():
            shard_train = train_indices[shard_index]
            order = shard_train[torch.randperm(len(shard_train), generator=generator)]
            shard = shards[shard_index]
            for start in range(0, len(order), config.batch_size):
                batch_rows = order[start : start + config.batch_size]
                if len(batch_rows) < 2:
                    continue  # a batch of one has no variance, so no FVU
                batch = shard[batch_rows].to(device=device, dtype=torch.float32)
                loss = fraction_of_variance_unexplained(sae(batch), batch)
                optimiser.zero_grad(set_to_none=True)
                loss.backward()
                optimiser.step()
                sae.normalise_decoder_()
                weighted_loss += loss.item() * len(batch_rows)
                n_seen += len(batch_rows)
        sae.eval()
        train_fvu = weighted_loss / max(n_seen, 1)
        val_fvu = _evaluate_fvu(sae, validation) if validation.shape[0] >= 2 else train_fvu
        report.train_fvu.append(train_fvu)
        report.val_fvu.append(val_fvu)
        report.epochs_run = epoch + 1
        if val_fvu < report.best_val_fvu:
            report.best_val_fvu, report.best_epoch = val_fvu, epoch
            best_state = {name: tensor.clone() for name, tensor in sae.state_dict().items()}
            epochs_without_improvement = 0
        else:
            epochs_without_improvement += 1
            if epochs_without_improvement >= config.patience:
                report.stopped_early = True
                break
    sae.load_state_dict(best_state)
    report.seconds = time.perf_counter() - started
    sae.report = report
    return sae, report


__all__ = [
    "SAEConfig",
    "SAEInit",
    "TopKSAE",
    "TrainReport",
    "fraction_of_variance_unexplained",
    "train_sae",
]
