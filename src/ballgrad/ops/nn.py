"""Neural-network rules: smooth activations (gelu, silu), the softmax family (_softmax, _log_softmax, logsumexp) and
the losses (nll_loss, mse_loss, binary_cross_entropy[_with_logits], smooth_l1_loss, huber_loss) (DESIGN.md §4).
Their ``*_backward`` ops are in ``backward.py``; relu/threshold/leaky_relu/hardtanh in ``nonsmooth.py``.

These are fused kernels (DESIGN.md §2): none is trusted as a black box. Each rule computes an enclosure of the *exact*
real function over the input balls in float64 and re-centres it on PyTorch's midpoint (``finish`` ->
``common.recentre``: rad = r + |c - mid|), so the kernel's own error -- CPU gelu's erf polynomial (~1.5e-7 absolute),
PyTorch's clamp of BCE's log at -100, softplus returning x above its threshold -- is measured, never assumed.

Two ways of enclosing are used:

* **Composition** of ball rules. Calling torch functions on float64 BallTensors dispatches to the registered rules;
  every rule is sound, so the composition encloses the exact result. Used where the expression is one occurrence of
  each variable (or a derivative bound that only multiplies a radius).
* **Direct formulas that keep dependency**, where composition would lose it:
  - softmax/log_softmax via y_i = 1/S_i, S_i = sum_j exp(x_j - x_i) = 1 + e^(w_i), see ``_softmax_w``;
  - smooth activations by the mean value form ``enclose_smooth``: f(X) in f(m) + f'(X)[-r, r] with f'(X) enclosed by
    composition (and the plain composition f(X), whichever is narrower per element);
  - monotone pieces (smooth L1 / Huber in |d|, their derivatives in d) through their end points.

Constants are balls (``constant``): the double nearest to an mpmath value at 256 bits with the distance rounded up,
plus 2^-240 for mpmath's own error (|constant| <= 1 here).

Special values: an input element with a non-finite midpoint or an infinite radius denotes "any real"; softmax
outputs then still lie in [0, 1] (finite radii), everything else that depends on it gets +inf. A non-finite midpoint
result always has radius +inf. Balls leaving a loss's domain (BCE input outside [0, 1], log of a ball reaching 0)
get +inf and a ``domain`` event.
"""

from __future__ import annotations

import math
import struct
from fractions import Fraction

import mpmath
import numpy as np
import torch
import torch.nn.functional as F

from ballgrad import accuracy, diagnostics, fused, rounding
from ballgrad.errors import UnsupportedOpError
from ballgrad.ops import elementwise, inplace
from ballgrad.ops.common import mid_of, nan_where_not_finite, recentre, result
from ballgrad.ops.nonsmooth import _add_up, _two_sum_error
from ballgrad.ops.registry import current_op, rule
from ballgrad.tensor import BallTensor, _to_fraction

aten = torch.ops.aten

_F64 = torch.float64
_INF = math.inf

# nn.functional reduction codes (torch/nn/_reduction.py)
NONE, MEAN, SUM = 0, 1, 2


# ----------------------------------------------------------------------------------------------------------------------
# Composition helpers (also used by backward.py)


def wide(x) -> BallTensor:
    """The float64 ball of a tensor argument, exactly: a ball's (mid, rad) widened (exact for every supported dtype), a
    plain tensor as a point ball (integers exact up to 2^53). Non-finite midpoints get radius +inf ("any real")."""
    if isinstance(x, BallTensor):
        if not x.is_floating_point():
            raise UnsupportedOpError(current_op(), "a bool (comparison) ball cannot enter this rule; use .mid")
        m, r = x.mid.detach().to(_F64), x.rad.to(_F64)
    elif isinstance(x, torch.Tensor):
        m = x.detach().to(_F64)
        if not (x.is_floating_point() or x.dtype == torch.bool) and bool((m.abs() > 2.0**53).any()):
            raise UnsupportedOpError(current_op(), "integer operand beyond 2^53 is not exact in float64")
        r = torch.zeros_like(m)
    else:
        raise TypeError(f"expected a tensor, got {type(x).__name__}")
    r = r.expand(m.shape)
    r = torch.where(torch.isfinite(m), r, torch.full_like(r, _INF))
    return BallTensor(m, r.contiguous() if not r.is_contiguous() else r)


def nan_to(t: torch.Tensor, value: float) -> torch.Tensor:
    """``t`` with NaN (an undefined bound, e.g. inf - inf) replaced by ``value`` (-inf for a lower bound, +inf for an
    upper one); infinities are kept (unlike ``torch.nan_to_num``, which would clip them to finite values)."""
    return torch.where(torch.isnan(t), torch.full_like(t, value), t)


def unknown_of(x: BallTensor) -> torch.Tensor:
    """Elements that denote "any real": non-finite midpoint or infinite radius."""
    return ~torch.isfinite(x.mid) | torch.isinf(x.rad)


def point(m: torch.Tensor) -> BallTensor:
    """The exact point ball of a float64 tensor."""
    return BallTensor(m, torch.zeros_like(m))


def pick(cond: torch.Tensor, a: BallTensor, b: BallTensor) -> BallTensor:
    """Per element the ball ``a`` where ``cond``, else ``b`` (an exact choice made by the rule, not by the data)."""
    shape = torch.broadcast_shapes(cond.shape, a.shape, b.shape)
    m = torch.where(cond, a.mid, b.mid).expand(shape).contiguous()
    r = torch.where(cond, a.rad.expand(a.mid.shape), b.rad.expand(b.mid.shape)).expand(shape).contiguous()
    return BallTensor(m, r)


def narrower(a: BallTensor, b: BallTensor) -> BallTensor:
    """Two enclosures of the same values: per element the one with the smaller radius (both are valid)."""
    return pick(a.rad <= b.rad, a, b)


def from_bounds(lo: torch.Tensor, hi: torch.Tensor) -> BallTensor:
    """A float64 ball containing [lo, hi]; NaN end points (nothing known) give an infinite radius."""
    mid = lo * 0.5 + hi * 0.5
    mid = torch.where(torch.isfinite(mid), mid, torch.where(torch.isfinite(lo), lo, hi))
    rad = torch.maximum(rounding.sub_up(mid, lo), rounding.sub_up(hi, mid))
    return BallTensor(mid, rounding.clean_rad(rad))


def constant(value) -> BallTensor:
    """A real constant as a float64 point-sized ball: mid = the nearest double to ``value`` (an mpmath number at
    >= 256 bits with |value| <= 1, or an exact Fraction), rad = |value - mid| rounded up (+ 2^-240 for mpmath)."""
    if isinstance(value, Fraction):
        exact, slack = value, Fraction(0)
    else:
        exact, slack = _to_fraction(value), Fraction(1, 2**240)
    mid = float(exact)
    rad = rounding.round_up_float(abs(exact - Fraction(mid)) + slack)
    return BallTensor(torch.tensor(mid, dtype=_F64), torch.tensor(rad, dtype=_F64))


def finish(mid: torch.Tensor, *enclosures: BallTensor, unknown=None) -> BallTensor:
    """Re-centre float64 enclosures of the exact result on PyTorch's midpoint (``common.recentre``), keep the smallest
    radius per element (each is a valid bound), +inf where ``unknown`` or the midpoint is not finite."""
    rad = None
    for enc in enclosures:
        r = recentre(mid, enc).rad
        rad = r if rad is None else torch.minimum(rad, r)
    bad = ~torch.isfinite(mid)
    if unknown is not None:
        bad = bad | unknown
    rad = torch.where(bad.expand(mid.shape), torch.full_like(rad, _INF), rad)
    return result(mid, rad)


def enclose_smooth(x: BallTensor, f, derivative) -> BallTensor:
    """An enclosure of {f(t) : t in X} for a smooth f given as ball compositions ``f`` and ``derivative`` (f').

    Mean value form: f(t) - f(m) = f'(xi)(t - m) with xi in X, so f(X) is in F(m) + D [-r, r] where F(m) = f on the
    point ball m and D = derivative(X) encloses f' over the ball: rad = rad(F(m)) + r (|mid(D)| + rad(D)), rounded
    up (F2). Per element the narrower of this and the direct composition f(X) is kept (``narrower``).
    """
    at_mid = f(point(x.mid))
    d = derivative(x)
    slope = rounding.add_up(torch.abs(d.mid), d.rad)
    spread = torch.where(x.rad == 0, torch.zeros_like(x.rad), rounding.mul_up(x.rad, slope))
    mean_value = BallTensor(at_mid.mid, rounding.clean_rad(rounding.add_up(at_mid.rad, spread)))
    return narrower(mean_value, f(x))


def reduce_loss(loss: BallTensor, reduction: int) -> BallTensor:
    """none / mean / sum of elementwise loss balls, by the ball rules of mean and sum."""
    if reduction == NONE:
        return loss
    if reduction == MEAN:
        return torch.mean(loss)
    if reduction == SUM:
        return torch.sum(loss)
    raise UnsupportedOpError(current_op(), f"unknown reduction code {reduction}")


def _emit_domain(mask: torch.Tensor, detail: str) -> None:
    """Emit after all compositions (nested rules reset the per-op event bookkeeping)."""
    if diagnostics.is_recording():
        diagnostics.emit_mask("domain", current_op(), mask, detail)


# ----------------------------------------------------------------------------------------------------------------------
# Constants

