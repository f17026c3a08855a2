"""Linear algebra rules: mm, bmm, mv, dot, addmm, baddbmm, addmv (DESIGN.md §2 F3/F4).

``torch.matmul`` and ``F.linear`` reach these on CPU for 1-D..4-D inputs: dot (1-D @ 1-D), mv (N-D @ 1-D, after a
view), mm (2-D, and N-D @ 2-D after a view), bmm (batched, after expand/view), addmm (``linear`` with a bias); the
views, ``t``, ``expand``, ``_unsafe_view`` are exact shape rules (shape.py).

Notation: C = A B with inner dimension k; balls A = (mA, rA), B = (mB, rB) as the kernel uses them
(``common.operand``); u, eta the unit roundoff and smallest subnormal; |.| and products elementwise / as matrices.

**Midpoint error model** (``_mid_error``). Every output element is a dot product of length k computed in some order,
with or without FMA, possibly blocked: each term passes through at most ``steps`` rounded operations on its way to the
result (k for a dot product: one product and k - 1 additions; k + 2 for addmm: the alpha and beta scalings and the
bias addition). Hence, with every rounding relative (additions are, with gradual underflow, which the numerics guard
checks) except an absolute eta/2 per multiplication:

    |fl(AB) - AB| <= g |A||B| + a,   1 + g >= (1 + u)^steps,   a = steps (eta/2) (1 + g).

(1 + u)^n - 1 <= gamma_n = nu/(1 - nu), so g = gamma_steps when steps u < 1/4 (DESIGN's F3, whose k eta is >= a) and
an upward-rounded power otherwise: this bound needs no condition on k u.

float16/bfloat16 midpoints: PyTorch's CPU GEMMs for these (oneDNN, AMX on recent CPUs) accumulate in float32 and round
at the end, or work in the storage dtype, or store blocked partial sums; we only assume that each rounded arithmetic
operation goes to float32 or to the storage dtype, and that a conversion to the storage dtype follows a float32
operation (or ends the computation). A path with at most ``steps`` operations then has at most steps + 1 storage
roundings and steps float32 roundings: 1 + g >= (1 + u_s)^(steps+1) (1 + u_32)^steps. Absolute terms: AMX flushes
float32 results below realmin_32 to zero (no MXCSR), so each of the <= 2 steps + 1 operations contributes
max(realmin_32, eta_s/2): a = (2 steps + 1) max(realmin_32, eta_s/2) (1 + g). AMX also reads *subnormal inputs as
zero* (measured: bf16 mm with k >= 64 drops 2^-128 * 2^20 terms), so for these dtypes a subnormal entry x of an
operand is treated as the ball (0 or x) ± |x|: its |x| is added to the operand's radius (``_daz_radius``), which
covers the flushed and the unflushed kernel alike (|0| <= |x| in the terms that use |mA|).

**Ball GEMM (F4)**, for x in A, y in B:
|xy - mC| <= |x y - mA mB| + |mA mB - mC| <= |mA| rB + rA |mB| + rA rB + g |mA||mB| + a
           = |mA| (rB + g|mB|) + rA (|mB| + rB) + a.
``_bracket`` bounds the first two terms with one non-negative GEMM of inner dimension n = 2k:
V = up(rB + up(g |mB|)) >= rB + g|mB|, U = up(|mB| + rB), S = fl([|mA|, rA] @ [V; U]) (mm, bmm, mv: fl(|mA| V)
with rA U accumulated onto it by the add-form, the same 2k products in some summation order, which F3 covers alike).
By F3 on that GEMM (non-negative terms), fl(S) >= (1 - gamma_n) S_exact - n eta, so
S_exact <= theta (fl(S) + n eta) with theta = 1/(1 - gamma_n) = (1 - n u)/(1 - 2 n u) = 1 + 2ku/(1 - 4ku) (n = 2k)
and we return inflate(theta' fl(S), 1, theta n eta + a) (``rounding.inflate``'s lemma on the one product, theta' >=
theta rounded up offline; the midpoint term a enters as its absolute ``extra``), which is >= theta (S + n eta) + a,
DESIGN's beta >= k eta (1 + 2 theta) included. Point operands (a plain tensor or a radius that is
identically zero) drop their terms: A point: S = fl(|mA| @ V), n = k; B point: S = fl(W @ |mB|) with
W = up(rA + up(g|mA|)); both: bracket = g |mA||mB| <= g theta (fl(|mA| @ |mB|) + k eta).
The radius terms are computed in the radius dtype while n u < 1/4 there, otherwise in float64 (float32 radii with
k >= 2^21: the float64 GEMM keeps theta defined), and converted upward.

**A posteriori midpoint error (float32/float16/bfloat16 midpoints)** (``_checked_bracket``). The a-priori term
g|mA||mB| above is a worst case that real GEMMs almost never approach (about 5,000x the actual error of a 784-long
float32 dot product). Where the midpoint dtype is narrower than float64, we instead *measure* the midpoint's error
against a float64 evaluation of the same exact operands:
|mA mB - m| <= |m - R| + |R - mA mB|, R = fl64(mA mB): the products of float32/float16 values are exact in float64
and F3 at u_64 gives |R - mA mB| <= g64 |mA||mB| + a64 ((g64, a64) = ``_mid_error(k, float64)``). The remaining
g64 |mA||mB| (about 1e-13 relative) is bounded without another GEMM by the outer product of A's row sums and B's
column maxima: (|mA||mB|)_il <= (sum_j |mA_ij|) max_j |mB_jl|, row sums rounded up by theta_k. So
rC = up(|m - R|) + theta_n fl([|mA|, rA] @ [rB; |mB| + rB]) (+ n eta) + g64 rowsum (x) colmax + a64, with the point
shortcuts (A point: |mA| @ rB; B point: rA @ |mB|; both: no propagation GEMM). One float64 GEMM replaces the a priori
term; float64 midpoints keep the a priori bound (there is no wider hardware format).

**Which midpoint-error bound** (``gemm_bound``): ``"measured"`` (the default) is the a posteriori bound above;
``"a-priori"`` uses g|mA||mB| for every midpoint dtype. Both run their radius GEMMs in bfloat16 where Lemma B
applies (below) from ``_BF16_MIN_MACS_A_PRIORI`` / ``_BF16_MIN_MACS_MEASURED`` multiply-adds on; smaller GEMMs keep
float32 radius GEMMs, whose result is within 2e-5 relative of the bound they compute. Measuring costs one float64
GEMM, 1.5-3x the float32 midpoint GEMM itself, which is noise next to the dispatch cost of small GEMMs but dominates
large ones; the a priori bound is cheap but, for long dot products, thousands of times wider (mlp-wide's first-step
weight gradients: relative radius 4e-4 measured, 4.0 a priori, i.e. no certified bit). So the tight bound is the
default and the cheap one is a choice (``ballgrad.gemm_bound("a-priori")``, a context manager, or
``set_gemm_bound``), never made silently.

**Radius GEMMs in bfloat16 (Lemma B).** Where the a priori bracket's GEMM would run in float32 and this CPU's bfloat16
GEMM is fast and accumulates in float32 (AMX / AVX512-BF16, probed once: ``guard.bf16_gemm_accumulates_in_float32``),
the non-negative GEMMs run on bfloat16 copies of their operands (``rounding.to_bf16_normal``: Z = max(RN_bf16(z),
realmin_32), so Z >= z (1 - 2^-8) and no entry is subnormal). Model of the kernel: every output is a float32
accumulation of its exact-or-rounded products in any order and blocking, each operation rounding to float32
faithfully (relative error < v = 2^-23, any rounding mode) or flushing a result below realmin_32 to zero (absolute
error < realmin_32), with at most 3 faithful roundings to bfloat16 (w = 2^-7, again at most realmin_32 absolute) on
any path: the conversion of the output, and for ``addmm(mm(X1, Y1), X2, Y2)`` (both operands balls) the first
product's stored output and the addition. A path then has at most N = k + 2 float32 operations. For X, Y >= 0 every
operation gives fl(z) >= z (1 - v) - realmin (or (1 - w)), so by induction over the summation tree the output
Sh >= (1 - w)^3 (1 - v)^N S - (N + 3) realmin for S = sum_j X_j Y_j (all chains together). With (1 - v)^N >= 1 - N v:
    S <= c1 Sh + c2,   c1 = 1/((1 - w)^3 (1 - N v)),   c2 = (N + 3) realmin c1.
The exact bracket factors are bounded by the copies: |mA|, |mB|, rA, rB are exact, so <= Z/(1 - 2^-8); V = rB + g'|mB|
(one ``add`` with alpha: an FMA or two roundings) and |mB| + rB take <= 2 round-to-nearest float32 operations, so
V_exact <= (V + eta/2)/(1 - u)^2 <= max(V, realmin)(1 + u)/(1 - u)^2 (eta/2 <= u realmin), <= Z phi with
phi = (1 + u)/((1 - u)^2 (1 - 2^-8)). The bracket is therefore <= mu (c1 Sh + c2) with mu = phi^2 (g/(1 - 2^-8)^2
when both operands are points), and the float32 evaluation fl(fl(Sh C1) + C2) with C1 = RU(mu c1/(1 - u)^2),
C2 = RU((mu c2 + extra + eta/2)/(1 - u)) is >= it plus ``extra`` (each of its two roundings loses at most a factor
1 - u, the product's underflow eta/2). Operands are never 0, so an infinite entry gives +inf, not NaN. Where the probe
fails or the hardware lacks AMX/AVX512-BF16, the radius GEMM stays in float32. Cost: a bfloat16 GEMM is 5-10x faster
than float32 on AMX; each operand copy is one conversion and one clamp of the 2-byte copy.

**Two balls in one bfloat16 GEMM (Lemma B1, a priori bound).** For any lambda with g <= lambda <= 1, termwise
|mA| rB + rA |mB| + rA rB + g |mA||mB| <= (|mA| + rA/lambda)(rB + lambda |mB|), whose four terms are |mA| rB,
lambda |mA||mB|, rA rB / lambda and rA |mB|. With lambda = g' (g rounded up to float32, g' <= 1) and c' = RU_32(1/g')
>= 1/g' >= 1, the operands X = |mA| + c' rA >= |mA| + rA/g' and Y = rB + g'|mB| are each at most 2 float32
round-to-nearest operations and then ``to_bf16_normal`` (the operand kernel ``fused.bf16_operand`` or the torch
formula), so Lemma B's mu = phi^2 bounds the one GEMM S = X Y as it bounds the two-GEMM sum. Over the two-GEMM
bracket it adds (c' - 1) rA rB + (c' g' - 1) rA |mB| <= c' rA rB (up to roundings); it runs only where every
rB <= 2^-8 g'|mB| (``_ONE_GEMM_RATIO``, counted in the pass that forms Y), which keeps that extra below ~2^-8 of
rA |mB| (the size of the operands' own bfloat16 rounding), and saves one of the two bfloat16 GEMMs where B is a
parameter of a long dot product (relative radius 2^-24 <= 2^-8 g' from k ~ 256 on).

Non-finite midpoints (inf, NaN, or an overflowed sum) get an infinite radius; so do rows/columns meeting an infinite
radius or midpoint in S (inf * 0 = NaN -> inf).
"""

