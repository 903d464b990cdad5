"""Greedy evaluation of the organism pair on held-out problems.

Three accuracies, all greedy on the test split, graded by "The answer is N":

* ``base_accuracy``: the base organism with the normal prompt.
* ``thinking_accuracy``: the thinking organism with the same normal prompt.
* ``forced_base_accuracy``: the base organism with the normal prompt followed by the
  first step cue ``"Plan:"`` (`grammar.FORCED_PREFIX`), teacher-forced as the start of
  its answer; nothing else is forced. The graded text includes that prefix.

Three timing conditions (issue 17), each the base organism forced with ``"Plan:"``:

* ``plan_only_accuracy``: the plan cue alone (the same generations as ``forced_base_accuracy``).
* ``oracle_timing_accuracy``: plus a ``"Check:"`` cue right after the compute line of each
  ground-truth risky day (`grammar.risky_days`), by step-wise forced decoding: generate until
  that day's compute line ends, append the cue, continue.
* ``random_timing_accuracy``: as many cues, after the compute lines of days drawn at random
  (without replacement), averaged over `RANDOM_TIMING_SEEDS`.

``behaviour_counts`` counts the ground-truth behaviours (via `grammar.parse_trace`) in
the thinking organism's outputs; ``*_trace_rates`` give, per behaviour, the share of
outputs that contain it at least once.
"""

from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import torch
from transformers import LlamaForCausalLM, PreTrainedTokenizerBase

from mechsteer.organisms.grammar import (
    BEHAVIOURS,
    CHECK_CUE,
    FORCED_PREFIX,
    OTHER,
    Grammar,
    extract_answer,
    format_prompt,
    parse_trace,
    risky_days,
)
from mechsteer.organisms.tasks import OrganismProblem

# Longest thinking trace (plan, four steps, one risky step with check and correction, answer):
# about 75 tokens; stepwise base traces that check every step stay under ~175.
MAX_NEW_TOKENS = 192
RANDOM_TIMING_SEEDS: tuple[int, ...] = (0, 1, 2)

GenerateFn = Callable[[list[str], int], list[str]]


