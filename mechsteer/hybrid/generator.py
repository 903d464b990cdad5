"""The hybrid model: the base model generates, the thinking model decides when to steer it.

At every token, for a batch of problems at once:

1. Both models have consumed the text so far through their own KV caches: the base model under
   the base prompt, the thinking model under its own prompt. We hold the base model's and the
   thinking model's next-token logits, and the thinking model's residual activation at the SAE
   layer for the last position.
2. A timing policy (:mod:`mechsteer.hybrid.timing`) decides per sequence whether to steer and with
   which behaviour.
3. For steered sequences, every candidate ``(coeff, window)`` of the grid is evaluated in one
   batched forward: ``coeff * (bias + direction_b)`` is added at the base model's steering
   layer to the last ``window`` positions, and the candidate's greedy token is read off. With
   more than one candidate, the guardrail keeps the token the thinking model finds most likely
   (lowest perplexity). Unsteered sequences take the base model's greedy token.
4. The chosen token is appended to both sequences.

Steering is *transient*, as in the paper's full-recompute algorithm: it changes the prediction
of the step at which it fires, and later steps see the unsteered sequence. With caches this is
done by forking the steered rows' cache, cropping the last ``window`` positions, recomputing
them steered, and discarding the fork. A steered step therefore costs ``window x candidates``
extra token positions and never O(sequence length) compute (the fork copies the cache in
memory, which is cheap next to a forward pass). ``window`` = "all" is what the paper also
tried; pass ``windows=(10**9,)`` for it, at O(length) cost.

Cross-tokenizer pairs: the base token's text is appended to the thinking model's text, and only
the tail is re-encoded: the last ``lookback_tokens`` thinking tokens plus the new text. Where the
new text merges with the previous token (``"t"`` + ``"he"`` -> ``"the"``), the thinking cache is
cropped back to the first changed token and the changed tokens are fed again, so the thinking
model always sees the canonical tokenization of the text (exactly what re-encoding the whole
text gives, for tokenizers whose merges never reach back more than ``lookback_tokens`` tokens).

Exactness: tests/hybrid/test_hybrid.py checks token-for-token equality with a full-recompute
oracle of this same algorithm (:func:`mechsteer.hybrid.reference.reference_hybrid_generate`: no
caches, batch size 1), with windows, for shared and different tokenizers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from transformer_lens.model_bridge import TransformerBridge

from mechsteer.core.models import resid_hook_name, tokenizers_compatible
from mechsteer.core.tensor_types import Float, Int, Tensor, typechecked
from mechsteer.hybrid.timing import BIAS_ONLY, PolicyDecision, PolicyInput, TimingPolicy
from mechsteer.interventions.generation import (
    CachedRunner,
    StopChecker,
    pad_token_id,
    tokenize_prompts,
)
from mechsteer.interventions.hooks import add_direction
from mechsteer.steering.direction_set import DirectionSet


@typechecked
def behaviour_vectors(directions: DirectionSet, behaviours: Int[Tensor, " batch"]) -> Float[Tensor, "batch d_model"]:
    """``bias + direction_b`` per row (bias alone for BIAS_ONLY; no bias term when the set has none)."""
    out = torch.zeros(behaviours.shape[0], directions.d_model)
    for row, behaviour in enumerate(behaviours.tolist()):
        if behaviour != BIAS_ONLY:
            if behaviour not in directions.behaviour_ids:
                raise ValueError(f"no direction for behaviour {behaviour}; known: {directions.behaviour_ids}")
            out[row] = directions.directions[directions.index_of(behaviour)]
    if directions.bias is not None:
        out = out + directions.bias
    return out


@dataclass
class HybridConfig:
    steer_layer: int  # base model layer whose output (resid_post) is steered
    read_layer: int  # thinking model layer the policy reads (the SAE's layer)
    coefficients: tuple[float, ...] = (1.0,)
    windows: tuple[int, ...] = (1,)  # steer the last w positions
    max_new_tokens: int = 256
    stop_strings: tuple[str, ...] = ()
    batch_size: int = 8
    lookback_tokens: int = 16  # cross-tokenizer re-encoding window
    ignore_eos: bool = False  # generate exactly max_new_tokens (benchmarks)

    def __post_init__(self) -> None:
        if not self.coefficients or not self.windows:
            raise ValueError("coefficients and windows must be non-empty")
        if any(window < 1 for window in self.windows):
            raise ValueError(f"windows must be >= 1; got {self.windows}")

    @property
    def candidates(self) -> list[tuple[float, int]]:
        return [(coeff, window) for coeff in self.coefficients for window in self.windows]


@dataclass
class TokenLog:
    steered: bool
    behaviour: int | None  # the behaviour steered with (None when not steered)
    coeff: float
    window: int
    agree: bool  # base and thinking greedy tokens were the same text
    latent_ids: list[int] = field(default_factory=list)
    latent_values: list[float] = field(default_factory=list)


@dataclass
class HybridOutput:
    texts: list[str]
    token_ids: list[list[int]]
    finish_reasons: list[str]
    token_logs: list[list[TokenLog]]

    @property
    def steered_fractions(self) -> list[float]:
        """Share of each sequence's generated tokens that were steered."""
        return [sum(log.steered for log in logs) / len(logs) if logs else 0.0 for logs in self.token_logs]


