"""The end-to-end run: traces -> sentence activations -> taxonomy -> directions -> (tuning on a
validation split) -> hybrid evaluation (with controls) -> ablations -> report, for one model pair
and one benchmark.

The stages, their order, folders and models are declared once in
:mod:`mechsteer.experiment.layout`; this module binds each group of stages to its body (a function
of the :class:`RunContext` and the stage) and runs them in order. Every stage writes into its own
folder under the run's ``out`` directory and marks itself
done in ``stages.json`` only when finished (:class:`~mechsteer.experiment.state.RunState`); a
rerun skips finished stages, and the streaming stages (traces, activations, hybrid evaluations)
resume inside themselves, so an interrupted run picks up where it stopped and produces the same
report. A run folder belongs to one config: rerunning it with a different config is refused.

``mechsteer run --config experiments/<name>.yaml --out DIR`` runs a config file;
``mechsteer demo`` runs the embedded default (the organism pair on the organism task).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch

from mechsteer.activations import Manifest, pool_activations, read_sentences
from mechsteer.causal.stage import AblationSettings, run_ablations
from mechsteer.core.errors import ArtefactError, ConfigError, ProvenanceError
from mechsteer.core.models import ModelPair, spec_model_name
from mechsteer.core.provenance import weights_fingerprint
from mechsteer.core.resident import ResidentPair, Role
from mechsteer.core.store import append_jsonl, exclusive_folder, json_digest, write_jsonl_atomic
from mechsteer.data.benchmarks import Problem, load_benchmark
from mechsteer.data.labels import ground_truth_for
from mechsteer.data.prompts import render_prompt
from mechsteer.data.stage import TraceSettings, TracesSummary, run_traces
from mechsteer.data.traces import load_traces
from mechsteer.engines import EngineInputs, GenerationEngine, engine_spec, load_tokenizer
from mechsteer.engines.openai import with_settings
from mechsteer.experiment.config import RunConfig
from mechsteer.experiment.layout import (
    CORRECTION_CEILING,
    METHOD_EVAL,
    RunPaths,
    StageGroup,
    StageSpec,
)
from mechsteer.experiment.records import EvalSummary
from mechsteer.experiment.report import build_report, track_report, write_report
from mechsteer.experiment.settings import (
    activation_config,
    correction_config,
    default_activation_layers,
    optimisation_config,
    run_hybrid_config,
    taxonomy_settings,
)
from mechsteer.experiment.state import RunState, planned, validate_for
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
from mechsteer.hybrid.coefficients import CoefficientModel, CoefficientRule
from mechsteer.hybrid.comparisons import (
    ComparisonInputs,
    ComparisonRun,
    ComparisonVariants,
    build_comparison,
)
from mechsteer.hybrid.generator import HybridConfig
from mechsteer.hybrid.records import HybridRecord, read_hybrid_records, token_char_ends
from mechsteer.hybrid.timing import (
    BehaviourClassifier,
    TimingOraclePolicy,
    TimingPolicy,
    VectorsOnlyPolicy,
    top_latents,
)
from mechsteer.steering.correction import CorrectionVectors, train_correction_vectors
from mechsteer.steering.direction_set import DirectionSet
from mechsteer.steering.disagreements import (
    DisagreementSettings,
    StateLabels,
    collect_disagreements,
    load_disagreements,
)
from mechsteer.steering.framing import frame_for_base
from mechsteer.steering.labels import taxonomy_labels
from mechsteer.steering.mean import default_layer
from mechsteer.steering.stage import DirectionSettings, DirectionsSummary, build_directions
from mechsteer.taxonomy.artefact import Taxonomy
from mechsteer.taxonomy.metrics import behaviour_holding_most, sentence_labels
from mechsteer.taxonomy.stage import TaxonomySummary, build_taxonomy

if TYPE_CHECKING:
    from transformer_lens.model_bridge import TransformerBridge

# ------------------------------------------------------------------------------------------
# The hybrid evaluation (streamed per batch, resumable)


def evaluate_hybrid(
    pair: ModelPair | ResidentPair, problems: Sequence[Problem], directions: DirectionSet, policy: TimingPolicy,
    hybrid_config: HybridConfig, out_path: Path, *, base_template: str, thinking_template: str,
    progress: Callable[[str], None] = print, coefficient_model: CoefficientModel | None = None, prefix: str = "",
) -> list[HybridRecord]:
    """Run the hybrid on ``problems``, appending one JSON line per problem; resumes from the file. Both
    prompts end with ``prefix`` (a forced start of the generation, e.g. a first cue; not in the records)."""
    done = {record.problem_id for record in read_hybrid_records(out_path)}
    todo = [problem for problem in problems if problem.id not in done]
    for start in range(0, len(todo), hybrid_config.batch_size):
        batch = todo[start : start + hybrid_config.batch_size]
        base_prompts = [render_prompt(base_template, p.question, pair.base.tokenizer) + prefix for p in batch]
        thinking_prompts = [render_prompt(thinking_template, p.question, pair.thinking.tokenizer) + prefix
                            for p in batch]
        policy.bind([problem.id for problem in batch])
        # looked up on its module at each call, so that a test can replace it
        output = generator.hybrid_generate(pair.base, pair.thinking, base_prompts, thinking_prompts, directions, policy,
                                           hybrid_config, coefficient_model=coefficient_model)
        records = []
        for row, problem in enumerate(batch):
            prediction = extract_answer(output.texts[row], problem.benchmark)
            records.append(HybridRecord.from_generation(
                problem.id, output.texts[row], prediction, problem.answer,
                is_correct(prediction, problem.answer, problem.benchmark), output.token_logs[row],
                output.steered_fractions[row], output.finish_reasons[row],
                token_ends=token_char_ends(pair.base.tokenizer, output.token_ids[row], output.texts[row])).to_json())
        append_jsonl(out_path, records)
        progress(f"  hybrid {policy.name}: {len(done) + start + len(batch)}/{len(problems)}")
    by_id = {record.problem_id: record for record in read_hybrid_records(out_path)}
    return [by_id[problem.id] for problem in problems]


# ------------------------------------------------------------------------------------------
# The run


def run_pipeline(config: RunConfig, out_dir: str | Path, *, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run (or resume) every stage; write ``report.json`` and ``report.md``; return the report.

    With ``config.wandb`` on, the run is tracked (mechsteer.experiment.tracking): the config first, each
    stage's summary as it finishes, then the report's tables, plots and artefacts."""
    out = Path(out_dir)
    validate_for(config, out)  # every key, before the folder is touched or a model loads
    with exclusive_folder(out):  # a second run on the same folder would interleave its writes
        state = RunState(out, config)  # refuses a folder of another config before anything is logged
        state.tracker = open_tracker(config, out)
        try:
            report = _run_stages(config, state, log)
            track_report(state.tracker, report, out)
        except BaseException:
            state.tracker.finish(exit_code=1)
            raise
        state.tracker.finish()
    return report


