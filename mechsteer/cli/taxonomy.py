"""``mechsteer taxonomy``: sweep SAE/cluster taxonomies over layers and K and keep the best."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Literal

from mechsteer.activations import Manifest
from mechsteer.cli.commands import add_command
from mechsteer.cli.common import (
    check_output_folder,
    non_negative_int,
    positive_float,
    positive_int,
    run_default,
)
from mechsteer.core.errors import ArtefactError, ConfigError
from mechsteer.core.models import spec_model_name
from mechsteer.core.provenance import mismatch, same_model
from mechsteer.taxonomy.artefact import SELECTION_DOC, Taxonomy
from mechsteer.taxonomy.build import JudgeSettings
from mechsteer.taxonomy.clustering import CLUSTERING_METHODS
from mechsteer.taxonomy.judge.spec import (
    JUDGE_CACHE_DIR,
    check_judge_spec,
    clear_judge_cache,
    judge_connection_problem,
)
from mechsteer.taxonomy.stage import TaxonomySettings, build_taxonomy, taxonomy_from_sae

# The flags of a sweep, by their argparse names: --sae-from refuses them (the SAE decides).
SWEEP_FLAGS: dict[str, str] = {"--layers": "layers", "--n-latents": "n_latents", "--k": "k", "--method": "method",
                               "--normalise": "normalise", "--max-epochs": "max_epochs"}
NormaliseChoice = Literal["yes", "no", "both"]
NORMALISE_CHOICES: dict[NormaliseChoice, tuple[bool, ...]] = {"yes": (True,), "no": (False,), "both": (True, False)}
DEFAULT_NORMALISE: NormaliseChoice = "yes"
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
        raise ConfigError(
            f"cannot read {text!r} as a grid: expected start:stop[:step] (stop included, step >= 1) "
            "or comma-separated integers"
        ) from None


def grid_argument(text: str) -> list[int]:
    """:func:`parse_grid` as an argument type: a bad grid stops the parser with one line."""
    try:
        values = parse_grid(text)
    except ConfigError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    if not values:
        raise argparse.ArgumentTypeError(f"{text!r} names no values")
    return values


def run_taxonomy_cli(args: argparse.Namespace) -> int:
    activations_dir = Path(args.activations)
    if not (activations_dir / "manifest.json").is_file():
        raise ArtefactError(f"{activations_dir} has no manifest.json: not an activation run folder "
                            "(mechsteer activations writes one)")
    manifest = Manifest.load(activations_dir)
    if not manifest.complete:
        raise ArtefactError(f"{activations_dir}: the activation run is incomplete; rerun mechsteer activations "
                            "with the same arguments to finish it")
    if args.model is not None and not same_model(manifest.model, spec_model_name(args.model)):
        raise mismatch(f"the activations in {activations_dir}", "model", manifest.model, spec_model_name(args.model),
                       "pass the activations pooled from --model, or drop --model")
    if args.sae_from is not None:
        return _taxonomy_from_sae(args, activations_dir)
    layers = args.layers or manifest.layers
    missing = [layer for layer in layers if layer not in manifest.layers]
    if missing:
        raise ConfigError(f"--layers {missing} are not in the activation run {activations_dir} "
                          f"(layers {manifest.layers})")
    grid = args.n_latents or run_default("n_latents")
    k = run_default("sae_k") if args.k is None else args.k
    method = args.method or run_default("taxonomy_method")
    if any(n < 2 for n in grid):
        raise ConfigError(f"--n-latents: every behaviour count must be >= 2, got {grid}")
    if method == "sae" and k > min(grid):
        raise ConfigError(f"--k {k} is more than the smallest --n-latents ({min(grid)}): "
                          "the SAE keeps its top k latents")
    out = _prepare_output(args)
    rows, best = build_taxonomy(activations_dir, out, TaxonomySettings(
        layers=tuple(layers), n_latents=tuple(grid), method=method, k=k, seed=args.seed,
        normalise=NORMALISE_CHOICES[args.normalise or DEFAULT_NORMALISE], judge=args.judge, judge_settings=judge_settings(args),
        max_epochs=args.max_epochs))
    print(json.dumps(_summary(out, best)))
    return 0


def judge_settings(args: argparse.Namespace) -> JudgeSettings:
    return JudgeSettings(
        n_top_examples=args.n_examples, n_random_examples=args.n_examples,
        n_repeats=args.n_repeats, n_in=args.n_judged, n_out=args.n_judged,
        n_per_behaviour=args.n_judged, concurrency=args.judge_concurrency,
        timeout=args.judge_timeout, max_tokens=args.judge_max_tokens,
    )


def _prepare_output(args: argparse.Namespace) -> Path:
    """The checked judge and --out folder, the judge's cache cleared if asked."""
    check_judge_spec(args.judge)
    connection = judge_connection_problem(args.judge)
    if connection:
        raise ConfigError(f"--judge: {connection}")
    out = check_output_folder(args.out)
    if args.clear_judge_cache:
        removed = clear_judge_cache(out)
        print(json.dumps({"judge_cache_cleared": str(out / JUDGE_CACHE_DIR), "files": removed}))
    return out


