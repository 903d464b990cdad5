"""Stage: causal validation of each behaviour direction, necessity and sufficiency.

- :mod:`mechsteer.causal.necessity`: in the thinking model, project each behaviour's direction
  out and regenerate: the behaviour's rate (sentences per trace) before and after, and the test
  at contexts where the thinking model writes the behaviour next.
- :mod:`mechsteer.causal.sufficiency`: in the base model, steer toward a behaviour at contexts
  where it can come next; how often the next sentence becomes it, against unsteered and
  norm-matched random controls.
- :mod:`mechsteer.causal.criterion`: the pass criterion (one-sided Fisher exact test, p < 0.01)
  and each rate's interval.
- :mod:`mechsteer.causal.outputs`: one row per behaviour (per variant / coefficient) as CSV
  files, a JSON document and a matplotlib figure (:func:`write_outputs`).

Behaviours of generated text come from a :class:`mechsteer.steering.labels.BehaviourLabeller`:
a benchmark's registered ground truth, or for real models the taxonomy's SAE on the thinking
model's pooled sentence activations.
"""

from mechsteer.causal.criterion import (
    ALPHA,
    CONTEXT_RULES,
    ContextRule,
    RateCount,
    one_sided_p,
    passes,
)
from mechsteer.causal.necessity import (
    NECESSITY_VARIANTS,
    NecessityRow,
    NecessityTestRow,
    NecessityVariant,
    behaviour_rates,
    necessity,
    necessity_at_contexts,
    relative_change,
)
from mechsteer.causal.outputs import (
    ABLATIONS_JSON,
    ABLATIONS_PLOT,
    NECESSITY_CSV,
    NECESSITY_TESTS_CSV,
    SUFFICIENCY_CSV,
    plot_ablations,
    write_outputs,
    write_rows_csv,
)
from mechsteer.causal.sufficiency import (
    ContextFilter,
    RowWindowSteering,
    SteeringContext,
    SufficiencyRow,
    contexts_for,
    sufficiency,
    sufficiency_contexts,
)

__all__ = [
    "ABLATIONS_JSON", "ABLATIONS_PLOT", "ALPHA", "CONTEXT_RULES", "NECESSITY_CSV", "NECESSITY_TESTS_CSV",
    "NECESSITY_VARIANTS", "SUFFICIENCY_CSV", "ContextFilter", "ContextRule", "NecessityRow", "NecessityTestRow",
    "NecessityVariant", "RateCount", "RowWindowSteering", "SteeringContext", "SufficiencyRow", "behaviour_rates",
    "contexts_for", "necessity", "necessity_at_contexts", "one_sided_p", "passes", "plot_ablations",
    "relative_change", "sufficiency", "sufficiency_contexts", "write_outputs", "write_rows_csv",
]
