"""Non-smooth rules: comparisons (bool balls), where, clamp, maximum/minimum, masked_fill, logical ops, sign
(DESIGN.md §3-4).

Two kinds of results live here.

*Bool balls* (comparisons, logical ops, any/all): ``mid`` is PyTorch's decision on the midpoints and ``rad`` a bool mask
of *undecided* elements. An element is decided only when (a) the exact real decision is the same for every point of
the input balls and (b) it equals ``mid``. (b) matters because kernels cast operands: ``x == 0.1`` with float32 ``x``
compares against float32(0.1), while the exact decision compares against the double 0.1. NaN midpoints and infinite
radii ("nothing known") are always undecided.

*Numeric balls* (where, masked_fill, clamp, maximum, minimum, fmax, fmin, sign): the midpoint is PyTorch's output and
the radius bounds |f(x) - m| for every real x in the input balls, by a monotonicity or hull argument re-centred on m.

Exact operand values (``_exact``). Every argument is read as float64 tensors (v, r) such that every real the argument
denotes lies in [v - r, v + r]: a ball's (mid, rad) widened exactly; a plain float or bool tensor (r = 0); an integer
tensor (with its exact conversion error to float64 beyond 2^53); a Python number as the exact double (ints
beyond 2^53 carry their conversion error); a bool ball as 0/1 with r = 1 where undecided. End points are rounded
outward with TwoSum (``_add_up``): the float64 sum is used as is when it is exact (so point balls compare exactly) and
bumped by one ulp otherwise (F2).
"""

from __future__ import annotations

import math
import numbers
from fractions import Fraction
from typing import NamedTuple

import torch

from ballgrad import diagnostics, fused, rounding
from ballgrad.errors import UndecidedComparisonError, UnsupportedOpError
from ballgrad.ops.common import infinite_where, result, result_in_place
from ballgrad.ops.common import mid_of as _mid
from ballgrad.ops.registry import current_op, rule
from ballgrad.tensor import BallTensor

aten = torch.ops.aten

_F64 = torch.float64
_TWO53 = 2.0**53


# ----------------------------------------------------------------------------------------------------------------------
# Exact operand values and outward end points


def _exact(x, device=None):
    """(v, r), float64: every real that argument ``x`` denotes lies in [v - r, v + r] (see the module docstring)."""
    if isinstance(x, torch.Tensor):
        if x.is_complex():
            raise TypeError("ballgrad's non-smooth rules are for real tensors")
        v = (x.mid if isinstance(x, BallTensor) else x).detach().to(_F64)
        if isinstance(x, BallTensor):
            return v, x.rad.to(_F64)  # bool rad -> 1.0 on undecided elements: a bool's value lies in {0, 1}
        if x.is_floating_point() or x.dtype == torch.bool:
            return v, torch.zeros((), dtype=_F64, device=v.device)
        # integer tensor: int32 and narrower convert exactly. int64 -> float64 rounds to nearest beyond 2^53; the
        # error n - v is then computed exactly in int64 (|n - v| <= 1024), except at |v| = 2^63, which int64 cannot
        # hold, where |n - v| <= ulp/2 <= |v| 2^-53 (also the bound used for other 64-bit integer types).
        if x.element_size() < 8:
            return v, torch.zeros((), dtype=_F64, device=v.device)
        mag = v.abs()
        bound = mag * 2.0**-53
        if x.dtype == torch.int64:
            fits = mag < 2.0**63
            back = torch.where(fits, v, torch.zeros_like(v)).to(torch.int64)
            exact_err = (x.detach() - back).abs().to(_F64)
            return v, torch.where(fits, exact_err, bound)
        return v, torch.where(mag >= _TWO53, bound, torch.zeros_like(mag))
    device = device or torch.device("cpu")
    if isinstance(x, bool):
        v, err = float(x), 0.0
    elif isinstance(x, numbers.Integral):
        try:
            v = float(x)
            err = rounding.round_up_float(abs(Fraction(int(x)) - Fraction(v)))
        except OverflowError:  # beyond every double: +-inf orders the same way against every float
            v, err = math.copysign(math.inf, int(x)), 0.0
    elif isinstance(x, numbers.Real):
        v, err = float(x), 0.0
    else:
        raise TypeError(f"unsupported operand {type(x).__name__} for a ball rule")
    return torch.tensor(v, dtype=_F64, device=device), torch.tensor(err, dtype=_F64, device=device)


def _two_sum_error(a, b, s):
    """Knuth's TwoSum: for s = fl(a + b) without overflow, a + b = s + e exactly. Any overflow makes e non-finite."""
    bb = s - a
    return (a - (s - bb)) + (b - bb)


def _add_up(a, b):
    """Upper bound of the exact a + b (float64): fl(a + b) when TwoSum shows it is not below the exact sum, else
    succ(fl(a + b)) (F2). Exact sums stay exact, so exact inputs give exact bounds."""
    s = a + b
    e = _two_sum_error(a, b, s)
    return torch.where(torch.isfinite(e) & (e <= 0), s, rounding.up(s))


def _abs_diff_up(a, b):
    """Upper bound of |a - b| (float64); 0 exactly when a == b (a zero RN difference is exact: gradual underflow)."""
    s = a - b
    e = _two_sum_error(a, -b, s)
    d = s.abs()
    return torch.where(torch.isfinite(e) & (e == 0), d, rounding.up(d))


