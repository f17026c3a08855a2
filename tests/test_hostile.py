"""Hostile values through every rule family that can be driven generically.

Midpoints: +-inf, NaN, +-0, subnormals (smallest, 3x smallest, 0.75 realmin), +-realmin, values within a few ulps
of overflow (max, its predecessors, max/2), ones, eps. Radii: 0, one subnormal (eta), one ulp of the midpoint,
larger than the midpoint (2|m| + 1), and inf. Every combination goes through tables of unary and binary callables,
reductions, matmul and softmax, in float64, float32, float16 and bfloat16 (radii float32 for the last two).

Every result must be either a sound ball -- midpoint bit-identical to plain PyTorch, radius never NaN or negative,
infinite wherever the midpoint is not finite, and a finite radius containing the exact value at sampled points of
every input ball (end points, midpoint, interior points; decided exactly with Fractions / 256-bit mpmath, as
``tests/helpers.check_rule``) -- or a clear ballgrad error with a message.
"""

from __future__ import annotations

import itertools
import math
import random
from fractions import Fraction

import mpmath
import pytest
import torch

import ballgrad as bg
from ballgrad import rounding
from ballgrad.errors import UndecidedComparisonError, UnsupportedOpError
from ballgrad.testing import contains_exact, special_values
from helpers import ALL_DTYPES, assert_same_bits, assert_valid_radius, mp

mpmath.mp.prec = 256

CLEAR_ERRORS = (UnsupportedOpError, UndecidedComparisonError, TypeError, ValueError)


def hostile_mids(dtype):
    fi = torch.finfo(dtype)
    big = torch.tensor(float(fi.max), dtype=dtype)
    near_max = [float(big), float(torch.nextafter(big, torch.tensor(0.0, dtype=dtype))),
                float(torch.nextafter(torch.nextafter(big, torch.tensor(0.0, dtype=dtype)),
                                      torch.tensor(0.0, dtype=dtype)))]
    vals = special_values(dtype) + near_max + [-v for v in near_max]
    return vals


def hostile_radii(mid: torch.Tensor):
    """Per element: 0, eta, one ulp of the midpoint, 2|m| + 1 (larger than the midpoint), inf."""
    rd = rounding.rad_dtype(mid.dtype)
    m = mid.to(rd)
    eta = rounding.eta(rd)
    ulp = (torch.nextafter(m.abs(), torch.tensor(math.inf, dtype=rd)) - m.abs())
    ulp = torch.where(torch.isfinite(ulp), ulp, torch.zeros_like(ulp))
    big = torch.where(torch.isfinite(m), 2 * m.abs() + 1, torch.zeros_like(m))
    big = torch.where(torch.isfinite(big), big, torch.full_like(big, math.inf))
    return [torch.zeros_like(m), torch.full_like(m, eta), ulp, big, torch.full_like(m, math.inf)]


def hostile_ball(dtype, seed=0, shuffle=False):
    """A 1-D ball: every hostile midpoint with every hostile radius kind."""
    mids = torch.tensor(hostile_mids(dtype), dtype=torch.float64).to(dtype)
    if shuffle:
        g = torch.Generator().manual_seed(seed)
        mids = mids[torch.randperm(mids.numel(), generator=g)]
    radii = hostile_radii(mids)
    mid = torch.cat([mids] * len(radii))
    rad = torch.cat(radii)
    return bg.ball(mid, rad)


def _mpf(x):
    return mp(x) if isinstance(x, Fraction) else mpmath.mpf(x)


def _undef(cond):
    return lambda f: (lambda *a: None if cond(*a) else f(*a))


def _clean(op, *args):
    """Run op; a clear ballgrad error is an acceptable answer (returns None), anything else propagates."""
    try:
        return op(*args)
    except CLEAR_ERRORS as exc:
        assert str(exc), f"{type(exc).__name__} without a message"
        return None


