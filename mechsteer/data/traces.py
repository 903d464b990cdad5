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
from typing import Any

from tqdm.auto import tqdm
from transformer_lens.model_bridge import TransformerBridge

from mechsteer.core.store import append_jsonl, read_jsonl
from mechsteer.data.benchmarks import Problem
from mechsteer.data.prompts import THINK_CLOSE, benchmark_template, get_template, render_prompt
from mechsteer.grading.answers import extract_answer, is_correct
from mechsteer.interventions.generation import generate

TRACES_FILE = "traces.jsonl"


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


def default_template(model: TransformerBridge, benchmark: str) -> str:
    """The benchmark's own template if it brings one, else by model: chat if it has a chat template."""
    own = benchmark_template(benchmark)
    if own is not None:
        return own
    if getattr(model.tokenizer, "chat_template", None):
        return "thinking_chat"
    return "base_paper"


def read_traces(path: Path) -> list[TraceRecord]:
    """All complete records of a traces file (a torn last line is ignored)."""
    return [TraceRecord(**record) for record in read_jsonl(path)]


def load_traces(traces_dir: str | Path) -> list[TraceRecord]:
    return read_traces(Path(traces_dir) / TRACES_FILE)


def generate_traces(
    model: TransformerBridge,
    problems: Sequence[Problem],
    out_dir: str | Path,
    *,
    template: str | None = None,
    max_new_tokens: int = 512,
    batch_size: int = 8,
    do_sample: bool = False,
    temperature: float = 1.0,
    seed: int | None = 0,
    stop_strings: Sequence[str] = (),
    progress: bool = True,
) -> list[TraceRecord]:
    """Generate (or resume) traces for ``problems`` into ``out_dir/traces.jsonl``; return all."""
    if not problems:
        raise ValueError("no problems given")
    benchmarks = {problem.benchmark for problem in problems}
    if len(benchmarks) != 1:
        raise ValueError(f"problems must come from one benchmark; got {sorted(benchmarks)}")
    benchmark = benchmarks.pop()
    template_name = template or default_template(model, benchmark)
    chat = get_template(template_name).chat
    out_path = Path(out_dir) / TRACES_FILE
    done = {record.problem_id for record in read_traces(out_path)}
    todo = [problem for problem in problems if problem.id not in done]
    settings = {
        "template": template_name, "max_new_tokens": max_new_tokens, "do_sample": do_sample,
        "temperature": temperature, "seed": seed, "stop_strings": list(stop_strings),
        "batch_size": batch_size,
    }
    model_name = model.cfg.model_name
    bar = tqdm(total=len(problems), initial=len(problems) - len(todo), desc=f"traces {model_name}",
               disable=not progress)
    for start in range(0, len(todo), batch_size):
        batch = todo[start : start + batch_size]
        prompts = [render_prompt(template_name, p.question, model.tokenizer) for p in batch]
        output = generate(
            model, prompts, max_new_tokens=max_new_tokens, do_sample=do_sample,
            temperature=temperature,
            # one seed per batch position, so a resumed run samples what a fresh run would
            seed=None if seed is None else seed + len(done) + start,
            stop_strings=stop_strings,
        )
        records = []
        for row, problem in enumerate(batch):
            generation = output.texts[row]
            r_start, r_end = reasoning_span(generation, chat)
            prompt = prompts[row]
            answer_part = generation[r_end:].strip() if chat else generation.strip()
            prediction = extract_answer(answer_part or generation, benchmark)
            record = TraceRecord(
                problem_id=problem.id, benchmark=benchmark, prompt=prompt,
                text=prompt + generation, generation=generation,
                reasoning=generation[r_start:r_end], answer_part=answer_part,
                reasoning_char_start=len(prompt) + r_start,
                reasoning_char_end=len(prompt) + r_end,
                token_ids=output.prompt_token_ids[row] + output.token_ids[row],
                n_prompt_tokens=len(output.prompt_token_ids[row]),
                prediction=prediction, reference=problem.answer,
                correct=is_correct(prediction, problem.answer, benchmark),
                finish_reason=output.finish_reasons[row], model=model_name, settings=settings,
            )
            records.append(asdict(record))
        append_jsonl(out_path, records)
        bar.update(len(batch))
    bar.close()
    by_id = {record.problem_id: record for record in read_traces(out_path)}
    return [by_id[problem.id] for problem in problems]
