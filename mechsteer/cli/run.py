"""``mechsteer run`` (the whole pipeline for a config file) and ``mechsteer demo`` (the embedded
organism config) (:mod:`mechsteer.experiment.pipeline`)."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import get_args

from mechsteer.cli.common import check_output_folder, positive_int
from mechsteer.core.models import DTypeChoice
from mechsteer.experiment.config import DEMO_CONFIG, RunConfig
from mechsteer.experiment.pipeline import run_pipeline
from mechsteer.experiment.report import report_table
from mechsteer.taxonomy.judge.spec import JUDGE_CACHE_DIR, clear_judge_cache


def run_cli(args: argparse.Namespace) -> int:
    config = RunConfig.from_yaml(args.config)  # every key checked: a refused config runs nothing
    if args.wandb:
        config = dataclasses.replace(config, wandb=True)
    config = with_placement(config, args)
    check_output_folder(args.out)
    if args.clear_judge_cache:
        removed = clear_judge_cache(Path(args.out) / "taxonomy")
        print(json.dumps({"judge_cache_cleared": str(Path(args.out) / "taxonomy" / JUDGE_CACHE_DIR), "files": removed}))
    report = run_pipeline(config, args.out)
    print(report_table(report))
    print(json.dumps({"report": str(Path(args.out) / "report.json")}))
    return 0


def with_placement(config: RunConfig, args: argparse.Namespace) -> RunConfig:
    """The config with ``--device``/``--dtype`` where given (a device is not part of the digest)."""
    changes = {key: getattr(args, key) for key in ("device", "dtype") if getattr(args, key, None) is not None}
    if not changes:
        return config
    config = dataclasses.replace(config, **changes)
    config.validate()
    return config


def demo_cli(args: argparse.Namespace) -> int:
    print("mechsteer demo: the full pipeline (traces -> activations -> SAE taxonomy -> directions -> "
          "hybrid + controls -> ablations) on the shipped organism pair and the organism task.")
    config = DEMO_CONFIG if args.n is None else dataclasses.replace(DEMO_CONFIG, n_eval=args.n, n_train=args.n)
    if args.wandb:
        config = dataclasses.replace(config, wandb=True)
    check_output_folder(args.out)
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
    parser.add_argument("--device", default=None, help="override the config's device (auto, cpu, cuda, cuda:1 ...)")
    parser.add_argument("--dtype", default=None, choices=get_args(DTypeChoice), help="override the config's dtype")
    parser.add_argument("--clear-judge-cache", action="store_true",
                        help=f"delete OUT/taxonomy/{JUDGE_CACHE_DIR} (the HTTP judge's saved answers) first; "
                             "it matters only when the taxonomy stage runs again")
    parser.set_defaults(func=run_cli)
    demo = subparsers.add_parser("demo", help="the pipeline on the shipped organism pair (runs/demo)")
    demo.add_argument("--out", default="runs/demo")
    demo.add_argument("--n", type=positive_int, default=None,
                      help="problems for training and evaluation (default 200)")
    demo.add_argument("--wandb", action="store_true", help=WANDB_HELP)
    demo.set_defaults(func=demo_cli)
