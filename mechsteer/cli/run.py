"""``mechsteer run`` (the whole pipeline for a config file) and ``mechsteer demo`` (the embedded
organism config) (:mod:`mechsteer.experiment.pipeline`)."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from mechsteer.experiment.config import DEMO_CONFIG, RunConfig
from mechsteer.experiment.pipeline import run_pipeline
from mechsteer.experiment.report import report_table


def run_cli(args: argparse.Namespace) -> int:
    config = RunConfig.from_yaml(args.config)
    if args.wandb:
        config = dataclasses.replace(config, wandb=True)
    report = run_pipeline(config, args.out)
    print(report_table(report))
    print(json.dumps({"report": str(Path(args.out) / "report.json")}))
    return 0


def demo_cli(args: argparse.Namespace) -> int:
    print("mechsteer demo: the full pipeline (traces -> activations -> SAE taxonomy -> directions -> "
          "hybrid + controls -> ablations) on the shipped organism pair and the organism task.")
    config = DEMO_CONFIG if args.n is None else dataclasses.replace(DEMO_CONFIG, n_eval=args.n, n_train=args.n)
    if args.wandb:
        config = dataclasses.replace(config, wandb=True)
    report = run_pipeline(config, args.out)
    print(report_table(report))
    print(f"report: {Path(args.out) / 'report.md'}")
    return 0


WANDB_HELP = ("track the run with wandb (sets wandb: true; WANDB_MODE=offline keeps it local; "
              "wandb's files go under OUT/wandb)")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("run", help="run the whole pipeline for one pair and benchmark")
    parser.add_argument("--config", required=True, help="experiments/<name>.yaml")
    parser.add_argument("--out", required=True)
    parser.add_argument("--wandb", action="store_true", help=WANDB_HELP)
    parser.set_defaults(func=run_cli)
    demo = subparsers.add_parser("demo", help="the pipeline on the shipped organism pair (runs/demo)")
    demo.add_argument("--out", default="runs/demo")
    demo.add_argument("--n", type=int, default=None, help="problems for training and evaluation (default 200)")
    demo.add_argument("--wandb", action="store_true", help=WANDB_HELP)
    demo.set_defaults(func=demo_cli)
