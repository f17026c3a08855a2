"""Reduction rules: sum, mean, prod, amax/amin/max/min, var/std (and var_mean/std_mean), vector norms
(DESIGN.md §2 "Sums"). logsumexp lives with the softmax family (nn.py).

Notation: the input ball (m_i, r_i) as the kernel uses it (``common.operand``: cast to the result dtype, the cast error
in r_i), n the number of reduced elements, m the computed result, u/eta of the dtype named.

**Sums.** fl(sum x) in any order (PyTorch's cascade/vectorised order, or a wider accumulator rounded at the end):
|fl(sum x) - sum x| <= gamma_(n-1) sum|x| (each term passes through at most n - 1 additions; additions are exact
relative roundings with gradual underflow). float16/bfloat16 sums accumulate in float32 (measured, and ATen's opmath
accumulation) and are rounded once more to the storage dtype: + u_s|m| + eta_s/2. A float64 -> float32 ``dtype=``
sum is covered whether PyTorch casts first (the cast errors are in r_i) or accumulates in float64 and rounds once
(u_32|m| + gamma64 sum|x| is below gamma32_(n-1) sum|x| for n >= 2; n = 1 is the cast itself).
The radius sums sum r_i and sum |m_i| are themselves computed in round-to-nearest, in any order, from non-negative
terms: fl >= (1 - gamma_(n-1)) exact, so exact <= theta_(n-1) fl with theta_n = 1/(1 - gamma_n) = (1 - nu)/(1 - 2nu)
(u of the dtype they are computed in: the radius dtype while (n-1)u < 1/4, float64 beyond). Hence
    rad >= theta (fl(sum r) + g fl(sum |m|)) [+ u_s |m| + eta_s/2],
with the constants theta, g theta rounded up offline and the combination bounded by ``linalg.inflate`` (the lemma
of ``rounding.inflate``, with its absolute term kept a normal number).

The composed rules (prod, var, std, norms) evaluate an enclosure with ball primitives in float64 and re-centre it on
PyTorch's midpoint (``common.recentre``); their docstrings give the identities used.
"""

from __future__ import annotations

import functools
import math
from fractions import Fraction

import torch

from ballgrad import diagnostics, fused, rounding
from ballgrad.errors import UnsupportedOpError
from ballgrad.ops import arith
from ballgrad.ops.common import finite_only as _finite_only
from ballgrad.ops.common import operand, recentre, result, result_in_place
from ballgrad.rounding import growth, inflate, theta, work_dtype
from ballgrad.ops.registry import current_op, rule
from ballgrad.tensor import BallTensor

aten = torch.ops.aten

_F64 = torch.float64


# ----------------------------------------------------------------------------------------------------------------------
# Helpers


def _dims(ndim: int, dim) -> list[int]:
    """The reduced dimensions: ``dim`` None, [] or () means all (sum, mean, amax, var, norm all read it so)."""
    if dim is None:
        return list(range(ndim))
    if isinstance(dim, int):
        dim = [dim]
    dim = list(dim)
    if not dim:
        return list(range(ndim))
    return sorted({d % ndim if ndim else 0 for d in dim})


def _count(shape, dims) -> int:
    n = 1
    for d in dims:
        n *= shape[d] if len(shape) else 1
    return n


def _up(value: Fraction, dtype: torch.dtype) -> float:
    return rounding.round_up_float(value, dtype)


def _reduce_sum(t: torch.Tensor, dims, keepdim: bool) -> torch.Tensor:
    return torch.sum(t, dim=dims, keepdim=keepdim) if t.dim() else t.clone()


def _sum_bound(t: torch.Tensor, dims, keepdim: bool, n: int) -> tuple[torch.Tensor, Fraction]:
    """(fl(sum t), theta) for non-negative t: exact sum <= theta * fl(sum t). Computed in ``work_dtype``."""
    wd = work_dtype(t.dtype if t.dtype in (torch.float32, _F64) else torch.float32, max(n - 1, 0))
    return _reduce_sum(t.to(wd), dims, keepdim), theta(max(n - 1, 0), rounding.unit_roundoff_exact(wd))


def _sum_up(t: torch.Tensor, dims, keepdim: bool, n: int) -> torch.Tensor:
    """An upper bound of the exact sum of the non-negative tensor ``t`` over ``dims`` (float64 or ``t``'s dtype)."""
    s, th = _sum_bound(t, dims, keepdim, n)
    return rounding.clean_rad(rounding.up(torch.mul(s, _up(th, s.dtype))))


def _ball64(x, out_dtype: torch.dtype) -> BallTensor:
    """The input ball as the kernel uses it (cast to ``out_dtype``), widened exactly to float64."""
    m, r = operand(x, out_dtype)
    m = m.to(_F64)
    return BallTensor(m, r.to(_F64).expand(m.shape).contiguous() if r.shape != m.shape else r.to(_F64))


def _point64(m: torch.Tensor) -> BallTensor:
    m = m.to(_F64)
    return BallTensor(m, torch.zeros_like(m))


def _check_float_ball(func, x):
    if isinstance(x, BallTensor) and not x.is_floating_point():
        raise UnsupportedOpError(func, "reductions of bool (comparison) balls are not supported; reduce .mid")


# ----------------------------------------------------------------------------------------------------------------------
# sum and mean


def _sum_parts(x, out_dtype, dims, n):
    """(fl(sum r), fl(sum |m|), theta, g) over ``dims`` (keepdim), the sums in a common work dtype."""
    mt, rt = operand(x, out_dtype)
    acc = torch.float32 if out_dtype in rounding.REDUCED_DTYPES else out_dtype
    g = growth(n - 1, rounding.unit_roundoff_exact(acc))
    rt = rt.expand(mt.shape) if rt.shape != mt.shape else rt
    s_r, th = _sum_bound(rt, dims, True, n)
    s_m, _ = _sum_bound(torch.abs(mt), dims, True, n)
    return s_r, s_m, th, g


@functools.lru_cache(maxsize=1024)
def _sum_coefficients(th: Fraction, g: Fraction, wd: torch.dtype) -> tuple[float, float]:
    """(theta, g theta) rounded up in ``wd`` (cached: the rational product costs more than a small sum's kernels)."""
    return _up(th, wd), _up(g * th, wd)


