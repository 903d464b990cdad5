"""Disagreement positions: where the base model, teacher-forced over a thinking trace, would have
written another token than the thinking model did; the training data of correction vectors
(:mod:`mechsteer.steering.correction`).

The base model reads each trace under the base framing (:func:`~mechsteer.steering.framing.frame_for_base`);
position ``i`` is a training position when the base model's greedy token there differs from the
trace's token ``i + 1`` and that token lies in a labelled sentence, whose behaviour is the
position's label (tokens outside a labelled sentence are dropped). The thinking model reads the
same trace under its own prompt; each base token of the reasoning is matched to the thinking
token with the same characters of the reasoning and the same id, so the thinking model's
next-token distribution at the matched position is the target. A position whose target token has
no such counterpart (a token merged across the prompt boundary) is dropped and counted; a pair
whose tokenizers differ is refused, since their tokens cannot be matched one to one.

For each position the cache keeps the thinking model's top-K log-probs and token ids, the base
model's residual at ``resid_post`` of the steering layer there (what the coefficient MLP reads),
the behaviour and the trace; and for each trace its base token ids, so that training needs
neither model but the base one. It is written chunk by chunk (``chunk_size`` traces each, the
manifest rewritten after every chunk), so a killed collection resumes where it stopped with
identical files, and it records what it was made from by content (:class:`DisagreementProvenance`):
a cache from other traces, labels, models, layer or K is refused by name.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch

from mechsteer.activations import trace_sentences
from mechsteer.core.artefacts import ArtefactFormat, load_artefact, save_artefact
from mechsteer.core.errors import ArtefactError, ConfigError
from mechsteer.core.models import resid_hook_name
from mechsteer.core.provenance import mismatch, weights_fingerprint
from mechsteer.core.store import json_digest, read_json, write_json_atomic
from mechsteer.core.tensor_types import Float, Int, Tensor
from mechsteer.core.vocab import (
    adds_special_tokens,
    ordinary_vocab,
    shared_id_map,
    tokenizers_compatible,
)
from mechsteer.data.traces import TraceRecord, traces_digest
from mechsteer.steering.direction_set import SITE
from mechsteer.steering.labels import BehaviourLabels

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

MANIFEST_FILE = "disagreements.json"
MANIFEST_FORMAT = "mechsteer.disagreements"
MANIFEST_VERSION = 1


def chunk_format(index: int) -> ArtefactFormat:
    """The files of chunk ``index``: its positions' tensors and a small JSON with its counts."""
    return ArtefactFormat(name="mechsteer.disagreement_chunk", version=1, json_file=f"chunk_{index:05d}.json",
                          tensors_file=f"chunk_{index:05d}.safetensors", kind="disagreement chunk")


@dataclass(frozen=True)
class DisagreementSettings:
    """How positions are collected. ``chunk_size`` traces are written at a time (a resumed collection
    must keep it, so it is part of the provenance); ``batch_size`` traces go through a model at once."""

    layer: int
    top_k: int = 50  # the reference's --topk: K=50 covers nearly all of the thinking model's mass
    chunk_size: int = 32
    batch_size: int = 8
    min_words: int = 3  # sentences shorter than this are not labelled (as in the activations stage)

    def __post_init__(self) -> None:
        if self.layer < 0 or self.top_k < 1 or self.chunk_size < 1 or self.batch_size < 1:
            raise ConfigError(f"disagreement settings need layer >= 0 and top_k, chunk_size, batch_size >= 1; got {self}")


STATE = -2  # a candidate token whose behaviour the thinking model's state gives (StateLabels)


@dataclass(frozen=True)
class StateLabels:
    """Label each disagreement position by the thinking model's own state there, as its hybrid's policy
    will read it (the reference's newest version; issue 27's specification), instead of by the sentence
    the target token falls in: every reasoning token is a candidate, and ``label`` maps the thinking
    model's ``resid_post`` at ``layer`` to a behaviour id. ``read``: the activation of the position
    that predicts the token (``last_token``) or of the token itself (``next_token``), as
    ``mechsteer.hybrid.timing.PolicyRead``. ``digest`` names what labels (e.g. the SAE's weights)."""

    label: Callable[[Float[Tensor, "n d_thinking"]], Int[Tensor, " n"]]
    layer: int
    read: Literal["last_token", "next_token"]
    digest: str


