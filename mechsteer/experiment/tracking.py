"""Experiment tracking: the one wandb switch for every stage.

Tracking is off by default (``RunConfig.wandb = False``): :func:`open_tracker` then returns a
:class:`NullTracker` and wandb is never imported. Switched on, a :class:`WandbTracker` logs what
``run_pipeline`` hands it: the config at the start, each stage's summary as the stage finishes,
the report's tables (as ``wandb.Table``), its plots, and the artefacts (taxonomy, direction set,
report). Runs are grouped by experiment (``wandb_group``, default: the config's name).

Directory hygiene: wandb writes to the home folder by default (``~/.cache/wandb`` for the
service's logs and the artifact cache, ``~/.local/share/wandb`` for artifact staging,
``~/.config/wandb`` for settings). While a run is tracked, every directory variable wandb
honours that the user has not set points under ``<out>/wandb/`` instead, and is restored when
the run finishes. The run's own files land in ``<out>/wandb/wandb/<offline-|>run-*/``.

:func:`read_run_files` reads a run's ``.wandb`` transaction log back (config, group, name), so
the logged config can rebuild the ``RunConfig`` that ran.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol, get_args, runtime_checkable

from mechsteer.experiment.config import RunConfig, WandbMode

# Every directory variable wandb 0.31 reads (wandb/env.py), and the subfolder of
# ``<out>/wandb`` it gets while tracking. Their home-folder defaults are noted.
WANDB_DIRECTORY_VARIABLES: dict[str, str] = {
    "WANDB_DIR": ".",  # run files (default: the working directory)
    "WANDB_CACHE_DIR": "cache",  # artifact cache and wandb-core's debug logs (~/.cache/wandb)
    "WANDB_CONFIG_DIR": "config",  # the settings file (~/.config/wandb)
    "WANDB_DATA_DIR": "data",  # artifact staging (~/.local/share/wandb)
    "WANDB_ARTIFACT_DIR": "artifacts",  # downloaded artifacts (./artifacts)
}
WANDB_MODES: tuple[str, ...] = get_args(WandbMode)
TRACKING_FOLDER = "wandb"


@runtime_checkable
class Tracker(Protocol):
    """What the pipeline and the sweep log; both implementations below honour it."""

    def log_config(self, config: Mapping[str, Any]) -> None: ...

    def log_metrics(self, stage: str, metrics: Mapping[str, Any]) -> None: ...

    def log_table(self, name: str, rows: list[dict[str, Any]]) -> None: ...

    def log_image(self, name: str, path: Path) -> None: ...

    def log_artifact(self, name: str, kind: str, paths: list[Path]) -> None: ...

    def finish(self, exit_code: int = 0) -> None: ...


class NullTracker:
    """Tracking switched off: every call does nothing."""

    def log_config(self, config: Mapping[str, Any]) -> None:
        pass

    def log_metrics(self, stage: str, metrics: Mapping[str, Any]) -> None:
        pass

    def log_table(self, name: str, rows: list[dict[str, Any]]) -> None:
        pass

    def log_image(self, name: str, path: Path) -> None:
        pass

    def log_artifact(self, name: str, kind: str, paths: list[Path]) -> None:
        pass

    def finish(self, exit_code: int = 0) -> None:
        pass


def wandb_directories(root: str | Path) -> dict[str, str]:
    """The directory variables wandb honours, each pointed at a subfolder of ``root``."""
    root = Path(root).resolve()
    return {name: str(root if sub == "." else root / sub) for name, sub in WANDB_DIRECTORY_VARIABLES.items()}


@contextmanager
def wandb_environment(root: str | Path) -> Iterator[dict[str, str]]:
    """Point every wandb directory variable the user left unset under ``root``; restore on exit.

    Yields the variables it set (the user's own settings are kept and not yielded)."""
    chosen = {name: value for name, value in wandb_directories(root).items() if name not in os.environ}
    for value in chosen.values():
        Path(value).mkdir(parents=True, exist_ok=True)
    os.environ.update(chosen)
    try:
        yield chosen
    finally:
        for name in chosen:
            os.environ.pop(name, None)


class WandbTracker:
    """One wandb run for one pipeline run (or one sweep point)."""

    def __init__(self, *, out: Path, name: str, project: str, group: str, mode: WandbMode | None,
                 config: Mapping[str, Any] | None = None):
        if mode is not None and mode not in WANDB_MODES:
            raise ValueError(f"wandb_mode must be one of {WANDB_MODES} or unset, got {mode!r}")
        self.out = Path(out)
        self._environment = wandb_environment(self.out / TRACKING_FOLDER)
        self._environment.__enter__()
        try:
            import wandb

            self._wandb = wandb
            self.run = wandb.init(
                project=project, group=group, name=name, job_type="run", mode=mode,
                config=dict(config or {}), dir=os.environ["WANDB_DIR"],
                # the pipeline prints its own log; wandb need not wrap stdout
                settings=wandb.Settings(console="off", silent=True),
                reinit="create_new",
            )
        except BaseException:
            self._environment.__exit__(None, None, None)
            raise
        self._step = 0

    def log_config(self, config: Mapping[str, Any]) -> None:
        self.run.config.update(dict(config), allow_val_change=True)

    def log_metrics(self, stage: str, metrics: Mapping[str, Any]) -> None:
        flat = flatten_metrics(metrics, prefix=stage)
        if flat:
            self.run.log(flat, step=self._next_step())

    def log_table(self, name: str, rows: list[dict[str, Any]]) -> None:
        columns, data = table_columns(rows)
        if columns:
            self.run.log({f"tables/{name}": self._wandb.Table(columns=list[str | int](columns), data=data)}, step=self._next_step())

    def log_image(self, name: str, path: Path) -> None:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"log_image({name!r}) expected an image file, {path} does not exist")
        self.run.log({f"plots/{name}": self._wandb.Image(str(path))}, step=self._next_step())

    def log_artifact(self, name: str, kind: str, paths: list[Path]) -> None:
        artifact = self._wandb.Artifact(artifact_name(name), type=kind)
        for path in map(Path, paths):
            if path.is_dir():
                artifact.add_dir(str(path), name=path.name)
            elif path.is_file():
                artifact.add_file(str(path), name=path.name)
            else:
                raise ValueError(f"artifact {name!r}: {path} is neither a file nor a folder")
        self.run.log_artifact(artifact)

    def finish(self, exit_code: int = 0) -> None:
        """Finish the run and wait until its log on disk is complete (see the module notes)."""
        try:
            log_file = None if self.run.settings.mode == "disabled" else Path(self.run.settings.sync_file)
            self.run.finish(exit_code=exit_code)
            if log_file is not None:
                wait_for_complete_log(log_file)
        finally:
            self._environment.__exit__(None, None, None)

    def _next_step(self) -> int:
        self._step += 1
        return self._step


