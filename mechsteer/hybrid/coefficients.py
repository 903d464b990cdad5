"""How a steered step's coefficient is chosen, and what stays in the base model's cache.

Declared once here (``COEFFICIENT_RULES``, ``CACHE_MODES``); the generator, its full-recompute
oracle and config keys read them.

Coefficient rules, for a row the timing policy steers (the names of the reference code's
``hybrid/hybrid_eval.py`` ``--coef_select`` in brackets):

- ``guardrail`` [``pg``]: every ``(coeff, window)`` candidate of the grid is evaluated; the one
  whose greedy token the thinking model finds most likely is kept (first on ties).
- ``kl_topk`` [``kl_topk``]: the candidate whose steered next-token distribution best fits the
  thinking model's top K: the highest ``sum_k p_think(k) * log p_steered(k)`` over the thinking
  model's K most likely tokens (minus the top-K cross-entropy; probabilities not renormalised;
  first on ties), the objective the correction vectors are trained on. Shared vocabularies only:
  the top K are taken among the thinking tokens that have a base token.
- ``think_top1_match`` [``think_top1_match``]: an ORACLE CEILING that reads the thinking model's
  greedy token, never a result: the smallest coefficient whose steered greedy token equals the
  thinking model's (ties in coefficient: the first window of the grid); a row where no candidate
  matches is left unsteered (the base model's greedy token, logged as not steered).
- ``learned`` [``mlp``]: no grid; a :class:`CoefficientModel` predicts each steered row's
  coefficient from the base model's residual at the steering layer's output (resid_post), at the
  current (last) position, before any shift there, and the behaviour. The grid's one coefficient
  multiplies the prediction (the reference's ``--mlp_coef_scale``; 1.0 by default).

Cache modes (the shift goes to the last ``window`` positions; the current position for window 1):

- ``revert``: the steered positions are recomputed unsteered after the token is chosen, so later
  steps see the unsteered sequence (the reference's default; with window 1 its current-position
  steering).
- ``keep``: the steered position's keys and values, as computed with the chosen coefficient, stay
  in the cache, so every later token attends to the shifted position (the reference's
  ``--steer_all_positions``). Window 1 only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol, get_args, runtime_checkable

import torch

from mechsteer.core.tensor_types import Bool, Float, Int, Tensor, typechecked

CoefficientRule = Literal["guardrail", "kl_topk", "think_top1_match", "learned"]
CacheMode = Literal["revert", "keep"]
CACHE_MODES: tuple[CacheMode, ...] = get_args(CacheMode)


@dataclass(frozen=True)
class RuleSpec:
    uses_grid: bool  # scores the candidates of the (coeff, window) grid
    ceiling: bool  # reads the thinking model's answer: an upper bound, never a result
    shared_vocab_only: bool  # needs base and thinking ids for the same tokens
    reference_name: str  # its --coef_select value in the reference's hybrid/hybrid_eval.py
    summary: str


COEFFICIENT_RULES: dict[CoefficientRule, RuleSpec] = {
    "guardrail": RuleSpec(True, False, False, "pg",
                          "the candidate whose token the thinking model finds most likely"),
    "kl_topk": RuleSpec(True, False, True, "kl_topk",
                        "the candidate with the lowest top-K cross-entropy against the thinking model"),
    "think_top1_match": RuleSpec(True, True, False, "think_top1_match",
                                 "oracle ceiling: the smallest coefficient whose token is the thinking model's"),
    "learned": RuleSpec(False, False, False, "mlp",
                        "a coefficient model reading the base residual at the steering layer"),
}


@runtime_checkable
class CoefficientModel(Protocol):
    """Predicts a steered row's coefficient from the base model's residual at the steering layer's
    output at the current position (before the shift) and the row's behaviour id (as in
    ``DirectionSet.behaviour_ids``; ``timing.BIAS_ONLY`` for the bias alone)."""

    def __call__(self, resid: Float[Tensor, "batch d_model"],
                 behaviours: Int[Tensor, " batch"]) -> Float[Tensor, " batch"]: ...


def check_rule_and_mode(rule: str, cache_mode: str, windows: tuple[int, ...], coefficients: tuple[float, ...],
                        top_k: int) -> None:
    """The one-line errors of HybridConfig's coefficient rule and cache mode."""
    if rule not in COEFFICIENT_RULES:
        raise ValueError(f"coefficient_rule must be one of {sorted(COEFFICIENT_RULES)}; got {rule!r}")
    if cache_mode not in CACHE_MODES:
        raise ValueError(f"cache_mode must be one of {list(CACHE_MODES)}; got {cache_mode!r}")
    if cache_mode == "keep" and windows != (1,):
        raise ValueError(f"cache_mode 'keep' keeps the current position's shift only: set windows=(1,) "
                         f"(got {windows}), or use cache_mode 'revert'")
    if rule == "learned" and (len(coefficients) != 1 or len(windows) != 1):
        raise ValueError(f"coefficient_rule 'learned' takes no grid: give one window and one coefficient (a scale "
                         f"on the prediction, 1.0 by default); got coefficients={coefficients}, windows={windows}")
    if top_k < 1:
        raise ValueError(f"kl_top_k must be >= 1; got {top_k}")


@typechecked
def thinking_topk_targets(think_logits: Float[Tensor, "rows think_vocab"], top_k: int,
                          thinking_to_base: Int[Tensor, " think_vocab"]
                          ) -> tuple[Float[Tensor, "rows k"], Int[Tensor, "rows k"]]:
    """The thinking model's K most likely tokens that the base vocabulary has: their probabilities
    (under the full thinking distribution, not renormalised) and their base ids."""
    logprobs = think_logits.float().log_softmax(dim=-1)
    shared = thinking_to_base.to(logprobs.device) >= 0
    logprobs = logprobs.masked_fill(~shared, float("-inf"))
    values, ids = logprobs.topk(min(top_k, int(logprobs.shape[-1])), dim=-1)
    return values.exp(), thinking_to_base.to(ids.device)[ids]


@typechecked
def topk_fit(steered_logits: Float[Tensor, "n vocab"], target_probs: Float[Tensor, "n k"],
             target_base_ids: Int[Tensor, "n k"]) -> Float[Tensor, " n"]:
    """``sum_k p_think(k) * log p_steered(k)``: minus the top-K cross-entropy (higher fits better)."""
    logprobs = steered_logits.float().log_softmax(dim=-1)
    ids = target_base_ids.to(logprobs.device).clamp(min=0)
    return (target_probs.to(logprobs.device) * logprobs.gather(1, ids)).sum(dim=-1)


@typechecked
def first_match(matches: Bool[Tensor, "rows candidates"], order: Int[Tensor, " candidates"]) -> Int[Tensor, " rows"]:
    """Per row, the first candidate in ``order`` that matches; -1 where none does."""
    ordered = matches.index_select(1, order.to(matches.device))
    first = ordered.long().argmax(dim=-1)  # the first True (argmax returns the first maximum)
    return torch.where(ordered.any(dim=-1), order.to(matches.device)[first], -1)


def match_order(candidates: list[tuple[float, int]]) -> list[int]:
    """think_top1_match's order: ascending coefficient, the grid's order among equal ones."""
    return sorted(range(len(candidates)), key=lambda index: candidates[index][0])


__all__ = ["CACHE_MODES", "COEFFICIENT_RULES", "CacheMode", "CoefficientModel", "CoefficientRule", "RuleSpec",
           "check_rule_and_mode", "first_match", "match_order", "thinking_topk_targets", "topk_fit"]
