"""Arithmetic rules: + - * / neg abs reciprocal addcmul addcdiv (DESIGN.md §4, rounding model F1/F2).

Notation in the derivations: balls A = (ma, ra), B = (mb, rb) as the kernel uses them (``common.operand``), m the
computed midpoint, u/eta the F1 constants of the result dtype (``rounding.op_roundoff``/``op_underflow``).
Every radius expression is a sum of pairwise products of non-negative inputs, turned into an upper bound by
``rounding.inflate(c, n)`` with n the number of operations in c (its docstring has the proof).
"""

from __future__ import annotations

import functools
import math
from fractions import Fraction

import torch

from ballgrad import diagnostics, fused, rounding
from ballgrad.errors import UnsupportedOpError
from ballgrad.ops.common import mid_of as _mid
from ballgrad.ops.common import operand, result
from ballgrad.ops.registry import current_op, rule
from ballgrad.tensor import BallTensor

aten = torch.ops.aten


def _constants(dtype):
    return rounding.op_roundoff(dtype), rounding.op_underflow(dtype)


_SINGLE_ROUNDING = (torch.float32, torch.float64)  # kernels round once, in the midpoint dtype


def _exact_or_inflated(points: torch.Tensor, propagation: torch.Tensor, error: torch.Tensor, n_ops: int):
    """``error`` (an exact rounding error) where both operands are points (``points``: both radii exactly 0 -- not
    ``propagation == 0``, which a product of tiny radii can underflow to), else inflate(propagation + error, n_ops):
    the exact error needs no inflation, the propagation terms do. ``propagation`` is the caller's fresh tensor
    (the sum is accumulated in it when it has the error's shape)."""
    c = propagation.add_(error) if propagation.shape == error.shape else torch.add(propagation, error)
    return torch.where(points, error, rounding.inflate_(c, n_ops))


def _add_rad(m, a, b, alpha, sign=1):
    """|x + sign*alpha*y - m| for x in A, y in B, alpha a Python number, sign = +1 (add) or -1 (sub, rsub).

    alpha == 1: ra + rb + |ma +- mb - m|, the last term exact by TwoSum (``rounding.exact_sum_error``) for
    float32/float64 (one rounding), else u|m| (F1 for the one rounded addition; no eta for +; float16/bfloat16
    kernels round twice).
    otherwise, alpha' = the kernel's cast of alpha with |alpha - alpha'| <= ralpha (``operand``), m = RN(ma + RN(alpha' mb))
    or one FMA: |x + alpha y - m| <= ra + |alpha| rb + ralpha |mb| + u|m| + u(1+u)|alpha'||mb| + eta/2,
    bounded by ra + Aup rb + C|mb| + u|m| + eta with Aup >= |alpha'| + ralpha and C >= ralpha + 2u Aup rounded up
    (the two |mb| terms folded into one constant: 3 products and 4 additions, hence ``inflate(c, 7)``).
    """
    ma, ra = operand(a, m.dtype)
    mb, rb = operand(b, m.dtype)
    u, eta = _constants(m.dtype)
    if alpha == 1:
        # the formula below in one pass, bit for bit (``fused.add_radius``), on the operands broadcast to m's shape
        dense = fused.dense_operands(m, ma, mb, ra, rb)
        if dense is not None:
            rad = fused.add_radius(dense[0], dense[1], float(sign), m, dense[2], dense[3],
                                   *rounding.inflation_constants(2, m.dtype))
            if rad is not None:
                return rad
        if m.dtype in _SINGLE_ROUNDING:  # the exact rounding error (TwoSum) instead of u|m|
            error = rounding.exact_sum_error(ma, mb if sign == 1 else torch.neg(mb), m)  # negation is exact
            propagation = ra + rb  # 0 exactly when both radii are (a sum of non-negative floats never underflows)
            return _exact_or_inflated(propagation == 0, propagation, error, 2)
        return rounding.inflate(ra + rb + torch.abs(m).to(ra.dtype) * u, 3)
    abs_m = torch.abs(m).to(ra.dtype)
    a_up, coef = alpha_constants(alpha, m.dtype, ra.dtype)
    # c = |m| u + ra + a_up rb + coef |mb|, accumulated in place in the fresh |m| (3 products, 3 additions); the + eta
    # is left to inflate, whose absolute term (n+1) eta (1+u)^n/(1-u) exceeds (1+u)^n (eta + n eta/2) for n >= 1
    c = abs_m.mul_(u)
    c.add_(ra).add_(rb, alpha=a_up).add_(torch.abs(mb).to(c.dtype), alpha=coef)
    return rounding.inflate(c, 7)


