"""Fused radius kernels: a rule's whole radius formula in one pass over memory (numba).

Why: on the zoo's small tensors a rule's radius costs its kernel launches, not its arithmetic (the elementwise ball
add runs 17 PyTorch kernels, ~5 us each, for what one pass does in ~4 us on 16K elements), and on large tensors each
launch writes a fresh full-size temporary (~11 ms for a 512 x 2048 ball add, 1.8 ms fused).

Contract. A kernel performs, element by element, exactly the floating-point operations of its rule's reference
formula (the torch code beside the rule, next to its derivation): the same operations, in the same order, on operands
of the same dtype, each rounded to nearest (numba compiles without fast-math: no FMA contraction, no reassociation,
IEEE semantics for subnormals, infinities and NaN), followed by the same NaN -> +inf clean-ups. Its radii are
therefore the reference's bit for bit, which ``tests/test_fused.py`` checks on adversarial inputs (zeros of both
signs, subnormals, huge values, inf, NaN). Two departures, each stated in its section's header and covered by the
same derivation: a sum may run in index order where the reference's reduction has its own (layer norm, log_softmax's
backward, sum and mean, nll_loss's forward, the GEMM bound's row sums: F3 and the theta factors hold for any order),
and a product and an addition may round twice where the reference's ``add_(alpha=)``/``addcmul_`` may fuse them
(``inflate``'s lemma counts both roundings); those kernels are checked against the reference within the difference
the order or the rounding can make, and against the mpmath oracle through the rules' own tests. Infinities that
meet ``nextafter`` are typed in the computation's dtype (a float64 infinity would make a float32 step in float64,
which the float32 store rounds away). The reference formula stays the only statement of the bound, and the path
wherever a kernel does not apply: tensors not on the CPU, dtypes other than float32/float64, operands that are not
dense and contiguous (broadcast operands of an addition are copied dense first), numba missing, or
``BALLGRAD_FUSED=0`` in the environment.

Kernels are compiled on first use (about a second each; ``cache=True`` keeps them across processes).
"""

from __future__ import annotations

import functools
import math
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


def dense_operands(out_like: torch.Tensor, *operands: torch.Tensor) -> list[torch.Tensor] | None:
    """The operands broadcast to the output's shape as dense contiguous tensors (a copy only where one is not already
    that), so that an elementwise kernel reads element i of each at flat index i; None where ``applies`` refuses them
    (a dtype other than the output's, not on the CPU, numba missing, a non-contiguous output)."""
    if (out_like.dtype not in _DTYPES or out_like.device.type != "cpu" or not out_like.is_contiguous()
            or any(t.dtype != out_like.dtype for t in operands) or _numba() is None):
        return None
    shape = out_like.shape
    dense = [t if t.shape == shape and t.is_contiguous() else t.expand(shape).contiguous() for t in operands]
    return dense if applies(out_like, *dense) else None


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


# ----------------------------------------------------------------------------------------------------------------------
# Layer norm (``normalization._layer_norm_fused_forward`` / ``_backward``)
#
# Contract, weaker than the elementwise kernels' above: per element the kernels perform the reference formula's
# operations (``normalization``'s ``_statistics``, ``_mul_full``, ``_affine_output``, ``_mean_ball``, ``_hull``,
# ``_grad_times_xhat``, ``_sum_ball(s)``, ``_dot_ball``, ``_k_coefficients``, ``_gradient_input_rad``,
# ``_recentre_balls``), each rounded to nearest, with an outward step wherever the reference takes one; but
#   - every group sum runs in index order, where the reference's reduction has its own order: the bounds that read a
#     sum (F3: gamma_(n-1), and ``_sum_up``/``_sum_down``'s theta factors) hold for a sum in any order, so the
#     derivation is unchanged and the radii differ from the reference's by the last bits of those sums;
#   - the outward steps are RZBM's (``_SUCC_PHI``), which bound succ/pred from outside as nextafter does (F2);
#   - 1/sqrt(var + eps) is enclosed with IEEE sqrt and division, both correctly rounded (LLVM's sqrt and fdiv without
#     fast-math): with s = fl(sqrt t), pred(s) <= sqrt t <= succ(s), and 1/x decreasing, so
#     down(1/succ(fl sqrt t_hi)) <= 1/sqrt(t_hi) and 1/sqrt(t_lo) <= up(1/pred(fl sqrt t_lo)) (pred clamped at 0,
#     which 1/0 = +inf keeps an upper bound), in place of the trust-table sqrt of ``elementwise._rsqrt_enclose``.
# ``tests/test_fused.py`` checks both kernels against the mpmath oracle and against the reference path.
# Constants come in one float64 array (named at the top of each kernel); ``rows`` groups of ``n`` contiguous elements.


# RZBM's successor step (DESIGN F2; ``nn._step``): for every float64 c, fl(c + fl(fl(phi |c|) + e0)) >= succ(c) and
# fl(c - fl(fl(phi |c|) + e0)) <= pred(c), with phi >= u(1 + 2u) and any e0 >= eta; e0 = 2^-600 keeps the step's
# operands normal (a subnormal operand costs a microcode assist per operation on x86). inf and NaN stay or become NaN,
# which the kernels turn into +inf radii.
_SUCC_PHI = 2.0**-53 + 2.0**-105  # u(1 + 2u) for u = 2^-53, exactly
_SUCC_E0 = 2.0**-600


