"""A run's config: :class:`RunConfig` (one model pair on one benchmark), read from
``experiments/<name>.yaml``, and the embedded demo config (``mechsteer demo``).

A run folder belongs to one config, identified by :meth:`RunConfig.digest`; the tracking keys
are left out of it (logging does not change what a run computes).
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
import yaml

from mechsteer.core.errors import ConfigError
from mechsteer.core.http import HTTPSettings
from mechsteer.core.models import DTypeChoice, missing_model_path
from mechsteer.core.store import json_digest
from mechsteer.core.validation import (
    NonEmpty,
    Problem,
    Range,
    Registered,
    check_fields,
    join_problems,
)
from mechsteer.data.benchmarks import benchmark_names, benchmark_size, benchmark_splits
from mechsteer.data.labels import ground_truth_for
from mechsteer.data.prompts import (
    benchmark_template,
    get_template,
    is_inline_template,
    template_names,
)
from mechsteer.data.traces import UnclosedThinking
from mechsteer.engines.registry import engine_names, engine_spec
from mechsteer.experiment.keys import (
    COMPARISON_EVALS,
    CORRECTION,
    CORRECTION_EVALS,
    CORRECTION_STEERED,
    EVALS,
    HYBRID,
    HYBRID_EVALS,
    PLAIN_EVALS,
    TRAIN_TRACES,
    key,
    keys_of,
    later_defaults,
    undigested_keys,
)
from mechsteer.experiment.nested import correction_problems, optimisation_problems
from mechsteer.hybrid.coefficients import CacheMode
from mechsteer.hybrid.comparisons import COMPARISONS, baseline_names, control_names
from mechsteer.hybrid.timing import PolicyRead, timing_policy_names
from mechsteer.steering.methods import direction_method_names
from mechsteer.taxonomy.judge.spec import check_judge_spec, judge_connection_problem

WandbMode = Literal["online", "offline", "disabled"]


@dataclass
class RunConfig:
    # Each annotation is checked before a run starts (mechsteer.core.validation): types, Literal
    # choices, and Annotated ranges; a key added here is checked by its annotation alone. Each key's
    # help is its one line in `mechsteer run --help` and docs/config.md (mechsteer info --keys).
    name: Annotated[str, NonEmpty()] = key(read_by=(), in_sweeps=False, section="run",
        help="the run's name: the report's title, the wandb run's name and its default group")
    base_model: Annotated[str, NonEmpty()] = key(
        read_by=("traces_base_train", "directions", *CORRECTION, *HYBRID, "eval_base", "ablations"), section="models",
        help="the base model: a registered model spec, a hub name, a local model folder or a .gguf file")
    thinking_model: Annotated[str, NonEmpty()] = key(
        read_by=("traces_thinking_train", "activations", "taxonomy", "directions", "disagreements", *HYBRID,
                 "eval_thinking",
                 "ablations"), section="models",
        help="the thinking model (as base_model): its traces build the taxonomy, its state times the hybrid")
    benchmark: Annotated[str, NonEmpty()] = key(section="data",
        help="the registered benchmark every evaluation runs on (and the train problems' unless train_benchmark)")
    base_template: str | None = key(None, read_by=("traces_base_train", *HYBRID, "eval_base"), section="models",
        help="the base model's prompt: a registered template or a format string with {question} "
             "(default: the benchmark's own template, else base_paper)")
    thinking_template: str | None = key(None, read_by=("traces_thinking_train", *HYBRID, "eval_thinking", "ablations"),
        section="models", help="the thinking model's prompt, as base_template (default: the benchmark's own "
                               "template, else thinking_chat)")
    train_split: str = key("train", read_by=(*TRAIN_TRACES, "directions", *CORRECTION, "ablations"), section="data",
        help="the split of the train problems, whose traces build the taxonomy and the directions")
    n_train: Annotated[int, Range(min=1)] = key(200, read_by=(*TRAIN_TRACES, "directions", *CORRECTION, "ablations"),
                                                section="data",
        help="train problems (traces of each model) for the taxonomy and the directions")
    eval_split: str = key("test", read_by=(*EVALS, "ablations"), section="data",
        help="the split every reported evaluation runs on (not the train split)")
    n_eval: Annotated[int, Range(min=1)] = key(200, read_by=EVALS, section="data",
        help="problems of eval_split in each evaluation")
    max_new_tokens: Annotated[int, Range(min=1)] = key(256, read_by=(*TRAIN_TRACES, *HYBRID, *PLAIN_EVALS, "ablations"),
        section="generation", help="generated tokens per problem, in every stage that sets no length of its own")
    batch_size: Annotated[int, Range(min=1)] = key(16,
        read_by=(*TRAIN_TRACES, "activations", *HYBRID, *PLAIN_EVALS, "ablations"), section="generation",
        help="problems (or traces) per batch of generation, activations and ablations; the hybrid's default too")
    activation_layers: Annotated[list[Annotated[int, Range(min=0)]], NonEmpty()] | None = key(None,
        read_by=("activations", "taxonomy"), section="activations",
        help="thinking-model layers whose sentence activations are pooled (default: about every depth/8)")
    include_previous_token: bool = key(True, read_by=("activations",), section="activations",
        help="pool the token before each sentence too (the paper's; the position a timing policy reads)")
    taxonomy_method: Literal["sae", "kmeans", "gmm"] = key("sae", read_by=("taxonomy",), section="taxonomy",
        help="how sentence activations are grouped into behaviours; a run needs sae (its timing policy reads the SAE)")
    normalise: Annotated[list[bool], NonEmpty()] = key(factory=lambda: [True], read_by=("taxonomy",), section="taxonomy",
        help="L2-normalise the sentence vectors or not; the taxonomy sweep tries each and selects the best")
    n_latents: Annotated[list[Annotated[int, Range(min=2)]], NonEmpty()] = key(factory=lambda: [5, 10, 15],
        read_by=("taxonomy",), section="taxonomy",
        help="taxonomy sizes (SAE latents) the sweep tries at each layer; the best is selected")
    sae_k: Annotated[int, Range(min=1)] = key(3, read_by=("taxonomy",), section="taxonomy",
        help="latents active per sentence in the top-k SAE (at most the smallest n_latents)")
    judge: str = key("none", read_by=("taxonomy",), section="judge",
        help="names and selects the taxonomy's behaviours: none (cosine silhouette), oracle, http, http:MODEL, local:SPEC")
    # As `mechsteer taxonomy --judge-timeout/--judge-max-tokens`.
    judge_timeout: Annotated[float, Range(min=1)] = key(HTTPSettings.timeout, kind="connection", section="judge",
        help="an HTTP judge's seconds per attempt (a retry after a timeout waits twice as long)")
    judge_max_tokens: Annotated[int, Range(min=1)] | None = key(None, read_by=("taxonomy",), later=True, section="judge",
        help="cap on every judge answer's tokens (default: each prompt's own budget, 256 for titles)")
    # A registered direction method (mechsteer.steering.methods.register_direction_method).
    direction_method: Annotated[str, Registered(direction_method_names, "direction_method",
                                                "registered direction methods")] = key(
        "mean", read_by=("directions",), section="directions",
        help="each behaviour's steering vector: difference of means, the SAE decoder row, trained (optimised), "
             "or a plug-in's")
    optimisation: dict[str, Any] = key(factory=dict, read_by=("directions",), later=True, section="directions",
        help="settings of the optimised vectors (OptimisationConfig fields: lr, steps, init_norm ...); empty: the paper's")
    steer_layer: Annotated[int, Range(min=0)] | None = key(None, read_by=("directions", *CORRECTION, *HYBRID),
                                                           section="directions",
        help="the base-model layer the directions are built at and steered (default: about 37.5% of the depth)")
    correction_vectors: bool = key(False, read_by=(), later=True, downstream=True, section="correction",
        help="also train the paper's current correction vectors: where the base model's greedy token differs from "
             "a thinking trace's next one, by behaviour, with a coefficient MLP (docs/hybrid.md)")
    correction_labels: Literal["state", "sentence"] = key("state", read_by=("disagreements",), later=True,
        section="correction", help="a disagreement position's behaviour: the SAE's reading of the thinking model's "
                                   "state there, as the policy reads it (the reference's), or its sentence's label")
    correction_top_k: Annotated[int, Range(min=1)] = key(50, read_by=("disagreements",), later=True,
        section="correction", help="the thinking model's next-token log-probs kept per disagreement position (top K)")
    correction_coefficient_rule: Literal["learned", "guardrail", "kl_topk"] = key(
        "learned", read_by=CORRECTION_STEERED, later=True,
        section="correction",
        help="how the correction vectors' coefficient is chosen: the trained MLP, or a rule over the coefficients grid")
    correction_cache_mode: CacheMode = key("revert", read_by=CORRECTION_EVALS, later=True,
        section="correction", help="the steered position's cache after its token: recomputed unsteered (the "
                                   "reference's default) or kept steered")
    correction: dict[str, Any] = key(factory=dict, read_by=("correction_vectors",), later=True, section="correction",
        help="settings of the correction vectors' training (CorrectionConfig fields: seeds, epochs, lr, mlp_hidden ...); "
             "empty: the reference's")
    correction_ceiling_coefficients: Annotated[list[Annotated[float, Range(min=0.0)]], NonEmpty()] = key(
        factory=lambda: [0.25, 0.5, 1.0, 2.0, 4.0], read_by=("eval_correction_ceiling",), later=True,
        section="correction", help="the oracle ceiling's grid: multiples of each vector's mean learned coefficient "
                                   "(the smallest whose token is the thinking model's is taken)")
    correction_controls: list[Annotated[str, Registered(control_names, "control", "registered controls")]] = key(
        factory=list, read_by=(), later=True, downstream=True, section="correction",
        help="controls at the correction vectors' steering, as the hybrid's controls (none that steers a bias: "
             "they have none)")
    coefficients: Annotated[list[float], NonEmpty()] = key(factory=lambda: [1.0], read_by=(*HYBRID, "ablations"),
        downstream=True, section="hybrid",
        help="steering coefficients of the hybrid (a grid, or the tuning stage's candidates) and of sufficiency")
    windows: Annotated[list[Annotated[int, Range(min=0)]], NonEmpty()] = key(factory=lambda: [1], read_by=HYBRID,
        downstream=True, section="hybrid",
        help="steer the last w positions; 0: all of them (the paper's \"all tokens\"); several: candidates")
    # A registered timing policy (mechsteer.hybrid.timing.register_timing_policy).
    policy: Annotated[str, Registered(timing_policy_names, "policy", "registered timing policies")] = key(
        "sae_argmax", read_by=HYBRID, downstream=True, section="hybrid",
        help="the timing policy that says when to steer and which behaviour: sae_argmax, threshold, a plug-in's")
    # read by the disagreements stage too: with correction_labels: state it labels positions as the policy reads
    policy_read: PolicyRead = key("last_token", read_by=(*HYBRID, "disagreements"), later=True, section="hybrid",
        help="the activation the policy classifies: the thinking model's last token (the paper's) or its greedy next one")
    threshold: float = key(0.0, read_by=HYBRID, downstream=True, section="hybrid",
        help="the threshold policy's bar on the top latent's pre-activation")
    # The tuning stage: mechsteer.experiment.tuning, docs/evaluation.md.
    tune_split: Annotated[str, NonEmpty()] | None = key(None, read_by=HYBRID, later=True, downstream=True,
        section="tuning", help="a third split on which a tuning stage picks the most accurate (coefficient, window, "
                               "threshold); none: the hybrid uses them as set")
    n_tune: Annotated[int, Range(min=1)] = key(100, read_by=HYBRID, later=True, downstream=True, section="tuning",
        help="problems of tune_split each candidate setting is tried on")
    tune_thresholds: Annotated[list[float], NonEmpty()] | None = key(None, read_by=HYBRID, later=True, downstream=True,
        section="tuning", help="thresholds the tuning stage compares, threshold policy only (default: threshold alone)")
    # Registered names (mechsteer.hybrid.comparisons.register_comparison).
    controls: list[Annotated[str, Registered(control_names, "control", "registered controls")]] = key(
        factory=lambda: ["only_bias", "random_firing", "random_vectors"], read_by=(), downstream=True,
        section="evaluation", help="controls at the hybrid's steering: its bias alone at its timing or at its exact "
                                   "tokens, random tokens at its rate or its count per problem, random vectors of its "
                                   "norms (with or without its bias), a fixed or random behaviour at its timing; "
                                   "or a plug-in's")
    baselines: list[Annotated[str, Registered(baseline_names, "baseline", "registered baselines")]] = key(
        factory=list, read_by=(), later=True,
        downstream=True, section="evaluation",
        help="the hybrid steering at the first generated token only; steering where the ground-truth timing oracle "
             "says; the hybrid with the paper's last-token read; the hybrid without the grid and guardrail")
    eval_prefix: str = key("", read_by=HYBRID_EVALS, later=True, downstream=True, section="evaluation",
        help="text the hybrid and every control and baseline start from, after both models' prompts (e.g. an "
             "organism's first cue, Plan:), so that none can fail only at the first token; the plain "
             "evaluations and the tuning stage start without it")
    ablations: bool = key(True, read_by=(), downstream=True, section="ablations",
        help="run the ablation stage: necessity and sufficiency of each behaviour direction")
    ablation_contexts: Annotated[int, Range(min=1)] = key(100, read_by=("ablations",), downstream=True,
        section="ablations", help="contexts per behaviour and condition of the causal tests (sufficiency, necessity) "
        "and eval_split problems of the whole-trace necessity pass")
    # numpy and torch seeds are unsigned 32-bit (a larger one fails only when a stage seeds with it)
    seed: Annotated[int, Range(min=0, max=2**32 - 1)] = key(
        0, read_by=(*TRAIN_TRACES, "taxonomy", "directions", *PLAIN_EVALS, *COMPARISON_EVALS, "ablations"), section="run",
        help="the seed of the taxonomy, optimised vectors, random controls, ablations and sampled generation")
    threads: Annotated[int, Range(min=1)] | None = key(None, read_by=(), section="placement",
        help="torch's CPU threads (default: torch's own choice)")
    # Placement (mechsteer.core.models.load_model). Not part of the digest: where a run computes
    # does not change what it computes (up to the dtype, which is).
    device: Annotated[str, NonEmpty()] = key("auto", kind="placement", flag="device", section="placement",
        help="where the models run: auto (CUDA when present, else cpu), cpu, cuda, cuda:1 ...")
    dtype: DTypeChoice = key("auto", later=True, flag="dtype", section="placement",
        help="the models' precision; auto: bfloat16 on CUDA, float32 on the CPU")
    base_device: Annotated[str, NonEmpty()] | None = key(None, kind="placement", section="placement",
        help="the base model's device (default: device)")
    thinking_device: Annotated[str, NonEmpty()] | None = key(None, kind="placement", section="placement",
        help="the thinking model's device (default: device)")
    # Stages load only the models they need.
    device_map: str | dict[str, int | str] | None = key(None, kind="placement", section="placement",
        help="accelerate's device map for each model (auto, balanced, or module -> GPU); replaces the devices")
    # Keys added with the GPU placement work; at their defaults they leave the digest as it was.
    # A train benchmark of its own keeps the taxonomy and the directions off the evaluated problems.
    train_benchmark: Annotated[str, NonEmpty()] | None = key(None, later=True, section="data",
        help="the train problems' benchmark (default: benchmark), e.g. MATH train for MATH-500 runs")
    trace_max_new_tokens: Annotated[int, Range(min=1)] | None = key(None, read_by=TRAIN_TRACES, later=True,
        section="generation", help="generated tokens per train trace (default: max_new_tokens)")
    eval_max_new_tokens: Annotated[int, Range(min=1)] | None = key(None, read_by=PLAIN_EVALS, later=True,
        section="generation", help="generated tokens per problem of the plain base and thinking evaluations "
                                   "(default: max_new_tokens)")
    hybrid_max_new_tokens: Annotated[int, Range(min=1)] | None = key(None, read_by=HYBRID, later=True, downstream=True,
        section="hybrid", help="generated tokens per problem of the hybrid, its controls and baselines "
                               "(default: max_new_tokens)")
    hybrid_batch_size: Annotated[int, Range(min=1)] | None = key(None, read_by=HYBRID, later=True, downstream=True,
        section="hybrid", help="problems per hybrid batch (default: batch_size)")
    max_candidates_per_chunk: Annotated[int, Range(min=1)] = key(32, read_by=HYBRID, later=True, downstream=True,
        section="hybrid", help="forked (row, candidate) sequences per hybrid forward; bounds a steered step's memory")
    # Sampling of the train traces and of the plain evaluations, seeded by `seed`; the hybrid stays greedy.
    trace_temperature: Annotated[float, Range(min=0)] = key(0.0, read_by=TRAIN_TRACES, later=True,
        section="generation", help="sampling temperature of the train traces; 0: greedy")
    trace_top_p: Annotated[float, Range(min=0, max=1)] = key(1.0, read_by=TRAIN_TRACES, later=True,
        section="generation", help="nucleus sampling's probability mass for the train traces; 1: no cut")
    eval_temperature: Annotated[float, Range(min=0)] = key(0.0, read_by=PLAIN_EVALS, later=True,
        section="generation", help="sampling temperature of the plain base and thinking evaluations; 0: greedy")
    eval_top_p: Annotated[float, Range(min=0, max=1)] = key(1.0, read_by=PLAIN_EVALS, later=True,
        section="generation", help="nucleus sampling's probability mass for the plain evaluations; 1: no cut")
    base_stop_strings: list[str] | None = key(None, read_by=("traces_base_train", "eval_base", *HYBRID), later=True,
        section="models", help="stop strings of base-model generation: traces, evaluation, hybrid "
                               "(default: the base template's own)")
    unclosed_thinking: UnclosedThinking = key("no_answer", read_by=(*TRAIN_TRACES, *PLAIN_EVALS), later=True,
        section="generation", help="a thinking trace cut off before its closing tag: no answer, or the answer "
                                   "extracted from the unfinished text")
    # The stages that read or write activations always run on the bridge (mechsteer.engines, docs/engines.md).
    # A registered engine (mechsteer.engines.registry.register_engine).
    engine: Annotated[str, Registered(engine_names, "engine", "registered engines")] = key(
        "bridge", read_by=(*TRAIN_TRACES, *PLAIN_EVALS), later=True, flag="engine", section="engine",
        help="plain generation (train traces, base and thinking evaluations) on the bridge, through an "
             "OpenAI-compatible server (openai: vllm serve ...), or a plug-in's engine")
    engine_model_base: Annotated[str, NonEmpty()] | None = key(None, read_by=("traces_base_train", "eval_base"),
        later=True, flag="engine_model_base", section="engine",
        help="the server's name for the base model (default: base_model)")
    engine_model_thinking: Annotated[str, NonEmpty()] | None = key(None,
        read_by=("traces_thinking_train", "eval_thinking"), later=True, flag="engine_model", section="engine",
        help="the server's name for the thinking model (default: thinking_model)")
    engine_return_token_ids: bool = key(False, read_by=(*TRAIN_TRACES, *PLAIN_EVALS), later=True, section="engine",
        help="record the server's generated token ids (vLLM's return_token_ids) instead of re-tokenising")
    # How the server is reached; not part of the digest (a server on another port resumes the run).
    engine_url: Annotated[str, NonEmpty()] | None = key(None, kind="connection", flag="engine_url", section="engine",
        help="the server's address, e.g. http://127.0.0.1:8000/v1 (needed for engine openai)")
    engine_url_base: Annotated[str, NonEmpty()] | None = key(None, kind="connection", flag="engine_url_base",
        section="engine", help="the base model's server (default: engine_url)")
    engine_timeout: Annotated[float, Range(min=1)] = key(600.0, kind="connection", section="engine",
        help="seconds per server request attempt; a retry after a timeout waits twice as long")
    engine_max_concurrency: Annotated[int, Range(min=1)] = key(8, kind="connection", section="engine",
        help="server requests in flight, abandoned ones included")
    engine_max_retries: Annotated[int, Range(min=0)] = key(3, kind="connection", section="engine",
        help="retries of a server request on 429 (408, 409), 5xx, timeouts and connection errors")
    # Tracking (mechsteer.experiment.tracking), off by default. Not part of the digest: logging does not
    # change what a run computes, so a tracked rerun resumes an untracked run folder.
    wandb: bool = key(False, kind="tracking", section="tracking",
        help="track the run with wandb (its files go under the run folder's wandb/)")
    wandb_project: str = key("mechsteer", kind="tracking", section="tracking", help="the wandb project")
    wandb_group: str | None = key(None, kind="tracking", in_sweeps=False, section="tracking",
        help="the wandb group (default: the config's name: runs are grouped by experiment)")
    wandb_mode: WandbMode | None = key(None, kind="tracking", section="tracking",
        help="wandb's mode (default: the WANDB_MODE variable, else online)")

    @classmethod
    def from_dict(cls, data: Any, *, check_values: bool = True, source: str | None = None) -> RunConfig:
        """The config of a mapping, every key checked first (:meth:`problems`); refused with a
        :class:`ConfigError` naming each bad key (and ``source``, the file it came from).

        With ``check_values=False`` only the keys and the types are checked (a sweep reports a
        point with a refused value as a failed row instead of refusing the sweep).
        """
        where = f"{source}: " if source else ""
        if not isinstance(data, dict):
            raise ConfigError(f"{where}a run config is a mapping of keys (name: ..., base_model: ...), "
                              f"not a {type(data).__name__}")
        problems = check_fields(cls, data, noun="config keys")
        if not check_values:
            problems = [problem for problem in problems if problem.kind == "type"]
        if problems:
            raise ConfigError(where + join_problems(problems))
        config = cls(**data)
        if check_values:
            config.validate(source=source)
        return config

    @classmethod
    def from_yaml(cls, path: str | Path) -> RunConfig:
        return cls.from_dict(read_yaml_mapping(path, "run config"), source=str(path))

    def problems(self) -> list[Problem]:
        """Every refused value: types, choices and ranges of each key, then the checks that
        need the registries (benchmark, splits, templates, judge, optimisation settings)."""
        problems = check_fields(type(self), asdict(self), noun="config keys")
        return problems or semantic_problems(self)

    def validate(self, *, source: str | None = None, here: bool = False) -> None:
        """Raise :class:`ConfigError` naming every refused key; nothing has run yet. ``here``: also
        what this machine must provide to run it (an HTTP judge's address in the environment)."""
        problems = self.problems()
        if here and not problems:
            connection = judge_connection_problem(self.judge)
            if connection:
                problems.append(Problem("judge", connection, "value"))
        if problems:
            raise ConfigError((f"{source}: " if source else "") + join_problems(problems))

    def digest(self) -> str:
        computed = {name: value for name, value in asdict(self).items() if name not in _UNDIGESTED}
        for name, default in LATER_DEFAULTS.items():  # keys added later: configs without them keep their digests
            if computed[name] == default:
                del computed[name]
        return json_digest(computed)

    @property
    def resolved_train_benchmark(self) -> str:
        return self.train_benchmark or self.benchmark

    @property
    def resolved_hybrid_batch_size(self) -> int:
        return self.hybrid_batch_size or self.batch_size

    @property
    def resolved_base_stop_strings(self) -> tuple[str, ...]:
        if self.base_stop_strings is not None:
            return tuple(self.base_stop_strings)
        return get_template(self.resolved_base_template).stop_strings

    @property
    def resolved_base_template(self) -> str:
        return self.base_template or benchmark_template(self.benchmark) or "base_paper"

    @property
    def resolved_thinking_template(self) -> str:
        return self.thinking_template or benchmark_template(self.benchmark) or "thinking_chat"


# Derived from the keys' own declarations (mechsteer.experiment.keys).
TRACKING_KEYS = keys_of(RunConfig, "tracking")
# Where the models run; not part of the digest (a run moved to a GPU resumes its folder).
PLACEMENT_KEYS = keys_of(RunConfig, "placement")
# How a server is reached or waited for; not part of the digest either.
CONNECTION_KEYS = keys_of(RunConfig, "connection")
# Keys added after run folders existed, with their defaults: at the default a key leaves the digest out.
LATER_DEFAULTS: dict[str, Any] = later_defaults(RunConfig)
_UNDIGESTED = undigested_keys(RunConfig)


def semantic_problems(config: RunConfig) -> list[Problem]:
    """The checks a type cannot express: names that must be registered (benchmark, splits,
    templates), the judge's spec, model paths that must exist, settings that need each other."""
    problems: list[Problem] = []

    def refuse(which: str, message: str) -> None:
        problems.append(Problem(which, message, "value"))

    for option in ("base_model", "thinking_model"):
        missing = missing_model_path(getattr(config, option))
        if missing:
            refuse(option, f"{option} {getattr(config, option)!r}: {missing}")
    for option, benchmark, split_key in (("benchmark", config.benchmark, "eval_split"),
                                      ("train_benchmark", config.resolved_train_benchmark, "train_split")):
        if benchmark not in benchmark_names():
            if option == "benchmark" or config.train_benchmark is not None:
                refuse(option, f"unknown {option} {benchmark!r}; expected one of {benchmark_names()}")
            continue
        splits = benchmark_splits(benchmark)
        if getattr(config, split_key) not in splits:
            refuse(split_key, f"{split_key} = {getattr(config, split_key)!r}: benchmark {benchmark!r} has splits {splits}")
    if (config.eval_split == config.train_split and config.resolved_train_benchmark == config.benchmark
            and config.benchmark in benchmark_names()):
        refuse("eval_split", f"eval_split = {config.eval_split!r} is the train_split, whose problems built the "
                             "taxonomy and the directions: the report would grade the hybrid on them; use another "
                             f"split of {config.benchmark!r} ({', '.join(benchmark_splits(config.benchmark))})")
    for option in ("trace_top_p", "eval_top_p"):
        if getattr(config, option) == 0:
            refuse(option, f"{option} = 0 keeps no token to sample from; use a value in (0, 1] (1: no nucleus cut)")
    layers = config.activation_layers or []
    if len(set(layers)) != len(layers):
        refuse("activation_layers", f"activation_layers = {layers} names a layer twice; list each layer once")
    problems += tuning_problems(config)
    problems += size_problems(config)
    if "oracle_timing" in config.baselines and config.benchmark in benchmark_names():
        truth = ground_truth_for(config.benchmark)
        if truth is None or truth.timing_oracle is None:
            refuse("baselines", f"baseline 'oracle_timing' steers where a ground-truth timing oracle says, which "
                                f"benchmark {config.benchmark!r} has none of; use baselines: [first_token_only]")
    for option in ("base_template", "thinking_template"):
        name = getattr(config, option)
        if name is not None and not is_inline_template(name) and name not in template_names():
            refuse(option, f"unknown {option} {name!r}; registered templates: {template_names()}, or a format string "
                        "containing {question}")
    try:
        check_judge_spec(config.judge)
    except ConfigError as error:
        refuse("judge", str(error))
    else:
        if config.judge == "oracle" and config.benchmark in benchmark_names() and ground_truth_for(config.benchmark) is None:
            refuse("judge", f"judge 'oracle' needs ground-truth labels, which benchmark {config.benchmark!r} has "
                            "none of; use http, http:<model> or local:<model spec>")
    problems += optimisation_problems(config.optimisation)
    problems += correction_problems(config.correction)
    if config.correction_controls and not config.correction_vectors:
        refuse("correction_controls", "correction_controls are evaluated at the correction vectors' steering; set "
                                      "correction_vectors: true, or remove them")
    for name in config.correction_controls:
        if name in control_names() and COMPARISONS.get(name).needs_bias:
            refuse("correction_controls", f"control {name!r} steers a bias, which the correction vectors have none "
                                          "of; remove it from correction_controls")
    for option in ("device", "base_device", "thinking_device"):
        value = getattr(config, option)
        if value is not None and value != "auto" and not _is_device(value):
            refuse(option, f"{option} {value!r} is not a device; expected auto, cpu, cuda, cuda:<index>, mps ...")
    if engine_spec(config.engine).runs_on == "server" and config.engine_url is None:
        refuse("engine_url", f"engine {config.engine!r} asks a server and needs engine_url, the server's address "
                             "(e.g. http://127.0.0.1:8000/v1)")
    if config.taxonomy_method != "sae":
        # The hybrid's timing policies (and the sae direction method) classify with the taxonomy's SAE.
        refuse("taxonomy_method", f"taxonomy_method {config.taxonomy_method!r} has no SAE, but a run's timing "
                                  f"policy ({config.policy!r}) reads one; use taxonomy_method: sae (the k-means "
                                  "and GMM baselines run with `mechsteer taxonomy --method`)")
    elif config.sae_k > min(config.n_latents):
        refuse("sae_k", f"sae_k = {config.sae_k} is more than the smallest n_latents ({min(config.n_latents)}): "
                        "the SAE keeps its top sae_k latents")
    return problems


def tuning_problems(config: RunConfig) -> list[Problem]:
    """The tuning keys: a validation split of the benchmark that is neither the reported split nor
    the one the taxonomy and directions come from; thresholds only for the threshold policy."""
    problems: list[Problem] = []
    split = config.tune_split
    if config.tune_thresholds is not None:
        if config.policy != "threshold":
            problems.append(Problem("tune_thresholds", f"tune_thresholds are thresholds of the threshold policy, "
                                    f"but policy is {config.policy!r}; set policy: threshold or remove "
                                    "tune_thresholds", "value"))
        if split is None:
            problems.append(Problem("tune_thresholds", "tune_thresholds are compared on the validation split: "
                                    "set tune_split (e.g. validation) or remove tune_thresholds", "value"))
    if split is None or config.benchmark not in benchmark_names():
        return problems
    splits = benchmark_splits(config.benchmark)
    others = [name for name in splits if name not in (config.eval_split, config.train_split)]
    instead = f"use another split of {config.benchmark!r} ({', '.join(others)})" if others else (
        f"benchmark {config.benchmark!r} has no third split ({', '.join(splits)}); remove tune_split")
    if split not in splits:
        problems.append(Problem("tune_split", f"tune_split = {split!r}: benchmark {config.benchmark!r} has splits "
                                f"{splits}", "value"))
    elif split == config.eval_split:
        problems.append(Problem("tune_split", f"tune_split = {split!r} is the eval_split: tuning on the split you "
                                f"report overstates the result; {instead}", "value"))
    elif split == config.train_split and config.resolved_train_benchmark == config.benchmark:
        problems.append(Problem("tune_split", f"tune_split = {split!r} is the train_split, whose problems built the "
                                f"taxonomy and the directions; {instead}", "value"))
    return problems


def size_problems(config: RunConfig) -> list[Problem]:
    """Each count of problems against the split it is taken from, where the split's size is declared
    (mechsteer.data.benchmarks.benchmark_size): a split of known size is never loaded to find out."""
    counts = [("n_train", config.resolved_train_benchmark, "train_split", config.train_split),
              ("n_eval", config.benchmark, "eval_split", config.eval_split)]
    if config.tune_split is not None:
        counts.append(("n_tune", config.benchmark, "tune_split", config.tune_split))
    if config.ablations:
        counts.append(("ablation_contexts", config.benchmark, "eval_split", config.eval_split))
    problems = []
    for option, benchmark, split_key, split in counts:
        size = benchmark_size(benchmark, split) if benchmark in benchmark_names() else None
        if size is not None and getattr(config, option) > size:
            problems.append(Problem(option, f"{option} = {getattr(config, option)} is more than the {size} problems "
                                    f"of {benchmark}/{split} ({split_key}); use at most {size}", "value"))
    return problems


def _is_device(value: str) -> bool:
    try:
        torch.device(value)
    except (RuntimeError, ValueError):
        return False
    return True


class _NoAliasLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` refusing aliases (``*name``): a few lines of nested aliases expand to
    billions of nodes (the "billion laughs") for every reader that walks the config, and no config
    needs them."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(None, None, f"alias *{event.anchor} refused: a config spells each value "
                                              "out (anchors and aliases are not read)", event.start_mark)
        return super().compose_node(parent, index)


def read_yaml_mapping(path: str | Path, what: str) -> dict[str, Any]:
    """The mapping in a YAML file; a missing file, invalid YAML (aliases included: see
    :class:`_NoAliasLoader`), or a list, a scalar or nothing in it raises one :class:`ConfigError`
    naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such {what} file" + (" (it is a folder)" if path.is_dir() else ""))
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_NoAliasLoader)  # noqa: S506 - a SafeLoader
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        at = f", line {mark.line + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ConfigError(f"{path}{at}: not valid YAML ({problem})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file; a {what} is a YAML mapping") from None
    if data is None:
        raise ConfigError(f"{path} is empty; a {what} is a YAML mapping of keys (name: ..., ...)")
    if not isinstance(data, dict):
        raise ConfigError(f"{path} holds a {type(data).__name__} ({str(data)[:40]!r}), not a mapping of keys; "
                          f"a {what} is a YAML mapping (name: ..., ...)")
    return data


DEMO_CONFIG = RunConfig(
    name="organism-demo",
    # Grammar v3: the thinking advantage is mid-trace timing (checks after carry/borrow steps),
    # not one decision at the first token (README, "Model organisms").
    base_model="organism-v3-base",
    thinking_model="organism-v3-thinking",
    benchmark="organism",
    # Three disjoint splits: train (traces, taxonomy, directions), validation (the tuning stage
    # picks the coefficient, or the whole grid, by validation accuracy), test (everything reported).
    train_split="train",
    n_train=200,
    tune_split="validation",
    n_tune=100,
    eval_split="test",
    n_eval=200,
    max_new_tokens=192,  # the longest thinking-organism traces (five checked days) run ~180 tokens
    batch_size=50,
    activation_layers=None,
    # The taxonomy is selected without labels: the cosine silhouette (judge none) over layers,
    # normalisations and sizes; ARI against the planted labels is computed afterwards, for the report.
    normalise=[True, False],
    n_latents=[4, 5, 6, 8],
    judge="none",
    direction_method="optimised",
    # Behaviour vectors trained on each sentence's first token, the decision to start it (README).
    optimisation={"lr": 0.1, "steps": 100, "init_norm": 8.0, "onset_tokens": 1},
    # The candidates the tuning stage compares (each alone, and all together with the guardrail),
    # and the policy's read: compared on the validation split before the one test run (README).
    coefficients=[1.0, 2.0, 4.0],
    windows=[1, 15],
    policy_read="next_token",
    controls=["only_bias", "only_bias_replayed", "random_firing", "random_vectors"],
    baselines=["first_token_only", "oracle_timing"],
    # The organisms are tiny (d_model 128): one thread is as fast as two, and far faster when
    # anything else runs on the machine (OpenMP threads spin-wait for a busy core).
    threads=1,
)

# The same run with the paper's algorithm: no tuning stage, the whole coefficient grid at every
# steered token with the guardrail (the candidate token the thinking model finds most likely).
DEMO_GRID_CONFIG = dataclasses.replace(DEMO_CONFIG, name="organism-demo-grid", tune_split=None)
