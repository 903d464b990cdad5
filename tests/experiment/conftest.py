"""A short organism run that several test modules read (the pipeline's, the report's): built once
per session, and only when a test asks for it."""

import pytest

from mechsteer.experiment.config import RunConfig

SHORT_RUN = dict(name="short", base_model="organism-base", thinking_model="organism-thinking", benchmark="organism",
                 n_train=50, n_eval=50, max_new_tokens=288, batch_size=25, n_latents=[4, 5],
                 normalise=[True, False], judge="oracle", threads=1,
                 direction_method="optimised", optimisation={"lr": 0.1, "steps": 100, "init_norm": 8.0},
                 coefficients=[1.0, 2.0, 4.0], ablation_contexts=10,
                 controls=["only_bias", "only_bias_replayed", "random_firing", "random_vectors"],
                 baselines=["first_token_only"])
# SHORT_RUN with the paper's correction vectors, trained briefly (its upstream stages are short_run's)
CORRECTION_RUN = {**SHORT_RUN, "correction_vectors": True, "correction_top_k": 20,
                  "correction": {"seeds": [1, 2], "epochs": 2, "batch_size": 8}}


@pytest.fixture(scope="session")
def short_run(tmp_path_factory):
    """(run folder, report) of a finished short organism run. Tests only read the folder: copy it to change it."""
    from mechsteer.experiment.pipeline import run_pipeline

    out = tmp_path_factory.mktemp("short_run")
    return out, run_pipeline(RunConfig.from_dict(SHORT_RUN), out, log=lambda message: None)
