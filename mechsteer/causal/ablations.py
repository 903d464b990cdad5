"""Stage: causal validation of each behaviour direction, necessity and sufficiency.

**Necessity, in the thinking model.** Each behaviour's direction is projected out of the
thinking model's residual stream (``resid_post``): at the set's layer, and at every layer as
a variant (the same direction everywhere, or with ``per_layer`` each layer's own direction,
e.g. difference-of-means sets made in the thinking model at every layer). The thinking model regenerates its traces (greedy) and we measure, per behaviour,
the *rate*: sentences of that behaviour per trace, against the unablated traces. Also the
other behaviours' rates and the accuracy. A direction made in the base model is applied
to the thinking model as is when both share d_model (a thinking model post-trained from
the base keeps its residual basis; ``check_model(..., allow_other_name=True)``); pass a set
made in the thinking model to test it there instead.

**Sufficiency, in the base model.** Contexts are the thinking traces (base framing) cut at
a sentence boundary where the thinking trace's next sentence belongs to *another*
behaviour. The base model generates the next sentence (greedy) with ``coeff * direction``
added at ``resid_post`` of the layer at the last ``window`` context positions (and, with
``steer_generation``, at every generated position; with ``with_bias``, ``coeff * (bias +
direction)`` as in the hybrid, which is how optimised vectors are trained), and we count how often that sentence
is behaviour b: steered, unsteered, and with a norm-matched random direction at the same
coefficient (:meth:`DirectionSet.random_like`).

Behaviours of generated text come from a :class:`BehaviourLabeller`: the organisms'
ground-truth grammar (:func:`organism_behaviour_labeller`), or for real models the
taxonomy's SAE on the thinking model's pooled sentence activations
(:class:`SAEBehaviourLabeller`).

Output: one row per behaviour (per variant / coefficient) as dataclasses, CSV files and a
matplotlib figure (:func:`write_outputs`).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from transformer_lens.model_bridge import TransformerBridge

from mechsteer.activations import pool_batch, trace_sentences
from mechsteer.data.benchmarks import Problem
from mechsteer.steering.directions import DirectionSet, OptimisationConfig, SentenceLabeller
from mechsteer.interventions.generation import generate
from mechsteer.interventions.hooks import Ablation, HookFn, PositionFrame, ResidSiteIntervention
from mechsteer.core.tensor_types import Float, Tensor
from mechsteer.data.traces import TraceRecord

NECESSITY_CSV = "necessity.csv"
SUFFICIENCY_CSV = "sufficiency.csv"
ABLATIONS_PLOT = "ablations.png"
ABLATIONS_JSON = "ablations.json"
NECESSITY_VARIANTS: tuple[str, ...] = ("layer", "all", "per_layer")


# --------------------------------------------------------------------------------------------
# Labelling generated text


class BehaviourLabeller(Protocol):
    """Behaviour ids (None: no behaviour) of each sentence of each continuation, given its context."""

    def __call__(self, contexts: Sequence[str], continuations: Sequence[str]) -> list[list[int | None]]: ...


def organism_behaviour_labeller(titles: Sequence[str], behaviour_ids: Sequence[int]) -> BehaviourLabeller:
    """Ground truth from the organism grammar; a sentence of behaviour ``titles[i]`` gets ``behaviour_ids[i]``."""
    from mechsteer.organisms.grammar import parse_trace

    ids = {title: int(b) for title, b in zip(titles, behaviour_ids, strict=True)}

    def label(contexts: Sequence[str], continuations: Sequence[str]) -> list[list[int | None]]:
        return [[ids.get(sentence.behaviour) for sentence in parse_trace(text)] for text in continuations]

    return label


@dataclass
class SAEBehaviourLabeller:
    """The taxonomy's classifier: pool each continuation sentence in ``model`` at ``layer``, argmax SAE latent."""

    model: TransformerBridge
    sae: Any  # mechsteer.taxonomy.sae.TopKSAE
    layer: int
    include_previous_token: bool = True
    min_words: int = 3
    batch_size: int = 8

    def __call__(self, contexts: Sequence[str], continuations: Sequence[str]) -> list[list[int | None]]:
        results: list[list[int | None]] = []
        for start in range(0, len(contexts), self.batch_size):
            batch_ids, spans, owners = [], [], []
            chunk = list(zip(contexts[start : start + self.batch_size], continuations[start : start + self.batch_size],
                             strict=True))
            for row, (context, continuation) in enumerate(chunk):
                ids, sentences = trace_sentences(_text_record(context, continuation), row, self.model.tokenizer,
                                                 min_words=self.min_words)
                batch_ids.append(ids)
                for sentence in sentences:
                    first = sentence.tok_start - 1 if self.include_previous_token and sentence.tok_start > 0 else sentence.tok_start
                    spans.append((row, first, sentence.tok_end))
                    owners.append(row)
            labels: list[list[int | None]] = [[] for _ in chunk]
            if spans:
                pooled = pool_batch(self.model, batch_ids, spans, [self.layer])[self.layer]
                for owner, latent in zip(owners, self.sae.classify_tokens(pooled).tolist(), strict=True):
                    labels[owner].append(int(latent))
            results.extend(labels)
        return results


