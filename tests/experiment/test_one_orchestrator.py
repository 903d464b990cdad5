"""Each per-stage command (`mechsteer traces`, `activations`, `taxonomy`, `directions`, `ablate`) and
the matching stage of `mechsteer run` are one function with the same defaults: on the same inputs
they write the same artefacts, byte for byte up to wall-clock times."""

from __future__ import annotations

import csv
import json
import shutil

from mechsteer.cli import main
from mechsteer.experiment.config import RunConfig
from tests.experiment.conftest import SHORT_RUN
from tests.experiment.test_pipeline import comparable


def metadata_without_times(path) -> dict:
    document = json.loads(path.read_text())
    provenance = document["provenance"]
    provenance.pop("created", None)
    for report in [provenance.get("bias_report") or {}, *(provenance.get("behaviour_reports") or {}).values()]:
        report.pop("seconds", None)
    return document


def test_the_directions_command_writes_the_run_stages_directions(short_run, tmp_path):
    out, report = short_run
    layer = json.loads((out / "stages.json").read_text())["stages"]["directions"]["summary"]["layer"]
    # the inputs copied beside the command's folder as they lie beside the run's, so both record the same
    # relative paths to them
    for name in ("traces", "activations", "taxonomy"):
        shutil.copytree(out / name, tmp_path / name)
    command = tmp_path / "directions"
    assert main(["directions", "--pair", f"{SHORT_RUN['base_model']},{SHORT_RUN['thinking_model']}",
                 "--traces", str(tmp_path / "traces" / "thinking_train"), "--taxonomy", str(tmp_path / "taxonomy"),
                 "--base-traces", str(tmp_path / "traces" / "base_train"),
                 "--split", SHORT_RUN.get("train_split", "train"),
                 "--method", SHORT_RUN["direction_method"], "--layer", str(layer),
                 "--optimisation", json.dumps(SHORT_RUN["optimisation"]), "--out", str(command)]) == 0
    assert (command / "directions.safetensors").read_bytes() == (out / "directions" / "directions.safetensors").read_bytes()
    assert metadata_without_times(command / "directions.json") == metadata_without_times(out / "directions" / "directions.json")


def test_the_ablate_command_writes_the_run_stages_ablations(short_run, tmp_path):
    """mechsteer ablate and the run's ablation stage: mechsteer.causal.stage.run_ablations, the same
    tables and settings on the same inputs."""
    out, _ = short_run
    command = tmp_path / "ablations"
    coeffs = ",".join(str(c) for c in SHORT_RUN["coefficients"])
    assert main(["ablate", "--pair", f"{SHORT_RUN['base_model']},{SHORT_RUN['thinking_model']}",
                 "--traces", str(out / "traces" / "thinking_train"), "--taxonomy", str(out / "taxonomy"),
                 "--split", "train", "--directions", str(out / "directions"), "--eval-split", "test",
                 "--n-problems", str(SHORT_RUN["ablation_contexts"]), "--max-new-tokens", str(SHORT_RUN["max_new_tokens"]),
                 "--coeffs", coeffs, "--n-contexts", str(SHORT_RUN["ablation_contexts"]),
                 "--batch-size", str(SHORT_RUN["batch_size"]), "--out", str(command)]) == 0
    for name in ("necessity.csv", "sufficiency.csv", "ablations.json"):
        assert (command / name).read_bytes() == (out / "ablations" / name).read_bytes(), name


def csv_rows(path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_the_traces_command_writes_the_run_stages_traces(short_run, tmp_path):
    """mechsteer traces and the run's train traces: mechsteer.data.stage.run_traces with the run's defaults."""
    out, _ = short_run
    config = RunConfig.from_dict(SHORT_RUN)
    command = tmp_path / "traces"
    assert main(["traces", "--model", SHORT_RUN["thinking_model"], "--benchmark", SHORT_RUN["benchmark"],
                 "--split", "train", "--n", str(SHORT_RUN["n_train"]), "--template", config.resolved_thinking_template,
                 "--max-new-tokens", str(SHORT_RUN["max_new_tokens"]), "--batch-size", str(SHORT_RUN["batch_size"]),
                 "--out", str(command)]) == 0
    assert (command / "traces.jsonl").read_bytes() == (out / "traces" / "thinking_train" / "traces.jsonl").read_bytes()


def test_the_activations_and_taxonomy_commands_write_the_run_stages_folders(short_run, tmp_path):
    """mechsteer activations and taxonomy and the run's stages: mechsteer.activations.pool_activations and
    mechsteer.taxonomy.stage.build_taxonomy, the same files on the same inputs (wall-clock times aside)."""
    out, _ = short_run
    stages = json.loads((out / "stages.json").read_text())["stages"]
    layers = ",".join(str(layer) for layer in stages["activations"]["summary"]["layers"])
    activations = tmp_path / "activations"
    assert main(["activations", "--model", SHORT_RUN["thinking_model"], "--traces", str(out / "traces" / "thinking_train"),
                 "--layers", layers, "--batch-size", str(SHORT_RUN["batch_size"]), "--out", str(activations)]) == 0
    run_files = sorted(path.relative_to(out / "activations") for path in (out / "activations").rglob("*") if path.is_file())
    assert sorted(path.relative_to(activations) for path in activations.rglob("*") if path.is_file()) == run_files
    for name in run_files:
        mine, theirs = activations / name, out / "activations" / name
        if name.suffix == ".json":
            assert comparable(json.loads(mine.read_text())) == comparable(json.loads(theirs.read_text())), name
        else:
            assert mine.read_bytes() == theirs.read_bytes(), name

    taxonomy = tmp_path / "taxonomy"  # from the command's activations, beside it as the run's are beside its own
    assert main(["taxonomy", "--activations", str(activations), "--layers", layers,
                 "--n-latents", ",".join(str(n) for n in SHORT_RUN["n_latents"]), "--normalise", "both",
                 "--judge", SHORT_RUN["judge"], "--out", str(taxonomy)]) == 0
    assert comparable(json.loads((taxonomy / "taxonomy.json").read_text())) == \
        comparable(json.loads((out / "taxonomy" / "taxonomy.json").read_text()))
    assert comparable(csv_rows(taxonomy / "metrics.csv")) == comparable(csv_rows(out / "taxonomy" / "metrics.csv"))
    weights = sorted(path.relative_to(out / "taxonomy") for path in (out / "taxonomy").rglob("*.safetensors"))
    assert weights and all((taxonomy / name).read_bytes() == (out / "taxonomy" / name).read_bytes() for name in weights)
