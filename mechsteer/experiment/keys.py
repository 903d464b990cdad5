"""Config keys that describe themselves: each :class:`~mechsteer.experiment.config.RunConfig` field
declares once, in its field metadata (:func:`key`), what it is: whether it is part of the run's
digest, which stages' results depend on it, whether a sweep may vary it and still share the
upstream stages, whether it was added after run folders existed (then its default leaves the
digest as it was), and the ``mechsteer run`` flag that overrides it. Every list the top floor
needs (the digest's exclusions, a stage's keys, a sweep's downstream and reserved keys, the
command-line overrides) is derived here from those declarations.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import MISSING, dataclass
from typing import Any, Literal

from mechsteer.experiment.layout import ALL_STAGES, stage_names, stage_spec

# What a key is. computed: part of the digest (what a run computes depends on it); placement:
# where the models run; connection: how a server is reached or waited for; tracking: logging.
# Only computed keys are in the digest.
KeyKind = Literal["computed", "placement", "connection", "tracking"]
# Where a key is listed (``mechsteer run --help``, docs/config.md), in this order.
KeySection = Literal["run", "models", "data", "generation", "activations", "taxonomy", "judge", "directions",
                     "correction", "hybrid", "tuning", "evaluation", "ablations", "engine", "placement", "tracking"]

# The stages keys name (mechsteer.experiment.layout's table), and their groups.
TRAIN_TRACES = stage_names("train_traces")
PLAIN_EVALS = stage_names("plain_eval")
CORRECTION = stage_names("correction")
HYBRID_EVALS = stage_names("hybrid_eval")
# The tuning stage and every hybrid evaluation: they all steer with the same settings.
HYBRID = ("tuning", *HYBRID_EVALS)
# Every evaluation of the eval split: the two plain ones and the hybrid's (not the tuning stage's).
EVALS = (*PLAIN_EVALS, *HYBRID_EVALS)
# The correction vectors' evaluations: their own, their ceiling and their controls'.
CORRECTION_EVALS = tuple(spec.name for spec in ALL_STAGES if spec.group == "hybrid_eval" and spec.method == "correction")
# The same but the ceiling, whose coefficient rule is the oracle's.
CORRECTION_STEERED = tuple(name for name in CORRECTION_EVALS if name != "eval_correction_ceiling")
# Every control's and baseline's evaluation, of either method (the random ones read the seed).
COMPARISON_EVALS = tuple(spec.name for spec in ALL_STAGES if spec.comparison is not None)
STAGES = tuple(spec.name for spec in ALL_STAGES)


@dataclass(frozen=True)
class KeyInfo:
    kind: KeyKind = "computed"
    # The stages whose results depend on the key; None: every stage (what a key declared without
    # its stages counts as, so that a change of it is refused rather than mixed into results).
    read_by: tuple[str, ...] | None = None
    # Added after run folders existed: at its default the key is left out of the digest.
    later: bool = False
    # A sweep may vary it and still share the stages before the directions (mechsteer.experiment.points).
    downstream: bool = False
    # A sweep may set it (a sweep sets name and wandb_group itself).
    in_sweeps: bool = True
    # The ``mechsteer run`` flag (argparse dest) that overrides it.
    flag: str | None = None
    # Where it is listed, and what it means in one line (its unit, what its default stands for);
    # ``mechsteer run --help`` and docs/config.md are generated from them (mechsteer.experiment.keydocs).
    section: KeySection | None = None
    help: str = ""


def key(default: Any = MISSING, *, factory: Any = MISSING, kind: KeyKind = "computed",
        read_by: Sequence[str] | None = None, later: bool = False, downstream: bool = False,
        in_sweeps: bool = True, flag: str | None = None, section: KeySection, help: str) -> Any:
    """A RunConfig field with its :class:`KeyInfo`."""
    if not help.strip() or "\n" in help:
        raise ValueError(f"a key's help is one line saying what it means, not {help!r}")
    if read_by is not None:
        unknown = [stage for stage in read_by if stage not in STAGES]
        if unknown:
            raise ValueError(f"unknown stage(s) {unknown}; stages: {STAGES}")
    if kind != "computed" and read_by is None:
        read_by = ()  # not in the digest: a change of it never reaches the stages' results
    info = KeyInfo(kind=kind, read_by=None if read_by is None else tuple(read_by), later=later,
                   downstream=downstream, in_sweeps=in_sweeps, flag=flag, section=section, help=help)
    return dataclasses.field(default=default, default_factory=factory, metadata={"key": info})


def key_infos(config_class: type) -> dict[str, KeyInfo]:
    """Each field's declaration (a field declared without :func:`key`: a computed key read by every stage)."""
    return {f.name: f.metadata.get("key", KeyInfo()) for f in dataclasses.fields(config_class)}


