"""Batched, KV-cached, optionally steered generation on a TransformerLens 4 bridge.

Built on the bridge's incremental decoding, ``model(tokens, return_type="logits_and_cache",
past_key_values=...)``: the prompt batch is prefilled once (left-padded, with an attention mask
and explicit position ids), then each step feeds one new token per row.

Steering comes in two forms, both exact under the KV cache (see :mod:`mechsteer.interventions.hooks`):

- static ``interventions`` (:class:`~mechsteer.interventions.hooks.Steering` / :class:`~mechsteer.interventions.hooks.Ablation`)
  at absolute positions, active for the whole call;
- a per-step ``step_callback``: after each forward it receives the last position's logits and
  the activations at ``record_hooks``, and returns vectors to add at named hooks to the *next*
  forward's new position. The hybrid generator drives generation through this.

Tokenization uses the tokenizer's own special-token rule (``add_special_tokens=True``): a
tokenizer that adds BOS gets BOS, one that does not (SmolLM2) gets none; a prompt that already
starts with the BOS text (a rendered chat template of an R1 distill or Llama 3) gets no second one.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import torch

from mechsteer.core.models import HOST
from mechsteer.core.tensor_types import Bool, Float, Int, Tensor, typechecked
from mechsteer.core.vocab import adds_special_tokens
from mechsteer.interventions.hooks import (
    Intervention,
    InterventionSet,
    add_direction,
)
from mechsteer.interventions.runner import (
    CachedRunner,
    left_pad,
    left_pad_host,
    pad_token_id,
    position_ids_for,
)

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge


@dataclass
class StepState:
    """What a step callback sees after each forward call."""

    step: int  # 0 for the prefill, then 1, 2, ...
    logits: Float[Tensor, "batch vocab"]  # next-token logits at the last position
    activations: dict[str, Float[Tensor, "batch d_model"]]  # record_hooks at the last position
    finished: Bool[Tensor, " batch"]  # rows that already stopped
    new_tokens: list[list[int]]  # tokens generated so far, per row


# Returns {hook_name: (batch, d_model) vector} to add at the next forward's new position.
StepCallback = Callable[[StepState], Mapping[str, Tensor] | None]


# Why a row stopped: its EOS token, a stop string, or max_new_tokens.
FinishReason = Literal["eos", "stop", "length"]


@dataclass
class GenerationOutput:
    texts: list[str]  # generated continuations, cut after the first stop string
    token_ids: list[list[int]]  # generated token ids (including the EOS / stop-completing token)
    prompt_token_ids: list[list[int]]
    finish_reasons: list[FinishReason]
    # hook name -> per prompt (n_generated, d_model): the activation at the position that
    # predicted each generated token.
    activations: dict[str, list[Tensor]] = field(default_factory=dict)


def tokenize_prompts(model: TransformerBridge, prompts: Sequence[str] | Sequence[Sequence[int]]) -> list[list[int]]:
    """Token ids of each prompt (strings use the tokenizer's own special-token rule)."""
    ids: list[list[int]] = []
    for prompt in prompts:
        if isinstance(prompt, str):
            ids.append(list(model.tokenizer(prompt, add_special_tokens=adds_special_tokens(model.tokenizer, prompt))["input_ids"]))
        else:
            ids.append([int(token) for token in prompt])
        if not ids[-1]:
            raise ValueError("empty prompt: every prompt needs at least one token")
    return ids


@dataclass
class Sampler:
    """Greedy decoding, or sampling with temperature / top-k / top-p from a seeded generator."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.do_sample and self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 when sampling; got {self.temperature}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1]; got {self.top_p}")
        self.generators: dict[torch.device, torch.Generator] = {}

    def generator(self, device: torch.device) -> torch.Generator:
        """The seeded generator of ``device``: sampling happens where the logits are (a CPU
        generator draws what it always drew; a CUDA one its own, equally reproducible, stream)."""
        if device not in self.generators:
            seed = self.seed if self.seed is not None else 0
            self.generators[device] = torch.Generator(device=device).manual_seed(seed)
        return self.generators[device]

    @typechecked
    def __call__(self, logits: Float[Tensor, "batch vocab"]) -> Int[Tensor, " batch"]:
        if not self.do_sample:
            return logits.argmax(dim=-1)
        scores = logits.float() / self.temperature
        if self.top_k is not None:
            kth = scores.topk(min(self.top_k, scores.shape[-1]), dim=-1).values[:, -1:]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if self.top_p is not None:
            sorted_scores, order = scores.sort(dim=-1, descending=True)
            cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
            drop_sorted = cumulative - sorted_scores.softmax(dim=-1) >= self.top_p
            drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
            scores = scores.masked_fill(drop, float("-inf"))
        probs = scores.softmax(dim=-1)
        return torch.multinomial(probs, 1, generator=self.generator(probs.device))[:, 0]


class StopChecker:
    """Tracks EOS and stop strings per row; decodes only a short tail of each row per step."""

    def __init__(self, model: TransformerBridge, stop_strings: Sequence[str], eos_token_id: int | None | Sequence[int]):
        self.tokenizer = model.tokenizer
        self.stop_strings = [s for s in stop_strings if s]
        if eos_token_id is None:
            eos_token_id = self.tokenizer.eos_token_id
        if eos_token_id is None:
            self.eos_ids: set[int] = set()
        elif isinstance(eos_token_id, int):
            self.eos_ids = {eos_token_id}
        else:
            self.eos_ids = {int(token) for token in eos_token_id}
        longest = max((len(s) for s in self.stop_strings), default=0)
        self.tail_tokens = longest + 4  # every token decodes to >= 1 char, except rare empties

    def reason(self, row_tokens: list[int]) -> FinishReason | None:
        if row_tokens and row_tokens[-1] in self.eos_ids:
            return "eos"
        if self.stop_strings:
            tail = self.tokenizer.decode(row_tokens[-self.tail_tokens :], skip_special_tokens=True)
            if any(stop in tail for stop in self.stop_strings):
                return "stop"
        return None

    def final_text(self, row_tokens: list[int]) -> str:
        text = self.tokenizer.decode(row_tokens, skip_special_tokens=True)
        cut_points = [text.find(stop) + len(stop) for stop in self.stop_strings if stop in text]
        return text[: min(cut_points)] if cut_points else text


def generate(
    model: TransformerBridge,
    prompts: Sequence[str] | Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    stop_strings: Sequence[str] = (),
    eos_token_id: int | Sequence[int] | None = None,
    batch_size: int | None = None,
    interventions: Sequence[Intervention] = (),
    step_callback: StepCallback | None = None,
    steering_hooks: Sequence[str] = (),
    record_hooks: Sequence[str] = (),
    return_activations: bool = False,
) -> GenerationOutput:
    """Generate continuations of ``prompts`` (strings or token id lists) with a KV cache.

    ``batch_size`` (default: all prompts at once) bounds memory; prompts keep their order.
    ``steering_hooks`` declares the hooks at which ``step_callback`` may add vectors.
    ``record_hooks`` names hooks (e.g. ``blocks.3.hook_resid_post``) whose last-position
    activation the callback sees each step; with ``return_activations`` they are also returned.
    Recording hooks run after any steering at the same hook, so they see steered values.
    """
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0; got {max_new_tokens}")
    unknown = [name for name in (*record_hooks, *steering_hooks) if name not in model.hook_dict]
    if unknown:
        raise ValueError(f"unknown hook names {unknown}; e.g. 'blocks.0.hook_resid_post'")
    all_ids = tokenize_prompts(model, prompts)
    size = batch_size or len(all_ids)
    if size <= 0:
        raise ValueError(f"batch_size must be positive; got {batch_size}")
    sampler = Sampler(do_sample, temperature, top_k, top_p, seed)
    stopper = StopChecker(model, stop_strings, eos_token_id)
    output = GenerationOutput([], [], [], [], {name: [] for name in record_hooks} if return_activations else {})
    for start in range(0, len(all_ids), size):
        batch_ids = all_ids[start : start + size]
        _generate_batch(model, batch_ids, max_new_tokens, sampler, stopper, interventions,
                        step_callback, list(steering_hooks), list(record_hooks),
                        return_activations, output)
    return output


def _generate_batch(
    model: TransformerBridge,
    batch_ids: list[list[int]],
    max_new_tokens: int,
    sampler: Sampler,
    stopper: StopChecker,
    interventions: Sequence[Intervention],
    step_callback: StepCallback | None,
    steering_hooks: list[str],
    record_hooks: list[str],
    return_activations: bool,
    output: GenerationOutput,
) -> None:
    """One batch. Rows that finish are dropped from the batch (their cache too), so no compute is
    spent on them; with a ``step_callback`` (it sees the whole batch every step) or static
    ``interventions`` (they may hold per-row settings, as the sufficiency windows do), they stay.
    Each step moves the new tokens to the host once, for the stop checks."""
    runner = CachedRunner(model, batch_ids)
    batch = runner.batch_size
    static = InterventionSet(list(interventions), runner.frame)
    pending_steering: dict[str, Tensor] = {}
    recorded: dict[str, Tensor] = {}
    # per hook, per step: (the rows in the batch at that step, their activations)
    history: dict[str, list[tuple[list[int], Tensor]]] = {name: [] for name in record_hooks}
    alive = list(range(batch))  # the original rows still in the runner, in its order
    drop_finished = step_callback is None and not interventions

    def steering_hook(name: str):
        def hook(resid: Tensor, hook: object) -> Tensor:
            vector = pending_steering.get(name)
            if vector is None:
                return resid
            # each row's own vector, at the newest input position only
            newest = torch.zeros(resid.shape[:2], dtype=torch.bool, device=resid.device)
            newest[:, -1] = True
            return add_direction(resid, vector.to(resid.device), 1.0, newest)

        return hook

    def record_hook(name: str):
        def hook(resid: Tensor, hook: object) -> Tensor:
            recorded[name] = resid[:, -1, :].detach().clone()
            return resid

        return hook

    hooks = static.hooks(model)
    hooks += [(name, steering_hook(name)) for name in steering_hooks]
    hooks += [(name, record_hook(name)) for name in record_hooks]

    new_tokens: list[list[int]] = [[] for _ in range(batch)]
    finished = [False] * batch
    reasons: list[FinishReason] = ["length"] * batch
    pad = pad_token_id(model)
    with torch.no_grad(), model.hooks(fwd_hooks=hooks):
        logits = runner.forward(last_only=True)[:, -1, :]
        for step in range(max_new_tokens):
            for name in record_hooks:
                history[name].append((list(alive), recorded[name]))
            pending_steering.clear()
            if step_callback is not None:
                state = StepState(step, logits, {n: recorded[n] for n in record_hooks},
                                  torch.tensor(finished, dtype=torch.bool, device=HOST), new_tokens)
                for name, vector in (step_callback(state) or {}).items():
                    if name not in steering_hooks:
                        raise ValueError(
                            f"step_callback steered {name!r}, which is not in steering_hooks "
                            f"{list(steering_hooks)}; declare it when calling generate"
                        )
                    if tuple(vector.shape) != (batch, model.cfg.d_model):
                        raise ValueError(
                            f"steering for {name} must have shape (batch, d_model) = "
                            f"({batch}, {model.cfg.d_model}); got {tuple(vector.shape)}"
                        )
                    pending_steering[name] = vector
            if sampler.do_sample and len(alive) < batch:
                # Draw for every row of the batch, as if none had left, so that what a row samples
                # does not depend on when the others finished.
                full = logits.new_zeros((batch, logits.shape[-1]))
                index = torch.tensor(alive, dtype=torch.long, device=logits.device)
                next_tokens = sampler(full.index_copy(0, index, logits)).index_select(0, index)
            else:
                next_tokens = sampler(logits)
            done_before = [row for row in alive if finished[row]]  # only without dropping
            host_tokens = next_tokens.tolist()  # the step's one transfer to the host
            for position, row in enumerate(alive):
                if finished[row]:
                    continue
                new_tokens[row].append(host_tokens[position])
                reason = stopper.reason(new_tokens[row])
                if reason is not None:
                    finished[row] = True
                    reasons[row] = reason
            if all(finished) or step == max_new_tokens - 1:
                break
            if drop_finished:
                keep = [position for position, row in enumerate(alive) if not finished[row]]
                if len(keep) < len(alive):
                    runner.select_rows(keep)
                    next_tokens = next_tokens.index_select(0, torch.tensor(keep, dtype=torch.long,
                                                                          device=next_tokens.device))
                    alive = [alive[position] for position in keep]
            elif done_before:
                finished_at = torch.tensor([alive.index(row) for row in done_before], dtype=torch.long,
                                           device=next_tokens.device)
                next_tokens = next_tokens.index_fill(0, finished_at, pad)
            runner.append(next_tokens)
            logits = runner.forward(last_only=True)[:, -1, :]

    for row in range(batch):
        output.texts.append(stopper.final_text(new_tokens[row]))
        output.token_ids.append(new_tokens[row])
        output.prompt_token_ids.append(batch_ids[row])
        output.finish_reasons.append(reasons[row])
        if return_activations:
            n_generated = len(new_tokens[row])
            for name in record_hooks:
                steps = [acts[rows.index(row)] for rows, acts in history[name][:n_generated]]
                stacked = torch.stack(steps) if steps else torch.zeros(0, model.cfg.d_model, device=HOST)
                output.activations[name].append(stacked.cpu())


# The runner's pieces stay importable from here, where they lived before mechsteer.interventions.runner.
__all__ = ["CachedRunner", "FinishReason", "GenerationOutput", "Sampler", "StepCallback", "StepState", "StopChecker",
           "generate", "left_pad", "left_pad_host", "pad_token_id", "position_ids_for", "tokenize_prompts"]