class ThinkingText:
    """The thinking model's view of the generated text when its tokenizer differs."""

    def __init__(self, tokenizer, n_rows: int, lookback_tokens: int):
        self.tokenizer = tokenizer
        self.lookback = lookback_tokens
        self.text = [""] * n_rows
        self.ids: list[list[int]] = [[] for _ in range(n_rows)]
        self.starts: list[list[int]] = [[] for _ in range(n_rows)]  # char start of each token

    def extend(self, row: int, piece: str) -> tuple[int, list[int]]:
        """Add ``piece`` to the row's text. Returns (generated tokens kept, new token ids)."""
        self.text[row] += piece
        first = max(0, len(self.ids[row]) - self.lookback)
        char_start = self.starts[row][first] if first < len(self.starts[row]) else len(self.text[row]) - len(piece)
        encoded = self.tokenizer(self.text[row][char_start:], add_special_tokens=False, return_offsets_mapping=True)
        new_ids = list(encoded["input_ids"])
        new_starts = [char_start + start for start, _ in encoded["offset_mapping"]]
        old_ids = self.ids[row][first:]
        same = 0
        while same < min(len(old_ids), len(new_ids)) and old_ids[same] == new_ids[same]:
            same += 1
        kept = first + same
        self.ids[row] = self.ids[row][:kept] + new_ids[same:]
        self.starts[row] = self.starts[row][:kept] + new_starts[same:]
        return kept, new_ids[same:]


