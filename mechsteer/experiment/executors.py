"""Sweep executors: run a sweep's points, each through :func:`~mechsteer.experiment.points.run_point`,
one after another in this process (``local``) or as one Ray task per point (``ray``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any, Literal, Protocol, get_args, runtime_checkable

from mechsteer.experiment.points import SweepPoint, failed_row, run_point
from mechsteer.experiment.tracking import wandb_directories

ExecutorKind = Literal["local", "ray"]
EXECUTORS: tuple[str, ...] = get_args(ExecutorKind)
# Environment a Ray worker inherits from the driver: offline switches, caches, wandb's folders.
FORWARDED_ENVIRONMENT = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "HF_HOME", "WANDB_MODE",
                         "WANDB_PROJECT", "WANDB_ENTITY")
# A local Ray cluster only moves result rows through its object store.
LOCAL_OBJECT_STORE_BYTES = 100 * 1024 * 1024


@runtime_checkable
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


def make_executor(kind: ExecutorKind, *, point_cpus: float = 1.0, point_gpus: float = 0.0,
                  address: str | None = None, num_cpus: int | None = None,
                  wandb_root: Path | None = None) -> tuple[SweepExecutor, AbstractContextManager[Any]]:
    """The executor and the context it runs in (a Ray cluster, or nothing).

    With ``wandb_root`` (a tracked sweep), Ray workers get wandb's folders under it."""
    if kind == "local":
        return LocalExecutor(), nullcontext()
    env_vars = {}
    if wandb_root is not None:
        env_vars = {name: os.environ.get(name, value) for name, value in wandb_directories(wandb_root).items()}
    executor = RayExecutor(point_cpus=point_cpus, point_gpus=point_gpus, address=address, num_cpus=num_cpus,
                           env_vars=env_vars)
    return executor, executor.cluster()
