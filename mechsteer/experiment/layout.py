"""A run's stages and its folder's layout, declared once.

:data:`STAGE_TABLE` lists the stages of a run in the order they run, each with its folder (relative
to the run folder), the models it loads on the bridge, its group (what its body is:
:mod:`mechsteer.experiment.stages` binds one body per group), whether it resumes inside its folder
(streamed records), and whether the sweep points of the same upstream settings share it. The hybrid evaluations of a run's controls and baselines are stages
of the ``hybrid_eval`` group named ``eval_<name>`` (:func:`hybrid_eval_stage`). Everything else
reads this table: the pipeline's order (:func:`planned_stages`), the config keys' stage names
(:mod:`mechsteer.experiment.keys`), the report's expected stages, the folders a resumed stage
clears, a sweep's shared stages, and :class:`RunPaths`, the one place a run folder's paths are spelt.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from mechsteer.hybrid.comparisons import BUILT_IN_COMPARISONS, COMPARISONS

Role = Literal["base", "thinking"]
StageGroup = Literal["train_traces", "activations", "taxonomy", "directions", "correction", "tuning", "plain_eval",
                     "hybrid_eval", "ablations"]
# What a hybrid evaluation steers with: the sentence directions (the hybrid) or the correction vectors.
SteeringMethod = Literal["hybrid", "correction"]


@dataclass(frozen=True)
class StageSpec:
    name: str
    folder: str  # relative to the run folder
    group: StageGroup
    models: tuple[Role, ...]  # loaded when it runs on the bridge
    streamed: bool = False  # resumes inside its folder (records appended as they finish)
    # reads no key a sweep varies downstream (mechsteer.experiment.keys): the sweep points of the same
    # upstream keys share it
    shared: bool = False
    when: Literal["always", "tuning", "correction", "ablations"] = "always"  # the config switch that plans it
    reads: tuple[str, ...] = ()  # the stages whose folders its body reads (checked unchanged before it runs)
    # of a hybrid evaluation: the method it steers with, and the control or baseline it evaluates (None:
    # the method's own evaluation)
    method: SteeringMethod = "hybrid"
    comparison: str | None = None


HYBRID_EVAL = "eval_hybrid"
REPORT_STAGE = "report"  # done when report.json is written (not a stage of the table: the run's last step)

STEERING_INPUTS = ("taxonomy", "directions")  # what the hybrid steers with (its SAE carries the centring mean)
CORRECTION_EVAL, CORRECTION_CEILING = "eval_correction", "eval_correction_ceiling"
CORRECTION_INPUTS = ("taxonomy", "correction_vectors")
# Each method's own evaluation (its controls are matched to it) and the stages it steers with.
METHOD_EVAL: dict[SteeringMethod, str] = {"hybrid": HYBRID_EVAL, "correction": CORRECTION_EVAL}
METHOD_INPUTS: dict[SteeringMethod, tuple[str, ...]] = {"hybrid": STEERING_INPUTS, "correction": CORRECTION_INPUTS}
STAGE_TABLE: tuple[StageSpec, ...] = (
    StageSpec("traces_thinking_train", "traces/thinking_train", "train_traces", ("thinking",), streamed=True,
              shared=True),
    StageSpec("activations", "activations", "activations", ("thinking",), streamed=True, shared=True,
              reads=("traces_thinking_train",)),
    StageSpec("traces_base_train", "traces/base_train", "train_traces", ("base",), streamed=True, shared=True),
    StageSpec("taxonomy", "taxonomy", "taxonomy", (), shared=True, reads=("activations",)),
    StageSpec("directions", "directions", "directions", ("base",), shared=True,
              reads=("traces_thinking_train", "traces_base_train", "taxonomy")),
    # the paper's current method (mechsteer.steering.correction): vectors trained where the models disagree
    StageSpec("disagreements", "correction/disagreements", "correction", ("base", "thinking"), streamed=True,
              shared=True, when="correction", reads=("traces_thinking_train", "taxonomy")),
    StageSpec("correction_vectors", "correction/vectors", "correction", ("base",), shared=True, when="correction",
              reads=("disagreements",)),
    StageSpec("tuning", "tuning", "tuning", ("base", "thinking"), streamed=True, when="tuning", reads=STEERING_INPUTS),
    StageSpec("eval_base", "eval/base", "plain_eval", ("base",), streamed=True, shared=True),
    StageSpec("eval_thinking", "eval/thinking", "plain_eval", ("thinking",), streamed=True, shared=True),
    StageSpec(HYBRID_EVAL, "eval/hybrid", "hybrid_eval", ("base", "thinking"), streamed=True, reads=STEERING_INPUTS),
    # the correction vectors steering the base model, and their oracle ceiling (an upper bound, not a result)
    StageSpec(CORRECTION_EVAL, "eval/correction", "hybrid_eval", ("base", "thinking"), streamed=True,
              when="correction", reads=CORRECTION_INPUTS, method="correction"),
    StageSpec(CORRECTION_CEILING, "eval/correction_ceiling", "hybrid_eval", ("base", "thinking"), streamed=True,
              when="correction", reads=CORRECTION_INPUTS, method="correction"),
    StageSpec("ablations", "ablations", "ablations", ("base", "thinking"), when="ablations",
              reads=("traces_thinking_train", "taxonomy", "directions")),
)
# Where the controls' and baselines' evaluations run: after the hybrid's, before the ablations.
_BEFORE_ABLATIONS = len(STAGE_TABLE) - 1



_CORRECTION_PREFIX = "correction_"  # a comparison of the correction vectors: eval_correction_<name>


def hybrid_eval_stage(name: str, method: SteeringMethod = "hybrid") -> StageSpec:
    """The evaluation stage of a control or baseline ``name`` of a method: ``eval_<name>`` of the hybrid,
    ``eval_correction_<name>`` of the correction vectors."""
    label = name if method == "hybrid" else _CORRECTION_PREFIX + name
    # the method's own records (the replay, its rate) and, for the oracle baseline, the activations'
    # sentence labels: what any comparison may read of the method's inputs
    return StageSpec(f"eval_{label}", f"eval/{label}", "hybrid_eval", ("base", "thinking"), streamed=True,
                     when="always" if method == "hybrid" else "correction",
                     reads=(*METHOD_INPUTS[method], METHOD_EVAL[method], "activations"),
                     method=method, comparison=name)


def planned_stages(*, tuning: bool, comparisons: Sequence[str], ablations: bool, correction: bool = False,
                   correction_comparisons: Sequence[str] = ()) -> list[StageSpec]:
    """The stages a run does, in order: the table's, with the tuning, correction-vector and ablations
    stages when switched on, and one evaluation per control and baseline after its method's own."""
    switched = {"always": True, "tuning": tuning, "correction": correction, "ablations": ablations}
    fixed = [spec for spec in STAGE_TABLE if switched[spec.when]]
    at = next(index for index, spec in enumerate(fixed) if spec.name == HYBRID_EVAL) + 1
    planned = [*fixed[:at], *(hybrid_eval_stage(name) for name in comparisons), *fixed[at:]]
    if correction:
        at = next(index for index, spec in enumerate(planned) if spec.name == CORRECTION_CEILING) + 1
        planned[at:at] = [hybrid_eval_stage(name, "correction") for name in correction_comparisons]
    return planned


