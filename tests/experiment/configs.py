"""Configs that tests share."""

import dataclasses

from mechsteer.experiment.config import DEMO_CONFIG

# The demo config before the demo protocol of issue 17 (the grammar-v1 pair, the oracle judge, one
# coefficient): run folders were written under its digest, "f2c2834c78ea8dc1".
OLD_DEMO = dataclasses.replace(
    DEMO_CONFIG, name="organism-demo", base_model="organism-base", thinking_model="organism-thinking",
    train_split="train", eval_split="test", tune_split=None, n_tune=100, max_new_tokens=288, judge="oracle",
    optimisation={"lr": 0.1, "steps": 100, "init_norm": 8.0}, coefficients=[2.0], windows=[1],
    policy_read="last_token", baselines=[], ablation_contexts=30,
    controls=["only_bias", "random_firing", "random_vectors"])