@dataclass
class RunContext:
    """What every stage body of a run reads: its config, folder, models (loaded as stages need
    them), problems, and the layers it reads and steers."""

    config: RunConfig
    paths: RunPaths
    state: RunState
    pair: ResidentPair
    log: Callable[[str], None]
    train: list[Problem]
    evaluation: list[Problem]
    layers: list[int]  # where the thinking model's sentence activations are read
    steer_layer: int  # where the base model is steered

    def template(self, role: Role) -> str:
        return self.config.resolved_base_template if role == "base" else self.config.resolved_thinking_template

    def setting(self) -> SteeringSetting:
        """The hybrid's setting: the tuning stage's choice, else the config's own."""
        tuned = self.state.summary("tuning") if self.state.done("tuning") else None
        return chosen_setting(self.config, tuned)


StageBody = Callable[[RunContext, StageSpec], dict[str, Any]]


def _run_stages(config: RunConfig, state: RunState, log: Callable[[str], None]) -> dict[str, Any]:
    if config.threads:
        torch.set_num_threads(config.threads)
    started = time.perf_counter()
    # Each stage loads the models it uses (pair.need) and frees the others; a finished stage loads nothing.
    pair = ResidentPair(config.base_model, config.thinking_model, device=config.device, dtype=config.dtype,
                        base_device=config.base_device, thinking_device=config.thinking_device,
                        device_map=config.device_map, log=log)
    check_layers(config, pair)
    context = RunContext(
        config=config, paths=state.paths, state=state, pair=pair, log=log,
        train=load_benchmark(config.resolved_train_benchmark, config.train_split, config.n_train),
        evaluation=load_benchmark(config.benchmark, config.eval_split, config.n_eval),
        layers=config.activation_layers or default_activation_layers(pair.info("thinking").cfg.n_layers),
        steer_layer=(config.steer_layer if config.steer_layer is not None
                     else default_layer(pair.info("base").cfg.n_layers)))
    for spec in planned(config):
        state.run(spec.name, functools.partial(STAGE_BODIES[spec.group], context, spec), log)
    pair.release()

    evaluations = {spec.name.removeprefix("eval_"): EvalSummary.from_json(state.summary(spec.name), spec.name)
                   for spec in planned(config) if spec.group in ("plain_eval", "hybrid_eval")}
    report = build_report(config, state, evaluations, TaxonomySummary.from_json(state.summary("taxonomy")),
                          state.summary("ablations") if config.ablations else None,
                          total_seconds=time.perf_counter() - started)
    write_report(report, state.out)
    return report


