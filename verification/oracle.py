"""The exact oracle (DESIGN.md §7): the real-number meaning of a traced aten graph, at >= 256 bits.

``trace_training_step`` traces a plain model's forward and backward -- loss, outputs and every parameter gradient --
into an aten graph with ``make_fx`` (no decomposition table: the graph holds the ops eager mode runs).
``Oracle.run`` interprets that graph with its own implementation of each aten op, on exact dyadic tensors
(``verification.dyadic``):

- views, sums, products, max, comparisons, matrix products and convolutions are exact (integers; FLINT GEMM);
- exp, log, sqrt, tanh, erf and divisions by non-powers of two round each element to ``prec + GUARD`` bits
  (mpmath ``libmp``); composite ops (softmax, log-softmax, the norms, attention) are written from their definition
  so that each rounding is relative to one element and there is no cancellation after it beyond what the real
  result itself has.

What is computed is the exact real function of the op, never the op's float behaviour: ``native_batch_norm`` uses
the exact mean and biased variance, ``_log_softmax`` the exact log-sum-exp, ``max_pool2d`` the exact arg max (first
in scan order on exact ties, PyTorch's Clarke choice), ``threshold_backward`` the sign of the exact input.
Scalar arguments (eps, momentum, scale) mean the float64 value aten receives. An op without an implementation
raises ``OracleUnsupportedOp`` naming it. Nothing here imports ``ballgrad.ops``.
"""

from __future__ import annotations

import copy
import operator
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Callable

import numpy as np
import torch
import torch.fx
from mpmath import libmp

from verification.dyadic import Dyadic, NonFiniteError, as_dyadic, matmul, mpf_map

aten = torch.ops.aten

__all__ = ["Oracle", "OracleUnsupportedOp", "TracedStep", "trace_training_step", "exact_training_step",
           "supported_ops", "graph_ops", "NonFiniteError"]

GUARD = 64  # extra bits for every rounding, so results keep >= prec bits through the few ops that follow
COMPACT_LIMIT = 16  # x wp: integers longer than this are rounded to COMPACT_KEEP x wp bits below the top element
COMPACT_KEEP = 8


class OracleUnsupportedOp(NotImplementedError):
    """The oracle has no exact implementation of an aten op (so it cannot check a model that uses it)."""

    def __init__(self, op, reason: str | None = None):
        self.op_name = str(op)
        msg = f"the verification oracle has no exact implementation of aten op '{self.op_name}'"
        if reason:
            msg += f" ({reason})"
        else:
            msg += "; add one with @oracle_op in verification/oracle.py, written from the op's real-number definition"
        super().__init__(msg)


# ----------------------------------------------------------------------------------------------------------------------
# The op table


OPS: dict = {}


def oracle_op(*overloads):
    """Register the decorated function ``fn(ctx, *args, **kwargs)`` as the oracle's meaning of ``overloads``."""

    def register(fn):
        for o in overloads:
            OPS[o] = fn
        return fn

    return register


def supported_ops() -> list[str]:
    """Names of the aten overloads the oracle implements."""
    return sorted(str(o) for o in OPS)


class Ctx:
    """Working precision of one oracle run: ``wp`` bits for every rounded operation."""

    def __init__(self, prec: int):
        self.prec = prec
        self.wp = prec + GUARD


# -- small helpers -----------------------------------------------------------------------------------------------------


def _dims(d, ndim) -> list[int]:
    if d is None:
        return list(range(ndim))
    if isinstance(d, int):
        d = [d]
    return sorted({int(x) % ndim if ndim else 0 for x in d})


def _is_pow2_fraction(f: Fraction) -> bool:
    n, d = abs(f.numerator), f.denominator
    return n != 0 and n & (n - 1) == 0 and d & (d - 1) == 0


def _fraction_of(x) -> Fraction:
    """Exact value of a Python scalar or 0-d Dyadic."""
    if isinstance(x, Dyadic):
        if x.size != 1:
            raise ValueError("expected a scalar")
        return Fraction(int(x.m.reshape(-1)[0])) * Fraction(2) ** x.e
    if isinstance(x, float):
        return Fraction(x)
    return Fraction(x)


def recip(ctx: Ctx, c) -> Dyadic:
    """1/c for a non-zero scalar c: exact when c is a power of two, else rounded to ``wp`` bits."""
    f = _fraction_of(c)
    if f == 0:
        raise NonFiniteError("division by exact zero in the oracle")
    if _is_pow2_fraction(f):
        return Dyadic.scalar(1 / f)
    r = libmp.mpf_div(libmp.from_man_exp(f.denominator, 0), libmp.from_man_exp(f.numerator, 0), ctx.wp, "n")
    sign, man, exp, _ = r
    return Dyadic(-man if sign else man, exp)


def div(ctx: Ctx, a, b) -> Dyadic:
    """Elementwise a / b: multiplication by a rounded reciprocal for a scalar divisor, else a rounded quotient."""
    a, b = as_dyadic(a), as_dyadic(b)
    if b.size == 1:
        r = recip(ctx, b)
        return a * r.view_with(lambda m: np.reshape(m, b.shape))
    wp = ctx.wp

    def q(x, y):
        if y == libmp.fzero:
            raise NonFiniteError("division by exact zero in the oracle")
        return libmp.mpf_div(x, y, wp, "n")

    return mpf_map(q, a, b)


def unary(ctx: Ctx, fn: Callable, x: Dyadic) -> Dyadic:
    wp = ctx.wp
    return mpf_map(lambda r: fn(r, wp, "n"), x)


def _exp(ctx, x):
    return unary(ctx, libmp.mpf_exp, x)


def _log(ctx, x):
    def f(r, wp, rnd):
        if r[0] or r == libmp.fzero:
            raise NonFiniteError("log of a non-positive number in the oracle")
        return libmp.mpf_log(r, wp, rnd)

    return unary(ctx, f, x)


def _sqrt(ctx, x):
    def f(r, wp, rnd):
        if r[0]:
            raise NonFiniteError("sqrt of a negative number in the oracle")
        return libmp.mpf_sqrt(r, wp, rnd)

    return unary(ctx, f, x)


def _rsqrt(ctx, x):
    def f(r, wp, rnd):
        if r[0] or r == libmp.fzero:
            raise NonFiniteError("rsqrt of a non-positive number in the oracle")
        return libmp.mpf_div(libmp.fone, libmp.mpf_sqrt(r, wp + 8, rnd), wp, rnd)

    return unary(ctx, f, x)


def _broadcast_to(x: Dyadic, shape) -> Dyadic:
    return x.view_with(lambda m: np.broadcast_to(m, tuple(shape)))


# ----------------------------------------------------------------------------------------------------------------------
# Views and bookkeeping ops: exact, they only move integers.


@oracle_op(aten.detach.default, aten.alias.default, aten.clone.default, aten.lift_fresh_copy.default,
           aten.contiguous.default)
def _identity(ctx, x, *args, **kwargs):
    return x


@oracle_op(aten._to_copy.default)
def _to_copy(ctx, x, *, dtype=None, **kwargs):
    if dtype is None or dtype.is_floating_point:
        return as_dyadic(x) if dtype is not None else x
    if isinstance(x, np.ndarray):
        return x.astype(np.int64) if dtype != torch.bool else x.astype(bool)
    raise OracleUnsupportedOp(aten._to_copy.default, f"conversion of a float tensor to {dtype}")


