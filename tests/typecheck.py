"""What the test run's type checker changes for tests of bad arguments.

`make test` installs jaxtyping's import hook with beartype over all of mechsteer (pyproject's
``--jaxtyping-packages``), so every annotated signature, tensor shapes included, is checked at
each call. A call with an argument of the wrong *type* (a string outside a ``Literal``, ``None``
for ``str``) is then refused by the checker before the function's own validation, which exists
for callers without a checker (values read from YAML or the command line).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from jaxtyping import TypeCheckError


@contextmanager
def refused(match: str, parameter: str) -> Iterator[None]:
    """The call raises the library's ValueError matching ``match``, or the type checker's error
    about ``parameter``."""
    with pytest.raises((ValueError, TypeCheckError)) as caught:
        yield
    if isinstance(caught.value, TypeCheckError):
        assert re.search(rf"parameter '{re.escape(parameter)}'", str(caught.value)), str(caught.value)
    else:
        assert re.search(match, str(caught.value)), str(caught.value)
