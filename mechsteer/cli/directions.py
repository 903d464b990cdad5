"""``mechsteer directions``: behaviour steering directions in the base model (:mod:`mechsteer.steering`)."""

from __future__ import annotations

import argparse
import json

import torch

from mechsteer.cli.commands import add_command
from mechsteer.cli.common import (
    add_pair_and_label_args,
    check_pair_and_labels,
    check_traces_folder,
    labels_from_args,
    non_negative_int,
    positive_int,
    progress_line,
    split_pair,
)
from mechsteer.core.errors import ConfigError
from mechsteer.core.models import load_model
from mechsteer.core.validation import join_problems
from mechsteer.experiment.nested import optimisation_problems
from mechsteer.steering.framing import load_framed_traces
from mechsteer.steering.mean import POOLINGS, default_layer
from mechsteer.steering.methods import direction_method_spec
from mechsteer.steering.optimise import OptimisationConfig
from mechsteer.steering.sae_map import MAPPINGS
from mechsteer.steering.stage import DirectionSettings, build_directions


def run_directions_cli(args: argparse.Namespace) -> int:
    check_pair_and_labels(args)
    if args.base_traces:
        check_traces_folder(args.base_traces, "--base-traces")
    method = direction_method_spec(args.method)  # an unknown name is refused before any model loads
    if method.needs_taxonomy and not args.taxonomy:
        raise ConfigError(f"--method {args.method} needs --taxonomy (a taxonomy's labels, e.g. its SAE's decoder "
                          "directions)")
    if args.threads:
        torch.set_num_threads(args.threads)
    base_spec, thinking_spec = split_pair(args.pair)
    base = load_model(base_spec, device=args.device, dtype=args.dtype)
    layer = default_layer(base.cfg.n_layers) if args.layer is None else args.layer
    if not 0 <= layer < base.cfg.n_layers:
        raise ConfigError(f"--layer {layer} does not exist in {base.cfg.model_name!r} "
                          f"(layers 0 to {base.cfg.n_layers - 1})")
    thinking_traces = load_framed_traces(args.traces, base.tokenizer, args.split, args.base_template)
    base_traces = load_framed_traces(args.base_traces, base.tokenizer, args.split, args.base_template) if args.base_traces else None
    labels = labels_from_args(args, thinking_traces[0].benchmark)
    settings = DirectionSettings(method=args.method, layer=layer, pooling=args.pooling, mapping=args.mapping,
                                 optimisation=optimisation_from_args(args))
    thinking = None
    if method.needs_thinking:
        thinking = load_model(thinking_spec, device=args.device, dtype=args.dtype)
        if labels.taxonomy is not None:  # made on this thinking model
            labels.taxonomy.check_model(thinking, args.taxonomy, allow_other_model=args.allow_other_model)
    result = build_directions(base, thinking_traces, labels, settings, base_traces=base_traces, thinking=thinking,
                              provenance={"traces": str(args.traces),
                                          "base_traces": str(args.base_traces) if args.base_traces else None,
                                          "pair": [base_spec, thinking_spec]},
                              progress=progress_line)
    result.save(args.out)
    print(json.dumps({"out": str(args.out), "method": result.method, "layer": layer,
                      "norms": dict(zip(result.titles, result.norms.tolist(), strict=True)),
                      "bias_norm": None if result.bias is None else float(result.bias.norm())}))
    return 0


def optimisation_from_args(args: argparse.Namespace) -> OptimisationConfig:
    """``--steps``/``--max-examples`` and any other OptimisationConfig field from ``--optimisation``
    (a JSON mapping, as a run config's ``optimisation``; its keys win), seeded by ``--seed``."""
    try:
        extra = json.loads(args.optimisation) if args.optimisation else {}
    except json.JSONDecodeError as error:
        raise ConfigError(f"--optimisation is not JSON ({error.msg}); e.g. '{{\"lr\": 0.1, \"steps\": 100}}'") from None
    if not isinstance(extra, dict):
        raise ConfigError(f"--optimisation must be a JSON mapping of OptimisationConfig fields, not {extra!r}")
    settings = {"steps": args.steps, "max_examples": args.max_examples, **extra}
    problems = optimisation_problems(settings)
    if problems:
        raise ConfigError("--" + join_problems(problems))
    return OptimisationConfig(**settings, seed=args.seed)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = add_command(subparsers, "directions")
    add_pair_and_label_args(parser)
    parser.add_argument("--method", default="mean",
                        help="a registered direction method: mean, sae, optimised, or a plug-in's")
    parser.add_argument("--layer", type=non_negative_int, default=None, help="default: about 37.5%% of the depth")
    parser.add_argument("--out", required=True)
    parser.add_argument("--base-traces", default=None,
                        help="the base model's own traces (for the bias of mean/sae sets)")
    parser.add_argument("--pooling", choices=POOLINGS, default="sentence")
    parser.add_argument("--mapping", choices=MAPPINGS, default="auto",
                        help="SAE directions: thinking -> base space")
    parser.add_argument("--steps", type=positive_int, default=50, help="optimised: steps per vector")
    parser.add_argument("--max-examples", type=positive_int, default=2048, help="optimised: examples per vector")
    parser.add_argument("--optimisation", default=None,
                        help='optimised: other OptimisationConfig fields as JSON, as a run config\'s optimisation '
                             '(e.g. \'{"lr": 0.1, "init_norm": 8}\')')
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(func=run_directions_cli)


__all__ = ["register", "run_directions_cli"]
