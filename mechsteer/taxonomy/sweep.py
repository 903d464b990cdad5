"""Sweep taxonomies over layers, normalisations and numbers of behaviours, and select one.

Selection (:func:`sweep_taxonomies`) picks the layer, the number of behaviours and, if asked
to sweep it, the normalisation by :data:`~mechsteer.taxonomy.artefact.SELECTION_DOC`: the
judge's final score when a judge is given, else the cosine silhouette. ARI/NMI are reported
and never used to select: they need ground truth.

Normalisation matters when one behaviour dominates: the centring mean then sits near that
behaviour, so its sentences have small centred norms and, once L2-normalised, directions
set by their content (the digits of an organism's compute steps), and the SAE splits it. On
the thinking organism (compute = 61% of sentences) normalised vectors gave ARI 0.5-0.6,
unnormalised ones 0.99 at the silhouette's pick; sweep ``normalise=(True, False)``.

:func:`sweep_to_folder` writes the selected taxonomy with the sweep's table
(``metrics.csv``) and plots; the ``taxonomy`` command and ``mechsteer run`` both use it.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from mechsteer.taxonomy.artefact import SELECTION_GEOMETRIC, SELECTION_JUDGE, Taxonomy
from mechsteer.taxonomy.build import JudgeSettings, build_from_layer, load_layer
from mechsteer.taxonomy.clustering import ClusteringMethod
from mechsteer.taxonomy.judge.base import Judge
from mechsteer.taxonomy.judge.spec import make_judge
from mechsteer.taxonomy.plots import plot_metrics_vs_k, plot_sentence_map
from mechsteer.taxonomy.sae import TopKSAE

METRICS_CSV = "metrics.csv"
METRICS_PLOT = "metrics_vs_k.png"
SENTENCE_MAP_PLOT = "sentence_map.png"

SWEEP_COLUMNS = (
    "layer", "n_latents", "normalised", "method", "k", "seed", "selection_criterion",
    "selection_score",
    "fvu", "mean_direction_dissimilarity", "silhouette", "n_nonempty", "largest_fraction",
    "size_entropy", "consistency_f1", "completeness", "orthogonality", "judge_final",
    "judge_unparsable", "ari", "nmi", "train_epochs", "train_seconds", "selected",
)


def sweep_row(taxonomy: Taxonomy) -> dict[str, Any]:
    """One taxonomy as a row of the sweep table (the columns of :data:`SWEEP_COLUMNS`)."""
    metrics = asdict(taxonomy.metrics)
    provenance = taxonomy.provenance
    row = {
        "layer": provenance.layer, "n_latents": provenance.n_latents,
        "normalised": provenance.normalised, "method": provenance.method,
        "k": provenance.k, "seed": provenance.seed, "selected": False,
    }
    row.update({column: metrics[column] for column in SWEEP_COLUMNS if column in metrics})
    return row


def selected_by(selection_criterion: str, judge_spec: str) -> str:
    """What selected a sweep's taxonomy, in words: its selection criterion and, for a judge's score,
    the judge named by ``judge_spec`` (the oracle's score is computed from ground-truth labels)."""
    if selection_criterion == SELECTION_GEOMETRIC:
        return "silhouette (no labels)"
    if selection_criterion == SELECTION_JUDGE:
        judge = "oracle — ground-truth labels" if judge_spec == "oracle" else judge_spec
        if judge_spec == "http":
            judge = "http (the model MECHSTEER_JUDGE_MODEL named)"
        return f"judge final score (judge: {judge})"
    return selection_criterion


def selection_key(taxonomy: Taxonomy) -> tuple[float, int, int, bool]:
    """Larger is better: the higher score first; ties to fewer behaviours, the lower layer, normalised."""
    provenance = taxonomy.provenance
    return (taxonomy.metrics.selection_score, -provenance.n_latents, -provenance.layer, bool(provenance.normalised))


def sweep_taxonomies(
    activations_dir: str | Path,
    layers: Sequence[int],
    n_latents_grid: Sequence[int],
    *,
    method: ClusteringMethod = "sae",
    k: int = 3,
    seed: int = 0,
    judge: Judge | None = None,
    normalise: bool | Sequence[bool] = True,
    judge_settings: JudgeSettings | None = None,
    sae_options: dict[str, Any] | None = None,
    trained_sae: TopKSAE | None = None,
    progress: bool = False,
) -> tuple[list[dict[str, Any]], Taxonomy]:
    """Build a taxonomy for every (layer, normalisation, n_latents) and pick one by
    :data:`~mechsteer.taxonomy.artefact.SELECTION_DOC`. ``normalise`` is one choice or several,
    e.g. ``(True, False)``. ``trained_sae`` labels with that SAE instead of training
    (:func:`~mechsteer.taxonomy.build.build_from_layer`; a grid of its one point).

    Returns one row per sweep point (the columns of :data:`SWEEP_COLUMNS`; ``selected`` marks
    the pick) and the selected taxonomy.
    """
    if not layers or not n_latents_grid:
        raise ValueError(f"need at least one layer and one n_latents, got {list(layers)}, {list(n_latents_grid)}")
    if any(n < 2 for n in n_latents_grid):
        raise ValueError(f"every n_latents must be >= 2 to compare behaviours, got {list(n_latents_grid)}")
    normalisations = [normalise] if isinstance(normalise, bool) else list(dict.fromkeys(normalise))
    if not normalisations:
        raise ValueError("normalise is an empty sequence; pass True, False or both")
    rows: list[dict[str, Any]] = []
    best: Taxonomy | None = None
    best_key: tuple[float, int, int, bool] | None = None
    best_row = -1
    for layer in layers:
        for normalised in normalisations:
            data = load_layer(activations_dir, layer, bool(normalised))
            for n_latents in n_latents_grid:
                taxonomy = build_from_layer(
                    data, method=method, n_latents=n_latents, k=k, seed=seed, judge=judge,
                    judge_settings=judge_settings or JudgeSettings(), sae_options=sae_options or {},
                    trained_sae=trained_sae,
                )
                rows.append(sweep_row(taxonomy))
                if progress:
                    shown = ("layer", "normalised", "n_latents", "selection_score", "ari")
                    print(json.dumps({key: rows[-1][key] for key in shown}))
                key = selection_key(taxonomy)
                if best_key is None or key > best_key:
                    best, best_key, best_row = taxonomy, key, len(rows) - 1
    assert best is not None  # the grid is not empty (checked above)
    rows[best_row]["selected"] = True
    return rows, best


def write_metrics_csv(rows: Sequence[dict[str, Any]], path: str | Path) -> Path:
    path = Path(path)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(SWEEP_COLUMNS))
        writer.writeheader()
        for row in rows:
            writer.writerow({column: row.get(column) for column in SWEEP_COLUMNS})
    return path