def _end_points(x, device=None, exact=None):
    """(lo, hi), float64, with lo <= y <= hi for every real y that argument ``x`` denotes: (-inf, +inf) where the
    radius is infinite; NaN for a plain NaN value (r = 0), so that NaN-aware functions (fmax) see it."""
    v, r = _exact(x, device) if exact is None else exact
    point = r == 0
    hi = torch.where(point, v, _add_up(v, r))
    lo = torch.where(point, v, -_add_up(-v, r))
    infinite = torch.isinf(r)
    return torch.where(infinite, -math.inf, lo), torch.where(infinite, math.inf, hi)


class _Interval(NamedTuple):
    lo: torch.Tensor  # <= every real the argument denotes
    hi: torch.Tensor  # >= every real the argument denotes
    unknown: torch.Tensor  # NaN value or infinite radius: nothing is known


def _interval(x, device=None) -> _Interval:
    """``_end_points`` for decisions: NaN values become (-inf, +inf) and are flagged ``unknown`` with infinite radii."""
    v, r = _exact(x, device)
    lo, hi = _end_points(x, exact=(v, r))
    unknown = torch.isnan(v) | torch.isinf(r)
    return _Interval(torch.nan_to_num(lo, nan=-math.inf, posinf=math.inf, neginf=-math.inf),
                     torch.nan_to_num(hi, nan=math.inf, posinf=math.inf, neginf=-math.inf), unknown)


def _bool_ball(m: torch.Tensor, undecided: torch.Tensor) -> BallTensor:
    rad = torch.empty_like(m, dtype=torch.bool)
    rad.copy_(undecided.expand(m.shape))
    return BallTensor(m, rad)


def _emit_undecided(mask, detail):
    if diagnostics.is_recording():
        diagnostics.emit_mask("undecided", current_op(), mask, detail)


# ----------------------------------------------------------------------------------------------------------------------
# Comparisons


def _surely(name, a, b, device):
    """(surely_true, surely_false): the exact real decision of ``a name b`` for every point of the balls, decided with
    outward end points (conservative: an interval test that fails leaves the element undecided).

    lt: true iff hi_a < lo_b, false iff lo_a >= hi_b;  le: true iff hi_a <= lo_b, false iff lo_a > hi_b;
    gt/ge swap the operands; eq: true iff both are the same point, false iff the intervals are disjoint; ne: swapped.
    """
    if name in ("gt", "ge"):
        a, b, name = b, a, {"gt": "lt", "ge": "le"}[name]
    A, B = _interval(a, device), _interval(b, device)
    if name == "lt":
        yes, no = A.hi < B.lo, A.lo >= B.hi
    elif name == "le":
        yes, no = A.hi <= B.lo, A.lo > B.hi
    else:
        same_point = (A.lo == A.hi) & (B.lo == B.hi) & (A.lo == B.lo)
        disjoint = (A.hi < B.lo) | (B.hi < A.lo)
        yes, no = (same_point, disjoint) if name == "eq" else (disjoint, same_point)
    known = ~(A.unknown | B.unknown)
    return yes & known, no & known


def _undecided(m, yes, no):
    """Undecided unless the exact decision is constant and equals PyTorch's decision ``m``."""
    return ~((yes & m) | (no & ~m))


_COMPARISONS = {
    op: name
    for name in ("eq", "ne", "lt", "le", "gt", "ge")
    for op in (getattr(aten, name).Tensor, getattr(aten, name).Scalar)
}


@rule(*_COMPARISONS)
def compare(func, a, b):
    """eq ne lt le gt ge -> a bool ball (module docstring). Python scalars compare as their exact double, even where
    the kernel casts them (``x == 0.1`` for float32 x is undecided at x = float32(0.1), where PyTorch says True and the
    exact answer is False). An ``undecided`` event counts the undecided elements."""
    m = func(_mid(a), _mid(b))
    yes, no = _surely(_COMPARISONS[func], a, b, m.device)
    undecided = _undecided(m, yes, no)
    _emit_undecided(undecided, "comparison differs between points of the balls")
    return _bool_ball(m, undecided)


# ----------------------------------------------------------------------------------------------------------------------
# Truth values and logical ops


def _truth(x, device=None):
    """(value, undecided) of an argument used as a truth value (PyTorch's ``!= 0`` on its midpoint).

    A bool ball is its (mid, rad); plain bool/integer/float tensors are exact (NaN undecided); a numeric ball's truth
    is the comparison x != 0, decided as in ``compare``.
    """
    if isinstance(x, BallTensor) and x.dtype == torch.bool:
        return x.mid, x.rad
    if isinstance(x, torch.Tensor) and x.dtype == torch.bool:
        return x, torch.zeros((), dtype=torch.bool, device=x.device)
    if isinstance(x, torch.Tensor):
        value = _mid(x) != 0
        yes, no = _surely("ne", x, 0, x.device)
        undecided = _undecided(value, yes, no)
        if isinstance(x, BallTensor):
            _emit_undecided(undecided, "truth value (x != 0) differs between points of the ball")
        return value, undecided
    value = torch.tensor(bool(x), device=device or torch.device("cpu"))
    return value, torch.zeros((), dtype=torch.bool, device=value.device)


def _check_bool_result(func, m):
    if m.dtype != torch.bool:
        raise UnsupportedOpError(
            func, f"bitwise ops on bool balls only combine with bool operands (the result here is {m.dtype})"
        )