# ------------------------------------------------------------------------------------------
# The stage bodies, one per group of mechsteer.experiment.layout's table


def train_traces_stage(run: RunContext, spec: StageSpec) -> dict[str, Any]:
    (role,) = spec.models
    records = run_traces(plain_generator(run.config, run.pair, role), run.train, run.paths.stage(spec.name),
                         template=run.template(role), settings=trace_settings(run.config, role))
    return TracesSummary.of(records).to_json()


def activations_stage(run: RunContext, spec: StageSpec) -> dict[str, Any]:
    run.pair.need(*spec.models)
    manifest = pool_activations(run.pair.thinking, load_traces(run.paths.train_traces("thinking")),
                                run.paths.activations, activation_config(run.config, run.layers))
    return {"n_sentences": manifest.n_sentences, "layers": run.layers, "throughput": manifest.throughput}


def taxonomy_stage(run: RunContext, spec: StageSpec) -> dict[str, Any]:
    """Sweep layers x n_latents, keep the selected taxonomy, write its table and plots."""
    config = run.config
    Manifest.load(run.paths.activations).check_model(run.pair.info("thinking"), run.paths.activations)
    rows, best = build_taxonomy(run.paths.activations, run.paths.taxonomy, taxonomy_settings(config, run.layers))
    return TaxonomySummary.of(best, rows).to_json()


def directions_stage(run: RunContext, spec: StageSpec) -> dict[str, Any]:
    config, pair, paths = run.config, run.pair, run.paths
    settings = DirectionSettings(method=config.direction_method, layer=run.steer_layer,
                                 optimisation=optimisation_config(config))
    pair.need(*(("base", "thinking") if settings.needs_thinking else spec.models))
    checked_taxonomy(paths, pair)
    raw_traces = load_traces(paths.train_traces("thinking"))
    labels = taxonomy_labels(paths.taxonomy, traces=raw_traces)
    thinking_traces = frame_for_base(raw_traces, {p.id: p.question for p in run.train}, pair.base.tokenizer,
                                     config.resolved_base_template)
    result = build_directions(pair.base, thinking_traces, labels, settings,
                              base_traces=load_traces(paths.train_traces("base")),
                              thinking=pair.thinking if settings.needs_thinking else None,
                              provenance=directions_provenance(paths.root, config.base_model, config.thinking_model),
                              progress=run.log)
    result.save(paths.directions)
    return DirectionsSummary.of(result, run.steer_layer).to_json()


def state_labels(config: RunConfig, taxonomy: Taxonomy) -> StateLabels:
    """Disagreement positions labelled as the run's policy will read the thinking model there: the SAE's
    top behaviour of the activation its ``policy_read`` names."""
    sae, ids = taxonomy.load_sae(), taxonomy.behaviour_ids
    return StateLabels(label=lambda acts: top_latents(sae, acts, ids, 1)[1][:, 0], layer=taxonomy.provenance.layer,
                       read=config.policy_read, digest=json_digest({"sae": weights_fingerprint(sae), "ids": ids}))


