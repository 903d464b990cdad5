"""The hybrid model: the base model generates, the thinking model decides when to steer it.

At every token, for a batch of problems at once:

1. Both models have consumed the text so far through their own KV caches: the base model under
   the base prompt, the thinking model under its own prompt. We hold the base model's and the
   thinking model's next-token logits, and the thinking model's residual activation at the SAE
   layer for the last position.
2. A timing policy (:mod:`mechsteer.hybrid.timing`) decides per sequence whether to steer and with
   which behaviour.
3. For steered sequences, every candidate ``(coeff, window)`` of the grid is evaluated in
   batched forwards: ``coeff * (bias + direction_b)`` is added at the base model's steering
   layer to the last ``window`` positions (window 1: the current position), and the candidate's
   greedy token is read off. The coefficient rule (:mod:`mechsteer.hybrid.coefficients`) keeps
   one: by default the guardrail, the token the thinking model finds most likely (lowest
   perplexity); or the best top-K fit to the thinking distribution; or, as an oracle ceiling, the
   smallest coefficient giving the thinking model's token. The rule "learned" has no grid: a
   coefficient model reads the base residual at the steering layer and predicts the coefficient.
   Unsteered sequences take the base model's greedy token.
4. The chosen token is appended to both sequences.

In cache mode "revert" (the default) steering is *transient*, as in the paper's full-recompute
algorithm: it changes the prediction of the step at which it fires, and later steps see the
unsteered sequence. With caches this is done by forking the steered rows' cache, cropped before
the window, recomputing the window's positions steered, and discarding the fork. Candidates are
grouped by window, so each window is recomputed only as wide as it is (window 0, "all",
recomputes the whole sequence, as the paper also tried), and evaluated in chunks of at most
``max_candidates_per_chunk`` forked sequences, with the logits of the last position only: a
steered step's extra memory is bounded by that setting. In cache mode "keep" (window 1) the
steered position stays shifted for every later token: its column leaves the base cache and is
recomputed, with the chosen shift, in the same forward as the next token (no extra forward).

Devices and host transfers: every tensor of the per-token loop lives on its model's device (the
policy and its SAE on the thinking model's), and the tokens, flags and latents a step needs on the
host travel in one small transfer; full-vocabulary logits never leave the device. A steered row's
token joins the next step's transfer (its log and stop check wait one step), except when the text
must be re-encoded now (different tokenizers) or when no other row still runs.

Pairs whose tokenizers share the ordinary vocabulary (:mod:`mechsteer.core.vocab`; the paper's
pairs differ only in added tokens) hand token ids over, through a base -> thinking id table.
Cross-tokenizer pairs: the base token's text is appended to the thinking model's text, and only
the tail is re-encoded: the last ``lookback_tokens`` thinking tokens plus the new text. Where the
new text merges with the previous token (``"t"`` + ``"he"`` -> ``"the"``), the thinking cache is
cropped back to the first changed token and the changed tokens are fed again, so the thinking
model always sees the canonical tokenization of the text (exactly what re-encoding the whole
text gives, for tokenizers whose merges never reach back more than ``lookback_tokens`` tokens).

Exactness: tests/hybrid/test_hybrid.py and test_current_position.py check token-for-token
equality with a full-recompute oracle of this same algorithm
(:func:`mechsteer.hybrid.reference.reference_hybrid_generate`: no caches, batch size 1), with
windows, every coefficient rule and both cache modes, for shared and different tokenizers.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from mechsteer.core.models import HOST, input_device, resid_hook_name
from mechsteer.core.tensor_types import Float, Int, Tensor, typechecked
from mechsteer.core.vocab import tokenizers_compatible
from mechsteer.hybrid.coefficients import (
    COEFFICIENT_RULES,
    CacheMode,
    CoefficientModel,
    CoefficientRule,
    check_rule_and_mode,
    first_match,
    match_order,
    thinking_topk_targets,
    topk_fit,
)
from mechsteer.hybrid.pair_vocab import IncrementalDecoder, PairVocab, ThinkingText
from mechsteer.hybrid.timing import (
    BIAS_ONLY,
    PolicyDecision,
    PolicyInput,
    TimingPolicy,
    policy_read,
)
from mechsteer.interventions.generation import StopChecker, tokenize_prompts
from mechsteer.interventions.hooks import add_direction
from mechsteer.interventions.runner import CachedRunner
from mechsteer.steering.direction_set import DirectionSet

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge


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
    windows: tuple[int, ...] = (1,)  # steer the last w positions; 0: all of them
    max_new_tokens: int = 256
    stop_strings: tuple[str, ...] = ()
    batch_size: int = 8
    lookback_tokens: int = 16  # cross-tokenizer re-encoding window
    ignore_eos: bool = False  # generate exactly max_new_tokens (benchmarks)
    # Forked (row, candidate) sequences per candidate forward: a steered step's extra memory is
    # at most this many copies of a row's KV cache (cropped before the window) plus their window's
    # activations, whatever the grid and the batch.
    max_candidates_per_chunk: int = 32
    # How a steered row's coefficient is chosen and what stays in the cache (mechsteer.hybrid.coefficients)
    coefficient_rule: CoefficientRule = "guardrail"
    cache_mode: CacheMode = "revert"
    kl_top_k: int = 50  # K of coefficient_rule "kl_topk" (the correction vectors' training objective's K)

    def __post_init__(self) -> None:
        if not self.coefficients or not self.windows:
            raise ValueError("coefficients and windows must be non-empty")
        if any(window < 0 for window in self.windows):
            raise ValueError(f"windows must be >= 0 (0: all positions); got {self.windows}")
        if self.max_candidates_per_chunk < 1:
            raise ValueError(f"max_candidates_per_chunk must be >= 1; got {self.max_candidates_per_chunk}")
        check_rule_and_mode(self.coefficient_rule, self.cache_mode, tuple(self.windows), tuple(self.coefficients),
                            self.kl_top_k)

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
    matches_thinking: bool | None = None  # a steered token: it is the thinking model's greedy token (the same text)


@dataclass
class HybridOutput:
    texts: list[str]
    token_ids: list[list[int]]
    finish_reasons: list[str]
    token_logs: list[list[TokenLog]]
    # Cost of the steered steps: forked positions fed by candidate forwards, and the most forked
    # sequences in one forward (at most config.max_candidates_per_chunk).
    positions_recomputed: int = 0
    largest_fork: int = 0

    @property
    def steered_fractions(self) -> list[float]:
        """Share of each sequence's generated tokens that were steered."""
        return [sum(log.steered for log in logs) / len(logs) if logs else 0.0 for logs in self.token_logs]


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
    coefficient_model: CoefficientModel | None = None,
) -> HybridOutput:
    """Generate with the base model, steered when ``policy`` says so (see the module docstring).

    ``coefficient_model`` predicts the coefficients of ``config.coefficient_rule`` "learned" (only)."""
    if len(base_prompts) != len(thinking_prompts):
        raise ValueError("base_prompts and thinking_prompts must have the same length")
    if directions.d_model != base.cfg.d_model:
        raise ValueError(f"steering vectors have d_model {directions.d_model} but the base model has {base.cfg.d_model}")
    for model, layer, what in ((base, config.steer_layer, "steer_layer"), (thinking, config.read_layer, "read_layer")):
        if not 0 <= layer < model.cfg.n_layers:
            raise ValueError(f"{what} must be in [0, {model.cfg.n_layers - 1}]; got {layer}")
    if shared_tokenizer is None:
        shared_tokenizer = tokenizers_compatible(base.tokenizer, thinking.tokenizer)
    check_rule_inputs(config, shared_tokenizer, coefficient_model)
    if isinstance(coefficient_model, torch.nn.Module):
        coefficient_model.to(input_device(base))  # it reads the base residual where the base model runs
    vocab = PairVocab(base, thinking, shared_tokenizer)
    behaviours = BehaviourTable(directions, input_device(base))
    output = HybridOutput([], [], [], [])
    for start in range(0, len(base_prompts), config.batch_size):
        stop = start + config.batch_size
        _HybridBatch(base, thinking, list(base_prompts[start:stop]), list(thinking_prompts[start:stop]),
                     behaviours, policy, config, vocab, coefficient_model).run(output)
    return output


