"""The end-to-end run: traces -> sentence activations -> taxonomy -> directions -> hybrid
evaluation (with controls) -> ablations -> report, for one model pair and one benchmark.

Every stage writes into its own folder under the run's ``out`` directory and marks itself
done in ``stages.json`` only when finished; a rerun skips finished stages, and the streaming
stages (traces, activations, hybrid evaluations) resume inside themselves, so an interrupted
run picks up where it stopped and produces the same report. A run folder belongs to one
config: rerunning it with a different config is refused.

``mechsteer run --config experiments/<name>.yaml --out DIR`` runs a config file;
``mechsteer demo`` runs the embedded default (the organism pair on the organism task).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from mechsteer.core.store import append_jsonl, json_digest, read_jsonl, write_json_atomic
from mechsteer.experiment.tracking import NullTracker, Tracker

# ------------------------------------------------------------------------------------------
# Config


@dataclass
class RunConfig:
    name: str
    base_model: str
    thinking_model: str
    benchmark: str
    base_template: str | None = None  # default: the organism prompt, else "base_paper"
    thinking_template: str | None = None  # default: the organism prompt, else "thinking_chat"
    train_split: str = "train"
    n_train: int = 200  # thinking traces used for the taxonomy and the directions
    eval_split: str = "test"
    n_eval: int = 200
    max_new_tokens: int = 256
    batch_size: int = 16
    activation_layers: list[int] | None = None  # thinking-model layers to pool (default: depth/8 grid)
    include_previous_token: bool = True
    taxonomy_method: str = "sae"
    normalise: list[bool] = field(default_factory=lambda: [True])  # L2-normalise sentence vectors (sweepable)
    n_latents: list[int] = field(default_factory=lambda: [5, 10, 15])
    sae_k: int = 3
    judge: str = "none"  # none | oracle | http | http:MODEL | local:SPEC
    direction_method: str = "mean"  # mean | sae | optimised
    # Settings of the optimised vectors (mechsteer.steering.directions.OptimisationConfig fields, e.g.
    # lr, steps, init_norm); empty: the paper's defaults.
    optimisation: dict[str, Any] = field(default_factory=dict)
    steer_layer: int | None = None  # base-model layer (default: ~37.5% of the depth)
    coefficients: list[float] = field(default_factory=lambda: [1.0])
    windows: list[int] = field(default_factory=lambda: [1])
    policy: str = "sae_argmax"
    threshold: float = 0.0
    controls: list[str] = field(default_factory=lambda: ["only_bias", "random_firing", "random_vectors"])
    ablations: bool = True
    ablation_contexts: int = 40
    seed: int = 0
    threads: int | None = None
    # Tracking (mechsteer.experiment.tracking), off by default. Not part of the digest: logging does not
    # change what a run computes, so a tracked rerun resumes an untracked run folder.
    wandb: bool = False
    wandb_project: str = "mechsteer"
    wandb_group: str | None = None  # default: the config's name (runs are grouped by experiment)
    wandb_mode: str | None = None  # online | offline; default: WANDB_MODE, else online

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
        return self.base_template or ("organism" if self.benchmark == "organism" else "base_paper")

    @property
    def resolved_thinking_template(self) -> str:
        return self.thinking_template or ("organism" if self.benchmark == "organism" else "thinking_chat")


TRACKING_KEYS = ("wandb", "wandb_project", "wandb_group", "wandb_mode")


def optimisation_config(config: RunConfig):
    """The run's `OptimisationConfig`: its ``optimisation`` settings, seeded by the run's seed."""
    from mechsteer.steering.directions import OptimisationConfig

    known = {f.name for f in dataclasses.fields(OptimisationConfig)} - {"seed"}
    unknown = sorted(set(config.optimisation) - known)
    if unknown:
        raise ValueError(f"unknown optimisation keys {unknown}; known keys: {sorted(known)}")
    return OptimisationConfig(**config.optimisation, seed=config.seed)


def run_hybrid_config(config: RunConfig, steer_layer: int, read_layer: int):
    """The hybrid generator's settings for a run (its coefficients, windows, lengths and batch)."""
    from mechsteer.hybrid.generator import HybridConfig

    return HybridConfig(steer_layer=steer_layer, read_layer=read_layer, coefficients=tuple(config.coefficients),
                        windows=tuple(config.windows), max_new_tokens=config.max_new_tokens,
                        batch_size=config.batch_size)


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

