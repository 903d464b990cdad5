"""The hybrid algorithm the way the paper's code runs it: the exactness oracle and speed baseline."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from mechsteer.core.models import resid_hook_name
from mechsteer.core.vocab import shared_id_map
from mechsteer.hybrid.coefficients import CoefficientModel
from mechsteer.hybrid.generator import HybridConfig, behaviour_vectors, check_rule_inputs
from mechsteer.hybrid.timing import PolicyInput, TimingPolicy
from mechsteer.interventions.generation import StopChecker, tokenize_prompts
from mechsteer.interventions.hooks import Steering, intervene
from mechsteer.steering.direction_set import DirectionSet

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge


@dataclass
class ReferenceTrace:
    token_ids: list[int]
    steered: list[bool]
    coeffs: list[float]  # the coefficient used at each token (0.0 where not steered)
    matches: list[bool | None]  # a steered token: it is the thinking model's greedy token (None where not steered)


def reference_hybrid_generate(
    base: TransformerBridge,
    thinking: TransformerBridge,
    base_prompt: str,
    thinking_prompt: str,
    directions: DirectionSet,
    policy: TimingPolicy,
    config: HybridConfig,
    *,
    shared_tokenizer: bool,
    coefficient_model: CoefficientModel | None = None,
) -> tuple[list[int], list[bool]]:
    """The same algorithm the way the paper's code runs it: batch size 1, no KV caches, both
    models recomputed on their whole sequences at every token, one forward per candidate.

    Quadratic in length; kept as the exactness oracle for :func:`hybrid_generate` and as the
    speed baseline in ``bench/hybrid_throughput.py``. Returns (generated ids, steered flags).
    """
    trace = reference_hybrid_trace(base, thinking, base_prompt, thinking_prompt, directions, policy, config,
                                   shared_tokenizer=shared_tokenizer, coefficient_model=coefficient_model)
    return trace.token_ids, trace.steered


def reference_hybrid_trace(
    base: TransformerBridge,
    thinking: TransformerBridge,
    base_prompt: str,
    thinking_prompt: str,
    directions: DirectionSet,
    policy: TimingPolicy,
    config: HybridConfig,
    *,
    shared_tokenizer: bool,
    coefficient_model: CoefficientModel | None = None,
) -> ReferenceTrace:
    """:func:`reference_hybrid_generate` with the coefficient used at each token.

    Cache mode keep, without a cache: every base forward re-adds each earlier kept shift at its
    own position (what a cache holding those positions' steered keys and values computes)."""
    check_rule_inputs(config, shared_tokenizer, coefficient_model)
    rule = config.coefficient_rule
    base_ids = tokenize_prompts(base, [base_prompt])[0]
    think_prompt_ids = tokenize_prompts(thinking, [thinking_prompt])[0]
    # shared ordinary vocabulary: base ids read as thinking ids (-1: a special token it has not, dropped)
    to_thinking = (shared_id_map(base.tokenizer, thinking.tokenizer, base.cfg.d_vocab, thinking.cfg.d_vocab)
                   if shared_tokenizer else [])
    to_base = {think_id: base_id for base_id, think_id in enumerate(to_thinking) if think_id >= 0}
    stopper = StopChecker(base, config.stop_strings, [] if config.ignore_eos else None)
    read_name = resid_hook_name(config.read_layer)
    steer_name = resid_hook_name(config.steer_layer)
    kept: list[Steering] = []  # cache_mode keep: the shifts of earlier steered positions
    trace = ReferenceTrace([], [], [], [])

    def same_token(base_token: int, think_token: int) -> bool:
        if shared_tokenizer:
            return to_thinking[base_token] == think_token
        return base.tokenizer.decode([base_token]) == thinking.tokenizer.decode([think_token])

    with torch.no_grad():
        for step in range(config.max_new_tokens):
            sequence = base_ids + trace.token_ids
            with intervene(base, kept):
                base_logits, base_cache = base.run_with_cache(torch.tensor([sequence]), names_filter=[steer_name])
            base_logits = base_logits[0, -1]
            if shared_tokenizer:
                think_ids = think_prompt_ids + [to_thinking[t] for t in trace.token_ids if to_thinking[t] >= 0]
            else:
                text = base.tokenizer.decode(trace.token_ids, skip_special_tokens=True)
                think_ids = think_prompt_ids + thinking.tokenizer(text, add_special_tokens=False)["input_ids"]
            think_logits, cache = thinking.run_with_cache(torch.tensor([think_ids]), names_filter=[read_name])
            think_logits = think_logits[0, -1]
            base_greedy, think_greedy = int(base_logits.argmax()), int(think_logits.argmax())
            agree = same_token(base_greedy, think_greedy)
            decision = policy.decide(PolicyInput(step, cache[read_name][0, -1][None].float(), base_logits[None].float(),
                                                 think_logits[None].float(), torch.tensor([agree])))
            token, steered, used = base_greedy, bool(decision.steer[0]), 0.0
            if steered:
                vector = behaviour_vectors(directions, decision.behaviour[:1])[0]
                candidates = list(config.candidates)
                if coefficient_model is not None:
                    resid = base_cache[steer_name][0, -1][None].float()
                    predicted = coefficient_model(resid, decision.behaviour[:1].long())
                    scale = torch.tensor(candidates[0][0], dtype=torch.float32)  # the grid's one coefficient
                    candidates = [(float(predicted[0].float() * scale), candidates[0][1])]
                if rule == "think_top1_match":
                    candidates = sorted(candidates, key=lambda candidate: candidate[0])  # stable: grid order on ties
                think_logprobs = think_logits.float().log_softmax(-1)
                if rule == "kl_topk":
                    shared = torch.tensor([t in to_base for t in range(think_logprobs.shape[0])])
                    top = think_logprobs.masked_fill(~shared, float("-inf")).topk(min(config.kl_top_k, len(to_base)))
                    target = [(float(lp.exp()), to_base[int(t)]) for lp, t in zip(top.values, top.indices, strict=True)]
                best_score, choice = None, None
                for coeff, window in candidates:
                    width = len(sequence) if window == 0 else min(window, len(sequence))  # 0: all
                    positions = range(len(sequence) - width, len(sequence))
                    with intervene(base, [*kept, Steering(config.steer_layer, vector, coeff, positions)]):
                        logits = base(torch.tensor([sequence]))[0, -1]
                    candidate = int(logits.argmax())
                    if len(candidates) == 1 and rule != "think_top1_match":
                        choice = (candidate, coeff)
                        break
                    if rule == "think_top1_match":
                        if same_token(candidate, think_greedy):
                            choice = (candidate, coeff)
                            break
                        continue
                    if rule == "kl_topk":
                        logprobs = logits.float().log_softmax(-1)
                        score = sum(p * float(logprobs[b]) for p, b in target)
                    elif shared_tokenizer:
                        mapped = to_thinking[candidate]
                        score = float(think_logprobs[mapped]) if mapped >= 0 else float("-inf")
                    else:
                        ids = thinking.tokenizer(base.tokenizer.decode([candidate]), add_special_tokens=False)["input_ids"]
                        score = float(think_logprobs[ids[0]]) if ids else float("-inf")
                    if best_score is None or score > best_score:
                        best_score, choice = score, (candidate, coeff)
                if choice is None:  # think_top1_match found no candidate: the row stays unsteered
                    steered = False
                else:
                    token, used = choice
                    if config.cache_mode == "keep":
                        kept.append(Steering(config.steer_layer, vector, used, [len(sequence) - 1]))
            trace.token_ids.append(token)
            trace.steered.append(steered)
            trace.coeffs.append(used)
            trace.matches.append(same_token(token, think_greedy) if steered else None)
            if stopper.reason(trace.token_ids) is not None:
                break
    return trace


__all__ = ["ReferenceTrace", "reference_hybrid_generate", "reference_hybrid_trace"]