@rule(
    aten.logical_and.default, aten.bitwise_and.Tensor, aten.bitwise_and.Scalar, aten.bitwise_and.Scalar_Tensor,
)
def logical_and(func, a, b):
    """a and b: decided where both are decided, or where either is decided False (then the result is False)."""
    m = func(_mid(a), _mid(b))
    _check_bool_result(func, m)
    (va, ua), (vb, ub) = _truth(a, m.device), _truth(b, m.device)
    undecided = (ua | ub) & ~(~ua & ~va) & ~(~ub & ~vb)
    return _bool_ball(m, undecided)


@rule(aten.logical_or.default, aten.bitwise_or.Tensor, aten.bitwise_or.Scalar, aten.bitwise_or.Scalar_Tensor)
def logical_or(func, a, b):
    """a or b: decided where both are decided, or where either is decided True (then the result is True)."""
    m = func(_mid(a), _mid(b))
    _check_bool_result(func, m)
    (va, ua), (vb, ub) = _truth(a, m.device), _truth(b, m.device)
    undecided = (ua | ub) & ~(~ua & va) & ~(~ub & vb)
    return _bool_ball(m, undecided)


@rule(aten.logical_xor.default, aten.bitwise_xor.Tensor, aten.bitwise_xor.Scalar, aten.bitwise_xor.Scalar_Tensor)
def logical_xor(func, a, b):
    """a xor b: decided exactly where both operands are."""
    m = func(_mid(a), _mid(b))
    _check_bool_result(func, m)
    undecided = _truth(a, m.device)[1] | _truth(b, m.device)[1]
    return _bool_ball(m, undecided)


@rule(aten.logical_not.default, aten.bitwise_not.default)
def logical_not(func, a):
    """not a: decided exactly where a is."""
    m = func(_mid(a))
    _check_bool_result(func, m)
    return _bool_ball(m, _truth(a, m.device)[1])


@rule(aten.any.default, aten.any.dim, aten.any.dims, aten.all.default, aten.all.dim, aten.all.dims)
def any_all(func, x, *args, **kwargs):
    """any: decided True where some reduced element is decided True, decided False where all are decided False.
    all: decided False where some element is decided False, decided True where all are decided True.
    Both masks are reduced with the same overload and arguments (dim, keepdim) as the op."""
    m = func(_mid(x), *args, **kwargs)
    value, und = _truth(x, m.device)
    sure_true, sure_false = value & ~und, ~value & ~und
    name = func._overloadname
    any_op, all_op = getattr(aten.any, name), getattr(aten.all, name)
    if func.overloadpacket is aten.any:
        yes, no = any_op(sure_true, *args, **kwargs), all_op(sure_false, *args, **kwargs)
    else:
        yes, no = all_op(sure_true, *args, **kwargs), any_op(sure_false, *args, **kwargs)
    return _bool_ball(m, _undecided(m, yes, no))


@rule(aten.isnan.default, aten.isinf.default, aten.isposinf.default, aten.isneginf.default)
def float_class(func, x):
    """isnan/isinf/isposinf/isneginf ask about the floating-point midpoint (the value PyTorch computed), not about the
    reals in the ball (which are never NaN or infinite): the answer is PyTorch's on the midpoint, fully decided.
    A non-finite midpoint always has radius +inf, so ``isfinite``-style checks keep their usual meaning.
    (``torch.isfinite`` itself is composite and reaches ballgrad as ``x == x`` and ``abs(x) != inf``.)"""
    m = func(x.mid)
    return _bool_ball(m, torch.zeros((), dtype=torch.bool, device=m.device))


# ----------------------------------------------------------------------------------------------------------------------
# Selection: where, masked_fill


def _selector(cond):
    """(value, undecided) of a where/masked_fill condition: a bool ball or a plain bool tensor."""
    if isinstance(cond, BallTensor):
        if cond.dtype != torch.bool:
            raise TypeError(f"a where/masked_fill condition must be bool, got a {cond.dtype} ball")
        return cond.mid, cond.rad
    return cond, torch.zeros((), dtype=torch.bool, device=cond.device)


def _branch_rad(m64, x):
    """Upper bound of |y - m| for every real y that branch ``x`` denotes: r + |v - m| (float64, rounded up)."""
    v, r = _exact(x, m64.device)
    return _add_up(r, _abs_diff_up(v, m64))


def _numeric_result(m, rad64):
    """Wrap a float64 radius bound: NaN -> inf, rounded up to the radius dtype, +inf where the midpoint is not
    finite."""
    rad = rounding.to_dtype_up(rounding.clean_rad(rad64), rounding.rad_dtype(m.dtype))
    return result(m, infinite_where(rad, ~torch.isfinite(m)))


