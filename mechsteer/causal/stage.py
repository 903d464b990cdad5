"""Stage 6 as one function: necessity in the thinking model and sufficiency in the base model for
one direction set, each tested at n_contexts contexts per behaviour and condition
(:mod:`mechsteer.causal.criterion`). ``mechsteer run``'s ablation stage and the ``mechsteer ablate`` command both call
:func:`run_ablations`, with the same rules for what measures the behaviours, which directions the
thinking model loses, and how the base model is steered."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mechsteer.causal.criterion import ALPHA, RateCount
from mechsteer.causal.necessity import NecessityVariant, necessity, necessity_at_contexts
from mechsteer.causal.outputs import write_outputs
from mechsteer.causal.sufficiency import (
    ContextFilter,
    SteeringContext,
    require_contexts,
    sufficiency,
    sufficiency_contexts,
)
from mechsteer.core.errors import ConfigError
from mechsteer.data.benchmarks import Problem
from mechsteer.data.labels import GroundTruth, ground_truth_for
from mechsteer.data.traces import TraceRecord
from mechsteer.steering.direction_set import DirectionSet
from mechsteer.steering.labels import (
    BehaviourLabeller,
    BehaviourLabels,
    SAEBehaviourLabeller,
    ground_truth_behaviour_labeller,
)
from mechsteer.steering.mean import Pooling, build_mean_directions, mean_directions_at

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge


@dataclass(frozen=True)
class AblationSettings:
    """How the behaviours are ablated and added (``mechsteer ablate``'s options, a run's keys)."""

    thinking_template: str  # the necessity problems' prompt for the thinking model
    max_new_tokens: int  # of each necessity trace
    coeffs: tuple[float, ...] = (1.0,)
    n_contexts: int = 100  # contexts per behaviour and condition, of sufficiency and of the necessity test
    window: int = 1  # steer the last N context positions
    # Also steer the generated sentence / steer bias + direction; None: only for optimised sets,
    # which are trained that way (over the whole target sentence, on top of the bias).
    steer_generation: bool | None = None
    with_bias: bool | None = None
    n_random: int = 1
    sentence_tokens: int = 48  # max tokens of the generated next sentence
    per_layer: bool = False  # also ablate the thinking model's own per-layer difference-of-means directions
    per_layer_pooling: Pooling = "boundary"
    batch_size: int = 64
    seed: int = 0


def measured_behaviours(directions: DirectionSet, labels: BehaviourLabels, benchmark: str, thinking: TransformerBridge
                        ) -> tuple[DirectionSet, BehaviourLabeller, dict[str, Any]]:
    """The behaviours that can be measured, what measures them, and what was left unmeasured.

    A benchmark with ground truth measures generated text by its grammar: a latent maps to a
    ground-truth behaviour by its title, or, where the title is none (no judge), by the planted
    label most of its sentences carry. Several latents can map to one behaviour and ground truth
    cannot tell them apart, so each behaviour is measured once, with its first latent's direction.
    Without ground truth, the taxonomy's SAE classifies each generated sentence in the thinking model."""
    ground_truth = ground_truth_for(benchmark)
    if ground_truth is None:
        if labels.taxonomy is None:
            raise ConfigError(f"benchmark {benchmark!r} has no ground truth: measure the behaviours with a taxonomy")
        taxonomy = labels.taxonomy
        return directions, SAEBehaviourLabeller(thinking, taxonomy.load_sae(), taxonomy.provenance.layer,
                                                taxonomy.provenance.include_previous_token), {}
    matched = {b.id: b.matched_label for b in labels.taxonomy.behaviours} if labels.taxonomy is not None else {}
    first_latent: dict[str, int] = {}
    for behaviour in directions.behaviour_ids:
        title = directions.title(behaviour)
        measured_as = title if title in ground_truth.behaviours else matched.get(behaviour)
        if measured_as in ground_truth.behaviours and measured_as not in first_latent:
            first_latent[measured_as] = behaviour
    if not first_latent:
        raise ConfigError(f"no direction is titled with, or mostly holds, a behaviour of the {benchmark!r} ground "
                          f"truth ({sorted(ground_truth.behaviours)}); titles: {directions.titles}")
    recorded = {"measured_as": {str(b): title for title, b in first_latent.items()},
                "not_measured": {str(b): directions.title(b) for b in directions.behaviour_ids
                                 if b not in first_latent.values()}}
    labeller = ground_truth_behaviour_labeller(ground_truth, list(first_latent), list(first_latent.values()))
    return directions.subset(list(first_latent.values())), labeller, recorded


