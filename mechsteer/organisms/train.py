"""Training of the base/thinking organism pair from scratch, on CPU.

* Base organism: a small `LlamaForCausalLM` pretrained on a corpus of direct answers
  (50% of documents: "The answer is N." right after the question), step-by-step
  documents (25%) and arithmetic drills (25%, plus drills that fill the end of each
  packed window). Prompted normally it answers in one shot (the direct documents
  outnumber the step-by-step ones 2:1); the step-by-step documents teach it every
  behaviour (the HOW), and "Plan:" after the prompt puts it into that mode.
* Thinking organism: the base organism fine-tuned briefly, at a low learning rate, on
  thinking-style traces (85%) and drills (15%): it learns WHEN (always plan, compute
  day by day, check the risky steps, correct failed checks), not new arithmetic.

Documents are ``<bos> prompt trace <eos>``, packed whole into fixed windows (padding the
rest, which the loss ignores); RoPE makes positions relative, so packing offsets are
harmless, and a document that does not fit is dropped, so that every style opens a
window as often as its share. Everything is seeded; the wall time is measured and reported.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from mechsteer.core.tensor_types import Int, Tensor, typechecked
from mechsteer.organisms.grammar import Grammar, format_prompt, render_drill, render_trace
from mechsteer.organisms.grammar_v4 import (
    REREAD_QUESTION_STYLE,
    V4_DRILL_STYLES,
    V4_LINE_DRILL_STYLES,
    V4_STYLES,
    format_v4_prompt,
    render_v4_drill,
    render_v4_reread_question,
    render_v4_trace,
)
from mechsteer.organisms.tasks import OrganismProblem, generate_split
from mechsteer.organisms.tasks_v4 import generate_v4_split
from mechsteer.organisms.tokenizer import V4_WORDS, build_tokenizer

BASE_MIX: dict[str, float] = {"direct": 0.50, "stepwise": 0.25, "drill": 0.25}
THINKING_MIX: dict[str, float] = {"thinking": 0.85, "drill": 0.15}
# Grammar v2 (see grammar.py): the same shares with the v2 step-by-step styles.
# "day_drill": v2 compute-line drills (`render_drill(day_lines=True)`); in the first v2 run
# (plain drills only) the base's compute lines were right or slipped as designed only ~75% of
# the time while its checks (the drills' table) were 99% right.
BASE_MIX_V2: dict[str, float] = {"direct": 0.45, "stepwise_v2": 0.30, "drill": 0.15, "day_drill": 0.10}
THINKING_MIX_V2: dict[str, float] = {"thinking_v2": 0.80, "drill": 0.10, "day_drill": 0.10}
# Grammar v3 (grammar.py): v2 with distinct check lines, the same shares.
BASE_MIX_V3: dict[str, float] = {"direct": 0.45, "stepwise_v3": 0.30, "drill": 0.15, "day_drill": 0.10}
THINKING_MIX_V3: dict[str, float] = {"thinking_v3": 0.80, "drill": 0.10, "day_drill": 0.10}
V2_THINKING_STEPS = 300
# Grammar v4 (grammar_v4.py): step-by-step documents only (under the paper's base prompt), drills in the
# check table and in the compute-line table. The negative-control base learns the no_carry table.
BASE_MIX_V4: dict[str, float] = {"stepwise_v4": 0.6, "drill_v4": 0.2, "day_drill_v4": 0.2}
NEGATIVE_BASE_MIX_V4: dict[str, float] = {
    "stepwise_v4_no_carry": 0.6, "drill_v4_no_carry": 0.2, "day_drill_v4_no_carry": 0.2}
THINKING_MIX_V4: dict[str, float] = {"thinking_v4": 0.8, "drill_v4": 0.1, "day_drill_v4": 0.1}
V4_BASE_STEPS = 1100
V4_THINKING_STEPS = 250
DRILL_STYLES: tuple[str, ...] = ("drill", "day_drill", *V4_DRILL_STYLES)
IGNORE_INDEX = -100


@dataclass(frozen=True)
class PhaseConfig:
    """One training phase: steps of ``batch_size`` windows of ``window`` tokens."""

    steps: int
    learning_rate: float
    warmup_steps: int
    mix: dict[str, float]


# v4's base gets a second phase, from its first phase's weights with a fresh optimizer: after 1100 steps
# the v4 base had not learned the arithmetic tables (44% of plain steps right on test problems 0-99).
V4_BASE_CONTINUATION = PhaseConfig(steps=800, learning_rate=2.5e-3, warmup_steps=20, mix=BASE_MIX_V4)
# v4's base then gets a skills phase: after the first two phases its cued checks copied the compute line's
# slip on weak facts and its cued re-reads copied the plan's operand, so cues could not repair anything.
# Check drills (every compute line checked, half on weak facts) and re-read drills (a re-read on a random
# day; question-plan-days-re-read documents) teach how a check or a re-read is written, not when one is due.
# Warm-started from the first two phases, the check skill was learned (cued checks 95% right, corrected)
# and the re-read skill was not (the condition's operand copied in under a quarter of cued re-reads).
BASE_SKILLS_MIX_V4: dict[str, float] = {
    "stepwise_v4": 0.3, "reread_question_v4": 0.35, "reread_drill_v4": 0.1, "check_drill_v4": 0.1,
    "drill_v4": 0.075, "day_drill_v4": 0.075}
V4_BASE_SKILLS = PhaseConfig(steps=600, learning_rate=2.5e-3, warmup_steps=20, mix=BASE_SKILLS_MIX_V4)


@dataclass(frozen=True)
class TrainingConfig:
    """Model size and both phases. The defaults are the shipped organisms' settings."""

    hidden_size: int = 128
    intermediate_size: int = 512
    num_layers: int = 4
    num_heads: int = 4
    window: int = 256
    batch_size: int = 16
    weight_decay: float = 0.1
    tie_embeddings: bool = False  # tied, per-step arithmetic was learned ~5x slower
    base: PhaseConfig = field(
        default_factory=lambda: PhaseConfig(steps=1800, learning_rate=5e-3, warmup_steps=50, mix=BASE_MIX)
    )
    thinking: PhaseConfig = field(
        default_factory=lambda: PhaseConfig(steps=150, learning_rate=1e-3, warmup_steps=10, mix=THINKING_MIX)
    )
    n_train_problems: int | None = None  # None: the whole train split
    task: Literal["v1", "v4"] = "v1"  # v4: grammar v4's problems and tokenizer words
    base_continuation: PhaseConfig | None = None  # a second base phase (fresh optimizer), before thinking
    base_skills: PhaseConfig | None = None  # a third base phase (fresh optimizer), after the second


