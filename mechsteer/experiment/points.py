"""One sweep point: its folder, the stages it shares with an earlier point of the same upstream
settings, and its run (with retries) down to one row of the sweep's results table.

Points that differ only in keys read after the directions are built (coefficients, windows,
policy, threshold, controls, ablations) share their upstream stages: the first point of each
such group runs them, the others start from hard-linked copies of its finished stage folders.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from mechsteer.core.provenance import recorded_path
from mechsteer.core.store import json_digest, write_json_atomic
from mechsteer.experiment.config import PLACEMENT_KEYS, TRACKING_KEYS, RunConfig
from mechsteer.experiment.keys import downstream_keys
from mechsteer.experiment.layout import SHARED_STAGES, STAGES_FILE, RunPaths
from mechsteer.experiment.pipeline import run_pipeline
from mechsteer.experiment.report import headline_metrics

# Keys read only after the directions exist: points differing only in these share the rest.
DOWNSTREAM_KEYS = downstream_keys(RunConfig)
@dataclass(frozen=True)
class SweepPoint:
    index: int
    overrides: dict[str, Any]
    config: RunConfig
    out: str  # this point's run folder
    upstream: str  # digest of the keys its shared stages depend on
    donor: str | None = None  # a run folder of the same upstream to start from
    refused: str | None = None  # why its config is refused: the point does not run (a failed row)


def point_id(overrides: dict[str, Any]) -> str:
    return json_digest(overrides, length=10)


def upstream_digest(config: RunConfig) -> str:
    """Digest of everything the shared stages read (all but downstream, naming and tracking keys)."""
    skipped = {*DOWNSTREAM_KEYS, "name", *TRACKING_KEYS, *PLACEMENT_KEYS}
    upstream = {key: value for key, value in asdict(config).items() if key not in skipped}
    return json_digest(upstream)


def seed_from_donor(point: SweepPoint) -> list[str]:
    """Start a fresh point folder from its donor's finished shared stages (hard links where the
    filesystem allows). Returns the stages taken; a folder with a run of its own is left alone."""
    out, donor = RunPaths(Path(point.out)), RunPaths(Path(point.donor or ""))
    if point.donor is None or out.stages_file.exists() or not donor.stages_file.exists():
        return []
    donor_state = json.loads(donor.stages_file.read_text())
    if upstream_digest(RunConfig.from_dict(donor_state["config"], check_values=False)) != point.upstream:
        raise ValueError(f"{donor} ran other upstream settings than point {point.index}; cannot share its stages")
    taken = {stage: entry for stage, entry in donor_state["stages"].items() if stage in SHARED_STAGES}
    for stage in taken:
        shutil.rmtree(out.stage(stage), ignore_errors=True)
        shutil.copytree(donor.stage(stage), out.stage(stage), copy_function=_link_or_copy)
    # The copies record their inputs relative to their own folders, so they read this point's files.
    write_json_atomic(out.shared_from, {"donor": recorded_path(donor.root, out.root), "stages": sorted(taken)})
    write_json_atomic(out.stages_file, {"config_digest": point.config.digest(), "config": asdict(point.config),
                                            "stages": taken})
    return sorted(taken)


def find_donor(point: SweepPoint, points_folder: Path) -> str | None:
    """Another point folder of the same upstream with the most shared stages done, if any."""
    best, best_count = None, 0
    for stages_file in sorted(points_folder.glob(f"*/{STAGES_FILE}")):
        if stages_file.parent == Path(point.out):
            continue
        state = json.loads(stages_file.read_text())
        if upstream_digest(RunConfig.from_dict(state["config"], check_values=False)) != point.upstream:
            continue
        count = len(set(state["stages"]) & set(SHARED_STAGES))
        if count > best_count:
            best, best_count = str(stages_file.parent), count
    return best


def _link_or_copy(source: str, destination: str) -> str:
    try:
        os.link(source, destination)
    except OSError:  # another filesystem, or links not allowed: a real copy
        shutil.copy2(source, destination)
    return destination


def run_point(point: SweepPoint, retries: int) -> dict[str, Any]:
    """Run one point, retrying a failure ``retries`` times (each retry resumes the folder).

    Never raises for a failure inside the run: the row says ``status: failed``, the attempts and
    the last error; the full tracebacks are in the point's ``errors.log``."""
    out = Path(point.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    error = None
    for attempt in range(1, retries + 2):
        try:
            seed_from_donor(point)
            with (out / "run.log").open("a") as run_log:
                report = run_pipeline(point.config, out, log=lambda message: print(message, file=run_log, flush=True))
            return {**point_row(point), **headline_metrics(report), "status": "ok", "attempts": attempt,
                    "error": None, "seconds": round(time.perf_counter() - started, 2)}
        except Exception as failure:  # noqa: BLE001 - a failed point is reported, not raised
            error = f"{type(failure).__name__}: {failure}"
            with (out / "errors.log").open("a") as errors:
                errors.write(f"--- attempt {attempt}\n{traceback.format_exc()}\n")
    return failed_row(point, retries + 1, error, round(time.perf_counter() - started, 2))


def refused_row(point: SweepPoint) -> dict[str, Any]:
    """The results row of a point whose config is refused: failed, never attempted, nothing written."""
    return failed_row(point, 0, point.refused, 0.0)


def failed_row(point: SweepPoint, attempts: int, error: str | None, seconds: float | None) -> dict[str, Any]:
    """The results row of a point that failed every attempt (no metrics)."""
    return {**point_row(point), "status": "failed", "attempts": attempts, "error": error, "seconds": seconds}


def point_row(point: SweepPoint) -> dict[str, Any]:
    """The point's own columns; list values as JSON so that CSV and Parquet hold the same text."""
    row: dict[str, Any] = {"index": point.index, "point": Path(point.out).name}
    for key, value in point.overrides.items():
        row[key] = json.dumps(value) if isinstance(value, list | dict) else value
    return row