@oracle_op(aten.t.default)
def _t(ctx, x):
    return x.view_with(lambda m: m.T) if isinstance(x, Dyadic) else x.T


def _on(x, fn):
    return x.view_with(fn) if isinstance(x, Dyadic) else fn(x)


@oracle_op(aten.transpose.int)
def _transpose(ctx, x, d0, d1):
    return _on(x, lambda m: np.swapaxes(m, d0, d1))


@oracle_op(aten.permute.default)
def _permute(ctx, x, dims):
    return _on(x, lambda m: np.transpose(m, [int(d) % max(m.ndim, 1) for d in dims]))


@oracle_op(aten.view.default, aten._unsafe_view.default, aten.reshape.default, aten._reshape_alias.default)
def _view(ctx, x, size, *args):
    return _on(x, lambda m: np.reshape(m, tuple(size)))


@oracle_op(aten.expand.default)
def _expand(ctx, x, size, *, implicit=False):
    def f(m):
        lead = len(size) - m.ndim
        shape = [m.shape[i - lead] if s == -1 else s for i, s in enumerate(size)]
        return np.broadcast_to(m, tuple(shape))

    return _on(x, f)


@oracle_op(aten.unsqueeze.default)
def _unsqueeze(ctx, x, dim):
    return _on(x, lambda m: np.expand_dims(m, dim % (m.ndim + 1)))


@oracle_op(aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default)
def _squeeze(ctx, x, dim=None):
    def f(m):
        dims = range(m.ndim) if dim is None else ([dim] if isinstance(dim, int) else dim)
        dd = tuple(d % m.ndim for d in dims if m.ndim and m.shape[d % m.ndim] == 1)
        return np.squeeze(m, axis=dd) if dd else m

    return _on(x, f)


@oracle_op(aten.select.int)
def _select(ctx, x, dim, index):
    return _on(x, lambda m: np.take(m, index, axis=dim))


@oracle_op(aten.slice.Tensor)
def _slice(ctx, x, dim=0, start=None, end=None, step=1):
    def f(m):
        sl = [slice(None)] * m.ndim
        sl[dim] = slice(start, end, step)
        return m[tuple(sl)]

    return _on(x, f)


@oracle_op(aten.select_backward.default)
def _select_backward(ctx, g, input_sizes, dim, index):
    out = Dyadic.zeros(input_sizes)
    idx = [slice(None)] * len(input_sizes)
    idx[dim] = index
    out.m[tuple(idx)] = g.m
    return Dyadic(out.m, g.e)


@oracle_op(aten.slice_backward.default)
def _slice_backward(ctx, g, input_sizes, dim, start, end, step):
    out = Dyadic.zeros(input_sizes)
    idx = [slice(None)] * len(input_sizes)
    idx[dim] = slice(start, end, step)
    out.m[tuple(idx)] = g.m
    return Dyadic(out.m, g.e)


@oracle_op(aten.cat.default)
def _cat(ctx, tensors, dim=0):
    ds = [as_dyadic(t) for t in tensors if not (isinstance(t, Dyadic) and t.shape == (0,))]
    ms, e = Dyadic.align(*ds)
    return Dyadic(np.concatenate(ms, axis=dim), e)


@oracle_op(aten.stack.default)
def _stack(ctx, tensors, dim=0):
    ms, e = Dyadic.align(*[as_dyadic(t) for t in tensors])
    return Dyadic(np.stack(ms, axis=dim), e)


@oracle_op(aten.split.Tensor, aten.split_with_sizes.default)
def _split(ctx, x, split_size, dim=0):
    n = x.shape[dim]
    sizes = [split_size] * (n // split_size) + ([n % split_size] if n % split_size else []) if isinstance(
        split_size, int) else list(split_size)
    out, start = [], 0
    for s in sizes:
        out.append(_slice(ctx, x, dim, start, start + s))
        start += s
    return tuple(out)


@oracle_op(aten.unbind.int)
def _unbind(ctx, x, dim=0):
    return tuple(_select(ctx, x, dim, i) for i in range(x.shape[dim]))


# -- creation -------------------------------------------------------------------------------------------------------


def _creation(shape, value, dtype):
    if dtype is not None and not dtype.is_floating_point:
        return np.full(tuple(shape), int(value), dtype=np.int64 if dtype != torch.bool else bool)
    return _broadcast_to(Dyadic.scalar(value), tuple(shape)).view_with(lambda m: m.copy())


def _like_dtype(x, dtype):
    if dtype is not None:
        return dtype
    return torch.float64 if isinstance(x, Dyadic) else (torch.bool if x.dtype == bool else torch.int64)


@oracle_op(aten.ones_like.default)
def _ones_like(ctx, x, *, dtype=None, **kwargs):
    return _creation(x.shape, 1, _like_dtype(x, dtype))


@oracle_op(aten.zeros_like.default, aten.empty_like.default)
def _zeros_like(ctx, x, *, dtype=None, **kwargs):
    return _creation(x.shape, 0, _like_dtype(x, dtype))


@oracle_op(aten.full_like.default)
def _full_like(ctx, x, value, *, dtype=None, **kwargs):
    return _creation(x.shape, value, _like_dtype(x, dtype))


@oracle_op(aten.empty.memory_format, aten.zeros.default)
def _zeros(ctx, size, *, dtype=None, **kwargs):
    return _creation(size, 0, dtype or torch.get_default_dtype())


@oracle_op(aten.ones.default)
def _ones(ctx, size, *, dtype=None, **kwargs):
    return _creation(size, 1, dtype or torch.get_default_dtype())


@oracle_op(aten.full.default)
def _full(ctx, size, value, *, dtype=None, **kwargs):
    if dtype is None:
        dtype = torch.get_default_dtype() if isinstance(value, float) else torch.int64
    return _creation(size, value, dtype)


@oracle_op(aten.scalar_tensor.default)
def _scalar_tensor(ctx, value, *, dtype=None, **kwargs):
    return _creation((), value, dtype or torch.get_default_dtype())


# ----------------------------------------------------------------------------------------------------------------------
# Arithmetic


def _int_result(*xs) -> bool:
    """True when every tensor operand is an integer array and every scalar an int: integer arithmetic."""
    for x in xs:
        if isinstance(x, Dyadic) or isinstance(x, float):
            return False
    return True


@oracle_op(aten.add.Tensor, aten.add.Scalar, aten.add_.Tensor, aten.add_.Scalar)
def _add(ctx, x, y, *, alpha=1):
    if _int_result(x, y, alpha):
        return np.asarray(x + alpha * np.asarray(y))
    return as_dyadic(x) + (as_dyadic(y) * Dyadic.scalar(alpha) if alpha != 1 else as_dyadic(y))


@oracle_op(aten.sub.Tensor, aten.sub.Scalar, aten.sub_.Tensor, aten.sub_.Scalar)
def _sub(ctx, x, y, *, alpha=1):
    if _int_result(x, y, alpha):
        return np.asarray(x - alpha * np.asarray(y))
    return as_dyadic(x) - (as_dyadic(y) * Dyadic.scalar(alpha) if alpha != 1 else as_dyadic(y))


@oracle_op(aten.rsub.Scalar, aten.rsub.Tensor)
def _rsub(ctx, x, y, *, alpha=1):
    return _sub(ctx, y, x, alpha=alpha)


