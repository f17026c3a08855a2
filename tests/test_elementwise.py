"""Library-function rules (ops/elementwise.py) against mpmath at 256 bits and exact rationals.

Every rule runs on adversarial hypothesis balls (zeros of both signs, subnormals, values near overflow, huge and zero
radii, infinities and NaN) in float32 and float64 (and float16/bfloat16 for the unary rules), and ``check_rule``
asserts bit-identical midpoints, valid radii, and exact containment of the exact function at sampled points of every
input ball (None from an exact function = undefined there: the radius must then be infinite).
"""

import math
from fractions import Fraction

import mpmath
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import ballgrad as bg
from ballgrad import rounding
from ballgrad.testing import ball_pairs, balls
from helpers import ALL_DTYPES, EXAMPLES, FLOAT_DTYPES, check_rule, mp

_TINY = mpmath.mpf(2) ** -1100
_HUGE = mpmath.mpf(2) ** 1100


def _tame(y):
    """An exact value with the same containment answer but a magnitude Fraction arithmetic can handle.

    Ball end points m +- r are multiples of 2^-1074 (every supported dtype's floats are) and at most 2^1025 in
    magnitude, so every value in (0, 2^-1074) is inside a ball iff 2^-1100 is, and every value beyond 2^1025 is
    outside iff 2^1100 is (mpmath's exp(-1e300) has a binary exponent near -1.4e300).
    """
    if y is None or isinstance(y, Fraction):
        return y
    y = mpmath.mpf(y)
    if abs(y) < _TINY and y != 0:
        y = mpmath.sign(y) * _TINY
    elif abs(y) > _HUGE:
        y = mpmath.sign(y) * _HUGE
    return _mpf_fraction(y)


def _mpf_fraction(y) -> Fraction:
    """The exact value of a finite mpf, sign included (converted here rather than by ``ballgrad.testing.exact``,
    whose ``man_exp`` reading drops the sign of negative mpf values)."""
    sign, man, exp, _ = y._mpf_
    value = Fraction(-man if sign else man)
    return value * 2**exp if exp >= 0 else value / 2**-exp


def _log(f):
    return lambda a: None if a <= 0 else f(mp(a))


def _erfc_exact(a):
    """erfc, with the far tails replaced by containment-equivalent values (mpmath overflows on huge arguments):
    0 < erfc(x) < exp(-x^2)/(x sqrt(pi)) < 2^-1100 for x >= 28 (see ``_tame``), and erfc(-x) = 2 - erfc(x), where
    every value in (2 - 2^-1074, 2) has the same containment answer as 2 - 2^-1100."""
    if a >= 28:
        return Fraction(1, 2**1100)
    if a <= -28:
        return 2 - Fraction(1, 2**1100)
    return mpmath.erfc(mp(a))


def _erf_exact(a):
    """erf = 1 - erfc, with the same tail replacement as ``_erfc_exact``."""
    if abs(a) >= 28:
        return (1 - Fraction(1, 2**1100)) * (1 if a > 0 else -1)
    return mpmath.erf(mp(a))


def _softplus_exact(beta):
    b = mpmath.mpf(beta)
    return lambda a: mpmath.log1p(mpmath.exp(b * mp(a))) / b


