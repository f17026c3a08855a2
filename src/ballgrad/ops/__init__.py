"""Rules by op family; importing this package registers every rule in ``registry.RULES``."""

from ballgrad.ops import registry  # noqa: F401  (the registry first)
from ballgrad.ops import arith, conv, elementwise, linalg, nonsmooth, reductions, shape  # noqa: F401
from ballgrad.ops import inplace  # noqa: F401  (in-place forms of the rules above)
from ballgrad.ops import normalization  # noqa: F401  (batch norm, layer norm)
from ballgrad.ops import transformer  # noqa: F401  (embedding, attention, dropout)
from ballgrad.ops import nn, backward  # noqa: F401  (softmax family, losses, *_backward ops)

__all__ = ["registry"]