with mpmath.workprec(256):
    INV_SQRT2 = constant(1 / mpmath.sqrt(2))
    INV_SQRT_2PI = constant(1 / mpmath.sqrt(2 * mpmath.pi))
    SQRT_2_OVER_PI = constant(mpmath.sqrt(2 / mpmath.pi))
GELU_TANH_CUBIC = constant(Fraction(44715, 10**6))  # the 0.044715 of gelu's tanh approximation, exactly


# ----------------------------------------------------------------------------------------------------------------------
# gelu and silu: f, f', f'' as ball compositions


def _normal_cdf(x):
    """Phi(x) = (1 + erf(x / sqrt 2)) / 2 = erfc(-x / sqrt 2) / 2, per element the narrower enclosure: the erfc form
    keeps relative accuracy in the left tail, where 1 + erf cancels; the erf form has the smaller trust-table margin
    elsewhere."""
    t = x * INV_SQRT2
    return narrower(0.5 * torch.erfc(-t), 0.5 * (1 + torch.erf(t)))


def _normal_pdf(x):
    """phi(x) = exp(-x^2 / 2) / sqrt(2 pi)."""
    return torch.exp(-0.5 * x**2) * INV_SQRT_2PI


def _gelu_erf(x):
    """gelu(x) = x Phi(x)."""
    return x * _normal_cdf(x)


def _gelu_erf_d1(x):
    """gelu'(x) = Phi(x) + x phi(x)."""
    return _normal_cdf(x) + x * _normal_pdf(x)


def _gelu_erf_d2(x):
    """gelu''(x) = phi(x) (2 - x^2)."""
    return _normal_pdf(x) * (2 - x**2)


def _tanh_parts(x):
    """For g(x) = x (1 + tanh u)/2 = x p with u = k (x + a x^3), k = sqrt(2/pi), a = 0.044715 (exact reals):
    p = sigmoid(2u) = (1 + tanh u)/2, q = sigmoid(-2u) = 1 - p (so 1 - tanh^2 u = 4 p q without cancellation) and
    u' = k (1 + 3 a x^2)."""
    two_u = 2 * (SQRT_2_OVER_PI * (x + GELU_TANH_CUBIC * x**3))
    du = SQRT_2_OVER_PI * (1 + 3 * GELU_TANH_CUBIC * x**2)
    return torch.sigmoid(two_u), torch.sigmoid(-two_u), du


def _gelu_tanh(x):
    """gelu_tanh(x) = x (1 + tanh u) / 2 = x sigmoid(2u)."""
    return x * torch.sigmoid(2 * (SQRT_2_OVER_PI * (x + GELU_TANH_CUBIC * x**3)))


def _gelu_tanh_d1(x):
    """g' = p + 2 x u' p q (p' = 2 u' p q)."""
    p, q, du = _tanh_parts(x)
    return p + 2 * x * du * p * q


def _gelu_tanh_d2(x):
    """g'' = p q (4 u' + 2 x u'' + 4 x u'^2 (q - p)), u'' = 6 a k x (from p' = 2u'pq, q' = -2u'pq)."""
    p, q, du = _tanh_parts(x)
    d2u = 6 * GELU_TANH_CUBIC * SQRT_2_OVER_PI * x
    return p * q * (4 * du + 2 * x * d2u + 4 * x * du**2 * (q - p))


def _silu(x):
    """silu(x) = x sigmoid(x)."""
    return x * torch.sigmoid(x)


def _silu_d1(x):
    """silu'(x) = sigmoid(x) (1 + x sigmoid(-x))."""
    return torch.sigmoid(x) * (1 + x * torch.sigmoid(-x))


def _silu_d2(x):
    """silu''(x) = sigmoid(x) sigmoid(-x) (2 + x (sigmoid(-x) - sigmoid(x)))."""
    p, q = torch.sigmoid(x), torch.sigmoid(-x)
    return p * q * (2 + x * (q - p))


GELU = {"none": (_gelu_erf, _gelu_erf_d1, _gelu_erf_d2), "tanh": (_gelu_tanh, _gelu_tanh_d1, _gelu_tanh_d2)}
SILU = (_silu, _silu_d1, _silu_d2)


def gelu_functions(approximate: str):
    if approximate not in GELU:
        raise UnsupportedOpError(current_op(), f"gelu approximate={approximate!r}")
    return GELU[approximate]


@rule(aten.gelu.default)
def gelu(func, x, *, approximate="none"):
    """gelu(x) = x Phi(x) ('none') or x (1 + tanh(sqrt(2/pi)(x + 0.044715 x^3)))/2 ('tanh'), the exact real functions
    (constants as balls): ``enclose_smooth`` with f' by composition, re-centred. The CPU kernel's erf polynomial
    (~1.5e-7 absolute) and its float32 evaluation are measured by the re-centring, not assumed."""
    m = func(x.mid, approximate=approximate)
    f, d1, _ = gelu_functions(approximate)
    xw = wide(x)
    return finish(m, enclose_smooth(xw, f, d1), unknown=unknown_of(xw))


@rule(aten.silu.default)
def silu(func, x):
    """silu(x) = x sigmoid(x): ``enclose_smooth`` with silu' by composition, re-centred."""
    m = func(x.mid)
    xw = wide(x)
    return finish(m, enclose_smooth(xw, SILU[0], SILU[1]), unknown=unknown_of(xw))


# ----------------------------------------------------------------------------------------------------------------------
# softmax, log_softmax, logsumexp


def _dims(ndim: int, dim) -> list[int]:
    if isinstance(dim, int):
        dim = [dim]
    dim = list(dim) if dim is not None else []
    if not dim:
        return list(range(ndim))
    return sorted({d % max(ndim, 1) for d in dim})


def _sum_bounds(terms_lo, terms_hi, dims):
    """Lower/upper bounds of the exact sums of non-negative float64 terms over ``dims`` (keepdim).

    fl(sum) in any order satisfies |fl - S| <= gamma_k S with k = n - 1 (non-negative terms, additions exact-relative
    under gradual underflow), and 1 + gamma_k = 1/(1 - ku): S >= fl (1 - ku), S <= fl (1 - ku)/(1 - 2ku). The factors
    are rounded offline (down/up) and each product bumped by F2."""
    n = 1
    for d in dims:
        n *= terms_lo.shape[d]
    ku = max(n - 1, 0) * rounding.unit_roundoff_exact(_F64)
    f_lo = rounding.round_down_float(1 - ku)
    f_hi = rounding.round_up_float((1 - ku) / (1 - 2 * ku))
    s_lo = torch.sum(terms_lo, dim=dims, keepdim=True)
    s_hi = torch.sum(terms_hi, dim=dims, keepdim=True)
    return torch.clamp_min(rounding.down(s_lo * f_lo), 0), rounding.up(s_hi * f_hi)


def _exp_terms(x: BallTensor, dims, device_type):
    """(lo, hi, M, E_lo, E_hi): end points of x (unknown elements (-inf, inf)), the shift M = max of the finite
    midpoints over ``dims`` (0 where none), and E_lo <= exp(lo - M), exp(hi - M) <= E_hi (trust table). End points
    and differences are rounded outward by ``nonsmooth._add_up`` (TwoSum: exact whenever the float64 result is, so
    exact logits lose nothing here)."""
    unknown = unknown_of(x)
    m = torch.where(unknown, torch.zeros_like(x.mid), x.mid)
    r = torch.where(unknown, torch.zeros_like(x.rad), x.rad)
    lo = torch.where(unknown, torch.full_like(m, -_INF), -_add_up(-m, r))
    hi = torch.where(unknown, torch.full_like(m, _INF), _add_up(m, r))
    finite_mid = torch.where(torch.isfinite(x.mid), x.mid, torch.full_like(m, -_INF))
    big = torch.amax(finite_mid, dim=dims, keepdim=True)
    big = torch.where(torch.isfinite(big), big, torch.zeros_like(big))
    e_lo = torch.clamp_min(accuracy.enclose("exp", -_add_up(big, -lo), device_type=device_type)[0], 0)
    e_hi = nan_to(accuracy.enclose("exp", _add_up(hi, -big), device_type=device_type)[1], _INF)
    return lo, hi, big, e_lo, e_hi


def _softmax_w(x: BallTensor, dims, device_type):
    """Bounds w_lo <= w_i <= w_hi of w_i = log(S_i - 1), S_i = sum_j exp(x_j - x_i) = 1 + e^(w_i), over the balls.

    S_i - 1 = P_i R_i with P_i = exp(M - x_i) (x_i only) and R_i = sum_{j != i} exp(x_j - M) (the others only), so
    w_i = (M - x_i) + log R_i exactly, and its range over the box is [(M - hi_i) + log R_i(lo), (M - lo_i) + log
    R_i(hi)]: no dependency is lost and nothing overflows. R_i(lo) >= T_lo - E_lo_i and R_i(hi) <= T_hi - E_hi_i with
    T the bounded sums of ``_exp_terms`` (T_lo <= sum E_lo exactly, so subtracting this very E_lo_i is a lower bound;
    likewise above), rounded outward; log from the trust table (log 0 = -inf; R_hi = 0 means R = 0: w = -inf).
    """
    lo, hi, big, e_lo, e_hi = _exp_terms(x, dims, device_type)
    t_lo, t_hi = _sum_bounds(e_lo, e_hi, dims)
    r_lo = torch.clamp_min(rounding.sub_down(t_lo, e_lo), 0)
    r_hi = nan_to(rounding.sub_up(t_hi, e_hi), _INF)
    log_lo = accuracy.enclose("log", r_lo, device_type=device_type)[0]
    log_hi = accuracy.enclose("log", r_hi, device_type=device_type)[1]
    w_lo = rounding.add_down(-_add_up(hi, -big), log_lo)
    w_hi = rounding.add_up(_add_up(big, -lo), log_hi)
    w_lo = torch.where(r_lo == 0, torch.full_like(w_lo, -_INF), w_lo)
    w_hi = torch.where(r_hi == 0, torch.full_like(w_hi, -_INF), w_hi)
    return nan_to(w_lo, -_INF), nan_to(w_hi, _INF)


