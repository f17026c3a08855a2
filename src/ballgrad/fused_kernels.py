"""The compiled loops behind ``ballgrad.fused`` (numba): its header states their contract, and each of its sections
states the reference formula its kernel follows; this module holds only the loops.

Every kernel and helper is a module-level function. numba's on-disk cache (``cache=True``) keys a function that
closes over variables by pickling them, and a pickled compiled function differs in every process: kernels built
inside factories around shared helpers were recompiled in every process (seconds each) and added a cache file each
time. Imported only through ``fused._kernels()``, after ``fused._numba()`` has found numba enabled.
"""

from __future__ import annotations

import math

import numba
import numpy as np

from ballgrad.fused import (LN_A1, LN_A2, LN_A3, LN_A4, LN_A6H, LN_A2E, LN_A_GX, LN_A_OUT, LN_F0, LN_F1, LN_F2, LN_FDN,
                            LN_GAMMA, LN_GC1, LN_KAPPA, LN_NETA, LN_OMU2, LN_OPU, LN_OPU2, LN_PHI1, LN_PHI2, LN_PHI3,
                            LN_PHI4, LN_PHI6H, LN_PHI2E, LN_PHI_GX, LN_PHI_OUT, LN_ROW_F0, LN_ROW_GAMMA, LN_U)

_CHUNK = 256  # elements per chunk of the touching-index scans

# RZBM's successor step (DESIGN F2; ``nn._step``): for every float64 c, fl(c + fl(fl(phi |c|) + e0)) >= succ(c) and
# fl(c - fl(fl(phi |c|) + e0)) <= pred(c), with phi >= u(1 + 2u) and any e0 >= eta; e0 = 2^-600 keeps the step's
# operands normal (a subnormal operand costs a microcode assist per operation on x86). inf and NaN stay or become NaN,
# which the kernels turn into +inf radii.
_SUCC_PHI = 2.0**-53 + 2.0**-105  # u(1 + 2u) for u = 2^-53, exactly
_SUCC_E0 = 2.0**-600


# ----------------------------------------------------------------------------------------------------------------------
# ``fused.add_radius``

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


# ----------------------------------------------------------------------------------------------------------------------
# relu and its backward: ``fused.relu_radius``, ``fused.relu_backward_radius``

# For relu's backward: 1 where the saved ball (s, rs) is decided (below: -s > rs, above: s > rs, or the exact point
# 0), else 0 (touching 0, or NaN). Integer arithmetic rather than ``or``: a branch per comparison would be
# mispredicted on the half of the units that are inactive (5 ns per element instead of 0.3).
@numba.njit(cache=True, nogil=True, inline="always")
def decided_saved(s, rs):
    return min(1, np.int64(abs(s) > rs) + np.int64(s == 0) * np.int64(rs == 0))


@numba.njit(cache=True, nogil=True, inline="always")
def decided(x, r, saved):
    """1 where the ball (x, r) does not touch 0, else 0 (NaN included): relu's test (below: -x > r, above: x > r), or
    with ``saved`` relu's backward's (``decided_saved``, which also counts the exact point 0 as decided)."""
    return decided_saved(x, r) if saved else np.int64(abs(x) > r)


# Index lists of the balls that touch 0 (at most ``count``, the caller's tally of the same test ``decided``): the rare
# elements get their own loop. A branch per element on the data (the sign of x, an inactive unit) is mispredicted half
# the time (5 ns per element instead of 0.3), so each chunk of ``_CHUNK`` elements is first tallied branch-free and only
# chunks with a touching ball are walked element by element.
@numba.njit(cache=True, nogil=True)
def touching(xm, xr, count, saved):
    where = np.empty(count, np.int64)
    k = 0
    for start in range(0, xm.size, _CHUNK):
        stop = min(start + _CHUNK, xm.size)
        tally = 0
        for i in range(start, stop):
            tally += 1 - decided(xm[i], xr[i], saved)
        if tally:
            for i in range(start, stop):
                if decided(xm[i], xr[i], saved) == 0 and k < count:
                    where[k] = i
                    k += 1
    return where[:k]