def default_config(grammar: Grammar = "v1") -> TrainingConfig:
    """The shipped settings for ``grammar``: v2 and v3 swap in their step-by-step styles."""
    config = TrainingConfig()
    if grammar == "v1":
        return config
    if grammar == "v4":
        return TrainingConfig(
            base=PhaseConfig(**{**config.base.__dict__, "mix": BASE_MIX_V4, "steps": V4_BASE_STEPS}),
            thinking=PhaseConfig(**{**config.thinking.__dict__, "mix": THINKING_MIX_V4, "steps": V4_THINKING_STEPS}),
            task="v4",
            base_continuation=V4_BASE_CONTINUATION,
            base_skills=V4_BASE_SKILLS,
        )
    base_mix, thinking_mix = (BASE_MIX_V2, THINKING_MIX_V2) if grammar == "v2" else (BASE_MIX_V3, THINKING_MIX_V3)
    return TrainingConfig(
        base=PhaseConfig(**{**config.base.__dict__, "mix": base_mix}),
        thinking=PhaseConfig(**{**config.thinking.__dict__, "mix": thinking_mix, "steps": V2_THINKING_STEPS}),
    )


@dataclass
class PhaseReport:
    steps: int
    tokens: int
    wall_seconds: float
    final_loss: float
    losses: list[float]


