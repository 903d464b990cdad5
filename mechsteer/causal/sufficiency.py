"""Sufficiency, in the base model: steer toward a behaviour and count how often it comes next.

Contexts are the thinking traces (base framing) cut at a sentence boundary: where the benchmark's
grammar allows the behaviour next (a ``possible`` filter, from the benchmark's ground truth), or,
without a grammar, where the thinking trace's next sentence belongs to *another* behaviour. The base model generates the next
sentence (greedy) with ``coeff * direction`` added at ``resid_post`` of the layer at the last
``window`` context positions (and, with ``steer_generation``, at every generated position; with
``with_bias``, ``coeff * (bias + direction)`` as in the hybrid, which is how optimised vectors
are trained), and we count how often that sentence is behaviour b: steered, unsteered, and with
a norm-matched random direction at the same coefficient (:meth:`DirectionSet.random_like`).
Steered against random is a one-sided Fisher exact test (:mod:`mechsteer.causal.criterion`).
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from mechsteer.activations import trace_sentences
from mechsteer.causal.criterion import ContextRule, RateCount, one_sided_p, passes
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
    reasoning: str = ""  # the trace's reasoning before the sentence (what a grammar reads)
    next_sentence: str = ""


# A behaviour id and a context -> whether the behaviour can come next there (the benchmark's grammar).
ContextFilter = Callable[[int, SteeringContext], bool]


def sufficiency_contexts(
    traces: Sequence[TraceRecord], tokenizer: Any, labeller: SentenceLabeller, *,
    text_labeller: TraceLabeller | None = None, min_words: int = 3,
) -> list[SteeringContext]:
    """Every kept sentence of ``traces`` (base framing) gives a context: the text before it."""
    contexts = []
    for index, record in enumerate(traces):
        _, sentences = trace_sentences(record, index, tokenizer, min_words=min_words, labeller=text_labeller)
        for sentence in sentences:
            contexts.append(SteeringContext(
                record.text[: sentence.char_start], labeller(sentence), index, sentence.sentence_index,
                reasoning=record.text[record.reasoning_char_start : sentence.char_start],
                next_sentence=record.text[sentence.char_start : sentence.char_end]))
    return contexts


def context_rule(possible: ContextFilter | None) -> ContextRule:
    return "another behaviour next" if possible is None else "grammar"


def contexts_for(contexts: Sequence[SteeringContext], behaviour: int,
                 possible: ContextFilter | None = None) -> list[SteeringContext]:
    """The contexts where steering toward ``behaviour`` is measured: where ``possible`` allows it,
    or without a filter, where the next sentence is another behaviour."""
    if possible is not None:
        return [c for c in contexts if possible(behaviour, c)]
    return [c for c in contexts if c.next_behaviour is not None and c.next_behaviour != behaviour]


def require_contexts(contexts: Sequence[SteeringContext], directions: DirectionSet,
                     behaviour_ids: Sequence[int] | None = None, possible: ContextFilter | None = None) -> None:
    """Refuse, in one line naming each behaviour, when one has no context to be measured in:
    checked before any generation, the necessity pass's too."""
    chosen = directions.behaviour_ids if behaviour_ids is None else behaviour_ids
    missing = [f"{b} ({directions.title(b)!r})" for b in chosen if not contexts_for(contexts, b, possible)]
    if missing:
        if possible is not None:
            where = "none is where the benchmark's grammar allows it next"
        else:
            labelled = sum(c.next_behaviour is not None for c in contexts)
            where = f"{labelled} precede a labelled sentence, and none of another behaviour"
        raise ConfigError(
            f"sufficiency has no context for behaviour(s) {', '.join(missing)}: of {len(contexts)} sentence "
            f"boundaries in the train traces, {where}; give it more train traces (n_train) or longer ones "
            "(max_new_tokens), or turn ablations off")


