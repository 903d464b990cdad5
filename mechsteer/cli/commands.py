"""The command table: each built-in command's name, one-line help and the module that declares its
arguments, read without importing those modules.

``mechsteer --help`` lists the table (and the plug-ins' commands, by entry-point name) and imports
nothing heavy; a command's module, with its torch-level imports, is imported only when that command
is parsed. Each module's ``register(subparsers)`` adds its parsers through :func:`add_command`,
so a command's help is written here only.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from typing import Any

COMMAND_GROUP = "mechsteer.commands"  # plug-ins' commands: entry point name = command, value = register(subparsers)


@dataclass(frozen=True)
class CommandSpec:
    name: str
    help: str
    module: str  # defines register(subparsers), which adds this command's parser


COMMANDS: tuple[CommandSpec, ...] = (
    CommandSpec("info", "print versions, device and offline assets as JSON", "mechsteer.cli.info"),
    CommandSpec("traces", "generate reasoning traces (resumable JSONL)", "mechsteer.cli.traces"),
    CommandSpec("activations", "pool sentence activations of traces", "mechsteer.cli.activations"),
    CommandSpec("taxonomy", "sweep SAE/cluster taxonomies over layers and K; keep the best", "mechsteer.cli.taxonomy"),
    CommandSpec("directions", "behaviour steering directions in the base model", "mechsteer.cli.directions"),
    CommandSpec("ablate", "necessity and sufficiency of behaviour directions", "mechsteer.cli.ablate"),
    CommandSpec("run", "run the whole pipeline for one pair and benchmark", "mechsteer.cli.run"),
    CommandSpec("demo", "the pipeline on the shipped organism pair (runs/demo, runs/demo-grid)", "mechsteer.cli.run"),
    CommandSpec("sweep", "run the pipeline over a grid/list of config values (exits 1 if any point failed)",
                "mechsteer.cli.sweep"),
    CommandSpec("report", "rewrite report.md and the plots of a run or sweep folder (nothing is recomputed)",
                "mechsteer.cli.report"),
    CommandSpec("export", "a steering vector as a llama.cpp control vector (GGUF), or the taxonomy's SAE as a "
                          "SAELens folder", "mechsteer.cli.export"),
)
_BY_NAME = {spec.name: spec for spec in COMMANDS}


def add_command(subparsers: argparse._SubParsersAction, name: str, **options: Any) -> argparse.ArgumentParser:
    """The parser of built-in command ``name``, with the table's help."""
    return subparsers.add_parser(name, help=_BY_NAME[name].help, **options)


def plugin_commands() -> dict[str, EntryPoint]:
    """The plug-ins' commands by name (their modules not imported)."""
    return {entry_point.name: entry_point for entry_point in entry_points(group=COMMAND_GROUP)}


def command_in(argv: list[str]) -> str | None:
    """The command an argument list names: its first word that is not an option."""
    return next((word for word in argv if not word.startswith("-")), None)


__all__ = ["COMMANDS", "COMMAND_GROUP", "CommandSpec", "add_command", "command_in", "plugin_commands"]