@oracle_op(aten.mul.Tensor, aten.mul.Scalar, aten.mul_.Tensor, aten.mul_.Scalar)
def _mul(ctx, x, y):
    if _int_result(x, y):
        return np.asarray(x * np.asarray(y))
    return as_dyadic(x) * as_dyadic(y)


@oracle_op(aten.div.Tensor, aten.div.Scalar, aten.div_.Tensor, aten.div_.Scalar)
def _div(ctx, x, y):
    return div(ctx, x, y)


@oracle_op(aten.neg.default)
def _neg(ctx, x):
    return -as_dyadic(x)


@oracle_op(aten.abs.default)
def _abs(ctx, x):
    return Dyadic(np.abs(x.m), x.e)


@oracle_op(aten.reciprocal.default)
def _reciprocal(ctx, x):
    return div(ctx, 1, x)


@oracle_op(aten.exp.default)
def _exp_op(ctx, x):
    return _exp(ctx, x)


@oracle_op(aten.log.default)
def _log_op(ctx, x):
    return _log(ctx, x)


@oracle_op(aten.sqrt.default)
def _sqrt_op(ctx, x):
    return _sqrt(ctx, x)


@oracle_op(aten.rsqrt.default)
def _rsqrt_op(ctx, x):
    return _rsqrt(ctx, x)


@oracle_op(aten.tanh.default)
def _tanh(ctx, x):
    return unary(ctx, libmp.mpf_tanh, x)


@oracle_op(aten.sigmoid.default)
def _sigmoid(ctx, x):
    def f(r, wp, rnd):  # 1 / (1 + exp(-r))
        return libmp.mpf_div(libmp.fone, libmp.mpf_add(libmp.fone, libmp.mpf_exp(libmp.mpf_neg(r), wp + 8), wp + 8),
                             wp, rnd)

    return unary(ctx, f, x)


def _bessel(kind: str, order: int):
    """J_order(r) or Y_order(r) (r > 0) by mpmath's ``besselj`` / ``bessely`` at wp + 32 bits, rounded to wp: the
    oracle's meaning of the special function. PyTorch's own float64 kernels are not references: their relative error
    reaches 1e-8 to 1e-6 on ordinary arguments (J1 at x = -5.87: 2e-7)."""

    def f(r, wp, rnd):
        import mpmath

        if kind == "y" and (r[0] or r == libmp.fzero):
            raise NonFiniteError("Bessel Y at a non-positive argument in the oracle")
        with mpmath.workprec(wp + 32):
            v = (mpmath.besselj if kind == "j" else mpmath.bessely)(order, mpmath.mpf(r))
        return libmp.mpf_pos(v._mpf_, wp, rnd)

    return f


@oracle_op(aten.special_bessel_j0.default)
def _bessel_j0(ctx, x):
    return unary(ctx, _bessel("j", 0), x)


@oracle_op(aten.special_bessel_j1.default)
def _bessel_j1(ctx, x):
    return unary(ctx, _bessel("j", 1), x)


@oracle_op(aten.special_bessel_y0.default)
def _bessel_y0(ctx, x):
    return unary(ctx, _bessel("y", 0), x)


@oracle_op(aten.special_bessel_y1.default)
def _bessel_y1(ctx, x):
    return unary(ctx, _bessel("y", 1), x)


@oracle_op(aten.tanh_backward.default)
def _tanh_backward(ctx, g, y):
    return g * (1 - y * y)


@oracle_op(aten.sigmoid_backward.default)
def _sigmoid_backward(ctx, g, y):
    return g * (y * (1 - y))


@oracle_op(aten.pow.Tensor_Scalar)
def _pow(ctx, x, p):
    if isinstance(p, int) or (isinstance(p, float) and p.is_integer() and p >= 0):
        p = int(p)
        if p >= 0:
            out = _creation(x.shape, 1, torch.float64)
            for _ in range(p):
                out = out * x
            return out
    fp = Fraction(p)
    wp = ctx.wp

    def f(r):
        return libmp.mpf_pow(r, libmp.mpf_div(libmp.from_int(fp.numerator), libmp.from_int(fp.denominator), wp + 16),
                             wp, "n") if fp.denominator != 1 else libmp.mpf_pow_int(r, fp.numerator, wp, "n")

    return mpf_map(f, x)


@oracle_op(aten.relu.default, aten.relu_.default)
def _relu(ctx, x):
    return Dyadic(np.where(x.m > 0, x.m, 0).astype(object), x.e)


@oracle_op(aten.threshold_backward.default)
def _threshold_backward(ctx, g, x, threshold):
    """grad where x > threshold else 0, decided on the exact x (at x == threshold: 0, PyTorch's choice)."""
    keep = as_dyadic(x).compare(threshold) > 0
    return Dyadic(np.where(keep, g.m, 0).astype(object), g.e)


@oracle_op(aten.where.self, aten.where.ScalarOther, aten.where.ScalarSelf, aten.where.Scalar)
def _where(ctx, cond, x, y):
    return as_dyadic(x).where(np.asarray(cond, dtype=bool), y)


@oracle_op(aten.masked_fill.Scalar, aten.masked_fill.Tensor)
def _masked_fill(ctx, x, mask, value):
    return as_dyadic(value).where(np.broadcast_to(np.asarray(mask, dtype=bool), x.shape), x)


def _cmp(sign_test):
    def f(ctx, x, y):
        if _int_result(x, y):
            s = np.sign(np.asarray(x, dtype=np.int64) - np.asarray(y, dtype=np.int64))
        else:
            s = as_dyadic(x).compare(y)
        return np.asarray(sign_test(s), dtype=bool)

    return f


for _name, _test in [("gt", lambda s: s > 0), ("ge", lambda s: s >= 0), ("lt", lambda s: s < 0),
                     ("le", lambda s: s <= 0), ("eq", lambda s: s == 0), ("ne", lambda s: s != 0)]:
    oracle_op(getattr(aten, _name).Tensor, getattr(aten, _name).Scalar)(_cmp(_test))


def _one_plus_tanh(u, wp):
    """1 + tanh(u) = 2/(1 + exp(-2u)), accurate to wp bits for every u (1 + tanh(-100) would cancel 288 bits)."""
    return libmp.mpf_div(libmp.from_int(2), libmp.mpf_add(libmp.fone, libmp.mpf_exp(libmp.mpf_neg(libmp.mpf_shift(
        u, 1)), wp), wp), wp)


def _sech_squared(u, wp):
    """sech(u)^2 = 1 - tanh(u)^2 = 4/(exp(u) + exp(-u))^2, accurate to wp bits for every u."""
    d = libmp.mpf_add(libmp.mpf_exp(u, wp), libmp.mpf_exp(libmp.mpf_neg(u), wp), wp)
    return libmp.mpf_div(libmp.from_int(4), libmp.mpf_mul(d, d, wp), wp)