def _text_record(context: str, continuation: str) -> TraceRecord:
    return TraceRecord(
        problem_id="", benchmark="", prompt=context, text=context + continuation, generation=continuation,
        reasoning=continuation, answer_part="", reasoning_char_start=len(context),
        reasoning_char_end=len(context) + len(continuation), token_ids=[], n_prompt_tokens=0, prediction=None,
        reference="", correct=False, finish_reason="", model="",
    )


def behaviour_rates(labels: Sequence[Sequence[int | None]], behaviour_ids: Sequence[int]) -> dict[int, float]:
    """Sentences of each behaviour per trace (mean over traces)."""
    if not labels:
        raise ValueError("no traces to measure rates on")
    return {int(b): sum(list(trace).count(int(b)) for trace in labels) / len(labels) for b in behaviour_ids}


def relative_change(before: float, after: float) -> float:
    """(after - before) / before; 0 when both are 0, inf when only ``before`` is 0."""
    if before == 0:
        return 0.0 if after == 0 else float("inf")
    return (after - before) / before


# --------------------------------------------------------------------------------------------
# Necessity


@dataclass
class NecessityRow:
    behaviour_id: int
    title: str
    variant: str  # "layer L", "all layers" or "all layers, per-layer directions"
    n_traces: int
    rate_before: float  # this behaviour's sentences per trace, unablated
    rate_after: float
    relative_change: float  # (after - before) / before
    other_rates_before: dict[int, float]
    other_rates_after: dict[int, float]
    max_other_relative_change: float  # largest |relative change| of another behaviour
    mean_other_relative_change: float
    accuracy_before: float
    accuracy_after: float


def _generate_traces(model: TransformerBridge, prompts: Sequence[str], max_new_tokens: int, batch_size: int,
                     interventions: Sequence[Any] = ()) -> list[str]:
    output = generate(model, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                      interventions=interventions)
    return output.texts


def _accuracy(texts: Sequence[str], problems: Sequence[Problem]) -> float:
    from mechsteer.grading.answers import extract_answer, is_correct

    correct = [is_correct(extract_answer(text, p.benchmark), p.answer, p.benchmark)
               for text, p in zip(texts, problems, strict=True)]
    return sum(correct) / len(correct)