@functools.lru_cache(maxsize=None)
def _scalar_steps():
    """Scalar outward steps and clean-ups shared by the layer-norm kernels (float64)."""
    numba = _numba()
    jit = numba.njit(cache=True, nogil=True, inline="always", error_model="numpy")
    phi, e0 = _SUCC_PHI, _SUCC_E0

    @jit
    def up(x):  # >= succ(x): RZBM's step (DESIGN F2), inline arithmetic instead of a libm nextafter call (5 ns)
        return x + (abs(x) * phi + e0)

    @jit
    def dn(x):  # <= pred(x)
        return x - (abs(x) * phi + e0)

    @jit
    def clamp0(x):  # torch.clamp_min(x, 0): NaN stays NaN
        return 0.0 if x < 0.0 else x

    @jit
    def inflate(x, phi, a):  # rounding.inflate with its constants: NaN -> +inf (+inf stays)
        v = x * phi + a
        return np.inf if v != v else v

    @jit
    def nan_max(a, b):  # torch.maximum / amax: NaN if either is
        if a != a or b != b:
            return np.nan
        return a if a >= b else b

    @jit
    def nan_min(a, b):
        if a != a or b != b:
            return np.nan
        return a if a <= b else b

    @jit
    def from_bounds(lo, hi):  # reductions._from_bounds: (mid, rad) of a ball containing [lo, hi]
        c = lo * 0.5 + hi * 0.5
        r = nan_max(up(c - lo), up(hi - c))
        if lo == hi and c == lo:
            r = 0.0
        return c, (np.inf if r != r else r)

    @jit
    def recentre(mk, c, r, narrow):  # normalization._recentre_balls for one element: rad around the kernel's mk
        m64 = np.float64(mk)
        rad = r if m64 == c else up(up(abs(m64 - c)) + r)
        if narrow:  # rounding.to_dtype_up to float32: RN, then one succ where it went down (an exact comparison)
            y = np.float32(rad)
            if np.float64(y) < rad:
                y = np.nextafter(y, np.float32(np.inf))
            rad = np.float64(y)
        return np.inf if rad != rad else rad

    @jit
    def ball_mul(ac, ar, bc, br, u):  # normalization._mul: a b with every radius operation rounded outward
        c = ac * bc
        spread = up(up(abs(ac) * br) + up(ar * up(abs(bc) + br)))
        return c, up(spread + up(up(abs(c) * u)))

    @jit
    def any_positive(r):  # normalization._is_point's test, negated: some radius > 0 (empty: a plain tensor)
        for i in range(r.size):
            if r[i] > 0:
                return True
        return False

    @jit
    def row_sum(x, o, n):  # sum of x[o:o + n] in float64, in index order
        s = 0.0
        for j in range(n):
            s += np.float64(x[o + j])
        return s

    return up, dn, clamp0, inflate, nan_max, nan_min, from_bounds, recentre, ball_mul, any_positive, row_sum


# Indices of the layer-norm constants (``normalization._layer_norm_constants``)
(LN_U, LN_F0, LN_F1, LN_F2, LN_FDN, LN_NETA, LN_GAMMA, LN_GC1, LN_KAPPA, LN_OPU, LN_OPU2, LN_OMU2, LN_PHI1, LN_A1,
 LN_PHI2, LN_A2, LN_PHI3, LN_A3, LN_PHI4, LN_A4, LN_PHI6H, LN_A6H, LN_PHI2E, LN_A2E, LN_PHI_OUT, LN_A_OUT, LN_PHI_GX,
 LN_A_GX, LN_ROW_F0, LN_ROW_GAMMA, LN_COUNT) = range(31)


@functools.lru_cache(maxsize=None)
def _layer_norm_forward_kernel():
    numba = _numba()
    up, dn, clamp0, inflate, nan_max, nan_min, from_bounds, recentre, ball_mul, any_positive, row_sum = _scalar_steps()

    @numba.njit(cache=True, nogil=True, error_model="numpy")  # IEEE division: 1/0 = +inf, no exception
    def forward(m, r, wc, wr, bc, br, has_w, has_b, out, mean, rstd, k, eps, narrow, rows, n, out_rad, mean_rad,
                rstd_rad):
        u, f0, f1, f2, fdn, neta = k[LN_U], k[LN_F0], k[LN_F1], k[LN_F2], k[LN_FDN], k[LN_NETA]
        gc1, opu, opu2, omu2 = k[LN_GC1], k[LN_OPU], k[LN_OPU2], k[LN_OMU2]
        phi1, a1, phi4, a4 = k[LN_PHI1], k[LN_A1], k[LN_PHI4], k[LN_A4]
        phi6h, a6h, phi2e, a2e, phi_o, a_o = k[LN_PHI6H], k[LN_A6H], k[LN_PHI2E], k[LN_A2E], k[LN_PHI_OUT], k[LN_A_OUT]
        nf = np.float64(n)
        has_r = any_positive(r)  # normalization._radius_of: a point unless some radius is > 0
        for i in range(rows):
            o = i * n
            # _statistics: the computed mean c, then the sums of d = m - c
            c = row_sum(m, o, n) / nf
            s_a = s_d = sq = s_r = s_r2a = 0.0
            for j in range(n):
                d = np.float64(m[o + j]) - c
                a = abs(d)
                s_a += a
                s_d += d
                sq += d * d
                if has_r:
                    rj = np.float64(r[o + j])
                    s_r += rj
                    s_r2a += (a * 2.0 + rj) * rj
            # _sum_bounds: [sum a, U, L, sum r, sum r(2a + r)], kinds (0, 1, -1, 0, 2)
            big_a = clamp0(up(clamp0(up(s_a * f0)) + 0.0))
            big_u = clamp0(up(clamp0(up(sq * f1)) + neta))
            big_l = clamp0(dn(clamp0(dn(sq * fdn)) - neta))
            w0 = clamp0(up(big_a * gc1))
            up_u = clamp0(up(big_u * opu2))
            lo_l = clamp0(dn(big_l * omu2))
            e = up(up(abs(s_d) + w0) / nf)
            v_hi = clamp0(up(up_u / nf))
            v_lo = dn(clamp0(dn(lo_l / nf)) - up(e * e))
            if has_r:
                sum_r = clamp0(up(clamp0(up(s_r * f0)) + 0.0))
                sum_r2a = clamp0(up(clamp0(up(s_r2a * f2)) + neta))
                mean_r = up(e + up(sum_r / nf))
                pert = up(up(up(sum_r2a * opu) + up(up(e * 2.0) * sum_r)) / nf)
            else:
                mean_r = e
                pert = 0.0
            var_hi = clamp0(up(v_hi + pert))
            var_lo = clamp0(dn(v_lo - pert))
            # 1/sqrt(var + eps) (the header's enclosure), as a ball
            lower = clamp0(dn(1.0 / up(math.sqrt(up(var_hi + eps)))))
            upper = up(1.0 / clamp0(dn(math.sqrt(clamp0(dn(var_lo + eps))))))
            sc, sr = from_bounds(lower, upper)
            mean_rad[i] = recentre(mean[i], c, mean_r, narrow)
            rstd_rad[i] = recentre(rstd[i], sc, sr, narrow)
            # the output: scale = _mul_full(rstd, w) (or rstd), then _affine_output
            for j in range(n):  # (no value carried from one j to the next: the loop vectorizes)
                if has_w:
                    wcj, wrj = np.float64(wc[j]), np.float64(wr[j])
                    f = sc * wcj
                    fr = inflate(abs(f) * u + abs(sc) * wrj + sr * (abs(wcj) + wrj), phi6h, a6h)
                else:
                    f, fr = sc, sr
                af = abs(f)
                h = inflate(af + fr, phi1, a1)
                g = inflate(h * u + fr + af * (3.0 * u), phi4, a4)
                d = np.float64(m[o + j]) - c
                ex = abs(d) * g
                if has_r:
                    ex = ex + np.float64(r[o + j]) * h
                term = mean_r * h
                if has_b:
                    term = term + inflate(np.float64(br[j]) + abs(np.float64(bc[j])) * (2.0 * u), phi2e, a2e)
                ex = ex + term
                cc = d * f
                if has_b:
                    cc = cc + np.float64(bc[j])
                ex = ex + abs(cc - np.float64(out[o + j]))
                v = ex * phi_o + a_o
                out_rad[o + j] = np.inf if v != v else v

    return forward


