"""The end-to-end run: traces -> sentence activations -> taxonomy -> directions -> (tuning on a
validation split) -> hybrid evaluation (with controls) -> ablations -> report, for one model pair
and one benchmark.

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
from typing import Any, cast

import torch
from transformer_lens.model_bridge import TransformerBridge

from mechsteer.activations import ActivationConfig, Manifest, extract_activations, read_sentences
from mechsteer.causal.stage import AblationSettings, run_ablations
from mechsteer.core.errors import ConfigError
from mechsteer.core.models import ModelPair, spec_model_name
from mechsteer.core.resident import ResidentPair, Role
from mechsteer.core.store import append_jsonl, exclusive_folder, read_jsonl
from mechsteer.data.benchmarks import Problem, load_benchmark
from mechsteer.data.labels import ground_truth_for
from mechsteer.data.prompts import render_prompt
from mechsteer.data.traces import generate_traces, load_traces
from mechsteer.engines import EngineInputs, GenerationEngine, engine_spec, load_tokenizer
from mechsteer.engines.openai import with_settings
from mechsteer.experiment.config import (
    RunConfig,
    default_activation_layers,
    optimisation_config,
    run_hybrid_config,
)
from mechsteer.experiment.report import build_report, track_report, write_report
from mechsteer.experiment.state import RunState
from mechsteer.experiment.tracking import open_tracker
from mechsteer.experiment.tuning import (
    SteeringSetting,
    chosen_setting,
    hybrid_policy,
    run_tuning,
    with_setting,
)
from mechsteer.grading.answers import extract_answer, is_correct
from mechsteer.hybrid import generator
from mechsteer.hybrid.generator import HybridConfig
from mechsteer.hybrid.timing import (
    BatchBound,
    BiasOnlyPolicy,
    FirstTokenOnlyPolicy,
    RandomFiringPolicy,
    ReplayPolicy,
    TimingOraclePolicy,
    TimingPolicy,
)
from mechsteer.steering.direction_set import DirectionSet
from mechsteer.steering.framing import frame_for_base
from mechsteer.steering.labels import (
    taxonomy_labels,
)
from mechsteer.steering.mean import default_layer
from mechsteer.steering.stage import DirectionSettings, build_directions
from mechsteer.taxonomy.artefact import Taxonomy
from mechsteer.taxonomy.build import JudgeSettings
from mechsteer.taxonomy.metrics import behaviour_holding_most, sentence_labels
from mechsteer.taxonomy.sweep import sweep_to_folder

# ------------------------------------------------------------------------------------------
# The hybrid evaluation stage (streamed per batch, resumable)


def evaluate_hybrid(
    pair: ModelPair | ResidentPair, problems: Sequence[Problem], directions: DirectionSet, policy: TimingPolicy,
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
        if isinstance(policy, BatchBound):
            policy.bind([problem.id for problem in batch])
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
                "finish_reason": output.finish_reasons[row],
            })
        append_jsonl(out_path, records)
        progress(f"  hybrid {policy.name}: {len(done) + start + len(batch)}/{len(problems)}")
    by_id = {record["problem_id"]: record for record in read_jsonl(out_path)}
    return [by_id[problem.id] for problem in problems]


def steered_positions(results_path: Path) -> dict[str, list[int]]:
    """Each problem's steered token positions in a hybrid evaluation's ``results.jsonl``."""
    return {record["problem_id"]: record["steered_positions"] for record in read_jsonl(results_path)}


# ------------------------------------------------------------------------------------------
# The run


def run_pipeline(config: RunConfig, out_dir: str | Path, *, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run (or resume) every stage; write ``report.json`` and ``report.md``; return the report.

    With ``config.wandb`` on, the run is tracked (mechsteer.experiment.tracking): the config first, each
    stage's summary as it finishes, then the report's tables, plots and artefacts."""
    out = Path(out_dir)
    config.validate()  # every key, before the folder is touched or a model loads
    with exclusive_folder(out):  # a second run on the same folder would interleave its writes
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
    # Each stage loads the models it uses (pair.need) and frees the others; a finished stage loads nothing.
    pair = ResidentPair(config.base_model, config.thinking_model, device=config.device, dtype=config.dtype,
                        base_device=config.base_device, thinking_device=config.thinking_device,
                        device_map=config.device_map, log=log)
    check_layers(config, pair)
    train = load_benchmark(config.resolved_train_benchmark, config.train_split, config.n_train)
    evaluation = load_benchmark(config.benchmark, config.eval_split, config.n_eval)
    ground_truth = ground_truth_for(config.resolved_train_benchmark)
    labeller = ground_truth.label_reasoning if ground_truth is not None else None

    def thinking_train_traces() -> dict[str, Any]:
        records = generate_traces(plain_generator(config, pair, "thinking"), train, out / "traces" / "thinking_train",
                                  template=config.resolved_thinking_template, **trace_settings(config, "thinking"))
        return {"n": len(records), "accuracy": sum(r.correct for r in records) / len(records),
                "cut_off": sum(r.finish_reason == "length" for r in records)}

    def base_train_traces() -> dict[str, Any]:
        records = generate_traces(plain_generator(config, pair, "base"), train, out / "traces" / "base_train",
                                  template=config.resolved_base_template, **trace_settings(config, "base"))
        return {"n": len(records), "accuracy": sum(r.correct for r in records) / len(records),
                "cut_off": sum(r.finish_reason == "length" for r in records)}

    layers = config.activation_layers or default_activation_layers(pair.info("thinking").cfg.n_layers)

    def activations() -> dict[str, Any]:
        pair.need("thinking")
        manifest = extract_activations(
            pair.thinking, load_traces(out / "traces" / "thinking_train"), out / "activations",
            ActivationConfig(layers=layers, include_previous_token=config.include_previous_token,
                             batch_size=config.batch_size),
            labeller=labeller, progress=True,
        )
        return {"n_sentences": manifest.n_sentences, "layers": layers, "throughput": manifest.throughput}

    # Both thinking-model stages first, then the base model's: one load of each.
    state.run("traces_thinking_train", thinking_train_traces, log)
    state.run("activations", activations, log)
    state.run("traces_base_train", base_train_traces, log)

    def taxonomy() -> dict[str, Any]:
        Manifest.load(out / "activations").check_model(pair.info("thinking"), out / "activations")
        return _taxonomy_stage(config, out, layers)

    taxonomy_summary = state.run("taxonomy", taxonomy, log)

    steer_layer = (config.steer_layer if config.steer_layer is not None
                   else default_layer(pair.info("base").cfg.n_layers))

    def directions() -> dict[str, Any]:
        settings = DirectionSettings(method=config.direction_method, layer=steer_layer,
                                     optimisation=optimisation_config(config))
        pair.need(*(("base", "thinking") if settings.needs_thinking else ("base",)))
        checked_taxonomy(out, pair)
        raw_traces = load_traces(out / "traces" / "thinking_train")
        labels = taxonomy_labels(out / "taxonomy", traces=raw_traces)
        thinking_traces = frame_for_base(raw_traces, {p.id: p.question for p in train}, pair.base.tokenizer,
                                         config.resolved_base_template)
        base_traces = load_traces(out / "traces" / "base_train")
        result = build_directions(pair.base, thinking_traces, labels, settings, base_traces=base_traces,
                                  thinking=pair.thinking if settings.needs_thinking else None,
                                  provenance=directions_provenance(out, config.base_model, config.thinking_model),
                                  progress=log)
        result.save(out / "directions")
        return {"method": result.method, "layer": steer_layer, "behaviour_ids": result.behaviour_ids,
                "titles": result.titles, "norms": [round(float(n), 4) for n in result.norms],
                "bias_norm": None if result.bias is None else round(float(result.bias.norm()), 4)}

    state.run("directions", directions, log)

    setting = _run_tuning(config, state, pair, out, steer_layer, log)
    evaluations = _run_evaluations(config, state, pair, evaluation, out, steer_layer, setting, log)
    ablation_summary = _run_ablations(config, state, pair, out, log) if config.ablations else None
    pair.release()

    report = build_report(config, state, evaluations, taxonomy_summary, ablation_summary,
                          total_seconds=time.perf_counter() - started)
    write_report(report, out)
    return report


