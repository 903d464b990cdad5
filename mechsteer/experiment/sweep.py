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
such group runs them, the others start from hard-linked copies of its finished stage folders.

``results.csv``, ``results.parquet`` and ``results.png`` are written atomically into ``OUT``.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import shutil
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol, get_type_hints

import yaml

from mechsteer.experiment.pipeline import TRACKING_KEYS, RunConfig, headline_metrics, run_pipeline
from mechsteer.core.store import json_digest, write_json_atomic
from mechsteer.experiment.tracking import wandb_directories, wandb_environment

SWEEP_KEYS = {"name", "base", "overrides", "grid", "list", "executor", "retries", "resources", "ray", "wandb"}
EXECUTORS = ("local", "ray")
# Keys a sweep may not vary: the sweep names its points and groups their wandb runs.
RESERVED_KEYS = ("name", "wandb_group")
# Keys read only after the directions exist: points differing only in these share the rest.
DOWNSTREAM_KEYS = ("coefficients", "windows", "policy", "threshold", "controls", "ablations", "ablation_contexts")
# The stages such points share, and the folders each one writes (mechsteer.experiment.pipeline's layout).
SHARED_STAGES: dict[str, tuple[str, ...]] = {
    "traces_thinking_train": ("traces/thinking_train",),
    "traces_base_train": ("traces/base_train",),
    "activations": ("activations",),
    "taxonomy": ("taxonomy",),
    "directions": ("directions",),
    "eval_base": ("eval/base",),
    "eval_thinking": ("eval/thinking",),
}
STATUS_COLUMNS = ("status", "attempts", "error", "seconds")
# Environment a Ray worker inherits from the driver: offline switches, caches, wandb's folders.
FORWARDED_ENVIRONMENT = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "HF_HOME", "WANDB_MODE",
                         "WANDB_PROJECT", "WANDB_ENTITY")
# A local Ray cluster only moves result rows through its object store.
LOCAL_OBJECT_STORE_BYTES = 100 * 1024 * 1024


# ------------------------------------------------------------------------------------------
# The sweep file


@dataclass
class SweepSpec:
    name: str
    base: dict[str, Any]  # a RunConfig as a mapping
    overrides: dict[str, Any] = field(default_factory=dict)
    grid: dict[str, list[Any]] = field(default_factory=dict)
    points: list[dict[str, Any]] = field(default_factory=list)  # the file's `list:`
    executor: str = "local"
    retries: int = 0
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    ray_address: str | None = None
    ray_num_cpus: int | None = None  # size of a local cluster (default: the machine's CPUs)
    wandb: bool = False
    source: str | None = None  # the sweep file, for the wandb export's command

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, relative_to: Path | None = None, source: str | None = None) -> SweepSpec:
        if not isinstance(data, dict):
            raise ValueError(f"a sweep file holds a mapping, got {type(data).__name__}")
        unknown = sorted(set(data) - SWEEP_KEYS)
        if unknown:
            raise ValueError(f"unknown sweep keys {unknown}; known keys: {sorted(SWEEP_KEYS)}")
        for key in ("name", "base"):
            if key not in data:
                raise ValueError(f"a sweep needs {key!r}")
        base = data["base"]
        if isinstance(base, str):
            path = Path(base) if relative_to is None or Path(base).is_absolute() else relative_to / base
            base = yaml.safe_load(path.read_text()) or {}
        if not isinstance(base, dict):
            raise ValueError("sweep 'base' must be a RunConfig YAML path or a mapping of RunConfig keys")
        resources = data.get("resources") or {}
        ray = data.get("ray") or {}
        for section, values, known in (("resources", resources, {"num_cpus", "num_gpus"}),
                                       ("ray", ray, {"address", "num_cpus"})):
            if not isinstance(values, dict) or set(values) - known:
                raise ValueError(f"sweep {section!r} takes a mapping of {sorted(known)}, got {values!r}")
        grid = data.get("grid") or {}
        points = data.get("list") or []
        if not isinstance(grid, dict) or not all(isinstance(v, list) and v for v in grid.values()):
            raise ValueError("sweep 'grid' maps each config key to a non-empty list of values")
        if not isinstance(points, list) or not all(isinstance(p, dict) for p in points):
            raise ValueError("sweep 'list' is a list of mappings (config key -> value), one per point")
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
        return cls.from_dict(yaml.safe_load(path.read_text()), relative_to=path.parent, source=str(path.resolve()))

    def validate(self) -> None:
        """Every key and value checked against RunConfig before anything runs."""
        if self.executor not in EXECUTORS:
            raise ValueError(f"sweep executor must be one of {EXECUTORS}, got {self.executor!r}")
        if self.retries < 0:
            raise ValueError(f"sweep retries must be >= 0, got {self.retries}")
        if self.num_cpus < 0 or self.num_gpus < 0:
            raise ValueError("sweep resources num_cpus and num_gpus must be >= 0")
        _check_values("base", self.base, reserved=())
        _check_values("overrides", self.overrides, reserved=RESERVED_KEYS)
        for key, values in self.grid.items():
            for value in values:
                _check_values("grid", {key: value}, reserved=(*RESERVED_KEYS, *TRACKING_KEYS))
        for index, point in enumerate(self.points):
            _check_values(f"list[{index}]", point, reserved=(*RESERVED_KEYS, *TRACKING_KEYS))
        if not self.expand():
            raise ValueError("the sweep has no points: give a 'grid' and/or a 'list'")
        for overrides in self.expand():
            RunConfig.from_dict({**self.base, **self.overrides, **overrides})

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


