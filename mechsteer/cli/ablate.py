"""``mechsteer ablate``: necessity and sufficiency of behaviour directions (:mod:`mechsteer.causal`)."""

from __future__ import annotations

import argparse
import json

import torch

from mechsteer.causal.necessity import NecessityVariant, necessity
from mechsteer.causal.outputs import write_outputs
from mechsteer.causal.sufficiency import require_contexts, sufficiency, sufficiency_contexts
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
from mechsteer.data.labels import ground_truth_for, require_ground_truth
from mechsteer.data.traces import default_template
from mechsteer.steering.direction_set import DirectionSet
from mechsteer.steering.framing import load_framed_traces
from mechsteer.steering.labels import (
    BehaviourLabeller,
    SAEBehaviourLabeller,
    ground_truth_behaviour_labeller,
)
from mechsteer.steering.mean import build_mean_directions


def run_ablate_cli(args: argparse.Namespace) -> int:
    check_pair_and_labels(args)
    # The artefacts are read before any model loads, and checked against the models as soon as
    # they do: a wrong set is refused before the necessity pass, not after it.
    directions = DirectionSet.load(args.directions)
    necessity_set = DirectionSet.load(args.necessity_directions) if args.necessity_directions else directions
    if args.threads:
        torch.set_num_threads(args.threads)
    base_spec, thinking_spec = split_pair(args.pair)
    base = load_model(base_spec, device=args.device, dtype=args.dtype)
    thinking = load_model(thinking_spec, device=args.device, dtype=args.dtype)
    directions.check_model(base, allow_other_name=args.allow_other_model)
    # A set made in the base model is applied to the thinking model as is (same residual basis).
    necessity_set.check_model(thinking, allow_other_name=True)
    traces = load_framed_traces(args.traces, base.tokenizer, args.split, args.base_template)
    benchmark = traces[0].benchmark
    labels = labels_from_args(args, len(traces), benchmark)
    if labels.taxonomy is not None:
        labels.taxonomy.check_model(thinking, args.taxonomy, allow_other_model=args.allow_other_model)
        sae_labeller = SAEBehaviourLabeller(thinking, labels.taxonomy.load_sae(), labels.taxonomy.provenance.layer,
                                            labels.taxonomy.provenance.include_previous_token)
        behaviour_labeller: BehaviourLabeller = sae_labeller
    else:
        behaviour_labeller = ground_truth_behaviour_labeller(require_ground_truth(benchmark), labels.titles,
                                                             labels.behaviour_ids)
    # A benchmark with ground truth follows a grammar of one sentence per line (the organisms):
    # the next sentence ends at the newline.
    one_sentence_per_line = ground_truth_for(benchmark) is not None
    problems = load_benchmark(benchmark, args.eval_split, args.n_problems)
    layer_directions = None
    variants: list[NecessityVariant] = ["layer", "all"]
    if args.per_layer:
        # Difference-of-means in the thinking model itself, one set per layer, on the same traces and labels.
        layer_directions = {
            layer: build_mean_directions(thinking, traces, labels.labeller, necessity_set.behaviour_ids,
                                         necessity_set.titles, layer, pooling=args.per_layer_pooling,
                                         text_labeller=labels.text_labeller)
            for layer in range(thinking.cfg.n_layers)
        }
        variants.append("per_layer")
    # the sufficiency contexts are checked before the necessity pass generates anything
    contexts = sufficiency_contexts(traces, base.tokenizer, labels.labeller, text_labeller=labels.text_labeller)
    require_contexts(contexts, directions)
    necessity_rows = necessity(thinking, necessity_set, problems, behaviour_labeller,
                               template=default_template(thinking, benchmark), max_new_tokens=args.max_new_tokens,
                               batch_size=args.batch_size, variants=variants, layer_directions=layer_directions,
                               progress=progress_line)
    # Optimised vectors are trained added over the whole target sentence, so they are tested that way.
    optimised = directions.method == "optimised"
    steer_generation = args.steer_generation == "on" or (args.steer_generation == "auto" and optimised)
    with_bias = args.with_bias == "on" or (args.with_bias == "auto" and optimised)
    sufficiency_rows = sufficiency(base, directions, contexts, behaviour_labeller, coeffs=args.coeffs,
                                   window=args.window, steer_generation=steer_generation, with_bias=with_bias,
                                   n_contexts=args.n_contexts, n_random=args.n_random, seed=args.seed,
                                   max_new_tokens=args.sentence_tokens,
                                   stop_strings=("\n",) if one_sentence_per_line else (), batch_size=args.batch_size,
                                   progress=progress_line)
    settings = {key: value for key, value in vars(args).items() if key != "func"}
    paths = write_outputs(args.out, necessity_rows, sufficiency_rows, settings)
    summary = {
        "necessity": [{"behaviour": r.title, "variant": r.variant, "relative_change": r.relative_change,
                       "max_other_relative_change": r.max_other_relative_change} for r in necessity_rows],
        "sufficiency": [{"behaviour": r.title, "coeff": r.coeff, "steered": r.rate_steered, "random": r.rate_random,
                         "unsteered": r.rate_unsteered} for r in sufficiency_rows],
        "outputs": {key: str(value) for key, value in paths.items()},
    }
    print(json.dumps(summary, indent=1))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("ablate", help="necessity and sufficiency of behaviour directions")
    add_pair_and_label_args(parser)
    parser.add_argument("--directions", required=True, help="a DirectionSet folder (made in the base model)")
    parser.add_argument("--necessity-directions", default=None,
                        help="a DirectionSet for the thinking model (default: --directions, applied as is)")
    parser.add_argument("--per-layer", action="store_true",
                        help="also ablate per-layer difference-of-means directions of the thinking model at every layer")
    parser.add_argument("--per-layer-pooling", choices=("sentence", "boundary"), default="boundary")
    parser.add_argument("--out", required=True)
    parser.add_argument("--eval-split", default="test", help="benchmark split of the necessity problems")
    parser.add_argument("--n-problems", type=positive_int, default=64)
    parser.add_argument("--max-new-tokens", type=positive_int, default=384)
    parser.add_argument("--coeffs", default=[1.0, 2.0, 4.0], type=float_list,
                        help="steering coefficients for sufficiency (default 1,2,4)")
    parser.add_argument("--window", type=positive_int, default=1, help="steer the last N context positions")
    parser.add_argument("--steer-generation", choices=("auto", "on", "off"), default="auto",
                        help="also steer the generated sentence's positions (auto: only for optimised sets)")
    parser.add_argument("--with-bias", choices=("auto", "on", "off"), default="auto",
                        help="steer with bias + direction, as the hybrid does (auto: only for optimised sets)")
    parser.add_argument("--n-contexts", type=positive_int, default=64)
    parser.add_argument("--n-random", type=positive_int, default=1, help="norm-matched random controls per behaviour")
    parser.add_argument("--sentence-tokens", type=positive_int, default=48,
                        help="max tokens of the generated next sentence")
    parser.add_argument("--batch-size", type=positive_int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(func=run_ablate_cli)