def necessity(
    thinking_model: TransformerBridge,
    directions: DirectionSet,
    problems: Sequence[Problem],
    labeller: BehaviourLabeller,
    *,
    template: str,
    max_new_tokens: int,
    variants: Sequence[str] = ("layer", "all"),
    batch_size: int = 64,
    behaviour_ids: Sequence[int] | None = None,
    layer_directions: Mapping[int, DirectionSet] | None = None,
) -> list[NecessityRow]:
    """Project each behaviour's direction out of the thinking model and regenerate (module docstring).

    Variants: ``"layer"`` (the set's layer), ``"all"`` (the set's direction at every layer) and
    ``"per_layer"`` (at every layer L, the direction ``layer_directions[L]`` made at L).
    """
    from mechsteer.data.prompts import render_prompt

    directions.check_model(thinking_model, allow_other_name=True)
    for variant in variants:
        if variant not in NECESSITY_VARIANTS:
            raise ValueError(f"necessity variants are {NECESSITY_VARIANTS}; got {variant!r}")
    if "per_layer" in variants:
        missing = [layer for layer in range(thinking_model.cfg.n_layers) if layer not in (layer_directions or {})]
        if missing:
            raise ValueError(f"the per_layer variant needs a direction set for every layer; missing {missing}")
        for layer, layer_set in (layer_directions or {}).items():
            layer_set.check_model(thinking_model, allow_other_name=True)
            if layer_set.layer != layer or layer_set.behaviour_ids != directions.behaviour_ids:
                raise ValueError(f"layer_directions[{layer}] must be made at layer {layer} for behaviours "
                                 f"{directions.behaviour_ids}; got layer {layer_set.layer}, {layer_set.behaviour_ids}")
    if not problems:
        raise ValueError("necessity needs at least one problem")
    prompts = [render_prompt(template, p.question, thinking_model.tokenizer) for p in problems]
    chosen = list(directions.behaviour_ids if behaviour_ids is None else behaviour_ids)
    baseline = _generate_traces(thinking_model, prompts, max_new_tokens, batch_size)
    rates_before = behaviour_rates(labeller(prompts, baseline), directions.behaviour_ids)
    accuracy_before = _accuracy(baseline, problems)
    rows = []
    for behaviour in chosen:
        direction = directions.direction(behaviour)
        for variant in variants:
            if variant == "layer":
                ablations = [Ablation(directions.layer, direction, directions.site)]
            elif variant == "all":
                ablations = [Ablation(layer, direction, directions.site) for layer in range(thinking_model.cfg.n_layers)]
            else:
                ablations = [Ablation(layer, layer_set.direction(behaviour), layer_set.site)
                             for layer, layer_set in sorted((layer_directions or {}).items())]
            texts = _generate_traces(thinking_model, prompts, max_new_tokens, batch_size, ablations)
            rates_after = behaviour_rates(labeller(prompts, texts), directions.behaviour_ids)
            others = [b for b in directions.behaviour_ids if b != behaviour]
            other_changes = [abs(relative_change(rates_before[b], rates_after[b])) for b in others]
            rows.append(NecessityRow(
                behaviour_id=int(behaviour), title=directions.title(behaviour),
                variant={"layer": f"layer {directions.layer}", "all": "all layers",
                         "per_layer": "all layers, per-layer directions"}[variant],
                n_traces=len(problems), rate_before=rates_before[behaviour], rate_after=rates_after[behaviour],
                relative_change=relative_change(rates_before[behaviour], rates_after[behaviour]),
                other_rates_before={b: rates_before[b] for b in others},
                other_rates_after={b: rates_after[b] for b in others},
                max_other_relative_change=max(other_changes, default=0.0),
                mean_other_relative_change=sum(other_changes) / len(other_changes) if other_changes else 0.0,
                accuracy_before=accuracy_before, accuracy_after=_accuracy(texts, problems),
            ))
    return rows


# --------------------------------------------------------------------------------------------
# Sufficiency


@dataclass
class RowWindowSteering(ResidSiteIntervention):
    """Add ``coeff * direction`` at ``resid_post`` of ``layer`` at absolute positions ``[starts[r], ends[r])`` of row r.

    Unlike :class:`mechsteer.interventions.hooks.Steering` (one position list for every row), the window
    is per row, so contexts of different lengths can share a batch. It follows the same
    protocol (``validate``, ``hook_name``, ``make_hook``) and is exact under the KV cache.
    """

    layer: int
    direction: Float[Tensor, " d_model"]
    coeff: float
    starts: Sequence[int]
    ends: Sequence[int]
    site: str = "resid_post"

    def validate(self, model: TransformerBridge) -> None:
        super().validate(model)
        if len(self.starts) != len(self.ends):
            raise ValueError(f"need as many window starts as ends; got {len(self.starts)} and {len(self.ends)}")

    def make_hook(self, frame: PositionFrame) -> HookFn:
        def hook(resid: Tensor, hook: object) -> Tensor:
            batch, n_new, _ = resid.shape
            if batch != len(self.starts):
                raise ValueError(f"window steering has {len(self.starts)} rows but the batch has {batch}")
            absolute = frame.absolute_positions(batch, n_new, resid.device)
            starts = torch.tensor(list(self.starts), device=resid.device)[:, None]
            ends = torch.tensor(list(self.ends), device=resid.device)[:, None]
            mask = (absolute >= starts) & (absolute < ends) & (absolute >= 0)
            delta = self.coeff * self.direction.to(resid.device, resid.dtype)
            return resid + mask[..., None].to(resid.dtype) * delta

        return hook


