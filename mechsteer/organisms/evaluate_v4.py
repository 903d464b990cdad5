"""Grammar v4's organism evaluation: per pair (main, negative control), greedy on v4 test problems.

Conditions, all graded by the first "The answer is N":

* ``base``: the base under the paper's step-by-step prompt; ``thinking``: the thinking organism (one
  thinking organism serves both pairs).
* ``plan_only``: the base with the plan cue ``Plan:`` forced, nothing else.
* ``oracle_timing``: step-wise cued decoding with the cue of `grammar_v4.next_v4_behaviour` wherever
  the base's next line is not already that behaviour: the thinking organism's own decision rule,
  applied to the base's text (which behaviour, where).
* ``skill_cued_ceiling``: the ground-truth schedule from the problem (a check after each carry day of
  the right running totals, a re-read before the condition's day, a correction after a failed check):
  the base forced with the right cue at the right step.
* ``random_timing``: the same cues (as many checks, a re-read if the problem has a condition) on random
  days, averaged over `RANDOM_TIMING_SEEDS`.
* ``fixed_behaviour``: at the oracle's positions, one behaviour for all of them; per cued behaviour,
  and the best one (no single behaviour should recover the gap).

Every cued condition starts from the plan cue, like plan-only, so no condition can fail at the first token.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from mechsteer.organisms.evaluate import GenerateFn
from mechsteer.organisms.grammar import FORCED_PREFIX, OTHER, extract_answer
from mechsteer.organisms.grammar_v4 import (
    CUED_BEHAVIOURS,
    V4_BEHAVIOURS,
    V4_CUES,
    carry_days,
    format_v4_prompt,
    next_v4_behaviour,
    parse_v4_trace,
    scheduled_behaviour,
)
from mechsteer.organisms.tasks import OrganismProblem

MAX_NEW_TOKENS_V4 = 160  # the longest thinking trace (5 days, every step checked) is ~135 tokens
MAX_CUE_ROUNDS = 16
RANDOM_TIMING_SEEDS: tuple[int, ...] = (0, 1, 2)
PAIRS: tuple[str, ...] = ("main", "negative")
# Cues decide from the trace so far (after the prompt): a behaviour to start next, or None.
Planner = Callable[[str], str | None]


@dataclass(frozen=True)
class V4Targets:
    """Issue 26's done-when targets for the v4 organisms (test problems below 400)."""

    base_range: tuple[float, float] = (0.3, 0.6)
    min_gap: float = 0.30
    oracle_share_of_thinking: float = 0.9
    random_share_of_oracle_recovery: float = 0.5
    plan_only_max_recovery: float = 0.5
    negative_ceiling_max_recovery: float = 0.2


V4_TARGETS = V4Targets()


def cued_decode(generate: GenerateFn, prompts: Sequence[str], planners: Sequence[Planner], max_new_tokens: int,
                max_rounds: int = MAX_CUE_ROUNDS) -> list[str]:
    """Step-wise forced decoding from the plan cue: at each line boundary of the greedy continuation, the
    text's planner may name a behaviour; if the next line does not already start with its cue, the text is
    cut there, the cue appended and generation resumed. Returns the texts after the prompts, cues included."""
    texts = [FORCED_PREFIX for _ in prompts]
    finished = [False for _ in prompts]
    for _ in range(max_rounds):
        active = [i for i, done in enumerate(finished) if not done]
        if not active:
            break
        outputs = generate([prompts[i] + texts[i] for i in active], max_new_tokens)
        for i, output in zip(active, outputs, strict=True):
            full, cut = texts[i] + output, None
            for position in range(len(texts[i]) + 1, len(full) + 1):
                if full[position - 1] != "\n":
                    continue
                behaviour = planners[i](full[:position])
                if behaviour in V4_CUES and not full[position:].startswith(V4_CUES[behaviour]):
                    cut = full[:position] + V4_CUES[behaviour]
                    break
            texts[i], finished[i] = (full, True) if cut is None else (cut, False)
    return texts


def oracle_planner(problem: OrganismProblem) -> Planner:
    return lambda text: next_v4_behaviour(problem.question, text)


def ceiling_planner(problem: OrganismProblem) -> Planner:
    days, condition_day = carry_days(problem), problem.metadata["condition_day"]
    return lambda text: scheduled_behaviour(text, days, condition_day)


