"""Stage: causal validation of each behaviour direction, necessity and sufficiency.

- :mod:`mechsteer.causal.necessity`: in the thinking model, project each behaviour's direction
  out and regenerate; the behaviour's rate (sentences per trace) before and after.
- :mod:`mechsteer.causal.sufficiency`: in the base model, steer toward a behaviour at contexts
  whose next sentence is another behaviour; how often the next sentence becomes it, against
  unsteered and norm-matched random controls.
- :mod:`mechsteer.causal.outputs`: one row per behaviour (per variant / coefficient) as CSV
  files, a JSON document and a matplotlib figure (:func:`write_outputs`).

Behaviours of generated text come from a :class:`mechsteer.steering.labels.BehaviourLabeller`:
a benchmark's registered ground truth, or for real models the taxonomy's SAE on the thinking
model's pooled sentence activations.
"""

from mechsteer.causal.necessity import (
    NECESSITY_VARIANTS,
    NecessityRow,
    NecessityVariant,
    behaviour_rates,
    necessity,
    relative_change,
)
from mechsteer.causal.outputs import (
    ABLATIONS_JSON,
    ABLATIONS_PLOT,
    NECESSITY_CSV,
    SUFFICIENCY_CSV,
    plot_ablations,
    write_outputs,
    write_rows_csv,
)
from mechsteer.causal.sufficiency import (
    RowWindowSteering,
    SteeringContext,
    SufficiencyRow,
    contexts_for,
    sufficiency,
    sufficiency_contexts,
)

__all__ = [
    "ABLATIONS_JSON", "ABLATIONS_PLOT", "NECESSITY_CSV", "NECESSITY_VARIANTS", "SUFFICIENCY_CSV", "NecessityRow",
    "NecessityVariant", "RowWindowSteering", "SteeringContext", "SufficiencyRow", "behaviour_rates", "contexts_for",
    "necessity", "plot_ablations", "relative_change", "sufficiency", "sufficiency_contexts", "write_outputs",
    "write_rows_csv",
]
