"""The taxonomy artefact that later stages read.

A :class:`Taxonomy` holds the behaviours (one per SAE latent or cluster: id, title,
description, example sentences, decoder direction), every sentence's behaviour, the metrics,
and where it came from. On disk (one folder, through :mod:`mechsteer.core.artefacts`)::

    taxonomy.json          provenance, behaviours (without directions), metrics
    taxonomy.safetensors   "directions" (n_behaviours, d_model), "assignments" (n_sentences,)
    sae/                   the TopKSAE with its centring mean (method "sae" only)

Directions: the SAE's unit-norm decoder rows (for k-means the centres, for the GMM the
normalised means). They live in the residual stream of the model the activations came from
(same basis and width, ``d_model``): centring is a translation and the L2 normalisation a
per-sentence rescaling, so neither changes what a direction means there.

:data:`SELECTION_DOC` says how a sweep picks one taxonomy (:mod:`mechsteer.taxonomy.sweep`);
every saved taxonomy carries it, and its metrics name the criterion it was scored by.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from mechsteer.activations import load_sentence_vectors
from mechsteer.core.artefacts import ArtefactFormat, load_artefact, save_artefact
from mechsteer.core.errors import ArtefactError
from mechsteer.core.provenance import mismatch, recorded_location, recorded_path, same_model
from mechsteer.core.resident import ModelInfo
from mechsteer.core.tensor_types import Float, Tensor
from mechsteer.taxonomy.clustering import ClusteringMethod
from mechsteer.taxonomy.sae import TopKSAE

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

TAXONOMY_JSON = "taxonomy.json"
TAXONOMY_TENSORS = "taxonomy.safetensors"
SAE_DIR = "sae"
TAXONOMY_FORMAT = "mechsteer.taxonomy"
TAXONOMY_FORMAT_VERSION = 1
TAXONOMY_ARTEFACT = ArtefactFormat(name=TAXONOMY_FORMAT, version=TAXONOMY_FORMAT_VERSION, json_file=TAXONOMY_JSON,
                                   tensors_file=TAXONOMY_TENSORS, kind="taxonomy")

SelectionCriterion = Literal["judge_final", "silhouette"]
SELECTION_JUDGE: SelectionCriterion = "judge_final"
SELECTION_GEOMETRIC: SelectionCriterion = "silhouette"
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
    # In memory a path usable from here; on disk relative to the taxonomy's folder (see save and load).
    activations_dir: str
    model: str
    layer: int
    site: str
    include_previous_token: bool
    method: ClusteringMethod
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
    selection_criterion: SelectionCriterion
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

    def check_model_name(self, model_name: str, where: str | Path) -> None:
        """Refuse to read this taxonomy for a model of another name than the one it was built on."""
        if not same_model(self.provenance.model, model_name):
            raise mismatch(f"the taxonomy in {where}", "model", self.provenance.model, model_name,
                           "build the taxonomy from this model's activations, or pass the one built from them "
                           "(--allow-other-model uses it anyway)")

    def check_model(self, model: TransformerBridge | ModelInfo, where: str | Path, *, allow_other_model: bool = False) -> None:
        """Refuse to read this taxonomy with a model it was not built on: another name (unless
        ``allow_other_model``), another width, or too few layers for its layer."""
        cfg, provenance = model.cfg, self.provenance
        if not allow_other_model:
            self.check_model_name(cfg.model_name, where)
        width = self.directions.shape[-1] if self.behaviours else cfg.d_model
        if width != cfg.d_model:
            raise mismatch(f"the taxonomy in {where}", "d_model", width, cfg.d_model,
                           f"{cfg.model_name!r} has another width; build the taxonomy from its own activations")
        if not 0 <= provenance.layer < cfg.n_layers:
            raise mismatch(f"the taxonomy in {where}", "layer", provenance.layer, f"a layer below {cfg.n_layers}",
                           f"{cfg.model_name!r} has {cfg.n_layers} layers; build the taxonomy from its own activations")

    def load_sae(self) -> TopKSAE:
        """The SAE (with its centring mean) whose argmax latent is the behaviour id."""
        if self.sae is None:
            raise ValueError(
                f"this taxonomy was built with method {self.provenance.method!r}, which has no SAE; "
                "rebuild it with method='sae' to classify token activations"
            )
        return self.sae

    def save(self, directory: str | Path) -> Path:
        """Write the folder; the SAE first and ``taxonomy.json`` last, so a folder that loads is whole."""
        directory = Path(directory)
        if self.sae is not None:
            self.sae.save(directory / SAE_DIR)
        metadata = {
            "selection": SELECTION_DOC,
            "provenance": {**asdict(self.provenance),
                           "activations_dir": recorded_path(self.provenance.activations_dir, directory)},
            "metrics": asdict(self.metrics),
            "behaviours": [behaviour.to_json() for behaviour in self.behaviours],
        }
        tensors = {
            "directions": self.directions.detach().float(),
            "assignments": self.assignments.detach().to(torch.int64),
        }
        return save_artefact(directory, TAXONOMY_ARTEFACT, metadata, tensors)

    @classmethod
    def load(cls, directory: str | Path) -> Taxonomy:
        directory = Path(directory)
        document, tensors = load_artefact(directory, TAXONOMY_ARTEFACT)
        directions = tensors["directions"]
        if directions.shape[0] != len(document["behaviours"]):
            raise ArtefactError(
                f"{directory / TAXONOMY_TENSORS} has {directions.shape[0]} directions for "
                f"{len(document['behaviours'])} behaviours"
            )
        try:
            behaviours = [
                Behaviour(**data, direction=directions[row].clone())
                for row, data in enumerate(document["behaviours"])
            ]
            provenance = Provenance(**document["provenance"])
            provenance = replace(provenance,
                                 activations_dir=str(recorded_location(provenance.activations_dir, directory)))
            metrics = TaxonomyMetrics(**document["metrics"])
        except (TypeError, KeyError) as error:
            raise ArtefactError(f"{directory / TAXONOMY_JSON} is not a taxonomy document "
                                f"({type(error).__name__}: {error}); rebuild the taxonomy") from None
        sae = None
        if provenance.method == "sae":
            if not (directory / SAE_DIR).is_dir():
                raise ArtefactError(f"{directory / SAE_DIR} missing: an SAE taxonomy keeps its SAE there")
            sae = TopKSAE.load(directory / SAE_DIR)
        return cls(
            provenance=provenance,
            behaviours=behaviours,
            assignments=tensors["assignments"],
            metrics=metrics,
            sae=sae,
        )


__all__ = [
    "Behaviour",
    "Provenance",
    "SAE_DIR",
    "SELECTION_DOC",
    "SELECTION_GEOMETRIC",
    "SELECTION_JUDGE",
    "SelectionCriterion",
    "TAXONOMY_ARTEFACT",
    "Taxonomy",
    "TaxonomyMetrics",
]
