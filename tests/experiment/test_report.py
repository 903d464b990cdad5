"""report.md: tables a researcher reads (no JSON dump, numbers rounded), every plot in place, and
`mechsteer report DIR` rebuilding the same file from a run or sweep folder, finished or not."""

import json
import re
import shutil
from dataclasses import asdict
from pathlib import Path

import pytest

from mechsteer.cli import main
from mechsteer.experiment.markdown import cell, num, table
from mechsteer.experiment.points import failed_row, point_row
from mechsteer.experiment.sweep import SweepSpec, plan_points, write_results
from tests.experiment.conftest import SHORT_RUN

LONG_DECIMALS = re.compile(r"\d\.\d{5,}")
IMAGE = re.compile(r"!\[[^\]]*\]\(([^)]+)\)")
RUN_SECTIONS = ("## Headline", "## Behaviours (taxonomy)", "**Selection:**", "**Sweep**", "## Directions",
                "## Causal ablations", "**Necessity**", "**Sufficiency**", "## When behaviours fired (hybrid)",
                "## Timings and config", "Config digest")


def assert_readable(text: str) -> None:
    """No JSON dump and no number printed with more than four decimals."""
    assert "```json" not in text
    fenced = False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
            continue
        assert not line.lstrip().startswith(("{", "[")), f"a JSON-like line: {line!r}"
        if fenced:
            assert not line.strip().startswith(("{", "[", "\"")), f"JSON in a code block: {line!r}"
    assert not LONG_DECIMALS.findall(text), LONG_DECIMALS.findall(text)


def test_numbers_are_rounded_and_cells_are_escaped():
    assert num(0.8333333333333334) == "0.833" and num(2 / 3, 9) == "0.6667" and num(None) == "—"
    assert num(float("-inf")) == "-inf" and num(True) == "yes" and num(7) == "7"
    assert cell("a | b\n*c* $x$") == "a \\| b \\*c\\* \\$x\\$"
    assert table(["a", "b"], [[1, 2]], "lr") == ["| a | b |", "| --- | ---: |", "| 1 | 2 |", ""]


# ------------------------------------------------------------------------------------------
# A run folder (the short organism run of conftest)


@pytest.mark.slow
def test_run_report_has_every_section_as_tables(short_run):
    out, report = short_run
    text = (out / "report.md").read_text()
    assert_readable(text)
    for section in RUN_SECTIONS:
        assert section in text, section
    assert "Unfinished run" not in text
    # the headline: every model with its accuracy and interval as report.json has them
    saved = json.loads((out / "report.json").read_text())
    hybrid_row = next(line for line in text.splitlines() if line.startswith("| **hybrid** |"))
    low, high = saved["accuracy_intervals"]["hybrid"]
    assert f"| {saved['hybrid_accuracy']:.3f} | {low:.3f} – {high:.3f} | {saved['gap_recovered']:.3f} |" in hybrid_row
    for name, control in saved["controls"].items():
        assert f"| {name} | {control['accuracy']:.3f} |" in text.replace("\\_", "_")
        assert "gap_recovered_interval" in control  # report.json keeps the full numbers
    # the behaviours: title, size, an example sentence and the ground-truth label each
    taxonomy = json.loads((out / "taxonomy" / "taxonomy.json").read_text())
    for behaviour in taxonomy["behaviours"]:
        row = next(line for line in text.splitlines() if line.startswith(f"| {behaviour['id']} | **"))
        assert cell(behaviour["title"]) in row and f"| {behaviour['size']} (" in row
        assert cell(behaviour["examples"][0]) in row
        assert f"{cell(behaviour['matched_label'])} ({behaviour['label_precision']:.2f} /" in row
    # the sweep as one small table: a row per (layer, normalisation), a column per K
    sweep = saved["taxonomy"]["sweep"]
    header = next(line for line in text.splitlines() if line.startswith("| layer | normalised |"))
    assert header.count("K = ") == len({row["n_latents"] for row in sweep})
    assert text.count("| yes |") + text.count("| no |") >= len({(r["layer"], r["normalised"]) for r in sweep})


@pytest.mark.slow
def test_run_report_embeds_every_plot_with_a_caption(short_run):
    out, _ = short_run
    text = (out / "report.md").read_text()
    lines = text.splitlines()
    images = IMAGE.findall(text)
    assert {"accuracy.png", "timeline.png", "transitions.png", "ablations/ablations.png",
            "taxonomy/metrics_vs_k.png", "taxonomy/sentence_map.png"} <= set(images)
    for image in images:
        assert (out / image).is_file(), image
        index = next(i for i, line in enumerate(lines) if f"]({image})" in line)
        assert lines[index + 2].startswith("*") and lines[index + 2].endswith("*")  # its caption


@pytest.mark.slow
def test_mechsteer_report_rebuilds_the_same_report_and_plots(short_run, tmp_path, capsys):
    out, _ = short_run
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    for plot in ("accuracy.png", "timeline.png", "transitions.png", "report.md"):
        (copy / plot).unlink()
    assert main(["report", str(copy)]) == 0
    assert (copy / "report.md").read_text() == (out / "report.md").read_text()
    assert all((copy / plot).stat().st_size > 0 for plot in ("accuracy.png", "timeline.png", "transitions.png"))
    assert "not finished" not in capsys.readouterr().out