@oracle_op(aten.gelu.default)
def _gelu(ctx, x, *, approximate="none"):
    wp = ctx.wp
    if approximate == "none":
        def f(r):  # x/2 (1 + erf(x/sqrt 2)) = x/2 erfc(-x/sqrt 2): no cancellation for x << 0 (1 + erf(-16) ~ 1e-117)
            s2 = libmp.mpf_sqrt(libmp.from_int(2), wp + 16)
            e = libmp.mpf_erfc(libmp.mpf_neg(libmp.mpf_div(r, s2, wp + 16)), wp + 16)
            return libmp.mpf_mul(libmp.mpf_shift(r, -1), e, wp, "n")
    else:
        c = libmp.from_rational(44715, 1000000, wp + 16)

        def f(r):  # x/2 (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), 1 + tanh(u) = 2/(1 + exp(-2u)) (no cancellation)
            k = libmp.mpf_sqrt(libmp.mpf_div(libmp.from_int(2), libmp.mpf_pi(wp + 16), wp + 16), wp + 16)
            inner = libmp.mpf_mul(k, libmp.mpf_add(r, libmp.mpf_mul(c, libmp.mpf_pow_int(r, 3, wp + 16), wp + 16),
                                                   wp + 16), wp + 16)
            return libmp.mpf_mul(libmp.mpf_shift(r, -1), _one_plus_tanh(inner, wp + 16), wp, "n")
    return mpf_map(f, x)


@oracle_op(aten.gelu_backward.default)
def _gelu_backward(ctx, g, x, *, approximate="none"):
    wp = ctx.wp + 16
    if approximate == "none":
        def f(r):  # Phi(x) + x phi(x), Phi(x) = erfc(-x/sqrt 2)/2 (no cancellation for x << 0)
            s2 = libmp.mpf_sqrt(libmp.from_int(2), wp)
            cdf = libmp.mpf_shift(libmp.mpf_erfc(libmp.mpf_neg(libmp.mpf_div(r, s2, wp)), wp), -1)
            pdf = libmp.mpf_div(libmp.mpf_exp(libmp.mpf_neg(libmp.mpf_shift(libmp.mpf_mul(r, r), -1)), wp),
                                libmp.mpf_sqrt(libmp.mpf_shift(libmp.mpf_pi(wp), 1), wp), wp)
            return libmp.mpf_add(cdf, libmp.mpf_mul(r, pdf, wp), ctx.wp, "n")
    else:
        c = libmp.from_rational(44715, 1000000, wp)

        def f(r):
            k = libmp.mpf_sqrt(libmp.mpf_div(libmp.from_int(2), libmp.mpf_pi(wp), wp), wp)
            x3 = libmp.mpf_pow_int(r, 3, wp)
            u = libmp.mpf_mul(k, libmp.mpf_add(r, libmp.mpf_mul(c, x3, wp), wp), wp)
            du = libmp.mpf_mul(k, libmp.mpf_add(libmp.fone, libmp.mpf_mul(libmp.mpf_mul(c, libmp.from_int(3), wp),
                                                                           libmp.mpf_mul(r, r, wp), wp), wp), wp)
            sech2 = _sech_squared(u, wp)
            left = libmp.mpf_shift(_one_plus_tanh(u, wp), -1)
            right = libmp.mpf_mul(libmp.mpf_shift(r, -1), libmp.mpf_mul(sech2, du, wp), wp)
            return libmp.mpf_add(left, right, ctx.wp, "n")
    return g * mpf_map(f, x)


# -- reductions -------------------------------------------------------------------------------------------------------


@oracle_op(aten.sum.dim_IntList, aten.sum.default)
def _sum(ctx, x, dim=None, keepdim=False, *, dtype=None):
    if isinstance(x, np.ndarray) and x.dtype != object:
        return np.asarray(np.sum(x, axis=tuple(_dims(dim, x.ndim)) if dim else None, keepdims=keepdim))
    return x.sum(_dims(dim, x.ndim) if dim else None, keepdims=keepdim)


@oracle_op(aten.mean.dim, aten.mean.default)
def _mean(ctx, x, dim=None, keepdim=False, *, dtype=None):
    dims = _dims(dim, x.ndim) if dim else list(range(x.ndim))
    n = int(np.prod([x.shape[d] for d in dims])) if dims else 1
    return x.sum(dims or None, keepdims=keepdim) * recip(ctx, n)


@oracle_op(aten.amax.default)
def _amax(ctx, x, dim=(), keepdim=False):
    dims = tuple(_dims(dim, x.ndim)) if dim else tuple(range(x.ndim))
    return Dyadic(np.max(x.m, axis=dims, keepdims=keepdim), x.e)


# -- linear algebra: exact integer GEMM -----------------------------------------------------------------------------


@oracle_op(aten.mm.default)
def _mm(ctx, a, b):
    return matmul(a, b)


@oracle_op(aten.addmm.default)
def _addmm(ctx, bias, a, b, *, beta=1, alpha=1):
    prod = matmul(a, b)
    if alpha != 1:
        prod = prod * Dyadic.scalar(alpha)
    if beta == 0:
        return prod
    return prod + (as_dyadic(bias) * Dyadic.scalar(beta) if beta != 1 else as_dyadic(bias))


def bmm(a: Dyadic, b: Dyadic) -> Dyadic:
    outs = [matmul(a.view_with(lambda m: m[i]), b.view_with(lambda m: m[i])) for i in range(a.shape[0])]
    return Dyadic(np.stack([o.m for o in outs]) if outs else np.zeros((0, a.shape[1], b.shape[2]), dtype=object),
                  a.e + b.e)


def batched_matmul(a: Dyadic, b: Dyadic) -> Dyadic:
    """(..., n, k) @ (..., k, m) with identical leading dims."""
    lead = a.shape[:-2]
    a3 = a.view_with(lambda m: m.reshape((-1,) + m.shape[-2:]))
    b3 = b.view_with(lambda m: m.reshape((-1,) + m.shape[-2:]))
    out = bmm(a3, b3)
    return out.view_with(lambda m: m.reshape(lead + m.shape[-2:]))


@oracle_op(aten.bmm.default)
def _bmm(ctx, a, b):
    return bmm(a, b)


@oracle_op(aten.baddbmm.default)
def _baddbmm(ctx, bias, a, b, *, beta=1, alpha=1):
    prod = bmm(a, b)
    if alpha != 1:
        prod = prod * Dyadic.scalar(alpha)
    if beta == 0:
        return prod
    return prod + (as_dyadic(bias) * Dyadic.scalar(beta) if beta != 1 else as_dyadic(bias))


@oracle_op(aten.dot.default)
def _dot(ctx, a, b):
    return (a * b).sum()


@oracle_op(aten.mv.default)
def _mv(ctx, a, v):
    return matmul(a, v.view_with(lambda m: m.reshape(-1, 1))).view_with(lambda m: m.reshape(-1))


# -- convolution (im2col + exact GEMM) --------------------------------------------------------------------------------


def _pair(v, n):
    v = list(v) if isinstance(v, (list, tuple)) else [v]
    return v * n if len(v) == 1 else v


def _pad_zero(m: np.ndarray, pads) -> np.ndarray:
    """Zero-pad the last two dims of an object array by (ph, pw) on each side (Python-int zeros)."""
    ph, pw = pads
    n, c, h, w = m.shape
    out = np.zeros((n, c, h + 2 * ph, w + 2 * pw), dtype=object)
    out[:, :, ph:ph + h, pw:pw + w] = m
    return out


def _conv_geometry(x_shape, w_shape, stride, padding, dilation):
    _, _, h, w = x_shape
    _, _, kh, kw = w_shape
    oh = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    return oh, ow


