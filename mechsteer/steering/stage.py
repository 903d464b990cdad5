"""Stage 4 as one function: a method's directions in the base model from the thinking traces
(under the base framing) and their sentence labels. ``mechsteer run``'s directions stage and the
``mechsteer directions`` command both call :func:`build_directions`, so the same inputs give the
same direction set whichever of the two made it."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from transformer_lens.model_bridge import TransformerBridge

from mechsteer.core.errors import ConfigError
from mechsteer.data.traces import TraceRecord
from mechsteer.steering.direction_set import DirectionMethod, DirectionSet
from mechsteer.steering.labels import BehaviourLabels
from mechsteer.steering.mean import Pooling, build_mean_directions
from mechsteer.steering.optimise import OptimisationConfig, build_optimised_directions
from mechsteer.steering.sae_map import LinearMapping, build_sae_directions


@dataclass(frozen=True)
class DirectionSettings:
    """How the directions are made: the method, the base model's layer, and each method's options."""

    method: DirectionMethod
    layer: int
    pooling: Pooling = "sentence"  # mean and sae: the sentence's tokens and the one before, or the boundary token
    mapping: LinearMapping = "auto"  # sae: thinking -> base space
    optimisation: OptimisationConfig = field(default_factory=OptimisationConfig)

    @property
    def needs_thinking(self) -> bool:
        """The sae method reads the thinking model (its SAE lives there)."""
        return self.method == "sae"


def build_directions(
    base: TransformerBridge, thinking_traces: Sequence[TraceRecord], labels: BehaviourLabels,
    settings: DirectionSettings, *, base_traces: Sequence[TraceRecord] | None = None,
    thinking: TransformerBridge | None = None, provenance: dict[str, Any] | None = None,
    progress: Callable[[str], None] | None = None,
) -> DirectionSet:
    """The direction set of ``settings.method`` (see :mod:`mechsteer.steering`).

    ``thinking_traces`` and ``base_traces`` must be under the base framing
    (:func:`~mechsteer.steering.framing.frame_for_base`); ``base_traces`` give mean and sae sets
    their bias; ``thinking`` and a taxonomy's labels are what the sae method needs. Every behaviour
    of a taxonomy must have labelled sentences (refused before any forward pass otherwise: the
    taxonomy was made from these sentences); a benchmark's ground-truth behaviours that these traces
    never show are left out, listed in ``provenance["skipped_behaviours"]``. ``provenance`` is
    recorded beside the method's own (where the inputs came from)."""
    skip_empty = labels.taxonomy is None
    if settings.method == "mean":
        result = build_mean_directions(base, thinking_traces, labels.labeller, labels.behaviour_ids, labels.titles,
                                       settings.layer, base_traces=base_traces, pooling=settings.pooling,
                                       text_labeller=labels.text_labeller, skip_empty=skip_empty)
    elif settings.method == "sae":
        if labels.taxonomy is None or thinking is None:
            raise ConfigError("the sae method needs a taxonomy's labels (its SAE supplies the decoder directions) "
                              "and the thinking model")
        result = build_sae_directions(base, thinking, labels.taxonomy.load_sae(), labels.behaviour_ids,
                                      labels.titles, settings.layer, thinking_traces,
                                      sae_layer=labels.taxonomy.provenance.layer, mapping=settings.mapping,
                                      base_traces=base_traces, pooling=settings.pooling)
    elif settings.method == "optimised":
        result = build_optimised_directions(base, thinking_traces, labels.labeller, labels.behaviour_ids,
                                            labels.titles, settings.layer, settings.optimisation,
                                            text_labeller=labels.text_labeller, skip_empty=skip_empty,
                                            progress=progress)
    else:
        raise ConfigError(f"unknown direction method {settings.method!r}; expected mean, sae or optimised")
    result.provenance.update({"labels": labels.source, "settings": dataclasses.asdict(settings), **(provenance or {})})
    return result


__all__ = ["DirectionSettings", "build_directions"]
