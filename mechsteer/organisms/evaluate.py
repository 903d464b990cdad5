"""Greedy evaluation of the organism pair on held-out problems.

Three accuracies, all greedy on the test split, graded by "The answer is N":

* ``base_accuracy``: the base organism with the normal prompt.
* ``thinking_accuracy``: the thinking organism with the same normal prompt.
* ``forced_base_accuracy``: the base organism with the normal prompt followed by the
  first step cue ``"Plan:"`` (`grammar.FORCED_PREFIX`), teacher-forced as the start of
  its answer; nothing else is forced. The graded text includes that prefix.

``behaviour_counts`` counts the ground-truth behaviours (via `grammar.parse_trace`) in
the thinking organism's outputs; ``*_trace_rates`` give, per behaviour, the share of
outputs that contain it at least once.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from mechsteer.organisms.grammar import (
    BEHAVIOURS,
    FORCED_PREFIX,
    OTHER,
    extract_answer,
    format_prompt,
    parse_trace,
)
from mechsteer.organisms.tasks import OrganismProblem

# Longest thinking trace (plan, four steps, one risky step with check and correction, answer):
# about 75 tokens; stepwise base traces that check every step stay under ~175.
MAX_NEW_TOKENS = 192

GenerateFn = Callable[[list[str], int], list[str]]


def hf_greedy_generate(
    model: PreTrainedModel,
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


def hf_generate_fn(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> GenerateFn:
    """Adapter: an HF model as a ``(prompts, max_new_tokens) -> continuations`` function."""
    return lambda prompts, max_new_tokens: hf_greedy_generate(model, tokenizer, prompts, max_new_tokens)


def _accuracy(texts: Sequence[str], problems: Sequence[OrganismProblem]) -> float:
    correct = sum(extract_answer(text) == problem.answer for text, problem in zip(texts, problems, strict=True))
    return correct / len(problems)


def behaviour_trace_rates(texts: Sequence[str]) -> dict[str, float]:
    """Per behaviour (and "other"): the share of texts containing it at least once."""
    present = Counter()
    for text in texts:
        present.update({sentence.behaviour for sentence in parse_trace(text)})
    return {label: present[label] / len(texts) for label in (*BEHAVIOURS, OTHER)}


def behaviour_counts(texts: Sequence[str]) -> dict[str, int]:
    """Total ground-truth sentences per behaviour (and "other") over all texts."""
    counts = Counter(sentence.behaviour for text in texts for sentence in parse_trace(text))
    return {label: counts[label] for label in (*BEHAVIOURS, OTHER)}


def evaluate_organisms(
    generate_base: GenerateFn,
    generate_thinking: GenerateFn,
    problems: Sequence[OrganismProblem],
    *,
    max_new_tokens: int = MAX_NEW_TOKENS,
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
    summary = {
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
    return summary, {"base": base_texts, "thinking": thinking_texts, "forced_base": forced_texts}
