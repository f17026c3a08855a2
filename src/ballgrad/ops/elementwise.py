"""Library-function rules (exp, log, tanh, erf, sin, pow, ...): DESIGN.md §2 "trust boundary" and §4.

Every rule here has the same shape. The midpoint is the op itself on the midpoints (bit-identical to PyTorch). The
radius compares that midpoint with a rigorous enclosure [L, U] of the *exact* function over the whole input ball:

    rad = max(up(mid - L), up(U - mid)) >= sup { |f(x) - mid| : x in the ball }      (F2 on each subtraction)

which covers at once the input radius, the midpoint kernel's own error and, for float32/float16/bfloat16, the
reduced-precision library. Enclosures are always computed in float64: ball end points widen exactly
(``_ball64``/``_ends``) and the only trusted thing is the float64 library, through ``ballgrad.accuracy`` (the trust
table: ``accuracy.enclose(name, t)`` returns lower <= f(t) <= upper for a float64 t).

Enclosure lemmas used below.

M (monotone): if f is monotone on [lo, hi] then f([lo, hi]) lies between f(lo) and f(hi), so L = lower(f(lo)) and
  U = upper(f(hi)) (swapped when f decreases). Functions with a known range are clamped to it (exp >= 0, |tanh| <= 1):
  the exact values lie there, so clamping keeps L <= f <= U.
C (composition): a monotone function of a monotone function is monotone; directed bounds are composed with every
  rounded operation bumped outward (F2: up/down, ``rounding.add_up``/``div_down``...), using the monotonicity of
  each outer operation in its argument (e.g. 1/(1 + E) decreases in E, so an upper bound of E gives a lower bound).
V (mean value, sin/cos): |f(x) - f(m)| <= r sup|f'| over the ball, with sup|f'| <= min(1, |f'(m)| + r) because f' is
  1-Lipschitz; |f(m) - mid| <= |v - mid| + err(v) with v = f64 library value at m (trust table).
P (integer powers): x^n by repeated multiplication of |end points| with directed rounding (no library trust), signs
  and parity handled by ``_integer_power_hull``.

Special values (DESIGN.md §1): an input element with a non-finite midpoint or an infinite radius ("nothing known")
gives an infinite radius, as does a non-finite midpoint result (overflow) and every NaN produced while bounding
(inf - inf: the bound is unknown). A ball that leaves the function's domain (log of a ball reaching 0, sqrt of one
reaching below 0, x^p of a negative ball, ...) gets an infinite radius and a ``domain`` event.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Callable

import torch

from ballgrad import accuracy, diagnostics, rounding
from ballgrad.errors import UnsupportedOpError
from ballgrad.ops.common import mid_of as _mid
from ballgrad.ops.common import result
from ballgrad.ops.registry import current_op, rule
from ballgrad.tensor import BallTensor

aten = torch.ops.aten

_F64 = torch.float64
_INF = math.inf

Enclosure = Callable[[torch.Tensor, str], "tuple[torch.Tensor, torch.Tensor]"]


# ----------------------------------------------------------------------------------------------------------------------
# Exact float64 views of the arguments, outward end points, and the common last step


def _ball64(x):
    """(m, r, unknown) of a tensor argument in float64, exactly: a ball's (mid, rad) widened (exact for every
    supported dtype), a plain floating/bool tensor as a point ball, an integer tensor as exact points (|n| <= 2^53).
    ``unknown``: non-finite midpoint or infinite radius."""
    if isinstance(x, BallTensor):
        m, r = x.mid.detach().to(_F64), x.rad.to(_F64)
    elif isinstance(x, torch.Tensor):
        if x.is_complex():
            raise UnsupportedOpError(current_op(), "complex operands are out of scope")
        m = x.detach().to(_F64)
        if not (x.is_floating_point() or x.dtype == torch.bool) and bool((m.abs() > 2.0**53).any()):
            raise UnsupportedOpError(current_op(), "integer operand beyond 2^53 is not exact in float64")
        r = torch.zeros_like(m)
    else:
        raise TypeError(f"expected a tensor, got {type(x).__name__}")
    return m, r, ~torch.isfinite(m) | torch.isinf(r)


def _add_up(a, b):
    """Upper bound of a + b in float64, exact when the sum is: Knuth's TwoSum gives a + b = s + e exactly for
    s = fl(a + b) (no overflow); s itself is an upper bound when e <= 0, else succ(s) (F2). A non-finite e (overflow)
    takes the bumped branch."""
    s = a + b
    bb = s - a
    e = (a - (s - bb)) + (b - bb)
    return torch.where(torch.isfinite(e) & (e <= 0), s, rounding.up(s))


def _ends(m, r):
    """[lo, hi] with lo <= m - r and m + r <= hi, float64; exact whenever the end point is a float64 number."""
    return -_add_up(-m, r), _add_up(m, r)


def _exact_scalar(value, what: str) -> float:
    """A Python number argument as the double it denotes exactly (ints beyond 2^53 and complex are rejected)."""
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, numbers.Integral):
        if abs(int(value)) > 2**53:
            raise UnsupportedOpError(current_op(), f"integer {what} {value} is not exactly a double")
        return float(value)
    if isinstance(value, numbers.Real):
        return float(value)
    raise UnsupportedOpError(current_op(), f"{what} {value!r} is not a real number")


def _finish(mid, lower, upper, ok, unknown, detail: str) -> BallTensor:
    """Ball (mid, max(up(mid - L), up(U - mid))); +inf where the input is unknown, the domain check ``ok`` fails, the
    midpoint is not finite, or a bound is NaN (``result`` maps NaN to +inf). Emits ``domain`` for known inputs whose
    ball leaves the domain."""
    mid64 = mid.detach().to(_F64)
    rad = torch.maximum(rounding.sub_up(mid64, lower), rounding.sub_up(upper, mid64))
    ok = torch.as_tensor(ok, device=mid.device)
    known = ok & ~unknown & torch.isfinite(mid64)
    rad = torch.where(known, rad, torch.full_like(rad, _INF))
    if diagnostics.is_recording():
        diagnostics.emit_mask("domain", current_op(), torch.broadcast_to(~ok & ~unknown, mid.shape), detail)
    return result(mid, rad)


# ----------------------------------------------------------------------------------------------------------------------
# Monotone functions (lemma M): one table, one rule


@dataclass(frozen=True)
class Monotone:
    """A monotone function as a rule needs it: ``enclose(t, device_type)`` -> (lower, upper) of f(t) at float64 points
    t; ``increasing``; ``domain`` = (a, closed): every point must be > a (>= a when closed), None for all reals;
    ``value_range``: the exact values lie in it."""

    enclose: Enclosure
    increasing: bool
    domain: tuple[float, bool] | None = None
    value_range: tuple[float, float] = (-_INF, _INF)
    detail: str = ""


def _library(name: str) -> Enclosure:
    """The trust table's float64 enclosure of library function ``name``."""
    return lambda t, device_type: accuracy.enclose(name, t, device_type=device_type)


