"""One way to save and load an artefact: a versioned JSON document beside a safetensors file.

:class:`~mechsteer.steering.direction_set.DirectionSet`, :class:`~mechsteer.taxonomy.artefact.Taxonomy`
and :class:`~mechsteer.taxonomy.sae.TopKSAE` each describe their files with an :class:`ArtefactFormat`
and read and write them through :func:`save_artefact` and :func:`load_artefact`, so every artefact
checks its format and version the same way and a missing or corrupt file is reported by name.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from mechsteer.core.errors import ArtefactError


@dataclass(frozen=True)
class ArtefactFormat:
    """The files of one artefact kind: ``json_file`` holds ``format``/``version`` and the metadata."""

    name: str
    version: int
    json_file: str
    tensors_file: str
    kind: str  # how error messages call it, e.g. "DirectionSet"


def save_artefact(directory: str | Path, fmt: ArtefactFormat, metadata: dict[str, Any],
                  tensors: dict[str, torch.Tensor]) -> Path:
    """Write ``tensors`` and ``metadata`` (with the format's name and version first) into ``directory``.

    Both files are written to temporary siblings and renamed into place, the JSON last, so an
    interrupted save never leaves a folder that loads.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors_path, json_path = directory / fmt.tensors_file, directory / fmt.json_file
    staging = tensors_path.with_name(tensors_path.name + ".tmp")
    save_file({name: tensor.detach().cpu().contiguous() for name, tensor in tensors.items()}, str(staging))
    os.replace(staging, tensors_path)
    document = {"format": fmt.name, "version": fmt.version, **metadata}
    staging = json_path.with_name(json_path.name + ".tmp")
    staging.write_text(json.dumps(document, indent=2) + "\n")
    os.replace(staging, json_path)
    return directory


def load_artefact(directory: str | Path, fmt: ArtefactFormat, *,
                  device: str | torch.device = "cpu") -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The metadata document and the tensors of a saved artefact, checked for format and version."""
    directory = Path(directory)
    json_path, tensors_path = directory / fmt.json_file, directory / fmt.tensors_file
    for path in (json_path, tensors_path):
        if not path.is_file():
            raise ArtefactError(f"{path} not found: {directory} is not a saved {fmt.kind}")
    try:
        document = json.loads(json_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ArtefactError(f"{json_path} is corrupt ({error}); rebuild the {fmt.kind}") from None
    if not isinstance(document, dict) or document.get("format") != fmt.name or document.get("version") != fmt.version:
        found = (document.get("format"), document.get("version")) if isinstance(document, dict) else None
        raise ArtefactError(f"{json_path} is not a {fmt.name} v{fmt.version} file: format, version = {found!r}")
    try:
        tensors = load_file(str(tensors_path), device=str(device))
    except (SafetensorError, OSError) as error:
        raise ArtefactError(f"{tensors_path} is corrupt ({error}); rebuild the {fmt.kind}") from None
    return document, tensors


__all__ = ["ArtefactFormat", "load_artefact", "save_artefact"]