def _sum_radius(x, m, dim):
    """The sum bound (kept-dim shape): theta (fl sum r) + g theta (fl sum |m|), plus the final rounding of
    float16/bfloat16 results, inflated; shared by sum and nansum. Returns a fresh tensor (NaN -> +inf)."""
    dims = _dims(x.dim(), dim)
    n = _count(x.shape, dims)
    s_r, s_m, th, g = _sum_parts(x, m.dtype, dims, n)
    wd = s_r.dtype
    c_r, c_m = _sum_coefficients(th, g, wd)
    c = s_r.mul_(c_r).add_(s_m, alpha=c_m)  # s_r is the sum's own fresh output; 3 operations
    ops = 3
    if m.dtype in rounding.REDUCED_DTYPES:
        c = c + torch.abs(m).reshape(c.shape).to(wd) * rounding.unit_roundoff(m.dtype) + max(
            rounding.eta(m.dtype), float(torch.finfo(wd).smallest_normal))
        ops = 6
    return rounding.inflate_(c, ops)


def _sum_result(m: torch.Tensor, rad: torch.Tensor, keepdim: bool) -> BallTensor:
    """The ball of a sum-like kernel output m from ``_sum_radius``'s fresh kept-dim radius: +inf where m is not
    finite, written in place when the radius already has m's radius dtype."""
    if not keepdim:
        rad = rad.reshape(m.shape)
    if rad.dtype == rounding.rad_dtype(m.dtype) and rad.shape == m.shape and rad.is_contiguous():
        return result_in_place(m, rad)
    return result(m, _finite_only(m, rad))


@rule(aten.sum.default, aten.sum.dim_IntList)
def sum_(func, x, *args, **kwargs):
    """sum: rad >= theta (fl(sum r) + g fl(sum|m|)) [+ u_s|m| + eta_s/2 for float16/bfloat16], g = gamma_(n-1) of the
    accumulation dtype (float32 for reduced dtypes); see the module docstring. A bool ball (a comparison) sums to an
    exact integer when every element is decided (``nanmean`` counts ``~isnan(x)`` so); otherwise the count is not
    decided and ``UndecidedComparisonError`` is raised (an integer cannot hold a hull)."""
    if isinstance(x, BallTensor) and x.dtype == torch.bool:
        from ballgrad.errors import UndecidedComparisonError

        if bool(x.rad.any()):
            raise UndecidedComparisonError(f"{func}: summing undecided comparison results; the count is not decided")
        return func(x.mid, *args, **kwargs)
    _check_float_ball(func, x)
    m = func(x.mid, *args, **kwargs)
    dim = args[0] if args else kwargs.get("dim")
    keepdim = args[1] if len(args) > 1 else kwargs.get("keepdim", False)
    if func is aten.sum.default:
        dim, keepdim = None, False
    fast = _sum_fused(x, m, dim)
    if fast is not None:
        return BallTensor(m, fast)
    return _sum_result(m, _sum_radius(x, m, dim), keepdim)


def _sum_fused(x, m: torch.Tensor, dim, mean: bool = False) -> torch.Tensor | None:
    """``_sum_radius`` and ``_sum_result`` (``mean``: ``mean``'s radius and result) as ``fused.sum_radius`` (one
    compiled pass, the sums in index order) where the reduced dims are adjacent, the ball is a dense float32/float64
    one with its radius in its own dtype and the radius sums run in that dtype; None otherwise."""
    if not (isinstance(x, BallTensor) and x.dtype in (torch.float32, torch.float64) and m.dtype == x.dtype
            and x.rad.dtype == x.dtype and x.rad.shape == x.shape and x.mid.is_contiguous() and x.rad.is_contiguous()
            and m.is_contiguous() and x.device.type == "cpu" and x.dim() > 0 and fused._numba() is not None):
        return None
    dims = _dims(x.dim(), dim)
    if dims != list(range(dims[0], dims[-1] + 1)):
        return None
    n = _count(x.shape, dims)
    if n == 0 or work_dtype(x.dtype, n - 1) != x.dtype:
        return None
    outer, inner = math.prod(x.shape[:dims[0]]), math.prod(x.shape[dims[-1] + 1:])
    return fused.sum_radius(x.mid.detach(), x.rad, outer, n, inner, *_sum_fused_constants(n, x.dtype, mean), m)


@functools.lru_cache(maxsize=1024)
def _sum_fused_constants(n: int, dtype: torch.dtype, mean: bool) -> tuple[float, ...]:
    """(C_r, C_m, C_o, A0, phi, a) for n float32/float64 terms summed in their own dtype (cached on cheap keys).
    sum (``_sum_radius``): C_r >= theta_(n-1), C_m >= g theta_(n-1) with g = gamma_(n-1), C_o = A0 = 0, inflate's
    constants for 3 operations; mean (``mean``): C_r >= theta/n, C_m >= g theta/n, C_o >= C and A0 >= max(A,
    realmin) of ``_mean_constants``, inflate's constants for 7 operations."""
    u = rounding.unit_roundoff_exact(dtype)
    th, g = theta(max(n - 1, 0), u), growth(n - 1, u)
    if not mean:
        return _up(th, dtype), _up(g * th, dtype), 0.0, 0.0, *rounding.inflation_constants(3, dtype)
    c_m, a_m = _mean_constants(n, dtype)
    return (_up(th / n, dtype), _up(g * th / n, dtype), _up(c_m, dtype),
            max(_up(a_m, dtype), float(torch.finfo(dtype).smallest_normal)), *rounding.inflation_constants(7, dtype))


def _mean_constants(n: int, out_dtype: torch.dtype) -> tuple[Fraction, Fraction]:
    """(C, A): |m - s/n| <= C|m| + A for the division of the computed sum s by n (see ``mean``)."""
    acc = torch.float32 if out_dtype in rounding.REDUCED_DTYPES else out_dtype
    u = rounding.unit_roundoff_exact(acc)
    eta = Fraction(rounding.eta(acc))
    # The kernel's divisor fl(n) is n itself below 2^p, otherwise within a relative 2u of it (any faithful cast).
    rho = u if n <= 2 ** rounding._PRECISION[acc] else 2 * u + u * (1 + 2 * u)
    if rho >= Fraction(1, 2):
        raise ValueError(f"mean over {n} elements: the divisor cannot be bounded in {acc}")
    c_q = u + rho * (1 + u) / (1 - rho)
    a_q = eta / 2 / (1 - rho)
    if out_dtype not in rounding.REDUCED_DTYPES:
        return c_q, a_q
    u_s, eta_s = rounding.unit_roundoff_exact(out_dtype), Fraction(rounding.eta(out_dtype))
    return c_q * (1 + u_s) + u_s, a_q + eta_s / 2 + c_q * eta_s / 2


