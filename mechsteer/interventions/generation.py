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
tokenizer that adds BOS gets BOS, one that does not (SmolLM2, chat templates) gets none.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from transformer_lens.model_bridge import TransformerBridge

from mechsteer.core.tensor_types import Bool, Float, Int, Tensor, typechecked
from mechsteer.interventions.hooks import (
    Intervention,
    InterventionSet,
    PositionFrame,
    add_direction,
)


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
            ids.append(list(model.tokenizer(prompt, add_special_tokens=True)["input_ids"]))
        else:
            ids.append([int(token) for token in prompt])
        if not ids[-1]:
            raise ValueError("empty prompt: every prompt needs at least one token")
    return ids


def pad_token_id(model: TransformerBridge) -> int:
    tokenizer = model.tokenizer
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if candidate is not None:
            return int(candidate)
    return 0


@typechecked
def left_pad(
    token_ids: Sequence[Sequence[int]], pad_id: int, device: torch.device | str = "cpu"
) -> tuple[Int[Tensor, "batch pos"], Int[Tensor, "batch pos"], Int[Tensor, " batch"]]:
    """Left-pad token lists into (tokens, attention_mask, n_pad)."""
    longest = max(len(ids) for ids in token_ids)
    tokens = torch.full((len(token_ids), longest), pad_id, dtype=torch.long)
    mask = torch.zeros((len(token_ids), longest), dtype=torch.long)
    for row, ids in enumerate(token_ids):
        tokens[row, longest - len(ids) :] = torch.tensor(list(ids), dtype=torch.long)
        mask[row, longest - len(ids) :] = 1
    n_pad = longest - mask.sum(dim=1)
    return tokens.to(device), mask.to(device), n_pad.to(device)


@typechecked
def position_ids_for(attention_mask: Int[Tensor, "batch total"], n_new: int) -> Int[Tensor, "batch n_new"]:
    """Positions of the last ``n_new`` tokens, counting real tokens only (pads get 0)."""
    positions = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
    return positions[:, -n_new:]


