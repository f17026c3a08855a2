"""The rounding model: the one place where floating-point error is bounded (DESIGN.md §2).

Every radius in ballgrad is computed from the helpers here. Notation, per dtype:
``u`` = eps/2 (unit roundoff), ``eta`` = smallest positive subnormal, ``realmin`` = smallest normal.

Facts used throughout (all for IEEE round-to-nearest with gradual underflow, which the numerics guard checks):

F1  one operation c = fl(x o y), o in {+ - * /}:   |c - x o y| <= u|c| + eta/2   (no eta for + and -).
F2  for any real e and c = RN(e):                  e <= succ(c) = nextafter(c, +inf)  (and e >= pred(c)).
    So an upper bound survives one rounded operation if the result is bumped by one ulp (``up``).
F3  a dot product of length k in any order, FMA or not:  |fl(a.b) - a.b| <= gamma_k |a|.|b| + k*eta,
    gamma_k = k u / (1 - k u), valid for k u < 1.

Radii are never NaN and never negative: ``clean_rad`` maps NaN (0*inf, inf-inf in radius formulas, which only occur
when an input is infinite or NaN, so "nothing is known") to +inf.
"""

from __future__ import annotations

import functools
import math
from fractions import Fraction

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
REDUCED_DTYPES = (torch.float16, torch.bfloat16)

# Significand precision p (including the hidden bit) and exponent range, per dtype.
_PRECISION = {torch.float16: 11, torch.bfloat16: 8, torch.float32: 24, torch.float64: 53}


def check_float_dtype(dtype: torch.dtype) -> None:
    """Raise TypeError for dtypes ballgrad does not model (integers, complex, float8...)."""
    if dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"ballgrad balls need a real floating midpoint dtype (float16, bfloat16, float32, float64), got {dtype}"
        )


def rad_dtype(mid_dtype: torch.dtype) -> torch.dtype:
    """Radius dtype: the midpoint's for float32/float64, float32 for float16/bfloat16 (DESIGN.md §1)."""
    check_float_dtype(mid_dtype)
    return torch.float32 if mid_dtype in REDUCED_DTYPES else mid_dtype


@functools.lru_cache(maxsize=None)
def unit_roundoff_exact(dtype: torch.dtype) -> Fraction:
    """u = 2^-p as an exact rational (cached: rules call this per op, and Fraction construction is slow)."""
    return Fraction(1, 2 ** _PRECISION[dtype])


def unit_roundoff(dtype: torch.dtype) -> float:
    """u = eps/2: f64 2^-53, f32 2^-24, f16 2^-11, bf16 2^-8 (exact as a Python float)."""
    return float(unit_roundoff_exact(dtype))


@functools.lru_cache(maxsize=None)
def eta(dtype: torch.dtype) -> float:
    """Smallest positive subnormal of ``dtype`` (exact as a Python float)."""
    return float(torch.finfo(dtype).smallest_normal) * float(torch.finfo(dtype).eps)


def op_roundoff(mid_dtype: torch.dtype) -> float:
    """u to use in F1 for one PyTorch op whose result has ``mid_dtype``.

    float16/bfloat16 kernels compute in float32 ("opmath") and round once more to the storage dtype:
    |m - e| <= |m - t| + |t - e| <= u_16 |m| + u_32 |t| with |t| <= (1 + u_16)|m| + eta, so u_16 + 2 u_32 covers both
    roundings (the u_16 u_32 term is far below u_32). float32/float64 kernels round once: u.
    """
    u = unit_roundoff(mid_dtype)
    if mid_dtype in REDUCED_DTYPES:
        return u + 2 * unit_roundoff(torch.float32)
    return u


