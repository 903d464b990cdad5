"""Stage 2: sentence activations, mean-pooled from the residual stream, sharded on disk.

For each trace, the reasoning is split into sentences (:mod:`mechsteer.data.sentences`); the
full text (prompt + generation) is re-tokenized with an offset mapping, and each sentence's
token span comes from the offsets, never from a string search. The model runs on those
tokens and ``blocks.L.hook_resid_post`` is averaged over each span (:func:`mean_over_spans`).

Pooling default: ``include_previous_token=True``, as the paper's code does. The token before
a sentence is where the model decides how the sentence starts, and it is the position a
timing policy reads during generation, so pooling it in aligns the SAE's training vectors
with what the hybrid classifies. Pass ``False`` to pool the sentence's own tokens only.

On disk (``out_dir``):

- ``shard_00000.safetensors`` ...: raw (uncentred) pooled vectors, one tensor per layer
  (``layer_{L}``, float32, (n_sentences, d_model));
- ``sentences.jsonl``: one line per pooled sentence (trace index, problem id, text, char and
  token spans, ground-truth label where the traces have one), in shard order;
- ``manifest.json``: model, layers, hook site, pooling, normalisation, and for each shard its
  file, first sentence index, sentence count and trace range; ``complete`` once all traces
  are done, with the centring means in ``centring_mean.safetensors``.

Resumable and bitwise reproducible: traces go through the model in fixed batches
(``traces[i:i + batch_size]`` for ``i`` a multiple of ``batch_size``) and shards close only at
batch ends, so a rerun restarts at the first trace of an unwritten shard with exactly the
batches an uninterrupted run would use. Shards and the manifest are written to temporary
files and renamed into place. Memory holds at most one shard of vectors.

Centring: the mean over all pooled sentences of the run (or over ``centre_on`` trace ids,
e.g. the training split) is stored per layer; :func:`load_sentence_vectors` subtracts it and
optionally L2-normalises, as the SAE expects.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from mechsteer.core.errors import ArtefactError, ConfigError, ProvenanceError
from mechsteer.core.models import ResidSite, resid_hook_name
from mechsteer.core.provenance import mismatch, same_model
from mechsteer.core.resident import ModelInfo
from mechsteer.core.store import (
    append_jsonl,
    read_json,
    read_jsonl,
    write_json_atomic,
    write_text_atomic,
)
from mechsteer.core.tensor_types import Float, Tensor, typechecked
from mechsteer.core.vocab import adds_special_tokens
from mechsteer.data.labels import UNLABELLED, TraceLabeller, ground_truth_for
from mechsteer.data.sentences import attach_token_spans, segment_sentences
from mechsteer.data.traces import TraceRecord, traces_digest
from mechsteer.interventions.hooks import mean_over_spans

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

MANIFEST = "manifest.json"
SENTENCES = "sentences.jsonl"
CENTRING = "centring_mean.safetensors"


@dataclass
class SentenceRecord:
    trace_index: int
    problem_id: str
    sentence_index: int  # within the trace's kept sentences
    text: str
    char_start: int  # in the trace's full text
    char_end: int
    tok_start: int  # token span of the sentence itself (before any previous-token pooling)
    tok_end: int
    label: str | None = None
    # Where the trace's reasoning starts in its text (None in sentence files written before it was
    # recorded). A sentence's place in the reasoning is the same in every framing of the trace.
    reasoning_char_start: int | None = None

    def reasoning_span(self) -> tuple[int, int]:
        """The sentence's character span within its trace's reasoning: the same under the thinking
        model's prompt, the base model's, or any other (the reasoning is fed verbatim)."""
        if self.reasoning_char_start is None:
            raise ArtefactError(f"sentence {self.sentence_index} of trace {self.trace_index} ({self.problem_id!r}) "
                                "does not record where its reasoning starts (pooled by an older mechsteer); "
                                "pass the traces it was pooled from, or pool the activations again")
        return self.char_start - self.reasoning_char_start, self.char_end - self.reasoning_char_start


@dataclass
class ActivationConfig:
    layers: list[int]
    site: ResidSite = "resid_post"
    include_previous_token: bool = True
    min_words: int = 3
    batch_size: int = 8
    shard_size: int = 2048  # sentences per shard (a shard closes at the first batch end past it)


@dataclass
class ShardInfo:
    file: str
    first_sentence: int
    n_sentences: int
    first_trace: int
    end_trace: int  # exclusive


@dataclass
class Manifest:
    model: str
    config: dict[str, Any]
    n_traces: int
    d_model: int
    shards: list[ShardInfo] = field(default_factory=list)
    complete: bool = False
    normalisation: str = "centre with centring_mean.safetensors, then optionally L2-normalise"
    throughput: dict[str, float] = field(default_factory=dict)
    benchmark: str | None = None  # of the traces; absent from manifests written before it was recorded
    # mechsteer.data.traces.traces_digest of the pooled traces; None in manifests written before it was recorded
    traces_digest: str | None = None

    @property
    def n_sentences(self) -> int:
        return sum(shard.n_sentences for shard in self.shards)

    @property
    def layers(self) -> list[int]:
        return list(self.config["layers"])

    def save(self, out_dir: Path) -> None:
        write_json_atomic(out_dir / MANIFEST, asdict(self))

    @classmethod
    def load(cls, out_dir: str | Path) -> Manifest:
        path = Path(out_dir) / MANIFEST
        if not path.is_file():
            raise ArtefactError(f"{path} not found: {out_dir} is not an activation run folder "
                                "(mechsteer activations writes one)")
        data = read_json(path, "activation manifest")
        try:
            data["shards"] = [ShardInfo(**shard) for shard in data["shards"]]
            manifest = cls(**data)
            manifest.layers  # noqa: B018 - a manifest without its layers is corrupt
        except (TypeError, KeyError) as error:
            raise ArtefactError(f"{path} is not an activation manifest ({type(error).__name__}: {error}); "
                                "rerun mechsteer activations into a new folder") from None
        return manifest

    def check_model(self, model: TransformerBridge | ModelInfo, where: str | Path, *, allow_other_model: bool = False) -> None:
        """Refuse a reader whose model is not the one these activations were pooled from (its
        name, unless ``allow_other_model``) or has another width or too few layers."""
        cfg = model.cfg
        if not allow_other_model and not same_model(self.model, cfg.model_name):
            raise mismatch(f"the activations in {where}", "model", self.model, cfg.model_name,
                           "pool the activations of this model (another --out), or pass the folder pooled from it")
        if cfg.d_model != self.d_model:
            raise mismatch(f"the activations in {where}", "d_model", self.d_model, cfg.d_model,
                           f"{cfg.model_name!r} has another width; pool its own activations")
        deepest = max(self.layers, default=-1)
        if deepest >= cfg.n_layers:
            raise mismatch(f"the activations in {where}", "layer", deepest, f"a layer below {cfg.n_layers}",
                           f"{cfg.model_name!r} has {cfg.n_layers} layers; pool its own activations")


def _span_end(token_index: int | None) -> int:
    if token_index is None:  # attach_token_spans sets both ends of every sentence it returns
        raise ValueError("a sentence has no token span; attach_token_spans must run first")
    return token_index


def trace_sentences(
    record: TraceRecord,
    trace_index: int,
    tokenizer: Any,
    *,
    min_words: int = 3,
    labeller: TraceLabeller | None = None,
) -> tuple[list[int], list[SentenceRecord]]:
    """Token ids of the trace's full text and its kept sentences with exact spans."""
    encoded = tokenizer(record.text, return_offsets_mapping=True,
                        add_special_tokens=adds_special_tokens(tokenizer, record.text))
    labels = labeller(record.reasoning) if labeller is not None else {}
    kept = [s for s in segment_sentences(record.reasoning, min_words=min_words) if s.kept]
    attached = attach_token_spans(kept, encoded["offset_mapping"], char_offset=record.reasoning_char_start)
    sentences = [
        SentenceRecord(
            trace_index=trace_index, problem_id=record.problem_id, sentence_index=index,
            text=sentence.text, char_start=sentence.char_start, char_end=sentence.char_end,
            tok_start=_span_end(sentence.tok_start), tok_end=_span_end(sentence.tok_end),
            label=labels.get((original.char_start, original.char_end), UNLABELLED) if labeller else None,
            reasoning_char_start=record.reasoning_char_start,
        )
        for index, (original, sentence) in enumerate(zip(kept, attached, strict=True))
    ]
    return list(encoded["input_ids"]), sentences


