"""Runtime shape checking for tensor functions: jaxtyping annotations checked by beartype.

Decorate every function with tensor-typed arguments with ``@typechecked`` so that a
tensor of the wrong rank or with inconsistent named dimensions fails loudly at the call.
"""

from beartype import beartype
from jaxtyping import Bool, Float, Int, jaxtyped
from torch import Tensor

typechecked = jaxtyped(typechecker=beartype)

__all__ = ["Bool", "Float", "Int", "Tensor", "typechecked"]