from __future__ import annotations

import functools
import math
from fractions import Fraction

import numpy as np
import torch

from ballgrad import fused, guard, rounding
from ballgrad.ops.common import mid_of as _mid
from ballgrad.ops.common import finite_only as _finite_only
from ballgrad.ops.common import operand, result, result_in_place
from ballgrad.ops.registry import rule
from ballgrad.tensor import BallTensor

aten = torch.ops.aten

_F64 = torch.float64

_REALMIN_32 = Fraction(float(torch.finfo(torch.float32).smallest_normal))


@functools.lru_cache(maxsize=4096)
def _mid_error(steps: int, mid_dtype: torch.dtype) -> tuple[Fraction, Fraction]:
    """(g, a) of the midpoint error model in the module docstring: |computed - exact| <= g sum|terms| + a."""
    if mid_dtype in rounding.REDUCED_DTYPES:
        g_s = rounding.growth(steps + 1, rounding.unit_roundoff_exact(mid_dtype))
        g_32 = rounding.growth(steps, rounding.unit_roundoff_exact(torch.float32))
        g = g_s + g_32 + g_s * g_32
        per_op = max(_REALMIN_32, Fraction(rounding.eta(mid_dtype)) / 2)
        return g, (2 * steps + 1) * per_op * (1 + g)
    g = rounding.growth(steps, rounding.unit_roundoff_exact(mid_dtype))
    return g, steps * Fraction(rounding.eta(mid_dtype)) / 2 * (1 + g)


# ----------------------------------------------------------------------------------------------------------------------
# The ball GEMM


def _is_point(r: torch.Tensor) -> bool:
    """Whether every radius is exactly 0 (the operand is an exact point). A large radius is first probed on a corner
    of at most 256 entries (a view in any layout, e.g. a transposed weight's): one non-zero there decides "not a
    point" without scanning (a trained parameter's radius is non-zero nearly everywhere); only an all-zero corner
    leads to the full scan, so "point" is always a full-scan answer."""
    if r.numel() > 4096 and _corner_nonzero(r):
        return False
    return not bool(r.any())


def _corner(r):
    """The first 16 x 16 entries of the first matrix of ``r`` (its first 256 if it is a vector): a view (of a tensor
    or a numpy array)."""
    if r.ndim < 2:
        return r[:256]
    return r[(0,) * (r.ndim - 2)][:16, :16]


def _corner_nonzero(r: torch.Tensor) -> bool:
    """Whether ``_corner(r)`` holds a non-zero entry; read through a numpy view for CPU float32/float64 radii (no copy,
    ~3 us instead of ~6 us for a tensor reduction and its sync)."""
    if r.is_cpu and r.dtype in (torch.float32, torch.float64):
        return bool(_corner(r.detach().numpy()).any())
    return bool(_corner(r).any())


def _daz_radius(m: torch.Tensor, r: torch.Tensor, mid_dtype: torch.dtype) -> torch.Tensor:
    """For float16/bfloat16: add |x| to the radius of every subnormal entry x (kernels may read them as zero)."""
    if mid_dtype not in rounding.REDUCED_DTYPES:
        return r
    sub = (m != 0) & (torch.abs(m) < torch.finfo(mid_dtype).smallest_normal)
    if not bool(sub.any()):
        return r
    r = r.expand(m.shape)
    return torch.where(sub, rounding.add_up(r, torch.abs(m)), r)


# ----------------------------------------------------------------------------------------------------------------------
# Which bound, and bfloat16 radius GEMMs (module docstring)

GEMM_BOUNDS = ("measured", "a-priori")
_gemm_bound = "measured"
_BF16_RADIUS = None  # None: use bfloat16 radius GEMMs where the probe allows; False: never (tests force float32)


def set_gemm_bound(mode: str) -> str:
    """Choose the midpoint-error bound of float16/bfloat16/float32 GEMMs (module docstring): "measured" (a float64
    reference GEMM: tightest, the default) or "a-priori" (gamma_k |A||B|: cheapest, far wider for long dot products).
    Returns the previous mode."""
    global _gemm_bound
    if mode not in GEMM_BOUNDS:
        raise ValueError(f"gemm bound must be one of {GEMM_BOUNDS}, got {mode!r}")
    previous, _gemm_bound = _gemm_bound, mode
    return previous


class gemm_bound:  # noqa: N801 (used like torch.no_grad)
    """Context manager: ``with ballgrad.gemm_bound("a-priori"): ...`` (see ``set_gemm_bound``)."""

    def __init__(self, mode: str):
        if mode not in GEMM_BOUNDS:
            raise ValueError(f"gemm bound must be one of {GEMM_BOUNDS}, got {mode!r}")
        self.mode = mode

    def __enter__(self):
        self.previous = set_gemm_bound(self.mode)
        return self

    def __exit__(self, *exc):
        set_gemm_bound(self.previous)
        return False


def _measures(m: torch.Tensor, k: int) -> bool:
    """Whether this GEMM's midpoint error is measured against float64 (narrow midpoints only; see gemm_bound)."""
    return m.dtype != _F64 and _gemm_bound == "measured"


def _bf16_radius_gemms() -> bool:
    return _BF16_RADIUS is not False and guard.bf16_gemm_accumulates_in_float32()


@functools.lru_cache(maxsize=1024)
def _lemma_b_constants(k: int, mu: Fraction, extra: Fraction = Fraction(0)) -> tuple[float, float] | None:
    """(C1, C2) of Lemma B for bfloat16 GEMMs of inner dimension k scaled by mu, plus an absolute term ``extra``,
    rounded up to float32: N = k + 2 float32 operations and 3 bfloat16 roundings per path. None where N v >= 1/2
    (then the radius GEMM stays in float32)."""
    big_n, v, w = k + 2, Fraction(1, 2**23), Fraction(1, 2**7)
    if big_n * v >= Fraction(1, 2):
        return None
    realmin, u = Fraction(rounding.REALMIN_32), rounding.unit_roundoff_exact(torch.float32)
    denominator = (1 - w) ** 3 * (1 - big_n * v)
    c1, c2 = 1 / denominator, (big_n + 3) * realmin / denominator
    half_eta = Fraction(rounding.eta(torch.float32)) / 2
    return (rounding.round_up_float(mu * c1 / (1 - u) ** 2, torch.float32),
            rounding.round_up_float((mu * c2 + extra + half_eta) / (1 - u), torch.float32))