def _select(func, m, cond, on_true, on_false):
    """The ball of select(cond, on_true, on_false) whose midpoint the kernel computed as ``m``.

    Decided elements: the chosen branch y, |y - m| <= r_chosen + |v_chosen - m| (the second term is the kernel's cast
    of the branch to the result dtype, 0 when none). Undecided elements: y may come from either branch, so the radius
    is the larger of the two branch terms, i.e. >= max(r_chosen, |m_chosen - m_other| + r_other): the hull of both
    branches. An ``undecided`` event counts them. Bool results propagate undecided masks the same way; integer results
    cannot hold a hull and raise ``UndecidedComparisonError`` when the condition is undecided.
    """
    sel, und = _selector(cond)
    if diagnostics.is_recording():
        diagnostics.emit_mask("undecided", current_op(), und.expand(m.shape), "selection differs between points of the "
                              "condition's balls; result is the hull of both branches")
    if m.dtype == torch.bool:
        (vt, ut), (vf, uf) = _truth(on_true, m.device), _truth(on_false, m.device)
        undecided = torch.where(sel, ut, uf) | (und & (ut | uf | (vt != vf)))
        return _bool_ball(m, undecided)
    if not m.is_floating_point():
        if bool(und.any()):
            raise UndecidedComparisonError(
                f"{func}: an undecided condition selects between {m.dtype} values, which cannot hold a hull"
            )
        return m
    m64 = m.to(_F64)
    t_true, t_false = _branch_rad(m64, on_true), _branch_rad(m64, on_false)
    rad = torch.where(und, torch.maximum(t_true, t_false), torch.where(sel, t_true, t_false))
    return _numeric_result(m, rad)


@rule(aten.where.self, aten.where.ScalarOther, aten.where.ScalarSelf, aten.where.Scalar)
def where(func, cond, a, b):
    """where(cond, a, b): ``_select``. Python scalar branches would be their exact double, but in this PyTorch the
    Scalar overloads are composite: they (and Python's ``torch.where(c, x, 0.1)``) reach ballgrad as ``where.self``
    with the scalar already wrapped into a tensor of the result dtype, which is then an exact plain point."""
    m = func(_mid(cond), _mid(a), _mid(b))
    return _select(func, m, cond, a, b)


@rule(aten.masked_fill.Scalar, aten.masked_fill.Tensor)
def masked_fill(func, x, mask, value):
    """masked_fill(x, mask, value) = where(mask, value, x): ``_select``."""
    m = func(_mid(x), _mid(mask), _mid(value))
    return _select(func, m, mask, value, x)


# ----------------------------------------------------------------------------------------------------------------------
# clamp, maximum, minimum, fmax, fmin: monotone in every argument


def _monotone_result(m, fn, args, kink_pairs):
    """Ball of m = fn(args) computed by the kernel, where fn is non-decreasing in every argument.

    max and min are non-decreasing in each argument, hence so is clamp(x, lo, hi) = min(max(x, lo), hi) (what
    PyTorch computes; it gives hi when lo > hi). With outward float64 end points L <= U of the argument balls
    (``_end_points``), every real point p of the balls has fn(L) <= fn(p) <= fn(U), and fn(L), fn(U) evaluated in
    float64 are exact (max and min do not round). So
        r = max(0, m - fn(L), fn(U) - m),  both differences rounded up.
    This is never more than the 1-Lipschitz bound max_i r_i + |fn(v) - m| (up to the outward rounding of the end
    points), and exact where the result saturates
    (max(x, 0) with x < 0 entirely gives radius 0). m may lie outside [fn(L), fn(U)] only by the kernel's cast of its
    operands (a Python scalar bound cast to float32, or float16 computed in float32 "opmath"), which the two
    differences then measure. NaN: maximum/minimum/clamp propagate it (radius +inf through the NaN midpoint or NaN
    end value); fmax/fmin skip a plain NaN operand exactly as PyTorch does, and a NaN ball (radius +inf) has
    end points -inf/+inf, so its radius is +inf too.

    ``kink_pairs``: index pairs (i, j) whose balls touch (closed, exact ties included): the active branch is not
    decided there, recorded as a ``kink`` event (the value is continuous, so the radius above stays valid).
    """
    ends = [None if a is None else _end_points(a, m.device) for a in args]
    f_low = fn(*[None if e is None else e[0] for e in ends])
    f_high = fn(*[None if e is None else e[1] for e in ends])
    m64 = m.to(_F64)
    below, above = _add_up(m64, -f_low), _add_up(f_high, -m64)
    rad = torch.clamp_min(torch.maximum(below, above), 0)
    if diagnostics.is_recording():
        intervals = [None if a is None else _interval(a, m.device) for a in args]
        kink = torch.zeros((), dtype=torch.bool, device=m.device)
        for i, j in kink_pairs:
            A, B = intervals[i], intervals[j]
            if A is None or B is None:
                continue
            kink = kink | ((A.lo <= B.hi) & (B.lo <= A.hi) & ~A.unknown & ~B.unknown)
        diagnostics.emit_mask("kink", current_op(), kink.expand(m.shape), "argument balls straddle the switch point "
                              "of max/min/clamp")
    return _numeric_result(m, rad)


@rule(aten.clamp.default, aten.clamp.Tensor)
def clamp(func, x, min=None, max=None):
    """clamp(x, lo, hi) = min(max(x, lo), hi): ``_monotone_result``; kinks where x's ball meets lo's or hi's."""
    m = func(_mid(x), _mid(min), _mid(max))
    return _monotone_result(m, lambda v, lo, hi: torch.clamp(v, lo, hi), [x, min, max], [(0, 1), (0, 2)])


@rule(aten.clamp_min.default, aten.clamp_min.Tensor)
def clamp_min(func, x, min):
    """max(x, lo): ``_monotone_result``."""
    m = func(_mid(x), _mid(min))
    return _monotone_result(m, lambda v, lo: torch.clamp(v, min=lo), [x, min], [(0, 1)])


