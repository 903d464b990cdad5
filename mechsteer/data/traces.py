"""Stage 1: reasoning traces from a model on a benchmark, streamed to JSONL and resumable.

Each finished problem is appended to ``traces.jsonl`` as one JSON line and flushed, so an
interrupted run loses at most the batch in flight; a rerun skips every problem id already in
the file (a torn last line from a kill mid-write is dropped and rewritten).

The *reasoning* of a trace is the part later stages split into sentences:

- chat templates (``thinking_chat``) open a ``<think>`` block in the prompt, so the reasoning is
  the generation up to ``</think>`` (or all of it, if the block never closes);
- plain templates (``base_paper``, ``organism``) have no thinking block: the reasoning is the
  whole generation.

``reasoning_char_start``/``reasoning_char_end`` locate the reasoning in ``text`` (= prompt +
generation), so sentence spans index the same string the activations stage tokenizes.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from tqdm.auto import tqdm

from mechsteer.core.errors import ArtefactError
from mechsteer.core.provenance import mismatch, same_model
from mechsteer.core.store import (
    append_jsonl,
    json_digest,
    lone_surrogate,
    read_jsonl,
    write_text_atomic,
)
from mechsteer.data.benchmarks import Problem
from mechsteer.data.prompts import THINK_CLOSE, benchmark_template, get_template, render_prompt
from mechsteer.engines.base import (
    Completion,
    GenerationEngine,
    GenerationRequest,
    GenerationSettings,
)
from mechsteer.engines.bridge import BridgeEngine
from mechsteer.grading.answers import extract_answer, is_correct

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

TRACES_FILE = "traces.jsonl"
# A thinking trace cut off before its closing tag: no answer, or the answer extracted from it anyway.
UnclosedThinking = Literal["no_answer", "extract"]


@dataclass
class TraceRecord:
    problem_id: str
    benchmark: str
    prompt: str
    text: str  # prompt + generation
    generation: str
    reasoning: str
    answer_part: str
    reasoning_char_start: int  # offsets into `text`
    reasoning_char_end: int
    token_ids: list[int]  # prompt tokens followed by generated tokens
    n_prompt_tokens: int
    prediction: str | None
    reference: str
    correct: bool
    finish_reason: str
    model: str
    settings: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_json(cls, line: str) -> TraceRecord:
        return cls(**json.loads(line))


def reasoning_span(generation: str, chat: bool) -> tuple[int, int]:
    """(start, end) of the reasoning inside ``generation``, whitespace-trimmed."""
    end = len(generation)
    if chat:
        close = generation.find(THINK_CLOSE)
        if close >= 0:
            end = close
    start = 0
    while start < end and generation[start].isspace():
        start += 1
    while end > start and generation[end - 1].isspace():
        end -= 1
    return start, end


def default_template(model: TransformerBridge | GenerationEngine, benchmark: str) -> str:
    """The benchmark's own template if it brings one, else by model: chat if it has a chat template."""
    own = benchmark_template(benchmark)
    if own is not None:
        return own
    if getattr(model.tokenizer, "chat_template", None):
        return "thinking_chat"
    return "base_paper"


def read_traces(path: Path) -> list[TraceRecord]:
    """All complete records of a traces file (a torn last line is ignored)."""
    records = []
    for number, record in enumerate(read_jsonl(path), start=1):
        try:
            trace = TraceRecord(**record)
        except TypeError as error:  # keys missing or unknown: not a trace record
            raise ArtefactError(f"{path}, line {number}: not a trace record ({error}); "
                                "is this a traces.jsonl written by mechsteer traces?") from None
        for part in ("problem_id", "prompt", "text", "generation"):
            value = getattr(trace, part)
            at = lone_surrogate(value) if isinstance(value, str) else None
            if at is not None:
                raise ArtefactError(f"{path}, line {number} (problem {trace.problem_id!r}): its {part} holds a lone "
                                    f"surrogate at character {at}, which no tokenizer reads; regenerate that trace")
        records.append(trace)
    return records


def traces_digest(traces: Sequence[TraceRecord]) -> str:
    """Digest of what later stages read of the traces (ids, texts, reasoning spans), in order:
    recorded by the activations and checked by every stage that pairs the two."""
    return json_digest([[t.problem_id, t.text, t.reasoning_char_start, t.reasoning_char_end] for t in traces])


