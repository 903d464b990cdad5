"""The run's viewer: ``viewer.html``, one static page that shows every evaluated problem.

The page lists the problems with each evaluation's grade (filters pick, say, the problems the
hybrid got right where the base model did not) and shows one problem's base, thinking and hybrid
generations side by side, then the controls' and baselines'. In a hybrid generation each steered
token is marked in its behaviour's colour (the colours of ``timeline.png``); its title, click and
the panel under the page give the behaviour, coefficient, window, the thinking model's top latent
there and whether the base and thinking models' greedy tokens agreed; the tokens where they
disagreed are underlined.

Drawn from the run folder alone, like report.md (:func:`write_viewer` is called by
:func:`mechsteer.experiment.report.rebuild_run_report`): the plain evaluations' traces, the hybrid
evaluations' records (:class:`mechsteer.hybrid.records.HybridRecord`, whose ``token_ends`` place
each token in the text) and the directions stage's behaviour titles. The page works offline: its
script, style and data are inside it (the data as JSON in a ``<script type="application/json">``).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

from mechsteer.core.store import write_text_atomic
from mechsteer.data.traces import TraceRecord, load_traces
from mechsteer.experiment.layout import HYBRID_EVAL, RunPaths
from mechsteer.experiment.markdown import RunView
from mechsteer.experiment.plots import behaviour_order, event_name
from mechsteer.experiment.state import planned
from mechsteer.grading.statistics import accuracy
from mechsteer.hybrid.comparisons import comparison_description
from mechsteer.hybrid.records import HybridRecord, read_hybrid_records

PAGE_TEMPLATE = Path(__file__).with_name("viewer_page.html")
DATA_MARK = "__VIEWER_DATA__"  # where the template takes the page's JSON
TITLE_MARK = "__VIEWER_TITLE__"
# matplotlib's tab10, the colours timeline.png gives the behaviours (in behaviour_order)
TAB10 = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
         "#17becf")
EvaluationKind = Literal["plain", "hybrid", "control", "baseline"]


class SteeredToken(NamedTuple):
    """One steered token (a JSON array in the page, to keep it small)."""

    position: int  # token index in the generation
    start: int | None  # its characters in the text (None: the record has no token offsets)
    end: int | None
    event: str  # the behaviour's title, or plots.BIAS
    behaviour: int | None  # the behaviour id (mechsteer.hybrid.timing.BIAS_ONLY: the bias alone)
    coeff: float
    window: int
    top_latent: int | None  # the thinking model's top SAE latent at this token
    agreed: bool | None  # whether the base and thinking greedy tokens agreed (None: not recorded)


@dataclass(frozen=True)
class Generation:
    """One evaluation's generation for one problem."""

    text: str
    prediction: str | None
    correct: bool
    finish_reason: str
    # hybrid evaluations only
    n_tokens: int | None = None
    steered_fraction: float | None = None
    agree_fraction: float | None = None
    offsets: bool = False  # whether the record places its tokens in the text (token_ends)
    steered: tuple[SteeredToken, ...] = ()
    # (position, start, end) of each token where the base and thinking greedy tokens differed
    disagreed: tuple[tuple[int, int, int], ...] = ()


@dataclass(frozen=True)
class Evaluation:
    name: str
    kind: EvaluationKind
    description: str
    accuracy: float


@dataclass(frozen=True)
class Problem:
    id: str
    reference: str
    prompt: str | None  # as the base model saw it (the thinking model's when the base was not evaluated)
    generations: dict[str, Generation]  # evaluation name -> its generation


@dataclass(frozen=True)
class ViewerPage:
    name: str
    base_model: str
    thinking_model: str
    benchmark: str
    evaluations: list[Evaluation]
    colours: dict[str, str]  # steering event name (behaviour title or bias) -> colour
    problems: list[Problem]


def plain_generation(trace: TraceRecord) -> Generation:
    return Generation(text=trace.generation, prediction=trace.prediction, correct=trace.correct,
                      finish_reason=trace.finish_reason)


def token_span(token_ends: list[int], position: int) -> tuple[int, int]:
    """The characters of the token at ``position`` in its record's text."""
    return (token_ends[position - 1] if position > 0 else 0), token_ends[position]


