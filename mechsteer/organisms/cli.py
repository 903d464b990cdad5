"""``mechsteer organism train`` and ``mechsteer organism eval``.

``eval`` loads the pair with `mechsteer.core.models.load_model` into TransformerBridges and
generates greedily with `mechsteer.interventions.generation.generate` (KV cache); ``--backend hf``
runs the same evaluation with plain HF ``generate`` instead (a cross-check). The forced
condition appends "Plan:" to the normal prompt (see `mechsteer.organisms.evaluate`).
The LAST line printed with ``--json`` is one JSON object.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from mechsteer.cli.common import check_output_folder, positive_int
from mechsteer.core.errors import ConfigError
from mechsteer.core.models import load_model
from mechsteer.interventions.generation import generate
from mechsteer.organisms import NEGATIVE_BASE, model_spec, organism_names, weights_dir
from mechsteer.organisms.evaluate import GenerateFn, evaluate_organisms, hf_generate_fn
from mechsteer.organisms.evaluate_v4 import evaluate_v4_organisms
from mechsteer.organisms.grammar import GRAMMARS, SHIPPED_GRAMMAR, Grammar
from mechsteer.organisms.tasks import RESERVED_TEST_FROM, SPLITS, OrganismProblem, generate_split
from mechsteer.organisms.tasks_v4 import generate_v4_split
from mechsteer.organisms.train import (
    default_config,
    train_negative_base,
    train_organisms,
)

EVAL_BATCH_SIZE = 128


def bridge_generate_fn(spec: str) -> GenerateFn:
    """A loaded organism (spec name or folder) as a greedy ``(prompts, max_new_tokens)`` function."""
    model = load_model(spec)

    def run(prompts: list[str], max_new_tokens: int) -> list[str]:
        output = generate(model, prompts, max_new_tokens=max_new_tokens, do_sample=False, batch_size=EVAL_BATCH_SIZE)
        return output.texts

    return run


def hf_folder_generate_fn(folder: Path) -> GenerateFn:
    """An organism folder loaded with plain `transformers`, as a greedy generate function."""
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    return hf_generate_fn(model, tokenizer)


def _generate_fns(args: argparse.Namespace) -> dict[str, GenerateFn]:
    """Per organism of the grammar's set: a greedy generate function, by the chosen backend."""
    names = organism_names(args.grammar)
    if args.backend == "bridge":
        specs = {name: model_spec(name, args.grammar) if args.weights is None else str(Path(args.weights) / name)
                 for name in names}
        return {name: bridge_generate_fn(spec) for name, spec in specs.items()}
    folders = {name: weights_dir(name, args.grammar) if args.weights is None else Path(args.weights) / name
               for name in names}
    return {name: hf_folder_generate_fn(folder) for name, folder in folders.items()}


def _eval_problems(args: argparse.Namespace) -> list[OrganismProblem]:
    if args.split == "test" and args.n > RESERVED_TEST_FROM:
        raise ConfigError(f"--n {args.n}: test problems {RESERVED_TEST_FROM} and up are reserved for evaluation "
                          f"outside the project; use --n {RESERVED_TEST_FROM} or less (or the validation split)")
    problems = (generate_v4_split if args.grammar == "v4" else generate_split)(args.split, seed=args.seed)
    if args.n > len(problems):
        raise ConfigError(f"--n {args.n} exceeds the {args.split} split's {len(problems)} problems")
    return problems[: args.n]


def _specs(weights: str | None, grammar: Grammar) -> tuple[str, str]:
    if weights is None:
        return model_spec("base", grammar), model_spec("thinking", grammar)
    root = Path(weights)
    return str(root / "base"), str(root / "thinking")


def _folders(weights: str | None, grammar: Grammar) -> tuple[Path, Path]:
    if weights is None:
        return weights_dir("base", grammar), weights_dir("thinking", grammar)
    return Path(weights) / "base", Path(weights) / "thinking"


def run_eval(args: argparse.Namespace) -> int:
    if args.weights is not None:
        for name in organism_names(args.grammar):
            folder = Path(args.weights) / name
            if not (folder / "config.json").is_file():
                raise ConfigError(f"--weights {args.weights}: {folder} is no model folder (no config.json); "
                                  "pass the --out of `mechsteer organism train`")
    if args.outputs is not None:
        check_output_folder(Path(args.outputs).parent, "--outputs")
    torch.set_num_threads(args.threads)
    problems = _eval_problems(args)
    started = time.perf_counter()
    if args.grammar == "v4":
        return _run_v4_eval(args, problems, started)
    if args.backend == "bridge":
        base_spec, thinking_spec = _specs(args.weights, args.grammar)
        generate_base, generate_thinking = bridge_generate_fn(base_spec), bridge_generate_fn(thinking_spec)
    else:
        base_folder, thinking_folder = _folders(args.weights, args.grammar)
        generate_base = hf_folder_generate_fn(base_folder)
        generate_thinking = hf_folder_generate_fn(thinking_folder)
    summary, outputs = evaluate_organisms(generate_base, generate_thinking, problems, grammar=args.grammar)
    summary["split"] = args.split
    summary["backend"] = args.backend
    summary["wall_seconds"] = round(time.perf_counter() - started, 2)
    if args.outputs:
        Path(args.outputs).write_text(json.dumps(outputs, indent=1))
    if args.json:
        print(json.dumps(summary))
    else:
        for key in ("n", "base_accuracy", "thinking_accuracy", "forced_base_accuracy", "gap",
                    "plan_only_accuracy", "oracle_timing_accuracy", "random_timing_accuracy"):
            print(f"{key}: {summary[key]}")
        print(f"behaviour_counts: {summary['behaviour_counts']}")
        print(f"correct_trace_share: {summary['correct_trace_share']:.3f}")
    return 0


