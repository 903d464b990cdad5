"""Stage 4: behaviour steering directions in the base model.

:mod:`~mechsteer.steering.direction_set` (the ``DirectionSet`` artefact), :mod:`~mechsteer.steering.labels`
(sentence and generated-text labellers), :mod:`~mechsteer.steering.framing` (the text fed to the
base model), :mod:`~mechsteer.steering.methods` (the registry of direction methods), and one
module per built-in method: :mod:`~mechsteer.steering.mean`, :mod:`~mechsteer.steering.sae_map`,
:mod:`~mechsteer.steering.optimise`.
"""

from mechsteer.steering.direction_set import (
    DIRECTIONS_FORMAT,
    SITE,
    DirectionMethod,
    DirectionSet,
    Site,
    direction_provenance,
    set_method_names,
)
from mechsteer.steering.framing import (
    base_template_for,
    frame_for_base,
    load_framed_traces,
    reframe_trace,
)
from mechsteer.steering.labels import (
    NO_LABEL,
    BehaviourLabeller,
    BehaviourLabels,
    SAEBehaviourLabeller,
    SentenceLabeller,
    aligned_labeller,
    ground_truth_behaviour_labeller,
    ground_truth_labeller,
    ground_truth_labels,
    sentence_labels,
    taxonomy_labels,
)
from mechsteer.steering.mean import (
    POOLINGS,
    PooledSentences,
    Pooling,
    build_mean_directions,
    default_layer,
    difference_of_means,
    mean_bias,
    mean_centred_norm,
    pool_sentences,
)
from mechsteer.steering.methods import (
    DirectionBuilder,
    DirectionInputs,
    DirectionMethodSpec,
    DirectionSettings,
    direction_method_names,
    direction_method_spec,
    register_direction_method,
)
from mechsteer.steering.optimise import (
    STEER_POSITIONS,
    OptimisationConfig,
    OptimisationReport,
    SteeringExample,
    SteerPositions,
    build_optimised_directions,
    optimise_vector,
    reasoning_example,
    sentence_examples,
)
from mechsteer.steering.sae_map import (
    MAPPINGS,
    LinearMapping,
    build_sae_directions,
    fit_linear_map,
    paired_sentence_activations,
    sae_steering_directions,
)

__all__ = [
    "DIRECTIONS_FORMAT", "MAPPINGS", "NO_LABEL", "POOLINGS", "SITE", "STEER_POSITIONS",
    "BehaviourLabeller", "BehaviourLabels", "DirectionBuilder", "DirectionInputs", "DirectionMethod",
    "DirectionMethodSpec", "DirectionSet", "DirectionSettings", "LinearMapping",
    "OptimisationConfig", "OptimisationReport", "PooledSentences", "Pooling", "SAEBehaviourLabeller",
    "SentenceLabeller", "SteerPositions", "SteeringExample", "Site",
    "aligned_labeller", "base_template_for", "build_mean_directions", "build_optimised_directions",
    "build_sae_directions", "default_layer", "difference_of_means", "direction_method_names",
    "direction_method_spec", "direction_provenance", "fit_linear_map",
    "frame_for_base", "ground_truth_behaviour_labeller", "ground_truth_labeller", "ground_truth_labels",
    "load_framed_traces", "mean_bias", "mean_centred_norm", "optimise_vector", "paired_sentence_activations",
    "pool_sentences", "reasoning_example", "reframe_trace", "register_direction_method", "sae_steering_directions", "sentence_examples",
    "sentence_labels", "set_method_names", "taxonomy_labels",
]
