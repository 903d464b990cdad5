"""``report.md`` as text: a run's report (:func:`run_markdown`) and a sweep's (:func:`sweep_markdown`).

Rendering only: :mod:`mechsteer.experiment.report` reads a run folder into a :class:`RunView` and
writes the file. The text is a pure function of the view, so the report a run writes and the one
``mechsteer report`` rebuilds from the same folder are identical. Tables, not JSON; numbers are
rounded for reading (the full ones are in ``report.json``); every plot comes with a one-line caption.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mechsteer.experiment.config import TRACKING_KEYS, RunConfig
from mechsteer.experiment.layout import VIEWER_HTML
from mechsteer.grading.statistics import seed_spread
from mechsteer.hybrid.comparisons import comparison_description
from mechsteer.steering.methods import direction_method_names, direction_method_spec
from mechsteer.steering.stage import DirectionsSummary
from mechsteer.taxonomy.artefact import Taxonomy
from mechsteer.taxonomy.stage import TaxonomySummary

DASH = "—"
EXAMPLES_PER_BEHAVIOUR = 3
EXAMPLE_CHARS = 140
SELECTION_CRITERIA = {
    "judge_final": "the judge's final score (mean of consistency F1, completeness and orthogonality)",
    "silhouette": "the mean cosine silhouette of the sentence assignments (no judge)",
}


@dataclass
class RunView:
    """What ``report.md`` shows of one run folder: its finished stages' summaries and artefacts."""

    config: RunConfig
    config_digest: str
    stages: dict[str, dict[str, Any]]  # stages.json: name -> {"seconds", "summary"}
    missing: list[str]  # expected stages not done (``report``: report.json not written yet)
    report: dict[str, Any]  # report.json; for an unfinished run the same keys from the finished stages
    taxonomy: Taxonomy | None = None
    taxonomy_summary: TaxonomySummary | None = None  # the taxonomy stage's
    directions: DirectionsSummary | None = None  # the directions stage's
    ablations: dict[str, Any] | None = None  # ablations/ablations.json
    hybrid_problems: int = 0  # problems in the hybrid's log (the timeline shows some of them)
    timeline_problems: int = 0
    plots: set[str] = field(default_factory=set)  # plot files present, relative to the run folder


# ------------------------------------------------------------------------------------------
# Formatting


def num(value: Any, digits: int = 3) -> str:
    """A number rounded for reading (never more than four decimals); a dash when absent."""
    if value is None:
        return DASH
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "n/a"
        if math.isinf(value):
            return "-inf" if value < 0 else "inf"
        return f"{value:.{min(digits, 4)}f}"
    return str(value)


def percent(value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return num(value)
    return f"{100 * value:.1f}%"


def interval(bounds: Sequence[float | None] | None) -> str:
    if not bounds or bounds[0] is None or bounds[1] is None:
        return DASH
    return f"{num(bounds[0])} – {num(bounds[1])}"


def cell(text: Any) -> str:
    """Free text made safe for one table cell: no line breaks, no markdown, math or HTML in it."""
    text = " ".join(str(text).split())
    for character in "\\`*_[]<>|$#~":
        text = text.replace(character, "\\" + character)
    return text


def table(header: Sequence[str], rows: Sequence[Sequence[Any]], align: str | None = None) -> list[str]:
    """A GitHub table; ``align`` has one letter per column: l(eft) or r(ight)."""
    align = (align or "").ljust(len(header), "l")[: len(header)]
    rule = ["---:" if a == "r" else "---" for a in align]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(rule) + " |"]
    lines += ["| " + " | ".join(str(value) for value in row) + " |" for row in rows]
    return lines + [""]


def figure(path: str, caption: str, plots: set[str]) -> list[str]:
    """The plot and its caption, or nothing when the run has not drawn it."""
    if path not in plots:
        return []
    return [f"![{Path(path).stem}]({path})", "", f"*{caption}*", ""]


