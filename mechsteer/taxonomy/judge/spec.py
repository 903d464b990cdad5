"""A judge from its command-line name: ``none``, ``oracle``, ``http``, ``http:<model>`` or ``local:<model spec>``."""

from __future__ import annotations

import os
from pathlib import Path

from mechsteer.core.models import load_model
from mechsteer.taxonomy.judge.base import Judge
from mechsteer.taxonomy.judge.http import HTTPJudge
from mechsteer.taxonomy.judge.local import LocalJudge
from mechsteer.taxonomy.judge.oracle import oracle_judge_from_activations

JUDGE_SPEC_HELP = (
    "'http' (endpoint, model and key from MECHSTEER_JUDGE_URL / MECHSTEER_JUDGE_MODEL / "
    "MECHSTEER_JUDGE_API_KEY), 'http:<model>' (the model named here), or 'local:<model spec>' "
    "(a chat model loaded with mechsteer.core.models.load_model, e.g. local:smollm2)"
)


def judge_from_spec(spec: str, *, cache_dir: str | os.PathLike[str] | None = None) -> Judge:
    """A judge from a CLI string; see ``JUDGE_SPEC_HELP``. The oracle needs ground-truth labels,
    so it is built directly: ``OracleJudge(sentence_labels, label_descriptions)``."""
    kind, _, argument = spec.partition(":")
    if kind == "http":
        return HTTPJudge(model=argument or None, cache_dir=cache_dir)
    if kind == "local" and argument:
        return LocalJudge(load_model(argument))
    if kind == "oracle":
        raise ValueError("the oracle judge needs ground-truth labels: build OracleJudge(...) directly")
    raise ValueError(f"unknown judge spec {spec!r}; expected {JUDGE_SPEC_HELP}")


def make_judge(
    spec: str, activations_dir: str | Path, out_dir: str | Path, *, benchmark: str | None = None
) -> Judge | None:
    """The judge ``spec`` names for a taxonomy of ``activations_dir``: None for "none", the oracle
    (see :func:`~mechsteer.taxonomy.judge.oracle.oracle_judge_from_activations`) for "oracle",
    else :func:`judge_from_spec` with HTTP answers cached under ``out_dir``."""
    if spec == "none":
        return None
    if spec == "oracle":
        return oracle_judge_from_activations(activations_dir, benchmark)
    return judge_from_spec(spec, cache_dir=Path(out_dir) / "judge_cache")


__all__ = ["JUDGE_SPEC_HELP", "judge_from_spec", "make_judge"]
