"""Fused radius kernels: a rule's whole radius formula in one pass over memory (numba).

Why: on the zoo's small tensors a rule's radius costs its kernel launches, not its arithmetic (the elementwise ball
add runs 17 PyTorch kernels, ~5 us each, for what one pass does in ~4 us on 16K elements), and on large tensors each
launch writes a fresh full-size temporary (~11 ms for a 512 x 2048 ball add, 1.8 ms fused).

Contract. A kernel performs, element by element, exactly the floating-point operations of its rule's reference formula
(the torch code beside the rule, next to its derivation): the same operations, in the same order, on operands of the
same dtype, each rounded to nearest (numba compiles without fast-math: no FMA contraction, no reassociation, IEEE
semantics for subnormals, infinities and NaN), followed by the same NaN -> +inf clean-ups. Its radii are therefore the
reference's bit for bit, which ``tests/test_fused.py`` checks on adversarial inputs (zeros of both signs, subnormals,
huge values, inf, NaN). Two departures, each stated in its section's header and covered by the same derivation: a sum
may run in index order where the reference's reduction has its own (layer norm, log_softmax's backward, sum and mean,
nll_loss's forward, the GEMM bound's row sums, attention's softmax row sums and dS: F3 and the theta factors hold for
any order), and a product and an addition may round twice where the reference's ``add_(alpha=)``/``addcmul_`` may fuse
them (``inflate``'s lemma, and each section's derivation, counts both roundings); those kernels are checked against the
reference within the difference the order or the rounding can make (or bit for bit against the same operations done one
by one), and against the mpmath oracle through the rules' own tests. Infinities that meet ``nextafter`` are typed in the
computation's dtype (a float64 infinity would make a float32 step in float64, which the float32 store rounds away). The
reference formula stays the only statement of the bound, and the path wherever a kernel does not apply: tensors not on
the CPU, dtypes other than float32/float64, operands that are not dense and contiguous (broadcast operands of an
addition are copied dense first), numba missing, or ``BALLGRAD_FUSED=0`` in the environment.

The loops themselves live in ``ballgrad.fused_kernels`` as module-level functions, compiled on first use (about a
second each) and kept in numba's on-disk cache for later processes.
"""

from __future__ import annotations

import functools
import os

import numpy as np
import torch

from ballgrad.rounding import REALMIN_32, inverse_order, memory_order

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


@functools.lru_cache(maxsize=1)
def _kernels():
    """The compiled loops (``ballgrad.fused_kernels``, which imports numba); callers check ``applies`` first."""
    from ballgrad import fused_kernels

    return fused_kernels


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


def add_radius(x: torch.Tensor, y: torch.Tensor, sign: float, m: torch.Tensor, ra: torch.Tensor,
               rb: torch.Tensor, phi: float, a: float) -> torch.Tensor | None:
    """``arith._add_rad`` for alpha == 1 and ``result``'s clean-up, fused: TwoSum's exact error e of x + sign*y
    (``rounding.exact_sum_error``), p = ra + rb, and e where p == 0, else inflate(p + e) = (p + e) phi + a with NaN ->
    +inf; then NaN -> +inf. None where the kernel's s = x + sign*y differs from m anywhere (the reference path then
    handles it) -- callers check ``applies`` first."""
    out = torch.empty_like(m)
    sc = _scalar(m.dtype)
    mismatches = _kernels().add_kernel(_flat(x), _flat(y), sc(sign), _flat(m), _flat(ra), _flat(rb), sc(phi), sc(a),
                                       sc(np.inf), _flat(out))
    return out if mismatches == 0 else None


def relu_radius(xm: torch.Tensor, xr: torch.Tensor, m: torch.Tensor, eta: float) -> tuple[torch.Tensor, int]:
    """``nonsmooth._relu_fast``'s radius and ``result_in_place``'s clean-up, fused, with the number of elements whose
    ball touches 0 (the ``kink`` count). Callers check ``applies`` first."""
    out = torch.empty_like(m)
    sc = _scalar(m.dtype)
    touches = _kernels().relu_kernel(_flat(xm), _flat(xr), _flat(m), sc(eta), sc(0), sc(1), sc(np.inf), _flat(out))
    return out, int(touches)


