"""Rules for autograd's ``*_backward`` ops (DESIGN.md §4 ``backward.py``): what ``loss.backward()`` of an MLP reaches
besides mm/sum/mul (activations, softmax family, losses).

Each op is a real function of its arguments -- the incoming gradient G and a saved tensor (the forward input, or the
forward *output* for tanh, sigmoid, relu, softmax and in-place activations) -- and its rule bounds that function over
the argument balls, re-centred on the kernel's midpoint, like every other rule. Saved tensors are the forward rules'
balls, so the exact forward value lies in them and the composition stays an enclosure of the exact gradient.

Kinks (Lee, Park & Aiken; DESIGN.md §4): where the saved ball straddles a switch point, or is exactly at it, the exact
derivative is one of the one-sided values; the rule returns the hull of the possible branches
(``nonsmooth._branch_hull``) and records a ``kink`` event. One exception, forced by what autograd passes: relu's
backward is ``threshold_backward(G, relu(x), 0)`` on the *result*, which is exactly 0 for every inactive unit. The relu
rule gives its result a radius >= eta wherever the pre-activation ball touches 0 (``nonsmooth.relu``), so here an
exact point 0 with threshold 0 means "pre-activation strictly negative": the derivative is exactly 0, no hull.
"""

from __future__ import annotations

import math

import torch

from ballgrad import diagnostics, fused, rounding
from ballgrad.ops import nn as nn_rules
from ballgrad.ops.common import mid_of, result, result_in_place
from ballgrad.ops.nn import MEAN, finish, from_bounds, nan_to, pick, point, wide
from ballgrad.ops.nonsmooth import _branch_hull, _emit_kink, _interval, _numeric_result, _python_double
from ballgrad.ops.registry import rule
from ballgrad.tensor import BallTensor

aten = torch.ops.aten

_F64 = torch.float64
_INF = math.inf


def _mean_divisor(reduction: int, n: int):
    return n if reduction == MEAN else None


def _scaled(value: BallTensor, n) -> BallTensor:
    """value / n for the mean reductions (n an exact integer, the division rule bounds the rounding)."""
    return value if n is None else value / n


def _infinite(b: BallTensor) -> BallTensor:
    return BallTensor(b.mid, torch.full_like(b.rad, _INF))


# ----------------------------------------------------------------------------------------------------------------------
# Piecewise-linear activations: hulls of branches


@rule(aten.threshold_backward.default)
def threshold_backward(func, grad, s, threshold):
    """G if s > th else 0 (PyTorch's 0 at s = th). With S = [lo, hi] (``nonsmooth._interval``, exact end points):
    lo > th: G; hi < th: 0; a ball touching th: hull of {0} and G with a ``kink`` event -- except an exact point
    s = th = 0, relu's inactive units (module docstring): 0. (A point exactly at th != 0 comes only from
    nn.Threshold's input and is a kink: hull.) Radius by ``_branch_hull``."""
    m = func(mid_of(grad), mid_of(s), threshold)
    th = _python_double(threshold, "threshold")
    if th == 0 and _same_layout(m, grad, s):
        return _relu_backward_fast(m, grad, s)
    lo, hi, unknown = _interval(s, m.device)
    g_lo, g_hi, _ = _interval(grad, m.device)
    touch = (lo <= th) & (hi >= th)
    relu_inactive = (lo == hi) & (lo == th) & (th == 0)
    grad_possible = (hi > th) | (touch & ~relu_inactive)
    zero = torch.zeros((), dtype=_F64, device=m.device)
    rad = _branch_hull(m, [(grad_possible, g_lo, g_hi), (lo <= th, zero, zero)])
    _emit_kink(touch & ~relu_inactive, m, "saved ball touches the threshold: hull of the one-sided derivatives {0, grad}")
    return _numeric_result(m, rad)


def _same_layout(m, *args) -> bool:
    """Balls or plain tensors of m's shape whose radius (if any) has m's radius dtype: the fast paths' operands."""
    rd = rounding.rad_dtype(m.dtype)
    for a in args:
        if not isinstance(a, torch.Tensor) or a.shape != m.shape or a.dtype != m.dtype:
            return False
        if isinstance(a, BallTensor) and (a.rad.shape != m.shape or a.rad.dtype != rd):
            return False
    return True