def _taxonomy_from_sae(args: argparse.Namespace, activations_dir: Path) -> int:
    """``--sae-from``: the SAE decides the layer, behaviours, top-k and normalisation; no sweep flag is read."""
    given = [flag for flag, name in SWEEP_FLAGS.items() if getattr(args, name) is not None]
    if given:
        raise ConfigError(f"--sae-from takes the layer, behaviour count, top-k and normalisation from the SAE; "
                          f"drop {', '.join(given)}")
    sae_folder = Path(args.sae_from)
    out = _prepare_output(args)
    imported, best = taxonomy_from_sae(activations_dir, sae_folder, out, judge=args.judge, seed=args.seed,
                                       judge_settings=judge_settings(args),
                                       allow_other_model=args.allow_other_model)
    print(json.dumps({**_summary(out, best), "sae_from": str(sae_folder), "hook_name": imported.hook_name}))
    return 0


def _summary(out: Path, best: Taxonomy) -> dict[str, object]:
    return {
        "out": str(out), "layer": best.provenance.layer, "n_latents": best.provenance.n_latents,
        "normalised": best.provenance.normalised,
        "selection_criterion": best.metrics.selection_criterion,
        "selection_score": best.metrics.selection_score, "ari": best.metrics.ari,
        "nmi": best.metrics.nmi, "behaviours": [b.title for b in best.behaviours],
    }


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = add_command(
        subparsers, "taxonomy",
        description=SELECTION_DOC,
    )
    parser.add_argument("--activations", required=True, help="an activation run folder")
    parser.add_argument("--layers", default=None, type=grid_argument,
                        help="layers to sweep, e.g. 2,3 or 1:4 (default: all in the run)")
    # the defaults of a run's taxonomy stage (mechsteer run): the same activations give the same taxonomy
    n_latents = run_default("n_latents")
    parser.add_argument("--n-latents", default=None, type=grid_argument,
                        help="behaviour counts, start:stop[:step] with stop included (the paper's: 5:50:5), or a "
                             f"list (default {','.join(map(str, n_latents))})")
    parser.add_argument("--k", type=positive_int, default=None,
                        help=f"top-k of the SAE (default {run_default('sae_k')})")
    parser.add_argument("--model", default=None,
                        help="the model the activations must come from (checked against their manifest)")
    parser.add_argument("--method", choices=CLUSTERING_METHODS, default=None,
                        help=f"how behaviours are found (default {run_default('taxonomy_method')})")
    parser.add_argument("--judge", default=run_default("judge"), help=JUDGE_CHOICES_HELP)
    parser.add_argument("--seed", type=non_negative_int, default=run_default("seed"))
    parser.add_argument("--normalise", choices=sorted(NORMALISE_CHOICES), default=None,
                        help=f"L2-normalise the centred vectors: yes, no, or both (swept) (default {DEFAULT_NORMALISE})")
    parser.add_argument("--max-epochs", type=positive_int, default=None, help="SAE epochs cap (default 300)")
    parser.add_argument("--n-examples", type=positive_int, default=100,
                        help="top-activating and random examples per behaviour, each (default 100)")
    parser.add_argument("--n-repeats", type=positive_int, default=5, help="judge descriptions per behaviour")
    parser.add_argument("--n-judged", type=positive_int, default=100,
                        help="sentences judged per behaviour for consistency (in and out) and completeness")
    parser.add_argument("--judge-concurrency", type=positive_int, default=None,
                        help="judge requests at once; for an HTTP judge also the most in flight, "
                             "requests abandoned after a timeout included (default 4)")
    parser.add_argument("--judge-timeout", type=positive_float, default=None,
                        help="seconds an HTTP judge waits for one answer; a retry after a timeout "
                             "waits twice as long (default 120)")
    parser.add_argument("--judge-max-tokens", type=positive_int, default=None,
                        help="cap on every judge answer's length in tokens (titles ask for 256): "
                             "a slow local server answers sooner")
    parser.add_argument("--clear-judge-cache", action="store_true",
                        help=f"delete OUT/{JUDGE_CACHE_DIR} (the HTTP judge's saved answers) before judging")
    parser.add_argument("--sae-from", default=None, metavar="FOLDER",
                        help="label with the SAE of this SAELens folder (cfg.json + sae_weights.safetensors, e.g. "
                             "one mechsteer export wrote) instead of sweeping and training: its layer, behaviours, "
                             f"top-k and normalisation are the SAE's, so {', '.join(SWEEP_FLAGS)} are refused")
    parser.add_argument("--allow-other-model", action="store_true",
                        help="with --sae-from: use an SAE whose model_name is not the activations' model")
    parser.add_argument("--out", required=True)
    parser.set_defaults(func=run_taxonomy_cli)


__all__ = ["JUDGE_CHOICES_HELP", "NORMALISE_CHOICES", "SWEEP_FLAGS", "judge_settings", "parse_grid", "register", "run_taxonomy_cli"]