@functools.lru_cache(maxsize=256)
def alpha_constants(alpha: float, mid_dtype: torch.dtype, rad_dtype: torch.dtype) -> tuple[float, float]:
    """(Aup, C) of ``_add_rad``'s alpha != 1 bound: Aup >= |alpha'| + ralpha, C >= ralpha + 2u Aup, rounded up, where
    alpha' is the kernel's cast of the Python number alpha to ``mid_dtype`` and ralpha = |alpha - alpha'|."""
    mal, ral = operand(alpha, mid_dtype)
    u = rounding.op_roundoff(mid_dtype)
    a_up = rounding.round_up_float(abs(float(mal)) + float(ral), rad_dtype)
    coef = rounding.round_up_float(Fraction(float(ral)) + Fraction(rounding.round_up_float(2 * u * a_up, rad_dtype)),
                                   rad_dtype)
    return a_up, coef


def _non_float(func, m, a, b, logical):
    """A bool result (bool balls combined, e.g. ``isfinite`` = (x == x) * (|x| != inf)): bool * bool is logical and,
    bool + bool logical or (``nonsmooth``'s three-valued rules). Any other non-floating result is refused."""
    if m.dtype == torch.bool and logical is not None:
        from ballgrad.ops import nonsmooth

        return getattr(nonsmooth, logical)(func, a, b)
    raise UnsupportedOpError(func, f"a {m.dtype} result of balls has no radius to carry")


@rule(aten.add.Tensor, aten.add.Scalar)
def add(func, a, b, *, alpha=1):
    """x + alpha*y: see ``_add_rad``."""
    m = func(_mid(a), _mid(b), alpha=alpha)
    if not m.is_floating_point():
        return _non_float(func, m, a, b, "logical_or" if alpha == 1 else None)
    return result(m, _add_rad(m, a, b, alpha))


@rule(aten.sub.Tensor, aten.sub.Scalar)
def sub(func, a, b, *, alpha=1):
    """x - alpha*y = x + (-alpha)*y: the add bound with |alpha| (negation is exact)."""
    m = func(_mid(a), _mid(b), alpha=alpha)
    return result(m, _add_rad(m, a, b, alpha, sign=-1))


@rule(aten.rsub.Tensor, aten.rsub.Scalar)
def rsub(func, a, b, *, alpha=1):
    """y - alpha*x: the add bound with the operands swapped."""
    m = func(_mid(a), _mid(b), alpha=alpha)
    return result(m, _add_rad(m, b, a, alpha, sign=-1))


@rule(aten.mul.Tensor, aten.mul.Scalar)
def mul(func, a, b):
    """|xy - m| <= |xy - ma mb| + |ma mb - m| <= |ma| rb + |mb| ra + ra rb + |ma mb - m|: the last term exact
    (TwoProduct) for float32/float64 where computable, else u|m| + eta/2 (F1); inflated over the propagation sum."""
    m = func(_mid(a), _mid(b))
    if not m.is_floating_point():
        return _non_float(func, m, a, b, "logical_and")
    ma, ra = operand(a, m.dtype)
    mb, rb = operand(b, m.dtype)
    if m.dtype in _SINGLE_ROUNDING:  # |ma mb - m| exactly (``rounding.exact_product_error``) instead of u|m| + eta
        error = rounding.exact_product_error(ma, mb, m)
        propagation = torch.abs(ma) * rb + torch.abs(mb) * ra + ra * rb
        return result(m, _exact_or_inflated((ra == 0) & (rb == 0), propagation, error, 6))
    u, eta = _constants(m.dtype)
    c = torch.abs(ma) * rb + torch.abs(mb) * ra + ra * rb + torch.abs(m).to(ra.dtype) * u + eta
    return result(m, rounding.inflate(c, 8))