def _rsqrt_enclose(t, device_type):
    """1/sqrt(t) for t >= 0 (C): sqrt in [S_L, S_U] (trust table, S_L clamped at 0) and 1/s decreasing, so
    1/sqrt(t) in [down(1/S_U), up(1/S_L)] (1/0 = +inf is a valid upper bound)."""
    s_lo, s_hi = accuracy.enclose("sqrt", t, device_type=device_type)
    one = torch.ones_like(t)
    return rounding.div_down(one, s_hi), rounding.div_up(one, torch.clamp_min(s_lo, 0))


def _sigmoid_enclose(t, device_type):
    """sigmoid(t) (C), with E = exp(-|t|) in [E_L, E_U] (trust table; E_L clamped at 0; the argument is <= 0, so E
    never overflows):
    t >= 0: sigmoid = 1/(1 + E), decreasing in E: [down(1/up(1 + E_U)), up(1/down(1 + E_L))];
    t < 0:  sigmoid = E/(1 + E), increasing in E: [down(E_L/up(1 + E_L)), up(E_U/down(1 + E_U))]."""
    e_lo, e_hi = accuracy.enclose("exp", -torch.abs(t), device_type=device_type)
    e_lo = torch.clamp_min(e_lo, 0)
    one = torch.ones_like(t)
    positive = t >= 0
    lower = torch.where(
        positive,
        rounding.div_down(one, rounding.add_up(one, e_hi)),
        rounding.div_down(e_lo, rounding.add_up(one, e_lo)),
    )
    upper = torch.where(
        positive,
        rounding.div_up(one, rounding.add_down(one, e_lo)),
        rounding.div_up(e_hi, rounding.add_down(one, e_hi)),
    )
    return lower, upper


def _log1p_exp_bounds(z, device_type, upper: bool):
    """Lower (or upper) bound of g(z) = log(1 + e^z) at a float64 point z, overflow-free (C):
    g(z) = max(z, 0) + log1p(y), y = exp(-|z|) in (0, 1]; log1p increases, 0 <= log1p(y) <= y.
    Lower: y_L (clamped at 0), log1p lower bound clamped at 0, then add_down(z, .) for z > 0.
    Upper: y_U, min(log1p upper bound, y_U), then add_up(z, .) for z > 0."""
    y_lo, y_hi = accuracy.enclose("exp", -torch.abs(z), device_type=device_type)
    if upper:
        log_hi = torch.minimum(accuracy.enclose("log1p", y_hi, device_type=device_type)[1], y_hi)
        return torch.where(z > 0, rounding.add_up(z, log_hi), log_hi)
    log_lo = torch.clamp_min(accuracy.enclose("log1p", torch.clamp_min(y_lo, 0), device_type=device_type)[0], 0)
    return torch.where(z > 0, rounding.add_down(z, log_lo), log_lo)


def _softplus_enclose(beta: float) -> Enclosure:
    """softplus(t) = log(1 + e^(beta t))/beta, beta > 0 (C): beta t in [down(fl(beta t)), up(fl(beta t))] (F2; exact
    for beta = 1), g = log(1 + e^z) increasing (``_log1p_exp_bounds``), then [div_down(g_L, beta), div_up(g_U, beta)]."""

    def enclose(t, device_type):
        if beta == 1.0:
            z_lo = z_hi = t
        else:
            z = t * beta
            z_lo, z_hi = rounding.down(z), rounding.up(z)
        g_lo = _log1p_exp_bounds(z_lo, device_type, upper=False)
        g_hi = _log1p_exp_bounds(z_hi, device_type, upper=True)
        if beta == 1.0:
            return g_lo, g_hi
        return rounding.div_down(g_lo, beta), rounding.div_up(g_hi, beta)

    return enclose


def _power_enclose(p: float) -> Enclosure:
    """t^p for t >= 0 and a non-integer p (trust table "pow"; the lower bound clamped at 0)."""

    def enclose(t, device_type):
        lower, upper = accuracy.enclose("pow", t, p, device_type=device_type)
        return torch.clamp_min(lower, 0), upper

    return enclose


_POSITIVE = (0.0, _INF)