def directions_provenance(out: Path, base_spec: str, thinking_spec: str) -> dict[str, Any]:
    """Where a run's directions came from, as ``mechsteer directions`` records it for the same inputs."""
    return {"traces": str(out / "traces" / "thinking_train"), "base_traces": str(out / "traces" / "base_train"),
            "pair": [base_spec, thinking_spec]}


def plain_generator(config: RunConfig, pair: ResidentPair, role: Role) -> TransformerBridge | GenerationEngine:
    """What generates a model's plain traces and evaluations: the run's registered ``engine``
    (mechsteer.engines.registry), built on the model's bridge (loaded, the other model freed) or,
    for a server engine, on its tokenizer alone (every model freed)."""
    engine = engine_spec(config.engine)
    spec = config.base_model if role == "base" else config.thinking_model
    if engine.runs_on == "bridge":
        pair.need(role)
        model: TransformerBridge | None = pair.model(role)
    else:
        pair.need()
        model = None
    return engine.build(EngineInputs(
        model=model, tokenizer=load_tokenizer(spec) if model is None else model.tokenizer,
        model_name=spec_model_name(spec),
        url=(config.engine_url_base if role == "base" else None) or config.engine_url,
        server_model=(config.engine_model_base if role == "base" else config.engine_model_thinking) or spec,
        http=with_settings(timeout=config.engine_timeout, max_concurrency=config.engine_max_concurrency,
                           max_retries=config.engine_max_retries),
        return_token_ids=config.engine_return_token_ids))


