"""The ``mechsteer`` console script: one module per command, plus commands that plug-ins add.

Each command module defines ``register(subparsers)``, which adds its parser and sets ``func`` on
it. Plug-ins add commands through the entry-point group ``mechsteer.commands`` (the organisms'
``organism`` command is one). Errors of mechsteer's own types are printed as one line; set
``MECHSTEER_DEBUG=1`` (or pass ``--debug``) for the traceback.
"""

from __future__ import annotations

import argparse
from importlib.metadata import entry_points

from mechsteer.cli import ablate, activations, directions, info, run, sweep, taxonomy, traces

COMMAND_GROUP = "mechsteer.commands"
COMMANDS = (info, traces, activations, taxonomy, directions, ablate, run, sweep)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mechsteer",
        description="Mechanistic interpretability of reasoning: traces, taxonomy, steering, hybrid.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS:
        command.register(subparsers)
    for entry_point in entry_points(group=COMMAND_GROUP):
        entry_point.load()(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    result = args.func(args)
    return int(result or 0)
