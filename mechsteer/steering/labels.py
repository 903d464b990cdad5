"""Behaviour labels of sentences: the one place every stage gets them from.

Two kinds of labeller, both giving behaviour ids (``None``: no behaviour claims the sentence):

- a :data:`SentenceLabeller` labels a *pooled* sentence (:class:`~mechsteer.activations.SentenceRecord`)
  of a known trace: by its ground-truth title (:func:`ground_truth_labeller`, for traces pooled
  with a :data:`~mechsteer.data.labels.TraceLabeller`), or by another run's labels of the same
  sentence, e.g. a taxonomy's assignments (:func:`aligned_labeller`). Direction building uses these.
- a :class:`BehaviourLabeller` labels every sentence of *generated* text given its context: the
  benchmark's ground truth (:func:`ground_truth_behaviour_labeller`), or for real models the
  taxonomy's SAE on the thinking model's pooled sentence activations (:class:`SAEBehaviourLabeller`).
  The causal stage uses these.

:class:`BehaviourLabels` bundles a sentence labeller with the behaviours it names, from a
benchmark's registered ground truth (:func:`ground_truth_labels`) or from a taxonomy
(:func:`taxonomy_labels`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import torch

from mechsteer.activations import (
    Manifest,
    SentenceRecord,
    pool_batch,
    read_sentences,
    trace_sentences,
)
from mechsteer.core.errors import ConfigError, ProvenanceError
from mechsteer.core.provenance import mismatch
from mechsteer.core.tensor_types import Int, Tensor
from mechsteer.data.labels import GroundTruth, TraceLabeller, require_ground_truth
from mechsteer.data.traces import TraceRecord
from mechsteer.data.traces import traces_digest as digest_of_traces
from mechsteer.taxonomy.artefact import Taxonomy
from mechsteer.taxonomy.sae import TopKSAE

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

NO_LABEL = -1  # a sentence no behaviour claims (e.g. an organism's "other" sentence)

# Gives a pooled sentence its behaviour id, or None when no behaviour claims it.
SentenceLabeller = Callable[[SentenceRecord], int | None]


# --------------------------------------------------------------------------------------------
# Pooled sentences


def ground_truth_labeller(titles: Sequence[str]) -> SentenceLabeller:
    """Labels sentences pooled with a ground-truth labeller (``SentenceRecord.label``): id = index in ``titles``."""
    index = {title: position for position, title in enumerate(titles)}

    def label(sentence: SentenceRecord) -> int | None:
        if sentence.label is None:
            raise ValueError("sentence has no ground-truth label: pool the traces with a labeller "
                             "(e.g. the benchmark's GroundTruth.label_reasoning)")
        return index.get(sentence.label)

    return label


def aligned_labeller(sentences: Sequence[SentenceRecord], labels: Sequence[int], *,
                     reasoning_starts: Sequence[int] | None = None) -> SentenceLabeller:
    """Labels from another run's sentences (e.g. a taxonomy's assignments), matched by trace and by
    span *within the trace's reasoning*, so that a trace re-framed under another prompt (the base
    model's) finds its labels. A matched sentence whose text differs is refused: the traces changed.

    ``reasoning_starts`` (each trace's ``reasoning_char_start``, by trace index) places sentences
    pooled by an older mechsteer, which did not record it.
    """
    if len(sentences) != len(labels):
        raise ValueError(f"need one label per sentence; got {len(labels)} labels for {len(sentences)} sentences")
    table: dict[tuple[int, int, int], tuple[int, str, str]] = {}
    for sentence, assigned in zip(sentences, labels, strict=True):
        if sentence.reasoning_char_start is None and reasoning_starts is not None:
            sentence = dataclasses.replace(sentence, reasoning_char_start=reasoning_starts[sentence.trace_index])
        start, end = sentence.reasoning_span()
        table[(sentence.trace_index, start, end)] = (int(assigned), sentence.text, sentence.problem_id)

    def label(sentence: SentenceRecord) -> int | None:
        start, end = sentence.reasoning_span()
        entry = table.get((sentence.trace_index, start, end))
        if entry is None:
            return None
        behaviour, text, problem_id = entry
        if text != sentence.text or (problem_id and sentence.problem_id and problem_id != sentence.problem_id):
            raise ProvenanceError(
                f"trace {sentence.trace_index} ({sentence.problem_id!r}): the sentence at reasoning characters "
                f"{start}-{end} reads {sentence.text!r}, but the labelled one ({problem_id!r}) read {text!r}; "
                "label the traces the labels were made from (the same file, in the same order)")
        return behaviour

    return label


def sentence_labels(sentences: Sequence[SentenceRecord], labeller: SentenceLabeller) -> Int[Tensor, " n"]:
    """Behaviour id per sentence, ``NO_LABEL`` (-1) where none."""
    labels = [labeller(sentence) for sentence in sentences]
    return torch.tensor([NO_LABEL if label is None else int(label) for label in labels], dtype=torch.long)


def labelled_counts(traces: Sequence[TraceRecord], tokenizer: object, labeller: SentenceLabeller,
                    behaviour_ids: Sequence[int], *, text_labeller: TraceLabeller | None = None,
                    min_words: int = 3) -> dict[int, int]:
    """How many kept sentences of ``traces`` each behaviour labels: tokenisation only, no forward
    pass, so that a stage can check its labels before its expensive work."""
    counts = {int(behaviour): 0 for behaviour in behaviour_ids}
    for index, record in enumerate(traces):
        _, sentences = trace_sentences(record, index, tokenizer, min_words=min_words, labeller=text_labeller)
        for sentence in sentences:
            behaviour = labeller(sentence)
            if behaviour is not None and behaviour in counts:
                counts[behaviour] += 1
    return counts


def require_labelled(counts: dict[int, int], titles: Sequence[str], need: int, what: str) -> None:
    """Refuse, in one line naming each short behaviour, when one has fewer than ``need`` labelled sentences."""
    title_of = dict(zip(counts, titles, strict=True))
    short = [f"behaviour {b} ({title_of[b]!r}) has {n}" for b, n in counts.items() if n < need]
    if short:
        raise ConfigError(f"{what} need at least {need} labelled sentence(s) per behaviour, but {'; '.join(short)}; "
                          "give them more train traces (n_train) or longer ones (max_new_tokens), or fewer "
                          "behaviours (n_latents)")


@dataclass
class BehaviourLabels:
    """Where sentence labels come from: the taxonomy's assignments, or a benchmark's ground truth."""

    labeller: SentenceLabeller
    behaviour_ids: list[int]
    titles: list[str]
    text_labeller: TraceLabeller | None = None
    taxonomy: Taxonomy | None = None  # when labels come from one
    source: str = ""
    taxonomy_dir: str | None = None  # the taxonomy's folder, when labels come from one


def ground_truth_labels(benchmark: str = "organism") -> BehaviourLabels:
    """The benchmark's planted behaviours; ids are indices into its ``GroundTruth.behaviours``."""
    ground_truth = require_ground_truth(benchmark)
    titles = list(ground_truth.behaviours)
    return BehaviourLabels(ground_truth_labeller(titles), list(range(len(titles))), titles,
                           ground_truth.label_reasoning, None, ground_truth.source)


def taxonomy_labels(taxonomy_dir: str | Path, n_traces: int | None = None, *,
                    traces_digest: str | None = None,
                    traces: Sequence[TraceRecord] | None = None) -> BehaviourLabels:
    """Labels from a taxonomy: its sentence assignments, matched to sentences by trace index and by
    span within the trace's reasoning (:func:`aligned_labeller`), so they label the same traces
    under any framing.

    The traces must be the ones (same file, same order) the taxonomy's activations came from:
    ``n_traces`` and ``traces_digest`` (:func:`mechsteer.data.traces.traces_digest` of the traces
    as read from their file) are checked against the activations' manifest when given; ``traces``
    (as read from their file) gives both, and places sentences of activations pooled before
    sentences recorded where their reasoning starts.
    """
    if traces is not None:
        n_traces, traces_digest = len(traces), digest_of_traces(traces)
    taxonomy = Taxonomy.load(taxonomy_dir)
    activations_dir = taxonomy.provenance.activations_dir
    manifest = Manifest.load(activations_dir)
    way_out = "pass the traces the taxonomy was built from (or the taxonomy built from these traces)"
    if n_traces is not None and manifest.n_traces != n_traces:
        raise ProvenanceError(f"the taxonomy's activations ({activations_dir}) cover {manifest.n_traces} traces, "
                              f"but {n_traces} traces were given; {way_out}")
    if traces_digest is not None and manifest.traces_digest is not None and manifest.traces_digest != traces_digest:
        raise mismatch(f"the taxonomy {taxonomy_dir} (activations {activations_dir})", "traces of digest",
                       manifest.traces_digest, traces_digest, way_out)
    sentences = read_sentences(activations_dir)
    starts = None if traces is None else [record.reasoning_char_start for record in traces]
    labeller = aligned_labeller(sentences, taxonomy.assignments.tolist(), reasoning_starts=starts)
    return BehaviourLabels(labeller, taxonomy.behaviour_ids, [b.title for b in taxonomy.behaviours], None, taxonomy,
                           "taxonomy", str(taxonomy_dir))


# --------------------------------------------------------------------------------------------
# Generated text


@runtime_checkable
class BehaviourLabeller(Protocol):
    """Behaviour ids (None: no behaviour) of each sentence of each continuation, given its context."""

    def __call__(self, contexts: Sequence[str], continuations: Sequence[str]) -> list[list[int | None]]: ...


def ground_truth_behaviour_labeller(ground_truth: GroundTruth, titles: Sequence[str],
                                    behaviour_ids: Sequence[int]) -> BehaviourLabeller:
    """The benchmark's ground truth; a sentence of behaviour ``titles[i]`` gets ``behaviour_ids[i]``.

    ``label_reasoning`` returns the sentences in text order, so each continuation's labels are
    in sentence order.
    """
    ids = {title: int(b) for title, b in zip(titles, behaviour_ids, strict=True)}

    def label(contexts: Sequence[str], continuations: Sequence[str]) -> list[list[int | None]]:
        return [[ids.get(title) for title in ground_truth.label_reasoning(text).values()] for text in continuations]

    return label


@dataclass
class SAEBehaviourLabeller:
    """The taxonomy's classifier: pool each continuation sentence in ``model`` at ``layer``, argmax SAE latent."""

    model: TransformerBridge
    sae: TopKSAE
    layer: int
    include_previous_token: bool = True
    min_words: int = 3
    batch_size: int = 8

    def __call__(self, contexts: Sequence[str], continuations: Sequence[str]) -> list[list[int | None]]:
        results: list[list[int | None]] = []
        for start in range(0, len(contexts), self.batch_size):
            batch_ids, spans, owners = [], [], []
            chunk = list(zip(contexts[start : start + self.batch_size], continuations[start : start + self.batch_size],
                             strict=True))
            for row, (context, continuation) in enumerate(chunk):
                ids, sentences = trace_sentences(_text_record(context, continuation), row, self.model.tokenizer,
                                                 min_words=self.min_words)
                batch_ids.append(ids)
                for sentence in sentences:
                    first = sentence.tok_start - 1 if self.include_previous_token and sentence.tok_start > 0 else sentence.tok_start
                    spans.append((row, first, sentence.tok_end))
                    owners.append(row)
            labels: list[list[int | None]] = [[] for _ in chunk]
            if spans:
                pooled = pool_batch(self.model, batch_ids, spans, [self.layer])[self.layer]
                for owner, latent in zip(owners, self.sae.classify_tokens(pooled).tolist(), strict=True):
                    labels[owner].append(int(latent))
            results.extend(labels)
        return results


def _text_record(context: str, continuation: str) -> TraceRecord:
    return TraceRecord(
        problem_id="", benchmark="", prompt=context, text=context + continuation, generation=continuation,
        reasoning=continuation, answer_part="", reasoning_char_start=len(context),
        reasoning_char_end=len(context) + len(continuation), token_ids=[], n_prompt_tokens=0, prediction=None,
        reference="", correct=False, finish_reason="", model="",
    )


__all__ = [
    "NO_LABEL", "BehaviourLabeller", "BehaviourLabels", "SAEBehaviourLabeller", "SentenceLabeller",
    "aligned_labeller", "ground_truth_behaviour_labeller", "ground_truth_labeller", "ground_truth_labels",
    "labelled_counts", "require_labelled",
    "sentence_labels", "taxonomy_labels",
]