def value_text(value: Any) -> str:
    """A config value in words: lists comma-separated, mappings as key value pairs."""
    if isinstance(value, list | tuple):
        return ", ".join(value_text(item) for item in value) or DASH
    if isinstance(value, dict):
        return ", ".join(f"{key} {value_text(item)}" for key, item in value.items()) or DASH
    if isinstance(value, float) and math.isfinite(value):
        if value != 0 and abs(value) < 1e-3:
            return f"{value:.1e}"
        return f"{value:.4f}".rstrip("0").rstrip(".")
    return num(value)


# ------------------------------------------------------------------------------------------
# A run


def run_markdown(view: RunView) -> str:
    config = view.config
    lines = [f"# {config.name}", "",
             f"Base `{config.base_model}`, thinking `{config.thinking_model}`, benchmark `{config.benchmark}`: "
             f"{config.n_train} problems ({config.train_split}) for the taxonomy and the directions, "
             f"{config.n_eval} ({config.eval_split}) for the evaluation.", "",
             f"Every problem's generations side by side, the steered tokens marked: [{VIEWER_HTML}]({VIEWER_HTML}).", ""]
    if view.missing:
        lines += [f"> **Unfinished run.** Stages not done: {', '.join(view.missing)}. The sections below show "
                  "the finished stages; rerunning `mechsteer run` with the same config resumes the rest.", ""]
    lines += _headline(view) + _taxonomy(view) + _directions(view) + _tuning(view) + _ablations(view) + _firing(view)
    lines += _timings(view)
    return "\n".join(lines).rstrip("\n") + "\n"


# The report's sections of models compared with base and thinking besides the hybrid, in the order its
# tables list them: the hybrid's controls and baselines, then the correction vectors, their ceiling and controls.
COMPARED_SECTIONS = ("controls", "baselines", "methods", "correction_controls")