def _generation_settings(config: RunConfig, role: str, max_new_tokens: int | None, temperature: float,
                         top_p: float) -> dict[str, Any]:
    """generate_traces' settings for one model: a length (default: ``max_new_tokens``), sampling, stops."""
    settings: dict[str, Any] = dict(max_new_tokens=max_new_tokens or config.max_new_tokens,
                                    batch_size=config.batch_size, progress=True,
                                    unclosed=config.unclosed_thinking)
    settings.update(_sampling(temperature, top_p, config.seed))
    if role == "base":
        settings["stop_strings"] = config.resolved_base_stop_strings
    return settings


def trace_settings(config: RunConfig, role: str) -> dict[str, Any]:
    """generate_traces' settings for the train traces of one model."""
    return _generation_settings(config, role, config.trace_max_new_tokens, config.trace_temperature,
                                config.trace_top_p)


def eval_settings(config: RunConfig, role: str) -> dict[str, Any]:
    """generate_traces' settings for a plain evaluation of one model."""
    return _generation_settings(config, role, config.eval_max_new_tokens, config.eval_temperature,
                                config.eval_top_p)


def _sampling(temperature: float, top_p: float, seed: int) -> dict[str, Any]:
    if temperature <= 0:
        return {}  # greedy: generate_traces' defaults, so that greedy traces resume as they were
    return {"do_sample": True, "temperature": temperature, "top_p": top_p if top_p < 1 else None, "seed": seed}


def check_layers(config: RunConfig, pair: ResidentPair) -> None:
    """The layers a config names exist in its models: checked from their configs, before any stage."""
    for key, layers, model in (("activation_layers", config.activation_layers or [], pair.info("thinking")),
                               ("steer_layer", [] if config.steer_layer is None else [config.steer_layer],
                                pair.info("base"))):
        missing = [layer for layer in layers if layer >= model.cfg.n_layers]
        if missing:
            raise ConfigError(f"{key}: layer(s) {missing} do not exist in {model.cfg.model_name!r}, which has "
                              f"{model.cfg.n_layers} layers (0 to {model.cfg.n_layers - 1})")


def checked_taxonomy(out: Path, pair: ResidentPair) -> Taxonomy:
    """The run's taxonomy, refused unless it was built on the thinking model (name, width, layer)."""
    taxonomy = Taxonomy.load(out / "taxonomy")
    taxonomy.check_model(pair.info("thinking"), out / "taxonomy")
    return taxonomy


def _taxonomy_stage(config: RunConfig, out: Path, layers: list[int]) -> dict[str, Any]:
    """Sweep layers x n_latents, keep the selected taxonomy, write its table and plots."""
    rows, best = sweep_to_folder(
        out / "activations", layers, config.n_latents, out / "taxonomy", judge_spec=config.judge,
        benchmark=config.resolved_train_benchmark, method=config.taxonomy_method, k=config.sae_k, seed=config.seed,
        normalise=tuple(config.normalise),
        judge_settings=JudgeSettings(timeout=config.judge_timeout, max_tokens=config.judge_max_tokens))
    metrics = asdict(best.metrics)
    return {"layer": best.provenance.layer, "n_behaviours": best.provenance.n_latents,
            "behaviours": [b.title for b in best.behaviours], "ari": metrics.get("ari"),
            "metrics": {key: value for key, value in metrics.items() if key != "sizes"},
            "sizes": metrics.get("sizes"), "sweep": rows}