def random_planner(problem: OrganismProblem, seed: int) -> Planner:
    """As many check cues as the ceiling's, on distinct random days; a re-read before a random day 2..n."""
    rng = random.Random(f"random-timing-v4-{seed}-{problem.id}")
    n_steps = problem.metadata["n_steps"]
    days = sorted(rng.sample(range(1, n_steps + 1), len(carry_days(problem))))
    reread_day = rng.randint(2, n_steps) if problem.metadata["condition_day"] else 0
    return lambda text: scheduled_behaviour(text, days, reread_day)


def fixed_planner(problem: OrganismProblem, behaviour: str) -> Planner:
    """``behaviour`` wherever the oracle would cue any behaviour (after the plan)."""
    oracle = oracle_planner(problem)
    return lambda text: behaviour if oracle(text) in CUED_BEHAVIOURS else None


def accuracy(texts: Sequence[str], problems: Sequence[OrganismProblem]) -> float:
    return sum(extract_answer(t) == p.answer for t, p in zip(texts, problems, strict=True)) / len(problems)


def v4_trace_rates(texts: Sequence[str]) -> dict[str, float]:
    """Per v4 behaviour (and "other"): the share of texts containing it at least once."""
    present: Counter[str] = Counter()
    for text in texts:
        present.update({sentence.behaviour for sentence in parse_v4_trace(text)})
    return {label: present[label] / len(texts) for label in (*V4_BEHAVIOURS, OTHER)}


def answer_spread(texts: Sequence[str]) -> dict[str, Any]:
    """How varied the answers are: distinct answers and the most common one's share."""
    answers = Counter(extract_answer(text) for text in texts)
    top, count = answers.most_common(1)[0]
    return {"distinct_answers": len(answers), "modal_answer": top, "modal_answer_share": count / len(texts)}


def pair_conditions(generate_base: GenerateFn, problems: Sequence[OrganismProblem], prompts: Sequence[str],
                    max_new_tokens: int, fixed_behaviours: Sequence[str] = CUED_BEHAVIOURS
                    ) -> tuple[dict[str, float], dict[str, list[str]]]:
    """Every base-side condition's accuracy (and texts) for one base organism."""
    def cued(planners: Sequence[Planner]) -> list[str]:
        return cued_decode(generate_base, prompts, planners, max_new_tokens)

    outputs: dict[str, list[str]] = {
        "base": generate_base(list(prompts), max_new_tokens),
        "plan_only": [FORCED_PREFIX + text for text in
                      generate_base([prompt + FORCED_PREFIX for prompt in prompts], max_new_tokens)],
        "oracle_timing": cued([oracle_planner(p) for p in problems]),
        "skill_cued_ceiling": cued([ceiling_planner(p) for p in problems]),
    }
    for seed in RANDOM_TIMING_SEEDS:
        outputs[f"random_timing_seed{seed}"] = cued([random_planner(p, seed) for p in problems])
    for behaviour in fixed_behaviours:
        outputs[f"fixed_{behaviour}"] = cued([fixed_planner(p, behaviour) for p in problems])
    accuracies = {name: accuracy(texts, problems) for name, texts in outputs.items()}
    random_runs = [accuracies[f"random_timing_seed{seed}"] for seed in RANDOM_TIMING_SEEDS]
    accuracies["random_timing"] = sum(random_runs) / len(random_runs)
    return accuracies, outputs


