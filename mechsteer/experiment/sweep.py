"""Sweeps: the pipeline over a grid or a list of config values, gathered into one results table.

A sweep file (``experiments/sweeps/<name>.yaml``)::

    name: organism-coefficients
    base: ../organism-demo.yaml      # a RunConfig YAML (relative to this file) or an inline mapping
    overrides: {n_eval: 100}         # optional: set on every point
    grid:                            # cartesian product over any RunConfig keys
      coefficients: [[0.5], [1.0]]   # list-valued keys take one list per point
      policy: [sae_argmax, threshold]
    list:                            # explicit points, run after the grid's
      - {seed: 1, n_latents: [6]}
    executor: local                  # local | ray
    retries: 1                       # a failing point is tried 1 + retries times
    resources: {num_cpus: 1, num_gpus: 0}   # per point (ray)
    ray: {address: null, num_cpus: 2}       # connect to address, else start a local cluster
    wandb: false                     # log each point as a wandb run, all in one group

Every point runs in its own folder ``OUT/points/<id>`` (resumable like any run) and yields one
row of the results table: the point's overrides, the report's headline metrics, and its status,
attempts and error. A point that keeps failing is reported as a failed row; the others finish.

Points that differ only in keys read after the directions are built (coefficients, windows,
policy, threshold, controls, ablations) share their upstream stages: the first point of each
such group runs them, the others start from hard-linked copies of its finished stage folders
(:mod:`mechsteer.experiment.points`). The points run on an executor
(:mod:`mechsteer.experiment.executors`).

``results.csv``, ``results.parquet``, ``results.png`` and ``report.md`` (the points as one table, with
the plot) are written atomically into ``OUT``; ``mechsteer report OUT`` rewrites the report.
"""

from __future__ import annotations

import csv
import dataclasses
import itertools
import json
import os
import re
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Any

import pyarrow
import pyarrow.parquet

from mechsteer.core.errors import ConfigError
from mechsteer.core.provenance import recorded_path
from mechsteer.core.store import read_json, write_json_atomic, write_text_atomic
from mechsteer.core.validation import Range, check_fields, describe, field_hints, join_problems
from mechsteer.experiment.config import TRACKING_KEYS, RunConfig, read_yaml_mapping
from mechsteer.experiment.executors import EXECUTORS, ExecutorKind, make_executor
from mechsteer.experiment.keys import sweep_reserved_keys
from mechsteer.experiment.layout import REPORT_MD, RunPaths
from mechsteer.experiment.markdown import sweep_markdown
from mechsteer.experiment.points import (
    SweepPoint,
    find_donor,
    point_id,
    refused_row,
    run_point,
    upstream_digest,
)
from mechsteer.experiment.report import headline_metrics
from mechsteer.experiment.tracking import WandbTracker, wandb_environment

SWEEP_KEYS = {"name", "base", "overrides", "grid", "list", "executor", "retries", "resources", "ray", "wandb"}
# Keys a sweep may not vary: the sweep names its points and groups their wandb runs.
RESERVED_KEYS = sweep_reserved_keys(RunConfig)
SWEEP_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")
STATUS_COLUMNS = ("status", "attempts", "error", "seconds")


