"""Sufficiency, in the base model: steer toward a behaviour and count how often it comes next.

Contexts are the thinking traces (base framing) cut at a sentence boundary where the thinking
trace's next sentence belongs to *another* behaviour. The base model generates the next
sentence (greedy) with ``coeff * direction`` added at ``resid_post`` of the layer at the last
``window`` context positions (and, with ``steer_generation``, at every generated position; with
``with_bias``, ``coeff * (bias + direction)`` as in the hybrid, which is how optimised vectors
are trained), and we count how often that sentence is behaviour b: steered, unsteered, and with
a norm-matched random direction at the same coefficient (:meth:`DirectionSet.random_like`).
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from mechsteer.activations import trace_sentences
from mechsteer.core.errors import ConfigError
from mechsteer.core.models import ResidSite
from mechsteer.core.tensor_types import Float, Tensor
from mechsteer.data.labels import TraceLabeller
from mechsteer.data.traces import TraceRecord
from mechsteer.interventions.generation import generate, tokenize_prompts
from mechsteer.interventions.hooks import (
    HookFn,
    PositionFrame,
    ResidSiteIntervention,
    add_direction,
)
from mechsteer.steering.direction_set import DirectionSet
from mechsteer.steering.labels import BehaviourLabeller, SentenceLabeller

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge


@dataclass
class RowWindowSteering(ResidSiteIntervention):
    """Add ``coeff * direction`` at ``resid_post`` of ``layer`` at absolute positions ``[starts[r], ends[r])`` of row r.

    Unlike :class:`mechsteer.interventions.hooks.Steering` (one position list for every row), the window
    is per row, so contexts of different lengths can share a batch. It follows the same
    protocol (``validate``, ``hook_name``, ``make_hook``) and is exact under the KV cache.
    """

    layer: int
    direction: Float[Tensor, " d_model"]
    coeff: float
    starts: Sequence[int]
    ends: Sequence[int]
    site: ResidSite = "resid_post"

    def validate(self, model: TransformerBridge) -> None:
        super().validate(model)
        if len(self.starts) != len(self.ends):
            raise ValueError(f"need as many window starts as ends; got {len(self.starts)} and {len(self.ends)}")

    def make_hook(self, frame: PositionFrame) -> HookFn:
        def hook(resid: Tensor, hook: object) -> Tensor:
            batch, n_new, _ = resid.shape
            if batch != len(self.starts):
                raise ValueError(f"window steering has {len(self.starts)} rows but the batch has {batch}")
            absolute = frame.absolute_positions(batch, n_new, resid.device)
            starts = torch.tensor(list(self.starts), device=resid.device)[:, None]
            ends = torch.tensor(list(self.ends), device=resid.device)[:, None]
            mask = (absolute >= starts) & (absolute < ends) & (absolute >= 0)
            # The direction is cast to the residual's dtype before scaling, as it always was here.
            return add_direction(resid, self.direction.to(resid.device, resid.dtype), float(self.coeff), mask)

        return hook


@dataclass(frozen=True)
class SteeringContext:
    """A trace cut just before one of its sentences; ``next_behaviour`` is that sentence's behaviour."""

    text: str
    next_behaviour: int | None
    trace_index: int
    sentence_index: int


def sufficiency_contexts(
    traces: Sequence[TraceRecord], tokenizer: Any, labeller: SentenceLabeller, *,
    text_labeller: TraceLabeller | None = None, min_words: int = 3,
) -> list[SteeringContext]:
    """Every kept sentence of ``traces`` (base framing) gives a context: the text before it."""
    contexts = []
    for index, record in enumerate(traces):
        _, sentences = trace_sentences(record, index, tokenizer, min_words=min_words, labeller=text_labeller)
        for sentence in sentences:
            contexts.append(SteeringContext(record.text[: sentence.char_start], labeller(sentence),
                                            index, sentence.sentence_index))
    return contexts


def contexts_for(contexts: Sequence[SteeringContext], behaviour: int) -> list[SteeringContext]:
    """The contexts where steering toward ``behaviour`` can be measured: the next sentence is another behaviour."""
    return [c for c in contexts if c.next_behaviour is not None and c.next_behaviour != behaviour]


def require_contexts(contexts: Sequence[SteeringContext], directions: DirectionSet,
                     behaviour_ids: Sequence[int] | None = None) -> None:
    """Refuse, in one line naming each behaviour, when one has no context to be measured in (a
    next sentence of another behaviour): checked before any generation, the necessity pass's too."""
    chosen = directions.behaviour_ids if behaviour_ids is None else behaviour_ids
    missing = [f"{b} ({directions.title(b)!r})" for b in chosen if not contexts_for(contexts, b)]
    if missing:
        labelled = sum(c.next_behaviour is not None for c in contexts)
        raise ConfigError(
            f"sufficiency has no context for behaviour(s) {', '.join(missing)}: of {len(contexts)} sentence "
            f"boundaries in the train traces, {labelled} precede a labelled sentence, and none of another "
            "behaviour; give it more train traces (n_train) or longer ones (max_new_tokens), or turn ablations off")