@functools.lru_cache(maxsize=None)
def _layer_norm_backward_kernel():
    numba = _numba()
    up, dn, clamp0, inflate, nan_max, nan_min, from_bounds, recentre, ball_mul, any_positive, row_sum = _scalar_steps()

    @numba.njit(cache=True, nogil=True, error_model="numpy")
    def backward(gm, gr, m, r, mean_c, mean_r, rstd_c, rstd_r, wc, wr, has_w, gx, gw, gb, want_gx, want_gw,
                 want_gb, k, narrow, rows, n, gx_rad, gw_rad, gb_rad):
        u, f0, f1, f2, neta, gam = k[LN_U], k[LN_F0], k[LN_F1], k[LN_F2], k[LN_NETA], k[LN_GAMMA]
        gc1, kappa, opu = k[LN_GC1], k[LN_KAPPA], k[LN_OPU]
        phi1, a1, phi2, a2, phi3, a3 = k[LN_PHI1], k[LN_A1], k[LN_PHI2], k[LN_A2], k[LN_PHI3], k[LN_A3]
        phi4, a4, phi6h, a6h, phi_gx, a_gx = k[LN_PHI4], k[LN_A4], k[LN_PHI6H], k[LN_A6H], k[LN_PHI_GX], k[LN_A_GX]
        row_f0, row_gamma = k[LN_ROW_F0], k[LN_ROW_GAMMA]
        nf = np.float64(n)
        has_r, has_gr = any_positive(r), any_positive(gr)
        has_g_r = has_w or has_gr  # g = _mul_full(gy, w) always has a radius; gy alone only if it is a ball
        # column sums over the rows (grad_weight's product balls and grad_bias's gy), float64
        cw_sum = np.zeros(n)
        cw_abs = np.zeros(n)
        rw_sum = np.zeros(n)
        gb_sum = np.zeros(n)
        gb_abs = np.zeros(n)
        gr_sum = np.zeros(n)
        d_buf, gc_buf, gr_buf = np.empty(n), np.empty(n), np.empty(n)  # one row's d = x - mu, g.c, g.r
        for i in range(rows):
            o = i * n
            # mu: the hull of the saved mean and _mean_ball (the mean of x recomputed)
            c2 = row_sum(m, o, n) / nf
            s_a = s_d = s_r = 0.0
            for j in range(n):
                d = np.float64(m[o + j]) - c2
                s_a += abs(d)
                s_d += d
                if has_r:
                    s_r += np.float64(r[o + j])
            big_a = up(up(s_a * f0))
            e = up(up(abs(s_d) + up(big_a * gc1)) / nf)
            if has_r:
                e = up(e + up(up(up(s_r * f0)) / nf))
            mc = np.float64(mean_c[i])  # the saved statistics as float64 balls (``_as_ball``; a plain one: radius 0)
            mr = np.float64(mean_r[i]) if mean_r.size else 0.0
            lo = nan_min(dn(mc - mr), dn(c2 - e))
            hi = nan_max(up(mc + mr), up(c2 + e))
            mu_c, mu_r = from_bounds(lo, hi)
            s_c = np.float64(rstd_c[i])
            s_r_ = np.float64(rstd_r[i]) if rstd_r.size else 0.0
            # pass B: grad_weight / grad_bias column terms, g = _mul_full(gy, w) (or gy) into row buffers (no value
            # carried from one j to the next: the loop vectorizes), then the row sums of g and of g z
            for j in range(n):
                d = np.float64(m[o + j]) - mu_c
                a = abs(d)
                gcv = np.float64(gm[o + j])
                grv = np.float64(gr[o + j]) if has_gr else 0.0
                if want_gw:  # _grad_times_xhat
                    rho = a * u
                    if has_r:
                        rho = rho + np.float64(r[o + j])
                    rho = inflate(rho + mu_r, phi3, a3)
                    c1 = d * s_c
                    r1 = inflate(abs(c1) * u + a * s_r_ + rho * (abs(s_c) + s_r_), phi6h, a6h)
                    cw = gcv * c1
                    ex = abs(cw) * u + abs(gcv) * r1
                    if has_gr:
                        ex = ex + grv * (abs(c1) + r1)
                    cw_sum[j] += cw
                    cw_abs[j] += abs(cw)
                    rw_sum[j] += inflate(ex, phi6h, a6h)
                if want_gb:
                    gb_sum[j] += gcv
                    gb_abs[j] += abs(gcv)
                    gr_sum[j] += grv
                if has_w:
                    wcj, wrj = np.float64(wc[j]), np.float64(wr[j])
                    g_c = gcv * wcj
                    ex = abs(g_c) * u + abs(gcv) * wrj
                    if has_gr:
                        ex = ex + grv * (abs(wcj) + wrj)
                    g_r = inflate(ex, phi6h, a6h)
                else:
                    g_c, g_r = gcv, grv
                d_buf[j], gc_buf[j], gr_buf[j] = d, g_c, g_r
            if not want_gx:
                continue
            sg = sga = sgr = dt = s1 = s2 = s3 = 0.0
            for j in range(n):  # _sum_ball's and _dot_ball's sums
                d, g_c, g_r = d_buf[j], gc_buf[j], gr_buf[j]
                a, ag = abs(d), abs(g_c)
                sg += g_c
                sga += ag
                sgr += g_r
                dt += d * g_c
                s1 += a * ag
                s2 += a * g_r
                if has_r:
                    s3 += np.float64(r[o + j]) * (ag + g_r)
            # _sum_ball(g): the total S and the bounds of sum |g.c| (abs_sum) and sum g.r (rad_sum)
            abs_sum = up(up(sga * f0))
            t_r = up(abs_sum * gam) if n > 1 else 0.0
            rad_sum = 0.0
            if has_g_r:
                rad_sum = up(up(sgr * f0))
                t_r = up(t_r + rad_sum)
            # _dot_ball: D = sum g z
            u1 = clamp0(up(clamp0(up(s1 * f1)) + neta))
            d_r = up(up(u1 * kappa) + neta)
            weights = abs_sum
            if has_g_r:
                u2 = clamp0(up(clamp0(up(s2 * f1)) + neta))
                d_r = up(d_r + up(u2 * opu))
                weights = up(weights + rad_sum)
            if has_r:
                d_r = up(d_r + clamp0(up(clamp0(up(s3 * f2)) + neta)))
            d_r = up(d_r + up(mu_r * weights))
            # _k_coefficients: K2 = K1 (S/n), K3 = (K1 s^2)(D/n) with K1 = s = rstd (_div_count, _mul)
            q0c = sg / nf
            q0r = up(up(t_r / nf) + up(up(abs(q0c) * u)))
            q1c = dt / nf
            q1r = up(up(d_r / nf) + up(up(abs(q1c) * u)))
            ss_c, ss_r = ball_mul(s_c, s_r_, s_c, s_r_, u)
            k2c, k2r = ball_mul(s_c, s_r_, q0c, q0r, u)
            p1c, p1r = ball_mul(s_c, s_r_, ss_c, ss_r, u)
            k3c, k3r = ball_mul(p1c, p1r, q1c, q1r, u)
            # _gradient_input_rad with K1 = s
            p1 = inflate(s_r_ + abs(s_c) * (4.0 * u), phi2, a2)
            p2 = inflate(s_r_ + abs(s_c) * 1.0, phi1, a1)
            h3 = inflate(k3r + abs(k3c) * 1.0, phi1, a1)
            jj = inflate(k2r + abs(k2c) * (2.0 * u), phi2, a2)
            coef = inflate(k3r + h3 * u + abs(k3c) * (4.0 * u), phi4, a4)
            row_term = mu_r * h3 + jj
            for j in range(n):
                d, g_c, g_r = d_buf[j], gc_buf[j], gr_buf[j]
                ex = abs(d) * coef + abs(g_c) * p1
                if has_g_r:
                    ex = ex + g_r * p2
                if has_r:
                    ex = ex + np.float64(r[o + j]) * h3
                ex = ex + row_term
                cc = d * (-k3c) + g_c * s_c - k2c
                ex = ex + abs(cc - np.float64(gx[o + j]))
                v = ex * phi_gx + a_gx
                gx_rad[o + j] = np.inf if v != v else v
        # grad_weight and grad_bias: _sum_balls over the rows, re-centred on the kernel's sums
        for j in range(n):
            if want_gw:
                a_s = up(up(cw_abs[j] * row_f0))
                t = up(a_s * row_gamma) if rows > 1 else 0.0
                t = up(t + up(up(rw_sum[j] * row_f0)))
                gw_rad[j] = recentre(gw[j], cw_sum[j], t, narrow)
            if want_gb:
                a_s = up(up(gb_abs[j] * row_f0))
                t = up(a_s * row_gamma) if rows > 1 else 0.0
                if has_gr:
                    t = up(t + up(up(gr_sum[j] * row_f0)))
                gb_rad[j] = recentre(gb[j], gb_sum[j], t, narrow)

    return backward


