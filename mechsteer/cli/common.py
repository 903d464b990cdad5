"""Argument helpers that several commands share: the model pair, the traces and their sentence
labels, argument types that refuse a bad value while parsing, and checks of output folders.

Every argument is parsed (``type=``) and every output path checked before a model loads, so a
typo costs nothing: ``--layers a,b``, ``--coeffs one,two`` or ``--n 0`` stop at once with one line.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, get_args

from mechsteer.core.errors import ArtefactError, ConfigError
from mechsteer.core.models import DTypeChoice, missing_model_path, spec_model_name
from mechsteer.data.prompts import get_template
from mechsteer.data.traces import TRACES_FILE, load_traces
from mechsteer.experiment.config import RunConfig
from mechsteer.experiment.keys import key_defaults
from mechsteer.steering.labels import BehaviourLabels, ground_truth_labels, taxonomy_labels

# ------------------------------------------------------------------------------------------
# Argument types (argparse reports their ArgumentTypeError as "argument --x: <message>")


def run_default(key: str) -> Any:
    """A run config key's default: a per-stage command's flag defaults to what ``mechsteer run`` uses."""
    return key_defaults(RunConfig)[key]


def int_at_least(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    parse.__name__ = f"int >= {minimum}"
    return parse


positive_int = int_at_least(1)
non_negative_int = int_at_least(0)


def float_in(low: float, high: float = math.inf, *, low_open: bool = False) -> Callable[[str], float]:
    """An argument type: a finite number in [low, high] (or (low, high] with ``low_open``)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value) or value < low or (low_open and value == low) or value > high:
            bounds = f"{'>' if low_open else '>='} {low:g}" + ("" if high == math.inf else f" and <= {high:g}")
            raise argparse.ArgumentTypeError(f"must be a finite number {bounds}, got {text}")
        return value
    return parse


positive_float = float_in(0, low_open=True)
non_negative_float = float_in(0)
probability = float_in(0, 1, low_open=True)


