"""``mechsteer info``: versions, device and offline assets, as JSON; with ``--keys``, the config
keys as the Markdown table of docs/config.md (``--write FILE`` puts it into FILE's generated part)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mechsteer.cli.commands import add_command
from mechsteer.core.errors import ConfigError
from mechsteer.core.info import collect_info
from mechsteer.experiment.config import RunConfig
from mechsteer.experiment.keydocs import key_table_markdown, with_key_table


def run_info(args: argparse.Namespace) -> int:
    if args.write is not None and not args.keys:
        raise ConfigError("--write goes with --keys: mechsteer info --keys --write docs/config.md")
    if not args.keys:
        print(json.dumps(collect_info(), indent=2))
        return 0
    table = key_table_markdown(RunConfig)
    if args.write is None:
        print(table)
        return 0
    path = Path(args.write)
    path.write_text(with_key_table(path.read_text(encoding="utf-8"), table, str(path)), encoding="utf-8")
    print(json.dumps({"key_table": str(path)}))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = add_command(subparsers, "info")
    parser.add_argument("--keys", action="store_true",
                        help="print every config key (section, default, digest, stages, flag, meaning) as Markdown")
    parser.add_argument("--write", default=None, metavar="FILE",
                        help="with --keys: replace FILE's generated key table (docs/config.md) instead of printing")
    parser.set_defaults(func=run_info)