def _im2col(xp: np.ndarray, kh, kw, oh, ow, stride, dilation) -> np.ndarray:
    """(N, C, Hp, Wp) padded -> (N*OH*OW, C*kh*kw), column order (c, i, j) like the weight's reshape."""
    n, c = xp.shape[:2]
    cols = []
    for i in range(kh):
        for j in range(kw):
            r0, c0 = i * dilation[0], j * dilation[1]
            cols.append(xp[:, :, r0:r0 + stride[0] * (oh - 1) + 1:stride[0], c0:c0 + stride[1] * (ow - 1) + 1:stride[1]])
    st = np.stack(cols, axis=2)  # (N, C, kh*kw, OH, OW)
    return st.transpose(0, 3, 4, 1, 2).reshape(n * oh * ow, c * kh * kw)


def _as_2d(x: Dyadic, w: Dyadic, stride, padding, dilation):
    """Lift 1-d convolutions to 2-d with a unit height."""
    if x.ndim == 3:
        return (x.view_with(lambda m: m[:, :, None, :]), w.view_with(lambda m: m[:, :, None, :]),
                [1] + _pair(stride, 1), [0] + _pair(padding, 1), [1] + _pair(dilation, 1), True)
    if x.ndim == 4:
        return x, w, _pair(stride, 2), _pair(padding, 2), _pair(dilation, 2), False
    raise OracleUnsupportedOp(aten.convolution.default, f"{x.ndim - 2}-d convolution")


@oracle_op(aten.convolution.default)
def _convolution(ctx, x, w, bias, stride, padding, dilation, transposed, output_padding, groups):
    if transposed:
        raise OracleUnsupportedOp(aten.convolution.default, "transposed convolution")
    if isinstance(padding, str):
        raise OracleUnsupportedOp(aten.convolution.default, f"padding={padding!r}")
    x, w, stride, padding, dilation, squeeze = _as_2d(x, w, stride, padding, dilation)
    n, c, _, _ = x.shape
    o, cg, kh, kw = w.shape
    oh, ow = _conv_geometry(x.shape, w.shape, stride, padding, dilation)
    xp = _pad_zero(x.m, padding)
    og = o // groups
    outs = []
    for g in range(groups):
        cols = _im2col(xp[:, g * cg:(g + 1) * cg], kh, kw, oh, ow, stride, dilation)
        wm = w.m[g * og:(g + 1) * og].reshape(og, cg * kh * kw)
        outs.append(matmul(Dyadic(cols, x.e), Dyadic(wm.T, w.e)).m)  # (N*OH*OW, og)
    y = np.concatenate(outs, axis=1).reshape(n, oh, ow, o).transpose(0, 3, 1, 2)
    out = Dyadic(y, x.e + w.e)
    if bias is not None:
        out = out + bias.view_with(lambda m: m.reshape(1, o, 1, 1))
    if squeeze:
        out = out.view_with(lambda m: m[:, :, 0, :])
    return out


@oracle_op(aten.convolution_backward.default)
def _convolution_backward(ctx, gy, x, w, bias_sizes, stride, padding, dilation, transposed, output_padding, groups,
                          output_mask):
    if transposed:
        raise OracleUnsupportedOp(aten.convolution_backward.default, "transposed convolution")
    x, w, stride, padding, dilation, squeeze = _as_2d(x, w, stride, padding, dilation)
    if squeeze:
        gy = gy.view_with(lambda m: m[:, :, None, :])
    n, c, h, wd = x.shape
    o, cg, kh, kw = w.shape
    oh, ow = gy.shape[2], gy.shape[3]
    og = o // groups
    gx = gw = gb = None
    gmat = gy.m.transpose(0, 2, 3, 1).reshape(n * oh * ow, o)
    if output_mask[1]:
        xp = _pad_zero(x.m, padding)
        parts = []
        for g in range(groups):
            cols = _im2col(xp[:, g * cg:(g + 1) * cg], kh, kw, oh, ow, stride, dilation)
            parts.append(matmul(Dyadic(gmat[:, g * og:(g + 1) * og].T, gy.e), Dyadic(cols, x.e)).m)
        gw = Dyadic(np.concatenate(parts, axis=0).reshape(o, cg, kh, kw), gy.e + x.e)
        if squeeze:
            gw = gw.view_with(lambda m: m[:, :, 0, :])
    if output_mask[0]:
        hp, wp_ = h + 2 * padding[0], wd + 2 * padding[1]
        gxp = np.zeros((n, c, hp, wp_), dtype=object)
        for g in range(groups):
            wm = w.m[g * og:(g + 1) * og].reshape(og, cg * kh * kw)
            gcols = matmul(Dyadic(gmat[:, g * og:(g + 1) * og], gy.e), Dyadic(wm, w.e)).m
            gcols = gcols.reshape(n, oh, ow, cg, kh, kw)
            for i in range(kh):
                for j in range(kw):
                    r0, c0 = i * dilation[0], j * dilation[1]
                    view = gxp[:, g * cg:(g + 1) * cg, r0:r0 + stride[0] * (oh - 1) + 1:stride[0],
                               c0:c0 + stride[1] * (ow - 1) + 1:stride[1]]
                    view += gcols[:, :, :, :, i, j].transpose(0, 3, 1, 2)
        gx = Dyadic(gxp[:, :, padding[0]:padding[0] + h, padding[1]:padding[1] + wd], gy.e + w.e)
        if squeeze:
            gx = gx.view_with(lambda m: m[:, :, 0, :])
    if output_mask[2]:
        gb = gy.sum((0, 2, 3))
    return gx, gw, gb


# -- pooling -------------------------------------------------------------------------------------------------------------


def _pool_out(size, k, s, p, d, ceil):
    num = size + 2 * p - d * (k - 1) - 1 + (s - 1 if ceil else 0)
    out = num // s + 1
    if ceil and (out - 1) * s >= size + p:
        out -= 1
    return out


@oracle_op(aten.max_pool2d_with_indices.default)
def _max_pool2d_with_indices(ctx, x, kernel_size, stride=(), padding=0, dilation=1, ceil_mode=False):
    """Exact max per window and the flat index (ih * W + iw) of its first exact maximum in scan order."""
    unbatched = x.ndim == 3
    m = x.m[None] if unbatched else x.m
    k = _pair(kernel_size, 2)
    s = _pair(stride, 2) if stride else k
    p, d = _pair(padding, 2), _pair(dilation, 2)
    n, c, h, w = m.shape
    oh, ow = _pool_out(h, k[0], s[0], p[0], d[0], ceil_mode), _pool_out(w, k[1], s[1], p[1], d[1], ceil_mode)
    hp = max(h + 2 * p[0], (oh - 1) * s[0] + (k[0] - 1) * d[0] + 1)
    wp_ = max(w + 2 * p[1], (ow - 1) * s[1] + (k[1] - 1) * d[1] + 1)
    sentinel = (min(m.flat) if m.size else 0) - 1  # below every value: padding never wins
    xp = np.full((n, c, hp, wp_), sentinel, dtype=object)
    xp[:, :, p[0]:p[0] + h, p[1]:p[1] + w] = m
    best = bidx = None
    rows = np.arange(oh)[:, None] * s[0] - p[0]
    colsi = np.arange(ow)[None, :] * s[1] - p[1]
    for i in range(k[0]):
        for j in range(k[1]):
            r0, c0 = i * d[0], j * d[1]
            cand = xp[:, :, r0:r0 + s[0] * (oh - 1) + 1:s[0], c0:c0 + s[1] * (ow - 1) + 1:s[1]]
            idx = np.broadcast_to((rows + r0) * w + (colsi + c0), cand.shape)
            if best is None:
                best, bidx = cand.copy(), idx.copy()
            else:
                better = (cand > best).astype(bool)
                best = np.where(better, cand, best)
                bidx = np.where(better, idx, bidx)
    out = best.astype(object)
    if unbatched:
        out, bidx = out[0], bidx[0]
    return Dyadic(out, x.e), np.asarray(bidx, dtype=np.int64)