def _bounds_result(mid, lower, upper):
    """rad = max(up(mid - L), up(U - mid)) (float64), +inf for non-finite midpoints."""
    mid64 = mid.detach().to(_F64)
    rad = torch.maximum(rounding.sub_up(mid64, lower), rounding.sub_up(upper, mid64))
    rad = torch.where(torch.isfinite(mid64), rounding.clean_rad(rad), torch.full_like(rad, _INF))
    return result(mid, rad)


def _row_view(x: BallTensor, mid: torch.Tensor):
    """0-dim softmax inputs are rows of one element."""
    if x.dim() == 0:
        return BallTensor(x.mid.reshape(1), x.rad.reshape(1)), 0
    return x, None


@rule(aten._softmax.default)
def softmax(func, x, dim, half_to_float):
    """softmax_i = 1/S_i = 1/(1 + e^(w_i)) = sigmoid(-w_i), decreasing in w_i: with ``_softmax_w``'s bounds,
    y_i in [sigmoid(-w_hi), sigmoid(-w_lo)] (``elementwise._sigmoid_enclose``, trust table), clamped to [0, 1]. This is
    the exact range over the box up to outward rounding (y_i is monotone in each x_j), so input radii propagate
    without dependency loss: about 2 y_i (1 - y_i) r for equal radii r, the true worst case. Unknown entries (x_j any
    real) leave y_i in [0, 1]."""
    m = func(x.mid, dim, half_to_float)
    if m.numel() == 0:
        return result(m, torch.zeros_like(m, dtype=rounding.rad_dtype(m.dtype)))
    xw, _ = _row_view(wide(x), m)
    dims = _dims(xw.dim(), dim)
    dev = m.device.type
    w_lo, w_hi = _softmax_w(xw, dims, dev)
    lower = elementwise._sigmoid_enclose(-w_hi, dev)[0]
    upper = elementwise._sigmoid_enclose(-w_lo, dev)[1]
    lower, upper = torch.clamp(lower, 0, 1), torch.clamp(upper, 0, 1)
    return _bounds_result(m, lower.reshape(m.shape), upper.reshape(m.shape))


# RZBM's successor step in float64 (DESIGN F2): fl(c -+ fl(fl(phi |c|) + e0)) is <= pred(c) / >= succ(c) for any
# e0 >= eta; e0 = 2^-600 keeps exp's arguments far from the subnormal range (libm's exp near realmin is 10x slower).
_SUCC_PHI64 = rounding.round_up_float(rounding.unit_roundoff_exact(_F64) * (1 + 2 * rounding.unit_roundoff_exact(_F64)))
_SUCC_E0_64 = 2.0**-600
_POS_INF64 = torch.tensor(math.inf, dtype=torch.float64)
_POS_INF32 = torch.tensor(math.inf, dtype=torch.float32)


def _step(c: torch.Tensor, sign) -> torch.Tensor:
    """In place: c - (phi|c| + e0) <= pred(c) (sign -1) or c + (phi|c| + e0) >= succ(c) (sign +1; a tensor of signs
    too) for the round-to-nearest result c of one operation (RZBM, DESIGN F2; the product by the sign is exact;
    non-finite c: unchanged or NaN)."""
    e = torch.abs(c).mul_(_SUCC_PHI64).add_(_SUCC_E0_64)
    return c.addcmul_(sign, e) if isinstance(sign, torch.Tensor) else c.add_(e, alpha=sign)


def _all_zero(r: torch.Tensor) -> bool:
    """Whether every radius is exactly 0 (radii are >= 0 and never NaN: the largest is 0). One reduction and one
    read, half the passes of ``bool(r.any())``."""
    return r.numel() == 0 or not float(r.max()) > 0


def _exact_pairs(both: torch.Tensor) -> bool:
    """True when every m -+ r and every (m_j - r_j) - (m_i + r_i) along the last dim is exact in float64, for
    float32-representable m and r (float16/bfloat16 too), given ``both`` = [m, r] stacked on dim 0 (float64): all are
    multiples of g >= mu 2^-24 (mu the least non-zero |m| or r of the row; a float32 x is a multiple of 2^(e_x - 23))
    and below 2A in magnitude (A = max |m| + r), so A <= 2^28 mu keeps them under 2^53 g. (|r| = r: radii are >= 0.)"""
    a = torch.abs(both)  # [|m|, r]
    top = torch.amax(a[0] + a[1], -1)
    low = torch.amin(torch.where(a > 0.0, a, _POS_INF64), (0, -1))
    return bool((top <= low.mul_(2.0**28)).all())


def _mid_rad64(x: BallTensor) -> torch.Tensor:
    """[mid, rad] of a floating ball stacked on a new dim 0, in float64 (exact widening; one pass when the two share
    a dtype)."""
    if x.mid.dtype == x.rad.dtype:
        return torch.stack((x.mid.detach(), x.rad)).to(_F64)
    return torch.stack((x.mid.detach().to(_F64), x.rad.to(_F64)))


_SIGNS: dict = {}


def _half_signs(ndim: int, device) -> torch.Tensor:
    """The float64 tensor [-1, 1] shaped (2, 1, ..., 1) with ``ndim`` dims in all (cached per device)."""
    key = (ndim, str(device))
    if key not in _SIGNS:
        _SIGNS[key] = torch.tensor([-1.0, 1.0], dtype=_F64, device=device).view((2,) + (1,) * (ndim - 1))
    return _SIGNS[key]


_INFS: dict = {}


def _half_infs(ndim: int, device) -> torch.Tensor:
    """``_half_signs(ndim, device) * inf`` = [-inf, inf] (cached): the directions of nextafter for the two halves."""
    key = (ndim, str(device))
    if key not in _INFS:
        _INFS[key] = _half_signs(ndim, device) * _INF
    return _INFS[key]


# The pairwise fast path of log_softmax: rows of at most this many classes and at most this many pair terms in all.
_PAIRWISE_MAX_CLASSES = 64
_PAIRWISE_MAX_TERMS = 1 << 18
_PAIRWISE_CONSTANTS: dict = {}


def _pairwise_constants(n_classes: int, backend: str) -> tuple:
    """(c_l, (kd, kx, ka), (phi, a)) of ``_log_softmax_pairwise``: exact rationals rounded up offline, cached.

    c_e, a_e / c_x, a_x / c_l, a_l: trust-table coefficients of exp / expm1 / log1p (|lib - f| <= c|v| + a);
    g = gamma_(C-1) (a sum of C non-negative terms in any order is within a factor 1 -+ g of the exact sum);
    alpha = (C - 1) a_e; delta = max(1 - (1 - c_e)/(1 + g), (1 + c_e)/(1 - g) - 1); u' = u(1 + u).
    eps <= N = delta T + c_x|B| + u|A| + alpha + a_x; N <= rho (1 + A) with rho = max(rho0, rho1)/(1 - rho1):
    K = 0 (|B| <= a_x/(1 - c_x)): rho0 = 3 delta + 2u' + alpha + 2(alpha + a_x + (c_x + u') a_x/(1 - c_x));
    K > 0 (|B| <= (1 + a_x)/(1 - c_x), 1 + A^ >= max(1, T(1 - delta) - alpha)): rho1 = (delta + u')(1 + alpha)/
    (1 - delta) + (c_x + u')(1 + a_x)/(1 - c_x) + alpha + a_x. So eps/(1 + A - eps) <= kappa N/(1 + A),
    kappa = 1/(1 - rho), and N <= N' = (delta + u') T + (c_x + u')|B| + alpha + a_x (|A| <= (1 + u)(T + |B|)).
    q = fl(fl(fl(T kd) + fl(|B| kx)) + ka) / fl(1 + A)) with (kd, kx, ka) = g_q kappa (delta + u', c_x + u',
    alpha + a_x), g_q = (1 + u)^7/(1 - u) >= (1 + u)^5/(1 - u): by ``rounding.inflate``'s lemma (4 operations) and F1
    for the division (fl(1 + A) >= 1/2), kappa N'/(1 + A) <= q + 7 eta. (phi, a) = ``rounding.inflate``'s constants
    for the final slack u(|P| + |v|) + c_l|w| + q (5 operations) with the absolute term a_l + 7 eta."""
    key = (n_classes, backend)
    if key not in _PAIRWISE_CONSTANTS:
        u = rounding.unit_roundoff_exact(_F64)
        u1 = u * (1 + u)
        k = n_classes - 1
        g = k * u / (1 - k * u)
        c_e, a_e = (Fraction(v) for v in accuracy._coefficients("exp", backend))
        c_x, a_x = (Fraction(v) for v in accuracy._coefficients("expm1", backend))
        c_l, a_l = (Fraction(v) for v in accuracy._coefficients("log1p", backend))
        delta = max(1 - (1 - c_e) / (1 + g), (1 + c_e) / (1 - g) - 1)
        alpha = k * a_e
        rho0 = 3 * delta + 2 * u1 + alpha + 2 * (alpha + a_x + (c_x + u1) * a_x / (1 - c_x))
        rho1 = (delta + u1) * (1 + alpha) / (1 - delta) + (c_x + u1) * (1 + a_x) / (1 - c_x) + alpha + a_x
        kappa = 1 / (1 - max(rho0, rho1) / (1 - rho1))
        up = rounding.round_up_float
        g_q = (1 + u) ** 7 / (1 - u)
        phi, a_abs = rounding._inflation_constants(5, _F64, a_l + 7 * Fraction(rounding.eta(_F64)))
        _PAIRWISE_CONSTANTS[key] = (up(c_l), (up(g_q * kappa * (delta + u1)), up(g_q * kappa * (c_x + u1)),
                                              up(g_q * kappa * (alpha + a_x))), (phi, a_abs))
    return _PAIRWISE_CONSTANTS[key]


