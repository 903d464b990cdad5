"""The traces stage: a model's generations on a benchmark's problems, graded, streamed to a folder.

``mechsteer traces`` and a run's traces and plain-evaluation stages call :func:`run_traces` with a
:class:`TraceSettings`, so the same inputs give the same ``traces.jsonl``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mechsteer.data.benchmarks import Problem
from mechsteer.data.traces import TraceRecord, UnclosedThinking, generate_traces
from mechsteer.engines.base import GenerationEngine

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge


@dataclass(frozen=True)
class TraceSettings:
    """How the traces are generated: length, batch, sampling (temperature 0: greedy) and stops.
    (Defaults live with the run config's keys, which ``mechsteer traces`` reads too.)"""

    max_new_tokens: int
    batch_size: int
    temperature: float  # 0: greedy decoding
    top_p: float  # with a temperature above 0: nucleus sampling below 1
    seed: int  # with a temperature above 0
    unclosed: UnclosedThinking
    stop_strings: tuple[str, ...] | None = None  # None: the template's own

    def generate_options(self) -> dict[str, Any]:
        """:func:`~mechsteer.data.traces.generate_traces`' keyword arguments."""
        options: dict[str, Any] = {"max_new_tokens": self.max_new_tokens, "batch_size": self.batch_size,
                                   "unclosed": self.unclosed}
        if self.temperature > 0:  # greedy keeps generate_traces' defaults, so that greedy traces resume as they were
            options.update(do_sample=True, temperature=self.temperature,
                           top_p=self.top_p if self.top_p < 1 else None, seed=self.seed)
        if self.stop_strings is not None:
            options["stop_strings"] = self.stop_strings
        return options


@dataclass(frozen=True)
class TracesSummary:
    n: int
    accuracy: float
    cut_off: int  # generations that ran to max_new_tokens

    @classmethod
    def of(cls, records: Sequence[TraceRecord]) -> TracesSummary:
        return cls(n=len(records), accuracy=sum(r.correct for r in records) / len(records),
                   cut_off=sum(r.finish_reason == "length" for r in records))

    def to_json(self) -> dict[str, Any]:
        return {"n": self.n, "accuracy": self.accuracy, "cut_off": self.cut_off}


def run_traces(model: TransformerBridge | GenerationEngine, problems: Sequence[Problem], out: Path, *,
               template: str | None, settings: TraceSettings, progress: bool = True) -> list[TraceRecord]:
    """Generate (or resume) the traces of ``problems`` into ``out/traces.jsonl``; return them all."""
    return generate_traces(model, problems, out, template=template, progress=progress, **settings.generate_options())


__all__ = ["TraceSettings", "TracesSummary", "run_traces"]
