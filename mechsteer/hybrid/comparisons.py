"""What the hybrid is compared with: controls (could something other than the thinking model's
timing and behaviour choice explain the hybrid's gain?) and baselines (simpler ways to steer), each
a registered name that builds a timing policy and a direction set from the hybrid's own.

A run evaluates each of its ``controls`` and ``baselines`` like the hybrid, on the same problems,
in a stage of its own (``eval_<name>``). A comparison may have variants (:class:`ComparisonVariants`,
e.g. one per fixed behaviour): each is evaluated, and the stage reports the most accurate, the
strongest form of a control (chosen on the evaluated problems, which can only favour the control).
A plug-in registers its own with :func:`register_comparison` (``controls: [name]`` or
``baselines: [name]`` then work in any run).
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from mechsteer.core.plugins import Registry
from mechsteer.hybrid.generator import HybridConfig
from mechsteer.hybrid.records import HybridRecord
from mechsteer.hybrid.timing import (
    BiasOnlyPolicy,
    FirstTokenOnlyPolicy,
    FixedBehaviourPolicy,
    NeverPolicy,
    RandomBehaviourPolicy,
    RandomFiringPolicy,
    ReplayPolicy,
    TimingOraclePolicy,
    TimingPolicy,
    VectorsOnlyPolicy,
    random_positions,
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
    hybrid_records: Callable[[], Sequence[HybridRecord]]  # the hybrid's records on the same problems
    # the benchmark's ground-truth timing oracle as a policy, where the benchmark has one
    timing_oracle: Callable[[], TimingOraclePolicy] | None = None

    def steered_positions(self) -> dict[str, list[int]]:
        """Each problem's steered token positions in the hybrid."""
        return {record.problem_id: record.steered_positions for record in self.hybrid_records()}


@dataclass(frozen=True)
class ComparisonRun:
    """A comparison's policy and directions, what its stage summary records of how it was built, and
    how it changes the hybrid's generation settings (None: it steers with the hybrid's own)."""

    policy: TimingPolicy
    directions: DirectionSet
    recorded: dict[str, Any] = field(default_factory=dict)
    configure: Callable[[HybridConfig], HybridConfig] | None = None


@dataclass(frozen=True)
class ComparisonVariants:
    """A comparison evaluated once per variant (label -> run); its stage reports the most accurate."""

    runs: dict[str, ComparisonRun]

    def __post_init__(self) -> None:
        if not self.runs:
            raise ValueError("a comparison with variants needs at least one")


@dataclass(frozen=True)
class ComparisonSpec:
    name: str
    kind: ComparisonKind
    build: Callable[[ComparisonInputs], ComparisonRun | ComparisonVariants]
    needs_bias: bool = False  # refused for a direction set without a bias
    description: str = ""  # what it steers, as report.md and the viewer say (e.g. "steers the bias alone, ...")


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


def comparison_description(name: str, kind: ComparisonKind) -> str:
    """What comparison ``name`` steers, in report.md's words; for one without a description, or of a
    plug-in not installed here (a report rebuilt elsewhere), its kind."""
    if name not in COMPARISONS:
        return f"a {kind} of a plug-in not installed here"
    return COMPARISONS.get(name).description or f"a {kind} of a plug-in"


def build_comparison(name: str, inputs: ComparisonInputs) -> ComparisonRun | ComparisonVariants:
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


def _random_firing_per_problem(inputs: ComparisonInputs) -> ComparisonRun:
    # as many steers in each problem as the hybrid made there, at random positions of its length
    records = inputs.hybrid_records()
    positions, behaviours = random_positions({record.problem_id: record.n_tokens for record in records},
                                             {record.problem_id: len(record.steered_positions) for record in records},
                                             inputs.behaviour_ids, inputs.seed)
    return ComparisonRun(ReplayPolicy(positions, behaviours, name="random_firing_per_problem"), inputs.directions)


def _random_vectors(inputs: ComparisonInputs) -> ComparisonRun:
    # each random vector has the norm of what the hybrid adds for its behaviour: bias + direction
    return ComparisonRun(inputs.make_policy(), inputs.directions.random_like(inputs.seed, match="added"),
                         {"norm_matched_to": "direction" if inputs.directions.bias is None else "bias + direction"})


def _random_vectors_with_bias(inputs: ComparisonInputs) -> ComparisonRun:
    # only the behaviour directions are random (each of its direction's norm); the bias is the hybrid's
    return ComparisonRun(inputs.make_policy(), inputs.directions.random_like(inputs.seed, match="keep_bias"),
                         {"norm_matched_to": "direction, bias kept"})


def _gated_fixed_behaviour(inputs: ComparisonInputs) -> ComparisonVariants:
    # the hybrid's timing with one behaviour for every steer, each behaviour in turn
    return ComparisonVariants({f"behaviour_{behaviour}": ComparisonRun(
        FixedBehaviourPolicy(inputs.make_policy(), behaviour), inputs.directions, {"behaviour": behaviour})
        for behaviour in inputs.behaviour_ids})


def _gated_random_behaviour(inputs: ComparisonInputs) -> ComparisonRun:
    # the hybrid's timing with a uniformly random behaviour at each steer
    return ComparisonRun(RandomBehaviourPolicy(inputs.make_policy(), inputs.behaviour_ids, seed=inputs.seed),
                         inputs.directions)