# The built-in controls the correction vectors can run (they have no bias to steer).
_CORRECTION_CONTROLS = tuple(name for name in BUILT_IN_COMPARISONS
                             if COMPARISONS.get(name).kind == "control" and not COMPARISONS.get(name).needs_bias)
# Every stage a config key can name: the table's and the built-in comparisons' evaluations of both
# methods (the config keys that only some of them read name them: the seed).
ALL_STAGES: tuple[StageSpec, ...] = (*STAGE_TABLE[:_BEFORE_ABLATIONS],
                                     *(hybrid_eval_stage(name) for name in BUILT_IN_COMPARISONS),
                                     *(hybrid_eval_stage(name, "correction") for name in _CORRECTION_CONTROLS),
                                     *STAGE_TABLE[_BEFORE_ABLATIONS:])
_BY_NAME = {spec.name: spec for spec in ALL_STAGES}


def stage_spec(name: str) -> StageSpec:
    """A stage by name; ``eval_<name>`` (``eval_correction_<name>``) of a plug-in control or baseline is
    an evaluation of the hybrid (of the correction vectors)."""
    if name in _BY_NAME:
        return _BY_NAME[name]
    if name.startswith("eval_" + _CORRECTION_PREFIX):
        return hybrid_eval_stage(name.removeprefix("eval_" + _CORRECTION_PREFIX), "correction")
    if name.startswith("eval_"):
        return hybrid_eval_stage(name.removeprefix("eval_"))
    raise KeyError(f"unknown stage {name!r}; stages: {[spec.name for spec in ALL_STAGES]}")


