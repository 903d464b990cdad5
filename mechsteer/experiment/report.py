"""The run report: ``report.json``, ``report.md``, its plots, and what a tracked run logs of it.

Besides accuracies (with Wilson intervals and the gap recovered, with a paired bootstrap
interval), the report answers *when* each behaviour fired in the hybrid:

- a timeline of the behaviours steered at each token, for example problems;
- onset statistics per behaviour: how often it fired, where in the generation (relative
  position 0 = first token, 1 = last), and where it first fired;
- transitions: for consecutive steering events in one generation, which behaviour follows which.

``report.md`` and the plots are drawn from the run folder alone (:func:`rebuild_run_report`):
the run writes ``report.json`` and then rebuilds them exactly as ``mechsteer report DIR`` does,
so both give the same file, and a partly finished folder gets the sections of its finished
stages and the list of the missing ones (:func:`expected_stages`).
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from mechsteer.causal.necessity import NecessityRow
from mechsteer.causal.outputs import ABLATIONS_JSON, ABLATIONS_PLOT, plot_ablations
from mechsteer.causal.sufficiency import SufficiencyRow
from mechsteer.core.errors import ArtefactError, ProvenanceError
from mechsteer.core.store import read_json, write_json_atomic, write_text_atomic
from mechsteer.experiment.config import RunConfig
from mechsteer.experiment.layout import (
    CORRECTION_CEILING,
    CORRECTION_EVAL,
    HYBRID_EVAL,
    REPORT_STAGE,
    RunPaths,
)
from mechsteer.experiment.markdown import RunView, compared_entries, run_markdown
from mechsteer.experiment.plots import (
    ACCURACY_PLOT,
    BIAS,
    TIMELINE_PLOT,
    TRANSITIONS_PLOT,
    event_name,
    plot_accuracy,
    plot_timeline,
    plot_transitions,
    timeline_examples,
)
from mechsteer.experiment.records import EvalSummary
from mechsteer.experiment.state import RunState, check_outputs, planned
from mechsteer.experiment.tracking import Tracker
from mechsteer.experiment.tuning import tuning_report
from mechsteer.experiment.viewer import write_viewer
from mechsteer.grading.statistics import accuracy, gap_recovered, paired_bootstrap_gap
from mechsteer.hybrid.records import HybridRecord, read_hybrid_records
from mechsteer.steering.stage import DirectionsSummary
from mechsteer.taxonomy.artefact import Taxonomy
from mechsteer.taxonomy.plots import plot_metrics_vs_k
from mechsteer.taxonomy.stage import TaxonomySummary
from mechsteer.taxonomy.sweep import METRICS_PLOT, SENTENCE_MAP_PLOT, selected_by

BOOTSTRAP_RESAMPLES = 1000


def expected_stages(config: RunConfig) -> list[str]:
    """The stages a finished run of ``config`` has done, in order (``report``: report.json written)."""
    return [spec.name for spec in planned(config)] + [REPORT_STAGE]


def behaviour_statistics(records: list[HybridRecord], titles: dict[int, str]) -> dict[str, Any]:
    """Onset and transition statistics of the hybrid's steering events."""
    fired: dict[str, list[float]] = {}
    first: dict[str, list[float]] = {}
    transitions: Counter[tuple[str, str]] = Counter()
    for record in records:
        n_tokens = max(record.n_tokens, 1)
        names = [event_name(b, titles) for b in record.steered_behaviours]
        seen = set()
        for position, name in zip(record.steered_positions, names, strict=True):
            relative = position / max(n_tokens - 1, 1)
            fired.setdefault(name, []).append(relative)
            if name not in seen:
                first.setdefault(name, []).append(relative)
                seen.add(name)
        transitions.update(zip(names, names[1:], strict=False))
    onset = {
        name: {
            "n_fired": len(positions),
            "mean_relative_position": sum(positions) / len(positions),
            "mean_first_relative_position": sum(first[name]) / len(first[name]),
            "share_of_problems": len(first[name]) / max(len(records), 1),
        }
        for name, positions in sorted(fired.items())
    }
    return {
        "onset": onset,
        "transitions": [{"from": a, "to": b, "count": count} for (a, b), count in transitions.most_common()],
    }