# Settings a resumed run may change: they do not change what a record holds.
RESUMABLE_SETTINGS = ("batch_size",)
# Settings recorded only when set (so that traces written before they existed still resume), with
# the value a record without them was made with.
OPTIONAL_SETTINGS: dict[str, Any] = {"top_p": None, "unclosed": "no_answer", "engine": "bridge"}
_UNSET = object()


def check_resumable(records: Sequence[TraceRecord], out_path: Path, model_name: str, benchmark: str,
                    settings: dict[str, Any] | None, problem_ids: Sequence[str] | None = None) -> None:
    """Refuse to resume traces made by another model, on another benchmark, with other generation
    settings (every setting this run has, and every optional one whether recorded or defaulted),
    or of problems this run does not ask for (``problem_ids``: another split, or more of them):
    the file would mix them, and every reader would trust it. ``settings`` None: the settings are
    not known yet (checked again once they are)."""
    way_out = f"use another --out (or delete {out_path} to start over)"
    compared = set() if settings is None else (set(settings) | set(OPTIONAL_SETTINGS)) - set(RESUMABLE_SETTINGS)
    for record in records:
        where = f"{out_path} (record {record.problem_id!r})"
        if not same_model(record.model, model_name):
            raise mismatch(where, "model", record.model, model_name, way_out)
        if record.benchmark != benchmark:
            raise mismatch(where, "benchmark", record.benchmark, benchmark, way_out)
        for key in sorted(compared):
            before = record.settings.get(key, OPTIONAL_SETTINGS.get(key, _UNSET))
            now = (settings or {}).get(key, OPTIONAL_SETTINGS.get(key, _UNSET))
            if before is _UNSET:
                continue  # a setting older records never had: they were made before it existed
            if before != now:
                what = "engine" if key == "engine" else f"generation setting {key}"
                raise mismatch(where, what, before, None if now is _UNSET else now, way_out)
    if problem_ids is not None:
        asked = set(problem_ids)
        others = [record.problem_id for record in records if record.problem_id not in asked]
        if others:
            raise ArtefactError(f"{out_path} holds {len(others)} trace(s) of problems this run does not ask for "
                                f"(first: {others[0]!r}): another split or benchmark, or more problems; {way_out}")


def load_traces(traces_dir: str | Path) -> list[TraceRecord]:
    return read_traces(Path(traces_dir) / TRACES_FILE)