def pair_summary(accuracies: dict[str, float], thinking_accuracy: float, fixed_behaviours: Sequence[str],
                 outputs: dict[str, list[str]]) -> dict[str, Any]:
    """One pair's row: accuracies, the gap, each condition's share of it recovered, answer spread, rates."""
    base = accuracies["base"]
    gap = thinking_accuracy - base
    fixed = {behaviour: accuracies[f"fixed_{behaviour}"] for behaviour in fixed_behaviours}
    best_fixed = max(fixed, key=fixed.__getitem__) if fixed else None
    summary: dict[str, Any] = {
        "base_accuracy": base, "thinking_accuracy": thinking_accuracy, "gap": gap,
        "plan_only_accuracy": accuracies["plan_only"], "oracle_timing_accuracy": accuracies["oracle_timing"],
        "random_timing_accuracy": accuracies["random_timing"],
        "random_timing_accuracies": [accuracies[f"random_timing_seed{s}"] for s in RANDOM_TIMING_SEEDS],
        "skill_cued_ceiling_accuracy": accuracies["skill_cued_ceiling"],
        "fixed_behaviour_accuracies": fixed, "best_fixed_behaviour": best_fixed,
        "best_fixed_behaviour_accuracy": fixed[best_fixed] if best_fixed else None,
        "base_answers": answer_spread(outputs["base"]),
        "base_trace_rates": v4_trace_rates(outputs["base"]),
        "oracle_timing_trace_rates": v4_trace_rates(outputs["oracle_timing"]),
    }
    for condition in ("plan_only", "oracle_timing", "random_timing", "skill_cued_ceiling", "best_fixed_behaviour"):
        value = summary[f"{condition}_accuracy"]
        summary[f"{condition}_gap_recovered"] = (value - base) / gap if gap and value is not None else None
    return summary


def targets_met(pairs: dict[str, dict[str, Any]], targets: V4Targets = V4_TARGETS) -> dict[str, bool]:
    """Each done-when target of issue 26 for the v4 organisms, met or not."""
    main, negative = pairs["main"], pairs["negative"]
    low, high = targets.base_range

    def recovered(row: dict[str, Any], key: str) -> float:
        value = row[f"{key}_gap_recovered"]
        return float("inf") if value is None else value

    return {
        "main_base_in_range": low <= main["base_accuracy"] <= high,
        "main_gap": main["gap"] >= targets.min_gap,
        "main_oracle_timing": main["oracle_timing_accuracy"] >= targets.oracle_share_of_thinking * main["thinking_accuracy"],
        "main_random_timing": recovered(main, "random_timing")
        <= targets.random_share_of_oracle_recovery * recovered(main, "oracle_timing"),
        "main_plan_only": recovered(main, "plan_only") <= targets.plan_only_max_recovery,
        "negative_skill_cued_ceiling": recovered(negative, "skill_cued_ceiling") <= targets.negative_ceiling_max_recovery,
    }


def evaluate_v4_organisms(bases: dict[str, GenerateFn], generate_thinking: GenerateFn,
                          problems: Sequence[OrganismProblem], *, max_new_tokens: int = MAX_NEW_TOKENS_V4,
                          fixed_behaviours: Sequence[str] = CUED_BEHAVIOURS) -> tuple[dict, dict[str, list[str]]]:
    """The v4 summary (JSON-ready: per pair, and the targets) and every condition's raw outputs."""
    if not problems:
        raise ValueError("need at least one problem to evaluate")
    if sorted(bases) != sorted(PAIRS):
        raise ValueError(f"need a base organism for each pair {PAIRS}, got {sorted(bases)}")
    prompts = [format_v4_prompt(problem.question) for problem in problems]
    thinking_texts = generate_thinking(prompts, max_new_tokens)
    thinking_accuracy = accuracy(thinking_texts, problems)
    outputs: dict[str, list[str]] = {"thinking": thinking_texts}
    pairs: dict[str, dict[str, Any]] = {}
    for pair in PAIRS:
        accuracies, texts = pair_conditions(bases[pair], problems, prompts, max_new_tokens, fixed_behaviours)
        pairs[pair] = pair_summary(accuracies, thinking_accuracy, fixed_behaviours, texts)
        outputs.update({f"{pair}/{name}": value for name, value in texts.items()})
    summary: dict[str, Any] = {
        "grammar": "v4", "n": len(problems), "thinking_accuracy": thinking_accuracy,
        "thinking_trace_rates": v4_trace_rates(thinking_texts),
        "problems_with_condition": sum(bool(p.metadata["condition_day"]) for p in problems) / len(problems),
        "carry_days_per_problem": sum(len(carry_days(p)) for p in problems) / len(problems),
        "pairs": pairs, "targets_met": targets_met(pairs), "targets": V4_TARGETS.__dict__,
    }
    return summary, outputs


__all__ = ["MAX_NEW_TOKENS_V4", "PAIRS", "RANDOM_TIMING_SEEDS", "V4_TARGETS", "V4Targets", "cued_decode",
           "evaluate_v4_organisms", "pair_conditions", "pair_summary", "targets_met"]
