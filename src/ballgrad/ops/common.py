"""Small helpers every rule family uses: reading arguments as balls, building results."""

from __future__ import annotations

import functools
import math
import numbers

import torch

from ballgrad import rounding
from ballgrad.tensor import BallTensor


def is_ball(x) -> bool:
    return isinstance(x, BallTensor)


def mid_of(x):
    """The midpoint of a ball, the tensor itself for plain tensors, the value for anything else (pytree leaves)."""
    return x.mid if isinstance(x, BallTensor) else x


def mids(args):
    """``args`` (a tuple/list/dict, possibly nested one level in lists) with every ball replaced by its midpoint."""
    if isinstance(args, dict):
        return {k: mids(v) for k, v in args.items()}
    if isinstance(args, (list, tuple)):
        return type(args)(mids(a) for a in args)
    return mid_of(args)


def operand(x, out_dtype: torch.dtype):
    """(m, r) of an argument *as the op uses it*, both in the radius dtype of ``out_dtype``.

    PyTorch casts every operand to the result dtype (or, for float16/bfloat16, possibly to float32 "opmath") before
    computing. m is the operand cast to ``out_dtype`` (what the kernel sees, up to a further exact widening), and
    r >= the operand's own radius + |x - cast(x)|, which also covers the float32-opmath cast of reduced dtypes: the
    nearest float32 is at least as close to x as the nearest float16/bfloat16 (a superset's nearest point).
    Python numbers are exact points (their double value); integer and bool tensors are exact.
    """
    rd = rounding.rad_dtype(out_dtype)
    if isinstance(x, BallTensor):
        m, r = x.mid, x.rad
    elif isinstance(x, torch.Tensor):
        m, r = x, None
    elif isinstance(x, (bool, numbers.Integral, numbers.Real)):
        if isinstance(x, numbers.Integral) and abs(int(x)) > 2**53:
            raise ValueError(f"integer scalar {x} is not exactly representable as a double; pass a float tensor")
        m, r = torch.tensor(float(x), dtype=torch.float64), None
    else:
        raise TypeError(f"unsupported operand {type(x).__name__}")
    if m.dtype != out_dtype:
        used = m.to(out_dtype)
        if (m.dtype, out_dtype) not in rounding._EXACT_WIDENINGS and m.dtype != torch.bool:
            cast_err = rounding.clean_rad(cast_error(m, used))
            if r is not None:
                r64 = r.to(torch.float64)
                cast_err = torch.where(cast_err == 0, r64, rounding.add_up(r64, cast_err))
            r = rounding.to_dtype_up(cast_err, rd)
        m = used
    if m.dtype != rd:  # (a dtype comparison is cheaper than a no-op .to call: this runs twice per rule)
        m = m.to(rd)
    if r is None:
        r = torch.zeros((), dtype=rd, device=m.device)
    elif r.dtype != rd:
        r = r.to(rd)
    return m, r


