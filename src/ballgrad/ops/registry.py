"""The single op registry: aten overload -> rule (DESIGN.md §4).

A rule is a small pure function ``rule(func, *args, **kwargs)`` that computes the midpoint with ``func`` itself on the
midpoints (bit-identical to plain PyTorch) and the radius with ``ballgrad.rounding``; it returns BallTensors.
``dispatch`` is the only caller. An op without a rule raises ``UnsupportedOpError`` naming the overload: nothing
ever runs on midpoints alone.
"""

from __future__ import annotations

import threading
from typing import Callable

import torch

from ballgrad import diagnostics, guard
from ballgrad.errors import UnsupportedOpError

RULES: dict[torch._ops.OpOverload, Callable] = {}

# Overloads whose rule only moves elements (views, clones: ``shape.structural``'s common views): while no diagnostics
# recording is active, ``dispatch`` calls their rule without the per-op bookkeeping (the numerics guard, which guards
# arithmetic, and the current-op marker, which only event messages read): ~2 us of a ~12 us ball view, ~100 views a
# transformer step.
DIRECT: set[torch._ops.OpOverload] = set()

_state = threading.local()


def rule(*ops):
    """Register the decorated function as the rule for each aten overload in ``ops``."""

    def register(fn):
        for op in ops:
            if op in RULES:
                raise RuntimeError(f"two rules for {op}: {RULES[op].__module__}.{RULES[op].__name__} and {fn.__name__}")
            RULES[op] = fn
        return fn

    return register


def current_op() -> str:
    """The aten overload being evaluated (for event messages)."""
    return str(getattr(_state, "op", "?"))


def dispatch(func, args, kwargs):
    fn = RULES.get(func)
    if func in DIRECT and not diagnostics.active:
        return fn(func, *args, **kwargs)
    if fn is None:
        from ballgrad.ops import decompositions

        fn = decompositions.rule_for(func)
        if fn is None:
            raise UnsupportedOpError(func)
    guard.check_once(_device_type(args))
    frame = diagnostics.begin_op(func, args, kwargs) if diagnostics.active else None  # one attribute read
    previous = getattr(_state, "op", "?")
    _state.op = func  # the overload itself; current_op() formats it only when a message needs it
    try:
        out = fn(func, *args, **kwargs)
        if frame is not None:
            diagnostics.scan_outputs(func, args, out, frame, kwargs)
    finally:
        _state.op = previous
        if frame is not None:
            diagnostics.end_op(frame)
    return out


def _device_type(args) -> str:
    for a in args:
        if isinstance(a, torch.Tensor):
            return "cpu" if a.is_cpu else a.device.type  # (is_cpu: no torch.device object, ~1 us less per op)
        if isinstance(a, (list, tuple)) and a and isinstance(a[0], torch.Tensor):
            return a[0].device.type
    return "cpu"


def supported_ops() -> list[str]:
    """Names of every aten overload with a rule."""
    return sorted(str(op) for op in RULES)