def check_rule_inputs(config: HybridConfig, shared_tokenizer: bool, coefficient_model: CoefficientModel | None) -> None:
    """What the coefficient rule needs besides the config: a coefficient model iff it is learned,
    and a shared vocabulary where the rule compares ids."""
    rule = config.coefficient_rule
    if (rule == "learned") != (coefficient_model is not None):
        raise ValueError("coefficient_rule 'learned' needs a coefficient_model, and only it takes one: "
                         f"got rule {rule!r} with coefficient_model={type(coefficient_model).__name__}")
    if COEFFICIENT_RULES[rule].shared_vocab_only and not shared_tokenizer:
        raise ValueError(f"coefficient_rule {rule!r} compares the two models' distributions token by token and "
                         "needs tokenizers sharing their ordinary vocabulary; use 'guardrail' for this pair")


class BehaviourTable:
    """``bias + direction_b`` for any behaviour, gathered on the base model's device."""

    def __init__(self, directions: DirectionSet, device: torch.device):
        self.directions, self.device = directions, device
        rows = directions.directions.to(device=device, dtype=torch.float32)
        self.stack = torch.cat([rows, torch.zeros((1, directions.d_model), dtype=torch.float32, device=device)])
        self.bias = None if directions.bias is None else directions.bias.to(device)

    def check(self, behaviours: Sequence[int]) -> None:
        for behaviour in behaviours:
            if behaviour != BIAS_ONLY and behaviour not in self.directions.behaviour_ids:
                raise ValueError(f"no direction for behaviour {behaviour}; known: {self.directions.behaviour_ids}")

    def vectors(self, behaviours: Sequence[int]) -> Float[Tensor, "batch d_model"]:
        self.check(behaviours)
        none = self.stack.shape[0] - 1  # the zero row: bias only
        index = [none if b == BIAS_ONLY else self.directions.index_of(b) for b in behaviours]
        out = self.stack.index_select(0, torch.tensor(index, dtype=torch.long, device=self.device))
        return out if self.bias is None else out + self.bias