def layer_norm_forward(m, r, wc, wr, bc, br, out, mean, rstd, k, eps, rows, n):
    """Radii (out, mean, rstd) of ``normalization.native_layer_norm`` in one compiled pass per row (the header's
    contract). Arguments: contiguous CPU tensors (r, wr, br: radii, or empty for points; wc, bc empty when absent),
    ``k`` the constants (``normalization._layer_norm_constants``)."""
    rd = out.dtype
    out_rad = torch.empty_like(out, dtype=rd)
    mean_rad, rstd_rad = torch.empty_like(mean, dtype=rd), torch.empty_like(rstd, dtype=rd)
    _layer_norm_forward_kernel()(_flat(m), _flat(r), _flat(wc), _flat(wr), _flat(bc), _flat(br), wc.numel() > 0,
                                 bc.numel() > 0, _flat(out), _flat(mean), _flat(rstd), k, float(eps),
                                 rd == torch.float32, rows, n, _flat(out_rad), _flat(mean_rad), _flat(rstd_rad))
    return out_rad, mean_rad, rstd_rad


def layer_norm_backward(gm, gr, m, r, mean_c, mean_r, rstd_c, rstd_r, wc, wr, outs, k, rows, n):
    """Radii (grad_input, grad_weight, grad_bias; None where the output is not asked for) of
    ``normalization.native_layer_norm_backward`` (the header's contract). ``mean_*``, ``rstd_*``: the saved statistics'
    midpoints and radii per row (radii empty for plain tensors); ``outs``: the kernel's three outputs (or None)."""
    rads = [None if o is None else torch.empty_like(o) for o in outs]
    empty = torch.empty(0, dtype=gm.dtype)
    arrays = [_flat(o if o is not None else empty) for o in outs] + [_flat(q if q is not None else empty)
                                                                       for q in rads]
    _layer_norm_backward_kernel()(_flat(gm), _flat(gr), _flat(m), _flat(r), _flat(mean_c), _flat(mean_r),
                                  _flat(rstd_c), _flat(rstd_r), _flat(wc), _flat(wr), wc.numel() > 0,
                                  arrays[0], arrays[1], arrays[2], outs[0] is not None, outs[1] is not None,
                                  outs[2] is not None, k, gm.dtype == torch.float32, rows, n,
                                  arrays[3], arrays[4], arrays[5])
    return rads


