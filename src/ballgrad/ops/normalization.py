"""Normalization rules: batch norm and layer norm, forward and backward (DESIGN.md §4 "fused kernels"; issues 5, 8).

Both ops normalise every element x_i of a *group* (batch norm: one channel over the batch and spatial dims; layer
norm: one row over the normalized dims) with the group's exact statistics

    mu = mean x,   var = mean (x - mu)^2  (biased),   s = 1 / sqrt(var + eps),   y_i = (x_i - mu) s w_i + b_i,

eps the exact double given. The kernels are fused (their summation order, opmath and affine folding are their own),
so each rule computes the midpoints with the kernel itself, a float64 enclosure of the exact real result, and
re-centres the enclosure on the kernel's midpoint (``common.recentre``'s argument: |exact - mid| <= rad + |c - mid|).

**How the enclosures are written.** Not as a composition of ball rules (a dozen dispatched ops of ~15 kernels each)
but once, by hand, as a float64 centre plus a radius expression:
- *Group quantities* (mean, variance bounds, rstd, the backward's sums): small tensors, one element per group, as
  ``_Ball`` (centre, radius) with every radius operation rounded outward (F2: ``rounding.add_up`` ...).
- *Full-size quantities*: a centre computed in round-to-nearest and a radius that is a sum of non-negative terms,
  each a product of at most two factors (an exact float, an outward-rounded coefficient, or a sum of such), bounded
  by a single ``rounding.inflate`` with the operation count stated beside the call.
- *Sums over a group* of non-negative terms: ``_sum_up`` / ``_sum_down`` (F1 per term, F3 for the sum).
The midpoint rounding of a centre (a few float64 roundings, relative 2^-53) is bounded a priori; the centres of the
group mean and of the variance are checked a posteriori (``_statistics``), which keeps the bounds tight when |mean|
is much larger than the spread (cancellation).

**Batch norm** (``native_batch_norm``, the ``_native_batch_norm_legit*`` forms, ``native_batch_norm_backward``).
*Running statistics* (training mode, the in-place forms): the kernel updates the buffers it is given, which are the
buffers' midpoints, so ``running_mean``/``running_var`` midpoints stay bit-identical to plain PyTorch.
- Ball buffers (``ballify(model, buffers=True)``): their radii are updated in place with ball arithmetic,
  new = (1 - momentum) old + momentum * stat (momentum and 1 - momentum exact, the unbiased variance as
  var * n / (n - 1)), re-centred on the kernel's new midpoint; the BallTensor objects, their ``mid`` and ``rad``
  storages (and any views of them) are kept.
- Plain buffers: updated with the midpoints' statistics exactly as plain PyTorch does, and they carry no radius:
  running statistics are then NOT certified. Nothing false is recorded -- no output of the op depends on them in
  training mode, and in eval mode the (plain) buffers are used as the exact constants they are, so eval outputs are
  certified *relative to the stored statistics*.
``_native_batch_norm_legit_functional`` returns the new statistics as outputs: they are always balls (old plain
statistics count as exact points).
*Memory*: the backward runs a block of whole channels at a time (``_CHANNEL_BLOCK``), so that its float64
full-size arrays are block-sized; every group quantity belongs to one channel, so the bounds are the same.

**Layer norm** (``native_layer_norm``, ``native_layer_norm_backward``) over the last ``len(normalized_shape)`` dims,
with an elementwise weight and bias over those dims.
*Memory*: their scale (rstd w) and grad_weight products are full size, so the rules free each full-size float64
scratch array after its last use or reuse it in place (``_affine_terms``, ``_grad_times_xhat``, ``_dot_ball``), and
recompute an absolute value (one pass) rather than keep it alive across phases; the same operations on the same
operands, so the same bits.
"""

from __future__ import annotations

import functools
import math
from fractions import Fraction
from typing import NamedTuple

import numpy as np
import torch

from ballgrad import fused, rounding
from ballgrad.ops.common import mid_of as _mid
from ballgrad.ops.common import mids, recentre, result
from ballgrad.ops.conv import _channel_shape, _check_float_input
from ballgrad.ops.elementwise import _rsqrt_enclose
from ballgrad.ops.reductions import _from_bounds
from ballgrad.ops.registry import rule
from ballgrad.tensor import BallTensor

aten = torch.ops.aten

_F64 = torch.float64
_U = rounding.unit_roundoff(_F64)  # u = 2^-53
_UF = Fraction(_U)
_ETA = rounding.eta(_F64)  # smallest positive subnormal; any eta/2 below is bounded by eta
_ONE_PLUS_U = rounding.round_up_float(1 + _UF)
_TWO_ONE_PLUS_U = rounding.round_up_float(2 * (1 + _UF))
_ONE_PLUS_U_SQUARED = rounding.round_up_float((1 + _UF) ** 2)
_ONE_MINUS_U_SQUARED = rounding.round_down_float((1 - _UF) ** 2)
_HALF_ETA = Fraction(_ETA) / 2
_THREE_U = 3 * _U  # exact
_FOUR_U = 4 * _U  # exact


# ----------------------------------------------------------------------------------------------------------------------
# Float64 balls on raw tensors (no dispatch), outward rounding by F2


class _Ball(NamedTuple):
    """|exact - c| <= r elementwise (broadcasting): a float64 centre and an outward-rounded float64 radius."""

    c: torch.Tensor
    r: torch.Tensor


def _as_ball(x, shape=None) -> _Ball | None:
    """An argument as a float64 ``_Ball`` (exact widening; a plain tensor is an exact point), reshaped if asked."""
    if x is None:
        return None
    if isinstance(x, BallTensor):
        c, r = x.mid.detach().to(_F64), x.rad.to(_F64)
    else:
        c = x.detach().to(_F64)
        r = torch.zeros((), dtype=_F64, device=c.device)
    if shape is not None:
        c = c.reshape(shape)
        r = r.reshape(shape) if r.dim() else r
    return _Ball(c, r)


@functools.lru_cache(maxsize=256)
def _column(values: tuple, ndim: int, device: torch.device) -> torch.Tensor:
    """The float64 constants ``values`` as a tensor of shape (k, 1, ..., 1) with ``ndim`` dims after the first (cached;
    never written to): per-slot operands for quantities stacked on a new dim 0, so that one kernel applies each slot's
    own operation (an elementwise operation gives the same bits stacked or not)."""
    return torch.tensor(values, dtype=_F64, device=device).view((len(values),) + (1,) * ndim)


def _directions(signs: tuple, like: torch.Tensor) -> torch.Tensor:
    """+-inf per slot (``signs`` of +-1) for ``like`` = a stack on dim 0: nextafter toward it is succ (+1) or pred (-1)
    of each slot, as ``rounding.up``/``down``."""
    return _column(tuple(sg * math.inf for sg in signs), like.dim() - 1, like.device)


def _constants(values: tuple, like: torch.Tensor) -> torch.Tensor:
    return _column(tuple(values), like.dim() - 1, like.device)


@functools.lru_cache(maxsize=256)
def _inflation(n_ops: int, extra: float = 0.0) -> tuple[float, float]:
    """``rounding.inflate``'s constants for float64 (cached on plain floats: no Fraction per call)."""
    return rounding.inflation_constants(n_ops, _F64, Fraction(extra))


@functools.lru_cache(maxsize=256)
def _inflation_to(n_ops: int, dtype: torch.dtype, extra: float = 0.0) -> tuple[float, float]:
    """``rounding.inflate_to``'s constants from float64 to ``dtype`` (float32), cached."""
    return rounding._inflation_to_constants(n_ops, _F64, dtype, Fraction(extra))


def _inflated(expr: torch.Tensor, n_ops: int, extra: float = 0.0) -> torch.Tensor:
    """``rounding.inflate(expr, n_ops, extra)`` for a float64 ``expr`` (the same constants and passes)."""
    phi, a = _inflation(n_ops, extra)
    return torch.mul(expr, phi).add_(a).nan_to_num_(nan=math.inf, posinf=math.inf)


def _inflated_slots(expr: torch.Tensor, n_ops: tuple) -> torch.Tensor:
    """``_inflated_`` of quantities stacked on dim 0, slot i with n_ops[i] operations (per-slot constants: the same
    passes and bits as one at a time)."""
    constants = [_inflation(k) for k in n_ops]
    phi = _constants(tuple(c[0] for c in constants), expr)
    a = _constants(tuple(c[1] for c in constants), expr)
    return expr.mul_(phi).add_(a).nan_to_num_(nan=math.inf, posinf=math.inf)


def _inflated_(expr: torch.Tensor, n_ops: int, extra: float = 0.0) -> torch.Tensor:
    """``rounding.inflate_``: ``_inflated`` in place."""
    phi, a = _inflation(n_ops, extra)
    return expr.mul_(phi).add_(a).nan_to_num_(nan=math.inf, posinf=math.inf)