@dataclass
class _StepOnHost:
    """What one step's transfer brought to the host, per row."""

    greedy: list[int]
    steer: list[bool]
    behaviour: list[int]
    agree: list[bool]
    latent_ids: list[list[int]] | None
    latent_values: list[list[float]] | None
    # last step's (chosen token, candidate taken, it is the thinking token[, coefficient bits]) per row
    previous: list[list[int]] | None


def _to_host(decision: PolicyDecision, agree: Tensor, greedy: Tensor,
             previous: tuple[Tensor, ...] | None, device: torch.device) -> _StepOnHost:
    """The step's one host transfer: every per-row number the host needs, packed as int64."""
    columns = [greedy, decision.steer.long(), decision.behaviour.long(), agree.long()]
    if previous is not None:
        columns += list(previous)
    packed = [column.to(device)[:, None] for column in columns]
    top = 0
    if decision.latent_ids is not None and decision.latent_values is not None:
        top = int(decision.latent_ids.shape[1])
        # float32 values travel as their bits, so that they arrive exactly
        packed += [decision.latent_ids.to(device).long(), float_bits(decision.latent_values.to(device))]
    rows = torch.cat(packed, dim=1).tolist()
    fixed = len(columns)
    n_previous = 0 if previous is None else len(previous)
    latent_ids = latent_values = None
    if top:
        latent_ids = [row[fixed : fixed + top] for row in rows]
        value_bits = torch.tensor([row[fixed + top :] for row in rows], dtype=torch.int64, device=HOST)
        latent_values = value_bits.to(torch.int32).view(torch.float32).tolist()
    return _StepOnHost(
        greedy=[row[0] for row in rows], steer=[bool(row[1]) for row in rows], behaviour=[row[2] for row in rows],
        agree=[bool(row[3]) for row in rows], latent_ids=latent_ids, latent_values=latent_values,
        previous=[row[4 : 4 + n_previous] for row in rows] if previous is not None else None)


def float_bits(values: Tensor) -> Tensor:
    """float32 values as int64 bits, so that they travel in an int64 transfer and arrive exactly."""
    return values.to(torch.float32).view(torch.int32).long()


def bits_to_floats(bits: list[int]) -> list[float]:
    return torch.tensor(bits, dtype=torch.int64, device=HOST).to(torch.int32).view(torch.float32).tolist()


@dataclass
class _Unresolved:
    """A steered row's log entry, waiting for its token (still on the device)."""

    behaviour: int
    agree: bool
    latent_ids: list[int]
    latent_values: list[float]


