"""The nested settings mappings of a run config (``optimisation``, ``correction``), checked as the
fields of the settings class they build, and built."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from mechsteer.core.validation import Problem, check_fields
from mechsteer.steering.correction import CorrectionConfig
from mechsteer.steering.optimise import OptimisationConfig


def optimisation_problems(settings: dict[str, Any]) -> list[Problem]:
    """The ``optimisation`` mapping checked as OptimisationConfig fields (its seed is the run's)."""
    if "seed" in settings:
        return [Problem("optimisation", "optimisation sets its own seed; set the run's seed at the top level", "value")]
    return _settings_problems("optimisation", OptimisationConfig, settings)


def build_correction(settings: dict[str, Any]) -> CorrectionConfig:
    """A ``correction`` mapping as a CorrectionConfig (seeds given as a list)."""
    seeds = settings.get("seeds")
    return CorrectionConfig(**{**settings, **({"seeds": tuple(seeds)} if isinstance(seeds, list) else {})})


def correction_problems(settings: dict[str, Any]) -> list[Problem]:
    """The ``correction`` mapping checked as CorrectionConfig fields (seeds: a list of integers)."""
    seeds = settings.get("seeds", [0])
    if not isinstance(seeds, list) or not seeds or not all(type(seed) is int for seed in seeds):
        return [Problem("correction", f"correction: seeds must be a non-empty list of integers, got {seeds!r}", "type")]
    return _settings_problems("correction", CorrectionConfig, settings, build=build_correction)


def _settings_problems(option: str, settings_class: type, settings: dict[str, Any],
                       build: Callable[[dict[str, Any]], Any] | None = None) -> list[Problem]:
    """A settings mapping (a key such as ``optimisation``) checked as ``settings_class``'s fields, then built."""
    problems = check_fields(settings_class, settings, partial=True, noun=f"{option} keys")
    if problems:
        return [dataclasses.replace(problem, message=f"{option}: {problem.message}") for problem in problems]
    try:
        (build or (lambda values: settings_class(**values)))(settings)
    except ValueError as error:  # its own ranges (steps >= 1, 0 < val_fraction < 1, ...)
        return [Problem(option, f"{option}: {error}", "value")]
    return []


__all__ = ["build_correction", "correction_problems", "optimisation_problems"]
