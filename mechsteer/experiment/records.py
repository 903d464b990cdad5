"""The stage summary of an evaluation, as ``stages.json`` holds it and the report reads it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from mechsteer.core.errors import ArtefactError
from mechsteer.hybrid.records import HybridRecord


@dataclass(frozen=True)
class EvalSummary:
    """One evaluation of the eval split: each problem's grade, the generations cut off at their
    length limit, and, for a hybrid evaluation, its share of tokens steered and what its comparison
    recorded of how it was built (e.g. random vectors' ``norm_matched_to``)."""

    correct: list[bool]
    cut_off: int | None  # None in summaries written before it was counted
    steered_fraction: float | None = None  # None: a plain evaluation (no steering)
    recorded: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        if self.steered_fraction is None:
            return {"correct": self.correct, "cut_off": self.cut_off}
        return {"correct": self.correct, "steered_fraction": self.steered_fraction, "cut_off": self.cut_off,
                **self.recorded}

    @classmethod
    def of_hybrid(cls, records: Sequence[HybridRecord], recorded: dict[str, Any] | None = None) -> EvalSummary:
        """A hybrid evaluation's summary, with the share of its steered tokens that are the thinking model's
        greedy token (where its records say)."""
        matches = [match for record in records for match in record.steered_matching_thinking or []]
        shares = {"steered_equal_thinking": sum(matches) / len(matches)} if matches else {}
        return cls(correct=[record.correct for record in records],
                   cut_off=sum(record.finish_reason == "length" for record in records),
                   steered_fraction=sum(record.steered_fraction for record in records) / len(records),
                   recorded={**(recorded or {}), **shares})

    @classmethod
    def from_json(cls, data: dict[str, Any], source: str = "an evaluation's summary") -> EvalSummary:
        if not isinstance(data, dict) or not isinstance(data.get("correct"), list):
            raise ArtefactError(f"{source} has no per-problem grades (correct); was it written by this mechsteer?")
        recorded = {key: value for key, value in data.items() if key not in ("correct", "cut_off", "steered_fraction")}
        return cls(correct=[bool(c) for c in data["correct"]], cut_off=data.get("cut_off"),
                   steered_fraction=data.get("steered_fraction"), recorded=recorded)


__all__ = ["EvalSummary"]
