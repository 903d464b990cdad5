"""`mechsteer directions` and `mechsteer run`'s directions stage are one function
(mechsteer.steering.stage.build_directions): on the same inputs they write the same direction set,
tensors byte for byte and the same metadata up to the creation time and the training seconds."""

from __future__ import annotations

import json

from mechsteer.cli import main
from tests.experiment.conftest import SHORT_RUN


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
    command = tmp_path / "directions"
    assert main(["directions", "--pair", f"{SHORT_RUN['base_model']},{SHORT_RUN['thinking_model']}",
                 "--traces", str(out / "traces" / "thinking_train"), "--taxonomy", str(out / "taxonomy"),
                 "--base-traces", str(out / "traces" / "base_train"), "--split", SHORT_RUN.get("train_split", "train"),
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
