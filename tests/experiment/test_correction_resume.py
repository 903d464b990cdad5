"""The correction stages of a run killed with SIGKILL at each stage resume to the artefacts of an
uninterrupted run: the disagreement cache byte for byte, the vectors and coefficient MLP tensor for
tensor, the evaluations' records and the report; a run resumes no disagreement cache, and reads no
vectors, made from other inputs."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from mechsteer.core.errors import ProvenanceError
from mechsteer.experiment.config import RunConfig
from mechsteer.experiment.layout import RunPaths
from mechsteer.experiment.pipeline import run_pipeline
from mechsteer.steering.correction import CorrectionVectors
from mechsteer.steering.disagreements import MANIFEST_FILE, load_disagreements
from tests.experiment.conftest import CORRECTION_RUN
from tests.experiment.killing import run_killed
from tests.experiment.test_pipeline import comparable

QUIET = lambda message: None  # noqa: E731


@pytest.fixture(scope="module")
def reference(short_run, tmp_path_factory):
    """(run folder, report) of the correction stages run uninterrupted on a copy of short_run's folder."""
    out = tmp_path_factory.mktemp("correction_reference") / "run"
    shutil.copytree(short_run[0], out)
    return out, run_pipeline(RunConfig.from_dict(CORRECTION_RUN), out, log=QUIET)


def stages(out: Path) -> dict:
    return json.loads((out / "stages.json").read_text())["stages"]


def files(folder: Path) -> dict[str, bytes]:
    return {path.relative_to(folder).as_posix(): path.read_bytes() for path in sorted(folder.rglob("*")) if path.is_file()}


def assert_same_vectors(folder: Path, reference: Path) -> None:
    mine, theirs = CorrectionVectors.load(folder), CorrectionVectors.load(reference)
    assert torch.equal(mine.directions.directions, theirs.directions.directions)
    assert mine.mlp is not None and theirs.mlp is not None
    mlp, reference_mlp = mine.mlp.state_dict(), theirs.mlp.state_dict()
    assert mlp.keys() == reference_mlp.keys() and all(torch.equal(mlp[name], reference_mlp[name]) for name in mlp)
    assert sorted(path.name for path in folder.iterdir()) == sorted(path.name for path in reference.iterdir())
    for name in ("directions.json", "coefficient_mlp.json", "correction.json"):  # the training report's seconds differ
        assert comparable(json.loads((folder / name).read_text())) == \
            comparable(json.loads((reference / name).read_text())), name


@pytest.mark.slow
def test_correction_stages_killed_at_each_stage_resume_to_identical_artefacts(short_run, reference, tmp_path):
    """One run folder killed four times in a row, each resume carrying it to the next kill point, then
    resumed plainly to the end; every stage is compared with the uninterrupted run's once it is done."""
    reference_out, reference_report = reference
    ref, out = RunPaths(reference_out), tmp_path / "run"
    shutil.copytree(short_run[0], out)
    paths = RunPaths(out)

    # (a) in the disagreements, after the first chunk of traces (32 of 50) is on disk
    run_killed(CORRECTION_RUN, out, "mechsteer.steering.disagreements", "_collect_chunk", 2)
    assert "disagreements" not in stages(out)
    manifest = json.loads((paths.disagreements / MANIFEST_FILE).read_text())
    assert len(manifest["chunks"]) == 1 and not manifest["complete"]

    # (b) resumes the disagreements, then dies training the vectors, after the first seed
    run_killed(CORRECTION_RUN, out, "mechsteer.steering.correction", "_train_seed", 2)
    assert "disagreements" in stages(out) and "correction_vectors" not in stages(out)
    assert files(paths.disagreements) == files(ref.disagreements)
    assert comparable(stages(out)["disagreements"]) == comparable(stages(reference_out)["disagreements"])
    load_disagreements(paths.disagreements)  # complete

    # (b') trains again, then dies saving them: the set and the MLP on disk, the training report not
    run_killed(CORRECTION_RUN, out, "mechsteer.steering.correction", "write_json_atomic", 1)
    assert "correction_vectors" not in stages(out)
    assert {path.name for path in paths.correction_vectors.iterdir()} == {
        "directions.json", "directions.safetensors", "coefficient_mlp.json", "coefficient_mlp.safetensors"}

    # (c) trains again over the half-written folder, then dies in the correction's evaluation, its first batch
    # of problems on disk
    run_killed(CORRECTION_RUN, out, "mechsteer.hybrid.generator", "hybrid_generate", 2)
    assert "correction_vectors" in stages(out) and "eval_correction" not in stages(out)
    assert_same_vectors(paths.correction_vectors, ref.correction_vectors)
    assert stages(out)["correction_vectors"]["summary"] == stages(reference_out)["correction_vectors"]["summary"]
    assert 0 < len(paths.hybrid_results("correction").read_text().splitlines()) < CORRECTION_RUN["n_eval"]

    resumed = run_pipeline(RunConfig.from_dict(CORRECTION_RUN), out, log=QUIET)
    for name in ("correction", "correction_ceiling"):
        assert paths.hybrid_results(name).read_bytes() == ref.hybrid_results(name).read_bytes(), name
    assert comparable(resumed) == comparable(reference_report)
    for stage in ("eval_correction", "eval_correction_ceiling"):
        assert comparable(stages(out)[stage]) == comparable(stages(reference_out)[stage]), stage