@numba.njit(cache=True, nogil=True)
def relu_kernel(xm, xr, m, eta, zero, one, inf, out):
    # the decided balls branch-free (vectorized), then the rare touching ones, then the clean-up
    touches = 0
    for i in range(m.size):
        x, r = xm[i], xr[i]
        nx = -x
        touches += not abs(x) > r  # neither below (-x > r) nor above (x > r): NaN included
        out[i] = (one if nx <= r else zero) * r  # the indicator of "not below" times r
    for i in touching(xm, xr, touches, False):
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


@numba.njit(cache=True, nogil=True)
def relu_backward_kernel(gm, gr, sm, sr, m, zero, one, inf, out):
    # as in the relu kernel
    touches = 0
    for i in range(m.size):
        s, rs = sm[i], sr[i]
        touches += decided_saved(s, rs) == 0  # touching 0, or NaN
        out[i] = (one if s > rs else zero) * gr[i]  # the indicator of "above" times rG
    for i in touching(sm, sr, touches, True):
        s, a, rg = sm[i], abs(gm[i]), gr[i]
        if s > 0:  # maximum(|g|, rG), NaN kept
            out[i] = a if a != a else (rg if rg != rg else (a if a >= rg else rg))
        else:  # rounding.add_up(|g|, rG)
            out[i] = np.nextafter(a + rg, inf)
    for i in range(m.size):
        v = out[i] + m[i] * zero  # result_in_place
        out[i] = inf if ((v != v) | (v == inf)) else v
    return touches


# ----------------------------------------------------------------------------------------------------------------------
# Layer norm: ``fused.layer_norm_forward``, ``fused.layer_norm_backward``

# Scalar outward steps and clean-ups shared by the layer-norm kernels (float64), inlined into them.
_inline = numba.njit(cache=True, nogil=True, inline="always", error_model="numpy")


@_inline
def up(x):  # >= succ(x): RZBM's step (DESIGN F2), inline arithmetic instead of a libm nextafter call (5 ns)
    return x + (abs(x) * _SUCC_PHI + _SUCC_E0)


@_inline
def dn(x):  # <= pred(x)
    return x - (abs(x) * _SUCC_PHI + _SUCC_E0)


@_inline
def clamp0(x):  # torch.clamp_min(x, 0): NaN stays NaN
    return 0.0 if x < 0.0 else x


@_inline
def inflate(x, phi, a):  # rounding.inflate with its constants: NaN -> +inf (+inf stays)
    v = x * phi + a
    return np.inf if v != v else v


@_inline
def nan_max(a, b):  # torch.maximum / amax: NaN if either is
    if a != a or b != b:
        return np.nan
    return a if a >= b else b


@_inline
def nan_min(a, b):
    if a != a or b != b:
        return np.nan
    return a if a <= b else b


@_inline
def from_bounds(lo, hi):  # reductions._from_bounds: (mid, rad) of a ball containing [lo, hi]
    c = lo * 0.5 + hi * 0.5
    r = nan_max(up(c - lo), up(hi - c))
    if lo == hi and c == lo:
        r = 0.0
    return c, (np.inf if r != r else r)


@_inline
def recentre(mk, c, r, narrow):  # normalization._recentre_balls for one element: rad around the kernel's mk
    m64 = np.float64(mk)
    rad = r if m64 == c else up(up(abs(m64 - c)) + r)
    if narrow:  # rounding.to_dtype_up to float32: RN, then one succ where it went down (an exact comparison)
        y = np.float32(rad)
        if np.float64(y) < rad:
            y = np.nextafter(y, np.float32(np.inf))
        rad = np.float64(y)
    return np.inf if rad != rad else rad


@_inline
def ball_mul(ac, ar, bc, br, u):  # normalization._mul: a b with every radius operation rounded outward
    c = ac * bc
    spread = up(up(abs(ac) * br) + up(ar * up(abs(bc) + br)))
    return c, up(spread + up(up(abs(c) * u)))


@_inline
def any_positive(r):  # normalization._is_point's test, negated: some radius > 0 (empty: a plain tensor)
    for i in range(r.size):
        if r[i] > 0:
            return True
    return False


@_inline
def row_sum(x, o, n):  # sum of x[o:o + n] in float64, in index order
    s = 0.0
    for j in range(n):
        s += np.float64(x[o + j])
    return s


