"""The ``mechsteer`` console script: one module per command, plus commands that plug-ins add.

The commands are declared in :mod:`mechsteer.cli.commands` (name, help, module). Each command
module defines ``register(subparsers)``, which adds its parser and sets ``func`` on it; only the
module of the command being run is imported, so that ``mechsteer --help`` and every command's
``--help`` start fast (the heavy libraries, transformers and transformer-lens, load with a model).
Plug-ins add commands through the entry-point group ``mechsteer.commands`` (the organisms'
``organism`` command is one).

Errors a person can act on are printed as one line, ``mechsteer: error: ...``, with exit code 2
for a refused argument or config and 1 otherwise: mechsteer's own errors
(:class:`~mechsteer.core.errors.MechsteerError`: corrupt artefacts, provenance mismatches,
missing models or data), file-system errors (a missing file, a full disk) and the ``ValueError``
of a library check (then with where it was raised). Any other exception is a bug and keeps its
traceback. ``--debug`` (anywhere on the command line) or ``MECHSTEER_DEBUG=1`` shows the
traceback of every error.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback

from mechsteer.cli.commands import COMMANDS, command_in, plugin_commands
from mechsteer.core.errors import ConfigError, MechsteerError

DEBUG_ENV = "MECHSTEER_DEBUG"
DEBUG_HELP = f"show the full traceback of an error (or set {DEBUG_ENV}=1)"
INTERRUPTED_EXIT = 130


def build_parser(command: str | None = None, *, only: bool = False) -> argparse.ArgumentParser:
    """The command line's parser. ``only``: just ``command``'s parser is built in full (its module
    imported), every other command is listed by name and help."""
    parser = argparse.ArgumentParser(
        prog="mechsteer",
        description="Mechanistic interpretability of reasoning: traces, taxonomy, steering, hybrid.",
    )
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    registered: set[str] = set()
    wanted = {spec.module for spec in COMMANDS if spec.name == command}
    for spec in COMMANDS:
        if only and spec.module not in wanted:
            subparsers.add_parser(spec.name, help=spec.help)
        elif spec.module not in registered:  # a module may declare several commands (run and demo)
            registered.add(spec.module)
            importlib.import_module(spec.module).register(subparsers)
    for name, entry_point in plugin_commands().items():
        if only and name != command:
            subparsers.add_parser(name, help=f"a plug-in's command ({entry_point.value.split(':')[0]})")
        else:
            entry_point.load()(subparsers)
    _add_debug_flag(parser)
    return parser


def _add_debug_flag(parser: argparse.ArgumentParser) -> None:
    """``--debug`` after any (sub)command too; SUPPRESS keeps a subcommand from resetting it."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for subparser in action.choices.values():
                if not any("--debug" in other.option_strings for other in subparser._actions):
                    subparser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                                           help=DEBUG_HELP)
                _add_debug_flag(subparser)


def _raise_site(error: BaseException) -> str:
    """``file:line`` of the frame that raised ``error`` (the innermost of its traceback)."""
    frames = traceback.extract_tb(error.__traceback__)
    if not frames:
        return "unknown place"
    frame = frames[-1]
    marker = f"{os.sep}mechsteer{os.sep}"
    filename = frame.filename
    if marker in filename:
        filename = "mechsteer" + os.sep + filename.rsplit(marker, 1)[1]
    return f"{filename}:{frame.lineno}"


def error_line(error: BaseException) -> tuple[int, str] | None:
    """(exit code, the one line to print) for an error a person can act on; None for a bug."""
    if isinstance(error, ConfigError):
        return 2, str(error)
    if isinstance(error, MechsteerError):
        return 1, str(error)
    if isinstance(error, OSError):
        return 1, f"{error} (--debug for the traceback)"
    if isinstance(error, ValueError):
        return 1, f"{error} ({type(error).__name__} at {_raise_site(error)}; --debug for the traceback)"
    return None


def main(argv: list[str] | None = None) -> int:
    words = sys.argv[1:] if argv is None else argv
    parser = build_parser(command_in(words), only=True)
    args = parser.parse_args(words)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    debug = bool(getattr(args, "debug", False)) or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    try:
        result = args.func(args)
    except KeyboardInterrupt:
        if debug:
            raise
        print("mechsteer: interrupted; rerun the same command to resume where it stopped", file=sys.stderr)
        return INTERRUPTED_EXIT
    except Exception as error:
        explained = None if debug else error_line(error)
        if explained is None:
            raise
        code, message = explained
        print(f"mechsteer: error: {' '.join(message.split())}", file=sys.stderr)
        return code
    return int(result or 0)