# unary callables and the exact real function (None where undefined)
UNARY = {
    "neg": (torch.neg, lambda x: -x),
    "abs": (torch.abs, lambda x: abs(x)),
    "relu": (torch.relu, lambda x: max(x, 0)),
    "square": (lambda t: t * t, lambda x: x * x),
    "exp": (torch.exp, lambda x: mpmath.exp(_mpf(x))),
    "expm1": (torch.expm1, lambda x: mpmath.expm1(_mpf(x))),
    "log": (torch.log, lambda x: None if x <= 0 else mpmath.log(_mpf(x))),
    "log1p": (torch.log1p, lambda x: None if x <= -1 else mpmath.log1p(_mpf(x))),
    "sqrt": (torch.sqrt, lambda x: None if x < 0 else mpmath.sqrt(_mpf(x))),
    "rsqrt": (torch.rsqrt, lambda x: None if x <= 0 else 1 / mpmath.sqrt(_mpf(x))),
    "reciprocal": (torch.reciprocal, lambda x: None if x == 0 else 1 / x),
    "tanh": (torch.tanh, lambda x: mpmath.tanh(_mpf(x))),
    "sigmoid": (torch.sigmoid, lambda x: 1 / (1 + mpmath.exp(-_mpf(x)))),
    "sin": (torch.sin, lambda x: mpmath.sin(_mpf(x))),
    "cos": (torch.cos, lambda x: mpmath.cos(_mpf(x))),
    "erf": (torch.erf, lambda x: mpmath.erf(_mpf(x))),
    "atan": (torch.atan, lambda x: mpmath.atan(_mpf(x))),
    "sinh": (torch.sinh, lambda x: mpmath.sinh(_mpf(x))),
    "cosh": (torch.cosh, lambda x: mpmath.cosh(_mpf(x))),
    "softplus": (torch.nn.functional.softplus, lambda x: mpmath.log1p(mpmath.exp(_mpf(x)))),
    "gelu": (torch.nn.functional.gelu, lambda x: _mpf(x) / 2 * (1 + mpmath.erf(_mpf(x) / mpmath.sqrt(2)))),
    "silu": (torch.nn.functional.silu, lambda x: _mpf(x) / (1 + mpmath.exp(-_mpf(x)))),
    "pow2": (lambda t: t ** 2, lambda x: x * x),
    "pow3": (lambda t: t ** 3, lambda x: x ** 3),
    "pow_half": (lambda t: t ** 0.5, lambda x: None if x < 0 else mpmath.sqrt(_mpf(x))),
    "mul_scalar": (lambda t: t * 3.0, lambda x: 3 * x),
    "div_scalar": (lambda t: t / 3.0, lambda x: x / 3),
    "add_scalar": (lambda t: t + 0.1, lambda x: x + Fraction(0.1)),
    "clamp": (lambda t: torch.clamp(t, -1.0, 2.0), lambda x: min(max(x, -1), 2)),
    "floor": (torch.floor, lambda x: Fraction(math.floor(x))),
    "ceil": (torch.ceil, lambda x: Fraction(math.ceil(x))),
}

BINARY = {
    "add": (torch.add, lambda x, y: x + y),
    "sub": (torch.sub, lambda x, y: x - y),
    "mul": (torch.mul, lambda x, y: x * y),
    "div": (torch.div, lambda x, y: None if y == 0 else x / y),
    "maximum": (torch.maximum, lambda x, y: max(x, y)),
    "minimum": (torch.minimum, lambda x, y: min(x, y)),
    "atan2": (torch.atan2, lambda y, x: None if x == 0 and y == 0 else mpmath.atan2(_mpf(y), _mpf(x))),
    "hypot": (torch.hypot, lambda x, y: mpmath.sqrt(_mpf(x) ** 2 + _mpf(y) ** 2)),
}

# Kinks and jumps: a ball straddling a discontinuity of floor/ceil or an undefined point may only be answered with
# an infinite radius or a hull; check_rule samples end points, which covers both sides.


