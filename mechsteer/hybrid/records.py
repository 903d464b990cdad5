"""One problem's hybrid generation as a run records it (a line of an evaluation's ``results.jsonl``):
its text and grade, and a compact per-token log of where it steered, with which behaviour,
coefficient and window."""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from mechsteer.core.errors import ArtefactError
from mechsteer.core.store import read_jsonl
from mechsteer.hybrid.generator import TokenLog


@dataclass(frozen=True)
class HybridRecord:
    problem_id: str
    text: str
    prediction: str | None
    reference: str
    correct: bool
    n_tokens: int
    steered_fraction: float
    agree_fraction: float  # share of tokens where the base and thinking greedy tokens agreed
    steered_positions: list[int]  # token positions steered, and at each:
    steered_behaviours: list[int | None]  # the behaviour (mechsteer.hybrid.timing.BIAS_ONLY: the bias alone)
    steered_coeffs: list[float]
    steered_windows: list[int]
    top_latents: list[list[int]]  # every token's top latent of the thinking model's state
    finish_reason: str

    @classmethod
    def from_generation(cls, problem_id: str, text: str, prediction: str | None, reference: str, correct: bool,
                        logs: list[TokenLog], steered_fraction: float, finish_reason: str) -> HybridRecord:
        steered = [log for log in logs if log.steered]
        return cls(problem_id=problem_id, text=text, prediction=prediction, reference=reference, correct=correct,
                   n_tokens=len(logs), steered_fraction=steered_fraction,
                   agree_fraction=sum(log.agree for log in logs) / len(logs) if logs else 0.0,
                   steered_positions=[i for i, log in enumerate(logs) if log.steered],
                   steered_behaviours=[log.behaviour for log in steered],
                   steered_coeffs=[log.coeff for log in steered], steered_windows=[log.window for log in steered],
                   top_latents=[log.latent_ids[:1] for log in logs], finish_reason=finish_reason)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any], source: Path | str = "a hybrid record") -> HybridRecord:
        names = [f.name for f in dataclasses.fields(cls)]
        missing = [name for name in names if name not in data]
        if missing:
            raise ArtefactError(f"{source}: a hybrid record lacks {missing}; was it written by this mechsteer?")
        return cls(**{name: data[name] for name in names})


def read_hybrid_records(path: Path) -> list[HybridRecord]:
    """An evaluation's records, in file order (empty when the file does not exist yet)."""
    return [HybridRecord.from_json(record, path) for record in read_jsonl(path)]


__all__ = ["HybridRecord", "read_hybrid_records"]