def _inflated_to_(expr: torch.Tensor, n_ops: int, dtype: torch.dtype, extra: float = 0.0) -> torch.Tensor:
    """``rounding.inflate_to_(expr, n_ops, dtype, extra)`` for a float64 ``expr`` (the same constants and passes)."""
    if dtype == _F64:
        return _inflated_(expr, n_ops, extra)
    phi, a = _inflation_to(n_ops, dtype, extra)
    return expr.mul_(phi).add_(a).to(dtype).nan_to_num_(nan=math.inf, posinf=math.inf)


def _is_point(x) -> bool:
    """Whether x is a plain tensor or a ball whose radii are all exactly 0 (``linalg._is_point``'s test with max
    instead of any: radii are >= 0 and never NaN, so "all zero" is "the largest is not > 0"; a large contiguous radius
    is first probed on a prefix, and only an all-zero prefix leads to the full scan)."""
    if not isinstance(x, BallTensor):
        return True
    r = x.rad
    if r.numel() == 0:
        return True
    if r.numel() > 4096 and r.is_contiguous() and float(r.reshape(-1)[:256].max()) > 0:
        return False
    return not float(r.max()) > 0


def _centre_error(c: torch.Tensor) -> torch.Tensor:
    """succ(succ(fl(u|c|))) >= u|c| + eta >= the F1 error of the one rounded operation that produced ``c``: the first
    succ bounds the product u|c| (F2), the second adds at least eta (every step of the float64 grid is >= eta). The same
    bits as rounding.add_up(succ(fl(u|c|)), eta) whenever fl(u|c|) >= 2^-1020 (there fl(t + eta) = t), smaller below,
    and no addition of a subnormal (which costs a microcode assist per element on x86)."""
    return rounding._up_fresh(rounding.mul_up(torch.abs(c), _U))


def _mul(a: _Ball, b: _Ball) -> _Ball:
    """a b: centre fl(a.c b.c); |xy - a.c b.c| <= |a.c| b.r + a.r (|b.c| + b.r), plus F1 for the centre."""
    c = a.c * b.c
    spread = rounding.add_up(rounding.mul_up(torch.abs(a.c), b.r),
                             rounding.mul_up(a.r, rounding.add_up(torch.abs(b.c), b.r)))
    return _Ball(c, rounding.add_up(spread, _centre_error(c)))


def _mul_full(a: _Ball, b: _Ball, abs_a: torch.Tensor | None = None) -> _Ball:
    """a b for full-size balls (either may broadcast, e.g. a group's rstd times the elementwise weight; a radius None
    is a point), with the design's full-size pattern instead of ``_mul``'s outward rounding per operation: centre
    c = fl(a.c b.c) and radius
        inflate(|a.c| b.r + a.r (|b.c| + b.r) + u|c|, 6, eta/2)
    since |xy - a.c b.c| <= |a.c| b.r + a.r (|b.c| + b.r) for |x - a.c| <= a.r, |y - b.c| <= b.r, and
    |a.c b.c - c| <= u|c| + eta/2 (F1). ``rounding.inflate``'s conditions: the terms are products of two factors, each
    an exact float (|a.c|, b.r, a.r, u, |c|) or a sum of two (|b.c| + b.r); 6 rounded operations (three products,
    the sum in the factor, two additions; u|c| is exact unless it underflows). One pass per operation and no
    nextafter: a few ulps apart from ``_mul``'s radius, either way. One centre is float64 (so is the arithmetic);
    ``abs_a`` = |a.c| if the caller has it."""
    c = a.c * b.c
    expr = torch.abs(c).mul_(_U)
    if b.r is not None:
        expr.addcmul_(torch.abs(a.c) if abs_a is None else abs_a, b.r)
    if a.r is not None:
        expr.addcmul_(a.r, torch.abs(b.c) if b.r is None else torch.abs(b.c) + b.r)
    return _Ball(c, _inflated_(expr, 6, _HALF_ETA))


def _div_count(a: _Ball, n: int) -> _Ball:
    """a / n for a positive integer n <= 2^53 (exact as a double): the radius divided upward, plus F1."""
    c = a.c / float(n)
    return _Ball(c, rounding.add_up(rounding.div_up(a.r, float(n)), _centre_error(c)))


def _hull(a: _Ball, b: _Ball) -> _Ball:
    """A ball containing both (the hull of their outward end points down(c - r), up(c + r); the four in one pass per
    operation: the product by -+1 is exact)."""
    both = _stack_balls(a, b)
    ends = torch.nextafter(torch.addcmul(both.c, _constants((-1.0, 1.0), both.c.unsqueeze(0)), both.r),
                           _directions((-1, 1), both.c.unsqueeze(0)))  # [[lo_a, lo_b], [hi_a, hi_b]]
    h = _from_bounds(torch.amin(ends[0], 0), torch.amax(ends[1], 0))
    return _Ball(h.mid, h.rad)


def _stack_balls(*balls: _Ball) -> _Ball:
    """Balls of one shape stacked on a new dim 0 (radii expanded to their centres' shape)."""
    return _Ball(torch.stack([b.c for b in balls]),
                 torch.stack([b.r if b.r.shape == b.c.shape else b.r.expand(b.c.shape) for b in balls]))


def _k_coefficients(k1: _Ball, s: _Ball, total: _Ball, dot: _Ball, n: int) -> tuple[_Ball, _Ball]:
    """(K2, K3) = (K1 (S/n), (K1 s^2) (D/n)) of the batch/layer norm input gradient (``_gradient_input_rad``), by
    ``_div_count`` and ``_mul``, the independent ones stacked (elementwise: the same bits as one at a time)."""
    q = _div_count(_stack_balls(total, dot), n)  # [S/n, D/n]
    p = _mul(k1, _stack_balls(_Ball(q.c[0], q.r[0]), _mul(s, s)))  # [K1 (S/n), K1 s^2]
    return _Ball(p.c[0], p.r[0]), _mul(_Ball(p.c[1], p.r[1]), _Ball(q.c[1], q.r[1]))


def _rstd(var_lo: torch.Tensor, var_hi: torch.Tensor, eps: float) -> _Ball:
    """1/sqrt(var + eps) for every var in [var_lo, var_hi] (``_rstd_stacked``)."""
    return _rstd_stacked(torch.stack((var_hi, var_lo)), eps)


def _rstd_stacked(v: torch.Tensor, eps: float) -> _Ball:
    """1/sqrt(var + eps) for every var in [v[1], v[0]] (v = [var_hi, var_lo] stacked on dim 0): decreasing in var, so
    it lies in [rsqrt_lower(up(var_hi + eps)), rsqrt_upper(down(var_lo + eps))] (the rsqrt rule's enclosure, lemma C,
    both end points in one call: it is elementwise); a lower end point <= 0 gives +inf (NaN end points: an infinite
    radius)."""
    ends = torch.nextafter(v + eps, _directions((1, -1), v))  # [up(var_hi + eps), down(var_lo + eps)]
    lower, upper = _rsqrt_enclose(ends, v.device.type)
    b = _from_bounds(torch.clamp_min(lower[0], 0), upper[1])
    return _Ball(b.mid, b.rad)


# ----------------------------------------------------------------------------------------------------------------------
# Sums over a group


@functools.lru_cache(maxsize=256)
def _gamma(n: int) -> Fraction:
    """gamma_(n-1) of a sum of n terms (0 for one term), exact."""
    return Fraction(rounding.gamma(n - 1, _F64)) if n > 1 else Fraction(0)


@functools.lru_cache(maxsize=256)
def _sum_up_factor(n: int, k: int) -> float:
    return rounding.round_up_float((1 + _UF) ** k * rounding.theta(max(n - 1, 0), _UF))


@functools.lru_cache(maxsize=256)
def _sum_down_factor(n: int) -> float:
    return rounding.round_down_float(1 / ((1 + _UF) * (1 + _gamma(n))))


@functools.lru_cache(maxsize=256)
def _up(value: Fraction) -> float:
    return rounding.round_up_float(value)


@functools.lru_cache(maxsize=256)
def _group_constants(n: int) -> tuple[float, float, float]:
    """(gamma_(n-1), up(u + gamma_(n-1)), kappa = up(u + (u + gamma_(n-1))(1 + u))) as floats, cached per n."""
    g = _gamma(n)
    return float(g), _up(_UF + g), _up(_UF + (_UF + g) * (1 + _UF))


