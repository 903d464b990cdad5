"""The hybrid algorithm the way the paper's code runs it: the exactness oracle and speed baseline."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from mechsteer.core.models import resid_hook_name
from mechsteer.core.vocab import shared_id_map
from mechsteer.hybrid.generator import HybridConfig, behaviour_vectors
from mechsteer.hybrid.timing import PolicyInput, TimingPolicy
from mechsteer.interventions.generation import StopChecker, tokenize_prompts
from mechsteer.interventions.hooks import Steering, intervene
from mechsteer.steering.direction_set import DirectionSet

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge


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
) -> tuple[list[int], list[bool]]:
    """The same algorithm the way the paper's code runs it: batch size 1, no KV caches, both
    models recomputed on their whole sequences at every token, one forward per candidate.

    Quadratic in length; kept as the exactness oracle for :func:`hybrid_generate` and as the
    speed baseline in ``bench/hybrid_throughput.py``. Returns (generated ids, steered flags).
    """
    base_ids = tokenize_prompts(base, [base_prompt])[0]
    think_prompt_ids = tokenize_prompts(thinking, [thinking_prompt])[0]
    # shared ordinary vocabulary: base ids read as thinking ids (-1: a special token it has not, dropped)
    to_thinking = (shared_id_map(base.tokenizer, thinking.tokenizer, base.cfg.d_vocab, thinking.cfg.d_vocab)
                   if shared_tokenizer else [])
    stopper = StopChecker(base, config.stop_strings, [] if config.ignore_eos else None)
    read_name = resid_hook_name(config.read_layer)
    generated: list[int] = []
    steered: list[bool] = []
    with torch.no_grad():
        for step in range(config.max_new_tokens):
            sequence = base_ids + generated
            base_logits = base(torch.tensor([sequence]))[0, -1]
            if shared_tokenizer:
                think_ids = think_prompt_ids + [to_thinking[t] for t in generated if to_thinking[t] >= 0]
            else:
                text = base.tokenizer.decode(generated, skip_special_tokens=True)
                think_ids = think_prompt_ids + thinking.tokenizer(text, add_special_tokens=False)["input_ids"]
            think_logits, cache = thinking.run_with_cache(torch.tensor([think_ids]), names_filter=[read_name])
            think_logits = think_logits[0, -1]
            base_greedy, think_greedy = int(base_logits.argmax()), int(think_logits.argmax())
            if shared_tokenizer:
                agree = to_thinking[base_greedy] == think_greedy
            else:
                agree = base.tokenizer.decode([base_greedy]) == thinking.tokenizer.decode([think_greedy])
            decision = policy.decide(PolicyInput(step, cache[read_name][0, -1][None].float(), base_logits[None].float(),
                                                 think_logits[None].float(), torch.tensor([agree])))
            token = base_greedy
            if bool(decision.steer[0]):
                vector = behaviour_vectors(directions, decision.behaviour[:1])[0]
                think_logprobs = think_logits.float().log_softmax(-1)
                best_score = None
                for coeff, window in config.candidates:
                    width = len(sequence) if window == 0 else min(window, len(sequence))  # 0: all
                    positions = range(len(sequence) - width, len(sequence))
                    with intervene(base, [Steering(config.steer_layer, vector, coeff, positions)]):
                        candidate = int(base(torch.tensor([sequence]))[0, -1].argmax())
                    if len(config.candidates) == 1:
                        token = candidate
                        break
                    if shared_tokenizer:
                        mapped = to_thinking[candidate]
                        score = float(think_logprobs[mapped]) if mapped >= 0 else float("-inf")
                    else:
                        ids = thinking.tokenizer(base.tokenizer.decode([candidate]), add_special_tokens=False)["input_ids"]
                        score = float(think_logprobs[ids[0]]) if ids else float("-inf")
                    if best_score is None or score > best_score:
                        best_score, token = score, candidate
            generated.append(token)
            steered.append(bool(decision.steer[0]))
            if stopper.reason(generated) is not None:
                break
    return generated, steered


__all__ = ["reference_hybrid_generate"]