@rule(aten.mean.default, aten.mean.dim)
def mean(func, x, *args, **kwargs):
    """mean = sum / n. PyTorch's CPU mean is ``sum_out(...).div_(n)`` (ReduceOps.cpp; float16/bfloat16: sum and divide
    in float32, then round), measured bit-identical to sum / n. We bound any of s/fl(n), s * fl(1/fl(n)) or
    s * fl(1/n): the divisor's reciprocal c~ satisfies |c~ - 1/n| <= rho/n with rho = |n - fl(n)|/fl(n) + u n/fl(n)
    (rho = u for n <= 2^24 in float32; 2u + u(1+2u) beyond, for any faithful cast of n), and m = RN(s c~) gives
    |m - s/n| <= u|m| + eta/2 + |s| rho/n <= (u + rho(1+u)/(1-rho)) |m| + (eta/2)/(1-rho)
    (|s|/n <= |s c~|/(1-rho) and |s c~| <= (1+u)|m| + eta/2). Reduced dtypes add the final rounding
    u_s|m| + eta_s/2 and |q| <= (1+u_s)|m| + eta_s/2 for the float32 quotient q. The sum's own error is the sum bound
    divided by n: rad >= (theta/n) fl(sum r) + (g theta/n) fl(sum|m|) + C|m| + A.
    """
    _check_float_ball(func, x)
    m = func(x.mid, *args, **kwargs)
    dim = args[0] if args else kwargs.get("dim")
    keepdim = args[1] if len(args) > 1 else kwargs.get("keepdim", False)
    if func is aten.mean.default:
        dim, keepdim = None, False
    dims = _dims(x.dim(), dim)
    n = _count(x.shape, dims)
    if n == 0:  # 0/0: PyTorch returns NaN, nothing is known
        return result(m, torch.full(m.shape, math.inf, dtype=rounding.rad_dtype(m.dtype)))
    fast = _sum_fused(x, m, dim, mean=True)
    if fast is not None:
        return BallTensor(m, fast)
    s_r, s_m, th, g = _sum_parts(x, m.dtype, dims, n)
    wd = s_r.dtype
    c_m, a_m = _mean_constants(n, m.dtype)
    abs_m = torch.abs(m).reshape(s_r.shape).to(wd)
    c = s_r * _up(th / n, wd) + s_m * _up(g * th / n, wd) + abs_m * _up(c_m, wd) + max(
        _up(a_m, wd), float(torch.finfo(wd).smallest_normal))
    rad = inflate(c, 7)
    if not keepdim:
        rad = rad.reshape(m.shape)
    return result(m, _finite_only(m, rad))


# ----------------------------------------------------------------------------------------------------------------------
# prod


@rule(aten.prod.default, aten.prod.dim_int)
def prod(func, x, *args, **kwargs):
    """prod: the product of the balls by a balanced tree of ball multiplications (the ``mul`` rule, in float64:
    every step encloses the exact product of its factors, underflow included), re-centred on PyTorch's midpoint."""
    _check_float_ball(func, x)
    m = func(x.mid, *args, **kwargs)
    if func is aten.prod.default:
        dim, keepdim = None, False
    else:
        dim = args[0] if args else kwargs["dim"]
        keepdim = args[1] if len(args) > 1 else kwargs.get("keepdim", False)
    b = _ball64(x, m.dtype)
    if dim is None:
        mid, rad = b.mid.reshape(-1), b.rad.reshape(-1)
    else:
        d = dim % max(x.dim(), 1)
        mid = b.mid.movedim(d, -1) if x.dim() else b.mid.reshape(1)
        rad = b.rad.movedim(d, -1) if x.dim() else b.rad.reshape(1)
    if mid.shape[-1] == 0:
        enclosure = BallTensor(torch.ones(mid.shape[:-1], dtype=_F64), torch.zeros(mid.shape[:-1], dtype=_F64))
    else:
        while mid.shape[-1] > 1:
            half = mid.shape[-1] // 2
            left = BallTensor(mid[..., :half], rad[..., :half])
            right = BallTensor(mid[..., half:2 * half], rad[..., half:2 * half])
            pair = arith.mul(aten.mul.Tensor, left, right)
            mid = torch.cat([pair.mid, mid[..., 2 * half:]], dim=-1)
            rad = torch.cat([pair.rad, rad[..., 2 * half:]], dim=-1)
        enclosure = BallTensor(mid[..., 0], rad[..., 0])
    if keepdim and dim is not None and x.dim():
        enclosure = BallTensor(enclosure.mid.unsqueeze(dim % x.dim()), enclosure.rad.unsqueeze(dim % x.dim()))
    out = recentre(m, BallTensor(enclosure.mid.reshape(m.shape), enclosure.rad.reshape(m.shape)))
    return result(m, _finite_only(m, out.rad))


# ----------------------------------------------------------------------------------------------------------------------
# max / min


def _extreme_rad(func, x, values, args, kwargs):
    """|F(x) - F(m)| for F = max or min over the same dims: F is monotone in every element, so for x in the balls
    F(lo) <= F(x) <= F(hi) with lo/hi the end points rounded outward, and F(m) = values exactly (no rounding):
    rad = max(F(hi) - values, values - F(lo)), both differences rounded up (float64)."""
    lo, hi = _outward_ends(x)
    f_hi, f_lo = func(hi, *args, **kwargs), func(lo, *args, **kwargs)
    if isinstance(f_hi, tuple):
        f_hi, f_lo = f_hi[0], f_lo[0]
    return _selection_rad(values, f_lo, f_hi), lo, hi


