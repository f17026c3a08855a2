"""The rules added for op_db coverage (issue 5), against mpmath at 256 bits and exact rationals on adversarial balls.

Elementwise rules go through ``helpers.check_rule`` (bit-identical midpoints, valid radii, exact containment at end
points, midpoints and interior points of every input ball; None from an exact function = undefined there: the radius
must be infinite). Vector rules (scans, order statistics, scatter sums, decompositions) go through ``check_vector``:
whole input vectors are sampled (all lower ends, all upper ends, midpoints, seeded random interior points), the exact
result is computed with Fractions/mpmath, and every output element must contain it. Decision rules (integer and bool
results) must be exact on decided inputs and raise ``UndecidedComparisonError`` (or give an undecided bool) otherwise.
"""

from __future__ import annotations

import math
import random
from fractions import Fraction

import mpmath
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import ballgrad as bg
from ballgrad.errors import UndecidedComparisonError
from ballgrad.testing import balls, contains_exact
from helpers import EXAMPLES, FLOAT_DTYPES, assert_same_bits, assert_valid_radius, check_rule, mp, plain

aten = torch.ops.aten
_TINY = mpmath.mpf(2) ** -1100
ARB_EXAMPLES = [pytest.param(8, id="sampled"), pytest.param(100, marks=pytest.mark.slow, id="exhaustive")]
_HUGE = mpmath.mpf(2) ** 1100


def _tame(y):
    """Same containment answer, a magnitude Fractions handle (see tests/test_elementwise.py::_tame)."""
    if y is None or isinstance(y, Fraction):
        return y
    if isinstance(y, mpmath.mpc):
        return None
    if not isinstance(y, mpmath.mpf):
        y = mpmath.mpf(y)  # (an mpf is kept as is: mpmath.mpf() would re-round it to the context precision)
    if mpmath.isnan(y) or mpmath.isinf(y):
        return None
    if abs(y) < _TINY and y != 0:
        y = mpmath.sign(y) * _TINY
    elif abs(y) > _HUGE:
        y = mpmath.sign(y) * _HUGE
    sign, man, exp, _ = y._mpf_
    value = Fraction(-man if sign else man)
    return value * 2**exp if exp >= 0 else value / 2**-exp


def _real(fn):
    """fn on mpf arguments; complex results and evaluation errors mean 'undefined' (None)."""

    def at(prec, args):
        try:
            with mpmath.workprec(prec):
                return fn(*[mp(a) if isinstance(a, Fraction) else mpmath.mpf(a) for a in args])
        except (ValueError, ZeroDivisionError):
            return None

    def wrapped(*args):
        v = at(256, args)
        if isinstance(v, mpmath.mpf) and mpmath.isfinite(v) and v != 0:
            # a value within 2^-240 (relative) of a double may sit inside a tiny radius: resolve it at 1200 bits
            near = mpmath.mpf(float(v)) if abs(v) < 1e308 else v
            if abs(v - near) <= abs(v) * mpmath.mpf(2) ** -240:
                v = at(1200, args)
        return _tame(v)

    return wrapped


def _pos(f):
    return lambda a: f(a) if a > 0 else None


# ----------------------------------------------------------------------------------------------------------------------
# Lemma A: unary functions through Arb