# Points standing for "any real" where an input element has an infinite radius (a non-finite midpoint always
# has one): a finite output radius is then legitimate only for bounded functions (tanh, clamp, ...), and must
# contain the function's value at these far-apart reals too.
ANY_REAL = [Fraction(v) for v in (-2 ** 200, -2 ** 40, -3, -1, Fraction(-1, 3), 0, Fraction(1, 3), 1, 3, 2 ** 40,
                                  2 ** 200)]
HUGE = mpmath.mpf(2) ** 1100  # beyond every float's range: such an exact value is in no finite ball


TINY = mpmath.mpf(2) ** -1100  # below every float's granularity


def _contains(m, r, y):
    """contains_exact, without building Fractions of astronomically large or small mpmath values: beyond 2^1100
    no finite ball reaches; a nonzero value below 2^-1100 is decided exactly like +-2^-1100 (m - r and m + r are
    multiples of 2^-1149, so they cannot fall strictly between the two)."""
    if isinstance(y, mpmath.mpf) and y != 0:
        if abs(y) > HUGE:
            return False
        if abs(y) < TINY:
            y = TINY if y > 0 else -TINY
    return contains_exact(m, r, y)


def _elem_points(a, shape, rng):
    if not isinstance(a, torch.Tensor):
        return None
    rad = a.rad if isinstance(a, bg.BallTensor) else torch.zeros((), dtype=torch.float64)
    m = (a.mid if isinstance(a, bg.BallTensor) else a).double().expand(shape).reshape(-1).tolist()
    r = rad.double().expand(shape).reshape(-1).tolist()
    pts = []
    for mi, ri in zip(m, r):
        if not (math.isfinite(mi) and math.isfinite(ri)):
            pts.append(ANY_REAL)
            continue
        fm, fr = Fraction(mi), Fraction(ri)
        pts.append([fm - fr, fm + fr, fm, fm + fr * Fraction(rng.randint(-2 ** 20, 2 ** 20), 2 ** 20)])
    return pts


def _check(op, args, exact_fn, max_combos=16):
    """Elementwise soundness at sampled points (check_rule, with "any real" standing for infinite inputs);
    a clear ballgrad error is accepted as an answer."""
    try:
        out = op(*args)
    except CLEAR_ERRORS as exc:
        assert str(exc), f"{type(exc).__name__} without a message"
        return None
    ref = op(*[a.mid if isinstance(a, bg.BallTensor) else a for a in args])
    assert isinstance(out, bg.BallTensor)
    assert_same_bits(out.mid, ref)
    assert_valid_radius(out)
    rng = random.Random(0)
    per_arg = [_elem_points(a, out.shape, rng) for a in args]
    mids = out.mid.double().reshape(-1).tolist()
    rads = out.rad.double().reshape(-1).tolist()
    for i, (m, r) in enumerate(zip(mids, rads)):
        if math.isinf(r):
            continue
        # Python scalars as exact Fractions (Fraction + float would round to a float)
        options = [[Fraction(a)] if p is None else p[i] for a, p in zip(args, per_arg)]
        combos = list(itertools.product(*options))
        if len(combos) > max_combos:
            combos = combos[:4] + rng.sample(combos[4:], max_combos - 4)
        for pt in combos:
            y = exact_fn(*pt)
            assert y is not None, f"element {i}: finite ball {m!r} ± {r!r} but the function is undefined at {pt}"
            assert _contains(m, r, y), (f"element {i}: exact value {mpmath.nstr(mpmath.mpf(y) if not isinstance(y, Fraction) else mp(y), 20)}"
                                        f" at {[float(p) for p in pt]} not in {m!r} ± {r!r}; inputs "
                                        f"{[(float(a.mid.reshape(-1)[i]), float(a.rad.reshape(-1)[i])) if isinstance(a, bg.BallTensor) else a for a in args]}")
    return out


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("name", sorted(UNARY))
def test_hostile_unary(name, dtype):
    op, fn = UNARY[name]
    _check(op, [hostile_ball(dtype)], fn)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