UNARY = {
    "exp": (torch.exp, lambda a: mpmath.exp(mp(a))),
    "expm1": (torch.expm1, lambda a: mpmath.expm1(mp(a))),
    "log": (torch.log, _log(mpmath.log)),
    "log2": (torch.log2, _log(lambda v: mpmath.log(v, 2))),
    "log10": (torch.log10, _log(mpmath.log10)),
    "log1p": (torch.log1p, lambda a: None if a <= -1 else mpmath.log1p(mp(a))),
    "tanh": (torch.tanh, lambda a: mpmath.tanh(mp(a))),
    "sigmoid": (torch.sigmoid, lambda a: 1 / (1 + mpmath.exp(-mp(a)))),
    "sin": (torch.sin, lambda a: mpmath.sin(mp(a))),
    "cos": (torch.cos, lambda a: mpmath.cos(mp(a))),
    "atan": (torch.atan, lambda a: mpmath.atan(mp(a))),
    "erf": (torch.erf, _erf_exact),
    "erfc": (torch.erfc, _erfc_exact),
    "sqrt": (torch.sqrt, lambda a: None if a < 0 else mpmath.sqrt(mp(a))),
    "rsqrt": (torch.rsqrt, lambda a: None if a <= 0 else 1 / mpmath.sqrt(mp(a))),
    "softplus": (F.softplus, _softplus_exact(1)),
    "softplus_b2_t5": (lambda x: F.softplus(x, beta=2, threshold=5), _softplus_exact(2)),
    "softplus_b0.3_t1": (lambda x: F.softplus(x, beta=0.3, threshold=1), _softplus_exact(0.3)),
}


def _run_unary(name, dtype, examples, **strategy):
    op, exact_fn = UNARY[name]

    @settings(max_examples=examples)
    @given(balls(dtype, (4,), **strategy))
    def run(x):
        check_rule(op, [x], lambda a: _tame(exact_fn(a)))

    run()