def _quotient_rad(m, ma, ra, mb, rb, dtype):
    """|x/y - m| for x in A, y in B with 0 not in B.

    x/y - m = (x - m y)/y and |x - m y| <= ra + |m| rb + |ma - m mb'|, where mb' is the divisor the kernel used
    (|mb' - mb| <= 2 rb, see ``operand``) and |ma - m mb'| = |mb'| |ma/mb' - m| <= (|mb| + 2 rb)(u|m| + eta/2) (F1);
    |y| >= |mb| - rb. Numerator and denominator are rounded outward (F2) and the quotient up.
    Where |mb| <= rb the ball contains 0: radius +inf and a ``domain`` event.
    """
    u, eta = _constants(dtype)
    abs_m = torch.abs(m).to(rb.dtype)
    abs_mb = torch.abs(mb)
    divisor_up = rounding.up(abs_mb + 2 * rb)
    residual = rounding.inflate(abs_m * u + eta, 2)
    numerator = rounding.inflate(ra + abs_m * rb + divisor_up * residual, 4)
    denominator = rounding.sub_down(abs_mb, rb)
    safe = denominator > 0
    rad = torch.where(safe, rounding.div_up(numerator, denominator), torch.full_like(numerator, math.inf))
    if diagnostics.is_recording():
        diagnostics.emit_mask("domain", current_op(), ~safe & torch.isfinite(abs_mb), "divisor ball contains 0")
    return rad


@rule(aten.div.Tensor, aten.div.Scalar)
def div(func, a, b):
    """x / y: see ``_quotient_rad``."""
    m = func(_mid(a), _mid(b))
    fast = _divided_by_number(m, a, b)
    if fast is not None:
        return fast
    ma, ra = operand(a, m.dtype)
    mb, rb = operand(b, m.dtype)
    return result(m, _quotient_rad(m, ma, ra, mb, rb, m.dtype))


def _divided_by_number(m: torch.Tensor, a, b) -> BallTensor | None:
    """``_quotient_rad`` for a dense float32/float64 ball divided by a Python number (a mean's backward, a scale) as
    ``fused.div_number_radius`` (one pass, bit for bit), or None where that does not apply (the torch formulas run;
    also where the divisor's ball contains 0, which they report)."""
    if type(b) not in (int, float) or type(a) is not BallTensor or m.dtype not in _SINGLE_ROUNDING:
        return None
    dense = fused.dense_operands(m, a.rad)  # the kernel reads m and ra only; an expanded ra (a mean's backward) is
    if dense is None:                       # made dense, the elementwise formula giving the same bits either way
        return None
    scalars = _number_divisor(float(b), m.dtype) if type(b) is float or abs(b) <= 2**53 else None  # (exact doubles)
    if scalars is None:
        return None
    u, eta = _constants(m.dtype)
    inflations = rounding.inflation_constants(2, m.dtype), rounding.inflation_constants(4, m.dtype)
    return BallTensor(m, fused.div_number_radius(m, dense[0], *scalars, u, eta, *inflations))


@functools.lru_cache(maxsize=1024)
def _number_divisor(b: float, dtype: torch.dtype) -> tuple[float, float, float] | None:
    """(rb, up(|mb| + 2 rb), down(|mb| - rb)) of ``_quotient_rad`` for the divisor b (``operand``: the kernel's cast
    mb and its error rb), by the reference's own torch operations; None where the divisor ball contains 0."""
    mb, rb = operand(b, dtype)
    abs_mb = torch.abs(mb)
    divisor_up = rounding.up(abs_mb + 2 * rb)
    denominator = rounding.sub_down(abs_mb, rb)
    if not bool(denominator > 0):
        return None
    return float(rb), float(divisor_up), float(denominator)