def grammar_filter(ground_truth: GroundTruth | None, measured_as: dict[str, str]) -> ContextFilter | None:
    """Where the benchmark's grammar allows each measured behaviour next (None: it declares no grammar)."""
    if ground_truth is None or ground_truth.allowed_next is None:
        return None
    allowed_next = ground_truth.allowed_next

    def possible(behaviour: int, context: SteeringContext) -> bool:
        return measured_as[str(behaviour)] in allowed_next(context.reasoning)

    return possible


def _rate_summary(name: str, count: RateCount) -> dict[str, Any]:
    return {name: count.rate, f"{name}_ci": list(count.ci)}


def run_ablations(
    base: TransformerBridge, thinking: TransformerBridge, directions: DirectionSet, labels: BehaviourLabels,
    traces: Sequence[TraceRecord], thinking_traces: Sequence[TraceRecord], problems: Sequence[Problem],
    benchmark: str, settings: AblationSettings, out: str | Path, *, necessity_directions: DirectionSet | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Necessity on ``problems`` and sufficiency at the sentence boundaries of ``traces`` (under the
    base framing; ``thinking_traces`` are the same traces as the thinking model wrote them), written
    to ``out``; returns the summary.

    The thinking model loses ``necessity_directions`` (default: ``directions``, applied as they are,
    which needs the same width; a thinking model of another width loses its own difference-of-means
    directions at the taxonomy's layer instead). The necessity test also ablates the thinking
    model's own difference-of-means directions where the run's set is another. Sufficiency is
    measured where the benchmark's grammar allows each behaviour next, where it declares one.
    Every check comes before the first generation."""
    say = progress or (lambda message: None)
    measured, labeller, settings_record = measured_behaviours(directions, labels, benchmark, thinking)
    ground_truth = ground_truth_for(benchmark)
    # A benchmark with ground truth follows a grammar of one sentence per line (the organisms):
    # the next sentence ends at the newline.
    one_sentence_per_line = ground_truth is not None
    stop_strings = ("\n",) if one_sentence_per_line else ()
    possible = grammar_filter(ground_truth, settings_record.get("measured_as", {}))
    contexts = sufficiency_contexts(traces, base.tokenizer, labels.labeller, text_labeller=labels.text_labeller)
    require_contexts(contexts, measured, possible=possible)
    thinking_contexts = sufficiency_contexts(thinking_traces, thinking.tokenizer, labels.labeller,
                                             text_labeller=labels.text_labeller)
    mean_layer = labels.taxonomy.provenance.layer if labels.taxonomy is not None else measured.layer

    def thinking_means() -> DirectionSet:
        return build_mean_directions(thinking, thinking_traces, labels.labeller, measured.behaviour_ids,
                                     measured.titles, mean_layer, text_labeller=labels.text_labeller)

    means_name = "difference of means in the thinking model"
    necessity_set = necessity_directions or measured
    if necessity_directions is None and thinking.cfg.d_model != measured.d_model:
        if labels.taxonomy is None:
            raise ConfigError(f"the thinking model's width ({thinking.cfg.d_model}) is not the directions' "
                              f"({measured.d_model}): pass directions made in the thinking model for the necessity pass")
        say(f"  necessity: the thinking model's width ({thinking.cfg.d_model}) is not the base model's "
            f"({measured.d_model}); ablating the thinking model's own difference-of-means directions at layer "
            f"{mean_layer}")
        necessity_set = thinking_means()
        settings_record["necessity_directions"] = f"{means_name} at layer {mean_layer} (the pair's widths differ)"
        sources = {means_name: necessity_set}
    else:
        necessity_set.check_model(thinking, allow_other_name=True)
        given = "the given necessity directions" if necessity_directions is not None else "the run's directions"
        sources = {f"{given} ({necessity_set.method})": necessity_set, means_name: thinking_means()}
    variants: list[NecessityVariant] = ["layer", "all"]
    # Difference-of-means in the thinking model itself, one set per layer, on the same traces and
    # labels: the necessity test's per-layer variant, and with ``per_layer`` the whole traces' too.
    layer_directions = mean_directions_at(thinking, thinking_traces, labels.labeller, necessity_set.behaviour_ids,
                                          necessity_set.titles, range(thinking.cfg.n_layers),
                                          pooling=settings.per_layer_pooling, text_labeller=labels.text_labeller)
    if settings.per_layer:
        variants.append("per_layer")
    necessity_rows = necessity(thinking, necessity_set, problems, labeller, template=settings.thinking_template,
                               max_new_tokens=settings.max_new_tokens, batch_size=settings.batch_size,
                               variants=variants, layer_directions=layer_directions if settings.per_layer else None,
                               progress=progress)
    necessity_tests = necessity_at_contexts(
        thinking, sources, thinking_contexts, labeller, n_contexts=settings.n_contexts, seed=settings.seed,
        max_new_tokens=settings.sentence_tokens, stop_strings=stop_strings, batch_size=settings.batch_size,
        layer_directions={means_name: layer_directions}, progress=progress)
    optimised = measured.method == "optimised"
    steer_generation = optimised if settings.steer_generation is None else settings.steer_generation
    with_bias = (optimised and measured.bias is not None) if settings.with_bias is None else settings.with_bias
    settings_record.update({
        "sufficiency_with_bias": with_bias, "sufficiency_steer_generation": steer_generation, "alpha": ALPHA,
        "sufficiency_contexts": ("where the benchmark's grammar allows the behaviour next and the unsteered base "
                                 "model does not write it" if possible is not None
                                 else "unfiltered: the benchmark declares no grammar; contexts whose next sentence "
                                      "is another behaviour"),
        "necessity_contexts": "where the thinking model's own train trace writes the behaviour next",
        "settings": dataclasses.asdict(settings)})
    sufficiency_rows = sufficiency(
        base, measured, contexts, labeller, coeffs=settings.coeffs, window=settings.window,
        steer_generation=steer_generation, with_bias=with_bias, n_contexts=settings.n_contexts,
        n_random=settings.n_random, seed=settings.seed, max_new_tokens=settings.sentence_tokens,
        stop_strings=stop_strings, batch_size=settings.batch_size, possible=possible, progress=progress)
    paths = write_outputs(out, necessity_rows, sufficiency_rows, settings_record, necessity_tests)
    return {
        "necessity": [{"behaviour": r.title, "variant": r.variant, "relative_change": r.relative_change,
                       "max_other_relative_change": r.max_other_relative_change} for r in necessity_rows],
        "necessity_tests": [{"behaviour": r.title, "directions": r.directions, "variant": r.variant,
                             "n_contexts": r.n_contexts, **_rate_summary("unablated", r.unablated),
                             **_rate_summary("ablated", r.ablated), "p_value": r.p_value, "passed": r.passed}
                            for r in necessity_tests],
        "sufficiency": [{"behaviour": r.title, "coeff": r.coeff, "n_contexts": r.n_contexts, "contexts": r.contexts,
                         **_rate_summary("steered", r.steered), **_rate_summary("random", r.random),
                         **_rate_summary("unsteered", r.unsteered), "p_value": r.p_value, "passed": r.passed,
                         **(_rate_summary("base_on_its_own", r.base_on_its_own) if r.base_on_its_own else {})}
                        for r in sufficiency_rows],
        "not_measured": settings_record.get("not_measured", {}),
        "outputs": {key: value.name for key, value in paths.items()},  # in ``out``
    }


__all__ = ["AblationSettings", "grammar_filter", "measured_behaviours", "run_ablations"]
