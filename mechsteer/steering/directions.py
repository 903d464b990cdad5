"""Stage: behaviour steering directions in the BASE model, and the ``DirectionSet`` artefact.

Every direction lives at one hook site, ``blocks.{L}.hook_resid_post`` (the output of block
L), for derivation, training and injection alike. (The paper's reference code trains its
optimised vectors with a pre-hook on block L, i.e. ``resid_pre`` of L, but injects them at
block L's output; we use ``resid_post`` of L for both.)

Three methods, plus a bias direction:

- ``mean`` (difference of means). The base model is run over the THINKING model's traces and
  each kept sentence is pooled at layer L (as :mod:`mechsteer.activations` does: the mean of
  ``resid_post`` over the sentence's tokens, including the one before it, by default). The
  direction of behaviour b is the mean over the sentences labelled b minus the mean over all
  kept sentences (labelled or not). The bias is the mean over the thinking traces' sentences
  minus the mean over the base model's own traces' sentences, both in the base model.

  What text is fed: each trace's prompt + reasoning. Traces whose prompt template is the
  base model's framing are used verbatim (the organisms: both models share the prompt
  ``mechsteer.organisms.grammar.PROMPT_TEMPLATE``). Traces written under another template
  (e.g. a thinking model's chat template) are re-framed with :func:`reframe_trace`: the
  base prompt (``base_paper``) for the same question, followed by the trace's reasoning
  verbatim; the chat template and the ``</think>`` answer part are not fed.

- ``sae`` (SAE-decoded). The behaviour's SAE decoder row, mapped into the base model's space.
  The SAE is trained on the thinking model's sentence vectors. Mapping: ``identity`` when
  the two models share d_model and a residual basis (a thinking model post-trained from the
  base keeps the base's initialisation, so the bases agree to first order; the organisms
  are such a pair), otherwise a least-squares linear map fitted on paired activations (the
  same sentences of the same text through both models, pooled alike; see
  :func:`fit_linear_map`). Scale: decoder rows are unit vectors in the SAE's prepared space
  (centred, usually L2-normalised), which has no natural magnitude in the residual stream,
  so each mapped row is normalised and rescaled to the mean norm of the base model's
  *centred* pooled sentence activations at L (:func:`mean_centred_norm`). Steering
  coefficients are then in units of "one typical sentence deviation". The bias of an SAE
  set is the difference-of-means bias when base traces are given, else None.

- ``optimised`` (as in the paper). Model weights frozen (``requires_grad`` off, and checked
  to have no ``.grad`` afterwards); one vector is trained with Adam (lr 1e-2), a cosine
  schedule and early stopping on a held-out slice. First the bias, on the teacher-forced
  cross-entropy of whole thinking traces (reasoning tokens) under the base framing; then
  each behaviour vector, with the trained bias added too (fixed), on the cross-entropy of
  that behaviour's sentences given the base prompt plus the trace before the sentence. The
  vector starts random at norm 1 and is added at the *target positions*: the positions whose
  next-token predictions are scored (the token before the target span through its
  second-to-last token), or at every position with ``positions="all"``.

On disk a set is ``directions.safetensors`` (``directions`` and, if any, ``bias``) plus
``directions.json`` (model name, d_model, n_layers, layer, site, method, behaviour ids,
titles, norms, provenance).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from transformer_lens.model_bridge import TransformerBridge

from mechsteer.activations import SentenceRecord, pool_batch, trace_sentences
from mechsteer.core.models import resid_hook_name
from mechsteer.core.tensor_types import Float, Int, Tensor, typechecked
from mechsteer.data.traces import TraceRecord

DIRECTIONS_TENSORS = "directions.safetensors"
DIRECTIONS_JSON = "directions.json"
DIRECTIONS_FORMAT = "mechsteer.direction_set"
DIRECTIONS_FORMAT_VERSION = 1
METHODS: tuple[str, ...] = ("mean", "sae", "optimised", "random")
SITE = "resid_post"
POOLINGS: tuple[str, ...] = ("sentence", "boundary")
NO_LABEL = -1  # a sentence no behaviour claims (e.g. an organism's "other" sentence)


# --------------------------------------------------------------------------------------------
# The artefact


@dataclass
class DirectionSet:
    """One steering direction per behaviour (and an optional bias) at ``resid_post`` of ``layer``."""

    model_name: str
    d_model: int
    n_layers: int
    layer: int
    site: str
    method: str
    behaviour_ids: list[int]
    titles: list[str]
    directions: Float[Tensor, "n_behaviours d_model"]
    bias: Float[Tensor, " d_model"] | None = None
    provenance: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.behaviour_ids = [int(b) for b in self.behaviour_ids]
        self.titles = [str(t) for t in self.titles]
        n = len(self.behaviour_ids)
        if self.site != SITE:
            raise ValueError(f"site must be {SITE!r} (the one site used for training and injection); got {self.site!r}")
        for part in self.method.split("+"):
            if part not in METHODS:
                raise ValueError(f"method must be one of {METHODS} (or a '+'-joined sum); got {self.method!r}")
        if not 0 <= self.layer < self.n_layers:
            raise ValueError(f"layer must be in [0, {self.n_layers - 1}]; got {self.layer}")
        if len(set(self.behaviour_ids)) != n:
            raise ValueError(f"behaviour_ids must be unique; got {self.behaviour_ids}")
        if len(self.titles) != n:
            raise ValueError(f"need one title per behaviour ({n}); got {len(self.titles)}")
        if not isinstance(self.directions, Tensor) or tuple(self.directions.shape) != (n, self.d_model):
            shape = tuple(self.directions.shape) if isinstance(self.directions, Tensor) else type(self.directions)
            raise ValueError(f"directions must have shape (n_behaviours, d_model) = ({n}, {self.d_model}); got {shape}")
        self.directions = self.directions.detach().float().cpu()
        if self.bias is not None:
            if tuple(self.bias.shape) != (self.d_model,):
                raise ValueError(f"bias must have shape (d_model,) = ({self.d_model},); got {tuple(self.bias.shape)}")
            self.bias = self.bias.detach().float().cpu()
        if not bool(torch.isfinite(self.directions).all()) or (
            self.bias is not None and not bool(torch.isfinite(self.bias).all())
        ):
            raise ValueError("directions and bias must be finite (no nan or inf)")

    # ---- lookup

    @property
    def n_behaviours(self) -> int:
        return len(self.behaviour_ids)

    @property
    def hook_name(self) -> str:
        return resid_hook_name(self.layer, self.site)

    @property
    def norms(self) -> Float[Tensor, " n_behaviours"]:
        return self.directions.norm(dim=-1)

    def index_of(self, behaviour_id: int) -> int:
        try:
            return self.behaviour_ids.index(int(behaviour_id))
        except ValueError:
            raise ValueError(
                f"unknown behaviour id {behaviour_id!r}; this set has {self.behaviour_ids} "
                f"({', '.join(f'{b}={t!r}' for b, t in zip(self.behaviour_ids, self.titles, strict=True))})"
            ) from None

    def direction(self, behaviour_id: int) -> Float[Tensor, " d_model"]:
        return self.directions[self.index_of(behaviour_id)]

    def title(self, behaviour_id: int) -> str:
        return self.titles[self.index_of(behaviour_id)]

    def check_model(self, model: TransformerBridge, *, allow_other_name: bool = False) -> None:
        """Raise ValueError unless this set fits ``model`` (d_model, layer range, model name).

        ``allow_other_name`` accepts a model of another name with the same shape, e.g. a
        thinking model that shares the base model's residual basis.
        """
        cfg = model.cfg
        if cfg.d_model != self.d_model:
            raise ValueError(
                f"direction set has d_model={self.d_model} (model {self.model_name!r}) but "
                f"{cfg.model_name!r} has d_model={cfg.d_model}"
            )
        if not 0 <= self.layer < cfg.n_layers:
            raise ValueError(
                f"direction set is at layer {self.layer}, outside [0, {cfg.n_layers - 1}] of {cfg.model_name!r}"
            )
        if not allow_other_name and cfg.model_name != self.model_name:
            raise ValueError(
                f"direction set was made for {self.model_name!r}, not {cfg.model_name!r}; "
                "pass allow_other_name=True to apply it anyway"
            )

    # ---- arithmetic (each returns a new set with provenance updated)

    def _derived(self, directions: Tensor, bias: Tensor | None, operation: dict[str, Any],
                 method: str | None = None) -> DirectionSet:
        provenance = dict(self.provenance)
        provenance["history"] = [*self.provenance.get("history", []), operation]
        return dataclasses.replace(
            self, directions=directions.clone(), bias=None if bias is None else bias.clone(),
            method=method or self.method, provenance=provenance,
            behaviour_ids=list(self.behaviour_ids), titles=list(self.titles),
        )

    def scaled(self, coeff: float) -> DirectionSet:
        """Directions and bias times ``coeff``."""
        bias = None if self.bias is None else self.bias * coeff
        return self._derived(self.directions * coeff, bias, {"op": "scaled", "coeff": float(coeff)})

    def added(self, other: DirectionSet) -> DirectionSet:
        """Behaviour-wise sum with ``other`` (same behaviours, layer, site, d_model); a missing bias counts as 0."""
        for name in ("d_model", "layer", "site", "behaviour_ids"):
            if getattr(self, name) != getattr(other, name):
                raise ValueError(f"cannot add direction sets with different {name}: "
                                 f"{getattr(self, name)!r} != {getattr(other, name)!r}")
        if self.bias is None and other.bias is None:
            bias = None
        else:
            zero = torch.zeros(self.d_model)
            bias = (self.bias if self.bias is not None else zero) + (other.bias if other.bias is not None else zero)
        method = self.method if self.method == other.method else f"{self.method}+{other.method}"
        return self._derived(self.directions + other.directions, bias,
                             {"op": "added", "other_method": other.method, "other_provenance": other.provenance},
                             method=method)

    def normalised(self) -> DirectionSet:
        """Every direction (and the bias, if nonzero) scaled to unit norm."""
        if bool((self.norms == 0).any()):
            zero = [b for b, n in zip(self.behaviour_ids, self.norms.tolist(), strict=True) if n == 0]
            raise ValueError(f"cannot normalise zero directions (behaviours {zero})")
        bias = self.bias
        if bias is not None and float(bias.norm()) > 0:
            bias = bias / bias.norm()
        return self._derived(self.directions / self.norms[:, None], bias, {"op": "normalised"})

    def subset(self, behaviour_ids: Sequence[int]) -> DirectionSet:
        """Only ``behaviour_ids``, in that order (the bias is kept)."""
        rows = [self.index_of(b) for b in behaviour_ids]
        if not rows or len(set(rows)) != len(rows):
            raise ValueError(f"subset needs distinct behaviour ids, at least one; got {list(behaviour_ids)}")
        chosen = dataclasses.replace(self, behaviour_ids=[self.behaviour_ids[r] for r in rows],
                                     titles=[self.titles[r] for r in rows], directions=self.directions[rows])
        return chosen._derived(chosen.directions, chosen.bias, {"op": "subset", "behaviour_ids": chosen.behaviour_ids})

    def random_like(self, seed: int) -> DirectionSet:
        """Norm-matched random controls: one Gaussian direction per behaviour, same norms; bias too."""
        generator = torch.Generator().manual_seed(seed)
        raw = torch.randn(self.n_behaviours, self.d_model, generator=generator)
        directions = raw / raw.norm(dim=-1, keepdim=True) * self.norms[:, None]
        bias = None
        if self.bias is not None:
            raw_bias = torch.randn(self.d_model, generator=generator)
            bias = raw_bias / raw_bias.norm() * self.bias.norm()
        return self._derived(directions, bias, {"op": "random_like", "seed": int(seed), "source_method": self.method},
                             method="random")

    # ---- files

    def save(self, directory: str | Path) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {"directions": self.directions.contiguous()}
        if self.bias is not None:
            tensors["bias"] = self.bias.contiguous()
        save_file(tensors, str(directory / DIRECTIONS_TENSORS))
        metadata = {
            "format": DIRECTIONS_FORMAT, "version": DIRECTIONS_FORMAT_VERSION,
            "model_name": self.model_name, "d_model": self.d_model, "n_layers": self.n_layers,
            "layer": self.layer, "site": self.site, "hook_name": self.hook_name, "method": self.method,
            "behaviour_ids": self.behaviour_ids, "titles": self.titles,
            "norms": self.norms.tolist(), "bias_norm": None if self.bias is None else float(self.bias.norm()),
            "provenance": self.provenance,
        }
        (directory / DIRECTIONS_JSON).write_text(json.dumps(metadata, indent=2) + "\n")
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> DirectionSet:
        directory = Path(directory)
        json_path, tensor_path = directory / DIRECTIONS_JSON, directory / DIRECTIONS_TENSORS
        for path in (json_path, tensor_path):
            if not path.is_file():
                raise ValueError(f"{path} not found: {directory} is not a saved DirectionSet")
        metadata = json.loads(json_path.read_text())
        if metadata.get("format") != DIRECTIONS_FORMAT or metadata.get("version") != DIRECTIONS_FORMAT_VERSION:
            raise ValueError(f"{json_path} is not a {DIRECTIONS_FORMAT} v{DIRECTIONS_FORMAT_VERSION} file")
        tensors = load_file(str(tensor_path))
        return cls(
            model_name=metadata["model_name"], d_model=metadata["d_model"], n_layers=metadata["n_layers"],
            layer=metadata["layer"], site=metadata["site"], method=metadata["method"],
            behaviour_ids=metadata["behaviour_ids"], titles=metadata["titles"],
            directions=tensors["directions"], bias=tensors.get("bias"), provenance=metadata["provenance"],
        )


# --------------------------------------------------------------------------------------------
# Text fed to the base model, and sentence labels


def reframe_trace(record: TraceRecord, prompt: str) -> TraceRecord:
    """The trace under another prompt: ``prompt + reasoning`` (see the module docstring)."""
    return dataclasses.replace(
        record, prompt=prompt, text=prompt + record.reasoning, generation=record.reasoning,
        answer_part="", reasoning_char_start=len(prompt), reasoning_char_end=len(prompt) + len(record.reasoning),
        token_ids=[], n_prompt_tokens=0,
        settings={**record.settings, "reframed_from": record.settings.get("template")},
    )


def base_template_for(benchmark: str) -> str:
    """The base model's prompt template: the organisms' shared prompt, else the paper's."""
    return "organism" if benchmark == "organism" else "base_paper"


