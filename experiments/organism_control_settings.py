"""The hybrid and its controls at other coefficients, on a finished organism run (README, "The
coefficient matters, and so does the guardrail").

Reuses the run's taxonomy and directions and evaluates, on its evaluation problems, the hybrid
(``sae_argmax``), the bias alone at the hybrid's timing (``only_bias``), the bias alone at every
token, and norm-matched random vectors, at each coefficient setting; plus the bias alone
rescaled to the norm of bias + the first steered behaviour's vector. Prints one JSON line per
setting. Usage: ``python experiments/organism_control_settings.py --run runs/demo``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
from pathlib import Path

import torch

from mechsteer.core.models import load_pair
from mechsteer.data.benchmarks import load_benchmark
from mechsteer.experiment.config import RunConfig, run_hybrid_config
from mechsteer.experiment.pipeline import evaluate_hybrid
from mechsteer.grading.statistics import gap_recovered
from mechsteer.hybrid.timing import AlwaysBiasPolicy, BiasOnlyPolicy, SAEArgmaxPolicy
from mechsteer.steering.direction_set import DirectionSet
from mechsteer.taxonomy.artefact import Taxonomy

COEFFICIENT_SETTINGS = ([1.0], [2.0], [4.0], [1.0, 2.0, 4.0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", default="runs/demo", help="a finished `mechsteer run` / `mechsteer demo` folder")
    args = parser.parse_args()
    run = Path(args.run)
    config = RunConfig.from_dict(json.loads((run / "config.json").read_text()))
    torch.set_num_threads(config.threads or 1)
    pair = load_pair(config.base_model, config.thinking_model)
    problems = load_benchmark(config.benchmark, config.eval_split, config.n_eval)
    taxonomy = Taxonomy.load(run / "taxonomy")
    direction_set = DirectionSet.load(run / "directions")
    if direction_set.bias is None:
        raise SystemExit("the run's direction set has no bias; the bias-only controls need one")
    random_set = direction_set.random_like(config.seed)
    hybrid_policy = SAEArgmaxPolicy(taxonomy.load_sae(), list(direction_set.behaviour_ids))
    report = json.loads((run / "report.json").read_text())
    base, thinking = report["base_accuracy"], report["thinking_accuracy"]

    def evaluate(name: str, policy, steering: DirectionSet, coefficients: list[float]) -> None:
        hybrid_config = run_hybrid_config(dataclasses.replace(config, coefficients=coefficients),
                                          direction_set.layer, taxonomy.provenance.layer)
        with tempfile.TemporaryDirectory() as scratch:
            records = evaluate_hybrid(pair, problems, steering, policy, hybrid_config, Path(scratch) / "results.jsonl",
                                      base_template=config.resolved_base_template,
                                      thinking_template=config.resolved_thinking_template, progress=lambda _: None)
        accuracy = sum(bool(r["correct"]) for r in records) / len(records)
        print(json.dumps({
            "setting": name, "coefficients": coefficients, "accuracy": accuracy,
            "gap_recovered": gap_recovered(accuracy, base, thinking),
            "steered_fraction": sum(r["steered_fraction"] for r in records) / len(records),
            "starts_with_plan": sum(r["text"].lstrip().startswith("Plan") for r in records) / len(records),
        }), flush=True)

    for coefficients in COEFFICIENT_SETTINGS:
        evaluate("hybrid", hybrid_policy, direction_set, coefficients)
        evaluate("only_bias", BiasOnlyPolicy(hybrid_policy), direction_set, coefficients)
        evaluate("bias_every_token", AlwaysBiasPolicy(), direction_set, coefficients)
        evaluate("random_vectors", hybrid_policy, random_set, coefficients)
    # the bias alone at the norm of bias + the behaviour the hybrid steers first (plan, on organisms)
    first = _first_steered_behaviour(run)
    scale = float((direction_set.bias + direction_set.direction(first)).norm() / direction_set.bias.norm())
    matched = dataclasses.replace(direction_set, bias=direction_set.bias * scale)
    evaluate(f"only_bias_norm_matched_to_{direction_set.title(first)}", BiasOnlyPolicy(hybrid_policy), matched,
             list(config.coefficients))


def _first_steered_behaviour(run: Path) -> int:
    counts: dict[int, int] = {}
    for line in (run / "eval" / "hybrid" / "results.jsonl").read_text().splitlines():
        behaviours = json.loads(line)["steered_behaviours"]
        if behaviours:
            counts[behaviours[0]] = counts.get(behaviours[0], 0) + 1
    if not counts:
        raise SystemExit("the run's hybrid never steered")
    return max(counts, key=counts.get)


if __name__ == "__main__":
    main()
