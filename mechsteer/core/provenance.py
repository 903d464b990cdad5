"""Provenance checks at the hand-over between stages: is this artefact what the reader expects?

Each artefact records what produced it (the model, its inputs' digests, the settings); a stage
that reads one compares that record with what it is about to do, and a mismatch is refused by
:func:`mismatch` with both values and the way out.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from mechsteer.core.errors import ProvenanceError


def same_model(recorded: str, current: str) -> bool:
    """True when two recorded model names mean the same model: equal, or two paths of one folder."""
    if recorded == current:
        return True
    try:
        first, second = Path(recorded).expanduser(), Path(current).expanduser()
        return first.exists() and second.exists() and first.resolve() == second.resolve()
    except (OSError, ValueError):
        return False


def mismatch(where: Any, what: str, recorded: Any, expected: Any, way_out: str) -> ProvenanceError:
    """The error for an artefact at ``where`` made with ``what`` = ``recorded`` read where
    ``expected`` is needed; ``way_out`` says what to do (another --out, or the override flag)."""
    return ProvenanceError(f"{where}: made with {what} {recorded!r}, but {expected!r} is expected here; {way_out}")


def recorded_path(path: str | Path, folder: str | Path) -> str:
    """``path`` as an artefact written to ``folder`` records it: relative to ``folder``, so that a run
    folder moved or copied whole reads its own files (the ones beside the artefact), not the original's."""
    return os.path.relpath(Path(path).resolve(), Path(folder).resolve())


def recorded_location(recorded: str, folder: str | Path) -> Path:
    """Where a path that an artefact in ``folder`` recorded lies: a relative one is relative to
    ``folder``; an absolute one (written before paths were recorded relative) stands as it is."""
    path = Path(recorded)
    return path if path.is_absolute() else (Path(folder) / path).resolve()


__all__ = ["mismatch", "recorded_location", "recorded_path", "same_model"]
