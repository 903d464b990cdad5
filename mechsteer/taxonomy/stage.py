"""The taxonomy stage: sweep taxonomies over layers and behaviour counts, keep the selected one.

``mechsteer taxonomy`` and a run's taxonomy stage call :func:`build_taxonomy` with a
:class:`TaxonomySettings`, so the same activations give the same taxonomy folder.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from mechsteer.activations import Manifest
from mechsteer.activations import centring_mean as read_centring_mean
from mechsteer.core.errors import ArtefactError
from mechsteer.core.provenance import mismatch, same_model
from mechsteer.taxonomy.artefact import Taxonomy
from mechsteer.taxonomy.build import JudgeSettings
from mechsteer.taxonomy.clustering import ClusteringMethod
from mechsteer.taxonomy.saelens import SAELENS_CONFIG_FILE, SAELensSAE, read_saelens_folder
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


@dataclass(frozen=True)
class TaxonomySummary:
    """What a run records of its selected taxonomy (``stages.json``) and its report shows."""

    layer: int
    n_behaviours: int
    behaviours: list[str]  # titles, by latent
    ari: float | None  # against ground-truth labels, where the benchmark has them (never used to select)
    metrics: dict[str, Any]  # the selected taxonomy's metrics (mechsteer.taxonomy.metrics), sizes aside
    sizes: list[int] | None  # sentences per behaviour
    sweep: list[dict[str, Any]]  # one row per sweep point (mechsteer.taxonomy.sweep.SWEEP_COLUMNS)

    @classmethod
    def of(cls, best: Taxonomy, rows: list[dict[str, Any]]) -> TaxonomySummary:
        metrics = asdict(best.metrics)
        return cls(layer=best.provenance.layer, n_behaviours=best.provenance.n_latents,
                   behaviours=[b.title for b in best.behaviours], ari=metrics.get("ari"),
                   metrics={key: value for key, value in metrics.items() if key != "sizes"},
                   sizes=metrics.get("sizes"), sweep=rows)

    @property
    def selection_criterion(self) -> str | None:
        return self.metrics.get("selection_criterion")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TaxonomySummary:
        return cls(layer=data["layer"], n_behaviours=data["n_behaviours"], behaviours=list(data.get("behaviours") or []),
                   ari=data.get("ari"), metrics=dict(data.get("metrics") or {}), sizes=data.get("sizes"),
                   sweep=list(data.get("sweep") or []))


def taxonomy_from_sae(activations_dir: Path, sae_folder: Path, out: Path, *, judge: str, seed: int,
                      judge_settings: JudgeSettings | None = None, allow_other_model: bool = False,
                      progress: bool = True) -> tuple[SAELensSAE, Taxonomy]:
    """The taxonomy of ``activations_dir`` that the SAE in the SAELens folder ``sae_folder`` gives, written
    into ``out`` as :func:`build_taxonomy` writes the selected one (a sweep of that one point).

    The SAE names its model, layer and hook (``cfg.json``); its layer must be in the activation run
    and its model the run's (unless ``allow_other_model``). An SAE without L2 normalisation is moved
    to the run's centring mean (:meth:`~mechsteer.taxonomy.sae.TopKSAE.recentred`); a normalised one
    must have been made with that mean.
    """
    imported = read_saelens_folder(sae_folder)
    manifest = Manifest.load(activations_dir)
    where = sae_folder / SAELENS_CONFIG_FILE
    if not allow_other_model and not same_model(imported.model_name, manifest.model):
        raise mismatch(f"the SAE in {where}", "model_name", imported.model_name, manifest.model,
                       "pass the activations of the SAE's model (or allow another model)")
    site = manifest.config.get("site", "resid_post")
    if imported.layer not in manifest.layers or imported.site != site:
        raise ArtefactError(f"{where} reads {imported.hook_name} but the activation run {activations_dir} has "
                            f"layers {manifest.layers} at {site}; extract that layer first (mechsteer activations "
                            f"--layers {imported.layer})")
    sae = imported.sae.recentred(read_centring_mean(activations_dir, imported.layer))
    _, taxonomy = sweep_to_folder(
        activations_dir, [imported.layer], [sae.config.n_latents], out, judge_spec=judge, benchmark=manifest.benchmark,
        method="sae", k=sae.config.k, seed=seed, normalise=sae.normalised, judge_settings=judge_settings,
        trained_sae=sae, progress=progress)
    return imported, taxonomy


__all__ = ["TaxonomySettings", "TaxonomySummary", "build_taxonomy", "taxonomy_from_sae"]
