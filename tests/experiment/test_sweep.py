"""Sweeps: expansion and validation before anything runs, the wandb export, and a 5-point organism
sweep (one point failing on purpose, one refused) that gives the same results table locally and on Ray."""

import json
import os
import re
from pathlib import Path

import pytest
import yaml

from mechsteer.cli import main
from mechsteer.experiment.executors import RayExecutor
from mechsteer.experiment.layout import SHARED_STAGES
from mechsteer.experiment.sweep import SweepSpec, phases, plan_points, run_sweep, wandb_sweep_config
from mechsteer.experiment.tracking import find_run_folders, read_run_files

REPO = Path(__file__).resolve().parents[2]
SWEEPS = REPO / "experiments" / "sweeps"
TINY = yaml.safe_load((SWEEPS / "organism-tiny.yaml").read_text())
FAILING_POINT = {"steer_layer": 99}  # a valid config; the organisms have no layer 99: fails inside the point
REFUSED_POINT = {"policy": "no_such_policy"}  # refused before it runs: a failed row, never attempted


def tiny_spec(**changes) -> dict:
    return {**TINY, **changes}


def write_sweep(folder: Path, data: dict) -> Path:
    path = folder / f"{data['name']}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_shipped_sweeps_parse():
    paths = sorted(SWEEPS.glob("*.yaml"))
    assert {path.name for path in paths} >= {"organism-coefficients.yaml", "organism-tiny.yaml"}
    for path in paths:
        spec = SweepSpec.from_yaml(path)
        assert spec.expand() and spec.executor in {"local", "ray"}


def test_grid_is_a_cartesian_product_then_the_list():
    spec = SweepSpec.from_dict(tiny_spec(grid={"coefficients": [[0.5], [1.0]], "seed": [0, 1]},
                                         list=[{"sae_k": 2}]))
    assert spec.expand() == [
        {"coefficients": [0.5], "seed": 0}, {"coefficients": [0.5], "seed": 1},
        {"coefficients": [1.0], "seed": 0}, {"coefficients": [1.0], "seed": 1}, {"sae_k": 2},
    ]
    assert spec.swept_keys() == ["coefficients", "seed", "sae_k"]


