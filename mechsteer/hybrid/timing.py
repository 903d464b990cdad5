"""Timing policies: when to steer the base model, and with which behaviour.

At every generated token the hybrid generator hands a policy a :class:`PolicyInput` (the
thinking model's residual activation at the SAE layer for the last position, and both
models' next-token logits, plus whether their greedy tokens agree) and gets back a
:class:`PolicyDecision`: per sequence, steer or not, and which behaviour.

Everything stays on the devices: the input's tensors are where the models left them (the
thinking model's device; the base logits on the base model's), and a policy computes its decision
on the thinking model's device (``state.agree.device``), its SAE moved there once. A policy never
moves tensors to the host: the generator brings the decision over in the step's one transfer.

Behaviour ``-1`` means "bias only": the hybrid adds ``coeff * bias`` with no behaviour vector.
The coefficient (and window) come from the hybrid's candidate grid; see :mod:`mechsteer.hybrid.generator`.

Policies:

- ``sae_argmax`` (the paper's): behaviour = argmax SAE latent of the thinking model's last-token
  activation (centred and normalised like the SAE's training vectors); steer only where the
  two models' greedy tokens disagree. With ``read="next_token"`` it classifies the activation at
  the thinking model's own greedy next token instead (:data:`PolicyRead`).
- ``threshold``: steer where the top latent's pre-activation exceeds a threshold.
- ``always``: bias only, at every token.
- ``only_bias`` (:class:`BiasOnlyPolicy`, the paper's "only bias" control): another policy's
  timing, with the bias alone instead of bias + behaviour direction; it isolates what the
  behaviour directions add at the hybrid's own steering times.
- ``only_bias_replayed`` (:class:`ReplayPolicy`): the bias alone at given token positions per
  problem, e.g. the hybrid's own steered positions, whatever the base model generates meanwhile.
- ``first_token_only`` (:class:`FirstTokenOnlyPolicy`): another policy restricted to the first
  generated token.
- ``oracle_timing`` (:class:`TimingOraclePolicy`, a baseline): steered where a ground-truth timing
  oracle says the thinking model starts a behaviour, with that behaviour's direction (benchmarks
  with a known grammar only: the organisms).
- ``random_firing``: steer each token with probability ``rate`` and a uniformly random
  behaviour (match ``rate`` to the hybrid's measured steering rate for the control).
- ``random_firing_per_problem`` (:class:`ReplayPolicy` with drawn positions): in each problem as
  many steers as the hybrid made there, at uniformly random positions of its length, each with a
  uniformly random behaviour.
- ``gated_fixed_behaviour`` / ``gated_random_behaviour`` (:class:`FixedBehaviourPolicy`,
  :class:`RandomBehaviourPolicy`): another policy's timing (the hybrid's disagreement gate) with one
  fixed behaviour, or a uniformly random one, instead of the behaviour the thinking model's state
  names: they test whether *which* behaviour matters.
- ``never``: the base model alone.

The "random vectors" control is :class:`SAEArgmaxPolicy` run with norm-matched random
directions in place of the behaviour vectors (``DirectionSet.random_like``).

Every policy is told which problems a batch's rows are before each batch (``bind``, by whoever runs
the batches: ``mechsteer.experiment.pipeline.evaluate_hybrid``); the replay is the one that needs it.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Protocol, get_args, runtime_checkable

import torch

from mechsteer.core.plugins import Registry
from mechsteer.core.tensor_types import Bool, Float, Int, Tensor

BIAS_ONLY = -1

# Which thinking-model activation a policy classifies: the last token's (the paper's), or the
# activation at the thinking model's own greedy next token, appended for one extra forward and
# dropped again (the first token of the sentence the thinking model is about to start).
PolicyRead = Literal["last_token", "next_token"]

# The built-in policies' names (a policy of one's own may take any name).
PolicyName = Literal["sae_argmax", "threshold", "always", "only_bias", "only_bias_replayed", "first_token_only",
                     "oracle_timing", "random_firing", "random_firing_per_problem", "gated_fixed_behaviour",
                     "gated_random_behaviour", "vectors_only", "never"]


@dataclass
class PolicyInput:
    step: int
    thinking_acts: Float[Tensor, "batch d_thinking"]  # raw residual at the SAE layer, last position
    base_logits: Float[Tensor, "batch base_vocab"]
    thinking_logits: Float[Tensor, "batch thinking_vocab"]
    agree: Bool[Tensor, " batch"]  # the two models' greedy next tokens are the same text
    # The base model's generated tokens so far, per row (host lists): only for a policy that reads
    # the text (``reads_text = True``), which costs the generator one host transfer per step.
    generated: list[list[int]] | None = None


@dataclass
class PolicyDecision:
    steer: Bool[Tensor, " batch"]
    behaviour: Int[Tensor, " batch"]  # a behaviour id, or BIAS_ONLY
    # For the per-token log: the thinking model's top latents (values, ids), when known.
    latent_values: Float[Tensor, "batch top"] | None = None
    latent_ids: Int[Tensor, "batch top"] | None = None


@runtime_checkable
class TimingPolicy(Protocol):
    """Everything the generator and the evaluation loop use of a policy (:class:`PolicyBase` gives
    the defaults of all but ``name`` and ``decide``)."""

    # read-only here, so that a policy may narrow them (a Literal field) or compute them (a wrapper)
    @property
    def name(self) -> str: ...

    @property
    def read(self) -> PolicyRead: ...  # the thinking-model activation it classifies

    @property
    def reads_text(self) -> bool: ...  # it reads the generated tokens (one host transfer per step)

    def bind(self, problem_ids: list[str]) -> None: ...  # told which problems a batch's rows are, before it

    def decide(self, state: PolicyInput) -> PolicyDecision: ...


class PolicyBase:
    """The defaults of a timing policy: it classifies the last token's activation, does not read the
    generated text, and decides the same whichever problems the rows are."""

    read: PolicyRead = "last_token"
    reads_text: bool = False

    def bind(self, problem_ids: list[str]) -> None:
        return None


def policy_read(policy: TimingPolicy) -> PolicyRead:
    """``policy.read``, refused unless it is one of :data:`PolicyRead` (a plug-in's value is checked)."""
    if policy.read in get_args(PolicyRead):
        return policy.read
    raise ValueError(f"policy {policy.name!r} has read {policy.read!r}; expected last_token or next_token")


@runtime_checkable
class BehaviourClassifier(Protocol):
    """What a policy needs from an SAE: ``mechsteer.taxonomy.sae.TopKSAE`` satisfies it."""

    def prepare(self, acts: Tensor, *, centring_mean: Tensor | None = None) -> Tensor: ...

    def encode_pre(self, x: Tensor) -> Tensor: ...


@dataclass
class SAEArgmaxPolicy(PolicyBase):
    classifier: BehaviourClassifier
    behaviour_ids: list[int] | None = None  # latents that have a direction; None: all latents
    name: PolicyName = "sae_argmax"
    top: int = 3
    # Which thinking-model activation the policy classifies (see PolicyRead).
    read: PolicyRead = "last_token"

    def decide(self, state: PolicyInput) -> PolicyDecision:
        values, ids = self._latents(state)
        return PolicyDecision(steer=~state.agree, behaviour=ids[:, 0], latent_values=values, latent_ids=ids)

    def _latents(self, state: PolicyInput) -> tuple[Tensor, Tensor]:
        return top_latents(self.classifier, state.thinking_acts, self.behaviour_ids, self.top)


def top_latents(classifier: BehaviourClassifier, acts: Tensor, behaviour_ids: list[int] | None,
                top: int) -> tuple[Tensor, Tensor]:
    """The ``top`` latents (pre-activation values, ids) of raw thinking-model activations, among
    ``behaviour_ids`` (None: all latents), computed on the activations' device."""
    acts = acts.float()
    if isinstance(classifier, torch.nn.Module):
        classifier.to(acts.device)  # once: a no-op when it is there already
    pre = classifier.encode_pre(classifier.prepare(acts))
    if behaviour_ids is not None:
        # only latents with a steering direction can be chosen
        allowed = torch.full_like(pre, float("-inf"))
        allowed[:, torch.tensor(behaviour_ids, dtype=torch.long, device=pre.device)] = 0.0
        pre = pre + allowed
    values, ids = pre.topk(min(top, pre.shape[-1]), dim=-1)
    return values, ids


@dataclass
class ThresholdPolicy(SAEArgmaxPolicy):
    threshold: float = 0.0
    name: PolicyName = "threshold"

    def decide(self, state: PolicyInput) -> PolicyDecision:
        values, ids = self._latents(state)
        return PolicyDecision(steer=values[:, 0] > self.threshold, behaviour=ids[:, 0],
                              latent_values=values, latent_ids=ids)


@dataclass
class AlwaysBiasPolicy(PolicyBase):
    name: PolicyName = "always"

    def decide(self, state: PolicyInput) -> PolicyDecision:
        batch, device = state.agree.shape[0], state.agree.device
        return PolicyDecision(steer=torch.ones(batch, dtype=torch.bool, device=device),
                              behaviour=torch.full((batch,), BIAS_ONLY, dtype=torch.long, device=device))


@dataclass
class _WrappingPolicy:
    """A policy made from another's decisions; it reads what the policy it wraps reads."""

    timing: TimingPolicy

    @property
    def read(self) -> PolicyRead:
        return policy_read(self.timing)

    @property
    def reads_text(self) -> bool:
        return self.timing.reads_text

    def bind(self, problem_ids: list[str]) -> None:
        self.timing.bind(problem_ids)


@dataclass
class BiasOnlyPolicy(_WrappingPolicy):
    """``timing``'s decisions (when to steer, and its latent log) with the bias only."""

    name: PolicyName = "only_bias"

    def decide(self, state: PolicyInput) -> PolicyDecision:
        decision = self.timing.decide(state)
        return dataclasses.replace(decision, behaviour=torch.full_like(decision.behaviour, BIAS_ONLY))


@dataclass
class ReplayPolicy(PolicyBase):
    """Steer at given generated-token positions (``PolicyInput.step``) of each problem: with the bias
    alone, or with each position's given behaviour.

    ``positions`` maps a problem id to its steered positions (``behaviours``, when given, to the
    behaviour at each); :meth:`bind` says which problem each row of the next batch is.
    """

    positions: dict[str, list[int]]
    behaviours: dict[str, list[int]] | None = None
    name: PolicyName = "only_bias_replayed"

    def __post_init__(self) -> None:
        self.steps: dict[int, tuple[list[bool], list[int]]] = {}  # step -> (rows that steer, their behaviours)
        self.n_rows: int | None = None
        if self.behaviours is not None:
            uneven = [problem for problem, steps in self.positions.items()
                      if len(self.behaviours.get(problem, ())) != len(steps)]
            if uneven:
                raise ValueError(f"behaviours must give one behaviour per position; problems {uneven[:5]} do not")

    def bind(self, problem_ids: list[str]) -> None:
        unknown = [problem for problem in problem_ids if problem not in self.positions]
        if unknown:
            raise ValueError(f"no positions to replay for problems {unknown[:5]} ({len(unknown)} in all)")
        self.steps, self.n_rows = {}, len(problem_ids)
        for row, problem in enumerate(problem_ids):
            behaviours = self.behaviours[problem] if self.behaviours is not None else None
            for index, step in enumerate(self.positions[problem]):
                steer, behaviour = self.steps.setdefault(step, ([False] * len(problem_ids),
                                                                [BIAS_ONLY] * len(problem_ids)))
                steer[row] = True
                behaviour[row] = BIAS_ONLY if behaviours is None else behaviours[index]

    def decide(self, state: PolicyInput) -> PolicyDecision:
        batch, device = state.agree.shape[0], state.agree.device
        if self.n_rows != batch:
            raise ValueError(f"ReplayPolicy is bound to {self.n_rows} rows but the batch has {batch}; "
                             "call bind(problem_ids) before each batch")
        planned = self.steps.get(state.step)
        if planned is None:
            return PolicyDecision(steer=torch.zeros(batch, dtype=torch.bool, device=device),
                                  behaviour=torch.full((batch,), BIAS_ONLY, dtype=torch.long, device=device))
        packed = torch.tensor([[int(flag) for flag in planned[0]], planned[1]], dtype=torch.long, device=device)
        return PolicyDecision(steer=packed[0].bool(), behaviour=packed[1])


def random_positions(lengths: dict[str, int], counts: dict[str, int], behaviour_ids: list[int],
                     seed: int) -> tuple[dict[str, list[int]], dict[str, list[int]]]:
    """Per problem, ``counts[p]`` distinct positions drawn uniformly from ``range(lengths[p])`` and a
    uniformly random behaviour at each (seeded per problem, so that a resumed batch draws the same)."""
    if not behaviour_ids:
        raise ValueError("random positions need at least one behaviour id")
    positions, behaviours = {}, {}
    for problem, length in lengths.items():
        draw = random.Random(f"{seed}:{problem}")
        steps = sorted(draw.sample(range(length), min(counts.get(problem, 0), length)))
        positions[problem] = steps
        behaviours[problem] = [draw.choice(behaviour_ids) for _ in steps]
    return positions, behaviours


@dataclass
class TimingOraclePolicy(PolicyBase):
    """Steer where ``oracle`` (the text generated so far -> a behaviour title or None) names a
    behaviour that ``behaviour_of_title`` has a direction for, with that direction."""

    oracle: Callable[[str], str | None]
    decode: Callable[[list[int]], str]  # the base model's tokens -> text
    behaviour_of_title: dict[str, int]
    name: PolicyName = "oracle_timing"
    reads_text: bool = True

    def decide(self, state: PolicyInput) -> PolicyDecision:
        device = state.agree.device
        if state.generated is None:
            raise ValueError("the oracle-timing policy reads the generated text; the generator passed none")
        titles = [self.oracle(self.decode(ids)) for ids in state.generated]
        behaviours = [self.behaviour_of_title.get(title, BIAS_ONLY) if title else BIAS_ONLY for title in titles]
        steer = [behaviour != BIAS_ONLY for behaviour in behaviours]
        # one host-to-device copy for the whole batch
        packed = torch.tensor([steer, behaviours], dtype=torch.long, device=device)
        return PolicyDecision(steer=packed[0].bool(), behaviour=packed[1])


@dataclass
class FirstTokenOnlyPolicy(_WrappingPolicy):
    """``timing``'s decisions (behaviour and latent log included) at the first generated token only."""

    name: PolicyName = "first_token_only"

    def decide(self, state: PolicyInput) -> PolicyDecision:
        decision = self.timing.decide(state)
        return decision if state.step == 0 else dataclasses.replace(decision, steer=torch.zeros_like(decision.steer))


@dataclass
class FixedBehaviourPolicy(_WrappingPolicy):
    """``timing``'s decisions (when to steer, and its latent log) with one fixed behaviour."""

    behaviour: int
    name: PolicyName = "gated_fixed_behaviour"

    def decide(self, state: PolicyInput) -> PolicyDecision:
        decision = self.timing.decide(state)
        return dataclasses.replace(decision, behaviour=torch.full_like(decision.behaviour, self.behaviour))


@dataclass
class RandomBehaviourPolicy(_WrappingPolicy):
    """``timing``'s decisions (when to steer, and its latent log) with a uniformly random behaviour
    at every step (one seeded stream per device)."""

    behaviour_ids: list[int]
    seed: int = 0
    name: PolicyName = "gated_random_behaviour"

    def __post_init__(self) -> None:
        if not self.behaviour_ids:
            raise ValueError("gated_random_behaviour needs at least one behaviour id")
        self.generators: dict[torch.device, torch.Generator] = {}
        self.tables: dict[torch.device, Tensor] = {}

    def decide(self, state: PolicyInput) -> PolicyDecision:
        decision = self.timing.decide(state)
        device = decision.behaviour.device
        if device not in self.generators:
            self.generators[device] = torch.Generator(device=device).manual_seed(self.seed)
            self.tables[device] = torch.tensor(self.behaviour_ids, dtype=torch.long, device=device)
        choice = torch.randint(len(self.behaviour_ids), decision.behaviour.shape, generator=self.generators[device],
                               device=device)
        return dataclasses.replace(decision, behaviour=self.tables[device][choice])


@dataclass
class VectorsOnlyPolicy(_WrappingPolicy):
    """``timing``'s decisions, steering only where its behaviour is one of ``behaviour_ids`` (the ones
    with a vector): a state naming a behaviour without one is not steered, as the reference's
    correction vectors are used (not the next-best behaviour that has a vector)."""

    behaviour_ids: list[int]
    name: PolicyName = "vectors_only"

    def __post_init__(self) -> None:
        self.tables: dict[torch.device, Tensor] = {}

    def decide(self, state: PolicyInput) -> PolicyDecision:
        decision = self.timing.decide(state)
        device = decision.behaviour.device
        if device not in self.tables:
            self.tables[device] = torch.tensor(self.behaviour_ids, dtype=torch.long, device=device)
        return dataclasses.replace(decision, steer=decision.steer & torch.isin(decision.behaviour, self.tables[device]))


@dataclass
class NeverPolicy(PolicyBase):
    name: PolicyName = "never"

    def decide(self, state: PolicyInput) -> PolicyDecision:
        batch, device = state.agree.shape[0], state.agree.device
        return PolicyDecision(steer=torch.zeros(batch, dtype=torch.bool, device=device),
                              behaviour=torch.full((batch,), BIAS_ONLY, dtype=torch.long, device=device))


@dataclass
class RandomFiringPolicy(PolicyBase):
    rate: float
    behaviour_ids: list[int]
    seed: int = 0
    name: PolicyName = "random_firing"

    def __post_init__(self) -> None:
        if not 0.0 <= self.rate <= 1.0:
            raise ValueError(f"rate must be in [0, 1]; got {self.rate}")
        if not self.behaviour_ids:
            raise ValueError("random_firing needs at least one behaviour id")
        self.generators: dict[torch.device, torch.Generator] = {}

    def decide(self, state: PolicyInput) -> PolicyDecision:
        batch, device = state.agree.shape[0], state.agree.device
        if device not in self.generators:
            # one seeded stream per device (on the CPU, the stream it always drew)
            self.generators[device] = torch.Generator(device=device).manual_seed(self.seed)
        generator = self.generators[device]
        steer = torch.rand(batch, generator=generator, device=device) < self.rate
        choice = torch.randint(len(self.behaviour_ids), (batch,), generator=generator, device=device)
        behaviour = torch.tensor(self.behaviour_ids, dtype=torch.long, device=device)[choice]
        return PolicyDecision(steer=steer, behaviour=behaviour)


# --------------------------------------------------------------------------------------------
# The policies a run's ``policy`` key can name: name -> how to build it from the run's classifier


@dataclass(frozen=True)
class PolicySpec:
    """What a run gives its timing policy: the taxonomy's classifier, the latents that have a
    direction, which activation to read, and the threshold (of threshold-like policies)."""

    classifier: BehaviourClassifier
    behaviour_ids: list[int]
    read: PolicyRead = "last_token"
    threshold: float = 0.0


PolicyFactory = Callable[[PolicySpec], TimingPolicy]
POLICIES: Registry[PolicyFactory] = Registry("timing policy")


def register_timing_policy(name: str, factory: PolicyFactory, *, replace: bool = False) -> None:
    """Make ``policy: name`` in a run config build its policy with ``factory`` (a plug-in's too)."""
    POLICIES.register(name, factory, replace=replace)


def timing_policy_names() -> list[str]:
    return POLICIES.names()


def build_timing_policy(name: str, spec: PolicySpec) -> TimingPolicy:
    """The registered policy ``name`` built for ``spec`` (plug-ins loaded on a miss)."""
    return POLICIES.get(name)(spec)


register_timing_policy("sae_argmax", lambda spec: SAEArgmaxPolicy(spec.classifier, spec.behaviour_ids,
                                                                  read=spec.read))
register_timing_policy("threshold", lambda spec: ThresholdPolicy(spec.classifier, spec.behaviour_ids, read=spec.read,
                                                                 threshold=spec.threshold))
