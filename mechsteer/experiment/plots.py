"""The run report's own plots: accuracy per model, when each behaviour fired, and which behaviour's
steering follows which. Drawn from report.json's numbers and the hybrid's per-token log only, so
``mechsteer report`` redraws them without recomputing anything. matplotlib is imported when a plot
is drawn (Agg backend); the same inputs give the same PNG bytes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mechsteer.hybrid.records import HybridRecord

ACCURACY_PLOT = "accuracy.png"
TIMELINE_PLOT = "timeline.png"
TRANSITIONS_PLOT = "transitions.png"
TIMELINE_PROBLEMS = 12
BIAS = "bias"  # the name of a steering event with the bias alone (no behaviour)


def behaviour_order(titles: dict[int, str]) -> list[str]:
    """The steering events' names in the order the plots and the viewer colour them (matplotlib's
    tab10 colours in this order): the titles sorted, then the bias."""
    return [*dict.fromkeys(sorted(titles.values())), BIAS]


def event_name(behaviour: int | None, titles: dict[int, str]) -> str:
    """The behaviour a steering event steered toward, by title (``bias`` when no behaviour)."""
    return titles.get(behaviour, BIAS) if behaviour is not None and behaviour >= 0 else BIAS


def plot_accuracy(rows: list[dict[str, Any]], path: Path, title: str) -> Path:
    """One bar per model with its 95% Wilson interval and its accuracy written above it."""
    plt = _pyplot()
    names = [row["model"].replace("_", "\n") for row in rows]
    values = [row["accuracy"] for row in rows]
    # clamped at 0: at an accuracy of 0 or 1 the Wilson bound can miss it by a rounding error
    errors = [[max(0.0, value - row["ci_low"]) for value, row in zip(values, rows, strict=True)],
              [max(0.0, row["ci_high"] - value) for value, row in zip(values, rows, strict=True)]]
    colours = {"base": "#888", "thinking": "#2a6", "hybrid": "#26a"}
    figure, axis = plt.subplots(figsize=(max(5.0, 1.15 * len(rows) + 1), 3.8))
    axis.bar(range(len(rows)), values, yerr=errors, capsize=4,
             color=[colours.get(row["model"], "#bbb") for row in rows])
    for index, row in enumerate(rows):
        axis.text(index, row["ci_high"] + 0.02, f"{row['accuracy']:.3f}", ha="center", va="bottom", fontsize=8)
    axis.set_xticks(range(len(rows)), names, fontsize=9)
    axis.set_ylabel("accuracy (95% Wilson)")
    axis.set_ylim(0, 1.12)
    axis.set_yticks([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    axis.set_title(title, fontsize=10)
    axis.spines[["top", "right"]].set_visible(False)
    return _save(figure, plt, path)


def timeline_examples(records: list[HybridRecord], titles: dict[int, str],
                      n: int = TIMELINE_PROBLEMS) -> list[tuple[str, list[HybridRecord]]]:
    """Problems for the timeline, in two groups: the first ``n // 2`` (what a typical generation
    looks like) and, of the others, those with the most distinct behaviours steered, then the most
    steering events (ties in evaluation order)."""
    first = records[: n // 2]

    def key(indexed: tuple[int, HybridRecord]) -> tuple[int, int, int]:
        index, record = indexed
        names = {event_name(b, titles) for b in record.steered_behaviours}
        return (-len(names), -len(record.steered_positions), index)

    chosen = sorted(list(enumerate(records))[len(first):], key=key)[: n - len(first)]
    varied = [record for _, record in sorted(chosen, key=lambda indexed: indexed[0])]
    groups = [("first problems", first), ("most behaviours steered", varied)]
    return [(label, group) for label, group in groups if group]


def plot_timeline(groups: list[tuple[str, list[HybridRecord]]], titles: dict[int, str], path: Path,
                  n_problems: int) -> Path:
    """One row per problem (its generated tokens in grey), a tick where each behaviour was steered;
    the groups of :func:`timeline_examples` one under the other, each under its label."""
    plt = _pyplot()
    ordered = behaviour_order(titles)
    colours = {name: plt.cm.tab10(index % 10) for index, name in enumerate(ordered)}
    records = [record for _, group in groups for record in group]
    figure, axis = plt.subplots(figsize=(9, 0.38 * len(records) + 0.4 * len(groups) + 1.3))
    row, ticks, labels = 0.0, [], []
    for label, group in groups:
        axis.text(0, row - 0.15, label, fontsize=8, style="italic", color="#555", va="bottom")
        row += 0.7
        for record in group:
            axis.hlines(row, 0, record.n_tokens, color="#ddd", linewidth=6)
            for position, behaviour in zip(record.steered_positions, record.steered_behaviours, strict=True):
                axis.plot(position, row, "|", color=colours[event_name(behaviour, titles)], markersize=12,
                          markeredgewidth=2)
            ticks.append(row)
            labels.append(f"{record.problem_id} {'✓' if record.correct else '✗'}")
            row += 1
    used = {event_name(b, titles) for record in records for b in record.steered_behaviours}
    handles = [plt.Line2D([], [], color=colours[name], marker="|", linestyle="", markersize=10, label=name)
               for name in ordered if name in used]
    if handles:
        axis.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8, title="steered",
                    title_fontsize=8)
    axis.set_yticks(ticks, labels, fontsize=7)
    axis.tick_params(axis="y", length=0)
    axis.set_ylim(row - 0.3, -0.6)
    axis.set_xlim(left=-1)
    axis.set_xlabel("generated token")
    axis.set_title(f"when each behaviour was steered (hybrid; {len(records)} of {n_problems} problems, "
                   "✓ correct)", fontsize=10)
    axis.spines[["top", "right", "left"]].set_visible(False)
    return _save(figure, plt, path)


def plot_transitions(transitions: list[dict[str, Any]], order: list[str], path: Path) -> Path:
    """Counts of consecutive steering events (row: an event, column: the next one), written in the cells."""
    plt = _pyplot()
    seen = {t["from"] for t in transitions} | {t["to"] for t in transitions}
    labels = [name for name in order if name in seen] + sorted(seen - set(order))
    matrix = [[0] * len(labels) for _ in labels]
    for entry in transitions:
        matrix[labels.index(entry["from"])][labels.index(entry["to"])] = entry["count"]
    largest = max((count for row in matrix for count in row), default=0)
    size = 1.0 + 0.9 * len(labels)
    figure, axis = plt.subplots(figsize=(size + 1.2, size))
    axis.imshow(matrix, cmap="Blues", vmin=0, vmax=max(largest, 1))
    for row, counts in enumerate(matrix):
        for column, count in enumerate(counts):
            dark = count > 0.6 * largest
            axis.text(column, row, str(count), ha="center", va="center", fontsize=10,
                      color="white" if dark else ("#222" if count else "#aaa"))
    axis.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
    axis.set_yticks(range(len(labels)), labels)
    axis.set_xlabel("next steering event")
    axis.set_ylabel("steering event")
    axis.set_title("transitions between steering events", fontsize=10)
    return _save(figure, plt, path)


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(figure: Any, plt: Any, path: Path) -> Path:
    figure.tight_layout()
    # no metadata: the same inputs give the same bytes
    figure.savefig(path, dpi=110, metadata={"Software": None})
    plt.close(figure)
    return path


__all__ = ["ACCURACY_PLOT", "BIAS", "TIMELINE_PLOT", "TRANSITIONS_PLOT", "behaviour_order", "event_name",
           "plot_accuracy", "plot_timeline", "plot_transitions", "timeline_examples"]
