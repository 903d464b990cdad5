"""A run folder is self-contained: the paths its artefacts record are relative to their own folders, so a
folder moved elsewhere resumes and rebuilds its report, and a copy reads its own files even once the
original is gone."""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

from mechsteer.cli import main
from mechsteer.experiment.config import RunConfig
from mechsteer.experiment.pipeline import run_pipeline
from mechsteer.steering.direction_set import DirectionSet
from mechsteer.steering.labels import taxonomy_labels
from mechsteer.taxonomy.artefact import Taxonomy
from tests.experiment.conftest import SHORT_RUN
from tests.experiment.test_pipeline import comparable


@contextlib.contextmanager
def original_gone(folder: Path):
    """The session's short run out of reach while a copy of it works (renamed away, then put back)."""
    hidden = folder.with_name(folder.name + ".gone")
    folder.rename(hidden)
    try:
        yield
    finally:
        hidden.rename(folder)


def test_a_moved_run_folder_resumes_and_its_report_is_rebuilt(short_run, tmp_path):
    out, report = short_run
    moved = tmp_path / "elsewhere" / "renamed"
    shutil.copytree(out, moved)
    # its last stage unfinished: the resumed stage reads the directions and the taxonomy's activations
    state = json.loads((moved / "stages.json").read_text())
    del state["stages"]["ablations"]
    (moved / "stages.json").write_text(json.dumps(state))
    (moved / "report.md").unlink()
    with original_gone(out):
        resumed = run_pipeline(RunConfig.from_dict(SHORT_RUN), moved, log=lambda message: None)
        written = (moved / "report.md").read_text()
        (moved / "report.md").unlink()
        assert main(["report", str(moved)]) == 0
    assert comparable(resumed) == comparable(report)
    assert (moved / "report.md").read_text() == written
    for name in ("necessity.csv", "sufficiency.csv"):
        assert (moved / "ablations" / name).read_bytes() == (out / "ablations" / name).read_bytes()


def test_a_copied_run_folder_reads_its_own_files(short_run, tmp_path):
    out, _ = short_run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    with original_gone(out):
        taxonomy = Taxonomy.load(copy / "taxonomy")
        assert Path(taxonomy.provenance.activations_dir) == (copy / "activations").resolve()
        assert taxonomy.sentence_vectors().shape[0] == taxonomy.assignments.shape[0]
        labels = taxonomy_labels(copy / "taxonomy")
        assert labels.taxonomy_dir == str(copy / "taxonomy")
        provenance = DirectionSet.load(copy / "directions").provenance
        assert {key: Path(provenance[key]) for key in ("traces", "base_traces", "taxonomy")} == {
            "traces": (copy / "traces" / "thinking_train").resolve(),
            "base_traces": (copy / "traces" / "base_train").resolve(),
            "taxonomy": (copy / "taxonomy").resolve()}
    # on disk: relative to the artefact's own folder
    assert json.loads((copy / "taxonomy" / "taxonomy.json").read_text())["provenance"]["activations_dir"] == \
        "../activations"
    recorded = json.loads((copy / "directions" / "directions.json").read_text())["provenance"]
    assert (recorded["traces"], recorded["base_traces"], recorded["taxonomy"]) == (
        "../traces/thinking_train", "../traces/base_train", "../taxonomy")


def test_an_older_folder_with_absolute_paths_is_still_read(short_run, tmp_path):
    out, _ = short_run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    taxonomy_file = copy / "taxonomy" / "taxonomy.json"
    document = json.loads(taxonomy_file.read_text())
    document["provenance"]["activations_dir"] = str((copy / "activations").resolve())
    taxonomy_file.write_text(json.dumps(document))
    assert Taxonomy.load(copy / "taxonomy").provenance.activations_dir == str((copy / "activations").resolve())
    directions_file = copy / "directions" / "directions.json"
    document = json.loads(directions_file.read_text())
    document["provenance"]["traces"] = "/somewhere/else/traces"
    directions_file.write_text(json.dumps(document))
    assert DirectionSet.load(copy / "directions").provenance["traces"] == "/somewhere/else/traces"
