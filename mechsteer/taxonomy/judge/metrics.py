"""Judge-based taxonomy metrics, as in the paper (method notes, "Metrics (LLM judge)").

Inputs are plain data: sentences, one integer behaviour id per sentence, and the behaviours'
titles and descriptions; any :class:`mechsteer.taxonomy.judge.base.Judge` answers the prompts of
:mod:`mechsteer.taxonomy.judge.prompts`.

- :func:`example_sentences`: the paper's ~200 examples per behaviour (top 100 by activation
  plus 100 random others from the cluster).
- :func:`describe_behaviours`: the judge writes a Title and Description per behaviour, 5 times.
- :func:`consistency`: yes/no "does the sentence match the description?" on 100 in-cluster and
  100 out-of-cluster sentences per behaviour -> precision, recall, F1; the score is mean F1.
- :func:`completeness`: 0-10 fit of sentences to their assigned behaviour; score = mean / 10.
- :func:`independence`: 0-10 similarity of each pair of behaviours; orthogonality = mean of
  1 - s/10.
- :func:`judge_score`: the mean of the three.

Unparsable answers (no yes/no, no number) are counted and reported in each result and left
out of the score, not read as "no" or 0: a judge that rambles should show up as a high
``n_unparsable``, not as a bad taxonomy. If no answer at all parses, :class:`JudgeParseError`.
"""

from __future__ import annotations

import itertools
import random
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from mechsteer.taxonomy.judge.base import Judge, JudgeError, complete_many
from mechsteer.taxonomy.judge.prompts import (
    COMPLETENESS,
    CONSISTENCY,
    DESCRIBE_BEHAVIOUR,
    PAIR_SIMILARITY,
    completeness_messages,
    consistency_messages,
    describe_behaviour_messages,
    pair_similarity_messages,
    parse_description_answer,
    parse_score,
    parse_yes_no,
)


class JudgeParseError(JudgeError):
    """None of the judge's answers for a metric could be parsed."""


@dataclass(frozen=True)
class BehaviourDescription:
    """A behaviour's judge-written title and description.

    ``candidates`` holds the (title, description) of every parsable repeat, in repeat order;
    ``n_unparsable`` counts the repeats whose answer had no Title/Description (or echoed the prompt).
    """

    behaviour: int
    title: str
    description: str
    candidates: tuple[tuple[str, str], ...] = ()
    n_unparsable: int = 0


@dataclass(frozen=True)
class BehaviourConsistency:
    behaviour: int
    true_positives: int
    false_positives: int
    false_negatives: int
    true_negatives: int
    n_unparsable: int
    precision: float
    recall: float
    f1: float


@dataclass(frozen=True)
class ConsistencyResult:
    per_behaviour: dict[int, BehaviourConsistency]
    mean_f1: float
    n_judged: int
    n_unparsable: int


@dataclass(frozen=True)
class CompletenessResult:
    """``score`` = mean over all parsed ratings / 10; ``per_behaviour`` = each behaviour's mean / 10."""

    score: float
    per_behaviour: dict[int, float]
    n_judged: int
    n_unparsable: int


@dataclass(frozen=True)
class IndependenceResult:
    """``orthogonality`` = mean over parsed pairs of 1 - similarity/10."""

    orthogonality: float
    pair_similarity: dict[tuple[int, int], float]
    n_judged: int
    n_unparsable: int


@dataclass(frozen=True)
class JudgeScores:
    """The three judge metrics; ``final`` = their mean (consistency F1, completeness,
    orthogonality), the paper's layer/K selection score."""

    consistency: ConsistencyResult
    completeness: CompletenessResult
    independence: IndependenceResult
    final: float = field(init=False)

    def __post_init__(self) -> None:
        final = (
            self.consistency.mean_f1 + self.completeness.score + self.independence.orthogonality
        ) / 3.0
        object.__setattr__(self, "final", final)


def _rng(seed: int, task: str, behaviour: int, repeat: int = 0) -> random.Random:
    # A string seed is hashed deterministically (sha512) by random.Random, unlike hash().
    return random.Random(f"{seed}:{task}:{behaviour}:{repeat}")


def _sample(rng: random.Random, items: Sequence[int], n: int) -> list[int]:
    """Up to n items without replacement, kept in their original order."""
    if n >= len(items):
        return list(items)
    return sorted(rng.sample(list(items), n))


