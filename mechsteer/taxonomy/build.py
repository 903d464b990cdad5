"""Stage 3: a taxonomy of reasoning behaviours from sentence activations.

:func:`build_taxonomy` trains one clusterer (:func:`mechsteer.taxonomy.clustering.make_clusterer`) on
a layer's centred (and by default L2-normalised) sentence vectors and measures it, giving a
:class:`~mechsteer.taxonomy.artefact.Taxonomy`:

- geometric: reconstruction FVU, mean 1 - |cos| between directions, cluster sizes, and the
  cosine silhouette of the assignments (:func:`~mechsteer.taxonomy.metrics.cosine_silhouette`);
- ground truth, where ``sentences.jsonl`` carries labels (organisms): ARI, NMI and the
  behaviour-to-label matching with per-behaviour precision and recall;
- with a judge: titles and descriptions written by the judge from each behaviour's examples,
  and the paper's consistency F1, completeness and orthogonality, whose mean is the final score.

Without a judge a behaviour is titled ``"behaviour 3"``, or ``"behaviour 3 (compute)"`` with
the planted label most of its sentences carry where labels exist.

:mod:`mechsteer.taxonomy.sweep` builds one per layer, normalisation and number of behaviours
and selects among them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from mechsteer.activations import Manifest, SentenceRecord, load_sentence_vectors, read_sentences
from mechsteer.activations import centring_mean as read_centring_mean
from mechsteer.core.tensor_types import Tensor
from mechsteer.taxonomy.artefact import (
    SELECTION_GEOMETRIC,
    SELECTION_JUDGE,
    Behaviour,
    Provenance,
    Taxonomy,
    TaxonomyMetrics,
)
from mechsteer.taxonomy.clustering import (
    CLUSTERING_METHODS,
    Clusterer,
    ClusteringMethod,
    SAEClusterer,
    make_clusterer,
)
from mechsteer.taxonomy.judge.base import Judge
from mechsteer.taxonomy.judge.metrics import (
    BehaviourDescription,
    JudgeScores,
    describe_behaviours,
    example_sentences,
    judge_score,
)
from mechsteer.taxonomy.metrics import (
    BehaviourMatch,
    GroundTruthMetrics,
    cosine_silhouette,
    geometric_metrics,
    ground_truth_metrics,
    sentence_labels,
)
from mechsteer.taxonomy.sae import TopKSAE


@dataclass(frozen=True)
class JudgeSettings:
    """How much the judge is asked (the paper's sizes by default)."""

    n_top_examples: int = 100
    n_random_examples: int = 100
    n_repeats: int = 5
    n_in: int = 100
    n_out: int = 100
    n_per_behaviour: int = 100
    concurrency: int | None = None  # judge requests at once (an HTTP judge: in flight, abandoned ones included)
    timeout: float | None = None  # an HTTP judge's seconds per attempt (default: mechsteer.core.http's)
    max_tokens: int | None = None  # caps each answer's length (a slow local server answers sooner)


# --- the data of one layer -------------------------------------------------------------


@dataclass
class LayerData:
    """What every sweep point of one layer shares."""

    activations_dir: Path
    layer: int
    manifest: Manifest
    sentences: list[SentenceRecord]
    labels: list[str] | None
    vectors: Tensor
    centring_mean: Tensor
    normalised: bool


def load_layer(activations_dir: str | Path, layer: int, normalise: bool) -> LayerData:
    activations_dir = Path(activations_dir)
    if not (activations_dir / "manifest.json").is_file():
        raise ValueError(f"{activations_dir} has no manifest.json: not an activation run folder")
    manifest = Manifest.load(activations_dir)
    if layer not in manifest.config["layers"]:
        raise ValueError(f"layer {layer} not in the activation run's layers {manifest.config['layers']}")
    vectors = load_sentence_vectors(activations_dir, layer, normalise=normalise)
    sentences = read_sentences(activations_dir)
    if len(sentences) != vectors.shape[0]:
        raise ValueError(
            f"{activations_dir}: {len(sentences)} sentences in sentences.jsonl but {vectors.shape[0]} vectors"
        )
    return LayerData(
        activations_dir=activations_dir,
        layer=layer,
        manifest=manifest,
        sentences=sentences,
        labels=sentence_labels(sentences),
        vectors=vectors,
        centring_mean=read_centring_mean(activations_dir, layer),
        normalised=normalise,
    )


# --- the steps of one build -------------------------------------------------------------


@dataclass
class _Fitted:
    """A trained clusterer and what it says about the layer's sentences."""

    clusterer: Clusterer
    assignments: Tensor  # (n_sentences,) int64
    reconstruction: Tensor
    directions: Tensor  # (n_latents, d_model)


def _check_trained(data: LayerData, sae: TopKSAE, method: ClusteringMethod, n_latents: int, k: int) -> None:
    """Refuse an SAE trained elsewhere that does not fit this layer's vectors or the asked build."""
    config = sae.config
    if method != "sae" or n_latents != config.n_latents or k != config.k:
        raise ValueError(f"a given SAE builds method 'sae' with its own n_latents={config.n_latents} and "
                         f"k={config.k}; got method {method!r}, n_latents={n_latents}, k={k}")
    if data.vectors.shape[1] != config.d_in:
        raise ValueError(f"the SAE reads d_in={config.d_in} but layer {data.layer} of {data.activations_dir} has "
                         f"width {data.vectors.shape[1]}; use an SAE of this model")
    if data.normalised != sae.normalised:
        raise ValueError(f"the SAE reads {'L2-normalised' if sae.normalised else 'unnormalised'} vectors but the "
                         f"layer was loaded with normalise={data.normalised}; load it as the SAE reads")
    sae.check_centring(data.centring_mean)


def _fit(data: LayerData, method: ClusteringMethod, n_latents: int, k: int, seed: int,
         sae_options: dict[str, Any], trained: TopKSAE | None = None) -> _Fitted:
    if method not in CLUSTERING_METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {CLUSTERING_METHODS}")
    if data.vectors.shape[0] < n_latents:
        raise ValueError(f"{data.vectors.shape[0]} sentences are too few for n_latents={n_latents}")
    clusterer: Clusterer
    if trained is not None:
        _check_trained(data, trained, method, n_latents, k)
        clusterer = SAEClusterer.of(trained)
    elif method == "sae":
        clusterer = make_clusterer(
            "sae", n_latents, centring_mean=data.centring_mean, normalised=data.normalised,
            k=k, seed=seed, **sae_options,
        )
    else:
        clusterer = make_clusterer(method, n_latents, seed=seed)
    if trained is None:
        clusterer.fit(data.vectors)
    with torch.no_grad():
        assignments = clusterer.classify(data.vectors).to(torch.int64)
        reconstruction = clusterer.reconstruct(data.vectors).float()
    return _Fitted(clusterer, assignments, reconstruction, clusterer.directions.float())


def _assignment_strength(clusterer: Clusterer, vectors: Tensor, labels: Tensor) -> Tensor:
    """How strongly each sentence expresses its behaviour, to rank the examples: the SAE's
    pre-activation of the assigned latent; for the baselines the cosine with its direction."""
    with torch.no_grad():
        if isinstance(clusterer, SAEClusterer):
            scores = clusterer.fitted_sae().encode_pre(vectors)
        else:
            scores = F.normalize(vectors, dim=-1) @ clusterer.directions.to(vectors).T
    return scores.gather(1, labels[:, None]).squeeze(1)


def _examples(data: LayerData, fitted: _Fitted, settings: JudgeSettings, seed: int) -> dict[int, list[str]]:
    strength = _assignment_strength(fitted.clusterer, data.vectors, fitted.assignments)
    return example_sentences(
        [sentence.text for sentence in data.sentences], fitted.assignments.tolist(), strength.tolist(),
        n_top=settings.n_top_examples, n_random=settings.n_random_examples, seed=seed,
    )


def _ask_judge(
    judge: Judge, data: LayerData, assignments: Tensor, examples: dict[int, list[str]],
    settings: JudgeSettings, seed: int,
) -> tuple[dict[int, BehaviourDescription], JudgeScores]:
    """The judge's title and description of each behaviour, and its scores of the taxonomy."""
    descriptions = describe_behaviours(
        judge, examples, n_repeats=settings.n_repeats, seed=seed, concurrency=settings.concurrency,
    )
    scores = judge_score(
        judge, descriptions, [sentence.text for sentence in data.sentences], assignments.tolist(),
        n_in=settings.n_in, n_out=settings.n_out, n_per_behaviour=settings.n_per_behaviour, seed=seed,
        concurrency=settings.concurrency,
    )
    return descriptions, scores


def _title_and_description(
    behaviour_id: int, size: int, described: BehaviourDescription | None, match: BehaviourMatch | None
) -> tuple[str, str]:
    """The judge's words where it described the behaviour; else a placeholder naming the matched label."""
    if described is not None:
        return described.title, described.description
    title = f"behaviour {behaviour_id}" + (f" ({match.label})" if match else "")
    if size == 0:
        return title, "No sentence is assigned to this behaviour."
    if match:
        return title, (
            f"Not described (no judge). {match.precision:.0%} of its sentences carry the "
            f"planted label {match.label!r}, holding {match.recall:.0%} of that label."
        )
    return title, "Not described (no judge)."


def _behaviours(
    fitted: _Fitted, sizes: list[int], examples: dict[int, list[str]],
    truth: GroundTruthMetrics | None, descriptions: dict[int, BehaviourDescription], scores: JudgeScores | None,
) -> list[Behaviour]:
    matches = {match.behaviour: match for match in truth.matches} if truth is not None else {}
    behaviours = []
    for behaviour_id, size in enumerate(sizes):
        match = matches.get(behaviour_id)
        title, description = _title_and_description(behaviour_id, size, descriptions.get(behaviour_id), match)
        consistency = scores.consistency.per_behaviour.get(behaviour_id) if scores else None
        behaviours.append(
            Behaviour(
                id=behaviour_id,
                title=title,
                description=description,
                size=size,
                examples=examples.get(behaviour_id, []),
                direction=fitted.directions[behaviour_id].detach().clone(),
                matched_label=str(match.label) if match else None,
                label_precision=match.precision if match else None,
                label_recall=match.recall if match else None,
                consistency_f1=consistency.f1 if consistency else None,
                completeness=scores.completeness.per_behaviour.get(behaviour_id) if scores else None,
            )
        )
    return behaviours


def _metrics(
    data: LayerData, fitted: _Fitted, sizes: list[int], n_nonempty: int, silhouette: float, judged: bool,
    truth: GroundTruthMetrics | None, scores: JudgeScores | None,
) -> TaxonomyMetrics:
    geometric = geometric_metrics(data.vectors, fitted.reconstruction, fitted.assignments, fitted.directions)
    if judged:
        criterion = SELECTION_JUDGE
        selection_score = scores.final if scores is not None else -math.inf
    else:
        criterion, selection_score = SELECTION_GEOMETRIC, silhouette
    report = fitted.clusterer.report if isinstance(fitted.clusterer, SAEClusterer) else None
    return TaxonomyMetrics(
        fvu=geometric.fvu,
        mean_direction_dissimilarity=geometric.mean_direction_dissimilarity,
        silhouette=silhouette,
        n_nonempty=n_nonempty,
        largest_fraction=geometric.sizes.largest_fraction,
        size_entropy=geometric.sizes.normalised_entropy,
        sizes=sizes,
        selection_criterion=criterion,
        selection_score=selection_score,
        ari=truth.ari if truth else None,
        nmi=truth.nmi if truth else None,
        consistency_f1=scores.consistency.mean_f1 if scores else None,
        completeness=scores.completeness.score if scores else None,
        orthogonality=scores.independence.orthogonality if scores else None,
        judge_final=scores.final if scores else None,
        judge_unparsable=(
            scores.consistency.n_unparsable + scores.completeness.n_unparsable
            + scores.independence.n_unparsable
            if scores else None
        ),
        train_epochs=report.epochs_run if report else None,
        train_seconds=report.seconds if report else None,
    )


def _judge_name(judge: Judge | None) -> str | None:
    if judge is None:
        return None
    model = getattr(judge, "model", None)
    return type(judge).__name__ + (f"({model})" if isinstance(model, str) else "")


def _provenance(data: LayerData, method: ClusteringMethod, n_latents: int, k: int, seed: int,
                judge: Judge | None) -> Provenance:
    return Provenance(
        activations_dir=str(data.activations_dir.resolve()),
        model=data.manifest.model,
        layer=data.layer,
        site=str(data.manifest.config.get("site", "resid_post")),
        include_previous_token=bool(data.manifest.config.get("include_previous_token", True)),
        method=method,
        n_latents=n_latents,
        k=k if method == "sae" else None,
        seed=seed,
        normalised=data.normalised,
        normalisation=(
            "centred with the run's centring mean, then L2-normalised"
            if data.normalised else "centred with the run's centring mean"
        ),
        n_sentences=len(data.sentences),
        judge=_judge_name(judge),
    )


def build_from_layer(
    data: LayerData,
    *,
    method: ClusteringMethod,
    n_latents: int,
    k: int,
    seed: int,
    judge: Judge | None,
    judge_settings: JudgeSettings,
    sae_options: dict[str, Any],
    trained_sae: TopKSAE | None = None,
) -> Taxonomy:
    """One taxonomy of an already loaded layer: fit, then measure (see the module docstring).

    ``trained_sae``: label with this SAE instead of training one (method "sae" with its own
    n_latents and k, on vectors prepared as it reads them: same centring mean and normalisation).
    """
    fitted = _fit(data, method, n_latents, k, seed, sae_options, trained_sae)
    n_nonempty = len(set(fitted.assignments.tolist()))
    silhouette = cosine_silhouette(data.vectors, fitted.assignments, seed=seed) if n_nonempty >= 2 else -math.inf
    examples = _examples(data, fitted, judge_settings, seed)
    truth = ground_truth_metrics(data.labels, fitted.assignments.tolist()) if data.labels is not None else None
    descriptions: dict[int, BehaviourDescription] = {}
    scores: JudgeScores | None = None
    if judge is not None and n_nonempty >= 2:
        descriptions, scores = _ask_judge(judge, data, fitted.assignments, examples, judge_settings, seed)
    sizes = torch.bincount(fitted.assignments, minlength=n_latents).tolist()
    return Taxonomy(
        provenance=_provenance(data, method, n_latents, k, seed, judge),
        behaviours=_behaviours(fitted, sizes, examples, truth, descriptions, scores),
        assignments=fitted.assignments,
        metrics=_metrics(data, fitted, sizes, n_nonempty, silhouette, judge is not None, truth, scores),
        sae=fitted.clusterer.sae if isinstance(fitted.clusterer, SAEClusterer) else None,
    )


def build_taxonomy(
    activations_dir: str | Path,
    layer: int,
    *,
    method: ClusteringMethod = "sae",
    n_latents: int,
    k: int = 3,
    seed: int = 0,
    judge: Judge | None = None,
    normalise: bool = True,
    judge_settings: JudgeSettings | None = None,
    sae_options: dict[str, Any] | None = None,
) -> Taxonomy:
    """Train ``method`` with ``n_latents`` behaviours on one layer of an activation run and
    measure it (see the module docstring). ``sae_options`` go to :class:`mechsteer.taxonomy.sae.SAEConfig`
    (e.g. ``max_epochs``, ``lr``, ``init``)."""
    data = load_layer(activations_dir, layer, normalise)
    return build_from_layer(
        data, method=method, n_latents=n_latents, k=k, seed=seed, judge=judge,
        judge_settings=judge_settings or JudgeSettings(), sae_options=sae_options or {},
    )


__all__ = ["JudgeSettings", "LayerData", "build_from_layer", "build_taxonomy", "load_layer"]