@dataclass
class SweepSpec:
    name: str
    base: dict[str, Any]  # a RunConfig as a mapping
    overrides: dict[str, Any] = field(default_factory=dict)
    grid: dict[str, list[Any]] = field(default_factory=dict)
    points: list[dict[str, Any]] = field(default_factory=list)  # the file's `list:`
    executor: ExecutorKind = "local"
    retries: int = 0
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    ray_address: str | None = None
    ray_num_cpus: int | None = None  # size of a local cluster (default: the machine's CPUs)
    wandb: bool = False
    source: str | None = None  # the sweep file, for the wandb export's command

    @classmethod
    def from_dict(cls, data: Any, *, relative_to: Path | None = None, source: str | None = None) -> SweepSpec:
        if not isinstance(data, dict):
            raise ConfigError(f"a sweep file holds a mapping, got {type(data).__name__}")
        unknown = sorted(set(data) - SWEEP_KEYS)
        if unknown:
            raise ConfigError(f"unknown sweep keys {unknown}; known keys: {sorted(SWEEP_KEYS)}")
        for key in ("name", "base"):
            if key not in data:
                raise ConfigError(f"a sweep needs {key!r}")
        name = data["name"]
        if not isinstance(name, str) or not SWEEP_NAME.fullmatch(name) or name.strip(".") == "":
            # the name is a folder under runs/sweeps/: a path would write the sweep elsewhere
            raise ConfigError(f"sweep name {name!r} is not a plain name: use letters, digits, '.', '_' and '-' "
                              "(no '/', no leading '.'); choose the folder with --out")
        base = data["base"]
        if isinstance(base, str):
            path = Path(base) if relative_to is None or Path(base).is_absolute() else relative_to / base
            base = read_yaml_mapping(path, "run config")
        if not isinstance(base, dict):
            raise ConfigError("sweep 'base' must be a RunConfig YAML path or a mapping of RunConfig keys")
        resources = data.get("resources") or {}
        ray = data.get("ray") or {}
        for section, values, known in (("resources", resources, {"num_cpus", "num_gpus"}),
                                       ("ray", ray, {"address", "num_cpus"})):
            if not isinstance(values, dict) or set(values) - known:
                raise ConfigError(f"sweep {section!r} takes a mapping of {sorted(known)}, got {values!r}")
        grid = data.get("grid") or {}
        points = data.get("list") or []
        if not isinstance(grid, dict) or not all(isinstance(v, list) and v for v in grid.values()):
            raise ConfigError("sweep 'grid' maps each config key to a non-empty list of values")
        if not isinstance(points, list) or not all(isinstance(p, dict) for p in points):
            raise ConfigError("sweep 'list' is a list of mappings (config key -> value), one per point")
        problems = check_fields(SweepFileValues, {key: data[key] for key in ("retries", "wandb") if key in data},
                                partial=True, noun="sweep keys")
        problems += check_fields(SweepFileValues, {"num_cpus": resources.get("num_cpus", 1),
                                                   "num_gpus": resources.get("num_gpus", 0),
                                                   "ray_num_cpus": ray.get("num_cpus")}, partial=True)
        if problems:
            raise ConfigError(f"sweep: {join_problems(problems)}")
        spec = cls(name=str(data["name"]), base=dict(base), overrides=dict(data.get("overrides") or {}),
                   grid=dict(grid), points=[dict(p) for p in points], executor=data.get("executor", "local"),
                   retries=int(data.get("retries", 0)), num_cpus=float(resources.get("num_cpus", 1)),
                   num_gpus=float(resources.get("num_gpus", 0)), ray_address=ray.get("address"),
                   ray_num_cpus=ray.get("num_cpus"), wandb=bool(data.get("wandb", False)), source=source)
        spec.validate()
        return spec

    @classmethod
    def from_yaml(cls, path: str | Path) -> SweepSpec:
        path = Path(path)
        try:
            return cls.from_dict(read_yaml_mapping(path, "sweep"), relative_to=path.parent,
                                 source=str(path.resolve()))
        except ConfigError as error:
            raise ConfigError(f"{path}: {error}" if not str(error).startswith(str(path)) else str(error)) from None

    def validate(self) -> None:
        """Every key and the type of every value checked against RunConfig before anything runs.

        A value of the right type that a point's config refuses (an unknown choice, a number out
        of range) does not stop the sweep: that point is reported as a failed row without running
        (:func:`plan_points`), and the others run."""
        if self.executor not in EXECUTORS:
            raise ConfigError(f"sweep executor must be one of {EXECUTORS}, got {self.executor!r}")
        if self.retries < 0:
            raise ConfigError(f"sweep retries must be >= 0, got {self.retries}")
        if self.num_cpus < 0 or self.num_gpus < 0:
            raise ConfigError("sweep resources num_cpus and num_gpus must be >= 0")
        _check_values("base", self.base, reserved=())
        _check_values("overrides", self.overrides, reserved=RESERVED_KEYS)
        for key, values in self.grid.items():
            for value in values:
                _check_values("grid", {key: value}, reserved=(*RESERVED_KEYS, *TRACKING_KEYS))
        for index, point in enumerate(self.points):
            _check_values(f"list[{index}]", point, reserved=(*RESERVED_KEYS, *TRACKING_KEYS))
        if not self.expand():
            raise ConfigError("the sweep has no points: give a 'grid' and/or a 'list'")
        for overrides in self.expand():
            RunConfig.from_dict({**self.base, **self.overrides, **overrides}, check_values=False)

    def swept_keys(self) -> list[str]:
        """The keys the points vary: the grid's, then any new ones from the list."""
        keys = list(self.grid)
        for point in self.points:
            keys += [key for key in point if key not in keys]
        return keys

    def expand(self) -> list[dict[str, Any]]:
        """The points' overrides: the grid's cartesian product (in file order), then the list."""
        keys = list(self.grid)
        grid_points = [dict(zip(keys, values, strict=True))
                       for values in itertools.product(*(self.grid[key] for key in keys))] if keys else []
        return grid_points + [dict(point) for point in self.points]


