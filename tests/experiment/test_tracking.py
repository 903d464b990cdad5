"""wandb tracking: off by default, directories kept out of the home folder, and the logged config
rebuilds the RunConfig that ran (read back from the run's own .wandb file)."""

import dataclasses
import hashlib
import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import yaml

from mechsteer.experiment.config import DEMO_CONFIG, RunConfig
from mechsteer.experiment.state import RunState
from mechsteer.experiment.tracking import (
    WANDB_DIRECTORY_VARIABLES,
    NullTracker,
    WandbTracker,
    find_run_folders,
    flatten_metrics,
    open_tracker,
    read_run_files,
    table_columns,
    wandb_environment,
)
from tests.experiment.configs import OLD_DEMO

REPO = Path(__file__).resolve().parents[2]
TINY_RUN = yaml.safe_load((REPO / "experiments" / "sweeps" / "organism-tiny.yaml").read_text())["base"]


def test_tracking_is_off_by_default_and_never_imports_wandb(tmp_path):
    assert RunConfig.from_dict(TINY_RUN).wandb is False and DEMO_CONFIG.wandb is False
    script = ("import sys; from mechsteer.experiment.config import RunConfig; from mechsteer.experiment.tracking import open_tracker, "
              f"NullTracker; t = open_tracker(RunConfig.from_dict({TINY_RUN!r}), {str(tmp_path)!r}); "
              "assert isinstance(t, NullTracker), t; assert 'wandb' not in sys.modules, 'wandb imported'")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert isinstance(open_tracker(RunConfig.from_dict(TINY_RUN), tmp_path), NullTracker)


def test_tracking_keys_leave_the_digest_as_it_was():
    """Run folders written before the tracking keys existed hashed every other key: still equal."""
    tracked = dataclasses.replace(OLD_DEMO, wandb=True, wandb_project="p", wandb_group="g", wandb_mode="offline")
    # The keys the config had then; every key added later leaves the digest alone at its default.
    then = ("name base_model thinking_model benchmark base_template thinking_template train_split n_train eval_split "
            "n_eval max_new_tokens batch_size activation_layers include_previous_token taxonomy_method normalise "
            "n_latents sae_k judge direction_method optimisation steer_layer coefficients windows policy threshold controls "
            "ablations ablation_contexts seed threads").split()
    untracked_fields = {k: v for k, v in asdict(OLD_DEMO).items() if k in then}
    before = hashlib.sha256(json.dumps(untracked_fields, sort_keys=True).encode()).hexdigest()[:16]
    assert tracked.digest() == OLD_DEMO.digest() == before
    # the old demo's run folders (and every experiments/*.yaml's) were written under this digest
    assert OLD_DEMO.digest() == "f2c2834c78ea8dc1"
    placed = dataclasses.replace(DEMO_CONFIG, device="cpu", thinking_device="cpu", device_map="auto")
    assert placed.digest() == DEMO_CONFIG.digest()  # where a run computes is not what it computes
    assert dataclasses.replace(DEMO_CONFIG, dtype="bfloat16").digest() != DEMO_CONFIG.digest()
    assert dataclasses.replace(DEMO_CONFIG, hybrid_batch_size=8).digest() != DEMO_CONFIG.digest()
    assert dataclasses.replace(DEMO_CONFIG, seed=1).digest() != DEMO_CONFIG.digest()


def test_wandb_environment_sets_only_unset_directories_and_restores(tmp_path, monkeypatch):
    for name in WANDB_DIRECTORY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "mine"))
    with wandb_environment(tmp_path / "run" / "wandb") as chosen:
        assert "WANDB_CACHE_DIR" not in chosen and os.environ["WANDB_CACHE_DIR"] == str(tmp_path / "mine")
        assert set(chosen) == set(WANDB_DIRECTORY_VARIABLES) - {"WANDB_CACHE_DIR"}
        for name, value in chosen.items():
            assert os.environ[name] == value and Path(value).is_dir()
            assert Path(value).is_relative_to((tmp_path / "run" / "wandb").resolve())
    assert all(name not in os.environ for name in chosen)
    assert os.environ["WANDB_CACHE_DIR"] == str(tmp_path / "mine")