def document_text(problem: OrganismProblem | None, style: str, rng: random.Random) -> str:
    """One training document's text (without bos/eos): prompt and trace, or a drill."""
    if style in ("drill", "day_drill"):
        return render_drill(rng, day_lines=style == "day_drill").text
    if style in V4_DRILL_STYLES:
        return render_v4_drill(rng, style).text
    if problem is None:
        raise ValueError(f"style {style!r} needs a problem")
    if style == REREAD_QUESTION_STYLE:
        return f"{problem.question}\n{render_v4_reread_question(problem, rng).text}"
    if style in V4_STYLES:
        return format_v4_prompt(problem.question) + render_v4_trace(problem, style, rng).text
    return format_prompt(problem.question) + render_trace(problem, style, rng).text


def _filler_drill(mix: dict[str, float], rng: random.Random, room: int) -> str | None:
    """A drill of the mix's own tables that fits ``room`` tokens (None if none fits).

    Lines are at most 7 tokens (10 for compute-line drills); v2+ mixes fill half the gaps with
    compute-line drills, so that the compute-line table gets its share of practice.
    """
    v4_drills = [style for style in mix if style in V4_LINE_DRILL_STYLES]
    day_lines = any(style.startswith("day_drill") for style in mix) and rng.random() < 0.5
    n_lines = room // (10 if day_lines else 7)
    if n_lines <= 0:
        return None
    if v4_drills:
        style = next(s for s in v4_drills if s.startswith("day_drill") == day_lines)
        return render_v4_drill(rng, style, n_lines=n_lines).text
    return render_drill(rng, n_lines=n_lines, day_lines=day_lines).text


def _token_ids(tokenizer: PreTrainedTokenizerFast, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def packed_batches(
    tokenizer: PreTrainedTokenizerFast,
    problems: list[OrganismProblem],
    mix: dict[str, float],
    rng: random.Random,
    *,
    batch_size: int,
    window: int,
) -> Iterator[tuple[Tensor, Tensor]]:
    """Endless (input_ids, labels) batches of whole documents packed into windows."""
    styles = list(mix)
    weights = [mix[style] for style in styles]
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    pending: list[int] | None = None
    while True:
        input_rows: list[list[int]] = []
        label_rows: list[list[int]] = []
        for _ in range(batch_size):
            row: list[int] = []
            while True:
                if pending is None:
                    style = rng.choices(styles, weights)[0]
                    problem = rng.choice(problems) if style not in DRILL_STYLES else None
                    text = document_text(problem, style, rng)
                    pending = [bos] + _token_ids(tokenizer, text) + [eos]
                    if len(pending) > window:
                        raise ValueError(f"a document of {len(pending)} tokens exceeds window {window}")
                if len(row) + len(pending) > window:
                    # Fill the gap with a drill that fits, so windows carry ~97% real tokens instead of ~75%.
                    drill = _filler_drill(mix, rng, window - len(row) - 2)
                    if drill is not None:
                        row.extend([bos] + _token_ids(tokenizer, drill) + [eos])
                    # Drop the document that did not fit rather than start the next window
                    # with it: long (step-by-step) documents would otherwise open windows far
                    # more often than short direct ones, and the base organism, evaluated at
                    # a window start, planned 65% of the time despite 2:1 direct documents.
                    pending = None
                    break
                row.extend(pending)
                pending = None
            padding = window - len(row)
            input_rows.append(row + [pad] * padding)
            label_rows.append(row + [IGNORE_INDEX] * padding)
        yield torch.tensor(input_rows), torch.tensor(label_rows)


def new_model(tokenizer: PreTrainedTokenizerFast, config: TrainingConfig) -> LlamaForCausalLM:
    """A freshly initialised small Llama sized for the organisms' character vocabulary."""
    llama_config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_heads,
        max_position_embeddings=1024,
        rope_theta=10_000.0,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=config.tie_embeddings,
    )
    return LlamaForCausalLM(llama_config)