def op_underflow(mid_dtype: torch.dtype) -> float:
    """Absolute term of F1 for one op producing ``mid_dtype``: eta/2, or eta_16 + eta_32 for reduced dtypes (the same
    two roundings as ``op_roundoff``). We return max(eta of the storage dtype, realmin of the radius dtype), which
    covers both and keeps radius constants normal (``absolute_term``)."""
    return max(eta(mid_dtype), float(torch.finfo(rad_dtype(mid_dtype)).smallest_normal))


@functools.lru_cache(maxsize=8192)
def round_up_float(value: Fraction | int | float, dtype: torch.dtype = torch.float64) -> float:
    """Smallest float of ``dtype`` that is >= ``value`` (exact rational arithmetic), returned as a Python float.

    Used offline for constants (gamma_k, inflation factors, 1/sqrt(2) bounds): constants are balls too. A pure
    function of (value, dtype), cached: rules fold the same constants on every call.
    """
    value = Fraction(value)
    candidate = torch.tensor(float(value), dtype=torch.float64).to(dtype)
    if not math.isfinite(float(candidate)):
        return float(candidate)
    while Fraction(float(candidate)) < value:
        candidate = torch.nextafter(candidate, torch.tensor(math.inf, dtype=dtype))
    return float(candidate)


def round_down_float(value: Fraction | int | float, dtype: torch.dtype = torch.float64) -> float:
    """Largest float of ``dtype`` that is <= ``value``."""
    return -round_up_float(-Fraction(value), dtype)


def gamma(k: int, dtype: torch.dtype) -> float:
    """gamma_k = k u / (1 - k u) rounded up (F3). Requires k u < 1/4 (DESIGN.md §2); raises otherwise."""
    u = unit_roundoff_exact(dtype)
    if k * u >= Fraction(1, 4):
        raise ValueError(f"gamma_{k} for {dtype}: k*u >= 1/4, compute these radius terms in a wider dtype")
    return round_up_float(k * u / (1 - k * u), dtype)


@functools.lru_cache(maxsize=1024)
def inflation_factor(n_ops: int, dtype: torch.dtype) -> float:
    """(1 + u)^n_ops rounded up: the factor that turns a round-to-nearest result into an upper bound (``inflate``)."""
    return round_up_float((1 + unit_roundoff_exact(dtype)) ** n_ops, dtype)


@functools.lru_cache(maxsize=None)
def absolute_term(value: Fraction | float, dtype: torch.dtype) -> float:
    """An absolute term added to every element of a radius: ``value`` rounded up, and at least the smallest *normal*
    number of ``dtype``. Adding a subnormal constant costs a microcode assist on x86 (measured 13x slower elementwise
    adds); raising k*eta to realmin loosens only radii near realmin (1e-38 in float32, 2e-308 in float64)."""
    value = Fraction(value)
    if value <= 0:
        return 0.0
    return max(round_up_float(value, dtype), float(torch.finfo(dtype).smallest_normal))


@functools.lru_cache(maxsize=4096)
def growth(n: int, u: Fraction) -> Fraction:
    """An upper bound of (1 + u)^n - 1 (the relative error of n roundings in a product of (1 + delta) factors).

    gamma_n = nu/(1 - nu) when nu < 1/4 (it is >= (1 + u)^n - 1); otherwise binary powering of g with
    1 + g_(a+b) = (1 + g_a)(1 + g_b), every intermediate rounded up to float64 (all terms positive, so monotone).
    """
    if n <= 0:
        return Fraction(0)
    if n * u < Fraction(1, 4):
        return n * u / (1 - n * u)
    result_g, power_g = Fraction(0), Fraction(u)
    while n:
        if n & 1:
            result_g = Fraction(round_up_float(result_g + power_g + result_g * power_g))
        power_g = Fraction(round_up_float(2 * power_g + power_g * power_g))
        n >>= 1
    return result_g