MONOTONE: dict = {
    aten.exp.default: Monotone(_library("exp"), True, value_range=_POSITIVE),
    aten.expm1.default: Monotone(_library("expm1"), True, value_range=(-1.0, _INF)),
    aten.log.default: Monotone(_library("log"), True, (0.0, False), detail="log of a ball reaching 0 or below"),
    aten.log2.default: Monotone(_library("log2"), True, (0.0, False), detail="log2 of a ball reaching 0 or below"),
    aten.log10.default: Monotone(_library("log10"), True, (0.0, False), detail="log10 of a ball reaching 0 or below"),
    aten.log1p.default: Monotone(_library("log1p"), True, (-1.0, False), detail="log1p of a ball reaching -1 or below"),
    aten.tanh.default: Monotone(_library("tanh"), True, value_range=(-1.0, 1.0)),
    aten.atan.default: Monotone(_library("atan"), True, value_range=(-2.0, 2.0)),
    aten.erf.default: Monotone(_library("erf"), True, value_range=(-1.0, 1.0)),
    aten.erfc.default: Monotone(_library("erfc"), False, value_range=(0.0, 2.0)),
    aten.sqrt.default: Monotone(_library("sqrt"), True, (0.0, True), _POSITIVE, "sqrt of a ball reaching below 0"),
    aten.rsqrt.default: Monotone(_rsqrt_enclose, False, (0.0, False), _POSITIVE, "rsqrt of a ball reaching 0 or below"),
    aten.sigmoid.default: Monotone(_sigmoid_enclose, True, value_range=(0.0, 1.0)),
    aten.sinh.default: Monotone(_library("sinh"), True),
    aten.asinh.default: Monotone(_library("asinh"), True),
    aten.acosh.default: Monotone(_library("acosh"), True, (1.0, True), _POSITIVE, "acosh of a ball reaching below 1"),
    aten.exp2.default: Monotone(_library("exp2"), True, value_range=_POSITIVE),
}


def _monotone_ball(mid, x, spec: Monotone) -> BallTensor:
    """Lemma M on the ball x: L from the enclosure at the end point where f is smallest, U where it is largest, both
    clamped to the range; domain checked on the lower end point (every domain here is a half-line [a, inf))."""
    m, r, unknown = _ball64(x)
    lo, hi = _ends(m, r)
    device_type = mid.device.type
    ok = True
    if spec.domain is not None:
        bound, closed = spec.domain
        ok = lo >= bound if closed else lo > bound
    lower_lo, upper_lo = spec.enclose(lo, device_type)
    if device_type == "cpu" and not bool(r.any()):
        lower_hi, upper_hi = lower_lo, upper_lo  # point balls: lo == hi == m, one evaluation
    else:
        lower_hi, upper_hi = spec.enclose(hi, device_type)
    lower, upper = (lower_lo, upper_hi) if spec.increasing else (lower_hi, upper_lo)
    lower = torch.clamp(lower, *spec.value_range)
    upper = torch.clamp(upper, *spec.value_range)
    return _finish(mid, lower, upper, ok, unknown, spec.detail)


@rule(*MONOTONE)
def monotone(func, x):
    """exp expm1 log log2 log10 log1p tanh atan erf erfc sqrt rsqrt sigmoid sinh asinh acosh exp2: lemma M with the
    ``MONOTONE`` entry for
    ``func`` (library functions through the trust table; rsqrt = 1/sqrt and sigmoid = 1/(1 + exp(-x)) by lemma C)."""
    return _monotone_ball(func(_mid(x)), x, MONOTONE[func])


@rule(aten.softplus.default)
def softplus(func, x, beta=1, threshold=20):
    """softplus(x) = log(1 + exp(beta x))/beta, increasing for beta > 0 (lemma M with ``_softplus_enclose``).

    PyTorch returns x itself where beta x > threshold; the radius compares that midpoint with the *true* softplus, so
    the kernel's e^(-threshold)-sized error is covered like any other midpoint error. beta <= 0 is rejected.
    """
    b = _exact_scalar(beta, "beta")
    if not (math.isfinite(b) and b > 0):
        raise UnsupportedOpError(func, f"softplus needs a finite beta > 0 (got {beta!r}); it is not monotone otherwise")
    mid = func(_mid(x), beta, threshold)
    return _monotone_ball(mid, x, Monotone(_softplus_enclose(b), True, value_range=_POSITIVE))


# ----------------------------------------------------------------------------------------------------------------------
# sin and cos (lemma V)

_TRIG_TRUSTED = 2.0**30  # beyond |m| + r > 2^30 the library's argument reduction is not relied on

_PERIODIC = {aten.sin.default: ("sin", "cos"), aten.cos.default: ("cos", "sin")}


@rule(*_PERIODIC)
def periodic(func, x):
    """sin / cos by lemma V, in float64 with every operation bumped up (F2):

        |f(x) - mid| <= up(|mid - v|) + err(v) + r * min(1, |d| + err(d) + r),

    v = f64 f(m), d = f64 f'(m) up to sign (cos for sin, sin for cos), err from the trust table. Every value of f lies
    in [-1, 1], so the radius is also capped by |mid| + 1; where |m| + r > 2^30 the library's argument reduction is
    not trusted and the cap alone is used.
    """
    name, slope_name = _PERIODIC[func]
    mid = func(_mid(x))
    m, r, unknown = _ball64(x)
    device_type = mid.device.type
    mid64 = mid.detach().to(_F64)
    v = accuracy.EVALUATORS[name](m)
    d = accuracy.EVALUATORS[slope_name](m)
    slope = torch.clamp_max(
        rounding.add_up(rounding.add_up(torch.abs(d), accuracy.f64_error_bound(slope_name, d, device_type)), r), 1.0
    )
    rad = rounding.add_up(
        rounding.add_up(rounding.up(torch.abs(mid64 - v)), accuracy.f64_error_bound(name, v, device_type)),
        rounding.mul_up(r, slope),
    )
    cap = rounding.add_up(torch.abs(mid64), torch.ones_like(mid64))
    trusted = (torch.abs(m) + r) <= _TRIG_TRUSTED
    rad = torch.where(trusted, torch.minimum(rad, cap), cap)
    return _radius_result(mid, rad, unknown)


def _radius_result(mid, rad, unknown) -> BallTensor:
    """A rule's radius with +inf where the input is unknown or the midpoint is not finite."""
    bad = unknown | ~torch.isfinite(mid.detach())
    return result(mid, torch.where(bad, torch.full_like(rad, _INF), rad))


# ----------------------------------------------------------------------------------------------------------------------
# Powers