def _relu_backward_fast(m, grad, s):
    """threshold_backward(G, S, 0) in the radius dtype, the same three cases as above decided by exact float
    comparisons of S = (ms, rs): ms > rs (lo > 0): G, radius rG; -ms > rs (hi < 0) or the exact point 0 (relu's
    inactive unit): exactly 0 = m, radius 0; otherwise (touching 0, or NaN): the hull of {0} and G, which lies within
    max(|mG|, rG) of m = mG (ms > 0) and within |mG| + rG (rounded up, F2) of m = 0. A NaN or infinite midpoint gets
    +inf (``result_in_place``).

    Memory: the output's radius buffer is the only full-size float temporary; it first holds -ms (negation and the
    widening of a reduced-dtype ms are exact) for the comparisons, then the 0/1 indicator of ms > rs (``gt_``: 1.0 where
    the comparison holds, in the buffer's dtype), times rG."""
    gm, gr = (grad.mid, grad.rad) if isinstance(grad, BallTensor) else (grad, None)
    sm, sr = (s.mid, s.rad) if isinstance(s, BallTensor) else (s, torch.zeros((), dtype=m.dtype))
    if gr is not None and fused.applies(m, gm, gr, sm, sr) and not diagnostics.is_recording():
        rad, _ = fused.relu_backward_radius(gm, gr, sm, sr, m)  # the same, bit for bit, in one pass
        return BallTensor(m, rad)
    rd = rounding.rad_dtype(m.dtype)
    rad = torch.neg(sm) if sm.dtype == rd else sm.to(rd).neg_()
    touch = torch.gt(rad, sr)  # -ms > rs: below
    exact_zero = torch.eq(sm, 0)
    exact_zero &= torch.eq(sr, 0)  # the exact point 0
    touch |= exact_zero
    del exact_zero
    touch |= torch.gt(sm, sr)  # above
    touch.logical_not_()  # neither above, below nor the exact point 0 (NaN included)
    # rG where above, else 0: the indicator times rG (rG is finite or +inf; an infinite rG with a decided 0 branch
    # would give inf * 0 = NaN -> +inf in ``result_in_place``: looser, still sound)
    if gr is not None:
        rad.copy_(sm).gt_(sr).mul_(gr)
    else:
        rad.zero_()
    n_touch = int(torch.count_nonzero(touch))
    if n_touch:  # the hull on the touching elements: gathered when few (usual), full-size passes when many
        few = 8 * n_touch < touch.numel()
        where = touch.nonzero(as_tuple=True) if few else None  # once (a boolean-mask index searches the mask)
        pick = (lambda t: t[where]) if few else (lambda t: t)
        abs_g = torch.abs(pick(gm)).to(rd)
        if gr is not None:
            gr_t = pick(gr)
            abs_g = torch.where(pick(sm) > 0, torch.maximum(abs_g, gr_t), rounding.add_up(abs_g, gr_t))
        rad = rad.index_put_(where, abs_g) if few else torch.where(touch, abs_g, rad)
        _emit_kink(touch, m, "saved ball touches the threshold: hull of the one-sided derivatives {0, grad}")
    del touch
    return result_in_place(m, rad)


@rule(aten.leaky_relu_backward.default)
def leaky_relu_backward(func, grad, s, negative_slope, self_is_result):
    """G if s > 0 else slope G: branches G (possible if hi >= 0: the right derivative at s = 0) and slope G (if
    lo <= 0); hull with a ``kink`` event where both are possible (s is the input, or the result with the same sign
    when ``self_is_result``)."""
    m = func(mid_of(grad), mid_of(s), negative_slope, self_is_result)
    slope = _python_double(negative_slope, "negative_slope")
    lo, hi, _ = _interval(s, m.device)
    g_lo, g_hi, _ = _interval(grad, m.device)
    if slope == 0:
        zero = torch.zeros_like(g_lo)
        n_lo = n_hi = zero
    else:
        a, b = g_lo * slope, g_hi * slope
        n_lo, n_hi = rounding.down(torch.minimum(a, b)), rounding.up(torch.maximum(a, b))
        n_lo, n_hi = nan_to(n_lo, -_INF), nan_to(n_hi, _INF)
    rad = _branch_hull(m, [(hi >= 0, g_lo, g_hi), (lo <= 0, n_lo, n_hi)])
    _emit_kink((lo <= 0) & (hi >= 0), m, "saved ball touches 0: hull of the one-sided derivatives {slope*grad, grad}")
    return _numeric_result(m, rad)


@rule(aten.hardtanh_backward.default)
def hardtanh_backward(func, grad, s, min_val, max_val):
    """G if min < s < max else 0: branches G (possible if hi >= min and lo <= max, min < max: the inner one-sided
    derivative at either end) and 0 (if lo <= min or hi >= max); hull and a ``kink`` event where the ball touches a
    bound. (In-place hardtanh_ passes its result, which sits exactly at a bound when saturated: hulled, sound.)"""
    m = func(mid_of(grad), mid_of(s), min_val, max_val)
    a = _python_double(min_val, "min_val")
    b = _python_double(max_val, "max_val")
    lo, hi, _ = _interval(s, m.device)
    g_lo, g_hi, _ = _interval(grad, m.device)
    zero = torch.zeros((), dtype=_F64, device=m.device)
    grad_possible = (hi >= a) & (lo <= b) & (a < b)
    zero_possible = (lo <= a) | (hi >= b)
    rad = _branch_hull(m, [(grad_possible, g_lo, g_hi), (zero_possible, zero, zero)])
    _emit_kink(grad_possible & zero_possible, m, "saved ball touches min_val or max_val: hull of {0, grad}")
    return _numeric_result(m, rad)


