"""The oracle judge: answers the judge prompts from ground-truth labels, for model organisms.

:func:`oracle_judge_from_activations` builds one from the labels an activation run's sentences
carry, described by the ground truth their benchmark registers (:mod:`mechsteer.data.labels`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from pathlib import Path

from mechsteer.activations import Manifest, read_sentences
from mechsteer.core.errors import ConfigError
from mechsteer.data.labels import ground_truth_for
from mechsteer.taxonomy.judge import prompts as judge_prompts
from mechsteer.taxonomy.judge.prompts import format_description_answer, parse_prompt
from mechsteer.taxonomy.metrics import sentence_labels


class OracleJudge:
    """Answers the judge prompts from ground truth, for model organisms.

    ``sentence_labels`` maps each sentence to its planted behaviour label;
    ``label_descriptions`` maps each label to its description. It reads the prompt built by
    :mod:`mechsteer.taxonomy.judge.prompts` and answers as a perfect judge would:

    - describe_behaviour: title = the majority label of the example sentences (ties: the
      alphabetically first), description = that label's description;
    - consistency: "yes" iff the sentence's label is the category's label;
    - completeness: "10" if the sentence's label is the category's label, else "0";
    - pair_similarity: "10" if both categories are the same label, else "0".

    A category's label is its title if that is a known label, else the label whose description
    equals its description. Unknown sentences or categories raise ValueError.
    """

    max_concurrency = 1

    def __init__(self, sentence_labels: Mapping[str, str], label_descriptions: Mapping[str, str]) -> None:
        missing = sorted(set(sentence_labels.values()) - set(label_descriptions))
        if missing:
            raise ValueError(f"labels without a description: {missing}")
        self.sentence_labels = dict(sentence_labels)
        self.label_descriptions = dict(label_descriptions)
        self._label_by_description = {d: label for label, d in label_descriptions.items()}

    def __repr__(self) -> str:
        return (
            f"OracleJudge({len(self.sentence_labels)} sentences, "
            f"labels={sorted(self.label_descriptions)})"
        )

    def _sentence_label(self, sentence: str) -> str:
        try:
            return self.sentence_labels[sentence]
        except KeyError:
            shown = sentence if len(sentence) <= 80 else sentence[:77] + "..."
            raise ValueError(f"OracleJudge has no ground-truth label for sentence {shown!r}") from None

    def _category_label(self, title: str, description: str) -> str:
        if title in self.label_descriptions:
            return title
        if description in self._label_by_description:
            return self._label_by_description[description]
        raise ValueError(
            f"OracleJudge cannot map category {title!r} to a ground-truth label; "
            f"known labels: {sorted(self.label_descriptions)}"
        )

    def complete(
        self, messages: list[dict[str, str]], *, max_tokens: int = 256, temperature: float = 0.0
    ) -> str:
        prompt = parse_prompt(messages)
        if prompt.task == judge_prompts.DESCRIBE_BEHAVIOUR.name:
            sentences = prompt.fields.get("Sentence", ())
            if not sentences:
                raise ValueError("describe_behaviour prompt carries no sentences")
            counts = Counter(self._sentence_label(s) for s in sentences)
            top = max(counts.values())
            label = min(label for label, count in counts.items() if count == top)
            return format_description_answer(label, self.label_descriptions[label])
        if prompt.task in (judge_prompts.CONSISTENCY.name, judge_prompts.COMPLETENESS.name):
            category = self._category_label(prompt.one("Title"), prompt.one("Description"))
            match = self._sentence_label(prompt.one("Sentence")) == category
            if prompt.task == judge_prompts.CONSISTENCY.name:
                return "yes" if match else "no"
            return "10" if match else "0"
        if prompt.task == judge_prompts.PAIR_SIMILARITY.name:
            label_a = self._category_label(prompt.one("Title A"), prompt.one("Description A"))
            label_b = self._category_label(prompt.one("Title B"), prompt.one("Description B"))
            return "10" if label_a == label_b else "0"
        raise ValueError(f"OracleJudge cannot answer task {prompt.task!r}")


def recorded_benchmark(activations_dir: str | Path) -> str | None:
    """The benchmark of the traces an activation run pooled, as its manifest records it."""
    return Manifest.load(activations_dir).benchmark


def oracle_judge_from_activations(activations_dir: str | Path, benchmark: str | None = None) -> OracleJudge:
    """An :class:`OracleJudge` from the ground-truth labels in ``sentences.jsonl``.

    A label is described as the ground truth of ``benchmark`` (default: the benchmark the
    run's manifest records) describes it; any other label ``L`` by "Sentences whose
    ground-truth label is 'L'.".
    """
    sentences = read_sentences(activations_dir)
    labels = sentence_labels(sentences)
    if labels is None:
        raise ConfigError(
            f"--judge oracle needs ground-truth labels, but the sentences in {activations_dir} have "
            "none (they were extracted without a labeller, e.g. from a benchmark without ground truth); "
            "use --judge none, http or local:<model>"
        )
    by_text: dict[str, str] = {}
    for sentence, label in zip(sentences, labels, strict=True):
        previous = by_text.setdefault(sentence.text, label)
        if previous != label:
            raise ValueError(
                f"sentence {sentence.text[:80]!r} carries two labels ({previous!r}, {label!r}); "
                "the oracle judge needs one label per sentence text"
            )
    if benchmark is None:
        benchmark = recorded_benchmark(activations_dir)
    ground_truth = ground_truth_for(benchmark) if benchmark is not None else None
    known: Mapping[str, str] = ground_truth.descriptions if ground_truth is not None else {}
    descriptions = {
        label: known.get(label, f"Sentences whose ground-truth label is {label!r}.")
        for label in sorted(set(labels))
    }
    return OracleJudge(by_text, descriptions)


__all__ = ["OracleJudge", "oracle_judge_from_activations", "recorded_benchmark"]
