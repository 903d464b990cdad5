"""Provenance checks at the hand-over between stages: is this artefact what the reader expects?

Each artefact records what produced it (the model, its inputs' digests, the settings); a stage
that reads one compares that record with what it is about to do, and a mismatch is refused by
:func:`mismatch` with both values and the way out.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import torch

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


def weights_fingerprint(model: torch.nn.Module, per_tensor: int = 4096, length: int = 16) -> str:
    """A digest of a model's weights by content: every parameter's name, shape and first
    ``per_tensor`` values (as float32), so that two checkpoints under one name differ here, at the
    cost of reading a few KB per tensor rather than the whole model."""
    sha = hashlib.sha256()
    with torch.no_grad():
        for name, parameter in sorted(model.named_parameters()):
            head = parameter.detach().flatten()[:per_tensor].float().cpu().contiguous()
            sha.update(f"{name}:{tuple(parameter.shape)}".encode())
            sha.update(head.numpy().tobytes())
    return sha.hexdigest()[:length]


__all__ = ["mismatch", "recorded_location", "recorded_path", "same_model", "weights_fingerprint"]