@pytest.mark.parametrize("name", sorted(BINARY))
def test_hostile_binary(name, dtype):
    op, fn = BINARY[name]
    a = hostile_ball(dtype)
    b = hostile_ball(dtype, seed=1, shuffle=True)
    _check(op, [a, b], fn)
    # the same hostile ball on both sides (dependency) and against plain tensors / Python scalars
    _check(op, [a, a.mid.clone()], fn)
    _check(op, [a.mid.clone(), a], fn)
    _check(op, [a, 2.0], fn)


def _sample_sets(b: bg.BallTensor, rng, n=6):
    """Whole-tensor sample points of a ball: all lower ends, all upper ends, the midpoints, random mixtures.
    None when an element is not finite (the result must then be infinite)."""
    m = b.mid.double().tolist()
    r = b.rad.double().tolist()
    if not all(math.isfinite(x) for x in m + r):
        return None
    fm, fr = [Fraction(x) for x in m], [Fraction(x) for x in r]
    sets = [[a - c for a, c in zip(fm, fr)], [a + c for a, c in zip(fm, fr)], fm]
    for _ in range(n):
        sets.append([a + c * Fraction(rng.randint(-64, 64), 64) for a, c in zip(fm, fr)])
    return sets


def _finite_part(b, keep):
    return bg.ball(b.mid[keep], b.rad[keep])


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_hostile_reductions(dtype):
    """sum / mean / amax / softmax / log_softmax / mm over windows of hostile elements."""
    x = hostile_ball(dtype, shuffle=True, seed=3)
    rng = random.Random(0)
    n = x.numel() // 4 * 4
    windows = x.mid[:n].reshape(-1, 4), x.rad[:n].reshape(-1, 4)
    X = bg.ball(*windows)
    cases = {
        "sum": (lambda t: t.sum(-1), lambda row: sum(row, Fraction(0))),
        "mean": (lambda t: t.mean(-1), lambda row: sum(row, Fraction(0)) / len(row)),
        "amax": (lambda t: t.amax(-1), lambda row: max(row)),
        "logsumexp": (lambda t: torch.logsumexp(t, -1), lambda row: mpmath.log(sum(mpmath.exp(_mpf(v)) for v in row))),
    }
    for name, (op, fn) in cases.items():
        out = _clean(op, X)
        if out is None:
            continue
        ref = op(X.mid)
        assert_same_bits(out.mid, ref)
        assert_valid_radius(out)
        for i in range(X.shape[0]):
            ri = float(out.rad[i])
            if math.isinf(ri):
                continue
            sets = _sample_sets(bg.ball(X.mid[i], X.rad[i]), rng)
            assert sets is not None, f"{name} row {i}: non-finite input but finite radius {ri}"
            for pts in sets:
                assert _contains(float(out.mid[i]), ri, fn(pts)), (name, dtype, i, pts)
    for dim in (0, 1):
        for name, op in (("softmax", torch.softmax), ("log_softmax", torch.log_softmax)):
            out = _clean(op, X, dim)
            if out is None:
                continue
            assert_same_bits(out.mid, op(X.mid, dim))
            assert_valid_radius(out)
            # rows with a finite radius everywhere: check at the three aligned sample sets
            Xd = X if dim == 1 else bg.ball(X.mid.t(), X.rad.t())
            od = out if dim == 1 else bg.ball(out.mid.t(), out.rad.t())
            for i in range(Xd.shape[0]):
                fin = torch.isfinite(od.rad[i])
                if not bool(fin.any()):
                    continue
                sets = _sample_sets(bg.ball(Xd.mid[i], Xd.rad[i]), rng, n=2)
                if sets is None:
                    # a row with an infinite input: softmax is bounded, so a finite radius may still be right
                    # (checked for validity above); log_softmax is unbounded below and must then be infinite
                    # wherever its own input is unknown
                    if name == "log_softmax":
                        unknown = ~torch.isfinite(Xd.rad[i]) | ~torch.isfinite(Xd.mid[i])
                        assert bool(torch.isinf(od.rad[i][unknown]).all()), (name, dim, i)
                    continue
                for pts in sets:
                    top = max(pts)  # shifted exactly (Fractions): no cancellation at 256 bits near overflow
                    e = [mpmath.exp(_mpf(v - top)) for v in pts]
                    s = sum(e)
                    for k in range(len(pts)):
                        if bool(fin[k]):
                            val = e[k] / s if name == "softmax" else _mpf(pts[k] - top) - mpmath.log(s)
                            assert _contains(float(od.mid[i, k]), float(od.rad[i, k]), val), (name, dim, i, k)
    # matmul: rows of hostile values against a hostile column
    B = bg.ball(X.mid[:4].t().contiguous(), X.rad[:4].t().contiguous())
    out = _clean(torch.mm, X, B)
    if out is not None:
        assert_same_bits(out.mid, torch.mm(X.mid, B.mid))
        assert_valid_radius(out)
        for i, j in itertools.product(range(X.shape[0]), range(B.shape[1])):
            r = float(out.rad[i, j])
            if math.isinf(r):
                continue
            a = _sample_sets(bg.ball(X.mid[i], X.rad[i]), rng, n=0)
            c = _sample_sets(bg.ball(B.mid[:, j], B.rad[:, j]), rng, n=0)
            assert a is not None and c is not None, f"mm[{i},{j}]: non-finite input but finite radius {r}"
            for pa, pc in zip(a, c):
                assert _contains(float(out.mid[i, j]), r, sum(p * q for p, q in zip(pa, pc))), ("mm", i, j)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_hostile_backward(dtype):
    """Autograd through hostile leaves: gradients are balls with valid radii and midpoints equal to plain autograd."""
    x = hostile_ball(dtype)
    for name in ("exp", "tanh", "sigmoid", "relu", "square", "sqrt", "log", "abs", "gelu"):
        op, _ = UNARY[name]
        leaf = bg.ball(x.mid.clone(), x.rad.clone()).requires_grad_(True)
        plain = x.mid.clone().requires_grad_(True)
        try:
            (g,) = torch.autograd.grad(op(leaf).sum(), leaf)
        except CLEAR_ERRORS as exc:
            assert str(exc)
            continue
        (gp,) = torch.autograd.grad(op(plain).sum(), plain)
        assert isinstance(g, bg.BallTensor), name
        assert_same_bits(g.mid, gp)
        assert_valid_radius(g)