@pytest.mark.parametrize("examples", EXAMPLES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("name", sorted(UNARY))
def test_unary(name, dtype, examples):
    _run_unary(name, dtype, examples)


@pytest.mark.parametrize("examples", EXAMPLES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", sorted(UNARY))
def test_unary_reduced_dtypes(name, dtype, examples):
    _run_unary(name, dtype, max(5, examples // 3))


# ----------------------------------------------------------------------------------------------------------------------
# Powers


def _power_exact(a, p):
    """a ** p for a Fraction a and an exact double p (None where the real power is undefined)."""
    p = Fraction(p)
    if p.denominator == 1:
        n = int(p)
        if a == 0 and n < 0:
            return None
        if abs(n) <= 64:
            return a**n
        return _tame(mpmath.power(mp(a), n))
    if a < 0 or (a == 0 and p < 0):
        return None
    if a == 0:
        return Fraction(0)
    return _tame(mpmath.power(mp(a), mp(p)))


EXPONENTS = [0, 1, 2, 3, 4, 5, 7, -1, -2, -3, 2.0, -4.0, 0.5, -0.5, 2.5, -1.25, 1 / 3, 0.1, 17.75, 1e-3]


@pytest.mark.parametrize("examples", EXAMPLES)
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("p", EXPONENTS, ids=repr)
def test_pow_tensor_scalar(p, dtype, examples):
    examples = examples if dtype in FLOAT_DTYPES else max(5, examples // 3)

    @settings(max_examples=examples)
    @given(balls(dtype, (4,)))
    def run(x):
        check_rule(lambda t: torch.pow(t, p), [x], lambda a: _power_exact(a, p))

    run()


@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_square(dtype):
    x = bg.ball(torch.tensor([-3.0, -0.5, 0.0, 1e-3, 7.0], dtype=dtype), torch.tensor([0.0, 0.75, 1e-3, 0.0, 0.5]))
    out = check_rule(torch.square, [x], lambda a: a * a)
    assert out.rad[2] <= 2e-6  # [0, 1e-6] for a ball straddling 0, not a symmetric hull
    check_rule(torch.ops.aten.square.default, [x], lambda a: a * a)


def _scalar_power_exact(s, a):
    s = Fraction(s)
    if s > 0:
        return _tame(mpmath.power(mp(s), mp(a)))
    if s == 0:
        return None if a < 0 else (Fraction(1) if a == 0 else Fraction(0))
    if a.denominator != 1:
        return None
    return _tame(mpmath.power(mp(s), int(a)))


BASES = [2, 0.5, 10.0, 2.5, 1e-3, 1, 1.0, 0, -2, -0.5, -1]


@pytest.mark.parametrize("examples", EXAMPLES)
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("s", BASES, ids=repr)
def test_pow_scalar_tensor(s, dtype, examples):
    examples = examples if dtype in FLOAT_DTYPES else max(5, examples // 3)

    @settings(max_examples=examples)
    @given(balls(dtype, (4,)))
    def run(x):
        check_rule(lambda t: torch.pow(s, t), [x], lambda a: _scalar_power_exact(s, a))

    run()


def _tensor_power_exact(a, b):
    if b.denominator == 1:
        return _power_exact(a, b) if abs(b) <= 64 else _scalar_power_exact(a, b) if a != 0 else (
            None if b < 0 else Fraction(0))
    if a < 0 or (a == 0 and b < 0):
        return None
    if a == 0:
        return Fraction(0)
    return _tame(mpmath.power(mp(a), mp(b)))


@pytest.mark.parametrize("examples", EXAMPLES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_pow_tensor_tensor(dtype, examples):
    @settings(max_examples=examples)
    @given(ball_pairs(dtype, (4,)))
    def run(pair):
        check_rule(torch.pow, pair, _tensor_power_exact, max_combos=10)

    run()


@pytest.mark.parametrize("examples", EXAMPLES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_pow_tensor_tensor_moderate(dtype, examples):
    """Positive bases and moderate exponents, where the corner enclosure is actually finite most of the time."""

    @settings(max_examples=examples)
    @given(balls(dtype, (4,), max_magnitude=40, allow_nonfinite=False),
           balls(dtype, (4,), max_magnitude=8, allow_nonfinite=False))
    def run(x, y):
        check_rule(torch.pow, [x, y], _tensor_power_exact, max_combos=10)
        check_rule(torch.pow, [bg.ball(torch.abs(x.mid), x.rad), y], _tensor_power_exact, max_combos=10)

    run()


def test_pow_tensor_tensor_integer_exponents_and_negative_bases():
    x = bg.ball(torch.tensor([-2.0, -1.5, -0.25, 0.0, 3.0, -2.0]), torch.tensor([0.0, 1e-3, 0.5, 0.0, 1e-3, 1e-6]))
    for y in (torch.tensor([2, 3, -1, 0, -2, 5]), torch.tensor([2.0, 3.0, 4.0, 2.0, -2.0, 3.0], dtype=torch.float64),
              torch.tensor(3.0)):
        out = check_rule(torch.pow, [x, y], _tensor_power_exact)
        assert bool(torch.isfinite(out.rad[:2]).all()), out
    # a negative base ball with a non-integer (or non-point) exponent leaves the domain
    with bg.record() as rec:
        out = torch.pow(x, bg.ball(torch.full((6,), 2.0), 1e-3))
    assert math.isinf(float(out.rad[0]))
    assert "domain" in rec.kinds()


# ----------------------------------------------------------------------------------------------------------------------
# Targeted behaviour


@pytest.mark.parametrize(
    "op, mid, rad",
    [
        (torch.log, 0.5, 1.0), (torch.log, 0.0, 0.0), (torch.log2, -1.0, 0.0), (torch.log10, 1e-3, 1e-3),
        (torch.log1p, -1.0, 0.0), (torch.log1p, -0.5, 0.75), (torch.sqrt, -1e-3, 1e-4), (torch.sqrt, 0.5, 0.75),
        (torch.rsqrt, 0.0, 0.0), (lambda t: t**2.5, -0.1, 0.05), (lambda t: t**-2, 0.1, 0.2),
        (lambda t: t**-0.5, 0.25, 0.5), (lambda t: torch.pow(-2.0, t), 1.5, 0.0), (lambda t: torch.pow(0.0, t), -1.0, 0.0),
        (lambda t: torch.pow(-2.0, t), 2.0, 1e-3),
    ],
)
def test_domain_events(op, mid, rad):
    x = bg.ball(torch.tensor([mid, 2.0]), torch.tensor([rad, 0.0]))
    with bg.record() as rec:
        out = op(x)
    assert math.isinf(float(out.rad[0])), out
    events = rec.of_kind("domain")
    assert events and sum(e.count for e in events) == 1, rec.summary()
    assert events[0].op.startswith("aten.")


def test_no_domain_event_inside_domain():
    x = bg.ball(torch.tensor([0.0, 1e-3, 4.0]), torch.tensor([0.0, 1e-3, 1.0]))
    with bg.record() as rec:
        out = torch.sqrt(x)  # sqrt is defined at 0: a ball touching 0 from above is fine
        torch.pow(x, 2.5)
        torch.pow(0.0, x + 1)
    assert not rec.of_kind("domain"), rec.summary()
    assert bool(torch.isfinite(out.rad).all())
    check_rule(torch.sqrt, [x], UNARY["sqrt"][1])


def test_overflow_gives_infinite_radius_not_error():
    x = bg.ball(torch.tensor([100.0, 1.0], dtype=torch.float32))
    with bg.record() as rec:
        out = torch.exp(x)
    assert math.isinf(float(out.mid[0])) and math.isinf(float(out.rad[0]))
    assert math.isfinite(float(out.rad[1]))
    assert "overflow" in rec.kinds()
    out = torch.pow(bg.ball(torch.tensor([1e30])), 3)
    assert math.isinf(float(out.rad[0]))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES + [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("beta, threshold", [(1, 20), (2, 5), (0.5, 3), (1, 0)])
def test_softplus_above_threshold_is_contained(beta, threshold, dtype):
    """PyTorch returns x where beta x > threshold; the true softplus is x + log1p(exp(-beta x))/beta > x."""
    mids = torch.tensor([threshold / beta + d for d in (1e-3, 0.5, 1.0, 4.0, 30.0)] + [threshold / beta - 0.25])
    x = bg.ball(mids.to(dtype))
    exact = _softplus_exact(beta)
    out = check_rule(lambda t: F.softplus(t, beta=beta, threshold=threshold), [x], exact)
    if dtype == torch.float64:
        gap = float(mpmath.log1p(mpmath.exp(-beta * mpmath.mpf(float(x.mid[0])))) / beta)
        assert float(out.rad[0]) >= gap > 0


@pytest.mark.parametrize("beta", [0, -1, math.inf, math.nan])
def test_softplus_rejects_bad_beta(beta):
    with pytest.raises(bg.UnsupportedOpError, match="beta"):
        F.softplus(bg.ball(torch.tensor([1.0])), beta=beta)


def test_non_finite_exponents_rejected():
    x = bg.ball(torch.tensor([2.0]))
    with pytest.raises(bg.UnsupportedOpError):
        torch.pow(x, math.inf)
    with pytest.raises(bg.UnsupportedOpError):
        torch.pow(math.inf, x)


def test_sin_cos_large_arguments_use_the_cap():
    x = bg.ball(torch.tensor([1e10, 2.0**31, 1e300, 3.0], dtype=torch.float64), torch.tensor([0.0, 0.0, 0.0, 10.0],
                                                                                                dtype=torch.float64))
    for op, f in ((torch.sin, mpmath.sin), (torch.cos, mpmath.cos)):
        out = check_rule(op, [x], lambda a: f(mp(a)))
        assert bool((out.rad <= 2.0 + 1e-12).all()), out


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_point_balls_are_tight(dtype):
    """Point balls: float64 radii are a few float64 ulps (the 2x table margin and one rounding); float32 radii are the
    float32 kernel's actual error plus float64-sized terms (a few float32 ulps at most)."""
    x = torch.tensor([0.3, 1.7, 2.5, 5.0], dtype=dtype)
    ulp = torch.finfo(dtype).eps
    ops = [torch.exp, torch.expm1, torch.log, torch.log1p, torch.log2, torch.log10, torch.tanh, torch.sigmoid,
           torch.sin, torch.cos, torch.atan, torch.erf, torch.erfc, torch.sqrt, torch.rsqrt, F.softplus,
           lambda t: t**2.5, lambda t: t**3, lambda t: 2.0**t, lambda t: torch.pow(t, t)]
    for op in ops:
        out = op(bg.ball(x))
        rel = out.rad.to(torch.float64) / out.mid.abs().to(torch.float64)
        limit = 12 * ulp if dtype == torch.float64 else 5 * ulp
        assert bool((rel <= limit).all()), (op, out, rel / ulp)


def test_float32_midpoints_not_trusted():
    """The radius covers the float32 kernel's error: it is at least the distance to the float64 value."""
    x = torch.linspace(-20, 20, 1001)
    for op in (torch.exp, torch.tanh, torch.sin, torch.erfc, torch.sigmoid):
        out = op(bg.ball(x))
        gap = (out.mid.to(torch.float64) - op(x.to(torch.float64))).abs()
        assert bool((out.rad.to(torch.float64) >= gap).all()), op


def test_radius_dtype_and_shapes():
    x = bg.ball(torch.rand(3, 4, dtype=torch.float16) + 0.5, 1e-3)
    for op in (torch.exp, torch.log, torch.sin, lambda t: t**3, lambda t: t**0.7, lambda t: 3.0**t):
        out = op(x)
        assert out.shape == (3, 4) and out.rad.dtype == torch.float32 and out.dtype == torch.float16
    empty = bg.ball(torch.zeros(0, 2))
    assert torch.exp(empty).shape == (0, 2)
    assert torch.pow(empty, 2.5).shape == (0, 2)


def test_nan_and_inf_inputs_give_infinite_radius():
    x = bg.ball(torch.tensor([math.nan, math.inf, -math.inf, 1.0]), torch.tensor([0.0, 0.0, 0.0, math.inf]))
    for op in (torch.exp, torch.tanh, torch.sigmoid, torch.sin, torch.atan, torch.erf, lambda t: t**0,
               lambda t: t**2, lambda t: 1.0**t, lambda t: torch.pow(t, 0.0 * t.mid)):
        out = op(x)
        assert bool(torch.isinf(out.rad).all()), (op, out)


def test_bounded_functions_of_huge_balls_stay_bounded():
    x = bg.ball(torch.tensor([0.0, 5.0], dtype=torch.float64), torch.tensor([1e300, 1e300], dtype=torch.float64))
    for op, bound in ((torch.tanh, 2.0), (torch.sigmoid, 1.0), (torch.erf, 2.0), (torch.sin, 2.0), (torch.atan, 4.0)):
        out = op(x)
        assert bool((out.rad <= bound + 1e-12).all()), (op, out)


def test_rules_registered():
    names = set(bg.ops.registry.supported_ops())
    for op in ("exp", "expm1", "log", "log1p", "log2", "log10", "tanh", "sigmoid", "sin", "cos", "atan", "erf",
               "erfc", "softplus", "sqrt", "rsqrt"):
        assert f"aten.{op}.default" in names
    assert "aten.square.default" in names
    for overload in ("Tensor_Scalar", "Scalar", "Tensor_Tensor"):
        assert f"aten.pow.{overload}" in names


@settings(max_examples=30)
@given(st.floats(-700, 700), st.sampled_from([0.0, 1e-12, 1e-3, 1.0]))
def test_exp_radius_covers_point_inflation(m, r):
    """exp of a float64 ball: the radius is at least what the exact end points demand, and not much more: the table
    margin (2 x 1 ulp, 4u|mid|), the outward rounding of the end points m +- r (an ulp of m, 2u|m|, times exp'), and
    the final roundings."""
    x = bg.ball(torch.tensor([m], dtype=torch.float64), torch.tensor([r], dtype=torch.float64))
    out = torch.exp(x)
    need = max(abs(mpmath.exp(mpmath.mpf(m) + r) - float(out.mid)), abs(mpmath.exp(mpmath.mpf(m) - r) - float(out.mid)))
    assert mpmath.mpf(float(out.rad)) >= need
    u = rounding.unit_roundoff(torch.float64)
    assert float(out.rad) <= float(need) * (1 + 1e-12) + (8 + 4 * abs(m)) * u * float(out.mid) * (1 + 2 * r)