def _directed_power(t, k: int):
    """(down, up) of t^k for float64 t >= 0 and an integer k >= 1: binary powering, the lower chain with
    ``rounding.mul_down`` and the upper with ``mul_up`` (F2; products of non-negative bounds are monotone, so each
    chain stays a bound). k = 1 is exact."""
    low = high = None
    base_low = base_high = t
    while True:
        if k & 1:
            low = base_low if low is None else rounding.mul_down(low, base_low)
            high = base_high if high is None else rounding.mul_up(high, base_high)
        k >>= 1
        if not k:
            return low, high
        base_low, base_high = rounding.mul_down(base_low, base_low), rounding.mul_up(base_high, base_high)


def _integer_power_hull(lo, hi, odd, negative, abs_power):
    """Enclosure of x^n over x in [lo, hi] for an integer n != 0 (lemma P), given as masks ``odd`` and ``negative`` and
    ``abs_power(t)`` -> (lower, upper) of t^n for t >= 0. For n < 0 the ball must not contain 0 (the caller's domain
    check). With signed end-point enclosures A = lo^n, B = hi^n:
      odd n > 0: x^n increases on the reals: [A_L, B_U];
      odd n < 0: x^n decreases on each side of 0: [B_L, A_U];
      even n: x^n = |x|^n, monotone in |x| on each side of 0: [min(A_L, B_L), max(A_U, B_U)], with lower bound 0 when
      the ball straddles 0 (n > 0)."""
    lo_low, lo_high = abs_power(torch.abs(lo))
    hi_low, hi_high = abs_power(torch.abs(hi))
    neg_lo, neg_hi = odd & (lo < 0), odd & (hi < 0)
    a_low, a_high = torch.where(neg_lo, -lo_high, lo_low), torch.where(neg_lo, -lo_low, lo_high)
    b_low, b_high = torch.where(neg_hi, -hi_high, hi_low), torch.where(neg_hi, -hi_low, hi_high)
    straddle = (lo < 0) & (hi > 0)
    odd_low, odd_high = torch.where(negative, b_low, a_low), torch.where(negative, a_high, b_high)
    even_low = torch.where(straddle & ~negative, torch.zeros_like(lo), torch.minimum(a_low, b_low))
    even_high = torch.maximum(a_high, b_high)
    return torch.where(odd, odd_low, even_low), torch.where(odd, odd_high, even_high)


def _integer_power_ball(mid, x, n: int) -> BallTensor:
    """x^n for a Python integer n (lemma P, no library trust): n = 0 gives 1 everywhere (0^0 = 1, PyTorch's value);
    n > 0 by ``_directed_power`` on |end points|; n = -k by 1/t^k in [div_down(1, up(t^k)), div_up(1, down(t^k))]
    (1/0 = +inf a valid upper bound), defined only for balls that exclude 0 (domain event otherwise)."""
    m, r, unknown = _ball64(x)
    if n == 0:
        one = torch.ones_like(m)
        return _finish(mid, one, one, True, unknown, "")
    lo, hi = _ends(m, r)
    k = abs(n)

    def abs_power(t):
        low, high = _directed_power(t, k)
        if n > 0:
            return low, high
        one = torch.ones_like(t)
        return rounding.div_down(one, high), rounding.div_up(one, low)

    odd, negative = torch.tensor(k % 2 == 1, device=lo.device), torch.tensor(n < 0, device=lo.device)
    lower, upper = _integer_power_hull(lo, hi, odd, negative, abs_power)
    ok = True if n > 0 else (lo > 0) | (hi < 0)
    return _finish(mid, lower, upper, ok, unknown, "x ** n with an integer n < 0 on a ball containing 0")


@rule(aten.pow.Tensor_Scalar)
def pow_tensor_scalar(func, x, exponent):
    """x ** p for a Python number p (its exact double; PyTorch may compute with a float32 cast of it, the radius
    compares with the exact power). Integer p: ``_integer_power_ball`` (torch.square is p = 2). p = 1/2: the sqrt
    entry of ``MONOTONE``; p = -1/2: the rsqrt entry. Other p: lemma M with the trust table's pow on x >= 0, increasing
    for p > 0 (0^p = 0 included) and decreasing for p < 0 (x > 0 needed); a ball reaching below 0 (0 for p < 0) gets
    +inf and a domain event."""
    p = _exact_scalar(exponent, "exponent")
    if not math.isfinite(p):
        raise UnsupportedOpError(func, f"non-finite exponent {p}: x ** p is not a real function of x there")
    mid = func(_mid(x), exponent)
    if p.is_integer():
        return _integer_power_ball(mid, x, int(p))
    if p == 0.5:
        return _monotone_ball(mid, x, MONOTONE[aten.sqrt.default])
    if p == -0.5:
        return _monotone_ball(mid, x, MONOTONE[aten.rsqrt.default])
    spec = Monotone(
        _power_enclose(p), p > 0, (0.0, p > 0), _POSITIVE,
        f"x ** {p} (not an integer) of a ball reaching below 0" if p > 0 else f"x ** {p} of a ball reaching 0 or below",
    )
    return _monotone_ball(mid, x, spec)


@rule(aten.square.default)
def square(func, x):
    """x^2 (torch.square usually arrives as pow.Tensor_Scalar(x, 2); this covers a direct aten.square call): lemma P."""
    return _integer_power_ball(func(_mid(x)), x, 2)


