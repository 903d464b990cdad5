"""Throughput of the hybrid generator against plain generation and the paper-style reference loop.

One run, same models, same prompts, greedy, EOS ignored so every run generates exactly
``--new-tokens`` tokens per prompt:

- ``hybrid_b1`` / ``hybrid_b8``: :func:`mechsteer.hybrid.hybrid_generate` at batch 1 and 8;
- ``plain_pair_b8``: KV-cached :func:`mechsteer.generation.generate` of the base model, then of
  the thinking model, back to back, at batch 8 (what running the two models costs anyway);
- ``reference_b1``: :func:`mechsteer.hybrid.reference_hybrid_generate`, which reruns both models
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
import time

import torch

from mechsteer.generation import generate
from mechsteer.hybrid import (
    HybridConfig,
    SteeringVectors,
    hybrid_generate,
    reference_hybrid_generate,
)
from mechsteer.models import load_pair
from mechsteer.timing import SAEArgmaxPolicy

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


def timed(function) -> tuple[float, object]:
    started = time.perf_counter()
    result = function()
    return time.perf_counter() - started, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pair", default="organism-base,organism-thinking")
    parser.add_argument("--new-tokens", type=int, default=512)
    parser.add_argument("--reference-prompts", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", action="store_true", help="print only the JSON result line at the end")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    base_spec, thinking_spec = args.pair.split(",")
    pair = load_pair(base_spec, thinking_spec)
    n_layers = pair.base.cfg.n_layers
    layer = max(0, int(0.375 * n_layers))
    n_behaviours = 5
    vectors = SteeringVectors(torch.randn(n_behaviours, pair.base.cfg.d_model, generator=torch.Generator().manual_seed(1)),
                              list(range(n_behaviours)), bias=None)
    policy = SAEArgmaxPolicy(RandomClassifier(pair.thinking.cfg.d_model, n_behaviours))
    prompts = PROMPT_STEMS[:8]
    config = HybridConfig(steer_layer=layer, read_layer=layer, max_new_tokens=args.new_tokens, batch_size=8,
                          ignore_eos=True)
    results: dict[str, dict[str, float]] = {}

    def record(name: str, seconds: float, n_tokens: int, **extra: float) -> None:
        results[name] = {"seconds": round(seconds, 3), "tokens": n_tokens,
                         "tokens_per_s": round(n_tokens / seconds, 2), **extra}
        if not args.json:
            print(name, results[name], flush=True)

    # warm-up (first calls allocate and compile kernels)
    hybrid_generate(pair.base, pair.thinking, prompts[:2], prompts[:2], vectors, policy,
                    HybridConfig(layer, layer, max_new_tokens=4, ignore_eos=True))

    seconds, out = timed(lambda: hybrid_generate(pair.base, pair.thinking, prompts, prompts, vectors, policy, config))
    steered = sum(out.steered_fractions) / len(out.steered_fractions)
    record("hybrid_b8", seconds, sum(len(t) for t in out.token_ids), steered_fraction=round(steered, 4))

    config_b1 = HybridConfig(steer_layer=layer, read_layer=layer, max_new_tokens=args.new_tokens, batch_size=1,
                             ignore_eos=True)
    seconds, out = timed(lambda: hybrid_generate(pair.base, pair.thinking, prompts[:2], prompts[:2], vectors, policy,
                                                 config_b1))
    record("hybrid_b1", seconds, sum(len(t) for t in out.token_ids))

    seconds_base, base_out = timed(lambda: generate(pair.base, prompts, max_new_tokens=args.new_tokens, eos_token_id=[]))
    seconds_think, think_out = timed(lambda: generate(pair.thinking, prompts, max_new_tokens=args.new_tokens,
                                                      eos_token_id=[]))
    plain_tokens = sum(len(t) for t in base_out.token_ids)
    record("plain_base_b8", seconds_base, plain_tokens)
    record("plain_thinking_b8", seconds_think, sum(len(t) for t in think_out.token_ids))
    record("plain_pair_b8", seconds_base + seconds_think, plain_tokens)

    shared = pair.shares_tokenizer
    reference_tokens, reference_seconds = 0, 0.0
    for prompt in prompts[: args.reference_prompts]:
        seconds, (tokens, _) = timed(lambda prompt=prompt: reference_hybrid_generate(
            pair.base, pair.thinking, prompt, prompt, vectors, policy, config, shared_tokenizer=shared))
        reference_tokens += len(tokens)
        reference_seconds += seconds
    record("reference_b1", reference_seconds, reference_tokens)

    summary = {
        "pair": args.pair,
        "new_tokens": args.new_tokens,
        "threads": torch.get_num_threads(),
        "hybrid_vs_plain_pair": round(results["hybrid_b8"]["tokens_per_s"] / results["plain_pair_b8"]["tokens_per_s"], 3),
        "hybrid_vs_reference": round(results["hybrid_b8"]["tokens_per_s"] / results["reference_b1"]["tokens_per_s"], 2),
        "hybrid_b1_vs_reference": round(results["hybrid_b1"]["tokens_per_s"] / results["reference_b1"]["tokens_per_s"], 2),
        "steered_fraction_b8": results["hybrid_b8"]["steered_fraction"],
        "runs": results,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
