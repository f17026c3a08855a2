"""Fused radius kernels: a rule's whole radius formula in one pass over memory (numba).

Why: on the zoo's small tensors a rule's radius costs its kernel launches, not its arithmetic (the elementwise ball
add runs 17 PyTorch kernels, ~5 us each, for what one pass does in ~4 us on 16K elements), and on large tensors each
launch writes a fresh full-size temporary (~11 ms for a 512 x 2048 ball add, 1.8 ms fused).

Contract. A kernel performs, element by element, exactly the floating-point operations of its rule's reference
formula (the torch code beside the rule, next to its derivation): the same operations, in the same order, on operands
of the same dtype, each rounded to nearest (numba compiles without fast-math: no FMA contraction, no reassociation,
IEEE semantics for subnormals, infinities and NaN), followed by the same NaN -> +inf clean-ups. Its radii are
therefore the reference's bit for bit, which ``tests/test_fused.py`` checks on adversarial inputs (zeros of both
signs, subnormals, huge values, inf, NaN). The reference formula stays the only statement of the bound, and the path
wherever a kernel does not apply: tensors not on the CPU, dtypes other than float32/float64, operands that are not
dense, contiguous and of the output's shape, numba missing, or ``BALLGRAD_FUSED=0`` in the environment.

Kernels are compiled on first use (about a second each; ``cache=True`` keeps them across processes).
"""

from __future__ import annotations

import functools
import os

import numpy as np
import torch

_DTYPES = (torch.float32, torch.float64)


@functools.lru_cache(maxsize=1)
def _numba():
    """The numba module, or None where it is not installed or ``BALLGRAD_FUSED=0`` disables the fused kernels."""
    if os.environ.get("BALLGRAD_FUSED", "1") == "0":
        return None
    try:
        import numba
    except ImportError:
        return None
    return numba


def applies(out_like: torch.Tensor, *operands: torch.Tensor) -> bool:
    """Whether the fused kernels can take these tensors: numba present, CPU, float32/float64, every operand of the
    output's shape and dtype, dense and contiguous (so a flat index walks all of them alike)."""
    if out_like.dtype not in _DTYPES or out_like.device.type != "cpu" or _numba() is None:
        return False
    shape, dtype = out_like.shape, out_like.dtype
    return all(t.shape == shape and t.dtype == dtype and t.is_contiguous() for t in operands)


def _flat(t: torch.Tensor) -> np.ndarray:
    """A flat numpy view of a contiguous CPU tensor (no copy)."""
    return t.detach().numpy().reshape(-1)


def _scalar(dtype: torch.dtype):
    """The numpy scalar type of a kernel's constants: a float64 constant would promote float32 arithmetic."""
    return np.float32 if dtype == torch.float32 else np.float64


@functools.lru_cache(maxsize=None)
def _add_kernel():
    numba = _numba()

    @numba.njit(cache=True, nogil=True)
    def add_kernel(x, y, sign, m, ra, rb, phi, a, inf, out):
        mismatches = 0
        for i in range(m.size):
            xi = x[i]
            yi = y[i] * sign  # exact: a negation or a copy
            s = xi + yi
            mismatches += s != m[i]  # NaN counts too (torch.equal fails on NaN)
            bb = s - xi
            e = abs((xi - (s - bb)) + (yi - bb))
            p = ra[i] + rb[i]
            r = e if p == 0 else (p + e) * phi + a
            out[i] = inf if r != r else r  # inflate's and result's NaN -> +inf (+inf stays)
        return mismatches

    return add_kernel


def add_radius(x: torch.Tensor, y: torch.Tensor, sign: float, m: torch.Tensor, ra: torch.Tensor,
               rb: torch.Tensor, phi: float, a: float) -> torch.Tensor | None:
    """``arith._add_rad`` for alpha == 1 and ``result``'s clean-up, fused: TwoSum's exact error e of x + sign*y
    (``rounding.exact_sum_error``), p = ra + rb, and e where p == 0, else inflate(p + e) = (p + e) phi + a with NaN ->
    +inf; then NaN -> +inf. None where the kernel's s = x + sign*y differs from m anywhere (the reference path then
    handles it) -- callers check ``applies`` first."""
    out = torch.empty_like(m)
    sc = _scalar(m.dtype)
    mismatches = _add_kernel()(_flat(x), _flat(y), sc(sign), _flat(m), _flat(ra), _flat(rb), sc(phi), sc(a),
                               sc(np.inf), _flat(out))
    return out if mismatches == 0 else None


@functools.lru_cache(maxsize=None)
def _decided_saved_kernel():
    """For relu's backward: 1 where the saved ball (s, rs) is decided (below: -s > rs, above: s > rs, or the exact
    point 0), else 0 (touching 0, or NaN). Integer arithmetic rather than ``or``: a branch per comparison would be
    mispredicted on the half of the units that are inactive (5 ns per element instead of 0.3)."""
    numba = _numba()

    @numba.njit(cache=True, nogil=True, inline="always")
    def decided_saved(s, rs):
        return min(1, np.int64(abs(s) > rs) + np.int64(s == 0) * np.int64(rs == 0))

    return decided_saved


_CHUNK = 256  # elements per chunk of the touching-index scans


