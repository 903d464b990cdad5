"""Issue 17's causal checks per behaviour on a shipped organism pair (README, "Causal ablations on the organisms").

Runs `mechsteer.organisms.study.organism_study` (ground-truth labels from the grammar; necessity on 32
test problems, half of them calling for a check; sufficiency on 32 contexts per behaviour) and prints,
per behaviour, the bars of the issue:

- sufficiency: adding the behaviour's direction makes it the next sentence >= 3x as often as a
  norm-matched random direction (thinking-trace contexts, and the base organism's own prompts);
- necessity: projecting it out of the thinking organism (per-layer directions at every layer) cuts
  its rate by >= 50%, and moves the behaviours that the grammar does not make depend on it
  (`grammar.DEPENDENTS`) by less than half as much.

    python experiments/organism_causal_checks.py --method mean --coeff 4 --out runs/causal-mean
"""

from __future__ import annotations

import argparse

import torch

from mechsteer import load_model
from mechsteer.experiment.config import DEMO_CONFIG
from mechsteer.organisms import model_spec
from mechsteer.organisms.study import independent_change, organism_study
from mechsteer.steering.optimise import OptimisationConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grammar", default="v3", choices=("v1", "v3"), help="the shipped pair")
    parser.add_argument("--method", default="mean", choices=("mean", "optimised"))
    parser.add_argument("--coeff", type=float, default=4.0)
    parser.add_argument("--layer", type=int, default=1, help="the base model's steering layer")
    parser.add_argument("--out", required=True, help="a work folder (traces, directions, outputs)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    base = load_model(model_spec("base", args.grammar))
    thinking = load_model(model_spec("thinking", args.grammar))
    settings = {}
    if args.method == "optimised":
        # the demo's optimisation settings (DEMO_CONFIG.optimisation)
        settings["optimisation"] = OptimisationConfig(**DEMO_CONFIG.optimisation)
    study = organism_study(base, thinking, args.out, grammar=args.grammar, direction_method=args.method,
                           coeff=args.coeff, layer=args.layer, **settings)
    titles = dict(zip(study.directions.behaviour_ids, study.directions.titles, strict=True))
    for row in study.necessity:
        independent = independent_change(row, titles)
        met = row.relative_change <= -0.5 and independent < abs(row.relative_change) / 2
        print(f"necessity {row.title:8s} ({row.variant}): {row.rate_before:.2f} -> {row.rate_after:.2f} "
              f"({row.relative_change:+.0%}); independent behaviours move at most {independent:.0%}; "
              f"all behaviours {row.max_other_relative_change:.0%} -> {'met' if met else 'missed'}")
    for where, rows in (("thinking contexts", study.sufficiency), ("base prompts", study.sufficiency_base_contexts)):
        for row in rows:
            print(f"sufficiency {row.title:8s} ({where}, coefficient {row.coeff:g}): unsteered "
                  f"{row.unsteered.rate:.2f}, random {row.random.rate:.2f}, steered {row.steered.rate:.2f} "
                  f"(p = {row.p_value:.2g}) -> {'met' if row.passed else 'missed'}")


if __name__ == "__main__":
    main()