def frame_for_base(traces: Sequence[TraceRecord], questions: Mapping[str, str] | None = None,
                   tokenizer: Any = None) -> list[TraceRecord]:
    """Traces as the base model sees them: verbatim if already under the base framing, else re-framed.

    Re-framing needs each problem's question (``questions[problem_id]``).
    """
    from mechsteer.data.prompts import render_prompt

    framed = []
    for record in traces:
        template = base_template_for(record.benchmark)
        if record.settings.get("template") == template:
            framed.append(record)
            continue
        if questions is None or record.problem_id not in questions:
            raise ValueError(
                f"trace {record.problem_id!r} was written under template {record.settings.get('template')!r}, "
                f"not the base framing {template!r}; pass its question to re-frame it"
            )
        framed.append(reframe_trace(record, render_prompt(template, questions[record.problem_id], tokenizer)))
    return framed


# Gives a pooled sentence its behaviour id, or None when no behaviour claims it.
SentenceLabeller = Callable[[SentenceRecord], int | None]


def ground_truth_labeller(titles: Sequence[str]) -> SentenceLabeller:
    """Labels sentences pooled with a ground-truth labeller (``SentenceRecord.label``): id = index in ``titles``."""
    index = {title: position for position, title in enumerate(titles)}

    def label(sentence: SentenceRecord) -> int | None:
        if sentence.label is None:
            raise ValueError("sentence has no ground-truth label: pool the traces with a labeller "
                             "(e.g. mechsteer.activations.organism_labeller)")
        return index.get(sentence.label)

    return label