Labels = BehaviourLabels | StateLabels  # by sentence, or by the thinking model's state


@dataclass(frozen=True)
class DisagreementProvenance:
    """What a cache is made from, by content: the traces (both framings), the labels, the two models
    (name and a digest of their weights), the layer, K, the chunking and the sentence filter."""

    traces_digest: str  # of the thinking traces under their own prompt
    framed_digest: str  # of the same traces under the base framing
    labels_digest: str  # of every labelled sentence's trace, span and behaviour; or of the state labeller
    base_model: str
    base_weights: str
    thinking_model: str
    thinking_weights: str
    layer: int
    top_k: int
    chunk_size: int
    min_words: int
    n_traces: int

    def check_against(self, expected: DisagreementProvenance, where: Any,
                      fix: str = "collect the disagreements again into another folder (or delete this one)") -> None:
        """Raise :class:`~mechsteer.core.errors.ProvenanceError` naming the first field that differs (and ``fix``)."""
        for field in dataclasses.fields(self):
            recorded, wanted = getattr(self, field.name), getattr(expected, field.name)
            if recorded != wanted:
                raise mismatch(where, field.name.replace("_", " "), recorded, wanted, fix)


@dataclass
class DisagreementCache:
    """Every collected position (rows in trace order), and each trace's base token ids."""

    provenance: DisagreementProvenance
    d_model: int
    trace_index: Int[Tensor, " n"]
    position: Int[Tensor, " n"]  # base position i: its prediction of token i + 1 is what is corrected
    behaviour: Int[Tensor, " n"]
    target_token: Int[Tensor, " n"]  # the trace's token i + 1
    base_greedy: Int[Tensor, " n"]  # the base model's greedy token at i (differs from target_token)
    top_k_ids: Int[Tensor, "n k"]
    top_k_logprobs: Float[Tensor, "n k"]
    resid: Float[Tensor, "n d_model"]  # base resid_post of the layer at i, unsteered
    token_ids: list[list[int]]  # each trace's base token ids (under the base framing)
    mean_resid_norm: float  # over every position but the first (BOS) of every trace, at the layer
    stats: dict[str, int]

    @property
    def n_positions(self) -> int:
        return int(self.position.numel())

    def positions_per_behaviour(self) -> dict[int, int]:
        ids, counts = torch.unique(self.behaviour, return_counts=True)
        return {int(b): int(c) for b, c in zip(ids.tolist(), counts.tolist(), strict=True)}

    def rows_of_traces(self, traces: Sequence[int]) -> Int[Tensor, " m"]:
        """The rows (positions) that belong to the given trace indices."""
        wanted = torch.tensor(sorted(set(int(t) for t in traces)), dtype=torch.long)
        return torch.nonzero(torch.isin(self.trace_index, wanted)).flatten()


# --------------------------------------------------------------------------------------------
# Alignment and labels


def require_shared_vocabulary(base: TransformerBridge, thinking: TransformerBridge) -> Int[Tensor, " thinking_vocab"]:
    """Refuse a pair whose ordinary vocabularies differ (their tokens cannot be matched one to one);
    the paper's pairs share theirs and differ in added tokens. Returns each thinking id's base id (-1:
    a token the base model lacks, e.g. the thinking model's own special tokens)."""
    if not tokenizers_compatible(base.tokenizer, thinking.tokenizer):
        base_vocab, thinking_vocab = ordinary_vocab(base.tokenizer), ordinary_vocab(thinking.tokenizer)
        only_base = len(set(base_vocab.items()) - set(thinking_vocab.items()))
        only_thinking = len(set(thinking_vocab.items()) - set(base_vocab.items()))
        raise ConfigError(
            f"base model {base.cfg.model_name!r} and thinking model {thinking.cfg.model_name!r} have different "
            f"tokenizers ({only_base} ordinary tokens only in the base's, {only_thinking} only in the thinking's): "
            "disagreement positions need one shared vocabulary; use a pair of one tokenizer family")
    sizes = (int(base.cfg.d_vocab), int(thinking.cfg.d_vocab))
    to_thinking = torch.tensor(shared_id_map(base.tokenizer, thinking.tokenizer, *sizes), dtype=torch.long)
    to_base = torch.full((sizes[1],), -1, dtype=torch.long)
    valid = to_thinking >= 0
    to_base[to_thinking[valid]] = torch.arange(sizes[0], dtype=torch.long)[valid]
    return to_base