@rule(aten.clamp_max.default, aten.clamp_max.Tensor)
def clamp_max(func, x, max):
    """min(x, hi): ``_monotone_result``."""
    m = func(_mid(x), _mid(max))
    return _monotone_result(m, lambda v, hi: torch.clamp(v, max=hi), [x, max], [(0, 1)])


_MAX_MIN = {
    aten.maximum.default: torch.maximum,
    aten.minimum.default: torch.minimum,
    aten.fmax.default: torch.fmax,
    aten.fmin.default: torch.fmin,
}


@rule(*_MAX_MIN)
def max_min(func, a, b):
    """maximum/minimum (NaN-propagating) and fmax/fmin (NaN-ignoring): ``_monotone_result``; kinks where the balls
    touch (including exact ties)."""
    m = func(_mid(a), _mid(b))
    return _monotone_result(m, _MAX_MIN[func], [a, b], [(0, 1)])


# ----------------------------------------------------------------------------------------------------------------------
# sign


@rule(aten.sign.default, aten.sgn.default)
def sign(func, x):
    """sign is monotone with values in {-1, 0, 1}: over a ball with outward end points lo <= hi its values lie in
    [sign(lo), sign(hi)], so r = max(m - sign(lo), sign(hi) - m) (exact small integers). A ball strictly on one side
    of 0, or the exact point 0, gives r = 0; a ball containing 0 and other values gives the hull of the reachable
    signs and a ``kink`` event. (PyTorch's sign(NaN) is 0: a NaN ball denotes every real, so the hull [-1, 1] holds.)"""
    m = func(x.mid)
    lo, hi, unknown = _interval(x, m.device)
    m64 = m.to(_F64)
    rad = torch.maximum(m64 - torch.sign(lo), torch.sign(hi) - m64)
    if diagnostics.is_recording():
        diagnostics.emit_mask("kink", current_op(), (rad > 0) & ~unknown, "ball contains 0 and non-zero values")
    return _numeric_result(m, rad)


# ----------------------------------------------------------------------------------------------------------------------
# In-place logical ops on bool balls (autograd's backward formulas use logical_and_, logical_or_, logical_not_).
# The numeric in-place forms (clamp_, masked_fill_, ...) live in ``inplace.py``, which goes through the rules above.

_INPLACE_LOGICAL = {
    aten.logical_and_.default: (aten.logical_and.default, logical_and),
    aten.logical_or_.default: (aten.logical_or.default, logical_or),
    aten.logical_xor_.default: (aten.logical_xor.default, logical_xor),
    aten.logical_not_.default: (aten.logical_not.default, logical_not),
    aten.bitwise_and_.Tensor: (aten.bitwise_and.Tensor, logical_and),
    aten.bitwise_and_.Scalar: (aten.bitwise_and.Scalar, logical_and),
    aten.bitwise_or_.Tensor: (aten.bitwise_or.Tensor, logical_or),
    aten.bitwise_or_.Scalar: (aten.bitwise_or.Scalar, logical_or),
    aten.bitwise_xor_.Tensor: (aten.bitwise_xor.Tensor, logical_xor),
    aten.bitwise_xor_.Scalar: (aten.bitwise_xor.Scalar, logical_xor),
    aten.bitwise_not_.default: (aten.bitwise_not.default, logical_not),
}


@rule(*_INPLACE_LOGICAL)
def logical_inplace(func, target, *args):
    """x.op_(...) on a bool ball: the out-of-place rule's bool ball written into x.mid and x.rad (PyTorch's in-place
    kernel computes the same values). A plain bool target can take only a fully decided result."""
    functional, fn = _INPLACE_LOGICAL[func]
    res = fn(functional, target, *args)
    if res.dtype != target.dtype or res.shape != target.shape:
        raise RuntimeError(
            f"{func}: the result ({res.dtype}, {tuple(res.shape)}) cannot be stored in place into "
            f"({target.dtype}, {tuple(target.shape)})"
        )
    if isinstance(target, BallTensor):
        target.mid.copy_(res.mid)
        target.rad.copy_(res.rad)
        return target
    if bool(res.rad.any()):
        raise UndecidedComparisonError(
            f"{func}: undecided elements cannot be stored in place into a plain bool tensor; use the out-of-place op"
        )
    target.copy_(res.mid)
    return target


# ----------------------------------------------------------------------------------------------------------------------
# Piecewise activations: relu, threshold, leaky_relu, hardtanh (and argmax/argmin below)
#
# Each is a selection between branches whose values over a ball are intervals: y = x on (a, b), a constant elsewhere,
# or slope * x. For every branch that some point of the input ball can take, the branch's exact values lie in a closed
# interval [lo_k, hi_k] (float64, outward), so every exact output y satisfies |y - m| <= max(m - lo_k, hi_k - m) for
# one of those branches: ``_branch_hull`` returns the largest of these over the possible branches, rounded up. That is
# the hull of the one-sided values where a ball straddles a switch point (a ``kink`` event), and exact (radius 0) where
# the kernel's midpoint equals a constant branch that is certain. The kernel's casts (a Python threshold or slope
# cast to float32) are covered because the branches are the exact real ones and m is whatever the kernel computed.