@rule(aten.amax.default, aten.amin.default, aten.max.default, aten.min.default)
def extreme(func, x, *args, **kwargs):
    """max/min (all elements or over dims): exact on the midpoints; the radius from the end points
    (``_extreme_rad``), at most max r (max is 1-Lipschitz in the max-norm) and smaller when the winner is clear."""
    _check_float_ball(func, x)
    m = func(x.mid, *args, **kwargs)
    rad, _, _ = _extreme_rad(func, x, m, args, kwargs)
    return result(m, _finite_only(m, rad))


@rule(aten.max.dim, aten.min.dim)
def extreme_dim(func, x, dim, keepdim=False):
    """(values, indices) over one dim: values as ``extreme``; indices are PyTorch's (a plain integer tensor). Where
    another element's ball reaches the winner's (the arg-max is not the same for every point of the balls) a
    ``kink`` event is recorded: gradients routed through these indices are one of several one-sided values."""
    _check_float_ball(func, x)
    values, indices = func(x.mid, dim, keepdim)
    rad, lo, hi = _extreme_rad(func, x, values, (dim, keepdim), {})
    if diagnostics.is_recording() and x.numel() and x.dim():
        idx = indices if keepdim else indices.unsqueeze(dim)
        if func is aten.max.dim:
            rivals = hi >= torch.gather(lo, dim, idx)
        else:
            rivals = lo <= torch.gather(hi, dim, idx)
        undecided = rivals.sum(dim) > 1
        diagnostics.emit_mask("kink", current_op(), undecided, "arg-max/arg-min not decided (overlapping balls)")
    return result(values, _finite_only(values, rad)), indices


# ----------------------------------------------------------------------------------------------------------------------
# var / std


def _var_enclosure(x, out_dtype, dims, correction) -> BallTensor:
    """An enclosure (float64, keepdim shape) of var(x) = sum (x_i - mean x)^2 / (n - c) over the balls.

    Write x = m + e, |e_i| <= r_i, d_i = m_i - mean m, f_i = e_i - mean e. Then sum d_i = 0, so
    var(x) - var(m) = (2 sum d_i e_i + sum f_i^2)/(n - c), with sum f_i^2 = sum e_i^2 - n (mean e)^2 <= sum r_i^2:
    |var(x) - var(m)| <= P = (2 sum |d_i| r_i + sum r_i^2)/(n - c)  (no loss from x appearing twice).
    var(m) is enclosed by composing ball rules on the point midpoints (mean, sub, mul, sum, div), which also gives
    |d_i| <= |D_i.mid| + D_i.rad; P is bounded above with ``inflate`` and ``_sum_up``.
    """
    n = _count(x.shape, dims)
    dof = Fraction(n) - Fraction(float(correction))
    b = _ball64(x, out_dtype)
    shape = [1 if i in dims else s for i, s in enumerate(x.shape)]
    if dof <= 0 or n == 0:
        return BallTensor(torch.full(shape, math.nan, dtype=_F64), torch.full(shape, math.inf, dtype=_F64))
    point = _point64(b.mid)
    mu = torch.mean(point, dim=dims, keepdim=True)
    d = point - mu
    q = torch.sum(d * d, dim=dims, keepdim=True)
    dof_down = rounding.round_down_float(dof)
    var_m = q / dof_down if Fraction(dof_down) == dof else None
    if var_m is None:  # n - c not a float64 (n > 2^53): enclose 1/(n - c) too
        inv = BallTensor(torch.tensor(float(1 / dof), dtype=_F64), torch.tensor(
            rounding.round_up_float(abs(1 / dof - Fraction(float(1 / dof)))), dtype=_F64))
        var_m = q * inv
    d_up = rounding.add_up(torch.abs(d.mid), d.rad)
    r = b.rad
    per_elem = inflate(d_up * 2.0 * r + r * r, 4)
    p = rounding.div_up(_sum_up(per_elem, dims, True, n), dof_down)
    return BallTensor(var_m.mid, rounding.add_up(var_m.rad, p))


def _var_args(x, args, kwargs):
    dim = args[0] if args else kwargs.get("dim")
    correction = kwargs.get("correction")
    keepdim = kwargs.get("keepdim", False)
    if correction is None:
        correction = 1
    return _dims(x.dim(), dim), correction, keepdim


def _sqrt_enclosure(v: BallTensor) -> BallTensor:
    """sqrt of a ball known to contain only values >= 0 (a variance): sqrt is increasing, so the result lies in
    [sqrt(max(0, lo)), sqrt(hi)]; each end point is enclosed by the ``sqrt`` rule on a point ball."""
    lo = torch.clamp_min(v.lower(), 0)
    hi = v.upper()
    lo_ball = torch.sqrt(_point64(lo))
    hi_ball = torch.sqrt(_point64(hi))
    return _from_bounds(torch.clamp_min(lo_ball.lower(), 0), hi_ball.upper())


def _from_bounds(lo: torch.Tensor, hi: torch.Tensor) -> BallTensor:
    """A float64 ball containing [lo, hi] (NaN end points, from NaN inputs, give an infinite radius)."""
    mid = lo * 0.5 + hi * 0.5
    rad = torch.maximum(rounding.sub_up(mid, lo), rounding.sub_up(hi, mid))
    rad = torch.where((lo == hi) & (mid == lo), torch.zeros_like(rad), rad)  # a point: exact
    return BallTensor(mid, rounding.clean_rad(rad))


def _finish(m: torch.Tensor, enclosure: BallTensor, keepdim: bool) -> BallTensor:
    if not keepdim:
        enclosure = BallTensor(enclosure.mid.reshape(m.shape), enclosure.rad.reshape(m.shape))
    out = recentre(m, enclosure)
    return result(m, _finite_only(m, out.rad))


@rule(aten.var.correction)
def var(func, x, *args, **kwargs):
    """var: ``_var_enclosure``, re-centred on PyTorch's midpoint."""
    _check_float_ball(func, x)
    m = func(x.mid, *args, **kwargs)
    dims, correction, keepdim = _var_args(x, args, kwargs)
    return _finish(m, _var_enclosure(x, m.dtype, dims, correction), keepdim)


