"""Independent high-precision oracles that check ballgrad's balls (DESIGN.md §7).

- ``verification.oracle``: trace a training step into an aten graph (``make_fx``) and evaluate it exactly
  (``Oracle``, ``exact_training_step``); shares no code with ``ballgrad.ops``.
- ``verification.check``: ``check_model`` compares a ballified model's loss, outputs and gradients with the oracle
  and returns a ``Report`` (containment, tightness, midpoint identity).
- ``verification.zoo``: the BENCHMARKS.md models with seeded synthetic data.
"""

from verification.check import Report, TensorCheck, Violation, check_model, check_tensor, format_table
from verification.oracle import (
    Oracle,
    OracleUnsupportedOp,
    exact_training_step,
    graph_ops,
    supported_ops,
    trace_training_step,
)

__all__ = [
    "Oracle",
    "OracleUnsupportedOp",
    "exact_training_step",
    "trace_training_step",
    "graph_ops",
    "supported_ops",
    "check_model",
    "check_tensor",
    "Report",
    "TensorCheck",
    "Violation",
    "format_table",
]