@rule(aten.pow.Scalar)
def pow_scalar(func, base, x):
    """s ** x for a Python number s (its exact double).

    s = 1: the constant 1. s > 0: lemma M with the trust table's pow(s, x), increasing for s > 1, decreasing for s < 1.
    s = 0: 0^x = 0 for x > 0, 1 for x = 0, undefined for x < 0: the ball's values are {0}, {1} or {0, 1} (hull), and
    a ball reaching below 0 is a domain violation. s < 0: real only at integer x, so only a point ball with an integer
    midpoint is bounded: (-1)^x |s|^x with |s|^x from the trust table; everything else is a domain violation.
    """
    s = _exact_scalar(base, "base")
    if not math.isfinite(s):
        raise UnsupportedOpError(func, f"non-finite base {s}: s ** x is not a real function of x there")
    mid = func(base, _mid(x))
    if s > 0 and s != 1:
        spec = Monotone(lambda t, dt: _clamp_low(accuracy.enclose("pow", s, t, device_type=dt)), s > 1,
                        value_range=_POSITIVE)
        return _monotone_ball(mid, x, spec)
    m, r, unknown = _ball64(x)
    if s == 1:
        one = torch.ones_like(m)
        return _finish(mid, one, one, True, unknown, "")
    lo, hi = _ends(m, r)
    if s == 0:
        zero, one = torch.zeros_like(m), torch.ones_like(m)
        lower = torch.where((lo > 0) | (hi > 0), zero, one)
        upper = torch.where(lo > 0, zero, one)
        return _finish(mid, lower, upper, lo >= 0, unknown, "0 ** x of a ball reaching below 0")
    low, high = _clamp_low(accuracy.enclose("pow", -s, m, device_type=mid.device.type))
    odd = torch.fmod(m, 2) != 0
    lower, upper = torch.where(odd, -high, low), torch.where(odd, -low, high)
    integral = (r == 0) & (m == torch.floor(m))
    return _finish(mid, lower, upper, integral, unknown,
                   f"({s}) ** x is real only at integers x; the exponent ball is not one integer")


def _clamp_low(bounds):
    """(max(lower, 0), upper): for enclosures of non-negative quantities."""
    return torch.clamp_min(bounds[0], 0), bounds[1]


@rule(aten.pow.Tensor_Tensor)
def pow_tensor_tensor(func, x, y):
    """x ** y for tensors (balls or plain; PyTorch's type promotion decides the midpoint dtype; the radius compares
    with the power of the exact arguments).

    x >= 0 (x > 0, or x >= 0 with y > 0): x^y is monotone in x for fixed y and in y for fixed x, so over the box its
    extremes are at the four corners (lemma M twice): L = min of the corner lower bounds, U = max of the upper bounds
    (trust table pow). y a point ball with an integer value n: lemma P with |t|^n from the trust table
    (``_integer_power_hull``; n < 0 needs a ball without 0). y the point 0: 1. Anything else (a base ball reaching
    below 0 with a non-integer or non-point exponent) is a domain violation: +inf and a ``domain`` event.
    """
    mid = func(_mid(x), _mid(y))
    xm, xr, x_unknown = _ball64(x)
    ym, yr, y_unknown = _ball64(y)
    shape = mid.shape
    xm, xr, ym, yr = (t.expand(shape) for t in (xm, xr, ym, yr))
    unknown = (x_unknown | y_unknown).expand(shape)
    x_lo, x_hi = _ends(xm, xr)
    y_lo, y_hi = _ends(ym, yr)
    device_type = mid.device.type

    def pow_bounds(a, b):
        return _clamp_low(accuracy.enclose("pow", a, b, device_type=device_type))

    corners = [pow_bounds(a, b) for a in (x_lo, x_hi) for b in (y_lo, y_hi)]
    corner_low = torch.minimum(torch.minimum(corners[0][0], corners[1][0]), torch.minimum(corners[2][0], corners[3][0]))
    corner_high = torch.maximum(torch.maximum(corners[0][1], corners[1][1]), torch.maximum(corners[2][1], corners[3][1]))
    corner_ok = (x_lo > 0) | ((x_lo >= 0) & (y_lo > 0))

    integer = (yr == 0) & (ym == torch.floor(ym))
    negative = ym < 0
    int_low, int_high = _integer_power_hull(
        x_lo, x_hi, torch.fmod(ym, 2) != 0, negative, lambda t: pow_bounds(t, ym)
    )
    int_ok = integer & (~negative | (x_lo > 0) | (x_hi < 0))

    zero = (y_lo == 0) & (y_hi == 0)
    one = torch.ones_like(xm)
    lower = torch.where(zero, one, torch.where(corner_ok, corner_low, int_low))
    upper = torch.where(zero, one, torch.where(corner_ok, corner_high, int_high))
    ok = zero | corner_ok | int_ok
    return _finish(mid, lower, upper, ok, unknown,
                   "x ** y needs x > 0 (or x >= 0 with y > 0) or an exact integer y (not containing 0 for y < 0)")


# ----------------------------------------------------------------------------------------------------------------------
# Arb enclosures (lemma A): special functions without a trust assumption
#
# A (Arb): python-flint's ``arb`` is Arb's ball arithmetic (Johansson, "Arb: efficient arbitrary-precision
#   midpoint-radius interval arithmetic", IEEE TC 2017): for an input ball X every ``arb`` function returns a ball
#   containing f(x) for *every* x in X (NaN when it cannot, e.g. outside the domain or across a pole), at any working
#   precision. So for each output element, with X_i = arb(m_i, r_i) built from the exact float64 end data (``arb``
#   converts doubles exactly and rounds radii up), Y = f(X_1, ..., X_k) and m = PyTorch's midpoint (exact as an
#   ``arb``), sup |f(x) - m| <= |Y - m|_upper, which ``arb.abs_upper`` gives as a float rounded upward; it is turned
#   into a double upward (``_arb_upper_double``). No library accuracy is trusted: these rules cover the special
#   functions no trust-table entry declares (Bessel, Airy, gamma family, zeta, orthogonal polynomials, ...), at the cost
#   of a Python loop over elements (microseconds each), acceptable for these rarely hot functions.
#   Non-finite Y (NaN: domain left or pole touched) gives +inf and a ``domain`` event.

_ARB_PREC = 128  # working precision of the enclosures (bits); the radius is rounded up to a double at the end


def _arb_upper_double(u) -> float:
    """An ``arb`` holding an exact non-negative number (``abs_upper`` at 53 bits) as a double >= it."""
    man, exp = u.mid().man_exp()
    man, exp = int(man), int(exp)
    if man == 0:
        return 0.0
    if man.bit_length() + exp > 1024:
        return _INF
    if man.bit_length() + exp <= -1022:  # value < 2^-1022 = realmin: realmin is an upper bound
        return float(torch.finfo(_F64).smallest_normal)
    value = math.ldexp(man, exp)  # exact: at most 53 significant bits, normal range
    return value