@numba.njit(cache=True, nogil=True, error_model="numpy")  # IEEE division: 1/0 = +inf, no exception
def layer_norm_forward(m, r, wc, wr, bc, br, has_w, has_b, out, mean, rstd, k, eps, narrow, rows, n, out_rad, mean_rad,
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


@numba.njit(cache=True, nogil=True, error_model="numpy")
def layer_norm_backward(gm, gr, m, r, mean_c, mean_r, rstd_c, rstd_r, wc, wr, has_w, gx, gw, gb, want_gx, want_gw,
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


# ----------------------------------------------------------------------------------------------------------------------
# ``fused.log_softmax_backward_radius``

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


# ----------------------------------------------------------------------------------------------------------------------
# ``fused.gemm_residual_into``, ``fused.gemm_finish``

@numba.njit(cache=True, nogil=True)
def gemm_residual(ref, m, e):  # e = RN_32(|ref - m|), 2-D arrays of one shape
    for i in range(ref.shape[0]):
        for j in range(ref.shape[1]):
            e[i, j] = np.float32(abs(ref[i, j] - np.float64(m[i, j])))


@numba.njit(cache=True, nogil=True)
def gemm_finish(e, s, rows, cols, rc, amc, k):  # in place over e (a separate output array that aliases e would defeat
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


# ----------------------------------------------------------------------------------------------------------------------
# ``fused.log_softmax_pairwise``

@numba.njit(cache=True, nogil=True, error_model="numpy")
def log_softmax_pairs(m, r, y, neg_shift):
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
                        y[h, k, i, j] = c + sign * (abs(c) * _SUCC_PHI + _SUCC_E0)
                neg_shift[h, k, i] = -shift
    return True


@numba.njit(cache=True, nogil=True, error_model="numpy")
def log_softmax_pairwise_finish(t, b, a, w, neg_shift, m, kd, kx, ka, c_l, u, phi_f, a_f, out):
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


# ----------------------------------------------------------------------------------------------------------------------
# ``fused.sum_radius``

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


# ----------------------------------------------------------------------------------------------------------------------
# ``fused.nll_forward_stats``, ``fused.nll_backward_radius``

@numba.njit(cache=True, nogil=True, error_model="numpy")
def nll_forward_stats(mid, rad, target, ignore_index, out):
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
def nll_backward_radius(m, target, ignore_index, c, r, out):
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


# ----------------------------------------------------------------------------------------------------------------------
# ``fused.scaled_add_radius``

@numba.njit(cache=True, nogil=True)
def scaled_add_radius(ra, rb, mb, m, a_up, coef, u, phi, a):
    inf = phi * np.inf
    for i in range(ra.size):
        v = (((ra[i] + rb[i] * a_up) + abs(mb[i]) * coef) + abs(m[i]) * u) * phi + a
        ra[i] = inf if v != v else v


# ----------------------------------------------------------------------------------------------------------------------
# ``fused.div_number_radius``

@numba.njit(cache=True, nogil=True)
def div_number_radius(m, ra, rb, divisor_up, denominator, u, eta, phi2, a2, phi4, a4, inf, out, out_bits, inf_bits):
    # (``inf`` in the midpoint's dtype: a float64 infinity would make the arithmetic step in float64, a step the
    # float32 store then rounds away)
    for i in range(m.size):
        am = abs(m[i])
        res = (am * u + eta) * phi2 + a2  # inflate(|m| u + eta, 2)
        res = inf if res != res else res
        num = ((ra[i] + am * rb) + divisor_up * res) * phi4 + a4  # inflate(ra + |m| rb + D res, 4)
        num = inf if num != num else num
        q = num / denominator
        out[i] = inf if q != q else q
    # div_up = nextafter(q, +inf): q > 0 here (num >= a4 > 0, denominator > 0) or +inf (kept), so the successor is
    # the next bit pattern, one integer step on the unsigned view (a libm nextafter call costs ~5 ns an element)
    one = out_bits.dtype.type(1)
    for i in range(out_bits.size):
        b = out_bits[i]
        out_bits[i] = b + one if b < inf_bits else b


# ----------------------------------------------------------------------------------------------------------------------
# ``fused.bf16_operand``, ``fused.bf16_finish``

_BF16_CHUNK = 1024  # float32 values per chunk of ``bf16_operand`` (a 4 KiB scratch in L1, reread as bits)


@_inline
def operand_chunk(x, y, alpha, abs_x, abs_y, has_y, t, realmin, buf, o, count):
    """buf[j] = max(z, realmin) for z = fl(X + fl(alpha Y)) (z = X without y) at x[o + j], y[o + j]; NaN stays NaN, -0
    becomes realmin. Returns how many have not X <= t Y. (A chunk of constant length vectorises; see bf16_operand.)"""
    wide = np.int32(0)
    for j in range(count):
        xi = abs(x[o + j]) if abs_x else x[o + j]
        z = xi
        if has_y:
            yi = abs(y[o + j]) if abs_y else y[o + j]
            z = xi + alpha * yi
            wide += np.int32(not xi <= t * yi)
        buf[j] = realmin if z < realmin else z
    return wide


@_inline
def bf16_bits(bits, out, o, count):
    """out[o + j] = RN_bf16 of the float32 bits[j]: round to nearest even on the upper 16 bits (c10::BFloat16's
    conversion; +inf stays +inf, an overflow rounds to +inf), NaN to c10's quiet bfloat16 NaN."""
    for j in range(count):
        b = bits[j]
        rounded = (b + np.uint32(0x7FFF) + ((b >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
        out[o + j] = np.uint16(0x7FC0) if (b & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000) else np.uint16(rounded)


@numba.njit(cache=True, nogil=True)
def bf16_operand(x, y, alpha, abs_x, abs_y, has_y, t, realmin, out):
    """out (bfloat16 bits, uint16) = max(RN_bf16(z), realmin) for z = fl(X + fl(alpha Y)) (z = X without y), X = |x| or
    x, Y = |y| or y, float32: ``rounding.to_bf16_normal`` of the sum (for z >= 0, max(RN(z), realmin) = RN(max(z,
    realmin)) since realmin is a bfloat16 value). Returns how many elements have not X <= t Y. Full chunks of the
    constant length ``_BF16_CHUNK`` and then the tail: a loop whose bounds are not constant did not vectorise (5-10x
    slower)."""
    buf = np.empty(_BF16_CHUNK, np.float32)
    bits = buf.view(np.uint32)
    wide = 0
    full = x.size - x.size % _BF16_CHUNK
    for o in range(0, full, _BF16_CHUNK):
        wide += operand_chunk(x, y, alpha, abs_x, abs_y, has_y, t, realmin, buf, o, _BF16_CHUNK)
        bf16_bits(bits, out, o, _BF16_CHUNK)
    if full < x.size:
        wide += operand_chunk(x, y, alpha, abs_x, abs_y, has_y, t, realmin, buf, full, x.size - full)
        bf16_bits(bits, out, full, x.size - full)
    return wide


@numba.njit(cache=True, nogil=True)
def bf16_finish(s, c1, c2, inf, out):
    """out = fl(fl(S c1) + c2) with NaN -> +inf, S the float32 value of the bfloat16 bits s (exact)."""
    bits = out.view(np.uint32)
    for i in range(s.size):
        bits[i] = np.uint32(s[i]) << np.uint32(16)
    for i in range(s.size):
        v = out[i] * c1 + c2
        out[i] = inf if v != v else v


# ----------------------------------------------------------------------------------------------------------------------
# ``fused.attention_shift``, ``fused.attention_bounds``, ``fused.attention_ds``

@numba.njit(cache=True, nogil=True)
def attention_shift(sc, rad, s, m_lo, m_hi, given, stats):
    """The scores' shifted end points, row by row (rows of s entries): lo = sc - rad over sc, hi = sc + rad over rad,
    the row maxima M_lo, M_hi into m_lo, m_hi (read instead where ``given``), then x = max(lo - M_lo, -700) over sc and
    max(hi - M_hi, -700) over rad; stats = (min sc, max sc, max rad), all NaN where sc or rad holds a NaN (the
    reference's ``aminmax`` and ``amax``)."""
    smin, smax, rmax = np.inf, -np.inf, -np.inf
    nan = False
    for row in range(sc.size // s):
        o = row * s
        ml, mh = -np.inf, -np.inf
        for j in range(s):  # (o + j: a loop over range(o, o + s) ran 2x slower)
            i = o + j
            c, r = sc[i], rad[i]
            if c != c or r != r:
                nan = True
            smin = c if c < smin else smin
            smax = c if c > smax else smax
            rmax = r if r > rmax else rmax
            lo = c - r
            hi = c + r
            sc[i] = lo
            rad[i] = hi
            ml = lo if lo > ml else ml
            mh = hi if hi > mh else mh
        if given:
            ml, mh = m_lo[row], m_hi[row]
        else:
            m_lo[row], m_hi[row] = ml, mh
        for j in range(s):
            i = o + j
            x = sc[i] - ml
            sc[i] = -700.0 if x < -700.0 else x
            x = rad[i] - mh
            rad[i] = -700.0 if x < -700.0 else x
    stats[0], stats[1], stats[2] = (np.nan, np.nan, np.nan) if nan else (smin, smax, rmax)


@numba.njit(cache=True, nogil=True, error_model="numpy")  # IEEE division: x/0 = inf, 0/0 = NaN, as torch
def attention_bounds(x_lo, v_lo, x_hi, v_hi, s, tl, tp, d, given, g1, g2, b2, f1, nf2, a2, dn, up, lam, k1, k2, k3,
                     k4, pr_coef, pr_phi, pr_a):
    """Lemma E's bounds and Lemma P's P ball, row by row (rows of s entries), from the shifted scores x and their
    exponentials v: El_dn = max(-B2 + v (G1 + G2 x), 0) over x_lo, Eh_up = A2 + v (F1 + x nF2) over x_hi, the row
    sums TL = sum El_dn * dn, T' = lam + sum Eh_up * up into tl, tp (read instead where ``given``, in index order);
    then p_hi over x_hi, pm over x_lo and pr over v_lo. Every operation rounds to nearest (NaN propagates through the
    clamps, as torch's)."""
    for row in range(tl.size):
        o = row * s
        sl, sh = 0.0, 0.0
        for j in range(s):  # (o + j: a loop over range(o, o + s) ran 2x slower)
            i = o + j
            g = g1 + g2 * x_lo[i]
            lo = -b2 + v_lo[i] * g
            lo = 0.0 if lo < 0.0 else lo  # clamp_min(0)
            f = f1 + x_hi[i] * nf2
            hi = a2 + v_hi[i] * f
            x_lo[i] = lo
            x_hi[i] = hi
            sl += lo
            sh += hi
        if not given:
            tl[row] = sl * dn
            tp[row] = lam + sh * up
        t_lo, t_p, dr = tl[row], tp[row], d[row]
        for j in range(s):
            i = o + j
            lo, hi = x_lo[i], x_hi[i]
            den = t_lo - lo
            den = 0.0 if den < 0.0 else den  # clamp_min(0)
            den = hi + den * dr
            q_hi = hi / den
            p_hi = k2 + k1 * q_hi
            p_hi = 1.0 if p_hi > 1.0 else p_hi  # clamp_max(1)
            y = (t_p - hi) / dr + lo
            q_lo = lo / y
            p_lo = -k4 + k3 * q_lo
            p_lo = 0.0 if p_lo < 0.0 else p_lo
            wc = p_hi - p_lo
            pm = p_lo + 0.5 * wc
            x_hi[i] = p_hi
            x_lo[i] = pm
            v_lo[i] = pr_a + pr_phi * (wc + pr_coef * pm)


@numba.njit(cache=True, nogil=True)
def attention_ds(p_hi, pm, pr, dp_c, dp_r, s, gamma, rd_phi, rd_a, ds_phi, ds_a, ds_abs):
    """The backward's dS ball row by row (rows of s entries): dm = sum W, W = pm dPm, and rd = the bound of
    sum (p_hi rdP + pr |dPm| + gamma |W|), both sums in index order; then dS_m = pm (dPm - dm) over dp_c, its radius
    bound((rdP + rd) p_hi + pr |Xm|) over dp_r, |dS_m| into ds_abs."""
    for row in range(dp_c.size // s):
        o = row * s
        dm = 0.0
        total = 0.0
        for j in range(s):  # (o + j: a loop over range(o, o + s) ran 2x slower)
            i = o + j
            c = dp_c[i]
            w = c * pm[i]
            dm += w
            total += (p_hi[i] * dp_r[i] + pr[i] * abs(c)) + gamma * abs(w)
        rd = rd_a + rd_phi * total
        for j in range(s):
            i = o + j
            xm = dp_c[i] - dm
            ds = pm[i] * xm
            dp_c[i] = ds
            ds_abs[i] = abs(ds)
            dp_r[i] = ds_a + ds_phi * ((dp_r[i] + rd) * p_hi[i] + pr[i] * abs(xm))
