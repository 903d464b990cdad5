"""SAE-decoded steering directions: the taxonomy SAE's decoder rows, mapped into the base model.

The SAE is trained on the thinking model's sentence vectors; a behaviour's direction is its
decoder row, mapped into the base model's space. Mapping: ``identity`` when the two models
share d_model and a residual basis (a thinking model post-trained from the base keeps the
base's initialisation, so the bases agree to first order; the organisms are such a pair),
otherwise a least-squares linear map fitted on paired activations (the same sentences of the
same text through both models, pooled alike; see :func:`fit_linear_map`).

Scale: decoder rows are unit vectors in the SAE's prepared space (centred, usually
L2-normalised), which has no natural magnitude in the residual stream, so each mapped row is
normalised and rescaled to the mean norm of the base model's *centred* pooled sentence
activations at L (:func:`~mechsteer.steering.mean.mean_centred_norm`). Steering coefficients
are then in units of "one typical sentence deviation". The bias of an SAE set is the
difference-of-means bias when base traces are given, else None.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal, get_args

import torch

from mechsteer.core.tensor_types import Float, Tensor, typechecked
from mechsteer.data.traces import TraceRecord
from mechsteer.steering.direction_set import SITE, DirectionSet, direction_provenance
from mechsteer.steering.mean import Pooling, mean_bias, mean_centred_norm, pool_sentences
from mechsteer.taxonomy.sae import TopKSAE

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

# "auto": identity when the two models' d_model match, else linear.
LinearMapping = Literal["auto", "identity", "linear"]
MAPPINGS: tuple[str, ...] = get_args(LinearMapping)


@typechecked
def fit_linear_map(
    source: Float[Tensor, "n d_source"], target: Float[Tensor, "n d_target"], ridge: float = 0.0
) -> Float[Tensor, "d_source d_target"]:
    """Least-squares ``W`` with ``target - mean ≈ (source - mean) @ W`` (ridge-regularised if ridge > 0).

    A direction ``u`` in the source space maps to ``u @ W`` in the target space.
    """
    if source.shape[0] < 2:
        raise ValueError("need at least two paired vectors to fit a linear map")
    x = source.double() - source.double().mean(dim=0)
    y = target.double() - target.double().mean(dim=0)
    gram = x.T @ x + ridge * torch.eye(x.shape[1], dtype=torch.float64)
    return torch.linalg.lstsq(gram, x.T @ y).solution.float()


def paired_sentence_activations(
    source_model: TransformerBridge, target_model: TransformerBridge, traces: Sequence[TraceRecord], layer: int,
    *, target_layer: int | None = None, pooling: Pooling = "sentence", batch_size: int = 8,
) -> tuple[Float[Tensor, "n d_source"], Float[Tensor, "n d_target"]]:
    """The same sentences of the same text pooled in both models (matched by trace and char span)."""
    source = pool_sentences(source_model, traces, layer, pooling=pooling, batch_size=batch_size)
    target = pool_sentences(target_model, traces, layer if target_layer is None else target_layer,
                            pooling=pooling, batch_size=batch_size)
    key = lambda s: (s.trace_index, s.char_start, s.char_end)  # noqa: E731
    target_rows = {key(s): row for row, s in enumerate(target.sentences)}
    source_rows, matched = [], []
    for row, sentence in enumerate(source.sentences):
        if key(sentence) in target_rows:
            source_rows.append(row)
            matched.append(target_rows[key(sentence)])
    if len(source_rows) < 2:
        raise ValueError("fewer than two sentences pooled in both models; cannot pair activations")
    return source.vectors[source_rows], target.vectors[matched]


@typechecked
def sae_steering_directions(
    decoder_rows: Float[Tensor, "n_behaviours d_sae"],
    scale: float,
    linear_map: Float[Tensor, "d_sae d_model"] | None = None,
) -> Float[Tensor, "n_behaviours d_model"]:
    """Decoder rows mapped into the base model (identity if ``linear_map`` is None), unit-normed, times ``scale``."""
    mapped = decoder_rows if linear_map is None else decoder_rows @ linear_map
    norms = mapped.norm(dim=-1, keepdim=True)
    if bool((norms == 0).any()):
        raise ValueError("a decoder row maps to the zero vector; the linear map is degenerate")
    return mapped / norms * scale


def build_sae_directions(
    base_model: TransformerBridge,
    thinking_model: TransformerBridge,
    sae: TopKSAE,
    behaviour_ids: Sequence[int],
    titles: Sequence[str],
    layer: int,
    thinking_traces: Sequence[TraceRecord],
    *,
    sae_layer: int | None = None,
    mapping: LinearMapping = "auto",
    base_traces: Sequence[TraceRecord] | None = None,
    pooling: Pooling = "sentence",
    batch_size: int = 8,
) -> DirectionSet:
    """SAE decoder directions (rows ``behaviour_ids`` = latent indices) in the base model.

    ``mapping``: ``"identity"`` (needs equal d_model), ``"linear"`` (least squares on paired
    activations of ``thinking_traces``), or ``"auto"`` (identity when d_model matches).
    """
    if mapping not in MAPPINGS:
        raise ValueError(f"mapping must be auto, identity or linear; got {mapping!r}")
    same_width = base_model.cfg.d_model == thinking_model.cfg.d_model
    if mapping == "auto":
        mapping = "identity" if same_width else "linear"
    if mapping == "identity" and not same_width:
        raise ValueError(f"identity mapping needs equal d_model; base has {base_model.cfg.d_model}, "
                         f"thinking has {thinking_model.cfg.d_model}")
    decoder = sae.decoder_directions
    n_latents = decoder.shape[0]
    bad = [b for b in behaviour_ids if not 0 <= int(b) < n_latents]
    if bad:
        raise ValueError(f"behaviour ids {bad} are not latents of this SAE (0..{n_latents - 1})")
    rows = decoder[[int(b) for b in behaviour_ids]].float()
    base_pooled = pool_sentences(base_model, thinking_traces, layer, pooling=pooling, batch_size=batch_size)
    scale = mean_centred_norm(base_pooled.vectors)
    linear_map = None
    fit_info: dict[str, Any] = {}
    if mapping == "linear":
        source, target = paired_sentence_activations(
            thinking_model, base_model, thinking_traces, layer if sae_layer is None else sae_layer,
            target_layer=layer, pooling=pooling, batch_size=batch_size)
        linear_map = fit_linear_map(source, target, ridge=1e-3 * float(source.var(dim=0).sum()))
        fit_info = {"n_pairs": int(source.shape[0])}
    directions = sae_steering_directions(rows, scale, linear_map)
    bias = None
    if base_traces:
        bias = mean_bias(base_pooled.vectors,
                         pool_sentences(base_model, base_traces, layer, pooling=pooling, batch_size=batch_size).vectors)
    return DirectionSet(
        model_name=base_model.cfg.model_name, d_model=base_model.cfg.d_model, n_layers=base_model.cfg.n_layers,
        layer=layer, site=SITE, method="sae", behaviour_ids=list(behaviour_ids), titles=list(titles),
        directions=directions, bias=bias,
        provenance=direction_provenance(
            base_model, "sae", sae_model=thinking_model.cfg.model_name, mapping=mapping,
            scale=scale, scale_rule="unit mapped decoder row x mean norm of the base "
            "model's centred pooled sentence activations at the layer",
            pooling=pooling, **fit_info,
            bias="mean(thinking traces) - mean(base traces)" if bias is not None else None),
    )


__all__ = ["MAPPINGS", "LinearMapping", "build_sae_directions", "fit_linear_map", "paired_sentence_activations",
           "sae_steering_directions"]