@functools.lru_cache(maxsize=4096)
def theta(n: int, u: Fraction) -> Fraction:
    """1/(1 - gamma_n) = (1 - nu)/(1 - 2nu): exact <= theta * computed for a sum of n non-negative terms (n u < 1/4)."""
    if n * u >= Fraction(1, 4):
        raise ValueError(f"theta_{n}: n*u >= 1/4; compute these radius terms in a wider dtype")
    return (1 - n * u) / (1 - 2 * n * u)


@functools.lru_cache(maxsize=4096)
def work_dtype(rad_dtype: torch.dtype, n: int) -> torch.dtype:
    """The dtype for a radius sum/GEMM of inner length n: the radius dtype while n u < 1/4, else float64."""
    if n * unit_roundoff_exact(rad_dtype) < Fraction(1, 4):
        return rad_dtype
    if n * unit_roundoff_exact(torch.float64) >= Fraction(1, 4):
        raise ValueError(f"a reduction of length {n} is beyond what float64 radius arithmetic can bound")
    return torch.float64


# ----------------------------------------------------------------------------------------------------------------------
# Directed results from round-to-nearest operations (F2).


@functools.lru_cache(maxsize=64)
def _infinity(dtype: torch.dtype, device: torch.device, sign: float) -> torch.Tensor:
    """A shared 0-d +-inf of ``dtype`` (the direction argument of nextafter; never written to)."""
    return torch.full((), sign * math.inf, dtype=dtype, device=device)


def up(x: torch.Tensor) -> torch.Tensor:
    """succ(x): an upper bound for the exact value of the single RN operation that produced ``x`` (F2)."""
    return torch.nextafter(x, _infinity(x.dtype, x.device, 1.0))


def down(x: torch.Tensor) -> torch.Tensor:
    """pred(x): a lower bound for the exact value of the single RN operation that produced ``x`` (F2)."""
    return torch.nextafter(x, _infinity(x.dtype, x.device, -1.0))


def _up_fresh(x: torch.Tensor) -> torch.Tensor:
    """``up`` on a result nobody else holds (the helpers below), in place."""
    return x.nextafter_(_infinity(x.dtype, x.device, 1.0))


def _down_fresh(x: torch.Tensor) -> torch.Tensor:
    return x.nextafter_(_infinity(x.dtype, x.device, -1.0))


def add_up(a, b):
    """Upper bound of a + b (F2)."""
    return _up_fresh(torch.add(a, b))


def add_down(a, b):
    """Lower bound of a + b (F2)."""
    return _down_fresh(torch.add(a, b))


def sub_up(a, b):
    """Upper bound of a - b (F2)."""
    return _up_fresh(torch.sub(a, b))


def sub_down(a, b):
    """Lower bound of a - b (F2)."""
    return _down_fresh(torch.sub(a, b))


def mul_up(a, b):
    """Upper bound of a * b for a, b >= 0 (F2)."""
    return _up_fresh(torch.mul(a, b))


def mul_down(a, b):
    """Lower bound of a * b for a, b >= 0 (F2; clamped at 0, which the exact product cannot go below)."""
    return _down_fresh(torch.mul(a, b)).clamp_min_(0)


def div_up(a, b):
    """Upper bound of a / b for a >= 0, b > 0 (F2)."""
    return _up_fresh(torch.div(a, b))


def div_down(a, b):
    """Lower bound of a / b for a >= 0, b > 0 (F2; clamped at 0)."""
    return _down_fresh(torch.div(a, b)).clamp_min_(0)


