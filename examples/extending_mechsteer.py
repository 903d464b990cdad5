"""Extending mechsteer from outside the package: a benchmark with its own grader and a timing
policy, registered through mechsteer's registries and then run with ``mechsteer run``.

In a package of your own, declare :func:`register` as a plug-in entry point and mechsteer calls it
the first time a registry misses a name (``pyproject.toml``)::

    [project.entry-points."mechsteer.plugins"]
    countdown = "extending_mechsteer:register"

Then ``benchmark: countdown`` and ``policy: every_other_disagreement`` work in any run config.
``docs/extending.md`` walks through it; ``tests/experiment/test_extending.py`` runs it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from mechsteer.data.benchmarks import PluginBenchmark, Problem, register_benchmark
from mechsteer.grading.answers import Grader, numbers_equal, register_grader
from mechsteer.hybrid.timing import (
    PolicyDecision,
    PolicyInput,
    PolicySpec,
    SAEArgmaxPolicy,
    register_timing_policy,
)

BENCHMARK = "countdown"
SPLITS = ("train", "validation", "test")
_SIZES = {"train": 64, "validation": 16, "test": 32}


def load_split(split: str) -> list[Problem]:
    """Small subtraction problems, the same every time (a split's problems are fixed and ordered)."""
    offset = {"train": 0, "validation": 1000, "test": 2000}[split]
    problems = []
    for index in range(_SIZES[split]):
        start, step = 20 + (offset + index) % 50, 1 + (offset + 7 * index) % 5
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


def register() -> None:
    register_benchmark(PluginBenchmark(BENCHMARK, SPLITS, load_split), replace=True)
    register_grader(Grader(BENCHMARK, extract_end, numbers_equal), replace=True)
    register_timing_policy("every_other_disagreement", make_policy, replace=True)
