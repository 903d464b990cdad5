"""Extending mechsteer from outside the package: a benchmark with its own grader, a timing policy,
a direction method and a generation engine, registered through mechsteer's registries and then
run with ``mechsteer run``.

In a package of your own, declare :func:`register` as a plug-in entry point and mechsteer calls it
the first time a registry misses a name (``pyproject.toml``)::

    [project.entry-points."mechsteer.plugins"]
    countdown = "extending_mechsteer:register"

Then ``benchmark: countdown``, ``policy: every_other_disagreement``, ``direction_method: median``,
``engine: length_sorted`` and ``controls: [late_bias]`` work in any run config.
``docs/extending.md`` walks through it; ``tests/experiment/test_extending.py`` runs it.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from mechsteer.data.benchmarks import PluginBenchmark, Problem, register_benchmark
from mechsteer.engines import (
    BridgeEngine,
    EngineInputs,
    EngineSpec,
    GenerationEngine,
    GenerationRequest,
    GenerationSettings,
    register_engine,
)
from mechsteer.engines.base import CompletionGroup, prompt_token_ids
from mechsteer.grading.answers import Grader, numbers_equal, register_grader
from mechsteer.hybrid.comparisons import (
    ComparisonInputs,
    ComparisonRun,
    ComparisonSpec,
    register_comparison,
)
from mechsteer.hybrid.timing import (
    PolicyDecision,
    PolicyInput,
    PolicySpec,
    ReplayPolicy,
    SAEArgmaxPolicy,
    register_timing_policy,
)
from mechsteer.steering import (
    NO_LABEL,
    SITE,
    DirectionInputs,
    DirectionMethodSpec,
    DirectionSet,
    direction_provenance,
    pool_sentences,
    register_direction_method,
    sentence_labels,
)

BENCHMARK = "countdown"
SPLITS = ("train", "validation", "test")
_SIZES = {"train": 64, "validation": 16, "test": 32}


def load_split(split: str) -> list[Problem]:
    """Small subtraction problems, the same every time (a split's problems are fixed and ordered)."""
    offset = {"train": 0, "validation": 1000, "test": 2000}[split]
    problems = []
    for index in range(_SIZES[split]):
        start, step = 10 + (offset + 37 * index) % 190, 1 + (offset + 7 * index) % 5
        problems.append(Problem(id=f"{BENCHMARK}/{split}/{index}", question=f"Count down from {start} by {step}, "
                                f"three times. Where do you end?", answer=str(start - 3 * step), solution=None,
                                benchmark=BENCHMARK, metadata={"source": "examples/extending_mechsteer.py"}))
    return problems


_ENDS_AT = re.compile(r"end(?:s)? at (-?\d+)", re.IGNORECASE)


def extract_end(text: str) -> str | None:
    """The number after the last "end at"/"ends at", else None."""
    found = _ENDS_AT.findall(text)
    return found[-1] if found else None


@dataclass
class EveryOtherDisagreementPolicy(SAEArgmaxPolicy):
    """The paper's policy (steer where the two models' greedy tokens disagree, with the SAE's top
    latent), but only at even steps: half the steering, for a cheaper hybrid."""

    name: str = "every_other_disagreement"  # type: ignore[assignment]

    def decide(self, state: PolicyInput) -> PolicyDecision:
        decision = super().decide(state)
        even = torch.full_like(decision.steer, state.step % 2 == 0)
        return PolicyDecision(steer=decision.steer & even, behaviour=decision.behaviour,
                              latent_values=decision.latent_values, latent_ids=decision.latent_ids)


def make_policy(spec: PolicySpec) -> EveryOtherDisagreementPolicy:
    return EveryOtherDisagreementPolicy(spec.classifier, spec.behaviour_ids, read=spec.read)


def build_median_directions(inputs: DirectionInputs) -> DirectionSet:
    """Difference of medians: per behaviour, the coordinate-wise median of its sentences' pooled
    activations minus the median over all kept sentences (a few outlying sentences move it less
    than they move a mean); the bias likewise, thinking traces minus the base model's own."""
    base, labels, settings = inputs.base, inputs.labels, inputs.settings
    pooled = pool_sentences(base, inputs.thinking_traces, settings.layer, pooling=settings.pooling,
                            labeller=labels.text_labeller)
    sentence_ids = sentence_labels(pooled.sentences, labels.labeller)
    present = [(b, title) for b, title in zip(labels.behaviour_ids, labels.titles, strict=True)
               if bool((sentence_ids == b).any())]
    skipped = [b for b in labels.behaviour_ids if b not in dict(present)]
    if skipped and not inputs.skip_empty:
        raise ValueError(f"behaviours {skipped} have no labelled sentences; cannot take their medians")
    overall = pooled.vectors.median(dim=0).values
    directions = torch.stack([pooled.vectors[sentence_ids == b].median(dim=0).values - overall for b, _ in present])
    bias = None
    if inputs.base_traces:
        own = pool_sentences(base, inputs.base_traces, settings.layer, pooling=settings.pooling)
        bias = overall - own.vectors.median(dim=0).values
    return DirectionSet(
        model_name=base.cfg.model_name, d_model=base.cfg.d_model, n_layers=base.cfg.n_layers, layer=settings.layer,
        site=SITE, method="median", behaviour_ids=[b for b, _ in present], titles=[title for _, title in present],
        directions=directions, bias=bias,
        provenance=direction_provenance(base, "median", pooling=settings.pooling, n_sentences=len(pooled.sentences),
                                        n_labelled=int((sentence_ids != NO_LABEL).sum()), skipped_behaviours=skipped))


class LengthSortedBridgeEngine:
    """Generation on the loaded bridge with the prompts batched by length, shortest first: a batch
    of similar lengths carries less left padding. Completions come back under their own indices."""

    kind = "length_sorted"

    def __init__(self, model: Any) -> None:
        self.bridge = BridgeEngine(model)
        self.model_name, self.tokenizer = self.bridge.model_name, self.bridge.tokenizer

    def record_settings(self) -> dict[str, Any]:
        return {**self.bridge.record_settings(), "engine": self.kind}

    def generate(self, requests: Sequence[GenerationRequest], settings: GenerationSettings
                 ) -> Iterator[CompletionGroup]:
        order = sorted(range(len(requests)), key=lambda i: len(prompt_token_ids(self.tokenizer, requests[i].prompt)))
        for group in self.bridge.generate([requests[i] for i in order], settings):
            yield [(order[position], completion) for position, completion in group]


def make_length_sorted_engine(inputs: EngineInputs) -> GenerationEngine:
    return LengthSortedBridgeEngine(inputs.require_model("length_sorted"))


# A control of one's own: the bias alone, at each of the hybrid's steered positions moved LATE_BY tokens
# later (right behaviour-free nudge, wrong time): does the hybrid's timing matter beyond its rate?
LATE_BY = 3


def late_bias(inputs: ComparisonInputs) -> ComparisonRun:
    late = {problem: [position + LATE_BY for position in positions]
            for problem, positions in inputs.steered_positions().items()}
    return ComparisonRun(ReplayPolicy(late), inputs.directions, {"late_by": LATE_BY})


def register() -> None:
    register_benchmark(PluginBenchmark(BENCHMARK, SPLITS, load_split), replace=True)
    register_grader(Grader(BENCHMARK, extract_end, numbers_equal), replace=True)
    register_timing_policy("every_other_disagreement", make_policy, replace=True)
    register_direction_method(DirectionMethodSpec("median", build_median_directions, "difference-of-medians directions"),
                              replace=True)
    register_engine(EngineSpec("length_sorted", "bridge", make_length_sorted_engine), replace=True)
    register_comparison(ComparisonSpec("late_bias", "control", late_bias, needs_bias=True), replace=True)