def inflate(c: torch.Tensor, n_ops: int, extra: Fraction | float = 0) -> torch.Tensor:
    """Upper bound for the exact value of a radius expression ``c`` computed in round-to-nearest.

    Valid when ``c`` is a sum of terms computed from non-negative floats with at most ``n_ops`` operations, each term
    a product of at most two factors, each factor an input (a float known exactly, including up()-bounds) or a sum of
    inputs; no product feeds another product. Derivation: a computed sum of k additions satisfies
    exact <= (1+u)^k fl (F1 with no eta); a product of two such factors satisfies
    exact <= (1+u)^(k1+k2) ((1+u) fl(f1 f2) + eta/2) (F1); the outer additions add (1+u) factors only. Hence
    exact <= (1+u)^n (c + n eta/2). We return t = fl(fl(c phi) + a) with phi >= (1+u)^n/(1-u)^2 and
    a >= (n+1) eta (1+u)^n/(1-u), both rounded up offline (``_inflation_constants``): fl(c phi) >= c phi (1-u) - eta/2
    (F1) and the addition of non-negative terms loses at most a factor 1-u, so t >= c phi (1-u)^2 + (a - eta/2)(1-u)
    >= (1+u)^n c + (1+u)^n n eta/2. An ``extra`` absolute term (>= 0) is folded into a (a >= ... + extra/(1-u)), so
    the result also bounds exact(c) + extra. Two vectorized passes (the second in place), no nextafter. NaN (which
    only arises from an infinite or NaN input) becomes +inf.
    """
    phi, a = _inflation_constants(n_ops, c.dtype, Fraction(extra))
    return torch.mul(c, phi).add_(a).nan_to_num_(nan=math.inf, posinf=math.inf)


def inflate_(c: torch.Tensor, n_ops: int, extra: Fraction | float = 0) -> torch.Tensor:
    """``inflate`` in place (c is overwritten with the bound; same constants and proof)."""
    phi, a = _inflation_constants(n_ops, c.dtype, Fraction(extra))
    return c.mul_(phi).add_(a).nan_to_num_(nan=math.inf, posinf=math.inf)


def inflation_constants(n_ops: int, dtype: torch.dtype, extra: Fraction = Fraction(0)) -> tuple[float, float]:
    """(phi, a) of ``inflate``, for a caller that caches them with its own constants and applies t phi + a itself."""
    return _inflation_constants(n_ops, dtype, extra)


@functools.lru_cache(maxsize=1024)
def _inflation_constants(n_ops: int, dtype: torch.dtype, extra: Fraction = Fraction(0)) -> tuple[float, float]:
    """(phi, a) of ``inflate``: phi >= (1+u)^n/(1-u)^2, a >= ((n+1) eta (1+u)^n + extra)/(1-u) (at least realmin)."""
    u = unit_roundoff_exact(dtype)
    grow = (1 + u) ** n_ops
    return (round_up_float(grow / (1 - u) ** 2, dtype),
            absolute_term(((n_ops + 1) * Fraction(eta(dtype)) * grow + extra) / (1 - u), dtype))


@functools.lru_cache(maxsize=1024)
def _inflation_to_constants(n_ops: int, wide: torch.dtype, narrow: torch.dtype, extra: Fraction) -> tuple[float, float]:
    """(phi', a') of ``inflate_to``: phi' >= phi/(1 - v), a' >= (a + eta_n/2)/((1 - u)(1 - v)) + eta_w/2, with (phi, a)
    the constants of ``inflate`` in the wide dtype (u, eta_w) and v, eta_n the narrow dtype's."""
    phi, a = _inflation_constants(n_ops, wide, extra)
    u, v = unit_roundoff_exact(wide), unit_roundoff_exact(narrow)
    return (round_up_float(Fraction(phi) / (1 - v), wide),
            round_up_float((Fraction(a) + Fraction(eta(narrow)) / 2) / ((1 - u) * (1 - v)) + Fraction(eta(wide)) / 2,
                           wide))


