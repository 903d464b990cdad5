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

:func:`necessity_at_contexts` is the test: contexts cut from the thinking model's own traces
just before a sentence of the behaviour (where the thinking model shows it); the thinking model
writes the next sentence unablated and ablated, and the behaviour's rate falls with p < 0.01
(one-sided Fisher exact test, :mod:`mechsteer.causal.criterion`) or the check fails.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, get_args

from mechsteer.causal.criterion import RateCount, one_sided_p, passes
from mechsteer.causal.sufficiency import SteeringContext, first_labels, next_sentences
from mechsteer.core.errors import ConfigError
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


@dataclass
class NecessityTestRow:
    """One behaviour, one direction source, one variant: its rate unablated and ablated at the
    contexts where the thinking model shows it."""

    behaviour_id: int
    title: str
    directions: str  # which directions the thinking model lost (the run's, or difference of means)
    variant: str
    n_contexts: int  # per condition
    unablated: RateCount
    ablated: RateCount
    p_value: float  # one-sided Fisher exact test, unablated > ablated
    passed: bool  # p_value < criterion.ALPHA

    @classmethod
    def from_json(cls, row: dict[str, Any]) -> NecessityTestRow:
        """A row as ablations.json holds it."""
        return cls(**{**row, **{key: RateCount.from_json(row[key]) for key in ("unablated", "ablated")}})


def _no_interventions(lengths: list[int]) -> list[Any]:
    return []


def _fixed_interventions(interventions: Sequence[Any], lengths: list[int]) -> list[Any]:
    return list(interventions)


def shown_contexts(contexts: Sequence[SteeringContext], labeller: BehaviourLabeller) -> dict[int, list[SteeringContext]]:
    """Per behaviour, the contexts whose recorded next sentence ``labeller`` gives that behaviour."""
    labels = first_labels(labeller, [c.text for c in contexts], [c.next_sentence for c in contexts])
    shown: dict[int, list[SteeringContext]] = {}
    for context, label in zip(contexts, labels, strict=True):
        if label is not None:
            shown.setdefault(label, []).append(context)
    return shown


def necessity_at_contexts(
    thinking_model: TransformerBridge,
    sources: Mapping[str, DirectionSet],
    contexts: Sequence[SteeringContext],
    labeller: BehaviourLabeller,
    *,
    variants: Sequence[Literal["layer", "all"]] = ("layer", "all"),
    layer_directions: Mapping[str, Mapping[int, DirectionSet]] | None = None,
    n_contexts: int = 100,
    seed: int = 0,
    max_new_tokens: int = 48,
    stop_strings: Sequence[str] = ("\n",),
    batch_size: int = 64,
    progress: Callable[[str], None] | None = None,
) -> list[NecessityTestRow]:
    """Each source's direction of each behaviour projected out of the thinking model, at up to
    ``n_contexts`` contexts (thinking framing) whose next sentence is that behaviour (module docstring).

    ``sources`` names each direction set (e.g. the run's vectors, difference of means in the
    thinking model); they measure the same behaviour ids. A source with ``layer_directions[name]``
    (a set made at each layer) is also tested with the ``per_layer`` variant. Refuses a behaviour
    the contexts never show.
    """
    if not sources:
        raise ValueError("necessity_at_contexts needs at least one direction set")
    for variant in variants:
        if variant not in ("layer", "all"):
            raise ValueError(f"necessity_at_contexts variants are 'layer' and 'all'; got {variant!r}")
    behaviour_ids = next(iter(sources.values())).behaviour_ids
    per_source: dict[str, list[NecessityVariant]] = {}
    for name, directions in sources.items():
        directions.check_model(thinking_model, allow_other_name=True)
        if directions.behaviour_ids != behaviour_ids:
            raise ValueError(f"direction set {name!r} has behaviours {directions.behaviour_ids}, not {behaviour_ids}")
        per_source[name] = list(variants)
        if name in (layer_directions or {}):
            per_source[name].append("per_layer")
        _check_variants(thinking_model, directions, per_source[name], (layer_directions or {}).get(name))
    shown = shown_contexts(contexts, labeller)
    missing = [b for b in behaviour_ids if not shown.get(b)]
    if missing:
        raise ConfigError(f"necessity has no context where the thinking model writes behaviour(s) {missing}: of "
                          f"{len(contexts)} sentence boundaries of its train traces none precedes one; give it more "
                          "train traces (n_train) or longer ones (max_new_tokens), or turn ablations off")
    generate_next = functools.partial(next_sentences, thinking_model, max_new_tokens=max_new_tokens,
                                      stop_strings=stop_strings, batch_size=batch_size)
    say = progress or (lambda message: None)
    rows = []
    for behaviour in behaviour_ids:
        eligible = shown[behaviour]
        chosen = random.Random(f"{seed}-{behaviour}").sample(eligible, min(n_contexts, len(eligible)))
        texts = [c.text for c in chosen]

        def hits(continuations: Sequence[str], behaviour: int = behaviour, texts: list[str] = texts) -> RateCount:
            return RateCount.of([label == behaviour for label in first_labels(labeller, texts, continuations)])

        unablated = hits(generate_next(texts, _no_interventions))
        for name, directions in sources.items():
            for source_variant in per_source[name]:
                ablations = _ablations(thinking_model, directions, behaviour, source_variant,
                                       (layer_directions or {}).get(name))
                ablated = hits(generate_next(texts, functools.partial(_fixed_interventions, ablations)))
                p_value = one_sided_p(unablated, ablated)
                rows.append(NecessityTestRow(
                    behaviour_id=int(behaviour), title=directions.title(behaviour), directions=name,
                    variant=VARIANT_NAMES[source_variant].format(layer=directions.layer), n_contexts=len(chosen),
                    unablated=unablated, ablated=ablated, p_value=p_value, passed=passes(p_value)))
                say(f"  necessity {directions.title(behaviour)!r} ({name}, {source_variant}): {unablated.rate:.2f} -> "
                    f"{ablated.rate:.2f} ({len(chosen)} contexts, p = {p_value:.2g})")
    return rows


__all__ = ["NECESSITY_VARIANTS", "NecessityRow", "NecessityTestRow", "NecessityVariant", "behaviour_rates",
           "necessity", "necessity_at_contexts", "relative_change", "shown_contexts"]