@dataclass
class SweepFileValues:
    """The types of a sweep file's own scalar settings (checked like a RunConfig's keys)."""

    retries: Annotated[int, Range(min=0)] = 0
    wandb: bool = False
    num_cpus: Annotated[float, Range(min=0)] = 1.0
    num_gpus: Annotated[float, Range(min=0)] = 0.0
    ray_num_cpus: Annotated[int, Range(min=1)] | None = None


def _check_values(where: str, values: dict[str, Any], *, reserved: tuple[str, ...]) -> None:
    """Keys and types of config values (their allowed values are checked per point: a point
    with a refused value becomes a failed row, and the sweep goes on)."""
    for key in values:
        if key in reserved:
            raise ConfigError(f"sweep {where}: {key!r} cannot be set here (the sweep sets it for every point)")
    problems = [problem for problem in check_fields(RunConfig, values, partial=True, noun="config keys")
                if problem.kind == "type"]
    if problems:
        hints = field_hints(RunConfig)
        example = " (one list per point, e.g. [[0.5], [1.0]])" if any(
            describe(hints.get(problem.key, None)).startswith("list") for problem in problems) else ""
        raise ConfigError(f"sweep {where}: {join_problems(problems)}{example}")


# ------------------------------------------------------------------------------------------
# Points


def plan_points(spec: SweepSpec, out: str | Path) -> list[SweepPoint]:
    out = Path(out).resolve()
    points = []
    for index, overrides in enumerate(spec.expand()):
        identifier = point_id(overrides)
        data = {**spec.base, **spec.overrides, **overrides, "name": f"{spec.name}-{identifier}"}
        if spec.wandb:
            data["wandb"] = True
        if data.get("wandb"):
            data["wandb_group"] = spec.name
        config = RunConfig.from_dict(data, check_values=False)
        problems = config.problems()  # a refused point becomes a failed row; the others run
        points.append(SweepPoint(index=index, overrides=overrides, config=config,
                                 out=str(out / "points" / identifier), upstream=upstream_digest(config),
                                 refused=f"ConfigError: {join_problems(problems)}" if problems else None))
    ids = [Path(point.out).name for point in points]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise ValueError(f"sweep {spec.name}: some points repeat the same overrides ({duplicates})")
    return points


def phases(points: list[SweepPoint]) -> tuple[list[SweepPoint], list[SweepPoint]]:
    """First the first point of each upstream group; then the rest, each starting from its leader.
    Refused points are in neither: they do not run."""
    leaders: dict[str, SweepPoint] = {}
    followers = []
    for point in points:
        if point.refused is not None:
            continue
        if point.upstream in leaders:
            followers.append(dataclasses.replace(point, donor=leaders[point.upstream].out))
        else:
            leaders[point.upstream] = point
    return list(leaders.values()), followers


# ------------------------------------------------------------------------------------------
# The sweep


