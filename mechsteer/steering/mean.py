"""Difference-of-means steering directions in the base model, and the sentence pooling they share.

The base model is run over the THINKING model's traces (under the base framing:
:mod:`mechsteer.steering.framing`) and each kept sentence is pooled at layer L (as
:mod:`mechsteer.activations` does: the mean of ``resid_post`` over the sentence's tokens,
including the one before it, by default). The direction of behaviour b is the mean over the
sentences labelled b minus the mean over all kept sentences (labelled or not). The bias is the
mean over the thinking traces' sentences minus the mean over the base model's own traces'
sentences, both in the base model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, get_args

import torch

from mechsteer.activations import SentenceRecord, pool_batch, trace_sentences
from mechsteer.core.tensor_types import Float, Int, Tensor, typechecked
from mechsteer.data.labels import TraceLabeller
from mechsteer.data.traces import TraceRecord
from mechsteer.steering.direction_set import SITE, DirectionSet, Site, direction_provenance
from mechsteer.steering.labels import (
    SentenceLabeller,
    labelled_counts,
    require_labelled,
    sentence_labels,
)

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

# "sentence": mean over the sentence's tokens and the one before it; "boundary": the token before it.
Pooling = Literal["sentence", "boundary"]
POOLINGS: tuple[str, ...] = get_args(Pooling)


# --------------------------------------------------------------------------------------------
# Pooling


@dataclass
class PooledSentences:
    vectors: Float[Tensor, "n d_model"]
    sentences: list[SentenceRecord]
    layer: int
    pooling: Pooling


def pool_sentences(
    model: TransformerBridge,
    traces: Sequence[TraceRecord],
    layer: int,
    *,
    site: Site = SITE,
    pooling: Pooling = "sentence",
    labeller: TraceLabeller | None = None,
    min_words: int = 3,
    batch_size: int = 8,
) -> PooledSentences:
    """Each kept sentence of ``traces`` pooled at ``layer`` of ``model``.

    ``pooling="sentence"``: mean over the sentence's tokens and the one before it (the
    activations stage's default); ``"boundary"``: the token before the sentence only, where
    the model decides how the sentence starts.
    """
    return pool_sentences_at(model, traces, [layer], site=site, pooling=pooling, labeller=labeller,
                             min_words=min_words, batch_size=batch_size)[layer]


def pool_sentences_at(
    model: TransformerBridge,
    traces: Sequence[TraceRecord],
    layers: Sequence[int],
    *,
    site: Site = SITE,
    pooling: Pooling = "sentence",
    labeller: TraceLabeller | None = None,
    min_words: int = 3,
    batch_size: int = 8,
) -> dict[int, PooledSentences]:
    """:func:`pool_sentences` at several layers in one pass over the traces."""
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}; got {pooling!r}")
    for layer in layers:
        if not 0 <= layer < model.cfg.n_layers:
            raise ValueError(f"layer must be in [0, {model.cfg.n_layers - 1}]; got {layer}")
    vectors: dict[int, list[Tensor]] = {layer: [] for layer in layers}
    sentences: list[SentenceRecord] = []
    for batch_start in range(0, len(traces), batch_size):
        batch_ids, spans = [], []
        for row, record in enumerate(traces[batch_start : batch_start + batch_size]):
            ids, records = trace_sentences(record, batch_start + row, model.tokenizer,
                                           min_words=min_words, labeller=labeller)
            batch_ids.append(ids)
            for sentence in records:
                start = max(sentence.tok_start - 1, 0)
                end = sentence.tok_end if pooling == "sentence" else max(sentence.tok_start, 1)
                spans.append((row, start, end))
                sentences.append(sentence)
        if spans:
            pooled = pool_batch(model, batch_ids, spans, list(layers), site)
            for layer in layers:
                vectors[layer].append(pooled[layer])
    if not sentences:
        raise ValueError("the traces have no kept sentences to pool")
    return {layer: PooledSentences(torch.cat(vectors[layer]), sentences, layer, pooling) for layer in layers}


# --------------------------------------------------------------------------------------------
# Difference of means


@typechecked
def difference_of_means(
    vectors: Float[Tensor, "n d_model"], labels: Int[Tensor, " n"], behaviour_ids: Sequence[int]
) -> Float[Tensor, "n_behaviours d_model"]:
    """Mean of the vectors labelled b minus the mean of all vectors, for each b in ``behaviour_ids``."""
    overall = vectors.double().mean(dim=0)
    rows = []
    for behaviour in behaviour_ids:
        chosen = labels == int(behaviour)
        if not bool(chosen.any()):
            raise ValueError(f"behaviour {behaviour} has no labelled sentences; cannot take its mean")
        rows.append(vectors[chosen].double().mean(dim=0) - overall)
    return torch.stack(rows).float()


@typechecked
def mean_bias(
    thinking_vectors: Float[Tensor, "n_thinking d_model"], base_vectors: Float[Tensor, "n_base d_model"]
) -> Float[Tensor, " d_model"]:
    """Mean over the thinking traces' sentences minus the mean over the base traces' sentences."""
    return (thinking_vectors.double().mean(dim=0) - base_vectors.double().mean(dim=0)).float()


@typechecked
def mean_centred_norm(vectors: Float[Tensor, "n d_model"]) -> float:
    """Mean L2 norm of the vectors after subtracting their mean (the scale of SAE directions)."""
    centred = vectors.double() - vectors.double().mean(dim=0)
    return float(centred.norm(dim=-1).mean())


def _present_behaviours(labels: Tensor, behaviour_ids: Sequence[int], titles: Sequence[str], skip_empty: bool
                        ) -> tuple[list[int], list[str], list[int]]:
    """The behaviours with labelled sentences (all of them, unless ``skip_empty``), and those left out."""
    present = set(labels.tolist())
    skipped = [int(b) for b in behaviour_ids if int(b) not in present]
    if not skip_empty:
        return list(behaviour_ids), list(titles), []
    kept = [(int(b), t) for b, t in zip(behaviour_ids, titles, strict=True) if int(b) in present]
    if not kept:
        raise ValueError("no behaviour has labelled sentences")
    return [b for b, _ in kept], [t for _, t in kept], skipped


def build_mean_directions(
    base_model: TransformerBridge,
    thinking_traces: Sequence[TraceRecord],
    labeller: SentenceLabeller,
    behaviour_ids: Sequence[int],
    titles: Sequence[str],
    layer: int,
    *,
    base_traces: Sequence[TraceRecord] | None = None,
    pooling: Pooling = "sentence",
    text_labeller: TraceLabeller | None = None,
    batch_size: int = 8,
    skip_empty: bool = False,
) -> DirectionSet:
    """Difference-of-means directions in the base model (see the module docstring).

    ``thinking_traces`` and ``base_traces`` must already be under the base framing
    (:func:`~mechsteer.steering.framing.frame_for_base`). ``text_labeller`` attaches ground-truth labels while pooling
    (for :func:`~mechsteer.steering.labels.ground_truth_labeller`). Without ``base_traces`` the bias is None. A
    behaviour without labelled sentences raises, unless ``skip_empty`` leaves it out (it is
    then listed in ``provenance["skipped_behaviours"]``).
    """
    return mean_directions_at(base_model, thinking_traces, labeller, behaviour_ids, titles, [layer],
                              base_traces=base_traces, pooling=pooling, text_labeller=text_labeller,
                              batch_size=batch_size, skip_empty=skip_empty)[layer]


def mean_directions_at(
    base_model: TransformerBridge,
    thinking_traces: Sequence[TraceRecord],
    labeller: SentenceLabeller,
    behaviour_ids: Sequence[int],
    titles: Sequence[str],
    layers: Sequence[int],
    *,
    base_traces: Sequence[TraceRecord] | None = None,
    pooling: Pooling = "sentence",
    text_labeller: TraceLabeller | None = None,
    batch_size: int = 8,
    skip_empty: bool = False,
) -> dict[int, DirectionSet]:
    """:func:`build_mean_directions` at several layers, from one pass over the traces."""
    if not skip_empty:  # checked before the forward passes
        require_labelled(labelled_counts(thinking_traces, base_model.tokenizer, labeller, behaviour_ids,
                                         text_labeller=text_labeller), titles, 1, "difference-of-means directions")
    at_layers = pool_sentences_at(base_model, thinking_traces, layers, pooling=pooling, labeller=text_labeller,
                                  batch_size=batch_size)
    base_at = (pool_sentences_at(base_model, base_traces, layers, pooling=pooling, batch_size=batch_size)
               if base_traces else None)
    return {layer: _mean_set(base_model, at_layers[layer], None if base_at is None else base_at[layer], labeller,
                             behaviour_ids, titles, layer, len(thinking_traces), skip_empty)
            for layer in layers}


def _mean_set(base_model: TransformerBridge, pooled: PooledSentences, base_pooled: PooledSentences | None,
              labeller: SentenceLabeller, behaviour_ids: Sequence[int], titles: Sequence[str], layer: int,
              n_traces: int, skip_empty: bool) -> DirectionSet:
    pooling = pooled.pooling
    labels = sentence_labels(pooled.sentences, labeller)
    behaviour_ids, titles, skipped = _present_behaviours(labels, behaviour_ids, titles, skip_empty)
    directions = difference_of_means(pooled.vectors, labels, behaviour_ids)
    bias = None
    n_base = 0
    if base_pooled is not None:
        bias = mean_bias(pooled.vectors, base_pooled.vectors)
        n_base = len(base_pooled.sentences)
    counts = {int(b): int((labels == int(b)).sum()) for b in behaviour_ids}
    return DirectionSet(
        model_name=base_model.cfg.model_name, d_model=base_model.cfg.d_model, n_layers=base_model.cfg.n_layers,
        layer=layer, site=SITE, method="mean", behaviour_ids=list(behaviour_ids), titles=list(titles),
        directions=directions, bias=bias,
        provenance=direction_provenance(
            base_model, "mean", pooling=pooling, n_thinking_traces=n_traces,
            n_sentences=len(pooled.sentences), sentences_per_behaviour=counts,
            n_base_sentences=n_base, mean_centred_norm=mean_centred_norm(pooled.vectors),
            skipped_behaviours=skipped,
            bias="mean(thinking traces) - mean(base traces)" if bias is not None else None),
    )


def default_layer(n_layers: int) -> int:
    """The paper's choice, about 37.5% of the depth (10 of 28, 12 of 32)."""
    return max(0, min(n_layers - 1, math.floor(0.375 * n_layers)))


__all__ = [
    "POOLINGS", "Pooling", "PooledSentences", "build_mean_directions", "default_layer", "difference_of_means",
    "mean_bias", "mean_centred_norm", "pool_sentences",
]
