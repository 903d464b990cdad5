"""The taxonomy stage: sweep taxonomies over layers and behaviour counts, keep the selected one.

``mechsteer taxonomy`` and a run's taxonomy stage call :func:`build_taxonomy` with a
:class:`TaxonomySettings`, so the same activations give the same taxonomy folder.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mechsteer.activations import Manifest
from mechsteer.taxonomy.artefact import Taxonomy
from mechsteer.taxonomy.build import JudgeSettings
from mechsteer.taxonomy.clustering import ClusteringMethod
from mechsteer.taxonomy.sweep import sweep_to_folder


@dataclass(frozen=True)
class TaxonomySettings:
    """What the sweep tries (layers x L2 normalisation x behaviour counts), how, and who judges."""

    layers: tuple[int, ...]
    n_latents: tuple[int, ...]
    method: ClusteringMethod
    k: int  # the SAE's top-k
    seed: int
    normalise: tuple[bool, ...]  # one choice, or both (swept)
    judge: str  # none | oracle | http | http:MODEL | local:SPEC (mechsteer.taxonomy.judge.spec)
    judge_settings: JudgeSettings = field(default_factory=JudgeSettings)
    max_epochs: int | None = None  # caps the SAE's training (default: the SAE's own)


def build_taxonomy(activations_dir: Path, out: Path, settings: TaxonomySettings, *,
                   progress: bool = True) -> tuple[list[dict[str, Any]], Taxonomy]:
    """Sweep, select, and write the selected taxonomy with its sweep table and plots into ``out``;
    returns the sweep's rows and the selected taxonomy. The oracle judge reads the labels of the
    activations' own benchmark (their manifest's)."""
    benchmark = Manifest.load(activations_dir).benchmark
    return sweep_to_folder(
        activations_dir, list(settings.layers), list(settings.n_latents), out, judge_spec=settings.judge,
        benchmark=benchmark, method=settings.method, k=settings.k, seed=settings.seed, normalise=settings.normalise,
        judge_settings=settings.judge_settings,
        sae_options={} if settings.max_epochs is None else {"max_epochs": settings.max_epochs}, progress=progress)


__all__ = ["TaxonomySettings", "build_taxonomy"]
