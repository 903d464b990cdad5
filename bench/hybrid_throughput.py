"""Throughput of the hybrid generator against plain generation and the paper-style reference loop.

One run, same models, same prompts, greedy, EOS ignored so every run generates exactly
``--new-tokens`` tokens per prompt. Each measurement is run ``--warmup`` times untimed, then
``--repeats`` times timed, and its median time is reported (all times are in the output): the
first full-length run of a generator is up to 30% slower than later ones (the allocator grows
its pools for the long KV caches), and measuring whichever generator happens to run first cold
would bias the ratios.

- ``hybrid_b1`` / ``hybrid_b8``: :func:`mechsteer.hybrid.generator.hybrid_generate` at batch 1 and 8;
- ``plain_pair_b8``: KV-cached :func:`mechsteer.interventions.generation.generate` of the base model, then of
  the thinking model, back to back, at batch 8 (what running the two models costs anyway);
- ``reference_b1``: :func:`mechsteer.hybrid.reference.reference_hybrid_generate`, which reruns both models
  on their whole sequences for every token at batch 1, as the paper's code does. It is
  quadratic, so it runs on ``--reference-prompts`` prompts only (tokens/s is per token).

Ratios (printed as one JSON object on the last line):

- ``hybrid_vs_plain_pair`` = hybrid tokens/s at batch 8 / plain pair tokens/s at batch 8;
- ``hybrid_vs_reference`` = hybrid tokens/s at batch 8 / reference tokens/s (batch 1);
- ``hybrid_b1_vs_reference`` = the same at batch 1 for both.

The policy steers whenever the two models' greedy tokens disagree (the paper's rule), with a
fixed random behaviour classifier and random steering vectors: speed does not depend on what
the vectors mean, only on how often steering fires, which the output reports.

Usage: ``python bench/hybrid_throughput.py --json`` (organism pair) or
``python bench/hybrid_throughput.py --pair smollm2,smollm2 --new-tokens 64 --json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from mechsteer.core.models import load_pair
from mechsteer.hybrid.generator import HybridConfig, hybrid_generate
from mechsteer.hybrid.reference import reference_hybrid_generate
from mechsteer.hybrid.timing import SAEArgmaxPolicy
from mechsteer.interventions.generation import generate
from mechsteer.steering.direction_set import DirectionSet

PROMPT_STEMS = [
    "Q: Tom has 38 apples and buys 9 more. He gives away 4. How many now?\nA:\n",
    "Q: A shop had 57 pens, sold 8 and got 6. How many pens?\nA:\n",
    "Q: Sara read 21 pages, then 7 more, then lost 3. How many pages?\nA:\n",
    "Q: There are 64 birds; 9 fly off and 5 land. How many birds?\nA:\n",
    "Q: Ben has 45 coins, finds 8, spends 9. How many coins?\nA:\n",
    "Q: A box holds 73 balls; 6 are removed, 9 added. How many?\nA:\n",
    "Q: Ann baked 32 cakes, ate 5, baked 9 more. How many cakes?\nA:\n",
    "Q: A farm had 88 cows, sold 9, bought 7. How many cows?\nA:\n",
]


class RandomClassifier:
    """A fixed random linear 'SAE': enough for the policy to choose behaviours."""

    def __init__(self, d_model: int, n_latents: int, seed: int = 0):
        self.encoder = torch.randn(d_model, n_latents, generator=torch.Generator().manual_seed(seed))

    def prepare(self, acts, *, centring_mean=None):
        return acts / acts.norm(dim=-1, keepdim=True).clamp_min(1e-8)

    def encode_pre(self, x):
        return x @ self.encoder


def measure_round_robin(runs: dict[str, Callable[[], Any]], warmup: int, repeats: int,
                        log: Callable[[str], None]) -> dict[str, tuple[list[float], Any]]:
    """Each run ``warmup`` times untimed, then ``repeats`` timed rounds of every run in turn.

    Interleaving spreads slow drifts of the machine (other load, frequency) over all runs alike
    instead of charging them to whichever run happens to be measured at the time.
    Returns, per run, its times and its last result.
    """
    for name, run in runs.items():
        for _ in range(warmup):
            log(f"warm-up {name}")
            run()
    measured: dict[str, tuple[list[float], Any]] = {name: ([], None) for name in runs}
    for round_index in range(repeats):
        for name, run in runs.items():
            started = time.perf_counter()
            result = run()
            times = measured[name][0] + [time.perf_counter() - started]
            measured[name] = (times, result)
            log(f"round {round_index + 1}/{repeats} {name}: {times[-1]:.2f} s")
    return measured


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pair", default="organism-base,organism-thinking")
    parser.add_argument("--new-tokens", type=int, default=512)
    parser.add_argument("--reference-prompts", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs before each measurement")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (median reported)")
    parser.add_argument("--json", action="store_true", help="print only the JSON result line at the end")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    base_spec, thinking_spec = args.pair.split(",")
    pair = load_pair(base_spec, thinking_spec)
    n_layers = pair.base.cfg.n_layers
    layer = max(0, int(0.375 * n_layers))
    n_behaviours = 5
    vectors = DirectionSet(
        model_name=pair.base.cfg.model_name, d_model=pair.base.cfg.d_model, n_layers=n_layers, layer=layer,
        site="resid_post", method="random", behaviour_ids=list(range(n_behaviours)),
        titles=[f"behaviour {b}" for b in range(n_behaviours)],
        directions=torch.randn(n_behaviours, pair.base.cfg.d_model, generator=torch.Generator().manual_seed(1)),
    )
    policy = SAEArgmaxPolicy(RandomClassifier(pair.thinking.cfg.d_model, n_behaviours))
    prompts = PROMPT_STEMS[:8]
    config = HybridConfig(steer_layer=layer, read_layer=layer, max_new_tokens=args.new_tokens, batch_size=8,
                          ignore_eos=True)
    if args.warmup < 0 or args.repeats < 1:
        parser.error("--warmup must be >= 0 and --repeats >= 1")
    config_b1 = HybridConfig(steer_layer=layer, read_layer=layer, max_new_tokens=args.new_tokens, batch_size=1,
                             ignore_eos=True)
    shared = pair.shares_tokenizer
    reference_prompts = prompts[: args.reference_prompts]

    def reference_run() -> list[list[int]]:
        return [reference_hybrid_generate(pair.base, pair.thinking, prompt, prompt, vectors, policy, config,
                                          shared_tokenizer=shared)[0] for prompt in reference_prompts]

    runs: dict[str, Callable[[], Any]] = {
        "hybrid_b8": lambda: hybrid_generate(pair.base, pair.thinking, prompts, prompts, vectors, policy, config),
        "hybrid_b1": lambda: hybrid_generate(pair.base, pair.thinking, prompts[:2], prompts[:2], vectors, policy,
                                             config_b1),
        "plain_base_b8": lambda: generate(pair.base, prompts, max_new_tokens=args.new_tokens, eos_token_id=[]),
        "plain_thinking_b8": lambda: generate(pair.thinking, prompts, max_new_tokens=args.new_tokens, eos_token_id=[]),
        "reference_b1": reference_run,
    }
    measured = measure_round_robin(runs, args.warmup, args.repeats,
                                   (lambda message: None) if args.json else (lambda message: print(message, flush=True)))
    results: dict[str, dict[str, Any]] = {}

    def record(name: str, times: list[float], n_tokens: int, **extra: float) -> None:
        seconds = statistics.median(times)
        results[name] = {"seconds": round(seconds, 3), "all_seconds": [round(t, 3) for t in times], "tokens": n_tokens,
                         "tokens_per_s": round(n_tokens / seconds, 2), **extra}
        if not args.json:
            print(name, results[name], flush=True)

    def n_tokens(name: str) -> int:
        result = measured[name][1]
        return sum(len(ids) for ids in (result if name == "reference_b1" else result.token_ids))

    hybrid_out = measured["hybrid_b8"][1]
    record("hybrid_b8", measured["hybrid_b8"][0], n_tokens("hybrid_b8"),
           steered_fraction=round(sum(hybrid_out.steered_fractions) / len(hybrid_out.steered_fractions), 4))
    for name in ("hybrid_b1", "plain_base_b8", "plain_thinking_b8", "reference_b1"):
        record(name, measured[name][0], n_tokens(name))
    # running base then thinking generation back to back: the per-round sums
    record("plain_pair_b8", [base + think for base, think in zip(measured["plain_base_b8"][0],
                                                                 measured["plain_thinking_b8"][0], strict=True)],
           n_tokens("plain_base_b8"))

    summary = {
        "pair": args.pair,
        "new_tokens": args.new_tokens,
        "threads": torch.get_num_threads(),
        "warmup": args.warmup,
        "repeats": args.repeats,
        "hybrid_vs_plain_pair": round(results["hybrid_b8"]["tokens_per_s"] / results["plain_pair_b8"]["tokens_per_s"], 3),
        "hybrid_vs_reference": round(results["hybrid_b8"]["tokens_per_s"] / results["reference_b1"]["tokens_per_s"], 2),
        "hybrid_b1_vs_reference": round(results["hybrid_b1"]["tokens_per_s"] / results["reference_b1"]["tokens_per_s"], 2),
        "steered_fraction_b8": results["hybrid_b8"]["steered_fraction"],
        "runs": results,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