@dataclass(frozen=True)
class SteeringContext:
    """A trace cut just before one of its sentences; ``next_behaviour`` is that sentence's behaviour."""

    text: str
    next_behaviour: int | None
    trace_index: int
    sentence_index: int


def sufficiency_contexts(
    traces: Sequence[TraceRecord], tokenizer: Any, labeller: SentenceLabeller, *,
    text_labeller: Any = None, min_words: int = 3,
) -> list[SteeringContext]:
    """Every kept sentence of ``traces`` (base framing) gives a context: the text before it."""
    contexts = []
    for index, record in enumerate(traces):
        _, sentences = trace_sentences(record, index, tokenizer, min_words=min_words, labeller=text_labeller)
        for sentence in sentences:
            contexts.append(SteeringContext(record.text[: sentence.char_start], labeller(sentence),
                                            index, sentence.sentence_index))
    return contexts


@dataclass
class SufficiencyRow:
    behaviour_id: int
    title: str
    coeff: float
    window: int
    steer_generation: bool
    with_bias: bool
    n_contexts: int
    rate_unsteered: float  # share of next sentences that are this behaviour
    rate_steered: float
    rate_random: float  # mean over the random seeds
    ratio_vs_random: float  # rate_steered / max(rate_random, 1 / n_contexts)
    random_rates: list[float] = field(default_factory=list)


def _first_labels(labeller: BehaviourLabeller, contexts: Sequence[str], continuations: Sequence[str]) -> list[int | None]:
    return [labels[0] if labels else None for labels in labeller(contexts, continuations)]


def _next_sentences(
    model: TransformerBridge, contexts: Sequence[str], *, direction: Tensor | None, coeff: float, layer: int,
    window: int, steer_generation: bool, max_new_tokens: int, stop_strings: Sequence[str], batch_size: int,
) -> list[str]:
    from mechsteer.interventions.generation import tokenize_prompts

    token_ids = tokenize_prompts(model, contexts)
    texts: list[str] = []
    for start in range(0, len(token_ids), batch_size):
        chunk = token_ids[start : start + batch_size]
        interventions = []
        if direction is not None:
            lengths = [len(ids) for ids in chunk]
            ends = [length + max_new_tokens + 1 if steer_generation else length for length in lengths]
            interventions.append(RowWindowSteering(layer, direction, coeff, [max(0, n - window) for n in lengths], ends))
        output = generate(model, chunk, max_new_tokens=max_new_tokens, stop_strings=stop_strings,
                          interventions=interventions)
        texts.extend(output.texts)
    return texts


def contexts_for(contexts: Sequence[SteeringContext], behaviour: int) -> list[SteeringContext]:
    """The contexts where steering toward ``behaviour`` can be measured: the next sentence is another behaviour."""
    return [c for c in contexts if c.next_behaviour is not None and c.next_behaviour != behaviour]