def _arb_columns(args, shape):
    """Per argument: a list of (m, r) float64 pairs over the output's elements (Python numbers: exact doubles, r = 0;
    integer tensors: exact). Also the combined ``unknown`` mask (non-finite midpoint or infinite radius)."""
    cols, unknown = [], torch.zeros(shape, dtype=torch.bool)
    for a in args:
        if isinstance(a, torch.Tensor):
            m, r, unk = _ball64(a)
            m, r = m.expand(shape).reshape(-1).tolist(), r.expand(shape).reshape(-1).tolist()
            unknown = unknown | unk.expand(shape).cpu()
            cols.append(list(zip(m, r)))
        else:
            cols.append(None if a is None else _exact_scalar(a, "argument"))
    return cols, unknown


def _arb_ball(func, mid: torch.Tensor, args, fn, detail: str) -> BallTensor:
    """Lemma A: the ball of ``mid`` (PyTorch's output) for the exact function ``fn`` of ``arb`` arguments (one per
    entry of ``args``; Python numbers stay exact doubles as ``arb``)."""
    from flint import arb, ctx

    shape = mid.shape
    cols, unknown = _arb_columns(args, shape)
    mids = mid.detach().to(_F64).reshape(-1).tolist()
    unknown = unknown.reshape(-1).tolist()
    rads, domain = [], []
    old = ctx.prec
    try:
        for i, mo in enumerate(mids):
            if unknown[i] or not math.isfinite(mo):
                rads.append(_INF)
                domain.append(False)
                continue
            ctx.prec = _ARB_PREC
            xs = []
            for c in cols:
                if isinstance(c, list):
                    m, r = c[i]
                    xs.append(arb(m) if r == 0 else arb(m, r))
                else:
                    xs.append(c if c is None else arb(c))
            y = fn(*xs)
            if y is None or not y.is_finite():
                rads.append(_INF)
                domain.append(True)
                continue
            d = y - arb(mo)
            ctx.prec = 53
            rads.append(_arb_upper_double(d.abs_upper()))
            domain.append(False)
    finally:
        ctx.prec = old
    rad = torch.tensor(rads, dtype=_F64).reshape(shape).to(mid.device)
    if diagnostics.is_recording():
        diagnostics.emit_mask("domain", current_op(), torch.tensor(domain, dtype=torch.bool).reshape(shape), detail)
    return result(mid, rad)


def _arb_pi():
    from flint import arb

    return arb.pi()


def _lgamma_arb(x):
    """log |Gamma(x)| (PyTorch's lgamma for negative x too): Arb's lgamma for x > 0, log|gamma| otherwise."""
    if x > 0:
        return x.lgamma()
    return abs(x.gamma()).log()


def _polygamma_arb(n: int):
    from flint import acb

    def fn(x):
        if n == 0:
            return x.digamma()
        z = acb(x).polygamma(n)
        return z.real if z.imag.contains(0) else None

    return fn


def _entr_arb(x):
    """-x log x for x > 0; 0 at the exact point 0 (PyTorch's value); undefined below 0."""
    if x.is_zero():
        return x
    if x > 0:
        return -x * x.log()
    return None


def _xlogy_arb(log_fn):
    """x log(y) (or x log1p(y)), with PyTorch's value 0 where x is exactly 0."""

    def fn(x, y):
        if x.is_zero():
            return x
        log_y = log_fn(y)
        return None if log_y is None else x * log_y

    return fn


def _sqrt2():
    from flint import arb

    return arb(2).sqrt()


_ARB_UNARY = {
    aten.asin.default: lambda x: x.asin(),
    aten.acos.default: lambda x: x.acos(),
    aten.cosh.default: lambda x: x.cosh(),
    aten.tan.default: lambda x: x.tan(),
    aten.atanh.default: lambda x: x.atanh(),
    aten.sinc.default: lambda x: x.sinc_pi(),
    aten.deg2rad.default: lambda x: x * _arb_pi() / 180,
    aten.rad2deg.default: lambda x: x * 180 / _arb_pi(),
    aten.erfinv.default: lambda x: x.erfinv(),
    aten.lgamma.default: _lgamma_arb,
    aten.digamma.default: lambda x: x.digamma(),
    aten.i0.default: lambda x: x.bessel_i(0),
    aten.special_modified_bessel_i0.default: lambda x: x.bessel_i(0),
    aten.special_i0e.default: lambda x: (-abs(x)).exp() * x.bessel_i(0),
    aten.special_i1.default: lambda x: x.bessel_i(1),
    aten.special_modified_bessel_i1.default: lambda x: x.bessel_i(1),
    aten.special_i1e.default: lambda x: (-abs(x)).exp() * x.bessel_i(1),
    aten.special_ndtri.default: lambda x: _sqrt2() * (2 * x - 1).erfinv(),
    aten.special_log_ndtr.default: lambda x: ((-x / _sqrt2()).erfc() / 2).log(),
    aten.special_erfcx.default: lambda x: (x * x).exp() * x.erfc(),
    aten.special_entr.default: _entr_arb,
    aten.special_airy_ai.default: lambda x: x.airy_ai(),
    aten.special_bessel_j0.default: lambda x: x.bessel_j(0),
    aten.special_bessel_j1.default: lambda x: x.bessel_j(1),
    aten.special_bessel_y0.default: lambda x: x.bessel_y(0) if x > 0 else None,
    aten.special_bessel_y1.default: lambda x: x.bessel_y(1) if x > 0 else None,
    aten.special_modified_bessel_k0.default: lambda x: x.bessel_k(0) if x > 0 else None,
    aten.special_modified_bessel_k1.default: lambda x: x.bessel_k(1) if x > 0 else None,
    aten.special_scaled_modified_bessel_k0.default: lambda x: x.exp() * x.bessel_k(0) if x > 0 else None,
    aten.special_scaled_modified_bessel_k1.default: lambda x: x.exp() * x.bessel_k(1) if x > 0 else None,
    aten.special_spherical_bessel_j0.default: lambda x: x.sinc(),
}


