"""A run folder's bookkeeping: ``stages.json`` says which stages are done, with their timings and
summaries. A stage is marked done only when it has finished, so a rerun skips finished stages;
a folder belongs to one config (its digest) and refuses another.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from mechsteer.core.store import write_json_atomic
from mechsteer.experiment.config import RunConfig
from mechsteer.experiment.tracking import NullTracker, Tracker


class RunState:
    """``stages.json``: which stages are done, their timings and summaries."""

    def __init__(self, out: Path, config: RunConfig):
        self.out = out
        self.tracker: Tracker = NullTracker()  # run_pipeline sets the run's own once the folder is accepted
        self.path = out / "stages.json"
        out.mkdir(parents=True, exist_ok=True)
        state = json.loads(self.path.read_text()) if self.path.exists() else {}
        if state and state.get("config_digest") != config.digest():
            raise ValueError(
                f"{out} holds a run of another config (digest {state.get('config_digest')} != "
                f"{config.digest()}); use a new --out or delete the folder"
            )
        self.state = state or {"config_digest": config.digest(), "config": asdict(config), "stages": {}}
        write_json_atomic(out / "config.json", asdict(config))
        self.save()

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
            log(f"[{stage}] running")
            started = time.perf_counter()
            summary = body()
            seconds = time.perf_counter() - started
            self.state["stages"][stage] = {"seconds": round(seconds, 2), "summary": summary}
            self.save()
            log(f"[{stage}] done in {seconds:.1f}s")
        # a resumed run logs the stages it skipped too, so its tracked run is complete
        entry = self.state["stages"][stage]
        self.tracker.log_metrics(stage, {**entry["summary"], "seconds": entry["seconds"]})
        return entry["summary"]

    def timings(self) -> dict[str, float]:
        return {name: entry["seconds"] for name, entry in self.state["stages"].items()}