@dataclass
class SufficiencyRow:
    behaviour_id: int
    title: str
    coeff: float
    window: int
    steer_generation: bool
    with_bias: bool
    n_contexts: int  # per condition (the random condition: per random direction)
    contexts: ContextRule
    # Contexts whose next sentence is this behaviour; ``random`` pools the random directions.
    unsteered: RateCount
    steered: RateCount
    random: RateCount
    p_value: float  # one-sided Fisher exact test, steered > random
    passed: bool  # p_value < criterion.ALPHA
    random_rates: list[float] = field(default_factory=list)  # per random direction
    # With a grammar: of the contexts it allows the behaviour in (scanned until n_contexts are found
    # where the unsteered base does not write it), those where the base writes it on its own.
    base_on_its_own: RateCount | None = None

    @classmethod
    def from_json(cls, row: dict[str, Any]) -> SufficiencyRow:
        """A row as ablations.json holds it."""
        counts = {key: RateCount.from_json(row[key]) for key in ("unsteered", "steered", "random")}
        own = row.get("base_on_its_own")
        return cls(**{**row, **counts, "base_on_its_own": None if own is None else RateCount.from_json(own)})


# With a grammar, at most this many times n_contexts allowed contexts are scanned for ones where
# the unsteered base does not write the behaviour (a behaviour it nearly always writes on its own
# would otherwise have every allowed context generated).
SCAN_CHUNKS = 4


def _not_written_unsteered(shuffled: Sequence[SteeringContext], n_contexts: int,
                           unsteered_hits: Callable[[list[str]], list[bool]]) -> tuple[list[SteeringContext], RateCount]:
    """Up to ``n_contexts`` of ``shuffled`` where the unsteered model does not write the behaviour,
    scanning ``n_contexts`` at a time (at most :data:`SCAN_CHUNKS` times), and the count of those
    scanned where it does."""
    chosen: list[SteeringContext] = []
    scanned: list[bool] = []
    for start in range(0, min(len(shuffled), SCAN_CHUNKS * n_contexts), n_contexts):
        chunk = list(shuffled[start : start + n_contexts])
        chunk_hits = unsteered_hits([c.text for c in chunk])
        scanned += chunk_hits
        chosen += [context for context, hit in zip(chunk, chunk_hits, strict=True) if not hit]
        if len(chosen) >= n_contexts:
            break
    return chosen[:n_contexts], RateCount.of(scanned)


def first_labels(labeller: BehaviourLabeller, contexts: Sequence[str], continuations: Sequence[str]) -> list[int | None]:
    """The behaviour of each continuation's first sentence (None: unlabelled or empty)."""
    return [labels[0] if labels else None for labels in labeller(contexts, continuations)]


# The token lengths of a batch's contexts -> the interventions for that batch.
BatchInterventions = Callable[[list[int]], list[Any]]


def next_sentences(model: TransformerBridge, contexts: Sequence[str], interventions: BatchInterventions, *,
                   max_new_tokens: int, stop_strings: Sequence[str], batch_size: int) -> list[str]:
    """Greedy continuations of ``contexts``, batch by batch, under each batch's interventions."""
    if not contexts:
        return []
    token_ids = tokenize_prompts(model, contexts)
    texts: list[str] = []
    for start in range(0, len(token_ids), batch_size):
        chunk = token_ids[start : start + batch_size]
        output = generate(model, chunk, max_new_tokens=max_new_tokens, stop_strings=stop_strings,
                          interventions=interventions([len(ids) for ids in chunk]))
        texts.extend(output.texts)
    return texts


