"""``mechsteer info``: versions, device and offline assets, as JSON."""

from __future__ import annotations

import argparse
import json

from mechsteer.core.info import collect_info


def run_info(args: argparse.Namespace) -> int:
    print(json.dumps(collect_info(), indent=2))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("info", help="print versions, device and offline assets as JSON")
    parser.set_defaults(func=run_info)
