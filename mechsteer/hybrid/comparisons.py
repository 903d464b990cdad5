"""What the hybrid is compared with: controls (could something other than the thinking model's
timing and behaviour choice explain the hybrid's gain?) and baselines (simpler ways to steer), each
a registered name that builds a timing policy and a direction set from the hybrid's own.

A run evaluates each of its ``controls`` and ``baselines`` like the hybrid, on the same problems,
in a stage of its own (``eval_<name>``). A plug-in registers its own with
:func:`register_comparison` (``controls: [name]`` or ``baselines: [name]`` then work in any run).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from mechsteer.core.plugins import Registry
from mechsteer.hybrid.timing import (
    BiasOnlyPolicy,
    FirstTokenOnlyPolicy,
    RandomFiringPolicy,
    ReplayPolicy,
    TimingOraclePolicy,
    TimingPolicy,
)
from mechsteer.steering.direction_set import DirectionSet

ComparisonKind = Literal["control", "baseline"]


@dataclass(frozen=True)
class ComparisonInputs:
    """What a run gives a comparison: the hybrid's policy, directions and steering, and the run's seed."""

    policy: TimingPolicy  # the hybrid's own timing policy
    make_policy: Callable[[], TimingPolicy]  # a fresh instance of the run's timing policy
    directions: DirectionSet
    behaviour_ids: list[int]
    seed: int
    steered_fraction: float  # the hybrid's share of tokens steered on the same problems
    steered_positions: Callable[[], dict[str, list[int]]]  # each problem's steered positions in the hybrid
    # the benchmark's ground-truth timing oracle as a policy, where the benchmark has one
    timing_oracle: Callable[[], TimingOraclePolicy] | None = None


@dataclass(frozen=True)
class ComparisonRun:
    """A comparison's policy and directions, and what its stage summary records of how it was built."""

    policy: TimingPolicy
    directions: DirectionSet
    recorded: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ComparisonSpec:
    name: str
    kind: ComparisonKind
    build: Callable[[ComparisonInputs], ComparisonRun]
    needs_bias: bool = False  # refused for a direction set without a bias


COMPARISONS: Registry[ComparisonSpec] = Registry("control or baseline")


def register_comparison(spec: ComparisonSpec, *, replace: bool = False) -> None:
    """Make ``controls: [name]`` (or ``baselines: [name]``) build its evaluation with ``spec``."""
    COMPARISONS.register(spec.name, spec, replace=replace)


def comparison_names(kind: ComparisonKind) -> list[str]:
    return [name for name in COMPARISONS.names() if COMPARISONS.get(name).kind == kind]


def control_names() -> list[str]:
    return comparison_names("control")


def baseline_names() -> list[str]:
    return comparison_names("baseline")


def build_comparison(name: str, inputs: ComparisonInputs) -> ComparisonRun:
    """The registered comparison ``name`` built from the hybrid's ``inputs`` (plug-ins loaded on a miss)."""
    spec = COMPARISONS.get(name)
    if spec.needs_bias and inputs.directions.bias is None:
        raise ValueError(f"the {name} {spec.kind} needs a bias direction; the direction set has none")
    return spec.build(inputs)


def _only_bias(inputs: ComparisonInputs) -> ComparisonRun:
    # the paper's control: the hybrid's own timing, the bias without behaviour directions
    return ComparisonRun(BiasOnlyPolicy(inputs.policy), inputs.directions)


def _only_bias_replayed(inputs: ComparisonInputs) -> ComparisonRun:
    # the bias alone at exactly the tokens the hybrid steered, whatever the base model writes in between
    return ComparisonRun(ReplayPolicy(inputs.steered_positions()), inputs.directions)


def _random_firing(inputs: ComparisonInputs) -> ComparisonRun:
    return ComparisonRun(RandomFiringPolicy(inputs.steered_fraction, inputs.behaviour_ids, seed=inputs.seed),
                         inputs.directions)


def _random_vectors(inputs: ComparisonInputs) -> ComparisonRun:
    # each random vector has the norm of what the hybrid adds for its behaviour: bias + direction
    return ComparisonRun(inputs.make_policy(), inputs.directions.random_like(inputs.seed, match="added"),
                         {"norm_matched_to": "direction" if inputs.directions.bias is None else "bias + direction"})


def _first_token_only(inputs: ComparisonInputs) -> ComparisonRun:
    # the hybrid allowed to steer at the first generated token only
    return ComparisonRun(FirstTokenOnlyPolicy(inputs.policy), inputs.directions)


def _oracle_timing(inputs: ComparisonInputs) -> ComparisonRun:
    if inputs.timing_oracle is None:
        raise ValueError("baseline oracle_timing needs a ground-truth timing oracle, which the benchmark has none of")
    oracle = inputs.timing_oracle()
    return ComparisonRun(oracle, inputs.directions, {"behaviour_of_title": oracle.behaviour_of_title})


_BUILT_INS = (ComparisonSpec("only_bias", "control", _only_bias, needs_bias=True),
              ComparisonSpec("only_bias_replayed", "control", _only_bias_replayed, needs_bias=True),
              ComparisonSpec("random_firing", "control", _random_firing),
              ComparisonSpec("random_vectors", "control", _random_vectors),
              ComparisonSpec("first_token_only", "baseline", _first_token_only),
              ComparisonSpec("oracle_timing", "baseline", _oracle_timing))
BUILT_IN_COMPARISONS: tuple[str, ...] = tuple(spec.name for spec in _BUILT_INS)
for _spec in _BUILT_INS:
    register_comparison(_spec)

__all__ = ["BUILT_IN_COMPARISONS", "ComparisonInputs", "ComparisonKind", "ComparisonRun", "ComparisonSpec", "baseline_names",
           "build_comparison", "comparison_names", "control_names", "register_comparison"]