UNARY = {
    "asin": (torch.asin, lambda a: mpmath.asin(a) if abs(a) <= 1 else None, None),
    "acos": (torch.acos, lambda a: mpmath.acos(a) if abs(a) <= 1 else None, None),
    "sinh": (torch.sinh, mpmath.sinh, 700),
    "cosh": (torch.cosh, mpmath.cosh, 700),
    "tan": (torch.tan, mpmath.tan, 1e6),
    "asinh": (torch.asinh, mpmath.asinh, None),
    "acosh": (torch.acosh, lambda a: mpmath.acosh(a) if a >= 1 else None, None),
    "atanh": (torch.atanh, lambda a: mpmath.atanh(a) if abs(a) < 1 else None, None),
    "exp2": (torch.exp2, lambda a: mpmath.power(2, a), 2000),
    "sinc": (torch.sinc, lambda a: mpmath.sincpi(a), 1e6),
    "deg2rad": (torch.deg2rad, lambda a: a * mpmath.pi / 180, None),
    "rad2deg": (torch.rad2deg, lambda a: a * 180 / mpmath.pi, None),
    "erfinv": (torch.erfinv, lambda a: mpmath.erfinv(a) if abs(a) < 1 else None, None),
    "lgamma": (torch.lgamma, lambda a: mpmath.log(abs(mpmath.gamma(a))), 200),
    "digamma": (torch.digamma, mpmath.digamma, 200),
    "i0": (torch.i0, lambda a: mpmath.besseli(0, a), 30),
    "angle": (torch.angle, lambda a: mpmath.mpf(0) if a >= 0 else mpmath.pi, None),
    "i0e": (torch.special.i0e, lambda a: mpmath.exp(-abs(a)) * mpmath.besseli(0, a), 30),
    "i1": (torch.special.i1, lambda a: mpmath.besseli(1, a), 30),
    "i1e": (torch.special.i1e, lambda a: mpmath.exp(-abs(a)) * mpmath.besseli(1, a), 30),
    "ndtri": (torch.special.ndtri, lambda a: mpmath.sqrt(2) * mpmath.erfinv(2 * a - 1) if 0 < a < 1 else None, None),
    "log_ndtr": (torch.special.log_ndtr, lambda a: mpmath.log(mpmath.ncdf(a)), 200),
    "erfcx": (torch.special.erfcx, lambda a: mpmath.exp(a * a) * mpmath.erfc(a), 200),
    "entr": (torch.special.entr, lambda a: -a * mpmath.log(a) if a > 0 else (0 if a == 0 else None), None),
    "airy_ai": (torch.special.airy_ai, lambda a: mpmath.airyai(a), 50),
    "bessel_j0": (torch.special.bessel_j0, lambda a: mpmath.besselj(0, a), 30),
    "bessel_j1": (torch.special.bessel_j1, lambda a: mpmath.besselj(1, a), 30),
    "bessel_y0": (torch.special.bessel_y0, _pos(lambda a: mpmath.bessely(0, a)), 30),
    "bessel_y1": (torch.special.bessel_y1, _pos(lambda a: mpmath.bessely(1, a)), 30),
    "k0": (torch.special.modified_bessel_k0, _pos(lambda a: mpmath.besselk(0, a)), 30),
    "k1e": (torch.special.scaled_modified_bessel_k1, _pos(lambda a: mpmath.exp(a) * mpmath.besselk(1, a)), 12),
    "spherical_j0": (torch.special.spherical_bessel_j0, lambda a: mpmath.sin(a) / a if a != 0 else 1, 200),
    "logit": (torch.logit, lambda a: mpmath.log(a / (1 - a)) if 0 < a < 1 else None, None),
    "logit_eps": (lambda x: torch.logit(x, 0.25),
                  lambda a: mpmath.log(min(max(a, 0.25), 0.75) / (1 - min(max(a, 0.25), 0.75))), None),
    "polygamma2": (lambda x: torch.polygamma(2, x), lambda a: mpmath.psi(2, a), 100),
    "mvlgamma3": (lambda x: torch.mvlgamma(x, 3), lambda a: sum(mpmath.log(abs(mpmath.gamma(a - mpmath.mpf(j) / 2)))
                                                               for j in range(3)) + 1.5 * mpmath.log(mpmath.pi), 100),
}


def _balls_for(dtype, magnitude, shape=(4,), **kw):
    return balls(dtype, shape, max_magnitude=magnitude, **kw)