# ----------------------------------------------------------------------------------------------------------------------
# Smooth activations


@rule(aten.tanh_backward.default)
def tanh_backward(func, grad, y):
    """G (1 - y^2), y the saved tanh output ball (the square by the integer-power rule: one occurrence of y);
    composed in float64, re-centred."""
    m = func(mid_of(grad), mid_of(y))
    return finish(m, wide(grad) * (1 - wide(y) ** 2))


@rule(aten.sigmoid_backward.default)
def sigmoid_backward(func, grad, y):
    """G y (1 - y) = G (1/4 - (y - 1/2)^2): one occurrence of y, so no dependency is lost; composed, re-centred."""
    m = func(mid_of(grad), mid_of(y))
    return finish(m, wide(grad) * (0.25 - (wide(y) - 0.5) ** 2))


@rule(aten.gelu_backward.default)
def gelu_backward(func, grad, x, *, approximate="none"):
    """G gelu'(x): gelu' over the ball by the mean value form with gelu'' (``nn.enclose_smooth``; 'none':
    gelu' = Phi + x phi, gelu'' = phi (2 - x^2); 'tanh': see ``nn._gelu_tanh_d1/_d2``), times G; re-centred."""
    m = func(mid_of(grad), mid_of(x), approximate=approximate)
    _, d1, d2 = nn_rules.gelu_functions(approximate)
    return finish(m, wide(grad) * nn_rules.enclose_smooth(wide(x), d1, d2))


@rule(aten.silu_backward.default)
def silu_backward(func, grad, x):
    """G silu'(x), silu' = sigmoid(x)(1 + x sigmoid(-x)) over the ball by the mean value form with silu''."""
    m = func(mid_of(grad), mid_of(x))
    _, d1, d2 = nn_rules.SILU
    return finish(m, wide(grad) * nn_rules.enclose_smooth(wide(x), d1, d2))


# ----------------------------------------------------------------------------------------------------------------------
# softmax family


@rule(aten._softmax_backward_data.default)
def softmax_backward_data(func, grad, y, dim, input_dtype):
    """y_i (G_i - sum_j G_j y_j), y the saved softmax output ball: composed (mul, sum over dim, sub, mul), re-centred."""
    m = func(mid_of(grad), mid_of(y), dim, input_dtype)
    g, yw = wide(grad), wide(y)
    return finish(m, yw * (g - torch.sum(g * yw, dim=[dim], keepdim=True)))


@rule(aten._log_softmax_backward_data.default)
def log_softmax_backward_data(func, grad, z, dim, input_dtype):
    """G_i - exp(z_i) sum_j G_j, z the saved log_softmax output ball: the exact range over the balls in float64
    (``nn.log_softmax_backward_radius``); where that fails (non-finite values), composed (exp by its monotone rule)
    and re-centred."""
    m = func(mid_of(grad), mid_of(z), dim, input_dtype)
    fast = nn_rules.log_softmax_backward_radius(m, grad, z, dim)
    if fast is not None:
        return fast
    g = wide(grad)
    return finish(m, g - torch.exp(wide(z)) * torch.sum(g, dim=[dim], keepdim=True))


# ----------------------------------------------------------------------------------------------------------------------
# Losses


@rule(aten.nll_loss_backward.default, aten.nll_loss2d_backward.default)
def nll_loss_backward(func, grad, x, target, weight, reduction, ignore_index, total_weight):
    """d/dx[n, c] of nll_loss: -w_{t_n} G_n (none), -w_{t_n} G (sum), -w_{t_n} G / total_weight (mean) at c = t_n,
    exactly 0 elsewhere and for ignored samples. The values at the target positions are composed (mul, div by the
    forward's total_weight ball) and re-centred on the kernel's values there; every other position has radius |m|
    (exactly 0 when the kernel wrote 0)."""
    m = func(mid_of(grad), mid_of(x), target, mid_of(weight), reduction, ignore_index, mid_of(total_weight))
    if weight is None:  # direct formulas (``nn.nll_loss_backward_fast``)
        fast = nn_rules.nll_loss_backward_fast(m, grad, target, reduction, ignore_index, total_weight)
        if fast is not None:
            return fast
    cd = nn_rules.class_dim(m)
    kept = target != ignore_index
    safe_t = torch.where(kept, target, torch.zeros_like(target)).unsqueeze(cd)
    if weight is None:
        w_t = point(torch.ones(safe_t.squeeze(cd).shape, dtype=_F64, device=m.device))
    else:
        ww = wide(weight)
        idx = safe_t.squeeze(cd)
        w_t = BallTensor(ww.mid[idx], ww.rad[idx])
    values = -(w_t * wide(grad))
    if reduction == MEAN:
        values = values / wide(total_weight)
    zero = point(torch.zeros_like(values.mid))
    values = pick(kept, values, zero)
    at_targets = finish(torch.gather(m, cd, safe_t).squeeze(cd), values)
    rad = torch.abs(m.detach()).to(at_targets.rad.dtype)
    rad = rad.scatter(cd, safe_t, at_targets.rad.unsqueeze(cd))
    return result(m, torch.where(torch.isfinite(m), rad, torch.full_like(rad, _INF)))