def test_flatten_metrics_and_table_columns():
    flat = flatten_metrics({"n": 3, "ok": True, "acc": 0.5, "nan": float("nan"), "titles": ["a"], "name": "x",
                            "metrics": {"ari": 0.25, "sizes": [1, 2]}}, prefix="taxonomy")
    assert flat == {"taxonomy/n": 3, "taxonomy/ok": 1.0, "taxonomy/acc": 0.5, "taxonomy/metrics/ari": 0.25}
    columns, data = table_columns([{"a": 1, "b": [1, 2]}, {"c": None, "a": 2}])
    assert columns == ["a", "b", "c"]
    assert data == [[1, "[1, 2]", None], [2, None, None]]


def test_wandb_mode_is_checked_before_wandb_starts(tmp_path):
    with pytest.raises(ValueError, match="wandb_mode must be one of"):
        WandbTracker(out=tmp_path, name="x", project="p", group="g", mode="offlien")
    assert not (tmp_path / "wandb").exists()


def test_run_files_read_back_config_across_log_blocks(tmp_path, monkeypatch):
    """A config larger than one 32 KiB block of the .wandb log, plus a later update, reads back."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    for name in WANDB_DIRECTORY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    config = {"long": "x" * 70_000, "coefficients": [0.5, 1.0], "steer_layer": None}
    tracker = WandbTracker(out=tmp_path, name="reader", project="mechsteer-tests", group="reader-group",
                           mode="offline", config=config)
    tracker.log_metrics("stage", {"accuracy": 0.5})
    tracker.log_config({"nested": {"k": 3}})
    tracker.finish()
    [folder] = find_run_folders(tmp_path)
    assert folder.is_relative_to(tmp_path / "wandb")
    logged = read_run_files(folder)
    assert (logged.group, logged.name, logged.project) == ("reader-group", "reader", "mechsteer-tests")
    assert logged.config == {**config, "nested": {"k": 3}}


TRACKED_RUN = """
import json, sys
import torch
torch.set_num_threads(1)
from mechsteer.experiment.config import RunConfig
from mechsteer.experiment.pipeline import run_pipeline
run_pipeline(RunConfig.from_dict(json.loads(sys.argv[1])), sys.argv[2], log=lambda message: None)
"""


@pytest.mark.slow
def test_offline_tracked_run_stays_in_its_folder_and_its_config_reproduces_it(tmp_path):
    home, cwd, out = tmp_path / "home", tmp_path / "cwd", tmp_path / "run"
    home.mkdir()
    cwd.mkdir()
    config = RunConfig.from_dict({**TINY_RUN, "wandb": True, "wandb_project": "mechsteer-tests"})
    # HOME is empty and nothing else points wandb (or platformdirs) elsewhere, so any default
    # location would land under it. matplotlib's font cache is not wandb's: it gets its own folder.
    env = {key: value for key, value in os.environ.items()
           if key not in WANDB_DIRECTORY_VARIABLES and not key.startswith("XDG_")}
    env.update(HOME=str(home), WANDB_MODE="offline", HF_HUB_OFFLINE="1", MPLCONFIGDIR=str(tmp_path / "matplotlib"),
               PYTHONPATH=str(REPO))
    result = subprocess.run([sys.executable, "-c", TRACKED_RUN, json.dumps(asdict(config)), str(out)], cwd=cwd,
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]

    written_home = [str(path) for path in home.rglob("*")]
    assert written_home == [], f"written under HOME: {written_home[:20]}"
    assert list(cwd.iterdir()) == []
    [folder] = find_run_folders(out)
    assert folder.is_relative_to(out / "wandb")
    assert (folder / "logs" / "debug.log").is_file()

    media = {path.parent.name + "/" + path.name.split("_")[0] for path in (folder / "files" / "media").rglob("*.*")}
    assert {"tables/accuracy", "tables/taxonomy", "plots/accuracy", "plots/timeline"} <= media

    logged = read_run_files(folder)
    assert logged.group == config.name and logged.project == "mechsteer-tests"
    rebuilt = RunConfig.from_dict(logged.config)
    assert rebuilt == config
    assert json.loads((out / "stages.json").read_text())["config_digest"] == rebuilt.digest()
    RunState(out, rebuilt)  # the folder accepts the rebuilt config as its own


def test_wandb_flag_switches_tracking_on_for_run_demo_and_sweep():
    from mechsteer.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["run", "--config", "x.yaml", "--out", "o", "--wandb"]).wandb is True
    assert parser.parse_args(["run", "--config", "x.yaml", "--out", "o"]).wandb is False
    assert parser.parse_args(["demo", "--wandb"]).wandb is True
    assert parser.parse_args(["sweep", "--config", "s.yaml", "--wandb"]).wandb is True
