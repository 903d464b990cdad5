"""The tuning stage: the hybrid's steering setting chosen on a validation split.

With ``tune_split`` set, each candidate setting runs the hybrid (the run's policy and directions)
on ``n_tune`` problems of that split, and the evaluations on the eval split use the most accurate
one. The candidates are each single (coefficient, window) of ``coefficients`` x ``windows``, each
with every threshold of ``tune_thresholds`` when given, plus, when there is more than one pair,
the whole grid as one candidate ("grid": the hybrid picks among all pairs at each steered token,
the paper's algorithm with its guardrail). Ties in accuracy go to the candidate that steers fewer
tokens, then to the smaller coefficient, then to the earlier candidate.

Without ``tune_split`` the hybrid uses ``coefficients`` x ``windows`` (and ``threshold``) as set.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mechsteer.experiment.config import RunConfig
from mechsteer.experiment.layout import RunPaths
from mechsteer.hybrid.generator import HybridConfig
from mechsteer.hybrid.records import HybridRecord
from mechsteer.hybrid.timing import (
    BehaviourClassifier,
    PolicySpec,
    TimingPolicy,
    build_timing_policy,
)

GRID = "grid"
CONFIG_NOTE = "set in the config"


@dataclass(frozen=True)
class SteeringSetting:
    """What the hybrid steers with: its (coefficient, window) candidates and the threshold policy's
    threshold (None for the argmax policy)."""

    name: str
    coefficients: tuple[float, ...]
    windows: tuple[int, ...]
    threshold: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "coefficients": list(self.coefficients), "windows": list(self.windows),
                "threshold": self.threshold}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SteeringSetting:
        return cls(name=data["name"], coefficients=tuple(data["coefficients"]), windows=tuple(data["windows"]),
                   threshold=data["threshold"])


def config_setting(config: RunConfig) -> SteeringSetting:
    """The setting a config names without tuning: its whole grid, and its threshold."""
    return SteeringSetting("config", tuple(config.coefficients), tuple(config.windows),
                           config.threshold if config.policy == "threshold" else None)


def tuning_candidates(config: RunConfig) -> list[SteeringSetting]:
    """Each (coefficient, window) alone, then the whole grid when it has more than one pair; each
    with every threshold of ``tune_thresholds`` (else the config's threshold)."""
    if config.policy != "threshold":
        thresholds: list[float | None] = [None]
    else:
        thresholds = list(config.tune_thresholds) if config.tune_thresholds is not None else [config.threshold]
    # With several thresholds each candidate's name carries its own.
    named = config.tune_thresholds is not None and config.policy == "threshold"
    pairs = [(coeff, window) for coeff in dict.fromkeys(config.coefficients) for window in dict.fromkeys(config.windows)]
    candidates = []
    for threshold in thresholds:
        suffix = f"_t{_short(threshold)}" if named and threshold is not None else ""
        candidates += [SteeringSetting(f"c{_short(coeff)}_w{window}{suffix}", (coeff,), (window,), threshold)
                       for coeff, window in pairs]
        if len(pairs) > 1:
            candidates.append(SteeringSetting(GRID + suffix, tuple(config.coefficients), tuple(config.windows),
                                              threshold))
    return candidates


def _short(number: float) -> str:
    """A number for a folder name: ``2`` for 2.0, ``0.5``; every digit when fewer would round it."""
    short = f"{number:g}"
    return short if float(short) == number else repr(float(number))


def with_setting(hybrid_config: HybridConfig, setting: SteeringSetting) -> HybridConfig:
    """``hybrid_config`` steering with ``setting``'s coefficients and windows."""
    return dataclasses.replace(hybrid_config, coefficients=setting.coefficients, windows=setting.windows)


def hybrid_policy(config: RunConfig, sae: BehaviourClassifier, behaviour_ids: list[int],
                  setting: SteeringSetting) -> TimingPolicy:
    """The run's timing policy (a registered name, mechsteer.hybrid.timing.register_timing_policy),
    with ``setting``'s threshold where the tuning stage chose one."""
    threshold = config.threshold if setting.threshold is None else setting.threshold
    return build_timing_policy(config.policy, PolicySpec(sae, behaviour_ids, read=config.policy_read,
                                                         threshold=threshold))


@dataclass(frozen=True)
class TuningCandidate:
    """A candidate's row of the tuning table: its setting, validation accuracy and tokens steered."""

    setting: SteeringSetting
    accuracy: float
    tokens_steered_fraction: float

    def to_json(self) -> dict[str, Any]:
        return {**self.setting.to_json(), "accuracy": self.accuracy,
                "tokens_steered_fraction": self.tokens_steered_fraction}


def measure(setting: SteeringSetting, records: Sequence[HybridRecord]) -> TuningCandidate:
    """A candidate measured on its validation records."""
    n = max(len(records), 1)
    return TuningCandidate(setting, accuracy=sum(record.correct for record in records) / n,
                           tokens_steered_fraction=sum(record.steered_fraction for record in records) / n)


def choose(candidates: Sequence[TuningCandidate]) -> TuningCandidate:
    """The most accurate candidate; ties go to fewer tokens steered, then to the smaller coefficient (a
    grid counts as its largest), then to the earlier candidate."""
    if not candidates:
        raise ValueError("no tuning candidates to choose from")
    order = sorted(range(len(candidates)), key=lambda i: (-candidates[i].accuracy,
                                                          candidates[i].tokens_steered_fraction,
                                                          max(candidates[i].setting.coefficients), i))
    return candidates[order[0]]


@dataclass(frozen=True)
class TuningSummary:
    """The tuning stage's record: the split and problems it tried the candidates on, each
    candidate's row, and the chosen setting."""

    split: str
    n: int
    candidates: list[TuningCandidate]
    chosen: SteeringSetting

    def to_json(self) -> dict[str, Any]:
        return {"split": self.split, "n": self.n, "candidates": [row.to_json() for row in self.candidates],
                "chosen": self.chosen.to_json()}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TuningSummary:
        candidates = [TuningCandidate(SteeringSetting.from_json(row), row["accuracy"], row["tokens_steered_fraction"])
                      for row in data["candidates"]]
        return cls(split=data["split"], n=data["n"], candidates=candidates,
                   chosen=SteeringSetting.from_json(data["chosen"]))


def run_tuning(config: RunConfig, paths: RunPaths, n_problems: int,
               evaluate: Callable[[SteeringSetting, Path], Sequence[HybridRecord]],
               log: Callable[[str], None] = print) -> TuningSummary:
    """The tuning stage's body: ``evaluate`` runs the hybrid with one candidate on the validation
    problems, streaming to the path it is given (and resuming from it)."""
    assert config.tune_split is not None  # the stage runs only with a tune_split
    rows = []
    for setting in tuning_candidates(config):
        rows.append(measure(setting, evaluate(setting, paths.tuning_results(setting.name))))
        log(f"  tuning {setting.name}: accuracy {rows[-1].accuracy:.3f}, "
            f"{100 * rows[-1].tokens_steered_fraction:.1f}% of tokens steered")
    return TuningSummary(config.tune_split, n_problems, rows, choose(rows).setting)


def chosen_setting(config: RunConfig, summary: dict[str, Any] | None) -> SteeringSetting:
    """The setting the evaluations use: the tuning stage's choice, else the config's own."""
    if config.tune_split is None or summary is None:
        return config_setting(config)
    return TuningSummary.from_json(summary).chosen


def tuning_report(config: RunConfig, summary: dict[str, Any] | None) -> dict[str, Any] | None:
    """report.json's ``tuning``: the stage's table and choice; without tuning, the config's setting.
    None while a configured tuning stage has not finished."""
    if config.tune_split is not None:
        return summary
    setting = config_setting(config).to_json()
    del setting["name"]
    return {"split": None, "chosen": setting, "note": CONFIG_NOTE}
