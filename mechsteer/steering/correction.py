"""Correction vectors (the paper's current method): one vector per behaviour, trained jointly with a
coefficient MLP to move the base model's next-token distribution towards the thinking model's at
exactly the disagreement positions (:mod:`mechsteer.steering.disagreements`).

At each position ``i`` labelled behaviour ``c``, ``alpha(h_i, c) * v_c`` is added to the base
model's ``resid_post`` of the steering layer (``h_i`` there, unsteered, is what the MLP reads;
``alpha = 1`` with ``coefficient="none"``); nowhere else is anything added. The loss is the top-K
truncated KL(thinking || steered base) over the cached K tokens, both distributions renormalised
within them (the reference's ``kl_mode=topk``), averaged over positions. Behaviours without
positions get no vector; there is no bias vector.

Training follows the reference's settings (its ``train_vectors.sh`` and the defaults of
``optimize_correction_vectors.py``): AdamW with lr 1e-2 for the vectors and 1e-3 for the MLP,
weight decay 0.01, MLP gradients clipped to norm 1, batches of 4 traces (length-bucketed,
bucket order shuffled per epoch), at most 64 positions per (trace, behaviour), up to 10 epochs
with patience 5 on a held-out tenth of the training traces, MLP width 128; vectors start random
at the layer's mean activation norm; seeds 42, 43 and 44, the set (vectors and MLP at their best
epoch) with the lowest held-out loss kept. The held-out traces are part of the training traces,
never evaluation problems.
"""

from __future__ import annotations

import dataclasses
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

import torch

from mechsteer.core.errors import ArtefactError, ConfigError
from mechsteer.core.models import resid_hook_name
from mechsteer.core.provenance import weights_fingerprint
from mechsteer.core.store import read_json, write_json_atomic
from mechsteer.core.tensor_types import Float, Int, Tensor
from mechsteer.steering.coefficient_mlp import CoefficientArchitecture, CoefficientMLP
from mechsteer.steering.direction_set import SITE, DirectionSet, direction_provenance
from mechsteer.steering.disagreements import DisagreementCache, DisagreementProvenance

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

CORRECTION_METHOD = "correction"  # the method a trained set names
REPORT_FILE = "correction.json"
# "mlp": the coefficient MLP is trained with the vectors; "none": the vectors alone, coefficient 1.
CoefficientMode = Literal["mlp", "none"]
VectorInit = Literal["zero", "mean_norm"]


@dataclass(frozen=True)
class CorrectionConfig:
    """Joint training settings (module docstring: where each default comes from)."""

    seeds: tuple[int, ...] = (42, 43, 44)
    epochs: int = 10
    patience: int = 5
    batch_size: int = 4
    lr: float = 1e-2
    mlp_lr: float = 1e-3
    weight_decay: float = 0.01
    mlp_grad_clip: float = 1.0
    coefficient: CoefficientMode = "mlp"
    # "zero": vectors start at zero (the reference's train_vectors.sh); "mean_norm": random directions at
    # the layer's mean activation norm (its older optimize_correction_vectors.py)
    init: VectorInit = "zero"
    mlp_architecture: CoefficientArchitecture = "shared"
    mlp_hidden: int = 128
    max_positions_per_trace: int = 64  # per (trace, behaviour); 0: no cap
    val_fraction: float = 0.1
    split_seed: int = 0  # the held-out traces, the same for every seed

    def __post_init__(self) -> None:
        if not self.seeds or self.epochs < 1 or self.patience < 1 or self.batch_size < 1 or self.mlp_hidden < 1:
            raise ConfigError(f"correction training needs seeds, and epochs, patience, batch_size, mlp_hidden >= 1; "
                              f"got {self}")
        if self.init not in get_args(VectorInit):
            raise ConfigError(f"init must be one of {get_args(VectorInit)}; got {self.init!r}")
        if self.coefficient not in get_args(CoefficientMode):
            raise ConfigError(f"coefficient must be one of {get_args(CoefficientMode)}; got {self.coefficient!r}")
        if not 0 < self.val_fraction < 1:
            raise ConfigError(f"val_fraction must be in (0, 1); got {self.val_fraction}")


@dataclass
class SeedReport:
    seed: int
    initial_val_kl: float
    best_val_kl: float
    best_epoch: int
    epochs_run: int
    train_kl: list[float] = field(default_factory=list)
    val_kl: list[float] = field(default_factory=list)


