"""Grammar v4's organisms as a benchmark of their own, ``organism-v4``: its problems (the test split's
first `RESERVED_TEST_FROM`), the paper's base prompt as its template, and its ground-truth labels.

The v4 timing oracle (`grammar_v4.next_v4_behaviour`) reads the question as well as the trace (the
re-read is due before the condition's day), so it is not registered as the text-only timing oracle.
"""

from __future__ import annotations

from mechsteer.data.benchmarks import PluginBenchmark, Problem, register_benchmark
from mechsteer.data.labels import UNLABELLED, GroundTruth, register_ground_truth
from mechsteer.organisms.grammar_v4 import V4_BEHAVIOURS, parse_v4_trace
from mechsteer.organisms.tasks import RESERVED_TEST_FROM, SPLITS
from mechsteer.organisms.tasks_v4 import V4_SPLIT_SIZES, generate_v4_split

BENCHMARK_V4 = "organism-v4"
SOURCE_TAG_V4 = "mechsteer.organisms.v4"
# The template every v4 organism is prompted with (mechsteer.data.prompts: the paper's base prompt).
TEMPLATE_V4 = "base_paper"
SPLIT_SIZES_V4: dict[str, int] = {**V4_SPLIT_SIZES, "test": RESERVED_TEST_FROM}
DESCRIPTIONS_V4: dict[str, str] = {
    "plan": "Restates the starting count and the daily operation, before any step.",
    "compute": "Carries out one day's arithmetic step and writes its result.",
    "verify": "Recomputes a step to check the number written for it.",
    "correct": "Repairs a step whose check failed, giving the checked result instead of the written one.",
    "reread": "Re-reads the question's condition: from which day on the operation changes, and to what.",
    "answer": "States the final answer.",
    UNLABELLED: "Text that follows none of the trace grammar's behaviours.",
}


def load_v4_split(split: str) -> list[Problem]:
    """The v4 problems of ``split`` as benchmark records (test: the first RESERVED_TEST_FROM)."""
    items = generate_v4_split(split)[: SPLIT_SIZES_V4[split]]
    return [Problem(id=item.id, question=item.question, answer=str(item.answer), solution=None,
                    benchmark=BENCHMARK_V4, metadata={**item.metadata, "source": SOURCE_TAG_V4}) for item in items]


def label_v4_reasoning(reasoning: str) -> dict[tuple[int, int], str]:
    return {(s.char_start, s.char_end): s.behaviour for s in parse_v4_trace(reasoning)}


GROUND_TRUTH_V4 = GroundTruth(benchmark=BENCHMARK_V4, behaviours=V4_BEHAVIOURS, label_reasoning=label_v4_reasoning,
                              descriptions=DESCRIPTIONS_V4,
                              source="organism v4 ground truth (mechsteer.organisms.grammar_v4)")


def register_v4() -> None:
    register_benchmark(PluginBenchmark(BENCHMARK_V4, SPLITS, load_v4_split, SPLIT_SIZES_V4))
    register_ground_truth(GROUND_TRUTH_V4)


__all__ = ["BENCHMARK_V4", "DESCRIPTIONS_V4", "GROUND_TRUTH_V4", "SPLIT_SIZES_V4", "TEMPLATE_V4", "load_v4_split",
           "register_v4"]
