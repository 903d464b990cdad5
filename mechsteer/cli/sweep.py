"""``mechsteer sweep``: the pipeline over a grid or a list of config values (:mod:`mechsteer.experiment.sweep`)."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import yaml

from mechsteer.cli.commands import add_command
from mechsteer.cli.common import check_output_folder
from mechsteer.core.errors import ConfigError
from mechsteer.core.store import read_json
from mechsteer.experiment.executors import EXECUTORS
from mechsteer.experiment.sweep import SweepSpec, run_one_point, run_sweep, wandb_sweep_config


def sweep_cli(args: argparse.Namespace) -> int:
    spec = SweepSpec.from_yaml(args.config)
    if args.executor:
        spec = dataclasses.replace(spec, executor=args.executor)
    if args.ray_address:
        spec = dataclasses.replace(spec, ray_address=args.ray_address)
    if args.wandb:
        spec = dataclasses.replace(spec, wandb=True)
    spec.validate()
    out = check_output_folder(args.out or Path("runs") / "sweeps" / spec.name)
    if args.export_wandb:
        Path(args.export_wandb).write_text(yaml.safe_dump(wandb_sweep_config(spec, out), sort_keys=False))
        print(json.dumps({"wandb_sweep": args.export_wandb, "run_it": f"wandb sweep {args.export_wandb}"}))
        return 0
    if args.point:
        overrides = read_json(args.point, "point's overrides (a JSON object)")
        if not isinstance(overrides, dict):
            raise ConfigError(f"--point {args.point} holds a {type(overrides).__name__}, not a JSON object of overrides")
        row = run_one_point(spec, out, overrides)
        print(json.dumps(row, default=str))
        return 0 if row["status"] == "ok" else 1
    rows = run_sweep(spec, out)
    failed = sum(row["status"] != "ok" for row in rows)
    print(json.dumps({"results": str(out / "results.csv"), "points": len(rows), "failed": failed}))
    return 0 if failed == 0 else 1


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = add_command(subparsers, "sweep")
    parser.add_argument("--config", required=True, help="experiments/sweeps/<name>.yaml")
    parser.add_argument("--out", default=None, help="sweep folder (default runs/sweeps/<name>)")
    parser.add_argument("--executor", choices=EXECUTORS, default=None, help="override the file's executor")
    parser.add_argument("--ray-address", default=None, help="connect to this Ray cluster instead of starting one")
    parser.add_argument("--wandb", action="store_true", help="log every point as a wandb run, grouped by sweep")
    parser.add_argument("--export-wandb", metavar="FILE", default=None,
                        help="write a wandb sweep YAML (grid) for wandb agents instead of running")
    parser.add_argument("--point", metavar="JSON_FILE", default=None,
                        help="run one point with these overrides (what the exported wandb sweep calls)")
    parser.set_defaults(func=sweep_cli)
