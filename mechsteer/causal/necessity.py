"""Necessity, in the thinking model: project each behaviour's direction out and regenerate.

Each behaviour's direction is projected out of the thinking model's residual stream
(``resid_post``): at the set's layer, and at every layer as a variant (the same direction
everywhere, or with ``per_layer`` each layer's own direction, e.g. difference-of-means sets
made in the thinking model at every layer). The thinking model regenerates its traces (greedy)
and we measure, per behaviour, the *rate*: sentences of that behaviour per trace, against the
unablated traces. Also the other behaviours' rates and the accuracy. A direction made in the
base model is applied to the thinking model as is when both share d_model (a thinking model
post-trained from the base keeps its residual basis; ``check_model(..., allow_other_name=True)``);
pass a set made in the thinking model to test it there instead.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, get_args

from mechsteer.data.benchmarks import Problem
from mechsteer.data.prompts import render_prompt
from mechsteer.grading.answers import extract_answer, is_correct
from mechsteer.interventions.generation import generate
from mechsteer.interventions.hooks import Ablation
from mechsteer.steering.direction_set import DirectionSet
from mechsteer.steering.labels import BehaviourLabeller

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

# "layer": the set's layer; "all": the set's direction at every layer; "per_layer": at every
# layer L, the direction made at L.
NecessityVariant = Literal["layer", "all", "per_layer"]
NECESSITY_VARIANTS: tuple[NecessityVariant, ...] = get_args(NecessityVariant)
VARIANT_NAMES: dict[NecessityVariant, str] = {"layer": "layer {layer}", "all": "all layers",
                                              "per_layer": "all layers, per-layer directions"}


def behaviour_rates(labels: Sequence[Sequence[int | None]], behaviour_ids: Sequence[int]) -> dict[int, float]:
    """Sentences of each behaviour per trace (mean over traces)."""
    if not labels:
        raise ValueError("no traces to measure rates on")
    return {int(b): sum(list(trace).count(int(b)) for trace in labels) / len(labels) for b in behaviour_ids}


def relative_change(before: float, after: float) -> float:
    """(after - before) / before; 0 when both are 0, inf when only ``before`` is 0."""
    if before == 0:
        return 0.0 if after == 0 else float("inf")
    return (after - before) / before


@dataclass
class NecessityRow:
    behaviour_id: int
    title: str
    variant: str  # "layer L", "all layers" or "all layers, per-layer directions"
    n_traces: int
    rate_before: float  # this behaviour's sentences per trace, unablated
    rate_after: float
    relative_change: float  # (after - before) / before
    other_rates_before: dict[int, float]
    other_rates_after: dict[int, float]
    max_other_relative_change: float  # largest |relative change| of another behaviour
    mean_other_relative_change: float
    accuracy_before: float
    accuracy_after: float

    @classmethod
    def from_json(cls, row: dict[str, Any]) -> NecessityRow:
        """A row as ablations.json holds it (JSON turns the behaviour-id keys into strings)."""
        rates = {key: {int(b): rate for b, rate in row[key].items()} for key in ("other_rates_before",
                                                                                "other_rates_after")}
        return cls(**{**row, **rates})


def _generate_traces(model: TransformerBridge, prompts: Sequence[str], max_new_tokens: int, batch_size: int,
                     interventions: Sequence[Any] = ()) -> list[str]:
    output = generate(model, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                      interventions=interventions)
    return output.texts


def _accuracy(texts: Sequence[str], problems: Sequence[Problem]) -> float:
    correct = [is_correct(extract_answer(text, p.benchmark), p.answer, p.benchmark)
               for text, p in zip(texts, problems, strict=True)]
    return sum(correct) / len(correct)


def _check_variants(model: TransformerBridge, directions: DirectionSet, variants: Sequence[NecessityVariant],
                    layer_directions: Mapping[int, DirectionSet] | None) -> None:
    for variant in variants:
        if variant not in NECESSITY_VARIANTS:
            raise ValueError(f"necessity variants are {NECESSITY_VARIANTS}; got {variant!r}")
    if "per_layer" in variants:
        missing = [layer for layer in range(model.cfg.n_layers) if layer not in (layer_directions or {})]
        if missing:
            raise ValueError(f"the per_layer variant needs a direction set for every layer; missing {missing}")
        for layer, layer_set in (layer_directions or {}).items():
            layer_set.check_model(model, allow_other_name=True)
            if layer_set.layer != layer or layer_set.behaviour_ids != directions.behaviour_ids:
                raise ValueError(f"layer_directions[{layer}] must be made at layer {layer} for behaviours "
                                 f"{directions.behaviour_ids}; got layer {layer_set.layer}, {layer_set.behaviour_ids}")


def _ablations(model: TransformerBridge, directions: DirectionSet, behaviour: int, variant: NecessityVariant,
               layer_directions: Mapping[int, DirectionSet] | None) -> list[Ablation]:
    direction = directions.direction(behaviour)
    if variant == "layer":
        return [Ablation(directions.layer, direction, directions.site)]
    if variant == "all":
        return [Ablation(layer, direction, directions.site) for layer in range(model.cfg.n_layers)]
    return [Ablation(layer, layer_set.direction(behaviour), layer_set.site)
            for layer, layer_set in sorted((layer_directions or {}).items())]


def necessity(
    thinking_model: TransformerBridge,
    directions: DirectionSet,
    problems: Sequence[Problem],
    labeller: BehaviourLabeller,
    *,
    template: str,
    max_new_tokens: int,
    variants: Sequence[NecessityVariant] = ("layer", "all"),
    batch_size: int = 64,
    behaviour_ids: Sequence[int] | None = None,
    layer_directions: Mapping[int, DirectionSet] | None = None,
    progress: Callable[[str], None] | None = None,
) -> list[NecessityRow]:
    """Project each behaviour's direction out of the thinking model and regenerate (module docstring).

    Variants: ``"layer"`` (the set's layer), ``"all"`` (the set's direction at every layer) and
    ``"per_layer"`` (at every layer L, the direction ``layer_directions[L]`` made at L).
    ``progress`` gets a line per generation pass.
    """
    directions.check_model(thinking_model, allow_other_name=True)
    _check_variants(thinking_model, directions, variants, layer_directions)
    if not problems:
        raise ValueError("necessity needs at least one problem")
    prompts = [render_prompt(template, p.question, thinking_model.tokenizer) for p in problems]
    chosen = list(directions.behaviour_ids if behaviour_ids is None else behaviour_ids)
    say = progress or (lambda message: None)
    say(f"  necessity: unablated traces of {len(problems)} problems")
    baseline = _generate_traces(thinking_model, prompts, max_new_tokens, batch_size)
    rates_before = behaviour_rates(labeller(prompts, baseline), directions.behaviour_ids)
    accuracy_before = _accuracy(baseline, problems)
    rows = []
    for behaviour in chosen:
        for variant in variants:
            say(f"  necessity {directions.title(behaviour)!r} ablated ({variant})")
            ablations = _ablations(thinking_model, directions, behaviour, variant, layer_directions)
            texts = _generate_traces(thinking_model, prompts, max_new_tokens, batch_size, ablations)
            rates_after = behaviour_rates(labeller(prompts, texts), directions.behaviour_ids)
            others = [b for b in directions.behaviour_ids if b != behaviour]
            other_changes = [abs(relative_change(rates_before[b], rates_after[b])) for b in others]
            rows.append(NecessityRow(
                behaviour_id=int(behaviour), title=directions.title(behaviour),
                variant=VARIANT_NAMES[variant].format(layer=directions.layer),
                n_traces=len(problems), rate_before=rates_before[behaviour], rate_after=rates_after[behaviour],
                relative_change=relative_change(rates_before[behaviour], rates_after[behaviour]),
                other_rates_before={b: rates_before[b] for b in others},
                other_rates_after={b: rates_after[b] for b in others},
                max_other_relative_change=max(other_changes, default=0.0),
                mean_other_relative_change=sum(other_changes) / len(other_changes) if other_changes else 0.0,
                accuracy_before=accuracy_before, accuracy_after=_accuracy(texts, problems),
            ))
    return rows


__all__ = ["NECESSITY_VARIANTS", "NecessityRow", "NecessityVariant", "behaviour_rates", "necessity",
           "relative_change"]