def _log_softmax_pairwise(m: torch.Tensor, x: BallTensor, dim: int):
    """The radius of log_softmax for short finite rows, from the pairwise form (None: use the general rule).

    y_i = -log1p(S_i), S_i = sum_(j != i) exp(x_j - x_i): increasing in x_i, decreasing in every other x_j, so over
    the box y_i lies exactly in [-log1p(S_hi), -log1p(S_lo)], S_lo = sum_j exp(lo_j - hi_i), S_hi = sum_j exp(hi_j -
    lo_i) -- the same exact range as ``_softmax_w`` (no dependency lost). z <= lo_j - hi_i and -z^T >= hi_j - lo_i,
    with lo, hi and z exact for float32/16 values of a moderate spread (``_exact_pairs``), else rounded outward by
    ``nonsmooth._add_up`` (TwoSum: exact results stay exact, F2 otherwise):
    one stack [z, -z^T] (diagonal -inf) bounds both ends; per half S^ = sum_j e^(z_ij) is below S_lo (half 0) /
    above S_hi (half 1).
    Shift (no overflow, and the large part exact): for K = max(0, max_j z_ij), log1p(S^) = K + log1p(A^) exactly,
    A^ = expm1(-K) + sum_j e^(z_ij - K). Computed: T = fl(sum_j exp(dir(fl(z - K)))) (dir: below pred / above succ
    per half by RZBM's step, F2, which keeps exp's arguments normal: subnormal or huge ones take libm's slow path),
    B = expm1(-K), A = fl(T + B), w = log1p(A), v = fl(K + w). With the trust table and F3,
    |A^ - A| <= eps <= N = delta T + c_x|B| + u|A| + alpha + a_x, and 1 + A^ >= 1 (>= 1 + e^-K when K > 0: the
    argmax term is e^0), so by concavity |log1p(A^) - log1p(A)| <= eps/(1 + A - eps) <= q + 7 eta with
    q = fl(fl(T kd + |B| kx + ka)/fl(1 + A)) (``_pairwise_constants``), and |log1p(S^) - v| <= u|v| + c_l|w| + a_l +
    q + 7 eta: the large part K is exact, only u|v| grows with |y|, and q is relative to S for the largest class
    (K = 0). The radius around the kernel's m is max_k(P_k + err_k) with P_0 = -(v_0 + m), P_1 = v_1 + m (one
    rounded addition each: exact <= P + u|P|): rad = max_k up(P_k + inflate(u(|P_k| + |v_k|) + c_l|w_k| + q_k, 5,
    a_l + 7 eta)) (F2, ``rounding.inflate``: products of two exact floats, three additions). A non-finite input,
    midpoint or overflow makes some radius non-finite: then None (the general rule copes)."""
    d = dim % x.dim()
    n_classes = x.shape[d]
    if n_classes > _PAIRWISE_MAX_CLASSES or x.numel() * n_classes > _PAIRWISE_MAX_TERMS:
        return None
    last = d == x.dim() - 1
    if last:
        fast = _log_softmax_pairwise_fused(m, x)
        if fast is not None:
            return fast
    both = _mid_rad64(x)  # [mid, r], classes on the last dim
    if not last:
        both = both.movedim(d + 1, -1).contiguous()  # (the pair sums below then run along contiguous rows)
    mid, r = both[0], both[1]
    sign = _half_signs(x.dim() + 2, m.device)
    if x.mid.dtype != _F64 and _exact_pairs(both):  # float32/16 values of a moderate spread: all exact
        lohi = torch.addcmul(mid, sign.squeeze(-1), r)  # [lo, hi] = [m - r, m + r] (the product by -+1 is exact)
        z = lohi.unsqueeze(-2) - lohi.flip(0).unsqueeze(-1)  # z[0][..., i, j] = lo_j - hi_i, z[1] = hi_j - lo_i
    else:  # outward rounding that keeps exact results exact (TwoSum, F2)
        lo, hi = (mid, mid) if _all_zero(x.rad) else (-_add_up(-mid, r), _add_up(mid, r))
        pair = -_add_up(hi.unsqueeze(-1), -lo.unsqueeze(-2))  # [..., i, j] <= lo_j - hi_i
        z = torch.stack((pair, -pair.transpose(-1, -2)))  # z[1][..., i, j] >= hi_j - lo_i
    z.diagonal(dim1=-2, dim2=-1).fill_(-_INF)
    shift = torch.amax(z, -1, keepdim=True).clamp_min_(0)
    y = _step(z.sub_(shift), sign)  # pred (half 0) / succ (half 1) by RZBM's step: never a subnormal exp argument
    y.diagonal(dim1=-2, dim2=-1).fill_(-_INF)  # (-inf + inf on the diagonal of half 1)
    t = torch.exp(y).sum(-1)
    shift = shift.squeeze(-1)
    b = torch.expm1(-shift)
    a = t + b
    w = torch.log1p(a)
    v = shift + w
    c_l, (kd, kx, ka), (phi, a_abs) = _pairwise_constants(n_classes, accuracy.backend_for(m.device.type))
    # q = fl(fl(T kd + |B| kx + ka) / fl(1 + A)) >= eps/(1 + A - eps) - 7 eta (``_pairwise_constants``); 1 + A <= 0
    # would give q = inf: None
    q = t.mul_(kd).add_(torch.abs(b).mul_(kx)).add_(ka).div_(a.add_(1.0).clamp_min_(0))
    m64 = m.detach().to(_F64)
    p = (v + (m64 if last else m64.movedim(d, -1))) * sign.squeeze(-1)  # p[0] = -(v_0 + m), p[1] = v_1 + m (exact)
    c = torch.abs(p).add_(torch.abs(v)).mul_(_U64).add_(torch.abs(w).mul_(c_l)).add_(q)
    rad = torch.amax(torch.nextafter(p.add_(c.mul_(phi).add_(a_abs)), _POS_INF64), 0).clamp_min_(0)
    if not math.isfinite(float(rad.sum())):
        return None
    return _radius_result(m, rad if last else rad.movedim(-1, d))


def _log_softmax_pairwise_fused(m: torch.Tensor, x: BallTensor) -> BallTensor | None:
    """``_log_softmax_pairwise`` for float32 rows along the last dim with exact pair differences as
    ``fused.log_softmax_pairwise`` (the same operations bit for bit, two compiled passes around torch's exp, sum,
    expm1 and log1p), or None where it does not apply (the torch formulas then run)."""
    if not (m.dtype == x.mid.dtype == x.rad.dtype == torch.float32 and m.device.type == "cpu"
            and fused._numba() is not None and x.dim() >= 1 and m.numel() > 0):
        return None
    n = m.shape[-1]
    mid, rad = x.mid.detach().reshape(-1, n).contiguous(), x.rad.expand(x.shape).reshape(-1, n).contiguous()
    constants = _pairwise_constants(n, accuracy.backend_for(m.device.type)) + (_U64,)
    out = fused.log_softmax_pairwise(m.reshape(-1, n).contiguous(), mid, rad, constants)
    return None if out is None else BallTensor(m, out.reshape(m.shape))


def _to_dtype_up(rad: torch.Tensor, rd: torch.dtype) -> torch.Tensor:
    """``rounding.to_dtype_up`` of float64 bounds (float32 or float64 ``rd``) with one pass less: round to nearest,
    then one nextafter where that went down (the mixed float32/float64 comparison is exact)."""
    if rd == rad.dtype:
        return rad
    y = rad.to(rd)
    return torch.where(torch.lt(y, rad), torch.nextafter(y, _POS_INF32), y)


def _radius_result(m: torch.Tensor, rad: torch.Tensor) -> BallTensor:
    """``common.result`` for a finite float64 radius of m's shape: rounded up to the radius dtype
    (``_to_dtype_up``), without its NaN and shape passes."""
    return BallTensor(m, _to_dtype_up(rad, rounding.rad_dtype(m.dtype)))


