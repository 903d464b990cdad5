"""``mechsteer run`` (the whole pipeline for a config file) and ``mechsteer demo`` (the embedded
organism config) (:mod:`mechsteer.experiment.pipeline`)."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from mechsteer.cli.commands import add_command
from mechsteer.cli.common import check_output_folder, positive_int
from mechsteer.core.store import exclusive_folder
from mechsteer.experiment.config import DEMO_CONFIG, DEMO_GRID_CONFIG, RunConfig
from mechsteer.experiment.keydocs import key_docs, key_listing
from mechsteer.experiment.keys import override_flags
from mechsteer.experiment.layout import RunPaths
from mechsteer.experiment.pipeline import run_pipeline
from mechsteer.experiment.report import format_number, report_table
from mechsteer.experiment.state import RunState, validate_for
from mechsteer.taxonomy.judge.spec import JUDGE_CACHE_DIR, clear_judge_cache


def run_cli(args: argparse.Namespace) -> int:
    config = RunConfig.from_yaml(args.config)  # every key checked: a refused config runs nothing
    if args.wandb:
        config = dataclasses.replace(config, wandb=True)
    config = with_overrides(config, args)
    validate_for(config, Path(args.out))
    check_output_folder(args.out)
    if args.clear_judge_cache:
        with exclusive_folder(Path(args.out)):
            RunState(Path(args.out), config)  # a folder of another config is refused before the cache goes
        taxonomy = RunPaths(Path(args.out)).taxonomy
        removed = clear_judge_cache(taxonomy)
        print(json.dumps({"judge_cache_cleared": str(taxonomy / JUDGE_CACHE_DIR), "files": removed}))
    report = run_pipeline(config, args.out)
    print(report_table(report))
    print(json.dumps({"report": str(RunPaths(Path(args.out)).report_json)}))
    return 0


# `mechsteer run` flags (argparse dest) -> the config key each overrides (declared with the key).
OVERRIDES = override_flags(RunConfig)
KEY_DOCS = {doc.name: doc for doc in key_docs(RunConfig)}


def with_overrides(config: RunConfig, args: argparse.Namespace) -> RunConfig:
    """The config with ``--device``/``--dtype`` and the ``--engine*`` flags where given (a device and
    a server's URL are not part of the digest; the engine and the served model names are)."""
    changes = {key: getattr(args, flag) for flag, key in OVERRIDES.items() if getattr(args, flag, None) is not None}
    if not changes:
        return config
    config = dataclasses.replace(config, **changes)
    config.validate()
    return config


def demo_cli(args: argparse.Namespace) -> int:
    print("mechsteer demo: the full pipeline (traces -> activations -> SAE taxonomy -> directions -> tuning -> "
          "hybrid + controls + baselines -> ablations) on the shipped organism pair and the organism task, "
          "twice: tuned on the validation split, and with the paper's coefficient grid and guardrail.")
    outputs = []
    for config, out in ((DEMO_CONFIG, Path(args.out)), (DEMO_GRID_CONFIG, Path(f"{args.out}-grid"))):
        if args.n is not None:
            config = dataclasses.replace(config, n_eval=args.n, n_train=args.n)
        if args.wandb:
            config = dataclasses.replace(config, wandb=True)
        check_output_folder(out)
        report = run_pipeline(config, out)
        outputs.append((config, out, report))
    for config, out, report in outputs:
        tuning = report.get("tuning") or {}
        chosen = (tuning.get("chosen") or {})
        how = (f"tuned on {tuning['split']}: coefficients {chosen.get('coefficients')}, windows {chosen.get('windows')}"
               if tuning.get("split") else f"coefficients {config.coefficients} with the guardrail, windows {config.windows}")
        print(f"\n{config.name} ({how}; taxonomy selected by {report['taxonomy'].get('selected_by')}, "
              f"ARI {format_number(report['taxonomy'].get('ari'))})")
        print(report_table(report))
        print(f"report: {RunPaths(out).report_md}")
    return 0


WANDB_HELP = ("track the run with wandb (sets wandb: true; WANDB_MODE=offline keeps it local; "
              "wandb's files go under OUT/wandb)")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = add_command(subparsers, "run", formatter_class=argparse.RawDescriptionHelpFormatter,
                         epilog=f"config keys (experiments/NAME.yaml; docs/config.md):\n{key_listing(RunConfig)}")
    parser.add_argument("--config", required=True, help="experiments/<name>.yaml")
    parser.add_argument("--out", required=True)
    parser.add_argument("--wandb", action="store_true", help=WANDB_HELP)
    for flag, name in OVERRIDES.items():
        doc = KEY_DOCS[name]
        assert doc.flag is not None  # OVERRIDES holds the keys that have a flag
        # argparse %-formats an option's help
        parser.add_argument(doc.flag, dest=flag, default=None, choices=doc.choices,
                            help=f"override {name}: {doc.help}".replace("%", "%%"))
    parser.add_argument("--clear-judge-cache", action="store_true",
                        help=f"delete OUT/taxonomy/{JUDGE_CACHE_DIR} (the HTTP judge's saved answers) first; "
                             "it matters only when the taxonomy stage runs again")
    parser.set_defaults(func=run_cli)
    demo = add_command(subparsers, "demo")
    demo.add_argument("--out", default="runs/demo", help="the tuned run's folder; the grid run goes to OUT-grid")
    demo.add_argument("--n", type=positive_int, default=None,
                      help="problems for training and evaluation (default 200)")
    demo.add_argument("--wandb", action="store_true", help=WANDB_HELP)
    demo.set_defaults(func=demo_cli)