@oracle_op(aten.max_pool2d_with_indices_backward.default)
def _max_pool2d_with_indices_backward(ctx, gy, x, kernel_size, stride, padding, dilation, ceil_mode, indices):
    shape = x.shape
    planes = int(np.prod(shape[:-2]))
    hw = shape[-2] * shape[-1]
    gx = np.zeros(planes * hw, dtype=object)
    idx = np.asarray(indices, dtype=np.int64).reshape(planes, -1) + (np.arange(planes) * hw)[:, None]
    np.add.at(gx, idx.reshape(-1), gy.m.reshape(-1))
    return Dyadic(gx.reshape(shape), gy.e)


# -- softmax family ----------------------------------------------------------------------------------------------------


def _logsumexp(ctx, x: Dyadic, dim: int) -> Dyadic:
    """log(sum(exp(x))) along ``dim`` (keepdim): max-shifted, so every exp is in (0, 1] and the sum in [1, n]."""
    mx = Dyadic(np.max(x.m, axis=dim, keepdims=True), x.e)
    s = _exp(ctx, x - mx).sum(dim, keepdims=True)
    return mx + _log(ctx, s)


def _softmax_values(ctx, x: Dyadic, dim: int) -> Dyadic:
    mx = Dyadic(np.max(x.m, axis=dim, keepdims=True), x.e)
    ex = _exp(ctx, x - mx)
    return div(ctx, ex, ex.sum(dim, keepdims=True))


@oracle_op(aten._log_softmax.default)
def _log_softmax(ctx, x, dim, half_to_float=False):
    dim = dim % max(x.ndim, 1)
    return x - _logsumexp(ctx, x, dim)


@oracle_op(aten._log_softmax_backward_data.default)
def _log_softmax_backward_data(ctx, g, y, dim, input_dtype=None):
    """g - softmax * sum(g), with softmax = exp(y) of the exact log-softmax y."""
    dim = dim % max(y.ndim, 1)
    return g - _exp(ctx, y) * g.sum(dim, keepdims=True)


@oracle_op(aten._softmax.default)
def _softmax(ctx, x, dim, half_to_float=False):
    return _softmax_values(ctx, x, dim % max(x.ndim, 1))


@oracle_op(aten._softmax_backward_data.default)
def _softmax_backward_data(ctx, g, y, dim, input_dtype=None):
    dim = dim % max(y.ndim, 1)
    return y * (g - (g * y).sum(dim, keepdims=True))


@oracle_op(aten.nll_loss_forward.default)
def _nll_loss_forward(ctx, x, target, weight, reduction, ignore_index):
    """-x[i, t_i] * w[t_i], reduced; mean divides by the total weight (exactly: a power of two for unit weights
    and a batch of 2^k)."""
    x2 = x.m if x.ndim == 2 else x.m[None]
    t = np.asarray(target, dtype=np.int64).reshape(-1)
    valid = t != ignore_index
    tt = np.where(valid, t, 0)
    picked = Dyadic(x2[np.arange(x2.shape[0]), tt], x.e)
    if weight is not None:
        wt = Dyadic(weight.m[tt], weight.e)
        wt = wt.where(valid, 0)
    else:
        wt = Dyadic(valid.astype(np.int64).astype(object), 0)
    losses = -(picked * wt)
    total = wt.sum()
    if reduction == 0:
        out = losses if x.ndim == 2 else losses.view_with(lambda m: m.reshape(()))
        return out, total
    s = losses.sum()
    if reduction == 2:
        return s, total
    return div(ctx, s, total), total


@oracle_op(aten.nll_loss_backward.default)
def _nll_loss_backward(ctx, g, x, target, weight, reduction, ignore_index, total_weight):
    x2shape = x.shape if x.ndim == 2 else (1,) + x.shape
    t = np.asarray(target, dtype=np.int64).reshape(-1)
    valid = t != ignore_index
    tt = np.where(valid, t, 0)
    if weight is not None:
        wt = Dyadic(weight.m[tt], weight.e).where(valid, 0)
    else:
        wt = Dyadic(valid.astype(np.int64).astype(object), 0)
    if reduction == 0:
        per = -(wt * g.view_with(lambda m: m.reshape(-1)))
    else:
        per = -(wt * g.view_with(lambda m: m.reshape(())))
        if reduction == 1:
            per = div(ctx, per, total_weight)
    out = np.zeros(x2shape, dtype=object)
    out[np.arange(x2shape[0]), tt] = per.m
    return Dyadic(out.reshape(x.shape), per.e)


# -- normalisation --------------------------------------------------------------------------------------------------


class _NormStats:
    """Exact normalisation statistics of ``x`` over ``axes`` (keepdim), with a single rounding per row.

    With n elements, S1 = sum x and S2 = sum x^2 (exact integers times a power of two),
    var + eps = (n S2 - S1^2 + eps n^2) / n^2 (biased variance), hence
    xhat = (x - mean) / sqrt(var + eps) = (n x - S1) * root,   root = 1 / sqrt(n S2 - S1^2 + eps n^2).
    Only ``root`` is rounded (to wp bits, once per row); ``xhat`` is then exact given ``root``, so identities such
    as sum(xhat) = 0 hold exactly (the gradient of a bias followed by a norm is exactly 0, as it should be).
    ``mean`` (S1 / n) and ``invstd`` (n root) are what the ops return as saved statistics.
    """

    def __init__(self, ctx, x: Dyadic, axes, eps):
        self.n = n = int(np.prod([x.shape[a] for a in axes]))
        s1 = x.sum(axes, keepdims=True)
        s2 = (x * x).sum(axes, keepdims=True)
        num = s2 * n - s1 * s1 + Dyadic.scalar(eps) * (n * n)
        wp = ctx.wp

        def root(r):
            if r[0] or r == libmp.fzero:
                raise NonFiniteError("non-positive variance + eps in the oracle")
            return libmp.mpf_div(libmp.fone, libmp.mpf_sqrt(r, wp + 8), wp, "n")

        self.root = mpf_map(root, num)
        self.centered = x * n - s1
        self.mean = s1 * recip(ctx, n)
        self.invstd = self.root * n

    def xhat(self) -> Dyadic:
        return self.centered * self.root


def _channel_view(v: Dyadic, ndim):
    return v.view_with(lambda m: m.reshape((1, -1) + (1,) * (ndim - 2)))


