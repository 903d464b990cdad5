"""``mechsteer traces``: generate reasoning traces of a model on a benchmark (:mod:`mechsteer.data.traces`),
on the bridge or through an OpenAI-compatible server (``--engine openai``, :mod:`mechsteer.engines`)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import get_args

from mechsteer.cli.commands import add_command
from mechsteer.cli.common import (
    add_placement_args,
    check_model_specs,
    check_output_folder,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    probability,
    run_default,
)
from mechsteer.core.errors import ConfigError
from mechsteer.core.models import load_model, spec_model_name
from mechsteer.data.benchmarks import load_benchmark
from mechsteer.data.prompts import get_template
from mechsteer.data.stage import TraceSettings, run_traces
from mechsteer.data.traces import (
    TRACES_FILE,
    UnclosedThinking,
    check_resumable,
    read_traces,
)
from mechsteer.engines import ENGINE_KINDS, EngineInputs, engine_spec, load_tokenizer
from mechsteer.engines.openai import with_settings


def run_traces_cli(args: argparse.Namespace) -> int:
    check_model_specs(("--model", args.model))
    check_output_folder(args.out)
    problems = load_benchmark(args.benchmark, args.split, args.n)  # before the model: names checked cheaply
    if not problems:
        raise ConfigError(f"--n {args.n}: no problems to generate traces for")
    if args.template is not None:
        get_template(args.template)
    # A folder of another model's traces is refused before this model loads (the settings are
    # checked once it has: the default template depends on its tokenizer).
    existing = read_traces(Path(args.out) / TRACES_FILE)
    check_resumable(existing, Path(args.out) / TRACES_FILE, spec_model_name(args.model), problems[0].benchmark, None,
                    [problem.id for problem in problems])
    engine = engine_spec(args.engine)
    if engine.runs_on == "server":
        if not args.engine_url:
            raise ConfigError(f"--engine {args.engine} asks a server and needs --engine-url, the server's address "
                              "(e.g. http://127.0.0.1:8000/v1)")
        bridge = None  # only the tokenizer: the server holds the weights
    else:
        bridge = load_model(args.model, device=args.device, dtype=args.dtype)
    model = engine.build(EngineInputs(
        model=bridge, tokenizer=load_tokenizer(args.model) if bridge is None else bridge.tokenizer,
        model_name=spec_model_name(args.model), url=args.engine_url, server_model=args.engine_model or args.model,
        http=with_settings(timeout=args.engine_timeout, max_concurrency=args.engine_concurrency,
                           max_retries=args.engine_max_retries),
        return_token_ids=args.engine_return_token_ids))
    settings = TraceSettings(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                             temperature=args.temperature, top_p=args.top_p, seed=args.seed, unclosed=args.unclosed)
    records = run_traces(model, problems, Path(args.out), template=args.template, settings=settings)
    accuracy = sum(record.correct for record in records) / len(records)
    print(json.dumps({"n": len(records), "accuracy": accuracy, "out": str(Path(args.out) / TRACES_FILE)}))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = add_command(subparsers, "traces")
    parser.add_argument("--model", required=True, help="model spec (see mechsteer.core.models)")
    parser.add_argument("--benchmark", required=True, help="gsm8k, math500, math or organism")
    parser.add_argument("--split", default="test")
    parser.add_argument("--n", type=positive_int, default=None, help="the first N problems (default: all)")
    parser.add_argument("--out", required=True)
    parser.add_argument("--template", default=None, help="prompt template name (default: by model)")
    # the defaults of a run's train traces (mechsteer run): the same inputs write the same traces
    parser.add_argument("--max-new-tokens", type=positive_int, default=run_default("max_new_tokens"))
    parser.add_argument("--batch-size", type=positive_int, default=run_default("batch_size"))
    parser.add_argument("--temperature", type=non_negative_float, default=run_default("trace_temperature"),
                        help="0 (default): greedy decoding; above 0: sampling at this temperature")
    parser.add_argument("--top-p", type=probability, default=run_default("trace_top_p"),
                        help="with a temperature above 0: nucleus sampling below 1 (default 1)")
    parser.add_argument("--unclosed", choices=get_args(UnclosedThinking), default=run_default("unclosed_thinking"),
                        help="a thinking trace cut off before </think>: no answer, or extract one anyway")
    parser.add_argument("--seed", type=non_negative_int, default=run_default("seed"), help="with sampling")
    parser.add_argument("--engine", default="bridge",
                        help=f"a registered engine ({', '.join(ENGINE_KINDS)} or a plug-in's): bridge: generate on "
                             "the loaded model (default); openai: through an OpenAI-compatible server's "
                             "/v1/completions (vLLM, SGLang, llama.cpp, transformers serve)")
    parser.add_argument("--engine-url", default=None, help="with --engine openai: e.g. http://127.0.0.1:8000/v1")
    parser.add_argument("--engine-model", default=None,
                        help="with --engine openai: the server's name for the model (default: --model)")
    parser.add_argument("--engine-timeout", type=positive_float, default=None,
                        help="seconds one request may take; a retry after a timeout waits twice as long (default 600)")
    parser.add_argument("--engine-concurrency", type=positive_int, default=None,
                        help="requests in flight, abandoned ones included (default 8)")
    parser.add_argument("--engine-max-retries", type=non_negative_int, default=None, help="default 3")
    parser.add_argument("--engine-return-token-ids", action="store_true",
                        help="record the server's generated token ids (vLLM's return_token_ids) "
                             "instead of re-tokenising the text")
    add_placement_args(parser)
    parser.set_defaults(func=run_traces_cli)