@rule(aten.div.Tensor_mode, aten.div.Scalar_mode)
def div_mode(func, a, b, *, rounding_mode=None):
    """rounding_mode=None is true division. 'trunc'/'floor' are the step functions trunc(x/y), floor(x/y) of the
    exact quotient (PyTorch's kernels round the quotient first, so their midpoint may be off by one step; the radius
    measures that too): ``_quotient_step``."""
    m = func(_mid(a), _mid(b), rounding_mode=rounding_mode)
    if rounding_mode is None:
        ma, ra = operand(a, m.dtype)
        mb, rb = operand(b, m.dtype)
        return result(m, _quotient_rad(m, ma, ra, mb, rb, m.dtype))
    return _quotient_step(func, m, a, b, rounding_mode)


@rule(aten.floor_divide.default, aten.floor_divide.Scalar)
def floor_divide(func, a, b):
    """floor(x/y) of the exact quotient: ``_quotient_step``."""
    return _quotient_step(func, func(_mid(a), _mid(b)), a, b, "floor")


def _fraction_of_arb(v):
    """An ``arb`` holding an exact number (lower()/upper()) as a Fraction."""
    from fractions import Fraction

    man, exp = v.mid().man_exp()
    return Fraction(int(man)) * Fraction(2) ** int(exp)


def _step_bounds(t, mode):
    """Integer end points (Fractions) of mode(t) over the arb ball t: trunc/floor/round-half-even are monotone."""
    import math as _math
    from fractions import Fraction

    def f(q: Fraction):
        if mode == "floor":
            return Fraction(_math.floor(q))
        if mode == "trunc":
            return Fraction(int(q))
        return Fraction(round(q))  # Python rounds a Fraction half to even: nearbyint

    return f(_fraction_of_arb(t.lower())), f(_fraction_of_arb(t.upper()))


def _quotient_step(func, m, a, b, mode):
    """Lemma A with an exact step: t = x/y over the balls (Arb; a divisor ball containing 0 is a domain violation),
    mode(t) lies between mode of t's end points (monotone), and the result is the hull of those integers."""
    from flint import arb, fmpq

    def fn(x, y):
        if y.contains(0):
            return None
        lo, hi = _step_bounds(x / y, mode)
        return arb.union(arb(fmpq(lo.numerator, lo.denominator)), arb(fmpq(hi.numerator, hi.denominator)))

    from ballgrad.ops.elementwise import _arb_ball

    return _arb_ball(func, m, [a, b], fn, "quotient with a divisor ball containing 0")


def _remainder_fn(mode):
    """x - q y with q = trunc(x/y) (fmod) or floor(x/y) (remainder). Where q is the same over the balls the value is
    x - q y (Arb); otherwise the hull of the pieces: fmod takes x's sign, |fmod| < |y|; remainder takes y's sign,
    |remainder| < |y|."""

    def fn(x, y):
        from flint import arb, fmpq

        if y.contains(0):
            return None
        lo, hi = _step_bounds(x / y, "trunc" if mode == "fmod" else "floor")
        if lo == hi:
            return x - arb(fmpq(lo.numerator, lo.denominator)) * y
        bound = abs(y).upper()
        if mode == "fmod":
            low = -bound if not x >= 0 else arb(0)
            high = bound if not x <= 0 else arb(0)
        else:
            low = -bound if not y > 0 else arb(0)
            high = bound if not y < 0 else arb(0)
        return arb.union(low, high)

    return fn


_REMAINDERS = {
    aten.fmod.Tensor: "fmod",
    aten.fmod.Scalar: "fmod",
    aten.remainder.Tensor: "remainder",
    aten.remainder.Scalar: "remainder",
    aten.remainder.Scalar_Tensor: "remainder",
}