def aligned_labeller(sentences: Sequence[SentenceRecord], labels: Sequence[int]) -> SentenceLabeller:
    """Labels from another run's sentences (e.g. a taxonomy's assignments), matched by trace and char span."""
    if len(sentences) != len(labels):
        raise ValueError(f"need one label per sentence; got {len(labels)} labels for {len(sentences)} sentences")
    table = {(s.trace_index, s.char_start, s.char_end): int(label) for s, label in zip(sentences, labels, strict=True)}

    def label(sentence: SentenceRecord) -> int | None:
        return table.get((sentence.trace_index, sentence.char_start, sentence.char_end))

    return label


# --------------------------------------------------------------------------------------------
# Pooling


@dataclass
class PooledSentences:
    vectors: Float[Tensor, "n d_model"]
    sentences: list[SentenceRecord]
    layer: int
    pooling: str


def pool_sentences(
    model: TransformerBridge,
    traces: Sequence[TraceRecord],
    layer: int,
    *,
    site: str = SITE,
    pooling: str = "sentence",
    labeller: Callable[[str], dict[tuple[int, int], str]] | None = None,
    min_words: int = 3,
    batch_size: int = 8,
) -> PooledSentences:
    """Each kept sentence of ``traces`` pooled at ``layer`` of ``model``.

    ``pooling="sentence"``: mean over the sentence's tokens and the one before it (the
    activations stage's default); ``"boundary"``: the token before the sentence only, where
    the model decides how the sentence starts.
    """
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}; got {pooling!r}")
    if not 0 <= layer < model.cfg.n_layers:
        raise ValueError(f"layer must be in [0, {model.cfg.n_layers - 1}]; got {layer}")
    vectors: list[Tensor] = []
    sentences: list[SentenceRecord] = []
    for batch_start in range(0, len(traces), batch_size):
        batch_ids, spans = [], []
        for row, record in enumerate(traces[batch_start : batch_start + batch_size]):
            ids, records = trace_sentences(record, batch_start + row, model.tokenizer,
                                           min_words=min_words, labeller=labeller)
            batch_ids.append(ids)
            for sentence in records:
                start = max(sentence.tok_start - 1, 0)
                end = sentence.tok_end if pooling == "sentence" else max(sentence.tok_start, 1)
                spans.append((row, start, end))
                sentences.append(sentence)
        if spans:
            vectors.append(pool_batch(model, batch_ids, spans, [layer], site)[layer])
    if not sentences:
        raise ValueError("the traces have no kept sentences to pool")
    return PooledSentences(torch.cat(vectors), sentences, layer, pooling)


