"""The `mechsteer` console script. Each pipeline stage registers its own subcommands.

A stage module adds a subcommand by defining ``register_cli(subparsers)``; list the
module in ``STAGE_MODULES`` below. Modules are imported lazily only when the CLI starts.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Each module must define `register_cli(subparsers: argparse._SubParsersAction) -> None`
# and set `func` on its parsers via `parser.set_defaults(func=...)`.
STAGE_MODULES: tuple[str, ...] = (
    "mechsteer.core.info",
    "mechsteer.organisms.cli",
    "mechsteer.data.traces",
    "mechsteer.activations",
    "mechsteer.taxonomy.build",
    "mechsteer.steering.directions",
    "mechsteer.causal.ablations",
    "mechsteer.experiment.pipeline",
    "mechsteer.experiment.sweep",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mechsteer",
        description="Mechanistic interpretability of reasoning: traces, taxonomy, steering, hybrid.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module_name in STAGE_MODULES:
        importlib.import_module(module_name).register_cli(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    result = args.func(args)
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