def relu_backward_radius(gm, gr, sm, sr, m) -> tuple[torch.Tensor, int]:
    """``backward._relu_backward_fast``'s radius (both operands balls) and ``result_in_place``'s clean-up, fused,
    with the number of elements whose saved ball touches 0 (the ``kink`` count). Callers check ``applies`` first."""
    out = torch.empty_like(m)
    sc = _scalar(m.dtype)
    touches = _kernels().relu_backward_kernel(_flat(gm), _flat(gr), _flat(sm), _flat(sr), _flat(m), sc(0), sc(1),
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
#   - the outward steps are RZBM's (``fused_kernels._SUCC_PHI``), which bound succ/pred from outside as nextafter
#     does (F2);
#   - 1/sqrt(var + eps) is enclosed with IEEE sqrt and division, both correctly rounded (LLVM's sqrt and fdiv without
#     fast-math): with s = fl(sqrt t), pred(s) <= sqrt t <= succ(s), and 1/x decreasing, so
#     down(1/succ(fl sqrt t_hi)) <= 1/sqrt(t_hi) and 1/sqrt(t_lo) <= up(1/pred(fl sqrt t_lo)) (pred clamped at 0,
#     which 1/0 = +inf keeps an upper bound), in place of the trust-table sqrt of ``elementwise._rsqrt_enclose``.
# ``tests/test_fused.py`` checks both kernels against the mpmath oracle and against the reference path.
# Constants come in one float64 array (named at the top of each kernel); ``rows`` groups of ``n`` contiguous elements.


# Indices of the layer-norm constants (``normalization._layer_norm_constants``)
(LN_U, LN_F0, LN_F1, LN_F2, LN_FDN, LN_NETA, LN_GAMMA, LN_GC1, LN_KAPPA, LN_OPU, LN_OPU2, LN_OMU2, LN_PHI1, LN_A1,
 LN_PHI2, LN_A2, LN_PHI3, LN_A3, LN_PHI4, LN_A4, LN_PHI6H, LN_A6H, LN_PHI2E, LN_A2E, LN_PHI_OUT, LN_A_OUT, LN_PHI_GX,
 LN_A_GX, LN_ROW_F0, LN_ROW_GAMMA, LN_COUNT) = range(31)


def layer_norm_forward(m, r, wc, wr, bc, br, out, mean, rstd, k, eps, rows, n):
    """Radii (out, mean, rstd) of ``normalization.native_layer_norm`` in one compiled pass per row (the header's
    contract). Arguments: contiguous CPU tensors (r, wr, br: radii, or empty for points; wc, bc empty when absent),
    ``k`` the constants (``normalization._layer_norm_constants``)."""
    rd = out.dtype
    out_rad = torch.empty_like(out, dtype=rd)
    mean_rad, rstd_rad = torch.empty_like(mean, dtype=rd), torch.empty_like(rstd, dtype=rd)
    _kernels().layer_norm_forward(_flat(m), _flat(r), _flat(wc), _flat(wr), _flat(bc), _flat(br), wc.numel() > 0,
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
    _kernels().layer_norm_backward(_flat(gm), _flat(gr), _flat(m), _flat(r), _flat(mean_c), _flat(mean_r),
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


def log_softmax_backward_radius(mg, rg, e, m, k) -> torch.Tensor | None:
    """The float64 radius of ``nn.log_softmax_backward_radius`` (rows along the last dim; ``e`` = exp of the stacked
    end points [z_lo, z_hi], float64), or None where some radius is not finite (the caller's composition copes)."""
    n = m.shape[-1]
    out = torch.empty(m.shape, dtype=torch.float64)
    bad = _kernels().log_softmax_backward(_flat(mg), _flat(rg), _flat(e), _flat(m), k, mg.dtype == torch.float64,
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


def gemm_residual_into(reference: torch.Tensor, m: torch.Tensor, e: torch.Tensor) -> None:
    """``e[...] = RN_32(|reference - m|)`` for 2-D CPU tensors of one shape (reference float64, m and e float32; any
    strides), the reference's ``copy_(reference.sub_(m).abs_())`` in one pass without modifying ``reference``."""
    _kernels().gemm_residual(reference.numpy(), m.detach().numpy(), e.numpy())


def gemm_finish(e: torch.Tensor, s, rows, cols, rc, amc, constants) -> torch.Tensor:
    """``linalg._measured_radius_f32``'s sum and inflation in one pass (the header's contract), written over ``e``
    (float32, 2-D, contiguous): numpy float32 arrays s of e's shape (or 0 x 0 when absent), rows and cols (the outer
    product bound; empty when absent), rc and amc along the columns (the bias terms; empty when absent), and
    ``constants`` (C_e, C_s, C_1, C_2, phi, a)."""
    _kernels().gemm_finish(e.numpy(), s, rows, cols, rc, amc, constants)
    return e


# ----------------------------------------------------------------------------------------------------------------------
# log_softmax's pairwise forward (``nn._log_softmax_pairwise``), float32 rows along the last dim whose pair
# differences are exact (``nn._exact_pairs``)
#
# The reference bit for bit: the kernels perform its elementwise operations in its order, each rounded to nearest in
# float64 (the products by the signs -+1 exact, as there), and leave to torch what the trust table or the summation
# order rests on: the exps and their row sums, expm1, the addition t + b and log1p run between the two kernels as in
# the reference.


def log_softmax_pairwise(m: torch.Tensor, mid: torch.Tensor, rad: torch.Tensor, constants) -> torch.Tensor | None:
    """The float32 radius of ``nn._log_softmax_pairwise`` for float32 rows along the last dim (2-D contiguous m, mid,
    rad), bit for bit, or None where the reference would not take its exact-pairs branch or would decline."""
    rows, n = m.shape
    kernels = _kernels()
    y = torch.empty((2, rows, n, n), dtype=torch.float64)
    neg_shift = torch.empty((2, rows, n), dtype=torch.float64)
    if not kernels.log_softmax_pairs(mid.numpy(), rad.numpy(), y.numpy(), neg_shift.numpy()):
        return None
    t = y.exp_().sum(-1)
    b = torch.expm1(neg_shift)
    a = t + b
    w = torch.log1p(a)
    out = torch.empty((rows, n), dtype=torch.float32)
    c_l, (kd, kx, ka), (phi, a_abs), u = constants
    ok = kernels.log_softmax_pairwise_finish(t.numpy(), b.numpy(), a.numpy(), w.numpy(), neg_shift.numpy(),
                                             m.detach().numpy(), kd, kx, ka, c_l, u, phi, a_abs, out.numpy())
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


def sum_radius(m: torch.Tensor, r: torch.Tensor, outer: int, red: int, inner: int, c_r: float, c_m: float,
               c_o: float, a0: float, phi: float, a: float, mo: torch.Tensor) -> torch.Tensor:
    """The radius inflate(s_r C_r + s_m C_m + |mo| C_o + A0) of the sum (C_o = A0 = 0: the terms vanish exactly) or
    mean over the middle dim of the contiguous (outer, red, inner) view of the ball (m, r), for the kernel's output
    ``mo`` (the header's contract); constants in the midpoint's dtype."""
    out = torch.empty(mo.shape, dtype=m.dtype)
    sc = _scalar(m.dtype)
    _kernels().sum_radius(_flat(m), _flat(r), outer, red, inner, sc(c_r), sc(c_m), sc(c_o), sc(a0), sc(phi), sc(a),
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


def nll_forward_stats(mid: torch.Tensor, rad: torch.Tensor, target: torch.Tensor, ignore_index: int) -> list[float]:
    """[sum x, sum |x|, sum r, kept count, max |x|, min |x| > 0] over the kept samples' picked entries (float64)."""
    out = np.empty(6, dtype=np.float64)
    _kernels().nll_forward_stats(mid.detach().numpy(), rad.numpy(), target.numpy(), ignore_index, out)
    return out.tolist()


def nll_backward_radius(m: torch.Tensor, target: torch.Tensor, ignore_index: int, c: float, r: float) -> torch.Tensor:
    """The float32 radius of ``nn.nll_loss_backward_fast`` for a 0-d grad with centre c and radius r at the targets."""
    out = torch.empty(m.shape, dtype=torch.float32)
    _kernels().nll_backward_radius(m.detach().numpy(), target.numpy(), ignore_index, float(c), float(r), out.numpy())
    return out


# ----------------------------------------------------------------------------------------------------------------------
# The optimizer's p.add_(g, alpha=a) on a ball (``inplace._scaled_add_in_place``): the radius after torch's own
# in-place midpoint update, inflate(ra + Aup rb + C |mb| + u |m|, 7) with NaN -> +inf, the reference's terms in its
# order, each product and addition rounded to nearest (the reference's ``add_(alpha=)`` may fuse a product and an
# addition into one rounding; ``inflate``'s 7 operations count both).


def scaled_add_radius(ra: torch.Tensor, rb: torch.Tensor, mb: torch.Tensor, m: torch.Tensor, a_up: float, coef: float,
                      u: float, phi: float, a: float) -> None:
    """Overwrite ``ra`` with the radius of ``inplace._scaled_add_in_place`` (the header's contract): m the updated
    midpoint, (rb, mb) the added ball; dense contiguous tensors of one shape and dtype (``applies``)."""
    sc = _scalar(m.dtype)
    _kernels().scaled_add_radius(_flat(ra), _flat(rb), _flat(mb), _flat(m), sc(a_up), sc(coef), sc(u), sc(phi), sc(a))


# ----------------------------------------------------------------------------------------------------------------------
# Division of a ball by a Python number (``arith._quotient_rad`` with a point divisor): the reference bit for bit,
# its elementwise operations in its order in the midpoint's dtype, the divisor's scalars (rb, up(|mb| + 2 rb),
# down(|mb| - rb)) computed by the reference's own torch code once per divisor (``arith._number_divisor``).


def div_number_radius(m: torch.Tensor, ra: torch.Tensor, rb: float, divisor_up: float, denominator: float, u: float,
                      eta: float, inflate2: tuple[float, float], inflate4: tuple[float, float]) -> torch.Tensor:
    """The radius of ``arith._quotient_rad`` for a ball (m's shape, contiguous, ``applies``) divided by a number whose
    ball has radius rb, with the reference's scalars up(|mb| + 2 rb) and down(|mb| - rb) > 0."""
    out = torch.empty_like(m)
    sc = _scalar(m.dtype)
    unsigned = np.uint32 if m.dtype == torch.float32 else np.uint64
    flat_out = _flat(out)
    _kernels().div_number_radius(_flat(m), _flat(ra), sc(rb), sc(divisor_up), sc(denominator), sc(u), sc(eta),
                                 sc(inflate2[0]), sc(inflate2[1]), sc(inflate4[0]), sc(inflate4[1]), sc(np.inf),
                                 flat_out, flat_out.view(unsigned), np.array(np.inf, sc).view(unsigned)[()])
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Lemma B's bfloat16 operands and finish (``linalg._bf16_bracket``), float32: the operand kernel computes
# z = fl(X + fl(alpha Y)) (X = |x| or x, Y = |y| or y; z = X without y) and Z = max(RN_bf16(z), realmin_32) in one
# pass, the reference's ``rounding.to_bf16_normal(torch.add(X, Y, alpha=alpha))`` (``sum_to_bf16_normal``,
# ``abs_sums_to_bf16_normal``, ``abs_to_bf16_normal``): the same bfloat16 rounding (round to nearest even, as
# c10::BFloat16), the same clamp, bit for bit except where the reference's ``add`` with alpha != 1 fuses the product
# into the addition (one rounding instead of the kernel's two; Lemma B's phi counts two) and in NaN payloads (every
# NaN becomes +inf after the GEMM). The finish kernel is the reference's ``s.to(float32).mul_(c1).add_(c2)`` and
# ``nan_to_num_(nan=inf, posinf=inf)`` bit for bit (the bfloat16 value widens exactly; two roundings, as torch's two
# separate kernels).


def _bits(t: torch.Tensor) -> np.ndarray:
    """A flat uint16 numpy view of a contiguous bfloat16 CPU tensor (no copy)."""
    return t.view(torch.int16).numpy().reshape(-1).view(np.uint16)


def bf16_operand(x: torch.Tensor, y: torch.Tensor | None = None, alpha: float = 1.0, abs_x: bool = False,
                 abs_y: bool = False, t: float = 0.0) -> tuple[torch.Tensor, int] | None:
    """(Z, wide): Z = max(RN_bf16(fl(X + fl(alpha Y))), realmin_32) as a bfloat16 tensor of x's shape and layout
    (the header of this section), wide = how many elements have not X <= t Y (0 without y). None where the kernel
    does not apply: numba off, not float32 on the CPU, or x and y not of one dense layout (same shape and strides, a
    permutation of a contiguous tensor)."""
    if x.dtype != torch.float32 or x.device.type != "cpu" or _numba() is None:
        return None
    if y is not None and (y.dtype != x.dtype or y.shape != x.shape or y.stride() != x.stride()):
        return None
    order = memory_order(x)
    if order is None:
        return None
    xs = x.permute(order)
    out = torch.empty(xs.shape, dtype=torch.bfloat16)
    ys = _flat(y.permute(order)) if y is not None else _flat(xs)
    wide = _kernels().bf16_operand(_flat(xs), ys, np.float32(alpha), abs_x, abs_y, y is not None, np.float32(t),
                                   np.float32(REALMIN_32), _bits(out))
    return out.permute(inverse_order(order)), int(wide)


def bf16_finish(s: torch.Tensor, c1: float, c2: float) -> torch.Tensor | None:
    """fl(fl(S c1) + c2) with NaN -> +inf as a float32 tensor, S the bfloat16 tensor s (contiguous, CPU); None where s
    is not contiguous or numba is off."""
    if s.dtype != torch.bfloat16 or s.device.type != "cpu" or not s.is_contiguous() or _numba() is None:
        return None
    out = torch.empty(s.shape, dtype=torch.float32)
    _kernels().bf16_finish(_bits(s), np.float32(c1), np.float32(c2), np.float32(np.inf), _flat(out))
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Fused attention's softmax bounds (``transformer._FastAttention._probs``, no excluded entries: the shifted scores,
# Lemma E's bounds, their row sums and Lemma P's P ball, around torch's own exp) and dS (``backward_into``), float64:
# the reference's elementwise operations in its order, each rounded to nearest, except that a product and an addition
# round twice where the reference's ``addcmul``/``add(alpha=)`` may fuse them (Lemma E's and P's constants, D's
# (1 + u)^3 and the inflations count both roundings; the module docstring's derivations), that the row sums TL, T'
# and dS's two row sums run in index order (the bounds hold for any order), and that the shifted scores are always
# clamped at -700 (the reference skips the clamp where it provably changes nothing: every |x| <= 2 mag + 1 < 700).
# Checked against the reference in ``tests/test_fused.py`` and against the oracle through ``tests/test_transformer.py``.


def _rows_fit(t: torch.Tensor, *others: torch.Tensor) -> bool:
    """float64 CPU tensors of one shape, contiguous, with rows along a non-empty last dimension; numba on."""
    return (t.dtype == torch.float64 and t.device.type == "cpu" and _numba() is not None and t.dim() > 0
            and t.shape[-1] > 0 and all(x.shape == t.shape and x.dtype == t.dtype and x.is_contiguous()
                                        for x in (t,) + others))


def _row_vector(t: torch.Tensor, rows: int) -> np.ndarray | None:
    """A flat float64 numpy view of a contiguous row vector of ``rows`` values, else None."""
    if t.numel() != rows or t.dtype != torch.float64 or not t.is_contiguous():
        return None
    return _flat(t)


def attention_shift(sc: torch.Tensor, rad: torch.Tensor, m_lo: torch.Tensor, m_hi: torch.Tensor,
                    given: bool) -> tuple[float, float, float] | None:
    """The scores' end points sc -+ rad shifted by their row maxima and clamped at -700, written over (sc, rad); the
    maxima into (m_lo, m_hi) (contiguous row vectors), or read from them where ``given``. Returns (min sc, max sc,
    max rad) (NaN where a NaN was met), or None (nothing written) where the layouts do not fit."""
    if not _rows_fit(sc, rad):
        return None
    rows = sc.numel() // sc.shape[-1]
    lo, hi = _row_vector(m_lo, rows), _row_vector(m_hi, rows)
    if lo is None or hi is None:
        return None
    stats = np.empty(3)
    _kernels().attention_shift(_flat(sc), _flat(rad), sc.shape[-1], lo, hi, given, stats)
    return float(stats[0]), float(stats[1]), float(stats[2])


def attention_bounds(x_lo: torch.Tensor, v_lo: torch.Tensor, x_hi: torch.Tensor, v_hi: torch.Tensor,
                     tl: torch.Tensor, tp: torch.Tensor, d: torch.Tensor, given: bool,
                     constants: tuple[float, ...]) -> bool:
    """Lemma E's bounds from the shifted scores x and v = exp(x), their row sums TL, T' (into tl, tp, or read from
    them where ``given``) and Lemma P's P ball: p_hi over x_hi, pm over x_lo, pr over v_lo. ``constants``: (G1, G2,
    B2, F1, -F2, A2, the sums' factors D and C, lam', K1, K2, K3, K4, C_pr, phi_pr, a_pr). False (nothing written)
    where the layouts do not fit."""
    if not _rows_fit(x_lo, v_lo, x_hi, v_hi):
        return False
    rows = x_lo.numel() // x_lo.shape[-1]
    vectors = [_row_vector(t, rows) for t in (tl, tp, d)]
    if any(v is None for v in vectors):
        return False
    _kernels().attention_bounds(_flat(x_lo), _flat(v_lo), _flat(x_hi), _flat(v_hi), x_lo.shape[-1], *vectors,
                                given, *constants)
    return True


def attention_ds(p_hi: torch.Tensor, pm: torch.Tensor, pr: torch.Tensor, dp_c: torch.Tensor, dp_r: torch.Tensor,
                 gamma: float, rd_bound: tuple[float, float], ds_bound: tuple[float, float]) -> torch.Tensor | None:
    """The backward's dS ball: dS_m written over dp_c, its radius over dp_r, |dS_m| returned (float64 tensors of one
    shape, contiguous, rows along the last dim); ``rd_bound``, ``ds_bound`` the (phi, a) of the two inflations. None
    (nothing written) where the layouts do not fit."""
    operands = (p_hi, pm, pr, dp_c, dp_r)
    if not _rows_fit(dp_c, *operands):
        return None
    ds_abs = torch.empty_like(dp_c)
    _kernels().attention_ds(*(_flat(t) for t in operands), dp_c.shape[-1], gamma, *rd_bound, *ds_bound,
                            _flat(ds_abs))
    return ds_abs