def sentence_labels(sentences: Sequence[SentenceRecord], labeller: SentenceLabeller) -> Int[Tensor, " n"]:
    """Behaviour id per sentence, ``NO_LABEL`` (-1) where none."""
    labels = [labeller(sentence) for sentence in sentences]
    return torch.tensor([NO_LABEL if label is None else int(label) for label in labels], dtype=torch.long)


# --------------------------------------------------------------------------------------------
# Difference of means


@typechecked
def difference_of_means(
    vectors: Float[Tensor, "n d_model"], labels: Int[Tensor, " n"], behaviour_ids: Sequence[int]
) -> Float[Tensor, "n_behaviours d_model"]:
    """Mean of the vectors labelled b minus the mean of all vectors, for each b in ``behaviour_ids``."""
    overall = vectors.double().mean(dim=0)
    rows = []
    for behaviour in behaviour_ids:
        chosen = labels == int(behaviour)
        if not bool(chosen.any()):
            raise ValueError(f"behaviour {behaviour} has no labelled sentences; cannot take its mean")
        rows.append(vectors[chosen].double().mean(dim=0) - overall)
    return torch.stack(rows).float()


@typechecked
def mean_bias(
    thinking_vectors: Float[Tensor, "n_thinking d_model"], base_vectors: Float[Tensor, "n_base d_model"]
) -> Float[Tensor, " d_model"]:
    """Mean over the thinking traces' sentences minus the mean over the base traces' sentences."""
    return (thinking_vectors.double().mean(dim=0) - base_vectors.double().mean(dim=0)).float()


@typechecked
def mean_centred_norm(vectors: Float[Tensor, "n d_model"]) -> float:
    """Mean L2 norm of the vectors after subtracting their mean (the scale of SAE directions)."""
    centred = vectors.double() - vectors.double().mean(dim=0)
    return float(centred.norm(dim=-1).mean())


def _present_behaviours(labels: Tensor, behaviour_ids: Sequence[int], titles: Sequence[str], skip_empty: bool
                        ) -> tuple[list[int], list[str], list[int]]:
    """The behaviours with labelled sentences (all of them, unless ``skip_empty``), and those left out."""
    present = set(labels.tolist())
    skipped = [int(b) for b in behaviour_ids if int(b) not in present]
    if not skip_empty:
        return list(behaviour_ids), list(titles), []
    kept = [(int(b), t) for b, t in zip(behaviour_ids, titles, strict=True) if int(b) in present]
    if not kept:
        raise ValueError("no behaviour has labelled sentences")
    return [b for b, _ in kept], [t for _, t in kept], skipped


def _provenance(model: TransformerBridge, method: str, **extra: Any) -> dict[str, Any]:
    return {"method": method, "model": model.cfg.model_name, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "site": SITE, **extra}


def build_mean_directions(
    base_model: TransformerBridge,
    thinking_traces: Sequence[TraceRecord],
    labeller: SentenceLabeller,
    behaviour_ids: Sequence[int],
    titles: Sequence[str],
    layer: int,
    *,
    base_traces: Sequence[TraceRecord] | None = None,
    pooling: str = "sentence",
    text_labeller: Callable[[str], dict[tuple[int, int], str]] | None = None,
    batch_size: int = 8,
    skip_empty: bool = False,
) -> DirectionSet:
    """Difference-of-means directions in the base model (see the module docstring).

    ``thinking_traces`` and ``base_traces`` must already be under the base framing
    (:func:`frame_for_base`). ``text_labeller`` attaches ground-truth labels while pooling
    (for :func:`ground_truth_labeller`). Without ``base_traces`` the bias is None. A
    behaviour without labelled sentences raises, unless ``skip_empty`` leaves it out (it is
    then listed in ``provenance["skipped_behaviours"]``).
    """
    pooled = pool_sentences(base_model, thinking_traces, layer, pooling=pooling, labeller=text_labeller,
                            batch_size=batch_size)
    labels = sentence_labels(pooled.sentences, labeller)
    behaviour_ids, titles, skipped = _present_behaviours(labels, behaviour_ids, titles, skip_empty)
    directions = difference_of_means(pooled.vectors, labels, behaviour_ids)
    bias = None
    n_base = 0
    if base_traces:
        base_pooled = pool_sentences(base_model, base_traces, layer, pooling=pooling, batch_size=batch_size)
        bias = mean_bias(pooled.vectors, base_pooled.vectors)
        n_base = len(base_pooled.sentences)
    counts = {int(b): int((labels == int(b)).sum()) for b in behaviour_ids}
    return DirectionSet(
        model_name=base_model.cfg.model_name, d_model=base_model.cfg.d_model, n_layers=base_model.cfg.n_layers,
        layer=layer, site=SITE, method="mean", behaviour_ids=list(behaviour_ids), titles=list(titles),
        directions=directions, bias=bias,
        provenance=_provenance(base_model, "mean", pooling=pooling, n_thinking_traces=len(thinking_traces),
                               n_sentences=len(pooled.sentences), sentences_per_behaviour=counts,
                               n_base_sentences=n_base, mean_centred_norm=mean_centred_norm(pooled.vectors),
                               skipped_behaviours=skipped,
                               bias="mean(thinking traces) - mean(base traces)" if bias is not None else None),
    )


# --------------------------------------------------------------------------------------------
# SAE-decoded