def correction_stage(run: RunContext, spec: StageSpec) -> dict[str, Any]:
    """The paper's current method (mechsteer.steering.correction): the disagreement positions of the
    thinking traces, then the correction vectors and coefficient MLP trained there."""
    config, pair, paths = run.config, run.pair, run.paths
    pair.need(*spec.models)
    taxonomy = checked_taxonomy(paths, pair)
    if spec.name == "disagreements":
        raw_traces = load_traces(paths.train_traces("thinking"))
        framed = frame_for_base(raw_traces, {p.id: p.question for p in run.train}, pair.base.tokenizer,
                                config.resolved_base_template)
        cache = collect_disagreements(pair.base, pair.thinking, raw_traces, framed,
                                      state_labels(config, taxonomy) if config.correction_labels == "state"
                                      else taxonomy_labels(paths.taxonomy, traces=raw_traces),
                                      DisagreementSettings(layer=run.steer_layer, top_k=config.correction_top_k),
                                      paths.disagreements, progress=run.log)
        assert cache is not None  # None only when told to stop early
        return {"layer": run.steer_layer, "top_k": config.correction_top_k, "n_positions": cache.n_positions,
                "positions_per_behaviour": {str(b): n for b, n in sorted(cache.positions_per_behaviour().items())}}
    trained = train_correction_vectors(pair.base, load_disagreements(paths.disagreements),
                                       {behaviour.id: behaviour.title for behaviour in taxonomy.behaviours},
                                       correction_config(config), progress=run.log)
    trained.save(paths.correction_vectors)
    report = trained.report
    return {**DirectionsSummary.of(trained.directions, run.steer_layer).to_json(),
            "coefficient": "none" if trained.mlp is None else "mlp", "chosen_seed": report.chosen_seed,
            "unsteered_val_kl": round(report.unsteered_val_kl, 4), "best_val_kl": round(report.best_val_kl, 4),
            "seeds_val_kl": {str(seed.seed): round(seed.best_val_kl, 4) for seed in report.seeds}}


@dataclass(frozen=True)
class HybridInputs:
    """The run's finished taxonomy and directions, as every hybrid evaluation steers with them."""

    taxonomy: Taxonomy
    sae: BehaviourClassifier
    directions: DirectionSet
    hybrid_config: HybridConfig  # the config's, before the tuning stage's setting is applied

    @property
    def behaviour_ids(self) -> list[int]:
        return list(self.directions.behaviour_ids)


def hybrid_inputs(run: RunContext) -> HybridInputs:
    """The run's taxonomy (built on the thinking model) and directions (built on the base model)."""
    taxonomy = checked_taxonomy(run.paths, run.pair)
    directions = DirectionSet.load(run.paths.directions)
    directions.check_model(run.pair.info("base"))
    check_steer_layer(run, directions.layer, run.paths.directions, "directions", "directions")
    if taxonomy.provenance.layer not in run.layers:
        raise ProvenanceError(f"{run.paths.taxonomy} reads the thinking model's layer {taxonomy.provenance.layer}, "
                              f"which is not among this run's activation_layers {run.layers}: it was built by "
                              "another run; rebuild it (delete the 'taxonomy' entry of stages.json)")
    return HybridInputs(taxonomy, taxonomy.load_sae(), directions,
                        run_hybrid_config(run.config, run.steer_layer, taxonomy.provenance.layer))


def check_steer_layer(run: RunContext, layer: int, folder: Path, stage: str, what: str) -> None:
    """A steering artefact (``what``) was built at the run's ``steer_layer`` (else it is another run's)."""
    if layer != run.steer_layer:
        raise ProvenanceError(f"{folder} holds {what} at the base model's layer {layer}, but this run steers at "
                              f"layer {run.steer_layer} (steer_layer): they were built by another run; rebuild "
                              f"them (delete the {stage!r} entry of stages.json)")


def tuning_stage(run: RunContext, spec: StageSpec) -> dict[str, Any]:
    """The hybrid's setting chosen on the validation split (mechsteer.experiment.tuning)."""
    config = run.config
    run.pair.need(*spec.models)
    assert config.tune_split is not None  # the stage is planned only with a tune_split
    problems = load_benchmark(config.benchmark, config.tune_split, config.n_tune)
    inputs = hybrid_inputs(run)

    def evaluate(setting: SteeringSetting, path: Path) -> list[HybridRecord]:
        return evaluate_hybrid(run.pair, problems, inputs.directions,
                               hybrid_policy(config, inputs.sae, inputs.behaviour_ids, setting),
                               with_setting(inputs.hybrid_config, setting), path,
                               base_template=config.resolved_base_template,
                               thinking_template=config.resolved_thinking_template, progress=run.log)

    return run_tuning(config, run.paths, len(problems), evaluate, run.log).to_json()


