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
from collections.abc import Iterator
from importlib.metadata import entry_points
from typing import Generic, TypeVar

from mechsteer.core.errors import ConfigError

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


T = TypeVar("T")


class Registry(Generic[T]):
    """Names a run config or a command can use -> what each stands for, open to plug-ins: a name is
    registered once (``replace=True`` replaces it on purpose); a name nobody registered loads the
    plug-ins once, then is refused in one line naming the registered ones. ``what`` is how messages
    call an entry ("engine", "timing policy")."""

    def __init__(self, what: str):
        self.what = what
        self._entries: dict[str, T] = {}

    def register(self, name: str, entry: T, *, replace: bool = False) -> None:
        if name in self._entries and not replace:
            raise ValueError(f"{self.what} {name!r} is already registered; pass replace=True")
        self._entries[name] = entry

    def names(self) -> list[str]:
        """Every registered name, the plug-ins' included, sorted."""
        load_plugins()
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        if name not in self._entries:
            load_plugins()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def get(self, name: str) -> T:
        """The entry ``name`` (plug-ins loaded on a miss), or a :class:`ConfigError` naming the registered ones."""
        if name not in self:
            raise ConfigError(f"unknown {self.what} {name!r}; registered: {self.names()}")
        return self._entries[name]


__all__ = ["ENTRY_POINT_GROUP", "Registry", "load_plugins"]
