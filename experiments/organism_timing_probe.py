"""Why the hybrid's timing policy misses the checks on the grammar-v3 organisms (README, "The end-to-end demo").

Two measurements on a finished organism run folder (its taxonomy and directions), on validation problems:

1. What the timing policy reads. For thinking-organism traces, the argmax SAE latent of the
   thinking organism's residual (the taxonomy's layer) at the newline that ends each sentence,
   grouped by the next sentence's planted behaviour: that newline is the last token the policy
   sees when it decides how to steer the next sentence. For comparison, the argmax latent at the
   next sentence's first token (one token later, which the policy does not see).
2. What the directions do. At the end of the first risky compute line of each problem (where the
   thinking organism writes ``Check:`` and the base ``Day``), the share of contexts in which the base
   organism's next token is ``Check`` when each behaviour's vector (with the bias, as the hybrid adds
   it) is added at that position, per coefficient.

    python experiments/organism_timing_probe.py --run runs/demo [--n 80]
"""

from __future__ import annotations

import argparse
import random
import re
from collections import Counter, defaultdict

import torch

from mechsteer import DirectionSet, load_model
from mechsteer.organisms.grammar import format_prompt, label_sentence, render_trace, risky_days
from mechsteer.organisms.tasks import generate_split
from mechsteer.taxonomy.artefact import Taxonomy

COEFFICIENTS = (1.0, 2.0, 4.0, 8.0)


def policy_reads(run: str, n: int, grammar: str) -> None:
    taxonomy = Taxonomy.load(f"{run}/taxonomy")
    sae, layer = taxonomy.load_sae(), taxonomy.provenance.layer
    thinking = load_model(taxonomy.provenance.model)
    titles = {b.id: b.title for b in taxonomy.behaviours}
    at_newline: dict[str, Counter[str]] = defaultdict(Counter)
    at_first_token: dict[str, Counter[str]] = defaultdict(Counter)
    hook = f"blocks.{layer}.hook_resid_post"
    for problem in generate_split("validation")[:n]:
        text = format_prompt(problem.question) + render_trace(problem, f"thinking_{grammar}", random.Random(0)).text
        encoded = thinking.tokenizer(text, return_offsets_mapping=True, return_tensors="pt")
        with torch.no_grad():
            _, cache = thinking.run_with_cache(encoded["input_ids"], names_filter=hook)
        latents = sae.encode_pre(sae.prepare(cache[hook][0].float())).argmax(-1).tolist()
        offsets = encoded["offset_mapping"][0].tolist()
        for index in range(1, len(offsets) - 1):
            start, end = offsets[index]
            if text[start:end] != "\n" or end >= len(text):
                continue
            following = text[end:].split("\n", 1)[0]
            behaviour = label_sentence(following)
            at_newline[behaviour][titles[latents[index]]] += 1
            at_first_token[behaviour][titles[latents[index + 1]]] += 1
    print(f"argmax latent of the thinking organism ({taxonomy.provenance.model}, layer {layer}), "
          f"by the next sentence's planted behaviour:")
    for behaviour in at_newline:
        print(f"  next {behaviour:8s} at the newline before it: {dict(at_newline[behaviour])}")
        print(f"  {'':13s} at its first token:        {dict(at_first_token[behaviour])}")


def check_shares(run: str, n: int, grammar: str) -> None:
    directions = DirectionSet.load(f"{run}/directions")
    base = load_model(str(directions.model_name))
    tokenizer = base.tokenizer
    check = tokenizer.convert_tokens_to_ids("Check")
    contexts = []
    for problem in generate_split("validation"):
        days = risky_days(problem, grammar)  # type: ignore[arg-type]
        if not days:
            continue
        trace = render_trace(problem, f"thinking_{grammar}", random.Random(0)).text
        line = re.search(rf"(?m)^Day {days[0]}: [^\n]*\n", trace)
        assert line is not None
        contexts.append(format_prompt(problem.question) + trace[: line.end()])
        if len(contexts) == n:
            break
    with_bias = directions.bias is not None
    print(f"share of {len(contexts)} contexts (after the first risky compute line) whose next base token is "
          f"'Check', steering {'bias + ' if with_bias else ''}direction at the last position:")
    for behaviour in directions.behaviour_ids:
        shares = []
        for coeff in COEFFICIENTS:
            hits = 0
            for context in contexts:
                ids = tokenizer(context, return_tensors="pt")["input_ids"]
                with directions.steer(base, behaviour, coeff, positions=[ids.shape[1] - 1], with_bias=with_bias), \
                        torch.no_grad():
                    hits += int(base(ids)[0, -1].argmax()) == check
            shares.append(f"{coeff:g}: {hits / len(contexts):.2f}")
        print(f"  {directions.title(behaviour):24s} " + ", ".join(shares))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="a finished organism run folder (runs/demo)")
    parser.add_argument("--n", type=int, default=80, help="validation problems per measurement")
    parser.add_argument("--grammar", default="v3", choices=("v2", "v3"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    policy_reads(args.run, args.n, args.grammar)
    check_shares(args.run, args.n, args.grammar)


if __name__ == "__main__":
    main()
