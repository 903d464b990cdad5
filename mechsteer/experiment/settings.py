"""Each stage's settings from a run's config: what the pipeline hands the domain stage functions."""

from __future__ import annotations

from mechsteer.activations import ActivationConfig
from mechsteer.core.errors import ConfigError
from mechsteer.core.validation import join_problems
from mechsteer.experiment.config import RunConfig
from mechsteer.experiment.nested import build_correction, correction_problems, optimisation_problems
from mechsteer.hybrid.generator import HybridConfig
from mechsteer.steering.correction import CorrectionConfig
from mechsteer.steering.optimise import OptimisationConfig
from mechsteer.taxonomy.build import JudgeSettings
from mechsteer.taxonomy.stage import TaxonomySettings


def activation_config(config: RunConfig, layers: list[int]) -> ActivationConfig:
    """The activations stage's settings at ``layers`` (the config's, or the default ones)."""
    return ActivationConfig(layers=layers, include_previous_token=config.include_previous_token,
                            batch_size=config.batch_size)


def taxonomy_settings(config: RunConfig, layers: list[int]) -> TaxonomySettings:
    """The taxonomy stage's settings, sweeping ``layers`` (the config's, or the default ones)."""
    return TaxonomySettings(layers=tuple(layers), n_latents=tuple(config.n_latents), method=config.taxonomy_method,
                            k=config.sae_k, seed=config.seed, normalise=tuple(config.normalise), judge=config.judge,
                            judge_settings=JudgeSettings(timeout=config.judge_timeout,
                                                         max_tokens=config.judge_max_tokens))


def optimisation_config(config: RunConfig) -> OptimisationConfig:
    """The run's `OptimisationConfig`: its ``optimisation`` settings, seeded by the run's seed."""
    problems = optimisation_problems(config.optimisation)
    if problems:
        raise ConfigError(join_problems(problems))
    return OptimisationConfig(**config.optimisation, seed=config.seed)


def correction_config(config: RunConfig) -> CorrectionConfig:
    """The run's `CorrectionConfig`: its ``correction`` settings over the reference's defaults."""
    problems = correction_problems(config.correction)
    if problems:
        raise ConfigError(join_problems(problems))
    return build_correction(config.correction)


def run_hybrid_config(config: RunConfig, steer_layer: int, read_layer: int) -> HybridConfig:
    """The hybrid generator's settings for a run (its coefficients, windows, lengths, stop strings and batch)."""
    return HybridConfig(steer_layer=steer_layer, read_layer=read_layer, coefficients=tuple(config.coefficients),
                        windows=tuple(config.windows),
                        max_new_tokens=config.hybrid_max_new_tokens or config.max_new_tokens,
                        stop_strings=config.resolved_base_stop_strings,
                        batch_size=config.resolved_hybrid_batch_size,
                        max_candidates_per_chunk=config.max_candidates_per_chunk)


def default_activation_layers(n_layers: int) -> list[int]:
    """About every depth/8, as the paper sweeps (at least one layer, never the embedding)."""
    step = max(1, n_layers // 8)
    return sorted({min(n_layers - 1, layer) for layer in range(step, n_layers, step)} or {n_layers - 1})


__all__ = ["activation_config", "correction_config", "default_activation_layers", "optimisation_config",
           "run_hybrid_config", "taxonomy_settings"]