@oracle_op(aten.native_batch_norm.default, aten._native_batch_norm_legit.default)
def _native_batch_norm(ctx, x, weight, bias, running_mean, running_var, training, momentum, eps):
    """Training: xhat * w + b with the exact batch mean and biased variance (``_NormStats``); returns
    (out, mean, invstd). Eval: running statistics, and empty saved statistics as aten does. The running statistics
    update is a side effect no output depends on."""
    axes = [0] + list(range(2, x.ndim))
    if training:
        st = _NormStats(ctx, x, axes, eps)
        out = st.xhat()
        save_mean = st.mean.view_with(lambda m: m.reshape(-1))
        save_invstd = st.invstd.view_with(lambda m: m.reshape(-1))
    else:
        mean = _channel_view(running_mean, x.ndim)
        invstd = _rsqrt(ctx, _channel_view(running_var, x.ndim) + Dyadic.scalar(eps))
        out = (x - mean) * invstd
        save_mean = save_invstd = Dyadic.zeros((0,))
    if weight is not None:
        out = out * _channel_view(weight, x.ndim)
    if bias is not None:
        out = out + _channel_view(bias, x.ndim)
    return out, save_mean, save_invstd


@oracle_op(aten._native_batch_norm_legit_no_training.default)
def _native_batch_norm_no_training(ctx, x, weight, bias, running_mean, running_var, momentum, eps):
    return _native_batch_norm(ctx, x, weight, bias, running_mean, running_var, False, momentum, eps)


@oracle_op(aten._native_batch_norm_legit.no_stats)
def _native_batch_norm_no_stats(ctx, x, weight, bias, training, momentum, eps):
    return _native_batch_norm(ctx, x, weight, bias, None, None, True, momentum, eps)


@oracle_op(aten.native_batch_norm_backward.default)
def _native_batch_norm_backward(ctx, gy, x, weight, running_mean, running_var, save_mean, save_invstd, train, eps,
                                output_mask):
    """Training: gx = w invstd / n (n gy - sum gy - xhat sum(gy xhat)) = w root (n gy - sum gy - xhat sum(gy xhat)),
    gw = sum(gy xhat), gb = sum gy. The batch statistics are recomputed from ``x`` (``_NormStats``): in exact
    arithmetic they are the saved ones, and recomputing keeps their single rounding shared with the forward.
    Eval: gx = gy w invstd(running), gw = sum(gy xhat)."""
    axes = [0] + list(range(2, x.ndim))
    nd = x.ndim
    w = _channel_view(weight, nd) if weight is not None else Dyadic.scalar(1)
    gb = gy.sum(axes, keepdims=True)
    if train:
        st = _NormStats(ctx, x, axes, eps)
        xhat = st.xhat()
        gw = (gy * xhat).sum(axes, keepdims=True)
        gx = (w * st.root) * (gy * st.n - gb - xhat * gw) if output_mask[0] else None
    else:
        invstd = _rsqrt(ctx, _channel_view(running_var, nd) + Dyadic.scalar(eps))
        xhat = (x - _channel_view(running_mean, nd)) * invstd
        gw = (gy * xhat).sum(axes, keepdims=True)
        gx = gy * (w * invstd) if output_mask[0] else None
    flat = lambda v: v.view_with(lambda m: m.reshape(-1))  # noqa: E731
    return gx, flat(gw) if output_mask[1] else None, flat(gb) if output_mask[2] else None


@oracle_op(aten.native_layer_norm.default)
def _native_layer_norm(ctx, x, normalized_shape, weight, bias, eps):
    """xhat * w + b over the last ``len(normalized_shape)`` dims (``_NormStats``); returns (out, mean, rstd)."""
    k = len(normalized_shape)
    st = _NormStats(ctx, x, list(range(x.ndim - k, x.ndim)), eps)
    out = st.xhat()
    if weight is not None:
        out = out * weight
    if bias is not None:
        out = out + bias
    return out, st.mean, st.invstd


@oracle_op(aten.native_layer_norm_backward.default)
def _native_layer_norm_backward(ctx, gy, x, normalized_shape, mean, rstd, weight, bias, output_mask):
    """gx = rstd / n (n g - sum g - xhat sum(g xhat)) with g = gy w; gw = sum over rows of gy xhat; gb = sum over
    rows of gy. As in ``_NormStats``, xhat = (n x - S1) * root with the centred values recomputed exactly from ``x``
    (so sum(xhat) = 0 exactly) and root = rstd / n from the saved rstd (the op gets no eps to recompute it)."""
    k = len(normalized_shape)
    axes = list(range(x.ndim - k, x.ndim))
    lead = list(range(x.ndim - k))
    n = int(np.prod([x.shape[a] for a in axes]))
    root = rstd * recip(ctx, n)
    xhat = (x * n - x.sum(axes, keepdims=True)) * root
    g = gy * weight if weight is not None else gy
    gx = gw = gb = None
    if output_mask[0]:
        gx = root * (g * n - g.sum(axes, keepdims=True) - xhat * (g * xhat).sum(axes, keepdims=True))
    if output_mask[1] and weight is not None:
        gw = (gy * xhat).sum(lead) if lead else gy * xhat
    if output_mask[2] and bias is not None:
        gb = gy.sum(lead) if lead else gy
    return gx, gw, gb


# -- attention ------------------------------------------------------------------------------------------------------


def _attention_scale(ctx, q: Dyadic, scale):
    if scale is not None:
        return Dyadic.scalar(scale)
    e = q.shape[-1]
    return _rsqrt(ctx, Dyadic.scalar(e))  # the real 1/sqrt(E), exact when E is a power of four


def _attention_probs(ctx, q, k, scale, attn_mask, is_causal):
    """P = softmax(q k^T * scale + mask) over the last dim, exact up to one rounding per exp and one reciprocal
    per row; returns (P, logsumexp)."""
    s = batched_matmul(q, k.view_with(lambda m: np.swapaxes(m, -1, -2))) * _attention_scale(ctx, q, scale)
    allowed = None
    L, S = s.shape[-2], s.shape[-1]
    if is_causal:
        allowed = np.tril(np.ones((L, S), dtype=bool))
    if attn_mask is not None:
        if isinstance(attn_mask, np.ndarray) and attn_mask.dtype == bool:
            allowed = attn_mask if allowed is None else (allowed & attn_mask)
        else:
            s = s + attn_mask
    if allowed is not None:
        allowed = np.broadcast_to(allowed, s.shape)
        lowest = min(s.m.flat) if s.size else 0
        s = Dyadic(np.where(allowed, s.m, lowest).astype(object), s.e)
    mx = Dyadic(np.max(s.m, axis=-1, keepdims=True), s.e)
    ex = _exp(ctx, s - mx)
    if allowed is not None:
        ex = Dyadic(np.where(allowed, ex.m, 0).astype(object), ex.e)
    tot = ex.sum(-1, keepdims=True)
    inv = mpf_map(lambda r: libmp.mpf_div(libmp.fone, r, ctx.wp, "n"), tot)
    lse = mx + _log(ctx, tot)
    return ex * inv, lse


@oracle_op(aten._scaled_dot_product_flash_attention_for_cpu.default)
def _sdpa_flash_cpu(ctx, q, k, v, dropout_p=0.0, is_causal=False, *, attn_mask=None, scale=None):
    if dropout_p:
        raise OracleUnsupportedOp(aten._scaled_dot_product_flash_attention_for_cpu.default, "dropout_p > 0")
    p, lse = _attention_probs(ctx, q, k, scale, attn_mask, is_causal)
    out = batched_matmul(p, v)
    return out, lse.view_with(lambda m: m[..., 0])


