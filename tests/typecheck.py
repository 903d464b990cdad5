"""The test run's run-time type checker, and what it changes for tests of bad arguments.

`make test` installs jaxtyping's import hook (pyproject's ``--jaxtyping-packages``) over the
subpackages that handle tensors (interventions, activations, taxonomy, steering,
hybrid, causal), so every annotated signature there, tensor shapes included, is checked at each
call by :data:`checker`. The configuration and command-line layers are left to their own
validator (mechsteer.core.validation), which names the key, the file and the fix.

In the checked layers, a call with an argument of the wrong *type* (a string outside a
``Literal``, a string coefficient) is refused by the checker before the function's own
validation, which exists for callers without a checker (values read from YAML or the command
line); :func:`refused` accepts either.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from beartype import BeartypeConf, beartype
from jaxtyping import TypeCheckError

# PEP 484's numeric tower: an int is a valid float (coefficients are often written as 2).
checker = beartype(conf=BeartypeConf(is_pep484_tower=True))


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