@rule(aten._log_softmax.default)
def log_softmax(func, x, dim, half_to_float):
    """log_softmax_i = -log S_i = -log(1 + e^(w_i)): with ``_softmax_w``'s bounds, in
    [-softplus(w_hi), -softplus(w_lo)], softplus bounded overflow-free (``elementwise._log1p_exp_bounds``), and <= 0.
    Short finite rows take the pairwise form (``_log_softmax_pairwise``: the same exact range, one exp and one log1p
    pass in float64)."""
    m = func(x.mid, dim, half_to_float)
    if m.numel() == 0:
        return result(m, torch.zeros_like(m, dtype=rounding.rad_dtype(m.dtype)))
    if x.dim() > 0 and x.is_floating_point():
        fast = _log_softmax_pairwise(m, x, dim)
        if fast is not None:
            return fast
    xw, _ = _row_view(wide(x), m)
    dims = _dims(xw.dim(), dim)
    dev = m.device.type
    w_lo, w_hi = _softmax_w(xw, dims, dev)
    lower = -elementwise._log1p_exp_bounds(w_hi, dev, upper=True)
    upper = torch.clamp_max(-elementwise._log1p_exp_bounds(w_lo, dev, upper=False), 0)
    return _bounds_result(m, lower.reshape(m.shape), upper.reshape(m.shape))


def _parts64(x):
    """(mid, rad) of a float tensor argument in float64, exactly; rad None for a plain tensor or all-zero radii."""
    if isinstance(x, BallTensor):
        return x.mid.detach().to(_F64), (None if _all_zero(x.rad) else x.rad.to(_F64))
    return x.detach().to(_F64), None


_BACKWARD_CONSTANTS: dict = {}


def _log_softmax_backward_constants(n: int, backend: str) -> tuple:
    """(c_e, g_s, th, u, (phi1, a1), {6: (phi, a), 10: (phi, a)}) of ``log_softmax_backward_radius``: the exp
    trust-table coefficient; g_s >= g/(1 - g) and th >= 1/(1 - g) for g = gamma_(n-1) (a sum of n terms in any order);
    u = 2^-53; ``rounding.inflate``'s constants for inflate(., 1, a_e) and inflate(., n_ops, eta/2). Rounded up,
    cached."""
    key = (n, backend)
    if key not in _BACKWARD_CONSTANTS:
        u = rounding.unit_roundoff_exact(_F64)
        g = (n - 1) * u / (1 - (n - 1) * u) if n > 1 else Fraction(0)
        c_e, a_e = accuracy._coefficients("exp", backend)
        _BACKWARD_CONSTANTS[key] = (c_e, rounding.round_up_float(g / (1 - g)), rounding.round_up_float(1 / (1 - g)),
                                    float(u), rounding.inflation_constants(1, _F64, Fraction(a_e)),
                                    {k: rounding.inflation_constants(k, _F64, _HALF_ETA64) for k in (6, 10)})
    return _BACKWARD_CONSTANTS[key]


def _log_softmax_backward_fused(m, grad, e, d: int, constants: tuple):
    """The radius below from ``fused.log_softmax_backward_radius`` (the same operations after exp, the row sums in
    index order) where it applies: CPU float32/float64, classes on the last dim, every operand contiguous; else
    None (also where a radius is not finite: the composition then runs, as below)."""
    if d != m.dim() - 1 or not fused.applies(m):
        return None
    g = mid_of(grad)
    r = grad.rad if isinstance(grad, BallTensor) and not _all_zero(grad.rad) else None  # ``_parts64``'s rG
    if g.dtype != m.dtype or not g.is_contiguous() or (r is not None and (r.dtype != m.dtype or r.shape != m.shape
                                                                          or not r.is_contiguous())):
        return None
    k = np.array(constants, dtype=np.float64)
    rad = fused.log_softmax_backward_radius(g.detach(), r if r is not None else torch.empty(0, dtype=m.dtype),
                                            e.contiguous(), m, k)
    return None if rad is None else _radius_result(m, rad)


def log_softmax_backward_radius(m: torch.Tensor, grad, z, dim: int):
    """The ball of _log_softmax_backward_data, f_i = G_i - P_i s with P_i = exp(z_i), s = sum_j G_j, over the balls of
    G and z, without composing ball rules (None for non-floating arguments or a non-finite result: use the rule's
    composition).

    Exact range: f_i = (1 - P_i) G_i - P_i T_i with T_i = sum_(j != i) G_j, disjoint from G_i, so for fixed P_i it is
    c(P) +- w(P), c(P) = mG_i - P ms, w(P) = |1 - P| rG_i + P rT_i (ms = sum mG, rT_i = sum_(j != i) rG_j), and f_i is
    affine in P_i: sup |f_i - m_i| = max over P in {a_i, b_i} of |c(P) - m_i| + w(P), with a_i <= exp(z_lo),
    b_i >= exp(z_hi) (trust table: e -+ (c_e e + a_e), rounded outward by one nextafter, F2). This is the exact range
    (the composition counted G_i twice: rG_i (1 + P_i) instead of |1 - P_i| rG_i). Rounding: s~ = fl(sum mG) with
    |s~ - ms| <= e_s = g_s fl(sum |mG|) (F3), and e_s = 0 when at most one G of the row is non-zero, or when the G
    are float32 values (float16/bfloat16 too) with n max|G| <= 2^29 min|G != 0| (``_exact_sum_mask``: every partial
    sum is then exact in float64 in any order); rT_i <= up(up(fl(sum rG) th) - rG_i); t1 = fl(P s~), t2 = fl(mG - t1) with its exact
    error e2 (TwoSum), t3 = fl(t2 - m), t4 = fl(t3 + e2) give |c(P) - m| <= |t4| + P e_s + u(|t1| + |t3| + |t4|) +
    eta/2 (F1 for t1, t3, t4), and |1 - P| <= (1 + u)|fl(1 - P)|:
    rad = max_P inflate(|t4| + u(|t1| + |t3| + |t4|) + P (e_s + rT) + |fl(1 - P)| rG, 10, eta/2)
    (``rounding.inflate``: products of two factors, each an exact float or a once-rounded sum)."""
    for t in (grad, z):
        if isinstance(t, torch.Tensor) and not t.is_floating_point():
            return None
    if m.dim() == 0:
        return None
    d = dim % m.dim()
    mz, rz = _parts64(z)
    c_e, g_s, th, u, (phi1, a1), inflation = _log_softmax_backward_constants(m.shape[d],
                                                                             accuracy.backend_for(m.device.type))
    sign = _half_signs(m.dim() + 1, m.device)
    outward = _half_infs(m.dim() + 1, m.device)  # [-inf, inf]: nextafter toward it is pred (half 0) / succ (half 1)
    # z_lo = down(mz - rz), z_hi = up(mz + rz) (F2; the product by -+1 is exact): one addcmul and one nextafter
    ends = torch.stack((mz, mz)) if rz is None else torch.nextafter(torch.addcmul(mz, sign, rz), outward)
    e = torch.exp(ends)
    constants = (c_e, g_s, th, u, phi1, a1) + inflation[6] + inflation[10]
    fast = _log_softmax_backward_fused(m, grad, e, d, constants)
    if fast is not None:
        return fast
    mg, rg = _parts64(grad)
    # P[0] <= exp(z_lo) (clamped at 0 <= exp), P[1] >= exp(z_hi): e -+ inflate(c_e e, 1, a_e), rounded outward
    # (``rounding.inflate``'s two passes with its constants; a NaN, which only a NaN or infinite e gives, stays NaN and
    # makes the radius non-finite below)
    p = torch.nextafter(torch.addcmul(e, sign, e.mul(c_e).mul_(phi1).add_(a1)), outward).clamp_min_(0)
    s = torch.sum(mg, d, keepdim=True)
    a = torch.abs(mg)
    e_s = rounding.up(torch.sum(a, d, keepdim=True).mul_(g_s))
    nonzero = a > 0.0
    exact = torch.sum(nonzero, d, keepdim=True) <= 1  # a row with at most one non-zero term sums exactly
    if mid_of(grad).dtype != _F64:  # float32/16 values: the float64 sum is exact when n max|x| <= 2^29 min|x != 0|
        exact |= _exact_sum_mask(a, [d], True, nonzero=nonzero)
    e_s.masked_fill_(exact, 0.0)  # (where e_s is not finite, neither is s: the radius is not finite either way)
    m64 = m.detach().to(_F64)
    t1 = p * s
    t2 = mg - t1
    t3 = t2 - m64
    # the exact error of t2 = fl(mg - t1) added back before taking the modulus: Knuth's TwoSum of (mg, -t1) with the
    # negation folded in (fl(-t1 - bb) = -fl(t1 + bb): the same bits as ``_two_sum_error(mg, -t1, t2)``)
    bb = t2 - mg
    t4 = t3 + (mg - (t2 - bb)).sub_(bb.add_(t1))
    c = torch.abs(t4)
    c.add_(torch.abs(t1).add_(torch.abs(t3)).add_(c).mul_(u))
    if rg is None:
        c.add_(p * e_s)
        n_ops = 6
    else:
        rest = rounding.sub_up(rounding.up(torch.sum(rg, d, keepdim=True).mul_(th)), rg)
        c.add_(p * (e_s + rest)).add_(torch.abs(1.0 - p).mul_(rg))
        n_ops = 10
    # rounding.inflate(c, n_ops, eta/2) in place (c is ours); NaN stays NaN: non-finite, caught below
    phi, a_abs = inflation[n_ops]
    rad = torch.amax(c.mul_(phi).add_(a_abs), 0)
    if not math.isfinite(float(rad.sum())):
        return None
    return _radius_result(m, rad)