def keys_of(config_class: type, kind: KeyKind) -> tuple[str, ...]:
    return tuple(name for name, info in key_infos(config_class).items() if info.kind == kind)


def undigested_keys(config_class: type) -> frozenset[str]:
    """The keys left out of the digest: every kind but computed."""
    return frozenset(name for name, info in key_infos(config_class).items() if info.kind != "computed")


def key_defaults(config_class: type) -> dict[str, Any]:
    """Each key's default (a fresh one from its factory); ``dataclasses.MISSING`` for a required key."""
    return {f.name: f.default_factory() if f.default_factory is not MISSING else f.default
            for f in dataclasses.fields(config_class)}


def later_defaults(config_class: type) -> dict[str, Any]:
    """The keys added after run folders existed, with their defaults (at which they stay out of the digest)."""
    defaults = key_defaults(config_class)
    return {name: defaults[name] for name, info in key_infos(config_class).items() if info.later}


def stage_keys(config_class: type) -> dict[str, tuple[str, ...]]:
    """The keys each stage's results depend on (keys read by every stage included)."""
    infos = key_infos(config_class)
    return {stage: tuple(name for name, info in infos.items() if info.read_by is None or stage in info.read_by)
            for stage in STAGES}


def stages_reading(config_class: type, name: str, stages: Sequence[str]) -> list[str]:
    """Which of ``stages`` read the key ``name``; a stage or a key this module does not know counts
    as read (a change of it is refused rather than silently mixed into finished results)."""
    info = key_infos(config_class).get(name)
    if info is None or info.read_by is None:
        return list(stages)
    if not info.read_by:
        return []
    return [stage for stage in stages if _reads(stage, info.read_by)]


def _reads(stage: str, read_by: tuple[str, ...]) -> bool:
    """Whether a stage reads a key read by ``read_by``: a plug-in control's or baseline's evaluation
    (``eval_<name>``, not a built-in) reads what any hybrid evaluation reads; an unknown stage, every key."""
    if stage in STAGES:
        return stage in read_by
    try:
        group = stage_spec(stage).group
    except KeyError:
        return True
    return group != "hybrid_eval" or any(name in read_by for name in HYBRID_EVALS)


def downstream_keys(config_class: type) -> tuple[str, ...]:
    return tuple(name for name, info in key_infos(config_class).items() if info.downstream)


def sweep_reserved_keys(config_class: type) -> tuple[str, ...]:
    """The keys a sweep sets itself (its overrides may not)."""
    return tuple(name for name, info in key_infos(config_class).items() if not info.in_sweeps)


def override_flags(config_class: type) -> dict[str, str]:
    """``mechsteer run`` flag (argparse dest) -> the key it overrides."""
    return {info.flag: name for name, info in key_infos(config_class).items() if info.flag is not None}


__all__ = ["COMPARISON_EVALS", "CORRECTION", "CORRECTION_EVALS", "CORRECTION_STEERED", "EVALS", "HYBRID", "HYBRID_EVALS", "KeyInfo", "KeyKind", "KeySection", "PLAIN_EVALS", "STAGES", "TRAIN_TRACES",
           "downstream_keys", "key", "key_defaults",
           "key_infos", "keys_of", "later_defaults", "override_flags", "stage_keys", "stages_reading",
           "sweep_reserved_keys", "undigested_keys"]
