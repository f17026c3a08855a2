"""Exact tensors of dyadic rationals for the oracle: ``value[i] = m[i] * 2**e``.

``m`` is a numpy object array of Python integers (or python-flint ``fmpz`` after a matrix product) carrying the
tensor's shape; ``e`` is one exponent shared by the whole tensor. Floats of every dtype are dyadic rationals, so model
parameters and inputs convert exactly, and everything a network does that is exactly dyadic -- sums, products,
differences, views, max, comparisons, matrix products and convolutions -- stays exact here: there is no rounding at
all. Only operations whose real result is not dyadic (exp, log, sqrt, division by a non-power of two) round, each
element to a relative ``prec`` bits with mpmath's ``libmp`` (its raw tuples avoid a context's global precision).

Matrix products go through python-flint's ``fmpz_mat`` (FLINT's multimodular integer GEMM): exact and fast where a
Python loop over object arrays would take hours for the zoo's larger models.

This module shares no code with ``src/ballgrad/ops``: it is half of an independent check of those rules.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import torch
from mpmath import libmp

try:
    import flint
except ImportError as exc:  # pragma: no cover
    raise ImportError("the oracle needs python-flint for exact integer matrix products: pip install python-flint") from exc

__all__ = ["Dyadic", "matmul", "raw_array", "from_raw_array", "mpf_map", "NonFiniteError", "OracleTooExpensive"]


MAX_ALIGN_BITS = 1 << 22  # about 4 million bits: a shared exponent wider than this makes every integer that long


class OracleTooExpensive(RuntimeError):
    """Exact values whose exponents differ by more than ``MAX_ALIGN_BITS`` cannot share one exponent at a bounded cost
    (exp(-1e6) next to exp(0) would need million-bit integers for every element, and a few more ops stall for hours).
    The oracle gives up on such a graph instead of approximating: callers report it as not checked."""


def _check_alignment(bits: int) -> None:
    if bits > MAX_ALIGN_BITS:
        raise OracleTooExpensive(f"exact values spanning 2^{bits} (more than 2^{MAX_ALIGN_BITS}) in one tensor")


class NonFiniteError(ValueError):
    """A NaN or infinity reached the oracle: a real number has no such value, so there is nothing exact to compare."""


def _obj(a) -> np.ndarray:
    """An object ndarray (Python ints stay Python ints; int64 arrays become Python ints)."""
    if isinstance(a, np.ndarray):
        if a.dtype == object:
            return a
        if a.dtype == np.bool_:
            a = a.astype(np.int64)
        return a.astype(object)
    out = np.empty((), dtype=object)
    out[()] = a
    return out


def _bit_length(x) -> int:
    return int(x).bit_length() if not isinstance(x, int) else x.bit_length()


class Dyadic:
    """An exact tensor ``m * 2**e`` (see the module docstring). Views and elementwise integer operations act on ``m``;
    the arithmetic methods align exponents and never round."""

    __slots__ = ("m", "e")

    def __init__(self, m, e: int = 0):
        self.m = _obj(m)
        self.e = int(e)

    # -- construction ------------------------------------------------------------------------------------------------
    @classmethod
    def from_numpy(cls, arr: np.ndarray) -> "Dyadic":
        """Exact value of a float or integer numpy array."""
        arr = np.asarray(arr)
        if arr.dtype.kind in "iub":
            return cls(arr.astype(np.int64).astype(object) if arr.dtype.kind == "b" else arr.astype(object), 0)
        x = arr.astype(np.float64)  # exact for float16/bfloat16/float32
        if not np.isfinite(x).all():
            raise NonFiniteError("the oracle got a non-finite float (NaN or inf); exact real values do not exist")
        mant, ex = np.frexp(x)
        mi = np.ldexp(mant, 53).astype(np.int64)  # exact: |mant| < 1 has 53 bits
        ex = ex.astype(np.int64) - 53
        nz = mi != 0
        if not nz.any():
            return cls(np.zeros(x.shape, dtype=object), 0)
        # strip trailing zero bits per element (float32 mantissas have 29 of them)
        low = mi & -mi
        tz = np.zeros_like(mi)
        tz[nz] = np.log2(low[nz].astype(np.float64)).astype(np.int64)
        mi = np.where(nz, mi >> tz, 0)
        ex = ex + tz
        emin = int(ex[nz].min())
        shift = np.where(nz, ex - emin, 0).astype(object)
        return cls(mi.astype(object) << shift, emin)

    @classmethod
    def from_torch(cls, t: torch.Tensor) -> "Dyadic":
        t = t.detach().cpu()
        if t.dtype == torch.bfloat16 or t.dtype == torch.float16:
            t = t.to(torch.float32)
        return cls.from_numpy(t.numpy())

    @classmethod
    def scalar(cls, v) -> "Dyadic":
        """A 0-d exact tensor from an int, bool, float or a dyadic Fraction."""
        if isinstance(v, (bool, np.bool_)):
            return cls(int(v), 0)
        if isinstance(v, (int, np.integer)):
            return cls(int(v), 0)
        if isinstance(v, Fraction):
            den = v.denominator
            if den & (den - 1):
                raise ValueError(f"{v} is not a dyadic rational")
            return cls(v.numerator, -(den.bit_length() - 1))
        f = float(v)
        if not math.isfinite(f):
            raise NonFiniteError(f"the oracle got the non-finite scalar {f}")
        return cls.scalar(Fraction(f))

    @classmethod
    def zeros(cls, shape) -> "Dyadic":
        return cls(np.zeros(tuple(shape), dtype=object), 0)

    # -- shape ---------------------------------------------------------------------------------------------------------
    @property
    def shape(self) -> tuple:
        return self.m.shape

    @property
    def ndim(self) -> int:
        return self.m.ndim

    @property
    def size(self) -> int:
        return self.m.size

    def view_with(self, fn) -> "Dyadic":
        """Apply a shape function (reshape, transpose, indexing, ...) to the integers; the exponent is unchanged."""
        return Dyadic(fn(self.m), self.e)

    def bits(self) -> int:
        """Largest integer bit length (the cost driver of every operation)."""
        if self.m.size == 0:
            return 0
        return max(_bit_length(v) for v in self.m.flat)

    def top_bits(self) -> int:
        """Bit length of the largest |integer| (two comparisons per element; the size that costs)."""
        if self.m.size == 0:
            return 0
        return max(abs(int(np.max(self.m))), abs(int(np.min(self.m)))).bit_length()

    def compact(self, limit: int, keep: int) -> "Dyadic":
        """If the integers exceed ``limit`` bits, round them to nearest at absolute precision 2**(top - keep) where
        top is the largest element's bit position: the absolute error is at most 2**-keep * max|x|. Chains of
        exact products only ever need this for tensors whose elements span hundreds of binary orders of magnitude.
        """
        nb = self.top_bits()
        if nb <= limit:
            return self
        sh = nb - keep
        return Dyadic((self.m + (1 << (sh - 1))) >> sh, self.e + sh)

    # -- exact arithmetic ----------------------------------------------------------------------------------------------
    @staticmethod
    def align(*xs: "Dyadic"):
        """Integer arrays of ``xs`` at one common exponent (the smallest), and that exponent."""
        e = min(x.e for x in xs)
        _check_alignment(max(x.e for x in xs) - e)
        return [x.m if x.e == e else x.m << (x.e - e) for x in xs], e

    def __add__(self, other):
        (a, b), e = Dyadic.align(self, as_dyadic(other))
        return Dyadic(a + b, e)

    __radd__ = __add__

    def __sub__(self, other):
        (a, b), e = Dyadic.align(self, as_dyadic(other))
        return Dyadic(a - b, e)

    def __rsub__(self, other):
        return as_dyadic(other) - self

    def __mul__(self, other):
        other = as_dyadic(other)
        return Dyadic(self.m * other.m, self.e + other.e)

    __rmul__ = __mul__

    def __neg__(self):
        return Dyadic(-self.m, self.e)

    def scale2(self, k: int) -> "Dyadic":
        """Exact multiplication by 2**k."""
        return Dyadic(self.m, self.e + int(k))

    def sign(self) -> np.ndarray:
        """-1, 0, 1 per element as an int64 array."""
        return (self.m > 0).astype(np.int64) - (self.m < 0).astype(np.int64)

    def compare(self, other) -> np.ndarray:
        """Elementwise sign of self - other (int64 array, -1/0/1), exact."""
        (a, b), _ = Dyadic.align(self, as_dyadic(other))
        d = a - b
        return (d > 0).astype(np.int64) - (d < 0).astype(np.int64)

    def sum(self, axis=None, keepdims=False) -> "Dyadic":
        """Exact sum over ``axis`` (an int, a sequence of ints, or None for all)."""
        if axis is not None and not isinstance(axis, int):
            axis = tuple(int(a) for a in axis) or None
        s = np.sum(self.m, axis=axis, keepdims=keepdims)
        return Dyadic(s if isinstance(s, np.ndarray) else _obj(s), self.e)

    def max(self, axis, keepdims=False) -> "Dyadic":
        """Exact maximum over ``axis`` (all elements share one exponent, so integers compare as values)."""
        return Dyadic(np.max(self.m, axis=axis, keepdims=keepdims), self.e)

    def where(self, mask: np.ndarray, other) -> "Dyadic":
        (a, b), e = Dyadic.align(self, as_dyadic(other))
        return Dyadic(np.where(mask, a, b).astype(object), e)

    # -- conversions ---------------------------------------------------------------------------------------------------
    def fraction(self, index) -> Fraction:
        """Exact value of one element."""
        v = int(self.m[index])
        return Fraction(v) * (Fraction(2) ** self.e)

    def to_float64(self) -> np.ndarray:
        """Nearest-ish float64 values (for statistics and tests, never for decisions)."""
        e = self.e

        def conv(v):
            v = int(v)
            n = v.bit_length()
            s = max(0, n - 64)
            return math.ldexp(float(v >> s) if v >= 0 else -float((-v) >> s), e + s)

        if self.m.size == 0:
            return np.zeros(self.shape)
        return np.asarray(np.frompyfunc(conv, 1, 1)(self.m), dtype=np.float64).reshape(self.shape)

    def to_torch(self, dtype=torch.float64) -> torch.Tensor:
        return torch.from_numpy(self.to_float64()).to(dtype)

    def __repr__(self):
        vals = self.to_float64()
        return f"Dyadic(shape={self.shape}, bits={self.bits()}, approx={np.array2string(vals, threshold=8)})"


def as_dyadic(x) -> Dyadic:
    """Dyadic view of an oracle value: Dyadic itself, an integer/bool numpy array, or a Python number."""
    if isinstance(x, Dyadic):
        return x
    if isinstance(x, np.ndarray):
        return Dyadic.from_numpy(x)
    return Dyadic.scalar(x)


# ----------------------------------------------------------------------------------------------------------------------
# Exact matrix products with FLINT


def matmul(a: Dyadic, b: Dyadic) -> Dyadic:
    """Exact (n, k) @ (k, m) with ``flint.fmpz_mat``."""
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(f"matmul shapes {a.shape} @ {b.shape}")
    n, k = a.shape
    m = b.shape[1]
    out = np.empty(n * m, dtype=object)
    if n == 0 or m == 0:
        return Dyadic(out.reshape(n, m), a.e + b.e)
    if k == 0:
        out[:] = 0
        return Dyadic(out.reshape(n, m), a.e + b.e)
    A = flint.fmpz_mat(n, k, a.m.reshape(-1).tolist())
    B = flint.fmpz_mat(k, m, b.m.reshape(-1).tolist())
    out[:] = (A * B).entries()
    return Dyadic(out.reshape(n, m), a.e + b.e)


# ----------------------------------------------------------------------------------------------------------------------
# Rounded operations through mpmath's raw mpf tuples


def raw_array(x: Dyadic) -> np.ndarray:
    """Exact raw mpf tuples of every element (no rounding: prec 0)."""
    e = x.e
    out = np.empty(x.size, dtype=object)
    out[:] = [libmp.from_man_exp(int(v), e) for v in x.m.reshape(-1)]
    return out.reshape(x.shape)


def from_raw_array(raws: np.ndarray) -> Dyadic:
    """Exact Dyadic of an array of finite raw mpf tuples."""
    flat = raws.reshape(-1)
    mans, exps = [], []
    for r in flat:
        sign, man, exp, bc = r
        if not man:
            if r != libmp.fzero:
                raise NonFiniteError(f"the oracle produced a non-finite value ({libmp.to_str(r, 5)})")
            mans.append(0)
            exps.append(None)
            continue
        mans.append(-man if sign else man)
        exps.append(exp)
    finite = [x for x in exps if x is not None]
    if not finite:
        return Dyadic(np.zeros(raws.shape, dtype=object), 0)
    emin = min(finite)
    _check_alignment(max(finite) - emin)
    m = np.empty(len(mans), dtype=object)
    m[:] = [v << (x - emin) if x is not None else 0 for v, x in zip(mans, exps)]
    return Dyadic(m.reshape(raws.shape), emin)


def mpf_map(fn, *xs: Dyadic) -> Dyadic:
    """Apply ``fn(raw, raw, ...) -> raw`` elementwise (broadcasting) and return the exact Dyadic of the results.
    ``fn`` is where rounding happens: it calls ``libmp`` functions with an explicit precision."""
    raws = [raw_array(x) for x in xs]
    raws = np.broadcast_arrays(*raws)
    flat = [r.reshape(-1) for r in raws]
    out = np.empty(flat[0].size, dtype=object)
    out[:] = [fn(*args) for args in zip(*flat)] if len(flat) > 1 else [fn(a) for a in flat[0]]
    return from_raw_array(out.reshape(raws[0].shape))