def stage_names(group: StageGroup) -> tuple[str, ...]:
    """The names of a group's stages (built-in comparisons included)."""
    return tuple(spec.name for spec in ALL_STAGES if spec.group == group)


SHARED_STAGES: tuple[str, ...] = tuple(spec.name for spec in STAGE_TABLE if spec.shared)

STAGES_FILE = "stages.json"
CONFIG_FILE = "config.json"
REPORT_JSON = "report.json"
REPORT_MD = "report.md"
VIEWER_HTML = "viewer.html"  # every problem's generations, the steered tokens marked (mechsteer.experiment.viewer)
RESULTS_FILE = "results.jsonl"  # a hybrid evaluation's per-problem records
SHARED_FROM_FILE = "shared_from.json"


@dataclass(frozen=True)
class RunPaths:
    """Every path inside a run folder."""

    root: Path

    def stage(self, name: str) -> Path:
        """A stage's folder."""
        return self.root / stage_spec(name).folder

    @property
    def stages_file(self) -> Path:
        return self.root / STAGES_FILE

    @property
    def config_file(self) -> Path:
        return self.root / CONFIG_FILE

    @property
    def report_json(self) -> Path:
        return self.root / REPORT_JSON

    @property
    def report_md(self) -> Path:
        return self.root / REPORT_MD

    @property
    def viewer(self) -> Path:
        return self.root / VIEWER_HTML

    @property
    def shared_from(self) -> Path:
        return self.root / SHARED_FROM_FILE

    def train_traces(self, role: Role) -> Path:
        return self.stage(f"traces_{role}_train")

    @property
    def activations(self) -> Path:
        return self.stage("activations")

    @property
    def taxonomy(self) -> Path:
        return self.stage("taxonomy")

    @property
    def directions(self) -> Path:
        return self.stage("directions")

    @property
    def disagreements(self) -> Path:
        return self.stage("disagreements")

    @property
    def correction_vectors(self) -> Path:
        return self.stage("correction_vectors")

    @property
    def tuning(self) -> Path:
        return self.stage("tuning")

    @property
    def ablations(self) -> Path:
        return self.stage("ablations")

    def plain_eval(self, role: Role) -> Path:
        return self.stage(f"eval_{role}")

    def hybrid_results(self, name: str = "hybrid") -> Path:
        """A hybrid evaluation's per-problem records (``hybrid``, a control or a baseline; of a comparison
        with variants, its chosen variant's)."""
        return self.stage(f"eval_{name}") / RESULTS_FILE

    def variant_results(self, name: str, variant: str) -> Path:
        """The per-problem records of one variant of a comparison (mechsteer.hybrid.comparisons.ComparisonVariants)."""
        return self.stage(f"eval_{name}") / "variants" / variant / RESULTS_FILE

    def tuning_results(self, candidate: str) -> Path:
        """A tuning candidate's per-problem records."""
        return self.tuning / candidate / RESULTS_FILE

    def relative(self, path: Path) -> str:
        """``path`` as recorded inside the run folder: relative to it."""
        return path.relative_to(self.root).as_posix()


__all__ = ["CORRECTION_CEILING", "CORRECTION_EVAL", "ALL_STAGES", "CONFIG_FILE", "HYBRID_EVAL", "METHOD_EVAL", "METHOD_INPUTS", "REPORT_JSON", "REPORT_MD",
           "REPORT_STAGE", "RESULTS_FILE", "Role", "RunPaths", "SHARED_FROM_FILE", "STAGES_FILE", "STAGE_TABLE",
           "SteeringMethod", "StageGroup", "StageSpec", "SHARED_STAGES", "VIEWER_HTML", "hybrid_eval_stage", "planned_stages",
           "stage_names", "stage_spec"]