def generate_traces(
    model: TransformerBridge | GenerationEngine,
    problems: Sequence[Problem],
    out_dir: str | Path,
    *,
    template: str | None = None,
    max_new_tokens: int = 512,
    batch_size: int = 8,
    do_sample: bool = False,
    temperature: float = 1.0,
    seed: int | None = 0,
    top_p: float | None = None,
    stop_strings: Sequence[str] | None = None,
    unclosed: UnclosedThinking = "no_answer",
    progress: bool = True,
) -> list[TraceRecord]:
    """Generate (or resume) traces for ``problems`` into ``out_dir/traces.jsonl``; return all.

    ``stop_strings`` default to the template's own (``orz``: ``</answer>``; ``base_paper``: the
    start of a next question). A trace of a template that opens a thinking block but whose
    generation never closes it (cut off by ``max_new_tokens``) has no answer, unless ``unclosed``
    is ``"extract"``: a number from the middle of the reasoning is no answer.

    ``model`` is a loaded bridge (generation on it, in batches of ``batch_size``) or any
    :class:`~mechsteer.engines.base.GenerationEngine` (e.g. an OpenAI-compatible server); records
    have the same fields either way, and ``settings`` says which engine wrote them and where
    their token ids come from (``token_ids_source``: ``generated`` or ``retokenised``).

    The file is in the order of ``problems`` whatever order a server answers in, so a run through
    a server writes what a second identical run writes: finished records are appended as soon as
    every earlier problem's is written; on a failure or an interruption the ones still waiting are
    appended too (no finished work is lost), and a resumed file is put back in problem order at
    the end.
    """
    # heavy (seconds): imported when traces are made, so that the command line starts fast
    from transformer_lens.model_bridge import TransformerBridge

    engine = BridgeEngine(model) if isinstance(model, TransformerBridge) else model
    if not problems:
        raise ValueError("no problems given")
    benchmarks = {problem.benchmark for problem in problems}
    if len(benchmarks) != 1:
        raise ValueError(f"problems must come from one benchmark; got {sorted(benchmarks)}")
    benchmark = benchmarks.pop()
    template_name = template or default_template(engine, benchmark)
    prompt_template = get_template(template_name)
    chat = prompt_template.opens_thinking
    if stop_strings is None:
        stop_strings = prompt_template.stop_strings
    out_path = Path(out_dir) / TRACES_FILE
    settings: dict[str, Any] = {
        "template": template_name, "max_new_tokens": max_new_tokens, "do_sample": do_sample,
        "temperature": temperature, "seed": seed, "stop_strings": list(stop_strings),
        "batch_size": batch_size,
    }
    # recorded only when set, so that traces written before these settings existed still resume
    if top_p is not None:
        settings["top_p"] = top_p
    if unclosed != "no_answer":
        settings["unclosed"] = unclosed
    settings.update(engine.record_settings())
    model_name = engine.model_name
    existing = read_traces(out_path)
    check_resumable(existing, out_path, model_name, benchmark, settings, [problem.id for problem in problems])
    done = {record.problem_id for record in existing}
    todo = [problem for problem in problems if problem.id not in done]
    bar = tqdm(total=len(problems), initial=len(problems) - len(todo), desc=f"traces {model_name}",
               disable=not progress)
    position = {problem.id: index for index, problem in enumerate(problems)}
    # One seed per problem, by its place in `problems`: a resumed run samples what a fresh run
    # would (the bridge seeds each batch with its first problem's, as it always has).
    requests = [GenerationRequest(render_prompt(template_name, p.question, engine.tokenizer),
                                  None if seed is None else seed + position[p.id]) for p in todo]
    generation_settings = GenerationSettings(
        max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature, top_p=top_p,
        stop_strings=tuple(stop_strings), batch_size=batch_size)
    waiting: dict[int, dict[str, Any]] = {}  # finished records whose earlier problems are not all written
    next_index = 0
    try:
        for group in engine.generate(requests, generation_settings):
            for index, completion in group:
                waiting[index] = asdict(trace_record(todo[index], requests[index].prompt, completion, chat=chat,
                                                     unclosed=unclosed, model_name=model_name, settings=settings))
            ready = []
            while next_index in waiting:
                ready.append(waiting.pop(next_index))
                next_index += 1
            if ready:
                append_jsonl(out_path, ready)
            bar.update(len(group))
    finally:
        if waiting:
            append_jsonl(out_path, [waiting[index] for index in sorted(waiting)])
        bar.close()
    written = read_traces(out_path)
    by_id = {record.problem_id: record for record in written}
    ordered = [by_id[problem.id] for problem in problems]
    if [record.problem_id for record in written] != [problem.id for problem in problems]:
        # resumed after a failure: the records of this run came after the earlier ones
        write_text_atomic(out_path, "".join(json.dumps(asdict(record)) + "\n" for record in ordered))
    return ordered


def trace_record(problem: Problem, prompt: str, completion: Completion, *, chat: bool, unclosed: UnclosedThinking,
                 model_name: str, settings: dict[str, Any]) -> TraceRecord:
    """The record of ``problem``'s completion (its reasoning span, answer and grade)."""
    generation = completion.text
    r_start, r_end = reasoning_span(generation, chat)
    answer_part = generation[r_end:].strip() if chat else generation.strip()
    if chat and THINK_CLOSE not in generation and unclosed == "no_answer":
        prediction = None  # cut off mid-reasoning: no answer was given
    else:
        prediction = extract_answer(answer_part or generation, problem.benchmark)
    return TraceRecord(
        problem_id=problem.id, benchmark=problem.benchmark, prompt=prompt,
        text=prompt + generation, generation=generation,
        reasoning=generation[r_start:r_end], answer_part=answer_part,
        reasoning_char_start=len(prompt) + r_start,
        reasoning_char_end=len(prompt) + r_end,
        token_ids=completion.prompt_token_ids + completion.token_ids,
        n_prompt_tokens=len(completion.prompt_token_ids),
        prediction=prediction, reference=problem.answer,
        correct=is_correct(prediction, problem.answer, problem.benchmark),
        finish_reason=completion.finish_reason, model=model_name, settings=settings,
    )