def sweep_to_folder(
    activations_dir: str | Path,
    layers: Sequence[int],
    n_latents_grid: Sequence[int],
    out_dir: str | Path,
    *,
    judge_spec: str = "none",
    benchmark: str | None = None,
    seed: int = 0,
    **sweep_options: Any,
) -> tuple[list[dict[str, Any]], Taxonomy]:
    """:func:`sweep_taxonomies` with the judge named by ``judge_spec``
    (:func:`~mechsteer.taxonomy.judge.spec.make_judge`; ``benchmark`` describes the oracle's
    labels), then write the selected taxonomy, ``metrics.csv`` and both plots into ``out_dir``.
    The CLI and ``mechsteer run`` both use it."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    judge_settings = sweep_options.get("judge_settings") or JudgeSettings()
    judge = make_judge(judge_spec, activations_dir, out, benchmark=benchmark, timeout=judge_settings.timeout,
                       max_concurrency=judge_settings.concurrency, max_tokens=judge_settings.max_tokens)
    rows, best = sweep_taxonomies(activations_dir, layers, n_latents_grid, judge=judge, seed=seed, **sweep_options)
    best.save(out)
    write_metrics_csv(rows, out / METRICS_CSV)
    plot_metrics_vs_k(rows, out / METRICS_PLOT)
    plot_sentence_map(best, best.sentence_vectors(), out / SENTENCE_MAP_PLOT, seed=seed)
    return rows, best


__all__ = [
    "METRICS_CSV",
    "METRICS_PLOT",
    "SENTENCE_MAP_PLOT",
    "SWEEP_COLUMNS",
    "selected_by",
    "selection_key",
    "sweep_row",
    "sweep_taxonomies",
    "sweep_to_folder",
    "write_metrics_csv",
]
