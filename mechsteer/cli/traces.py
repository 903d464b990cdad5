"""``mechsteer traces``: generate reasoning traces of a model on a benchmark (:mod:`mechsteer.data.traces`)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mechsteer.core.models import load_model
from mechsteer.data.benchmarks import load_benchmark
from mechsteer.data.traces import TRACES_FILE, generate_traces


def run_traces_cli(args: argparse.Namespace) -> int:
    model = load_model(args.model, device=args.device)
    problems = load_benchmark(args.benchmark, args.split, args.n)
    records = generate_traces(
        model, problems, args.out, template=args.template, max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size, do_sample=args.sample, seed=args.seed,
    )
    accuracy = sum(record.correct for record in records) / len(records)
    print(json.dumps({"n": len(records), "accuracy": accuracy, "out": str(Path(args.out) / TRACES_FILE)}))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("traces", help="generate reasoning traces (resumable JSONL)")
    parser.add_argument("--model", required=True, help="model spec (see mechsteer.core.models)")
    parser.add_argument("--benchmark", required=True, help="gsm8k, math500, math or organism")
    parser.add_argument("--split", default="test")
    parser.add_argument("--n", type=int, default=None)
    parser.add_argument("--out", required=True)
    parser.add_argument("--template", default=None, help="prompt template name (default: by model)")
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.set_defaults(func=run_traces_cli)