@rule(aten.logsumexp.default)
def logsumexp(func, x, dim, keepdim=False):
    """logsumexp = M + log sum_j exp(x_j - M), increasing in every x_j: in [M + log T_lo, M + log T_hi] with the
    bounded sums of ``_exp_terms`` (trust-table log, additions rounded outward), and >= max_j lo_j (exactly)."""
    m = func(x.mid, dim, keepdim)
    xw = wide(x)
    if xw.dim() == 0:
        xw = BallTensor(xw.mid.reshape(1), xw.rad.reshape(1))
    dims = _dims(xw.dim(), dim)
    if m.numel() == 0:
        return result(m, torch.zeros_like(m, dtype=rounding.rad_dtype(m.dtype)))
    dev = m.device.type
    lo, hi, big, e_lo, e_hi = _exp_terms(xw, dims, dev)
    t_lo, t_hi = _sum_bounds(e_lo, e_hi, dims)
    lower = rounding.add_down(big, accuracy.enclose("log", t_lo, device_type=dev)[0])
    lower = torch.maximum(nan_to(lower, -_INF), torch.amax(lo, dim=dims, keepdim=True))
    upper = nan_to(rounding.add_up(big, accuracy.enclose("log", t_hi, device_type=dev)[1]), _INF)
    return _bounds_result(m, lower.reshape(m.shape), upper.reshape(m.shape))


# ----------------------------------------------------------------------------------------------------------------------
# Negative log-likelihood


def class_dim(x) -> int:
    """The class dimension of nll_loss inputs: 0 for [C], 1 for [N, C] and [N, C, d1, ...]."""
    return 0 if x.dim() == 1 else 1


def nll_parts(x, target, weight, ignore_index):
    """(picked, w_t, kept): picked = x[n, t_n] (float64 ball, exact selection), w_t = weight[t_n] (1 without weight) as
    a float64 ball, both exactly (0, 0) where t_n == ignore_index, and the bool mask of kept samples."""
    cd = class_dim(x)
    kept = target != ignore_index
    safe_t = torch.where(kept, target, torch.zeros_like(target)).unsqueeze(cd)
    xw = wide(x)
    picked = BallTensor(torch.gather(xw.mid, cd, safe_t).squeeze(cd), torch.gather(xw.rad, cd, safe_t).squeeze(cd))
    if weight is None:
        w_t = point(torch.ones_like(picked.mid))
    else:
        ww = wide(weight)
        idx = safe_t.squeeze(cd)
        w_t = BallTensor(ww.mid[idx], ww.rad[idx])
    zero = point(torch.zeros_like(picked.mid))
    return pick(kept, picked, zero), pick(kept, w_t, zero), kept


def _fadd_up(a: float, b: float) -> float:
    """Upper bound of a + b for Python floats a, b >= 0 (F2: succ of the rounded sum; an exact 0 when both are 0)."""
    t = a + b
    return math.nextafter(t, math.inf) if t != 0 else 0.0


def _fmul_up(a: float, b: float) -> float:
    """Upper bound of a b for a, b >= 0 (F2; 0 exactly when a factor is 0, succ otherwise, underflow included)."""
    return math.nextafter(a * b, math.inf) if a != 0 and b != 0 else 0.0


def _fdiv_up(a: float, b: float) -> float:
    """Upper bound of a / b for a >= 0, b > 0 (F2; 0 exactly when a is 0)."""
    return math.nextafter(a / b, math.inf) if a != 0 else 0.0


_F32_MAX = float(torch.finfo(torch.float32).max)
_U64 = float(rounding.unit_roundoff_exact(_F64))
_ETA64 = rounding.eta(_F64)
_HALF_ETA64 = Fraction(rounding.eta(_F64)) / 2


def _scalar_ball(mid: torch.Tensor, rad: float, value: float | None = None) -> BallTensor:
    """A 0-d ball with a float64 radius bound ``rad`` >= 0 (NaN: unknown), rounded up to the radius dtype without
    tensor passes: float32 by round to nearest (``struct``) and one step up (the next bit pattern) if it went down;
    +inf for a non-finite midpoint (``value``: float(mid), if the caller has read it)."""
    rd = rounding.rad_dtype(mid.dtype)
    if not (rad >= 0) or not math.isfinite(float(mid) if value is None else value):
        rad = math.inf
    if rd == torch.float32:
        if rad > _F32_MAX:
            rad = math.inf
        elif rad > 0:
            y = struct.unpack("<f", struct.pack("<f", rad))[0]
            if y < rad:
                y = struct.unpack("<f", struct.pack("<I", struct.unpack("<I", struct.pack("<f", y))[0] + 1))[0]
            rad = y
    return BallTensor(mid, torch.scalar_tensor(rad, dtype=rd, device=mid.device))  # (rad is exact in rd)


_NLL_CONSTANTS: dict = {}


def _sum_constants(n: int) -> tuple[float, float]:
    """(g1, th) >= (g/(1 - g), 1/(1 - g)), g = gamma_(n-1) in float64: a sum of n terms in any order has
    |fl - S| <= g sum|x| <= g1 fl(sum|x|), and a sum of non-negative terms S <= th fl(S) (F3). Cached."""
    if n not in _NLL_CONSTANTS:
        u = rounding.unit_roundoff_exact(_F64)
        g = (n - 1) * u / (1 - (n - 1) * u) if n > 1 else Fraction(0)
        _NLL_CONSTANTS[n] = (rounding.round_up_float(g / (1 - g)), rounding.round_up_float(1 / (1 - g)))
    return _NLL_CONSTANTS[n]


def _exact_sum_mask(a: torch.Tensor, dims, keepdim: bool, differences: bool = False, nonzero=None) -> torch.Tensor:
    """True where the float64 sum over ``dims`` of the float32-representable values a >= 0 is exact in any order:
    n max a <= 2^29 min(a != 0) (every partial sum is a multiple of 2^(e_min - 23) below 2^53 of those).
    ``differences``: where every difference of two of the values is exact, max a <= 2^28 min(a != 0) (a difference
    is below 2^(e_max + 2) in magnitude and a multiple of 2^(e_min - 23)). ``nonzero``: the mask a > 0, if the caller
    has it."""
    scale = 1.0 if differences else float(math.prod(a.shape[d] for d in dims))  # exact: n < 2^53
    if nonzero is None:
        nonzero = a > 0.0
    return torch.amax(a, dims, keepdim=keepdim).mul_(scale) <= torch.amin(
        torch.where(nonzero, a, _POS_INF64), dims, keepdim=keepdim).mul_(2.0**28 if differences else 2.0**29)


def nll_loss_forward_fast(out, total, x, target, reduction, ignore_index):
    """(output, total_weight) balls of nll_loss without class weights, directly (None: use the composition).

    l_n = -x[n, t_n] exactly (a gather and a negation); W = the number of kept samples, exact. none: the ball of
    -x[n, t_n], re-centred on the kernel's value (|out - c| exactly 0 when it is the negation, else rounded up).
    sum / mean: s~ = fl(sum x[n, t_n]) in float64 with |s~ - S| <= e_s = g1 fl(sum |x|) (0 when the float32 values
    sum exactly, ``_exact_sum_mask``), radii sum R <= th fl(sum r) (``_sum_constants``); mean: q = fl(s~/W) with
    |S/W - q| <= e_s/W + u|q| + eta/2 (F1). rad = |out - c| + e_s [/W] + R [/W] (+ u|q| + eta/2), every operation
    rounded up (F2, ``_fadd_up`` etc.). total_weight = W (0 for reduction none on batched input), re-centred
    likewise."""
    if not x.is_floating_point() or reduction not in (NONE, MEAN, SUM):
        return None
    cd = class_dim(x)
    fast_stats = reduction != NONE and _nll_fused(x.mid, x.rad, target)
    if fast_stats:
        n_terms = target.numel()  # one picked entry per sample
    else:
        kept = target != ignore_index
        safe_t = _safe_targets(target, x.shape[cd], cd)
        pm, pr = _picked64(x, cd, safe_t, kept)
        n_terms = pm.numel()
    if reduction == NONE:
        diff = torch.abs(out.detach().to(_F64) + pm)  # |out - (-x[n, t_n])|
        rad = torch.where(diff == 0, pr, rounding.add_up(pr, rounding.up(diff)))
        tw_exact = 0 if x.dim() >= 2 else int(kept)
        return result(out, nan_where_not_finite(out, rad)), _exact_scalar(total, tw_exact)
    exact_check = x.mid.dtype != _F64 and n_terms > 0
    if fast_stats:  # the same statistics in one compiled pass (``fused.nll_forward_stats``: the sums in index order)
        vals = fused.nll_forward_stats(x.mid, x.rad, target, ignore_index)
    else:
        a = torch.abs(pm)
        # one read: the sums of x[n, t_n], |x[n, t_n]|, r[n, t_n] and the kept count (each over its own row of one
        # stacked tensor), and max a / min(a != 0) for ``_exact_sum_mask``'s test
        parts = [torch.stack((pm, a, pr, kept.to(_F64))).reshape(4, -1).sum(-1)]
        if exact_check:
            parts += [torch.amax(a).reshape(1), torch.amin(torch.where(a > 0.0, a, _POS_INF64)).reshape(1)]
        vals = torch.cat(parts).tolist()
    s, a_sum, r_sum, w = vals[:4]
    o, tw = float(out), float(total)
    g1, th = _sum_constants(max(n_terms, 1))
    # ``_exact_sum_mask`` in float64 scalars: n max a <= 2^29 min(a != 0) (the same two rounded products)
    exact = exact_check and vals[4] * float(n_terms) <= vals[5] * 2.0**29
    e_s = 0.0 if exact else _fmul_up(a_sum, g1)
    r_up = r_sum if th == 1 else _fmul_up(r_sum, th)
    if reduction == SUM:
        c, slack = -s, _fadd_up(e_s, r_up)
    elif w == 0:  # 0/0: the kernel's NaN
        c, slack = math.nan, math.inf
    else:
        q = s / w
        c = -q
        quotient = _fadd_up(_fmul_up(abs(q), _U64), _ETA64)
        slack = _fadd_up(_fadd_up(_fdiv_up(e_s, w), _fdiv_up(r_up, w)), quotient)
    diff = abs(o - c)
    rad = slack if diff == 0 else _fadd_up(slack, math.nextafter(diff, math.inf))
    return _scalar_ball(out, rad, o), _exact_scalar(total, int(w), tw)