@typechecked
def pool_batch(
    model: TransformerBridge,
    token_ids: Sequence[Sequence[int]],
    spans: Sequence[tuple[int, int, int]],
    layers: Sequence[int],
    site: ResidSite = "resid_post",
) -> dict[int, Float[Tensor, "n_spans d_model"]]:
    """Mean residual activation over each ``(row, start, end)`` token span, per layer.

    Rows are right-padded: causal attention never lets a real token see the padding after it,
    so real positions are computed exactly as without padding.
    """
    longest = max(len(ids) for ids in token_ids)
    pad = model.tokenizer.pad_token_id or 0
    tokens = torch.full((len(token_ids), longest), pad, dtype=torch.long)
    for row, ids in enumerate(token_ids):
        tokens[row, : len(ids)] = torch.tensor(list(ids))
    names = [resid_hook_name(layer, site) for layer in layers]
    device = next(model.parameters()).device
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens.to(device), names_filter=names)
    span_tensor = torch.tensor(list(spans), dtype=torch.long).reshape(-1, 3).to(device)
    return {
        layer: mean_over_spans(cache[name].float(), span_tensor).cpu()
        for layer, name in zip(layers, names, strict=True)
    }


def pool_activations(model: TransformerBridge, traces: Sequence[TraceRecord], out_dir: str | Path,
                     config: ActivationConfig, *, progress: bool = True) -> Manifest:
    """The activations stage (``mechsteer activations`` and a run's): :func:`extract_activations`,
    each sentence labelled with its benchmark's ground truth where the benchmark has one (the organisms)."""
    if not traces:
        raise ArtefactError(f"no traces to pool into {out_dir}")
    ground_truth = ground_truth_for(traces[0].benchmark)
    return extract_activations(model, traces, out_dir, config, progress=progress,
                               labeller=ground_truth.label_reasoning if ground_truth is not None else None)


