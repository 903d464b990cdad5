"""A run folder's bookkeeping: ``stages.json`` says which stages are done, with their timings and
summaries. A stage is marked done only when it has finished, so a rerun skips finished stages.

A folder belongs to one config. A rerun with another config continues only when every key it
changes is read by stages that have not run yet (:data:`STAGE_KEYS`, from the keys' own
declarations); otherwise it is refused, naming the keys that differ and the finished stages that
read them. Each finished stage records where its models ran and in which dtype; a rerun that would
compute in another dtype (``dtype: auto`` resolves per machine) is refused.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from mechsteer.core.errors import ArtefactError, ConfigError, ProvenanceError
from mechsteer.core.models import resolve_device, resolve_dtype
from mechsteer.core.store import file_digests, json_digest, read_json, write_json_atomic
from mechsteer.experiment import keys
from mechsteer.experiment.config import RunConfig
from mechsteer.experiment.keys import key_defaults, stage_keys
from mechsteer.experiment.layout import RunPaths, StageSpec, planned_stages, stage_spec
from mechsteer.experiment.tracking import NullTracker, Tracker
from mechsteer.taxonomy.judge.spec import JUDGE_CACHE_DIR

# The config keys each stage's results depend on, from the keys' declarations (RunConfig's field
# metadata, mechsteer.experiment.keys). A key declared without its stages counts as read by every
# stage, so a change of it is refused in a folder with finished stages until it says which.
STAGE_KEYS: dict[str, tuple[str, ...]] = stage_keys(RunConfig)


def changed_keys(recorded: dict[str, Any], config: RunConfig) -> list[str]:
    """Keys whose value differs from a folder's recorded config and that change what a run
    computes (its digest: placement and tracking keys do not). A key the record lacks, added to
    RunConfig since, counts as its default."""
    defaults = key_defaults(RunConfig)
    changed = []
    for key, value in asdict(config).items():
        default = defaults[key]
        if key not in recorded and default is dataclasses.MISSING:
            changed.append(key)  # a required key the record lacks: not a config this folder knows
            continue
        before = recorded.get(key, default)
        if before != value and dataclasses.replace(config, **{key: before}).digest() != config.digest():
            changed.append(key)
    return changed


def stages_reading(key: str, stages: list[str]) -> list[str]:
    """Which of ``stages`` read ``key`` (:func:`mechsteer.experiment.keys.stages_reading`)."""
    return keys.stages_reading(RunConfig, key, stages)


def finished_stages(out: Path) -> set[str]:
    """The stages a run folder has finished, read without touching it (none for a new folder, or a
    stage record that :class:`RunState` will refuse)."""
    paths = RunPaths(out)
    if not paths.stages_file.is_file():
        return set()
    try:
        state = read_json(paths.stages_file, "run's stage record (stages.json)")
    except ArtefactError:
        return set()
    stages = state.get("stages") if isinstance(state, dict) else None
    return set(stages) if isinstance(stages, dict) else set()


def validate_for(config: RunConfig, out: Path) -> None:
    """Every key of ``config``, and what this machine must provide for the stages the folder has
    still to run (an HTTP judge's address only while the taxonomy is to be built)."""
    config.validate(here="taxonomy" not in finished_stages(out))


# What a stage's recorded digests leave out: plots (``mechsteer report`` redraws them) and the HTTP
# judge's answer cache (``--clear-judge-cache`` empties it).
UNDIGESTED_SUFFIXES = (".png",)
UNDIGESTED_FOLDERS = (JUDGE_CACHE_DIR,)


def stage_outputs(paths: RunPaths, stage: str) -> dict[str, str]:
    """Each file a finished stage wrote in its folder -> its content digest (recorded in stages.json)."""
    return file_digests(paths.stage(stage), skip_suffixes=UNDIGESTED_SUFFIXES, skip_folders=UNDIGESTED_FOLDERS)


def check_outputs(paths: RunPaths, stage: str, recorded: dict[str, str]) -> None:
    """Refuse a stage folder whose files are not the ones the stage wrote, naming the files."""
    now = stage_outputs(paths, stage)
    if now == recorded:
        return
    changed = sorted(name for name in recorded.keys() & now.keys() if recorded[name] != now[name])
    missing, added = sorted(recorded.keys() - now.keys()), sorted(now.keys() - recorded.keys())
    what = "; ".join(f"{label}: {', '.join(names[:3])}{' ...' if len(names) > 3 else ''}"
                     for label, names in (("changed", changed), ("missing", missing), ("added", added)) if names)
    raise ProvenanceError(
        f"{paths.stage(stage)} is not what the {stage!r} stage wrote ({what}); another run's or an edited "
        f"folder would mix into this run's results: put its own files back, or delete the {stage!r} entry of "
        f"{paths.stages_file} to recompute it and every stage after it")


def planned(config: RunConfig) -> list[StageSpec]:
    """The stages a run of ``config`` does, in order (mechsteer.experiment.layout's table)."""
    return planned_stages(tuning=config.tune_split is not None, comparisons=[*config.controls, *config.baselines],
                          ablations=config.ablations, correction=config.correction_vectors,
                          correction_comparisons=config.correction_controls)


def resumed_folders(stage: str) -> list[str]:
    """The folders a stage resumes inside (streamed records: traces, activations, tuning, evaluations)."""
    spec = stage_spec(stage)
    return [spec.folder] if spec.streamed else []


def resolved_placement(config: RunConfig) -> dict[str, dict[str, str]]:
    """Where each model of a run computes, and in which dtype, as this machine resolves the config
    (``dtype: auto`` is bfloat16 on CUDA and float32 on the CPU)."""
    placement = {}
    for role, device in (("base", config.base_device or config.device),
                         ("thinking", config.thinking_device or config.device)):
        target = torch.device("cuda") if config.device_map is not None else resolve_device(device)
        dtype = str(resolve_dtype(config.dtype, target)).removeprefix("torch.")
        placement[role] = {"device": str(target), "dtype": dtype}
    return placement


class RunState:
    """``stages.json``: which stages are done, their timings, summaries and placement."""

    def __init__(self, out: Path, config: RunConfig):
        self.out = out
        self.paths = RunPaths(out)
        self.tracker: Tracker = NullTracker()  # run_pipeline sets the run's own once the folder is accepted
        self.path = self.paths.stages_file
        self.placement = resolved_placement(config)
        state = read_json(self.path, "run's stage record (stages.json)") if self.path.exists() else {}
        if self.path.exists() and not (isinstance(state, dict) and isinstance(state.get("stages"), dict)
                                       and isinstance(state.get("config"), dict)):
            raise ConfigError(f"{self.path} is not a run's stage record (no config and stages in it); move it "
                              "away to start the folder over, or use another --out")
        if state and state.get("config_digest") != config.digest():
            self._accept_changes(state, config)
        if state:
            self._check_precision(state, config)
        out.mkdir(parents=True, exist_ok=True)  # only once the folder is accepted
        self.state = state or {"config_digest": config.digest(), "config": asdict(config), "stages": {}}
        self.verified: set[str] = set()  # finished stages whose files this invocation has checked
        write_json_atomic(self.paths.config_file, asdict(config))
        self.save()

    def _accept_changes(self, state: dict[str, Any], config: RunConfig) -> None:
        """Continue a folder under a changed config when no finished stage read a changed key."""
        recorded = state.get("config", {})
        done = list(state.get("stages", {}))
        changed = changed_keys(recorded, config)
        blocking = {key: stages_reading(key, done) for key in changed}
        blocking = {key: stages for key, stages in blocking.items() if stages}
        if blocking:
            shown = "; ".join(f"{key}: {recorded.get(key)!r} -> {getattr(config, key)!r} (read by "
                              f"{', '.join(stages)})" for key, stages in blocking.items())
            raise ConfigError(
                f"{self.out} holds a run of another config whose finished stages read the keys that differ: "
                f"{shown}; use another --out, or set those keys back (delete {self.path} to recompute everything)"
            )
        state["config_changes"] = [*state.get("config_changes", []), {"keys": changed, "stages_done": done}]
        state["config_digest"], state["config"] = config.digest(), asdict(config)

    def _check_precision(self, state: dict[str, Any], config: RunConfig) -> None:
        """Refuse to mix precisions: a finished stage computed in another dtype than this run would."""
        for stage, entry in state.get("stages", {}).items():
            for role, recorded in (entry.get("placement") or {}).items():
                now = self.placement.get(role, {}).get("dtype")
                if now is not None and recorded.get("dtype") != now:
                    raise ConfigError(
                        f"{self.out}: stage {stage!r} ran the {role} model in {recorded.get('dtype')} (on "
                        f"{recorded.get('device')}), but this run would use {now} (dtype: {config.dtype!r} on "
                        f"{self.placement[role]['device']}); set dtype: {recorded.get('dtype')} to resume it, "
                        "or use another --out")

    def save(self) -> None:
        write_json_atomic(self.path, self.state)

    def done(self, stage: str) -> bool:
        return stage in self.state["stages"]

    def summary(self, stage: str) -> dict[str, Any]:
        return self.state["stages"][stage]["summary"]

    def run(self, stage: str, body: Callable[[], dict[str, Any]], log: Callable[[str], None]) -> dict[str, Any]:
        if self.done(stage):
            log(f"[{stage}] already done, skipping")
        else:
            for upstream in stage_spec(stage).reads:
                self.verify(upstream)
            self._start(stage, log)
            log(f"[{stage}] running")
            started = time.perf_counter()
            summary = body()
            seconds = time.perf_counter() - started
            self.state["stages"][stage] = {"seconds": round(seconds, 2), "summary": summary,
                                           "placement": self.placement, "outputs": stage_outputs(self.paths, stage)}
            self.verified.add(stage)
            self._invalidate_readers(stage, log)
            self.save()
            log(f"[{stage}] done in {seconds:.1f}s")
        # a resumed run logs the stages it skipped too, so its tracked run is complete
        entry = self.state["stages"][stage]
        self.tracker.log_metrics(stage, {**entry["summary"], "seconds": entry["seconds"]})
        return entry["summary"]

    def _invalidate_readers(self, stage: str, log: Callable[[str], None]) -> None:
        """A stage (re)built while stages that read it are marked done (their entry was kept when
        its own was deleted): they, and whatever reads them, are done again from the new files."""
        stale, found = {stage}, True
        while found:  # until no finished stage reads a stale one
            found = False
            for name in list(self.state["stages"]):
                if name not in stale and stale & set(stage_spec(name).reads):
                    del self.state["stages"][name]
                    self.verified.discard(name)
                    stale.add(name)
                    found = True
                    log(f"[{name}] read files of {stage} that were made again: to be done again")

    def verify(self, stage: str) -> None:
        """Refuse to read a finished stage's folder whose files changed since the stage wrote them
        (replaced by another run's, edited, or lost): its recorded file digests must match."""
        entry = self.state["stages"].get(stage)
        if entry is None or stage in self.verified or "outputs" not in entry:  # folders written before digests
            return
        check_outputs(self.paths, stage, entry["outputs"])
        self.verified.add(stage)

    def _start(self, stage: str, log: Callable[[str], None]) -> None:
        """Resume a stage's partial output only if it was started under this config and these finished
        stages; otherwise clear it, so that nothing computed from other inputs is kept (a deleted
        stages.json, a config change accepted since, upstream stages recomputed)."""
        lineage = json_digest([self.state["config_digest"],
                               {name: entry["summary"] for name, entry in self.state["stages"].items()}])
        started = self.state.setdefault("started", {})
        if started.get(stage) == lineage:
            return
        for folder in resumed_folders(stage):
            if (self.out / folder).exists():
                log(f"[{stage}] {self.out / folder} was written from other inputs: cleared")
                shutil.rmtree(self.out / folder)
        started[stage] = lineage
        self.save()

    def timings(self) -> dict[str, float]:
        return {name: entry["seconds"] for name, entry in self.state["stages"].items()}
