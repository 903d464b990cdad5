"""The organism study: ground-truth causal validation of an organism pair, end to end.

The acceptance check of the causal stage (``tests/organisms/test_study.py``), also runnable on
any organism pair: directions from the thinking organism's traces labelled by the
grammar, necessity per layer, sufficiency at the thinking traces' and the base organism's contexts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from transformer_lens.model_bridge import TransformerBridge

from mechsteer.causal.necessity import NecessityRow, necessity, relative_change
from mechsteer.causal.outputs import write_outputs, write_rows_csv
from mechsteer.causal.sufficiency import (
    SufficiencyRow,
    contexts_for,
    sufficiency,
    sufficiency_contexts,
)
from mechsteer.data.benchmarks import Problem, load_benchmark
from mechsteer.data.traces import TraceRecord, generate_traces
from mechsteer.organisms.grammar import DEPENDENTS, Grammar, risky_days
from mechsteer.organisms.plugin import BENCHMARK, GROUND_TRUTH
from mechsteer.organisms.tasks import OrganismProblem
from mechsteer.steering.direction_set import DirectionSet
from mechsteer.steering.labels import ground_truth_behaviour_labeller, ground_truth_labels
from mechsteer.steering.mean import Pooling, build_mean_directions
from mechsteer.steering.optimise import OptimisationConfig, build_optimised_directions

BASE_CONTEXTS_CSV = "sufficiency_base_contexts.csv"


@dataclass
class OrganismStudy:
    necessity: list[NecessityRow]
    sufficiency: list[SufficiencyRow]  # contexts from the thinking organism's traces
    directions: DirectionSet
    settings: dict[str, Any]
    # contexts from the base organism's own traces: the prompt, where it answers directly
    sufficiency_base_contexts: list[SufficiencyRow] = field(default_factory=list)


def necessity_problems(n_problems: int, grammar: Grammar = "v1") -> list[Problem]:
    """``n_problems`` organism test problems, half of them ones that call for a check.

    Only problems with a risky step (`grammar.risky_days`: v1, the operand 9, about 1 in 9
    problems; v2, a carry or borrow, most problems) make the thinking organism verify and
    correct; a plain prefix of the test split may hold none (v1), and then those behaviours'
    necessity cannot be measured.
    """
    test = load_benchmark(BENCHMARK, "test")
    risky = [problem for problem in test if risky_days(_as_organism_problem(problem), grammar)]
    n_risky = min(len(risky), n_problems // 2)
    others = [problem for problem in test if not risky_days(_as_organism_problem(problem), grammar)]
    return risky[:n_risky] + others[: n_problems - n_risky]


def _as_organism_problem(problem: Problem) -> OrganismProblem:
    return OrganismProblem(problem.id, problem.question, int(problem.answer), problem.metadata)


def independent_change(row: NecessityRow, grammar_titles: dict[int, str]) -> float:
    """The largest |relative change| among the behaviours the grammar does not make depend on ``row``'s.

    `grammar.DEPENDENTS` lists, per behaviour, the behaviours that occur only after it (a
    correction only after a failed check, ...): removing a behaviour removes those by design,
    so the issue's bar compares its own cut with the others' change only.
    """
    dependents = DEPENDENTS.get(row.title, frozenset())
    changes = [abs(relative_change(row.other_rates_before[b], after)) for b, after in row.other_rates_after.items()
               if grammar_titles.get(b) not in dependents]
    return max(changes, default=0.0)


def organism_study(
    base_model: TransformerBridge,
    thinking_model: TransformerBridge,
    work_dir: str | Path,
    *,
    layer: int = 1,
    pooling: Pooling = "boundary",
    coeff: float = 4.0,
    n_traces: int = 64,
    n_problems: int = 32,
    max_new_tokens: int = 192,  # organism traces end within ~175 tokens
    direction_method: Literal["mean", "optimised"] = "mean",
    optimisation: OptimisationConfig | None = None,  # for direction_method="optimised"
    grammar: Grammar = "v1",  # the pair's grammar: which test problems call for a check
) -> OrganismStudy:
    """Ground-truth causal validation of an organism pair, end to end.

    Thinking traces on ``n_traces`` train problems (and base traces on half as many, for the
    bias); directions in the base model at ``layer``, by difference of means or optimised
    (``direction_method``); necessity on ``n_problems`` test problems (half of them calling
    for a check: `necessity_problems`) with the base set at its layer and, per layer,
    difference-of-means sets made in the thinking model at every layer; sufficiency at
    ``coeff`` on ``n_problems`` contexts per behaviour (last context position only), once on
    contexts from the thinking traces and once on the base organism's own contexts (its
    prompts, where it answers directly: the grammar's only place for a plan). Optimised
    vectors steer with the bias added, as they were trained. Outputs go to ``work_dir/out``.
    """
    if direction_method not in ("mean", "optimised"):
        raise ValueError(f"direction_method must be 'mean' or 'optimised'; got {direction_method!r}")

    work = Path(work_dir)
    problems = load_benchmark(BENCHMARK, "train", n_traces)
    thinking_traces = generate_traces(thinking_model, problems, work / "thinking_traces",
                                      max_new_tokens=max_new_tokens, batch_size=n_traces, progress=False)
    base_traces = generate_traces(base_model, problems[: max(1, n_traces // 2)], work / "base_traces",
                                  max_new_tokens=max_new_tokens, batch_size=n_traces, progress=False)
    labels = ground_truth_labels(BENCHMARK)

    def mean_set(model: TransformerBridge, at: int, bias: bool) -> DirectionSet:
        return build_mean_directions(model, thinking_traces, labels.labeller, labels.behaviour_ids, labels.titles,
                                     at, base_traces=base_traces if bias else None, pooling=pooling,
                                     text_labeller=labels.text_labeller, skip_empty=True)

    if direction_method == "mean":
        directions = mean_set(base_model, layer, True)
    else:
        directions = build_optimised_directions(base_model, thinking_traces, labels.labeller, labels.behaviour_ids,
                                                labels.titles, layer, optimisation or OptimisationConfig(),
                                                text_labeller=labels.text_labeller, skip_empty=True)
    directions.save(work / "directions")
    layer_sets = {at: mean_set(thinking_model, at, False) for at in range(thinking_model.cfg.n_layers)}
    for layer_set in layer_sets.values():
        if layer_set.behaviour_ids != directions.behaviour_ids:
            raise ValueError("the thinking traces lack sentences of some behaviour at some layer")
    labeller = ground_truth_behaviour_labeller(GROUND_TRUTH, directions.titles, directions.behaviour_ids)
    necessity_rows = necessity(thinking_model, directions, necessity_problems(n_problems, grammar), labeller,
                               template=BENCHMARK, max_new_tokens=max_new_tokens, variants=("layer", "per_layer"),
                               batch_size=n_problems, layer_directions=layer_sets)
    with_bias = direction_method == "optimised"

    def steer_rows(traces: Sequence[TraceRecord]) -> list[SufficiencyRow]:
        contexts = sufficiency_contexts(traces, base_model.tokenizer, labels.labeller, text_labeller=labels.text_labeller)
        measurable = [b for b in directions.behaviour_ids if contexts_for(contexts, b)]
        return sufficiency(base_model, directions, contexts, labeller, coeffs=(coeff,), n_contexts=n_problems,
                           max_new_tokens=40, batch_size=n_problems, with_bias=with_bias, behaviour_ids=measurable)

    sufficiency_rows = steer_rows(thinking_traces)
    base_context_rows = steer_rows(base_traces)
    settings = {"grammar": grammar, "layer": layer, "pooling": pooling, "coeff": coeff, "n_traces": n_traces,
                "n_problems": n_problems,
                "direction_method": direction_method, "sufficiency_with_bias": with_bias,
                "base": base_model.cfg.model_name, "thinking": thinking_model.cfg.model_name}
    write_outputs(work / "out", necessity_rows, sufficiency_rows, settings)
    write_rows_csv(base_context_rows, work / "out" / BASE_CONTEXTS_CSV)
    return OrganismStudy(necessity_rows, sufficiency_rows, directions, settings, base_context_rows)


__all__ = ["BASE_CONTEXTS_CSV", "OrganismStudy", "independent_change", "necessity_problems", "organism_study"]