def hybrid_generation(record: HybridRecord, titles: dict[int, str]) -> Generation:
    """A hybrid record with its steered tokens (and the disagreements) placed in its text."""
    ends = record.token_ends
    disagree = set(record.disagree_positions or ())
    steered = []
    for position, behaviour, coeff, window in zip(record.steered_positions, record.steered_behaviours,
                                                  record.steered_coeffs, record.steered_windows, strict=True):
        start, end = (None, None) if ends is None else token_span(ends, position)
        latent = record.top_latents[position][0] if record.top_latents[position] else None
        agreed = None if record.disagree_positions is None else position not in disagree
        steered.append(SteeredToken(position, start, end, event_name(behaviour, titles), behaviour, coeff, window,
                                    latent, agreed))
    disagreed = () if ends is None else tuple((position, *token_span(ends, position)) for position in sorted(disagree))
    return Generation(text=record.text, prediction=record.prediction, correct=record.correct,
                      finish_reason=record.finish_reason, n_tokens=record.n_tokens,
                      steered_fraction=record.steered_fraction, agree_fraction=record.agree_fraction,
                      offsets=ends is not None, steered=tuple(steered), disagreed=disagreed)


def viewer_page(paths: RunPaths, view: RunView) -> ViewerPage:
    """The page's data from the run folder's finished evaluations."""
    config, stages = view.config, view.stages
    directions = stages.get("directions", {}).get("summary")
    titles = {} if directions is None else dict(zip(directions["behaviour_ids"], directions["titles"], strict=True))
    evaluations: list[Evaluation] = []
    by_problem: dict[str, dict[str, Generation]] = {}
    references: dict[str, str] = {}
    prompts: dict[str, str] = {}

    def add(name: str, kind: EvaluationKind, description: str, graded: list[tuple[str, str, Generation]]) -> None:
        grades = [generation.correct for _, _, generation in graded]
        evaluations.append(Evaluation(name, kind, description, accuracy(grades).accuracy))
        for problem_id, reference, generation in graded:
            by_problem.setdefault(problem_id, {})[name] = generation
            references.setdefault(problem_id, reference)

    for spec in planned(config):
        if spec.name not in stages or spec.group not in ("plain_eval", "hybrid_eval"):
            continue
        name = spec.name.removeprefix("eval_")
        if spec.group == "plain_eval":
            (role,) = spec.models
            traces = load_traces(paths.plain_eval(role))
            for trace in traces:
                prompts.setdefault(trace.problem_id, trace.prompt)
            model = config.base_model if role == "base" else config.thinking_model
            add(name, "plain", f"the {role} model ({model}) alone",
                [(t.problem_id, t.reference, plain_generation(t)) for t in traces])
            continue
        kind, description = _comparison(name, spec.name == HYBRID_EVAL, config.controls)
        records = read_hybrid_records(paths.hybrid_results(name))
        add(name, kind, description, [(r.problem_id, r.reference, hybrid_generation(r, titles)) for r in records])
    order = behaviour_order(titles)
    return ViewerPage(
        name=config.name, base_model=config.base_model, thinking_model=config.thinking_model,
        benchmark=config.benchmark, evaluations=evaluations,
        colours={name: TAB10[index % len(TAB10)] for index, name in enumerate(order)},
        problems=[Problem(problem_id, references[problem_id], prompts.get(problem_id), generations)
                  for problem_id, generations in by_problem.items()])


def _comparison(name: str, hybrid: bool, controls: list[str]) -> tuple[EvaluationKind, str]:
    """A hybrid evaluation's kind and what it does, in words."""
    if hybrid:
        return "hybrid", "the base model, steered where and as the thinking model's state says"
    if name in controls:
        return "control", comparison_description(name, "control")
    return "baseline", comparison_description(name, "baseline")


def page_json(page: ViewerPage) -> str:
    """The page's data as JSON that is safe inside a <script> element (no ``<`` in it)."""
    return json.dumps(asdict(page), ensure_ascii=False, separators=(",", ":")).replace("<", "\\u003c")


def render_viewer(page: ViewerPage) -> str:
    """The page: the template with the data in it."""
    title = f"{page.name}: problems and steered tokens".replace("&", "&amp;").replace("<", "&lt;")
    return PAGE_TEMPLATE.read_text().replace(TITLE_MARK, title).replace(DATA_MARK, page_json(page))


def write_viewer(paths: RunPaths, view: RunView) -> Path:
    """Write the run folder's ``viewer.html`` from what is on disk."""
    write_text_atomic(paths.viewer, render_viewer(viewer_page(paths, view)))
    return paths.viewer


def read_viewer_data(path: Path) -> dict[str, Any]:
    """The data a written viewer page holds (what its script reads)."""
    text = path.read_text()
    start = text.index('<script type="application/json" id="viewer-data">')
    start = text.index(">", start) + 1
    return json.loads(text[start:text.index("</script>", start)])


__all__ = ["Evaluation", "Generation", "Problem", "SteeredToken", "ViewerPage", "hybrid_generation",
           "read_viewer_data", "render_viewer", "token_span", "viewer_page", "write_viewer"]