def copy_without(reference: Path, out: Path, stages_done: tuple[str, ...], *, digests: bool = True) -> None:
    """A copy of the reference run whose ``stages_done`` are to be done again (optionally without the
    file digests of its finished stages, as written before they were recorded)."""
    shutil.copytree(reference, out)
    record = json.loads((out / "stages.json").read_text())
    for stage in stages_done:
        del record["stages"][stage]
    if not digests:
        for entry in record["stages"].values():
            entry.pop("outputs", None)
    (out / "stages.json").write_text(json.dumps(record))


AFTER_DISAGREEMENTS = ("disagreements", "correction_vectors", "eval_correction", "eval_correction_ceiling")


@pytest.mark.slow
@pytest.mark.parametrize(("field", "named"), [("traces_digest", "traces digest"), ("base_model", "base model"),
                                              ("thinking_weights", "thinking weights"), ("layer", "layer")])
def test_a_run_resumes_no_disagreement_cache_of_other_inputs(reference, tmp_path, field, named):
    """A disagreement folder started under this run's inputs, its files replaced by a cache of other traces,
    another model or another layer, is refused by the field that differs instead of being resumed."""
    out = tmp_path / "run"
    copy_without(reference[0], out, AFTER_DISAGREEMENTS)
    manifest_path = RunPaths(out).disagreements / MANIFEST_FILE
    manifest = json.loads(manifest_path.read_text())
    manifest["provenance"][field] = manifest["provenance"][field] + 1 if field == "layer" else "another"
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(ProvenanceError, match=f"disagreements.json: made with {named} "):
        run_pipeline(RunConfig.from_dict(CORRECTION_RUN), out, log=QUIET)


@pytest.mark.slow
def test_vectors_of_another_layer_are_refused_by_the_correction_evaluation(reference, tmp_path):
    """Read by what they are, not only by their files' digests: vectors at another layer than the run
    steers are refused, naming the key."""
    out = tmp_path / "run"
    copy_without(reference[0], out, ("eval_correction", "eval_correction_ceiling"), digests=False)
    metadata_path = RunPaths(out).correction_vectors / "directions.json"
    metadata = json.loads(metadata_path.read_text())
    metadata["layer"] += 1
    metadata_path.write_text(json.dumps(metadata))
    with pytest.raises(ProvenanceError, match=r"holds vectors at the base model's layer \d, but this run steers at "
                                              r"layer \d \(steer_layer\)"):
        run_pipeline(RunConfig.from_dict(CORRECTION_RUN), out, log=QUIET)
