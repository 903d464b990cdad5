"""A judge from its command-line name: ``none``, ``oracle``, ``http``, ``http:<model>`` or ``local:<model spec>``."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from mechsteer.core.errors import ConfigError
from mechsteer.core.models import load_model, missing_model_path
from mechsteer.taxonomy.judge.base import Judge
from mechsteer.taxonomy.judge.http import ENV_MODEL, ENV_OPENAI_URL, ENV_URL, HTTPJudge
from mechsteer.taxonomy.judge.local import LocalJudge
from mechsteer.taxonomy.judge.oracle import oracle_judge_from_activations

JUDGE_SPEC_HELP = (
    "'http' (endpoint, model and key from MECHSTEER_JUDGE_URL / MECHSTEER_JUDGE_MODEL / "
    "MECHSTEER_JUDGE_API_KEY), 'http:<model>' (the model named here), or 'local:<model spec>' "
    "(a chat model loaded with mechsteer.core.models.load_model, e.g. local:smollm2)"
)


def judge_from_spec(spec: str, *, cache_dir: str | os.PathLike[str] | None = None, timeout: float | None = None,
                    max_concurrency: int | None = None, max_tokens: int | None = None) -> Judge:
    """A judge from a CLI string; see ``JUDGE_SPEC_HELP``. The oracle needs ground-truth labels,
    so it is built directly: ``OracleJudge(sentence_labels, label_descriptions)``. ``timeout``,
    ``max_concurrency`` and ``max_tokens`` set an HTTP judge's (:class:`HTTPJudge`)."""
    kind, _, argument = spec.partition(":")
    if kind == "http":
        return HTTPJudge(model=argument or None, cache_dir=cache_dir, timeout=timeout,
                         max_concurrency=max_concurrency, max_tokens=max_tokens)
    if kind == "local" and argument:
        return LocalJudge(load_model(argument))
    if kind == "oracle":
        raise ConfigError("the oracle judge needs ground-truth labels: build OracleJudge(...) directly")
    raise ConfigError(f"unknown judge spec {spec!r}; expected 'none', 'oracle', {JUDGE_SPEC_HELP}")


JUDGE_KINDS = "none, oracle, http, http:<model> or local:<model spec>"


def check_judge_spec(spec: str) -> None:
    """Refuse a judge name that :func:`make_judge` cannot read, or a local judge whose model path
    does not exist (nothing is loaded or contacted)."""
    kind, colon, argument = spec.partition(":")
    if spec in ("none", "oracle", "http") or (kind == "http" and colon and argument):
        return
    if kind == "local" and colon and argument:
        missing = missing_model_path(argument)
        if missing:
            raise ConfigError(f"judge {spec!r}: {missing}")
        return
    raise ConfigError(f"unknown judge {spec!r}; expected {JUDGE_KINDS}")


def judge_connection_problem(spec: str) -> str | None:
    """Why an HTTP judge ``spec`` cannot be asked from this environment (no server URL, or no
    model for ``http``), found without contacting it; None when it can, or for other judges."""
    kind, _, argument = spec.partition(":")
    if kind != "http":
        return None
    if not (os.environ.get(ENV_URL) or os.environ.get(ENV_OPENAI_URL)):
        return (f"judge {spec!r} needs the server's address: set {ENV_URL} (or {ENV_OPENAI_URL}), "
                "e.g. http://localhost:8000/v1")
    if not argument and not os.environ.get(ENV_MODEL):
        return f"judge 'http' needs the model's name: set {ENV_MODEL}, or name it in the judge (http:<model>)"
    return None


JUDGE_CACHE_DIR = "judge_cache"  # under a taxonomy's folder: the HTTP judge's saved answers


def clear_judge_cache(taxonomy_dir: str | Path) -> int:
    """Delete the HTTP judge's cache of a taxonomy folder (``judge_cache/``); the number of answers removed.
    The cache keeps parsed answers only, so this is needed only to ask the judge again on purpose."""
    cache = Path(taxonomy_dir) / JUDGE_CACHE_DIR
    if not cache.is_dir():
        return 0
    removed = sum(1 for path in cache.rglob("*.json"))
    shutil.rmtree(cache)
    return removed


def make_judge(
    spec: str, activations_dir: str | Path, out_dir: str | Path, *, benchmark: str | None = None,
    timeout: float | None = None, max_concurrency: int | None = None, max_tokens: int | None = None,
) -> Judge | None:
    """The judge ``spec`` names for a taxonomy of ``activations_dir``: None for "none", the oracle
    (see :func:`~mechsteer.taxonomy.judge.oracle.oracle_judge_from_activations`) for "oracle",
    else :func:`judge_from_spec` with HTTP answers cached under ``out_dir``."""
    if spec == "none":
        return None
    if spec == "oracle":
        return oracle_judge_from_activations(activations_dir, benchmark)
    return judge_from_spec(spec, cache_dir=Path(out_dir) / JUDGE_CACHE_DIR, timeout=timeout,
                           max_concurrency=max_concurrency, max_tokens=max_tokens)


__all__ = ["JUDGE_CACHE_DIR", "JUDGE_KINDS", "JUDGE_SPEC_HELP", "check_judge_spec", "clear_judge_cache",
           "judge_connection_problem", "judge_from_spec", "make_judge"]