def plain_eval_stage(run: RunContext, spec: StageSpec) -> dict[str, Any]:
    (role,) = spec.models
    records = run_traces(plain_generator(run.config, run.pair, role), run.evaluation, run.paths.stage(spec.name),
                         template=run.template(role), settings=eval_settings(run.config, role))
    return EvalSummary(correct=[bool(r.correct) for r in records],
                       cut_off=sum(r.finish_reason == "length" for r in records)).to_json()


@dataclass(frozen=True)
class SteeringInputs:
    """What one method's evaluations steer with (the hybrid's sentence directions or the correction
    vectors): its directions, a fresh timing policy per call, its generation settings, its coefficient
    model (the learned rule's), and what its stage summaries record of them."""

    directions: DirectionSet
    make_policy: Callable[[], TimingPolicy]
    hybrid_config: HybridConfig
    coefficient_model: CoefficientModel | None = None
    recorded: dict[str, Any] = dataclasses.field(default_factory=dict)


def sentence_steering(run: RunContext) -> SteeringInputs:
    """The hybrid's: the run's directions and timing policy at the tuned (or the config's) setting."""
    inputs, setting = hybrid_inputs(run), run.setting()
    return SteeringInputs(inputs.directions,
                          lambda: hybrid_policy(run.config, inputs.sae, inputs.behaviour_ids, setting),
                          with_setting(inputs.hybrid_config, setting))


def correction_steering(run: RunContext, *, ceiling: bool = False) -> SteeringInputs:
    """The correction vectors steering at the current position, timed by the run's policy (a state naming
    a behaviour without a vector is not steered), the coefficient from the trained MLP or a rule over the
    grid. The ceiling picks, among multiples of each vector's mean learned coefficient, the smallest whose
    token is the thinking model's (it reads the answer: an upper bound, never a result)."""
    config = run.config
    taxonomy = checked_taxonomy(run.paths, run.pair)
    trained = CorrectionVectors.load(run.paths.correction_vectors)
    trained.directions.check_model(run.pair.info("base"))
    check_steer_layer(run, trained.directions.layer, run.paths.correction_vectors, "disagreements", "vectors")
    rule: CoefficientRule = "think_top1_match" if ceiling else config.correction_coefficient_rule
    if rule == "learned" and trained.mlp is None:
        raise ConfigError("correction_coefficient_rule: learned needs the coefficient MLP, but the vectors were "
                          "trained without one (correction: {coefficient: none}); choose guardrail or kl_topk")
    directions = trained.directions
    grid = (1.0,) if rule == "learned" else tuple(config.coefficients)
    if ceiling:
        directions, grid = trained.at_learned_scale(), tuple(config.correction_ceiling_coefficients)
    hybrid_config = dataclasses.replace(
        run_hybrid_config(config, run.steer_layer, taxonomy.provenance.layer), coefficients=grid, windows=(1,),
        coefficient_rule=rule, cache_mode=config.correction_cache_mode, kl_top_k=config.correction_top_k)
    sae, ids, setting = taxonomy.load_sae(), list(directions.behaviour_ids), run.setting()
    return SteeringInputs(
        directions, lambda: VectorsOnlyPolicy(hybrid_policy(config, sae, taxonomy.behaviour_ids, setting), ids),
        hybrid_config, trained.mlp if rule == "learned" else None,
        {"coefficient_rule": rule, "cache_mode": config.correction_cache_mode})


