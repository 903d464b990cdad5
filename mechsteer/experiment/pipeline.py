"""The end-to-end run: traces -> sentence activations -> taxonomy -> directions -> hybrid
evaluation (with controls) -> ablations -> report, for one model pair and one benchmark.

Every stage writes into its own folder under the run's ``out`` directory and marks itself
done in ``stages.json`` only when finished (:class:`~mechsteer.experiment.state.RunState`); a
rerun skips finished stages, and the streaming stages (traces, activations, hybrid evaluations)
resume inside themselves, so an interrupted run picks up where it stopped and produces the same
report. A run folder belongs to one config: rerunning it with a different config is refused.

``mechsteer run --config experiments/<name>.yaml --out DIR`` runs a config file;
``mechsteer demo`` runs the embedded default (the organism pair on the organism task).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from mechsteer.activations import ActivationConfig, extract_activations
from mechsteer.causal.necessity import necessity
from mechsteer.causal.outputs import write_outputs
from mechsteer.causal.sufficiency import sufficiency, sufficiency_contexts
from mechsteer.core.models import ModelPair, load_pair
from mechsteer.core.store import append_jsonl, read_jsonl
from mechsteer.data.benchmarks import Problem, load_benchmark
from mechsteer.data.labels import ground_truth_for
from mechsteer.data.prompts import render_prompt
from mechsteer.data.traces import generate_traces, load_traces
from mechsteer.experiment.config import (
    RunConfig,
    default_activation_layers,
    optimisation_config,
    run_hybrid_config,
)
from mechsteer.experiment.report import build_report, track_report, write_report
from mechsteer.experiment.state import RunState
from mechsteer.experiment.tracking import open_tracker
from mechsteer.grading.answers import extract_answer, is_correct
from mechsteer.hybrid import generator
from mechsteer.hybrid.generator import HybridConfig
from mechsteer.hybrid.timing import (
    BiasOnlyPolicy,
    RandomFiringPolicy,
    SAEArgmaxPolicy,
    ThresholdPolicy,
    TimingPolicy,
)
from mechsteer.steering.direction_set import DirectionSet
from mechsteer.steering.framing import frame_for_base
from mechsteer.steering.labels import (
    SAEBehaviourLabeller,
    ground_truth_behaviour_labeller,
    taxonomy_labels,
)
from mechsteer.steering.mean import build_mean_directions, default_layer
from mechsteer.steering.optimise import build_optimised_directions
from mechsteer.steering.sae_map import build_sae_directions
from mechsteer.taxonomy.artefact import Taxonomy
from mechsteer.taxonomy.sweep import sweep_to_folder

# ------------------------------------------------------------------------------------------
# The hybrid evaluation stage (streamed per batch, resumable)


def evaluate_hybrid(
    pair: ModelPair, problems: Sequence[Problem], directions: DirectionSet, policy: TimingPolicy,
    hybrid_config: HybridConfig, out_path: Path, *, base_template: str, thinking_template: str,
    progress: Callable[[str], None] = print,
) -> list[dict[str, Any]]:
    """Run the hybrid on ``problems``, appending one JSON line per problem; resumes from the file."""
    done = {record["problem_id"] for record in read_jsonl(out_path)}
    todo = [problem for problem in problems if problem.id not in done]
    for start in range(0, len(todo), hybrid_config.batch_size):
        batch = todo[start : start + hybrid_config.batch_size]
        base_prompts = [render_prompt(base_template, p.question, pair.base.tokenizer) for p in batch]
        thinking_prompts = [render_prompt(thinking_template, p.question, pair.thinking.tokenizer) for p in batch]
        # looked up on its module at each call, so that a test can replace it
        output = generator.hybrid_generate(pair.base, pair.thinking, base_prompts, thinking_prompts, directions, policy,
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


def run_pipeline(config: RunConfig, out_dir: str | Path, *, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run (or resume) every stage; write ``report.json`` and ``report.md``; return the report.

    With ``config.wandb`` on, the run is tracked (mechsteer.experiment.tracking): the config first, each
    stage's summary as it finishes, then the report's tables, plots and artefacts."""
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
    if config.threads:
        torch.set_num_threads(config.threads)
    started = time.perf_counter()
    pair = load_pair(config.base_model, config.thinking_model)
    train = load_benchmark(config.benchmark, config.train_split, config.n_train)
    evaluation = load_benchmark(config.benchmark, config.eval_split, config.n_eval)
    ground_truth = ground_truth_for(config.benchmark)
    labeller = ground_truth.label_reasoning if ground_truth is not None else None
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

    steer_layer = config.steer_layer if config.steer_layer is not None else default_layer(pair.base.cfg.n_layers)

    def directions() -> dict[str, Any]:
        labels = taxonomy_labels(out / "taxonomy")
        thinking_traces = frame_for_base(load_traces(out / "traces" / "thinking_train"),
                                         {p.id: p.question for p in train}, pair.base.tokenizer)
        base_traces = load_traces(out / "traces" / "base_train")
        if config.direction_method == "mean":
            result = build_mean_directions(
                pair.base, thinking_traces, labels.labeller, labels.behaviour_ids, labels.titles, steer_layer,
                base_traces=base_traces)
        elif config.direction_method == "sae":
            result = build_sae_directions(
                pair.base, pair.thinking, labels.taxonomy.load_sae(), labels.behaviour_ids, labels.titles,
                steer_layer, thinking_traces, sae_layer=labels.taxonomy.provenance.layer, base_traces=base_traces)
        elif config.direction_method == "optimised":
            result = build_optimised_directions(
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
    write_report(report, out)
    return report


def _taxonomy_stage(config: RunConfig, out: Path, layers: list[int]) -> dict[str, Any]:
    """Sweep layers x n_latents, keep the selected taxonomy, write its table and plots."""
    rows, best = sweep_to_folder(
        out / "activations", layers, config.n_latents, out / "taxonomy", judge_spec=config.judge,
        benchmark=config.benchmark, method=config.taxonomy_method, k=config.sae_k, seed=config.seed,
        normalise=tuple(config.normalise))
    metrics = asdict(best.metrics)
    return {"layer": best.provenance.layer, "n_behaviours": best.provenance.n_latents,
            "behaviours": [b.title for b in best.behaviours], "ari": metrics.get("ari"),
            "metrics": {key: value for key, value in metrics.items() if key != "sizes"},
            "sizes": metrics.get("sizes"), "sweep": rows}


def _run_evaluations(config: RunConfig, state: RunState, pair: ModelPair, evaluation: list[Problem], out: Path,
                     steer_layer: int, log: Callable[[str], None]) -> dict[str, Any]:
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
    hybrid_config = run_hybrid_config(config, steer_layer, taxonomy.provenance.layer)
    behaviour_ids = list(direction_set.behaviour_ids)

    def hybrid_eval(name: str, policy: TimingPolicy, steering: DirectionSet) -> Callable[[], dict[str, Any]]:
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
    hybrid = state.run("eval_hybrid", hybrid_eval("hybrid", policy, direction_set), log)
    results = {"base": state.summary("eval_base"), "thinking": state.summary("eval_thinking"), "hybrid": hybrid}
    for control in config.controls:
        if control == "only_bias":
            if direction_set.bias is None:
                raise ValueError("the only_bias control needs a bias direction; the direction set has none")
            # the paper's control: the hybrid's own timing, the bias without behaviour directions
            body = hybrid_eval("only_bias", BiasOnlyPolicy(policy), direction_set)
        elif control == "random_firing":
            body = hybrid_eval("random_firing", RandomFiringPolicy(hybrid["steered_fraction"], behaviour_ids,
                                                                   seed=config.seed), direction_set)
        elif control == "random_vectors":
            body = hybrid_eval("random_vectors", SAEArgmaxPolicy(sae, behaviour_ids),
                               direction_set.random_like(config.seed))
        else:
            raise ValueError(f"unknown control {control!r}; expected only_bias, random_firing or random_vectors")
        results[control] = state.run(f"eval_{control}", body, log)
    return results


def _run_ablations(config: RunConfig, state: RunState, pair: ModelPair, out: Path,
                   log: Callable[[str], None]) -> dict[str, Any]:
    def body() -> dict[str, Any]:
        direction_set = DirectionSet.load(out / "directions")
        labels = taxonomy_labels(out / "taxonomy")
        train = load_benchmark(config.benchmark, config.train_split, config.n_train)
        traces = frame_for_base(load_traces(out / "traces" / "thinking_train"), {p.id: p.question for p in train},
                                pair.base.tokenizer)
        settings: dict[str, Any] = {"source": "mechsteer run"}
        ground_truth = ground_truth_for(config.benchmark)
        if ground_truth is not None:
            # Ground truth measures the behaviours of generated text, and taxonomy latents map to
            # it by title. Several latents can share a title (the oracle judge names each by its
            # majority behaviour) and ground truth cannot tell them apart, so each behaviour is
            # measured once, with the direction of its first latent; latents whose title is no
            # behaviour of the ground truth cannot be measured at all. Both are listed in the output.
            first_latent: dict[str, int] = {}
            for behaviour in direction_set.behaviour_ids:
                title = direction_set.title(behaviour)
                if title in ground_truth.behaviours and title not in first_latent:
                    first_latent[title] = behaviour
            settings["not_measured"] = {str(b): direction_set.title(b) for b in direction_set.behaviour_ids
                                        if b not in first_latent.values()}
            if not first_latent:
                raise ValueError(f"no taxonomy latent is titled with a behaviour of the {config.benchmark!r} "
                                 f"ground truth ({sorted(ground_truth.behaviours)}); titles: {direction_set.titles}")
            direction_set = direction_set.subset(list(first_latent.values()))
            labeller = ground_truth_behaviour_labeller(ground_truth, direction_set.titles, direction_set.behaviour_ids)
        else:
            taxonomy = labels.taxonomy
            labeller = SAEBehaviourLabeller(pair.thinking, taxonomy.load_sae(), taxonomy.provenance.layer,
                                            taxonomy.provenance.include_previous_token)
        problems = load_benchmark(config.benchmark, config.eval_split, config.ablation_contexts)
        necessity_rows = necessity(pair.thinking, direction_set, problems, labeller,
                                template=config.resolved_thinking_template,
                                max_new_tokens=config.max_new_tokens, batch_size=config.batch_size)
        contexts = sufficiency_contexts(traces, pair.base.tokenizer, labels.labeller)
        # optimised behaviour vectors were trained on top of the bias: steer with both, as the hybrid does
        with_bias = direction_set.method == "optimised" and direction_set.bias is not None
        settings["sufficiency_with_bias"] = with_bias
        # A benchmark with ground truth follows a grammar of one sentence per line (the organisms):
        # the next sentence ends at the newline.
        one_sentence_per_line = ground_truth is not None
        sufficiency_rows = sufficiency(
            pair.base, direction_set, contexts, labeller, coeffs=tuple(config.coefficients),
            n_contexts=config.ablation_contexts, seed=config.seed, with_bias=with_bias,
            stop_strings=("\n",) if one_sentence_per_line else (), batch_size=config.batch_size)
        write_outputs(out / "ablations", necessity_rows, sufficiency_rows, settings)
        return {
            "necessity": [{"behaviour": r.title, "variant": r.variant, "relative_change": r.relative_change,
                           "max_other_relative_change": r.max_other_relative_change} for r in necessity_rows],
            "sufficiency": [{"behaviour": r.title, "coeff": r.coeff, "steered": r.rate_steered,
                             "random": r.rate_random, "unsteered": r.rate_unsteered} for r in sufficiency_rows],
            "not_measured": settings.get("not_measured", {}),
        }

    return state.run("ablations", body, log)