def test_mechsteer_report_refuses_files_of_another_run(short_run, tmp_path, capsys):
    """A cut results.jsonl, or a report.json written for another config, is refused (issue 25)."""
    out, _ = short_run
    cut = tmp_path / "cut"
    shutil.copytree(out, cut)
    results = cut / "eval" / "hybrid" / "results.jsonl"
    lines = results.read_text().splitlines(keepends=True)
    results.write_text("".join(lines[: len(lines) // 2]))
    assert main(["report", str(cut)]) != 0
    assert "eval/hybrid is not what the 'eval_hybrid' stage wrote (changed: results.jsonl)" in capsys.readouterr().err
    # a folder written before file digests were recorded: the count of records is checked
    record = json.loads((cut / "stages.json").read_text())
    for entry in record["stages"].values():
        entry.pop("outputs", None)
    (cut / "stages.json").write_text(json.dumps(record))
    assert main(["report", str(cut)]) != 0
    assert f"holds {len(lines) // 2} records" in capsys.readouterr().err
    other = tmp_path / "other"
    shutil.copytree(out, other)
    report = json.loads((other / "report.json").read_text())
    report["config"]["n_latents"] = [7]
    (other / "report.json").write_text(json.dumps(report))
    assert main(["report", str(other)]) != 0
    assert "was written for another config" in capsys.readouterr().err


@pytest.mark.slow
def test_a_partly_finished_run_reports_its_finished_stages_and_the_missing_ones(short_run, tmp_path, capsys):
    out, _ = short_run
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    (copy / "report.json").unlink()
    stages_file = copy / "stages.json"
    record = json.loads(stages_file.read_text())
    missing = [stage for stage in record["stages"] if stage.startswith("eval_") and stage not in
               ("eval_base", "eval_thinking")] + ["ablations"]
    for stage in missing:
        del record["stages"][stage]
    stages_file.write_text(json.dumps(record))
    assert main(["report", str(copy)]) == 0
    printed = capsys.readouterr().out
    assert f"not finished ({len(missing) + 1} stages): {', '.join([*missing, 'report'])}" in printed
    text = (copy / "report.md").read_text()
    assert_readable(text)
    assert f"Stages not done: {', '.join([*missing, 'report'])}." in text
    assert "| base |" in text and "| thinking |" in text and "| **hybrid** |" not in text
    assert "**Selection:**" in text and "The ablations stage has not finished." in text
    assert "The hybrid evaluation has not finished." in text


def test_a_folder_that_is_neither_run_nor_sweep_is_refused(tmp_path):
    with pytest.raises(SystemExit, match="neither a run folder"):
        main(["report", str(tmp_path)])


# ------------------------------------------------------------------------------------------
# A sweep folder (written by the sweep's own writers, with made-up numbers)


def metrics(index: int) -> dict:
    return {"base_accuracy": 0.5, "thinking_accuracy": 0.9, "hybrid_accuracy": 0.7 + index / 30,
            "gap_recovered": 0.123456789 * (index + 1), "tokens_steered_fraction": 0.0212345,
            "taxonomy_layer": 2, "n_behaviours": 4, "taxonomy_ari": 0.49876543, "steer_layer": 1}


def sweep_folder(out: Path) -> tuple[SweepSpec, list]:
    spec = SweepSpec.from_dict({"name": "tiny", "base": SHORT_RUN,
                                "grid": {"coefficients": [[0.5], [1.0], [2.0]]}})
    points = plan_points(spec, out)
    (out / "sweep.json").write_text(json.dumps({"spec": asdict(spec), "points": [
        {"index": p.index, "overrides": p.overrides, "out": p.out, "upstream": p.upstream} for p in points]}))
    return spec, points


def test_sweep_report_is_one_table_of_the_points_with_the_plot(tmp_path, capsys):
    spec, points = sweep_folder(tmp_path)
    rows = [{**point_row(p), **metrics(p.index), "status": "ok", "attempts": 1, "error": None, "seconds": 1.5}
            for p in points[:2]]
    rows.append(failed_row(points[2], 2, "ValueError: unknown policy 'x'", 0.5))
    write_results(rows, tmp_path, title=spec.name, override_keys=spec.swept_keys())
    text = (tmp_path / "report.md").read_text()
    assert_readable(text)
    assert text.startswith("# Sweep tiny\n") and "3 points, 2 finished, 1 failed" in text
    for point in points[:2]:
        assert f"[{Path(point.out).name}](points/{Path(point.out).name}/report.md)" in text
    assert f"point `{Path(points[2].out).name}` failed after 2 attempt(s): ValueError: unknown policy 'x'" in text
    assert "| 0.123 |" in text and "| 2.1% |" in text  # rounded, the steered share in percent
    assert IMAGE.findall(text) == ["results.png"] and (tmp_path / "results.png").is_file()
    written = text
    (tmp_path / "report.md").unlink()
    assert main(["report", str(tmp_path)]) == 0
    assert (tmp_path / "report.md").read_text() == written
    assert "not finished" not in capsys.readouterr().out


def test_an_unfinished_sweep_reports_the_points_done_so_far(tmp_path, capsys):
    _, points = sweep_folder(tmp_path)
    done = Path(points[1].out)
    done.mkdir(parents=True)
    (done / "report.json").write_text(json.dumps({**metrics(1), "controls": {}, "taxonomy": {"layer": 2,
                                                  "n_behaviours": 4, "ari": 0.5}, "directions": {"layer": 1}}))
    assert main(["report", str(tmp_path)]) == 0
    unfinished = [Path(points[0].out).name, Path(points[2].out).name]
    assert f"not finished (2 points): {', '.join(unfinished)}" in capsys.readouterr().out
    text = (tmp_path / "report.md").read_text()
    assert_readable(text)
    assert "1 finished" in text and f"[{done.name}](points/{done.name}/report.md)" in text
    assert text.count("| not finished |") == 2 and "results.png" not in text