def inflate_to(c: torch.Tensor, n_ops: int, dtype: torch.dtype, extra: Fraction | float = 0) -> torch.Tensor:
    """``inflate(c, n_ops, extra)`` converted to the narrower ``dtype`` upward, in four passes instead of inflate's three
    plus ``to_dtype_up``'s five. t = fl(fl(c phi') + a') (``_inflation_to_constants``) satisfies, as in ``inflate``'s
    proof, t >= c phi'(1-u)^2 + (a' - eta_w/2)(1-u); the round-to-nearest conversion loses at most a factor (1 - v) or
    an absolute eta_n/2 (subnormal range; an overflow gives +inf), so RN(t) >= c phi (1-u)^2 + a - 0 >= the exact value
    bounded by ``inflate`` plus ``extra``. NaN becomes +inf."""
    if c.dtype == dtype or (c.dtype, dtype) in _EXACT_WIDENINGS:
        return inflate(c, n_ops, extra).to(dtype)
    phi, a = _inflation_to_constants(n_ops, c.dtype, dtype, Fraction(extra))
    return torch.mul(c, phi).add_(a).to(dtype).nan_to_num_(nan=math.inf, posinf=math.inf)


def inflate_to_(c: torch.Tensor, n_ops: int, dtype: torch.dtype, extra: Fraction | float = 0) -> torch.Tensor:
    """``inflate_to`` that overwrites ``c`` (a buffer the caller owns) instead of allocating a second wide array."""
    if c.dtype == dtype or (c.dtype, dtype) in _EXACT_WIDENINGS:
        return inflate_(c, n_ops, extra).to(dtype)
    phi, a = _inflation_to_constants(n_ops, c.dtype, dtype, Fraction(extra))
    return c.mul_(phi).add_(a).to(dtype).nan_to_num_(nan=math.inf, posinf=math.inf)


def clean_rad(r: torch.Tensor) -> torch.Tensor:
    """Radii are never NaN (nothing known -> +inf) and never negative (F2 results of non-negative terms)."""
    return torch.nan_to_num(r, nan=math.inf, posinf=math.inf)


_EXACT_WIDENINGS = {
    (torch.float16, torch.float32), (torch.float16, torch.float64), (torch.bfloat16, torch.float32),
    (torch.bfloat16, torch.float64), (torch.float32, torch.float64),
}


