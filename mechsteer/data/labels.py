"""Ground-truth behaviour labels of a benchmark's traces, where the benchmark has them.

Real benchmarks have none: their behaviours are discovered by the taxonomy. A benchmark whose
traces follow a known grammar (mechsteer's model organisms) registers a :class:`GroundTruth`
through a plug-in (:mod:`mechsteer.core.plugins`); the generic stages ask
:func:`ground_truth_for` and never import the plug-in. Ground truth only ever *measures*
(ARI, the oracle judge, ablation rates on the organisms and the contexts where the grammar allows
each behaviour, the oracle-timing baseline); nothing
selects a setting with it unless a caller asks for the oracle explicitly.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from mechsteer.core.plugins import load_plugins

# A trace's sentences that carry a behaviour: (char_start, char_end) within the text -> title.
TraceLabeller = Callable[[str], dict[tuple[int, int], str]]
# Where the thinking model of a known grammar would start a behaviour: the text generated so far
# -> the title of the behaviour its next sentence should be, or None (the oracle-timing baseline).
TimingOracle = Callable[[str], str | None]
# Which behaviours a benchmark's grammar allows as the next sentence, from the reasoning so far
# (the causal stage measures each behaviour only where it is possible: mechsteer.causal).
AllowedNext = Callable[[str], frozenset[str]]

UNLABELLED = "other"  # a labelled trace's sentence that the labeller did not recognise


@dataclass(frozen=True)
class GroundTruth:
    """The planted behaviours of one benchmark's traces."""

    benchmark: str
    behaviours: tuple[str, ...]  # titles; a behaviour's id is its index here
    label_reasoning: TraceLabeller
    descriptions: Mapping[str, str]  # what each behaviour (and UNLABELLED) is, in one sentence
    source: str  # where the labels come from, recorded in artefacts
    timing_oracle: TimingOracle | None = None
    allowed_next: AllowedNext | None = None

    def behaviour_id(self, title: str) -> int | None:
        return self.behaviours.index(title) if title in self.behaviours else None


_REGISTRY: dict[str, GroundTruth] = {}


def register_ground_truth(ground_truth: GroundTruth, *, replace: bool = False) -> None:
    if ground_truth.benchmark in _REGISTRY and not replace:
        raise ValueError(f"ground truth for benchmark {ground_truth.benchmark!r} is already registered")
    _REGISTRY[ground_truth.benchmark] = ground_truth


def ground_truth_for(benchmark: str) -> GroundTruth | None:
    """The benchmark's registered ground truth, or None (every real benchmark)."""
    if benchmark not in _REGISTRY:
        load_plugins()
    return _REGISTRY.get(benchmark)


def require_ground_truth(benchmark: str) -> GroundTruth:
    """Like :func:`ground_truth_for`, but a benchmark without ground truth is an error."""
    ground_truth = ground_truth_for(benchmark)
    if ground_truth is None:
        known = sorted(_REGISTRY)
        raise ValueError(f"benchmark {benchmark!r} has no ground-truth behaviour labels (those with labels: "
                         f"{known}); label sentences with a taxonomy instead")
    return ground_truth


__all__ = ["AllowedNext", "GroundTruth", "TraceLabeller", "UNLABELLED", "ground_truth_for", "register_ground_truth",
           "require_ground_truth"]