def sufficiency(
    base_model: TransformerBridge,
    directions: DirectionSet,
    contexts: Sequence[SteeringContext],
    labeller: BehaviourLabeller,
    *,
    coeffs: Sequence[float] = (1.0,),
    window: int = 1,
    steer_generation: bool = False,
    with_bias: bool = False,
    n_contexts: int = 64,
    n_random: int = 1,
    seed: int = 0,
    max_new_tokens: int = 48,
    stop_strings: Sequence[str] = ("\n",),
    batch_size: int = 64,
    behaviour_ids: Sequence[int] | None = None,
) -> list[SufficiencyRow]:
    """For each behaviour b: contexts whose next sentence is another behaviour; steer toward b (module docstring).

    ``with_bias`` steers with ``coeff * (bias + direction)``, as the hybrid generator does (the
    random control then uses its own norm-matched random bias).
    """
    directions.check_model(base_model)
    if with_bias and directions.bias is None:
        raise ValueError("with_bias needs a direction set with a bias")
    if window < 1:
        raise ValueError(f"window must be >= 1; got {window}")
    if n_random < 1:
        raise ValueError(f"n_random must be >= 1; got {n_random}")
    controls = [directions.random_like(seed + index) for index in range(n_random)]
    rows = []
    settings = dict(layer=directions.layer, window=window, steer_generation=steer_generation,
                    max_new_tokens=max_new_tokens, stop_strings=stop_strings, batch_size=batch_size)
    for behaviour in directions.behaviour_ids if behaviour_ids is None else behaviour_ids:
        eligible = contexts_for(contexts, behaviour)
        if not eligible:
            raise ValueError(f"no contexts whose next sentence is another behaviour than {behaviour}")
        chosen = random.Random(f"{seed}-{behaviour}").sample(eligible, min(n_contexts, len(eligible)))
        texts = [c.text for c in chosen]

        def rate(continuations: Sequence[str], behaviour: int = int(behaviour), texts: list[str] = texts) -> float:
            labels = _first_labels(labeller, texts, continuations)
            return sum(label == behaviour for label in labels) / len(labels)

        unsteered = rate(_next_sentences(base_model, texts, direction=None, coeff=0.0, **settings))
        def vector(source: DirectionSet, behaviour: int = int(behaviour)) -> Tensor:
            return source.direction(behaviour) + source.bias if with_bias else source.direction(behaviour)

        for coeff in coeffs:
            steered = rate(_next_sentences(base_model, texts, direction=vector(directions), coeff=coeff, **settings))
            random_rates = [rate(_next_sentences(base_model, texts, direction=vector(control), coeff=coeff,
                                                 **settings)) for control in controls]
            mean_random = sum(random_rates) / len(random_rates)
            rows.append(SufficiencyRow(
                behaviour_id=int(behaviour), title=directions.title(behaviour), coeff=float(coeff), window=window,
                steer_generation=steer_generation, with_bias=with_bias, n_contexts=len(chosen),
                rate_unsteered=unsteered,
                rate_steered=steered, rate_random=mean_random,
                ratio_vs_random=steered / max(mean_random, 1 / len(chosen)), random_rates=random_rates,
            ))
    return rows


# --------------------------------------------------------------------------------------------
# Output


def _csv_value(value: Any) -> Any:
    return json.dumps(value) if isinstance(value, dict | list) else value