def run_sweep(spec: SweepSpec, out: str | Path, *, log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Run every point (resuming finished work), write the results table and plot; return the rows."""
    out = Path(out).resolve()
    points = plan_points(spec, out)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "sweep.json", {"spec": asdict(spec), "points": [
        {"index": p.index, "overrides": p.overrides, "out": recorded_path(p.out, out), "upstream": p.upstream}
        for p in points]})
    leaders, followers = phases(points)
    log(f"sweep {spec.name}: {len(points)} points ({len(leaders)} upstream groups), executor {spec.executor}")

    def report(row: dict[str, Any]) -> None:
        detail = f"hybrid {row.get('hybrid_accuracy')}" if row["status"] == "ok" else row["error"]
        log(f"  point {row['index']} ({row['point']}): {row['status']} after {row['attempts']} attempt(s); {detail}")

    tracking = any(point.config.wandb for point in points)
    executor, context = make_executor(
        spec.executor, point_cpus=spec.num_cpus, point_gpus=spec.num_gpus, address=spec.ray_address,
        num_cpus=spec.ray_num_cpus, wandb_root=out / "wandb" if spec.wandb or spec.base.get("wandb") else None)
    with wandb_environment(out / "wandb") if tracking else nullcontext(), context:
        rows = [refused_row(point) for point in points if point.refused is not None]
        for row in rows:
            report(row)
        rows += executor.run_points(leaders, spec.retries, report)
        rows += executor.run_points(followers, spec.retries, report)
        rows.sort(key=lambda row: row["index"])
        write_results(rows, out, title=spec.name, override_keys=spec.swept_keys())
        if tracking:
            _track_results(spec, points[0].config, rows, out)
    return rows


def _track_results(spec: SweepSpec, config: RunConfig, rows: list[dict[str, Any]], out: Path) -> None:
    tracker = WandbTracker(out=out, name=f"{spec.name}-results", project=config.wandb_project, group=spec.name,
                           mode=config.wandb_mode, config={"sweep": asdict(spec)})
    tracker.log_table("sweep_results", rows)
    tracker.log_image("sweep_results", out / "results.png")
    tracker.finish()


def results_columns(rows: list[dict[str, Any]], override_keys: list[str]) -> list[str]:
    """index, point, the swept keys, the metrics (first-seen order), then status columns."""
    columns: list[str] = ["index", "point", *override_keys]
    for row in rows:
        columns += [key for key in row if key not in columns and key not in STATUS_COLUMNS]
    return columns + list(STATUS_COLUMNS)


def write_results(rows: list[dict[str, Any]], out: Path, *, title: str, override_keys: list[str]) -> None:
    """results.csv, results.parquet and results.png, each written beside and renamed into place."""
    columns = results_columns(rows, override_keys)
    table = [{column: row.get(column) for column in columns} for row in rows]

    def write_csv(path: Path) -> None:
        with path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns)
            writer.writeheader()
            writer.writerows(table)

    for name, write in (("results.csv", write_csv),
                        ("results.parquet", lambda path: pyarrow.parquet.write_table(
                            pyarrow.Table.from_pylist(table), path)),
                        ("results.png", lambda path: plot_results(rows, path, title, override_keys))):
        staging = out / f".{name}.partial"
        write(staging)
        os.replace(staging, out / name)
    # from the table as written, as `mechsteer report` reads it: both give the same report.md
    write_text_atomic(out / REPORT_MD, sweep_markdown(title, _read_results(out), override_keys, plot=True))


def rebuild_sweep_report(out: str | Path) -> list[str]:
    """Rewrite a sweep folder's report.md (and its plot) from what is on disk; nothing reruns.

    A finished sweep is read from results.parquet; before the sweep has written it, each point
    from its own report.json. Returns the points not finished."""
    out = Path(out)
    plan = read_json(out / "sweep.json", "sweep's plan (sweep.json; is this a sweep folder?)")
    spec = SweepSpec(**plan["spec"])
    swept = spec.swept_keys()
    if (out / "results.parquet").is_file():
        rows = _read_results(out)
        staging = out / ".results.png.partial"
        plot_results(rows, staging, spec.name, swept)
        os.replace(staging, out / "results.png")
        write_text_atomic(out / REPORT_MD, sweep_markdown(spec.name, rows, swept, plot=True))
        return []
    rows, missing = [], []
    for point in plan["points"]:
        folder = out / "points" / Path(point["out"]).name
        row: dict[str, Any] = {"index": point["index"], "point": folder.name}
        row.update({key: json.dumps(value) if isinstance(value, list | dict) else value
                    for key, value in point["overrides"].items()})
        report = RunPaths(folder).report_json
        if report.is_file():
            row.update({**headline_metrics(read_json(report, "point's report")), "status": "ok"})
        else:
            missing.append(folder.name)
            row["status"] = "not finished"
        rows.append(row)
    write_text_atomic(out / REPORT_MD, sweep_markdown(spec.name, rows, swept, missing=missing))
    return missing


def _read_results(out: Path) -> list[dict[str, Any]]:
    return pyarrow.parquet.read_table(out / "results.parquet").to_pylist()


def plot_results(rows: list[dict[str, Any]], path: Path, title: str, override_keys: list[str]) -> None:
    """Hybrid accuracy per point against the base and thinking accuracies; failed points marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [", ".join(f"{key}={row[key]}" for key in override_keys if row.get(key) is not None) or row["point"]
              for row in rows]
    positions = range(len(rows))
    failed = [row["status"] != "ok" for row in rows]
    figure, axis = plt.subplots(figsize=(max(6.0, 0.7 * len(rows) + 3), 4.5))
    axis.bar(positions, [0.0 if bad else row["hybrid_accuracy"] for row, bad in zip(rows, failed, strict=True)],
             color=["#d44" if bad else "#26a" for bad in failed], label="hybrid accuracy")
    for position, bad in zip(positions, failed, strict=True):
        if bad:
            axis.text(position, 0.02, "failed", ha="center", va="bottom", rotation=90, color="#d44")
    for column, colour in (("base_accuracy", "#888"), ("thinking_accuracy", "#2a6")):
        values = [row.get(column) for row in rows]
        axis.plot(positions, [float("nan") if v is None else v for v in values], "_", color=colour,
                  markersize=18, markeredgewidth=2, label=column.replace("_", " "))
    axis.set_xticks(list(positions), labels, rotation=30, ha="right", fontsize=7)
    axis.set_ylim(0, 1)
    axis.set_ylabel("accuracy")
    axis.set_title(f"sweep {title}")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110, format="png")
    plt.close(figure)