def to_dtype_up(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Convert non-negative bounds to ``dtype`` rounding upward (RN conversion, then one succ where it went down)."""
    if x.dtype == dtype:
        return x
    y = x.to(dtype)
    if (x.dtype, dtype) in _EXACT_WIDENINGS:
        return y
    went_down = y.to(x.dtype) < x
    return torch.where(went_down, up(y), y)


# ----------------------------------------------------------------------------------------------------------------------
# Error-free transformations: the *exact* rounding error of one float32/float64 operation (a posteriori F1).


def exact_sum_error(x: torch.Tensor, y: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """|x + y - m| for floats x, y of ``m``'s dtype (float32/float64) and m = RN(x + y), exactly.

    Knuth's TwoSum: s = fl(x + y), bb = fl(s - x), e = fl(fl(x - fl(s - bb)) + fl(y - bb)) gives x + y = s + e exactly
    in round-to-nearest with gradual underflow (no condition on the ordering of |x|, |y|), unless an operation
    overflows, which makes e NaN or inf (-> an infinite radius via ``clean_rad``). Where s == m the error is |e|;
    otherwise (never for one correctly rounded addition, kept for safety) |s - m| + |e| rounded up.
    """
    s = x + y
    bb = s - x
    e = torch.abs((x - (s - bb)) + (y - bb))
    if torch.equal(s, m):  # every element (one check instead of an elementwise select; NaN fails it)
        return e
    return torch.where(s == m, e, add_up(up(torch.abs(s - m)), e))


_VELTKAMP = {torch.float32: 4097.0, torch.float64: 134217729.0}  # 2^ceil(p/2) + 1
_PRODUCT_SAFE = {  # |x|, |y| <= hi keeps the Veltkamp split from overflowing; |x y| >= lo keeps every partial exact
    torch.float32: (2.0**115, 2.0**-100),
    torch.float64: (2.0**995, 2.0**-968),
}


def exact_product_error(x: torch.Tensor, y: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """|x y - m| for floats x, y of ``m``'s dtype (float32/float64) and m = RN(x y): exactly where it can be computed,
    else the F1 bound u|m| + eta/2 (rounded up).

    float32: x y is exact in float64 (24 + 24 bits) and m lies within a factor 2 of it, so |m - x y| is an exact
    float64 subtraction (Sterbenz), rounded up once into float32.
    float64: Dekker's TwoProduct with Veltkamp splitting (x = xh + xl, 26 + 27 bits) gives
    x y - fl(x y) = ((xh yh - p) + xh yl + xl yh) + xl yl exactly, provided nothing overflows (|x|, |y| <= 2^995)
    and no partial product underflows (|x y| >= 2^-968); exact zeros (x = 0 or y = 0) are exact. Elsewhere the F1
    bound is used.
    """
    dtype = m.dtype
    if dtype == torch.float32:
        exact = x.to(torch.float64) * y.to(torch.float64)
        return to_dtype_up(torch.abs(m.to(torch.float64) - exact), torch.float32)
    c = _VELTKAMP[dtype]
    hi_lim, lo_lim = _PRODUCT_SAFE[dtype]

    def split(t):
        big = t * c
        high = big - (big - t)
        return high, t - high

    p = x * y
    xh, xl = split(x)
    yh, yl = split(y)
    e = torch.abs(((xh * yh - p) + xh * yl + xl * yh) + xl * yl)
    e = torch.where(p == m, e, add_up(up(torch.abs(p - m)), e))
    safe = (torch.abs(x) <= hi_lim) & (torch.abs(y) <= hi_lim) & (torch.abs(p) >= lo_lim)
    exact_zero = ((x == 0) & torch.isfinite(y)) | ((y == 0) & torch.isfinite(x))  # 0 * finite = 0 exactly
    fallback = add_up(mul_up(torch.abs(m), unit_roundoff(dtype)), eta(dtype))
    return torch.where(exact_zero & (m == 0), torch.zeros_like(e), torch.where(safe, e, fallback))


# ----------------------------------------------------------------------------------------------------------------------
# bfloat16 copies of non-negative float32 bounds, for radius GEMMs (linalg's Lemma B).

REALMIN_32 = float(torch.finfo(torch.float32).smallest_normal)
BF16_ROUNDING = 2.0**-8  # unit roundoff of bfloat16


def to_bf16_normal(z: torch.Tensor) -> torch.Tensor:
    """Z = max(RN_bf16(z), realmin_32) for float32 z >= 0 (or +inf; NaN stays NaN): Z >= z (1 - 2^-8) and Z >= realmin.

    For z >= realmin the bfloat16 rounding (precision 8, same exponent range as float32) gives RN(z) >= z (1 - 2^-8);
    for z < realmin, Z = realmin > z. No entry is subnormal, so a GEMM that reads subnormal inputs as zero (AMX) cannot
    drop one; callers fold the factor 1/(1 - 2^-8) into their constants. One conversion and one in-place clamp on
    the 2-byte copy; ``z`` is not modified.
    """
    return z.to(torch.bfloat16).clamp_min_(REALMIN_32)


def sum_to_bf16_normal(x: torch.Tensor, y: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """``to_bf16_normal(torch.add(x, y, alpha=alpha))`` for float32 x, y >= 0 and alpha >= 0, without the float32
    intermediate: the add writes straight into a bfloat16 tensor. PyTorch's binary kernels compute in the inputs'
    common dtype (float32 here: ``cast_common_dtype_to_outputs``) and round to nearest on the store to bfloat16, the
    same conversion as ``.to``, so the result is the same bits; a large operand saves one full-size float32 buffer
    (on CPU, a fresh allocation of a large tensor costs its page faults) and one pass.

    That casting store is only fast on contiguous memory: on a transposed operand (a weight W.t() in addmm) it falls
    back to an element-by-element loop, 20-30x slower than the add and the conversion apart (35 ms against 1.4 ms on
    2048x2048). So operands of one dense layout are added in their memory order (``memory_order``) and the result is
    given back in theirs; any other pair (broadcast, mixed strides) takes the float32 intermediate."""
    order = memory_order(x) if x.shape == y.shape and x.stride() == y.stride() else None
    if order is None:
        return to_bf16_normal(torch.add(x, y, alpha=alpha))
    xs, ys = x.permute(order), y.permute(order)
    out = torch.empty(xs.shape, dtype=torch.bfloat16, device=x.device)
    torch.add(xs, ys, alpha=alpha, out=out).clamp_min_(REALMIN_32)
    return out.permute(inverse_order(order))


BF16_BLOCK = 1 << 18  # elements per block of ``abs_sums_to_bf16_normal`` (1 MiB of float32 scratch)


def abs_to_bf16_normal(m: torch.Tensor) -> torch.Tensor:
    """``to_bf16_normal(|m|)`` for a float32 (or narrower) m without the full-size float32 |m|: RN to bfloat16 is
    symmetric, so RN(|m|) = |RN(m)| (NaN stays NaN); the abs and the clamp then run on the 2-byte copy (a fresh
    one: a bfloat16 m is never written)."""
    copy = torch.abs(m) if m.dtype == torch.bfloat16 else m.to(torch.bfloat16)
    return copy.abs_().clamp_min_(REALMIN_32)


def abs_sums_to_bf16_normal(r: torch.Tensor, m: torch.Tensor, alphas: tuple[float, ...]) -> list[torch.Tensor]:
    """[sum_to_bf16_normal(r, |m|, a) for a in alphas] (|m| exactly widened to float32, r float32 >= 0, a >= 0),
    bit for bit, without a full-size float32 |m|: where r and m are large and of one dense layout, |m| is formed in
    blocks of ``BF16_BLOCK`` elements in one reused scratch block, and each block's sums are stored straight into
    the bfloat16 outputs (the same add kernel on the same values). A fresh full-size |m| costs its page faults on
    every call (CPU buffers this large go back to the OS when freed): a few ms per 2048 x 2048 weight."""
    order = memory_order(r) if (r.shape == m.shape and r.stride() == m.stride()
                                 and r.numel() > BF16_BLOCK) else None
    if order is None:
        abs_m = torch.abs(m).to(torch.float32)
        return [sum_to_bf16_normal(r, abs_m, a) for a in alphas]
    rs, ms = r.permute(order).reshape(-1), m.permute(order).reshape(-1)  # views: both are contiguous in this order
    permuted = r.permute(order).shape
    outs = [torch.empty(permuted, dtype=torch.bfloat16, device=r.device) for _ in alphas]
    flat_outs = [o.view(-1) for o in outs]
    scratch = torch.empty(BF16_BLOCK, dtype=torch.float32, device=r.device)
    for start in range(0, rs.numel(), BF16_BLOCK):
        stop = min(start + BF16_BLOCK, rs.numel())
        abs_block = scratch[: stop - start].copy_(ms[start:stop]).abs_()
        for a, o in zip(alphas, flat_outs):
            torch.add(rs[start:stop], abs_block, alpha=a, out=o[start:stop])
    inverse = inverse_order(order)
    return [o.clamp_min_(REALMIN_32).permute(inverse) for o in outs]


def memory_order(t: torch.Tensor) -> tuple[int, ...] | None:
    """A permutation p with ``t.permute(p)`` contiguous, or None where ``t`` is not a dense permutation of one."""
    order = tuple(sorted(range(t.dim()), key=lambda d: -t.stride(d)))
    return order if t.permute(order).is_contiguous() else None


def inverse_order(order: tuple[int, ...]) -> tuple[int, ...]:
    inverse = [0] * len(order)
    for i, d in enumerate(order):
        inverse[d] = i
    return tuple(inverse)
