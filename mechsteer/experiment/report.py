"""The run report: ``report.json``, ``report.md``, its plots, and what a tracked run logs of it.

Besides accuracies (with Wilson intervals and the gap recovered, with a paired bootstrap
interval), the report answers *when* each behaviour fired in the hybrid:

- a timeline of the behaviours steered at each token, for example problems;
- onset statistics per behaviour: how often it fired, where in the generation (relative
  position 0 = first token, 1 = last), and where it first fired;
- transitions: for consecutive steering events in one generation, which behaviour follows which.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any

from mechsteer.core.store import read_jsonl, write_json_atomic
from mechsteer.experiment.config import RunConfig
from mechsteer.experiment.state import RunState
from mechsteer.experiment.tracking import Tracker
from mechsteer.grading.statistics import accuracy, gap_recovered, paired_bootstrap_gap


def behaviour_statistics(records: list[dict[str, Any]], titles: dict[int, str]) -> dict[str, Any]:
    """Onset and transition statistics of the hybrid's steering events."""
    fired: dict[str, list[float]] = {}
    first: dict[str, list[float]] = {}
    transitions: Counter[tuple[str, str]] = Counter()
    for record in records:
        n_tokens = max(record["n_tokens"], 1)
        names = [titles.get(b, "bias") if b is not None and b >= 0 else "bias" for b in record["steered_behaviours"]]
        seen = set()
        for position, name in zip(record["steered_positions"], names, strict=True):
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


def build_report(config: RunConfig, state: RunState, evaluations: dict[str, dict[str, Any]],
                 taxonomy_summary: dict[str, Any], ablation_summary: dict[str, Any] | None,
                 total_seconds: float) -> dict[str, Any]:
    """The report of a finished run: accuracies, gap recovered, controls, and every stage's summary."""
    summary = {name: accuracy(result["correct"]) for name, result in evaluations.items()}
    base, thinking = summary["base"].accuracy, summary["thinking"].accuracy

    def gap(name: str) -> float | None:
        return gap_recovered(summary[name].accuracy, base, thinking)

    bootstrap = paired_bootstrap_gap(evaluations["base"]["correct"], evaluations["thinking"]["correct"],
                                     evaluations["hybrid"]["correct"], n_resamples=1000, seed=config.seed)
    controls = {
        name: {"accuracy": summary[name].accuracy, "gap_recovered": gap(name),
               "steered_fraction": evaluations[name].get("steered_fraction")}
        for name in config.controls
    }
    return {
        "name": config.name,
        "pair": {"base": config.base_model, "thinking": config.thinking_model},
        "benchmark": config.benchmark,
        "n_eval": config.n_eval,
        "base_accuracy": base,
        "thinking_accuracy": thinking,
        "hybrid_accuracy": summary["hybrid"].accuracy,
        "accuracy_intervals": {name: [s.ci_low, s.ci_high] for name, s in summary.items()},
        "gap_recovered": gap("hybrid"),
        "gap_recovered_interval": [bootstrap.ci_low, bootstrap.ci_high] if bootstrap.ci_low is not None else None,
        "tokens_steered_fraction": evaluations["hybrid"]["steered_fraction"],
        "controls": controls,
        "taxonomy": taxonomy_summary,
        "directions": state.summary("directions"),
        "ablations": ablation_summary,
        "timings": {**state.timings(), "total_this_invocation": round(total_seconds, 2)},
        "config": asdict(config),
    }


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
    for name, control in report["controls"].items():
        row[f"{name}_accuracy"] = control["accuracy"]
        row[f"{name}_gap_recovered"] = control["gap_recovered"]
        row[f"{name}_steered_fraction"] = control["steered_fraction"]
    row["taxonomy_layer"] = taxonomy.get("layer")
    row["n_behaviours"] = taxonomy.get("n_behaviours")
    row["taxonomy_ari"] = taxonomy.get("ari")
    row["steer_layer"] = (report.get("directions") or {}).get("layer")
    return row


def accuracy_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per evaluated model (base, thinking, hybrid, controls), as report.md's table."""
    rows = [("base", report["base_accuracy"], None, None),
            ("thinking", report["thinking_accuracy"], None, None),
            ("hybrid", report["hybrid_accuracy"], report["gap_recovered"], report["tokens_steered_fraction"])]
    rows += [(name, c["accuracy"], c["gap_recovered"], c["steered_fraction"]) for name, c in report["controls"].items()]
    intervals = report["accuracy_intervals"]
    return [{"model": name, "accuracy": accuracy, "ci_low": intervals[name][0], "ci_high": intervals[name][1],
             "gap_recovered": gap, "steered_fraction": steered} for name, accuracy, gap, steered in rows]


def report_table(report: dict[str, Any]) -> str:
    """The accuracy table that ``mechsteer run`` and ``mechsteer demo`` print (and report.md holds)."""
    lines = [f"{'model':<16}{'accuracy':>10}{'gap rec.':>10}{'steered':>10}"]
    lines += [f"{row['model']:<16}{_fmt(row['accuracy']):>10}{_fmt(row['gap_recovered']):>10}"
              f"{_fmt(row['steered_fraction']):>10}" for row in accuracy_rows(report)]
    return "\n".join(lines)