def _check_values(where: str, values: dict[str, Any], *, reserved: tuple[str, ...]) -> None:
    from beartype import BeartypeConf
    from beartype.door import is_bearable

    hints = get_type_hints(RunConfig)
    unknown = sorted(set(values) - set(hints))
    if unknown:
        raise ValueError(f"sweep {where}: unknown config keys {unknown}; known keys: {sorted(hints)}")
    for key, value in values.items():
        if key in reserved:
            raise ValueError(f"sweep {where}: {key!r} cannot be set here (the sweep sets it for every point)")
        if not is_bearable(value, hints[key], conf=BeartypeConf(is_pep484_tower=True)):
            example = " (one list per point, e.g. [[0.5], [1.0]])" if str(hints[key]).startswith("list") else ""
            raise ValueError(f"sweep {where}: {key} = {value!r} is not a {hints[key]}{example}")


# ------------------------------------------------------------------------------------------
# Points


@dataclass(frozen=True)
class SweepPoint:
    index: int
    overrides: dict[str, Any]
    config: RunConfig
    out: str  # this point's run folder
    upstream: str  # digest of the keys its shared stages depend on
    donor: str | None = None  # a run folder of the same upstream to start from


def point_id(overrides: dict[str, Any]) -> str:
    return json_digest(overrides, length=10)


def upstream_digest(config: RunConfig) -> str:
    """Digest of everything the shared stages read (all but downstream, naming and tracking keys)."""
    skipped = {*DOWNSTREAM_KEYS, "name", *TRACKING_KEYS}
    upstream = {key: value for key, value in asdict(config).items() if key not in skipped}
    return json_digest(upstream)


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
        config = RunConfig.from_dict(data)
        points.append(SweepPoint(index=index, overrides=overrides, config=config,
                                 out=str(out / "points" / identifier), upstream=upstream_digest(config)))
    ids = [Path(point.out).name for point in points]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise ValueError(f"sweep {spec.name}: some points repeat the same overrides ({duplicates})")
    return points


def phases(points: list[SweepPoint]) -> tuple[list[SweepPoint], list[SweepPoint]]:
    """First the first point of each upstream group; then the rest, each starting from its leader."""
    leaders: dict[str, SweepPoint] = {}
    followers = []
    for point in points:
        if point.upstream in leaders:
            followers.append(dataclasses.replace(point, donor=leaders[point.upstream].out))
        else:
            leaders[point.upstream] = point
    return list(leaders.values()), followers


def seed_from_donor(point: SweepPoint) -> list[str]:
    """Start a fresh point folder from its donor's finished shared stages (hard links where the
    filesystem allows). Returns the stages taken; a folder with a run of its own is left alone."""
    out, donor = Path(point.out), Path(point.donor or "")
    if point.donor is None or (out / "stages.json").exists() or not (donor / "stages.json").exists():
        return []
    donor_state = json.loads((donor / "stages.json").read_text())
    if upstream_digest(RunConfig.from_dict(donor_state["config"])) != point.upstream:
        raise ValueError(f"{donor} ran other upstream settings than point {point.index}; cannot share its stages")
    taken = {stage: entry for stage, entry in donor_state["stages"].items() if stage in SHARED_STAGES}
    for stage in taken:
        for folder in SHARED_STAGES[stage]:
            shutil.rmtree(out / folder, ignore_errors=True)
            shutil.copytree(donor / folder, out / folder, copy_function=_link_or_copy)
    taxonomy_file = out / "taxonomy" / "taxonomy.json"
    if taxonomy_file.exists():  # point the taxonomy at this folder's own activations
        document = json.loads(taxonomy_file.read_text())
        provenance = document.get("provenance", {})
        if Path(provenance.get("activations_dir", "")).resolve() == (donor / "activations").resolve():
            provenance["activations_dir"] = str(out / "activations")
            write_json_atomic(taxonomy_file, document)  # a new file: the donor's link stays intact
    write_json_atomic(out / "shared_from.json", {"donor": str(donor), "stages": sorted(taken)})
    write_json_atomic(out / "stages.json", {"config_digest": point.config.digest(), "config": asdict(point.config),
                                            "stages": taken})
    return sorted(taken)