def build_report(config: RunConfig, state: RunState, evaluations: dict[str, EvalSummary],
                 taxonomy_summary: TaxonomySummary, ablation_summary: dict[str, Any] | None,
                 total_seconds: float) -> dict[str, Any]:
    """The report of a finished run: accuracies, gap recovered, controls, and every stage's summary."""
    report = assemble_report(config, evaluations, taxonomy_summary,
                             DirectionsSummary.from_json(state.summary("directions")), ablation_summary,
                             state.timings())
    report["tuning"] = tuning_report(config, state.summary("tuning") if state.done("tuning") else None)
    if config.correction_vectors:  # the paper's current method, beside the sentence directions
        report["correction"] = {stage: state.summary(stage) if state.done(stage) else None
                                for stage in ("disagreements", "correction_vectors")}
    report["timings"]["total_this_invocation"] = round(total_seconds, 2)
    return report


def assemble_report(config: RunConfig, evaluations: dict[str, EvalSummary],
                    taxonomy_summary: TaxonomySummary | None, directions_summary: DirectionsSummary | None,
                    ablation_summary: dict[str, Any] | None, timings: dict[str, float]) -> dict[str, Any]:
    """The report's numbers from the stages' summaries; ``evaluations`` holds the finished
    evaluations only (an unfinished run's report has None where a stage is missing)."""
    summary = {name: accuracy(result.correct) for name, result in evaluations.items()}
    base = summary["base"].accuracy if "base" in summary else None
    thinking = summary["thinking"].accuracy if "thinking" in summary else None

    def gap(name: str) -> float | None:
        if name not in summary or base is None or thinking is None:
            return None
        return gap_recovered(summary[name].accuracy, base, thinking)

    def gap_interval(name: str) -> list[float] | None:
        if name not in summary or base is None or thinking is None:
            return None
        bootstrap = paired_bootstrap_gap(evaluations["base"].correct, evaluations["thinking"].correct,
                                         evaluations[name].correct, n_resamples=BOOTSTRAP_RESAMPLES,
                                         seed=config.seed)
        return None if bootstrap.ci_low is None or bootstrap.ci_high is None else [bootstrap.ci_low, bootstrap.ci_high]

    def compared(names: Sequence[str]) -> dict[str, dict[str, Any]]:
        """The controls' or baselines' numbers, each compared with the hybrid's."""
        entries = {}
        for name in names:
            if name not in summary:
                continue
            steered = evaluations[name].steered_fraction
            entries[name] = {"accuracy": summary[name].accuracy, "gap_recovered": gap(name),
                             "tokens_steered_fraction": steered, "steered_fraction": steered,
                             "gap_recovered_interval": gap_interval(name)}
            recorded = evaluations[name].recorded
            # how it was built, and the share of its steered tokens that are the thinking model's greedy token
            for key in ("norm_matched_to", "chosen_variant", "variants", "excluded_behaviour", "steered_equal_thinking"):
                if key in recorded:
                    entries[name][key] = recorded[key]
        return entries

    return {
        "name": config.name,
        "pair": {"base": config.base_model, "thinking": config.thinking_model},
        "benchmark": config.benchmark,
        "n_eval": config.n_eval,
        "base_accuracy": base,
        "thinking_accuracy": thinking,
        "hybrid_accuracy": summary["hybrid"].accuracy if "hybrid" in summary else None,
        "accuracy_intervals": {name: [s.ci_low, s.ci_high] for name, s in summary.items()},
        "gap_recovered": gap("hybrid"),
        "gap_recovered_interval": gap_interval("hybrid"),
        "tokens_steered_fraction": evaluations["hybrid"].steered_fraction if "hybrid" in evaluations else None,
        "steered_equal_thinking": evaluations["hybrid"].recorded.get("steered_equal_thinking")
        if "hybrid" in evaluations else None,
        # generations that ran to their length limit (a thinking trace cut off before </think> has no answer)
        "cut_off": {name: result.cut_off for name, result in evaluations.items()},
        "controls": compared(config.controls),
        "baselines": compared(config.baselines),
        # the paper's current method beside the hybrid (sentence directions), its oracle ceiling, and its
        # controls at its own steering
        **({"methods": compared([name.removeprefix("eval_") for name in (CORRECTION_EVAL, CORRECTION_CEILING)]),
            "correction_controls": compared([f"correction_{name}" for name in config.correction_controls])}
           if config.correction_vectors else {}),
        "taxonomy": None if taxonomy_summary is None else {
            **taxonomy_summary.to_json(), "selected_by": taxonomy_selected_by(config, taxonomy_summary)},
        "directions": None if directions_summary is None else directions_summary.to_json(),
        "ablations": ablation_summary,
        "timings": dict(timings),
        "config": asdict(config),
    }