def _angle_arb(x):
    """The argument of a real number: 0 for x >= 0, pi for x < 0 (the hull [0, pi] for a ball containing 0 and
    negative values)."""
    from flint import arb

    if x >= 0:
        return arb(0)
    if x < 0:
        return _arb_pi()
    return arb.union(arb(0), _arb_pi())


_ARB_UNARY[aten.angle.default] = _angle_arb


def _arb_const_log2():
    from flint import arb

    return arb.const_log2()


@rule(*_ARB_UNARY)
def arb_unary(func, x):
    """asin acos cosh tan atanh sinc deg2rad rad2deg erfinv lgamma digamma i0 angle and the special.*
    Bessel/Airy/error-function family: lemma A with the exact definition in ``_ARB_UNARY`` (tan across a pole, acosh
    below 1, Bessel Y/K at or below 0, ...: Arb returns NaN there, so +inf and a ``domain`` event)."""
    return _arb_ball(func, func(_mid(x)), [x], _ARB_UNARY[func], f"{func} of a ball leaving its domain")


@rule(aten.polygamma.default)
def polygamma(func, n, x):
    """psi^(n)(x) (n = 0: digamma): lemma A with Arb's polygamma (real part of the complex routine, which is exact
    for real x; a non-zero imaginary part cannot occur and would give +inf)."""
    return _arb_ball(func, func(n, _mid(x)), [x], _polygamma_arb(int(n)), "polygamma at a pole")


@rule(aten.mvlgamma.default)
def mvlgamma(func, x, p):
    """Multivariate log-gamma: sum_{j<p} log Gamma(x - j/2) + p(p-1)/4 log(pi) (PyTorch's definition), lemma A."""
    p = int(p)

    def fn(t):
        total = _arb_pi().log() * (p * (p - 1)) / 4
        for j in range(p):
            total = total + _lgamma_arb(t - 0.5 * j)
        return total

    return _arb_ball(func, func(_mid(x), p), [x], fn, "mvlgamma at a pole")


@rule(aten.logit.default)
def logit(func, x, eps=None):
    """log(z/(1 - z)) with z = x, or z = clamp(x, eps, 1 - eps) with the real numbers eps and 1 - eps (eps the
    double aten receives; the kernel's own rounded bounds are part of its midpoint error). Lemma A; z outside (0, 1)
    is a domain violation."""
    mid = func(_mid(x), eps)
    if eps is None:
        fn = lambda t: (t / (1 - t)).log() if (t > 0 and t < 1) else None  # noqa: E731
        return _arb_ball(func, mid, [x], fn, "logit of a ball leaving (0, 1)")
    e = _exact_scalar(eps, "eps")

    def fn_eps(t):
        from flint import arb

        lo, hi = arb(e), 1 - arb(e)
        if not (lo > 0 and hi < 1 and lo <= hi):
            return None
        z = t.max(lo).min(hi)
        return (z / (1 - z)).log()

    return _arb_ball(func, mid, [x], fn_eps, "logit with eps outside (0, 1/2]")


def _binary_arb(fn):
    def wrapped(func, a, b):
        return _arb_ball(func, func(_mid(a), _mid(b)), [a, b], fn, f"{func} of balls leaving its domain")

    return wrapped


def _atan2_arb(y, x):
    """atan2 (Arb's, which contains both sides of the branch cut y = 0, x < 0 when the ball crosses it); undefined
    at the origin."""
    from flint import arb

    if y.contains(0) and x.contains(0):
        return None
    return arb.atan2(y, x)


def _copysign_arb(x, y):
    """|x| with the sign of y; where y's ball contains values of both signs, the hull of +-|x|."""
    from flint import arb

    if y > 0:
        return abs(x)
    if y < 0:
        return -abs(x)
    return arb.union(abs(x), -abs(x))


def _zeta_arb(s, q):
    """Hurwitz zeta(s, q) = sum_{k>=0} (k + q)^(-s) for s > 1, q > 0 (elsewhere PyTorch's value is not this series'
    analytic continuation everywhere: +inf radius)."""
    if not (s > 1 and q > 0):
        return None
    return s.zeta(q)


def _igamma_arb(regularized_upper: bool):
    def fn(a, x):
        if not (a > 0 and x >= 0):
            return None
        return x.gamma_upper(a, regularized=1) if regularized_upper else x.gamma_lower(a, regularized=1)

    return fn


_ARB_BINARY = {
    aten.atan2.default: _atan2_arb,
    aten.hypot.default: lambda x, y: (x * x + y * y).sqrt(),
    aten.logaddexp.default: lambda a, b: (a.exp() + b.exp()).log(),
    aten.logaddexp2.default: lambda a, b: ((a * _arb_const_log2()).exp() + (b * _arb_const_log2()).exp()).log()
    / _arb_const_log2(),
    aten.copysign.Tensor: _copysign_arb,
    aten.copysign.Scalar: _copysign_arb,
    aten.xlogy.Tensor: _xlogy_arb(lambda y: y.log() if y > 0 else None),
    aten.xlogy.Scalar_Self: _xlogy_arb(lambda y: y.log() if y > 0 else None),
    aten.xlogy.Scalar_Other: _xlogy_arb(lambda y: y.log() if y > 0 else None),
    aten.special_xlog1py.default: _xlogy_arb(lambda y: y.log1p() if y > -1 else None),
    aten.special_xlog1py.self_scalar: _xlogy_arb(lambda y: y.log1p() if y > -1 else None),
    aten.special_xlog1py.other_scalar: _xlogy_arb(lambda y: y.log1p() if y > -1 else None),
    aten.special_zeta.default: _zeta_arb,
    aten.special_zeta.self_scalar: _zeta_arb,
    aten.special_zeta.other_scalar: _zeta_arb,
    aten.igamma.default: _igamma_arb(False),
    aten.igammac.default: _igamma_arb(True),
    aten.ldexp.Tensor: lambda x, e: x * _arb_two() ** e,
}