@typechecked
def fit_linear_map(
    source: Float[Tensor, "n d_source"], target: Float[Tensor, "n d_target"], ridge: float = 0.0
) -> Float[Tensor, "d_source d_target"]:
    """Least-squares ``W`` with ``target - mean ≈ (source - mean) @ W`` (ridge-regularised if ridge > 0).

    A direction ``u`` in the source space maps to ``u @ W`` in the target space.
    """
    if source.shape[0] < 2:
        raise ValueError("need at least two paired vectors to fit a linear map")
    x = source.double() - source.double().mean(dim=0)
    y = target.double() - target.double().mean(dim=0)
    gram = x.T @ x + ridge * torch.eye(x.shape[1], dtype=torch.float64)
    return torch.linalg.lstsq(gram, x.T @ y).solution.float()


def paired_sentence_activations(
    source_model: TransformerBridge, target_model: TransformerBridge, traces: Sequence[TraceRecord], layer: int,
    *, target_layer: int | None = None, pooling: str = "sentence", batch_size: int = 8,
) -> tuple[Float[Tensor, "n d_source"], Float[Tensor, "n d_target"]]:
    """The same sentences of the same text pooled in both models (matched by trace and char span)."""
    source = pool_sentences(source_model, traces, layer, pooling=pooling, batch_size=batch_size)
    target = pool_sentences(target_model, traces, layer if target_layer is None else target_layer,
                            pooling=pooling, batch_size=batch_size)
    key = lambda s: (s.trace_index, s.char_start, s.char_end)  # noqa: E731
    target_rows = {key(s): row for row, s in enumerate(target.sentences)}
    source_rows, matched = [], []
    for row, sentence in enumerate(source.sentences):
        if key(sentence) in target_rows:
            source_rows.append(row)
            matched.append(target_rows[key(sentence)])
    if len(source_rows) < 2:
        raise ValueError("fewer than two sentences pooled in both models; cannot pair activations")
    return source.vectors[source_rows], target.vectors[matched]


@typechecked
def sae_steering_directions(
    decoder_rows: Float[Tensor, "n_behaviours d_sae"],
    scale: float,
    linear_map: Float[Tensor, "d_sae d_model"] | None = None,
) -> Float[Tensor, "n_behaviours d_model"]:
    """Decoder rows mapped into the base model (identity if ``linear_map`` is None), unit-normed, times ``scale``."""
    mapped = decoder_rows if linear_map is None else decoder_rows @ linear_map
    norms = mapped.norm(dim=-1, keepdim=True)
    if bool((norms == 0).any()):
        raise ValueError("a decoder row maps to the zero vector; the linear map is degenerate")
    return mapped / norms * scale


def build_sae_directions(
    base_model: TransformerBridge,
    thinking_model: TransformerBridge,
    sae: Any,
    behaviour_ids: Sequence[int],
    titles: Sequence[str],
    layer: int,
    thinking_traces: Sequence[TraceRecord],
    *,
    sae_layer: int | None = None,
    mapping: str = "auto",
    base_traces: Sequence[TraceRecord] | None = None,
    pooling: str = "sentence",
    batch_size: int = 8,
) -> DirectionSet:
    """SAE decoder directions (rows ``behaviour_ids`` = latent indices) in the base model.

    ``mapping``: ``"identity"`` (needs equal d_model), ``"linear"`` (least squares on paired
    activations of ``thinking_traces``), or ``"auto"`` (identity when d_model matches).
    """
    if mapping not in ("auto", "identity", "linear"):
        raise ValueError(f"mapping must be auto, identity or linear; got {mapping!r}")
    same_width = base_model.cfg.d_model == thinking_model.cfg.d_model
    if mapping == "auto":
        mapping = "identity" if same_width else "linear"
    if mapping == "identity" and not same_width:
        raise ValueError(f"identity mapping needs equal d_model; base has {base_model.cfg.d_model}, "
                         f"thinking has {thinking_model.cfg.d_model}")
    decoder = sae.decoder_directions
    n_latents = decoder.shape[0]
    bad = [b for b in behaviour_ids if not 0 <= int(b) < n_latents]
    if bad:
        raise ValueError(f"behaviour ids {bad} are not latents of this SAE (0..{n_latents - 1})")
    rows = decoder[[int(b) for b in behaviour_ids]].float()
    base_pooled = pool_sentences(base_model, thinking_traces, layer, pooling=pooling, batch_size=batch_size)
    scale = mean_centred_norm(base_pooled.vectors)
    linear_map = None
    fit_info: dict[str, Any] = {}
    if mapping == "linear":
        source, target = paired_sentence_activations(
            thinking_model, base_model, thinking_traces, layer if sae_layer is None else sae_layer,
            target_layer=layer, pooling=pooling, batch_size=batch_size)
        linear_map = fit_linear_map(source, target, ridge=1e-3 * float(source.var(dim=0).sum()))
        fit_info = {"n_pairs": int(source.shape[0])}
    directions = sae_steering_directions(rows, scale, linear_map)
    bias = None
    if base_traces:
        bias = mean_bias(base_pooled.vectors,
                         pool_sentences(base_model, base_traces, layer, pooling=pooling, batch_size=batch_size).vectors)
    return DirectionSet(
        model_name=base_model.cfg.model_name, d_model=base_model.cfg.d_model, n_layers=base_model.cfg.n_layers,
        layer=layer, site=SITE, method="sae", behaviour_ids=list(behaviour_ids), titles=list(titles),
        directions=directions, bias=bias,
        provenance=_provenance(base_model, "sae", sae_model=thinking_model.cfg.model_name, mapping=mapping,
                               scale=scale, scale_rule="unit mapped decoder row x mean norm of the base "
                               "model's centred pooled sentence activations at the layer",
                               pooling=pooling, **fit_info,
                               bias="mean(thinking traces) - mean(base traces)" if bias is not None else None),
    )


# --------------------------------------------------------------------------------------------
# Optimised


@dataclass(frozen=True)
class OptimisationConfig:
    """Vector training settings; defaults follow the paper (method notes, section 5)."""

    lr: float = 1e-2
    steps: int = 50
    batch_size: int = 2
    val_fraction: float = 0.2
    max_val_examples: int = 64
    eval_every: int = 5
    patience: int = 3
    init_norm: float = 1.0
    max_examples: int = 2048
    positions: str = "targets"  # "targets" (positions predicting target tokens) or "all"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.positions not in ("targets", "all"):
            raise ValueError(f"positions must be 'targets' or 'all'; got {self.positions!r}")
        if self.steps < 1 or self.batch_size < 1 or self.eval_every < 1 or self.patience < 1:
            raise ValueError("steps, batch_size, eval_every and patience must be >= 1")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1); got {self.val_fraction}")


