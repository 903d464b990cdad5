"""The package's public API, imported on first use (PEP 562), so that ``import mechsteer`` and the
command line's ``--help`` do not pay for torch and transformer-lens.

The package declares its exports once, as ordinary imports under ``if TYPE_CHECKING:`` (what type
checkers and editors read); :func:`lazy_exports` reads that block from the package's source and
imports each name's module when the name is first looked up.
"""

from __future__ import annotations

import ast
import importlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any


def type_checking_imports(source: str) -> dict[str, str]:
    """``name -> module`` of every ``from module import name`` under a module-level ``if TYPE_CHECKING:``."""
    exports: dict[str, str] = {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            for statement in node.body:
                if isinstance(statement, ast.ImportFrom) and statement.module and statement.level == 0:
                    for alias in statement.names:
                        exports[alias.asname or alias.name] = statement.module
    return exports


def lazy_exports(package: str, init_file: str, public: Sequence[str]) -> tuple[Callable[[str], Any],
                                                                              Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package``, whose ``__init__`` at ``init_file`` declares its
    exports under ``if TYPE_CHECKING:``; ``public`` (its ``__all__``) must name exactly those."""
    exports = type_checking_imports(Path(init_file).read_text(encoding="utf-8"))
    if set(exports) != set(public):
        raise ImportError(f"{package}.__all__ and the imports under TYPE_CHECKING in {init_file} differ: "
                          f"only in __all__ {sorted(set(public) - set(exports))}, "
                          f"only imported {sorted(set(exports) - set(public))}")
    namespace = importlib.import_module(package).__dict__

    def __getattr__(name: str) -> Any:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        namespace[name] = value  # later lookups find it without this function
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(exports))

    return __getattr__, __dir__


__all__ = ["lazy_exports", "type_checking_imports"]
