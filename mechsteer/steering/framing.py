"""The text fed to the base model: the thinking model's traces under the base model's framing.

Each trace's prompt + reasoning is fed. Traces whose prompt template is the base model's
framing are used verbatim (the organisms: both models share one prompt, the ``organism``
template). Traces written under another template (e.g. a thinking model's chat template) are
re-framed with :func:`reframe_trace`: the base prompt (the run's ``base_template``; by default
the benchmark's own, else ``base_paper``) for the same question, followed by the trace's
reasoning verbatim; the chat template and the ``</think>`` answer part are not fed.

The reasoning is the same text in every framing, so a sentence keeps its place within it
(:meth:`~mechsteer.activations.SentenceRecord.reasoning_span`): labels made on the thinking
model's traces find their sentences in the re-framed ones.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from mechsteer.core.errors import ConfigError
from mechsteer.data.benchmarks import load_benchmark
from mechsteer.data.prompts import benchmark_template, render_prompt
from mechsteer.data.traces import TraceRecord, load_traces


def reframe_trace(record: TraceRecord, prompt: str) -> TraceRecord:
    """The trace under another prompt: ``prompt + reasoning`` (see the module docstring)."""
    return dataclasses.replace(
        record, prompt=prompt, text=prompt + record.reasoning, generation=record.reasoning,
        answer_part="", reasoning_char_start=len(prompt), reasoning_char_end=len(prompt) + len(record.reasoning),
        token_ids=[], n_prompt_tokens=0,
        settings={**record.settings, "reframed_from": record.settings.get("template")},
    )


def base_template_for(benchmark: str) -> str:
    """The base model's prompt template: the benchmark's own (the organisms' shared prompt), else the paper's."""
    return benchmark_template(benchmark) or "base_paper"


def frame_for_base(traces: Sequence[TraceRecord], questions: Mapping[str, str] | None = None,
                   tokenizer: Any = None, template: str | None = None) -> list[TraceRecord]:
    """Traces as the base model sees them: verbatim if already under the base framing, else re-framed
    under ``template`` (a registered name or a format string; default :func:`base_template_for`).

    Re-framing needs each problem's question (``questions[problem_id]``).
    """
    framed = []
    for record in traces:
        base_template = template or base_template_for(record.benchmark)
        if record.settings.get("template") == base_template:
            framed.append(record)
            continue
        if questions is None or record.problem_id not in questions:
            raise ValueError(
                f"trace {record.problem_id!r} was written under template {record.settings.get('template')!r}, "
                f"not the base framing {base_template!r}; pass its question to re-frame it"
            )
        framed.append(reframe_trace(record, render_prompt(base_template, questions[record.problem_id], tokenizer)))
    return framed


def load_framed_traces(traces_dir: str | Path, tokenizer: Any, split: str,
                       template: str | None = None) -> list[TraceRecord]:
    """Traces from a folder, framed for the base model under ``template`` (default
    :func:`base_template_for`; questions from the benchmark when re-framing)."""
    traces = load_traces(traces_dir)
    if not traces:
        raise ConfigError(f"no traces in {traces_dir}")
    benchmark = traces[0].benchmark
    questions = None
    if any(t.settings.get("template") != (template or base_template_for(t.benchmark)) for t in traces):
        questions = {p.id: p.question for p in load_benchmark(benchmark, split)}
    return frame_for_base(traces, questions, tokenizer, template)


__all__ = ["base_template_for", "frame_for_base", "load_framed_traces", "reframe_trace"]