@functools.lru_cache(maxsize=None)
def _touching_kernels():
    """Index lists of the balls that touch 0 (at most ``count``, the caller's tally of the same test): the rare
    elements get their own loop. A branch per element on the data (the sign of x, an inactive unit) is mispredicted
    half the time (5 ns per element instead of 0.3), so each chunk of ``_CHUNK`` elements is first tallied branch-free
    and only chunks with a touching ball are walked element by element."""
    numba = _numba()
    _decided_saved = _decided_saved_kernel()

    @numba.njit(cache=True, nogil=True)
    def touching(xm, xr, count):  # relu: neither -x > r (below) nor x > r (above), NaN included
        where = np.empty(count, np.int64)
        k = 0
        for start in range(0, xm.size, _CHUNK):
            stop = min(start + _CHUNK, xm.size)
            tally = 0
            for i in range(start, stop):
                tally += not abs(xm[i]) > xr[i]
            if tally:
                for i in range(start, stop):
                    if not abs(xm[i]) > xr[i] and k < count:
                        where[k] = i
                        k += 1
        return where[:k]

    @numba.njit(cache=True, nogil=True)
    def touching_saved(sm, sr, count):  # relu's backward: neither below, the exact point 0, nor above
        where = np.empty(count, np.int64)
        k = 0
        for start in range(0, sm.size, _CHUNK):
            stop = min(start + _CHUNK, sm.size)
            tally = 0
            for i in range(start, stop):
                tally += 1 - _decided_saved(sm[i], sr[i])
            if tally:
                for i in range(start, stop):
                    if _decided_saved(sm[i], sr[i]) == 0 and k < count:
                        where[k] = i
                        k += 1
        return where[:k]

    return touching, touching_saved


@functools.lru_cache(maxsize=None)
def _relu_kernel():
    numba = _numba()
    _touching, _ = _touching_kernels()

    @numba.njit(cache=True, nogil=True)
    def relu_kernel(xm, xr, m, eta, zero, one, inf, out):
        # the decided balls branch-free (vectorized), then the rare touching ones, then the clean-up
        touches = 0
        for i in range(m.size):
            x, r = xm[i], xr[i]
            nx = -x
            touches += not abs(x) > r  # neither below (-x > r) nor above (x > r): NaN included
            out[i] = (one if nx <= r else zero) * r  # the indicator of "not below" times r
        for i in _touching(xm, xr, touches):
            x, r = xm[i], xr[i]
            if x < 0:  # _add_up(x, r): fl(x + r), or its successor where TwoSum shows it went down
                s = x + r
                bb = s - x
                e = (x - (s - bb)) + (r - bb)
                h = s if (np.isfinite(e) and e <= 0) else np.nextafter(s, inf)
            else:
                h = r
            out[i] = h if (h != h or h >= eta) else eta  # clamp_min(h, eta), NaN kept
        for i in range(m.size):
            v = out[i] + m[i] * zero  # result_in_place: NaN where m is not finite, then NaN -> +inf
            out[i] = inf if ((v != v) | (v == inf)) else v
        return touches

    return relu_kernel


def relu_radius(xm: torch.Tensor, xr: torch.Tensor, m: torch.Tensor, eta: float) -> tuple[torch.Tensor, int]:
    """``nonsmooth._relu_fast``'s radius and ``result_in_place``'s clean-up, fused, with the number of elements whose
    ball touches 0 (the ``kink`` count). Callers check ``applies`` first."""
    out = torch.empty_like(m)
    sc = _scalar(m.dtype)
    touches = _relu_kernel()(_flat(xm), _flat(xr), _flat(m), sc(eta), sc(0), sc(1), sc(np.inf), _flat(out))
    return out, int(touches)


@functools.lru_cache(maxsize=None)
def _relu_backward_kernel():
    numba = _numba()
    _decided_saved = _decided_saved_kernel()
    _, _touching_saved = _touching_kernels()

    @numba.njit(cache=True, nogil=True)
    def relu_backward_kernel(gm, gr, sm, sr, m, zero, one, inf, out):
        # as in the relu kernel
        touches = 0
        for i in range(m.size):
            s, rs = sm[i], sr[i]
            touches += _decided_saved(s, rs) == 0  # touching 0, or NaN
            out[i] = (one if s > rs else zero) * gr[i]  # the indicator of "above" times rG
        for i in _touching_saved(sm, sr, touches):
            s, a, rg = sm[i], abs(gm[i]), gr[i]
            if s > 0:  # maximum(|g|, rG), NaN kept
                out[i] = a if a != a else (rg if rg != rg else (a if a >= rg else rg))
            else:  # rounding.add_up(|g|, rG)
                out[i] = np.nextafter(a + rg, inf)
        for i in range(m.size):
            v = out[i] + m[i] * zero  # result_in_place
            out[i] = inf if ((v != v) | (v == inf)) else v
        return touches

    return relu_backward_kernel


def relu_backward_radius(gm, gr, sm, sr, m) -> tuple[torch.Tensor, int]:
    """``backward._relu_backward_fast``'s radius (both operands balls) and ``result_in_place``'s clean-up, fused,
    with the number of elements whose saved ball touches 0 (the ``kink`` count). Callers check ``applies`` first."""
    out = torch.empty_like(m)
    sc = _scalar(m.dtype)
    touches = _relu_backward_kernel()(_flat(gm), _flat(gr), _flat(sm), _flat(sr), _flat(m), sc(0), sc(1),
                                      sc(np.inf), _flat(out))
    return out, int(touches)
