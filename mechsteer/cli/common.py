"""Argument helpers that several commands share: the model pair, the traces and their sentence labels."""

from __future__ import annotations

import argparse

from mechsteer.data.traces import load_traces
from mechsteer.steering.labels import BehaviourLabels, ground_truth_labels, taxonomy_labels


def add_pair_and_label_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pair", required=True, help="BASE,THINKING model specs, e.g. organism-base,organism-thinking")
    parser.add_argument("--traces", required=True, help="folder with the thinking model's traces.jsonl")
    parser.add_argument("--taxonomy", default=None, help="taxonomy folder: SAE labels of the traces' sentences")
    parser.add_argument("--ground-truth", action="store_true",
                        help="label sentences with the organism grammar instead of a taxonomy")
    parser.add_argument("--split", default="test", help="benchmark split of the traces (to re-frame prompts)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")


def labels_from_args(args: argparse.Namespace, n_traces: int, benchmark: str | None = None) -> BehaviourLabels:
    """The sentence labels ``--taxonomy`` or ``--ground-truth`` asks for.

    Ground truth is that of ``benchmark``, by default the benchmark of the traces in ``--traces``.
    """
    if args.taxonomy and args.ground_truth:
        raise SystemExit("pass either --taxonomy or --ground-truth, not both")
    if args.taxonomy:
        return taxonomy_labels(args.taxonomy, n_traces)
    if args.ground_truth:
        return ground_truth_labels(benchmark or _traces_benchmark(args.traces))
    raise SystemExit("sentence labels needed: pass --taxonomy DIR (SAE labels) or --ground-truth (organisms)")


def _traces_benchmark(traces_dir: str) -> str:
    traces = load_traces(traces_dir)
    if not traces:
        raise SystemExit(f"no traces in {traces_dir}")
    return traces[0].benchmark


def split_pair(pair: str) -> tuple[str, str]:
    parts = pair.split(",")
    if len(parts) != 2 or not all(parts):
        raise SystemExit(f"--pair must be BASE,THINKING; got {pair!r}")
    return parts[0], parts[1]


def parse_floats(text: str) -> list[float]:
    try:
        return [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise SystemExit(f"expected comma-separated numbers, got {text!r}") from None


__all__ = ["add_pair_and_label_args", "labels_from_args", "parse_floats", "split_pair"]