@dataclass
class SufficiencyRow:
    behaviour_id: int
    title: str
    coeff: float
    window: int
    steer_generation: bool
    with_bias: bool
    n_contexts: int
    rate_unsteered: float  # share of next sentences that are this behaviour
    rate_steered: float
    rate_random: float  # mean over the random seeds
    ratio_vs_random: float  # rate_steered / max(rate_random, 1 / n_contexts)
    random_rates: list[float] = field(default_factory=list)


def _first_labels(labeller: BehaviourLabeller, contexts: Sequence[str], continuations: Sequence[str]) -> list[int | None]:
    return [labels[0] if labels else None for labels in labeller(contexts, continuations)]


def _next_sentences(
    model: TransformerBridge, contexts: Sequence[str], *, direction: Tensor | None, coeff: float, layer: int,
    window: int, steer_generation: bool, max_new_tokens: int, stop_strings: Sequence[str], batch_size: int,
) -> list[str]:
    token_ids = tokenize_prompts(model, contexts)
    texts: list[str] = []
    for start in range(0, len(token_ids), batch_size):
        chunk = token_ids[start : start + batch_size]
        interventions = []
        if direction is not None:
            lengths = [len(ids) for ids in chunk]
            ends = [length + max_new_tokens + 1 if steer_generation else length for length in lengths]
            interventions.append(RowWindowSteering(layer, direction, coeff, [max(0, n - window) for n in lengths], ends))
        output = generate(model, chunk, max_new_tokens=max_new_tokens, stop_strings=stop_strings,
                          interventions=interventions)
        texts.extend(output.texts)
    return texts


def sufficiency(
    base_model: TransformerBridge,
    directions: DirectionSet,
    contexts: Sequence[SteeringContext],
    labeller: BehaviourLabeller,
    *,
    coeffs: Sequence[float] = (1.0,),
    window: int = 1,
    steer_generation: bool = False,
    with_bias: bool = False,
    n_contexts: int = 64,
    n_random: int = 1,
    seed: int = 0,
    max_new_tokens: int = 48,
    stop_strings: Sequence[str] = ("\n",),
    batch_size: int = 64,
    behaviour_ids: Sequence[int] | None = None,
    progress: Callable[[str], None] | None = None,
) -> list[SufficiencyRow]:
    """For each behaviour b: contexts whose next sentence is another behaviour; steer toward b (module docstring).

    ``with_bias`` steers with ``coeff * (bias + direction)``, as the hybrid generator does (the
    random control then uses its own norm-matched random bias). ``progress`` gets a line per
    behaviour and coefficient.
    """
    directions.check_model(base_model)
    if with_bias and directions.bias is None:
        raise ValueError("with_bias needs a direction set with a bias")
    if window < 1:
        raise ValueError(f"window must be >= 1; got {window}")
    if n_random < 1:
        raise ValueError(f"n_random must be >= 1; got {n_random}")
    require_contexts(contexts, directions, behaviour_ids)
    controls = [directions.random_like(seed + index) for index in range(n_random)]
    rows = []
    next_sentences = functools.partial(_next_sentences, base_model, layer=directions.layer, window=window,
                                       steer_generation=steer_generation, max_new_tokens=max_new_tokens,
                                       stop_strings=stop_strings, batch_size=batch_size)
    for behaviour in directions.behaviour_ids if behaviour_ids is None else behaviour_ids:
        eligible = contexts_for(contexts, behaviour)
        chosen = random.Random(f"{seed}-{behaviour}").sample(eligible, min(n_contexts, len(eligible)))
        texts = [c.text for c in chosen]

        def rate(continuations: Sequence[str], behaviour: int = int(behaviour), texts: list[str] = texts) -> float:
            labels = _first_labels(labeller, texts, continuations)
            return sum(label == behaviour for label in labels) / len(labels)

        unsteered = rate(next_sentences(texts, direction=None, coeff=0.0))

        def vector(source: DirectionSet, behaviour: int = int(behaviour)) -> Tensor:
            if not with_bias:
                return source.direction(behaviour)
            if source.bias is None:
                raise ValueError("with_bias needs a direction set with a bias; this one has none")
            return source.direction(behaviour) + source.bias

        for coeff in coeffs:
            steered = rate(next_sentences(texts, direction=vector(directions), coeff=coeff))
            random_rates = [rate(next_sentences(texts, direction=vector(control), coeff=coeff)) for control in controls]
            mean_random = sum(random_rates) / len(random_rates)
            rows.append(SufficiencyRow(
                behaviour_id=int(behaviour), title=directions.title(behaviour), coeff=float(coeff), window=window,
                steer_generation=steer_generation, with_bias=with_bias, n_contexts=len(chosen),
                rate_unsteered=unsteered,
                rate_steered=steered, rate_random=mean_random,
                ratio_vs_random=steered / max(mean_random, 1 / len(chosen)), random_rates=random_rates,
            ))
            if progress is not None:
                progress(f"  sufficiency {directions.title(behaviour)!r} x{coeff:g}: steered {steered:.2f}, "
                         f"random {mean_random:.2f}, unsteered {unsteered:.2f} ({len(chosen)} contexts)")
    return rows


__all__ = ["RowWindowSteering", "SteeringContext", "SufficiencyRow", "contexts_for", "require_contexts",
           "sufficiency", "sufficiency_contexts"]