def _run_v4_eval(args: argparse.Namespace, problems: list[OrganismProblem], started: float) -> int:
    fns = _generate_fns(args)
    summary, outputs = evaluate_v4_organisms({"main": fns["base"], "negative": fns[NEGATIVE_BASE]}, fns["thinking"],
                                             problems)
    summary.update(split=args.split, backend=args.backend, wall_seconds=round(time.perf_counter() - started, 2))
    if args.outputs:
        Path(args.outputs).write_text(json.dumps(outputs, indent=1))
    if args.json:
        print(json.dumps(summary))
        return 0
    print(f"n: {summary['n']}  thinking: {summary['thinking_accuracy']:.3f}")
    for pair, row in summary["pairs"].items():
        print(f"{pair}: base {row['base_accuracy']:.3f}  plan-only {row['plan_only_accuracy']:.3f}  "
              f"oracle timing {row['oracle_timing_accuracy']:.3f}  random timing {row['random_timing_accuracy']:.3f}  "
              f"skill-cued ceiling {row['skill_cued_ceiling_accuracy']:.3f}  best fixed behaviour "
              f"({row['best_fixed_behaviour']}) {row['best_fixed_behaviour_accuracy']:.3f}")
    print(f"targets met: {summary['targets_met']}")
    return 0


def run_train(args: argparse.Namespace) -> int:
    config = default_config(args.grammar)
    # dataclasses.replace keeps every other setting (the model size, v4's task).
    if args.base_steps is not None:
        config = dataclasses.replace(config, base=dataclasses.replace(config.base, steps=args.base_steps))
    if args.thinking_steps is not None:
        config = dataclasses.replace(config, thinking=dataclasses.replace(config.thinking, steps=args.thinking_steps))
    out = check_output_folder(args.out)  # before minutes of training, not after
    if args.negative_base:
        if args.grammar != "v4":
            raise ConfigError(f"--negative-base: only grammar v4 has a negative-control base; got --grammar {args.grammar}")
        negative = train_negative_base(out, seed=args.seed, config=config, threads=args.threads)
        print(f"wall time: {negative['wall_seconds']:.1f} s (negative base)")
        return 0
    report = train_organisms(out, seed=args.seed, config=config, threads=args.threads)
    print(f"wall time: {report['wall_seconds']:.1f} s "
          f"(base {report['base']['wall_seconds']:.1f} s, thinking {report['thinking']['wall_seconds']:.1f} s)")
    return 0


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("organism", help="train or evaluate the base/thinking model organisms")
    commands = parser.add_subparsers(dest="organism_command", metavar="ACTION", required=True)

    train = commands.add_parser("train", help="train both organisms from scratch (CPU, ~15 min)")
    train.add_argument("--out", required=True, help="output folder; gets base/ and thinking/")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--base-steps", type=positive_int, default=None, help="override the base phase's steps")
    train.add_argument("--thinking-steps", type=positive_int, default=None, help="override the thinking phase's steps")
    train.add_argument("--threads", type=positive_int, default=2,
                       help="torch threads (use 1 when other jobs share the cores: 2 threads then thrash)")
    train.add_argument("--grammar", choices=GRAMMARS, default=SHIPPED_GRAMMAR,
                       help="trace grammar: v1 (one-decision) or v2 (carry slips that a timed check repairs); "
                            "default: the shipped weights' grammar")
    train.add_argument("--negative-base", action="store_true",
                       help="v4 only: train the negative-control base (no carrying) into OUT/negative_base instead")
    train.set_defaults(func=run_train)

    evaluate = commands.add_parser("eval", help="greedy accuracies and behaviour counts on the test split")
    evaluate.add_argument("--n", type=positive_int, default=RESERVED_TEST_FROM,
                          help="number of problems of the split (test: at most the first 400; the rest are reserved)")
    evaluate.add_argument("--split", choices=SPLITS, default="test",
                          help="the split to evaluate on (validation: for choosing among candidate pairs)")
    evaluate.add_argument("--json", action="store_true", help="print one JSON object as the last line")
    evaluate.add_argument("--weights", default=None, help="folder with base/ and thinking/ (default: the shipped pair of --grammar)")
    evaluate.add_argument("--backend", choices=("bridge", "hf"), default="bridge")
    evaluate.add_argument("--seed", type=int, default=0, help="split seed (problem order, names)")
    evaluate.add_argument("--threads", type=positive_int, default=2)
    evaluate.add_argument("--outputs", default=None, help="write the raw generations to this JSON file")
    evaluate.add_argument("--grammar", choices=GRAMMARS, default=SHIPPED_GRAMMAR,
                          help="grammar whose risky steps the oracle/random timing conditions cue, and whose "
                               "shipped pair is evaluated without --weights (default: v1)")
    evaluate.set_defaults(func=run_eval)
