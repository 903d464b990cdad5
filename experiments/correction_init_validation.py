"""The correction vectors' held-out loss with each start (init: zero or mean_norm), on a run's disagreement cache.

Held-out: the tenth of the *training* traces the training keeps aside (never evaluation problems).
Prints one line per init (each seed's best held-out top-K KL) and a JSON object last.

    python experiments/correction_init_validation.py --run runs/demo-correction
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from mechsteer.core.models import load_model
from mechsteer.experiment.config import RunConfig
from mechsteer.experiment.layout import RunPaths
from mechsteer.experiment.settings import correction_config
from mechsteer.steering.correction import VectorInit, train_correction_vectors
from mechsteer.steering.disagreements import load_disagreements


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="a run folder with a finished disagreements stage")
    args = parser.parse_args()
    paths = RunPaths(Path(args.run))
    config = RunConfig.from_dict(json.loads(paths.stages_file.read_text())["config"])
    cache = load_disagreements(paths.disagreements)
    base = load_model(config.base_model)
    titles = {behaviour: str(behaviour) for behaviour in cache.positions_per_behaviour()}
    results = {}
    inits: tuple[VectorInit, ...] = ("zero", "mean_norm")
    for init in inits:
        settings = dataclasses.replace(correction_config(config), init=init)
        report = train_correction_vectors(base, cache, titles, settings).report
        results[init] = {"unsteered_val_kl": round(report.unsteered_val_kl, 4), "best_val_kl": round(report.best_val_kl, 4),
                         "seeds": {seed.seed: round(seed.best_val_kl, 4) for seed in report.seeds}}
        print(init, results[init], flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