class IncrementalDecoder:
    """Text of each newly generated base token, robust to multi-token characters."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def piece(self, ids: list[int]) -> str:
        window = ids[-6:]
        before = self.tokenizer.decode(window[:-1], skip_special_tokens=True)
        after = self.tokenizer.decode(window, skip_special_tokens=True)
        if after.startswith(before):
            return after[len(before) :]
        full_before = self.tokenizer.decode(ids[:-1], skip_special_tokens=True)
        return self.tokenizer.decode(ids, skip_special_tokens=True)[len(full_before) :]


def hybrid_generate(
    base: TransformerBridge,
    thinking: TransformerBridge,
    base_prompts: Sequence[str],
    thinking_prompts: Sequence[str],
    directions: DirectionSet,
    policy: TimingPolicy,
    config: HybridConfig,
    *,
    shared_tokenizer: bool | None = None,
) -> HybridOutput:
    """Generate with the base model, steered when ``policy`` says so (see the module docstring)."""
    if len(base_prompts) != len(thinking_prompts):
        raise ValueError("base_prompts and thinking_prompts must have the same length")
    if directions.d_model != base.cfg.d_model:
        raise ValueError(
            f"steering vectors have d_model {directions.d_model} but the base model has "
            f"{base.cfg.d_model}"
        )
    for model, layer, what in ((base, config.steer_layer, "steer_layer"), (thinking, config.read_layer, "read_layer")):
        if not 0 <= layer < model.cfg.n_layers:
            raise ValueError(f"{what} must be in [0, {model.cfg.n_layers - 1}]; got {layer}")
    if shared_tokenizer is None:
        shared_tokenizer = tokenizers_compatible(base.tokenizer, thinking.tokenizer)
    output = HybridOutput([], [], [], [])
    for start in range(0, len(base_prompts), config.batch_size):
        stop = start + config.batch_size
        _HybridBatch(base, thinking, list(base_prompts[start:stop]), list(thinking_prompts[start:stop]),
                     directions, policy, config, shared_tokenizer).run(output)
    return output


class _HybridBatch:
    def __init__(self, base, thinking, base_prompts, thinking_prompts, directions, policy, config, shared):
        self.base, self.thinking = base, thinking
        self.directions, self.policy, self.config, self.shared = directions, policy, config, shared
        self.base_runner = CachedRunner(base, tokenize_prompts(base, base_prompts))
        self.think_runner = CachedRunner(thinking, tokenize_prompts(thinking, thinking_prompts))
        self.n_think_prompt = self.think_runner.n_real()
        self.batch = self.base_runner.batch_size
        # The steering of the current candidate forward: one vector, coefficient and window mask per row.
        self.steering: tuple[Tensor, Tensor, Tensor] | None = None
        self.recorded: Tensor | None = None
        self.stopper = StopChecker(base, config.stop_strings, [] if config.ignore_eos else None)
        self.base_decoder = IncrementalDecoder(base.tokenizer)
        self.think_text = None if shared else ThinkingText(thinking.tokenizer, self.batch, config.lookback_tokens)

    # hooks ---------------------------------------------------------------------------------
    def _steer_hook(self, resid: Tensor, hook: object) -> Tensor:
        if self.steering is None:
            return resid
        vectors, coeffs, mask = (t.to(resid.device) for t in self.steering)
        return add_direction(resid, vectors, coeffs, mask)

    def _record_hook(self, resid: Tensor, hook: object) -> Tensor:
        self.recorded = resid[:, -1, :].detach().clone()
        return resid

    # steps ---------------------------------------------------------------------------------
    def _agree(self, base_greedy: Tensor, think_greedy: Tensor) -> Tensor:
        if self.shared:
            return base_greedy.cpu() == think_greedy.cpu()
        base_text = [self.base.tokenizer.decode([t]) for t in base_greedy.tolist()]
        think_text = [self.thinking.tokenizer.decode([t]) for t in think_greedy.tolist()]
        return torch.tensor([a == b for a, b in zip(base_text, think_text, strict=True)])

    def _thinking_logprob(self, think_logprobs: Tensor, base_token: int) -> float:
        """Thinking model's log-prob of a base candidate token (cross-tokenizer: its first token)."""
        if self.shared:
            return float(think_logprobs[base_token])
        ids = self.thinking.tokenizer(self.base.tokenizer.decode([base_token]), add_special_tokens=False)["input_ids"]
        return float(think_logprobs[ids[0]]) if ids else float("-inf")

    def _steered_choice(self, rows: list[int], behaviours: Tensor, think_logits: Tensor) -> dict[int, tuple[int, float, int]]:
        """For each steered row: (token, coeff, window) of the chosen candidate."""
        candidates = self.config.candidates
        n_candidates = len(candidates)
        widest = max(window for _, window in candidates)
        fork = self.base_runner.fork(rows)
        n_real = fork.n_real()
        fork.uncache([widest] * len(rows))
        fork.repeat_rows(n_candidates)
        steering = behaviour_vectors(self.directions, behaviours[rows])
        n_forked = len(rows) * n_candidates
        coeffs = torch.zeros(n_forked)
        mask = torch.zeros(n_forked, fork.n_pending, dtype=torch.bool)
        for index, count in enumerate(n_real):
            for candidate, (coeff, window) in enumerate(candidates):
                coeffs[index * n_candidates + candidate] = coeff
                mask[index * n_candidates + candidate, -min(window, count):] = True
        self.steering = (steering.repeat_interleave(n_candidates, dim=0), coeffs, mask)
        try:
            logits = fork.forward()[:, -1, :]
        finally:
            self.steering = None
        tokens = logits.argmax(dim=-1).view(len(rows), n_candidates).tolist()
        think_logprobs = think_logits.float().log_softmax(dim=-1)
        choice = {}
        for index, row in enumerate(rows):
            best = 0
            if n_candidates > 1:
                scores = [self._thinking_logprob(think_logprobs[row], token) for token in tokens[index]]
                best = max(range(n_candidates), key=lambda c: (scores[c], -c))
            coeff, window = candidates[best]
            choice[row] = (tokens[index][best], coeff, window)
        return choice

    def _append_thinking(self, chosen: Tensor, base_ids: list[list[int]], active: list[bool]) -> list[bool]:
        """Append the chosen tokens to the thinking sequences; return which rows got tokens."""
        if self.shared:
            self.think_runner.append(chosen, real=torch.tensor(active))
            return active
        keeps, suffixes = self.think_runner.n_real(), []
        for row in range(self.batch):
            if not active[row]:
                suffixes.append([])
                continue
            kept, new_ids = self.think_text.extend(row, self.base_decoder.piece(base_ids[row]))
            keeps[row] = self.n_think_prompt[row] + kept
            suffixes.append(new_ids)
        self.think_runner.rewind(keeps)
        self.think_runner.append_ragged(suffixes)
        return [bool(suffix) for suffix in suffixes]

    def run(self, output: HybridOutput) -> None:
        config = self.config
        steer_name = resid_hook_name(config.steer_layer)
        read_name = resid_hook_name(config.read_layer)
        new_ids: list[list[int]] = [[] for _ in range(self.batch)]
        logs: list[list[TokenLog]] = [[] for _ in range(self.batch)]
        finished = [False] * self.batch
        reasons = ["length"] * self.batch
        pad = pad_token_id(self.base)
        with torch.no_grad(), self.base.hooks(fwd_hooks=[(steer_name, self._steer_hook)]), \
                self.thinking.hooks(fwd_hooks=[(read_name, self._record_hook)]):
            base_logits = self.base_runner.forward()[:, -1, :]
            think_logits = self.think_runner.forward()[:, -1, :]
            think_acts = self.recorded
            for step in range(config.max_new_tokens):
                base_greedy, think_greedy = base_logits.argmax(dim=-1), think_logits.argmax(dim=-1)
                agree = self._agree(base_greedy, think_greedy)
                decision: PolicyDecision = self.policy.decide(
                    PolicyInput(step, think_acts.float().cpu(), base_logits.float().cpu(), think_logits.float().cpu(), agree)
                )
                steer_rows = [row for row in range(self.batch) if bool(decision.steer[row]) and not finished[row]]
                chosen = base_greedy.clone().cpu()
                choice = self._steered_choice(steer_rows, decision.behaviour, think_logits) if steer_rows else {}
                for row, (token, _, _) in choice.items():
                    chosen[row] = token
                active = [not done for done in finished]
                for row in range(self.batch):
                    if finished[row]:
                        chosen[row] = pad
                        continue
                    token, coeff, window = choice.get(row, (int(chosen[row]), 0.0, 0))
                    logs[row].append(TokenLog(
                        steered=row in choice,
                        behaviour=int(decision.behaviour[row]) if row in choice else None,
                        coeff=coeff, window=window, agree=bool(agree[row]),
                        latent_ids=[] if decision.latent_ids is None else decision.latent_ids[row].tolist(),
                        latent_values=[] if decision.latent_values is None else [round(v, 4) for v in decision.latent_values[row].tolist()],
                    ))
                    new_ids[row].append(token)
                    reason = self.stopper.reason(new_ids[row])
                    if reason is not None:
                        finished[row], reasons[row] = True, reason
                if all(finished) or step == config.max_new_tokens - 1:
                    break
                self.base_runner.append(chosen, real=torch.tensor(active))
                updated = self._append_thinking(chosen, new_ids, active)
                base_logits = self.base_runner.forward()[:, -1, :]
                if any(updated) and self.think_runner.n_pending > 0:
                    fresh_logits = self.think_runner.forward()[:, -1, :]
                    keep_new = torch.tensor(updated)[:, None]
                    think_logits = torch.where(keep_new, fresh_logits, think_logits)
                    think_acts = torch.where(keep_new, self.recorded, think_acts)
        for row in range(self.batch):
            output.texts.append(self.stopper.final_text(new_ids[row]))
            output.token_ids.append(new_ids[row])
            output.finish_reasons.append(reasons[row])
            output.token_logs.append(logs[row])


__all__ = ["HybridConfig", "HybridOutput", "TokenLog", "behaviour_vectors", "hybrid_generate"]