@rule(aten.std.correction)
def std(func, x, *args, **kwargs):
    """std = sqrt(var): the variance enclosure clipped at 0 (var >= 0) through ``_sqrt_enclosure``, re-centred."""
    _check_float_ball(func, x)
    m = func(x.mid, *args, **kwargs)
    dims, correction, keepdim = _var_args(x, args, kwargs)
    return _finish(m, _sqrt_enclosure(_var_enclosure(x, m.dtype, dims, correction)), keepdim)


def _mean_enclosure(x, out_dtype, dims) -> BallTensor:
    b = _ball64(x, out_dtype)
    return torch.mean(b, dim=dims, keepdim=True)


@rule(aten.var_mean.correction, aten.std_mean.correction)
def var_mean(func, x, *args, **kwargs):
    """(var or std, mean): each enclosure as in ``var``/``std``/``mean``, re-centred on the fused kernel's outputs."""
    _check_float_ball(func, x)
    m_v, m_mean = func(x.mid, *args, **kwargs)
    dims, correction, keepdim = _var_args(x, args, kwargs)
    enclosure = _var_enclosure(x, m_v.dtype, dims, correction)
    if func is aten.std_mean.correction:
        enclosure = _sqrt_enclosure(enclosure)
    return _finish(m_v, enclosure, keepdim), _finish(m_mean, _mean_enclosure(x, m_mean.dtype, dims), keepdim)


# ----------------------------------------------------------------------------------------------------------------------
# norms


@rule(aten.linalg_vector_norm.default)
def vector_norm(func, x, ord=2, dim=None, keepdim=False, *, dtype=None):
    """||x||_p for p in {1, 2, inf, -inf}: the norm is 1-Lipschitz in its own norm, | ||x|| - ||m|| | <= ||x - m||
    <= ||r|| (p = 1, 2; -inf is min|x_i|, 1-Lipschitz in the max-norm), so the enclosure is an enclosure of ||m||
    (ball rules on the point midpoints: abs + sum, mul + sum + sqrt, or the exact max/min of |m|) widened by an upper
    bound of ||r||_p, re-centred on PyTorch's midpoint. For p = +-inf the end-point form of ``_extreme_rad`` applied
    to |x_i| in [max(0, |m_i| - r_i), |m_i| + r_i] is used instead (tighter). Other orders go through the audited
    decomposition in ``decompositions.py``."""
    _check_float_ball(func, x)
    m = func(x.mid, ord, dim, keepdim, dtype=dtype)
    p = float(ord)
    if p not in (1.0, 2.0, math.inf, -math.inf):  # other orders: the audited decomposition (sum |x|^p)^(1/p)
        from ballgrad.ops import decompositions

        return decompositions._evaluate(func, x, ord, dim, keepdim, dtype=dtype)
    dims = _dims(x.dim(), dim)
    n = _count(x.shape, dims)
    b = _ball64(x, m.dtype)
    if x.dim() == 0:
        dims = []
    if math.isinf(p):
        abs_m = torch.abs(b.mid)
        exact = b.rad == 0  # point elements: their end points are exact (no outward bump)
        hi = torch.where(exact, abs_m, rounding.add_up(abs_m, b.rad))
        lo = torch.where(exact, abs_m, torch.clamp_min(rounding.sub_down(abs_m, b.rad), 0))
        reduce = torch.amax if p > 0 else torch.amin
        return _finish(m, _from_bounds(reduce(lo, dim=dims, keepdim=True), reduce(hi, dim=dims, keepdim=True)), keepdim)
    point = _point64(b.mid)
    if p == 1.0:
        core = _reduce_ball_sum(torch.abs(point), dims)
        widen = _sum_up(b.rad, dims, True, n)
    else:
        core = _sqrt_enclosure(_reduce_ball_sum(point * point, dims))
        r2 = inflate(b.rad * b.rad, 1)
        widen = _sqrt_enclosure(BallTensor(_sum_up(r2, dims, True, n), torch.zeros(core.shape, dtype=_F64))).upper()
    enclosure = BallTensor(core.mid, rounding.add_up(core.rad, widen))
    return _finish(m, enclosure, keepdim)


def _reduce_ball_sum(b: BallTensor, dims) -> BallTensor:
    """sum over ``dims`` with keepdim (the ``sum`` rule); a 0-d ball is its own sum."""
    if b.dim() == 0:
        return b
    return torch.sum(b, dim=dims, keepdim=True)



# ----------------------------------------------------------------------------------------------------------------------
# Scans: cumsum, cumprod, logcumsumexp, cummax, cummin


def _scan_dim(x, dim) -> int:
    return dim % x.dim() if x.dim() else 0


@rule(aten.cumsum.default)
def cumsum(func, x, dim, *, dtype=None):
    """Prefix sums. Output k along ``dim`` is a sum of at most n terms (n = the dim's size), computed in any order,
    sequentially in the dtype or in a wider accumulator rounded once (PyTorch's CPU scan accumulates in acc_type):
    |fl - exact| <= g sum_(i<=k) |x_i| with g = gamma_(n-1) of the accumulation dtype, as for ``sum`` (module
    docstring). The radius prefix sums fl(cumsum r), fl(cumsum |m|) are round-to-nearest sums of non-negative terms,
    so exact <= theta_(n-1) fl: rad >= theta (fl(cumsum r) + g fl(cumsum |m|)) [+ u_s|m| + eta_s for float16/bfloat16]."""
    _check_float_ball(func, x)
    m = func(x.mid, dim, dtype=dtype)
    if x.dim() == 0:
        mt, rt = operand(x, m.dtype)
        return result(m, rt.expand(m.shape))
    d = _scan_dim(x, dim)
    n = x.shape[d]
    mt, rt = operand(x, m.dtype)
    rt = rt.expand(mt.shape)
    acc = torch.float32 if m.dtype in rounding.REDUCED_DTYPES else m.dtype
    g = growth(max(n - 1, 0), rounding.unit_roundoff_exact(acc))
    wd = work_dtype(rt.dtype if rt.dtype in (torch.float32, _F64) else torch.float32, max(n - 1, 0))
    th = theta(max(n - 1, 0), rounding.unit_roundoff_exact(wd))
    s_r = torch.cumsum(rt.to(wd), d)
    s_m = torch.cumsum(torch.abs(mt).to(wd), d)
    c = s_r * _up(th, wd) + s_m * _up(g * th, wd)
    ops = 3
    if m.dtype in rounding.REDUCED_DTYPES:
        c = c + torch.abs(m).to(wd) * rounding.unit_roundoff(m.dtype) + max(
            rounding.eta(m.dtype), float(torch.finfo(wd).smallest_normal))
        ops = 6
    return result(m, _finite_only(m, inflate(c, ops)))