# ------------------------------------------------------------------------------------------
# Stage bookkeeping


class RunState:
    """``stages.json``: which stages are done, their timings and summaries."""

    def __init__(self, out: Path, config: RunConfig):
        self.out = out
        self.tracker: Tracker = NullTracker()  # run_pipeline sets the run's own once the folder is accepted
        self.path = out / "stages.json"
        out.mkdir(parents=True, exist_ok=True)
        state = json.loads(self.path.read_text()) if self.path.exists() else {}
        if state and state.get("config_digest") != config.digest():
            raise ValueError(
                f"{out} holds a run of another config (digest {state.get('config_digest')} != "
                f"{config.digest()}); use a new --out or delete the folder"
            )
        self.state = state or {"config_digest": config.digest(), "config": asdict(config), "stages": {}}
        write_json_atomic(out / "config.json", asdict(config))
        self.save()

    def save(self) -> None:
        write_json_atomic(self.path, self.state)

    def done(self, stage: str) -> bool:
        return stage in self.state["stages"]

    def summary(self, stage: str) -> dict[str, Any]:
        return self.state["stages"][stage]["summary"]

    def run(self, stage: str, body: Callable[[], dict[str, Any]], log: Callable[[str], None]) -> dict[str, Any]:
        if self.done(stage):
            log(f"[{stage}] already done, skipping")
        else:
            log(f"[{stage}] running")
            started = time.perf_counter()
            summary = body()
            seconds = time.perf_counter() - started
            self.state["stages"][stage] = {"seconds": round(seconds, 2), "summary": summary}
            self.save()
            log(f"[{stage}] done in {seconds:.1f}s")
        # a resumed run logs the stages it skipped too, so its tracked run is complete
        entry = self.state["stages"][stage]
        self.tracker.log_metrics(stage, {**entry["summary"], "seconds": entry["seconds"]})
        return entry["summary"]

    def timings(self) -> dict[str, float]:
        return {name: entry["seconds"] for name, entry in self.state["stages"].items()}


# ------------------------------------------------------------------------------------------
# The hybrid evaluation stage (streamed per batch, resumable)


