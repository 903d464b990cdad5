"""Optimised steering vectors (as in the paper), trained in the base model.

Model weights frozen (``requires_grad`` off, and checked to have no ``.grad`` afterwards); one
vector is trained with Adam (lr 1e-2), a cosine schedule and early stopping on a held-out
slice. First the bias, on the teacher-forced cross-entropy of whole thinking traces (reasoning
tokens) under the base framing; then each behaviour vector, with the trained bias added too
(fixed), on the cross-entropy of that behaviour's sentences given the base prompt plus the
trace before the sentence. The vector starts random at norm 1 and is added (with
:func:`~mechsteer.interventions.hooks.add_direction`) at ``resid_post`` of the layer at the
*target positions*: the positions whose next-token predictions are scored (the token before
the target span through its second-to-last token), or at every position with ``positions="all"``.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, get_args

import torch

from mechsteer.activations import trace_sentences
from mechsteer.core.models import resid_hook_name
from mechsteer.core.tensor_types import Float, Tensor
from mechsteer.core.vocab import adds_special_tokens
from mechsteer.data.labels import TraceLabeller
from mechsteer.data.traces import TraceRecord
from mechsteer.interventions.hooks import add_direction
from mechsteer.steering.direction_set import SITE, DirectionSet, direction_provenance
from mechsteer.steering.labels import SentenceLabeller, require_labelled

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

# "targets": the positions predicting target tokens; "all": every position of the example.
SteerPositions = Literal["targets", "all"]
STEER_POSITIONS: tuple[str, ...] = get_args(SteerPositions)


@dataclass(frozen=True)
class OptimisationConfig:
    """Vector training settings; defaults follow the paper (method notes, section 5)."""

    lr: float = 1e-2
    steps: int = 50
    batch_size: int = 2
    val_fraction: float = 0.2
    max_val_examples: int = 64
    eval_every: int = 5
    patience: int = 3
    init_norm: float = 1.0
    max_examples: int = 2048
    positions: SteerPositions = "targets"
    # Behaviour vectors: score only the first ``onset_tokens`` tokens of each sentence (the
    # decision to start the behaviour), not the whole sentence (None, the paper's objective).
    onset_tokens: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.positions not in STEER_POSITIONS:
            raise ValueError(f"positions must be 'targets' or 'all'; got {self.positions!r}")
        if self.onset_tokens is not None and self.onset_tokens < 1:
            raise ValueError(f"onset_tokens must be >= 1 (or None: the whole sentence); got {self.onset_tokens}")
        if self.steps < 1 or self.batch_size < 1 or self.eval_every < 1 or self.patience < 1:
            raise ValueError("steps, batch_size, eval_every and patience must be >= 1")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1); got {self.val_fraction}")


@dataclass(frozen=True)
class SteeringExample:
    """Token ids and the half-open span ``[target_start, target_end)`` of tokens to predict."""

    token_ids: tuple[int, ...]
    target_start: int
    target_end: int

    def __post_init__(self) -> None:
        if not 1 <= self.target_start < self.target_end <= len(self.token_ids):
            raise ValueError(f"target span [{self.target_start}, {self.target_end}) must lie in "
                             f"[1, {len(self.token_ids)}] and be non-empty")


@dataclass
class OptimisationReport:
    n_train: int
    n_val: int
    initial_val_loss: float
    best_val_loss: float
    best_step: int
    steps_run: int
    stopped_early: bool
    train_losses: list[float] = field(default_factory=list)
    val_losses: list[tuple[int, float]] = field(default_factory=list)
    final_norm: float = 0.0
    seconds: float = 0.0


def reasoning_example(record: TraceRecord, tokenizer: Any) -> SteeringExample:
    """The whole trace, with its reasoning tokens as targets (the bias vector's objective)."""
    encoded = tokenizer(record.text, return_offsets_mapping=True,
                        add_special_tokens=adds_special_tokens(tokenizer, record.text))
    offsets = encoded["offset_mapping"]
    inside = [i for i, (start, end) in enumerate(offsets)
              if end > start and start >= record.reasoning_char_start and end <= record.reasoning_char_end]
    if not inside:
        raise ValueError(f"trace {record.problem_id!r} has no reasoning tokens")
    return SteeringExample(tuple(encoded["input_ids"]), max(inside[0], 1), inside[-1] + 1)


def sentence_examples(
    traces: Sequence[TraceRecord], tokenizer: Any, labeller: SentenceLabeller, behaviour_id: int, *,
    text_labeller: TraceLabeller | None = None, min_words: int = 3,
) -> list[SteeringExample]:
    """One example per sentence labelled ``behaviour_id``: the text up to its end, the sentence as target."""
    examples = []
    for index, record in enumerate(traces):
        ids, sentences = trace_sentences(record, index, tokenizer, min_words=min_words, labeller=text_labeller)
        for sentence in sentences:
            if labeller(sentence) == behaviour_id and sentence.tok_start >= 1:
                examples.append(SteeringExample(tuple(ids[: sentence.tok_end]), sentence.tok_start, sentence.tok_end))
    return examples


def onset_example(example: SteeringExample, n_tokens: int) -> SteeringExample:
    """``example`` cut after the first ``n_tokens`` of its target span (the rest is never seen)."""
    end = min(example.target_end, example.target_start + n_tokens)
    return SteeringExample(example.token_ids[:end], example.target_start, end)


def _batch_tensors(examples: Sequence[SteeringExample], pad_id: int, positions: SteerPositions
                   ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Right-padded tokens, next-token targets, loss mask and steering mask (causal: pads never matter)."""
    longest = max(len(e.token_ids) for e in examples)
    tokens = torch.full((len(examples), longest), pad_id, dtype=torch.long)
    loss_mask = torch.zeros((len(examples), longest), dtype=torch.bool)
    steer_mask = torch.zeros((len(examples), longest), dtype=torch.bool)
    for row, example in enumerate(examples):
        tokens[row, : len(example.token_ids)] = torch.tensor(example.token_ids)
        # position p predicts token p + 1
        loss_mask[row, example.target_start - 1 : example.target_end - 1] = True
        if positions == "all":
            steer_mask[row, : len(example.token_ids)] = True
        else:
            steer_mask[row, example.target_start - 1 : example.target_end - 1] = True
    targets = torch.roll(tokens, -1, dims=1)
    return tokens, targets, loss_mask, steer_mask


def _steered_loss(model: TransformerBridge, hook_name: str, vector: Tensor, fixed: Tensor | None,
                  examples: Sequence[SteeringExample], pad_id: int, positions: SteerPositions) -> Tensor:
    device = vector.device
    tokens, targets, loss_mask, steer_mask = (t.to(device) for t in _batch_tensors(examples, pad_id, positions))
    total = vector if fixed is None else vector + fixed

    def hook(resid: Tensor, hook: object) -> Tensor:
        return add_direction(resid, total, 1.0, steer_mask)

    with model.hooks(fwd_hooks=[(hook_name, hook)]):
        logits = model(tokens)
    losses = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none")
    return losses[loss_mask].mean()


def optimise_vector(
    model: TransformerBridge,
    examples: Sequence[SteeringExample],
    layer: int,
    config: OptimisationConfig = OptimisationConfig(),
    *,
    fixed: Float[Tensor, " d_model"] | None = None,
) -> tuple[Float[Tensor, " d_model"], OptimisationReport]:
    """Train one vector added at ``resid_post`` of ``layer`` to minimise the examples' target loss.

    ``fixed`` (e.g. the bias) is added alongside but not trained. Model weights are frozen
    for the call (their ``requires_grad`` flags are restored afterwards) and must end with
    no ``.grad``. Returns the best vector on the held-out slice, and a report.
    """
    if not 0 <= layer < model.cfg.n_layers:
        raise ValueError(f"layer must be in [0, {model.cfg.n_layers - 1}]; got {layer}")
    if len(examples) < 2:
        raise ValueError(f"need at least 2 examples (train and held-out); got {len(examples)}")
    started = time.perf_counter()
    generator = torch.Generator().manual_seed(config.seed)
    order = torch.randperm(len(examples), generator=generator).tolist()[: config.max_examples]
    n_val = min(max(1, round(len(order) * config.val_fraction)), config.max_val_examples, len(order) - 1)
    val = [examples[i] for i in order[:n_val]]
    train = [examples[i] for i in order[n_val:]]
    device = next(model.parameters()).device
    hook_name = resid_hook_name(layer, SITE)
    pad_id = model.tokenizer.pad_token_id or 0
    d_model = model.cfg.d_model
    init = torch.randn(d_model, generator=generator)
    vector = (init / init.norm() * config.init_norm).to(device).requires_grad_(True)
    fixed_vector = None if fixed is None else fixed.detach().to(device).float()
    optimizer = torch.optim.Adam([vector], lr=config.lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.steps)

    def validation_loss() -> float:
        with torch.no_grad():
            total = 0.0
            for start in range(0, len(val), config.batch_size):
                chunk = val[start : start + config.batch_size]
                total += float(_steered_loss(model, hook_name, vector, fixed_vector, chunk, pad_id, config.positions)) * len(chunk)
            return total / len(val)

    frozen_flags = [(parameter, parameter.requires_grad) for parameter in model.parameters()]
    for parameter, _ in frozen_flags:
        parameter.requires_grad_(False)
    try:
        initial = validation_loss()
        best_loss, best_vector, best_step = initial, vector.detach().clone(), 0
        report = OptimisationReport(len(train), len(val), initial, initial, 0, 0, False, val_losses=[(0, initial)])
        evals_without_gain = 0
        for step in range(1, config.steps + 1):
            picks = torch.randint(len(train), (config.batch_size,), generator=generator).tolist()
            loss = _steered_loss(model, hook_name, vector, fixed_vector, [train[i] for i in picks], pad_id,
                                 config.positions)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            report.train_losses.append(float(loss.detach()))
            report.steps_run = step
            if step % config.eval_every == 0 or step == config.steps:
                current = validation_loss()
                report.val_losses.append((step, current))
                if current < best_loss:
                    best_loss, best_vector, best_step = current, vector.detach().clone(), step
                    evals_without_gain = 0
                else:
                    evals_without_gain += 1
                    if evals_without_gain >= config.patience:
                        report.stopped_early = True
                        break
    finally:
        for parameter, flag in frozen_flags:
            parameter.requires_grad_(flag)
    with_grad = [name for name, parameter in model.named_parameters() if parameter.grad is not None]
    if with_grad:
        raise RuntimeError(f"model parameters received gradients while optimising a vector: {with_grad[:5]}")
    report.best_val_loss, report.best_step = best_loss, best_step
    report.final_norm = float(best_vector.norm())
    report.seconds = time.perf_counter() - started
    return best_vector.cpu(), report


def build_optimised_directions(
    base_model: TransformerBridge,
    thinking_traces: Sequence[TraceRecord],
    labeller: SentenceLabeller,
    behaviour_ids: Sequence[int],
    titles: Sequence[str],
    layer: int,
    config: OptimisationConfig = OptimisationConfig(),
    *,
    text_labeller: TraceLabeller | None = None,
    min_words: int = 3,
    skip_empty: bool = False,
    progress: Callable[[str], None] | None = None,
) -> DirectionSet:
    """The bias on whole traces, then each behaviour's vector with the bias added (see the module docstring).

    ``skip_empty`` leaves out behaviours with fewer than 2 labelled sentences (listed in
    ``provenance["skipped_behaviours"]``) instead of raising. ``progress`` gets a line per vector.
    """
    say = progress or (lambda message: None)
    tokenizer = base_model.tokenizer
    # every behaviour's examples built (and counted) before any training step
    examples_of = {int(b): sentence_examples(thinking_traces, tokenizer, labeller, int(b), text_labeller=text_labeller,
                                             min_words=min_words)
                   for b in behaviour_ids}
    counts = {b: len(examples) for b, examples in examples_of.items()}
    if skip_empty:
        kept = [(int(b), t) for b, t in zip(behaviour_ids, titles, strict=True) if counts[int(b)] >= 2]
        if not kept:
            require_labelled(counts, titles, 2, "optimised vectors (a training and a held-out example)")
        skipped = [b for b in counts if counts[b] < 2]
        behaviour_ids, titles = [b for b, _ in kept], [t for _, t in kept]
    else:
        require_labelled(counts, titles, 2, "optimised vectors (a training and a held-out example)")
        skipped = []
    say(f"  optimising the bias on {len(thinking_traces)} traces ({config.steps} steps)")
    bias, bias_report = optimise_vector(base_model, [reasoning_example(r, tokenizer) for r in thinking_traces],
                                        layer, config)
    vectors, reports = [], {}
    for behaviour in behaviour_ids:
        examples = examples_of[int(behaviour)]  # at least 2: checked above
        if config.onset_tokens is not None:
            examples = [onset_example(example, config.onset_tokens) for example in examples]
        say(f"  optimising behaviour {behaviour} on {len(examples)} sentences ({config.steps} steps)")
        vector, report = optimise_vector(base_model, examples, layer, config, fixed=bias)
        vectors.append(vector)
        reports[str(int(behaviour))] = dataclasses.asdict(report)
    return DirectionSet(
        model_name=base_model.cfg.model_name, d_model=base_model.cfg.d_model, n_layers=base_model.cfg.n_layers,
        layer=layer, site=SITE, method="optimised", behaviour_ids=list(behaviour_ids), titles=list(titles),
        directions=torch.stack(vectors), bias=bias,
        provenance=direction_provenance(
            base_model, "optimised", config=dataclasses.asdict(config),
            bias_report=dataclasses.asdict(bias_report), behaviour_reports=reports,
            n_thinking_traces=len(thinking_traces), skipped_behaviours=skipped,
            hook_note="trained and injected at resid_post of the layer"),
    )


__all__ = [
    "STEER_POSITIONS", "OptimisationConfig", "OptimisationReport", "SteerPositions", "SteeringExample",
    "build_optimised_directions", "optimise_vector", "reasoning_example", "sentence_examples",
]