def _scan_enclosure(b: BallTensor, d: int, step) -> BallTensor:
    """Sequential ball scan along dim d: out_0 = b_0, out_k = step(out_(k-1), b_k), each step a ball rule (so each
    prefix encloses the exact prefix value)."""
    if b.shape[d] == 0:
        return b
    parts = []
    cur = b.select(d, 0)
    parts.append(cur)
    for k in range(1, b.shape[d]):
        cur = step(cur, b.select(d, k))
        parts.append(cur)
    return torch.stack(parts, d)


@rule(aten.cumprod.default)
def cumprod(func, x, dim, *, dtype=None):
    """Prefix products: the sequential product of the float64 balls by the ``mul`` rule (every step encloses the
    exact product of its factors), re-centred on PyTorch's midpoint."""
    _check_float_ball(func, x)
    m = func(x.mid, dim, dtype=dtype)
    b = _ball64(x, m.dtype)
    if x.dim() == 0:
        return result(m, _finite_only(m, recentre(m, b).rad))
    enclosure = _scan_enclosure(b, _scan_dim(x, dim), torch.mul)
    return result(m, _finite_only(m, recentre(m, enclosure).rad))


@rule(aten.logcumsumexp.default)
def logcumsumexp(func, x, dim):
    """log sum_(i<=k) exp(x_i): the sequential scan s_k = logaddexp(s_(k-1), x_k) on float64 balls (the ``logaddexp``
    rule, lemma A: each step encloses the exact value), re-centred on PyTorch's midpoint."""
    _check_float_ball(func, x)
    m = func(x.mid, dim)
    b = _ball64(x, m.dtype)
    if x.dim() == 0:
        return result(m, _finite_only(m, recentre(m, b).rad))
    enclosure = _scan_enclosure(b, _scan_dim(x, dim), torch.logaddexp)
    return result(m, _finite_only(m, recentre(m, enclosure).rad))


def _outward_ends(x):
    """(lo, hi) float64 with lo <= every real of the ball <= hi: -inf/+inf where nothing is known."""
    m64 = x.mid.detach().to(_F64)
    r64 = x.rad.to(_F64)
    unknown = ~torch.isfinite(m64) | torch.isinf(r64)
    point = r64 == 0  # exact end points: no outward bump (so exact ties stay decided)
    lo = torch.where(point, m64, rounding.sub_down(m64, r64))
    hi = torch.where(point, m64, rounding.add_up(m64, r64))
    lo = torch.where(unknown, torch.full_like(m64, -math.inf), lo)
    hi = torch.where(unknown, torch.full_like(m64, math.inf), hi)
    return lo, hi


def _selection_rad(values, low, high):
    """max(high - v, v - low) rounded up (float64): the radius of a selected value v known to lie in [low, high]."""
    v64 = values.to(_F64)
    above = torch.where(high == v64, torch.zeros_like(v64), rounding.sub_up(high, v64))
    below = torch.where(low == v64, torch.zeros_like(v64), rounding.sub_up(v64, low))
    return rounding.clean_rad(torch.maximum(above, below))


@rule(aten.cummax.default, aten.cummin.default)
def cummax_cummin(func, x, dim):
    """(values, indices). values_k = max (min) of x_0..x_k is non-decreasing in every element, so over the balls it
    lies in [F(lo), F(hi)] with F the same scan of the outward end points (exact in float64: max/min do not round):
    rad = max(F(hi) - v, v - F(lo)). Indices are PyTorch's, from the midpoints; a ``kink`` event counts the outputs
    whose arg-max is not decided (another element's ball reaches the winner's)."""
    _check_float_ball(func, x)
    values, indices = func(x.mid, dim)
    lo, hi = _outward_ends(x)
    f_lo, f_hi = func(lo, dim)[0], func(hi, dim)[0]
    rad = _selection_rad(values, f_lo, f_hi)
    if diagnostics.is_recording():
        diagnostics.emit_mask("kink", current_op(), f_lo != f_hi, "running arg-max/arg-min not decided")
    return result(values, _finite_only(values, rad)), indices


# ----------------------------------------------------------------------------------------------------------------------
# Order statistics: sort, topk, kthvalue, median, aminmax
#
# Lemma S: the k-th smallest element of a vector, s_k(x), is non-decreasing in every element and 1-Lipschitz in the
# max norm. So for x in the balls, s_k(lo) <= s_k(x) <= s_k(hi) with lo/hi the outward end points, and the value
# PyTorch returns at rank k (an exact selection of a midpoint) gets rad = max(s_k(hi) - v, v - s_k(lo)), computed by
# sorting lo and hi the same way (exact: sorting does not round). Indices are PyTorch's, from the midpoints; where
# neighbouring balls overlap the ordering is undecided: an ``undecided`` event (the values stay enclosed).


def _emit_undecided_order(lo_sorted, hi_sorted, d):
    if diagnostics.is_recording() and lo_sorted.numel() and lo_sorted.shape[d] > 1:
        n = lo_sorted.shape[d]
        overlap = lo_sorted.narrow(d, 1, n - 1) <= hi_sorted.narrow(d, 0, n - 1)
        diagnostics.emit_mask("undecided", current_op(), overlap, "ordering of overlapping balls not decided")


@rule(aten.sort.default, aten.sort.stable)
def sort(func, x, *args, **kwargs):
    """(values, indices) by lemma S."""
    _check_float_ball(func, x)
    values, indices = func(x.mid, *args, **kwargs)
    lo, hi = _outward_ends(x)
    lo_s, hi_s = func(lo, *args, **kwargs)[0], func(hi, *args, **kwargs)[0]
    if x.dim():
        d = kwargs.get("dim", args[0] if (func is aten.sort.default and args) else (args[1] if len(args) > 1 else -1))
        _emit_undecided_order(torch.minimum(lo_s, hi_s), torch.maximum(lo_s, hi_s), d % x.dim())
    # descending sorts put the larger end first at each rank; the rank's interval is [min, max] of the two sorts
    rad = _selection_rad(values, torch.minimum(lo_s, hi_s), torch.maximum(lo_s, hi_s))
    return result(values, _finite_only(values, rad)), indices


