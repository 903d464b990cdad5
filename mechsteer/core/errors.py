"""mechsteer's own error types: what the command line reports as one line, without a traceback."""

from __future__ import annotations


class MechsteerError(Exception):
    """An error a user can act on: the message says what is wrong, where, and the way out."""


class ArtefactError(MechsteerError, ValueError):
    """A saved artefact (folder, JSON, safetensors or JSONL file) is missing, corrupt or of another format."""


class ConfigError(MechsteerError, ValueError):
    """A configuration value or command-line argument is refused before any work starts."""


class ProvenanceError(MechsteerError, ValueError):
    """An artefact was made by another model, from other inputs or with other settings than the
    stage reading it expects; the message names both values and the way out."""


__all__ = ["ArtefactError", "ConfigError", "MechsteerError", "ProvenanceError"]