def taxonomy_selected_by(config: RunConfig, taxonomy_summary: TaxonomySummary) -> str | None:
    """What selected the run's taxonomy: the sweep's selection criterion and the run's judge."""
    criterion = taxonomy_summary.selection_criterion
    return None if criterion is None else selected_by(criterion, config.judge)


def headline_metrics(report: dict[str, Any]) -> dict[str, Any]:
    """The report's headline numbers as one flat row (a sweep's results table, wandb's summary)."""
    taxonomy = report.get("taxonomy") or {}
    row = {
        "base_accuracy": report["base_accuracy"],
        "thinking_accuracy": report["thinking_accuracy"],
        "hybrid_accuracy": report["hybrid_accuracy"],
        "gap_recovered": report["gap_recovered"],
        "tokens_steered_fraction": report["tokens_steered_fraction"],
    }
    for name, control in compared_entries(report):
        row[f"{name}_accuracy"] = control["accuracy"]
        row[f"{name}_gap_recovered"] = control["gap_recovered"]
        row[f"{name}_steered_fraction"] = control["steered_fraction"]
    row["taxonomy_layer"] = taxonomy.get("layer")
    row["n_behaviours"] = taxonomy.get("n_behaviours")
    row["taxonomy_ari"] = taxonomy.get("ari")
    row["steer_layer"] = (report.get("directions") or {}).get("layer")
    return row


