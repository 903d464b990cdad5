"""Plug-ins: packages that add model specs, benchmarks, prompt templates or ground-truth labels.

A plug-in is a function named by an entry point in the group ``mechsteer.plugins``; it calls the
``register_*`` functions of the generic stages (:func:`mechsteer.core.models.register_model_spec`,
:func:`mechsteer.data.benchmarks.register_benchmark`, :func:`mechsteer.data.prompts.register_template`,
:func:`mechsteer.data.labels.register_ground_truth`). The generic stages never import a plug-in:
a registry that misses a name calls :func:`load_plugins` once and looks again. mechsteer's own
model organisms are such a plug-in (``mechsteer.organisms.plugin:register``, declared in
``pyproject.toml``).
"""

from __future__ import annotations

import logging
from importlib.metadata import entry_points

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "mechsteer.plugins"
_loaded = False


def load_plugins() -> None:
    """Run every installed plug-in's registration function, once per process."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    for entry_point in entry_points(group=ENTRY_POINT_GROUP):
        logger.debug("loading mechsteer plug-in %s", entry_point.value)
        entry_point.load()()


__all__ = ["ENTRY_POINT_GROUP", "load_plugins"]