@rule(*_REMAINDERS)
def remainders(func, a, b):
    """fmod(x, y) = x - trunc(x/y) y and remainder(x, y) = x - floor(x/y) y of the exact arguments, discontinuous
    where x/y crosses an integer: lemma A (elementwise.py) with ``_remainder_fn``; a ``domain`` event (+inf) where the
    divisor ball contains 0."""
    from ballgrad.ops.elementwise import _arb_ball

    m = func(_mid(a), _mid(b))
    return _arb_ball(func, m, [a, b], _remainder_fn(_REMAINDERS[func]), "divisor ball contains 0")


@rule(aten.round.decimals)
def round_decimals(func, x, *, decimals=0):
    """round(x 10^d) / 10^d (half to even) of the exact x: monotone in x, so between the rounded end points of
    t = x 10^d (Arb), divided exactly by 10^d (lemma A)."""
    from flint import arb, fmpq

    from ballgrad.ops.elementwise import _arb_ball

    d = int(decimals)
    scale = fmpq(10) ** d if d >= 0 else fmpq(1, 10 ** (-d))

    def fn(t):
        lo, hi = _step_bounds(t * arb(scale), "round")
        return arb.union(arb(fmpq(lo.numerator, lo.denominator) / scale), arb(fmpq(hi.numerator, hi.denominator) / scale))

    return _arb_ball(func, func(_mid(x), decimals=decimals), [x], fn, "round")


@rule(aten.reciprocal.default)
def reciprocal(func, a):
    """1/y: ``_quotient_rad`` with the exact numerator 1 (ra = 0)."""
    m = func(_mid(a))
    mb, rb = operand(a, m.dtype)
    one = torch.ones((), dtype=rb.dtype)
    return result(m, _quotient_rad(m, one, torch.zeros_like(one), mb, rb, m.dtype))


@rule(aten.neg.default)
def neg(func, a):
    """-x is exact: the radius is unchanged."""
    return result(func(_mid(a)), a.rad.clone())


@rule(aten.abs.default)
def abs_(func, a):
    """abs is exact and 1-Lipschitz (| |x| - |m| | <= |x - m|): the radius is unchanged."""
    return result(func(_mid(a)), a.rad.clone())


@rule(aten.addcmul.default)
def addcmul(func, s, t1, t2, *, value=1):
    """s + v t1 t2, computed by the kernel as s' + (v' m1) m2 (v' the cast of v, |v - v'| <= rv, V >= |v'| + rv).

    Propagation: |v t1 t2 - v' m1 m2| <= V(|m1| r2 + |m2| r1 + r1 r2) + rv |m1||m2|, plus rs.
    Rounding, at most three roundings in any grouping or with FMA: u|m| + 3u P + (1 + V + |m1| + |m2|) eta with
    P = V|m1||m2| (an underflowed partial product can be scaled by the third factor).
    Three-factor products are formed as up(.) bounds first (F2) so that ``inflate``'s pairwise form holds.
    """
    m = func(_mid(s), _mid(t1), _mid(t2), value=value)
    ms, rs = operand(s, m.dtype)
    m1, r1 = operand(t1, m.dtype)
    m2, r2 = operand(t2, m.dtype)
    mv, rv = operand(value, m.dtype)
    v_up = rounding.round_up_float(abs(float(mv)) + float(rv), rs.dtype)
    u, eta = _constants(m.dtype)
    a1, a2 = torch.abs(m1), torch.abs(m2)
    r1v, r2v = rounding.mul_up(r1, v_up), rounding.mul_up(r2, v_up)
    prod = rounding.mul_up(a1, a2)
    k = rounding.round_up_float(float(rv) + 3 * u * v_up, rs.dtype)
    eta_k = rounding.round_up_float((1 + v_up) * eta, rs.dtype)
    c = rs + a1 * r2v + a2 * r1v + r1 * r2v + prod * k + torch.abs(m).to(rs.dtype) * u + (a1 + a2) * eta + eta_k
    return result(m, rounding.inflate(c, 16))