def extract_activations(
    model: TransformerBridge,
    traces: Sequence[TraceRecord],
    out_dir: str | Path,
    config: ActivationConfig,
    *,
    labeller: TraceLabeller | None = None,
    centre_on: set[str] | None = None,
    stop_after_shards: int | None = None,
    progress: bool = True,
) -> Manifest:
    """Pool sentence activations of ``traces`` into ``out_dir`` (resuming if it has a manifest).

    ``stop_after_shards`` stops early after writing that many new shards (for tests of
    resumption); the manifest then stays incomplete.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not config.layers:
        raise ConfigError("config.layers is empty; pass at least one layer")
    for layer in config.layers:
        if not 0 <= layer < model.cfg.n_layers:
            raise ConfigError(f"layer must be in [0, {model.cfg.n_layers - 1}] for {model.cfg.model_name!r}; got {layer}")
    if config.batch_size <= 0 or config.shard_size <= 0:
        raise ConfigError("batch_size and shard_size must be positive")
    manifest = _open_manifest(out, model, traces, config)
    if manifest.complete:
        return manifest
    next_trace = manifest.shards[-1].end_trace if manifest.shards else 0
    _truncate_sentences(out, manifest.n_sentences)

    started = time.perf_counter()
    n_tokens = 0
    n_new_sentences = 0
    written = 0
    buffer_vectors: dict[int, list[Tensor]] = {layer: [] for layer in config.layers}
    buffer_sentences: list[SentenceRecord] = []
    shard_first_trace = next_trace
    bar = tqdm(total=len(traces), initial=next_trace, desc="activations", disable=not progress)
    for batch_start in range(next_trace, len(traces), config.batch_size):
        batch = traces[batch_start : batch_start + config.batch_size]
        batch_ids, spans, batch_sentences = [], [], []
        for row, record in enumerate(batch):
            ids, sentences = trace_sentences(record, batch_start + row, model.tokenizer,
                                             min_words=config.min_words, labeller=labeller)
            batch_ids.append(ids)
            n_tokens += len(ids)
            for sentence in sentences:
                start = sentence.tok_start - 1 if config.include_previous_token and sentence.tok_start > 0 else sentence.tok_start
                spans.append((row, start, sentence.tok_end))
                batch_sentences.append(sentence)
        if spans:
            pooled = pool_batch(model, batch_ids, spans, config.layers, config.site)
            for layer in config.layers:
                buffer_vectors[layer].append(pooled[layer])
        buffer_sentences.extend(batch_sentences)
        bar.update(len(batch))
        batch_end = batch_start + len(batch)
        if len(buffer_sentences) >= config.shard_size or batch_end == len(traces):
            _write_shard(out, manifest, buffer_vectors, buffer_sentences, shard_first_trace, batch_end, model.cfg.d_model)
            n_new_sentences += len(buffer_sentences)
            buffer_vectors = {layer: [] for layer in config.layers}
            buffer_sentences = []
            shard_first_trace = batch_end
            written += 1
            if stop_after_shards is not None and written >= stop_after_shards and batch_end < len(traces):
                bar.close()
                return manifest
    bar.close()
    elapsed = time.perf_counter() - started
    manifest.throughput = {
        "seconds": elapsed,
        "sentences_per_s": n_new_sentences / elapsed if elapsed > 0 else 0.0,
        "tokens_per_s": n_tokens / elapsed if elapsed > 0 else 0.0,
    }
    _write_centring_mean(out, manifest, traces, centre_on)
    manifest.complete = True
    manifest.save(out)
    return manifest


def _open_manifest(out: Path, model: TransformerBridge, traces: Sequence[TraceRecord], config: ActivationConfig) -> Manifest:
    fresh = Manifest(model=model.cfg.model_name, config=asdict(config), n_traces=len(traces), d_model=model.cfg.d_model,
                     benchmark=traces[0].benchmark if traces else None, traces_digest=traces_digest(traces))
    if not (out / MANIFEST).exists():
        fresh.save(out)
        return fresh
    existing = Manifest.load(out)
    checked: list[tuple[str, Any, Any]] = [
        ("model", existing.model, fresh.model), ("config", existing.config, fresh.config),
        ("n_traces", existing.n_traces, fresh.n_traces)]
    if existing.traces_digest is not None:  # manifests written before the digest was recorded lack it
        checked.append(("traces (digest)", existing.traces_digest, fresh.traces_digest))
    for key, theirs, mine in checked:
        if key == "model" and same_model(theirs, mine):
            continue
        if mine != theirs:
            raise ProvenanceError(f"{out} holds a run with a different {key} ({theirs!r} != {mine!r}); "
                                  "use another --out or delete it")
    return existing


def _truncate_sentences(out: Path, n_sentences: int) -> None:
    """Drop sentence lines written after the last complete shard (an interrupted write)."""
    path = out / SENTENCES
    if not path.exists():
        path.touch()
        return
    lines = path.read_text().splitlines(keepends=True)
    if len(lines) != n_sentences:
        write_text_atomic(path, "".join(line for line in lines[:n_sentences] if line.endswith("\n")))


def _write_shard(out: Path, manifest: Manifest, vectors: dict[int, list[Tensor]], sentences: list[SentenceRecord],
                 first_trace: int, end_trace: int, d_model: int) -> None:
    index = len(manifest.shards)
    name = f"shard_{index:05d}.safetensors"
    tensors = {
        f"layer_{layer}": torch.cat(parts) if parts else torch.zeros(0, d_model)
        for layer, parts in vectors.items()
    }
    staging = out / (name + ".tmp")
    save_file({key: value.contiguous() for key, value in tensors.items()}, str(staging))
    os.replace(staging, out / name)
    append_jsonl(out / SENTENCES, (asdict(sentence) for sentence in sentences))
    manifest.shards.append(ShardInfo(name, manifest.n_sentences, len(sentences), first_trace, end_trace))
    manifest.save(out)


def _write_centring_mean(out: Path, manifest: Manifest, traces: Sequence[TraceRecord], centre_on: set[str] | None) -> None:
    sentences = read_sentences(out)
    use = torch.tensor([centre_on is None or traces[s.trace_index].problem_id in centre_on for s in sentences])
    if not bool(use.any()):
        raise ValueError("no sentences to compute the centring mean from")
    means = {}
    for layer in manifest.config["layers"]:
        total = torch.zeros(manifest.d_model, dtype=torch.float64)
        offset = 0
        for shard, vectors in iter_shards(out, layer):
            chosen = use[offset : offset + shard.n_sentences]
            total += vectors[chosen].double().sum(0)
            offset += shard.n_sentences
        means[f"layer_{layer}"] = (total / use.sum()).float()
    save_file(means, str(out / CENTRING))


def read_sentences(out_dir: str | Path) -> list[SentenceRecord]:
    path = Path(out_dir) / SENTENCES
    if not path.is_file():
        raise ArtefactError(f"{path} not found: {out_dir} is not an activation run folder")
    sentences = []
    for number, record in enumerate(read_jsonl(path), start=1):
        try:
            sentences.append(SentenceRecord(**record))
        except TypeError as error:
            raise ArtefactError(f"{path}, line {number}: not a sentence record ({error})") from None
    return sentences


def _load_tensor(path: Path, key: str, d_model: int) -> Tensor:
    """One tensor of a shard or centring file, its width checked; a missing, truncated or
    foreign file raises :class:`ArtefactError` naming it."""
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as error:
        raise ArtefactError(f"{path} is missing or corrupt ({error}); rerun mechsteer activations into a "
                            "new folder") from None
    if key not in tensors:
        raise ArtefactError(f"{path} has no {key!r} (it holds {sorted(tensors)}); the folder is corrupt")
    tensor = tensors[key]
    if tensor.shape[-1] != d_model:
        raise ArtefactError(f"{path}: {key} has width {tensor.shape[-1]}, but the manifest says d_model {d_model}")
    return tensor


def iter_shards(out_dir: str | Path, layer: int) -> Iterator[tuple[ShardInfo, Float[Tensor, "n d_model"]]]:
    """Raw pooled vectors of one layer, shard by shard (memory holds one shard at a time)."""
    out = Path(out_dir)
    manifest = Manifest.load(out)
    if layer not in manifest.layers:
        raise ConfigError(f"layer {layer} not in the layers {manifest.layers} of the activation run {out}")
    for shard in manifest.shards:
        vectors = _load_tensor(out / shard.file, f"layer_{layer}", manifest.d_model)
        if vectors.shape[0] != shard.n_sentences:
            raise ArtefactError(f"{out / shard.file} holds {vectors.shape[0]} vectors, but the manifest says "
                                f"{shard.n_sentences}; the folder is corrupt")
        yield shard, vectors


def centring_mean(out_dir: str | Path, layer: int) -> Float[Tensor, " d_model"]:
    path = Path(out_dir) / CENTRING
    if not path.exists():
        raise ArtefactError(f"{out_dir} has no centring mean yet: the activation run is incomplete; rerun it")
    return _load_tensor(path, f"layer_{layer}", Manifest.load(out_dir).d_model)


@typechecked
def centre_and_normalise(
    vectors: Float[Tensor, "n d_model"], mean: Float[Tensor, " d_model"], normalise: bool = True
) -> Float[Tensor, "n d_model"]:
    centred = vectors - mean
    if normalise:
        centred = centred / centred.norm(dim=-1, keepdim=True).clamp_min(1e-8)
    return centred


def load_sentence_vectors(out_dir: str | Path, layer: int, *, normalise: bool = True) -> Float[Tensor, "n d_model"]:
    """All sentence vectors of a layer, centred (and L2-normalised), as one tensor."""
    manifest = Manifest.load(out_dir)
    if not manifest.complete:
        raise ArtefactError(f"{out_dir}: the activation run is incomplete; rerun it to finish")
    mean = centring_mean(out_dir, layer)
    parts = [centre_and_normalise(vectors, mean, normalise) for _, vectors in iter_shards(out_dir, layer)]
    return torch.cat(parts) if parts else torch.zeros(0, manifest.d_model)
