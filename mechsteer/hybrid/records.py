"""One problem's hybrid generation as a run records it (a line of an evaluation's ``results.jsonl``):
its text and grade, a compact per-token log of where it steered, with which behaviour,
coefficient and window, where the base and thinking models' greedy tokens differed, and where each
generated token ends in the text (what the run's viewer marks tokens by)."""

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
    # the character in `text` where each generated token ends (None in records written before it was recorded)
    token_ends: list[int] | None = None
    disagree_positions: list[int] | None = None  # token positions where the greedy tokens differed (None: as above)
    # at each steered position: the token is the thinking model's greedy one (None: as above)
    steered_matching_thinking: list[bool] | None = None

    @classmethod
    def from_generation(cls, problem_id: str, text: str, prediction: str | None, reference: str, correct: bool,
                        logs: list[TokenLog], steered_fraction: float, finish_reason: str,
                        token_ends: list[int] | None = None) -> HybridRecord:
        steered = [log for log in logs if log.steered]
        return cls(problem_id=problem_id, text=text, prediction=prediction, reference=reference, correct=correct,
                   n_tokens=len(logs), steered_fraction=steered_fraction,
                   agree_fraction=sum(log.agree for log in logs) / len(logs) if logs else 0.0,
                   steered_positions=[i for i, log in enumerate(logs) if log.steered],
                   steered_behaviours=[log.behaviour for log in steered],
                   steered_coeffs=[log.coeff for log in steered], steered_windows=[log.window for log in steered],
                   top_latents=[log.latent_ids[:1] for log in logs], finish_reason=finish_reason,
                   token_ends=token_ends, disagree_positions=[i for i, log in enumerate(logs) if not log.agree],
                   steered_matching_thinking=[bool(log.matches_thinking) for log in steered])

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any], source: Path | str = "a hybrid record") -> HybridRecord:
        fields = dataclasses.fields(cls)
        missing = [f.name for f in fields if f.name not in data and f.default is dataclasses.MISSING]
        if missing:
            raise ArtefactError(f"{source}: a hybrid record lacks {missing}; was it written by this mechsteer?")
        return cls(**{f.name: data[f.name] for f in fields if f.name in data})


def token_char_ends(tokenizer: Any, token_ids: list[int], text: str) -> list[int]:
    """Where each of ``token_ids`` ends in ``text``, their decoded text (cut at a stop string: the
    tokens past the cut end at its end). A token that decodes to part of a character (a byte of a
    multi-byte one) ends where the previous one did; the token completing the character holds it."""
    ends, end = [], 0
    for count in range(1, len(token_ids) + 1):
        prefix = tokenizer.decode(token_ids[:count], skip_special_tokens=True)
        # the longest common prefix, from the previous end on (decoded prefixes only grow)
        while end < min(len(prefix), len(text)) and prefix[end] == text[end]:
            end += 1
        ends.append(end)
    return ends


def read_hybrid_records(path: Path) -> list[HybridRecord]:
    """An evaluation's records, in file order (empty when the file does not exist yet)."""
    return [HybridRecord.from_json(record, path) for record in read_jsonl(path)]


__all__ = ["HybridRecord", "read_hybrid_records", "token_char_ends"]