def accuracy_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per evaluated model (base, thinking, hybrid, controls, baselines; those evaluated so far)."""
    rows = [("base", report["base_accuracy"], None, None),
            ("thinking", report["thinking_accuracy"], None, None),
            ("hybrid", report["hybrid_accuracy"], report["gap_recovered"], report["tokens_steered_fraction"])]
    rows += [(name, c["accuracy"], c["gap_recovered"], c["steered_fraction"]) for name, c in compared_entries(report)]
    intervals = report["accuracy_intervals"]
    return [{"model": name, "accuracy": accuracy, "ci_low": intervals[name][0], "ci_high": intervals[name][1],
             "gap_recovered": gap, "steered_fraction": steered}
            for name, accuracy, gap, steered in rows if name in intervals]


def report_table(report: dict[str, Any]) -> str:
    """The accuracy table that ``mechsteer run`` and ``mechsteer demo`` print (and report.md holds)."""
    rows = accuracy_rows(report)
    width = max([16, *(len(row["model"]) + 2 for row in rows)])
    lines = [f"{'model':<{width}}{'accuracy':>10}{'gap rec.':>10}{'steered':>10}"]
    lines += [f"{row['model']:<{width}}" + "".join(f"{format_number(row[key]):>10}" for key in
                                                   ("accuracy", "gap_recovered", "steered_fraction")) for row in rows]
    return "\n".join(lines)


def write_report(report: dict[str, Any], out: str | Path) -> None:
    """Add behaviour statistics to ``report``, write report.json, then report.md and the plots
    (:func:`rebuild_run_report`, as ``mechsteer report`` does)."""
    paths = RunPaths(Path(out))
    titles = DirectionsSummary.from_json(report["directions"]).title_of
    report["behaviour_statistics"] = behaviour_statistics(read_hybrid_records(paths.hybrid_results()), titles)
    write_json_atomic(paths.report_json, report)
    rebuild_run_report(paths.root, stage_plots=False)


def read_run(out: str | Path) -> tuple[RunView, list[HybridRecord]]:
    """A run folder as report.md shows it, and the hybrid's per-problem log (empty until its stage
    is done). Reads the finished stages' records and artefacts; recomputes only statistics."""
    paths = RunPaths(Path(out))
    record = read_json(paths.stages_file, "run's stage record (stages.json; is this a run folder?)")
    config = RunConfig.from_dict(record["config"], check_values=False)
    stages: dict[str, dict[str, Any]] = record["stages"]
    missing = [stage for stage in expected_stages(config)
               if stage not in stages and not (stage == REPORT_STAGE and paths.report_json.is_file())]

    def summary(stage: str) -> dict[str, Any] | None:
        return stages[stage]["summary"] if stage in stages else None

    for stage in ("taxonomy", "directions", HYBRID_EVAL, "ablations"):  # the stage folders the report reads
        if "outputs" in stages.get(stage, {}):
            check_outputs(paths, stage, stages[stage]["outputs"])
    directions = None if "directions" not in stages else DirectionsSummary.from_json(stages["directions"]["summary"])
    taxonomy_summary = None if "taxonomy" not in stages else TaxonomySummary.from_json(stages["taxonomy"]["summary"])
    titles = {} if directions is None else directions.title_of
    hybrid_records = read_hybrid_records(paths.hybrid_results()) if HYBRID_EVAL in stages else []
    problems = {record.problem_id for record in hybrid_records}
    if HYBRID_EVAL in stages and (len(hybrid_records) != config.n_eval or len(problems) != config.n_eval):
        raise ArtefactError(f"{paths.hybrid_results()} holds {len(hybrid_records)} records of "
                            f"{len(problems)} problems, but the run evaluated {config.n_eval}: the file was cut or "
                            "mixed; rerun mechsteer run into a new --out")
    if not missing:
        report = read_json(paths.report_json, "run's report")
        written_for = RunConfig.from_dict(report.get("config", {}), check_values=False).digest() \
            if isinstance(report, dict) and isinstance(report.get("config"), dict) else None
        if written_for != record["config_digest"]:
            raise ProvenanceError(f"{paths.report_json} was written for another config (digest {written_for}) than "
                                  f"this folder's stages.json ({record['config_digest']}); rerun mechsteer run on "
                                  "the folder to write its own")
    else:  # the same keys from the finished stages
        evaluations = {spec.name.removeprefix("eval_"): EvalSummary.from_json(stages[spec.name]["summary"], spec.name)
                       for spec in planned(config)
                       if spec.group in ("plain_eval", "hybrid_eval") and spec.name in stages}
        report = assemble_report(config, evaluations, taxonomy_summary, directions, summary("ablations"),
                                 {name: entry["seconds"] for name, entry in stages.items()})
        report["tuning"] = tuning_report(config, summary("tuning"))
        if hybrid_records and directions is not None:
            report["behaviour_statistics"] = behaviour_statistics(hybrid_records, titles)
    ablations = None
    if "ablations" in stages:
        ablations = read_json(paths.ablations / ABLATIONS_JSON, "ablations' tables")
    view = RunView(
        config=config, config_digest=record["config_digest"], stages=stages, missing=missing, report=report,
        directions=directions, taxonomy_summary=taxonomy_summary,
        taxonomy=Taxonomy.load(paths.taxonomy) if "taxonomy" in stages else None, ablations=ablations,
        hybrid_problems=len(hybrid_records),
        timeline_problems=sum(len(group) for _, group in timeline_examples(hybrid_records, titles)),
    )
    return view, hybrid_records


