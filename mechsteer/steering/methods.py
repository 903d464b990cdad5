"""Direction methods: name -> how a method makes its direction set, the registry that a run's
``direction_method``, ``mechsteer directions --method`` and :func:`mechsteer.steering.stage.build_directions`
read.

A method is a :class:`DirectionMethodSpec`: its name, what it needs beyond the base model and the
labelled thinking traces (the thinking model; a taxonomy's labels rather than a benchmark's ground
truth), and a builder ``build(DirectionInputs) -> DirectionSet``. The built-in ones are ``mean``
(:mod:`~mechsteer.steering.mean`), ``sae`` (:mod:`~mechsteer.steering.sae_map`) and ``optimised``
(:mod:`~mechsteer.steering.optimise`); a plug-in adds its own with :func:`register_direction_method`
(docs/extending.md), and a set made by it may then name it as its method.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from mechsteer.core.errors import ConfigError
from mechsteer.core.plugins import Registry
from mechsteer.data.traces import TraceRecord
from mechsteer.steering.direction_set import DirectionSet, add_set_method
from mechsteer.steering.labels import BehaviourLabels
from mechsteer.steering.mean import Pooling, build_mean_directions
from mechsteer.steering.optimise import OptimisationConfig, build_optimised_directions
from mechsteer.steering.sae_map import LinearMapping, build_sae_directions
from mechsteer.taxonomy.artefact import Taxonomy

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge


@dataclass(frozen=True)
class DirectionSettings:
    """How the directions are made: the method, the base model's layer, and each method's options."""

    method: str  # a registered direction method (direction_method_names)
    layer: int
    pooling: Pooling = "sentence"  # mean and sae: the sentence's tokens and the one before, or the boundary token
    mapping: LinearMapping = "auto"  # sae: thinking -> base space
    optimisation: OptimisationConfig = field(default_factory=OptimisationConfig)

    @property
    def needs_thinking(self) -> bool:
        """Whether the method reads the thinking model (the sae method: its SAE lives there)."""
        return direction_method_spec(self.method).needs_thinking


@dataclass(frozen=True)
class DirectionInputs:
    """What a run (or ``mechsteer directions``) gives a method's builder.

    ``thinking_traces`` and ``base_traces`` are under the base framing
    (:func:`~mechsteer.steering.framing.frame_for_base`); ``base_traces`` (the base model's own)
    give a set its bias where the method makes one; ``thinking`` is there for a method that
    declares ``needs_thinking``."""

    base: TransformerBridge
    thinking_traces: Sequence[TraceRecord]
    labels: BehaviourLabels
    settings: DirectionSettings
    base_traces: Sequence[TraceRecord] | None = None
    thinking: TransformerBridge | None = None
    progress: Callable[[str], None] | None = None

    @property
    def skip_empty(self) -> bool:
        """Leave out behaviours without labelled sentences: a benchmark's ground truth may name ones these
        traces never show; every behaviour of a taxonomy was made from these sentences."""
        return self.labels.taxonomy is None

    def require_taxonomy(self) -> Taxonomy:
        if self.labels.taxonomy is None:
            raise ConfigError(f"direction method {self.settings.method!r} needs a taxonomy's labels "
                              "(e.g. its SAE's decoder directions), not a benchmark's ground truth")
        return self.labels.taxonomy

    def require_thinking(self) -> TransformerBridge:
        if self.thinking is None:
            raise ConfigError(f"direction method {self.settings.method!r} needs the thinking model")
        return self.thinking


DirectionBuilder = Callable[[DirectionInputs], DirectionSet]


@dataclass(frozen=True)
class DirectionMethodSpec:
    name: str
    build: DirectionBuilder
    description: str  # what report.md calls its directions, e.g. "difference-of-means directions"
    needs_thinking: bool = False  # the thinking model is loaded and passed (DirectionInputs.thinking)
    needs_taxonomy: bool = False  # a taxonomy's labels, not a benchmark's ground-truth ones


METHODS: Registry[DirectionMethodSpec] = Registry("direction method")


def register_direction_method(spec: DirectionMethodSpec, *, replace: bool = False) -> None:
    """Make ``direction_method: spec.name`` (and ``mechsteer directions --method``) build with ``spec``."""
    METHODS.register(spec.name, spec, replace=replace)
    add_set_method(spec.name)


def direction_method_names() -> list[str]:
    """The methods that build a set from traces (plug-ins loaded); ``random`` sets are made from another set."""
    return METHODS.names()


def direction_method_spec(name: str) -> DirectionMethodSpec:
    """The registered method ``name`` (plug-ins loaded on a miss); ConfigError naming the registered ones."""
    return METHODS.get(name)


def _build_mean(inputs: DirectionInputs) -> DirectionSet:
    labels, settings = inputs.labels, inputs.settings
    return build_mean_directions(inputs.base, inputs.thinking_traces, labels.labeller, labels.behaviour_ids,
                                 labels.titles, settings.layer, base_traces=inputs.base_traces,
                                 pooling=settings.pooling, text_labeller=labels.text_labeller,
                                 skip_empty=inputs.skip_empty)


def _build_sae(inputs: DirectionInputs) -> DirectionSet:
    taxonomy, settings = inputs.require_taxonomy(), inputs.settings
    return build_sae_directions(inputs.base, inputs.require_thinking(), taxonomy.load_sae(),
                                inputs.labels.behaviour_ids, inputs.labels.titles, settings.layer,
                                inputs.thinking_traces, sae_layer=taxonomy.provenance.layer, mapping=settings.mapping,
                                base_traces=inputs.base_traces, pooling=settings.pooling)


def _build_optimised(inputs: DirectionInputs) -> DirectionSet:
    labels, settings = inputs.labels, inputs.settings
    return build_optimised_directions(inputs.base, inputs.thinking_traces, labels.labeller, labels.behaviour_ids,
                                      labels.titles, settings.layer, settings.optimisation,
                                      text_labeller=labels.text_labeller, skip_empty=inputs.skip_empty,
                                      progress=inputs.progress)


register_direction_method(DirectionMethodSpec("mean", _build_mean, "difference-of-means directions"))
register_direction_method(DirectionMethodSpec("sae", _build_sae, "the SAE's decoder directions mapped into the base model",
                                              needs_thinking=True, needs_taxonomy=True))
register_direction_method(DirectionMethodSpec("optimised", _build_optimised, "optimised steering vectors"))


__all__ = ["DirectionBuilder", "DirectionInputs", "DirectionMethodSpec", "DirectionSettings", "direction_method_names",
           "direction_method_spec", "register_direction_method"]