@dataclass(frozen=True)
class SteeringExample:
    """Token ids and the half-open span ``[target_start, target_end)`` of tokens to predict."""

    token_ids: tuple[int, ...]
    target_start: int
    target_end: int

    def __post_init__(self) -> None:
        if not 1 <= self.target_start < self.target_end <= len(self.token_ids):
            raise ValueError(f"target span [{self.target_start}, {self.target_end}) must lie in "
                             f"[1, {len(self.token_ids)}] and be non-empty")


@dataclass
class OptimisationReport:
    n_train: int
    n_val: int
    initial_val_loss: float
    best_val_loss: float
    best_step: int
    steps_run: int
    stopped_early: bool
    train_losses: list[float] = field(default_factory=list)
    val_losses: list[tuple[int, float]] = field(default_factory=list)
    final_norm: float = 0.0
    seconds: float = 0.0


def reasoning_example(record: TraceRecord, tokenizer: Any) -> SteeringExample:
    """The whole trace, with its reasoning tokens as targets (the bias vector's objective)."""
    encoded = tokenizer(record.text, return_offsets_mapping=True, add_special_tokens=True)
    offsets = encoded["offset_mapping"]
    inside = [i for i, (start, end) in enumerate(offsets)
              if end > start and start >= record.reasoning_char_start and end <= record.reasoning_char_end]
    if not inside:
        raise ValueError(f"trace {record.problem_id!r} has no reasoning tokens")
    return SteeringExample(tuple(encoded["input_ids"]), max(inside[0], 1), inside[-1] + 1)


def sentence_examples(
    traces: Sequence[TraceRecord], tokenizer: Any, labeller: SentenceLabeller, behaviour_id: int, *,
    text_labeller: Callable[[str], dict[tuple[int, int], str]] | None = None, min_words: int = 3,
) -> list[SteeringExample]:
    """One example per sentence labelled ``behaviour_id``: the text up to its end, the sentence as target."""
    examples = []
    for index, record in enumerate(traces):
        ids, sentences = trace_sentences(record, index, tokenizer, min_words=min_words, labeller=text_labeller)
        for sentence in sentences:
            if labeller(sentence) == behaviour_id and sentence.tok_start >= 1:
                examples.append(SteeringExample(tuple(ids[: sentence.tok_end]), sentence.tok_start, sentence.tok_end))
    return examples


