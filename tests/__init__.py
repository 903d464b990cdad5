# The import hook (pyproject addopts) names tests.typecheck.checker; make it an attribute of `tests`.
from tests import typecheck  # noqa: F401
