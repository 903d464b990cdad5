"""mechsteer: causal experiments on when thinking models use the base model's reasoning skills.

The public API, in pipeline order (each stage's subpackage holds the rest):

- models and interventions: :func:`load_model`, :func:`load_pair`, :func:`generate`,
  :class:`Steering`, :class:`Ablation`, :func:`steer`, :func:`ablate`,
  :class:`RowWindowSteering` (a per-row position window);
- data: :func:`load_benchmark`, :func:`render_prompt`, :func:`generate_traces`, :func:`load_traces`,
  :func:`ground_truth_for`; grading: :func:`grade`, :func:`accuracy`, :func:`gap_recovered`;
- 2 sentence activations: :class:`ActivationConfig`, :func:`extract_activations`, :func:`read_sentences`;
- 3 taxonomy: :class:`TopKSAE`, :class:`Taxonomy`, :func:`build_taxonomy`, :func:`sweep_taxonomies`;
- 4 directions in the base model: :class:`DirectionSet` (``.steer()`` / ``.ablate()`` context
  managers), :func:`build_mean_directions`, :func:`build_sae_directions`,
  :func:`build_optimised_directions`, :func:`ground_truth_labels`, :func:`taxonomy_labels`;
- 5 hybrid: :func:`hybrid_generate`, :class:`HybridConfig`, :class:`SAEArgmaxPolicy`;
- 6 causal checks: :func:`necessity`, :func:`sufficiency`, :func:`behaviour_rates`,
  :func:`ground_truth_behaviour_labeller` (labels generated text with a benchmark's ground truth);
- 7 the whole run: :class:`RunConfig`, :func:`run_pipeline`.

Layers, lowest first: ``core`` < ``interventions`` < ``engines`` < ``grading`` < ``data`` < ``activations`` <
``taxonomy`` < ``steering`` < ``hybrid`` < ``causal`` < ``experiment`` < ``cli``; the model
organisms (``mechsteer.organisms``) are a plug-in that no generic stage imports.
"""

from typing import TYPE_CHECKING

from mechsteer.core.lazy import lazy_exports

# The public API, declared once: imported here for type checkers, and on first use at run time
# (mechsteer.core.lazy), so that importing the package, or the command line's --help, stays fast.
if TYPE_CHECKING:
    from mechsteer.activations import (
        ActivationConfig,
        extract_activations,
        load_sentence_vectors,
        read_sentences,
    )
    from mechsteer.causal.necessity import behaviour_rates, necessity
    from mechsteer.causal.sufficiency import RowWindowSteering, sufficiency
    from mechsteer.core.models import ModelPair, load_model, load_pair
    from mechsteer.data.benchmarks import Problem, load_benchmark
    from mechsteer.data.labels import ground_truth_for
    from mechsteer.data.prompts import render_prompt
    from mechsteer.data.traces import TraceRecord, generate_traces, load_traces
    from mechsteer.experiment.config import DEMO_CONFIG, RunConfig
    from mechsteer.experiment.pipeline import run_pipeline
    from mechsteer.grading.answers import grade
    from mechsteer.grading.statistics import accuracy, gap_recovered
    from mechsteer.hybrid.generator import HybridConfig, hybrid_generate
    from mechsteer.hybrid.timing import SAEArgmaxPolicy
    from mechsteer.interventions.generation import generate
    from mechsteer.interventions.hooks import Ablation, Steering, ablate, steer
    from mechsteer.steering.direction_set import DirectionSet
    from mechsteer.steering.framing import frame_for_base
    from mechsteer.steering.labels import (
        ground_truth_behaviour_labeller,
        ground_truth_labels,
        taxonomy_labels,
    )
    from mechsteer.steering.mean import build_mean_directions, default_layer
    from mechsteer.steering.optimise import OptimisationConfig, build_optimised_directions
    from mechsteer.steering.sae_map import build_sae_directions
    from mechsteer.taxonomy.artefact import Taxonomy
    from mechsteer.taxonomy.build import build_taxonomy
    from mechsteer.taxonomy.sae import TopKSAE
    from mechsteer.taxonomy.sweep import sweep_taxonomies

__version__ = "0.1.0"

__all__ = [
    "DEMO_CONFIG",
    "Ablation",
    "ActivationConfig",
    "DirectionSet",
    "HybridConfig",
    "ModelPair",
    "OptimisationConfig",
    "Problem",
    "RowWindowSteering",
    "RunConfig",
    "SAEArgmaxPolicy",
    "Steering",
    "Taxonomy",
    "TopKSAE",
    "TraceRecord",
    "ablate",
    "accuracy",
    "behaviour_rates",
    "build_mean_directions",
    "build_optimised_directions",
    "build_sae_directions",
    "build_taxonomy",
    "default_layer",
    "extract_activations",
    "frame_for_base",
    "gap_recovered",
    "generate",
    "generate_traces",
    "grade",
    "ground_truth_behaviour_labeller",
    "ground_truth_for",
    "ground_truth_labels",
    "hybrid_generate",
    "load_benchmark",
    "load_model",
    "load_pair",
    "load_sentence_vectors",
    "load_traces",
    "necessity",
    "read_sentences",
    "render_prompt",
    "run_pipeline",
    "steer",
    "sufficiency",
    "sweep_taxonomies",
    "taxonomy_labels",
]

__getattr__, __dir__ = lazy_exports(__name__, __file__, __all__)