def _batch_tensors(examples: Sequence[SteeringExample], pad_id: int, positions: str
                   ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Right-padded tokens, next-token targets, loss mask and steering mask (causal: pads never matter)."""
    longest = max(len(e.token_ids) for e in examples)
    tokens = torch.full((len(examples), longest), pad_id, dtype=torch.long)
    loss_mask = torch.zeros((len(examples), longest), dtype=torch.bool)
    steer_mask = torch.zeros((len(examples), longest), dtype=torch.bool)
    for row, example in enumerate(examples):
        tokens[row, : len(example.token_ids)] = torch.tensor(example.token_ids)
        # position p predicts token p + 1
        loss_mask[row, example.target_start - 1 : example.target_end - 1] = True
        if positions == "all":
            steer_mask[row, : len(example.token_ids)] = True
        else:
            steer_mask[row, example.target_start - 1 : example.target_end - 1] = True
    targets = torch.roll(tokens, -1, dims=1)
    return tokens, targets, loss_mask, steer_mask


def _steered_loss(model: TransformerBridge, hook_name: str, vector: Tensor, fixed: Tensor | None,
                  examples: Sequence[SteeringExample], pad_id: int, positions: str) -> Tensor:
    device = vector.device
    tokens, targets, loss_mask, steer_mask = (t.to(device) for t in _batch_tensors(examples, pad_id, positions))
    total = vector if fixed is None else vector + fixed

    def hook(resid: Tensor, hook: object) -> Tensor:
        return resid + steer_mask[..., None].to(resid.dtype) * total.to(resid.dtype)

    with model.hooks(fwd_hooks=[(hook_name, hook)]):
        logits = model(tokens)
    losses = torch.nn.functional.cross_entropy(logits.float().transpose(1, 2), targets, reduction="none")
    return losses[loss_mask].mean()


def optimise_vector(
    model: TransformerBridge,
    examples: Sequence[SteeringExample],
    layer: int,
    config: OptimisationConfig = OptimisationConfig(),
    *,
    fixed: Float[Tensor, " d_model"] | None = None,
) -> tuple[Float[Tensor, " d_model"], OptimisationReport]:
    """Train one vector added at ``resid_post`` of ``layer`` to minimise the examples' target loss.

    ``fixed`` (e.g. the bias) is added alongside but not trained. Model weights are frozen
    for the call (their ``requires_grad`` flags are restored afterwards) and must end with
    no ``.grad``. Returns the best vector on the held-out slice, and a report.
    """
    if not 0 <= layer < model.cfg.n_layers:
        raise ValueError(f"layer must be in [0, {model.cfg.n_layers - 1}]; got {layer}")
    if len(examples) < 2:
        raise ValueError(f"need at least 2 examples (train and held-out); got {len(examples)}")
    started = time.perf_counter()
    generator = torch.Generator().manual_seed(config.seed)
    order = torch.randperm(len(examples), generator=generator).tolist()[: config.max_examples]
    n_val = min(max(1, round(len(order) * config.val_fraction)), config.max_val_examples, len(order) - 1)
    val = [examples[i] for i in order[:n_val]]
    train = [examples[i] for i in order[n_val:]]
    device = next(model.parameters()).device
    hook_name = resid_hook_name(layer, SITE)
    pad_id = model.tokenizer.pad_token_id or 0
    d_model = model.cfg.d_model
    init = torch.randn(d_model, generator=generator)
    vector = (init / init.norm() * config.init_norm).to(device).requires_grad_(True)
    fixed_vector = None if fixed is None else fixed.detach().to(device).float()
    optimizer = torch.optim.Adam([vector], lr=config.lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.steps)

    def validation_loss() -> float:
        with torch.no_grad():
            total = 0.0
            for start in range(0, len(val), config.batch_size):
                chunk = val[start : start + config.batch_size]
                total += float(_steered_loss(model, hook_name, vector, fixed_vector, chunk, pad_id, config.positions)) * len(chunk)
            return total / len(val)

    frozen_flags = [(parameter, parameter.requires_grad) for parameter in model.parameters()]
    for parameter, _ in frozen_flags:
        parameter.requires_grad_(False)
    try:
        initial = validation_loss()
        best_loss, best_vector, best_step = initial, vector.detach().clone(), 0
        report = OptimisationReport(len(train), len(val), initial, initial, 0, 0, False, val_losses=[(0, initial)])
        evals_without_gain = 0
        for step in range(1, config.steps + 1):
            picks = torch.randint(len(train), (config.batch_size,), generator=generator).tolist()
            loss = _steered_loss(model, hook_name, vector, fixed_vector, [train[i] for i in picks], pad_id,
                                 config.positions)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            report.train_losses.append(float(loss.detach()))
            report.steps_run = step
            if step % config.eval_every == 0 or step == config.steps:
                current = validation_loss()
                report.val_losses.append((step, current))
                if current < best_loss:
                    best_loss, best_vector, best_step = current, vector.detach().clone(), step
                    evals_without_gain = 0
                else:
                    evals_without_gain += 1
                    if evals_without_gain >= config.patience:
                        report.stopped_early = True
                        break
    finally:
        for parameter, flag in frozen_flags:
            parameter.requires_grad_(flag)
    with_grad = [name for name, parameter in model.named_parameters() if parameter.grad is not None]
    if with_grad:
        raise RuntimeError(f"model parameters received gradients while optimising a vector: {with_grad[:5]}")
    report.best_val_loss, report.best_step = best_loss, best_step
    report.final_norm = float(best_vector.norm())
    report.seconds = time.perf_counter() - started
    return best_vector.cpu(), report


def build_optimised_directions(
    base_model: TransformerBridge,
    thinking_traces: Sequence[TraceRecord],
    labeller: SentenceLabeller,
    behaviour_ids: Sequence[int],
    titles: Sequence[str],
    layer: int,
    config: OptimisationConfig = OptimisationConfig(),
    *,
    text_labeller: Callable[[str], dict[tuple[int, int], str]] | None = None,
    min_words: int = 3,
    skip_empty: bool = False,
) -> DirectionSet:
    """The bias on whole traces, then each behaviour's vector with the bias added (see the module docstring).

    ``skip_empty`` leaves out behaviours with fewer than 2 labelled sentences (listed in
    ``provenance["skipped_behaviours"]``) instead of raising.
    """
    tokenizer = base_model.tokenizer
    if skip_empty:
        counts = {int(b): len(sentence_examples(thinking_traces, tokenizer, labeller, int(b),
                                                text_labeller=text_labeller, min_words=min_words))
                  for b in behaviour_ids}
        kept = [(int(b), t) for b, t in zip(behaviour_ids, titles, strict=True) if counts[int(b)] >= 2]
        skipped = [b for b in counts if counts[b] < 2]
        behaviour_ids, titles = [b for b, _ in kept], [t for _, t in kept]
    else:
        skipped = []
    bias, bias_report = optimise_vector(base_model, [reasoning_example(r, tokenizer) for r in thinking_traces],
                                        layer, config)
    vectors, reports = [], {}
    for behaviour in behaviour_ids:
        examples = sentence_examples(thinking_traces, tokenizer, labeller, int(behaviour),
                                     text_labeller=text_labeller, min_words=min_words)
        if len(examples) < 2:
            raise ValueError(f"behaviour {behaviour} has {len(examples)} labelled sentences; need at least 2")
        vector, report = optimise_vector(base_model, examples, layer, config, fixed=bias)
        vectors.append(vector)
        reports[str(int(behaviour))] = dataclasses.asdict(report)
    return DirectionSet(
        model_name=base_model.cfg.model_name, d_model=base_model.cfg.d_model, n_layers=base_model.cfg.n_layers,
        layer=layer, site=SITE, method="optimised", behaviour_ids=list(behaviour_ids), titles=list(titles),
        directions=torch.stack(vectors), bias=bias,
        provenance=_provenance(base_model, "optimised", config=dataclasses.asdict(config),
                               bias_report=dataclasses.asdict(bias_report), behaviour_reports=reports,
                               n_thinking_traces=len(thinking_traces), skipped_behaviours=skipped,
                               hook_note="trained and injected at resid_post of the layer"),
    )


def default_layer(n_layers: int) -> int:
    """The paper's choice, about 37.5% of the depth (10 of 28, 12 of 32)."""
    return max(0, min(n_layers - 1, math.floor(0.375 * n_layers)))


# --------------------------------------------------------------------------------------------
# CLI


@dataclass
class BehaviourLabels:
    """Where sentence labels come from: the taxonomy's assignments, or an organism's ground truth."""

    labeller: SentenceLabeller
    behaviour_ids: list[int]
    titles: list[str]
    text_labeller: Callable[[str], dict[tuple[int, int], str]] | None = None
    taxonomy: Any = None  # mechsteer.taxonomy.build.Taxonomy when labels come from one
    source: str = ""


def ground_truth_labels() -> BehaviourLabels:
    """The organisms' planted behaviours; ids are indices into ``grammar.BEHAVIOURS``."""
    from mechsteer.activations import organism_labeller
    from mechsteer.organisms.grammar import BEHAVIOURS

    return BehaviourLabels(ground_truth_labeller(BEHAVIOURS), list(range(len(BEHAVIOURS))), list(BEHAVIOURS),
                           organism_labeller, None, "organism ground truth (mechsteer.organisms.grammar)")


def taxonomy_labels(taxonomy_dir: str | Path, n_traces: int | None = None) -> BehaviourLabels:
    """Labels from a taxonomy: its sentence assignments, matched to sentences by trace index and span.

    The traces must be the ones (same file, same order) the taxonomy's activations came from.
    """
    from mechsteer.activations import Manifest, read_sentences
    from mechsteer.taxonomy.build import Taxonomy

    taxonomy = Taxonomy.load(taxonomy_dir)
    activations_dir = taxonomy.provenance.activations_dir
    if n_traces is not None and Manifest.load(activations_dir).n_traces != n_traces:
        raise ValueError(f"the taxonomy's activations ({activations_dir}) cover "
                         f"{Manifest.load(activations_dir).n_traces} traces, but {n_traces} traces were given; "
                         "pass the traces the taxonomy was built from")
    sentences = read_sentences(activations_dir)
    labeller = aligned_labeller(sentences, taxonomy.assignments.tolist())
    return BehaviourLabels(labeller, taxonomy.behaviour_ids, [b.title for b in taxonomy.behaviours], None, taxonomy,
                           f"taxonomy {taxonomy_dir}")


def labels_from_args(args: argparse.Namespace, n_traces: int) -> BehaviourLabels:
    if args.taxonomy and args.ground_truth:
        raise SystemExit("pass either --taxonomy or --ground-truth, not both")
    if args.taxonomy:
        return taxonomy_labels(args.taxonomy, n_traces)
    if args.ground_truth:
        return ground_truth_labels()
    raise SystemExit("sentence labels needed: pass --taxonomy DIR (SAE labels) or --ground-truth (organisms)")


def load_framed_traces(traces_dir: str | Path, tokenizer: Any, split: str) -> list[TraceRecord]:
    """Traces from a folder, framed for the base model (questions from the benchmark when re-framing)."""
    from mechsteer.data.benchmarks import load_benchmark
    from mechsteer.data.traces import load_traces

    traces = load_traces(traces_dir)
    if not traces:
        raise SystemExit(f"no traces in {traces_dir}")
    benchmark = traces[0].benchmark
    questions = None
    if any(t.settings.get("template") != base_template_for(t.benchmark) for t in traces):
        questions = {p.id: p.question for p in load_benchmark(benchmark, split)}
    return frame_for_base(traces, questions, tokenizer)


def add_pair_and_label_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pair", required=True, help="BASE,THINKING model specs, e.g. organism-base,organism-thinking")
    parser.add_argument("--traces", required=True, help="folder with the thinking model's traces.jsonl")
    parser.add_argument("--taxonomy", default=None, help="taxonomy folder: SAE labels of the traces' sentences")
    parser.add_argument("--ground-truth", action="store_true",
                        help="label sentences with the organism grammar instead of a taxonomy")
    parser.add_argument("--split", default="test", help="benchmark split of the traces (to re-frame prompts)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")


def split_pair(pair: str) -> tuple[str, str]:
    parts = pair.split(",")
    if len(parts) != 2 or not all(parts):
        raise SystemExit(f"--pair must be BASE,THINKING; got {pair!r}")
    return parts[0], parts[1]


def run_directions_cli(args: argparse.Namespace) -> int:
    from mechsteer.core.models import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    base_spec, thinking_spec = split_pair(args.pair)
    base = load_model(base_spec, device=args.device)
    layer = default_layer(base.cfg.n_layers) if args.layer is None else args.layer
    thinking_traces = load_framed_traces(args.traces, base.tokenizer, args.split)
    base_traces = load_framed_traces(args.base_traces, base.tokenizer, args.split) if args.base_traces else None
    labels = labels_from_args(args, len(thinking_traces))
    if args.method == "mean":
        result = build_mean_directions(base, thinking_traces, labels.labeller, labels.behaviour_ids, labels.titles,
                                       layer, base_traces=base_traces, pooling=args.pooling,
                                       text_labeller=labels.text_labeller, skip_empty=True)
    elif args.method == "sae":
        if labels.taxonomy is None:
            raise SystemExit("--method sae needs --taxonomy (its SAE supplies the decoder directions)")
        thinking = load_model(thinking_spec, device=args.device)
        result = build_sae_directions(base, thinking, labels.taxonomy.load_sae(), labels.behaviour_ids,
                                      labels.titles, layer, thinking_traces, sae_layer=labels.taxonomy.provenance.layer,
                                      mapping=args.mapping, base_traces=base_traces, pooling=args.pooling)
    else:
        config = OptimisationConfig(steps=args.steps, max_examples=args.max_examples, seed=args.seed)
        result = build_optimised_directions(base, thinking_traces, labels.labeller, labels.behaviour_ids,
                                            labels.titles, layer, config, text_labeller=labels.text_labeller,
                                            skip_empty=True)
    result.provenance.update({"labels": labels.source, "traces": str(args.traces),
                              "base_traces": str(args.base_traces) if args.base_traces else None,
                              "pair": [base_spec, thinking_spec]})
    result.save(args.out)
    print(json.dumps({"out": str(args.out), "method": result.method, "layer": layer,
                      "norms": dict(zip(result.titles, result.norms.tolist(), strict=True)),
                      "bias_norm": None if result.bias is None else float(result.bias.norm()),
                      "skipped_behaviours": result.provenance.get("skipped_behaviours", [])}))
    return 0


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("directions", help="behaviour steering directions in the base model")
    add_pair_and_label_args(parser)
    parser.add_argument("--method", choices=("mean", "sae", "optimised"), default="mean")
    parser.add_argument("--layer", type=int, default=None, help="default: about 37.5%% of the depth")
    parser.add_argument("--out", required=True)
    parser.add_argument("--base-traces", default=None,
                        help="the base model's own traces (for the bias of mean/sae sets)")
    parser.add_argument("--pooling", choices=POOLINGS, default="sentence")
    parser.add_argument("--mapping", choices=("auto", "identity", "linear"), default="auto",
                        help="SAE directions: thinking -> base space")
    parser.add_argument("--steps", type=int, default=50, help="optimised: steps per vector")
    parser.add_argument("--max-examples", type=int, default=2048, help="optimised: examples per vector")
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(func=run_directions_cli)