def window_steering(direction: Tensor | None, coeff: float, layer: int, window: int, steer_generation: bool,
                    max_new_tokens: int) -> BatchInterventions:
    """Steer the last ``window`` context positions (and with ``steer_generation`` every generated one)."""

    def interventions(lengths: list[int]) -> list[Any]:
        if direction is None:
            return []
        ends = [length + max_new_tokens + 1 if steer_generation else length for length in lengths]
        return [RowWindowSteering(layer, direction, coeff, [max(0, n - window) for n in lengths], ends)]

    return interventions


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
    possible: ContextFilter | None = None,
    progress: Callable[[str], None] | None = None,
) -> list[SufficiencyRow]:
    """For each behaviour b: up to ``n_contexts`` contexts where b is possible next; steer toward b
    (module docstring).

    ``possible`` says where each behaviour can come next (the benchmark's grammar): the contexts
    are then those where it can and the unsteered base does not write it (scanned in random
    order); without it, those whose next sentence is another behaviour. ``with_bias`` steers with
    ``coeff * (bias + direction)``, as the hybrid generator does (the random control then uses
    its own norm-matched random bias). ``progress`` gets a line per behaviour and coefficient.
    """
    directions.check_model(base_model)
    if with_bias and directions.bias is None:
        raise ValueError("with_bias needs a direction set with a bias")
    if window < 1:
        raise ValueError(f"window must be >= 1; got {window}")
    if n_random < 1:
        raise ValueError(f"n_random must be >= 1; got {n_random}")
    require_contexts(contexts, directions, behaviour_ids, possible)
    controls = [directions.random_like(seed + index) for index in range(n_random)]
    rows = []
    steered_sentences = functools.partial(next_sentences, base_model, max_new_tokens=max_new_tokens,
                                          stop_strings=stop_strings, batch_size=batch_size)
    steering = functools.partial(window_steering, layer=directions.layer, window=window,
                                 steer_generation=steer_generation, max_new_tokens=max_new_tokens)
    for behaviour in directions.behaviour_ids if behaviour_ids is None else behaviour_ids:
        eligible = contexts_for(contexts, behaviour, possible)
        shuffled = random.Random(f"{seed}-{behaviour}").sample(eligible, len(eligible))

        def hits(texts: list[str], continuations: Sequence[str], behaviour: int = int(behaviour)) -> list[bool]:
            if not texts:
                return []
            return [label == behaviour for label in first_labels(labeller, texts, continuations)]

        def unsteered_hits(texts: list[str]) -> list[bool]:
            return hits(texts, steered_sentences(texts, steering(None, 0.0)))

        on_its_own = None
        if possible is None:
            chosen = shuffled[:n_contexts]
            unsteered = RateCount.of(unsteered_hits([c.text for c in chosen]))
        else:
            chosen, on_its_own = _not_written_unsteered(shuffled, n_contexts, unsteered_hits)
            unsteered = RateCount.of([False] * len(chosen))
        texts = [c.text for c in chosen]

        def vector(source: DirectionSet, behaviour: int = int(behaviour)) -> Tensor:
            if not with_bias:
                return source.direction(behaviour)
            if source.bias is None:
                raise ValueError("with_bias needs a direction set with a bias; this one has none")
            return source.direction(behaviour) + source.bias

        for coeff in coeffs:
            steered = RateCount.of(hits(texts, steered_sentences(texts, steering(vector(directions), coeff))))
            random_hits = [hits(texts, steered_sentences(texts, steering(vector(control), coeff)))
                           for control in controls]
            random_count = RateCount.of([hit for control_hits in random_hits for hit in control_hits])
            p_value = one_sided_p(steered, random_count)
            rows.append(SufficiencyRow(
                behaviour_id=int(behaviour), title=directions.title(behaviour), coeff=float(coeff), window=window,
                steer_generation=steer_generation, with_bias=with_bias, n_contexts=len(chosen),
                contexts=context_rule(possible), unsteered=unsteered, steered=steered, random=random_count,
                p_value=p_value, passed=passes(p_value),
                random_rates=[sum(control_hits) / len(control_hits) if control_hits else 0.0
                              for control_hits in random_hits], base_on_its_own=on_its_own,
            ))
            if progress is not None:
                progress(f"  sufficiency {directions.title(behaviour)!r} x{coeff:g}: steered {steered.rate:.2f}, "
                         f"random {random_count.rate:.2f}, unsteered {unsteered.rate:.2f} ({len(chosen)} contexts, "
                         f"p = {p_value:.2g})")
    return rows


__all__ = ["BatchInterventions", "ContextFilter", "RowWindowSteering", "SteeringContext", "SufficiencyRow",
           "context_rule", "contexts_for", "first_labels", "next_sentences", "require_contexts", "sufficiency",
           "sufficiency_contexts", "window_steering"]
