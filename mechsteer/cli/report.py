"""``mechsteer report DIR``: rewrite report.md and the plots of a run or sweep folder from what is
on disk, without recomputing anything (:func:`mechsteer.experiment.report.rebuild_run_report`,
:func:`mechsteer.experiment.sweep.rebuild_sweep_report`); says which stages or points are missing."""

from __future__ import annotations

import argparse
from pathlib import Path

from mechsteer.cli.commands import add_command
from mechsteer.experiment.layout import REPORT_MD, STAGES_FILE
from mechsteer.experiment.report import rebuild_run_report
from mechsteer.experiment.sweep import rebuild_sweep_report


def report_cli(args: argparse.Namespace) -> int:
    folder = Path(args.dir)
    if (folder / "sweep.json").is_file():
        missing = rebuild_sweep_report(folder)
        what = "points"
    elif (folder / STAGES_FILE).is_file():
        missing = rebuild_run_report(folder).missing
        what = "stages"
    else:
        raise SystemExit(f"{folder} is neither a run folder (stages.json, from `mechsteer run`) nor a sweep "
                         "folder (sweep.json, from `mechsteer sweep`)")
    print(f"wrote {folder / REPORT_MD}")
    if missing:
        print(f"not finished ({len(missing)} {what}): {', '.join(missing)}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = add_command(subparsers, "report")
    parser.add_argument("dir", help="a run folder (mechsteer run/demo --out) or a sweep folder (mechsteer sweep --out)")
    parser.set_defaults(func=report_cli)