@pytest.mark.parametrize("examples", ARB_EXAMPLES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("name", sorted(UNARY))
def test_arb_unary(name, dtype, examples):
    op, exact_fn, magnitude = UNARY[name]
    exact = _real(exact_fn)

    @settings(max_examples=examples)
    @given(_balls_for(dtype, magnitude))
    def run(x):
        if name == "mvlgamma3" and bool((x.mid <= 1).any()):
            return  # PyTorch itself refuses arguments <= (p - 1)/2
        check_rule(op, [x], exact)

    run()


# ----------------------------------------------------------------------------------------------------------------------
# Lemma A: binary functions


def _atan2(y, x):
    if y == 0 and x == 0:
        return None
    return mpmath.atan2(y, x)


BINARY = {
    "atan2": (torch.atan2, _atan2, None),
    "hypot": (torch.hypot, lambda a, b: mpmath.sqrt(a * a + b * b), 1e150),
    "logaddexp": (torch.logaddexp, lambda a, b: mpmath.log(mpmath.exp(a) + mpmath.exp(b)), 1e6),
    "logaddexp2": (torch.logaddexp2, lambda a, b: mpmath.log(mpmath.power(2, a) + mpmath.power(2, b), 2), 1e6),
    "copysign": (torch.copysign, lambda a, b: abs(a) if b >= 0 else -abs(a), None),  # real 0 has no sign: |a|
    "xlogy": (torch.xlogy, lambda a, b: mpmath.mpf(0) if a == 0 else (a * mpmath.log(b) if b > 0 else None), 1e30),
    "xlog1py": (torch.special.xlog1py,
                lambda a, b: mpmath.mpf(0) if a == 0 else (a * mpmath.log1p(b) if b > -1 else None), 1e30),
    "zeta": (torch.special.zeta, lambda s, q: mpmath.zeta(s, q) if (s > 1 and q > 0) else None, 50),
    "igamma": (torch.special.gammainc,
               lambda a, x: mpmath.gammainc(a, 0, x, regularized=True) if (a > 0 and x >= 0) else None, 50),
    "igammac": (torch.special.gammaincc,
                lambda a, x: mpmath.gammainc(a, x, mpmath.inf, regularized=True) if (a > 0 and x >= 0) else None, 12),
    "fmod": (torch.fmod, lambda a, b: a - b * int(a / b) if b != 0 else None, 1e6),
    "remainder": (torch.remainder, lambda a, b: a - b * math.floor(a / b) if b != 0 else None, 1e6),
    "div_floor": (lambda a, b: torch.div(a, b, rounding_mode="floor"),
                  lambda a, b: Fraction(math.floor(a / b)) if b != 0 else None, 1e6),
    "div_trunc": (lambda a, b: torch.div(a, b, rounding_mode="trunc"),
                  lambda a, b: Fraction(int(a / b)) if b != 0 else None, 1e6),
}

_EXACT_BINARY = {"fmod", "remainder", "div_floor", "div_trunc"}  # evaluated on Fractions


@pytest.mark.parametrize("examples", ARB_EXAMPLES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("name", sorted(BINARY))
def test_arb_binary(name, dtype, examples):
    op, exact_fn, magnitude = BINARY[name]
    exact = exact_fn if name in _EXACT_BINARY else _real(exact_fn)

    @settings(max_examples=examples)
    @given(_balls_for(dtype, magnitude), _balls_for(dtype, magnitude))
    def run(a, b):
        if name in ("igamma", "igammac") and bool((a.mid.abs() < 1e-6).any()):
            return  # orders near 0 (down to subnormals) take seconds per element in mpmath's reference (and in Arb)
        check_rule(op, [a, b], exact)

    run()


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_ldexp_and_round_decimals(dtype):
    @settings(max_examples=25)
    @given(_balls_for(dtype, 1e6), st.lists(st.integers(-30, 30), min_size=4, max_size=4),
           st.sampled_from([0, 1, 3, -2]))
    def run(x, exps, decimals):
        e = torch.tensor(exps)
        out = torch.ldexp(x, e)
        assert_same_bits(out.mid, torch.ldexp(x.mid, e))
        _check_points(out, [x], lambda a: [ai * Fraction(2) ** k for ai, k in zip(a, exps)])
        r = torch.round(x, decimals=decimals)
        assert_same_bits(r.mid, torch.round(x.mid, decimals=decimals))
        scale = Fraction(10) ** decimals
        _check_points(r, [x], lambda a: [Fraction(round(ai * scale)) / scale for ai in a])

    run()


# ----------------------------------------------------------------------------------------------------------------------
# Orthogonal polynomials


def _exact_orth(kind, shifted):
    """P_trunc(n)(x) exactly in Fractions by the three-term recurrences (0 for a negative degree)."""

    def fn(x, n):
        k = int(n)
        if k < 0:
            return Fraction(0)
        if shifted:
            x = 2 * x - 1
        first = {"t": x, "u": 2 * x, "v": 2 * x - 1, "w": 2 * x + 1, "h": 2 * x, "he": x, "l": 1 - x, "p": x}[kind]
        prev, cur = Fraction(1), first
        if k == 0:
            return prev
        for j in range(1, k):
            if kind in ("t", "u", "v", "w"):
                prev, cur = cur, 2 * x * cur - prev
            elif kind == "h":
                prev, cur = cur, 2 * x * cur - 2 * j * prev
            elif kind == "he":
                prev, cur = cur, x * cur - j * prev
            elif kind == "l":
                prev, cur = cur, ((2 * j + 1 - x) * cur - j * prev) / (j + 1)
            else:
                prev, cur = cur, ((2 * j + 1) * x * cur - j * prev) / (j + 1)
        return cur

    return fn


ORTHOGONAL = {
    "chebyshev_polynomial_t": ("t", False), "chebyshev_polynomial_u": ("u", False),
    "chebyshev_polynomial_v": ("v", False), "chebyshev_polynomial_w": ("w", False),
    "hermite_polynomial_h": ("h", False), "hermite_polynomial_he": ("he", False),
    "laguerre_polynomial_l": ("l", False), "legendre_polynomial_p": ("p", False),
    "shifted_chebyshev_polynomial_t": ("t", True), "shifted_chebyshev_polynomial_w": ("w", True),
}


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("name", sorted(ORTHOGONAL))
def test_orthogonal_polynomials(name, dtype):
    op = getattr(torch.special, name)
    kind, shifted = ORTHOGONAL[name]
    exact = _exact_orth(kind, shifted)

    @settings(max_examples=20)
    @given(_balls_for(dtype, 4), st.lists(st.integers(-2, 12), min_size=4, max_size=4))
    def run(x, degrees):
        n = torch.tensor(degrees, dtype=dtype)
        out = op(x, n)
        assert_same_bits(out.mid, op(x.mid, n))
        assert_valid_radius(out)
        _check_points(out, [x], lambda a: [exact(ai, Fraction(k)) for ai, k in zip(a, degrees)])

    run()


# ----------------------------------------------------------------------------------------------------------------------
# Lemma T: step functions


STEPS = {
    "floor": (torch.floor, lambda a: Fraction(math.floor(a))),
    "ceil": (torch.ceil, lambda a: Fraction(math.ceil(a))),
    "trunc": (torch.trunc, lambda a: Fraction(int(a))),
    "round": (torch.round, lambda a: Fraction(round(a))),
    "frac": (torch.frac, lambda a: a - int(a)),
    "nan_to_num": (torch.nan_to_num, lambda a: a),
}


@pytest.mark.parametrize("examples", EXAMPLES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("name", sorted(STEPS))
def test_steps(name, dtype, examples):
    op, exact_fn = STEPS[name]

    @settings(max_examples=examples)
    @given(balls(dtype, (4,)))
    def run(x):
        check_rule(op, [x], exact_fn)

    run()


def test_step_inside_one_step_is_exact_and_straddling_records_a_kink():
    x = bg.ball(torch.tensor([1.25, 2.0, -0.5], dtype=torch.float64), torch.tensor([0.2, 0.5, 0.25]))
    with bg.record() as rec:
        y = torch.floor(x)
    assert y.rad[0] == 0 and y.rad[1] == 1 and y.rad[2] == 0
    assert rec.of_kind("kink")


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_heaviside_and_signbit(dtype):
    @settings(max_examples=30)
    @given(balls(dtype, (4,)), balls(dtype, (4,), allow_nonfinite=False))
    def run(x, v):
        out = torch.heaviside(x, v)
        assert_same_bits(out.mid, torch.heaviside(x.mid, v.mid))
        _check_points(out, [x, v], lambda a, b: [Fraction(0) if ai < 0 else (Fraction(1) if ai > 0 else bi)
                                                 for ai, bi in zip(a, b)])
        s = torch.signbit(x)
        assert torch.equal(s.mid, torch.signbit(x.mid))
        # a decided element has the same real answer (x < 0) as PyTorch at every point of its ball
        for i, (m, r) in enumerate(zip(x.mid.double().tolist(), x.rad.double().tolist())):
            if bool(s.rad[i]):
                continue
            assert math.isfinite(m) and math.isfinite(r)
            for p in (Fraction(m) - Fraction(r), Fraction(m), Fraction(m) + Fraction(r)):
                assert (p < 0) == bool(s.mid[i])

    run()


# ----------------------------------------------------------------------------------------------------------------------
# Vector rules: exact results of whole sampled vectors


def _element_points(b, k, rng):
    """Exact points (Fractions) for every element of ball b: k = 0 midpoints, 1 lower ends, 2 upper ends, else random
    interior points."""
    m = b.mid.detach().double().reshape(-1).tolist()
    r = b.rad.double().reshape(-1).tolist() if isinstance(b, bg.BallTensor) else [0.0] * len(m)
    out = []
    for mi, ri in zip(m, r):
        fm, fr = Fraction(mi), Fraction(ri)
        s = [0, -1, 1][k] if k < 3 else Fraction(rng.randint(-2**20, 2**20), 2**20)
        out.append(fm + fr * s)
    return out


def _check_points(out, args, exact_fn, n_points=6, seed=0):
    """exact_fn(*flat Fraction lists) -> flat list of exact outputs (Fraction/mpf/None) for ``out`` (flattened); every
    finite-radius output element must contain it. Arguments must be finite balls (or plain tensors)."""
    rng = random.Random(seed)
    mids = out.mid.detach().double().reshape(-1).tolist()
    rads = out.rad.double().reshape(-1).tolist()
    if any(isinstance(a, torch.Tensor) and not bool(torch.isfinite(plain(a)).all()) for a in args):
        return  # a non-finite midpoint or radius: nothing exact to compare with (see the non-finite test)
    if any(isinstance(a, bg.BallTensor) and not bool(torch.isfinite(a.rad).all()) for a in args):
        return
    for k in range(n_points):
        pts = [_element_points(a, k, rng) if isinstance(a, torch.Tensor) else a for a in args]
        values = exact_fn(*pts)
        for i, (m, r, v) in enumerate(zip(mids, rads, values)):
            if math.isinf(r):
                continue
            assert v is not None, f"element {i}: finite radius {r} but the exact function is undefined"
            assert contains_exact(m, r, v if isinstance(v, Fraction) else _tame(v)), (
                f"element {i}: exact {float(v)!r} not in {m!r} ± {r!r} (points {k})")


def _finite_balls(dtype, shape, magnitude=1e6):
    return balls(dtype, shape, allow_nonfinite=False, allow_inf_radius=False, max_magnitude=magnitude)


def _cumulative(fn):
    def exact(a):
        out, acc = [], None
        for v in a:
            acc = v if acc is None else fn(acc, v)
            out.append(acc)
        return out

    return exact


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_scans(dtype):
    @settings(max_examples=25)
    @given(_finite_balls(dtype, (6,), 1e3))
    def run(x):
        for op, fn in [(torch.cumsum, lambda a, b: a + b), (torch.cumprod, lambda a, b: a * b),
                       (lambda t, d: torch.cummax(t, d)[0], max), (lambda t, d: torch.cummin(t, d)[0], min)]:
            out = op(x, 0)
            assert_same_bits(out.mid, op(x.mid, 0))
            assert_valid_radius(out)
            _check_points(out, [x], _cumulative(fn))
        out = torch.logcumsumexp(x, 0)
        assert_same_bits(out.mid, torch.logcumsumexp(x.mid, 0))

        def lcse(a):  # the first prefix is a_0 itself, exactly
            with mpmath.workprec(1024):
                sums = _cumulative(lambda p, q: p + q)([mpmath.exp(mp(v)) for v in a])
                return [a[0]] + [mpmath.log(t) for t in sums[1:]]

        _check_points(out, [x], lcse)

    run()


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_order_statistics(dtype):
    @settings(max_examples=25)
    @given(_finite_balls(dtype, (7,)), st.integers(1, 7))
    def run(x, k):
        values, _ = torch.sort(x, 0)
        assert_same_bits(values.mid, torch.sort(x.mid, 0)[0])
        _check_points(values, [x], sorted)
        desc, _ = torch.sort(x, 0, descending=True)
        _check_points(desc, [x], lambda a: sorted(a, reverse=True))
        top, _ = torch.topk(x, k)
        assert_same_bits(top.mid, torch.topk(x.mid, k)[0])
        _check_points(top, [x], lambda a: sorted(a, reverse=True)[:k])
        kth, _ = torch.kthvalue(x, k)
        _check_points(kth, [x], lambda a: [sorted(a)[k - 1]])
        med = torch.median(x)
        assert_same_bits(med.mid, torch.median(x.mid))
        _check_points(med, [x], lambda a: [sorted(a)[(len(a) - 1) // 2]])
        mn, mx = torch.aminmax(x)
        _check_points(mn, [x], lambda a: [min(a)])
        _check_points(mx, [x], lambda a: [max(a)])
        s = torch.nansum(x)
        assert_same_bits(s.mid, torch.nansum(x.mid))
        _check_points(s, [x], lambda a: [sum(a)])

    run()


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_scatter_sums(dtype):
    @settings(max_examples=25)
    @given(_finite_balls(dtype, (5,)), _finite_balls(dtype, (6,)),
           st.lists(st.integers(0, 4), min_size=6, max_size=6), st.sampled_from([1, -1, 2, 0.5]))
    def run(x, src, idx, alpha):
        index = torch.tensor(idx)

        def scatter(a, s, scale=1):
            out = list(a)
            for i, v in zip(idx, s):
                out[i] += Fraction(scale) * v
            return out

        out = torch.index_add(x, 0, index, src, alpha=alpha)
        assert_same_bits(out.mid, torch.index_add(x.mid, 0, index, src.mid, alpha=alpha))
        _check_points(out, [x, src], lambda a, s: scatter(a, s, alpha))
        out = torch.scatter_add(x, 0, index, src)
        _check_points(out, [x, src], scatter)
        out = x.index_put((index,), src, accumulate=True)
        assert_same_bits(out.mid, x.mid.index_put((index,), src.mid, accumulate=True))
        _check_points(out, [x, src], scatter)
        out = torch.scatter_reduce(x, 0, index, src, "amax")
        _check_points(out, [x, src], lambda a, s: [max([a[j]] + [v for i, v in zip(idx, s) if i == j])
                                                  for j in range(5)])
        out = torch.scatter_reduce(x, 0, index, src, "mean", include_self=False)
        assert_same_bits(out.mid, torch.scatter_reduce(x.mid, 0, index, src.mid, "mean", include_self=False))

        def mean(a, s):
            res = []
            for j in range(5):
                vals = [v for i, v in zip(idx, s) if i == j]
                res.append(sum(vals) / len(vals) if vals else a[j])
            return res

        _check_points(out, [x, src], mean)

    run()


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_audited_decompositions(dtype):
    @settings(max_examples=20)
    @given(_finite_balls(dtype, (3,), 1e3), _finite_balls(dtype, (3,), 1e3), _finite_balls(dtype, (3, 3), 1e3),
           st.sampled_from([1.0, 3.0, 0.5]))
    def run(u, v, m, p):
        out = torch.vdot(u, v)
        assert_same_bits(out.mid, torch.vdot(u.mid, v.mid))
        _check_points(out, [u, v], lambda a, b: [sum(x * y for x, y in zip(a, b))])
        out = torch.addr(m, u, v, beta=2, alpha=0.5)
        assert_same_bits(out.mid, torch.addr(m.mid, u.mid, v.mid, beta=2, alpha=0.5))
        _check_points(out, [m, u, v], lambda mm, a, b: [2 * mm[3 * i + j] + Fraction(1, 2) * a[i] * b[j]
                                                         for i in range(3) for j in range(3)])
        out = torch.linalg.cross(u, v)
        assert_same_bits(out.mid, torch.linalg.cross(u.mid, v.mid))
        _check_points(out, [u, v], lambda a, b: [a[1] * b[2] - a[2] * b[1], a[2] * b[0] - a[0] * b[2],
                                                 a[0] * b[1] - a[1] * b[0]])
        out = torch.trace(m)
        assert_same_bits(out.mid, torch.trace(m.mid))
        _check_points(out, [m], lambda mm: [mm[0] + mm[4] + mm[8]])
        out = torch.linalg.vector_norm(u, p)
        assert_same_bits(out.mid, torch.linalg.vector_norm(u.mid, p))

        def pnorm(a):
            with mpmath.workprec(256):
                return [mpmath.power(sum(mpmath.power(abs(mp(t)), p) for t in a), 1 / mpmath.mpf(p))]

        _check_points(out, [u], pnorm)
        out = torch.dist(u, v, p)
        assert_same_bits(out.mid, torch.dist(u.mid, v.mid, p))
        _check_points(out, [u, v], lambda a, b: pnorm([x - y for x, y in zip(a, b)]))

    run()


def test_linspace_with_tensor_ends():
    s = bg.ball(torch.tensor(0.1, dtype=torch.float64), 1e-9)
    e = bg.ball(torch.tensor(2.3, dtype=torch.float64), 1e-9)
    out = torch.linspace(s, e, 7)
    assert_same_bits(out.mid, torch.linspace(s.mid, e.mid, 7))
    _check_points(out, [s, e], lambda a, b: [a[0] + (b[0] - a[0]) * Fraction(i, 6) for i in range(7)])


# ----------------------------------------------------------------------------------------------------------------------
# Shape rules with fills; conversions and decisions


def test_fill_value_cast_is_covered():
    x = bg.ball(torch.zeros(4), 0.0)
    y = torch.index_fill(x, 0, torch.tensor([1, 3]), 0.1)
    assert_same_bits(y.mid, torch.index_fill(x.mid, 0, torch.tensor([1, 3]), 0.1))
    assert contains_exact(float(y.mid[1]), float(y.rad[1]), Fraction(0.1))
    assert y.rad[0] == 0


def test_integer_conversion_decided_or_raises():
    x = bg.ball(torch.tensor([1.5, -2.75, 0.0]), torch.tensor([0.25, 0.2, 0.0]))
    assert torch.equal(x.int(), x.mid.int())
    b = x.bool()
    assert torch.equal(b.mid, x.mid.bool()) and not bool(b.rad.any())
    with pytest.raises(UndecidedComparisonError):
        bg.ball(torch.tensor([0.9]), 0.2).int()
    assert bool(bg.ball(torch.tensor([0.0, 0.25]), 0.5).bool().rad.all())
    assert not bool(bg.ball(torch.tensor([1.0]), 0.5).bool().rad.any())


def test_decisions():
    x = bg.ball(torch.tensor([0.0, 1.0, 2.0, 2.0]))
    assert torch.equal(torch.nonzero(x), torch.nonzero(x.mid))
    assert torch.equal(torch.searchsorted(torch.tensor([0.5, 1.5]), x), torch.searchsorted(torch.tensor([0.5, 1.5]),
                                                                                           x.mid))
    values = torch.unique(x)
    assert torch.equal(values.mid, torch.unique(x.mid)) and not bool(values.rad.any())
    assert torch.equal(x, x.mid.clone()) is True
    assert torch.allclose(x, x.mid + 1e-9) is True
    wide = bg.ball(torch.tensor([0.0, 1.0]), 0.75)
    with pytest.raises(UndecidedComparisonError):
        torch.nonzero(wide)
    with pytest.raises(UndecidedComparisonError):
        torch.unique(wide)
    hit = torch.isin(wide, torch.tensor([1.0]))
    assert torch.equal(hit.mid, torch.isin(wide.mid, torch.tensor([1.0]))) and bool(hit.rad[1])


def test_frexp_decided_exponent():
    x = bg.ball(torch.tensor([3.0, -0.3], dtype=torch.float64), 1e-3)
    m, e = torch.frexp(x)
    pm, pe = torch.frexp(x.mid)
    assert_same_bits(m.mid, pm) and torch.equal(e, pe)
    _check_points(m, [x], lambda a: [a[0] / 4, a[1] * 2])
    with pytest.raises(UndecidedComparisonError):
        torch.frexp(bg.ball(torch.tensor([1.0]), 1e-3))


def test_random_like_are_exact_points():
    x = bg.ball(torch.randn(5), 0.1)
    torch.manual_seed(3)
    a = torch.randn_like(x)
    torch.manual_seed(3)
    assert_same_bits(a.mid, torch.randn_like(x.mid))
    assert not bool(a.rad.any())


def test_nonfinite_inputs_give_infinite_radii():
    x = bg.ball(torch.tensor([1.0, float("nan"), 2.0]))
    assert bool(torch.isinf(torch.cumsum(x, 0).rad[1:]).all())
    assert bool(torch.isinf(torch.asin(x).rad[1]))
    assert bool(torch.isinf(torch.floor(x).rad[1]))
    assert bool(torch.isinf(torch.sort(x)[0].rad[-1]))


def _exact_lower_solve(a, b, n, k):
    """X with L X = B exactly (Fractions; a, b flat row-major lists)."""
    x = [[None] * k for _ in range(n)]
    for i in range(n):
        for c in range(k):
            acc = b[i * k + c] - sum(a[i * n + j] * x[j][c] for j in range(i))
            x[i][c] = acc / a[i * n + i]
    return [x[i][c] for i in range(n) for c in range(k)]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_triangular_solves(dtype):
    @settings(max_examples=20)
    @given(_finite_balls(dtype, (3, 3), 10), _finite_balls(dtype, (3, 2), 10))
    def run(a, b):
        lower = bg.ball(torch.tril(a.mid) + 30 * torch.eye(3, dtype=dtype), torch.tril(a.rad))
        x = torch.linalg.solve_triangular(lower, b, upper=False)
        assert_same_bits(x.mid, torch.linalg.solve_triangular(lower.mid, b.mid, upper=False))
        assert_valid_radius(x)
        _check_points(x, [lower, b], lambda aa, bb: _exact_lower_solve(aa, bb, 3, 2))
        # L L^T X = B through cholesky_solve: X = L^-T (L^-1 B)
        y = torch.cholesky_solve(b, lower)
        assert_same_bits(y.mid, torch.cholesky_solve(b.mid, lower.mid))

        def chol(aa, bb):
            z = _exact_lower_solve(aa, bb, 3, 2)
            t = [aa[j * 3 + i] for i in range(3) for j in range(3)]  # L^T, row-major
            rev = [t[(2 - i) * 3 + (2 - j)] for i in range(3) for j in range(3)]  # reversed upper = lower
            zr = [z[(2 - i) * 2 + c] for i in range(3) for c in range(2)]
            w = _exact_lower_solve(rev, zr, 3, 2)
            return [w[(2 - i) * 2 + c] for i in range(3) for c in range(2)]

        _check_points(y, [lower, b], chol)

    run()


def _fraction_solve(a, b):
    """X with A X = B exactly (Gauss-Jordan with Fractions; A n x n, B n x k as lists of rows)."""
    n, k = len(a), len(b[0])
    m = [list(a[i]) + list(b[i]) for i in range(n)]
    for c in range(n):
        p = next(r for r in range(c, n) if m[r][c] != 0)
        m[c], m[p] = m[p], m[c]
        for r in range(n):
            if r != c and m[r][c] != 0:
                f = m[r][c] / m[c][c]
                m[r] = [x - f * y for x, y in zip(m[r], m[c])]
    return [[m[i][n + j] / m[i][i] for j in range(k)] for i in range(n)]


@pytest.mark.parametrize("adjoint", [False, True])
def test_lu_solve_exact(adjoint):
    torch.manual_seed(0)
    a = torch.randn(4, 4, dtype=torch.float64) + 4 * torch.eye(4, dtype=torch.float64)
    lu, piv = torch.linalg.lu_factor(a)
    lu_b = bg.ball(lu, 1e-10)
    b = bg.ball(torch.randn(4, 2, dtype=torch.float64), 1e-10)
    x = torch.linalg.lu_solve(lu_b, piv, b, adjoint=adjoint)
    assert_same_bits(x.mid, torch.linalg.lu_solve(lu, piv, b.mid, adjoint=adjoint))
    perm = list(range(4))
    for i, p in enumerate(piv.tolist()):
        perm[i], perm[p - 1] = perm[p - 1], perm[i]

    def exact(lu_flat, b_flat):
        low = [[lu_flat[i * 4 + j] if j < i else Fraction(int(i == j)) for j in range(4)] for i in range(4)]
        up = [[lu_flat[i * 4 + j] if j >= i else Fraction(0) for j in range(4)] for i in range(4)]
        lu_prod = [[sum(low[i][t] * up[t][j] for t in range(4)) for j in range(4)] for i in range(4)]
        full = [None] * 4
        for i in range(4):  # A = P L U: row i of L U is row perm[i] of A
            full[perm[i]] = lu_prod[i]
        if adjoint:
            full = [[full[j][i] for j in range(4)] for i in range(4)]
        sol = _fraction_solve(full, [[b_flat[i * 2 + c] for c in range(2)] for i in range(4)])
        return [v for row in sol for v in row]

    _check_points(x, [lu_b, b], exact, n_points=4)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_verified_solve_and_inverse(dtype):
    @settings(max_examples=15)
    @given(_finite_balls(dtype, (3, 3), 1.0), _finite_balls(dtype, (3, 2), 10))
    def run(a, b):
        a = bg.ball(a.mid + 4 * torch.eye(3, dtype=dtype), torch.clamp(a.rad, max=0.25))
        x = torch.linalg.solve(a, b)
        assert_same_bits(x.mid, torch.linalg.solve(a.mid, b.mid))
        assert_valid_radius(x)

        def exact(aa, bb):
            sol = _fraction_solve([aa[3 * i:3 * i + 3] for i in range(3)], [bb[2 * i:2 * i + 2] for i in range(3)])
            return [v for row in sol for v in row]

        _check_points(x, [a, b], exact, n_points=4)
        inv = torch.linalg.inv(a)
        assert_same_bits(inv.mid, torch.linalg.inv(a.mid))
        eye = [Fraction(int(i == j)) for i in range(3) for j in range(3)]
        def exact_inverse(aa):
            sol = _fraction_solve([aa[3 * i:3 * i + 3] for i in range(3)], [eye[3 * i:3 * i + 3] for i in range(3)])
            return [v for row in sol for v in row]

        _check_points(inv, [a], exact_inverse, n_points=4)

    run()


def test_unverifiable_system_gets_infinite_radius():
    a = bg.ball(torch.tensor([[1.0, 2.0], [2.0, 4.0 + 1e-6]], dtype=torch.float64), 1e-3)  # contains singular matrices
    x = torch.linalg.solve(a, torch.tensor([1.0, 2.0], dtype=torch.float64))
    assert bool(torch.isinf(x.rad).all())