def _encode(tokenizer: Any, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    encoded = tokenizer(text, return_offsets_mapping=True, add_special_tokens=adds_special_tokens(tokenizer, text))
    return list(encoded["input_ids"]), [(int(s), int(e)) for s, e in encoded["offset_mapping"]]


def reasoning_tokens(offsets: Sequence[tuple[int, int]], start: int, end: int) -> dict[tuple[int, int], int]:
    """Tokens lying inside the reasoning ``[start, end)``: their span relative to ``start`` -> index."""
    return {(s - start, e - start): index for index, (s, e) in enumerate(offsets)
            if e > s and s >= start and e <= end}


def token_behaviours(framed: TraceRecord, index: int, tokenizer: Any, labels: BehaviourLabels,
                     min_words: int) -> tuple[list[int], dict[int, int], list[tuple[int, int, int]]]:
    """The framed trace's base token ids, each labelled token's behaviour (token index -> id), and the
    labelled sentences as (reasoning char start, end, behaviour)."""
    ids, sentences = trace_sentences(framed, index, tokenizer, min_words=min_words, labeller=labels.text_labeller)
    behaviour_of: dict[int, int] = {}
    labelled = []
    for sentence in sentences:
        behaviour = labels.labeller(sentence)
        if behaviour is None or behaviour < 0:
            continue
        labelled.append((*sentence.reasoning_span(), int(behaviour)))
        for token in range(sentence.tok_start, sentence.tok_end):
            behaviour_of.setdefault(token, int(behaviour))
    return ids, behaviour_of, labelled


def _check_pairs(traces: Sequence[TraceRecord], framed: Sequence[TraceRecord]) -> None:
    if len(traces) != len(framed):
        raise ConfigError(f"{len(traces)} thinking traces but {len(framed)} framed ones; frame the same traces")
    for own, base in zip(traces, framed, strict=True):
        if own.problem_id != base.problem_id or own.reasoning != base.reasoning:
            raise ConfigError(f"trace {own.problem_id!r} and framed trace {base.problem_id!r} differ in problem or "
                              "reasoning; frame the thinking traces with frame_for_base, in the same order")


def expected_provenance(base: TransformerBridge, thinking: TransformerBridge, traces: Sequence[TraceRecord],
                        framed: Sequence[TraceRecord], labels: Labels,
                        settings: DisagreementSettings) -> DisagreementProvenance:
    """The provenance a cache of these inputs records (labels found without running a model)."""
    _check_pairs(traces, framed)
    if isinstance(labels, StateLabels):
        labels_digest = json_digest({"state": labels.digest, "layer": labels.layer, "read": labels.read})
    else:
        labels_digest = json_digest([token_behaviours(record, index, base.tokenizer, labels, settings.min_words)[2]
                                     for index, record in enumerate(framed)])
    return DisagreementProvenance(
        traces_digest=traces_digest(traces), framed_digest=traces_digest(framed), labels_digest=labels_digest,
        base_model=base.cfg.model_name, base_weights=weights_fingerprint(base),
        thinking_model=thinking.cfg.model_name, thinking_weights=weights_fingerprint(thinking),
        layer=settings.layer, top_k=settings.top_k, chunk_size=settings.chunk_size, min_words=settings.min_words,
        n_traces=len(traces))


# --------------------------------------------------------------------------------------------
# Collection


def _padded(rows: Sequence[Sequence[int]], pad: int) -> Tensor:
    tokens = torch.full((len(rows), max(len(r) for r in rows)), pad, dtype=torch.long)
    for row, ids in enumerate(rows):
        tokens[row, : len(ids)] = torch.tensor(list(ids), dtype=torch.long)
    return tokens


def _forward(model: TransformerBridge, rows: Sequence[Sequence[int]], hook_name: str | None
             ) -> tuple[Tensor, Tensor | None]:
    """Logits (float, on the model's device) of right-padded rows, and the residual at ``hook_name``."""
    device = next(model.parameters()).device
    tokens = _padded(rows, model.tokenizer.pad_token_id or 0).to(device)
    with torch.no_grad():
        if hook_name is None:
            return model(tokens).float(), None
        logits, cache = model.run_with_cache(tokens, names_filter=[hook_name])
    return logits.float(), cache[hook_name].float()


def _collect_chunk(base: TransformerBridge, thinking: TransformerBridge, traces: Sequence[TraceRecord],
                   framed: Sequence[TraceRecord], first_index: int, labels: Labels,
                   settings: DisagreementSettings, to_base: Tensor) -> tuple[dict[str, Tensor], dict[str, Any]]:
    hook_name = resid_hook_name(settings.layer, SITE)
    columns: dict[str, list[Tensor]] = {name: [] for name in
                                        ("trace_index", "position", "behaviour", "target_token", "base_greedy",
                                         "top_k_ids", "top_k_logprobs", "resid")}
    token_rows: list[list[int]] = []
    norm_sum, norm_count = 0.0, 0
    stats = {"labelled_tokens": 0, "disagreements": 0, "unaligned": 0}
    for start in range(0, len(traces), settings.batch_size):
        own_batch, framed_batch = traces[start : start + settings.batch_size], framed[start : start + settings.batch_size]
        base_rows, thinking_rows, plans = [], [], []
        for offset, (own, record) in enumerate(zip(own_batch, framed_batch, strict=True)):
            index = first_index + start + offset
            base_ids, base_offsets = _encode(base.tokenizer, record.text)
            base_spans = reasoning_tokens(base_offsets, record.reasoning_char_start, record.reasoning_char_end)
            if isinstance(labels, StateLabels):  # every reasoning token; its label read off the thinking state
                behaviour_of = {token: STATE for token in base_spans.values()}
            else:
                base_ids, behaviour_of, _ = token_behaviours(record, index, base.tokenizer, labels, settings.min_words)
            thinking_ids, thinking_offsets = _encode(thinking.tokenizer, own.text)
            base_rows.append(base_ids)
            thinking_rows.append(thinking_ids)
            plans.append((index, base_ids, behaviour_of, base_spans,
                          reasoning_tokens(thinking_offsets, own.reasoning_char_start, own.reasoning_char_end),
                          thinking_ids))
        base_logits, resid = _forward(base, base_rows, hook_name)
        state_hook = resid_hook_name(labels.layer, SITE) if isinstance(labels, StateLabels) else None
        thinking_logits, thinking_resid = _forward(thinking, thinking_rows, state_hook)
        assert resid is not None
        for row, (index, base_ids, behaviour_of, base_spans, thinking_spans, thinking_ids) in enumerate(plans):
            token_rows.append(base_ids)
            norms = resid[row, 1 : len(base_ids)].norm(dim=-1)
            norm_sum, norm_count = norm_sum + float(norms.sum()), norm_count + int(norms.numel())
            greedy = base_logits[row, : len(base_ids)].argmax(dim=-1).cpu()
            span_of = {token: span for span, token in base_spans.items()}
            kept_base, kept_thinking = [], []
            for target in sorted(behaviour_of):
                if target < 1 or target >= len(base_ids):
                    continue
                stats["labelled_tokens"] += 1
                if int(greedy[target - 1]) == base_ids[target]:
                    continue
                stats["disagreements"] += 1
                match = thinking_spans.get(span_of.get(target, (-1, -1)))
                if match is None or match < 1 or thinking_ids[match] != base_ids[target]:
                    stats["unaligned"] += 1
                    continue
                kept_base.append(target - 1)
                kept_thinking.append(match - 1)
            if not kept_base:
                continue
            at_base = torch.tensor(kept_base, dtype=torch.long)
            at_thinking = torch.tensor(kept_thinking, dtype=torch.long)
            logprobs = torch.log_softmax(thinking_logits[row, at_thinking.to(thinking_logits.device)], dim=-1)
            # the top K among the tokens the base model has (training reads the base logits there), as base ids
            base_of = to_base.to(logprobs.device)
            top_values, top_ids = logprobs.masked_fill(base_of < 0, float("-inf")).topk(settings.top_k, dim=-1)
            top_ids = base_of[top_ids]
            columns["trace_index"].append(torch.full((len(kept_base),), index, dtype=torch.long))
            columns["position"].append(at_base)
            if isinstance(labels, StateLabels):
                assert thinking_resid is not None
                # last_token: the position whose logits predict the token; next_token: the token's own
                read_at = at_thinking + (1 if labels.read == "next_token" else 0)
                states = thinking_resid[row, read_at.to(thinking_resid.device)]
                columns["behaviour"].append(labels.label(states).to("cpu", torch.long))
            else:
                columns["behaviour"].append(torch.tensor([behaviour_of[p + 1] for p in kept_base], dtype=torch.long))
            columns["target_token"].append(torch.tensor([base_ids[p + 1] for p in kept_base], dtype=torch.long))
            columns["base_greedy"].append(greedy[at_base])
            columns["top_k_ids"].append(top_ids.cpu())
            columns["top_k_logprobs"].append(top_values.cpu())
            columns["resid"].append(resid[row, at_base.to(resid.device)].cpu())
    d_model = base.cfg.d_model
    empty = {"top_k_ids": torch.zeros((0, settings.top_k), dtype=torch.long),
             "top_k_logprobs": torch.zeros((0, settings.top_k)), "resid": torch.zeros((0, d_model))}
    tensors = {name: torch.cat(parts) if parts else empty.get(name, torch.zeros(0, dtype=torch.long))
               for name, parts in columns.items()}
    tensors["token_ids"] = torch.tensor([t for row in token_rows for t in row], dtype=torch.long)
    tensors["trace_lengths"] = torch.tensor([len(row) for row in token_rows], dtype=torch.long)
    return tensors, {"norm_sum": norm_sum, "norm_count": norm_count, **stats}


def _read_manifest(folder: Path) -> dict[str, Any] | None:
    path = folder / MANIFEST_FILE
    if not path.exists():
        return None
    document = read_json(path, "disagreement cache manifest")
    if not isinstance(document, dict) or document.get("format") != MANIFEST_FORMAT \
            or document.get("version") != MANIFEST_VERSION:
        raise ArtefactError(f"{path} is not a {MANIFEST_FORMAT} v{MANIFEST_VERSION} manifest; delete the folder "
                            "and collect again")
    return document


def _recorded_provenance(document: dict[str, Any], path: Path) -> DisagreementProvenance:
    try:
        return DisagreementProvenance(**document["provenance"])
    except (KeyError, TypeError) as error:
        raise ArtefactError(f"{path} records no complete provenance ({error}); delete the folder and collect "
                            "again") from None


def collect_disagreements(
    base: TransformerBridge,
    thinking: TransformerBridge,
    traces: Sequence[TraceRecord],
    framed: Sequence[TraceRecord],
    labels: Labels,
    settings: DisagreementSettings,
    out_dir: str | Path,
    *,
    stop_after_chunks: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> DisagreementCache | None:
    """Collect (or resume collecting) the disagreement positions of ``traces`` into ``out_dir``.

    ``traces`` are the thinking traces under the thinking model's own prompt, ``framed`` the same
    traces under the base framing, in the same order. A folder already holding a cache of other
    inputs is refused (:class:`DisagreementProvenance`). ``stop_after_chunks`` stops after writing
    that many new chunks and returns None (for tests of resumption).
    """
    say = progress or (lambda message: None)
    if not 0 <= settings.layer < base.cfg.n_layers:
        raise ConfigError(f"layer {settings.layer} is outside [0, {base.cfg.n_layers - 1}] of {base.cfg.model_name!r}")
    to_base = require_shared_vocabulary(base, thinking)
    folder = Path(out_dir)
    expected = expected_provenance(base, thinking, traces, framed, labels, settings)
    document = _read_manifest(folder)
    if document is not None:
        _recorded_provenance(document, folder / MANIFEST_FILE).check_against(expected, folder / MANIFEST_FILE)
    else:
        document = {"format": MANIFEST_FORMAT, "version": MANIFEST_VERSION, "provenance": dataclasses.asdict(expected),
                    "d_model": base.cfg.d_model, "chunks": [], "complete": False}
    n_chunks = -(-len(traces) // settings.chunk_size)
    written = 0
    for chunk in range(len(document["chunks"]), n_chunks):
        if stop_after_chunks is not None and written >= stop_after_chunks:
            return None
        first = chunk * settings.chunk_size
        last = min(first + settings.chunk_size, len(traces))
        tensors, counts = _collect_chunk(base, thinking, traces[first:last], framed[first:last], first, labels, settings,
                                         to_base)
        save_artefact(folder, chunk_format(chunk), {"first_trace": first, "n_traces": last - first, **counts}, tensors)
        document["chunks"].append({"first_trace": first, "n_traces": last - first,
                                   "n_positions": int(tensors["position"].numel())})
        document["complete"] = chunk == n_chunks - 1
        write_json_atomic(folder / MANIFEST_FILE, document)
        written += 1
        say(f"  disagreements: chunk {chunk + 1}/{n_chunks}, {int(tensors['position'].numel())} positions")
    if not document["complete"]:  # no traces, or a manifest from before the last chunk's rename
        document["complete"] = True
        write_json_atomic(folder / MANIFEST_FILE, document)
    return load_disagreements(folder, expected)


def load_disagreements(folder: str | Path, expected: DisagreementProvenance | None = None) -> DisagreementCache:
    """A complete cache; with ``expected``, one made from exactly those inputs (else ProvenanceError)."""
    folder = Path(folder)
    document = _read_manifest(folder)
    if document is None:
        raise ArtefactError(f"{folder / MANIFEST_FILE} not found: {folder} holds no disagreement cache; collect one")
    provenance = _recorded_provenance(document, folder / MANIFEST_FILE)
    if expected is not None:
        provenance.check_against(expected, folder / MANIFEST_FILE)
    if not document.get("complete"):
        raise ArtefactError(f"{folder} holds an unfinished disagreement collection ({len(document['chunks'])} chunks); "
                            "run the collection again to finish it")
    parts: list[dict[str, Tensor]] = []
    norm_sum, norm_count = 0.0, 0
    stats = {"labelled_tokens": 0, "disagreements": 0, "unaligned": 0}
    for chunk in range(len(document["chunks"])):
        metadata, tensors = load_artefact(folder, chunk_format(chunk))
        parts.append(tensors)
        norm_sum, norm_count = norm_sum + metadata["norm_sum"], norm_count + metadata["norm_count"]
        for key in stats:
            stats[key] += int(metadata[key])
    token_ids: list[list[int]] = []
    for tensors in parts:
        flat = tensors["token_ids"].tolist()
        start = 0
        for length in tensors["trace_lengths"].tolist():
            token_ids.append(flat[start : start + length])
            start += length
    if len(token_ids) != provenance.n_traces:
        raise ArtefactError(f"{folder}: its chunks hold {len(token_ids)} traces, its manifest says "
                            f"{provenance.n_traces}; delete the folder and collect again")

    def joined(name: str) -> Tensor:
        return torch.cat([tensors[name] for tensors in parts]) if parts else torch.zeros(0, dtype=torch.long)

    d_model = int(document["d_model"])
    return DisagreementCache(
        provenance=provenance, d_model=d_model, trace_index=joined("trace_index"), position=joined("position"),
        behaviour=joined("behaviour"), target_token=joined("target_token"), base_greedy=joined("base_greedy"),
        top_k_ids=joined("top_k_ids").reshape(-1, provenance.top_k),
        top_k_logprobs=joined("top_k_logprobs").float().reshape(-1, provenance.top_k),
        resid=joined("resid").float().reshape(-1, d_model), token_ids=token_ids,
        mean_resid_norm=norm_sum / max(norm_count, 1), stats=stats)


def describe(cache: DisagreementCache) -> str:
    """One line: positions, per behaviour, the traces they come from."""
    return json.dumps({"positions": cache.n_positions, "per_behaviour": cache.positions_per_behaviour(),
                       "traces": cache.provenance.n_traces, **cache.stats})


__all__ = [
    "MANIFEST_FILE", "DisagreementCache", "DisagreementProvenance", "DisagreementSettings", "Labels", "StateLabels",
    "collect_disagreements",
    "describe", "expected_provenance", "load_disagreements", "reasoning_tokens", "require_shared_vocabulary",
    "token_behaviours",
]