@dataclass
class CorrectionReport:
    chosen_seed: int
    unsteered_val_kl: float  # the base model's held-out loss with nothing added
    best_val_kl: float
    n_train_traces: int
    n_val_traces: int
    n_train_positions: int
    n_val_positions: int
    init_norm: float
    seeds: list[SeedReport]
    seconds: float = 0.0
    # each behaviour's mean MLP coefficient over the cache's positions (str ids, as JSON keys): the scale of
    # what the learned rule adds, which the oracle ceiling's grid multiplies
    mean_coefficients: dict[str, float] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# The steered forward and its loss


@dataclass(frozen=True)
class PositionBatch:
    """A batch of traces and the cached positions in it."""

    tokens: Int[Tensor, "batch pos"]
    row: Int[Tensor, " n"]  # which trace of the batch
    position: Int[Tensor, " n"]
    behaviour: Int[Tensor, " n"]  # behaviour ids
    slot: Int[Tensor, " n"]  # the behaviour's row in the vector matrix
    top_k_ids: Int[Tensor, "n k"]
    top_k_logprobs: Float[Tensor, "n k"]


def position_batch(cache: DisagreementCache, traces: Sequence[int], rows: Int[Tensor, " m"], slot_of: dict[int, int],
                   pad_id: int) -> PositionBatch:
    """The traces ``traces`` right-padded, with the cache ``rows`` (positions) that lie in them; each
    trace cut after its last such position (causal: the tokens after it change nothing there)."""
    batch_row = {trace: index for index, trace in enumerate(traces)}
    last = {trace: 0 for trace in traces}
    for trace, position in zip(cache.trace_index[rows].tolist(), cache.position[rows].tolist(), strict=True):
        last[trace] = max(last[trace], position + 1)
    token_rows = [cache.token_ids[t][: max(last[t], 1)] for t in traces]
    tokens = torch.full((len(traces), max(len(r) for r in token_rows)), pad_id, dtype=torch.long)
    for index, ids in enumerate(token_rows):
        tokens[index, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    behaviour = cache.behaviour[rows]
    return PositionBatch(
        tokens=tokens, row=torch.tensor([batch_row[int(t)] for t in cache.trace_index[rows].tolist()], dtype=torch.long),
        position=cache.position[rows], behaviour=behaviour,
        slot=torch.tensor([slot_of[int(b)] for b in behaviour.tolist()], dtype=torch.long),
        top_k_ids=cache.top_k_ids[rows], top_k_logprobs=cache.top_k_logprobs[rows])


def position_logits(model: TransformerBridge, layer: int, batch: PositionBatch,
                    vectors: Float[Tensor, "n_vectors d_model"] | None, mlp: CoefficientMLP | None
                    ) -> Float[Tensor, "n vocab"]:
    """The base model's logits at the batch's positions, with ``alpha * vectors[slot]`` added at
    ``resid_post`` of ``layer`` at exactly those positions (nothing with ``vectors`` None; alpha
    from ``mlp`` on the unsteered residual there, else 1)."""
    device = next(model.parameters()).device
    row, position = batch.row.to(device), batch.position.to(device)

    def shift(resid: Tensor, hook: object) -> Tensor:
        assert vectors is not None
        added = vectors[batch.slot.to(device)]
        if mlp is not None:
            added = mlp(resid[row, position], batch.behaviour.to(device))[:, None] * added
        update = torch.zeros_like(resid).index_put((row, position), added.to(resid.dtype))
        return resid + update

    hooks = [] if vectors is None else [(resid_hook_name(layer, SITE), shift)]
    with model.hooks(fwd_hooks=hooks):
        logits = model(batch.tokens.to(device))
    return logits[row, position].float()


def truncated_kl(logits: Float[Tensor, "n vocab"], top_k_ids: Int[Tensor, "n k"],
                 top_k_logprobs: Float[Tensor, "n k"]) -> Float[Tensor, " n"]:
    """KL(thinking || base) over the thinking model's top-K tokens, both renormalised within them."""
    target = torch.log_softmax(top_k_logprobs.to(logits.device).float(), dim=-1)
    steered = torch.log_softmax(logits.gather(-1, top_k_ids.to(logits.device)), dim=-1)
    return (target.exp() * (target - steered)).sum(-1)


# --------------------------------------------------------------------------------------------
# Training


def split_traces(cache: DisagreementCache, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """The traces with positions, split into training and held-out ones (at least one each)."""
    with_positions = sorted(set(cache.trace_index.tolist()))
    if len(with_positions) < 2:
        raise ConfigError(f"correction vectors need disagreement positions in at least 2 traces (training and "
                          f"held-out); the cache has them in {len(with_positions)}")
    order = list(with_positions)
    random.Random(seed).shuffle(order)
    n_val = min(max(1, round(len(order) * val_fraction)), len(order) - 1)
    return sorted(order[n_val:]), sorted(order[:n_val])


def capped_rows(cache: DisagreementCache, traces: Sequence[int], cap: int, seed: int) -> dict[int, Tensor]:
    """Per trace, its rows, at most ``cap`` per behaviour (a fixed sample per seed, trace and behaviour)."""
    chosen: dict[int, Tensor] = {}
    for trace in traces:
        rows = cache.rows_of_traces([trace])
        if cap > 0:
            kept = []
            for behaviour in sorted(set(cache.behaviour[rows].tolist())):
                of_behaviour = rows[cache.behaviour[rows] == behaviour].tolist()
                if len(of_behaviour) > cap:
                    of_behaviour = sorted(random.Random(f"{seed}-{trace}-{behaviour}").sample(of_behaviour, cap))
                kept.extend(of_behaviour)
            rows = torch.tensor(sorted(kept), dtype=torch.long)
        chosen[trace] = rows
    return chosen


def _batches(cache: DisagreementCache, traces: Sequence[int], size: int) -> list[list[int]]:
    by_length = sorted(traces, key=lambda t: (len(cache.token_ids[t]), t))
    return [by_length[i : i + size] for i in range(0, len(by_length), size)]


def mean_coefficients(cache: DisagreementCache, mlp: CoefficientMLP) -> dict[str, float]:
    """Each behaviour's mean MLP coefficient over the cache's positions (read from their cached residuals)."""
    device = next(mlp.parameters()).device
    with torch.no_grad():
        alpha = torch.cat([mlp(cache.resid[rows].to(device), cache.behaviour[rows].to(device)).cpu()
                           for rows in torch.arange(cache.n_positions).split(4096)])
    return {str(b): float(alpha[cache.behaviour == b].mean()) for b in sorted(cache.positions_per_behaviour())}


def held_out_kl(model: TransformerBridge, cache: DisagreementCache, batches: Sequence[Sequence[int]],
                slot_of: dict[int, int], layer: int, vectors: Tensor | None, mlp: CoefficientMLP | None) -> float:
    """Mean truncated KL over every position of the traces in ``batches`` (no cap, no gradient)."""
    total, count = 0.0, 0
    pad = model.tokenizer.pad_token_id or 0
    with torch.no_grad():
        for traces in batches:
            batch = position_batch(cache, traces, cache.rows_of_traces(traces), slot_of, pad)
            kl = truncated_kl(position_logits(model, layer, batch, vectors, mlp), batch.top_k_ids, batch.top_k_logprobs)
            total, count = total + float(kl.sum()), count + int(kl.numel())
    return total / max(count, 1)


def _train_seed(model: TransformerBridge, cache: DisagreementCache, config: CorrectionConfig, seed: int,
                train: Sequence[int], val_batches: Sequence[Sequence[int]], behaviours: list[int],
                init_norm: float, say: Callable[[str], None]
                ) -> tuple[Tensor, CoefficientMLP | None, SeedReport]:
    device = next(model.parameters()).device
    layer = cache.provenance.layer
    slot_of = {b: i for i, b in enumerate(behaviours)}
    pad = model.tokenizer.pad_token_id or 0
    generator = torch.Generator().manual_seed(seed)
    init = torch.randn(len(behaviours), cache.d_model, generator=generator)  # drawn either way: same stream
    start = init / init.norm(dim=-1, keepdim=True) * init_norm if config.init == "mean_norm" else torch.zeros_like(init)
    vectors = start.to(device).requires_grad_(True)
    mlp = None
    groups: list[dict[str, Any]] = [{"params": [vectors], "lr": config.lr}]
    if config.coefficient == "mlp":
        mlp = CoefficientMLP(cache.d_model, behaviours, config.mlp_hidden, config.mlp_architecture, seed=seed).to(device)
        groups.append({"params": list(mlp.parameters()), "lr": config.mlp_lr})
    optimizer = torch.optim.AdamW(groups, weight_decay=config.weight_decay)
    rows_of = capped_rows(cache, train, config.max_positions_per_trace, seed)
    batches = _batches(cache, train, config.batch_size)
    shuffler = random.Random(seed)

    def snapshot() -> tuple[Tensor, dict[str, Tensor] | None]:
        return vectors.detach().cpu().clone(), (None if mlp is None else
                                                {k: v.detach().cpu().clone() for k, v in mlp.state_dict().items()})

    initial = held_out_kl(model, cache, val_batches, slot_of, layer, vectors.detach(), mlp)
    report = SeedReport(seed, initial, initial, 0, 0, val_kl=[initial])
    best = snapshot()
    without_gain = 0
    for epoch in range(1, config.epochs + 1):
        order = list(batches)
        shuffler.shuffle(order)
        total, count = 0.0, 0
        for traces in order:
            rows = torch.cat([rows_of[t] for t in traces])
            batch = position_batch(cache, traces, rows, slot_of, pad)
            kl = truncated_kl(position_logits(model, layer, batch, vectors, mlp), batch.top_k_ids, batch.top_k_logprobs)
            optimizer.zero_grad(set_to_none=True)
            kl.mean().backward()
            if mlp is not None and config.mlp_grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(mlp.parameters(), config.mlp_grad_clip)
            optimizer.step()
            total, count = total + float(kl.detach().sum()), count + int(kl.numel())
        report.train_kl.append(total / max(count, 1))
        current = held_out_kl(model, cache, val_batches, slot_of, layer, vectors.detach(), mlp)
        report.val_kl.append(current)
        report.epochs_run = epoch
        say(f"    seed {seed} epoch {epoch}: train KL {report.train_kl[-1]:.4f}, held-out KL {current:.4f}")
        if current < report.best_val_kl:
            report.best_val_kl, report.best_epoch, best = current, epoch, snapshot()
            without_gain = 0
        else:
            without_gain += 1
            if without_gain >= config.patience:
                break
    best_vectors, best_state = best
    best_mlp = None
    if mlp is not None and best_state is not None:
        best_mlp = CoefficientMLP(cache.d_model, behaviours, config.mlp_hidden, config.mlp_architecture)
        best_mlp.load_state_dict(best_state)
    return best_vectors, best_mlp, report


@dataclass
class CorrectionVectors:
    """A trained set (method ``correction``, no bias) and, unless trained without one, its coefficient MLP.

    Saved in one folder: the set's ``directions.*``, the MLP's ``coefficient_mlp.*`` and
    ``correction.json`` (the training report); both artefacts record the disagreement cache's provenance."""

    directions: DirectionSet
    mlp: CoefficientMLP | None
    report: CorrectionReport

    @property
    def provenance(self) -> DisagreementProvenance:
        return DisagreementProvenance(**self.directions.provenance["disagreements"])

    def at_learned_scale(self) -> DirectionSet:
        """The set with each vector multiplied by its mean learned coefficient (the vectors themselves
        when trained without the MLP): what the learned rule adds at a typical position."""
        if self.mlp is None:
            return self.directions
        scale = self.report.mean_coefficients
        missing = [b for b in self.directions.behaviour_ids if str(b) not in scale]
        if missing:
            raise ArtefactError(f"the correction vectors' report has no mean coefficient of behaviours {missing} "
                                "(trained before it was recorded); train the correction vectors again")
        factors = torch.tensor([scale[str(b)] for b in self.directions.behaviour_ids], dtype=self.directions.directions.dtype)
        return dataclasses.replace(self.directions, directions=self.directions.directions * factors[:, None])

    def save(self, directory: str | Path) -> Path:
        folder = Path(directory)
        self.directions.save(folder)
        if self.mlp is not None:
            self.mlp.save(folder)
        write_json_atomic(folder / REPORT_FILE, {"coefficient": "mlp" if self.mlp is not None else "none",
                                                 "report": dataclasses.asdict(self.report)})
        return folder

    @classmethod
    def load(cls, directory: str | Path, expected: DisagreementProvenance | None = None) -> CorrectionVectors:
        """The saved set and MLP; with ``expected``, made from exactly that cache's inputs (else ProvenanceError)."""
        folder = Path(directory)
        directions = DirectionSet.load(folder)
        if directions.method != CORRECTION_METHOD or "disagreements" not in directions.provenance:
            raise ArtefactError(f"{folder} holds {directions.method!r} directions, not trained correction vectors")
        document = read_json(folder / REPORT_FILE, "correction vectors' training report")
        mlp = CoefficientMLP.load(folder) if document.get("coefficient") == "mlp" else None
        report = document["report"]
        loaded = cls(directions, mlp, CorrectionReport(**{**report, "seeds": [SeedReport(**s) for s in report["seeds"]]}))
        if expected is not None:
            loaded.provenance.check_against(expected, folder / "directions.json",
                                            "train the correction vectors again on this disagreement cache")
        if mlp is not None and mlp.behaviour_ids != directions.behaviour_ids:
            raise ArtefactError(f"{folder}: the coefficient MLP's behaviours {mlp.behaviour_ids} are not the set's "
                                f"{directions.behaviour_ids}; train the correction vectors again")
        return loaded


def train_correction_vectors(
    model: TransformerBridge,
    cache: DisagreementCache,
    titles: dict[int, str],
    config: CorrectionConfig = CorrectionConfig(),
    *,
    progress: Callable[[str], None] | None = None,
) -> CorrectionVectors:
    """Train the vectors (and MLP) of every behaviour with positions in ``cache`` (module docstring).

    ``model`` must be the cache's base model (checked by name and weights); ``titles`` names each behaviour.
    Model weights are frozen for the call (flags restored) and must end with no gradient.
    """
    say = progress or (lambda message: None)
    started = time.perf_counter()
    recorded = cache.provenance
    if model.cfg.model_name != recorded.base_model or weights_fingerprint(model) != recorded.base_weights:
        raise ConfigError(f"the disagreement cache was collected with base model {recorded.base_model!r} "
                          f"(weights {recorded.base_weights}); train with that model, not {model.cfg.model_name!r}")
    behaviours = sorted(cache.positions_per_behaviour())
    missing = [b for b in behaviours if b not in titles]
    if missing:
        raise ConfigError(f"no title for behaviours {missing}; pass every behaviour's title")
    train, val = split_traces(cache, config.val_fraction, config.split_seed)
    val_batches = _batches(cache, val, config.batch_size)
    slot_of = {b: i for i, b in enumerate(behaviours)}
    init_norm = cache.mean_resid_norm
    frozen = [(parameter, parameter.requires_grad) for parameter in model.parameters()]
    for parameter, _ in frozen:
        parameter.requires_grad_(False)
    try:
        unsteered = held_out_kl(model, cache, val_batches, slot_of, recorded.layer, None, None)
        say(f"  correction vectors for behaviours {behaviours}: {len(train)} training traces, {len(val)} held out "
            f"(unsteered held-out KL {unsteered:.4f})")
        results = [_train_seed(model, cache, config, seed, train, val_batches, behaviours, init_norm, say)
                   for seed in config.seeds]
    finally:
        for parameter, flag in frozen:
            parameter.requires_grad_(flag)
    with_grad = [name for name, parameter in model.named_parameters() if parameter.grad is not None]
    if with_grad:
        raise RuntimeError(f"model parameters received gradients while training correction vectors: {with_grad[:5]}")
    vectors, mlp, chosen = min(results, key=lambda result: result[2].best_val_kl)
    if mlp is not None:
        mlp.eval()
    report = CorrectionReport(
        chosen_seed=chosen.seed, unsteered_val_kl=unsteered, best_val_kl=chosen.best_val_kl,
        n_train_traces=len(train), n_val_traces=len(val),
        n_train_positions=int(cache.rows_of_traces(train).numel()), n_val_positions=int(cache.rows_of_traces(val).numel()),
        init_norm=init_norm, seeds=[result[2] for result in results], seconds=time.perf_counter() - started,
        mean_coefficients={} if mlp is None else mean_coefficients(cache, mlp))
    provenance = direction_provenance(model, CORRECTION_METHOD, disagreements=dataclasses.asdict(recorded),
                                      config=dataclasses.asdict(config), chosen_seed=chosen.seed,
                                      best_val_kl=chosen.best_val_kl, unsteered_val_kl=unsteered,
                                      positions_per_behaviour=cache.positions_per_behaviour(),
                                      coefficient=config.coefficient)
    directions = DirectionSet(
        model_name=model.cfg.model_name, d_model=model.cfg.d_model, n_layers=model.cfg.n_layers, layer=recorded.layer,
        site=SITE, method=CORRECTION_METHOD, behaviour_ids=behaviours, titles=[titles[b] for b in behaviours],
        directions=vectors, bias=None, provenance=provenance)
    if mlp is not None:
        mlp.provenance = {"disagreements": dataclasses.asdict(recorded), "chosen_seed": chosen.seed}
    return CorrectionVectors(directions, mlp, report)


__all__ = [
    "CORRECTION_METHOD", "CoefficientMode", "CorrectionConfig", "CorrectionReport", "CorrectionVectors",
    "PositionBatch", "SeedReport", "capped_rows", "held_out_kl", "mean_coefficients", "position_batch", "position_logits", "split_traces",
    "train_correction_vectors", "truncated_kl",
]