def _check_assignments(
    sentences: Sequence[str], assignments: Sequence[int], descriptions: Mapping[int, BehaviourDescription]
) -> None:
    if len(sentences) != len(assignments):
        raise ValueError(
            f"sentences and assignments must have the same length, got {len(sentences)} and {len(assignments)}"
        )
    if not descriptions:
        raise ValueError("descriptions is empty: describe the behaviours first")
    unknown = sorted({int(a) for a in assignments} - set(descriptions))
    if unknown:
        raise ValueError(
            f"assignments use behaviour ids without a description: {unknown[:10]}; "
            f"described: {sorted(descriptions)}"
        )


def example_sentences(
    sentences: Sequence[str],
    assignments: Sequence[int],
    activations: Sequence[float],
    *,
    n_top: int = 100,
    n_random: int = 100,
    seed: int = 0,
) -> dict[int, list[str]]:
    """Per behaviour: its ``n_top`` highest-activating sentences, then ``n_random`` random others.

    ``activations[i]`` is sentence i's activation on its assigned behaviour (the SAE latent).
    The random ones are drawn from the rest of the same cluster. Ties keep sentence order.
    """
    if not len(sentences) == len(assignments) == len(activations):
        raise ValueError(
            "sentences, assignments and activations must have the same length, got "
            f"{len(sentences)}, {len(assignments)}, {len(activations)}"
        )
    members: dict[int, list[int]] = {}
    for index, behaviour in enumerate(assignments):
        members.setdefault(int(behaviour), []).append(index)
    examples: dict[int, list[str]] = {}
    for behaviour in sorted(members):
        indices = members[behaviour]
        by_activation = sorted(indices, key=lambda i: -float(activations[i]))
        top = by_activation[:n_top]
        rest = by_activation[n_top:]
        randoms = _sample(_rng(seed, "examples", behaviour), rest, n_random)
        examples[behaviour] = [sentences[i] for i in top + randoms]
    return examples


def describe_behaviours(
    judge: Judge,
    examples: Mapping[int, Sequence[str]],
    *,
    n_repeats: int = 5,
    seed: int = 0,
    concurrency: int | None = None,
) -> dict[int, BehaviourDescription]:
    """The judge titles and describes each behaviour from its example sentences, ``n_repeats`` times.

    Each repeat shows the examples in a different seeded order (so repeats are distinct, cacheable
    prompts). Combination: the most frequent title among parsable repeats (compared case- and
    whitespace-insensitively; ties go to the earliest repeat), with the description of the first
    repeat that gave it. A behaviour with no parsable repeat raises :class:`JudgeParseError`.
    """
    if n_repeats < 1:
        raise ValueError(f"n_repeats must be >= 1, got {n_repeats}")
    if not examples:
        raise ValueError("examples is empty")
    behaviours = sorted(examples)
    prompts = []
    for behaviour in behaviours:
        sentences = list(examples[behaviour])
        if not sentences:
            raise ValueError(f"behaviour {behaviour} has no example sentences")
        for repeat in range(n_repeats):
            order = list(sentences)
            _rng(seed, "describe", behaviour, repeat).shuffle(order)
            prompts.append(describe_behaviour_messages(order))
    answers = complete_many(
        judge, prompts, max_tokens=DESCRIBE_BEHAVIOUR.max_tokens, concurrency=concurrency
    )
    descriptions: dict[int, BehaviourDescription] = {}
    for position, behaviour in enumerate(behaviours):
        raw = answers[position * n_repeats : (position + 1) * n_repeats]
        sentences = list(examples[behaviour])
        parsed = [p for p in (parse_description_answer(a, sentences) for a in raw) if p is not None]
        if not parsed:
            shown = "; ".join(repr(a[:120]) for a in raw[:3])
            raise JudgeParseError(
                f"no Title/Description in any of the {n_repeats} judge answers for behaviour "
                f"{behaviour} (each needs a 'Title:' and a 'Description:' line of its own, not copied "
                f"from the prompt): {shown}"
            )
        normalised = [" ".join(title.lower().split()) for title, _ in parsed]
        counts = Counter(normalised)
        top = max(counts.values())
        winner = next(i for i, n in enumerate(normalised) if counts[n] == top)
        title, description = parsed[winner]
        descriptions[behaviour] = BehaviourDescription(
            behaviour=behaviour,
            title=title,
            description=description,
            candidates=tuple(parsed),
            n_unparsable=len(raw) - len(parsed),
        )
    return descriptions