_U32 = rounding.unit_roundoff_exact(torch.float32)
_TO_BF16 = 1 / (1 - Fraction(rounding.BF16_ROUNDING))  # to_bf16_normal: z <= Z / (1 - 2^-8)
_COMPUTED = (1 + _U32) / (1 - _U32) ** 2 * _TO_BF16  # a factor of <= 2 float32 RN operations, then to_bf16_normal


def _bf16_sum(x, y=None, alpha: float = 1.0, abs_x: bool = False, abs_y: bool = False, t: float | None = None):
    """(Z, wide): Z = ``rounding.to_bf16_normal`` of X + alpha Y (X = |x| or x, Y = |y| or y, float32 >= 0; Z of X
    without y) at <= 2 float32 roundings, in one pass (``fused.bf16_operand``) or by the reference; wide = how many
    elements have not X <= t Y (computed only when t is given, else 0)."""
    fast = fused.bf16_operand(x, y, alpha, abs_x, abs_y, 0.0 if t is None else t)
    if fast is not None:
        return fast
    if y is None:
        z = rounding.abs_to_bf16_normal(x) if abs_x else rounding.to_bf16_normal(x)
    elif abs_y and not abs_x:
        z = rounding.abs_sums_to_bf16_normal(x, y, (alpha,))[0]  # blocked: no full-size float32 |y|
    else:
        z = rounding.sum_to_bf16_normal(torch.abs(x) if abs_x else x, torch.abs(y) if abs_y else y, alpha)
    wide = 0
    if t is not None and y is not None:
        big_x, big_y = (torch.abs(x) if abs_x else x), (torch.abs(y) if abs_y else y)
        wide = int(torch.count_nonzero(~(big_x <= big_y * t)))
    return z, wide


def _bf16_finish(s: torch.Tensor, c1: float, c2: float) -> torch.Tensor:
    """fl(fl(S c1) + c2) in float32 with NaN -> +inf, S the bfloat16 GEMM output (``fused.bf16_finish``, or the torch
    formula it follows bit for bit)."""
    fast = fused.bf16_finish(s, c1, c2)
    if fast is not None:
        return fast
    return s.to(torch.float32).mul_(c1).add_(c2).nan_to_num_(nan=math.inf, posinf=math.inf)


# Lemma B1 (one GEMM for two balls, a-priori bound): used where rB <= _ONE_GEMM_RATIO g'|mB| elementwise, so that its
# extra term c' rA rB is at most ~2^-8 of the rA |mB| it sits beside, the size of the bfloat16 rounding of the operands
# themselves; otherwise the two GEMMs run. Either is sound for any operands: _ONE_GEMM = True forces B1 (tests).
_ONE_GEMM_RATIO = 2.0**-8
_ONE_GEMM = None


def _bf16_bracket(gemm, ma, ra, mb, rb, k: int, g: Fraction, b_dim: int, a_point: bool, b_point: bool,
                  extra: Fraction = Fraction(0), raw: bool = False, abs_operands=None):
    """The bracket of ``_bracket`` (float32 radii) plus ``extra`` from bfloat16 GEMMs (Lemma B in the module
    docstring), NaN made +inf, or None where Lemma B's constants do not apply. Both balls: S = X1 Y1 + X2 Y2 as one
    bfloat16 addmm(mm(X1, Y1), X2, Y2) with X1 = |mA|, Y1 = rB + g'|mB|, X2 = rA, Y2 = |mB| + rB (inner dimension k
    each; Lemma B's N = k + 2 and 3 bfloat16 roundings cover the two chains and the addition), or, with g > 0 and
    rB small (Lemma B1), S = X Y1 with X = |mA| + c' rA. ``abs_operands``: |mA|, |mB| in float32 if the caller has
    them (not modified)."""
    both_points = a_point and b_point
    consts = _lemma_b_constants(k, g * _TO_BF16**2 if both_points else _COMPUTED**2, extra)
    if consts is None:
        return None
    c1, c2 = consts
    g_w = rounding.round_up_float(g, torch.float32)

    def abs_of(m, i):  # Z of |m| (exact)
        return _bf16_sum(abs_operands[i])[0] if abs_operands is not None else _bf16_sum(m, abs_x=True)[0]

    def plus(r, m, i, alpha, t=None):  # (Z of r + alpha |m| (<= 2 float32 roundings), wide); r + |m| = |m| + r exactly
        if abs_operands is not None:
            return _bf16_sum(r, abs_operands[i], alpha, t=t)
        return _bf16_sum(r, m, alpha, abs_y=True, t=t)

    def plus_g(r, m, i):  # Z of r + g'|m|; of r itself when g = 0 (the measured bound)
        return _bf16_sum(r.expand(m.shape))[0] if g == 0 else plus(r, m, i, g_w)[0]

    if both_points:
        s = gemm(abs_of(ma, 0), abs_of(mb, 1))
    elif a_point:
        s = gemm(abs_of(ma, 0), plus_g(rb, mb, 1))
    elif b_point:
        s = gemm(plus_g(ra, ma, 0), abs_of(mb, 1))
    else:
        one_gemm = g != 0 and g_w <= 1  # Lemma B1 needs g <= g' <= 1
        y1, wide = plus(rb, mb, 1, g_w, t=g_w * _ONE_GEMM_RATIO) if one_gemm else (plus_g(rb, mb, 1), 1)
        if one_gemm and ((wide == 0 and _ONE_GEMM is not False) or _ONE_GEMM):  # X = |mA| + c' rA, c' = RU(1/g')
            c_inv = rounding.round_up_float(1 / Fraction(g_w), torch.float32)
            s = gemm(_bf16_sum(ma, ra.expand(ma.shape), c_inv, abs_x=True)[0], y1)
        else:
            s = gemm(abs_of(ma, 0), y1)
            s = _ACCUMULATE[gemm](s, _bf16_sum(ra)[0].expand(ma.shape), plus(rb, mb, 1, 1.0)[0])
    if raw:  # (S^, C1, C2) with the bound C1 S^ + C2, for a caller that folds it into its own inflate
        return s, c1, c2
    return _bf16_finish(s, c1, c2)


# C += A B in place (no second output-sized temporary): the add-forms that accumulate a second product onto a first
_ACCUMULATE = {aten.mm.default: torch.Tensor.addmm_, aten.bmm.default: torch.Tensor.baddbmm_,
               aten.mv.default: torch.Tensor.addmv_}


def _bracket(gemm, ma, ra, mb, rb, k: int, g: Fraction, b_dim: int, rad_dtype: torch.dtype,
             extra: Fraction = Fraction(0)) -> torch.Tensor:
    """An upper bound, elementwise, of |mA| rB + rA |mB| + rA rB + g |mA||mB| (exact real GEMMs) plus ``extra``; see
    the module docstring. ``gemm`` is the plain op (mm, bmm, mv, dot); ``b_dim`` is B's contraction dimension. The
    result is a fresh tensor (callers may overwrite it); NaN (from a NaN operand) becomes +inf."""
    a_point, b_point = _is_point(ra), _is_point(rb)
    n = k if (a_point or b_point) else 2 * k
    wd = rounding.work_dtype(rad_dtype, n)
    if wd == torch.float32 and _bf16_radius_gemm(gemm, ma.numel() * (mb.shape[-1] if mb.dim() >= 2 else 1),
                                                      _BF16_MIN_MACS_A_PRIORI):
        bound = _bf16_bracket(gemm, ma, ra.to(wd), mb, rb.to(wd), k, g, b_dim, a_point, b_point, extra=extra)
        if bound is not None:
            return bound
    g_w, scale, phi, a = _bracket_constants(n, wd, g, extra, a_point and b_point)
    abs_ma, abs_mb = torch.abs(ma).to(wd), torch.abs(mb).to(wd)
    if a_point and b_point:  # g theta (s + n eta) + extra: ``inflate``'s lemma on the one product s (g theta)'
        s = gemm(abs_ma, abs_mb)
        return s.mul_(scale).mul_(phi).add_(a).nan_to_num_(nan=math.inf, posinf=math.inf)
    ra, rb = ra.to(wd), rb.to(wd)
    if a_point:
        v = rounding.up(torch.add(rb, rounding.up(torch.mul(abs_mb, g_w))))
        s = gemm(abs_ma, v)
    elif b_point:
        w = rounding.up(torch.add(ra, rounding.up(torch.mul(abs_ma, g_w))))
        s = gemm(w, abs_mb)
    else:
        v = rounding.up(torch.add(rb, rounding.up(torch.mul(abs_mb, g_w))))
        w_u = rounding.up(torch.add(abs_mb, rb))
        accumulate = _ACCUMULATE.get(gemm)
        if accumulate is not None:  # the same 2k products in some order (F3's n = 2k), without the concatenations
            s = accumulate(gemm(abs_ma, v.expand(abs_mb.shape)), ra.expand(abs_ma.shape), w_u.expand(abs_mb.shape))
        else:
            left = torch.cat([abs_ma, ra.expand(abs_ma.shape)], dim=-1)
            right = torch.cat([v.expand(abs_mb.shape), w_u.expand(abs_mb.shape)], dim=b_dim)
            s = gemm(left, right)
    # theta (s + n eta) + extra: ``inflate``'s lemma on the one product s theta' (s is this call's own GEMM output)
    return s.mul_(scale).mul_(phi).add_(a).nan_to_num_(nan=math.inf, posinf=math.inf)


