"""A run's config: :class:`RunConfig` (one model pair on one benchmark), read from
``experiments/<name>.yaml``, and the embedded demo config (``mechsteer demo``).

A run folder belongs to one config, identified by :meth:`RunConfig.digest`; the tracking keys
are left out of it (logging does not change what a run computes).
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from mechsteer.core.store import json_digest
from mechsteer.data.prompts import benchmark_template
from mechsteer.hybrid.generator import HybridConfig
from mechsteer.steering.optimise import OptimisationConfig

WandbMode = Literal["online", "offline", "disabled"]


@dataclass
class RunConfig:
    name: str
    base_model: str
    thinking_model: str
    benchmark: str
    base_template: str | None = None  # default: the benchmark's own template if registered, else "base_paper"
    thinking_template: str | None = None  # default: the benchmark's own template if registered, else "thinking_chat"
    train_split: str = "train"
    n_train: int = 200  # thinking traces used for the taxonomy and the directions
    eval_split: str = "test"
    n_eval: int = 200
    max_new_tokens: int = 256
    batch_size: int = 16
    activation_layers: list[int] | None = None  # thinking-model layers to pool (default: depth/8 grid)
    include_previous_token: bool = True
    taxonomy_method: Literal["sae", "kmeans", "gmm"] = "sae"
    normalise: list[bool] = field(default_factory=lambda: [True])  # L2-normalise sentence vectors (sweepable)
    n_latents: list[int] = field(default_factory=lambda: [5, 10, 15])
    sae_k: int = 3
    judge: str = "none"  # none | oracle | http | http:MODEL | local:SPEC
    direction_method: Literal["mean", "sae", "optimised"] = "mean"
    # Settings of the optimised vectors (OptimisationConfig fields, e.g. lr, steps, init_norm);
    # empty: the paper's defaults.
    optimisation: dict[str, Any] = field(default_factory=dict)
    steer_layer: int | None = None  # base-model layer (default: ~37.5% of the depth)
    coefficients: list[float] = field(default_factory=lambda: [1.0])
    windows: list[int] = field(default_factory=lambda: [1])
    policy: Literal["sae_argmax", "threshold"] = "sae_argmax"
    threshold: float = 0.0
    controls: list[Literal["only_bias", "random_firing", "random_vectors"]] = field(
        default_factory=lambda: ["only_bias", "random_firing", "random_vectors"])
    ablations: bool = True
    ablation_contexts: int = 40
    seed: int = 0
    threads: int | None = None
    # Tracking (mechsteer.experiment.tracking), off by default. Not part of the digest: logging does not
    # change what a run computes, so a tracked rerun resumes an untracked run folder.
    wandb: bool = False
    wandb_project: str = "mechsteer"
    wandb_group: str | None = None  # default: the config's name (runs are grouped by experiment)
    wandb_mode: WandbMode | None = None  # default: WANDB_MODE, else online

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown config keys {unknown}; known keys: {sorted(known)}")
        return cls(**data)

    @classmethod
    def from_yaml(cls, path: str | Path) -> RunConfig:
        return cls.from_dict(yaml.safe_load(Path(path).read_text()) or {})

    def digest(self) -> str:
        computed = {key: value for key, value in asdict(self).items() if key not in TRACKING_KEYS}
        if not computed["optimisation"]:
            del computed["optimisation"]  # added later: configs without it keep their digests
        return json_digest(computed)

    @property
    def resolved_base_template(self) -> str:
        return self.base_template or benchmark_template(self.benchmark) or "base_paper"

    @property
    def resolved_thinking_template(self) -> str:
        return self.thinking_template or benchmark_template(self.benchmark) or "thinking_chat"


TRACKING_KEYS = ("wandb", "wandb_project", "wandb_group", "wandb_mode")


def optimisation_config(config: RunConfig) -> OptimisationConfig:
    """The run's `OptimisationConfig`: its ``optimisation`` settings, seeded by the run's seed."""
    known = {f.name for f in dataclasses.fields(OptimisationConfig)} - {"seed"}
    unknown = sorted(set(config.optimisation) - known)
    if unknown:
        raise ValueError(f"unknown optimisation keys {unknown}; known keys: {sorted(known)}")
    return OptimisationConfig(**config.optimisation, seed=config.seed)


def run_hybrid_config(config: RunConfig, steer_layer: int, read_layer: int) -> HybridConfig:
    """The hybrid generator's settings for a run (its coefficients, windows, lengths and batch)."""
    return HybridConfig(steer_layer=steer_layer, read_layer=read_layer, coefficients=tuple(config.coefficients),
                        windows=tuple(config.windows), max_new_tokens=config.max_new_tokens,
                        batch_size=config.batch_size)


def default_activation_layers(n_layers: int) -> list[int]:
    """About every depth/8, as the paper sweeps (at least one layer, never the embedding)."""
    step = max(1, n_layers // 8)
    return sorted({min(n_layers - 1, layer) for layer in range(step, n_layers, step)} or {n_layers - 1})


DEMO_CONFIG = RunConfig(
    name="organism-demo",
    base_model="organism-base",
    thinking_model="organism-thinking",
    benchmark="organism",
    n_train=200,
    n_eval=200,
    max_new_tokens=288,  # the longest thinking-organism traces run ~265 tokens
    batch_size=50,
    activation_layers=None,
    # Without L2 normalisation the organism's sentence clusters separate far better (compute
    # sentences dominate the centring mean); the sweep tries both and the silhouette picks.
    normalise=[True, False],
    n_latents=[4, 5, 6, 8],
    judge="oracle",
    # Optimised vectors, trained at a larger step and initial norm than the paper's defaults:
    # with those (norm ~1-2 against residual norms ~44) and with difference-of-means
    # directions, no vector made the base organism start a plan, and the hybrid fell below
    # the base (README, "The end-to-end demo").
    direction_method="optimised",
    optimisation={"lr": 0.1, "steps": 100, "init_norm": 8.0},
    # One coefficient, so no guardrail: with a grid, the thinking model's choice among the
    # candidates lets any vector that can flip a token at some coefficient do so, and the
    # controls borrow that choice (bias only recovers 0.99 of the gap with {1, 2, 4}; README).
    coefficients=[2.0],
    windows=[1],
    ablation_contexts=30,
    # The organisms are tiny (d_model 128): one thread is as fast as two, and far faster when
    # anything else runs on the machine (OpenMP threads spin-wait for a busy core).
    threads=1,
)
