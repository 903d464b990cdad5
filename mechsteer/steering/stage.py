"""Stage 4 as one function: a method's directions in the base model from the thinking traces
(under the base framing) and their sentence labels. ``mechsteer run``'s directions stage and the
``mechsteer directions`` command both call :func:`build_directions`, so the same inputs give the
same direction set whichever of the two made it. The method is looked up in the registry of
:mod:`mechsteer.steering.methods` (a plug-in's included)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from mechsteer.data.traces import TraceRecord
from mechsteer.steering.direction_set import DirectionSet
from mechsteer.steering.labels import BehaviourLabels
from mechsteer.steering.methods import DirectionInputs, DirectionSettings, direction_method_spec

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge


def build_directions(
    base: TransformerBridge, thinking_traces: Sequence[TraceRecord], labels: BehaviourLabels,
    settings: DirectionSettings, *, base_traces: Sequence[TraceRecord] | None = None,
    thinking: TransformerBridge | None = None, provenance: dict[str, Any] | None = None,
    progress: Callable[[str], None] | None = None,
) -> DirectionSet:
    """The direction set of ``settings.method`` (see :mod:`mechsteer.steering`).

    ``thinking_traces`` and ``base_traces`` must be under the base framing
    (:func:`~mechsteer.steering.framing.frame_for_base`); ``base_traces`` give mean and sae sets
    their bias; ``thinking`` and a taxonomy's labels are what a method declaring them needs (sae),
    refused before any forward pass when missing. Every behaviour of a taxonomy must have labelled
    sentences (refused before any forward pass otherwise: the taxonomy was made from these
    sentences); a benchmark's ground-truth behaviours that these traces never show are left out,
    listed in ``provenance["skipped_behaviours"]``. ``provenance`` is recorded beside the method's
    own (where the inputs came from)."""
    spec = direction_method_spec(settings.method)
    inputs = DirectionInputs(base, thinking_traces, labels, settings, base_traces=base_traces, thinking=thinking,
                             progress=progress)
    if spec.needs_taxonomy:
        inputs.require_taxonomy()
    if spec.needs_thinking:
        inputs.require_thinking()
    result = spec.build(inputs)
    taxonomy = {"taxonomy": labels.taxonomy_dir} if labels.taxonomy_dir else {}
    result.provenance.update({"labels": labels.source, **taxonomy, "settings": dataclasses.asdict(settings),
                              **(provenance or {})})
    return result


@dataclass(frozen=True)
class DirectionsSummary:
    """What a run records of its direction set (``stages.json``) and its report shows."""

    method: str
    layer: int
    behaviour_ids: list[int]
    titles: list[str]
    norms: list[float]  # each behaviour direction's, rounded
    bias_norm: float | None

    @classmethod
    def of(cls, directions: DirectionSet, layer: int) -> DirectionsSummary:
        return cls(method=directions.method, layer=layer, behaviour_ids=list(directions.behaviour_ids),
                   titles=list(directions.titles), norms=[round(float(n), 4) for n in directions.norms],
                   bias_norm=None if directions.bias is None else round(float(directions.bias.norm()), 4))

    @property
    def title_of(self) -> dict[int, str]:
        """Each behaviour's title by its id."""
        return dict(zip(self.behaviour_ids, self.titles, strict=True))

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> DirectionsSummary:
        return cls(method=data["method"], layer=data["layer"], behaviour_ids=list(data["behaviour_ids"]),
                   titles=list(data["titles"]), norms=list(data.get("norms") or []), bias_norm=data.get("bias_norm"))


__all__ = ["DirectionSettings", "DirectionsSummary", "build_directions"]