def _nll_fused(m: torch.Tensor, r: torch.Tensor | None, target: torch.Tensor) -> bool:
    """Whether ``fused``'s nll kernels take these operands: [N, C] float32 midpoints (and radii) and int64 targets,
    dense and contiguous on the CPU."""
    return (m.dim() == 2 and m.dtype == torch.float32 and m.is_contiguous() and m.device.type == "cpu"
            and (r is None or (r.dtype == torch.float32 and r.shape == m.shape and r.is_contiguous()))
            and target.dtype == torch.int64 and target.dim() == 1 and target.is_contiguous()
            and target.device.type == "cpu" and fused._numba() is not None)


def _safe_targets(target: torch.Tensor, n_classes: int, cd: int) -> torch.Tensor:
    """t_n clamped into [0, C - 1], unsqueezed at the class dim: t_n itself for every kept sample (the kernel has
    checked those), a valid index for the ignored ones (what it picks there is masked out)."""
    return target.clamp(0, max(n_classes - 1, 0)).unsqueeze(cd)


_ZEROS64: dict = {}


def _zero64(device) -> torch.Tensor:
    """A shared float64 0-d zero on ``device`` (an operand of where; never written to)."""
    key = str(device)
    if key not in _ZEROS64:
        _ZEROS64[key] = torch.zeros((), dtype=_F64, device=device)
    return _ZEROS64[key]


def _picked64(x: BallTensor, cd: int, safe_t: torch.Tensor, kept: torch.Tensor):
    """(x.mid[n, t_n], x.rad[n, t_n]) in float64 (exact selection and widening), both exactly 0 for ignored samples:
    one gather from [mid, rad] stacked when they share a dtype."""
    if x.mid.dtype == x.rad.dtype:
        src = torch.stack((x.mid.detach(), x.rad))
        picked = torch.gather(src, cd + 1, safe_t.expand((2,) + safe_t.shape)).squeeze(cd + 1).to(_F64)
    else:
        picked = torch.stack([torch.gather(t, cd, safe_t).squeeze(cd).to(_F64) for t in (x.mid.detach(), x.rad)])
    picked = torch.where(kept, picked, _zero64(picked.device))
    return picked[0], picked[1]


def nll_loss_backward_fast(m, grad, target, reduction, ignore_index, total_weight):
    """grad_input of nll_loss without class weights and with an exact (point) total weight, directly (None: use the
    composition). At (n, t_n) of kept samples the exact value is -G_n (none), -G (sum) or -G/W (mean, W the exact
    total weight): c = -mG [/W] with |G/W - fl(mG/W)| <= rG/W + u|q| + eta/2 (F1; the last two by
    ``rounding.inflate(u|q|, 1, eta/2)``, rG/W rounded up by F2); rad = r + |m - c| (exact 0 when equal, else rounded
    up). Everywhere else the exact gradient is 0: rad = |m| (0 where the kernel wrote 0)."""
    if isinstance(total_weight, BallTensor) and not _all_zero(total_weight.rad):
        return None
    if isinstance(grad, torch.Tensor) and not grad.is_floating_point():
        return None
    if reduction not in (NONE, MEAN, SUM):
        return None
    cd = class_dim(m)
    if reduction != NONE and mid_of(grad).dim() == 0 and _nll_fused(m, None, target):
        c, r = _nll_backward_scalar(grad, reduction, total_weight)  # the rest in one pass, bit for bit
        return BallTensor(m, fused.nll_backward_radius(m, target, ignore_index, c, r))
    kept = target != ignore_index
    safe_t = _safe_targets(target, m.shape[cd], cd)
    at = torch.gather(m.detach(), cd, safe_t).squeeze(cd).to(_F64)
    if reduction != NONE and mid_of(grad).dim() == 0:
        c, r = _nll_backward_scalar(grad, reduction, total_weight)
        diff = torch.abs(at - c)
        rad_t = torch.where(diff == 0.0, r, rounding.up(diff).add_(r).nextafter_(_POS_INF64))  # add_up(r, up(diff))
    else:
        mg, rg = _parts64(grad)
        if reduction == MEAN:
            w = float(mid_of(total_weight))
            q = mg / w
            r = rounding.inflate(torch.abs(q).mul_(_U64), 1, _HALF_ETA64)
            if rg is not None:
                r = rounding.add_up(r, rounding.div_up(rg, w))
            c = -q
        else:
            c = -mg
            r = torch.zeros((), dtype=_F64, device=m.device) if rg is None else rg
        diff = torch.abs(at - c)
        rad_t = torch.where(diff == 0, r, rounding.add_up(r, rounding.up(diff)))
    rad_t = torch.where(kept, rad_t, torch.abs(at))  # ignored samples: the kernel's zeros (|m|)
    # Everywhere else |m|, exact in m's own dtype (and in the radius dtype, which holds it exactly); the float64 values
    # at the targets are rounded up into the radius dtype; non-finite midpoints (|m| inf or NaN, or a NaN value at a
    # target) get +inf
    rd = rounding.rad_dtype(m.dtype)
    rad_t = rad_t.expand(safe_t.squeeze(cd).shape)
    rad = torch.abs(m.detach()).to(rd).scatter_(cd, safe_t, _to_dtype_up(rad_t, rd).unsqueeze(cd))
    return BallTensor(m, rad.nan_to_num_(nan=math.inf, posinf=math.inf))


def _nll_backward_scalar(grad, reduction: int, total_weight) -> tuple[float, float]:
    """(c, r) of ``nll_loss_backward_fast`` for a 0-d grad (reduction mean or sum), in Python floats (IEEE double
    operations, the same roundings as the float64 tensor formulas): sum: c = -mG, r = rG; mean: q = fl(mG/W), c = -q,
    r = inflate(fl(u|q|), 1, eta/2) (``rounding.inflate``'s constants; NaN -> +inf as there) [+ up(rG/W), the sum
    rounded up]."""
    if isinstance(grad, BallTensor):
        mg, rg = float(grad.mid), float(grad.rad)  # (exact widenings)
    else:
        mg, rg = float(grad), 0.0
    if reduction != MEAN:
        return -mg, rg
    w = float(mid_of(total_weight))
    if w != 0:
        q = mg / w
    else:  # IEEE x/0 (Python raises): +-inf, NaN for 0/0 and NaN
        q = math.nan if mg == 0 or mg != mg else math.copysign(math.inf, mg) * math.copysign(1.0, w)
    phi, a = rounding.inflation_constants(1, _F64, _HALF_ETA64)
    r = abs(q) * _U64 * phi + a
    if r != r or r == math.inf:
        r = math.inf
    if rg != 0:
        r = math.nextafter(r + (math.nextafter(rg / w, math.inf) if w != 0 else math.inf), math.inf)
    return -q, r


def _exact_scalar(total: torch.Tensor, exact: int, value: float | None = None) -> BallTensor:
    """The ball of a 0-d kernel output whose exact value is the integer ``exact``: radius |total - exact|
    (``value``: float(total), if the caller has read it)."""
    value = float(total) if value is None else value
    d = abs(value - exact)
    return _scalar_ball(total, 0.0 if d == 0 else math.nextafter(d, math.inf), value)


@rule(aten.nll_loss_forward.default, aten.nll_loss2d_forward.default)
def nll_loss_forward(func, x, target, weight, reduction, ignore_index):
    """(output, total_weight) of nll_loss, real meaning: l_n = -w_{t_n} x[n, t_n] (0 for ignored samples);
    none: l; sum: sum_n l_n; mean: sum_n l_n / sum_n w_{t_n}. total_weight = sum_n w_{t_n}, except for reduction none
    on batched input, where the kernel defines it as the placeholder 0 (exact). Enclosed by composing the ball rules
    (gather is exact, then mul, sum, div) and re-centred on both kernel outputs. A mean whose total weight ball
    contains 0 gets +inf and a ``domain`` event (the division rule's)."""
    out, total = func(mid_of(x), target, mid_of(weight), reduction, ignore_index)
    if weight is None and isinstance(x, BallTensor):
        fast = nll_loss_forward_fast(out, total, x, target, reduction, ignore_index)
        if fast is not None:
            return fast
    picked, w_t, kept = nll_parts(x, target, weight, ignore_index)
    losses = -(w_t * picked)
    tw = torch.sum(w_t)
    if reduction == NONE:
        if x.dim() >= 2:
            tw = point(torch.zeros((), dtype=_F64, device=out.device))
        return finish(out, losses), finish(total, tw)
    s = torch.sum(losses)
    value = s / tw if reduction == MEAN else s
    return finish(out, value), finish(total, tw)


