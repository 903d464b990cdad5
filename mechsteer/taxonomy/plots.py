"""The taxonomy sweep's plots: each metric against the number of behaviours, and the selected
taxonomy's sentences on their top two principal components. matplotlib is imported when a plot
is drawn (Agg backend), so building taxonomies does not need it."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from mechsteer.core.tensor_types import Float, Tensor, typechecked
from mechsteer.taxonomy.artefact import Taxonomy


def plot_metrics_vs_k(rows: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """One panel per measured metric, one line per layer, against the number of behaviours."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    names = ["selection_score", "fvu", "mean_direction_dissimilarity", "silhouette",
             "consistency_f1", "completeness", "orthogonality", "ari", "nmi"]
    names = [name for name in names if any(_finite(row.get(name)) for row in rows)]
    columns = 3
    lines = math.ceil(len(names) / columns)
    figure, axes = plt.subplots(lines, columns, figsize=(4 * columns, 3 * lines + 0.6), squeeze=False)
    # one colour per layer, dashed when not normalised; one legend for all panels
    layers = sorted({row["layer"] for row in rows})
    colours = {layer: plt.cm.tab10(index % 10) for index, layer in enumerate(layers)}
    for axis, name in zip(axes.flat, names, strict=False):
        for layer, normalised in sorted({(row["layer"], row["normalised"]) for row in rows}):
            points = sorted((row["n_latents"], row[name]) for row in rows
                            if (row["layer"], row["normalised"]) == (layer, normalised)
                            and _finite(row.get(name)))
            if points:
                label = f"layer {layer}" + ("" if normalised else ", not normalised")
                axis.plot([p[0] for p in points], [p[1] for p in points], marker="o", markersize=4,
                          color=colours[layer], linestyle="-" if normalised else "--", label=label)
        chosen = [row for row in rows if row["selected"] and _finite(row.get(name))]
        for row in chosen:
            axis.scatter([row["n_latents"]], [row[name]], s=120, facecolors="none", edgecolors="black")
        axis.set_title(name + (" (reported, not selected on)" if name in ("ari", "nmi") else ""), fontsize=9)
        axis.set_xlabel("behaviours (n_latents)")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    for axis in list(axes.flat)[len(names):]:
        axis.set_visible(False)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    if handles:
        figure.legend(handles, labels, loc="lower center", ncol=min(len(labels), 6), fontsize=8,
                      title="circled: the selected taxonomy", title_fontsize=8)
    figure.tight_layout(rect=(0, 0.55 / (3 * lines + 0.6), 1, 1))
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return Path(path)


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


@typechecked
def pca_2d(vectors: Float[Tensor, "n d"]) -> Float[Tensor, "n 2"]:
    """Coordinates on the top two principal components (SVD of the centred vectors)."""
    if vectors.shape[0] < 2 or vectors.shape[1] < 2:
        raise ValueError(f"a 2-D map needs at least 2 vectors of width >= 2, got {tuple(vectors.shape)}")
    centred = vectors.double() - vectors.double().mean(dim=0, keepdim=True)
    _, _, right = torch.linalg.svd(centred, full_matrices=False)
    return (centred @ right[:2].T).float()


def plot_sentence_map(
    taxonomy: Taxonomy, vectors: Tensor, path: str | Path, *, max_points: int = 5000, seed: int = 0
) -> Path:
    """Sentences on their top two principal components, coloured by behaviour."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = taxonomy.assignments
    if vectors.shape[0] != labels.shape[0]:
        raise ValueError(f"{vectors.shape[0]} vectors for {labels.shape[0]} assigned sentences")
    if vectors.shape[0] > max_points:
        sample = torch.randperm(vectors.shape[0], generator=torch.Generator().manual_seed(seed))[:max_points]
        vectors, labels = vectors[sample], labels[sample]
    coordinates = pca_2d(vectors.float())
    n_colours = 10 if len(taxonomy.behaviours) <= 10 else 20
    colours = plt.get_cmap(f"tab{n_colours}")
    figure, axis = plt.subplots(figsize=(7, 6))
    for position, behaviour in enumerate(taxonomy.behaviours):
        chosen = labels == behaviour.id
        if not bool(chosen.any()):
            continue
        axis.scatter(coordinates[chosen, 0], coordinates[chosen, 1], s=6, alpha=0.6,
                     color=colours(position % n_colours), label=f"{behaviour.id}: {behaviour.title[:40]}")
    provenance = taxonomy.provenance
    axis.set_title(f"{provenance.model} layer {provenance.layer}, {provenance.method} "
                   f"n={provenance.n_latents}", fontsize=9)
    axis.set_xlabel("PC 1")
    axis.set_ylabel("PC 2")
    if len(taxonomy.behaviours) <= 20:
        axis.legend(fontsize=7, markerscale=2)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return Path(path)


__all__ = ["pca_2d", "plot_metrics_vs_k", "plot_sentence_map"]