def _sum_up(s: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """Upper bound of the exact sum of n non-negative terms whose computed sum is ``s``, each term computed from exact
    non-negative floats with k roundings: k - 1 additions inside the factors and at most one product last. Per term
    exact <= (1+u)^k fl + eta (F1: additions have no eta, the product adds eta/2 (1+u)^(k-1)); the sum in any order
    has exact <= theta_(n-1) fl (F3). So the sum <= (1+u)^k theta_(n-1) s + n eta."""
    factor = _sum_up_factor(n, k)
    if not k:  # succ(succ(fl(s factor))): the same bits as adding 0.0 before the second succ (s >= 0)
        return rounding._up_fresh(rounding.mul_up(s, factor))
    return rounding.add_up(rounding.mul_up(s, factor), float(n) * _ETA)


def _sum_down(s: torch.Tensor, n: int) -> torch.Tensor:
    """Lower bound (>= 0) of the exact sum of n squares or products t_i = p q of exact floats whose computed sum is
    ``s``: t_i >= (fl(t_i) - eta/2)/(1 + u) (F1) and sum fl(t_i) >= s / (1 + gamma_(n-1)) (F3), so
    sum t_i >= s / ((1 + u)(1 + gamma_(n-1))) - n eta."""
    factor = _sum_down_factor(n)
    return torch.clamp_min(rounding.sub_down(rounding.mul_down(s, factor), float(n) * _ETA), 0)


def _sum_bounds(sums: torch.Tensor, n: int, kinds: tuple) -> torch.Tensor:
    """``_sum_up(sums[i], n, k)`` for kinds[i] = k >= 0 and ``_sum_down(sums[i], n)`` for kinds[i] = -1, for group sums
    stacked on dim 0, in one pass per operation with per-slot factors and directions (the same operations, hence the
    same bits, slot by slot: multiply by the factor, one step up (down), add n eta (0 for k = 0, -n eta down), one
    step up (down); the clamps at 0 change only the down slots, the others are > 0 or NaN)."""
    neta = float(n) * _ETA
    factors = tuple(_sum_down_factor(n) if k < 0 else _sum_up_factor(n, k) for k in kinds)
    if not any(kinds):  # _sum_up(., n, 0): two steps up
        return rounding._up_fresh(rounding.mul_up(sums, _constants(factors, sums)))
    terms = tuple(-neta if k < 0 else (neta if k else 0.0) for k in kinds)
    dirs = _directions(tuple(-1 if k < 0 else 1 for k in kinds), sums)
    b = torch.nextafter(sums * _constants(factors, sums), dirs).clamp_min_(0)
    return b.add_(_constants(terms, sums)).nextafter_(dirs).clamp_min_(0)


def _gsum(t: torch.Tensor, dims) -> torch.Tensor:
    """Sum over ``dims`` (keepdim) in float64: a float32 (or narrower) input is widened exactly, then summed."""
    return torch.sum(t, dim=dims, keepdim=True, dtype=_F64)


def _zero_if_none(r: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return r if r is not None else torch.zeros((), dtype=_F64, device=like.device)


class _Sums(NamedTuple):
    """A group sum of balls g: ``total`` (centre the computed sum, radius sum r + gamma_(n-1) sum |c|, F3) and upper
    bounds of sum |c| and sum r (None for points), which ``_dot_ball`` reuses."""

    total: _Ball
    abs_sum: torch.Tensor
    rad_sum: torch.Tensor | None


def _sum_ball(g: _Ball, dims, n: int, abs_c: torch.Tensor | None = None) -> _Sums:
    """Sum of the balls g (centre any float dtype; radius full size, or None for points) over ``dims`` (keepdim);
    ``abs_c`` = |g.c| if the caller has it."""
    c = _gsum(g.c, dims)
    abs_sum = _sum_up(_gsum(torch.abs(g.c) if abs_c is None else abs_c, dims), n, 0)
    rad_sum = _sum_up(_gsum(g.r.expand(g.c.shape), dims), n, 0) if g.r is not None else None
    r = rounding.mul_up(abs_sum, _group_constants(n)[0]) if n > 1 else torch.zeros_like(abs_sum)
    if rad_sum is not None:
        r = rounding.add_up(r, rad_sum)
    return _Sums(_Ball(c, r), abs_sum, rad_sum)


def _sum_balls(gs: list, dims, n: int, abs_cs: list | None = None) -> list:
    """``_sum_ball`` of several balls of one shape over the same ``dims``: the sums each by its own reduction, the
    group quantities after them stacked (elementwise: the same bits as one at a time). ``abs_cs``: |g.c| (or None)
    per ball, where the caller has it."""
    abs_cs = abs_cs or [None] * len(gs)
    if len(gs) == 1:
        return [_sum_ball(gs[0], dims, n, abs_cs[0])]
    sums, slots = [], []
    for g, abs_c in zip(gs, abs_cs):
        slots.append(len(sums))
        sums.append(_gsum(torch.abs(g.c) if abs_c is None else abs_c, dims))
        if g.r is not None:
            sums.append(_gsum(g.r.expand(g.c.shape), dims))
    b = _sum_bounds(torch.stack(sums), n, (0,) * len(sums))
    step = slots[1] - slots[0]
    abs_sums = b[::step] if slots == list(range(0, len(sums), step)) else b[slots]
    r = rounding.mul_up(abs_sums, _group_constants(n)[0]) if n > 1 else torch.zeros_like(abs_sums)
    out = []
    for i, (g, k) in enumerate(zip(gs, slots)):
        rad_sum = b[k + 1] if g.r is not None else None
        ri = rounding.add_up(r[i], rad_sum) if rad_sum is not None else r[i]
        out.append(_Sums(_Ball(_gsum(g.c, dims), ri), abs_sums[i], rad_sum))
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Statistics
#
# Memory: full-size inputs stay in their own dtype (every arithmetic operation below that reads them has a float64
# operand, so it is computed in float64 on exactly widened values; abs is exact in any dtype), and at most two
# float64 full-size arrays are alive at a time: d and one scratch or result array.


class _Centred(NamedTuple):
    """z = x - mu for every x in the input ball (midpoints m, radii r, None for points) and mu in the mean ball (centre
    mu.c, radius mu_r per group): centre d = fl(m - mu.c) (float64, full size) and |z - d| <= r + mu_r + u|d| (F1 for
    the one rounded subtraction)."""

    d: torch.Tensor
    r: torch.Tensor | None
    mu_r: torch.Tensor


def _centred(m: torch.Tensor, r: torch.Tensor | None, mu: _Ball) -> _Centred:
    return _Centred(torch.sub(m, mu.c), r, mu.r)


class _Stats(NamedTuple):
    mean: _Ball
    var_lo: torch.Tensor
    var_hi: torch.Tensor
    rstd: _Ball
    z: _Centred


def _statistics(m: torch.Tensor, r: torch.Tensor | None, dims, n: int, eps: float) -> _Stats:
    """Batch statistics (keepdim, per group) of every x in the ball m +- r (r None: a point), in float64.

    Mean: centre c = the computed mean; d_i = fl(m_i - c), a_i = |d_i|. A posteriori, with d*_i = m_i - c exact,
    |d*_i - d_i| <= u a_i (F1), so e = |mean m - c| = |sum d*|/n <= (|fl(sum d)| + (u + gamma_(n-1)) sum a)/n (F3), and
    the mean of x lies within e + mean r of c.

    Variance (biased): x = m + e_x, |e_x| <= r. With d'_i = m_i - mean m (sum d' = 0; reductions._var_enclosure),
    var x = var m + (2 sum d'_i e_i + sum f_i^2)/n, sum f_i^2 <= sum r^2, |d'_i| <= (1+u) a_i + e, so
    |var x - var m| <= P = (2(1+u) sum a r + 2 e sum r + sum r^2)/n <= ((1+u) sum r (2a + r) + 2 e sum r)/n (one
    float64 sum of terms with 2 roundings: 2a is exact). var m = (1/n) sum d*^2 - e'^2 with |e'| <= e and
    (1-u)^2 d_i^2 <= d*_i^2 <= (1+u)^2 d_i^2; sum d^2 by ``_sum_up``/``_sum_down``. Hence
    var in [max(0, (1-u)^2 L/n - e^2 - P), (1+u)^2 U/n + P] with L <= sum d^2 <= U; then rstd by ``_rstd``.
    """
    c = _gsum(m, dims).div_(float(n))  # the computed mean (CPU's mean is this sum and division)
    d = torch.sub(m, c)
    t = torch.abs(d)
    s_a = _gsum(t, dims)
    s_d = _gsum(d, dims)
    sq = _gsum(torch.mul(d, d, out=t), dims)
    if r is None:
        sums = _sum_bounds(torch.stack((s_a, sq, sq)), n, (0, 1, -1))
    else:
        s_r = _gsum(r, dims)
        torch.abs(d, out=t).mul_(2.0).add_(r).mul_(r)  # r (2a + r) in float64
        sums = _sum_bounds(torch.stack((s_a, sq, sq, s_r, _gsum(t, dims))), n, (0, 1, -1, 0, 2))
    del t
    # sums = [sum a, U, L, sum r, sum r(2a + r)] (upper bounds; L <= sum d^2 <= U). Per slot, one pass each:
    # [spread, U', L'] = [mul_up(sum a, u + gamma_(n-1)), mul_up(U, (1+u)^2), mul_down(L, (1-u)^2)]
    w = torch.nextafter(sums[:3] * _constants((_group_constants(n)[1], _ONE_PLUS_U_SQUARED, _ONE_MINUS_U_SQUARED),
                                               sums[:3]), _directions((1, 1, -1), sums[:3])).clamp_min_(0)
    e = rounding.div_up(rounding.add_up(torch.abs(s_d), w[0]), float(n))
    # [upper, lower] = [div_up(U', n), div_down(L', n)], then lower = sub_down(lower, mul_up(e, e))
    v = torch.div(w[1:], float(n)).nextafter_(_directions((1, -1), w[1:])).clamp_min_(0)
    rounding._down_fresh(v[1].sub_(rounding.mul_up(e, e)))
    if r is None:
        mean_r = e
        perturbation = torch.zeros((), dtype=_F64, device=e.device)
    else:
        sum_r, sum_r2a = sums[3], sums[4]
        mean_r = rounding.add_up(e, rounding.div_up(sum_r, float(n)))
        perturbation = rounding.div_up(rounding.add_up(rounding.mul_up(sum_r2a, _ONE_PLUS_U),
                                                       rounding.mul_up(rounding.mul_up(e, 2.0), sum_r)), float(n))
    # [var_hi, var_lo] = [add_up(upper, P), max(0, sub_down(lower, P))] (var_hi > 0: the clamp changes var_lo only)
    var = torch.nextafter(torch.addcmul(v, _constants((1.0, -1.0), v), perturbation), _directions((1, -1), v))
    var.clamp_min_(0)
    return _Stats(_Ball(c, mean_r), var[1], var[0], _rstd_stacked(var, eps), _Centred(d, r, mean_r))


# ----------------------------------------------------------------------------------------------------------------------
# Forward output and backward input gradient (full size)


def _affine_terms(z: _Centred, scale: _Ball, bias: _Ball | None) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(c, expr, extra) for y = z * scale + b (scale = s w, or s): a float64 centre c and an expression, computed in
    round-to-nearest with 6 rounded operations, whose exact value plus ``extra`` bounds |y - c|
    (``inflate(expr, ., extra)`` it). Overwrites z.d (c is computed in its storage).

    Centre c = fl(fl(d F) + b.c) with F = scale.c: |c - (d F + b.c)| <= u|fl(d F)| + eta/2 + u|c|
    <= 3u a|F| + 2u|b.c| + eta (F1 twice, |fl(d F)| <= (1+u) a |F| + eta/2). Spread: with |z - d| <= r + mu_r + u a,
    |z S - d F| <= a scale.r + (r + mu_r + u a)(|F| + scale.r), |b - b.c| <= b.r. So, with H = |F| + scale.r,
    |y - c| <= a (scale.r + u H + 3u|F|) + r H + (mu_r H + b.r + 2u|b.c| + eta); the coefficients are outward rounded
    (``inflate``), the expression has 6 rounded operations (a*G; r*H and its addition; mu_r*H, its addition to the
    bias term and the addition of that). Without a bias the constant term is eta alone: it is returned as ``extra``
    (added after the inflation, no subnormal addition per element), else folded into the bias term (extra 0).

    Memory (layer norm's scale is full size): each scratch array is freed, or reused in place, after its last use --
    the same operations on the same operands, hence the same bits (a product fl(p q) = fl(q p))."""
    f = scale.c
    abs_f = torch.abs(f)
    h = _inflated_(abs_f + scale.r, 1)
    g = _inflated_(torch.mul(h, _U).add_(scale.r).add_(abs_f.mul_(_THREE_U)), 4)  # scale.r + u H + 3u|F|
    del abs_f
    expr = torch.abs(z.d).mul_(g)
    del g
    if z.r is not None:
        expr.addcmul_(z.r, h)
    constant = _inflated(bias.r + torch.abs(bias.c) * (2 * _U), 2, _ETA) if bias is not None else None
    if h.shape == torch.broadcast_shapes(h.shape, z.mu_r.shape, () if constant is None else constant.shape):
        term = h.mul_(z.mu_r)  # mu_r H in H's storage (its last use)
        if constant is not None:
            term += constant
    else:
        term = z.mu_r * h if constant is None else z.mu_r * h + constant
    del h
    expr += term
    del term
    extra = 0.0 if bias is not None else _ETA
    c = z.d.mul_(f)
    if bias is not None:
        c += bias.c
    return c, expr, extra


def _affine_output(mid: torch.Tensor, z: _Centred, scale: _Ball, bias: _Ball | None) -> BallTensor:
    """``_affine_terms`` re-centred on the kernel's ``mid``: rad = inflate(expr + |c - mid|, 6 + 2, extra) (the
    subtraction and the addition), the ``recentre`` argument folded into the same ``inflate``."""
    c, expr, extra = _affine_terms(z, scale, bias)
    expr += c.sub_(mid).abs_()
    return BallTensor(mid, _inflated_to_(expr, 8, rounding.rad_dtype(mid.dtype), extra))


def layer_norm_enclosure(xb: BallTensor, k: int, weight, bias, eps: float) -> BallTensor:
    """Layer norm over the last ``k`` dims of the float64 ball ``xb`` as a float64 ball, for rules that compose it
    (the eval-mode encoder-layer fast path in ``transformer``): ``_statistics`` and ``_affine_terms``."""
    nd = xb.dim()
    dims = list(range(nd - k, nd))
    n = math.prod(int(t) for t in xb.shape[nd - k:])
    m = xb.mid
    stats = _statistics(m, _radius_of(xb, m), dims, n, eps)
    w = _as_ball(weight)
    c, expr, extra = _affine_terms(stats.z, stats.rstd if w is None else _mul_full(stats.rstd, w), _as_ball(bias))
    return BallTensor(c, rounding.clean_rad(_inflated(expr, 6, extra)))


def _gradient_input(mid: torch.Tensor, g: _Ball, z: _Centred | None, k1: _Ball, k2: _Ball | None,
                    k3: _Ball | None, abs_g=None, abs_d=None) -> BallTensor:
    """gx = K1 g - K2 - K3 z re-centred on the kernel's ``mid``: the ball of ``_gradient_input_rad``."""
    return BallTensor(mid, _gradient_input_rad(mid, g, z, k1, k2, k3, abs_g, abs_d))


def _gradient_input_rad(mid: torch.Tensor, g: _Ball, z: _Centred | None, k1: _Ball, k2: _Ball | None,
                        k3: _Ball | None, abs_g: torch.Tensor | None = None,
                        abs_d: torch.Tensor | None = None) -> torch.Tensor:
    """The radius (radius dtype, mid's shape) of gx = K1 g - K2 - K3 z (K's per group, g and z full size; K2 and K3
    both given or both None) re-centred on the kernel's ``mid``. Overwrites z.d (the centre is computed in its
    storage).

    Centre c = fl(fl(fl(-K3.c d) + fl(K1.c g.c)) - K2.c) (-fl(K3.c d) is fl(-K3.c d) exactly):
    |c - (K1.c g.c - K3.c d - K2.c)| <= 4u (|K1.c||g.c| + |K3.c| a) + 2u|K2.c| + 3 eta
    (F1 four times; 4u >= (3u + 3u^2 + u^3)(1+u)); a fused multiply-add rounds less, which the bound also covers.
    Spread: |K1 g - K1.c g.c| <= |g.c| K1.r + g.r (|K1.c| + K1.r); |K3 z - K3.c d| <= a K3.r + rho (|K3.c| + K3.r)
    with rho = r + mu_r + u a; |K2 - K2.c| <= K2.r. Collected, with H3 = |K3.c| + K3.r:
    rad = a (K3.r + u H3 + 4u|K3.c|) + |g.c| (K1.r + 4u|K1.c|) + g.r (|K1.c| + K1.r) + r H3
          + (mu_r H3 + K2.r + 2u|K2.c| + 3 eta) + |c - mid|,
    coefficients outward rounded, then one ``inflate`` of the 12 rounded operations (a*P3; three multiply-adds;
    mu_r*H3, its addition and the addition of the constant; the subtraction c - mid and its addition). Without K3
    (eval mode) the terms in a, r and mu_r vanish: 5 operations, absolute eta. ``abs_g`` = |g.c| and ``abs_d`` = |z.d|
    if the caller has them (``abs_d`` is overwritten)."""
    if k3 is not None:
        # [P1, P2, H3, J] = inflate([K1.r + 4u|K1.c|, |K1.c| + K1.r, |K3.c| + K3.r, K2.r + 2u|K2.c|], [2, 1, 1, 2]):
        # each r + |c| alpha (|c| 1 is exact), one pass per operation with per-slot constants
        coefficient = _stack_balls(k1, k1, k3, k2)
        abs_c = torch.abs(coefficient.c)
        p = _inflated_slots(coefficient.r + abs_c * _constants((_FOUR_U, 1.0, 1.0, 2 * _U), abs_c), (2, 1, 1, 2))
        p1, p2, h3, j = p.unbind(0)
        expr = (abs_d if abs_d is not None else torch.abs(z.d)).mul_(
            _inflated(k3.r + h3 * _U + abs_c[2] * _FOUR_U, 4))  # (abs_d is the caller's scratch)
        expr.addcmul_(abs_g if abs_g is not None else torch.abs(g.c), p1)
        if g.r is not None:
            expr.addcmul_(g.r, p2)
        if z.r is not None:
            expr.addcmul_(z.r, h3)
        expr += z.mu_r * h3 + j
        c = z.d.mul_(torch.neg(k3.c)).addcmul_(g.c, k1.c).sub_(k2.c)
        n_ops, extra = 12, 3 * _ETA
    else:
        abs_k1 = torch.abs(k1.c)
        p1 = _inflated(k1.r + abs_k1 * _FOUR_U, 2)
        p2 = _inflated(abs_k1 + k1.r, 1)
        expr = torch.mul(abs_g if abs_g is not None else torch.abs(g.c), p1)
        if g.r is not None:
            expr.addcmul_(g.r, p2)
        c = torch.mul(g.c, k1.c)
        n_ops, extra = 5, _ETA
    expr += c.sub_(mid).abs_()
    return _inflated_to_(expr, n_ops, rounding.rad_dtype(mid.dtype), extra)


def _dot_ball(g: _Ball, z: _Centred, sums: _Sums, dims, n: int, abs_g=None, abs_d=None) -> _Ball:
    """D = sum g z over a group: centre the computed sum of fl(g.c d) (float64). With rho = r + mu_r + u a:
    |sum g z - sum g.c d| <= sum (|g.c| + g.r)(r + mu_r) + (1+u) sum a g.r + u sum a |g.c|, and the centre's rounding
    (F1 per product, F3 for the sum) adds (u + gamma_(n-1))(1+u) sum a |g.c| + n eta. So
    D.r = sum (|g.c| + g.r) r + mu_r (sum |g.c| + sum g.r) + (1+u) sum a g.r + kappa sum a |g.c| + n eta,
    kappa = u + (u + gamma_(n-1))(1+u); the group sums of |g.c| and g.r come from ``_sum_ball`` (``sums``), the
    others are float64 sums of float64 products (``_sum_up`` with 1 or 2 roundings per term, the three stacked:
    ``_sum_bounds``). ``abs_g`` = |g.c| and ``abs_d`` = |z.d| if the caller has them (read only); an |g.c| computed
    here in float64 is reused as scratch for |g.c| + g.r after its last read (r times it: the same products)."""
    t = torch.mul(z.d, g.c)
    c = _gsum(t, dims)
    own_abs_g = abs_g is None  # then abs_g is this function's scratch after its last read
    abs_g = torch.abs(g.c) if abs_g is None else abs_g
    abs_d = torch.abs(z.d) if abs_d is None else abs_d
    kappa = _group_constants(n)[2]
    sums_up = [_gsum(torch.mul(abs_d, abs_g, out=t), dims)]  # sum a |g.c|
    kinds = [1]
    if g.r is not None:
        sums_up.append(_gsum(torch.mul(abs_d, g.r, out=t), dims))  # sum a g.r
        kinds.append(1)
    if z.r is not None:
        if own_abs_g and abs_g.dtype == _F64:  # the same sums and products, no float64 copy of a float32 r
            if g.r is not None:
                abs_g += g.r
            sums_up.append(_gsum(t.copy_(z.r).mul_(abs_g), dims))  # sum r (|g.c| + g.r)
        else:
            t.copy_(abs_g)  # in float64 (|g.c| and g.r may both be float32)
            if g.r is not None:
                t += g.r
            sums_up.append(_gsum(t.mul_(z.r), dims))  # sum (|g.c| + g.r) r
        kinds.append(2)
    del t
    u_sums = _sum_bounds(torch.stack(sums_up), n, tuple(kinds))  # _sum_up(., n, k) slot by slot
    factors = (kappa, _ONE_PLUS_U) if g.r is not None else (kappa,)
    scaled = rounding.mul_up(u_sums[:len(factors)], _constants(factors, u_sums[:len(factors)]))
    r = rounding.add_up(scaled[0], float(n) * _ETA)
    weights = sums.abs_sum
    if g.r is not None:
        r = rounding.add_up(r, scaled[1])
        weights = rounding.add_up(weights, sums.rad_sum)
    if z.r is not None:
        r = rounding.add_up(r, u_sums[-1])
    r = rounding.add_up(r, rounding.mul_up(z.mu_r, weights))
    return _Ball(c, r)


# ----------------------------------------------------------------------------------------------------------------------
# Batch norm


def _wide(x):
    """An argument as a float64 BallTensor (exact widening; a plain tensor is an exact point), or None. Copies, so that
    later in-place updates of the argument (the kernel's running-statistics update) do not reach it."""
    if x is None:
        return None
    if isinstance(x, BallTensor):
        m = x.mid.detach().to(_F64, copy=True)
        r = x.rad.to(_F64, copy=True)
        return BallTensor(m, r.expand(m.shape).contiguous() if r.shape != m.shape else r)
    m = x.detach().to(_F64, copy=True)
    return BallTensor(m, torch.zeros_like(m))


def _bn_dims(ndim: int) -> list[int]:
    return [0] + list(range(2, ndim))


# Memory: batch norm's groups are channels (dim 1), so its full-size float64 work -- the centred input, the backward's
# products and output expressions, and the float64 copies that CPU kernels make of a float32 operand in every mixed
# float32/float64 operation -- runs a block of whole channels at a time, at most this many elements per block (at
# least one channel), each block's radius written into the output's radius buffer. The same bounds: every group
# quantity depends on its own channel only and every full-size quantity is elementwise; a block's channel sums may
# come out in another summation order than the whole tensor's (PyTorch's reduction order depends on the shape), which
# F3 covers.
_CHANNEL_BLOCK = 2**16


def _channel_blocks(shape) -> list[slice]:
    """Slices of dim 1 covering all channels, each of at most ``_CHANNEL_BLOCK`` elements or one channel."""
    c = int(shape[1])
    per_channel = math.prod(int(s) for s in shape) // max(c, 1)
    step = max(1, _CHANNEL_BLOCK // max(per_channel, 1))
    return [slice(i, min(i + step, c)) for i in range(0, c, step)] or [slice(0, c)]


def _channels(b: _Ball | None, cs: slice) -> _Ball | None:
    """A per-channel ``_Ball`` (channels on dim 1; a 0-d radius is shared) restricted to the channels ``cs``."""
    if b is None:
        return None
    return _Ball(b.c[:, cs], b.r[:, cs] if b.r.dim() else b.r)


def _cat_channels(parts: list[_Ball]) -> _Ball:
    """The per-channel balls of consecutive channel blocks joined along dim 1."""
    if len(parts) == 1:
        return parts[0]
    return _Ball(torch.cat([b.c for b in parts], 1), torch.cat([b.r.expand(b.c.shape) for b in parts], 1))


def _radius_of(x, m: torch.Tensor) -> torch.Tensor | None:
    """The radius of a ball argument at m's shape (its own dtype: the arithmetic that reads it is float64), None for
    an exact point."""
    if _is_point(x):
        return None
    r = x.rad.detach()
    return r.expand(m.shape) if r.shape != m.shape else r


def _gradient_ball(grad_out, gc: torch.Tensor) -> _Ball:
    """grad_output as a ``_Ball`` with centre ``gc`` (its midpoint, own dtype) and radius None for a point."""
    return _Ball(gc, _radius_of(grad_out, gc))


def _recentre_ball(mid: torch.Tensor, b: _Ball) -> BallTensor:
    return recentre(mid, BallTensor(b.c.reshape(mid.shape), b.r.expand(b.c.shape).reshape(mid.shape)))


def _recentre_balls(mids: list, balls: list) -> list:
    """``_recentre_ball`` of each pair (kernel outputs of one shape and dtype), in one pass per operation on the stacked
    values: the same operations as ``common.recentre`` and ``common.result`` elementwise (rad = r where mid = c, else
    up(r + up(|mid - c|)); rounded up into the radius dtype; NaN -> +inf), hence the same bits."""
    shape, dtype = mids[0].shape, mids[0].dtype
    if len(mids) == 1 or any(m.shape != shape or m.dtype != dtype for m in mids):
        return [_recentre_ball(m, b) for m, b in zip(mids, balls)]
    m64 = torch.stack([m.detach() for m in mids]).to(_F64)
    c = torch.stack([b.c if b.c.shape == shape else b.c.reshape(shape) for b in balls])
    r = torch.stack([b.r if b.r.shape == shape else b.r.expand(b.c.shape).reshape(shape) for b in balls])
    rad = torch.where(m64 == c, r, rounding._up_fresh(rounding.up(torch.abs(m64 - c)).add_(r)))
    rd = rounding.rad_dtype(dtype)
    if rd != _F64:
        y = rad.to(rd)
        rad = torch.where(torch.lt(y, rad), rounding.up(y), y)  # ``rounding.to_dtype_up`` (an exact comparison)
    rad.nan_to_num_(nan=math.inf, posinf=math.inf)
    return [BallTensor(m, rad[i]) for i, m in enumerate(mids)]


def _running_update(old: BallTensor, stat: BallTensor, momentum: float) -> BallTensor:
    """(1 - momentum) old + momentum stat, with 1 - momentum enclosed exactly (the double momentum is exact)."""
    one = BallTensor(torch.ones((), dtype=_F64, device=old.device), torch.zeros((), dtype=_F64, device=old.device))
    return old * (one - momentum) + stat * momentum


def _bn_forward(outs, x, weight, bias, running_mean, running_var, training, momentum, eps, old_stats=None):
    """Balls for (out, save_mean, save_invstd[, new_running_mean, new_running_var]) given the kernel's outputs
    ``outs``; ``old_stats`` = the running statistics as float64 balls before the kernel updated them.
    Training: ``_statistics`` over the batch and spatial dims; eval: mu = running_mean, s from running_var (``_rstd``
    on its end points). Then y = (x - mu) (s w) + b by ``_affine_output``."""
    out_m, mean_m, invstd_m = outs[:3]
    nd = x.dim()
    shape = _channel_shape(nd)
    c = x.shape[1]
    m = _mid(x).detach()
    r = _radius_of(x, m)
    n = m.numel() // max(c, 1)
    if training:
        stats = _statistics(m, r, _bn_dims(nd), n, eps)
        mean, invstd, z = stats.mean, stats.rstd, stats.z
    else:
        mean = _as_ball(running_mean, shape)
        var = _as_ball(running_var, shape)
        invstd = _rstd(rounding.sub_down(var.c, var.r), rounding.add_up(var.c, var.r), eps)
        z = _centred(m, r, mean)
    w = _as_ball(weight, shape)
    scale = invstd if w is None else _mul(invstd, w)
    balls = [_affine_output(out_m, z, scale, _as_ball(bias, shape))]
    if training:
        balls += _recentre_balls([mean_m, invstd_m], [mean, invstd])
    else:  # eval: the kernel returns empty saved statistics
        balls += [result(m_, torch.zeros(m_.shape, device=m_.device)) for m_ in (mean_m, invstd_m)]
    if old_stats is None:
        return balls
    old_mean, old_var = old_stats
    if training:
        mean_ball = BallTensor(mean.c.reshape(c), mean.r.expand(mean.c.shape).reshape(c))
        var_ball = _from_bounds(stats.var_lo.reshape(c), stats.var_hi.reshape(c))
        unbiased = var_ball * float(n) / float(n - 1)
        new_stats = [_running_update(old_mean, mean_ball, momentum) if old_mean is not None else None,
                     _running_update(old_var, unbiased, momentum) if old_var is not None else None]
    else:
        new_stats = [old_mean, old_var]
    return balls, new_stats


def _snapshot(running_mean, running_var, training):
    """The running statistics as float64 balls before the kernel updates them, when there is a ball buffer to update
    (training mode only; plain buffers are updated by the kernel alone and carry no radius, so their ball update would
    be thrown away)."""
    if not training or not (isinstance(running_mean, BallTensor) or isinstance(running_var, BallTensor)):
        return None
    return _wide(running_mean), _wide(running_var)


def _store_running(buffer, new_mid_holder: torch.Tensor, enclosure: BallTensor | None) -> None:
    """Ball buffer: rad <- radius of the enclosure re-centred on the kernel's new midpoint (already in buffer.mid)."""
    if isinstance(buffer, BallTensor) and enclosure is not None:
        buffer.rad.copy_(recentre(new_mid_holder, enclosure).rad.expand(buffer.rad.shape))


@rule(aten.native_batch_norm.default, aten._native_batch_norm_legit.default)
def native_batch_norm(func, x, weight, bias, running_mean, running_var, training, momentum, eps):
    """(out, save_mean, save_invstd): the float64 enclosure of ``_bn_forward``, re-centred (module docstring).
    Training mode with running statistics: the kernel updates the buffers' midpoints in place; ball buffers get their
    radii updated in place (ball arithmetic, unbiased variance), plain buffers are updated as plain PyTorch does (not
    certified)."""
    _check_float_input(func, x)
    old = _snapshot(running_mean, running_var, training)
    outs = func(_mid(x), _mid(weight), _mid(bias), _mid(running_mean), _mid(running_var), training, momentum, eps)
    if old is None:
        return tuple(_bn_forward(outs, x, weight, bias, running_mean, running_var, training, momentum, eps))
    balls, (new_mean, new_var) = _bn_forward(outs, x, weight, bias, running_mean, running_var, training, momentum,
                                             eps, old)
    if isinstance(running_mean, BallTensor):
        _store_running(running_mean, running_mean.mid, new_mean)
    if isinstance(running_var, BallTensor):
        _store_running(running_var, running_var.mid, new_var)
    return tuple(balls)


@rule(aten._native_batch_norm_legit.no_stats)
def native_batch_norm_no_stats(func, x, weight, bias, training, momentum, eps):
    """Batch norm without running statistics: as ``native_batch_norm``."""
    _check_float_input(func, x)
    outs = func(_mid(x), _mid(weight), _mid(bias), training, momentum, eps)
    return tuple(_bn_forward(outs, x, weight, bias, None, None, training, momentum, eps))


@rule(aten._native_batch_norm_legit_no_training.default)
def native_batch_norm_no_training(func, x, weight, bias, running_mean, running_var, momentum, eps):
    """Eval-mode batch norm: (x - running_mean) rsqrt(running_var + eps) w + b, re-centred."""
    _check_float_input(func, x)
    outs = func(_mid(x), _mid(weight), _mid(bias), _mid(running_mean), _mid(running_var), momentum, eps)
    return tuple(_bn_forward(outs, x, weight, bias, running_mean, running_var, False, momentum, eps))


@rule(aten._native_batch_norm_legit_functional.default)
def native_batch_norm_functional(func, x, weight, bias, running_mean, running_var, training, momentum, eps):
    """Functional form: (out, save_mean, save_invstd, new_running_mean, new_running_var); the new statistics are
    balls (ball arithmetic from the old ones, plain old statistics being exact points), re-centred on the kernel's."""
    _check_float_input(func, x)
    old = (_wide(running_mean), _wide(running_var))
    outs = func(_mid(x), _mid(weight), _mid(bias), _mid(running_mean), _mid(running_var), training, momentum, eps)
    balls, new_stats = _bn_forward(outs, x, weight, bias, running_mean, running_var, training, momentum, eps, old)
    return tuple(balls) + tuple(recentre(m, BallTensor(enc.mid.reshape(m.shape), enc.rad.reshape(m.shape)))
                                for m, enc in zip(outs[3:], new_stats))


@rule(aten.native_batch_norm_backward.default)
def native_batch_norm_backward(func, grad_out, x, weight, running_mean, running_var, save_mean, save_invstd, train,
                               eps, output_mask):
    """(grad_input, grad_weight, grad_bias) of batch norm, from the kernel's formula. With z = x - mean,
    S = sum gy, D = sum gy z over the batch and spatial dims (n elements per channel):
    training (mean, invstd = the saved statistics, balls containing the exact batch statistics):
        grad_input = (gy - S/n - z D invstd^2/n) invstd w,  grad_weight = D invstd,  grad_bias = S;
    eval (mean = running_mean, invstd = rsqrt(running_var + eps)): grad_input = gy invstd w, the others as above.
    grad_input = K1 gy - K2 - K3 z with K1 = invstd w, K2 = K1 S/n, K3 = K1 invstd^2 D/n (``_gradient_input``),
    D by ``_dot_ball``, S by ``_sum_ball``; every point of the argument balls (each x with its exact statistics among
    them) gives a value inside."""
    _check_float_input(func, x)
    gx_m, gw_m, gb_m = func(_mid(grad_out), _mid(x), _mid(weight), _mid(running_mean), _mid(running_var),
                            _mid(save_mean), _mid(save_invstd), train, eps, output_mask)
    nd = x.dim()
    dims = _bn_dims(nd)
    shape = _channel_shape(nd)
    c = x.shape[1]
    m = _mid(x).detach()
    n = m.numel() // max(c, 1)
    g = _gradient_ball(grad_out, _mid(grad_out).detach())
    if train:
        mean, invstd = _as_ball(save_mean, shape), _as_ball(save_invstd, shape)
    else:
        mean = _as_ball(running_mean, shape)
        var = _as_ball(running_var, shape)
        invstd = _rstd(rounding.sub_down(var.c, var.r), rounding.add_up(var.c, var.r), eps)
    need_dot = gw_m is not None or (train and gx_m is not None)
    need_sums = need_dot or gb_m is not None
    r = _radius_of(x, m) if need_dot else None
    w = _as_ball(weight, shape) if gx_m is not None else None
    blocks = _channel_blocks(m.shape)  # a block of whole channels at a time (memory, ``_CHANNEL_BLOCK``)
    gx_rad = None
    if gx_m is not None and len(blocks) > 1:
        gx_rad = torch.empty_like(gx_m, dtype=rounding.rad_dtype(gx_m.dtype))
    totals, dots = [], []
    for cs in blocks:
        g_b = _Ball(g.c[:, cs], None if g.r is None else g.r[:, cs])
        invstd_b = _channels(invstd, cs)
        sums = _sum_ball(g_b, dims, n) if need_sums else None
        z = _centred(m[:, cs], None if r is None else r[:, cs], _channels(mean, cs)) if need_dot else None
        dot = _dot_ball(g_b, z, sums, dims, n) if need_dot else None
        if gx_m is not None:
            k1 = invstd_b if w is None else _mul(invstd_b, _channels(w, cs))
            k2 = k3 = None
            if train:
                k2, k3 = _k_coefficients(k1, invstd_b, sums.total, dot, n)
            block_rad = _gradient_input_rad(gx_m[:, cs], g_b, z, k1, k2, k3)
            if gx_rad is None:
                gx_rad = block_rad
            else:
                gx_rad[:, cs] = block_rad
        del z
        totals.append(sums.total if need_sums else None)
        dots.append(dot)
    balls = [None, None, None]
    if gw_m is not None:
        balls[1] = _recentre_ball(gw_m, _mul(_cat_channels(dots), invstd))
    if gb_m is not None:
        balls[2] = _recentre_ball(gb_m, _cat_channels(totals))
    if gx_m is not None:
        balls[0] = BallTensor(gx_m, gx_rad)
    return tuple(balls)


# ----------------------------------------------------------------------------------------------------------------------
# Layer norm


def _ln_geometry(x, normalized_shape):
    k = len(normalized_shape)
    nd = x.dim()
    dims = list(range(nd - k, nd))
    n = math.prod(int(s) for s in normalized_shape)
    stat_shape = tuple(x.shape[:nd - k]) + (1,) * k
    return dims, n, stat_shape


@functools.lru_cache(maxsize=256)
def _layer_norm_constants(n: int, rows: int, dtype: torch.dtype, has_bias: bool) -> np.ndarray:
    """The constants of the fused layer-norm kernels (``fused.LN_*`` name the slots): the same values the reference
    path reads, for groups of ``n`` elements, ``rows`` groups (grad_weight's sums) and midpoints of ``dtype``."""
    k = np.zeros(fused.LN_COUNT)
    g, gc1, kappa = _group_constants(n)
    rd = rounding.rad_dtype(dtype)
    out = _inflation_to(8, rd, 0.0 if has_bias else _ETA) if rd != _F64 else _inflation(8, 0.0 if has_bias else _ETA)
    gx = _inflation_to(12, rd, 3 * _ETA) if rd != _F64 else _inflation(12, 3 * _ETA)
    values = {
        fused.LN_U: _U, fused.LN_F0: _sum_up_factor(n, 0), fused.LN_F1: _sum_up_factor(n, 1),
        fused.LN_F2: _sum_up_factor(n, 2), fused.LN_FDN: _sum_down_factor(n), fused.LN_NETA: float(n) * _ETA,
        fused.LN_GAMMA: g, fused.LN_GC1: gc1, fused.LN_KAPPA: kappa, fused.LN_OPU: _ONE_PLUS_U,
        fused.LN_OPU2: _ONE_PLUS_U_SQUARED, fused.LN_OMU2: _ONE_MINUS_U_SQUARED,
        fused.LN_ROW_F0: _sum_up_factor(rows, 0), fused.LN_ROW_GAMMA: _group_constants(rows)[0],
    }
    for slots, constants in (((fused.LN_PHI1, fused.LN_A1), _inflation(1)),
                             ((fused.LN_PHI2, fused.LN_A2), _inflation(2)),
                             ((fused.LN_PHI3, fused.LN_A3), _inflation(3)),
                             ((fused.LN_PHI4, fused.LN_A4), _inflation(4)),
                             ((fused.LN_PHI6H, fused.LN_A6H), _inflation(6, _HALF_ETA)),
                             ((fused.LN_PHI2E, fused.LN_A2E), _inflation(2, _ETA)),
                             ((fused.LN_PHI_OUT, fused.LN_A_OUT), out), ((fused.LN_PHI_GX, fused.LN_A_GX), gx)):
        values.update(zip(slots, constants))
    for slot, value in values.items():
        k[slot] = value
    k.flags.writeable = False
    return k


def _fused_parts(x, numel: int, dtype: torch.dtype):
    """(mid, rad) of an argument for the fused layer-norm kernels: contiguous, ``dtype``, ``numel`` elements (a radius
    of a plain tensor: empty); None where it does not qualify (the reference path runs)."""
    if x is None:
        return torch.empty(0, dtype=dtype), torch.empty(0, dtype=dtype)
    m = _mid(x).detach()
    if m.dtype != dtype or m.numel() != numel or not m.is_contiguous():
        return None
    if not isinstance(x, BallTensor):
        return m, torch.empty(0, dtype=dtype)
    r = x.rad
    if r.dtype != dtype or r.shape != x.shape or not r.is_contiguous():
        return None
    return m, r


def _stat_layout(t: torch.Tensor, rows: int, dtype: torch.dtype) -> bool:
    """A kernel's per-row statistic (mean or rstd) that the fused kernels can read and pair with their radii."""
    return t.dtype == dtype and t.numel() == rows and t.is_contiguous()


def _layer_norm_fused_forward(x, weight, bias, eps, out, mean, rstd, n):
    """``native_layer_norm``'s balls from ``fused.layer_norm_forward`` (the reference formulas below, one compiled
    pass per row), or None where the kernels do not apply."""
    dtype = out.dtype
    rows = out.numel() // n
    if not (fused.applies(out) and _stat_layout(mean, rows, dtype) and _stat_layout(rstd, rows, dtype)):
        return None
    parts = [_fused_parts(x, out.numel(), dtype), _fused_parts(weight, n, dtype), _fused_parts(bias, n, dtype)]
    if any(p is None for p in parts):
        return None
    (m, r), (wc, wr), (bc, br) = parts
    if weight is not None and wr.numel() == 0:
        wr = torch.zeros(n, dtype=dtype)
    if bias is not None and br.numel() == 0:
        br = torch.zeros(n, dtype=dtype)
    k = _layer_norm_constants(n, rows, dtype, bias is not None)
    rads = fused.layer_norm_forward(m, r, wc, wr, bc, br, out, mean, rstd, k, eps, rows, n)
    return tuple(BallTensor(t, rad) for t, rad in zip((out, mean, rstd), rads))


@rule(aten.native_layer_norm.default)
def native_layer_norm(func, x, normalized_shape, weight, bias, eps):
    """(out, mean, rstd) over the last ``len(normalized_shape)`` dims: out = (x - mu) * rstd * w + b with
    mu = mean(x), rstd = 1/sqrt(var(x) + eps), var the biased variance; eps is an exact double.
    Statistics by ``_statistics`` (the variance clipped at 0: an exact variance is >= 0, so eps alone bounds rstd for
    constant rows), the output by ``_affine_output`` with scale = rstd w (elementwise ball products, ``_mul``); each
    output re-centred on the kernel's."""
    out, mean, rstd = func(_mid(x), normalized_shape, _mid(weight), _mid(bias), eps)
    dims, n, _ = _ln_geometry(x, normalized_shape)
    m = _mid(x).detach()
    if n == 0:
        return tuple(result(t, torch.full(t.shape, math.inf)) for t in (out, mean, rstd))
    fast = _layer_norm_fused_forward(x, weight, bias, eps, out, mean, rstd, n)
    if fast is not None:
        return fast
    stats = _statistics(m, _radius_of(x, m), dims, n, eps)
    w = _as_ball(weight)
    scale = stats.rstd if w is None else _mul_full(stats.rstd, w)
    y = _affine_output(out, stats.z, scale, _as_ball(bias))
    return (y, *_recentre_balls([mean, rstd], [stats.mean, stats.rstd]))


def _mean_ball(m: torch.Tensor, r: torch.Tensor | None, dims, n: int) -> _Ball:
    """mean x over ``dims`` for every x in the ball: centre the computed mean c, radius e + mean r with
    e >= |mean m - c| bounded a posteriori as in ``_statistics``."""
    c = _gsum(m, dims).div_(float(n))  # the computed mean (CPU's mean is this sum and division)
    d = torch.sub(m, c)
    s_a = _gsum(torch.abs(d), dims)
    s_d = _gsum(d, dims)
    del d
    sums = torch.stack((s_a, _gsum(r, dims))) if r is not None else s_a.unsqueeze(0)
    sums = _sum_bounds(sums, n, (0,) * len(sums))  # [_sum_up(sum a, n, 0), _sum_up(sum r, n, 0)]
    e = rounding.div_up(rounding.add_up(torch.abs(s_d), rounding.mul_up(sums[0], _group_constants(n)[1])), float(n))
    if r is not None:
        e = rounding.add_up(e, rounding.div_up(sums[1], float(n)))
    return _Ball(c, e)


def _layer_norm_fused_backward(grad_out, x, mean, rstd, weight, outs, n: int, lead: list):
    """``native_layer_norm_backward``'s balls from ``fused.layer_norm_backward`` (the reference formulas below, one
    compiled pass per row), or None where the kernels do not apply (also: no leading dims to sum grad_weight over)."""
    dtype = _mid(x).dtype
    rows = x.numel() // n
    if not lead or rows == 0:
        return None
    kept = [o for o in outs if o is not None]
    if not kept or not fused.applies(_mid(x)) or any(o.dtype != dtype or not o.is_contiguous() for o in kept):
        return None
    parts = [_fused_parts(grad_out, x.numel(), dtype), _fused_parts(x, x.numel(), dtype),
             _fused_parts(weight, n, dtype), _fused_parts(mean, rows, dtype), _fused_parts(rstd, rows, dtype)]
    if any(p is None for p in parts) or mean is None or rstd is None:
        return None
    (gm, gr), (m, r), (wc, wr), (mean_c, mean_r), (rstd_c, rstd_r) = parts
    if weight is not None and wr.numel() == 0:
        wr = torch.zeros(n, dtype=dtype)
    k = _layer_norm_constants(n, rows, dtype, True)
    rads = fused.layer_norm_backward(gm, gr, m, r, mean_c, mean_r, rstd_c, rstd_r, wc, wr, outs, k, rows, n)
    return tuple(None if o is None else BallTensor(o, rad) for o, rad in zip(outs, rads))


@rule(aten.native_layer_norm_backward.default)
def native_layer_norm_backward(func, grad_out, x, normalized_shape, mean, rstd, weight, bias, output_mask):
    """(grad_input, grad_weight, grad_bias) of layer norm, from the formula the kernel implements (any algebraic form
    of it: PyTorch's a*g + b*x + c expands to this identically, with no use of sum(xhat) = 0):

        z = x - mu,  xhat = z rstd,  g = grad_out * w,  n = numel(normalized_shape)
        grad_input  = rstd g - rstd mean(g) - rstd^3 z mean(g z)       (means over the normalized dims)
        grad_weight = sum over the leading dims of grad_out * xhat;   grad_bias = the same sum of grad_out.

    ``mean`` and ``rstd`` are inputs of the op (the saved forward balls, containing the exact forward values). For mu
    we use the hull of the ``mean`` ball and the mean of x recomputed (``_mean_ball``), so the enclosure holds whether
    the exact gradient is read with the saved mean or with the exact mean of x. grad_input by ``_gradient_input``
    with K1 = rstd, K2 = rstd mean(g), K3 = rstd^3 mean(g z) (g the elementwise ball product, ``_mul``); grad_weight
    from the ball products gy * (z rstd) summed by ``_sum_ball``. Each output re-centred on the kernel's.
    """
    outs = func(*mids((grad_out, x, normalized_shape, mean, rstd, weight, bias, output_mask)))
    dims, n, stat_shape = _ln_geometry(x, normalized_shape)
    lead = list(range(x.dim() - len(normalized_shape)))
    if n == 0:
        return tuple(None if t is None else result(t, torch.full(t.shape, math.inf)) for t in outs)
    fast = _layer_norm_fused_backward(grad_out, x, mean, rstd, weight, outs, n, lead)
    if fast is not None:
        return fast
    m = _mid(x).detach()
    r = _radius_of(x, m)
    gc = _mid(grad_out).detach()
    gy = _Ball(gc, _radius_of(grad_out, gc))
    mu = _hull(_as_ball(mean, stat_shape), _mean_ball(m, r, dims, n))
    s = _as_ball(rstd, stat_shape)
    z = _centred(m, r, mu)
    gx = gw = gb = None
    rows = m.numel() // max(n, 1)
    parts = []  # (kernel output, ball) of grad_weight and grad_bias
    if outs[1] is not None:  # before grad_input, which overwrites z.d
        parts.append((outs[1], _grad_times_xhat(gy, z, s)))
    if outs[2] is not None:
        parts.append((outs[2], gy if lead else _Ball(gc, _zero_if_none(gy.r, gc))))
    if parts:
        kernel_outs = [o for o, _ in parts]
        if lead:
            totals = [t.total for t in _sum_balls([b for _, b in parts], lead, rows)]
        else:
            totals = [b for _, b in parts]
        del parts  # the full-size product ball of grad_weight (memory)
        balls = _recentre_balls(kernel_outs, totals)
        del totals
        gw = balls[0] if outs[1] is not None else None
        gb = balls[-1] if outs[2] is not None else None
    if outs[0] is not None:
        w = _as_ball(weight)
        g = gy if w is None else _mul_full(gy, w)
        abs_d = torch.abs(z.d)  # shared by the dot product and grad_input (which overwrites it)
        sums = _sum_ball(g, dims, n)
        k2, k3 = _k_coefficients(s, s, sums.total, _dot_ball(g, z, sums, dims, n, abs_d=abs_d), n)
        gx = _gradient_input(outs[0], g, z, s, k2, k3, abs_d=abs_d)
    return gx, gw, gb


def _grad_times_xhat(gy: _Ball, z: _Centred, s: _Ball) -> _Ball:
    """The full-size ball gy * (z s) of layer norm's grad_weight terms (xhat = z s): exactly
    ``_mul_full(gy, _mul_full(_Ball(z.d, rho), s))`` with rho = inflate(u|d| + r + mu_r, 3) >= |z - d| (``_Centred``:
    3 rounded operations), i.e. the bound stated at ``_mul_full``, applied twice:
        inner  c1 = fl(d s.c),    r1 = inflate(u|c1| + |d| s.r + rho (|s.c| + s.r), 6, eta/2),
        outer  c  = fl(gy.c c1),  r  = inflate(u|c| + |gy.c| r1 + gy.r (|c1| + r1), 6, eta/2).
    Written out here so that the outer product runs in buffers it owns: gy.c widened once (exactly) and reused as
    |gy.c|, |c1| + r1 computed in c1's storage, gy.r widened into r1's after r1's last use. The same operations on the
    same (float64) operands in the same order -- a mixed float32/float64 kernel widens its float32 operand exactly
    first -- so the same bits, with at most five full-size float64 arrays alive here instead of seven."""
    rho = torch.abs(z.d).mul_(_U)
    if z.r is not None:
        rho += z.r
    rho += z.mu_r
    inner = _mul_full(_Ball(z.d, _inflated_(rho, 3)), s)
    del rho
    c1, r1 = inner
    del inner
    g_abs = gy.c.to(_F64, copy=True)
    c = torch.mul(g_abs, c1)  # gy.c c1
    expr = torch.abs(c).mul_(_U)
    expr.addcmul_(g_abs.abs_(), r1)  # |gy.c| r1
    del g_abs
    if gy.r is not None:
        q = c1.abs_().add_(r1)  # |c1| + r1
        expr.addcmul_(r1.copy_(gy.r), q)  # gy.r (|c1| + r1)
        del q
    del c1, r1
    return _Ball(c, _inflated_(expr, 6, _HALF_ETA))
