"""A run folder's bookkeeping: ``stages.json`` says which stages are done, with their timings and
summaries. A stage is marked done only when it has finished, so a rerun skips finished stages.

A folder belongs to one config. A rerun with another config continues only when every key it
changes is read by stages that have not run yet (:data:`STAGE_KEYS`); otherwise it is refused,
naming the keys that differ and the finished stages that read them.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from mechsteer.core.errors import ConfigError
from mechsteer.core.store import read_json, write_json_atomic
from mechsteer.experiment.config import TRACKING_KEYS, RunConfig
from mechsteer.experiment.tracking import NullTracker, Tracker

_TRAIN_TRACES = ("benchmark", "train_split", "n_train", "max_new_tokens", "batch_size")
_EVAL = ("benchmark", "eval_split", "n_eval", "max_new_tokens", "batch_size")
_STEERING = ("base_model", "thinking_model", "base_template", "thinking_template", "steer_layer", "coefficients",
             "windows", "policy", "policy_read", "threshold", "tune_split", "n_tune", "tune_thresholds")
_HYBRID = (*_STEERING, *_EVAL)  # the evaluations steer with the tuning stage's choice
# The config keys each stage's results depend on (mechsteer.experiment.pipeline's stages). A key
# listed under no stage and not in UNREAD_KEYS counts as read by every stage, so a key added to
# RunConfig later refuses a change in a folder with finished stages until it is listed here.
STAGE_KEYS: dict[str, tuple[str, ...]] = {
    "traces_thinking_train": ("thinking_model", "thinking_template", *_TRAIN_TRACES),
    "traces_base_train": ("base_model", "base_template", *_TRAIN_TRACES),
    "activations": ("thinking_model", "activation_layers", "include_previous_token", "batch_size", "benchmark"),
    "taxonomy": ("thinking_model", "activation_layers", "n_latents", "judge", "judge_max_tokens", "benchmark",
                 "taxonomy_method", "sae_k", "seed", "normalise"),
    "directions": ("base_model", "thinking_model", "benchmark", "train_split", "n_train", "direction_method",
                   "optimisation", "seed", "steer_layer"),
    "tuning": (*_STEERING, "benchmark", "max_new_tokens", "batch_size"),
    "eval_base": ("base_model", "base_template", *_EVAL),
    "eval_thinking": ("thinking_model", "thinking_template", *_EVAL),
    "eval_hybrid": _HYBRID,
    "eval_only_bias": _HYBRID,
    "eval_only_bias_replayed": _HYBRID,  # replays eval_hybrid's steered positions
    "eval_random_firing": (*_HYBRID, "seed"),
    "eval_random_vectors": (*_HYBRID, "seed"),
    "eval_first_token_only": _HYBRID,
    "eval_oracle_timing": _HYBRID,
    "ablations": ("base_model", "thinking_model", "benchmark", "train_split", "n_train", "eval_split",
                  "ablation_contexts", "thinking_template", "max_new_tokens", "batch_size", "coefficients", "seed"),
}
# Keys no stage's results depend on: naming, threads, logging, and which optional stages run.
UNREAD_KEYS: tuple[str, ...] = ("name", "threads", "controls", "baselines", "ablations", *TRACKING_KEYS)


def changed_keys(recorded: dict[str, Any], config: RunConfig) -> list[str]:
    """Keys whose value differs from a folder's recorded config and that change what a run
    computes (its digest: placement and tracking keys do not). A key the record lacks, added to
    RunConfig since, counts as its default."""
    fields = {f.name: f for f in dataclasses.fields(RunConfig)}
    changed = []
    for key, value in asdict(config).items():
        field = fields[key]
        default = field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default
        if key not in recorded and default is dataclasses.MISSING:
            changed.append(key)  # a required key the record lacks: not a config this folder knows
            continue
        before = recorded.get(key, default)
        if before != value and dataclasses.replace(config, **{key: before}).digest() != config.digest():
            changed.append(key)
    return changed


def stages_reading(key: str, stages: list[str]) -> list[str]:
    """Which of ``stages`` read ``key``: by :data:`STAGE_KEYS`; a key or a stage it does not know
    counts as read (a change of it is refused rather than silently mixed into finished results)."""
    if key in UNREAD_KEYS:
        return []
    listed = any(key in keys for keys in STAGE_KEYS.values())
    return [stage for stage in stages if not listed or stage not in STAGE_KEYS or key in STAGE_KEYS[stage]]


class RunState:
    """``stages.json``: which stages are done, their timings and summaries."""

    def __init__(self, out: Path, config: RunConfig):
        self.out = out
        self.tracker: Tracker = NullTracker()  # run_pipeline sets the run's own once the folder is accepted
        self.path = out / "stages.json"
        state = read_json(self.path, "run's stage record (stages.json)") if self.path.exists() else {}
        if state and state.get("config_digest") != config.digest():
            self._accept_changes(state, config)
        out.mkdir(parents=True, exist_ok=True)  # only once the folder is accepted
        self.state = state or {"config_digest": config.digest(), "config": asdict(config), "stages": {}}
        write_json_atomic(out / "config.json", asdict(config))
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