def _f1(true_positives: int, false_positives: int, false_negatives: int) -> tuple[float, float, float]:
    """(precision, recall, F1); each is 0 where its denominator is 0 (sklearn's zero_division=0)."""
    predicted = true_positives + false_positives
    actual = true_positives + false_negatives
    precision = true_positives / predicted if predicted else 0.0
    recall = true_positives / actual if actual else 0.0
    denominator = 2 * true_positives + false_positives + false_negatives
    f1 = 2 * true_positives / denominator if denominator else 0.0
    return precision, recall, f1


def consistency(
    judge: Judge,
    descriptions: Mapping[int, BehaviourDescription],
    sentences: Sequence[str],
    assignments: Sequence[int],
    *,
    n_in: int = 100,
    n_out: int = 100,
    seed: int = 0,
    concurrency: int | None = None,
) -> ConsistencyResult:
    """Per behaviour, the judge says yes/no for ``n_in`` sentences of the cluster and ``n_out``
    from outside it (seeded samples; all of them if fewer). In-cluster = positives.

    F1 per behaviour; a behaviour with no positives and no "yes" scores 0. ``mean_f1`` averages
    over behaviours. Unparsable answers are left out of the counts and reported.
    """
    _check_assignments(sentences, assignments, descriptions)
    if n_in < 1 or n_out < 0:
        raise ValueError(f"need n_in >= 1 and n_out >= 0, got n_in={n_in}, n_out={n_out}")
    behaviours = sorted(descriptions)
    plan: list[tuple[int, bool]] = []  # (behaviour, sentence is in its cluster)
    prompts = []
    for behaviour in behaviours:
        inside = [i for i, a in enumerate(assignments) if int(a) == behaviour]
        outside = [i for i, a in enumerate(assignments) if int(a) != behaviour]
        rng = _rng(seed, "consistency", behaviour)
        chosen = [(i, True) for i in _sample(rng, inside, n_in)]
        chosen += [(i, False) for i in _sample(rng, outside, n_out)]
        description = descriptions[behaviour]
        for index, is_inside in chosen:
            plan.append((behaviour, is_inside))
            prompts.append(
                consistency_messages(description.title, description.description, sentences[index])
            )
    answers = complete_many(judge, prompts, max_tokens=CONSISTENCY.max_tokens, concurrency=concurrency)
    counts: dict[int, Counter[str]] = {b: Counter() for b in behaviours}
    for (behaviour, is_inside), answer in zip(plan, answers, strict=True):
        verdict = parse_yes_no(answer)
        if verdict is None:
            counts[behaviour]["unparsable"] += 1
        elif is_inside:
            counts[behaviour]["tp" if verdict else "fn"] += 1
        else:
            counts[behaviour]["fp" if verdict else "tn"] += 1
    n_unparsable = sum(c["unparsable"] for c in counts.values())
    if prompts and n_unparsable == len(prompts):
        raise JudgeParseError(f"none of the {len(prompts)} consistency answers contains yes or no, e.g. {answers[0][:80]!r}")
    per_behaviour = {}
    for behaviour in behaviours:
        c = counts[behaviour]
        precision, recall, f1 = _f1(c["tp"], c["fp"], c["fn"])
        per_behaviour[behaviour] = BehaviourConsistency(
            behaviour=behaviour,
            true_positives=c["tp"],
            false_positives=c["fp"],
            false_negatives=c["fn"],
            true_negatives=c["tn"],
            n_unparsable=c["unparsable"],
            precision=precision,
            recall=recall,
            f1=f1,
        )
    mean_f1 = sum(r.f1 for r in per_behaviour.values()) / len(per_behaviour)
    return ConsistencyResult(
        per_behaviour=per_behaviour, mean_f1=mean_f1, n_judged=len(prompts), n_unparsable=n_unparsable
    )