def _arb_two():
    from flint import arb

    return arb(2)


@rule(*_ARB_BINARY)
def arb_binary(func, a, b):
    """atan2 hypot logaddexp logaddexp2 copysign xlogy xlog1py zeta igamma igammac ldexp: lemma A with ``_ARB_BINARY``.
    A None from the definition (outside the domain PyTorch and the exact function share) gives +inf."""
    fn = _ARB_BINARY[func]

    def guarded(x, y):
        if x is None or y is None:
            return None
        return fn(x, y)

    return _arb_ball(func, func(_mid(a), _mid(b)), [a, b], guarded, f"{func} of balls leaving its domain")


# Orthogonal polynomials P_n(x) with a tensor degree n, truncated toward zero by PyTorch (``static_cast<int64_t>``);
# P_n = 0 for n < 0 (PyTorch's convention). The degree's ball must have one truncation, else +inf.


def _recurrence(x, n, p0, p1):
    """p_{k+1} = 2x p_k - p_{k-1} (Chebyshev three-term recurrence) from p_0, p_1, in ball arithmetic."""
    if n == 0:
        return p0
    prev, cur = p0, p1
    for _ in range(n - 1):
        prev, cur = cur, 2 * x * cur - prev
    return cur


def _orth(kind: str):
    def fn(x, n):
        from flint import arb

        lo, hi = n.lower(), n.upper()
        k_lo, k_hi = int(lo.floor().unique_fmpz() if lo >= 0 else lo.ceil().unique_fmpz()), None
        k_hi = int(hi.floor().unique_fmpz() if hi >= 0 else hi.ceil().unique_fmpz())
        if k_lo != k_hi:
            return None
        k = k_lo
        if k < 0:
            return arb(0)
        if k > 10_000:
            return None
        if kind == "t":
            return x.chebyshev_t(k)
        if kind == "u":
            return x.chebyshev_u(k)
        if kind == "v":
            return _recurrence(x, k, arb(1), 2 * x - 1)
        if kind == "w":
            return _recurrence(x, k, arb(1), 2 * x + 1)
        if kind == "h":
            return x.hermite_h(k)
        if kind == "he":
            return (x / _sqrt2()).hermite_h(k) / _sqrt2() ** k
        if kind == "l":
            return x.laguerre_l(k)
        if kind == "p":
            return x.legendre_p(k)
        raise AssertionError(kind)

    return fn


def _shifted(fn):
    return lambda x, n: fn(2 * x - 1, n)


_ORTHOGONAL = {
    "chebyshev_polynomial_t": _orth("t"),
    "chebyshev_polynomial_u": _orth("u"),
    "chebyshev_polynomial_v": _orth("v"),
    "chebyshev_polynomial_w": _orth("w"),
    "hermite_polynomial_h": _orth("h"),
    "hermite_polynomial_he": _orth("he"),
    "laguerre_polynomial_l": _orth("l"),
    "legendre_polynomial_p": _orth("p"),
    "shifted_chebyshev_polynomial_t": _shifted(_orth("t")),
    "shifted_chebyshev_polynomial_u": _shifted(_orth("u")),
    "shifted_chebyshev_polynomial_v": _shifted(_orth("v")),
    "shifted_chebyshev_polynomial_w": _shifted(_orth("w")),
}

_ORTHOGONAL_OPS = {
    getattr(getattr(aten, "special_" + name), overload): fn
    for name, fn in _ORTHOGONAL.items()
    for overload in ("default", "x_scalar", "n_scalar")
}


@rule(*_ORTHOGONAL_OPS)
def orthogonal_polynomial(func, x, n):
    """special.{chebyshev,shifted_chebyshev}_polynomial_{t,u,v,w}, hermite_polynomial_{h,he}, laguerre_polynomial_l,
    legendre_polynomial_p: lemma A with Arb's polynomials (T, U, H, L, P), the three-term recurrence in ball
    arithmetic for V (V_0 = 1, V_1 = 2x - 1) and W (W_1 = 2x + 1), He_n(x) = 2^(-n/2) H_n(x/sqrt 2), shifted
    forms at 2x - 1. The degree is trunc(n) (0 polynomial for n < 0), decided over n's ball."""
    fn = _ORTHOGONAL_OPS[func]

    def guarded(a, b):
        if a is None or b is None:
            return None
        return fn(a, b)

    return _arb_ball(func, func(_mid(x), _mid(n)), [x, n], guarded, f"{func}: degree ball spans several integers")


@rule(aten.frexp.Tensor)
def frexp(func, x):
    """(mantissa, exponent) with x = mantissa 2^exponent, |mantissa| in [1/2, 1). The exponent is exact when both
    outward end points of the ball have it (and the same sign; 0 only as the exact point 0), otherwise it is not
    decided (``UndecidedComparisonError``: an integer cannot hold a hull). The mantissa is then x 2^-e, an exact scaling:
    radius r 2^-e, rounded up (it can only underflow)."""
    from ballgrad.errors import UndecidedComparisonError

    mantissa, exponent = func(x.mid)
    m, r, unknown = _ball64(x)
    lo, hi = _ends(m, r)
    _, e_lo = torch.frexp(lo)
    _, e_hi = torch.frexp(hi)
    same = (e_lo == e_hi) & (torch.sign(lo) == torch.sign(hi)) & ~unknown
    if not bool(same.all()):
        raise UndecidedComparisonError(f"{func}: a ball spans a power of two (or 0): the exponent is not decided")
    rad = rounding.up(torch.ldexp(r, -exponent.to(_F64)))
    rad = torch.where(r == 0, torch.zeros_like(rad), rad)
    return result(mantissa, rad), exponent