@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=str)
def test_hostile_comparisons(dtype):
    """Comparisons of hostile balls: a bool ball; every decided element agrees with every sampled point."""
    a = hostile_ball(dtype)
    b = hostile_ball(dtype, seed=2, shuffle=True)
    for op, f in ((torch.lt, lambda x, y: x < y), (torch.le, lambda x, y: x <= y), (torch.gt, lambda x, y: x > y),
                  (torch.ge, lambda x, y: x >= y), (torch.eq, lambda x, y: x == y), (torch.ne, lambda x, y: x != y)):
        out = op(a, b)
        assert_same_bits(out.mid, op(a.mid, b.mid))
        am, ar = a.mid.double().tolist(), a.rad.double().tolist()
        bm, br = b.mid.double().tolist(), b.rad.double().tolist()
        und = out.rad.tolist()
        for i in range(len(am)):
            if und[i]:
                continue
            vals = [am[i], bm[i], ar[i], br[i]]
            if not all(math.isfinite(v) for v in vals):
                # a NaN midpoint or infinite radius must leave the comparison undecided unless the midpoints decide
                # it for every real in both balls, which an infinite ball never does
                assert not (math.isnan(am[i]) or math.isnan(bm[i]) or math.isinf(ar[i]) or math.isinf(br[i])), \
                    (op, i, vals)
                continue  # infinite midpoints with finite radii: compared as extended reals by PyTorch
            xa, ya, xr, yr = (Fraction(v) for v in vals)
            for x, y in itertools.product((xa - xr, xa, xa + xr), (ya - yr, ya, ya + yr)):
                assert f(x, y) == bool(out.mid[i]), (op, i, vals)
        if bool(out.rad.any()):
            with pytest.raises(UndecidedComparisonError, match="."):
                bool(out[out.rad.nonzero()[0, 0]])