# ----------------------------------------------------------------------------------------------------------------------
# Regression losses


@rule(aten.mse_loss.default)
def mse_loss(func, x, target, reduction=MEAN):
    """(x - t)^2 (the square by the integer-power rule: exact hull, also for d straddling 0), then mean/sum by the
    reduction rules; composed in float64 and re-centred."""
    m = func(mid_of(x), mid_of(target), reduction)
    xw, tw = wide(x), wide(target)
    loss = reduce_loss((xw - tw) ** 2, reduction)
    return finish(m, loss)


def abs_bounds(d: BallTensor):
    """(a_lo, a_hi) with a_lo <= |t| <= a_hi for t in d (float64, outward): a_lo = max(0, |m| - r) rounded down,
    a_hi = |m| + r rounded up."""
    a = torch.abs(d.mid)
    return torch.clamp_min(rounding.sub_down(a, d.rad), 0), rounding.add_up(a, d.rad)


def _half(value: float):
    """(down, up) bounds of value/2 (exact unless value is subnormal)."""
    return rounding.round_down_float(Fraction(value) / 2), rounding.round_up_float(Fraction(value) / 2)


def smooth_l1_bounds(a: torch.Tensor, beta: float, upper: bool) -> torch.Tensor:
    """Directed bound of s(a) = a^2/(2 beta) for a < beta, a - beta/2 otherwise (a = |d| >= 0; beta = 0: s = a)."""
    if beta == 0:
        return a
    half_lo, half_hi = _half(beta)
    two_beta = 2 * beta  # exact: beta is finite and > 0, doubling only moves the exponent (beta <= max/2 checked)
    if upper:
        quad = rounding.div_up(rounding.mul_up(a, a), two_beta)
        lin = rounding.sub_up(a, half_lo)
    else:
        quad = rounding.div_down(rounding.mul_down(a, a), two_beta)
        lin = torch.clamp_min(rounding.sub_down(a, half_hi), 0)
    return torch.where(a < beta, quad, lin)


def huber_bounds(a: torch.Tensor, delta: float, upper: bool) -> torch.Tensor:
    """Directed bound of h(a) = a^2/2 for a < delta, delta (a - delta/2) otherwise (a = |d| >= 0)."""
    half_lo, half_hi = _half(delta)
    if upper:
        quad = rounding.div_up(rounding.mul_up(a, a), 2.0)
        lin = rounding.mul_up(torch.full_like(a, delta), rounding.sub_up(a, half_lo))
    else:
        quad = rounding.div_down(rounding.mul_down(a, a), 2.0)
        lin = rounding.mul_down(torch.full_like(a, delta), torch.clamp_min(rounding.sub_down(a, half_hi), 0))
    return torch.where(a < delta, quad, lin)


def _check_positive(value, what, allow_zero):
    v = float(value)
    if not math.isfinite(v) or v < 0 or (v == 0 and not allow_zero) or v > 2.0**1000:
        raise UnsupportedOpError(current_op(), f"{what}={value!r} must be a finite number > 0"
                                 + (" (or 0)" if allow_zero else ""))
    return v


def _even_loss(func, x, target, reduction, param, bounds):
    m = func(mid_of(x), mid_of(target), reduction, param)
    d = wide(x) - wide(target)
    a_lo, a_hi = abs_bounds(d)
    per_element = from_bounds(bounds(a_lo, False), bounds(a_hi, True))
    return finish(m, reduce_loss(per_element, reduction), unknown=None)


@rule(aten.smooth_l1_loss.default)
def smooth_l1_loss(func, x, target, reduction=MEAN, beta=1.0):
    """s(|d|), d = x - t, s(a) = a^2/(2 beta) for a < beta, a - beta/2 otherwise (beta = 0: |d|): s is continuous and
    increasing in a = |d| >= 0, so over the ball it lies in [s(a_lo), s(a_hi)] (``abs_bounds``, directed
    ``smooth_l1_bounds``); then the reduction rules; re-centred."""
    b = _check_positive(beta, "beta", allow_zero=True)
    return _even_loss(func, x, target, reduction, beta, lambda a, up: smooth_l1_bounds(a, b, up))


@rule(aten.huber_loss.default)
def huber_loss(func, x, target, reduction=MEAN, delta=1.0):
    """h(|d|), h(a) = a^2/2 for a < delta, delta (a - delta/2) otherwise: continuous and increasing in a = |d|, so
    [h(a_lo), h(a_hi)] (``huber_bounds``); then the reduction rules; re-centred."""
    dl = _check_positive(delta, "delta", allow_zero=False)
    return _even_loss(func, x, target, reduction, delta, lambda a, up: huber_bounds(a, dl, up))


# ----------------------------------------------------------------------------------------------------------------------
# Binary cross-entropy


def bce_domain(xw: BallTensor, tw: BallTensor):
    """(ok, safe_log, safe_log1m, t_zero, t_one) for BCE on the ball X with targets T.

    The true BCE (no clamp) is defined for x in [0, 1]; the term t log x needs x > 0 unless t is the exact point 0
    (0 log 0 = 0, the limit, and the term vanishes identically), and (1 - t) log(1 - x) needs x < 1 unless t is the
    exact point 1. ``ok``: the ball satisfies all that (and is known). ``safe_log``/``safe_log1m``: X where its log
    terms are defined, else the point 1/2 (a placeholder whose term is masked out or whose radius becomes +inf).
    """
    lo, hi = -_add_up(-xw.mid, xw.rad), _add_up(xw.mid, xw.rad)  # exact for point balls (x = 0 or 1 stays put)
    t_zero = (tw.rad == 0) & (tw.mid == 0)
    t_one = (tw.rad == 0) & (tw.mid == 1)
    ok = (lo >= 0) & (hi <= 1) & (t_zero | (lo > 0)) & (t_one | (hi < 1)) & ~unknown_of(xw) & ~unknown_of(tw)
    half = point(torch.full_like(xw.mid, 0.5))
    return ok, pick(lo > 0, xw, half), pick(hi < 1, xw, half), t_zero, t_one


@rule(aten.binary_cross_entropy.default)
def binary_cross_entropy(func, x, target, weight=None, reduction=MEAN):
    """-w (t log x + (1 - t) log(1 - x)), the true function: PyTorch clamps each log at -100, which the re-centring
    measures where it is active at a finite true value; where the true loss is unbounded over the ball (x reaching 0
    with t != 0, or 1 with t != 1, or outside [0, 1]) the radius is +inf with a ``domain`` event (``bce_domain``).
    log(1 - x) is enclosed as log1p(-x) (the same real). Composed in float64, reduced, re-centred."""
    m = func(mid_of(x), mid_of(target), mid_of(weight), reduction)
    xw, tw = wide(x), wide(target)
    ok, x_log, x_log1m, t_zero, t_one = bce_domain(xw, tw)
    zero = point(torch.zeros_like(xw.mid))
    term = pick(t_zero, zero, tw * torch.log(x_log)) + pick(t_one, zero, (1 - tw) * torch.log1p(-x_log1m))
    loss = -term if weight is None else -(wide(weight) * term)
    loss = pick(ok, loss, BallTensor(loss.mid, torch.full_like(loss.rad, _INF)))
    out = finish(m, reduce_loss(loss, reduction))
    _emit_domain(~ok, "BCE input ball reaches 0 or 1 where the true loss is unbounded, or leaves [0, 1]")
    return out


@rule(aten.binary_cross_entropy_with_logits.default)
def binary_cross_entropy_with_logits(func, x, target, weight=None, pos_weight=None, reduction=MEAN):
    """-w (p t log sigmoid(x) + (1 - t) log(1 - sigmoid(x))) = w ((1 - t) softplus(x) + p t softplus(-x)), p the
    pos_weight (1 without): the softplus rule encloses the true softplus, and this form keeps the dependency on x
    exact for t in {0, 1} (one monotone term). Composed in float64, reduced, re-centred."""
    m = func(mid_of(x), mid_of(target), mid_of(weight), mid_of(pos_weight), reduction)
    xw, tw = wide(x), wide(target)
    pos = tw if pos_weight is None else wide(pos_weight) * tw
    loss = (1 - tw) * F.softplus(xw) + pos * F.softplus(-xw)
    if weight is not None:
        loss = wide(weight) * loss
    return finish(m, reduce_loss(loss, reduction))


# ----------------------------------------------------------------------------------------------------------------------
# In-place activations (nn.*(inplace=True)): through ``inplace.inplace`` like the other in-place ops

_INPLACE_ACTIVATIONS = {
    aten.gelu_.default: aten.gelu.default,
    aten.silu_.default: aten.silu.default,
    aten.leaky_relu_.default: aten.leaky_relu.default,
    aten.hardtanh_.default: aten.hardtanh.default,
    aten.threshold_.default: aten.threshold.default,
}
inplace.INPLACE_TO_FUNCTIONAL.update(_INPLACE_ACTIVATIONS)
rule(*_INPLACE_ACTIVATIONS)(inplace.inplace)
