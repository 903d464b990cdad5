"""The organisms as a mechsteer plug-in: their model specs, benchmark, grader, prompt template and
ground truth.

Declared in ``pyproject.toml`` as the entry point ``mechsteer.plugins: organisms``; the generic
registries run :func:`register` the first time they miss a name, so no generic stage imports
this package.
"""

from __future__ import annotations

import functools
import importlib

from mechsteer.core.models import register_model_spec
from mechsteer.data.benchmarks import PluginBenchmark, Problem, register_benchmark
from mechsteer.data.labels import UNLABELLED, GroundTruth, register_ground_truth
from mechsteer.data.prompts import PromptTemplate, register_template
from mechsteer.grading.answers import MAX_SEARCH_CHARS, Grader, numbers_equal, register_grader
from mechsteer.organisms import SHIPPED_PAIRS, model_spec, organism_names, weights_dir
from mechsteer.organisms.grammar import (
    BEHAVIOURS,
    answer_text,
    behaviours_allowed_next,
    next_behaviour_by_grammar,
    parse_trace,
)
from mechsteer.organisms.plugin_v4 import BENCHMARK_V4, register_v4
from mechsteer.organisms.tasks import RESERVED_TEST_FROM, SPLITS, generate_split

BENCHMARK = "organism"
SOURCE_TAG = "mechsteer.organisms"
# Each split's number of problems (the test split's first RESERVED_TEST_FROM): a run's counts are checked
# against them before anything loads.
SPLIT_SIZES: dict[str, int] = {"train": 2603, "validation": 402, "test": RESERVED_TEST_FROM}

# What the oracle judge says each behaviour is.
DESCRIPTIONS: dict[str, str] = {
    "plan": "Restates the question as the arithmetic expression to evaluate, before any step.",
    "compute": "Carries out one arithmetic step (or the whole expression) and writes its result.",
    "verify": "Checks a step by undoing it and comparing with the number it started from.",
    "correct": "Repairs a step whose check failed, giving the right result instead of the wrong one.",
    "answer": "States the final answer.",
    UNLABELLED: "Text that follows none of the trace grammar's behaviours.",
}


def load_split(split: str) -> list[Problem]:
    """The organism task's problems of ``split`` as benchmark records (the test split's first
    :data:`~mechsteer.organisms.tasks.RESERVED_TEST_FROM`: the rest are reserved)."""
    items = generate_split(split)
    if split == "test":
        items = items[:RESERVED_TEST_FROM]
    return [
        Problem(id=str(item.id), question=item.question, answer=str(item.answer), solution=None,
                benchmark=BENCHMARK, metadata={**item.metadata, "source": SOURCE_TAG})
        for item in items
    ]


def prompt_template_text() -> str:
    # Read at render time, so the template always is the grammar module's current one.
    return importlib.import_module("mechsteer.organisms.grammar").PROMPT_TEMPLATE


def extract_answer_sentence(text: str) -> str | None:
    """N in the first "The answer is N" (the grammar's answer sentence): a small model may keep
    writing after it (a new problem, another answer), so the first one counts."""
    return answer_text(text[:MAX_SEARCH_CHARS])


def label_reasoning(reasoning: str) -> dict[tuple[int, int], str]:
    """Ground-truth behaviour labels of an organism trace, from the organism grammar."""
    return {(s.char_start, s.char_end): s.behaviour for s in parse_trace(reasoning)}


# The timing oracle is grammar v2/v3's (checks at carry/borrow steps), the grammar of the demo's
# pair; the v1 thinking organism checks operand-9 steps instead. What the grammar allows next holds
# for every grammar version.
GROUND_TRUTH = GroundTruth(benchmark=BENCHMARK, behaviours=BEHAVIOURS, label_reasoning=label_reasoning,
                           descriptions=DESCRIPTIONS, source="organism ground truth (mechsteer.organisms.grammar)",
                           timing_oracle=next_behaviour_by_grammar, allowed_next=behaviours_allowed_next)


def register() -> None:
    for grammar in SHIPPED_PAIRS:
        for name in organism_names(grammar):
            register_model_spec(model_spec(name, grammar), functools.partial(weights_dir, name, grammar))
    register_benchmark(PluginBenchmark(BENCHMARK, SPLITS, load_split, SPLIT_SIZES))
    register_template(PromptTemplate(name=BENCHMARK, text=prompt_template_text,
                                     description="the organism task prompt (mechsteer.organisms.grammar.PROMPT_TEMPLATE)"))
    register_ground_truth(GROUND_TRUTH)
    register_grader(Grader(BENCHMARK, extract_answer_sentence, numbers_equal))
    register_v4()
    register_grader(Grader(BENCHMARK_V4, extract_answer_sentence, numbers_equal))


__all__ = ["BENCHMARK", "DESCRIPTIONS", "GROUND_TRUTH", "SPLIT_SIZES", "extract_answer_sentence", "label_reasoning", "load_split",
           "register"]