def hf_greedy_generate(
    model: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    max_new_tokens: int,
    *,
    batch_size: int = 128,
) -> list[str]:
    """Greedy continuations with plain HF ``generate`` (left-padded batches, KV cache)."""
    if tokenizer.padding_side != "left":
        raise ValueError("batched generation needs a left-padding tokenizer")
    texts: list[str] = []
    for offset in range(0, len(prompts), batch_size):
        batch = tokenizer(list(prompts[offset : offset + batch_size]), return_tensors="pt", padding=True)
        with torch.no_grad():
            output = model.generate(
                **batch,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        continuation = output[:, batch["input_ids"].shape[1] :]
        texts.extend(tokenizer.batch_decode(continuation, skip_special_tokens=True))
    return texts


def hf_generate_fn(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerBase) -> GenerateFn:
    """Adapter: an HF model as a ``(prompts, max_new_tokens) -> continuations`` function."""
    return lambda prompts, max_new_tokens: hf_greedy_generate(model, tokenizer, prompts, max_new_tokens)


def _accuracy(texts: Sequence[str], problems: Sequence[OrganismProblem]) -> float:
    correct = sum(extract_answer(text) == problem.answer for text, problem in zip(texts, problems, strict=True))
    return correct / len(problems)


def behaviour_trace_rates(texts: Sequence[str]) -> dict[str, float]:
    """Per behaviour (and "other"): the share of texts containing it at least once."""
    present: Counter[str] = Counter()
    for text in texts:
        present.update({sentence.behaviour for sentence in parse_trace(text)})
    return {label: present[label] / len(texts) for label in (*BEHAVIOURS, OTHER)}


def behaviour_counts(texts: Sequence[str]) -> dict[str, int]:
    """Total ground-truth sentences per behaviour (and "other") over all texts."""
    counts = Counter(sentence.behaviour for text in texts for sentence in parse_trace(text))
    return {label: counts[label] for label in (*BEHAVIOURS, OTHER)}


def _compute_line_end(text: str, day: int) -> int | None:
    """The index just past the newline that ends the compute line of ``day`` in ``text``."""
    match = re.search(rf"(?m)^Day {day}: [^\n]*\n", text)
    return match.end() if match else None


def cued_generate(
    generate: GenerateFn, prompts: Sequence[str], cue_days: Sequence[Sequence[int]], max_new_tokens: int
) -> list[str]:
    """Step-wise forced decoding: ``FORCED_PREFIX``, then `CHECK_CUE` after each cued day's compute line.

    Each round continues every unfinished text greedily, cuts it after the compute line of its
    next cued day and appends the cue; a text whose cued day never comes keeps its continuation.
    Returns the texts after the prompts, cues included.
    """
    texts = [FORCED_PREFIX for _ in prompts]
    pending = [sorted(days) for days in cue_days]
    finished = [False for _ in prompts]
    while True:
        active = [i for i, done in enumerate(finished) if not done]
        if not active:
            return texts
        outputs = generate([prompts[i] + texts[i] for i in active], max_new_tokens)
        for i, output in zip(active, outputs, strict=True):
            # Search only the new text: an earlier day's line must not match again.
            end = _compute_line_end(output, pending[i][0]) if pending[i] else None
            if end is None:
                texts[i] += output
                finished[i] = True
            else:
                texts[i] += output[:end] + CHECK_CUE
                pending[i].pop(0)


def random_cue_days(problem: OrganismProblem, n_cues: int, seed: int) -> list[int]:
    """``n_cues`` distinct days of ``problem`` drawn at random (deterministic in seed and problem id)."""
    rng = random.Random(f"random-timing-{seed}-{problem.id}")
    return sorted(rng.sample(range(1, problem.metadata["n_steps"] + 1), n_cues))


def timing_conditions(
    generate_base: GenerateFn,
    problems: Sequence[OrganismProblem],
    prompts: Sequence[str],
    grammar: Grammar,
    max_new_tokens: int,
    seeds: Sequence[int] = RANDOM_TIMING_SEEDS,
) -> tuple[dict[str, Any], dict[str, list[str]]]:
    """Oracle- and random-timing accuracies (and their texts) of the base organism."""
    oracle_days = [risky_days(problem, grammar) for problem in problems]
    oracle_texts = cued_generate(generate_base, prompts, oracle_days, max_new_tokens)
    random_accuracies: list[float] = []
    outputs = {"oracle_timing": oracle_texts}
    for seed in seeds:
        days = [random_cue_days(p, len(cued), seed) for p, cued in zip(problems, oracle_days, strict=True)]
        texts = cued_generate(generate_base, prompts, days, max_new_tokens)
        outputs[f"random_timing_seed{seed}"] = texts
        random_accuracies.append(_accuracy(texts, problems))
    summary = {
        "oracle_timing_accuracy": _accuracy(oracle_texts, problems),
        "random_timing_accuracy": sum(random_accuracies) / len(random_accuracies),
        "random_timing_accuracies": random_accuracies,
        "random_timing_seeds": list(seeds),
        "timing_grammar": grammar,
        "check_cues_per_problem": sum(map(len, oracle_days)) / len(problems),
        "problems_with_risky_steps": sum(bool(days) for days in oracle_days) / len(problems),
        "oracle_timing_trace_rates": behaviour_trace_rates(oracle_texts),
    }
    return summary, outputs


def evaluate_organisms(
    generate_base: GenerateFn,
    generate_thinking: GenerateFn,
    problems: Sequence[OrganismProblem],
    *,
    max_new_tokens: int = MAX_NEW_TOKENS,
    grammar: Grammar = "v1",
) -> tuple[dict, dict[str, list[str]]]:
    """The evaluation summary (JSON-ready) and the raw outputs per condition."""
    if not problems:
        raise ValueError("need at least one problem to evaluate")
    prompts = [format_prompt(problem.question) for problem in problems]
    base_texts = generate_base(prompts, max_new_tokens)
    thinking_texts = generate_thinking(prompts, max_new_tokens)
    forced_texts = [
        FORCED_PREFIX + text
        for text in generate_base([prompt + FORCED_PREFIX for prompt in prompts], max_new_tokens)
    ]
    thinking_rates = behaviour_trace_rates(thinking_texts)
    by_steps: dict[str, dict[str, float]] = {}
    for n_steps in sorted({problem.metadata["n_steps"] for problem in problems}):
        indices = [i for i, problem in enumerate(problems) if problem.metadata["n_steps"] == n_steps]
        subset = [problems[i] for i in indices]
        by_steps[str(n_steps)] = {
            "n": len(indices),
            "base": _accuracy([base_texts[i] for i in indices], subset),
            "thinking": _accuracy([thinking_texts[i] for i in indices], subset),
            "forced_base": _accuracy([forced_texts[i] for i in indices], subset),
        }
    summary: dict[str, Any] = {
        "n": len(problems),
        "base_accuracy": _accuracy(base_texts, problems),
        "thinking_accuracy": _accuracy(thinking_texts, problems),
        "forced_base_accuracy": _accuracy(forced_texts, problems),
        "forced_prefix": FORCED_PREFIX,
        "behaviour_counts": behaviour_counts(thinking_texts),
        "thinking_trace_rates": thinking_rates,
        "correct_trace_share": thinking_rates["correct"],
        "base_trace_rates": behaviour_trace_rates(base_texts),
        "forced_base_trace_rates": behaviour_trace_rates(forced_texts),
        "accuracy_by_n_steps": by_steps,
    }
    summary["gap"] = summary["thinking_accuracy"] - summary["base_accuracy"]
    timing, timing_texts = timing_conditions(generate_base, problems, prompts, grammar, max_new_tokens)
    summary["plan_only_accuracy"] = summary["forced_base_accuracy"]
    summary.update(timing)
    for condition in ("plan_only", "oracle_timing", "random_timing"):
        # The share of the base-to-thinking gap the condition recovers (None without a gap).
        recovered = summary[f"{condition}_accuracy"] - summary["base_accuracy"]
        summary[f"{condition}_gap_recovered"] = recovered / summary["gap"] if summary["gap"] else None
    outputs = {"base": base_texts, "thinking": thinking_texts, "forced_base": forced_texts, **timing_texts}
    return summary, outputs