def evaluate_hybrid(
    pair, problems, vectors, policy, hybrid_config, out_path: Path, *, base_template: str,
    thinking_template: str, progress: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Run the hybrid on ``problems``, appending one JSON line per problem; resumes from the file."""
    from mechsteer.grading.answers import extract_answer, is_correct
    from mechsteer.hybrid.generator import hybrid_generate
    from mechsteer.data.prompts import render_prompt

    done = {record["problem_id"] for record in read_jsonl(out_path)}
    todo = [problem for problem in problems if problem.id not in done]
    for start in range(0, len(todo), hybrid_config.batch_size):
        batch = todo[start : start + hybrid_config.batch_size]
        base_prompts = [render_prompt(base_template, p.question, pair.base.tokenizer) for p in batch]
        thinking_prompts = [render_prompt(thinking_template, p.question, pair.thinking.tokenizer) for p in batch]
        output = hybrid_generate(pair.base, pair.thinking, base_prompts, thinking_prompts, vectors, policy,
                                 hybrid_config)
        records = []
        for row, problem in enumerate(batch):
            prediction = extract_answer(output.texts[row], problem.benchmark)
            logs = output.token_logs[row]
            records.append({
                "problem_id": problem.id,
                "text": output.texts[row],
                "prediction": prediction,
                "reference": problem.answer,
                "correct": is_correct(prediction, problem.answer, problem.benchmark),
                "n_tokens": len(logs),
                "steered_fraction": output.steered_fractions[row],
                "agree_fraction": sum(log.agree for log in logs) / len(logs) if logs else 0.0,
                # compact per-token log: steered positions, their behaviours and coefficients
                "steered_positions": [i for i, log in enumerate(logs) if log.steered],
                "steered_behaviours": [log.behaviour for log in logs if log.steered],
                "steered_coeffs": [log.coeff for log in logs if log.steered],
                "steered_windows": [log.window for log in logs if log.steered],
                "top_latents": [log.latent_ids[:1] for log in logs],
            })
        append_jsonl(out_path, records)
        progress(f"  hybrid {policy.name}: {len(done) + start + len(batch)}/{len(problems)}")
    by_id = {record["problem_id"]: record for record in read_jsonl(out_path)}
    return [by_id[problem.id] for problem in problems]


# ------------------------------------------------------------------------------------------
# The run


def default_activation_layers(n_layers: int) -> list[int]:
    """About every depth/8, as the paper sweeps (at least one layer, never the embedding)."""
    step = max(1, n_layers // 8)
    return sorted({min(n_layers - 1, layer) for layer in range(step, n_layers, step)} or {n_layers - 1})


def run_pipeline(config: RunConfig, out_dir: str | Path, *, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run (or resume) every stage; write ``report.json`` and ``report.md``; return the report.

    With ``config.wandb`` on, the run is tracked (mechsteer.experiment.tracking): the config first, each
    stage's summary as it finishes, then the report's tables, plots and artefacts."""
    from mechsteer.experiment.tracking import open_tracker

    out = Path(out_dir)
    state = RunState(out, config)  # refuses a folder of another config before anything is logged
    state.tracker = open_tracker(config, out)
    try:
        report = _run_stages(config, out, state, log)
        track_report(state.tracker, report, out)
    except BaseException:
        state.tracker.finish(exit_code=1)
        raise
    state.tracker.finish()
    return report


def _run_stages(config: RunConfig, out: Path, state: RunState, log: Callable[[str], None]) -> dict[str, Any]:
    from mechsteer.steering import directions as directions_stage
    from mechsteer.activations import ActivationConfig, extract_activations, organism_labeller
    from mechsteer.data.benchmarks import load_benchmark
    from mechsteer.core.models import load_pair
    from mechsteer.data.traces import generate_traces, load_traces

    if config.threads:
        torch.set_num_threads(config.threads)
    started = time.perf_counter()
    pair = load_pair(config.base_model, config.thinking_model)
    train = load_benchmark(config.benchmark, config.train_split, config.n_train)
    evaluation = load_benchmark(config.benchmark, config.eval_split, config.n_eval)
    labeller = organism_labeller if config.benchmark == "organism" else None
    traces_kwargs = dict(max_new_tokens=config.max_new_tokens, batch_size=config.batch_size, progress=False)

    def thinking_train_traces() -> dict[str, Any]:
        records = generate_traces(pair.thinking, train, out / "traces" / "thinking_train",
                                  template=config.resolved_thinking_template, **traces_kwargs)
        return {"n": len(records), "accuracy": sum(r.correct for r in records) / len(records)}

    def base_train_traces() -> dict[str, Any]:
        records = generate_traces(pair.base, train, out / "traces" / "base_train",
                                  template=config.resolved_base_template, **traces_kwargs)
        return {"n": len(records), "accuracy": sum(r.correct for r in records) / len(records)}

    state.run("traces_thinking_train", thinking_train_traces, log)
    state.run("traces_base_train", base_train_traces, log)

    layers = config.activation_layers or default_activation_layers(pair.thinking.cfg.n_layers)

    def activations() -> dict[str, Any]:
        manifest = extract_activations(
            pair.thinking, load_traces(out / "traces" / "thinking_train"), out / "activations",
            ActivationConfig(layers=layers, include_previous_token=config.include_previous_token,
                             batch_size=config.batch_size),
            labeller=labeller, progress=False,
        )
        return {"n_sentences": manifest.n_sentences, "layers": layers, "throughput": manifest.throughput}

    state.run("activations", activations, log)

    def taxonomy() -> dict[str, Any]:
        return _taxonomy_stage(config, out, layers)

    taxonomy_summary = state.run("taxonomy", taxonomy, log)

    steer_layer = config.steer_layer if config.steer_layer is not None else directions_stage.default_layer(pair.base.cfg.n_layers)

    def directions() -> dict[str, Any]:
        labels = directions_stage.taxonomy_labels(out / "taxonomy")
        thinking_traces = directions_stage.frame_for_base(load_traces(out / "traces" / "thinking_train"),
                                                          {p.id: p.question for p in train}, pair.base.tokenizer)
        base_traces = load_traces(out / "traces" / "base_train")
        if config.direction_method == "mean":
            result = directions_stage.build_mean_directions(
                pair.base, thinking_traces, labels.labeller, labels.behaviour_ids, labels.titles, steer_layer,
                base_traces=base_traces)
        elif config.direction_method == "sae":
            result = directions_stage.build_sae_directions(
                pair.base, pair.thinking, labels.taxonomy.load_sae(), labels.behaviour_ids, labels.titles,
                steer_layer, thinking_traces, sae_layer=labels.taxonomy.provenance.layer, base_traces=base_traces)
        elif config.direction_method == "optimised":
            result = directions_stage.build_optimised_directions(
                pair.base, thinking_traces, labels.labeller, labels.behaviour_ids, labels.titles, steer_layer,
                optimisation_config(config))
        else:
            raise ValueError(f"unknown direction_method {config.direction_method!r}; expected mean, sae or optimised")
        result.save(out / "directions")
        return {"method": result.method, "layer": steer_layer, "behaviour_ids": result.behaviour_ids,
                "titles": result.titles, "norms": [round(float(n), 4) for n in result.norms],
                "bias_norm": None if result.bias is None else round(float(result.bias.norm()), 4)}

    state.run("directions", directions, log)

    evaluations = _run_evaluations(config, state, pair, evaluation, out, steer_layer, log)
    ablation_summary = _run_ablations(config, state, pair, out, log) if config.ablations else None

    report = build_report(config, state, evaluations, taxonomy_summary, ablation_summary,
                          total_seconds=time.perf_counter() - started)
    from mechsteer.experiment.report import write_report

    write_report(report, out)
    return report


def _taxonomy_stage(config: RunConfig, out: Path, layers: list[int]) -> dict[str, Any]:
    """Sweep layers x n_latents, keep the selected taxonomy, write its table and plots."""
    from mechsteer.taxonomy import build as taxonomy_stage

    rows, best = taxonomy_stage.sweep_to_folder(
        out / "activations", layers, config.n_latents, out / "taxonomy", judge_spec=config.judge,
        method=config.taxonomy_method, k=config.sae_k, seed=config.seed, normalise=tuple(config.normalise))
    metrics = asdict(best.metrics)
    return {"layer": best.provenance.layer, "n_behaviours": best.provenance.n_latents,
            "behaviours": [b.title for b in best.behaviours], "ari": metrics.get("ari"),
            "metrics": {key: value for key, value in metrics.items() if key != "sizes"},
            "sizes": metrics.get("sizes"), "sweep": rows}


def _run_evaluations(config, state, pair, evaluation, out, steer_layer, log) -> dict[str, Any]:
    from mechsteer.steering.directions import DirectionSet
    from mechsteer.hybrid.generator import SteeringVectors
    from mechsteer.taxonomy.build import Taxonomy
    from mechsteer.hybrid.timing import (
        BiasOnlyPolicy,
        RandomFiringPolicy,
        SAEArgmaxPolicy,
        ThresholdPolicy,
    )
    from mechsteer.data.traces import generate_traces

    traces_kwargs = dict(max_new_tokens=config.max_new_tokens, batch_size=config.batch_size, progress=False)

    def model_eval(name: str, model, template: str) -> Callable[[], dict[str, Any]]:
        def body() -> dict[str, Any]:
            records = generate_traces(model, evaluation, out / "eval" / name, template=template, **traces_kwargs)
            return {"correct": [bool(r.correct) for r in records]}
        return body

    state.run("eval_base", model_eval("base", pair.base, config.resolved_base_template), log)
    state.run("eval_thinking", model_eval("thinking", pair.thinking, config.resolved_thinking_template), log)

    taxonomy = Taxonomy.load(out / "taxonomy")
    sae = taxonomy.load_sae()
    direction_set = DirectionSet.load(out / "directions")
    direction_set.check_model(pair.base)
    vectors = SteeringVectors.from_direction_set(direction_set)
    hybrid_config = run_hybrid_config(config, steer_layer, taxonomy.provenance.layer)
    behaviour_ids = list(direction_set.behaviour_ids)

    def hybrid_eval(name: str, policy, steering: SteeringVectors) -> Callable[[], dict[str, Any]]:
        def body() -> dict[str, Any]:
            records = evaluate_hybrid(pair, evaluation, steering, policy, hybrid_config,
                                      out / "eval" / name / "results.jsonl",
                                      base_template=config.resolved_base_template,
                                      thinking_template=config.resolved_thinking_template, progress=log)
            return {"correct": [bool(r["correct"]) for r in records],
                    "steered_fraction": sum(r["steered_fraction"] for r in records) / len(records)}
        return body

    if config.policy == "sae_argmax":
        policy = SAEArgmaxPolicy(sae, behaviour_ids)
    elif config.policy == "threshold":
        policy = ThresholdPolicy(sae, behaviour_ids, threshold=config.threshold)
    else:
        raise ValueError(f"unknown policy {config.policy!r} for the hybrid; expected sae_argmax or threshold")
    hybrid = state.run("eval_hybrid", hybrid_eval("hybrid", policy, vectors), log)
    results = {"base": state.summary("eval_base"), "thinking": state.summary("eval_thinking"), "hybrid": hybrid}
    for control in config.controls:
        if control == "only_bias":
            if direction_set.bias is None:
                raise ValueError("the only_bias control needs a bias direction; the direction set has none")
            # the paper's control: the hybrid's own timing, the bias without behaviour directions
            body = hybrid_eval("only_bias", BiasOnlyPolicy(policy), vectors)
        elif control == "random_firing":
            body = hybrid_eval("random_firing", RandomFiringPolicy(hybrid["steered_fraction"], behaviour_ids,
                                                                   seed=config.seed), vectors)
        elif control == "random_vectors":
            random_set = direction_set.random_like(config.seed)
            body = hybrid_eval("random_vectors", SAEArgmaxPolicy(sae, behaviour_ids),
                               SteeringVectors.from_direction_set(random_set))
        else:
            raise ValueError(f"unknown control {control!r}; expected only_bias, random_firing or random_vectors")
        results[control] = state.run(f"eval_{control}", body, log)
    return results


def _run_ablations(config, state, pair, out, log) -> dict[str, Any]:
    def body() -> dict[str, Any]:
        from mechsteer.causal import ablations
        from mechsteer.data.benchmarks import load_benchmark
        from mechsteer.steering.directions import DirectionSet, frame_for_base, taxonomy_labels
        from mechsteer.data.traces import load_traces

        direction_set = DirectionSet.load(out / "directions")
        labels = taxonomy_labels(out / "taxonomy")
        train = load_benchmark(config.benchmark, config.train_split, config.n_train)
        traces = frame_for_base(load_traces(out / "traces" / "thinking_train"), {p.id: p.question for p in train},
                                pair.base.tokenizer)
        settings: dict[str, Any] = {"source": "mechsteer run"}
        if config.benchmark == "organism":
            # Ground truth measures the behaviours of generated text, and taxonomy latents map to
            # it by title. Several latents can share a title (the oracle judge names each by its
            # majority behaviour) and ground truth cannot tell them apart, so each behaviour is
            # measured once, with the direction of its first latent; latents whose title is no
            # behaviour of the grammar cannot be measured at all. Both are listed in the output.
            from mechsteer.organisms.grammar import BEHAVIOURS

            first_latent: dict[str, int] = {}
            for behaviour in direction_set.behaviour_ids:
                title = direction_set.title(behaviour)
                if title in BEHAVIOURS and title not in first_latent:
                    first_latent[title] = behaviour
            settings["not_measured"] = {str(b): direction_set.title(b) for b in direction_set.behaviour_ids
                                        if b not in first_latent.values()}
            if not first_latent:
                raise ValueError(f"no taxonomy latent is titled with a behaviour of the organism grammar "
                                 f"({sorted(BEHAVIOURS)}); titles: {direction_set.titles}")
            direction_set = direction_set.subset(list(first_latent.values()))
            labeller = ablations.organism_behaviour_labeller(direction_set.titles, direction_set.behaviour_ids)
        else:
            taxonomy = labels.taxonomy
            labeller = ablations.SAEBehaviourLabeller(pair.thinking, taxonomy.load_sae(), taxonomy.provenance.layer,
                                                      taxonomy.provenance.include_previous_token)
        problems = load_benchmark(config.benchmark, config.eval_split, config.ablation_contexts)
        necessity_rows = ablations.necessity(pair.thinking, direction_set, problems, labeller,
                                             template=config.resolved_thinking_template,
                                             max_new_tokens=config.max_new_tokens, batch_size=config.batch_size)
        contexts = ablations.sufficiency_contexts(traces, pair.base.tokenizer, labels.labeller)
        # optimised behaviour vectors were trained on top of the bias: steer with both, as the hybrid does
        with_bias = direction_set.method == "optimised" and direction_set.bias is not None
        settings["sufficiency_with_bias"] = with_bias
        sufficiency_rows = ablations.sufficiency(
            pair.base, direction_set, contexts, labeller, coeffs=tuple(config.coefficients),
            n_contexts=config.ablation_contexts, seed=config.seed, with_bias=with_bias,
            stop_strings=("\n",) if config.benchmark == "organism" else (), batch_size=config.batch_size)
        ablations.write_outputs(out / "ablations", necessity_rows, sufficiency_rows, settings)
        return {
            "necessity": [{"behaviour": r.title, "variant": r.variant, "relative_change": r.relative_change,
                           "max_other_relative_change": r.max_other_relative_change} for r in necessity_rows],
            "sufficiency": [{"behaviour": r.title, "coeff": r.coeff, "steered": r.rate_steered,
                             "random": r.rate_random, "unsteered": r.rate_unsteered} for r in sufficiency_rows],
            "not_measured": settings.get("not_measured", {}),
        }

    return state.run("ablations", body, log)


def build_report(config, state, evaluations, taxonomy_summary, ablation_summary, total_seconds) -> dict[str, Any]:
    from mechsteer.grading.answers import accuracy, gap_recovered, paired_bootstrap_gap

    summary = {name: accuracy(result["correct"]) for name, result in evaluations.items()}
    base, thinking = summary["base"].accuracy, summary["thinking"].accuracy

    def gap(name: str) -> float | None:
        return gap_recovered(summary[name].accuracy, base, thinking)

    bootstrap = paired_bootstrap_gap(evaluations["base"]["correct"], evaluations["thinking"]["correct"],
                                     evaluations["hybrid"]["correct"], n_resamples=1000, seed=config.seed)
    controls = {
        name: {"accuracy": summary[name].accuracy, "gap_recovered": gap(name),
               "steered_fraction": evaluations[name].get("steered_fraction")}
        for name in config.controls
    }
    return {
        "name": config.name,
        "pair": {"base": config.base_model, "thinking": config.thinking_model},
        "benchmark": config.benchmark,
        "n_eval": config.n_eval,
        "base_accuracy": base,
        "thinking_accuracy": thinking,
        "hybrid_accuracy": summary["hybrid"].accuracy,
        "accuracy_intervals": {name: [s.ci_low, s.ci_high] for name, s in summary.items()},
        "gap_recovered": gap("hybrid"),
        "gap_recovered_interval": [bootstrap.ci_low, bootstrap.ci_high] if bootstrap.ci_low is not None else None,
        "tokens_steered_fraction": evaluations["hybrid"]["steered_fraction"],
        "controls": controls,
        "taxonomy": taxonomy_summary,
        "directions": state.summary("directions"),
        "ablations": ablation_summary,
        "timings": {**state.timings(), "total_this_invocation": round(total_seconds, 2)},
        "config": asdict(config),
    }


def headline_metrics(report: dict[str, Any]) -> dict[str, Any]:
    """The report's headline numbers as one flat row (a sweep's results table, wandb's summary)."""
    taxonomy = report.get("taxonomy") or {}
    row = {
        "base_accuracy": report["base_accuracy"],
        "thinking_accuracy": report["thinking_accuracy"],
        "hybrid_accuracy": report["hybrid_accuracy"],
        "gap_recovered": report["gap_recovered"],
        "tokens_steered_fraction": report["tokens_steered_fraction"],
    }
    for name, control in report["controls"].items():
        row[f"{name}_accuracy"] = control["accuracy"]
        row[f"{name}_gap_recovered"] = control["gap_recovered"]
        row[f"{name}_steered_fraction"] = control["steered_fraction"]
    row["taxonomy_layer"] = taxonomy.get("layer")
    row["n_behaviours"] = taxonomy.get("n_behaviours")
    row["taxonomy_ari"] = taxonomy.get("ari")
    row["steer_layer"] = (report.get("directions") or {}).get("layer")
    return row


def accuracy_rows(report: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per evaluated model (base, thinking, hybrid, controls), as report.md's table."""
    rows = [("base", report["base_accuracy"], None, None),
            ("thinking", report["thinking_accuracy"], None, None),
            ("hybrid", report["hybrid_accuracy"], report["gap_recovered"], report["tokens_steered_fraction"])]
    rows += [(name, c["accuracy"], c["gap_recovered"], c["steered_fraction"]) for name, c in report["controls"].items()]
    intervals = report["accuracy_intervals"]
    return [{"model": name, "accuracy": accuracy, "ci_low": intervals[name][0], "ci_high": intervals[name][1],
             "gap_recovered": gap, "steered_fraction": steered} for name, accuracy, gap, steered in rows]


def track_report(tracker: Tracker, report: dict[str, Any], out: Path) -> None:
    """Log the finished report: headline metrics, its tables, its plots, and the artefacts."""
    tracker.log_metrics("report", headline_metrics(report))
    tracker.log_table("accuracy", accuracy_rows(report))
    taxonomy = report.get("taxonomy") or {}
    tracker.log_table("taxonomy_sweep", list(taxonomy.get("sweep") or []))
    statistics = report.get("behaviour_statistics") or {}
    tracker.log_table("behaviour_onset", [{"behaviour": name, **entry}
                                          for name, entry in statistics.get("onset", {}).items()])
    tracker.log_table("behaviour_transitions", list(statistics.get("transitions", [])))
    ablations = report.get("ablations") or {}
    tracker.log_table("ablation_necessity", list(ablations.get("necessity", [])))
    tracker.log_table("ablation_sufficiency", list(ablations.get("sufficiency", [])))
    for plot in [*sorted(out.glob("*.png")), *sorted((out / "taxonomy").glob("*.png"))]:
        tracker.log_image(str(plot.relative_to(out).with_suffix("")), plot)
    tracker.log_artifact(f"{report['name']}-taxonomy", "taxonomy", [out / "taxonomy"])
    tracker.log_artifact(f"{report['name']}-directions", "directions", [out / "directions"])
    tracker.log_artifact(f"{report['name']}-report", "report", [out / "report.json", out / "report.md"])


# ------------------------------------------------------------------------------------------
# CLI


def report_table(report: dict[str, Any]) -> str:
    def fmt(value) -> str:
        return "n/a" if value is None else f"{value:.3f}"

    lines = [f"{'model':<16}{'accuracy':>10}{'gap rec.':>10}{'steered':>10}"]
    lines += [f"{row['model']:<16}{fmt(row['accuracy']):>10}{fmt(row['gap_recovered']):>10}"
              f"{fmt(row['steered_fraction']):>10}" for row in accuracy_rows(report)]
    return "\n".join(lines)


def run_cli(args: argparse.Namespace) -> int:
    config = RunConfig.from_yaml(args.config)
    if args.wandb:
        config = dataclasses.replace(config, wandb=True)
    report = run_pipeline(config, args.out)
    print(report_table(report))
    print(json.dumps({"report": str(Path(args.out) / "report.json")}))
    return 0


def demo_cli(args: argparse.Namespace) -> int:
    print("mechsteer demo: the full pipeline (traces -> activations -> SAE taxonomy -> directions -> "
          "hybrid + controls -> ablations) on the shipped organism pair and the organism task.")
    config = DEMO_CONFIG if args.n is None else dataclasses.replace(DEMO_CONFIG, n_eval=args.n, n_train=args.n)
    if args.wandb:
        config = dataclasses.replace(config, wandb=True)
    report = run_pipeline(config, args.out)
    print(report_table(report))
    print(f"report: {Path(args.out) / 'report.md'}")
    return 0


WANDB_HELP = ("track the run with wandb (sets wandb: true; WANDB_MODE=offline keeps it local; "
              "wandb's files go under OUT/wandb)")


def register_cli(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("run", help="run the whole pipeline for one pair and benchmark")
    parser.add_argument("--config", required=True, help="experiments/<name>.yaml")
    parser.add_argument("--out", required=True)
    parser.add_argument("--wandb", action="store_true", help=WANDB_HELP)
    parser.set_defaults(func=run_cli)
    demo = subparsers.add_parser("demo", help="the pipeline on the shipped organism pair (runs/demo)")
    demo.add_argument("--out", default="runs/demo")
    demo.add_argument("--n", type=int, default=None, help="problems for training and evaluation (default 200)")
    demo.add_argument("--wandb", action="store_true", help=WANDB_HELP)
    demo.set_defaults(func=demo_cli)