def _python_double(value, what: str) -> float:
    """A Python number argument (threshold, slope, bound) as the exact double it denotes; finite."""
    if (type(value) is float or (type(value) is int and abs(value) <= 2**53)) and math.isfinite(value):
        return float(value)  # exactly the double (an int up to 2^53 converts exactly): no tensors, ~30 us less
    v, err = _exact(value)
    if float(err) != 0 or not math.isfinite(float(v)):
        raise UnsupportedOpError(current_op(), f"{what} {value!r} must be a finite number exactly representable as a "
                                 "double")
    return float(v)


def _branch_hull(m: torch.Tensor, branches) -> torch.Tensor:
    """max over possible branches k of max(m - lo_k, hi_k - m), each difference rounded up (``_add_up``), as float64.
    ``branches``: (possible, lo, hi) with float64 tensors broadcastable to m."""
    m64 = m.detach().to(_F64)
    rad = torch.zeros_like(m64)
    for possible, lo, hi in branches:
        spread = torch.maximum(_add_up(m64, -lo), _add_up(hi, -m64))
        rad = torch.where(possible, torch.maximum(rad, spread), rad)
    return rad


def _emit_kink(mask: torch.Tensor, m: torch.Tensor, detail: str) -> None:
    if diagnostics.is_recording():
        diagnostics.emit_mask("kink", current_op(), mask.expand(m.shape), detail)


def _scaled_interval(slope: float, lo: torch.Tensor, hi: torch.Tensor):
    """Outward float64 bounds of {slope * t : t in [lo, hi]} (F2 on each product; slope 0 gives exactly 0)."""
    if slope == 0:
        zero = torch.zeros_like(lo)
        return zero, zero
    a, b = lo * slope, hi * slope
    return rounding.down(torch.minimum(a, b)), rounding.up(torch.maximum(a, b))


@rule(aten.relu.default)
def relu(func, x):
    """relu(x) = max(x, 0): branches x on [max(lo, 0), hi] (if hi > 0) and 0 (if lo <= 0), ``_branch_hull``.

    Kink marker: where the ball touches 0 (lo <= 0 <= hi, an exact point 0 included), the radius is at least the
    smallest subnormal eta of the radius dtype. This is sound (any radius >= the true error is) and costs nothing, and
    it lets ``threshold_backward`` -- which autograd calls with relu's *result* -- tell "pre-activation at the kink"
    (result ball not a point) from "pre-activation strictly negative" (result exactly the point 0): see
    ``backward.threshold_backward``. A ``kink`` event counts the touching elements."""
    m = func(x.mid)
    if x.rad.shape == m.shape and x.rad.dtype == rounding.rad_dtype(m.dtype):
        return _relu_fast(m, x.mid, x.rad)
    lo, hi, unknown = _interval(x, m.device)
    zero = torch.zeros((), dtype=_F64, device=m.device)
    rad = _branch_hull(m, [(hi > 0, torch.maximum(lo, zero), hi), (lo <= 0, zero, zero)])
    touch = (lo <= 0) & (hi >= 0) & ~unknown
    rad = torch.where(touch, torch.clamp_min(rad, rounding.eta(rounding.rad_dtype(m.dtype))), rad)
    _emit_kink(touch, m, "pre-activation ball touches 0 (relu's switch point)")
    return _numeric_result(m, rad)


def _relu_fast(m, xm, xr):
    """relu in the radius dtype, no float64 end points: relu is 1-Lipschitz and relu(xm) is computed exactly, so
    |relu(t) - m| <= |t - xm| <= r for every t in the ball: radius r. Where the ball lies below 0 (xm + r < 0, decided
    exactly by the float comparison -xm > r) every point gives exactly 0 = m: radius 0. Where it touches 0
    (neither) the values fill [0, xm + r]: around m = xm >= 0 the radius is max(xm, r) = r, around m = 0 (xm < 0) it
    is xm + r, rounded up (``_add_up``: exact sums stay exact); either way at least eta, the kink marker. A NaN or infinite midpoint gets +inf
    (``result_in_place``).

    Memory: the output's radius buffer is the only full-size float temporary: it holds -xm (exact) for the
    comparisons, then the 0/1 indicator of "not below", -xm <= xr (``le_`` writes 1.0 where it holds), times xr (a
    multiply by the indicator is 3x faster than torch.where on CPU; xr >= 0 is finite or +inf, and +inf only where the
    ball touches 0, so inf * 0 never arises). ``fused.relu_radius`` computes the same, bit for bit, in one pass (the
    kink event, which needs the mask, takes this path)."""
    if fused.applies(m, xm, xr) and not diagnostics.is_recording():
        rad, _ = fused.relu_radius(xm, xr, m, rounding.eta(xr.dtype))
        return BallTensor(m, rad)
    rad = torch.neg(xm) if xm.dtype == xr.dtype else xm.to(xr.dtype).neg_()  # xr has the radius dtype
    touch = torch.gt(rad, xr)  # below
    touch |= torch.gt(xm, xr)  # above
    touch.logical_not_()
    rad.le_(xr).mul_(xr)
    n_touch = int(torch.count_nonzero(touch))
    if n_touch:  # gather the touching elements when they are few (usual), full-size passes when they are many
        if 8 * n_touch < touch.numel():
            where = touch.nonzero(as_tuple=True)  # once (each boolean-mask index would search the mask again)
            xm_t, xr_t = xm[where], xr[where]
            hull = torch.where(xm_t < 0, _add_up(xm_t, xr_t), xr_t)
            rad = rad.index_put_(where, torch.clamp_min(hull, rounding.eta(xr.dtype)))
        else:
            hull = torch.where(xm < 0, _add_up(xm, xr), xr)
            rad = torch.where(touch, torch.clamp_min(hull, rounding.eta(xr.dtype)), rad)
        if diagnostics.is_recording():
            _emit_kink(touch & ~torch.isnan(xm) & ~torch.isinf(xr), m, "pre-activation ball touches 0 (relu's switch "
                       "point)")
    del touch
    return result_in_place(m, rad)