@functools.lru_cache(maxsize=4096)
def _bracket_constants(n: int, wd: torch.dtype, g: Fraction, extra: Fraction, both_points: bool):
    """(g', scale, phi, a) of ``_bracket``'s float32/float64 path: g' = g rounded up; scale = theta_n (g theta_n when
    both operands are points) rounded up; (phi, a) = ``rounding.inflate``'s constants for that one product with the
    absolute term scale' n eta + extra (so ``s.mul_(scale).mul_(phi).add_(a)`` is ``inflate_(s * scale, 1, ...)``).
    Cached: the exact rational arithmetic costs ~30 us a call."""
    u, eta = rounding.unit_roundoff_exact(wd), Fraction(rounding.eta(wd))
    th = rounding.theta(n, u)
    factor = g * th if both_points else th
    phi, a = rounding.inflation_constants(1, wd, factor * n * eta + extra)
    return rounding.round_up_float(g, wd), rounding.round_up_float(factor, wd), phi, a


def _abs_product_bound(ma64: torch.Tensor, mb64: torch.Tensor, k: int, b_dim: int) -> torch.Tensor:
    """An upper bound of |mA||mB| (the exact non-negative GEMM) without a GEMM: (sum_j |A_ij|) * max_j |B_jl|, the row
    sums computed in float64 and scaled by theta_k (F3 for a sum of non-negative terms), all rounded up."""
    th = rounding.round_up_float(rounding.theta(max(k, 1), rounding.unit_roundoff_exact(_F64)), _F64)
    rows = rounding.up(torch.mul(torch.sum(torch.abs(ma64), dim=-1), th))
    cols = torch.amax(torch.abs(mb64), dim=b_dim) if k > 0 else torch.zeros(mb64.shape[:-2] + mb64.shape[-1:] if mb64.dim() >= 2 else (), dtype=_F64)
    if ma64.dim() >= 2 and mb64.dim() >= 2:
        return rounding.up(rows.unsqueeze(-1) * cols.unsqueeze(-2))
    return rounding.up(rows * cols)


def _checked_bracket(plain, m, ma, ra, mb, rb, k: int, b_dim: int, rad_dtype: torch.dtype, reference) -> torch.Tensor:
    """Upper bound (float64) of |mA| rB + rA |mB| + rA rB + |mA mB - m| where ``reference`` = fl64(mA mB) (the same
    exact operands in float64): see "A posteriori midpoint error" in the module docstring."""
    g64, a64 = _mid_error(k, _F64)
    ma64, mb64 = ma.to(_F64), mb.to(_F64)
    residual = rounding.up(torch.abs(m.to(_F64) - reference))
    coarse = _abs_product_bound(ma64, mb64, k, b_dim)
    bound = rounding.up(torch.add(rounding.up(torch.mul(coarse, rounding.round_up_float(g64, _F64))),
                                  rounding.absolute_term(a64, _F64)))
    bound = rounding.add_up(bound, residual)
    prop = _propagation_bound(plain, ma, ra, mb, rb, k, b_dim, rad_dtype)
    return bound if prop is None else rounding.add_up(bound, prop)


def _propagation_bound(plain, ma, ra, mb, rb, k: int, b_dim: int, rad_dtype: torch.dtype) -> torch.Tensor | None:
    """Upper bound (float64) of |mA| rB + rA |mB| + rA rB: ``_propagation_gemm``'s theta_n (s + n eta), rounded up
    (F2), or None when both operands are points (the bound is 0)."""
    prop = _propagation_gemm(plain, ma, ra, mb, rb, k, b_dim, rad_dtype)
    if prop is None:
        return None
    s, n, scale = prop
    wd = s.dtype
    th = rounding.theta(n, rounding.unit_roundoff_exact(wd)) * scale
    bound = rounding.up(torch.add(rounding.up(torch.mul(s, rounding.round_up_float(th, wd))),
                                  rounding.absolute_term(th * n * Fraction(rounding.eta(wd)), wd)))
    return bound.to(_F64)


# -- the measured radius, combined in float32 (no float64 passes over the output beyond the residual) --------------

_U64 = rounding.unit_roundoff_exact(_F64)
_ETA32 = Fraction(rounding.eta(torch.float32))
_RESIDUAL_FACTOR = rounding.round_up_float(1 / ((1 - _U32) * (1 - _U64)), torch.float32)
_RESIDUAL_ABSOLUTE = _ETA32 / 2 * Fraction(_RESIDUAL_FACTOR)  # the eta32/2 of ``_residual32``, scaled by C_e