def cast_error(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """|before - after| for after = RN(before) in a narrower (or integer->float) format, exactly, in float64.

    Exact: both are float64 numbers (every supported dtype, and integers up to 2^53, widen exactly), and a rounded
    value has the sign of the original and lies within a factor 2 of it unless it is 0 or inf, so Sterbenz's lemma
    makes the float64 subtraction exact (with 0: the difference is the original; with inf: inf).
    """
    wide = torch.float64
    return torch.abs(before.to(wide) - after.to(wide))


def result(mid: torch.Tensor, rad: torch.Tensor) -> BallTensor:
    """Wrap a rule's output: radius in the radius dtype, broadcast to mid's shape, NaN -> +inf."""
    rd = rounding.rad_dtype(mid.dtype)
    rad = rounding.clean_rad(rounding.to_dtype_up(rad, rd))
    if rad.shape != mid.shape:
        rad = rad.expand(mid.shape).contiguous() if mid.numel() else rad.expand(mid.shape)
    return BallTensor(mid, rad)


def nan_where_not_finite(m: torch.Tensor, rad: torch.Tensor) -> torch.Tensor:
    """rad + 0*m: exactly rad (>= 0) where m is finite (0*m = ±0), NaN where m is ±inf or NaN, which ``result`` turns
    into +inf (a non-finite midpoint carries no information). Two vectorized passes instead of isfinite's four and a
    where. (A 0-d radius is expanded first: a 0-d float64 would otherwise be demoted to a dimensioned m's dtype.)"""
    rad = rad.expand(m.shape) if rad.dim() == 0 and m.dim() > 0 else rad
    return torch.add(rad, torch.mul(m, 0))


def finite_only(m: torch.Tensor, rad: torch.Tensor) -> torch.Tensor:
    """``rad`` with +inf where the midpoint is not finite (``nan_where_not_finite``, then NaN -> +inf)."""
    return rounding.clean_rad(nan_where_not_finite(m, rad))


def result_in_place(mid: torch.Tensor, rad: torch.Tensor) -> BallTensor:
    """``result`` for a radius the rule has just computed and owns (radius dtype, mid's shape, >= 0 or NaN): +inf
    where mid is not finite and where rad is NaN, written into rad itself. rad + 0*mid is exactly rad where mid is
    finite (0*mid = ±0, and rad + ±0 = rad for rad >= 0, inf or NaN) and NaN where mid is ±inf or NaN
    (``nan_where_not_finite``); NaN then becomes +inf. ``addcmul_`` with a 0-d zero forms rad + mid*0 in one pass and
    no temporary (an FMA gives the same value: mid*0 is exact); isfinite would take four passes and four temporaries."""
    rad.addcmul_(mid, _zero(mid.dtype)).nan_to_num_(nan=math.inf, posinf=math.inf)
    return BallTensor(mid, rad)


@functools.lru_cache(maxsize=None)
def _zero(dtype: torch.dtype) -> torch.Tensor:
    """A 0-d zero of ``dtype`` (never written to; a CPU scalar combines with tensors on any device)."""
    return torch.zeros((), dtype=dtype)


ABS_BLOCK = 1 << 18  # elements (1 MiB of float32) per block of ``add_abs_``'s scratch


def add_abs_(acc: torch.Tensor, x: torch.Tensor, alpha: float) -> torch.Tensor:
    """acc += alpha * |x| in place, for acc and x of one shape and one dense contiguous layout: the same
    ``add_(abs(x), alpha=alpha)`` kernel, element by element (so the same bits), but large tensors go through in blocks
    of ``ABS_BLOCK`` elements with one reused scratch block. A fresh full-size |x| would cost its page faults on
    every call (on CPU, PyTorch hands large buffers back to the OS on free): ~5-10 ms for a 2048 x 2048 weight."""
    if acc.numel() <= ABS_BLOCK or not (acc.is_contiguous() and x.is_contiguous()) or acc.shape != x.shape:
        return acc.add_(torch.abs(x), alpha=alpha)
    flat_acc, flat_x = acc.view(-1), x.view(-1)
    scratch = torch.empty(ABS_BLOCK, dtype=x.dtype, device=x.device)
    for start in range(0, flat_acc.numel(), ABS_BLOCK):
        block = flat_x[start:start + ABS_BLOCK]
        flat_acc[start:start + ABS_BLOCK].add_(torch.abs(block, out=scratch[:block.numel()]), alpha=alpha)
    return acc


def infinite_where(rad: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``rad`` with +inf where ``mask`` holds."""
    return torch.where(mask, torch.full_like(rad, math.inf), rad)


def recentre(mid: torch.Tensor, enclosure: BallTensor) -> BallTensor:
    """Re-centre a ball on PyTorch's own midpoint (DESIGN.md §4, fused kernels and audited decompositions).

    ``enclosure`` contains the exact result (e.g. it was computed by composing ball rules of the primitives);
    ``mid`` is what the fused PyTorch kernel returned. Then |exact - mid| <= |exact - c| + |c - mid| <= r + |c - mid|,
    computed in float64 (exact widening) with one rounded subtraction and one rounded addition, each bumped up (F2).
    """
    c = enclosure.mid.detach().to(torch.float64)
    r = enclosure.rad.to(torch.float64)
    m64 = mid.detach().to(torch.float64)
    same = m64 == c  # then the shift is exactly 0 and the radius needs no rounded addition
    shift = rounding.up(torch.abs(m64 - c))
    rad = torch.where(same, r, rounding.add_up(r, shift))
    return result(mid, rad)