def open_tracker(config: RunConfig, out: str | Path) -> Tracker:
    """A :class:`WandbTracker` if ``config.wandb`` is on, else a :class:`NullTracker`."""
    if not config.wandb:
        return NullTracker()
    return WandbTracker(out=Path(out), name=config.name, project=config.wandb_project,
                        group=config.wandb_group or config.name, mode=config.wandb_mode, config=asdict(config))


# ------------------------------------------------------------------------------------------
# Shaping values for wandb


def flatten_metrics(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """Numbers (and booleans, as 0/1) from nested dicts as ``prefix/key/subkey``; lists and
    strings are left out (they go to tables or the config)."""
    flat: dict[str, float] = {}
    for key, value in metrics.items():
        name = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            flat.update(flatten_metrics(value, name))
        elif isinstance(value, bool):
            flat[name] = float(value)
        elif isinstance(value, int | float) and math.isfinite(value):
            flat[name] = value
    return flat


def table_columns(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    """Columns (the union of the rows' keys, first-seen order) and cells; nested values as JSON."""
    columns: list[str] = []
    for row in rows:
        columns += [key for key in row if key not in columns]

    def cell(value: Any) -> Any:
        return json.dumps(value, default=str) if isinstance(value, dict | list | tuple) else value

    return columns, [[cell(row.get(column)) for column in columns] for row in rows]


def artifact_name(name: str) -> str:
    """wandb artifact names allow letters, digits, '-', '_' and '.'."""
    cleaned = re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-")
    if not cleaned:
        raise ValueError(f"artifact name {name!r} has no letters or digits")
    return cleaned


# ------------------------------------------------------------------------------------------
# Reading a run's files back


@dataclass
class LoggedRun:
    run_id: str
    project: str
    group: str
    name: str
    config: dict[str, Any]  # the logged config, wandb's own ``_wandb`` entry removed


def find_run_folders(out: str | Path) -> list[Path]:
    """The wandb run folders (``run-*`` / ``offline-run-*``) under ``out``, oldest first."""
    folders = {path.parent for path in Path(out).rglob("run-*.wandb") if not path.parent.is_symlink()}
    return sorted(folders, key=lambda folder: folder.name)  # latest-run is a link to one of them


def read_run_files(run_folder: str | Path) -> LoggedRun:
    """Read a run's ``run-<id>.wandb`` transaction log with wandb's own record schema."""
    run_folder = Path(run_folder)
    logs = sorted(run_folder.glob("run-*.wandb"))
    if len(logs) != 1:
        raise ValueError(f"{run_folder} should hold one run-*.wandb file, found {len(logs)}")
    run_record = None
    config: dict[str, Any] = {}
    for record in _parsed_records(logs[0].read_bytes()):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run_record = record.run
            _apply_config(config, run_record.config)
        elif kind == "config":
            _apply_config(config, record.config)
    if run_record is None:
        raise ValueError(f"{logs[0]} holds no run record")
    config.pop("_wandb", None)
    return LoggedRun(run_id=run_record.run_id, project=run_record.project, group=run_record.run_group,
                     name=run_record.display_name, config=config)


def wait_for_complete_log(log_file: Path, timeout_s: float = 60.0) -> None:
    """Wait until the run's exit record is on disk.

    wandb's service writes the transaction log in its own process and may still be writing it
    when ``run.finish()`` returns; a sweep reads its points' runs right after they finish."""
    deadline = time.monotonic() + timeout_s
    while True:
        if log_file.exists():
            if any(record.WhichOneof("record_type") == "exit" for record in _parsed_records(log_file.read_bytes())):
                return
        if time.monotonic() > deadline:
            raise TimeoutError(f"wandb had not written the end of {log_file} {timeout_s:.0f}s after finishing")
        time.sleep(0.1)


def _parsed_records(data: bytes) -> Iterator[Any]:
    """The transaction log's records, parsed with wandb's own schema (``wandb_internal_pb2.Record``)."""
    from wandb.proto import wandb_internal_pb2

    for payload in _transaction_log_records(data):
        record = wandb_internal_pb2.Record()  # type: ignore[attr-defined]  # generated protobuf module
        record.ParseFromString(payload)
        yield record


def _apply_config(config: dict[str, Any], record) -> None:
    for item in record.update:
        keys = list(item.nested_key) or [item.key]
        target = config
        for key in keys[:-1]:
            target = target.setdefault(key, {})
        target[keys[-1]] = json.loads(item.value_json)
    for item in record.remove:
        config.pop(item.key, None)


# The .wandb file is a LevelDB-style log: a 7-byte file header (":W&B", magic, version), then
# 32 KiB blocks of records, each with a 7-byte header (crc32, length, type). Records never
# straddle a block boundary; a block tail shorter than a header is zero padding.
_FILE_HEADER = 7
_RECORD_HEADER = 7
_BLOCK = 32 * 1024
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def _transaction_log_records(data: bytes) -> Iterator[bytes]:
    if data[:4] != b":W&B":
        raise ValueError("not a wandb transaction log (missing the ':W&B' header)")
    position = _FILE_HEADER
    pending = b""
    while position + _RECORD_HEADER <= len(data):
        left_in_block = _BLOCK - position % _BLOCK
        if left_in_block < _RECORD_HEADER:
            position += left_in_block
            continue
        _, length, kind = struct.unpack("<IHB", data[position : position + _RECORD_HEADER])
        if kind == 0 and length == 0:
            position += left_in_block  # zero padding up to the next block
            continue
        if position + _RECORD_HEADER + length > len(data):
            return  # a record still being written
        body = data[position + _RECORD_HEADER : position + _RECORD_HEADER + length]
        position += _RECORD_HEADER + length
        if kind == _FULL:
            yield body
        elif kind == _FIRST:
            pending = body
        elif kind == _MIDDLE:
            pending += body
        elif kind == _LAST:
            yield pending + body
            pending = b""
        else:
            raise ValueError(f"corrupt wandb transaction log: record type {kind}")