def write_rows_csv(rows: Sequence[Any], path: str | Path) -> Path:
    """One CSV line per row dataclass (dict and list fields as JSON)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if not rows:
        raise ValueError(f"no rows to write to {path}")
    records = [dataclasses.asdict(row) for row in rows]
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(records[0]))
        writer.writeheader()
        for record in records:
            writer.writerow({key: _csv_value(value) for key, value in record.items()})
    return path


def plot_ablations(necessity_rows: Sequence[NecessityRow], sufficiency_rows: Sequence[SufficiencyRow],
                   path: str | Path) -> Path:
    """Left: each behaviour's rate before/after ablation; right: next-sentence rate unsteered/random/steered."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    if necessity_rows:
        variants = sorted({row.variant for row in necessity_rows})
        titles = list(dict.fromkeys(row.title for row in necessity_rows))
        width = 0.8 / (len(variants) + 1)
        before = {row.title: row.rate_before for row in necessity_rows}
        left.bar([i for i in range(len(titles))], [before[t] for t in titles], width, label="unablated")
        for offset, variant in enumerate(variants, start=1):
            after = {row.title: row.rate_after for row in necessity_rows if row.variant == variant}
            left.bar([i + offset * width for i in range(len(titles))], [after.get(t, 0.0) for t in titles], width,
                     label=f"ablated, {variant}")
        left.set_xticks([i + width * len(variants) / 2 for i in range(len(titles))], titles, rotation=20)
        left.set_ylabel("sentences per trace")
        left.set_title("necessity (thinking model)")
        left.legend(fontsize=8)
    if sufficiency_rows:
        best: dict[str, SufficiencyRow] = {}
        for row in sufficiency_rows:  # the largest coefficient's row per behaviour
            if row.title not in best or row.coeff > best[row.title].coeff:
                best[row.title] = row
        titles = list(best)
        for offset, (name, attribute) in enumerate((("unsteered", "rate_unsteered"), ("random", "rate_random"),
                                                     ("steered", "rate_steered"))):
            right.bar([i + offset * 0.27 for i in range(len(titles))], [getattr(best[t], attribute) for t in titles],
                      0.27, label=name)
        right.set_xticks([i + 0.27 for i in range(len(titles))], titles, rotation=20)
        right.set_ylabel("share of next sentences of the behaviour")
        coeffs = sorted({row.coeff for row in best.values()})
        right.set_title(f"sufficiency (base model), coeff {', '.join(f'{c:g}' for c in coeffs)}")
        right.legend(fontsize=8)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def write_outputs(out_dir: str | Path, necessity_rows: Sequence[NecessityRow],
                  sufficiency_rows: Sequence[SufficiencyRow], settings: dict[str, Any] | None = None) -> dict[str, Path]:
    """``necessity.csv``, ``sufficiency.csv``, ``ablations.json`` and ``ablations.png`` in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    if necessity_rows:
        paths["necessity"] = write_rows_csv(necessity_rows, out / NECESSITY_CSV)
    if sufficiency_rows:
        paths["sufficiency"] = write_rows_csv(sufficiency_rows, out / SUFFICIENCY_CSV)
    document = {"settings": settings or {}, "necessity": [dataclasses.asdict(r) for r in necessity_rows],
                "sufficiency": [dataclasses.asdict(r) for r in sufficiency_rows]}
    (out / ABLATIONS_JSON).write_text(json.dumps(document, indent=2, default=str) + "\n")
    paths["json"] = out / ABLATIONS_JSON
    paths["plot"] = plot_ablations(necessity_rows, sufficiency_rows, out / ABLATIONS_PLOT)
    return paths


__all__ = [
    "BehaviourLabeller", "NecessityRow", "OrganismStudy", "organism_study", "RowWindowSteering", "SAEBehaviourLabeller", "SteeringContext",
    "SufficiencyRow", "behaviour_rates", "necessity", "organism_behaviour_labeller", "plot_ablations",
    "contexts_for", "relative_change", "sufficiency", "sufficiency_contexts", "write_outputs", "write_rows_csv",
]


# --------------------------------------------------------------------------------------------
# The organism study (the acceptance check of the issue, also runnable on any organism pair)


@dataclass
class OrganismStudy:
    necessity: list[NecessityRow]
    sufficiency: list[SufficiencyRow]  # contexts from the thinking organism's traces
    directions: DirectionSet
    settings: dict[str, Any]
    # contexts from the base organism's own traces: the prompt, where it answers directly
    sufficiency_base_contexts: list[SufficiencyRow] = field(default_factory=list)


def necessity_problems(n_problems: int) -> list:
    """``n_problems`` organism test problems, half of them ones that call for a check.

    Only problems whose operand is the grammar's risky operand (about 1 in 9) make the
    thinking organism verify and correct; a plain prefix of the test split may hold none, and
    then those behaviours' necessity cannot be measured.
    """
    from mechsteer.data.benchmarks import load_benchmark
    from mechsteer.organisms.grammar import RISKY_OPERAND

    test = load_benchmark("organism", "test")
    risky = [problem for problem in test if problem.metadata["operands"][0] == RISKY_OPERAND]
    n_risky = min(len(risky), n_problems // 2)
    others = [problem for problem in test if problem.metadata["operands"][0] != RISKY_OPERAND]
    return risky[:n_risky] + others[: n_problems - n_risky]


def organism_study(
    base_model: TransformerBridge,
    thinking_model: TransformerBridge,
    work_dir: str | Path,
    *,
    layer: int = 1,
    pooling: str = "boundary",
    coeff: float = 4.0,
    n_traces: int = 64,
    n_problems: int = 32,
    max_new_tokens: int = 192,  # organism traces end within ~175 tokens
    direction_method: str = "mean",
    optimisation: OptimisationConfig | None = None,  # for direction_method="optimised"
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
    from mechsteer.data.benchmarks import load_benchmark
    from mechsteer.steering.directions import (
        build_mean_directions,
        build_optimised_directions,
        ground_truth_labels,
    )
    from mechsteer.data.traces import generate_traces

    if direction_method not in ("mean", "optimised"):
        raise ValueError(f"direction_method must be 'mean' or 'optimised'; got {direction_method!r}")

    work = Path(work_dir)
    problems = load_benchmark("organism", "train", n_traces)
    thinking_traces = generate_traces(thinking_model, problems, work / "thinking_traces",
                                      max_new_tokens=max_new_tokens, batch_size=n_traces, progress=False)
    base_traces = generate_traces(base_model, problems[: max(1, n_traces // 2)], work / "base_traces",
                                  max_new_tokens=max_new_tokens, batch_size=n_traces, progress=False)
    labels = ground_truth_labels()

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
    labeller = organism_behaviour_labeller(directions.titles, directions.behaviour_ids)
    necessity_rows = necessity(thinking_model, directions, necessity_problems(n_problems), labeller,
                               template="organism", max_new_tokens=max_new_tokens, variants=("layer", "per_layer"),
                               batch_size=n_problems, layer_directions=layer_sets)
    with_bias = direction_method == "optimised"

    def steer_rows(traces: Sequence[TraceRecord]) -> list[SufficiencyRow]:
        contexts = sufficiency_contexts(traces, base_model.tokenizer, labels.labeller, text_labeller=labels.text_labeller)
        measurable = [b for b in directions.behaviour_ids if contexts_for(contexts, b)]
        return sufficiency(base_model, directions, contexts, labeller, coeffs=(coeff,), n_contexts=n_problems,
                           max_new_tokens=40, batch_size=n_problems, with_bias=with_bias, behaviour_ids=measurable)

    sufficiency_rows = steer_rows(thinking_traces)
    base_context_rows = steer_rows(base_traces)
    settings = {"layer": layer, "pooling": pooling, "coeff": coeff, "n_traces": n_traces, "n_problems": n_problems,
                "direction_method": direction_method, "sufficiency_with_bias": with_bias,
                "base": base_model.cfg.model_name, "thinking": thinking_model.cfg.model_name}
    write_outputs(work / "out", necessity_rows, sufficiency_rows, settings)
    write_rows_csv(base_context_rows, work / "out" / "sufficiency_base_contexts.csv")
    return OrganismStudy(necessity_rows, sufficiency_rows, directions, settings, base_context_rows)


# --------------------------------------------------------------------------------------------
# CLI


def parse_floats(text: str) -> list[float]:
    try:
        return [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise SystemExit(f"expected comma-separated numbers, got {text!r}") from None


def run_ablate_cli(args: argparse.Namespace) -> int:
    from mechsteer.data.benchmarks import load_benchmark
    from mechsteer.steering.directions import (
        build_mean_directions,
        labels_from_args,
        load_framed_traces,
        split_pair,
    )
    from mechsteer.core.models import load_model
    from mechsteer.data.traces import default_template

    if args.threads:
        torch.set_num_threads(args.threads)
    base_spec, thinking_spec = split_pair(args.pair)
    base = load_model(base_spec, device=args.device)
    thinking = load_model(thinking_spec, device=args.device)
    directions = DirectionSet.load(args.directions)
    traces = load_framed_traces(args.traces, base.tokenizer, args.split)
    labels = labels_from_args(args, len(traces))
    benchmark = traces[0].benchmark
    if labels.taxonomy is not None:
        sae_labeller = SAEBehaviourLabeller(thinking, labels.taxonomy.load_sae(), labels.taxonomy.provenance.layer,
                                            labels.taxonomy.provenance.include_previous_token)
        behaviour_labeller: BehaviourLabeller = sae_labeller
    else:
        behaviour_labeller = organism_behaviour_labeller(labels.titles, labels.behaviour_ids)
    organism = benchmark == "organism"
    necessity_set = DirectionSet.load(args.necessity_directions) if args.necessity_directions else directions
    problems = load_benchmark(benchmark, args.eval_split, args.n_problems)
    layer_directions = None
    variants = ["layer", "all"]
    if args.per_layer:
        # Difference-of-means in the thinking model itself, one set per layer, on the same traces and labels.
        layer_directions = {
            layer: build_mean_directions(thinking, traces, labels.labeller, necessity_set.behaviour_ids,
                                         necessity_set.titles, layer, pooling=args.per_layer_pooling,
                                         text_labeller=labels.text_labeller)
            for layer in range(thinking.cfg.n_layers)
        }
        variants.append("per_layer")
    necessity_rows = necessity(thinking, necessity_set, problems, behaviour_labeller,
                               template=default_template(thinking, benchmark), max_new_tokens=args.max_new_tokens,
                               batch_size=args.batch_size, variants=variants, layer_directions=layer_directions)
    contexts = sufficiency_contexts(traces, base.tokenizer, labels.labeller, text_labeller=labels.text_labeller)
    # Optimised vectors are trained added over the whole target sentence, so they are tested that way.
    optimised = directions.method == "optimised"
    steer_generation = args.steer_generation == "on" or (args.steer_generation == "auto" and optimised)
    with_bias = args.with_bias == "on" or (args.with_bias == "auto" and optimised)
    sufficiency_rows = sufficiency(base, directions, contexts, behaviour_labeller, coeffs=parse_floats(args.coeffs),
                                   window=args.window, steer_generation=steer_generation, with_bias=with_bias,
                                   n_contexts=args.n_contexts, n_random=args.n_random, seed=args.seed,
                                   max_new_tokens=args.sentence_tokens,
                                   stop_strings=("\n",) if organism else (), batch_size=args.batch_size)
    settings = {key: value for key, value in vars(args).items() if key != "func"}
    paths = write_outputs(args.out, necessity_rows, sufficiency_rows, settings)
    summary = {
        "necessity": [{"behaviour": r.title, "variant": r.variant, "relative_change": r.relative_change,
                       "max_other_relative_change": r.max_other_relative_change} for r in necessity_rows],
        "sufficiency": [{"behaviour": r.title, "coeff": r.coeff, "steered": r.rate_steered, "random": r.rate_random,
                         "unsteered": r.rate_unsteered} for r in sufficiency_rows],
        "outputs": {key: str(value) for key, value in paths.items()},
    }
    print(json.dumps(summary, indent=1))
    return 0


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    from mechsteer.steering.directions import add_pair_and_label_args

    parser = subparsers.add_parser("ablate", help="necessity and sufficiency of behaviour directions")
    add_pair_and_label_args(parser)
    parser.add_argument("--directions", required=True, help="a DirectionSet folder (made in the base model)")
    parser.add_argument("--necessity-directions", default=None,
                        help="a DirectionSet for the thinking model (default: --directions, applied as is)")
    parser.add_argument("--per-layer", action="store_true",
                        help="also ablate per-layer difference-of-means directions of the thinking model at every layer")
    parser.add_argument("--per-layer-pooling", choices=("sentence", "boundary"), default="boundary")
    parser.add_argument("--out", required=True)
    parser.add_argument("--eval-split", default="test", help="benchmark split of the necessity problems")
    parser.add_argument("--n-problems", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=384)
    parser.add_argument("--coeffs", default="1,2,4", help="steering coefficients for sufficiency")
    parser.add_argument("--window", type=int, default=1, help="steer the last N context positions")
    parser.add_argument("--steer-generation", choices=("auto", "on", "off"), default="auto",
                        help="also steer the generated sentence's positions (auto: only for optimised sets)")
    parser.add_argument("--with-bias", choices=("auto", "on", "off"), default="auto",
                        help="steer with bias + direction, as the hybrid does (auto: only for optimised sets)")
    parser.add_argument("--n-contexts", type=int, default=64)
    parser.add_argument("--n-random", type=int, default=1, help="norm-matched random controls per behaviour")
    parser.add_argument("--sentence-tokens", type=int, default=48, help="max tokens of the generated next sentence")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(func=run_ablate_cli)