class _HybridBatch:
    def __init__(self, base, thinking, base_prompts, thinking_prompts, behaviours: BehaviourTable, policy,
                 config: HybridConfig, vocab: PairVocab, coefficient_model: CoefficientModel | None = None):
        self.base, self.thinking = base, thinking
        self.coefficient_model = coefficient_model
        self.behaviours, self.policy, self.config, self.vocab = behaviours, policy, config, vocab
        self.reads_text = policy.reads_text
        self.read_next = policy_read(policy) == "next_token"
        self.shared = vocab.shared
        self.base_runner = CachedRunner(base, tokenize_prompts(base, base_prompts))
        self.think_runner = CachedRunner(thinking, tokenize_prompts(thinking, thinking_prompts))
        self.base_device, self.think_device = self.base_runner.device, self.think_runner.device
        self.n_think_prompt = self.think_runner.n_real()
        self.batch = self.base_runner.batch_size
        # The steering of the current candidate forward: one vector, coefficient and window mask per row.
        self.steering: tuple[Tensor, Tensor, Tensor] | None = None
        self.recorded: Tensor | None = None
        # cache_mode keep: the shift of the last steered step, for the column the next forward recomputes
        self.kept: tuple[Tensor, Tensor, Tensor] | None = None
        # rule learned: the base residual at the steering layer's output, last position, before any shift
        self.base_resid: Tensor | None = None
        self.capture_base = False
        self.stopper = StopChecker(base, config.stop_strings, [] if config.ignore_eos else None)
        self.base_decoder = IncrementalDecoder(base.tokenizer)
        self.think_text = None if self.shared else ThinkingText(thinking.tokenizer, self.batch, config.lookback_tokens)
        groups: dict[int, list[int]] = {}
        for index, (_, window) in enumerate(config.candidates):
            groups.setdefault(window, []).append(index)
        self.window_groups = sorted(groups.items())
        self.coefficients = torch.tensor([coeff for coeff, _ in config.candidates], dtype=torch.float32,
                                         device=self.base_device)
        self.match_order = torch.tensor(match_order(config.candidates), dtype=torch.long, device=self.think_device)
        # Host-side state of the rows
        self.new_ids: list[list[int]] = [[] for _ in range(self.batch)]
        self.logs: list[list[TokenLog]] = [[] for _ in range(self.batch)]
        self.finished = [False] * self.batch
        self.reasons = ["length"] * self.batch
        self.unresolved: dict[int, _Unresolved] = {}
        # last step's (chosen tokens, candidate taken (-1: none), thinking's token[, learned coefficient bits])
        self.previous: tuple[Tensor, ...] | None = None
        self.positions_recomputed = 0  # forked positions fed by candidate forwards (cost accounting)
        self.largest_fork = 0

    # hooks ---------------------------------------------------------------------------------
    def _steer_hook(self, resid: Tensor, hook: object) -> Tensor:
        if self.capture_base:
            self.base_resid = resid[:, -1, :].detach().clone()
        if self.steering is None:
            return resid
        vectors, coeffs, mask = (t.to(resid.device) for t in self.steering)
        return add_direction(resid, vectors, coeffs, mask)

    def _record_hook(self, resid: Tensor, hook: object) -> Tensor:
        self.recorded = resid[:, -1, :].detach().clone()
        return resid

    def _recorded(self) -> Tensor:
        if self.recorded is None:
            raise RuntimeError(f"the thinking model's forward did not reach {resid_hook_name(self.config.read_layer)}")
        return self.recorded

    # steps ---------------------------------------------------------------------------------
    def _steered_choice(self, rows: list[int], behaviours: list[int], think_logits: Tensor,
                        think_greedy: Tensor, base_greedy: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """For steered ``rows``: the chosen token, the index of the candidate it came from (-1: none,
        the row stays unsteered) and the coefficient used, on the base device. Candidates share a
        fork per window and run in chunks of at most ``max_candidates_per_chunk`` forked sequences."""
        config, n_candidates, device = self.config, len(self.config.candidates), self.base_device
        rule = config.coefficient_rule
        vectors = self.behaviours.vectors(behaviours)
        row_index = torch.tensor(rows, dtype=torch.long, device=device)
        think_rows = row_index.to(self.think_device)
        row_coeffs = None
        if self.coefficient_model is not None:
            resid = self._base_resid().index_select(0, row_index)
            predicted = self.coefficient_model(resid, torch.tensor(behaviours, dtype=torch.long, device=device))
            row_coeffs = predicted.to(device=device, dtype=torch.float32) * self.coefficients[0]
        targets = None
        if rule == "kl_topk":
            targets = thinking_topk_targets(think_logits.index_select(0, think_rows), config.kl_top_k,
                                            self.vocab.to_base)
        tokens = torch.zeros(len(rows) * n_candidates, dtype=torch.long, device=device)
        fits = None if targets is None else torch.zeros(len(rows) * n_candidates, dtype=torch.float32, device=device)
        for window, members in self.window_groups:
            pairs = [(slot, candidate) for slot in range(len(rows)) for candidate in members]
            for start in range(0, len(pairs), config.max_candidates_per_chunk):
                chunk = pairs[start : start + config.max_candidates_per_chunk]
                fork, in_window = self.base_runner.fork_window([rows[slot] for slot, _ in chunk], window)
                self.positions_recomputed += len(chunk) * fork.n_pending
                self.largest_fork = max(self.largest_fork, len(chunk))
                slots = torch.tensor([slot for slot, _ in chunk], dtype=torch.long, device=device)
                picks = torch.tensor([candidate for _, candidate in chunk], dtype=torch.long, device=device)
                coeffs = (self.coefficients.index_select(0, picks) if row_coeffs is None
                          else row_coeffs.index_select(0, slots))
                self.steering = (vectors.index_select(0, slots), coeffs, in_window)
                try:
                    logits = fork.forward(last_only=True)[:, -1, :]
                finally:
                    self.steering = None
                tokens.index_copy_(0, slots * n_candidates + picks, logits.argmax(dim=-1).to(device))
                if targets is not None and fits is not None:
                    fit = topk_fit(logits, targets[0].index_select(0, slots.to(targets[0].device)),
                                   targets[1].index_select(0, slots.to(targets[1].device)))
                    fits.index_copy_(0, slots * n_candidates + picks, fit.to(device))
        tokens = tokens.view(len(rows), n_candidates)
        if rule == "think_top1_match":
            expected = think_greedy.index_select(0, think_rows).repeat_interleave(n_candidates)
            matches = self.vocab.agree(tokens.flatten(), expected).view(len(rows), n_candidates)
            best = first_match(matches, self.match_order).to(device)
        elif n_candidates == 1:
            best = torch.zeros(len(rows), dtype=torch.long, device=device)
        elif fits is not None:  # kl_topk
            best = fits.view(len(rows), n_candidates).argmax(dim=-1)  # the first best fit
        else:
            # the guardrail: the candidate the thinking model finds most likely (first on ties)
            logprobs = think_logits.index_select(0, think_rows).float().log_softmax(dim=-1)
            ids = self.vocab.thinking_ids(tokens).to(logprobs.device)
            scores = logprobs.gather(1, ids.clamp(min=0)).masked_fill(ids < 0, float("-inf"))
            best = scores.argmax(dim=-1).to(device)
        taken = best >= 0
        chosen = torch.where(taken, tokens.gather(1, best.clamp(min=0)[:, None])[:, 0],
                             base_greedy.index_select(0, row_index))
        if row_coeffs is None:
            row_coeffs = torch.where(taken, self.coefficients.index_select(0, best.clamp(min=0)), 0.0)
        return chosen, best, row_coeffs

    def _base_resid(self) -> Tensor:
        if self.base_resid is None:
            raise RuntimeError(f"the base model's forward did not reach {resid_hook_name(self.config.steer_layer)}")
        return self.base_resid

    def _keep(self, rows: Tensor, behaviours: list[int], coeffs: Tensor) -> None:
        """cache_mode keep: the last column leaves the cache, to be recomputed by the next forward
        with the steered rows' chosen shift (rows not taken have coefficient 0: no shift)."""
        vectors = torch.zeros((self.batch, self.behaviours.stack.shape[1]), dtype=torch.float32,
                              device=self.base_device)
        vectors = vectors.index_copy(0, rows, self.behaviours.vectors(behaviours))
        full_coeffs = torch.zeros(self.batch, dtype=torch.float32, device=self.base_device).index_copy(0, rows, coeffs)
        kept_rows = torch.zeros(self.batch, dtype=torch.bool, device=self.base_device).index_fill(0, rows, True)
        self.base_runner.unfeed_last_column()
        self.kept = (vectors, full_coeffs, kept_rows)

    def _base_forward(self) -> Tensor:
        """The base model's next forward (the kept shift on the column it recomputes, if any); its
        last position's logits. Records the base residual the learned rule reads."""
        if self.kept is not None:
            vectors, coeffs, kept_rows = self.kept
            # pending: the kept column, then the new token
            mask = torch.zeros((self.batch, self.base_runner.n_pending), dtype=torch.bool, device=self.base_device)
            mask[:, 0] = kept_rows
            self.steering, self.kept = (vectors, coeffs, mask), None
        self.capture_base = self.coefficient_model is not None
        try:
            return self.base_runner.forward(last_only=True)[:, -1, :]
        finally:
            self.steering, self.capture_base = None, False

    def _log(self, row: int, token: int, log: TokenLog) -> None:
        self.logs[row].append(log)
        self.new_ids[row].append(token)
        reason = self.stopper.reason(self.new_ids[row])
        if reason is not None:
            self.finished[row], self.reasons[row] = True, reason

    def _resolve(self, previous: list[list[int]]) -> None:
        """Log the rows steered last step, now that their (token, candidate, match[, coefficient bits])
        are on the host. A row whose rule took no candidate (think_top1_match) is logged unsteered."""
        learned = bits_to_floats([row[3] for row in previous]) if self.coefficient_model is not None else None
        for row, pending in self.unresolved.items():
            token, choice, matches = previous[row][0], previous[row][1], bool(previous[row][2])
            if choice < 0:
                log = TokenLog(steered=False, behaviour=None, coeff=0.0, window=0, agree=pending.agree,
                               latent_ids=pending.latent_ids, latent_values=pending.latent_values)
            else:
                coeff, window = self.config.candidates[choice]
                log = TokenLog(steered=True, behaviour=pending.behaviour, coeff=coeff if learned is None else learned[row],
                               window=window, agree=pending.agree, latent_ids=pending.latent_ids,
                               latent_values=pending.latent_values, matches_thinking=matches)
            self._log(row, token, log)
        self.unresolved.clear()

    def _resolve_now(self) -> None:
        """Bring last step's steered tokens to the host now (an extra transfer)."""
        if self.unresolved and self.previous is not None:
            self._resolve(torch.stack(self.previous, dim=1).tolist())

    def _next_token_acts(self, think_greedy: Tensor) -> Tensor:
        """The thinking model's read-layer activation at its own greedy next token: appended to every
        running row for one forward, then dropped again (the cache is cropped back)."""
        self.think_runner.append(think_greedy, real=[not done for done in self.finished])
        self.think_runner.forward(last_only=True)
        acts = self._recorded()
        self.think_runner.drop_last_column()
        return acts

    def _only_unresolved_run(self) -> bool:
        return bool(self.unresolved) and all(self.finished[row] or row in self.unresolved for row in range(self.batch))

    def _append_thinking(self, chosen: Tensor, active: list[bool]) -> Tensor | None:
        """Append the chosen tokens to the thinking sequences; return which rows got tokens (on
        the thinking device), or None when none did."""
        if self.shared:
            ids = self.vocab.thinking_ids(chosen)
            # a base special token the thinking vocabulary lacks is dropped, as re-encoding drops it
            self.think_runner.append(ids.clamp(min=0), real=active, valid=ids >= 0)
            return self.think_runner.last_real_column()
        assert self.think_text is not None
        keeps, suffixes = self.think_runner.n_real(), list[list[int]]()
        for row in range(self.batch):
            if not active[row]:
                suffixes.append([])
                continue
            kept, new_ids = self.think_text.extend(row, self.base_decoder.piece(self.new_ids[row]))
            keeps[row] = self.n_think_prompt[row] + kept
            suffixes.append(new_ids)
        self.think_runner.rewind(keeps)
        self.think_runner.append_ragged(suffixes)
        updated = [bool(suffix) for suffix in suffixes]
        if not any(updated) or self.think_runner.n_pending == 0:
            return None
        return torch.tensor(updated, dtype=torch.bool, device=HOST).to(self.think_device)

    def run(self, output: HybridOutput) -> None:
        config = self.config
        steer_name = resid_hook_name(config.steer_layer)
        read_name = resid_hook_name(config.read_layer)
        with torch.no_grad(), self.base.hooks(fwd_hooks=[(steer_name, self._steer_hook)]), \
                self.thinking.hooks(fwd_hooks=[(read_name, self._record_hook)]):
            base_logits = self._base_forward()
            think_logits = self.think_runner.forward(last_only=True)[:, -1, :]
            think_acts = self._recorded()
            for step in range(config.max_new_tokens):
                base_greedy = base_logits.argmax(dim=-1).to(self.base_device)
                think_greedy = think_logits.argmax(dim=-1).to(self.think_device)
                agree = self.vocab.agree(base_greedy, think_greedy)
                generated = None
                if self.reads_text:
                    self._resolve_now()  # the text up to this step, steered tokens included
                    generated = self.new_ids
                read_acts = self._next_token_acts(think_greedy) if self.read_next else think_acts
                decision: PolicyDecision = self.policy.decide(
                    PolicyInput(step, read_acts, base_logits, think_logits, agree, generated))
                host = _to_host(decision, agree, base_greedy, self.previous if self.unresolved else None,
                                self.think_device)
                if host.previous is not None:
                    self._resolve(host.previous)
                active = [not done for done in self.finished]
                steer_rows = [row for row in range(self.batch) if host.steer[row] and active[row]]
                chosen, choice, matches = base_greedy, torch.full_like(base_greedy, -1), agree  # unsteered: as agreed
                used = torch.zeros(self.batch, dtype=torch.float32, device=self.base_device)
                kept: tuple[Tensor, list[int], Tensor] | None = None
                if steer_rows:
                    index = torch.tensor(steer_rows, dtype=torch.long, device=self.base_device)
                    behaviours = [host.behaviour[row] for row in steer_rows]
                    steered_tokens, best, coeffs = self._steered_choice(steer_rows, behaviours, think_logits,
                                                                        think_greedy, base_greedy)
                    chosen = chosen.index_copy(0, index, steered_tokens)
                    matches = self.vocab.agree(chosen, think_greedy)
                    choice = choice.index_copy(0, index, best)
                    used = used.index_copy(0, index, coeffs)
                    kept = (index, behaviours, coeffs)
                for row in range(self.batch):
                    if not active[row]:
                        continue
                    latent_ids = [] if host.latent_ids is None else host.latent_ids[row]
                    latent_values = [] if host.latent_values is None else [round(v, 4) for v in host.latent_values[row]]
                    if row in steer_rows:
                        self.unresolved[row] = _Unresolved(host.behaviour[row], host.agree[row], latent_ids,
                                                           latent_values)
                    else:
                        self._log(row, host.greedy[row], TokenLog(steered=False, behaviour=None, coeff=0.0, window=0,
                                                                  agree=host.agree[row], latent_ids=latent_ids,
                                                                  latent_values=latent_values))
                self.previous = (chosen, choice, matches.long().to(self.base_device), *([] if self.coefficient_model is None else [float_bits(used)]))
                if self.unresolved and (not self.shared or self._only_unresolved_run()):
                    # the text must be re-encoded now, or whether any row runs on decides whether to go on
                    self._resolve_now()
                if all(self.finished) or step == config.max_new_tokens - 1:
                    break
                if kept is not None and self.config.cache_mode == "keep":
                    self._keep(*kept)
                self.base_runner.append(chosen, real=active)
                updated = self._append_thinking(chosen, active)
                base_logits = self._base_forward()
                if updated is not None:
                    fresh_logits = self.think_runner.forward(last_only=True)[:, -1, :]
                    think_logits = torch.where(updated[:, None], fresh_logits, think_logits)
                    think_acts = torch.where(updated[:, None], self._recorded(), think_acts)
            self._resolve_now()
        for row in range(self.batch):
            output.texts.append(self.stopper.final_text(self.new_ids[row]))
            output.token_ids.append(self.new_ids[row])
            output.finish_reasons.append(self.reasons[row])
            output.token_logs.append(self.logs[row])
        output.positions_recomputed += self.positions_recomputed
        output.largest_fork = max(output.largest_fork, self.largest_fork)


__all__ = ["BehaviourTable", "HybridConfig", "HybridOutput", "TokenLog", "behaviour_vectors", "check_rule_inputs",
           "hybrid_generate"]
