"""``mechsteer activations``: pool sentence activations of traces (:mod:`mechsteer.activations`)."""

from __future__ import annotations

import argparse
import json

from mechsteer.activations import ActivationConfig, extract_activations
from mechsteer.core.models import load_model
from mechsteer.data.labels import ground_truth_for
from mechsteer.data.traces import load_traces


def run_activations_cli(args: argparse.Namespace) -> int:
    model = load_model(args.model, device=args.device)
    traces = load_traces(args.traces)
    if not traces:
        raise SystemExit(f"no traces found in {args.traces}")
    # Traces of a benchmark with ground truth (the organisms) get its labels on every sentence.
    ground_truth = ground_truth_for(traces[0].benchmark)
    labeller = ground_truth.label_reasoning if ground_truth is not None else None
    config = ActivationConfig(
        layers=[int(layer) for layer in args.layers.split(",")],
        include_previous_token=not args.no_previous_token,
        batch_size=args.batch_size,
    )
    manifest = extract_activations(model, traces, args.out, config, labeller=labeller)
    print(json.dumps({"n_sentences": manifest.n_sentences, "shards": len(manifest.shards),
                      "throughput": manifest.throughput, "out": str(args.out)}))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("activations", help="pool sentence activations of traces")
    parser.add_argument("--model", required=True)
    parser.add_argument("--traces", required=True, help="folder with traces.jsonl")
    parser.add_argument("--layers", required=True, help="comma-separated layers, e.g. 2,3")
    parser.add_argument("--out", required=True)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--no-previous-token", action="store_true",
                        help="pool only the sentence's own tokens (default includes the one before)")
    parser.add_argument("--device", default="cpu")
    parser.set_defaults(func=run_activations_cli)