@rule(aten.topk.default)
def topk(func, x, k, dim=-1, largest=True, sorted=True):
    """(values, indices): the j-th returned value has some rank among the midpoints; lemma S at that rank. With
    sorted=True rank j is position j of the sorted end points; otherwise the returned values are ranked by sorting
    them would need tie handling, so every returned value gets the hull of the k ranks' intervals instead."""
    _check_float_ball(func, x)
    values, indices = func(x.mid, k, dim, largest, sorted)
    lo, hi = _outward_ends(x)
    lo_k = func(lo, k, dim, largest, True)[0]
    hi_k = func(hi, k, dim, largest, True)[0]
    low, high = torch.minimum(lo_k, hi_k), torch.maximum(lo_k, hi_k)
    if not sorted and values.numel():
        # hull over all ranks among the k: a valid (wider) interval for every returned value
        d = dim % max(x.dim(), 1) if x.dim() else 0
        low = torch.amin(low, dim=d, keepdim=True).expand(low.shape) if x.dim() else low
        high = torch.amax(high, dim=d, keepdim=True).expand(high.shape) if x.dim() else high
    rad = _selection_rad(values, low, high)
    return result(values, _finite_only(values, rad)), indices


@rule(aten.kthvalue.default)
def kthvalue(func, x, k, dim=-1, keepdim=False):
    """(values, indices): the k-th smallest, lemma S."""
    _check_float_ball(func, x)
    values, indices = func(x.mid, k, dim, keepdim)
    lo, hi = _outward_ends(x)
    rad = _selection_rad(values, func(lo, k, dim, keepdim)[0], func(hi, k, dim, keepdim)[0])
    return result(values, _finite_only(values, rad)), indices


@rule(aten.median.default, aten.nanmedian.default)
def median_all(func, x):
    """The lower median of all elements (a rank statistic, lemma S). nanmedian skips NaN midpoints, which as balls
    mean "nothing known": a NaN anywhere gives +inf."""
    _check_float_ball(func, x)
    m = func(x.mid)
    lo, hi = _outward_ends(x)
    rad = _selection_rad(m, aten.median.default(lo), aten.median.default(hi))
    if bool(torch.isnan(x.mid).any()):
        rad = torch.full_like(rad, math.inf)
    return result(m, _finite_only(m, rad))


@rule(aten.median.dim, aten.nanmedian.dim)
def median_dim(func, x, dim, keepdim=False):
    """(values, indices) of the lower median over ``dim``: lemma S; nanmedian with a NaN in a row gives +inf there."""
    _check_float_ball(func, x)
    values, indices = func(x.mid, dim, keepdim)
    lo, hi = _outward_ends(x)
    rad = _selection_rad(values, aten.median.dim(lo, dim, keepdim)[0], aten.median.dim(hi, dim, keepdim)[0])
    if x.dim():
        has_nan = torch.isnan(x.mid).any(dim=dim, keepdim=keepdim)
        rad = torch.where(has_nan, torch.full_like(rad, math.inf), rad)
    return result(values, _finite_only(values, rad)), indices


@rule(aten.aminmax.default)
def aminmax(func, x, *, dim=None, keepdim=False):
    """(min, max): each as ``extreme`` (monotone in every element, end-point form)."""
    _check_float_ball(func, x)
    mn, mx = func(x.mid, dim=dim, keepdim=keepdim)
    lo, hi = _outward_ends(x)
    lo_mn, lo_mx = func(lo, dim=dim, keepdim=keepdim)
    hi_mn, hi_mx = func(hi, dim=dim, keepdim=keepdim)
    return (result(mn, _finite_only(mn, _selection_rad(mn, lo_mn, hi_mn))),
            result(mx, _finite_only(mx, _selection_rad(mx, lo_mx, hi_mx))))


@rule(aten.nansum.default)
def nansum(func, x, dim=None, keepdim=False, *, dtype=None):
    """nansum treats NaN as a missing value; a NaN midpoint is a ball that denotes every real, so any NaN among the
    reduced elements gives +inf. Otherwise it is ``sum`` (same bound, PyTorch's nansum midpoint)."""
    _check_float_ball(func, x)
    m = func(x.mid, dim, keepdim, dtype=dtype)
    return _sum_result(m, _sum_radius(x, m, dim), keepdim)  # NaN midpoints make the |m| sum NaN, hence +inf


@rule(aten.count_nonzero.default, aten.count_nonzero.dim_IntList)
def count_nonzero(func, x, *args, **kwargs):
    """The number of elements != 0: an integer, exact when every element's decision (x != 0) is the same over its
    ball (decided as the comparison rules do); otherwise ``UndecidedComparisonError``."""
    from ballgrad.errors import UndecidedComparisonError

    nonzero = torch.ne(x, 0)
    if bool(nonzero.rad.any()):
        raise UndecidedComparisonError(f"{func}: a ball contains 0 and non-zero values; the count is not decided")
    return func(x.mid, *args, **kwargs)


# ----------------------------------------------------------------------------------------------------------------------
# Scatter sums: index_add, scatter_add, index_put / put with accumulate, scatter_reduce / index_reduce
#
# Lemma Q: an output element j of a scatter sum is x_j (when self is included) plus the c_j source terms sent to it,
# added in some order (sequentially or atomically), each source term first scaled by alpha when alpha != 1: at most
# c_j + 1 roundings per term, so |fl - exact| <= g (|x_j| + sum |alpha s_i|) + c_j eta with g = growth(c + 1, u),
# c = the largest count (u the op roundoff of the dtype, covering float16/bfloat16 opmath). Writing T(a, b) for the same
# op applied to non-negative tensors a (for self) and b (for the source) in float64, T(r_x, |alpha| r_s) and
# T(|m_x|, |alpha| |m_s|) are round-to-nearest sums of at most c + 1 non-negative terms, so exact <= theta_c T. Hence
# rad >= theta (T(r_x, |alpha| r_s) + g T(|m_x|, |alpha| |m_s|)) + c eta (``inflate``). The counts come from
# T(0, 1) (exact small integers). alpha must be exact in the dtype.

