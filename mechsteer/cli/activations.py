"""``mechsteer activations``: pool sentence activations of traces (:mod:`mechsteer.activations`)."""

from __future__ import annotations

import argparse
import json

from mechsteer.activations import ActivationConfig, pool_activations
from mechsteer.cli.commands import add_command
from mechsteer.cli.common import (
    add_placement_args,
    check_model_specs,
    check_output_folder,
    check_traces_folder,
    int_list,
    positive_int,
    run_default,
)
from mechsteer.core.errors import ArtefactError
from mechsteer.core.models import load_model
from mechsteer.data.traces import load_traces


def run_activations_cli(args: argparse.Namespace) -> int:
    check_model_specs(("--model", args.model))
    check_traces_folder(args.traces)
    check_output_folder(args.out)
    traces = load_traces(args.traces)
    if not traces:
        raise ArtefactError(f"no traces in {args.traces}: its traces.jsonl has no complete record")
    model = load_model(args.model, device=args.device, dtype=args.dtype)
    config = ActivationConfig(layers=args.layers, include_previous_token=not args.no_previous_token,
                              batch_size=args.batch_size)
    manifest = pool_activations(model, traces, args.out, config)
    print(json.dumps({"n_sentences": manifest.n_sentences, "shards": len(manifest.shards),
                      "throughput": manifest.throughput, "out": str(args.out)}))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = add_command(subparsers, "activations")
    parser.add_argument("--model", required=True)
    parser.add_argument("--traces", required=True, help="folder with traces.jsonl")
    parser.add_argument("--layers", required=True, type=int_list, help="comma-separated layers, e.g. 2,3")
    parser.add_argument("--out", required=True)
    parser.add_argument("--batch-size", type=positive_int, default=run_default("batch_size"))
    parser.add_argument("--no-previous-token", action="store_true",
                        help="pool only the sentence's own tokens (default includes the one before)")
    add_placement_args(parser)
    parser.set_defaults(func=run_activations_cli)