@pytest.mark.parametrize(("change", "message"), [
    ({"grid": {"n_layerz": [1, 2]}}, r"grid: unknown config keys \['n_layerz'\]"),
    ({"list": [{"coefficent": [1.0]}]}, r"list\[0\]: unknown config keys \['coefficent'\]"),
    ({"grid": {"coefficients": [0.5, 1.0]}}, r"coefficients = 0.5 is not a list\[float\].*\[\[0.5\], \[1.0\]\]"),
    ({"grid": {"name": ["a", "b"]}}, r"'name' cannot be set here"),
    ({"executor": "slurm"}, r"executor must be one of"),
    ({"retires": 2}, r"unknown sweep keys \['retires'\]"),
    ({"grid": {}, "list": []}, r"has no points"),
])
def test_bad_sweeps_fail_before_anything_runs(tmp_path, capsys, change, message):
    path = write_sweep(tmp_path, tiny_spec(**change))
    assert main(["sweep", "--config", str(path), "--out", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("mechsteer: error: ") and "\n" not in error and re.search(message, error), error
    with pytest.raises(ValueError, match=message):  # the library raises what the command line prints
        SweepSpec.from_yaml(path)
    assert not (tmp_path / "out").exists()


def test_points_differing_only_downstream_share_one_upstream_run(tmp_path):
    spec = SweepSpec.from_dict(tiny_spec(grid={"coefficients": [[0.5], [1.0]], "policy": ["sae_argmax", "threshold"]},
                                         list=[{"seed": 1}, {"seed": 1, "windows": [2]}]))
    points = plan_points(spec, tmp_path)
    leaders, followers = phases(points)
    assert [p.index for p in leaders] == [0, 4]
    assert {p.index: Path(p.donor).name for p in followers} == {
        1: Path(points[0].out).name, 2: Path(points[0].out).name, 3: Path(points[0].out).name,
        5: Path(points[4].out).name}
    assert len({p.out for p in points}) == len(points)
    assert all(Path(p.out).parent == tmp_path.resolve() / "points" for p in points)


def test_wandb_export_is_a_grid_that_runs_one_point(tmp_path):
    path = write_sweep(tmp_path, tiny_spec(list=[], grid={"coefficients": [[0.5], [1.0]], "seed": [0, 1]}))
    exported = tmp_path / "wandb-sweep.yaml"
    assert main(["sweep", "--config", str(path), "--out", str(tmp_path / "out"),
                 "--export-wandb", str(exported)]) == 0
    config = yaml.safe_load(exported.read_text())
    assert config["method"] == "grid" and config["name"] == "organism-tiny"
    assert config["parameters"] == {"coefficients": {"values": [[0.5], [1.0]]}, "seed": {"values": [0, 1]}}
    command = config["command"]
    assert command[:3] == ["${env}", "mechsteer", "sweep"]
    assert command[command.index("--config") + 1] == str(path.resolve())
    assert command[command.index("--point") + 1] == "${args_json_file}"
    with pytest.raises(ValueError, match="explicit 'list' points"):
        wandb_sweep_config(SweepSpec.from_yaml(SWEEPS / "organism-tiny.yaml"), tmp_path)


def test_ray_workers_get_one_thread_and_the_offline_switches(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    executor = RayExecutor(point_cpus=1, num_cpus=2)
    assert executor.env_vars["OMP_NUM_THREADS"] == "1" and executor.env_vars["HF_HUB_OFFLINE"] == "1"
    assert RayExecutor(point_cpus=4).env_vars["OMP_NUM_THREADS"] == "4"


# ------------------------------------------------------------------------------------------
# The 4-point organism sweep


METRIC_COLUMNS = ("base_accuracy", "thinking_accuracy", "hybrid_accuracy", "gap_recovered", "tokens_steered_fraction",
                  "taxonomy_layer", "n_behaviours", "taxonomy_ari", "steer_layer")


def results_table(out: Path) -> list[dict]:
    import pyarrow.parquet

    return [{key: value for key, value in row.items() if key != "seconds"}
            for row in pyarrow.parquet.read_table(out / "results.parquet").to_pylist()]


@pytest.fixture(scope="module")
def failing_sweep_file(tmp_path_factory) -> Path:
    return write_sweep(tmp_path_factory.mktemp("sweep_file"), tiny_spec(list=[FAILING_POINT, REFUSED_POINT]))


@pytest.fixture(scope="module")
def local_sweep(failing_sweep_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("local_sweep")
    code = main(["sweep", "--config", str(failing_sweep_file), "--out", str(out), "--wandb"])
    assert code == 1  # two points failed
    return out


@pytest.mark.slow
def test_local_sweep_reports_every_point(local_sweep):
    rows = results_table(local_sweep)
    assert [row["index"] for row in rows] == [0, 1, 2, 3, 4]
    assert [row["coefficients"] for row in rows] == ["[0.5]", "[1.0]", "[2.0]", None, None]
    ok, failed, refused = rows[:3], rows[3], rows[4]
    for row in ok:
        assert (row["status"], row["attempts"], row["error"]) == ("ok", 1, None)
        assert all(row[column] is not None for column in METRIC_COLUMNS if column != "gap_recovered")
        assert 0.0 <= row["hybrid_accuracy"] <= 1.0
    # retried (1 + retries attempts), then reported, and the others still finished
    assert failed["status"] == "failed" and failed["attempts"] == TINY["retries"] + 1
    assert failed["steer_layer"] == 99 and "steer_layer: layer(s) [99] do not exist" in failed["error"]
    assert failed["hybrid_accuracy"] is None
    errors = (local_sweep / "points" / failed["point"] / "errors.log").read_text()
    assert errors.count("--- attempt") == TINY["retries"] + 1
    # A refused config is a failed row too, never attempted, and writes no folder.
    assert (refused["status"], refused["attempts"], refused["hybrid_accuracy"]) == ("failed", 0, None)
    assert refused["policy"] == "no_such_policy" and "unknown policy 'no_such_policy'" in refused["error"]
    assert not (local_sweep / "points" / refused["point"]).exists()

    import csv

    with (local_sweep / "results.csv").open() as handle:
        csv_rows = list(csv.DictReader(handle))
    assert [r["status"] for r in csv_rows] == [r["status"] for r in rows]
    assert [float(r["hybrid_accuracy"]) for r in csv_rows[:3]] == [r["hybrid_accuracy"] for r in ok]
    assert (local_sweep / "results.png").stat().st_size > 0
    assert not list(local_sweep.glob(".*.partial"))


@pytest.mark.slow
def test_local_sweep_points_share_the_upstream_run(local_sweep):
    rows = results_table(local_sweep)
    leader = local_sweep / "points" / rows[0]["point"]
    assert not (leader / "shared_from.json").exists()
    planned_shared = sorted(set(SHARED_STAGES) - {"disagreements", "correction_vectors"})  # no correction vectors
    for row in rows[1:3]:
        shared = json.loads((local_sweep / "points" / row["point"] / "shared_from.json").read_text())
        donor = local_sweep / "points" / row["point"] / shared["donor"]  # recorded relative to the point
        assert donor.resolve() == leader.resolve() and shared["stages"] == planned_shared
        stages = json.loads((local_sweep / "points" / row["point"] / "stages.json").read_text())["stages"]
        leader_stages = json.loads((leader / "stages.json").read_text())["stages"]
        assert all(stages[name] == leader_stages[name] for name in planned_shared)  # their files' digests too
    # the shared files are the leader's own (hard links), not recomputed copies
    sample = next((leader / "activations").glob("*.safetensors"))
    follower = local_sweep / "points" / rows[1]["point"] / "activations" / sample.name
    assert os.path.samefile(sample, follower)


@pytest.mark.slow
def test_tracked_sweep_logs_each_point_as_a_run_in_one_group(local_sweep):
    rows = results_table(local_sweep)
    logged = [read_run_files(folder) for folder in find_run_folders(local_sweep)]
    assert {run.group for run in logged} == {"organism-tiny"}
    names = sorted(run.name for run in logged)
    expected = sorted([f"organism-tiny-{row['point']}" for row in rows[:4]] + ["organism-tiny-results"])
    # the failing point logs one run per attempt; the refused one never ran
    failing = f"organism-tiny-{rows[3]['point']}"
    assert sorted(set(names)) == expected and names.count(failing) == TINY["retries"] + 1
    assert all(folder.is_relative_to(local_sweep / "wandb") for folder in find_run_folders(local_sweep))


@pytest.fixture
def ray_cluster_cleanup():
    pytest.importorskip("ray", reason="the ray extra is not installed (make install adds it)")
    yield
    import ray

    if ray.is_initialized():
        ray.shutdown()


@pytest.mark.slow
def test_ray_sweep_gives_the_same_results_table(local_sweep, failing_sweep_file, ray_cluster_cleanup, tmp_path):
    spec = SweepSpec.from_yaml(failing_sweep_file)
    spec.executor, spec.ray_num_cpus = "ray", 2
    rows = run_sweep(spec, tmp_path / "ray_sweep", log=lambda message: None)
    import ray

    assert not ray.is_initialized()  # the executor shut down the cluster it started
    assert [row["status"] for row in rows] == ["ok", "ok", "ok", "failed", "failed"]
    assert results_table(tmp_path / "ray_sweep") == results_table(local_sweep)


@pytest.mark.slow
def test_one_point_as_a_wandb_agent_runs_it_starts_from_a_finished_point(local_sweep, failing_sweep_file, tmp_path):
    import shutil

    leader = results_table(local_sweep)[0]["point"]
    out = tmp_path / "agent_sweep"
    shutil.copytree(local_sweep / "points" / leader, out / "points" / leader)
    overrides = tmp_path / "args.json"
    overrides.write_text(json.dumps({"coefficients": [4.0]}))
    assert main(["sweep", "--config", str(failing_sweep_file), "--out", str(out), "--point", str(overrides)]) == 0
    [point] = [folder for folder in (out / "points").iterdir() if folder.name != leader]
    shared = json.loads((point / "shared_from.json").read_text())
    # every shared stage the leader ran (it trains no correction vectors)
    assert Path(shared["donor"]).name == leader
    assert shared["stages"] == sorted(set(SHARED_STAGES) - {"disagreements", "correction_vectors"})
    report = json.loads((point / "report.json").read_text())
    assert report["config"]["coefficients"] == [4.0] and 0.0 <= report["hybrid_accuracy"] <= 1.0
    [run] = [read_run_files(folder) for folder in find_run_folders(out)]
    assert run.group == "organism-tiny" and run.config["coefficients"] == [4.0]


def test_a_sweep_over_seeds_reports_each_settings_mean_and_sd():
    from mechsteer.experiment.markdown import sweep_markdown
    from mechsteer.grading.statistics import seed_spread

    assert seed_spread([0.5]).sd is None
    spread = seed_spread([0.9, 0.87, 0.865])
    assert abs(spread.mean - 0.878333) < 1e-6 and abs(spread.sd - 0.0189297) < 1e-6 and spread.n == 3
    rows = [{"index": i, "point": f"p{i}", "seed": seed, "coefficients": coeffs, "status": status,
             "base_accuracy": 0.1, "thinking_accuracy": 0.9, "hybrid_accuracy": hybrid, "gap_recovered": gap,
             "tokens_steered_fraction": 0.03, "random_firing_gap_recovered": control}
            for i, (seed, coeffs, hybrid, gap, control, status) in enumerate([
                (0, "[1.0]", 0.9, 1.0, 0.1, "ok"), (1, "[1.0]", 0.8, 0.875, 0.0, "ok"),
                (2, "[1.0]", 0.7, 0.75, None, "ok"), (0, "[2.0]", 0.5, 0.5, 0.2, "ok"),
                (1, "[2.0]", 0.0, 0.0, 0.0, "failed")])]
    text = sweep_markdown("seeds", rows, ["seed", "coefficients"])
    section = text.split("## Across seeds", 1)[1]
    assert r"| \[1.0\] | 3 | 0.100 ± 0.000 | 0.900 ± 0.000 | 0.800 ± 0.100 | 0.875 ± 0.125 | 3.0% ± 0.0% | 0.050 ± 0.071 |" in section
    assert r"| \[2.0\] | 1 | 0.100 | 0.900 | 0.500 | 0.500 | 3.0% | 0.200 |" in section  # the failed seed left out
    assert "## Across seeds" not in sweep_markdown("no seeds", rows, ["coefficients"])