# ------------------------------------------------------------------------------------------
# wandb agents


def wandb_sweep_config(spec: SweepSpec, out: str | Path) -> dict[str, Any]:
    """A wandb sweep (method grid) whose agent runs one point per call of
    ``mechsteer sweep --config FILE --out OUT --point ARGS.json``."""
    if spec.source is None:
        raise ValueError("exporting a wandb sweep needs the sweep loaded from a file (its path is in the command)")
    if spec.points:
        raise ValueError(f"sweep {spec.name} has explicit 'list' points, which wandb's grid method cannot "
                         "express; export a grid-only sweep")
    if not spec.grid:
        raise ValueError(f"sweep {spec.name} has no grid to export")
    base = RunConfig.from_dict({**spec.base, **spec.overrides})
    return {
        "name": spec.name,
        "project": base.wandb_project,
        "method": "grid",
        "parameters": {key: {"values": values} for key, values in spec.grid.items()},
        "command": ["${env}", "mechsteer", "sweep", "--config", spec.source, "--out", str(Path(out).resolve()),
                    "--point", "${args_json_file}"],
    }


def run_one_point(spec: SweepSpec, out: str | Path, overrides: dict[str, Any]) -> dict[str, Any]:
    """Run the point with these overrides (a wandb agent's call), tracked, in the sweep's folder.

    It starts from any finished point folder there with the same upstream settings. One attempt
    only: the agent owns the wandb run (WANDB_RUN_ID), and reruns failed points itself."""
    _check_values("point", overrides, reserved=(*RESERVED_KEYS, *TRACKING_KEYS))
    single = dataclasses.replace(spec, grid={}, points=[overrides], wandb=True)
    point = plan_points(single, out)[0]
    if point.refused is not None:
        return refused_row(point)
    point = dataclasses.replace(point, donor=find_donor(point, Path(out) / "points"))
    with wandb_environment(Path(out) / "wandb"):
        return run_point(point, retries=0)