_SCATTER_SUMS = {
    # op: (source position, accumulate position or None)
    aten.index_add.default: (3, None),
    aten.scatter_add.default: (3, None),
    aten.index_put.default: (2, 3),
    aten.put.default: (2, 3),
    aten._unsafe_masked_index_put_accumulate.default: (3, None),
}


def _scatter_call(func, args, kwargs, self_t, src_t, pos):
    call = list(args)
    call[0], call[pos] = self_t, src_t
    return func(*call, **kwargs)


def _scatter_sum_rad(func, m, args, kwargs, pos, alpha=1.0):
    x, src = args[0], args[pos]
    mx, rx = operand(x, m.dtype)
    ms, rs = operand(src, m.dtype)
    rx, rs = rx.expand(mx.shape).to(_F64), rs.expand(ms.shape).to(_F64)
    a = abs(float(alpha))
    zeros, ones = torch.zeros(mx.shape, dtype=_F64), torch.ones(ms.shape, dtype=_F64)
    counts = _scatter_call(func, args, kwargs, zeros, ones, pos)
    c = int(counts.max()) if counts.numel() else 0
    u = Fraction(rounding.op_roundoff(m.dtype))
    g = growth(c + 1, u)
    th = theta(c + 1, rounding.unit_roundoff_exact(_F64))
    big_r = _scatter_call(func, args, kwargs, rx, rs * a, pos)
    big_s = _scatter_call(func, args, kwargs, torch.abs(mx).to(_F64), torch.abs(ms).to(_F64) * a, pos)
    eta_term = rounding.absolute_term((c + 1) * Fraction(rounding.op_underflow(m.dtype)), _F64)
    rad = inflate(big_r * _up(th, _F64) + big_s * _up(g * th, _F64) + eta_term, 6)
    return rad, counts


@rule(*_SCATTER_SUMS)
def scatter_sum(func, *args, **kwargs):
    """index_add (alpha exact in the dtype), scatter_add, index_put/put with accumulate=True,
    _unsafe_masked_index_put_accumulate: lemma Q. index_put/put without accumulation are exact element moves."""
    pos, acc_pos = _SCATTER_SUMS[func]
    if acc_pos is not None and not (args[acc_pos] if len(args) > acc_pos else kwargs.get("accumulate", False)):
        from ballgrad.ops import shape

        return shape.structural(func, *args, **kwargs)
    from ballgrad.ops.shape import _mid_arg

    m = func(*_mid_arg(list(args)), **kwargs)
    alpha = kwargs.get("alpha", 1)
    if alpha != 1:
        _, r_alpha = operand(alpha, m.dtype)
        if float(r_alpha) != 0:
            raise UnsupportedOpError(func, f"alpha={alpha!r} is not exact in {m.dtype}")
    plain_kwargs = {k: v for k, v in kwargs.items() if k != "alpha"}  # T scales by |alpha| itself
    rad, _ = _scatter_sum_rad(func, m, [a for a in _mid_or_ball(args)], plain_kwargs, pos, alpha)
    return result(m, _finite_only(m, rad))


def _mid_or_ball(args):
    """Arguments with bool/int balls replaced by their (decided) midpoints; floating balls kept."""
    from ballgrad.ops.shape import _exact_index

    return [_exact_index(a) if isinstance(a, BallTensor) and not a.is_floating_point() else a for a in args]


_SCATTER_REDUCE = {aten.scatter_reduce.two: 3, aten.index_reduce.default: 3}


@rule(*_SCATTER_REDUCE)
def scatter_reduce(func, x, dim, index, src, reduce, *, include_self=True):
    """scatter_reduce / index_reduce. sum: lemma Q. mean: the sum's bound divided by the count, plus the division's
    rounding u|m| + eta. amax/amin: monotone in every element, so between the same reduction of the outward end points
    (exact selections). prod is refused."""
    from ballgrad.ops.shape import _exact_index

    index = _exact_index(index)
    m = func(x.mid if isinstance(x, BallTensor) else x, dim, index, src.mid if isinstance(src, BallTensor) else src,
             reduce, include_self=include_self)
    if reduce in ("amax", "amin"):
        bx, bs = _as_ball(x), _as_ball(src)
        lo_x, hi_x = _outward_ends(bx)
        lo_s, hi_s = _outward_ends(bs)
        f_lo = func(lo_x, dim, index, lo_s, reduce, include_self=include_self)
        f_hi = func(hi_x, dim, index, hi_s, reduce, include_self=include_self)
        return result(m, _finite_only(m, _selection_rad(m, f_lo, f_hi)))
    if reduce not in ("sum", "mean"):
        raise UnsupportedOpError(func, f"reduce={reduce!r}: only sum, mean, amax and amin have rules")
    # the sum's bound for the same grouping: scatter_reduce with reduce="sum" (index_reduce has no "sum"; its
    # grouping along ``dim`` is index_add's)
    def summed(self_t, dim_, index_, src_t):
        if func is aten.index_reduce.default:
            if include_self:
                base = self_t
            else:  # untouched elements keep self; touched ones reduce the sources only
                hits = aten.index_add.default(torch.zeros_like(self_t), dim_, index_, torch.ones_like(src_t))
                base = torch.where(hits == 0, self_t, torch.zeros_like(self_t))
            return aten.index_add.default(base, dim_, index_, src_t)
        return func(self_t, dim_, index_, src_t, "sum", include_self=include_self)

    rad, counts = _scatter_sum_rad(summed, m, [x, dim, index, src], {}, 3)
    if reduce == "mean":
        n = counts + (1.0 if include_self else 0.0)
        n = torch.where(n == 0, torch.ones_like(n), n)
        u, eta = rounding.op_roundoff(m.dtype), rounding.op_underflow(m.dtype)
        rad = inflate(rad / n + torch.abs(m).to(_F64) * u + eta, 4)
        rad = rounding.clean_rad(rad)
    return result(m, _finite_only(m, rad))


def _as_ball(t):
    if isinstance(t, BallTensor):
        return t
    return BallTensor(t, torch.zeros_like(t, dtype=rounding.rad_dtype(t.dtype)))