def hybrid_eval_stage(run: RunContext, spec: StageSpec) -> dict[str, Any]:
    """A method's evaluation on the eval split (the hybrid, the correction vectors and their ceiling), or
    one of its controls or baselines (mechsteer.hybrid.comparisons) at its steering."""
    config = run.config
    steering = (sentence_steering(run) if spec.method == "hybrid"
                else correction_steering(run, ceiling=spec.name == CORRECTION_CEILING))
    name = spec.name.removeprefix("eval_")
    if spec.comparison is None:
        comparison = ComparisonRun(steering.make_policy(), steering.directions)
    else:
        own = METHOD_EVAL[spec.method]
        reference = EvalSummary.from_json(run.state.summary(own), own)
        if reference.steered_fraction is None:  # a comparison is matched to its method's steering
            raise ArtefactError(f"{run.paths.stages_file}: the {own} summary records no steered_fraction; "
                                f"delete its {own!r} entry to evaluate it again")
        ground_truth = ground_truth_for(config.benchmark)
        oracle = ground_truth.timing_oracle if ground_truth is not None and spec.method == "hybrid" else None
        built = build_comparison(spec.comparison, ComparisonInputs(
            policy=steering.make_policy(), make_policy=steering.make_policy, directions=steering.directions,
            behaviour_ids=list(steering.directions.behaviour_ids), seed=config.seed,
            steered_fraction=reference.steered_fraction,
            hybrid_records=lambda: read_hybrid_records(run.paths.hybrid_results(own.removeprefix("eval_"))),
            timing_oracle=None if oracle is None else lambda: oracle_timing_policy(run, checked_taxonomy(run.paths,
                                                                                                         run.pair))))
        if isinstance(built, ComparisonVariants):
            return variants_eval(run, spec, name, built, steering)
        comparison = built
    run.pair.need(*spec.models)
    records = evaluate_comparison(run, comparison, steering, run.paths.hybrid_results(name))
    return EvalSummary.of_hybrid(records, {**steering.recorded, **comparison.recorded}).to_json()


def evaluate_comparison(run: RunContext, comparison: ComparisonRun, steering: SteeringInputs,
                        out_path: Path) -> list[HybridRecord]:
    """A method's evaluation with a comparison's policy, directions and settings, streamed to ``out_path``."""
    config = run.config
    hybrid_config = (steering.hybrid_config if comparison.configure is None
                     else comparison.configure(steering.hybrid_config))
    return evaluate_hybrid(run.pair, run.evaluation, comparison.directions, comparison.policy, hybrid_config,
                           out_path, base_template=config.resolved_base_template,
                           thinking_template=config.resolved_thinking_template, progress=run.log,
                           coefficient_model=steering.coefficient_model, prefix=config.eval_prefix)


def variants_eval(run: RunContext, spec: StageSpec, name: str, variants: ComparisonVariants,
                  steering: SteeringInputs) -> dict[str, Any]:
    """Each variant of a comparison evaluated in turn (each resumable in its own folder); the most accurate
    (the first on ties) is the comparison's result, its records copied to the stage's results file."""
    run.pair.need(*spec.models)
    evaluated: dict[str, list[HybridRecord]] = {}
    for variant, comparison in variants.runs.items():
        run.log(f"  {name}: variant {variant}")
        evaluated[variant] = evaluate_comparison(run, comparison, steering, run.paths.variant_results(name, variant))
    summaries = {variant: EvalSummary.of_hybrid(records, variants.runs[variant].recorded)
                 for variant, records in evaluated.items()}
    chosen = max(summaries, key=lambda variant: sum(summaries[variant].correct))  # max keeps the first on ties
    write_jsonl_atomic(run.paths.hybrid_results(name), [record.to_json() for record in evaluated[chosen]])
    recorded = {**steering.recorded, **variants.runs[chosen].recorded, "chosen_variant": chosen,
                "variants": {variant: {"accuracy": sum(summary.correct) / len(summary.correct),
                                       "steered_fraction": summary.steered_fraction, **summary.recorded}
                             for variant, summary in summaries.items()}}
    return EvalSummary.of_hybrid(evaluated[chosen], recorded).to_json()


def ablations_stage(run: RunContext, spec: StageSpec) -> dict[str, Any]:
    config, pair, paths = run.config, run.pair, run.paths
    pair.need(*spec.models)
    direction_set = DirectionSet.load(paths.directions)
    direction_set.check_model(pair.base)
    checked_taxonomy(paths, pair)
    raw_traces = load_traces(paths.train_traces("thinking"))
    labels = taxonomy_labels(paths.taxonomy, traces=raw_traces)
    traces = frame_for_base(raw_traces, {p.id: p.question for p in run.train}, pair.base.tokenizer,
                            config.resolved_base_template)
    problems = load_benchmark(config.benchmark, config.eval_split, config.ablation_contexts)
    settings = AblationSettings(thinking_template=config.resolved_thinking_template,
                                max_new_tokens=config.max_new_tokens, coeffs=tuple(config.coefficients),
                                n_contexts=config.ablation_contexts, batch_size=config.batch_size, seed=config.seed)
    summary = run_ablations(pair.base, pair.thinking, direction_set, labels, traces, raw_traces, problems,
                            config.benchmark, settings, paths.ablations, progress=run.log)
    summary.pop("outputs")
    return summary