def write_report(report: dict[str, Any], out: str | Path) -> None:
    """Add behaviour statistics to ``report`` and write report.json, report.md and plots into ``out``."""
    out = Path(out)
    directions = report["directions"]
    titles = dict(zip(directions["behaviour_ids"], directions["titles"], strict=True))
    hybrid_records = read_jsonl(out / "eval" / "hybrid" / "results.jsonl")
    stats = behaviour_statistics(hybrid_records, titles)
    report["behaviour_statistics"] = stats
    write_json_atomic(out / "report.json", report)
    plots = _plots(report, out, hybrid_records, titles, stats)

    lines = [f"# mechsteer run: {report['name']}", "",
             f"Pair: base `{report['pair']['base']}`, thinking `{report['pair']['thinking']}`; "
             f"benchmark `{report['benchmark']}`, {report['n_eval']} problems.", "",
             "```", report_table(report), "```", "",
             f"Gap recovered {_fmt(report['gap_recovered'])} "
             f"(95% paired bootstrap {report['gap_recovered_interval']}), "
             f"tokens steered {_fmt(report['tokens_steered_fraction'])}.", ""]
    taxonomy = report.get("taxonomy") or {}
    lines += ["## Taxonomy", "", "```", _json_block(taxonomy), "```", ""]
    lines += ["## When behaviours fired", "", "| behaviour | fired | mean position | first firing | problems |",
              "|---|---|---|---|---|"]
    for name, entry in stats["onset"].items():
        lines.append(f"| {name} | {entry['n_fired']} | {entry['mean_relative_position']:.2f} | "
                     f"{entry['mean_first_relative_position']:.2f} | {entry['share_of_problems']:.2f} |")
    lines += ["", "Transitions between consecutive steering events:", "", "| from | to | count |", "|---|---|---|"]
    lines += [f"| {t['from']} | {t['to']} | {t['count']} |" for t in stats["transitions"][:20]]
    if report.get("ablations"):
        lines += ["", "## Causal ablations", "", "```", _json_block(report["ablations"]), "```"]
    lines += ["", "## Timings (s)", "", "```", _json_block(report["timings"]), "```", ""]
    lines += [f"![{name}]({name})" for name in plots]
    (out / "report.md").write_text("\n".join(lines) + "\n")


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
    tracker.log_table("ablation_sufficiency", list(ablations.get("sufficiency", [])))
    for plot in [*sorted(out.glob("*.png")), *sorted((out / "taxonomy").glob("*.png"))]:
        tracker.log_image(str(plot.relative_to(out).with_suffix("")), plot)
    tracker.log_artifact(f"{report['name']}-taxonomy", "taxonomy", [out / "taxonomy"])
    tracker.log_artifact(f"{report['name']}-directions", "directions", [out / "directions"])
    tracker.log_artifact(f"{report['name']}-report", "report", [out / "report.json", out / "report.md"])


def _plots(report: dict[str, Any], out: Path, hybrid_records: list[dict[str, Any]], titles: dict[int, str],
           stats: dict[str, Any]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    names = ["base", "thinking", "hybrid", *report["controls"]]
    values = [report["base_accuracy"], report["thinking_accuracy"], report["hybrid_accuracy"],
              *[c["accuracy"] for c in report["controls"].values()]]
    intervals = [report["accuracy_intervals"][name] for name in names]
    errors = [[v - lo for v, (lo, _) in zip(values, intervals, strict=True)],
              [hi - v for v, (_, hi) in zip(values, intervals, strict=True)]]
    figure, axis = plt.subplots(figsize=(7, 3.5))
    axis.bar(names, values, yerr=errors, capsize=4, color=["#888", "#2a6", "#26a"] + ["#bbb"] * len(report["controls"]))
    axis.set_ylabel("accuracy (95% Wilson)")
    axis.set_ylim(0, 1)
    axis.set_title(f"{report['name']}: gap recovered {_fmt(report['gap_recovered'])}, "
                   f"{_fmt(report['tokens_steered_fraction'])} of tokens steered")
    figure.tight_layout()
    figure.savefig(out / "accuracy.png", dpi=110)
    plt.close(figure)
    files.append("accuracy.png")

    examples = hybrid_records[:12]
    ordered = sorted(set(titles.values())) + ["bias"]
    colours = {name: plt.cm.tab10(index % 10) for index, name in enumerate(ordered)}
    figure, axis = plt.subplots(figsize=(9, 0.35 * len(examples) + 1.2))
    for row, record in enumerate(examples):
        axis.hlines(row, 0, record["n_tokens"], color="#ddd", linewidth=6)
        for position, behaviour in zip(record["steered_positions"], record["steered_behaviours"], strict=True):
            name = titles.get(behaviour, "bias") if behaviour is not None and behaviour >= 0 else "bias"
            axis.plot(position, row, "|", color=colours[name], markersize=12, markeredgewidth=2)
    handles = [plt.Line2D([], [], color=colours[n], marker="|", linestyle="", markersize=10, label=n) for n in ordered]
    axis.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    axis.set_yticks(range(len(examples)), [r["problem_id"] for r in examples], fontsize=7)
    axis.set_xlabel("generated token")
    axis.set_title("when each behaviour fired (hybrid)")
    figure.tight_layout()
    figure.savefig(out / "timeline.png", dpi=110)
    plt.close(figure)
    files.append("timeline.png")

    labels = sorted({t["from"] for t in stats["transitions"]} | {t["to"] for t in stats["transitions"]})
    if labels:
        matrix = [[0] * len(labels) for _ in labels]
        for entry in stats["transitions"]:
            matrix[labels.index(entry["from"])][labels.index(entry["to"])] = entry["count"]
        figure, axis = plt.subplots(figsize=(4.5, 4))
        image = axis.imshow(matrix, cmap="Blues")
        axis.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
        axis.set_yticks(range(len(labels)), labels)
        axis.set_xlabel("next steering event")
        axis.set_ylabel("steering event")
        figure.colorbar(image)
        figure.tight_layout()
        figure.savefig(out / "transitions.png", dpi=110)
        plt.close(figure)
        files.append("transitions.png")
    return files


def _fmt(value: Any) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _json_block(data: Any) -> str:
    return json.dumps(data, indent=2, default=str)[:6000]