def find_donor(point: SweepPoint, points_folder: Path) -> str | None:
    """Another point folder of the same upstream with the most shared stages done, if any."""
    best, best_count = None, 0
    for stages_file in sorted(points_folder.glob("*/stages.json")):
        if stages_file.parent == Path(point.out):
            continue
        state = json.loads(stages_file.read_text())
        if upstream_digest(RunConfig.from_dict(state["config"])) != point.upstream:
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


def failed_row(point: SweepPoint, attempts: int, error: str | None, seconds: float | None) -> dict[str, Any]:
    """The results row of a point that failed every attempt (no metrics)."""
    return {**point_row(point), "status": "failed", "attempts": attempts, "error": error, "seconds": seconds}


def point_row(point: SweepPoint) -> dict[str, Any]:
    """The point's own columns; list values as JSON so that CSV and Parquet hold the same text."""
    row: dict[str, Any] = {"index": point.index, "point": Path(point.out).name}
    for key, value in point.overrides.items():
        row[key] = json.dumps(value) if isinstance(value, list | dict) else value
    return row


# ------------------------------------------------------------------------------------------
# Executors


class SweepExecutor(Protocol):
    """Runs points (each through :func:`run_point`) and returns one row per point, any order."""

    def run_points(self, points: list[SweepPoint], retries: int, report: Callable[[dict[str, Any]], None]
                   ) -> list[dict[str, Any]]: ...


class LocalExecutor:
    """One point after another, in this process."""

    def run_points(self, points, retries, report):
        rows = []
        for point in points:
            rows.append(run_point(point, retries))
            report(rows[-1])
        return rows


class RayExecutor:
    """One Ray task per point, with the sweep's CPU/GPU request; rows gathered to the driver.

    Connects to ``address`` when given, else starts a local cluster of ``num_cpus`` CPUs (and
    shuts down only a cluster it started). A worker that dies is retried by Ray ``retries``
    times and then reported as a failed row."""

    def __init__(self, *, point_cpus: float = 1.0, point_gpus: float = 0.0, address: str | None = None,
                 num_cpus: int | None = None, env_vars: dict[str, str] | None = None):
        self.point_cpus, self.point_gpus = point_cpus, point_gpus
        self.address, self.num_cpus = address, num_cpus
        # a task that asks for n CPUs gets n threads (torch would otherwise take every core)
        threads = str(max(1, int(point_cpus)))
        self.env_vars = {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads,
                         **{name: os.environ[name] for name in FORWARDED_ENVIRONMENT if name in os.environ},
                         **(env_vars or {})}

    @contextmanager
    def cluster(self) -> Iterator[None]:
        os.environ.setdefault("RAY_DISABLE_IMPORT_WARNING", "1")
        try:
            import ray
        except ImportError as missing:
            raise ValueError("the ray executor needs Ray: pip install 'mechsteer[ray]'") from missing
        started_here = not ray.is_initialized()
        if started_here:
            options: dict[str, Any] = dict(include_dashboard=False, log_to_driver=False,
                                           runtime_env={"env_vars": self.env_vars})
            if self.address is None:
                options.update(num_cpus=self.num_cpus or os.cpu_count(), object_store_memory=LOCAL_OBJECT_STORE_BYTES)
            ray.init(address=self.address, **options)
        try:
            yield
        finally:
            if started_here:
                ray.shutdown()

    def run_points(self, points, retries, report):
        import ray
        from ray.exceptions import RayError

        task = ray.remote(num_cpus=self.point_cpus, num_gpus=self.point_gpus, max_retries=retries)(run_point)
        pending = {task.options(runtime_env={"env_vars": self.env_vars}).remote(point, retries): point
                   for point in points}
        rows = []
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            point = pending.pop(ready[0])
            try:
                row = ray.get(ready[0])
            except RayError as failure:  # the worker itself died, past Ray's own retries
                row = failed_row(point, retries + 1, f"{type(failure).__name__}: {failure}"[:2000], None)
            rows.append(row)
            report(row)
        return rows


