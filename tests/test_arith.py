"""Arithmetic rules against exact rational arithmetic, float32 and float64 (and the reduced dtypes)."""

import math
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import ballgrad as bg
from ballgrad.testing import ball_pairs, balls
from helpers import ALL_DTYPES, EXAMPLES, FLOAT_DTYPES, assert_same_bits, check_rule


def _div(x, y):
    return None if y == 0 else x / y


BINARY = {
    "add": (torch.add, lambda x, y: x + y),
    "sub": (torch.sub, lambda x, y: x - y),
    "mul": (torch.mul, lambda x, y: x * y),
    "div": (torch.div, _div),
}


@pytest.mark.parametrize("examples", EXAMPLES)
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("name", sorted(BINARY))
def test_binary_ball_ball(name, dtype, examples):
    op, exact_fn = BINARY[name]

    @settings(max_examples=examples)
    @given(ball_pairs(dtype, (5,)))
    def run(pair):
        check_rule(op, pair, exact_fn)

    run()


@pytest.mark.parametrize("examples", EXAMPLES)
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("name", sorted(BINARY))
def test_binary_ball_scalar(name, dtype, examples):
    """Python scalars are exact doubles; the kernel's cast of them is part of the error."""
    op, exact_fn = BINARY[name]

    @settings(max_examples=examples)
    @given(balls(dtype, (4,)), st.sampled_from([0.1, -3, 2.5, 1e-30, 1e30, 0.0, 1 / 3, 7]))
    def run(x, s):
        check_rule(op, [x, s], lambda a, b: exact_fn(a, Fraction(b)))
        check_rule(op, [s, x] if name in ("mul", "add") else [x, s], lambda a, b: exact_fn(Fraction(a) if not isinstance(a, Fraction) else a, Fraction(b) if not isinstance(b, Fraction) else b))

    run()


@pytest.mark.parametrize("examples", EXAMPLES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("alpha", [1, 2, -0.5, 0.1, 3])
def test_add_sub_alpha(alpha, dtype, examples):
    @settings(max_examples=examples)
    @given(ball_pairs(dtype, (4,)))
    def run(pair):
        check_rule(lambda a, b: torch.add(a, b, alpha=alpha), pair, lambda x, y: x + Fraction(alpha) * y)
        check_rule(lambda a, b: torch.sub(a, b, alpha=alpha), pair, lambda x, y: x - Fraction(alpha) * y)
        check_rule(lambda a, b: torch.rsub(a, b, alpha=alpha), pair, lambda x, y: y - Fraction(alpha) * x)

    run()


@pytest.mark.parametrize("examples", EXAMPLES)
@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_unary_exact_ops(dtype, examples):
    @settings(max_examples=examples)
    @given(balls(dtype, (6,)))
    def run(x):
        check_rule(torch.neg, [x], lambda a: -a)
        check_rule(torch.abs, [x], lambda a: abs(a))
        check_rule(torch.reciprocal, [x], lambda a: None if a == 0 else 1 / a)

    run()


@pytest.mark.parametrize("examples", EXAMPLES)
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("value", [1, -0.5, 0.1, 3])
def test_addcmul_addcdiv(value, dtype, examples):
    @settings(max_examples=examples)
    @given(balls(dtype, (3,)), balls(dtype, (3,)), balls(dtype, (3,)))
    def run(s, t1, t2):
        v = Fraction(value)
        check_rule(lambda a, b, c: torch.addcmul(a, b, c, value=value), [s, t1, t2], lambda a, b, c: a + v * b * c,
                   max_combos=8)
        check_rule(lambda a, b, c: torch.addcdiv(a, b, c, value=value), [s, t1, t2],
                   lambda a, b, c: None if c == 0 else a + v * b / c, max_combos=8)

    run()


def test_broadcasting_and_plain_operands():
    x = bg.ball(torch.tensor([[1.0], [2.0]]), 1e-3)
    y = torch.tensor([0.1, 0.2, 0.3])
    out = check_rule(torch.mul, [x, y], lambda a, b: a * b)
    assert out.shape == (2, 3)
    out = check_rule(torch.add, [y, x], lambda a, b: a + b)
    assert out.shape == (2, 3)


def test_mixed_dtype_promotion():
    """A float32 ball with a float64 plain tensor computes in float64; a 0-dim float64 tensor is cast to float32."""
    x = bg.ball(torch.tensor([1.0, 3.0]), 1e-6)
    y64 = torch.tensor([0.1, 0.7], dtype=torch.float64)
    out = check_rule(torch.mul, [x, y64], lambda a, b: a * b)
    assert out.dtype == torch.float64
    s64 = torch.tensor(0.1, dtype=torch.float64)  # wrapped-number promotion: the result stays float32
    out = check_rule(torch.mul, [x, s64], lambda a, b: a * b)
    assert out.dtype == torch.float32


def test_division_by_ball_containing_zero_is_infinite_and_recorded():
    x = bg.ball(torch.tensor([1.0]))
    y = bg.ball(torch.tensor([0.5]), 1.0)
    with bg.record() as rec:
        out = x / y
    assert math.isinf(float(out.rad))
    assert [e.kind for e in rec.events] == ["domain"]
    assert rec.events[0].op == "aten.div.Tensor"


def test_overflow_gives_infinite_radius_not_error():
    x = bg.ball(torch.tensor([3e38], dtype=torch.float32))
    out = x * 10.0
    assert math.isinf(float(out.mid)) and math.isinf(float(out.rad))
    out = x + x
    assert math.isinf(float(out.rad))


def test_rounding_modes_are_exact_where_decided():
    """div with rounding_mode: the quotient's step is decided over the balls (else a hull); points give exact steps."""
    x = bg.ball(torch.tensor([7.0, -7.0, 6.0]))
    for mode in ("floor", "trunc"):
        out = torch.div(x, 2.0, rounding_mode=mode)
        assert_same_bits(out.mid, torch.div(x.mid, 2.0, rounding_mode=mode))
        assert bool((out.rad == 0).all())
    out = torch.div(bg.ball(torch.tensor([6.0]), 0.5), 2.0, rounding_mode="floor")  # [5.5, 6.5]/2 straddles 3
    assert bool(out.contains([Fraction(2), Fraction(3)]).all())
    out = torch.div(x, 2.0, rounding_mode=None)
    assert float(out.mid[0]) == 3.5