def _without_top_behaviour(inputs: ComparisonInputs) -> ComparisonRun:
    # the hybrid's timing, never steering the behaviour it steered most (the reference's "excluding the top
    # categories"): how much of the recovery rests on one behaviour
    counts = Counter(behaviour for record in inputs.hybrid_records() for behaviour in record.steered_behaviours
                     if behaviour in inputs.behaviour_ids)
    if not counts:
        raise ValueError("control without_top_behaviour: the hybrid steered no behaviour, so none is the top one")
    top = max(sorted(counts), key=lambda behaviour: counts[behaviour])  # the lowest id on ties
    return ComparisonRun(VectorsOnlyPolicy(inputs.make_policy(), [b for b in inputs.behaviour_ids if b != top]),
                         inputs.directions, {"excluded_behaviour": top, "its_steers": counts[top]})


def _no_steering(inputs: ComparisonInputs) -> ComparisonRun:
    # the base model alone through the hybrid's generator: the plain base, or, under eval_prefix, the base
    # continuing from the forced start (the organisms' plan-only condition)
    return ComparisonRun(NeverPolicy(), inputs.directions)


def _first_token_only(inputs: ComparisonInputs) -> ComparisonRun:
    # the hybrid allowed to steer at the first generated token only
    return ComparisonRun(FirstTokenOnlyPolicy(inputs.policy), inputs.directions)


def _last_token_read(inputs: ComparisonInputs) -> ComparisonRun:
    # the paper's read: the policy classifies the last token's activation, whatever the run's policy_read
    policy = inputs.make_policy()
    if not dataclasses.is_dataclass(policy) or "read" not in {f.name for f in dataclasses.fields(policy)}:
        raise ValueError(f"baseline last_token_read sets a policy's read; policy {policy.name!r} has no read field")
    return ComparisonRun(dataclasses.replace(policy, read="last_token"), inputs.directions,
                         {"read": "last_token"})


def _single_candidate(inputs: ComparisonInputs) -> ComparisonRun:
    # no grid and no guardrail: every steer adds the behaviour's vector once (coefficient 1) at the last position
    return ComparisonRun(inputs.make_policy(), inputs.directions, {"coefficient": 1.0, "window": 1},
                         configure=lambda config: dataclasses.replace(config, coefficients=(1.0,), windows=(1,)))


def _oracle_timing(inputs: ComparisonInputs) -> ComparisonRun:
    if inputs.timing_oracle is None:
        raise ValueError("baseline oracle_timing needs a ground-truth timing oracle, which the benchmark has none of")
    oracle = inputs.timing_oracle()
    return ComparisonRun(oracle, inputs.directions, {"behaviour_of_title": oracle.behaviour_of_title})


_BUILT_INS = (
    ComparisonSpec("only_bias", "control", _only_bias, needs_bias=True,
                   description="steers the bias alone, at the hybrid's timing"),
    ComparisonSpec("only_bias_replayed", "control", _only_bias_replayed, needs_bias=True,
                   description="steers the bias alone, at exactly the tokens the hybrid steered"),
    ComparisonSpec("random_firing", "control", _random_firing,
                   description="steers random behaviours at random tokens, as often as the hybrid"),
    ComparisonSpec("random_vectors", "control", _random_vectors,
                   description="steers random vectors of the same norms, timed by the SAE's argmax latent"),
    ComparisonSpec("random_firing_per_problem", "control", _random_firing_per_problem,
                   description="steers random behaviours at random tokens, as many in each problem as the hybrid"),
    ComparisonSpec("random_vectors_with_bias", "control", _random_vectors_with_bias, needs_bias=True,
                   description="steers the bias with random behaviour vectors of the same norms, at the hybrid's "
                               "timing"),
    ComparisonSpec("gated_fixed_behaviour", "control", _gated_fixed_behaviour,
                   description="steers one fixed behaviour at the hybrid's timing, each behaviour in turn (the best "
                               "reported)"),
    ComparisonSpec("gated_random_behaviour", "control", _gated_random_behaviour,
                   description="steers a random behaviour at the hybrid's timing"),
    ComparisonSpec("without_top_behaviour", "control", _without_top_behaviour,
                   description="steers at the hybrid's timing, never the behaviour it steered most"),
    ComparisonSpec("first_token_only", "baseline", _first_token_only,
                   description="the hybrid allowed to steer at the first generated token only"),
    ComparisonSpec("no_steering", "baseline", _no_steering,
                   description="the base model alone, from the same start as the hybrid (eval_prefix)"),
    ComparisonSpec("oracle_timing", "baseline", _oracle_timing, description="steered at the ground-truth positions"),
    ComparisonSpec("last_token_read", "baseline", _last_token_read,
                   description="the hybrid with the paper's read: the policy classifies the last token's activation"),
    ComparisonSpec("single_candidate", "baseline", _single_candidate,
                   description="the hybrid without the coefficient grid and guardrail: coefficient 1 at the last "
                               "position"),
)
BUILT_IN_COMPARISONS: tuple[str, ...] = tuple(spec.name for spec in _BUILT_INS)
for _spec in _BUILT_INS:
    register_comparison(_spec)

__all__ = ["BUILT_IN_COMPARISONS", "ComparisonInputs", "ComparisonKind", "ComparisonRun", "ComparisonSpec",
           "ComparisonVariants", "baseline_names",
           "build_comparison", "comparison_description", "comparison_names", "control_names", "register_comparison"]
