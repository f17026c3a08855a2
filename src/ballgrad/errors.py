"""Exceptions raised by ballgrad. Each names what went wrong and how to go on."""

from __future__ import annotations


class BallgradError(Exception):
    """Base class of ballgrad's own errors."""


class UnsupportedOpError(BallgradError, NotImplementedError):
    """An aten op reached a BallTensor and ballgrad has no rigorous rule for it.

    ballgrad never runs an op on midpoints alone: that would return a ball whose radius means nothing.
    """

    def __init__(self, op, reason: str | None = None):
        self.op = op
        name = op if isinstance(op, str) else str(op)
        self.op_name = name
        msg = f"ballgrad has no rule for aten op '{name}'"
        if reason:
            msg += f": {reason}"
        else:
            msg += (
                f". Add one with @rule(torch.ops.{name}) in the op family's module under src/ballgrad/ops/,"
                " with the bound's derivation beside it"
                " and an mpmath containment test, or convert the input to a plain tensor (x.mid) on purpose."
            )
        super().__init__(msg)


class UndecidedComparisonError(BallgradError, RuntimeError):
    """``bool()`` of a comparison whose outcome differs between points of the balls (IntervalArithmetic.jl style)."""


class NumericsGuardError(BallgradError, RuntimeError):
    """A floating-point setting breaks the rounding model (flush-to-zero, TF32, reduced-precision matmul)."""