STAGE_BODIES: dict[StageGroup, StageBody] = {
    "train_traces": train_traces_stage, "activations": activations_stage, "taxonomy": taxonomy_stage,
    "directions": directions_stage, "correction": correction_stage, "tuning": tuning_stage, "plain_eval": plain_eval_stage,
    "hybrid_eval": hybrid_eval_stage, "ablations": ablations_stage,
}


def directions_provenance(out: Path, base_spec: str, thinking_spec: str) -> dict[str, Any]:
    """Where a run's directions came from, as ``mechsteer directions`` records it for the same inputs."""
    paths = RunPaths(out)
    return {"traces": str(paths.train_traces("thinking")), "base_traces": str(paths.train_traces("base")),
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


def _trace_settings(config: RunConfig, role: Role, max_new_tokens: int | None, temperature: float,
                    top_p: float) -> TraceSettings:
    """One model's generation settings: a length (default: ``max_new_tokens``), sampling, stops."""
    return TraceSettings(max_new_tokens=max_new_tokens or config.max_new_tokens, batch_size=config.batch_size,
                         temperature=temperature, top_p=top_p, seed=config.seed,
                         stop_strings=config.resolved_base_stop_strings if role == "base" else None,
                         unclosed=config.unclosed_thinking)


def trace_settings(config: RunConfig, role: Role) -> TraceSettings:
    """The settings of one model's train traces."""
    return _trace_settings(config, role, config.trace_max_new_tokens, config.trace_temperature, config.trace_top_p)


def eval_settings(config: RunConfig, role: Role) -> TraceSettings:
    """The settings of one model's plain evaluation."""
    return _trace_settings(config, role, config.eval_max_new_tokens, config.eval_temperature, config.eval_top_p)


def check_layers(config: RunConfig, pair: ResidentPair) -> None:
    """The layers a config names exist in its models: checked from their configs, before any stage."""
    for key, layers, model in (("activation_layers", config.activation_layers or [], pair.info("thinking")),
                               ("steer_layer", [] if config.steer_layer is None else [config.steer_layer],
                                pair.info("base"))):
        missing = [layer for layer in layers if layer >= model.cfg.n_layers]
        if missing:
            raise ConfigError(f"{key}: layer(s) {missing} do not exist in {model.cfg.model_name!r}, which has "
                              f"{model.cfg.n_layers} layers (0 to {model.cfg.n_layers - 1})")


def checked_taxonomy(paths: RunPaths, pair: ResidentPair) -> Taxonomy:
    """The run's taxonomy, refused unless it was built on the thinking model (name, width, layer)."""
    taxonomy = Taxonomy.load(paths.taxonomy)
    taxonomy.check_model(pair.info("thinking"), paths.taxonomy)
    return taxonomy


def oracle_timing_policy(run: RunContext, taxonomy: Taxonomy) -> TimingOraclePolicy:
    """The oracle-timing baseline's policy: steered where the benchmark's ground-truth timing oracle
    names a behaviour, with the latent that holds most of that behaviour's labelled train sentences."""
    ground_truth = ground_truth_for(run.config.benchmark)
    if ground_truth is None or ground_truth.timing_oracle is None:
        raise ConfigError(f"baseline oracle_timing needs a ground-truth timing oracle, which benchmark "
                          f"{run.config.benchmark!r} has none of")
    labels = sentence_labels(read_sentences(run.paths.activations))
    if labels is None:
        raise ValueError(f"{run.paths.activations}: the sentences carry no ground-truth labels")
    pair = run.pair
    holding = behaviour_holding_most(labels, taxonomy.assignments.tolist())
    behaviour_of_title = {str(title): cast(int, latent) for title, latent in holding.items()
                          if title in ground_truth.behaviours}

    def decode(ids: list[int]) -> str:
        return pair.base.tokenizer.decode(ids, skip_special_tokens=True)

    return TimingOraclePolicy(ground_truth.timing_oracle, decode, behaviour_of_title)