def compared_entries(report: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """Every model of the report's compared sections (those it has), in their tables' order."""
    return [item for section in COMPARED_SECTIONS for item in (report.get(section) or {}).items()]


def _headline(view: RunView) -> list[str]:
    report = view.report
    compared = dict(compared_entries(report))  # each one's numbers
    models = ["base", "thinking", "hybrid", *compared]
    intervals = report.get("accuracy_intervals") or {}
    cut_off = report.get("cut_off") or {}  # generations that reached the length limit
    rows = []
    for name in models:
        if name not in intervals:
            continue
        if name in ("base", "thinking"):
            entry: dict[str, Any] = {"accuracy": report[f"{name}_accuracy"]}
        elif name == "hybrid":
            entry = {"accuracy": report["hybrid_accuracy"], "gap_recovered": report["gap_recovered"],
                     "gap_recovered_interval": report["gap_recovered_interval"],
                     "steered_fraction": report["tokens_steered_fraction"],
                     "steered_equal_thinking": report.get("steered_equal_thinking")}
        else:
            entry = compared[name]
        rows.append([f"**{name}**" if name == "hybrid" else name, num(entry["accuracy"]), interval(intervals[name]),
                     num(entry.get("gap_recovered")), interval(entry.get("gap_recovered_interval")),
                     percent(entry.get("steered_fraction")), percent(entry.get("steered_equal_thinking")),
                     num(cut_off.get(name))])
    lines = ["## Headline", ""]
    if not rows:
        return lines + ["No evaluation has finished yet.", ""]
    header = ["model", "accuracy", "95% interval", "gap recovered", "95% interval", "tokens steered",
              "steered = thinking", "cut off"]
    counted = any(cut_off.get(name) is not None for name in intervals)  # not in runs from before it was
    if not counted:
        header, rows = header[:-1], [row[:-1] for row in rows]
    lines += table(header, rows, "lrlrlrrr")
    controls = "; ".join(f"`{name}` {_control_text(name, entry)}" for name, entry in report.get("controls", {}).items())
    baselines = "; ".join(f"`{name}` {comparison_description(name, 'baseline')}" for name in report.get("baselines", {}))
    lines += [f"{view.config.n_eval} problems. Accuracy intervals are Wilson 95%; the gap recovered is "
              "(model − base) / (thinking − base), with a 95% paired bootstrap interval over problems (1000 "
              "resamples). Steered = thinking: the share of steered tokens that are the thinking model's own greedy "
              "token (where it is high, the steering mostly forces the thinking model's next token)." + (" Cut off: generations that reached the token limit (a thinking trace cut off "
                               "before it ends has no answer)." if counted else "")
              + (f" Controls: {controls}." if controls else "") + (f" Baselines: {baselines}." if baselines else "")
              + _correction_text(report), ""]
    lines += figure("accuracy.png", "Accuracy per model with 95% Wilson intervals: the hybrid should approach "
                    "thinking while steering few tokens, and the controls should not.", view.plots)
    return lines


def _correction_text(report: dict[str, Any]) -> str:
    """What the correction vectors' rows are, and how each of their controls compares with them."""
    methods = report.get("methods") or {}
    if "correction" not in methods:
        return ""
    text = (" `correction`: the paper's current method, correction vectors with their learned coefficient at the "
            "current position, timed by the same policy; `correction_ceiling`: an oracle that reads the thinking "
            "model's token (an upper bound, not a result).")
    own = methods["correction"].get("gap_recovered")
    controls = []
    for name, entry in (report.get("correction_controls") or {}).items():
        gap = entry.get("gap_recovered")
        verdict = ("" if own is None or gap is None or own <= 0
                   else f", {gap / own:.0%} of its recovery ({'below' if gap < own / 2 else 'NOT below'} half)")
        controls.append(f"`{name}` {_control_text(name.removeprefix('correction_'), entry)}{verdict}")
    return text + (f" Its controls, at its steering: {'; '.join(controls)}." if controls else "")


def _control_text(name: str, entry: dict[str, Any]) -> str:
    matched = entry.get("norm_matched_to")
    if name == "random_vectors" and matched is not None:
        return f"steers random vectors timed by the SAE's argmax latent, each of the norm of the {matched} it replaces"
    chosen, variants = entry.get("chosen_variant"), entry.get("variants")
    if chosen is not None and variants:
        return f"{comparison_description(name, 'control')}: the best of {len(variants)} variants, {chosen}"
    return comparison_description(name, "control")


def _taxonomy(view: RunView) -> list[str]:
    lines = ["## Behaviours (taxonomy)", ""]
    taxonomy, summary = view.taxonomy, view.taxonomy_summary
    if taxonomy is None or summary is None:
        return lines + ["The taxonomy stage has not finished.", ""]
    provenance, metrics = taxonomy.provenance, taxonomy.metrics
    sweep = summary.sweep
    criterion = SELECTION_CRITERIA.get(metrics.selection_criterion, metrics.selection_criterion)
    method = "an SAE" if provenance.method == "sae" else provenance.method
    top_k = "" if provenance.k is None else f" (top-{provenance.k})"
    selected_by = (view.report.get("taxonomy") or {}).get("selected_by")  # report.json's words (no judge: no labels)
    lines += [f"**Selection:** layer {provenance.layer}, K = {provenance.n_latents}, vectors "
              f"{'' if provenance.normalised else 'not '}L2-normalised: the best of {len(sweep)} taxonomies (sweep "
              f"below) by {criterion}, {num(metrics.selection_score)}. Built with {method}{top_k} on "
              f"{provenance.n_sentences} sentences of `{provenance.model}`."
              + (f" Selected by: {cell(selected_by)}." if selected_by else ""), ""]
    measured = [("FVU", metrics.fvu), ("silhouette", metrics.silhouette),
                ("consistency F1", metrics.consistency_f1), ("completeness", metrics.completeness),
                ("orthogonality", metrics.orthogonality), ("ARI", metrics.ari), ("NMI", metrics.nmi)]
    shown = [(name, value) for name, value in measured if value is not None]
    lines += table([name for name, _ in shown], [[num(value) for _, value in shown]], "r" * len(shown))
    if metrics.ari is not None:
        lines += ["ARI and NMI compare the behaviours with the benchmark's ground-truth labels; they are reported, "
                  "never used to select.", ""]
    ground_truth = any(b.matched_label is not None for b in taxonomy.behaviours)
    header = ["latent", "title", "description", "sentences", "examples"]
    if ground_truth:
        header.append("ground truth: label (precision / recall)")
    rows = []
    for behaviour in taxonomy.behaviours:
        examples = list(dict.fromkeys(" ".join(e.split()) for e in behaviour.examples))[:EXAMPLES_PER_BEHAVIOUR]
        shortened = [e if len(e) <= EXAMPLE_CHARS else e[: EXAMPLE_CHARS - 1] + "…" for e in examples]
        share = behaviour.size / max(provenance.n_sentences, 1)
        row = [str(behaviour.id), f"**{cell(behaviour.title)}**", cell(behaviour.description),
               f"{behaviour.size} ({percent(share)})", "<br>".join(f"“{cell(e)}”" for e in shortened) or DASH]
        if ground_truth:
            row.append(DASH if behaviour.matched_label is None else
                       f"{cell(behaviour.matched_label)} ({num(behaviour.label_precision, 2)} / "
                       f"{num(behaviour.label_recall, 2)})")
        rows.append(row)
    lines += table(header, rows, "rllrl" + ("l" if ground_truth else ""))
    lines += ["Examples: each behaviour's most typical sentences (for an SAE, those that activate its latent "
              "most), repeats dropped.", ""]
    lines += _sweep_table(sweep)
    lines += figure("taxonomy/metrics_vs_k.png", "Every sweep metric against K, one line per layer and "
                    "normalisation; the circled point is the selected taxonomy.", view.plots)
    lines += figure("taxonomy/sentence_map.png", "The training sentences on their top two principal components, "
                    "coloured by behaviour: separate clouds mean the behaviours differ in the activations.",
                    view.plots)
    return lines


def _sweep_table(sweep: list[dict[str, Any]]) -> list[str]:
    if not sweep:
        return []
    ks = sorted({row["n_latents"] for row in sweep})
    groups = sorted({(row["layer"], bool(row["normalised"])) for row in sweep}, key=lambda g: (g[0], not g[1]))
    scores = {(row["layer"], bool(row["normalised"]), row["n_latents"]): row for row in sweep}
    rows = []
    for layer, normalised in groups:
        values = []
        for k in ks:
            row = scores.get((layer, normalised, k))
            text = DASH if row is None else num(row["selection_score"])
            values.append(f"**{text}**" if row is not None and row.get("selected") else text)
        rows.append([str(layer), "yes" if normalised else "no", *values])
    return (["**Sweep**: the selection score per layer, L2 normalisation and K (bold: selected).", ""]
            + table(["layer", "normalised", *[f"K = {k}" for k in ks]], rows, "rl" + "r" * len(ks)))


def _directions(view: RunView) -> list[str]:
    lines = ["## Directions", ""]
    summary = view.directions
    if summary is None:
        return lines + ["The directions stage has not finished.", ""]
    config = view.config
    method = (direction_method_spec(summary.method).description if summary.method in direction_method_names()
              else summary.method)  # a plug-in's method no longer installed: its name
    lines += [f"{method[0].upper()}{method[1:]} (`{summary.method}`) in the base model's layer {summary.layer}"
              + ("" if summary.bias_norm is None else f", with a bias vector of norm {num(summary.bias_norm, 2)}")
              + f". The hybrid steers there with coefficients {value_text(config.coefficients)} and windows "
              f"{value_text(config.windows)}, timed by the `{config.policy}` policy on the thinking model's "
              + ("taxonomy layer" if view.taxonomy is None else f"layer {view.taxonomy.provenance.layer}") + ".", ""]
    rows = [[str(b), cell(title), num(norm, 2)]
            for b, title, norm in zip(summary.behaviour_ids, summary.titles, summary.norms, strict=True)]
    return lines + table(["latent", "behaviour", "norm"], rows, "rlr")


def _tuning(view: RunView) -> list[str]:
    config, tuning = view.config, view.report.get("tuning")
    lines = ["## Tuning", ""]
    if config.tune_split is None:
        threshold = f" and threshold {value_text(config.threshold)}" if config.policy == "threshold" else ""
        return lines + [f"No tuning stage: the hybrid, the controls and the baselines steer with coefficients "
                        f"{value_text(config.coefficients)}, windows {value_text(config.windows)}{threshold}, as "
                        "set in the config.", ""]
    if tuning is None:
        return lines + ["The tuning stage has not finished.", ""]
    chosen = tuning["chosen"]
    lines += [f"Each candidate ran the hybrid on {tuning['n']} problems of the `{cell(tuning['split'])}` split "
              f"(the evaluations above are on `{cell(config.eval_split)}`); "
              f"the evaluations use the most accurate, **{cell(chosen['name'])}** (ties: fewer tokens steered, then "
              "the smaller coefficient)."
              + (" `grid`: every (coefficient, window) at once, the hybrid choosing among them at each steered token."
                 if any(row["name"].startswith("grid") for row in tuning["candidates"]) else ""), ""]
    rows = [[f"**{cell(row['name'])}**" if row["name"] == chosen["name"] else cell(row["name"]),
             value_text(row["coefficients"]), value_text(row["windows"]), num(row["threshold"], 2),
             num(row["accuracy"]), percent(row["tokens_steered_fraction"])] for row in tuning["candidates"]]
    return lines + table(["candidate", "coefficients", "windows", "threshold", "validation accuracy",
                          "tokens steered"], rows, "lllrrr")


def _rate(count: dict[str, Any]) -> str:
    """``k/n = rate [low – high]``, a causal check's rate with its 95% Wilson interval."""
    if not count["n"]:
        return "no context"
    return f"{count['k']}/{count['n']} = {num(count['rate'])} [{interval(count['ci'])}]"


def _ablations(view: RunView) -> list[str]:
    if not view.config.ablations:
        return []
    lines = ["## Causal ablations", ""]
    if view.ablations is None:
        return lines + ["The ablations stage has not finished.", ""]
    necessity = view.ablations.get("necessity") or []
    tests = view.ablations.get("necessity_tests") or []
    sufficiency = view.ablations.get("sufficiency") or []
    settings = view.ablations.get("settings") or {}
    alpha = settings.get("alpha")
    n_contexts = (settings.get("settings") or {}).get("n_contexts")
    criterion = (f"A check passes at p < {num(alpha, 2)} (one-sided Fisher exact test); rates are k/n with their "
                 "95% Wilson interval.")
    if tests:
        lines += [f"**Necessity** (thinking model, the direction projected out, at contexts "
                  f"{cell(settings.get('necessity_contexts', ''))}, up to {num(n_contexts)} per behaviour): "
                  f"how often the next sentence is still the behaviour. {criterion}", ""]
        rows = [[cell(r["title"]), cell(r["directions"]), cell(r["variant"]), _rate(r["unablated"]),
                 _rate(r["ablated"]), f"{r['p_value']:.2g}", num(r["passed"])] for r in tests]
        lines += table(["behaviour", "directions", "ablated at", "unablated", "ablated", "p", "passed"], rows,
                       "lllrrrl")
    if necessity:
        lines += [f"Whole traces ({necessity[0]['n_traces']} traces, the run's directions): the behaviour's "
                  "sentences per trace before and after, and the largest relative change of any other behaviour.", ""]
        rows = [[cell(r["title"]), cell(r["variant"]), num(r["rate_before"], 2), num(r["rate_after"], 2),
                 percent(r["relative_change"]), percent(r["max_other_relative_change"]),
                 f"{num(r['accuracy_before'])} → {num(r['accuracy_after'])}"] for r in necessity]
        lines += table(["behaviour", "ablated at", "before", "after", "change", "largest other change",
                        "accuracy"], rows, "llrrrrl")
    if sufficiency:
        with_bias = " with the bias" if settings.get("sufficiency_with_bias") else ""
        # With a grammar the unsteered rate is 0 by construction; the base's own rate where the
        # grammar allows the behaviour says instead how often it needed no steering.
        own = all(r.get("base_on_its_own") for r in sufficiency)
        baseline = ("the base model on its own where the grammar allows the behaviour (allowed contexts "
                    "scanned in random order until enough are found where it does not write it; those where it "
                    "does are left out)" if own else "unsteered")
        lines += [f"**Sufficiency** (base model steered{with_bias}, up to {num(n_contexts)} contexts per "
                  f"behaviour, {cell(settings.get('sufficiency_contexts', ''))}): the share of next sentences that "
                  f"are the behaviour: {baseline}, with a random vector of the same norm (pooled over the random "
                  f"vectors), and steered; the test is steered against random. {criterion}", ""]
        rows = [[cell(r["title"]), num(r["coeff"], 2), _rate(r["base_on_its_own" if own else "unsteered"]),
                 _rate(r["random"]), _rate(r["steered"]), f"{r['p_value']:.2g}", num(r["passed"])]
                for r in sufficiency]
        lines += table(["behaviour", "coefficient", "base on its own" if own else "unsteered", "random vector",
                        "steered", "p", "passed"], rows, "lrrrrrl")
    not_measured = settings.get("not_measured") or {}
    if not_measured:
        listed = ", ".join(f"latent {latent} ({cell(title)})" for latent, title in not_measured.items())
        lines += [f"Not measured: {listed}. Ground truth labels behaviours by title, so of several latents "
                  "sharing a title only the first is measured, and a title the ground truth lacks cannot be.", ""]
    lines += figure("ablations/ablations.png", "Left: each behaviour's rate with and without its direction "
                    "(necessity); right: the next-sentence rate unsteered, with a random vector and steered "
                    "(sufficiency). A direction matters where the bars differ.", view.plots)
    return lines


def _firing(view: RunView) -> list[str]:
    lines = ["## When behaviours fired (hybrid)", ""]
    statistics = view.report.get("behaviour_statistics")
    if statistics is None:
        return lines + ["The hybrid evaluation has not finished.", ""]
    onset = statistics["onset"]
    rows = [[cell(name), str(entry["n_fired"]), percent(entry["share_of_problems"]),
             num(entry["mean_relative_position"], 2), num(entry["mean_first_relative_position"], 2)]
            for name, entry in onset.items()]
    lines += ["Steering events per behaviour (`bias`: the bias alone). Positions are relative to the "
              "generation: 0 is its first token, 1 its last.", ""]
    lines += table(["behaviour", "steering events", "problems where it fired", "mean position",
                    "mean first position"], rows, "lrrrr")
    transitions = statistics["transitions"]
    if transitions:
        common = ", ".join(f"{cell(t['from'])} → {cell(t['to'])} ({t['count']})" for t in transitions[:5])
        lines += [f"Most frequent transitions between consecutive steering events: {common}.", ""]
    lines += figure("transitions.png", "Counts of each steering event (row) followed by the next one in the same "
                    "generation (column): the diagonal is a behaviour steered again.", view.plots)
    lines += figure("timeline.png", f"{view.timeline_problems} of the {view.hybrid_problems} problems, the first "
                    "ones and those where the most distinct behaviours were steered: a tick where the thinking "
                    "model's latent made the hybrid steer, ✓ where the answer was correct.", view.plots)
    return lines


def _timings(view: RunView) -> list[str]:
    rows = [[name, num(entry["seconds"], 1)] for name, entry in view.stages.items()]
    total = sum(entry["seconds"] for entry in view.stages.values())
    lines = ["## Timings and config", ""]
    lines += table(["stage", "seconds"], [*rows, ["**all stages**", f"**{num(total, 1)}**"]], "lr")
    lines += [f"Config digest `{view.config_digest}` (a run folder accepts only this config).", ""]
    config = {key: value for key, value in vars(view.config).items() if key not in TRACKING_KEYS}
    lines += ["<details><summary>Config</summary>", ""]
    lines += table(["key", "value"], [[key, cell(value_text(value))] for key, value in config.items()])
    return lines + ["</details>", ""]


# ------------------------------------------------------------------------------------------
# A sweep

SWEEP_METRICS = (("base_accuracy", "base"), ("thinking_accuracy", "thinking"), ("hybrid_accuracy", "hybrid"),
                 ("gap_recovered", "gap recovered"), ("tokens_steered_fraction", "tokens steered"),
                 ("n_behaviours", "K"), ("taxonomy_layer", "taxonomy layer"))


def sweep_markdown(name: str, rows: list[dict[str, Any]], swept_keys: list[str], *, missing: Sequence[str] = (),
                   plot: bool = False) -> str:
    """One table of the points (their swept values, headline numbers, status and report) and the plot."""
    failed = [row for row in rows if row.get("status") == "failed"]
    lines = [f"# Sweep {name}", "",
             f"{len(rows)} points, {len(rows) - len(failed) - len(missing)} finished, {len(failed)} failed"
             + (f", {len(missing)} not finished" if missing else "") + ". Each point is a `mechsteer run`; its own "
             "report is linked.", ""]
    if missing:
        lines += [f"> **Unfinished sweep.** Points not finished: {', '.join(missing)}. Rerunning `mechsteer sweep` "
                  "with the same file resumes them.", ""]
    header = ["point", *swept_keys, *[label for _, label in SWEEP_METRICS], "status"]
    body = []
    for row in rows:
        values = [cell(value_text(row.get(key))) for key in swept_keys]
        metrics = [percent(row.get(column)) if column == "tokens_steered_fraction" else num(row.get(column))
                   for column, _ in SWEEP_METRICS]
        status = row.get("status") or DASH
        link = f"[{row['point']}](points/{row['point']}/report.md)" if status == "ok" else f"`{row['point']}`"
        body.append([link, *values, *metrics, status])
    lines += table(header, body, "l" + "l" * len(swept_keys) + "r" * len(SWEEP_METRICS) + "l")
    lines += ["Gap recovered: (hybrid − base) / (thinking − base); K: the selected taxonomy's behaviours.", ""]
    for row in failed:
        lines += [f"- point `{row['point']}` failed after {row.get('attempts')} attempt(s): "
                  f"{cell(row.get('error') or 'no error recorded')} (traceback in `points/{row['point']}/errors.log`)"]
    if failed:
        lines.append("")
    if "seed" in swept_keys:
        lines += _seed_spread(rows, [key for key in swept_keys if key != "seed"])
    if plot:
        lines += figure("results.png", "Hybrid accuracy per point (bars) against the base and thinking accuracies "
                        "(ticks); failed points in red.", {"results.png"})
    return "\n".join(lines).rstrip("\n") + "\n"


def _seed_spread(rows: list[dict[str, Any]], other_keys: list[str]) -> list[str]:
    """Mean ± SD over seeds of each metric, per setting of the other swept keys (finished points only)."""
    groups: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    for row in rows:
        if row.get("status") == "ok":
            groups.setdefault(tuple(value_text(row.get(key)) for key in other_keys), []).append(row)
    metrics = [(column, label) for column, label in SWEEP_METRICS if column.endswith(("accuracy", "gap_recovered",
                                                                                      "steered_fraction"))]
    controls = sorted({column for row in rows for column in row
                       if column.endswith("_gap_recovered") and row.get(column) is not None})
    metrics += [(column, column.removesuffix("_gap_recovered").replace("_", " ") + " gap") for column in controls]

    def spread(group: list[dict[str, Any]], column: str) -> str:
        values = [row[column] for row in group if isinstance(row.get(column), int | float)]
        if not values:
            return DASH
        result = seed_spread(values)
        show = percent if column == "tokens_steered_fraction" else num
        return show(result.mean) + ("" if result.sd is None else f" ± {show(result.sd)}")

    header = [*other_keys, "seeds", *[label for _, label in metrics]]
    body = [[*map(cell, key), str(len(group)), *[spread(group, column) for column, _ in metrics]]
            for key, group in groups.items()]
    return (["## Across seeds", "", "Mean ± sample standard deviation over the seeds of each setting (finished points; "
             "each point's own report has its bootstrap interval).", ""]
            + table(header, body, "l" * len(other_keys) + "r" + "r" * len(metrics)))


__all__ = ["RunView", "cell", "num", "run_markdown", "sweep_markdown", "table"]