@rule(aten.mse_loss_backward.default)
def mse_loss_backward(func, grad, x, target, reduction):
    """2 (x - t) G (/ N for the mean): composed, re-centred."""
    m = func(mid_of(grad), mid_of(x), mid_of(target), reduction)
    value = (wide(x) - wide(target)) * wide(grad) * 2
    return finish(m, _scaled(value, _mean_divisor(reduction, m.numel())))


@rule(aten.binary_cross_entropy_backward.default)
def binary_cross_entropy_backward(func, grad, x, target, weight=None, reduction=MEAN):
    """d/dx BCE = w G (-t/x + (1 - t)/(1 - x)) (/ N): the true derivative (PyTorch divides by max(x(1-x), 1e-12),
    which the re-centring measures). For t in [0, 1] both terms increase in x and decrease in t, so their ball sum
    loses nothing. Terms with an exactly-zero coefficient vanish (t = 0: -t/x, t = 1: the other); where the derivative
    is unbounded over the ball (``nn.bce_domain``) the radius is +inf with a ``domain`` event."""
    m = func(mid_of(grad), mid_of(x), mid_of(target), mid_of(weight), reduction)
    xw, tw = wide(x), wide(target)
    ok, x_log, x_log1m, t_zero, t_one = nn_rules.bce_domain(xw, tw)
    zero = point(torch.zeros_like(xw.mid))
    slope = pick(t_one, zero, (1 - tw) / (1 - x_log1m)) - pick(t_zero, zero, tw / x_log)
    value = wide(grad) * slope
    if weight is not None:
        value = wide(weight) * value
    value = _scaled(value, _mean_divisor(reduction, m.numel()))
    value = pick(ok.expand(value.shape), value, _infinite(value))
    out = finish(m, value)
    nn_rules._emit_domain(~ok, "BCE input ball reaches 0 or 1 where the derivative is unbounded, or leaves [0, 1]")
    return out


@rule(aten.smooth_l1_loss_backward.default)
def smooth_l1_loss_backward(func, grad, x, target, reduction, beta):
    """G h(d) (/ N), d = x - t, h(d) = clamp(d / beta, -1, 1): continuous and increasing, so h over the ball is
    [h(lo), h(hi)] (quotients rounded outward). beta = 0: h = sign(d), whose kink at d = 0 gives the hull [-1, 1] of
    the one-sided derivatives and a ``kink`` event where the ball touches 0."""
    m = func(mid_of(grad), mid_of(x), mid_of(target), reduction, beta)
    b = nn_rules._check_positive(beta, "beta", allow_zero=True)
    d = wide(x) - wide(target)
    lo, hi = rounding.sub_down(d.mid, d.rad), rounding.add_up(d.mid, d.rad)
    if b == 0:
        one = torch.ones_like(lo)
        h_lo = torch.where(lo > 0, one, -one)
        h_hi = torch.where(hi < 0, -one, one)
        _emit_kink((lo <= 0) & (hi >= 0), m, "x - target touches 0 (smooth_l1 with beta = 0 is |d|)")
    else:
        h_lo = torch.clamp(rounding.down(lo / b), -1, 1)
        h_hi = torch.clamp(rounding.up(hi / b), -1, 1)
    value = wide(grad) * from_bounds(h_lo, h_hi)
    return finish(m, _scaled(value, _mean_divisor(reduction, m.numel())))


@rule(aten.huber_loss_backward.default)
def huber_loss_backward(func, grad, x, target, reduction, delta):
    """G clamp(d, -delta, delta) (/ N), d = x - t: clamp is increasing and exact on float64 end points."""
    m = func(mid_of(grad), mid_of(x), mid_of(target), reduction, delta)
    dl = nn_rules._check_positive(delta, "delta", allow_zero=False)
    d = wide(x) - wide(target)
    lo, hi = rounding.sub_down(d.mid, d.rad), rounding.add_up(d.mid, d.rad)
    value = wide(grad) * from_bounds(torch.clamp(lo, -dl, dl), torch.clamp(hi, -dl, dl))
    return finish(m, _scaled(value, _mean_divisor(reduction, m.numel())))