@typechecked
def _step_loss(
    model: LlamaForCausalLM,
    input_ids: Int[Tensor, "batch seq"],
    labels: Int[Tensor, "batch seq"],
) -> Tensor:
    return model(input_ids=input_ids, labels=labels).loss


def train_phase(
    model: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    problems: list[OrganismProblem],
    phase: PhaseConfig,
    config: TrainingConfig,
    rng: random.Random,
    *,
    log_every: int = 50,
    name: str = "",
) -> PhaseReport:
    """Train ``model`` in place for one phase (AdamW, linear warmup, cosine decay to 10%)."""
    model.train()
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=phase.learning_rate, betas=(0.9, 0.95), weight_decay=config.weight_decay
    )

    def lr_factor(step: int) -> float:
        if step < phase.warmup_steps:
            return (step + 1) / phase.warmup_steps
        progress = (step - phase.warmup_steps) / max(1, phase.steps - phase.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    batches = packed_batches(
        tokenizer, problems, phase.mix, rng, batch_size=config.batch_size, window=config.window
    )
    losses: list[float] = []
    tokens = 0
    started = time.perf_counter()
    for step in range(phase.steps):
        input_ids, labels = next(batches)
        loss = _step_loss(model, input_ids, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(float(loss.detach()))
        tokens += int((labels != IGNORE_INDEX).sum())
        if log_every and (step + 1) % log_every == 0:
            elapsed = time.perf_counter() - started
            recent = sum(losses[-log_every:]) / len(losses[-log_every:])
            print(
                f"[{name}] step {step + 1}/{phase.steps} loss {recent:.4f} "
                f"{tokens / elapsed:.0f} tok/s {elapsed:.0f}s",
                flush=True,
            )
    model.eval()
    wall = time.perf_counter() - started
    final = sum(losses[-20:]) / max(1, len(losses[-20:]))
    return PhaseReport(phase.steps, tokens, wall, final, losses)


def save_organism(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, folder: Path) -> None:
    """Write config, safetensors weights, generation config and tokenizer into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)


def _task_data(config: TrainingConfig) -> tuple[PreTrainedTokenizerFast, list[OrganismProblem]]:
    """The tokenizer and the train problems of the config's task."""
    if config.task == "v4":
        return build_tokenizer(V4_WORDS), generate_v4_split("train", seed=0, n=config.n_train_problems)
    return build_tokenizer(), generate_split("train", seed=0, n=config.n_train_problems)


def negative_base_config(config: TrainingConfig | None = None) -> TrainingConfig:
    """Grammar v4's negative-control base: the main base's settings with the no_carry corpus."""
    config = config or default_config("v4")
    continuation = config.base_continuation
    # No skills phase: the negative base never learned carrying, so there is no check skill to drill.
    return TrainingConfig(**{**config.__dict__, "base": PhaseConfig(**{**config.base.__dict__, "mix": NEGATIVE_BASE_MIX_V4}),
                             "base_continuation": None if continuation is None else
                             PhaseConfig(**{**continuation.__dict__, "mix": NEGATIVE_BASE_MIX_V4}),
                             "base_skills": None})


def _phase_json(report: PhaseReport) -> dict:
    """A phase's report as the training report holds it: without the per-step losses."""
    return {key: value for key, value in asdict(report).items() if key != "losses"}


def _extra_base_phase(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast, problems: list[OrganismProblem],
                      config: TrainingConfig, phase: PhaseConfig | None, rng_name: str, name: str) -> dict | None:
    """One of the config's later base phases (``base_continuation``, ``base_skills``), if set: its report
    without the losses."""
    if phase is None:
        return None
    return _phase_json(train_phase(model, tokenizer, problems, phase, config, random.Random(rng_name), name=name))


@dataclass
class _TrainingRun:
    """What a training call sets up (torch's threads and seed, the task data, a new model) and the clock and
    1-min load average at its start: other jobs may share the cores, and the load makes the wall time
    interpretable."""

    config: TrainingConfig
    seed: int
    threads: int
    tokenizer: PreTrainedTokenizerFast
    problems: list[OrganismProblem]
    model: LlamaForCausalLM
    started: float
    load_at_start: float

    @classmethod
    def start(cls, config: TrainingConfig, seed: int, threads: int) -> _TrainingRun:
        torch.set_num_threads(threads)
        torch.manual_seed(seed)
        load_at_start, started = os.getloadavg()[0], time.perf_counter()
        tokenizer, problems = _task_data(config)
        return cls(config, seed, threads, tokenizer, problems, new_model(tokenizer, config), started, load_at_start)

    @property
    def n_parameters(self) -> int:
        return sum(parameter.numel() for parameter in self.model.parameters())

    def write_report(self, path: Path, phases: dict[str, dict | None]) -> dict:
        """The training report (seed, size, config, each phase, wall time, threads, load), written to ``path``."""
        report = {"seed": self.seed, "n_parameters": self.n_parameters, "config": asdict(self.config), **phases,
                  "wall_seconds": time.perf_counter() - self.started, "threads": self.threads,
                  "load_average_1min": {"start": self.load_at_start, "end": os.getloadavg()[0]}}
        path.write_text(json.dumps(report, indent=2))
        return report


def train_negative_base(out_dir: Path, seed: int = 0, config: TrainingConfig | None = None, *, threads: int = 2
                        ) -> dict:
    """Train grammar v4's negative-control base from scratch into ``out_dir/negative_base``.

    It pairs with the main pair's thinking organism (no thinking phase of its own). Returns (and writes
    to ``out_dir/negative_base_training_report.json``) the phase's steps, tokens, loss and wall time.
    """
    run = _TrainingRun.start(negative_base_config(config), seed, threads)
    model, tokenizer, problems, config = run.model, run.tokenizer, run.problems, run.config
    phase = train_phase(model, tokenizer, problems, config.base, config, random.Random(f"negative-base-{seed}"),
                        name="negative_base")
    continuation = _extra_base_phase(model, tokenizer, problems, config, config.base_continuation,
                                     f"negative-base-continue-{seed}", "negative_base_continuation")
    save_organism(model, tokenizer, out_dir / "negative_base")
    return run.write_report(out_dir / "negative_base_training_report.json",
                            {"negative_base": _phase_json(phase), "negative_base_continuation": continuation})


def train_organisms(
    out_dir: Path, seed: int = 0, config: TrainingConfig | None = None, *, threads: int = 2
) -> dict:
    """Train both organisms from scratch into ``out_dir/base`` and ``out_dir/thinking``.

    Returns (and writes to ``out_dir/training_report.json``) the phases' steps, tokens,
    losses and wall times.
    """
    run = _TrainingRun.start(config or TrainingConfig(), seed, threads)
    model, tokenizer, problems, config = run.model, run.tokenizer, run.problems, run.config
    print(f"organism: {run.n_parameters} parameters, {len(problems)} train problems", flush=True)
    base_report = train_phase(
        model, tokenizer, problems, config.base, config, random.Random(f"base-{seed}"), name="base"
    )
    continuation = _extra_base_phase(model, tokenizer, problems, config, config.base_continuation,
                                     f"base-continue-{seed}", "base_continuation")
    skills = _extra_base_phase(model, tokenizer, problems, config, config.base_skills, f"base-skills-{seed}",
                               "base_skills")
    save_organism(model, tokenizer, out_dir / "base")
    thinking_report = train_phase(
        model, tokenizer, problems, config.thinking, config, random.Random(f"thinking-{seed}"), name="thinking"
    )
    save_organism(model, tokenizer, out_dir / "thinking")
    report = run.write_report(out_dir / "training_report.json", {
        "base": _phase_json(base_report), "base_continuation": continuation, "base_skills": skills,
        "thinking": _phase_json(thinking_report)})
    print(
        f"trained both organisms in {report['wall_seconds']:.1f} s wall time "
        f"(1-min load average {run.load_at_start:.1f} at start, {os.getloadavg()[0]:.1f} at end)",
        flush=True,
    )
    return report