def completeness(
    judge: Judge,
    descriptions: Mapping[int, BehaviourDescription],
    sentences: Sequence[str],
    assignments: Sequence[int],
    *,
    n_per_behaviour: int = 100,
    seed: int = 0,
    concurrency: int | None = None,
) -> CompletenessResult:
    """The judge rates 0-10 how well each of up to ``n_per_behaviour`` sentences per behaviour
    (seeded sample) fits its assigned behaviour. ``score`` = mean of all parsed ratings / 10,
    pooled over sentences (behaviours with fewer sentences weigh less)."""
    _check_assignments(sentences, assignments, descriptions)
    if n_per_behaviour < 1:
        raise ValueError(f"n_per_behaviour must be >= 1, got {n_per_behaviour}")
    plan: list[int] = []
    prompts = []
    for behaviour in sorted(descriptions):
        inside = [i for i, a in enumerate(assignments) if int(a) == behaviour]
        description = descriptions[behaviour]
        for index in _sample(_rng(seed, "completeness", behaviour), inside, n_per_behaviour):
            plan.append(behaviour)
            prompts.append(
                completeness_messages(description.title, description.description, sentences[index])
            )
    if not prompts:
        raise ValueError("no sentences to rate: every behaviour is empty")
    answers = complete_many(judge, prompts, max_tokens=COMPLETENESS.max_tokens, concurrency=concurrency)
    ratings: dict[int, list[float]] = {}
    n_unparsable = 0
    for behaviour, answer in zip(plan, answers, strict=True):
        score = parse_score(answer)
        if score is None:
            n_unparsable += 1
        else:
            ratings.setdefault(behaviour, []).append(score)
    all_ratings = [r for rs in ratings.values() for r in rs]
    if not all_ratings:
        raise JudgeParseError(f"none of the {len(prompts)} completeness answers contains a number, e.g. {answers[0][:80]!r}")
    return CompletenessResult(
        score=sum(all_ratings) / len(all_ratings) / 10.0,
        per_behaviour={b: sum(rs) / len(rs) / 10.0 for b, rs in sorted(ratings.items())},
        n_judged=len(prompts),
        n_unparsable=n_unparsable,
    )


def independence(
    judge: Judge,
    descriptions: Mapping[int, BehaviourDescription],
    *,
    concurrency: int | None = None,
) -> IndependenceResult:
    """The judge rates 0-10 the similarity of every unordered pair of behaviours (lower id first
    in the prompt); ``orthogonality`` = mean over parsed pairs of 1 - s/10."""
    behaviours = sorted(descriptions)
    if len(behaviours) < 2:
        raise ValueError(f"independence needs at least 2 behaviours, got {len(behaviours)}")
    pairs = list(itertools.combinations(behaviours, 2))
    prompts = [
        pair_similarity_messages(
            descriptions[a].title, descriptions[a].description, descriptions[b].title, descriptions[b].description
        )
        for a, b in pairs
    ]
    answers = complete_many(judge, prompts, max_tokens=PAIR_SIMILARITY.max_tokens, concurrency=concurrency)
    similarity: dict[tuple[int, int], float] = {}
    for pair, answer in zip(pairs, answers, strict=True):
        score = parse_score(answer)
        if score is not None:
            similarity[pair] = score
    if not similarity:
        raise JudgeParseError(f"none of the {len(prompts)} pair-similarity answers contains a number, e.g. {answers[0][:80]!r}")
    orthogonality = sum(1.0 - s / 10.0 for s in similarity.values()) / len(similarity)
    return IndependenceResult(
        orthogonality=orthogonality,
        pair_similarity=similarity,
        n_judged=len(prompts),
        n_unparsable=len(pairs) - len(similarity),
    )


def judge_score(
    judge: Judge,
    descriptions: Mapping[int, BehaviourDescription],
    sentences: Sequence[str],
    assignments: Sequence[int],
    *,
    n_in: int = 100,
    n_out: int = 100,
    n_per_behaviour: int = 100,
    seed: int = 0,
    concurrency: int | None = None,
) -> JudgeScores:
    """All three judge metrics; ``.final`` is their mean (the paper's selection score)."""
    return JudgeScores(
        consistency=consistency(
            judge, descriptions, sentences, assignments, n_in=n_in, n_out=n_out, seed=seed, concurrency=concurrency
        ),
        completeness=completeness(
            judge, descriptions, sentences, assignments, n_per_behaviour=n_per_behaviour, seed=seed, concurrency=concurrency
        ),
        independence=independence(judge, descriptions, concurrency=concurrency),
    )
