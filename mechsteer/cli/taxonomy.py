"""``mechsteer taxonomy``: sweep SAE/cluster taxonomies over layers and K and keep the best."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Literal

from mechsteer.activations import Manifest
from mechsteer.taxonomy.artefact import SELECTION_DOC
from mechsteer.taxonomy.build import JudgeSettings
from mechsteer.taxonomy.clustering import CLUSTERING_METHODS
from mechsteer.taxonomy.sweep import sweep_to_folder

NormaliseChoice = Literal["yes", "no", "both"]
NORMALISE_CHOICES: dict[NormaliseChoice, tuple[bool, ...]] = {"yes": (True,), "no": (False,), "both": (True, False)}
JUDGE_CHOICES_HELP = (
    "none (geometric selection), oracle (ground-truth labels of sentences.jsonl; organisms only), "
    "http, http:<model>, or local:<model spec>"
)


def parse_grid(text: str) -> list[int]:
    """``"5:50:5"`` -> 5, 10, ..., 50 (stop included); ``"3,5,8"`` -> those; ``"7"`` -> [7]."""
    try:
        if ":" in text:
            parts = [int(part) for part in text.split(":")]
            if len(parts) not in (2, 3):
                raise ValueError
            start, stop = parts[0], parts[1]
            step = parts[2] if len(parts) == 3 else 1
            if step < 1 or stop < start:
                raise ValueError
            return list(range(start, stop + 1, step))
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(
            f"cannot read {text!r} as a grid: expected start:stop[:step] (stop included, step >= 1) "
            "or comma-separated integers"
        ) from None


def run_taxonomy_cli(args: argparse.Namespace) -> int:
    activations_dir = Path(args.activations)
    if not (activations_dir / "manifest.json").is_file():
        raise SystemExit(f"{activations_dir} has no manifest.json: not an activation run folder")
    manifest = Manifest.load(activations_dir)
    layers = parse_grid(args.layers) if args.layers else list(manifest.config["layers"])
    grid = parse_grid(args.n_latents)
    out = Path(args.out)
    settings = JudgeSettings(
        n_top_examples=args.n_examples, n_random_examples=args.n_examples,
        n_repeats=args.n_repeats, n_in=args.n_judged, n_out=args.n_judged,
        n_per_behaviour=args.n_judged, concurrency=args.judge_concurrency,
    )
    sae_options = {} if args.max_epochs is None else {"max_epochs": args.max_epochs}
    rows, best = sweep_to_folder(
        activations_dir, layers, grid, out, judge_spec=args.judge, method=args.method, k=args.k,
        seed=args.seed, normalise=NORMALISE_CHOICES[args.normalise], judge_settings=settings,
        sae_options=sae_options, progress=True,
    )
    summary = {
        "out": str(out), "layer": best.provenance.layer, "n_latents": best.provenance.n_latents,
        "normalised": best.provenance.normalised,
        "selection_criterion": best.metrics.selection_criterion,
        "selection_score": best.metrics.selection_score, "ari": best.metrics.ari,
        "nmi": best.metrics.nmi, "behaviours": [b.title for b in best.behaviours],
    }
    print(json.dumps(summary))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "taxonomy", help="sweep SAE/cluster taxonomies over layers and K; keep the best",
        description=SELECTION_DOC,
    )
    parser.add_argument("--activations", required=True, help="an activation run folder")
    parser.add_argument("--layers", default=None,
                        help="layers to sweep, e.g. 2,3 or 1:4 (default: all in the run)")
    parser.add_argument("--n-latents", default="5:50:5",
                        help="behaviour counts, start:stop[:step] with stop included, or a list (default 5:50:5)")
    parser.add_argument("--k", type=int, default=3, help="top-k of the SAE (default 3)")
    parser.add_argument("--method", choices=CLUSTERING_METHODS, default="sae")
    parser.add_argument("--judge", default="none", help=JUDGE_CHOICES_HELP)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--normalise", choices=sorted(NORMALISE_CHOICES), default="yes",
                        help="L2-normalise the centred vectors: yes (default), no, or both (swept)")
    parser.add_argument("--max-epochs", type=int, default=None, help="SAE epochs cap (default 300)")
    parser.add_argument("--n-examples", type=int, default=100,
                        help="top-activating and random examples per behaviour, each (default 100)")
    parser.add_argument("--n-repeats", type=int, default=5, help="judge descriptions per behaviour")
    parser.add_argument("--n-judged", type=int, default=100,
                        help="sentences judged per behaviour for consistency (in and out) and completeness")
    parser.add_argument("--judge-concurrency", type=int, default=None)
    parser.add_argument("--out", required=True)
    parser.set_defaults(func=run_taxonomy_cli)


__all__ = ["JUDGE_CHOICES_HELP", "NORMALISE_CHOICES", "parse_grid", "register", "run_taxonomy_cli"]