def int_list(text: str) -> list[int]:
    """``"2,3"`` -> [2, 3]; non-negative integers, at least one."""
    parts = [part.strip() for part in text.split(",") if part.strip()]
    try:
        values = [int(part) for part in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 2,3; got {text!r}") from None
    if not values or any(value < 0 for value in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated non-negative integers such as 2,3; got {text!r}")
    return values


def float_list(text: str) -> list[float]:
    """``"1,2.5"`` -> [1.0, 2.5]; finite numbers, at least one."""
    parts = [part.strip() for part in text.split(",") if part.strip()]
    try:
        values = [float(part) for part in parts]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers such as 1,2,4; got {text!r}") from None
    if not values or any(value != value or value in (float("inf"), float("-inf")) for value in values):
        raise argparse.ArgumentTypeError(f"expected comma-separated finite numbers such as 1,2,4; got {text!r}")
    return values


def model_pair(text: str) -> tuple[str, str]:
    """``"BASE,THINKING"`` -> the two model specs."""
    parts = text.split(",")
    if len(parts) != 2 or not all(part.strip() for part in parts):
        raise argparse.ArgumentTypeError(f"expected BASE,THINKING (two model specs); got {text!r}")
    return parts[0].strip(), parts[1].strip()


# ------------------------------------------------------------------------------------------
# Checks before any work


def check_output_folder(path: str | Path, flag: str = "--out") -> Path:
    """Refuse an output folder that cannot be one: an existing file, a path through a file, or a
    place this user cannot write. Nothing is created."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{flag} {path} is a file, not a folder; pass a folder path")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{flag} {path}: {existing} is a file, so no folder can be made there")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{flag} {path}: {existing} is not writable; pass a folder you can write to")
    return path


def check_model_specs(*specs: tuple[str, str]) -> None:
    """Refuse model specs that name a path that does not exist, before any model loads.
    Each spec comes with its flag: ``("--model", spec)``."""
    for flag, spec in specs:
        missing = missing_model_path(spec)
        if missing:
            raise ConfigError(f"{flag} {spec!r}: {missing}")


def check_traces_folder(path: str | Path, flag: str = "--traces") -> Path:
    """A folder holding ``traces.jsonl``, else one line saying what is there instead."""
    path = Path(path)
    if not path.is_dir():
        raise ConfigError(f"{flag} {path}: no such folder (it should hold {TRACES_FILE})")
    if not (path / TRACES_FILE).is_file():
        raise ConfigError(f"{flag} {path} has no {TRACES_FILE}: not a traces folder (mechsteer traces writes one)")
    return path


# ------------------------------------------------------------------------------------------
# Pair and labels


def add_pair_and_label_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pair", required=True, type=model_pair,
                        help="BASE,THINKING model specs, e.g. organism-base,organism-thinking")
    parser.add_argument("--traces", required=True, help="folder with the thinking model's traces.jsonl")
    parser.add_argument("--taxonomy", default=None, help="taxonomy folder: SAE labels of the traces' sentences")
    parser.add_argument("--ground-truth", action="store_true",
                        help="label sentences with the organism grammar instead of a taxonomy")
    parser.add_argument("--allow-other-model", action="store_true",
                        help="use a taxonomy or direction set made for another model of the same width on purpose")
    parser.add_argument("--split", default="test", help="benchmark split of the traces (to re-frame prompts)")
    parser.add_argument("--base-template", default=None,
                        help="the base model's prompt, under which the traces are re-framed: a registered template "
                             "or a format string with {question} (default: the benchmark's own, else base_paper)")
    add_placement_args(parser)
    parser.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads")


def add_placement_args(parser: argparse.ArgumentParser) -> None:
    """``--device`` and ``--dtype``: where the models run (mechsteer.core.models.load_model)."""
    parser.add_argument("--device", default="auto", help="auto (CUDA when present, else cpu), cpu, cuda, cuda:1 ...")
    parser.add_argument("--dtype", default="auto", choices=get_args(DTypeChoice),
                        help="auto: bfloat16 on CUDA, float32 on the CPU")


def check_pair_and_labels(args: argparse.Namespace) -> None:
    """The checks of :func:`add_pair_and_label_args`' arguments that need no model: the labels
    asked for once, the traces folder, the model specs, and a taxonomy made for the thinking model."""
    if args.taxonomy and args.ground_truth:
        raise ConfigError("pass either --taxonomy or --ground-truth, not both")
    if not args.taxonomy and not args.ground_truth:
        raise ConfigError("sentence labels needed: pass --taxonomy DIR (SAE labels) or --ground-truth (organisms)")
    check_traces_folder(args.traces)
    for flag in ("base_template", "thinking_template"):
        if getattr(args, flag, None) is not None:
            get_template(getattr(args, flag))  # an unknown name is refused before anything loads
    base_spec, thinking_spec = args.pair
    check_model_specs(("--pair", base_spec), ("--pair", thinking_spec))
    check_output_folder(args.out)


def labels_from_args(args: argparse.Namespace, benchmark: str | None = None) -> BehaviourLabels:
    """The sentence labels ``--taxonomy`` or ``--ground-truth`` asks for.

    Ground truth is that of ``benchmark``, by default the benchmark of the traces in ``--traces``.
    A taxonomy must have been built from these traces (their digest) on the thinking model of
    ``--pair`` (its name; ``--allow-other-model`` accepts another).
    """
    if args.taxonomy and args.ground_truth:
        raise ConfigError("pass either --taxonomy or --ground-truth, not both")
    if args.taxonomy:
        raw = load_traces(args.traces)
        labels = taxonomy_labels(args.taxonomy, traces=raw)
        if labels.taxonomy is not None and not getattr(args, "allow_other_model", False):
            labels.taxonomy.check_model_name(thinking_model_name(args), args.taxonomy)
        return labels
    if args.ground_truth:
        return ground_truth_labels(benchmark or _traces_benchmark(args.traces))
    raise ConfigError("sentence labels needed: pass --taxonomy DIR (SAE labels) or --ground-truth (organisms)")


def thinking_model_name(args: argparse.Namespace) -> str:
    """The name the thinking model of ``--pair`` carries in artefacts (without loading it)."""
    return spec_model_name(split_pair(args.pair)[1])


def _traces_benchmark(traces_dir: str) -> str:
    traces = load_traces(traces_dir)
    if not traces:
        raise ArtefactError(f"no traces in {traces_dir}")
    return traces[0].benchmark


def progress_line(message: str) -> None:
    """A long stage's progress, on stderr (stdout carries a command's JSON result)."""
    print(message, file=sys.stderr, flush=True)


def split_pair(pair: str | tuple[str, str]) -> tuple[str, str]:
    """``--pair``'s two specs (already split by its argument type, or a ``BASE,THINKING`` string)."""
    if isinstance(pair, tuple):
        return pair
    try:
        return model_pair(pair)
    except argparse.ArgumentTypeError as error:
        raise ConfigError(f"--pair: {error}") from None


def parse_floats(text: str) -> list[float]:
    try:
        return float_list(text)
    except argparse.ArgumentTypeError as error:
        raise ConfigError(str(error)) from None


__all__ = ["add_pair_and_label_args", "check_model_specs", "check_output_folder", "check_pair_and_labels",
           "check_traces_folder", "float_in", "float_list", "int_at_least", "int_list", "labels_from_args", "model_pair",
           "non_negative_int", "parse_floats", "probability", "positive_int", "progress_line", "split_pair", "thinking_model_name"]