@oracle_op(aten._scaled_dot_product_flash_attention_for_cpu_backward.default)
def _sdpa_flash_cpu_backward(ctx, g, q, k, v, out, lse, dropout_p, is_causal, *, attn_mask=None, scale=None):
    """dV = P^T dO; dP = dO V^T; dS = P (dP - rowsum(dP P)); dQ = dS K scale; dK = dS^T Q scale
    (P recomputed from q, k: the saved out/logsumexp are not needed)."""
    if dropout_p:
        raise OracleUnsupportedOp(aten._scaled_dot_product_flash_attention_for_cpu_backward.default, "dropout_p > 0")
    p, _ = _attention_probs(ctx, q, k, scale, attn_mask, is_causal)
    sc = _attention_scale(ctx, q, scale)
    tr = lambda x: x.view_with(lambda m: np.swapaxes(m, -1, -2))  # noqa: E731
    dv = batched_matmul(tr(p), g)
    dp = batched_matmul(g, tr(v))
    ds = p * (dp - (dp * p).sum(-1, keepdims=True))
    dq = batched_matmul(ds, k) * sc
    dk = batched_matmul(tr(ds), q) * sc
    return dq, dk, dv


@oracle_op(aten._scaled_dot_product_attention_math.default)
def _sdpa_math(ctx, q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, dropout_mask=None, *, scale=None,
               enable_gqa=False):
    if dropout_p:
        raise OracleUnsupportedOp(aten._scaled_dot_product_attention_math.default, "dropout_p > 0")
    p, _ = _attention_probs(ctx, q, k, scale, attn_mask, is_causal)
    return batched_matmul(p, v), p


# ----------------------------------------------------------------------------------------------------------------------
# The interpreter


def to_oracle_value(v):
    """A traced graph's input (tensor, number, list) as an oracle value: float tensors become exact Dyadic tensors,
    integer and bool tensors numpy arrays."""
    if isinstance(v, torch.Tensor):
        if v.is_floating_point():
            return Dyadic.from_torch(v)
        if v.is_complex():
            raise OracleUnsupportedOp("complex tensor", "complex dtypes are out of scope")
        return v.detach().cpu().numpy().copy()
    if isinstance(v, (list, tuple)):
        return type(v)(to_oracle_value(x) for x in v)
    return v


def _compact(v, ctx):
    if isinstance(v, Dyadic):
        return v.compact(COMPACT_LIMIT * ctx.wp, COMPACT_KEEP * ctx.wp)
    if isinstance(v, tuple):
        return tuple(_compact(x, ctx) for x in v)
    return v


class Oracle:
    """Interprets an aten ``torch.fx.GraphModule`` exactly (see the module docstring).

    ``Oracle(prec=256).run(gm, *args)`` returns the graph's outputs as ``Dyadic`` tensors (float outputs) or numpy
    arrays (integer outputs). ``progress``: an optional callable ``(done, total)`` called as nodes complete.
    """

    def __init__(self, prec: int = 256):
        if prec < 256:
            raise ValueError("the oracle works at >= 256 bits")
        self.prec = prec
        self.timings: dict[str, float] = {}

    def run(self, gm: torch.fx.GraphModule, *args, progress=None):
        import time

        ctx = Ctx(self.prec)
        nodes = list(gm.graph.nodes)
        last_use = {}
        for i, node in enumerate(nodes):
            for a in node.all_input_nodes:
                last_use[a] = i
        env = {}
        arg_iter = iter(args)
        self.timings = {}

        def load(a):
            return torch.fx.node.map_arg(a, lambda n: env[n])

        for i, node in enumerate(nodes):
            if node.op == "placeholder":
                env[node] = to_oracle_value(next(arg_iter))
            elif node.op == "get_attr":
                obj = gm
                for part in node.target.split("."):
                    obj = getattr(obj, part)
                env[node] = to_oracle_value(obj)
            elif node.op == "call_function":
                args_, kwargs_ = load(node.args), load(node.kwargs)
                if node.target is operator.getitem:
                    env[node] = args_[0][args_[1]]
                else:
                    fn = OPS.get(node.target)
                    if fn is None:
                        raise OracleUnsupportedOp(node.target)
                    t0 = time.perf_counter()
                    env[node] = _compact(fn(ctx, *args_, **kwargs_), ctx)
                    name = str(node.target)
                    self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - t0
                    schema = getattr(node.target, "_schema", None)
                    if schema is not None and schema.arguments and schema.arguments[0].alias_info is not None \
                            and schema.arguments[0].alias_info.is_write and isinstance(node.args[0], torch.fx.Node):
                        env[node.args[0]] = env[node]  # in-place op: later readers see the new value
            elif node.op == "output":
                return load(node.args[0])
            else:
                raise OracleUnsupportedOp(f"fx node kind {node.op}")
            for a in node.all_input_nodes:  # free values no later node reads
                if last_use.get(a) == i and a in env and a.op != "placeholder":
                    del env[a]
            if progress is not None:
                progress(i + 1, len(nodes))
        raise RuntimeError("graph without an output node")


# ----------------------------------------------------------------------------------------------------------------------
# Tracing a training step


@dataclass
class TracedStep:
    """A traced training step: ``gm(params..., inputs, targets) -> (loss, output, grads...)``."""

    gm: torch.fx.GraphModule
    param_names: list[str]
    args: list = field(repr=False)

    def ops(self) -> list[str]:
        return graph_ops(self.gm)


def graph_ops(gm: torch.fx.GraphModule) -> list[str]:
    """The distinct aten overloads a traced graph calls."""
    return sorted({str(n.target) for n in gm.graph.nodes
                   if n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload)})


def trace_training_step(model: torch.nn.Module, inputs, targets, loss_fn=None) -> TracedStep:
    """Trace forward + backward of ``loss_fn(model(inputs), targets)`` (default: cross-entropy) into an aten graph.

    The model is deep-copied first (tracing runs the real ops, which would update e.g. BatchNorm running
    statistics). Only parameters with ``requires_grad`` get gradients, in ``named_parameters`` order."""
    from torch.fx.experimental.proxy_tensor import make_fx

    loss_fn = loss_fn or torch.nn.functional.cross_entropy
    model = copy.deepcopy(model)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    names = [n for n, _ in named]
    params = [p.detach().clone().requires_grad_(True) for _, p in named]

    def step(param_list, x, y):
        out = torch.func.functional_call(model, dict(zip(names, param_list)), (x,))
        loss = loss_fn(out, y)
        grads = torch.autograd.grad(loss, param_list)
        return (loss, out, *grads)

    gm = make_fx(step)(params, inputs, targets)
    return TracedStep(gm, names, [*params, inputs, targets])


def exact_training_step(model, inputs, targets, loss_fn=None, *, prec: int = 256, traced: TracedStep | None = None,
                        progress=None) -> dict:
    """Exact loss, output and parameter gradients of one training step: ``{"loss": Dyadic, "output": Dyadic,
    "grad": {name: Dyadic}}``."""
    traced = traced or trace_training_step(model, inputs, targets, loss_fn)
    outs = Oracle(prec).run(traced.gm, *[a.detach() if isinstance(a, torch.Tensor) else a for a in traced.args],
                            progress=progress)
    loss, output, *grads = outs
    return {"loss": loss, "output": output, "grad": dict(zip(traced.param_names, grads))}