@rule(aten.addcdiv.default)
def addcdiv(func, s, t1, t2, *, value=1):
    """s + v t1/t2, computed by the kernel as s' + (v' m1)/m2 (or v'(m1/m2), or with FMA).

    Propagation: rs + V D + rv Q with D >= |t1/t2 - m1/m2| = (r1|m2| + |m1| r2)/(|m2|(|m2| - r2)) and Q >= |m1|/|m2|.
    Rounding in any of those groupings: u|m| + 3u V Q + eta (1 + V + 1/|m2|) (an underflowed v' m1 is divided by
    m2). Where |m2| <= r2 the divisor ball contains 0: +inf and a ``domain`` event.
    """
    m = func(_mid(s), _mid(t1), _mid(t2), value=value)
    ms, rs = operand(s, m.dtype)
    m1, r1 = operand(t1, m.dtype)
    m2, r2 = operand(t2, m.dtype)
    mv, rv = operand(value, m.dtype)
    v_up = rounding.round_up_float(abs(float(mv)) + float(rv), rs.dtype)
    u, eta = _constants(m.dtype)
    a1, a2 = torch.abs(m1), torch.abs(m2)
    gap = rounding.sub_down(a2, r2)
    safe = gap > 0
    d_num = rounding.inflate(r1 * a2 + a1 * r2, 3)
    d_den = rounding.mul_down(a2, gap)
    d = rounding.div_up(d_num, d_den)
    q = rounding.div_up(a1, a2)
    inv = rounding.div_up(torch.ones_like(a2), a2)
    k = rounding.round_up_float(float(rv) + 3 * u * v_up, rs.dtype)
    eta_k = rounding.round_up_float((1 + v_up) * eta, rs.dtype)
    c = rs + d * v_up + q * k + torch.abs(m).to(rs.dtype) * u + inv * eta + eta_k
    rad = torch.where(safe, rounding.inflate(c, 10), torch.full_like(c, math.inf))
    if diagnostics.is_recording():
        diagnostics.emit_mask("domain", current_op(), ~safe, "divisor ball contains 0")
    return result(m, rad)




@rule(aten.lerp.Scalar, aten.lerp.Tensor)
def lerp(func, start, end, weight):
    """s + w (t - s) for s in S, t in T, w in W (a Python number: exact double, cast by the kernel; or a ball).

    Propagation (e = (1 - w) s + w t, and de/dw = t - s): |1 - w'| rs + |w'| rt + rw |t - s|, bounded with
    W1 >= |1 - w'| + rw, W0 >= |w'| + rw and D >= |mt - ms| + rs + rt.
    Rounding: PyTorch evaluates s + w (t - s) for |w| < 1/2 and t - (t - s)(1 - w) otherwise (opmath, maybe FMA);
    either is at most four roundings (the difference, 1 - w, the product, the final sum): at most
    u|m| + 4u (W0 + W1) |mt - ms| + 2 eta (|d| <= |mt - ms|(1+u), u^2 terms absorbed by the factor 4).
    """
    m = func(_mid(start), _mid(end), _mid(weight))
    ms, rs = operand(start, m.dtype)
    mt, rt = operand(end, m.dtype)
    mw, rw = operand(weight, m.dtype)
    u, eta = _constants(m.dtype)
    w0 = rounding.add_up(torch.abs(mw), rw)
    w1 = rounding.add_up(rounding.up(torch.abs(1 - mw)), rw)
    gap = rounding.up(torch.abs(mt - ms))
    span = rounding.inflate(gap + rs + rt, 2)
    coef = rounding.inflate((w0 + w1) * (4 * u), 2)
    c = w1 * rs + w0 * rt + rw * span + torch.abs(m).to(rs.dtype) * u + coef * gap + 2 * eta
    return result(m, rounding.inflate(c, 12))
