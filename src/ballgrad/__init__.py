"""ballgrad: rigorous ball arithmetic for PyTorch tensors and gradients.

A ``BallTensor`` carries a midpoint (exactly what PyTorch computes) and a radius (a rigorous bound on the distance to
the exact real-number result) through every aten op it meets, including autograd's backward ops.
"""

from ballgrad import ops  # noqa: F401  (registers the rules)
from ballgrad.diagnostics import record
from ballgrad.errors import NumericsGuardError, UndecidedComparisonError, UnsupportedOpError
from ballgrad.guard import check_numerics
from ballgrad.ops.linalg import GEMM_BOUNDS, gemm_bound, set_gemm_bound
from ballgrad.nn import PlainGradientError, ballify, is_ballified, unballify
from ballgrad.precision import precision_plan, report
from ballgrad.tensor import BallTensor, ball, from_interval

__version__ = "0.1.0"

__all__ = [
    "BallTensor",
    "ball",
    "from_interval",
    "record",
    "report",
    "precision_plan",
    "ballify",
    "unballify",
    "is_ballified",
    "PlainGradientError",
    "check_numerics",
    "gemm_bound",
    "GEMM_BOUNDS",
    "set_gemm_bound",
    "UnsupportedOpError",
    "UndecidedComparisonError",
    "NumericsGuardError",
]