# ----------------------------------------------------------------------------------------------------------------------
# log_softmax's backward (``nn.log_softmax_backward_radius``), rows along the last dim
#
# Contract as the layer-norm kernels': per element the reference's operations (the exp bounds P from torch's own exp,
# which the trust table covers, computed before the kernel; nextafter as in the reference), the row sums in index
# order (F3 and ``_exact_sum_mask``'s test hold in any order).


@functools.lru_cache(maxsize=None)
def _log_softmax_backward_kernel():
    numba = _numba()

    @numba.njit(cache=True, nogil=True, error_model="numpy")
    def log_softmax_backward(mg, rg, e, m, k, wide, rows, n, out):
        c_e, g_s, th, u, phi1, a1 = k[0], k[1], k[2], k[3], k[4], k[5]
        has_rg = rg.size > 0
        phi, a = (k[8], k[9]) if has_rg else (k[6], k[7])
        size = rows * n
        bad = 0
        for i in range(rows):
            o = i * n
            s = sa = sr = 0.0
            count = 0
            top, low = 0.0, np.inf  # max |G| (NaN kept) and min |G| > 0 of the row (``_exact_sum_mask``)
            for j in range(n):
                g = np.float64(mg[o + j])
                ag = abs(g)
                s += g
                sa += ag
                count += ag > 0.0
                top = np.nan if (ag != ag or top != top) else (ag if ag > top else top)
                if ag > 0.0 and ag < low:
                    low = ag
                if has_rg:
                    sr += np.float64(rg[o + j])
            e_s = np.nextafter(sa * g_s, np.inf)
            if count <= 1 or (not wide and top * np.float64(n) <= low * 2.0**29):
                e_s = 0.0
            base = np.nextafter(sr * th, np.inf)
            for j in range(n):
                g = np.float64(mg[o + j])
                m64 = np.float64(m[o + j])
                rad = 0.0
                for h in range(2):  # P's lower end (half 0) and upper end (half 1)
                    eh = e[h * size + o + j]
                    sign = -1.0 if h == 0 else 1.0
                    p = np.nextafter(eh + sign * (eh * c_e * phi1 + a1), sign * np.inf)
                    p = 0.0 if p < 0.0 else p
                    t1 = p * s
                    t2 = g - t1
                    t3 = t2 - m64
                    bb = t2 - g
                    t4 = t3 + ((g - (t2 - bb)) - (bb + t1))
                    c = abs(t4)
                    c = c + (abs(t1) + abs(t3) + c) * u
                    if has_rg:
                        rj = np.float64(rg[o + j])
                        rest = np.nextafter(base - rj, np.inf)
                        c = c + p * (e_s + rest) + abs(1.0 - p) * rj
                    else:
                        c = c + p * e_s
                    v = c * phi + a
                    rad = np.nan if (v != v or rad != rad) else (v if v > rad else rad)
                if not np.isfinite(rad):
                    bad += 1
                out[o + j] = rad
        return bad

    return log_softmax_backward