def _run_tuning(config: RunConfig, state: RunState, pair: ResidentPair, out: Path, steer_layer: int,
                log: Callable[[str], None]) -> SteeringSetting:
    """The tuning stage (with ``tune_split``, mechsteer.experiment.tuning): the hybrid's setting
    chosen on the validation split; without it, the config's own setting."""
    split = config.tune_split
    if split is None:
        return chosen_setting(config, None)

    def body() -> dict[str, Any]:
        pair.need("base", "thinking")
        problems = load_benchmark(config.benchmark, split, config.n_tune)
        taxonomy = checked_taxonomy(out, pair)
        sae = taxonomy.load_sae()
        direction_set = DirectionSet.load(out / "directions")
        direction_set.check_model(pair.info("base"))
        hybrid_config = run_hybrid_config(config, steer_layer, taxonomy.provenance.layer)
        behaviour_ids = list(direction_set.behaviour_ids)

        def evaluate(setting: SteeringSetting, path: Path) -> list[dict[str, Any]]:
            return evaluate_hybrid(pair, problems, direction_set, hybrid_policy(config, sae, behaviour_ids, setting),
                                   with_setting(hybrid_config, setting), path,
                                   base_template=config.resolved_base_template,
                                   thinking_template=config.resolved_thinking_template, progress=log)

        return run_tuning(config, out, len(problems), evaluate, log)

    return chosen_setting(config, state.run("tuning", body, log))


def _run_evaluations(config: RunConfig, state: RunState, pair: ResidentPair, evaluation: list[Problem], out: Path,
                     steer_layer: int, setting: SteeringSetting, log: Callable[[str], None]) -> dict[str, Any]:
    def model_eval(role: Role, template: str) -> Callable[[], dict[str, Any]]:
        def body() -> dict[str, Any]:
            records = generate_traces(plain_generator(config, pair, role), evaluation, out / "eval" / role,
                                      template=template,
                                      **eval_settings(config, role))
            return {"correct": [bool(r.correct) for r in records],
                    "cut_off": sum(r.finish_reason == "length" for r in records)}
        return body

    state.run("eval_base", model_eval("base", config.resolved_base_template), log)
    state.run("eval_thinking", model_eval("thinking", config.resolved_thinking_template), log)

    taxonomy = checked_taxonomy(out, pair)
    sae = taxonomy.load_sae()
    direction_set = DirectionSet.load(out / "directions")
    direction_set.check_model(pair.info("base"))
    # the tuning stage's choice, else the config's coefficients, windows and threshold
    hybrid_config = with_setting(run_hybrid_config(config, steer_layer, taxonomy.provenance.layer), setting)
    behaviour_ids = list(direction_set.behaviour_ids)

    def hybrid_eval(name: str, policy: TimingPolicy, steering: DirectionSet,
                    **recorded: Any) -> Callable[[], dict[str, Any]]:
        def body() -> dict[str, Any]:
            pair.need("base", "thinking")
            records = evaluate_hybrid(pair, evaluation, steering, policy, hybrid_config,
                                      out / "eval" / name / "results.jsonl",
                                      base_template=config.resolved_base_template,
                                      thinking_template=config.resolved_thinking_template, progress=log)
            return {"correct": [bool(r["correct"]) for r in records],
                    "steered_fraction": sum(r["steered_fraction"] for r in records) / len(records),
                    "cut_off": sum(r.get("finish_reason") == "length" for r in records), **recorded}
        return body

    policy = hybrid_policy(config, sae, behaviour_ids, setting)
    hybrid = state.run("eval_hybrid", hybrid_eval("hybrid", policy, direction_set), log)
    results = {"base": state.summary("eval_base"), "thinking": state.summary("eval_thinking"), "hybrid": hybrid}
    for control in config.controls:
        if control in ("only_bias", "only_bias_replayed") and direction_set.bias is None:
            raise ValueError(f"the {control} control needs a bias direction; the direction set has none")
        if control == "only_bias":
            # the paper's control: the hybrid's own timing, the bias without behaviour directions
            body = hybrid_eval("only_bias", BiasOnlyPolicy(policy), direction_set)
        elif control == "only_bias_replayed":
            # the bias alone at exactly the tokens the hybrid steered, whatever the base model writes in between
            replay = ReplayPolicy(steered_positions(out / "eval" / "hybrid" / "results.jsonl"))
            body = hybrid_eval("only_bias_replayed", replay, direction_set)
        elif control == "random_firing":
            body = hybrid_eval("random_firing", RandomFiringPolicy(hybrid["steered_fraction"], behaviour_ids,
                                                                   seed=config.seed), direction_set)
        elif control == "random_vectors":
            # each random vector has the norm of what the hybrid adds for its behaviour: bias + direction
            body = hybrid_eval("random_vectors", hybrid_policy(config, sae, behaviour_ids, setting),
                               direction_set.random_like(config.seed, match="added"),
                               norm_matched_to="direction" if direction_set.bias is None else "bias + direction")
        else:
            raise ValueError(f"unknown control {control!r}; expected only_bias, only_bias_replayed, random_firing "
                             "or random_vectors")
        results[control] = state.run(f"eval_{control}", body, log)
    for baseline in config.baselines:
        if baseline == "first_token_only":
            # the hybrid allowed to steer at the first generated token only
            body = hybrid_eval(baseline, FirstTokenOnlyPolicy(policy), direction_set)
        elif baseline == "oracle_timing":
            oracle = oracle_timing_policy(config, out, pair, taxonomy)
            body = hybrid_eval(baseline, oracle, direction_set, behaviour_of_title=oracle.behaviour_of_title)
        else:
            raise ValueError(f"unknown baseline {baseline!r}; expected first_token_only or oracle_timing")
        results[baseline] = state.run(f"eval_{baseline}", body, log)
    return results


