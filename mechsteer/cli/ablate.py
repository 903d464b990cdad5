"""``mechsteer ablate``: necessity and sufficiency of behaviour directions (:mod:`mechsteer.causal`)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from mechsteer.causal.stage import AblationSettings, run_ablations
from mechsteer.cli.commands import add_command
from mechsteer.cli.common import (
    add_pair_and_label_args,
    check_pair_and_labels,
    float_list,
    labels_from_args,
    positive_int,
    progress_line,
    split_pair,
)
from mechsteer.core.models import load_model
from mechsteer.data.benchmarks import load_benchmark
from mechsteer.data.traces import default_template, load_traces
from mechsteer.steering.direction_set import DirectionSet
from mechsteer.steering.framing import load_framed_traces


def run_ablate_cli(args: argparse.Namespace) -> int:
    check_pair_and_labels(args)
    # The artefacts are read before any model loads, and checked against the models as soon as
    # they do: a wrong set is refused before the necessity pass, not after it.
    directions = DirectionSet.load(args.directions)
    necessity_set = DirectionSet.load(args.necessity_directions) if args.necessity_directions else None
    if args.threads:
        torch.set_num_threads(args.threads)
    base_spec, thinking_spec = split_pair(args.pair)
    base = load_model(base_spec, device=args.device, dtype=args.dtype)
    thinking = load_model(thinking_spec, device=args.device, dtype=args.dtype)
    directions.check_model(base, allow_other_name=args.allow_other_model)
    raw_traces = load_traces(args.traces)
    traces = load_framed_traces(args.traces, base.tokenizer, args.split, args.base_template)
    benchmark = traces[0].benchmark
    labels = labels_from_args(args, benchmark)
    if labels.taxonomy is not None:
        labels.taxonomy.check_model(thinking, args.taxonomy, allow_other_model=args.allow_other_model)
    problems = load_benchmark(benchmark, args.eval_split, args.n_problems)
    settings = AblationSettings(
        thinking_template=args.thinking_template or default_template(thinking, benchmark),
        max_new_tokens=args.max_new_tokens, coeffs=tuple(args.coeffs), n_contexts=args.n_contexts,
        window=args.window, steer_generation=AUTO_ON_OFF[args.steer_generation], with_bias=AUTO_ON_OFF[args.with_bias],
        n_random=args.n_random, sentence_tokens=args.sentence_tokens, per_layer=args.per_layer,
        per_layer_pooling=args.per_layer_pooling, batch_size=args.batch_size, seed=args.seed)
    summary = run_ablations(base, thinking, directions, labels, traces, raw_traces, problems, benchmark, settings,
                            args.out, necessity_directions=necessity_set, progress=progress_line)
    summary["outputs"] = {key: str(Path(args.out) / name) for key, name in summary["outputs"].items()}
    print(json.dumps(summary, indent=1))
    return 0


# --steer-generation / --with-bias: auto (None: only for optimised sets), on, off
AUTO_ON_OFF: dict[str, bool | None] = {"auto": None, "on": True, "off": False}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = add_command(subparsers, "ablate")
    add_pair_and_label_args(parser)
    parser.add_argument("--directions", required=True, help="a DirectionSet folder (made in the base model)")
    parser.add_argument("--necessity-directions", default=None,
                        help="a DirectionSet for the thinking model (default: --directions, applied as is)")
    parser.add_argument("--per-layer", action="store_true",
                        help="also ablate per-layer difference-of-means directions of the thinking model at every layer")
    parser.add_argument("--per-layer-pooling", choices=("sentence", "boundary"), default="boundary")
    parser.add_argument("--out", required=True)
    parser.add_argument("--eval-split", default="test", help="benchmark split of the necessity problems")
    parser.add_argument("--thinking-template", default=None,
                        help="the thinking model's prompt for the necessity problems: a registered template or a "
                             "format string with {question} (default: the benchmark's own, else its chat template "
                             "if it has one, else base_paper)")
    parser.add_argument("--n-problems", type=positive_int, default=64)
    parser.add_argument("--max-new-tokens", type=positive_int, default=384)
    parser.add_argument("--coeffs", default=[1.0, 2.0, 4.0], type=float_list,
                        help="steering coefficients for sufficiency (default 1,2,4)")
    parser.add_argument("--window", type=positive_int, default=1, help="steer the last N context positions")
    parser.add_argument("--steer-generation", choices=("auto", "on", "off"), default="auto",
                        help="also steer the generated sentence's positions (auto: only for optimised sets)")
    parser.add_argument("--with-bias", choices=("auto", "on", "off"), default="auto",
                        help="steer with bias + direction, as the hybrid does (auto: only for optimised sets)")
    parser.add_argument("--n-contexts", type=positive_int, default=AblationSettings.n_contexts,
                        help="contexts per behaviour and condition of the sufficiency and necessity tests "
                             f"(default {AblationSettings.n_contexts})")
    parser.add_argument("--n-random", type=positive_int, default=1, help="norm-matched random controls per behaviour")
    parser.add_argument("--sentence-tokens", type=positive_int, default=48,
                        help="max tokens of the generated next sentence")
    parser.add_argument("--batch-size", type=positive_int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(func=run_ablate_cli)