def log_softmax_backward_radius(mg, rg, e, m, k) -> torch.Tensor | None:
    """The float64 radius of ``nn.log_softmax_backward_radius`` (rows along the last dim; ``e`` = exp of the stacked
    end points [z_lo, z_hi], float64), or None where some radius is not finite (the caller's composition copes)."""
    n = m.shape[-1]
    out = torch.empty(m.shape, dtype=torch.float64)
    bad = _log_softmax_backward_kernel()(_flat(mg), _flat(rg), _flat(e), _flat(m), k, mg.dtype == torch.float64,
                                         m.numel() // n, n, _flat(out))
    return None if bad else out


# ----------------------------------------------------------------------------------------------------------------------
# The measured GEMM bound's passes over the output (``linalg._residual32`` / ``_blocked_residual`` and the sum of
# ``linalg._measured_radius_f32``), float32 radii of 2-D float32 outputs
#
# The residual kernel is the reference bit for bit: e = RN_32(|R - m|) with the float64 difference of the reference R
# and the exactly widened m (one float64 rounding), its absolute value, and one round-to-nearest conversion (an
# overflow gives +inf), as ``reference.sub_(m).abs_().to(float32)``.
# The finish kernel evaluates the reference's sum t = e C_e + s C_s + rows_i cols_l + rc_l C_1 + |mc|_l C_2 in that
# order, every product and addition a float32 operation rounded to nearest, then fl(fl(t phi) + a) with NaN -> +inf.
# The reference's ``add_(x, alpha=c)`` and ``addcmul_`` may run as fused multiply-adds (one rounding instead of
# two), so the radii can differ in the last bits; the bound holds for either evaluation: ``inflate``'s lemma counts a
# product and an addition per term, each at most one relative rounding of a non-negative result, and an FMA's single
# rounding is within that.


@functools.lru_cache(maxsize=None)
def _gemm_kernels():
    numba = _numba()

    @numba.njit(cache=True, nogil=True)
    def residual(ref, m, e):  # e = RN_32(|ref - m|), 2-D arrays of one shape
        for i in range(ref.shape[0]):
            for j in range(ref.shape[1]):
                e[i, j] = np.float32(abs(ref[i, j] - np.float64(m[i, j])))

    @numba.njit(cache=True, nogil=True)
    def finish(e, s, rows, cols, rc, amc, k):  # in place over e (a separate output array that aliases e would defeat
        c_e, c_s, c_1, c_2, phi, a = k[0], k[1], k[2], k[3], k[4], k[5]  # LLVM's vectorisation: 8x slower)
        has_s, has_bounds, has_bias = s.size > 0, rows.size > 0, rc.size > 0
        inf = np.float32(np.inf)
        for i in range(e.shape[0]):
            for j in range(e.shape[1]):
                t = e[i, j] * c_e
                if has_s:
                    t = t + s[i, j] * c_s
                if has_bounds:
                    t = t + rows[i] * cols[j]
                if has_bias:
                    t = t + rc[j] * c_1
                    t = t + amc[j] * c_2
                r = t * phi + a
                e[i, j] = inf if r != r else r

    return residual, finish


def gemm_residual_into(reference: torch.Tensor, m: torch.Tensor, e: torch.Tensor) -> None:
    """``e[...] = RN_32(|reference - m|)`` for 2-D CPU tensors of one shape (reference float64, m and e float32; any
    strides), the reference's ``copy_(reference.sub_(m).abs_())`` in one pass without modifying ``reference``."""
    _gemm_kernels()[0](reference.numpy(), m.detach().numpy(), e.numpy())


def gemm_finish(e: torch.Tensor, s, rows, cols, rc, amc, constants) -> torch.Tensor:
    """``linalg._measured_radius_f32``'s sum and inflation in one pass (the header's contract), written over ``e``
    (float32, 2-D, contiguous): numpy float32 arrays s of e's shape (or 0 x 0 when absent), rows and cols (the outer
    product bound; empty when absent), rc and amc along the columns (the bias terms; empty when absent), and
    ``constants`` (C_e, C_s, C_1, C_2, phi, a)."""
    _gemm_kernels()[1](e.numpy(), s, rows, cols, rc, amc, constants)
    return e


# ----------------------------------------------------------------------------------------------------------------------
# log_softmax's pairwise forward (``nn._log_softmax_pairwise``), float32 rows along the last dim whose pair
# differences are exact (``nn._exact_pairs``)
#
# The reference bit for bit: the kernels perform its elementwise operations in its order, each rounded to nearest in
# float64 (the products by the signs -+1 exact, as there), and leave to torch what the trust table or the summation
# order rests on: the exps and their row sums, expm1, the addition t + b and log1p run between the two kernels as in
# the reference.


@functools.lru_cache(maxsize=None)
def _log_softmax_pairwise_kernels():
    numba = _numba()
    phi, e0 = _SUCC_PHI, _SUCC_E0

    @numba.njit(cache=True, nogil=True, error_model="numpy")
    def pairs(m, r, y, neg_shift):
        """y[h, n, i, j] = step_h(z - K) with z[0] = lo_j - hi_i, z[1] = hi_j - lo_i (exact), K = max(0, max_j z) per
        half and row, -inf on the diagonal; neg_shift = -K. False (nothing usable) where the row's pair differences
        are not all exact (``nn._exact_pairs``: max(|m| + r) <= 2^28 min(|m|, r > 0) over the row)."""
        rows, n = m.shape
        for k in range(rows):
            top, low = 0.0, np.inf
            for j in range(n):
                am, ar = abs(np.float64(m[k, j])), np.float64(r[k, j])
                s = am + ar
                if s != s or s > top:
                    top = s
                if am > 0.0 and am < low:
                    low = am
                if ar > 0.0 and ar < low:
                    low = ar
            if not (top <= low * 2.0**28 and top < np.inf):  # (non-finite rows: the reference path)
                return False
        for k in range(rows):
            for h in range(2):
                sign = -1.0 if h == 0 else 1.0
                for i in range(n):
                    mi, ri = np.float64(m[k, i]), np.float64(r[k, i])
                    own = mi + ri if h == 0 else mi - ri  # hi_i (half 0) / lo_i (half 1)
                    shift = 0.0
                    for j in range(n):
                        if j != i:
                            zj = (np.float64(m[k, j]) + sign * np.float64(r[k, j])) - own
                            y[h, k, i, j] = zj
                            if zj > shift:
                                shift = zj
                    for j in range(n):
                        if j == i:
                            y[h, k, i, j] = -np.inf
                        else:
                            c = y[h, k, i, j] - shift
                            y[h, k, i, j] = c + sign * (abs(c) * phi + e0)
                    neg_shift[h, k, i] = -shift
        return True

    @numba.njit(cache=True, nogil=True, error_model="numpy")
    def finish(t, b, a, w, neg_shift, m, kd, kx, ka, c_l, u, phi_f, a_f, out):
        """The radius (float32, rounded up) from the row sums t = sum_j exp(y), b = expm1(-K), a = t + b,
        w = log1p(a); False where some radius is not finite."""
        rows, n = m.shape
        for k in range(rows):
            for i in range(n):
                rad = 0.0
                for h in range(2):
                    sign = -1.0 if h == 0 else 1.0
                    th, bh, ah, wh = t[h, k, i], b[h, k, i], a[h, k, i], w[h, k, i]
                    v = -neg_shift[h, k, i] + wh
                    d = ah + 1.0
                    q = ((th * kd + abs(bh) * kx) + ka) / (0.0 if d < 0.0 else d)
                    p = (v + np.float64(m[k, i])) * sign
                    c = ((abs(p) + abs(v)) * u + abs(wh) * c_l) + q
                    ph = np.nextafter(p + (c * phi_f + a_f), np.inf)
                    rad = np.nan if (ph != ph or rad != rad) else (ph if ph > rad else rad)
                if not np.isfinite(rad):
                    return False
                rad = 0.0 if rad < 0.0 else rad
                y = np.float32(rad)
                if np.float64(y) < rad:
                    y = np.nextafter(y, np.float32(np.inf))
                out[k, i] = y
        return True

    return pairs, finish


def log_softmax_pairwise(m: torch.Tensor, mid: torch.Tensor, rad: torch.Tensor, constants) -> torch.Tensor | None:
    """The float32 radius of ``nn._log_softmax_pairwise`` for float32 rows along the last dim (2-D contiguous m, mid,
    rad), bit for bit, or None where the reference would not take its exact-pairs branch or would decline."""
    rows, n = m.shape
    pairs, finish = _log_softmax_pairwise_kernels()
    y = torch.empty((2, rows, n, n), dtype=torch.float64)
    neg_shift = torch.empty((2, rows, n), dtype=torch.float64)
    if not pairs(mid.numpy(), rad.numpy(), y.numpy(), neg_shift.numpy()):
        return None
    t = y.exp_().sum(-1)
    b = torch.expm1(neg_shift)
    a = t + b
    w = torch.log1p(a)
    out = torch.empty((rows, n), dtype=torch.float32)
    c_l, (kd, kx, ka), (phi, a_abs), u = constants
    ok = finish(t.numpy(), b.numpy(), a.numpy(), w.numpy(), neg_shift.numpy(), m.detach().numpy(), kd, kx, ka, c_l, u,
                phi, a_abs, out.numpy())
    return out if ok else None


# ----------------------------------------------------------------------------------------------------------------------
# sum and mean over a block of adjacent dims (``reductions._sum_radius`` and ``common.result_in_place``;
# ``reductions.mean``), radius sums in the midpoint's dtype
#
# Per output element the reference's formula: s_r = fl(sum r), s_m = fl(sum |m|) in the work dtype (here the
# midpoint's), c = s_r C_r + s_m C_m (mean: + |m| C_o + A0), inflate(c) = c phi + a, NaN -> +inf, and +inf where the
# kernel's output is not finite; but the two sums run in index order, where the reference's reduction has its own
# order: theta_(n-1) and F3 hold for any order, so the derivation is unchanged and the radii differ from the
# reference's by the last bits of those sums (and ``add_(alpha=)``'s possible FMA, one rounding where the kernel has
# two: ``inflate``'s operation count covers both).


@functools.lru_cache(maxsize=None)
def _sum_kernel():
    numba = _numba()

    @numba.njit(cache=True, nogil=True)
    def sum_radius(m, r, outer, red, inner, c_r, c_m, c_o, a0, phi, a, mo, out):
        inf = phi * np.inf  # +inf in the radius dtype
        if inner == 1:  # rows: scalar accumulators (the general loop's per-element bookkeeping costs 3x)
            for o in range(outer):
                s_r = phi * 0  # 0 in the radius dtype
                s_m = s_r
                for k in range(o * red, (o + 1) * red):
                    s_r += r[k]
                    s_m += abs(m[k])
                x = mo[o]
                v = (((s_r * c_r + s_m * c_m) + abs(x) * c_o) + a0) * phi + a
                out[o] = inf if (v != v or x != x or abs(x) == inf) else v
            return
        sm = np.empty_like(out[:inner])
        for o in range(outer):
            bo = o * inner
            for i in range(inner):
                out[bo + i] = 0
                sm[i] = 0
            for k in range(red):
                bi = (o * red + k) * inner
                for i in range(inner):
                    out[bo + i] += r[bi + i]
                    sm[i] += abs(m[bi + i])
            for i in range(inner):
                x = mo[bo + i]
                v = (((out[bo + i] * c_r + sm[i] * c_m) + abs(x) * c_o) + a0) * phi + a
                out[bo + i] = inf if (v != v or x != x or abs(x) == inf) else v

    return sum_radius


def sum_radius(m: torch.Tensor, r: torch.Tensor, outer: int, red: int, inner: int, c_r: float, c_m: float,
               c_o: float, a0: float, phi: float, a: float, mo: torch.Tensor) -> torch.Tensor:
    """The radius inflate(s_r C_r + s_m C_m + |mo| C_o + A0) of the sum (C_o = A0 = 0: the terms vanish exactly) or
    mean over the middle dim of the contiguous (outer, red, inner) view of the ball (m, r), for the kernel's output
    ``mo`` (the header's contract); constants in the midpoint's dtype."""
    out = torch.empty(mo.shape, dtype=m.dtype)
    sc = _scalar(m.dtype)
    _sum_kernel()(_flat(m), _flat(r), outer, red, inner, sc(c_r), sc(c_m), sc(c_o), sc(a0), sc(phi), sc(a),
                  _flat(mo), _flat(out))
    return out


# ----------------------------------------------------------------------------------------------------------------------
# nll_loss without class weights on [N, C] float32 balls (``nn.nll_loss_forward_fast`` / ``nll_loss_backward_fast``)
#
# Forward: the reference's statistics of the picked entries x[n, t_n] of kept samples (the sums of x, |x| and r, the
# kept count, max |x| and min |x| > 0), the sums in index order in float64 (the reference's bounds, F3 and
# ``_exact_sum_mask``'s test, hold for any order); the scalar arithmetic after them stays the reference's Python code.
# Backward (a 0-d grad): the reference bit for bit: |m| everywhere (exact in float32), and at each kept sample's target
# up(up(|m - c|) + r) (r where m = c exactly), rounded up to float32, the ignored samples' targets |m|; NaN -> +inf.


@functools.lru_cache(maxsize=None)
def _nll_kernels():
    numba = _numba()

    @numba.njit(cache=True, nogil=True, error_model="numpy")
    def forward_stats(mid, rad, target, ignore_index, out):
        n, c = mid.shape
        s = sa = sr = 0.0
        w = 0
        top, low = 0.0, np.inf
        for i in range(n):
            t = target[i]
            if t == ignore_index:
                continue
            t = min(max(t, 0), c - 1)
            x = np.float64(mid[i, t])
            ax = abs(x)
            s += x
            sa += ax
            sr += np.float64(rad[i, t])
            w += 1
            top = np.nan if (ax != ax or top != top) else (ax if ax > top else top)
            if ax > 0.0 and ax < low:
                low = ax
        out[0], out[1], out[2], out[3], out[4], out[5] = s, sa, sr, w, top, low

    @numba.njit(cache=True, nogil=True, error_model="numpy")
    def backward_radius(m, target, ignore_index, c, r, out):
        n, k = m.shape
        inf32 = np.float32(np.inf)
        for i in range(n):
            for j in range(k):
                v = abs(m[i, j])
                out[i, j] = inf32 if v != v else v
            t = target[i]
            if t == ignore_index:
                continue
            t = min(max(t, 0), k - 1)
            at = np.float64(m[i, t])
            d = abs(at - c)
            v = r if d == 0.0 else np.nextafter(np.nextafter(d, np.inf) + r, np.inf)
            y = np.float32(v)
            if np.float64(y) < v:
                y = np.nextafter(y, inf32)
            out[i, t] = inf32 if y != y else y

    return forward_stats, backward_radius


def nll_forward_stats(mid: torch.Tensor, rad: torch.Tensor, target: torch.Tensor, ignore_index: int) -> list[float]:
    """[sum x, sum |x|, sum r, kept count, max |x|, min |x| > 0] over the kept samples' picked entries (float64)."""
    out = np.empty(6, dtype=np.float64)
    _nll_kernels()[0](mid.detach().numpy(), rad.numpy(), target.numpy(), ignore_index, out)
    return out.tolist()


def nll_backward_radius(m: torch.Tensor, target: torch.Tensor, ignore_index: int, c: float, r: float) -> torch.Tensor:
    """The float32 radius of ``nn.nll_loss_backward_fast`` for a 0-d grad with centre c and radius r at the targets."""
    out = torch.empty(m.shape, dtype=torch.float32)
    _nll_kernels()[1](m.detach().numpy(), target.numpy(), ignore_index, float(c), float(r), out.numpy())
    return out


# ----------------------------------------------------------------------------------------------------------------------
# The optimizer's p.add_(g, alpha=a) on a ball (``inplace._scaled_add_in_place``): the radius after torch's own
# in-place midpoint update, inflate(ra + Aup rb + C |mb| + u |m|, 7) with NaN -> +inf, the reference's terms in its
# order, each product and addition rounded to nearest (the reference's ``add_(alpha=)`` may fuse a product and an
# addition into one rounding; ``inflate``'s 7 operations count both).


@functools.lru_cache(maxsize=None)
def _scaled_add_kernel():
    numba = _numba()

    @numba.njit(cache=True, nogil=True)
    def scaled_add_radius(ra, rb, mb, m, a_up, coef, u, phi, a):
        inf = phi * np.inf
        for i in range(ra.size):
            v = (((ra[i] + rb[i] * a_up) + abs(mb[i]) * coef) + abs(m[i]) * u) * phi + a
            ra[i] = inf if v != v else v

    return scaled_add_radius


def scaled_add_radius(ra: torch.Tensor, rb: torch.Tensor, mb: torch.Tensor, m: torch.Tensor, a_up: float, coef: float,
                      u: float, phi: float, a: float) -> None:
    """Overwrite ``ra`` with the radius of ``inplace._scaled_add_in_place`` (the header's contract): m the updated
    midpoint, (rb, mb) the added ball; dense contiguous tensors of one shape and dtype (``applies``)."""
    sc = _scalar(m.dtype)
    _scaled_add_kernel()(_flat(ra), _flat(rb), _flat(mb), _flat(m), sc(a_up), sc(coef), sc(u), sc(phi), sc(a))


# ----------------------------------------------------------------------------------------------------------------------
# Division of a ball by a Python number (``arith._quotient_rad`` with a point divisor): the reference bit for bit,
# its elementwise operations in its order in the midpoint's dtype, the divisor's scalars (rb, up(|mb| + 2 rb),
# down(|mb| - rb)) computed by the reference's own torch code once per divisor (``arith._number_divisor``).


@functools.lru_cache(maxsize=None)
def _div_number_kernel():
    numba = _numba()

    @numba.njit(cache=True, nogil=True)
    def div_number_radius(m, ra, rb, divisor_up, denominator, u, eta, phi2, a2, phi4, a4, inf, out):
        # (``inf`` in the midpoint's dtype: a float64 infinity would make nextafter step in float64, a step the
        # float32 store then rounds away)
        for i in range(m.size):
            am = abs(m[i])
            res = (am * u + eta) * phi2 + a2  # inflate(|m| u + eta, 2)
            res = inf if res != res else res
            num = ((ra[i] + am * rb) + divisor_up * res) * phi4 + a4  # inflate(ra + |m| rb + D res, 4)
            num = inf if num != num else num
            q = np.nextafter(num / denominator, inf)  # div_up
            out[i] = inf if q != q else q

    return div_number_radius


def div_number_radius(m: torch.Tensor, ra: torch.Tensor, rb: float, divisor_up: float, denominator: float, u: float,
                      eta: float, inflate2: tuple[float, float], inflate4: tuple[float, float]) -> torch.Tensor:
    """The radius of ``arith._quotient_rad`` for a ball (m's shape, contiguous, ``applies``) divided by a number whose
    ball has radius rb, with the reference's scalars up(|mb| + 2 rb) and down(|mb| - rb) > 0."""
    out = torch.empty_like(m)
    sc = _scalar(m.dtype)
    _div_number_kernel()(_flat(m), _flat(ra), sc(rb), sc(divisor_up), sc(denominator), sc(u), sc(eta),
                         sc(inflate2[0]), sc(inflate2[1]), sc(inflate4[0]), sc(inflate4[1]), sc(np.inf), _flat(out))
    return out