def _residual32(m: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """e (float32) with |m - reference| <= (e + eta32/2)/((1 - u32)(1 - u64)): the float64 difference (m widened
    exactly; one rounding, relative u64) then one round-to-nearest conversion to float32 (relative u32, or an absolute
    eta32/2 below realmin; an overflow gives +inf). Three passes; the caller scales by ``_RESIDUAL_FACTOR`` and adds
    the eta32/2 term to its absolute constant. A ``reference`` of m's shape is overwritten (it is not needed after
    this, and a float64 output-sized temporary is what sets the rules' peak memory)."""
    if reference.shape == m.shape:
        e = torch.empty(m.shape, dtype=torch.float32, device=m.device)
        _residual_writer(m)(reference, m, e)
        return e
    return torch.sub(m, reference).abs_().to(torch.float32)


# The measured bound's passes over the output run as ``fused``'s GEMM kernels from this many output elements on. Below,
# numba's call overhead (~1 us per array argument) outweighs the torch passes it saves (64 x 10: 4% slower fused;
# 256 x 64: even; 256 x 192: 5% faster, single-threaded CPU time of the whole addmm rule, interleaved).
_FUSED_GEMM_MIN = 1 << 14


def _fused_gemm(m: torch.Tensor) -> bool:
    """Whether the measured bound's passes over a 2-D float32 output run as ``fused``'s GEMM kernels."""
    return (m.dim() == 2 and m.numel() >= _FUSED_GEMM_MIN and m.dtype == torch.float32 and m.device.type == "cpu"
            and fused._numba() is not None)


# Float64 reference GEMMs are evaluated a block of the output at a time when the output has more than _UNBLOCKED_MAX
# elements, in blocks of about _REFERENCE_BLOCK elements, so that the float64 output (2x the float32 one) and the
# float64 operand copies do not set the rule's peak memory; a block spans at least _MIN_BLOCK rows or columns (narrower
# float64 GEMMs run at half speed: 64 columns of a 512 x 2048 x 2048 product take 1.5x the time of 128). Outputs up to
# 2^16 elements are not split (transformer-tiny's 256 x 192 projections: two GEMMs of 170 and 86 rows cost 40% more
# than one), which leaves every zoo model's step peak where it is; blocks of 2^16 raise mlp-small's to 2.62x plain.
_REFERENCE_BLOCK = 2**15
_MIN_BLOCK = 128
_UNBLOCKED_MAX = 2**16


def _blocked_residual(m: torch.Tensor, ma: torch.Tensor, mb: torch.Tensor, reference_block) -> torch.Tensor:
    """``_residual32(m, R)`` (float32 |m - R| rounded to nearest, same bound) where ``reference_block(rows, cols,
    ma64, mb64)`` returns the float64 reference R[rows, cols] of a 2-D output from the operands' matching rows / columns
    widened to float64 (rows, cols None: all of R, from all of A and B). Each element of R is the same float64 dot
    product whether computed with the whole matrices or with a block (F3 is per element), and the float64 -> float32
    copy rounds to nearest like ``.to``. Blocks run over the columns (holding A in float64) when A is the smaller
    operand, else over the rows (holding B)."""
    if m.dim() != 2 or m.numel() <= _UNBLOCKED_MAX:
        return _residual32(m, reference_block(None, None, ma.to(_F64), mb.to(_F64)))
    rows, cols = m.shape
    e = torch.empty(m.shape, dtype=torch.float32, device=m.device)
    into = _residual_writer(m)
    if ma.numel() <= mb.numel():
        ma64, step = ma.to(_F64), max(_MIN_BLOCK, _REFERENCE_BLOCK // rows)
        for j in range(0, cols, step):
            block = slice(j, min(j + step, cols))
            into(reference_block(slice(None), block, ma64, mb[:, block].to(_F64)), m[:, block], e[:, block])
    else:
        mb64, step = mb.to(_F64), max(_MIN_BLOCK, _REFERENCE_BLOCK // cols)
        for i in range(0, rows, step):
            block = slice(i, min(i + step, rows))
            into(reference_block(block, slice(None), ma[block].to(_F64), mb64), m[block], e[block])
    return e


def _residual_into(reference: torch.Tensor, m: torch.Tensor, e: torch.Tensor) -> None:
    """e[...] = RN_32(|reference - m|) (``_residual32``'s operations; ``reference`` is overwritten)."""
    e.copy_(reference.sub_(m).abs_())


def _residual_writer(m: torch.Tensor):
    """``_residual_into`` or its one-pass twin ``fused.gemm_residual_into`` (the same operations, bit for bit)."""
    return fused.gemm_residual_into if _fused_gemm(m) else _residual_into


def _propagation_constants(n: int, alpha: float, scale: Fraction) -> tuple[float, Fraction]:
    """(C_s, A_s) of ``_measured_radius_f32``: C_s >= |alpha| theta_n scale (float32, rounded up) and the absolute
    term A_s = |alpha| theta_n scale n eta32 (exact)."""
    th = rounding.theta(n, _U32) * abs(Fraction(alpha)) * scale
    return rounding.round_up_float(th, torch.float32), th * n * _ETA32


def _lemma_b_terms(alpha: float, c1: float, c2: float) -> tuple[float, Fraction]:
    """(C, A) of ``_measured_radius_f32`` for Lemma B's bound C1 S^ + C2 scaled by |alpha|: C >= |alpha| C1 (float32,
    rounded up) and the absolute term A = |alpha| C2 (exact)."""
    a = abs(Fraction(alpha))
    return rounding.round_up_float(a * Fraction(c1), torch.float32), a * Fraction(c2)


@functools.lru_cache(maxsize=1024)
def _finish_constants(steps: int, alpha: float, beta: float, propagation: tuple | None, bounds: bool) -> tuple:
    """(C_s, C_1, C_2, phi, a, array) of ``_measured_radius_f32``, cached on cheap keys (a Fraction's hash costs ~3 us
    and its arithmetic more: together ~40 us per GEMM uncached). (g64, a64) = ``_mid_error(steps, float64)``;
    ``propagation``: None, ("lemma-b", C1, C2) or ("products", n, p, q) with scale = p/q (``_propagation_products``);
    C_s from ``_lemma_b_terms`` / ``_propagation_constants``; the bias terms (beta != 0) C_1 >= |beta| and
    C_2 >= g64 |beta| rounded up to float32; (phi, a) = ``rounding.inflation_constants`` for n_ops = 1 + 2 per further
    term and the exact absolute sum A = eta32/2 C_e + a64 (+ A_s); ``array`` = (C_e, C_s, C_1, C_2, phi, a) in float32
    for ``fused.gemm_finish`` (all float32 values: the conversion is exact)."""
    g64, a64 = _mid_error(steps, _F64)
    absolute = _RESIDUAL_ABSOLUTE + a64
    n_ops, c_s, c_1, c_2 = 1, 0.0, 0.0, 0.0
    if propagation is not None:
        if propagation[0] == "lemma-b":
            c_s, extra = _lemma_b_terms(alpha, propagation[1], propagation[2])
        else:
            c_s, extra = _propagation_constants(propagation[1], alpha, Fraction(propagation[2], propagation[3]))
        absolute += extra
        n_ops += 2
    if bounds:
        n_ops += 2
    if beta != 0:
        b = abs(Fraction(beta))
        c_1, c_2 = rounding.round_up_float(b, torch.float32), rounding.round_up_float(g64 * b, torch.float32)
        n_ops += 4
    phi, a = rounding.inflation_constants(n_ops, torch.float32, absolute)
    array = np.array([_RESIDUAL_FACTOR, c_s, c_1, c_2, phi, a], dtype=np.float32)
    assert all(float(v) == c for v, c in zip(array, (_RESIDUAL_FACTOR, c_s, c_1, c_2, phi, a)))
    array.setflags(write=False)
    return c_s, c_1, c_2, phi, a, array


@functools.lru_cache(maxsize=1024)
def _row_scale(k: int, steps: int, alpha: float) -> float:
    """theta_k(u32) g64 |alpha| rounded up to float32, g64 of ``_mid_error(steps, float64)`` (``_row_col_bounds``;
    cached: rational arithmetic costs ~100 us per GEMM)."""
    g64 = _mid_error(steps, _F64)[0]
    return rounding.round_up_float(rounding.theta(k, _U32) * g64 * abs(Fraction(alpha)), torch.float32)


def _row_col_bounds(abs_ma: torch.Tensor, abs_mb: torch.Tensor, k: int, b_dim: int, steps: int, alpha: float):
    """(rows, cols), float32, broadcasting to the output, with g64 |alpha| (|mA||mB|)_il <= rows_i cols_l exactly,
    from |mA| and |mB| in float32 (exact): rows_i = up(fl(S_i) C) with S_i = sum_j |mA_ij| summed in float32 (any
    order, non-negative terms: S_i <= theta_k fl(S_i), F3; the caller keeps 2k u32 < 1/4) and C >= theta_k g64 |alpha|
    (``_row_scale``), the product bumped up (F2); cols_l = max_j |mB_jl| (exact). None when k == 0 (the product is
    exactly 0)."""
    if k == 0:
        return None
    rows = rounding.mul_up(torch.sum(abs_ma, dim=-1), _row_scale(k, steps, alpha))
    cols = torch.amax(abs_mb, dim=b_dim)
    if abs_ma.dim() >= 2 and abs_mb.dim() >= 2:
        return rows.unsqueeze(-1), cols.unsqueeze(-2)
    return rows, cols


def _propagation_gemm(plain, ma, ra, mb, rb, k: int, b_dim: int, rad_dtype: torch.dtype = torch.float32):
    """(s, n, scale) with |mA| rB + rA |mB| + rA rB <= scale theta_n (s + n eta) (F3 for non-negative GEMMs of inner
    dimension n in ``work_dtype(rad_dtype, n)``, s's dtype), or None when both operands are points
    (``_propagation_products``)."""
    a_point, b_point = _is_point(ra), _is_point(rb)
    if a_point and b_point:
        return None
    wd = rounding.work_dtype(rad_dtype, k if (a_point or b_point) else 2 * k)
    return _propagation_products(plain, torch.abs(ma).to(wd), ra.to(wd), torch.abs(mb).to(wd), rb.to(wd), k, b_dim,
                                 a_point, b_point)


def _propagation_products(plain, abs_ma, ra, abs_mb, rb, k: int, b_dim: int, a_point: bool, b_point: bool):
    """``_propagation_gemm`` from |mA|, rA, |mB|, rB in the work dtype (not both points); ``abs_mb`` is overwritten
    with |mB| + rB when both operands are balls.

    Two balls: |mA| rB + rA (|mB| + rB), 2k non-negative products. mm/bmm/mv accumulate the second product onto the
    first with their add-form (addmm/baddbmm/addmv: some summation order of the 2k products, which F3 covers with
    n = 2k); other ops take one GEMM of concatenated operands. |mB| + rB is rounded to nearest, and an addition of
    non-negative floats loses at most a factor (1 - u) (no underflow), so scale = 1/(1 - u); otherwise scale = 1."""
    n = k if (a_point or b_point) else 2 * k
    if a_point:
        return plain(abs_ma, rb.expand(abs_mb.shape)), n, Fraction(1)
    if b_point:
        return plain(ra.expand(abs_ma.shape), abs_mb), n, Fraction(1)
    first = rb.expand(abs_mb.shape)
    accumulate = _ACCUMULATE.get(plain)
    if accumulate is not None:
        s = accumulate(plain(abs_ma, first), ra.expand(abs_ma.shape), abs_mb.add_(rb))
    else:
        left = torch.cat([abs_ma, ra.expand(abs_ma.shape)], dim=-1)
        s = plain(left, torch.cat([first, abs_mb.add_(rb)], dim=b_dim))
    return s, n, _sum_scale(abs_mb.dtype)


@functools.lru_cache(maxsize=None)
def _sum_scale(dtype: torch.dtype) -> Fraction:
    """1/(1 - u) of ``_propagation_products`` (cached: the Fraction arithmetic costs ~10 us a call)."""
    return 1 / (1 - rounding.unit_roundoff_exact(dtype))


# Radius GEMMs run in bfloat16 (Lemma B) from these many multiply-adds (m n k) on. Below, a bfloat16 GEMM with its
# operand conversions is no faster than float32 (AVX512-BF16 CPU without AMX, a-priori ball mm of two balls:
# 256 x 64 x 192 409 us in float32 vs 432 us; 64 x 784 x 128 693 vs 591 us; 10 x 512 x 2048 9.3 vs 2.4 ms). The
# measured bound keeps float32 up to far larger GEMMs: its bfloat16 operands make the propagated radius up to ~3%
# wider, which costs nothing measurable to avoid while the float64 reference GEMM dominates.
_BF16_MIN_MACS_A_PRIORI = 2**22
_BF16_MIN_MACS_MEASURED = 2**26


def _bf16_radius_gemm(plain, macs: int, min_macs: int) -> bool:
    """Whether a GEMM of ``macs`` multiply-adds gets bfloat16 radius GEMMs: large enough (``min_macs``, one of the two
    thresholds above), an op with an add-form (``_ACCUMULATE``: Lemma B's two-ball bracket is one addmm), and a CPU
    that allows it."""
    return plain in _ACCUMULATE and macs >= min_macs and _bf16_radius_gemms()


def _measured_radius_f32(m, e, plain, ma, ra, mb, rb, k, b_dim, steps, alpha=1.0, beta=0.0, bias=None):
    """Float32 upper bound of |m - R| + g64 |alpha| |mA||mB| + a64 + |alpha| (|mA| rB + rA |mB| + rA rB)
    + |beta| rc + g64 |beta| |mc| (the last two for ``bias`` = (rc, |mc|), float32, exact, used when beta != 0), where
    (g64, a64) = ``_mid_error(steps, float64)``, R is the float64 reference and e = ``_residual32(m, R)`` (computed by
    the caller, so that R is freed before the radius GEMMs allocate).

    t = e C_e + s C_s + rows cols + rc C_1 + |mc| C_2 + A with e = ``_residual32``, (s, n) = ``_propagation_products``,
    rows and cols from ``_row_col_bounds`` (scale g64 |alpha|), constants rounded up: C_e >= 1/((1 - u32)(1 - u64)),
    C_s >= |alpha| theta_n, C_1 >= |beta|, C_2 >= g64 |beta|, and the absolute A = eta32/2 C_e + a64 + |alpha| theta_n n
    eta32 passed to ``inflate`` as its ``extra`` (``_finish_constants``). Every term of t is a product of two
    non-negative floats, so ``inflate(t, n_ops, extra=A)`` (its lemma) bounds the rounding of t's evaluation plus A:
    n_ops counts the first multiplication and one multiplication and one addition per further term. The result is
    >= the exact bound term by term."""
    f32 = torch.float32
    prop = lemma_b = bounds = None
    if k > 0 and alpha != 0:
        a_point, b_point = _is_point(ra), _is_point(rb)
        abs_ma, abs_mb = torch.abs(ma), torch.abs(mb)  # float32 (the operands' radius dtype): exact
        bounds = _row_col_bounds(abs_ma, abs_mb, k, b_dim, steps, float(alpha))  # before abs_mb is overwritten
        # _bf16_bracket returns None where Lemma B does not apply
        if not (a_point and b_point) and _bf16_radius_gemm(plain, m.numel() * k, _BF16_MIN_MACS_MEASURED):
            lemma_b = _bf16_bracket(plain, ma, ra.to(f32), mb, rb.to(f32), k, Fraction(0), b_dim, a_point, b_point,
                                    raw=True, abs_operands=(abs_ma, abs_mb))
        if lemma_b is None and not (a_point and b_point):
            prop = _propagation_products(plain, abs_ma, ra, abs_mb, rb, k, b_dim, a_point, b_point)
        del abs_ma, abs_mb
    s = propagation = None  # the propagation term C_s s, s >= 0 exact
    if lemma_b is not None:  # the propagation term is <= C1 S^ + C2 (S^ the bfloat16 GEMM, an exact float32 value)
        s, c1, c2 = lemma_b
        propagation = ("lemma-b", c1, c2)
    if prop is not None:
        s, n, scale = prop
        propagation = ("products", n, scale.numerator, scale.denominator)
    beta = float(beta) if bias is not None else 0.0
    c_s, c_1, c_2, phi, a, constants = _finish_constants(steps, float(alpha), beta, propagation, bounds is not None)
    if _fused_gemm(m) and e.shape == m.shape:
        finished = _fused_finish(m, e, s, bounds, bias if beta != 0 else None, constants)
        if finished is not None:
            return finished
    t = e.expand(m.shape).clone() if e.shape != m.shape else e
    t.mul_(_RESIDUAL_FACTOR)
    if s is not None:
        t.add_(s, alpha=c_s)
    if bounds is not None:
        t.addcmul_(*bounds)
    if beta != 0:
        t.add_(bias[0].to(f32), alpha=c_1).add_(bias[1].to(f32), alpha=c_2)
    return t.mul_(phi).add_(a).nan_to_num_(nan=math.inf, posinf=math.inf)  # rounding.inflate_, t our own buffer


_NO_MATRIX = np.empty((0, 0), dtype=np.float32)
_NO_VECTOR = np.empty(0, dtype=np.float32)


def _fused_finish(m, e, s, bounds, bias, constants) -> torch.Tensor | None:
    """``_measured_radius_f32``'s sum and inflation as ``fused.gemm_finish`` (one pass, written over e), or None where
    its operands do not have the kernel's layout (a bias that varies along the rows)."""
    rows_n, cols_n = m.shape
    s_np = _NO_MATRIX
    if s is not None:
        if s.shape != m.shape:
            return None
        s_np = s.to(torch.float32).contiguous().numpy()  # exact (S^ of Lemma B is a bfloat16 value)
    rows = cols = rc = amc = _NO_VECTOR
    if bounds is not None:
        rows, cols = (b.reshape(-1).expand(n).contiguous().numpy() for b, n in zip(bounds, (rows_n, cols_n)))
    if bias is not None:
        if any(t.dim() > 2 or (t.dim() == 2 and t.shape[0] != 1) for t in bias):
            return None
        rc, amc = (t.to(torch.float32).reshape(-1).expand(cols_n).contiguous().numpy() for t in bias)
    return fused.gemm_finish(e, s_np, rows, cols, rc, amc, constants)


def _check_fp32_gemm_precision() -> None:
    """The numerics guard runs once per process, but the float32 GEMM precision can be lowered afterwards
    (``torch.set_float32_matmul_precision('medium')``, oneDNN bf16): every GEMM rule re-reads it (about 2 us) and lets
    the guard refuse with its message. Float32 GEMMs run in every rule here (the radius GEMMs of reduced dtypes too)."""
    precision = guard._mkldnn_matmul_precision()
    if precision in (None, "ieee", "none"):
        try:
            if torch.get_float32_matmul_precision() == "highest":
                return
        except RuntimeError:  # legacy and new precision APIs mixed: the backend setting above is the effective one
            if precision is not None:
                return
    guard.check_numerics()


_PLAIN_GEMM = {
    aten.mm.default: aten.mm.default,
    aten.bmm.default: aten.bmm.default,
    aten.mv.default: aten.mv.default,
    aten.dot.default: aten.dot.default,
    aten.addmm.default: aten.mm.default,
    aten.baddbmm.default: aten.bmm.default,
    aten.addmv.default: aten.mv.default,
}


def _operands(m, a, b):
    """(mA, rA, mB, rB, k, b_dim) as the kernel uses them, with the subnormal-input radius for reduced dtypes."""
    ma, ra = operand(a, m.dtype)
    mb, rb = operand(b, m.dtype)
    ra = _daz_radius(ma, ra, m.dtype)
    rb = _daz_radius(mb, rb, m.dtype)
    k = ma.shape[-1]
    b_dim = -2 if mb.dim() >= 2 else -1
    return ma, ra, mb, rb, k, b_dim


@rule(aten.mm.default, aten.bmm.default, aten.mv.default, aten.dot.default)
def gemm(func, a, b):
    """C = A B (mm, bmm, mv, dot): rC = bracket(g) + a with (g, a) = ``_mid_error(k)``; see the module docstring."""
    _check_fp32_gemm_precision()
    m = func(_mid(a), _mid(b))
    ma, ra, mb, rb, k, b_dim = _operands(m, a, b)
    rd = rounding.rad_dtype(m.dtype)
    plain = _PLAIN_GEMM[func]
    if _measures(m, k):
        if rounding.work_dtype(rd, 2 * k) == torch.float32:
            e = _blocked_residual(m, ma, mb, lambda rows, cols, ma64, mb64: plain(ma64, mb64))
            # the radius is +inf or NaN (made +inf by inflate) wherever m is not finite: |m - R| is then inf or NaN
            return BallTensor(m, _measured_radius_f32(m, e, plain, ma, ra, mb, rb, k, b_dim, k))
        reference = plain(ma.to(_F64), mb.to(_F64))
        rad = _checked_bracket(plain, m, ma, ra, mb, rb, k, b_dim, rd, reference)
        return result(m, _finite_only(m, rounding.clean_rad(rad)))
    g, abs_err = _mid_error(k, m.dtype)
    bound = _bracket(plain, ma, ra, mb, rb, k, g, b_dim, rd, extra=abs_err)  # fresh; the absolute term folded in
    if bound.shape == m.shape and bound.dtype == rd:
        return result_in_place(m, bound)
    return result(m, _finite_only(m, rounding.clean_rad(bound)))


@rule(aten.addmm.default, aten.baddbmm.default, aten.addmv.default)
def addmm(func, bias, a, b, *, beta=1, alpha=1):
    """beta * bias + alpha * (A B) (addmm, baddbmm, addmv); alpha, beta Python numbers (exact doubles) that the kernel
    casts to alpha', beta' with |alpha - alpha'| <= r_alpha (``operand``).

    For x in A, y in B, z in the bias ball (mc, rc), with P = mA mB and m the computed result:
    |beta z + alpha xy - m| <= |beta| rc + r_beta |mc|                       (bias ball and beta's cast)
                               + |alpha| |xy - P| + r_alpha |P|             (GEMM ball and alpha's cast)
                               + g (|beta'||mc| + |alpha'||mA||mB|) + a     (rounding, steps = k + 2)
    with |alpha'| <= |alpha| + r_alpha. The GEMM part is |alpha| * bracket(g') with
    g' = (r_alpha + g (|alpha| + r_alpha)) / |alpha|, so ``_bracket`` serves here too.
    A kernel may also pre-scale one operand by alpha' (PyTorch's own fallback GEMM does b * alpha, MKL may pack
    alpha A): that product can underflow with an absolute error a_op = eta/2 (max(realmin_32, eta_s/2) for reduced
    dtypes) which the other factor then multiplies: a_op (1 + g) (sum_j |mA_ij| + sum_j |mB_jl|), bounded by the
    largest row and column sums (computed in round-to-nearest, times theta_k) so that it stays one scalar (an
    elementwise product with a subnormal constant is slow). Not needed when alpha is 0 or ±1 (exact scaling).
    beta == 0 ignores the bias and alpha == 0 (or k == 0) the product, as PyTorch does (0 times any real is 0).
    """
    _check_fp32_gemm_precision()
    m = func(_mid(bias), _mid(a), _mid(b), beta=beta, alpha=alpha)
    ma, ra, mb, rb, k, b_dim = _operands(m, a, b)
    rd = rounding.rad_dtype(m.dtype)
    if _measures(m, k):
        rad = _checked_addmm(func, m, bias, beta, alpha, ma, ra, mb, rb, k, b_dim, rd)
        if rad.shape == m.shape and rad.dtype == rd:  # already clean and full size: no copy
            return BallTensor(m, rad)
        return result(m, rad)
    wd = rounding.work_dtype(rd, 2 * k)
    g, abs_err, beta_coefs, g_alpha, alpha_coef = _a_priori_addmm_constants(k, m.dtype, wd, alpha, beta)
    alpha_f = Fraction(float(alpha))
    terms = []  # pairs (tensor, coefficient) of non-negative factors, summed and inflated below
    unbounded = bound = None

    if beta_coefs is not None:
        mc, rc = operand(bias, m.dtype)
        rc = _daz_radius(mc, rc, m.dtype)
        terms.append((rc.to(wd), beta_coefs[0]))
        terms.append((torch.abs(mc).to(wd), beta_coefs[1]))

    if g_alpha is not None and k > 0:  # k == 0: A B is exactly 0 (and PyTorch's addmv may then keep the bias's shape)
        bound = _bracket(_PLAIN_GEMM[func], ma, ra, mb, rb, k, g_alpha, b_dim, rd).to(wd)  # fresh: summed into
        terms.append((bound, alpha_coef))
        if abs(alpha_f) != 1:  # pre-scaling underflow, bounded by the largest row and column sums (a scalar)
            wk = rounding.work_dtype(rd, k)
            per_op = (max(_REALMIN_32, Fraction(rounding.eta(m.dtype)) / 2) if m.dtype in rounding.REDUCED_DTYPES
                      else Fraction(rounding.eta(m.dtype)) / 2)
            row = torch.sum(torch.abs(ma).to(wk), dim=-1)
            col = torch.sum(torch.abs(mb).to(wk), dim=b_dim)
            sums = [float(t[torch.isfinite(t)].max()) if bool(torch.isfinite(t).any()) else 0.0 for t in (row, col)]
            th_k = rounding.theta(k, rounding.unit_roundoff_exact(wk))
            abs_err += per_op * (1 + g) * th_k * (Fraction(sums[0]) + Fraction(sums[1]))
            # rows / columns whose sum is not finite get no finite bound at all
            row_bad, col_bad = ~torch.isfinite(row), ~torch.isfinite(col)
            unbounded = (row_bad.unsqueeze(-1) | col_bad.unsqueeze(-2)) if (m.dim() >= 2 and mb.dim() >= 2) else (
                row_bad | col_bad)

    # c = sum of coef t over the terms, accumulated in one output-sized buffer (the GEMM bracket's own when there is
    # one), then ``inflate``'s lemma: 2 operations per term (a product and an addition) and the absolute term abs_err
    if bound is not None and bound.shape == m.shape:
        c = bound
        if terms[-1][1] != 1:
            c.mul_(terms[-1][1])
        terms = terms[:-1]
    else:
        c = torch.zeros(m.shape, dtype=wd, device=m.device)
    for t, coef in terms:
        c.add_(t, alpha=coef)
    rad = rounding.inflate_(c, 2 * len(terms) + 2, extra=abs_err)
    if unbounded is not None:
        rad.masked_fill_(unbounded, math.inf)
    if rad.dtype == rd:
        return result_in_place(m, rad)
    return result(m, _finite_only(m, rad))


@functools.lru_cache(maxsize=1024)
def _a_priori_addmm_constants(k: int, mid_dtype: torch.dtype, wd: torch.dtype, alpha, beta):
    """(g, a, beta_coefs, g_alpha, alpha_coef) of ``addmm``'s a priori bound: (g, a) = ``_mid_error(k + 2)``;
    beta_coefs = (|beta|, r_beta + g (|beta| + r_beta)) rounded up to ``wd`` (None when beta == 0); g_alpha = (r_alpha
    + g (|alpha| + r_alpha)) / |alpha| and alpha_coef = |alpha| rounded up (None when alpha == 0), with r_beta, r_alpha
    the casts' errors (``operand``). Cached: this exact rational arithmetic costs ~130 us a call."""
    g, abs_err = _mid_error(k + 2, mid_dtype)
    alpha_f, beta_f = Fraction(float(alpha)), Fraction(float(beta))  # the exact doubles PyTorch passes
    beta_coefs = g_alpha = alpha_coef = None
    if beta_f != 0:
        r_beta = Fraction(float(operand(beta, mid_dtype)[1]))
        beta_coefs = (rounding.round_up_float(abs(beta_f), wd),
                      rounding.round_up_float(r_beta + g * (abs(beta_f) + r_beta), wd))
    if alpha_f != 0:
        r_alpha = Fraction(float(operand(alpha, mid_dtype)[1]))
        g_alpha = (r_alpha + g * (abs(alpha_f) + r_alpha)) / abs(alpha_f)
        alpha_coef = rounding.round_up_float(abs(alpha_f), wd)
    return g, abs_err, beta_coefs, g_alpha, alpha_coef


def _checked_addmm(func, m, bias, beta, alpha, ma, ra, mb, rb, k, b_dim, rd):
    """addmm/baddbmm/addmv with the a posteriori midpoint error: R = fl64(beta mc + alpha (mA mB)) with the exact
    doubles alpha, beta and the kernel's operands (mc its bias); |R - exact(mc, mA, mB)| <= g64 (|beta||mc| +
    |alpha||mA||mB|) + a64 ((g64, a64) = ``_mid_error(k + 2, float64)``, |mA||mB| by ``_abs_product_bound``).
    For points of the balls: |beta z + alpha xy - m| <= |m - R| + that + |beta| rc + |alpha| (|mA| rB + rA(|mB| + rB)),
    the last factor from ``_propagation_bound``. One float64 GEMM (the reference addmm) per call."""
    alpha_f, beta_f = float(alpha), float(beta)
    plain = _PLAIN_GEMM[func]
    g64, a64 = _mid_error(k + 2, _F64)
    if rounding.work_dtype(rd, 2 * k) == torch.float32:
        bias_terms = None
        product = alpha_f != 0 and k > 0
        if beta_f != 0:
            mc, rc = operand(bias, m.dtype)
            rc = _daz_radius(mc, rc, m.dtype)
            mc64 = mc.to(_F64)

            def reference_block(rows, cols, ma64, mb64):
                bias_block = mc64 if rows is None else torch.broadcast_to(mc64, m.shape)[rows, cols]
                if product:
                    return func(bias_block, ma64, mb64, beta=beta_f, alpha=alpha_f)
                shape = m.shape if rows is None else m[rows, cols].shape
                return (bias_block * beta_f).expand(shape).clone()

            bias_terms = (rc, torch.abs(mc))
        else:
            def reference_block(rows, cols, ma64, mb64):
                if product:
                    return plain(ma64, mb64).mul_(alpha_f)
                return torch.zeros(m.shape if rows is None else m[rows, cols].shape, dtype=_F64, device=m.device)

        e = _blocked_residual(m, ma, mb, reference_block)
        # +inf (via inflate's NaN -> inf) wherever m is not finite, as in ``gemm``
        return _measured_radius_f32(m, e, plain, ma, ra, mb, rb, k, b_dim, k + 2, alpha=alpha_f if k > 0 else 0.0,
                                    beta=beta_f, bias=bias_terms)
    ma64, mb64 = ma.to(_F64), mb.to(_F64)
    terms = torch.zeros((), dtype=_F64)
    if beta_f != 0:
        mc, rc = operand(bias, m.dtype)
        rc = _daz_radius(mc, rc, m.dtype)
        mc64 = mc.to(_F64)
        reference = func(mc64, ma64, mb64, beta=beta_f, alpha=alpha_f) if (alpha_f != 0 and k > 0) else mc64 * beta_f
        terms = rounding.add_up(rounding.mul_up(rc.to(_F64), abs(beta_f)),
                                rounding.mul_up(torch.abs(mc64), rounding.round_up_float(g64 * abs(Fraction(beta_f)))))
    else:
        reference = plain(ma64, mb64) * alpha_f if (alpha_f != 0 and k > 0) else torch.zeros_like(m, dtype=_F64)
    if alpha_f != 0 and k > 0:
        coarse = _abs_product_bound(ma64, mb64, k, b_dim)
        gemm_part = rounding.mul_up(coarse, rounding.round_up_float(g64))
        prop = _propagation_bound(plain, ma, ra, mb, rb, k, b_dim, rd)
        if prop is not None:
            gemm_part = rounding.add_up(gemm_part, prop)
        terms = rounding.add_up(terms, rounding.mul_up(gemm_part, abs(alpha_f)))
    residual = rounding.up(torch.abs(m.to(_F64) - reference))
    rad = rounding.add_up(rounding.add_up(terms, residual), rounding.absolute_term(a64, _F64))
    rad = rad.expand(m.shape) if rad.shape != m.shape else rad
    return _finite_only(m, rounding.clean_rad(rad))


# ----------------------------------------------------------------------------------------------------------------------
# Linear systems: verified enclosures (Rump's residual iteration, one step)
#
# Lemma K (Krawczyk/Rump). Let R be any float64 matrix (an approximate inverse of mid A) and X~ any float64 approximate
# solution. For every A and B in their balls, if beta = ||I - R A||_inf < 1 for all those A, then A is invertible
# and the exact X = A^-1 B satisfies X - X~ = (I - R A)(X - X~) + R (B - A X~). With C >= |I - R A| and
# Z >= |R (B - A X~)| (elementwise upper bounds from ball matrix products, which enclose the exact products for every
# A, B in the balls), e_col = max_i Z_i / (1 - beta) bounds ||X - X~||_inf per column, and componentwise
# |X - X~|_i <= Z_i + (C 1)_i e. So X lies in X~ +- (Z + rowsum(C) e), evaluated with upward rounding; the result is
# re-centred on PyTorch's midpoint. Where beta >= 1 nothing is verified: +inf and a ``domain`` event.


def _ball64(x):
    from ballgrad.tensor import BallTensor

    if isinstance(x, BallTensor):
        return BallTensor(x.mid.detach().to(torch.float64), x.rad.to(torch.float64))
    m = x.detach().to(torch.float64)
    return BallTensor(m, torch.zeros_like(m))


def _mm(x, y):
    """Batched matrix product x @ y through ``bmm`` (torch.matmul is composite and does not decompose inside a
    rule): batch dimensions broadcast, flattened, multiplied, restored."""
    batch = torch.broadcast_shapes(x.shape[:-2], y.shape[:-2])
    n, k, m = x.shape[-2], x.shape[-1], y.shape[-1]
    x3 = x.expand(*batch, n, k).contiguous().reshape(-1, n, k)
    y3 = y.expand(*batch, k, m).contiguous().reshape(-1, k, m)
    return torch.bmm(x3, y3).reshape(*batch, n, m)


def _upper_abs(b):
    """Elementwise upper bound of |x| over a float64 ball."""
    return rounding.add_up(torch.abs(b.mid), b.rad)


def _verified_solve(a, b):
    """Float64 ball enclosing A^-1 B (lemma K) for float64 balls A [..., n, n], B [..., n, k]."""
    from ballgrad import diagnostics
    from ballgrad.ops.registry import current_op
    from ballgrad.tensor import BallTensor

    n = a.shape[-1]
    batch = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    out_shape = (*batch, n, b.shape[-1])
    if math.prod(out_shape) == 0 or math.prod(a.shape) == 0:  # nothing to solve: an empty result
        empty = torch.zeros(out_shape, dtype=torch.float64)
        return BallTensor(empty, torch.zeros_like(empty))
    r, r_info = torch.linalg.inv_ex(a.mid)  # any matrix R will do; a failed inverse gives beta >= 1 below
    r = torch.where((r_info == 0).unsqueeze(-1).unsqueeze(-1) & torch.isfinite(r), r, torch.zeros_like(r))
    x0 = _mm(r, b.mid)
    eye = torch.eye(n, dtype=torch.float64)
    c_ball = BallTensor(eye.expand(a.shape).contiguous(), torch.zeros(a.shape, dtype=torch.float64)) - _mm(r, a)
    z_ball = _mm(r, b - _mm(a, x0))
    c_abs, z_abs = _upper_abs(c_ball), _upper_abs(z_ball)
    row = rounding.clean_rad(rounding.up(torch.sum(c_abs, dim=-1, keepdim=True) * rounding.inflation_factor(
        max(n, 1), torch.float64)))  # row sums of non-negative terms, rounded up (exact <= (1+u)^n fl)
    beta = torch.amax(row, dim=-2, keepdim=True)  # [..., 1, 1]
    ok = beta < 1
    gap = rounding.sub_down(torch.ones_like(beta), beta)
    e = rounding.div_up(torch.amax(z_abs, dim=-2, keepdim=True), torch.where(ok, gap, torch.ones_like(gap)))
    rad = rounding.add_up(z_abs, rounding.mul_up(row, e))
    rad = torch.where(ok, rad, torch.full_like(rad, math.inf))
    if diagnostics.is_recording():
        diagnostics.emit_mask("domain", current_op(), ~ok.expand(rad.shape), "||I - R A|| >= 1: the system is not "
                              "verified (singular or ill-conditioned within the balls)")
    return BallTensor(x0.expand(rad.shape), rounding.clean_rad(rad))


def _recentre_on(m, enclosure):
    from ballgrad.ops.common import recentre

    return recentre(m, enclosure)


def _inf_ball(m):
    from ballgrad.tensor import BallTensor

    if not m.is_floating_point():
        return m
    return BallTensor(m, torch.full_like(m, math.inf, dtype=rounding.rad_dtype(m.dtype)))


@rule(aten._linalg_solve_ex.default)
def linalg_solve_ex(func, a, b, *, left=True, check_errors=False):
    """(X, LU, pivots, info) of A X = B (X A = B for left=False): X by lemma K, re-centred on PyTorch's X. The LU
    factors are returned with radius +inf (no enclosure of the factorisation is computed: nothing is claimed about
    them); pivots and info are PyTorch's integers."""
    x_mid, lu, piv, info = func(_mid(a), _mid(b), left=left, check_errors=check_errors)
    a64, b64 = _ball64(a), _ball64(b)
    vector = b64.dim() == 1 or (b64.dim() == a64.dim() - 1 and b64.shape == a64.shape[:-1])
    if not left:
        a64 = a64.transpose(-2, -1)
        b64 = b64.transpose(-2, -1) if not vector else b64
    rhs = b64.unsqueeze(-1) if vector else b64
    batch = torch.broadcast_shapes(a64.shape[:-2], rhs.shape[:-2])
    n = a64.shape[-1]
    enclosure = _verified_solve(a64.expand(*batch, n, n), rhs.expand(*batch, *rhs.shape[-2:]))
    if vector:
        enclosure = enclosure.squeeze(-1)
    elif not left:
        enclosure = enclosure.transpose(-2, -1)
    return _recentre_on(x_mid, enclosure.reshape(x_mid.shape)), _inf_ball(lu), piv, info


@rule(aten.linalg_inv_ex.default)
def linalg_inv_ex(func, a, *, check_errors=False):
    """(A^-1, info): lemma K with B = I, re-centred on PyTorch's inverse."""
    inv_mid, info = func(_mid(a), check_errors=check_errors)
    a64 = _ball64(a)
    n = a64.shape[-1]
    eye = torch.eye(n, dtype=torch.float64).expand(a64.shape).contiguous()
    from ballgrad.tensor import BallTensor

    enclosure = _verified_solve(a64, BallTensor(eye, torch.zeros_like(eye)))
    return _recentre_on(inv_mid, enclosure), info
