"""Stage 3: a taxonomy of reasoning behaviours from sentence activations.

A :class:`Taxonomy` is the artefact later stages read: the behaviours (one per SAE latent or
cluster: id, title, description, example sentences, decoder direction), every sentence's
behaviour, the metrics, and where it came from. On disk (one folder)::

    taxonomy.json          provenance, behaviours (without directions), metrics
    taxonomy.safetensors   "directions" (n_behaviours, d_model), "assignments" (n_sentences,)
    sae/                   the TopKSAE with its centring mean (method "sae" only)

:func:`build_taxonomy` trains one clusterer (:func:`mechsteer.taxonomy.clustering.make_clusterer`) on
a layer's centred (and by default L2-normalised) sentence vectors and measures it:

- geometric: reconstruction FVU, mean 1 - |cos| between directions, cluster sizes, and the
  cosine silhouette of the assignments (:func:`cosine_silhouette`);
- ground truth, where ``sentences.jsonl`` carries labels (organisms): ARI, NMI and the
  behaviour-to-label matching with per-behaviour precision and recall;
- with a judge: titles and descriptions written by the judge from each behaviour's examples,
  and the paper's consistency F1, completeness and orthogonality, whose mean is the final score.

Without a judge a behaviour is titled ``"behaviour 3"``, or ``"behaviour 3 (compute)"`` with
the planted label most of its sentences carry where labels exist.

Directions: the SAE's unit-norm decoder rows (for k-means the centres, for the GMM the
normalised means). They live in the residual stream of the model the activations came from
(same basis and width, ``d_model``): centring is a translation and the L2 normalisation a
per-sentence rescaling, so neither changes what a direction means there.

Selection (:func:`sweep_taxonomies`) picks the layer, the number of behaviours and, if asked
to sweep it, the normalisation by :data:`SELECTION_DOC`: the judge's final score when a judge
is given, else the cosine silhouette. ARI/NMI are reported and never used to select: they
need ground truth.

Normalisation matters when one behaviour dominates: the centring mean then sits near that
behaviour, so its sentences have small centred norms and, once L2-normalised, directions
set by their content (the digits of an organism's compute steps), and the SAE splits it. On
the thinking organism (compute = 61% of sentences) normalised vectors gave ARI 0.5-0.6,
unnormalised ones 0.99 at the silhouette's pick; sweep ``normalise=(True, False)``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from mechsteer.activations import Manifest, SentenceRecord, load_sentence_vectors, read_sentences
from mechsteer.activations import centring_mean as read_centring_mean
from mechsteer.taxonomy.clustering import CLUSTERING_METHODS, SAEClusterer, make_clusterer
from mechsteer.taxonomy.judge.clients import Judge, OracleJudge
from mechsteer.taxonomy.judge.metrics import describe_behaviours, example_sentences, judge_score
from mechsteer.taxonomy.sae import TopKSAE
from mechsteer.taxonomy.metrics import geometric_metrics, ground_truth_metrics
from mechsteer.core.tensor_types import Float, Int, Tensor, typechecked

TAXONOMY_JSON = "taxonomy.json"
TAXONOMY_TENSORS = "taxonomy.safetensors"
SAE_DIR = "sae"
METRICS_CSV = "metrics.csv"
METRICS_PLOT = "metrics_vs_k.png"
SENTENCE_MAP_PLOT = "sentence_map.png"
TAXONOMY_FORMAT = "mechsteer.taxonomy"
TAXONOMY_FORMAT_VERSION = 1

SELECTION_JUDGE = "judge_final"
SELECTION_GEOMETRIC = "silhouette"
SELECTION_DOC = (
    "With a judge: the paper's final score, the mean of consistency F1, completeness and "
    "orthogonality. Without one: the mean cosine silhouette of the sentence assignments "
    "(cosine distance, on a seeded sample of at most 2000 sentences; singletons score 0). "
    "The silhouette rewards behaviours that are tight and apart, so it falls both when one "
    "behaviour merges two groups and when a group is split between two behaviours, unlike "
    "the FVU, which keeps improving as behaviours are added. The sweep may also try the "
    "vectors with and without L2 normalisation: normalising does not change cosines, so "
    "the silhouette measures both in the same geometry. Ties go to fewer behaviours, then "
    "the lower layer, then normalised vectors. A taxonomy with fewer than two non-empty "
    "behaviours scores -inf. "
    "ARI and NMI need ground truth and are never used."
)
SILHOUETTE_MAX_POINTS = 2000

# What the oracle judge says each organism behaviour is (from mechsteer.organisms.grammar).
ORGANISM_LABEL_DESCRIPTIONS: dict[str, str] = {
    "plan": "Restates the question as the arithmetic expression to evaluate, before any step.",
    "compute": "Carries out one arithmetic step (or the whole expression) and writes its result.",
    "verify": "Checks a step by undoing it and comparing with the number it started from.",
    "correct": "Repairs a step whose check failed, giving the right result instead of the wrong one.",
    "answer": "States the final answer.",
    "other": "Text that follows none of the trace grammar's behaviours.",
}


# --- the artefact ----------------------------------------------------------------------


@dataclass
class Behaviour:
    """One behaviour: a latent of the SAE (or a cluster). ``id`` is the latent index."""

    id: int
    title: str
    description: str
    size: int  # sentences assigned to it
    examples: list[str]  # top-activating sentences, then random others from the cluster
    direction: Tensor = field(repr=False, compare=False)  # (d_model,), unit norm, residual basis
    matched_label: str | None = None  # the planted label most of its sentences carry
    label_precision: float | None = None
    label_recall: float | None = None
    consistency_f1: float | None = None  # judge metrics of this behaviour
    completeness: float | None = None

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        del data["direction"]
        return data


@dataclass(frozen=True)
class Provenance:
    activations_dir: str
    model: str
    layer: int
    site: str
    include_previous_token: bool
    method: str
    n_latents: int
    k: int | None  # top-k of the SAE; None for the clustering baselines
    seed: int
    normalised: bool  # L2-normalised after centring
    normalisation: str
    n_sentences: int
    judge: str | None  # the judge's class (and model), never its endpoint or key


@dataclass
class TaxonomyMetrics:
    """Flat, so that one taxonomy is one row of the sweep table. None = not measured."""

    fvu: float
    mean_direction_dissimilarity: float
    silhouette: float
    n_nonempty: int
    largest_fraction: float
    size_entropy: float  # normalised: 1 = all behaviours equally large
    sizes: list[int]
    selection_criterion: str
    selection_score: float
    ari: float | None = None
    nmi: float | None = None
    consistency_f1: float | None = None
    completeness: float | None = None
    orthogonality: float | None = None
    judge_final: float | None = None
    judge_unparsable: int | None = None
    train_epochs: int | None = None
    train_seconds: float | None = None


@dataclass
class Taxonomy:
    provenance: Provenance
    behaviours: list[Behaviour]
    # (n_sentences,) int64: the behaviour id of each sentence, in sentences.jsonl order
    assignments: Tensor = field(repr=False, compare=False)
    metrics: TaxonomyMetrics
    sae: TopKSAE | None = field(default=None, repr=False, compare=False)

    @property
    def behaviour_ids(self) -> list[int]:
        return [behaviour.id for behaviour in self.behaviours]

    @property
    def directions(self) -> Float[Tensor, "n_behaviours d_model"]:
        return torch.stack([behaviour.direction for behaviour in self.behaviours])

    def behaviour(self, behaviour_id: int) -> Behaviour:
        for behaviour in self.behaviours:
            if behaviour.id == behaviour_id:
                return behaviour
        raise ValueError(f"no behaviour with id {behaviour_id}; ids are {self.behaviour_ids}")

    def sentence_vectors(self) -> Float[Tensor, "n_sentences d_model"]:
        """The sentence vectors this taxonomy was built on (its layer, centred, and normalised
        or not as it was), read again from its activation run."""
        return load_sentence_vectors(
            self.provenance.activations_dir, self.provenance.layer, normalise=self.provenance.normalised
        )

    def load_sae(self) -> TopKSAE:
        """The SAE (with its centring mean) whose argmax latent is the behaviour id."""
        if self.sae is None:
            raise ValueError(
                f"this taxonomy was built with method {self.provenance.method!r}, which has no SAE; "
                "rebuild it with method='sae' to classify token activations"
            )
        return self.sae

    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file(
            {
                "directions": self.directions.detach().float().contiguous(),
                "assignments": self.assignments.detach().to(torch.int64).contiguous(),
            },
            str(directory / TAXONOMY_TENSORS),
        )
        if self.sae is not None:
            self.sae.save(directory / SAE_DIR)
        document = {
            "format": TAXONOMY_FORMAT,
            "version": TAXONOMY_FORMAT_VERSION,
            "selection": SELECTION_DOC,
            "provenance": asdict(self.provenance),
            "metrics": asdict(self.metrics),
            "behaviours": [behaviour.to_json() for behaviour in self.behaviours],
        }
        (directory / TAXONOMY_JSON).write_text(json.dumps(document, indent=2) + "\n")
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> Taxonomy:
        directory = Path(directory)
        json_path, tensors_path = directory / TAXONOMY_JSON, directory / TAXONOMY_TENSORS
        for path in (json_path, tensors_path):
            if not path.is_file():
                raise ValueError(f"{path} not found: not a saved taxonomy folder")
        document = json.loads(json_path.read_text())
        if document.get("format") != TAXONOMY_FORMAT or document.get("version") != TAXONOMY_FORMAT_VERSION:
            raise ValueError(
                f"{json_path} is not a {TAXONOMY_FORMAT} v{TAXONOMY_FORMAT_VERSION} file: "
                f"format={document.get('format')!r}, version={document.get('version')!r}"
            )
        tensors = load_file(str(tensors_path))
        directions = tensors["directions"]
        if directions.shape[0] != len(document["behaviours"]):
            raise ValueError(
                f"{tensors_path} has {directions.shape[0]} directions for "
                f"{len(document['behaviours'])} behaviours"
            )
        behaviours = [
            Behaviour(**data, direction=directions[row].clone())
            for row, data in enumerate(document["behaviours"])
        ]
        provenance = Provenance(**document["provenance"])
        sae = None
        if provenance.method == "sae":
            if not (directory / SAE_DIR).is_dir():
                raise ValueError(f"{directory / SAE_DIR} missing: an SAE taxonomy keeps its SAE there")
            sae = TopKSAE.load(directory / SAE_DIR)
        return cls(
            provenance=provenance,
            behaviours=behaviours,
            assignments=tensors["assignments"],
            metrics=TaxonomyMetrics(**document["metrics"]),
            sae=sae,
        )


# --- metrics that need the assignments ---------------------------------------------------


@typechecked
def cosine_silhouette(
    vectors: Float[Tensor, "n d"],
    labels: Int[Tensor, " n"],
    *,
    max_points: int = SILHOUETTE_MAX_POINTS,
    seed: int = 0,
) -> float:
    """Mean silhouette with cosine distance (1 - cos), as scikit-learn defines it.

    s(i) = (b - a) / max(a, b), a = mean distance to the rest of i's cluster, b = the lowest
    mean distance to another cluster; s = 0 for a sentence alone in its cluster. Computed on a
    seeded random sample of ``max_points`` sentences when there are more.
    """
    if vectors.shape[0] > max_points:
        sample = torch.randperm(vectors.shape[0], generator=torch.Generator().manual_seed(seed))[:max_points]
        vectors, labels = vectors[sample], labels[sample]
    clusters, codes = torch.unique(labels, return_inverse=True)
    if len(clusters) < 2:
        raise ValueError(f"the silhouette needs at least 2 non-empty clusters, got {len(clusters)}")
    unit = F.normalize(vectors.double(), dim=-1)
    distance = (1.0 - unit @ unit.T).clamp_min(0.0)
    one_hot = F.one_hot(codes, len(clusters)).double()
    sums = distance @ one_hot  # (n, n_clusters): summed distance to each cluster
    counts = one_hot.sum(dim=0)
    own_count = counts[codes]
    own = (sums.gather(1, codes[:, None]).squeeze(1) / (own_count - 1).clamp_min(1))
    mean_to = sums / counts
    mean_to.scatter_(1, codes[:, None], math.inf)
    nearest = mean_to.min(dim=1).values
    score = (nearest - own) / torch.maximum(own, nearest).clamp_min(1e-12)
    score = torch.where(own_count > 1, score, torch.zeros_like(score))
    return score.mean().item()


def _assignment_strength(clusterer: Any, vectors: Tensor, labels: Tensor) -> Tensor:
    """How strongly each sentence expresses its behaviour, to rank the examples: the SAE's
    pre-activation of the assigned latent; for the baselines the cosine with its direction."""
    with torch.no_grad():
        if isinstance(clusterer, SAEClusterer):
            scores = clusterer.sae.encode_pre(vectors)
        else:
            scores = F.normalize(vectors, dim=-1) @ clusterer.directions.to(vectors).T
    return scores.gather(1, labels[:, None]).squeeze(1)


def _judge_name(judge: Judge | None) -> str | None:
    if judge is None:
        return None
    model = getattr(judge, "model", None)
    return type(judge).__name__ + (f"({model})" if isinstance(model, str) else "")


def sentence_labels(sentences: Sequence[SentenceRecord]) -> list[str] | None:
    """The ground-truth labels, or None when the sentences carry none; mixed is an error."""
    labels = [sentence.label for sentence in sentences]
    n_missing = sum(label is None for label in labels)
    if n_missing == len(labels):
        return None
    if n_missing:
        raise ValueError(f"{n_missing} of {len(labels)} sentences have no ground-truth label; expected all or none")
    return labels


def oracle_judge_from_activations(activations_dir: str | Path) -> OracleJudge:
    """An :class:`OracleJudge` from the ground-truth labels in ``sentences.jsonl``.

    Organism labels are described by :data:`ORGANISM_LABEL_DESCRIPTIONS`; any other label
    ``L`` by "Sentences whose ground-truth label is 'L'.".
    """
    sentences = read_sentences(activations_dir)
    labels = sentence_labels(sentences)
    if labels is None:
        raise ValueError(
            f"--judge oracle needs ground-truth labels, but the sentences in {activations_dir} have "
            "none (they were extracted without a labeller, e.g. from a non-organism model); "
            "use --judge none, http or local:<model>"
        )
    by_text: dict[str, str] = {}
    for sentence, label in zip(sentences, labels, strict=True):
        previous = by_text.setdefault(sentence.text, label)
        if previous != label:
            raise ValueError(
                f"sentence {sentence.text[:80]!r} carries two labels ({previous!r}, {label!r}); "
                "the oracle judge needs one label per sentence text"
            )
    descriptions = {
        label: ORGANISM_LABEL_DESCRIPTIONS.get(label, f"Sentences whose ground-truth label is {label!r}.")
        for label in sorted(set(labels))
    }
    return OracleJudge(by_text, descriptions)


# --- building ----------------------------------------------------------------------------


@dataclass(frozen=True)
class JudgeSettings:
    """How much the judge is asked (the paper's sizes by default)."""

    n_top_examples: int = 100
    n_random_examples: int = 100
    n_repeats: int = 5
    n_in: int = 100
    n_out: int = 100
    n_per_behaviour: int = 100
    concurrency: int | None = None


@dataclass
class _LayerData:
    """What every sweep point of one layer shares."""

    activations_dir: Path
    layer: int
    manifest: Manifest
    sentences: list[SentenceRecord]
    labels: list[str] | None
    vectors: Tensor
    centring_mean: Tensor
    normalised: bool


def _load_layer(activations_dir: str | Path, layer: int, normalise: bool) -> _LayerData:
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
    return _LayerData(
        activations_dir=activations_dir,
        layer=layer,
        manifest=manifest,
        sentences=sentences,
        labels=sentence_labels(sentences),
        vectors=vectors,
        centring_mean=read_centring_mean(activations_dir, layer),
        normalised=normalise,
    )


def _build(
    data: _LayerData,
    *,
    method: str,
    n_latents: int,
    k: int,
    seed: int,
    judge: Judge | None,
    judge_settings: JudgeSettings,
    sae_options: dict[str, Any],
) -> Taxonomy:
    if method not in CLUSTERING_METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {CLUSTERING_METHODS}")
    if data.vectors.shape[0] < n_latents:
        raise ValueError(f"{data.vectors.shape[0]} sentences are too few for n_latents={n_latents}")
    if method == "sae":
        clusterer = make_clusterer(
            "sae", n_latents, centring_mean=data.centring_mean, normalised=data.normalised,
            k=k, seed=seed, **sae_options,
        )
    else:
        clusterer = make_clusterer(method, n_latents, seed=seed)
    clusterer.fit(data.vectors)
    with torch.no_grad():
        assignments = clusterer.classify(data.vectors).to(torch.int64)
        reconstruction = clusterer.reconstruct(data.vectors).float()
    directions = clusterer.directions.float()
    geometric = geometric_metrics(data.vectors, reconstruction, assignments, directions)
    nonempty = sorted(set(assignments.tolist()))
    silhouette = cosine_silhouette(data.vectors, assignments, seed=seed) if len(nonempty) >= 2 else -math.inf

    texts = [sentence.text for sentence in data.sentences]
    strength = _assignment_strength(clusterer, data.vectors, assignments)
    examples = example_sentences(
        texts, assignments.tolist(), strength.tolist(),
        n_top=judge_settings.n_top_examples, n_random=judge_settings.n_random_examples, seed=seed,
    )

    matches = {}
    truth = None
    if data.labels is not None:
        truth = ground_truth_metrics(data.labels, assignments.tolist())
        matches = {int(match.behaviour): match for match in truth.matches}

    descriptions, scores = {}, None
    if judge is not None and len(nonempty) >= 2:
        descriptions = describe_behaviours(
            judge, examples, n_repeats=judge_settings.n_repeats, seed=seed,
            concurrency=judge_settings.concurrency,
        )
        scores = judge_score(
            judge, descriptions, texts, assignments.tolist(),
            n_in=judge_settings.n_in, n_out=judge_settings.n_out,
            n_per_behaviour=judge_settings.n_per_behaviour, seed=seed,
            concurrency=judge_settings.concurrency,
        )

    sizes = torch.bincount(assignments, minlength=n_latents).tolist()
    behaviours = []
    for behaviour_id in range(n_latents):
        match = matches.get(behaviour_id)
        if behaviour_id in descriptions:
            title = descriptions[behaviour_id].title
            description = descriptions[behaviour_id].description
        else:
            title = f"behaviour {behaviour_id}" + (f" ({match.label})" if match else "")
            if sizes[behaviour_id] == 0:
                description = "No sentence is assigned to this behaviour."
            elif match:
                description = (
                    f"Not described (no judge). {match.precision:.0%} of its sentences carry the "
                    f"planted label {match.label!r}, holding {match.recall:.0%} of that label."
                )
            else:
                description = "Not described (no judge)."
        consistency = scores.consistency.per_behaviour.get(behaviour_id) if scores else None
        behaviours.append(
            Behaviour(
                id=behaviour_id,
                title=title,
                description=description,
                size=sizes[behaviour_id],
                examples=examples.get(behaviour_id, []),
                direction=directions[behaviour_id].detach().clone(),
                matched_label=str(match.label) if match else None,
                label_precision=match.precision if match else None,
                label_recall=match.recall if match else None,
                consistency_f1=consistency.f1 if consistency else None,
                completeness=scores.completeness.per_behaviour.get(behaviour_id) if scores else None,
            )
        )

    if judge is not None:
        criterion = SELECTION_JUDGE
        selection_score = scores.final if scores is not None else -math.inf
    else:
        criterion, selection_score = SELECTION_GEOMETRIC, silhouette
    report = clusterer.report if isinstance(clusterer, SAEClusterer) else None
    metrics = TaxonomyMetrics(
        fvu=geometric.fvu,
        mean_direction_dissimilarity=geometric.mean_direction_dissimilarity,
        silhouette=silhouette,
        n_nonempty=len(nonempty),
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
    provenance = Provenance(
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
    return Taxonomy(
        provenance=provenance,
        behaviours=behaviours,
        assignments=assignments,
        metrics=metrics,
        sae=clusterer.sae if isinstance(clusterer, SAEClusterer) else None,
    )


def build_taxonomy(
    activations_dir: str | Path,
    layer: int,
    *,
    method: str = "sae",
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
    data = _load_layer(activations_dir, layer, normalise)
    return _build(
        data, method=method, n_latents=n_latents, k=k, seed=seed, judge=judge,
        judge_settings=judge_settings or JudgeSettings(), sae_options=sae_options or {},
    )


SWEEP_COLUMNS = (
    "layer", "n_latents", "normalised", "method", "k", "seed", "selection_criterion",
    "selection_score",
    "fvu", "mean_direction_dissimilarity", "silhouette", "n_nonempty", "largest_fraction",
    "size_entropy", "consistency_f1", "completeness", "orthogonality", "judge_final",
    "judge_unparsable", "ari", "nmi", "train_epochs", "train_seconds", "selected",
)


def _row(taxonomy: Taxonomy) -> dict[str, Any]:
    metrics = asdict(taxonomy.metrics)
    provenance = taxonomy.provenance
    row = {
        "layer": provenance.layer, "n_latents": provenance.n_latents,
        "normalised": provenance.normalised, "method": provenance.method,
        "k": provenance.k, "seed": provenance.seed, "selected": False,
    }
    row.update({column: metrics[column] for column in SWEEP_COLUMNS if column in metrics})
    return row


def sweep_taxonomies(
    activations_dir: str | Path,
    layers: Sequence[int],
    n_latents_grid: Sequence[int],
    *,
    method: str = "sae",
    k: int = 3,
    seed: int = 0,
    judge: Judge | None = None,
    normalise: bool | Sequence[bool] = True,
    judge_settings: JudgeSettings | None = None,
    sae_options: dict[str, Any] | None = None,
    progress: bool = False,
) -> tuple[list[dict[str, Any]], Taxonomy]:
    """Build a taxonomy for every (layer, normalisation, n_latents) and pick one by
    :data:`SELECTION_DOC`. ``normalise`` is one choice or several, e.g. ``(True, False)``.

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
            data = _load_layer(activations_dir, layer, bool(normalised))
            for n_latents in n_latents_grid:
                taxonomy = _build(
                    data, method=method, n_latents=n_latents, k=k, seed=seed, judge=judge,
                    judge_settings=judge_settings or JudgeSettings(), sae_options=sae_options or {},
                )
                rows.append(_row(taxonomy))
                if progress:
                    shown = ("layer", "normalised", "n_latents", "selection_score", "ari")
                    print(json.dumps({key: rows[-1][key] for key in shown}))
                # Higher score first; ties to fewer behaviours, the lower layer, normalised.
                key = (taxonomy.metrics.selection_score, -n_latents, -layer, bool(normalised))
                if best_key is None or key > best_key:
                    best, best_key, best_row = taxonomy, key, len(rows) - 1
    rows[best_row]["selected"] = True
    return rows, best


# --- CLI ---------------------------------------------------------------------------------


def parse_grid(text: str) -> list[int]:
    """``"5:50:5"`` -> 5, 10, ..., 50 (stop included); ``"3,5,8"`` -> those; ``"7"`` -> [7]."""
    try:
        if ":" in text:
            parts = [int(part) for part in text.split(":")]
            if len(parts) not in (2, 3):
                raise ValueError
            start, stop = parts[0], parts[1]
            step = parts[2] if len(parts) == 3 else 1
            if step < 1 or stop < start:
                raise ValueError
            return list(range(start, stop + 1, step))
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(
            f"cannot read {text!r} as a grid: expected start:stop[:step] (stop included, step >= 1) "
            "or comma-separated integers"
        ) from None


def write_metrics_csv(rows: Sequence[dict[str, Any]], path: str | Path) -> Path:
    path = Path(path)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(SWEEP_COLUMNS))
        writer.writeheader()
        for row in rows:
            writer.writerow({column: row.get(column) for column in SWEEP_COLUMNS})
    return path


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
    figure, axes = plt.subplots(lines, columns, figsize=(4 * columns, 3 * lines), squeeze=False)
    for axis, name in zip(axes.flat, names, strict=False):
        for layer, normalised in sorted({(row["layer"], row["normalised"]) for row in rows}):
            points = sorted((row["n_latents"], row[name]) for row in rows
                            if (row["layer"], row["normalised"]) == (layer, normalised)
                            and _finite(row.get(name)))
            if points:
                label = f"layer {layer}" + ("" if normalised else ", not normalised")
                axis.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
        chosen = [row for row in rows if row["selected"] and _finite(row.get(name))]
        for row in chosen:
            axis.scatter([row["n_latents"]], [row[name]], s=120, facecolors="none", edgecolors="black")
        axis.set_title(name + (" (reported, not selected on)" if name in ("ari", "nmi") else ""), fontsize=9)
        axis.set_xlabel("behaviours (n_latents)")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.legend(fontsize=7)
    for axis in list(axes.flat)[len(names):]:
        axis.set_visible(False)
    figure.tight_layout()
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


NORMALISE_CHOICES: dict[str, tuple[bool, ...]] = {"yes": (True,), "no": (False,), "both": (True, False)}
JUDGE_CHOICES_HELP = (
    "none (geometric selection), oracle (ground-truth labels of sentences.jsonl; organisms only), "
    "http, http:<model>, or local:<model spec>"
)


def make_judge(spec: str, activations_dir: str | Path, out_dir: str | Path) -> Judge | None:
    """The judge named on the command line; HTTP answers are cached under ``out_dir``."""
    if spec == "none":
        return None
    if spec == "oracle":
        return oracle_judge_from_activations(activations_dir)
    from mechsteer.taxonomy.judge.clients import judge_from_spec

    return judge_from_spec(spec, cache_dir=Path(out_dir) / "judge_cache")


def sweep_to_folder(
    activations_dir: str | Path,
    layers: Sequence[int],
    n_latents_grid: Sequence[int],
    out_dir: str | Path,
    *,
    judge_spec: str = "none",
    seed: int = 0,
    **sweep_options: Any,
) -> tuple[list[dict[str, Any]], Taxonomy]:
    """:func:`sweep_taxonomies` with the judge named by ``judge_spec``, then write the selected
    taxonomy, ``metrics.csv`` and both plots into ``out_dir``. The CLI and ``mechsteer run``
    both use it."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    judge = make_judge(judge_spec, activations_dir, out)
    rows, best = sweep_taxonomies(activations_dir, layers, n_latents_grid, judge=judge, seed=seed, **sweep_options)
    best.save(out)
    write_metrics_csv(rows, out / METRICS_CSV)
    plot_metrics_vs_k(rows, out / METRICS_PLOT)
    plot_sentence_map(best, best.sentence_vectors(), out / SENTENCE_MAP_PLOT, seed=seed)
    return rows, best


def run_taxonomy_cli(args: argparse.Namespace) -> int:
    activations_dir = Path(args.activations)
    if not (activations_dir / "manifest.json").is_file():
        raise SystemExit(f"{activations_dir} has no manifest.json: not an activation run folder")
    manifest = Manifest.load(activations_dir)
    layers = parse_grid(args.layers) if args.layers else list(manifest.config["layers"])
    grid = parse_grid(args.n_latents)
    out = Path(args.out)
    settings = JudgeSettings(
        n_top_examples=args.n_examples, n_random_examples=args.n_examples,
        n_repeats=args.n_repeats, n_in=args.n_judged, n_out=args.n_judged,
        n_per_behaviour=args.n_judged, concurrency=args.judge_concurrency,
    )
    sae_options = {} if args.max_epochs is None else {"max_epochs": args.max_epochs}
    rows, best = sweep_to_folder(
        activations_dir, layers, grid, out, judge_spec=args.judge, method=args.method, k=args.k,
        seed=args.seed, normalise=NORMALISE_CHOICES[args.normalise], judge_settings=settings,
        sae_options=sae_options, progress=True,
    )
    summary = {
        "out": str(out), "layer": best.provenance.layer, "n_latents": best.provenance.n_latents,
        "normalised": best.provenance.normalised,
        "selection_criterion": best.metrics.selection_criterion,
        "selection_score": best.metrics.selection_score, "ari": best.metrics.ari,
        "nmi": best.metrics.nmi, "behaviours": [b.title for b in best.behaviours],
    }
    print(json.dumps(summary))
    return 0


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "taxonomy", help="sweep SAE/cluster taxonomies over layers and K; keep the best",
        description=SELECTION_DOC,
    )
    parser.add_argument("--activations", required=True, help="an activation run folder")
    parser.add_argument("--layers", default=None,
                        help="layers to sweep, e.g. 2,3 or 1:4 (default: all in the run)")
    parser.add_argument("--n-latents", default="5:50:5",
                        help="behaviour counts, start:stop[:step] with stop included, or a list (default 5:50:5)")
    parser.add_argument("--k", type=int, default=3, help="top-k of the SAE (default 3)")
    parser.add_argument("--method", choices=CLUSTERING_METHODS, default="sae")
    parser.add_argument("--judge", default="none", help=JUDGE_CHOICES_HELP)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--normalise", choices=sorted(NORMALISE_CHOICES), default="yes",
                        help="L2-normalise the centred vectors: yes (default), no, or both (swept)")
    parser.add_argument("--max-epochs", type=int, default=None, help="SAE epochs cap (default 300)")
    parser.add_argument("--n-examples", type=int, default=100,
                        help="top-activating and random examples per behaviour, each (default 100)")
    parser.add_argument("--n-repeats", type=int, default=5, help="judge descriptions per behaviour")
    parser.add_argument("--n-judged", type=int, default=100,
                        help="sentences judged per behaviour for consistency (in and out) and completeness")
    parser.add_argument("--judge-concurrency", type=int, default=None)
    parser.add_argument("--out", required=True)
    parser.set_defaults(func=run_taxonomy_cli)


__all__ = [
    "Behaviour",
    "JudgeSettings",
    "ORGANISM_LABEL_DESCRIPTIONS",
    "Provenance",
    "SELECTION_DOC",
    "Taxonomy",
    "TaxonomyMetrics",
    "build_taxonomy",
    "cosine_silhouette",
    "make_judge",
    "oracle_judge_from_activations",
    "parse_grid",
    "pca_2d",
    "plot_metrics_vs_k",
    "plot_sentence_map",
    "register_cli",
    "sentence_labels",
    "sweep_taxonomies",
    "write_metrics_csv",
]