class CachedRunner:
    """Runs one model incrementally over a padded batch, keeping its KV cache.

    Rows live in one padded layout: ``tokens``/``attention_mask`` of shape (batch, length),
    with padding (mask 0) wherever rows differ in length: at the left of the prompts, and
    inside the sequence where rows received different numbers of tokens in one call (ragged
    appends, rewinds). Pads are never attended to, and position ids count real tokens only,
    so every row computes exactly what it would alone. ``frame`` tells steering hooks the
    absolute position of each token of the current call. The hybrid generator uses two.
    """

    def __init__(self, model: TransformerBridge, token_ids: Sequence[Sequence[int]]):
        self.model = model
        self.pad_id = pad_token_id(model)
        device = next(model.parameters()).device
        self.tokens, self.attention_mask, _ = left_pad(token_ids, self.pad_id, device)
        self.frame = PositionFrame()
        self.cache = None
        self.n_fed = 0  # padded positions already in the cache

    @property
    def batch_size(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def n_pending(self) -> int:
        return int(self.tokens.shape[1]) - self.n_fed

    def n_real(self) -> list[int]:
        return self.attention_mask.sum(dim=1).tolist()

    def real_tokens(self, row: int) -> list[int]:
        return self.tokens[row][self.attention_mask[row].bool()].tolist()

    def forward(self) -> Float[Tensor, "batch pos vocab"]:
        """Feed the pending tokens; return their logits and extend the cache."""
        n_new = self.n_pending
        if n_new <= 0:
            raise ValueError("no pending tokens to feed")
        mask = self.attention_mask
        positions = position_ids_for(mask, n_new)
        self.frame.positions = torch.where(mask[:, -n_new:].bool(), positions, -1)
        logits, self.cache = self.model(
            self.tokens[:, self.n_fed :],
            return_type="logits_and_cache",
            past_key_values=self.cache,
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
        )
        self.n_fed = int(self.tokens.shape[1])
        return logits

    def append(self, new_tokens: Int[Tensor, " batch"], real: Bool[Tensor, " batch"] | None = None) -> None:
        """Queue one token per row for the next forward (``real`` False: a masked filler)."""
        column = new_tokens[:, None].to(self.tokens.device)
        mask_column = torch.ones_like(column) if real is None else real[:, None].long().to(column.device)
        self.tokens = torch.cat([self.tokens, column], dim=1)
        self.attention_mask = torch.cat([self.attention_mask, mask_column], dim=1)

    def append_ragged(self, suffixes: Sequence[Sequence[int]]) -> None:
        """Queue a different number of tokens per row, left-padded (masked) within the chunk."""
        if len(suffixes) != self.batch_size:
            raise ValueError(f"need one suffix per row ({self.batch_size}); got {len(suffixes)}")
        if not any(suffixes):
            return
        chunk, chunk_mask, _ = left_pad([list(s) or [self.pad_id] for s in suffixes], self.pad_id, self.tokens.device)
        for row, suffix in enumerate(suffixes):
            if not suffix:
                chunk_mask[row] = 0
        self.tokens = torch.cat([self.tokens, chunk], dim=1)
        self.attention_mask = torch.cat([self.attention_mask, chunk_mask], dim=1)

    def rewind(self, keep: Sequence[int]) -> None:
        """Keep the first ``keep[row]`` real tokens of each row and drop the rest.

        The cache is cropped at the earliest cut over the rows; kept tokens after that point
        are queued again (ragged), so the next forward recomputes only them.
        """
        self._crop_and_requeue(keep, drop_after_cut=True)

    def uncache(self, n_last: Sequence[int]) -> None:
        """Make the last ``n_last[row]`` real tokens of each row pending again (recomputed by the
        next forward, e.g. with steering), without dropping any token."""
        counts = self.n_real()
        self._crop_and_requeue([max(count - n, 0) for count, n in zip(counts, n_last, strict=True)],
                               drop_after_cut=False)

    def _crop_and_requeue(self, keep: Sequence[int], drop_after_cut: bool) -> None:
        length = int(self.tokens.shape[1])
        cuts = []
        for row, (count, kept) in enumerate(zip(self.n_real(), keep, strict=True)):
            if not 0 <= kept <= count:
                raise ValueError(f"row {row}: cannot keep {kept} of {count} real tokens")
            real_index = torch.nonzero(self.attention_mask[row]).flatten().tolist()
            cuts.append(real_index[kept] if kept < count else length)
        crop = min(min(cuts), self.n_fed)
        requeue = []
        for row, cut in enumerate(cuts):
            end = cut if drop_after_cut else length
            segment = self.tokens[row, crop:end][self.attention_mask[row, crop:end].bool()]
            requeue.append(segment.tolist())
        self.tokens = self.tokens[:, :crop]
        self.attention_mask = self.attention_mask[:, :crop]
        if crop == 0:
            self.cache = None  # an emptied cache object would ignore later batch reshapes
        elif self.cache is not None:
            # transformers 5.x: crop(-n) removes the last n cached positions
            surplus = self.cache.get_seq_length() - crop
            if surplus > 0:
                self.cache.crop(-surplus)
        self.n_fed = crop
        self.append_ragged(requeue)

    def fork(self, rows: Sequence[int] | None = None) -> CachedRunner:
        """An independent copy (own cache and tokens) of ``rows`` (all if None), sharing the model."""
        twin = copy.copy(self)
        index = torch.arange(self.batch_size) if rows is None else torch.tensor(list(rows), dtype=torch.long)
        index = index.to(self.tokens.device)
        twin.tokens, twin.attention_mask = self.tokens[index].clone(), self.attention_mask[index].clone()
        if self.cache is not None:
            # Shallow copies suffice: cache layers only ever rebind their tensors (cat, slice,
            # index), never write into them, so the fork's changes cannot reach this runner.
            twin.cache = copy.copy(self.cache)
            twin.cache.layers = [copy.copy(layer) for layer in self.cache.layers]
            if rows is not None:
                twin.cache.batch_select_indices(index)
        twin.frame = PositionFrame()
        return twin

    def repeat_rows(self, times: int) -> None:
        """Repeat each row ``times`` times in place (row r becomes rows r*times .. r*times+times-1)."""
        self.tokens = self.tokens.repeat_interleave(times, dim=0)
        self.attention_mask = self.attention_mask.repeat_interleave(times, dim=0)
        if self.cache is not None:
            self.cache.batch_repeat_interleave(times)


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
        self.generator = torch.Generator().manual_seed(self.seed if self.seed is not None else 0)

    @typechecked
    def __call__(self, logits: Float[Tensor, "batch vocab"]) -> Int[Tensor, " batch"]:
        if not self.do_sample:
            return logits.argmax(dim=-1)
        scores = logits.float().cpu() / self.temperature
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
        return torch.multinomial(probs, 1, generator=self.generator)[:, 0].to(logits.device)


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
    runner = CachedRunner(model, batch_ids)
    batch = runner.batch_size
    static = InterventionSet(list(interventions), runner.frame)
    pending_steering: dict[str, Tensor] = {}
    recorded: dict[str, Tensor] = {}
    history: dict[str, list[Tensor]] = {name: [] for name in record_hooks}

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
    finished = torch.zeros(batch, dtype=torch.bool)
    reasons: list[FinishReason] = ["length"] * batch
    pad = pad_token_id(model)
    with torch.no_grad(), model.hooks(fwd_hooks=hooks):
        logits = runner.forward()[:, -1, :]
        for step in range(max_new_tokens):
            for name in record_hooks:
                history[name].append(recorded[name])
            pending_steering.clear()
            if step_callback is not None:
                state = StepState(step, logits, {n: recorded[n] for n in record_hooks},
                                  finished.clone(), new_tokens)
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
            next_tokens = sampler(logits)
            next_tokens = torch.where(finished.to(next_tokens.device), torch.full_like(next_tokens, pad), next_tokens)
            for row in range(batch):
                if finished[row]:
                    continue
                new_tokens[row].append(int(next_tokens[row]))
                reason = stopper.reason(new_tokens[row])
                if reason is not None:
                    finished[row] = True
                    reasons[row] = reason
            if bool(finished.all()) or step == max_new_tokens - 1:
                break
            runner.append(next_tokens)
            logits = runner.forward()[:, -1, :]

    for row in range(batch):
        output.texts.append(stopper.final_text(new_tokens[row]))
        output.token_ids.append(new_tokens[row])
        output.prompt_token_ids.append(batch_ids[row])
        output.finish_reasons.append(reasons[row])
        if return_activations:
            n_generated = len(new_tokens[row])
            for name in record_hooks:
                stacked = torch.stack([acts[row] for acts in history[name][:n_generated]]) if n_generated else torch.zeros(0, model.cfg.d_model)
                output.activations[name].append(stacked.cpu())