def oracle_timing_policy(config: RunConfig, out: Path, pair: ResidentPair, taxonomy: Taxonomy) -> TimingOraclePolicy:
    """The oracle-timing baseline's policy: steered where the benchmark's ground-truth timing oracle
    names a behaviour, with the latent that holds most of that behaviour's labelled train sentences."""
    ground_truth = ground_truth_for(config.benchmark)
    if ground_truth is None or ground_truth.timing_oracle is None:
        raise ConfigError(f"baseline oracle_timing needs a ground-truth timing oracle, which benchmark "
                          f"{config.benchmark!r} has none of")
    labels = sentence_labels(read_sentences(out / "activations"))
    if labels is None:
        raise ValueError(f"{out / 'activations'}: the sentences carry no ground-truth labels")
    holding = behaviour_holding_most(labels, taxonomy.assignments.tolist())
    behaviour_of_title = {str(title): cast(int, latent) for title, latent in holding.items()
                          if title in ground_truth.behaviours}

    def decode(ids: list[int]) -> str:
        return pair.base.tokenizer.decode(ids, skip_special_tokens=True)

    return TimingOraclePolicy(ground_truth.timing_oracle, decode, behaviour_of_title)


def _run_ablations(config: RunConfig, state: RunState, pair: ResidentPair, out: Path,
                   log: Callable[[str], None]) -> dict[str, Any]:
    def body() -> dict[str, Any]:
        pair.need("base", "thinking")
        direction_set = DirectionSet.load(out / "directions")
        direction_set.check_model(pair.base)
        checked_taxonomy(out, pair)
        raw_traces = load_traces(out / "traces" / "thinking_train")
        labels = taxonomy_labels(out / "taxonomy", traces=raw_traces)
        train = load_benchmark(config.resolved_train_benchmark, config.train_split, config.n_train)
        traces = frame_for_base(raw_traces, {p.id: p.question for p in train}, pair.base.tokenizer,
                                config.resolved_base_template)
        problems = load_benchmark(config.benchmark, config.eval_split, config.ablation_contexts)
        settings = AblationSettings(thinking_template=config.resolved_thinking_template,
                                    max_new_tokens=config.max_new_tokens, coeffs=tuple(config.coefficients),
                                    n_contexts=config.ablation_contexts, batch_size=config.batch_size, seed=config.seed)
        summary = run_ablations(pair.base, pair.thinking, direction_set, labels, traces, raw_traces, problems,
                                config.benchmark, settings, out / "ablations", progress=log)
        summary.pop("outputs")
        return summary

    return state.run("ablations", body, log)