@rule(aten.threshold.default)
def threshold(func, x, threshold, value):
    """threshold(x, th, v) = x if x > th else v (th, v exact doubles): branches x on [max(lo, th), hi] (if hi > th)
    and v (if lo <= th), ``_branch_hull``; a ``kink`` event where the ball touches th (exact points included: the
    backward rule gets this input and cannot tell a point at th from relu's inactive output when th = 0)."""
    m = func(x.mid, threshold, value)
    th = _python_double(threshold, "threshold")
    v = _python_double(value, "value")
    lo, hi, unknown = _interval(x, m.device)
    th_t = torch.tensor(th, dtype=_F64, device=m.device)
    v_t = torch.tensor(v, dtype=_F64, device=m.device)
    rad = _branch_hull(m, [(hi > th, torch.maximum(lo, th_t), hi), (lo <= th, v_t, v_t)])
    _emit_kink((lo <= th) & (hi >= th) & ~unknown, m, "input ball touches the threshold")
    return _numeric_result(m, rad)


@rule(aten.leaky_relu.default)
def leaky_relu(func, x, negative_slope=0.01):
    """leaky_relu(x) = x if x > 0 else s x (s the exact double): branches x on [max(lo, 0), hi] (if hi > 0) and
    s [lo, min(hi, 0)] (if lo <= 0, products rounded outward), ``_branch_hull``; ``kink`` where the ball touches 0."""
    m = func(x.mid, negative_slope)
    s = _python_double(negative_slope, "negative_slope")
    lo, hi, unknown = _interval(x, m.device)
    zero = torch.zeros((), dtype=_F64, device=m.device)
    neg_lo, neg_hi = _scaled_interval(s, lo, torch.minimum(hi, zero))
    rad = _branch_hull(m, [(hi > 0, torch.maximum(lo, zero), hi), (lo <= 0, neg_lo, neg_hi)])
    _emit_kink((lo <= 0) & (hi >= 0) & ~unknown, m, "input ball touches 0 (leaky_relu's switch point)")
    return _numeric_result(m, rad)


@rule(aten.hardtanh.default)
def hardtanh(func, x, min_val=-1, max_val=1):
    """hardtanh(x) = min_val if x <= min_val, max_val if x >= max_val, else x (bounds exact doubles): branches the
    two constants (possible if lo <= min_val, resp. hi >= max_val) and x on [max(lo, min_val), min(hi, max_val)]
    (possible if hi > min_val and lo < max_val), ``_branch_hull``; ``kink`` where the ball touches either bound."""
    m = func(x.mid, min_val, max_val)
    a = _python_double(min_val, "min_val")
    b = _python_double(max_val, "max_val")
    lo, hi, unknown = _interval(x, m.device)
    a_t = torch.tensor(a, dtype=_F64, device=m.device)
    b_t = torch.tensor(b, dtype=_F64, device=m.device)
    rad = _branch_hull(m, [
        (lo <= a, a_t, a_t),
        (hi >= b, b_t, b_t),
        ((hi > a) & (lo < b), torch.maximum(lo, a_t), torch.minimum(hi, b_t)),
    ])
    touch = ((lo <= a) & (hi >= a)) | ((lo <= b) & (hi >= b))
    _emit_kink(touch & ~unknown, m, "input ball touches min_val or max_val")
    return _numeric_result(m, rad)


@rule(aten.argmax.default, aten.argmin.default)
def argmax_argmin(func, x, dim=None, keepdim=False):
    """Indices of the largest (smallest) element: PyTorch's answer on the midpoints, a plain integer tensor (indices
    are exact by nature). Where another element's ball reaches the winner's (closed: ties count), or the winner is
    unknown (NaN/infinite radius), the exact arg-max is not the same for every point of the balls: a ``kink`` event
    counts those positions (gradients routed through such indices are one of several one-sided values)."""
    if isinstance(x, BallTensor) and not x.is_floating_point():
        raise UnsupportedOpError(func, "argmax/argmin of bool (comparison) balls; use .mid")
    idx = func(x.mid, dim, keepdim)
    if diagnostics.is_recording() and x.numel() > 0:
        lo, hi, unknown = _interval(x, idx.device)
        if dim is None:
            lo, hi, unknown, d = lo.reshape(-1), hi.reshape(-1), unknown.reshape(-1), 0
            win = idx.reshape(1)
        else:
            d = dim % max(x.dim(), 1)
            if x.dim() == 0:
                lo, hi, unknown = lo.reshape(1), hi.reshape(1), unknown.reshape(1)
            win = idx if keepdim or x.dim() == 0 else idx.unsqueeze(d)
            win = win.reshape([1] * lo.dim()) if win.dim() < lo.dim() else win
        if func is aten.argmax.default:
            rivals = hi >= torch.gather(lo, d, win)
        else:
            rivals = lo <= torch.gather(hi, d, win)
        undecided = (rivals.sum(d) > 1) | torch.gather(unknown, d, win).squeeze(d)
        diagnostics.emit("kink", current_op(), int(undecided.sum()), "arg-max/arg-min not decided (balls overlap)")
    return idx


