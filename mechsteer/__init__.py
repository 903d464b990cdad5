"""mechsteer: causal experiments on when thinking models use the base model's reasoning skills.

Pipeline stages (one module each): traces -> sentences -> activations -> sae/taxonomy
-> directions -> timing/hybrid -> ablations -> evals. See README.md.
"""

__version__ = "0.1.0"