def make_executor(spec: SweepSpec, out: Path) -> tuple[SweepExecutor, Any]:
    """The executor and the context it runs in (a Ray cluster, or nothing)."""
    if spec.executor == "local":
        return LocalExecutor(), nullcontext()
    env_vars = {}
    if spec.wandb or spec.base.get("wandb"):
        env_vars = {name: os.environ.get(name, value) for name, value in wandb_directories(out / "wandb").items()}
    executor = RayExecutor(point_cpus=spec.num_cpus, point_gpus=spec.num_gpus, address=spec.ray_address,
                           num_cpus=spec.ray_num_cpus, env_vars=env_vars)
    return executor, executor.cluster()


# ------------------------------------------------------------------------------------------
# The sweep


def run_sweep(spec: SweepSpec, out: str | Path, *, log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Run every point (resuming finished work), write the results table and plot; return the rows."""
    out = Path(out).resolve()
    points = plan_points(spec, out)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "sweep.json", {"spec": asdict(spec), "points": [
        {"index": p.index, "overrides": p.overrides, "out": p.out, "upstream": p.upstream} for p in points]})
    leaders, followers = phases(points)
    log(f"sweep {spec.name}: {len(points)} points ({len(leaders)} upstream groups), executor {spec.executor}")

    def report(row: dict[str, Any]) -> None:
        detail = f"hybrid {row.get('hybrid_accuracy')}" if row["status"] == "ok" else row["error"]
        log(f"  point {row['index']} ({row['point']}): {row['status']} after {row['attempts']} attempt(s); {detail}")

    tracking = any(point.config.wandb for point in points)
    executor, context = make_executor(spec, out)
    with wandb_environment(out / "wandb") if tracking else nullcontext(), context:
        rows = executor.run_points(leaders, spec.retries, report)
        rows += executor.run_points(followers, spec.retries, report)
        rows.sort(key=lambda row: row["index"])
        write_results(rows, out, title=spec.name, override_keys=spec.swept_keys())
        if tracking:
            _track_results(spec, points[0].config, rows, out)
    return rows


def _track_results(spec: SweepSpec, config: RunConfig, rows: list[dict[str, Any]], out: Path) -> None:
    from mechsteer.experiment.tracking import WandbTracker

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
    import csv

    import pyarrow
    import pyarrow.parquet

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
    point = dataclasses.replace(point, donor=find_donor(point, Path(out) / "points"))
    with wandb_environment(Path(out) / "wandb"):
        return run_point(point, retries=0)


# ------------------------------------------------------------------------------------------
# CLI


def sweep_cli(args: argparse.Namespace) -> int:
    spec = SweepSpec.from_yaml(args.config)
    if args.executor:
        spec = dataclasses.replace(spec, executor=args.executor)
    if args.ray_address:
        spec = dataclasses.replace(spec, ray_address=args.ray_address)
    if args.wandb:
        spec = dataclasses.replace(spec, wandb=True)
    spec.validate()
    out = Path(args.out or Path("runs") / "sweeps" / spec.name)
    if args.export_wandb:
        Path(args.export_wandb).write_text(yaml.safe_dump(wandb_sweep_config(spec, out), sort_keys=False))
        print(json.dumps({"wandb_sweep": args.export_wandb, "run_it": f"wandb sweep {args.export_wandb}"}))
        return 0
    if args.point:
        row = run_one_point(spec, out, json.loads(Path(args.point).read_text()))
        print(json.dumps(row, default=str))
        return 0 if row["status"] == "ok" else 1
    rows = run_sweep(spec, out)
    failed = sum(row["status"] != "ok" for row in rows)
    print(json.dumps({"results": str(out / "results.csv"), "points": len(rows), "failed": failed}))
    return 0 if failed == 0 else 1


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "sweep", help="run the pipeline over a grid/list of config values (exits 1 if any point failed)")
    parser.add_argument("--config", required=True, help="experiments/sweeps/<name>.yaml")
    parser.add_argument("--out", default=None, help="sweep folder (default runs/sweeps/<name>)")
    parser.add_argument("--executor", choices=EXECUTORS, default=None, help="override the file's executor")
    parser.add_argument("--ray-address", default=None, help="connect to this Ray cluster instead of starting one")
    parser.add_argument("--wandb", action="store_true", help="log every point as a wandb run, grouped by sweep")
    parser.add_argument("--export-wandb", metavar="FILE", default=None,
                        help="write a wandb sweep YAML (grid) for wandb agents instead of running")
    parser.add_argument("--point", metavar="JSON_FILE", default=None,
                        help="run one point with these overrides (what the exported wandb sweep calls)")
    parser.set_defaults(func=sweep_cli)