# ----------------------------------------------------------------------------------------------------------------------
# Step functions: floor, ceil, round, trunc, frac, signbit, heaviside, nan_to_num
#
# Lemma T (steps): floor, ceil, trunc and round (half to even, PyTorch's nearbyint) are non-decreasing and integer
# valued, and exact on float64 numbers. Over a ball with outward end points lo <= hi (``_interval``) the exact values
# lie in [f(lo), f(hi)], so r = max(f(hi) - m, m - f(lo)) (exact small differences, rounded up): 0 for a ball inside
# one step, the hull of the reachable steps and a ``kink`` event for a ball straddling a step.

_STEPS = {
    aten.floor.default: torch.floor,
    aten.ceil.default: torch.ceil,
    aten.trunc.default: torch.trunc,
    aten.round.default: torch.round,
    aten.fix.default: torch.trunc,
}


@rule(*_STEPS)
def step(func, x):
    """floor ceil trunc round (fix): lemma T."""
    m = func(x.mid)
    f = _STEPS[func]
    lo, hi, unknown = _interval(x, m.device)
    f_lo, f_hi = f(lo), f(hi)
    m64 = m.to(_F64)
    rad = torch.clamp_min(torch.maximum(_add_up(f_hi, -m64), _add_up(m64, -f_lo)), 0)
    rad = torch.where(unknown, torch.full_like(rad, math.inf), rad)
    if diagnostics.is_recording():
        diagnostics.emit_mask("kink", current_op(), (f_lo != f_hi) & ~unknown, "ball straddles a step")
    return _numeric_result(m, rad)


@rule(aten.frac.default)
def frac(func, x):
    """frac(x) = x - trunc(x) (exact in floating point). Ball inside one trunc step k: the values are x - k over
    [lo - k, hi - k] (outward); a ball across steps: the hull of the pieces' ranges, [0, 1) for lo >= 0, (-1, 0] for
    hi <= 0, (-1, 1) otherwise, and a ``kink`` event."""
    m = func(x.mid)
    lo, hi, unknown = _interval(x, m.device)
    k_lo, k_hi = torch.trunc(lo), torch.trunc(hi)
    same = k_lo == k_hi
    low = torch.where(same, -_add_up(-lo, k_lo), torch.where(lo >= 0, 0.0, -1.0).to(_F64))
    high = torch.where(same, _add_up(hi, -k_hi), torch.where(hi <= 0, 0.0, 1.0).to(_F64))
    m64 = m.to(_F64)
    rad = torch.clamp_min(torch.maximum(_add_up(high, -m64), _add_up(m64, -low)), 0)
    rad = torch.where(unknown, torch.full_like(rad, math.inf), rad)
    if diagnostics.is_recording():
        diagnostics.emit_mask("kink", current_op(), ~same & ~unknown, "ball straddles an integer")
    return _numeric_result(m, rad)


@rule(aten.signbit.default)
def signbit(func, x):
    """signbit as the real decision x < 0 (a bool ball, decided as ``compare`` decides lt). PyTorch's signbit(-0.0)
    is True while the real 0 is not negative: such an element is undecided."""
    m = func(x.mid)
    yes, no = _surely("lt", x, 0, m.device)
    return _bool_ball(m, _undecided(m, yes, no))


@rule(aten.heaviside.default)
def heaviside(func, x, values):
    """0 for x < 0, 1 for x > 0, ``values`` at x = 0. The reachable results over the balls: 0 if lo < 0, 1 if hi > 0,
    the values' ball if the ball contains 0; r = max |candidate - m| over them (the values' radius added), exact when
    the ball is on one side of 0."""
    m = func(x.mid, _mid(values))
    lo, hi, unknown = _interval(x, m.device)
    m64 = m.to(_F64)
    zero = torch.zeros_like(m64)
    cands = [torch.where(lo < 0, _abs_diff_up(zero, m64), zero),
             torch.where(hi > 0, _abs_diff_up(torch.ones_like(m64), m64), zero),
             torch.where((lo <= 0) & (hi >= 0), _branch_rad(m64, values), zero)]
    rad = torch.maximum(torch.maximum(cands[0], cands[1]), cands[2])
    rad = torch.where(unknown, torch.full_like(rad, math.inf), rad)
    if diagnostics.is_recording():
        diagnostics.emit_mask("kink", current_op(), (lo <= 0) & (hi >= 0) & (lo < hi) & ~unknown, "ball contains 0")
    return _numeric_result(m, rad)


@rule(aten.nan_to_num.default)
def nan_to_num(func, x, nan=None, posinf=None, neginf=None):
    """The identity on finite midpoints (radius unchanged); a NaN or infinite midpoint is a ball that denotes every
    real, so the replaced value gets radius +inf."""
    m = func(x.mid, nan, posinf, neginf)
    finite = torch.isfinite(x.mid)
    rad = torch.where(finite, x.rad, torch.full_like(x.rad, math.inf))
    return result(m, rad)