def rebuild_run_report(out: str | Path, *, stage_plots: bool = True) -> RunView:
    """Redraw a run folder's plots and write its report.md from what is on disk; nothing reruns.

    ``stage_plots`` also redraws the plots of the taxonomy and ablation stages from their tables
    (the sentence map needs the activations and is kept as the taxonomy stage drew it)."""
    paths = RunPaths(Path(out))
    out = paths.root
    view, hybrid_records = read_run(out)
    report = view.report
    titles = {} if view.directions is None else view.directions.title_of
    rows = accuracy_rows(report)
    if rows:
        steered = "" if report["tokens_steered_fraction"] is None else (
            f": gap recovered {format_number(report['gap_recovered'])}, {100 * report['tokens_steered_fraction']:.1f}% "
            "of tokens steered")
        _draw(out / ACCURACY_PLOT, lambda path: plot_accuracy(rows, path, f"{report['name']}{steered}"))
    if hybrid_records:
        examples = timeline_examples(hybrid_records, titles)
        _draw(out / TIMELINE_PLOT, lambda path: plot_timeline(examples, titles, path, len(hybrid_records)))
    statistics = report.get("behaviour_statistics")
    if statistics and statistics["transitions"]:
        order = [*dict.fromkeys(titles[b] for b in sorted(titles)), BIAS]
        _draw(out / TRANSITIONS_PLOT, lambda path: plot_transitions(statistics["transitions"], order, path))
    taxonomy = view.taxonomy_summary
    if stage_plots and taxonomy is not None and taxonomy.sweep:
        _draw(paths.taxonomy / METRICS_PLOT, lambda path: plot_metrics_vs_k(taxonomy.sweep, path))
    if stage_plots and view.ablations is not None:
        necessity = [NecessityRow.from_json(row) for row in view.ablations["necessity"]]
        sufficiency = [SufficiencyRow.from_json(row) for row in view.ablations["sufficiency"]]
        _draw(paths.ablations / ABLATIONS_PLOT, lambda path: plot_ablations(necessity, sufficiency, path))
    candidates = [out / ACCURACY_PLOT, paths.taxonomy / METRICS_PLOT, paths.taxonomy / SENTENCE_MAP_PLOT,
                  paths.ablations / ABLATIONS_PLOT, out / TRANSITIONS_PLOT, out / TIMELINE_PLOT]
    view.plots = {paths.relative(path) for path in candidates if path.is_file()}
    write_viewer(paths, view)
    write_text_atomic(paths.report_md, run_markdown(view))
    return view


def _draw(path: Path, draw: Any) -> None:
    """Draw into a sibling and rename it into place: a stage folder of a sweep point may be a hard
    link to another point's, which writing in place would change too."""
    staging = path.with_name(f".{path.stem}.partial{path.suffix}")
    try:
        draw(staging)
    except BaseException:
        staging.unlink(missing_ok=True)
        raise
    os.replace(staging, path)


def track_report(tracker: Tracker, report: dict[str, Any], out: Path) -> None:
    """Log the finished report: headline metrics, its tables, its plots, and the artefacts."""
    tracker.log_metrics("report", headline_metrics(report))
    tracker.log_table("accuracy", accuracy_rows(report))
    taxonomy = report.get("taxonomy") or {}
    tracker.log_table("taxonomy_sweep", list(taxonomy.get("sweep") or []))
    statistics = report.get("behaviour_statistics") or {}
    tracker.log_table("behaviour_onset", [{"behaviour": name, **entry}
                                          for name, entry in statistics.get("onset", {}).items()])
    tracker.log_table("behaviour_transitions", list(statistics.get("transitions", [])))
    ablations = report.get("ablations") or {}
    tracker.log_table("ablation_necessity", list(ablations.get("necessity", [])))
    tracker.log_table("ablation_necessity_tests", list(ablations.get("necessity_tests", [])))
    tracker.log_table("ablation_sufficiency", list(ablations.get("sufficiency", [])))
    paths = RunPaths(out)
    for plot in [*sorted(out.glob("*.png")), *sorted(paths.taxonomy.glob("*.png"))]:
        tracker.log_image(str(plot.relative_to(out).with_suffix("")), plot)
    tracker.log_artifact(f"{report['name']}-taxonomy", "taxonomy", [paths.taxonomy])
    tracker.log_artifact(f"{report['name']}-directions", "directions", [paths.directions])
    tracker.log_artifact(f"{report['name']}-report", "report", [paths.report_json, paths.report_md])


def format_number(value: Any) -> str:
    """A table cell: three decimals, or n/a."""
    return "n/a" if value is None else f"{value:.3f}"
