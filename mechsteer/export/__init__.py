"""Take mechsteer's artefacts elsewhere: a direction set as a llama.cpp control vector
(:mod:`mechsteer.export.gguf`), a taxonomy's SAE as a SAELens folder (:mod:`mechsteer.export.saelens`).

:func:`source_folder` finds what to export in a run folder (its stage folder, through
:class:`~mechsteer.experiment.layout.RunPaths`) or takes the artefact's own folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from mechsteer.core.errors import ArtefactError
from mechsteer.experiment.layout import RunPaths
from mechsteer.steering.direction_set import DIRECTIONS_FORMAT
from mechsteer.taxonomy.artefact import TAXONOMY_ARTEFACT

ExportSource = Literal["directions", "taxonomy"]
_MARKERS: dict[ExportSource, str] = {"directions": DIRECTIONS_FORMAT.json_file, "taxonomy": TAXONOMY_ARTEFACT.json_file}


def source_folder(path: str | Path, what: ExportSource) -> Path:
    """``path`` itself if it is a ``what`` folder, else the ``what`` stage folder of the run folder ``path``."""
    path = Path(path)
    marker = _MARKERS[what]
    if (path / marker).is_file():
        return path
    run = RunPaths(path)
    if run.config_file.is_file():
        stage = run.directions if what == "directions" else run.taxonomy
        if (stage / marker).is_file():
            return stage
        raise ArtefactError(f"the run folder {path} has no {what} yet ({stage / marker} missing); "
                            f"run its {what} stage first (mechsteer run --config ... --out {path})")
    raise ArtefactError(f"{path} is neither a {what} folder (no {marker}) nor a run folder "
                        f"(no {run.config_file.name}); pass one of them")


__all__ = ["ExportSource", "source_folder"]
