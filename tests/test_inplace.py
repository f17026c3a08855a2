"""In-place ops, lerp and _foreach_* ops: midpoints identical to PyTorch's in-place kernels, balls contain the
exact results."""

import math
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import ballgrad as bg
from ballgrad.testing import balls
from helpers import ALL_DTYPES, EXAMPLES, FLOAT_DTYPES, assert_same_bits, check_rule


@pytest.mark.parametrize("examples", EXAMPLES)
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("weight", [0.0, 0.1, 0.5, 0.9, 1.0, -0.25, 1.5])
def test_lerp_scalar(weight, dtype, examples):
    @settings(max_examples=examples)
    @given(balls(dtype, (4,)), balls(dtype, (4,)))
    def run(s, t):
        w = Fraction(weight)
        check_rule(lambda a, b: torch.lerp(a, b, weight), [s, t], lambda a, b: a + w * (b - a))

    run()


@pytest.mark.parametrize("examples", EXAMPLES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_lerp_tensor_weight(dtype, examples):
    @settings(max_examples=examples)
    @given(balls(dtype, (3,)), balls(dtype, (3,)), balls(dtype, (3,), max_magnitude=4.0))
    def run(s, t, w):
        check_rule(torch.lerp, [s, t, w], lambda a, b, c: a + c * (b - a), max_combos=8)

    run()


@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_inplace_matches_plain_and_contains_exact(dtype):
    """x.op_(...) on a ball: midpoint bit-identical to the plain in-place op, ball contains the exact result at the
    corners and centre of x's ball (exact rationals)."""
    torch.manual_seed(0)
    base = torch.randn(5).to(dtype)
    other = torch.randn(5).to(dtype)
    o = [Fraction(float(v)) for v in other]
    F = Fraction
    cases = [
        (lambda x: x.add_(other, alpha=0.3), lambda a, i: a + F(0.3) * o[i]),
        (lambda x: x.sub_(0.1), lambda a, i: a - F(0.1)),
        (lambda x: x.mul_(other), lambda a, i: a * o[i]),
        (lambda x: x.div_(3.0), lambda a, i: a / 3),
        (lambda x: x.neg_(), lambda a, i: -a),
        (lambda x: x.addcmul_(other, other, value=0.5), lambda a, i: a + F(0.5) * o[i] * o[i]),
        (lambda x: x.lerp_(other, 0.1), lambda a, i: a + F(0.1) * (o[i] - a)),
    ]
    for op, exact in cases:
        x = bg.ball(base.clone(), 1e-3)
        corners = [(F(float(m)) - F(float(r)), F(float(m)), F(float(m)) + F(float(r))) for m, r in zip(x.mid, x.rad)]
        plain = base.clone()
        assert op(x) is x
        op(plain)
        assert_same_bits(x.mid, plain)
        for k in range(3):
            assert bool(x.contains([exact(c[k], i) for i, c in enumerate(corners)]).all())


def test_inplace_with_type_promotion_covers_the_cast():
    """float32 ball += float64 tensor: PyTorch computes in float64 and rounds into float32."""
    x = bg.ball(torch.tensor([1.0, 2.0]), 0.0)
    y = torch.tensor([0.1, 1e-10], dtype=torch.float64)
    x.add_(y)
    assert_same_bits(x.mid, torch.tensor([1.0, 2.0]).add_(y))
    exact = [Fraction(1) + Fraction(0.1), Fraction(2) + Fraction(1e-10)]
    assert bool(x.contains(exact).all())


FOREACH_CASES = {
    "add_list": (lambda L, M: torch._foreach_add(L, M, alpha=0.5), lambda a, b: a + Fraction(0.5) * b),
    "mul_scalar": (lambda L, M: torch._foreach_mul(L, 0.1), lambda a, b: a * Fraction(0.1)),
    "div_scalarlist": (lambda L, M: torch._foreach_div(L, [2.0, 3.0, 5.0]), None),
    "addcmul": (lambda L, M: torch._foreach_addcmul(L, M, M, value=0.2), lambda a, b: a + Fraction(0.2) * b * b),
    "lerp": (lambda L, M: torch._foreach_lerp(L, M, 0.1), lambda a, b: a + Fraction(0.1) * (b - a)),
}


@pytest.mark.parametrize("name", sorted(FOREACH_CASES))
def test_foreach_matches_per_tensor(name):
    op, exact = FOREACH_CASES[name]
    torch.manual_seed(1)
    L = [bg.ball(torch.randn(3), 1e-4) for _ in range(3)]
    M = [bg.ball(torch.randn(3), 1e-5) for _ in range(3)]
    outs = op(L, M)
    plain = op([x.mid for x in L], [x.mid for x in M])
    for o, p in zip(outs, plain):
        assert isinstance(o, bg.BallTensor)
        assert_same_bits(o.mid, p)
    if exact is not None:
        for o, a, b in zip(outs, L, M):
            check_rule(lambda x, y: x, [o, o], lambda x, y: x)  # valid radius
            pts = [exact(Fraction(float(ai)), Fraction(float(bi))) for ai, bi in zip(a.mid, b.mid)]
            assert bool(o.contains(pts).all())


def test_foreach_inplace_returns_none_and_updates():
    L = [bg.ball(torch.ones(2), 0.0), bg.ball(torch.full((2,), 2.0), 0.0)]
    torch._foreach_add_(L, 0.1)
    assert bool(L[0].contains([Fraction(11, 10)] * 2).all()) and bool(L[1].contains([Fraction(21, 10)] * 2).all())


@pytest.mark.parametrize("examples", EXAMPLES)
@pytest.mark.parametrize("op", ["add_", "sub_"])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_scaled_add_in_place_fast_path(op, dtype, examples):
    """x.add_(y, alpha=a) (the optimizer step) updates the radius in place (``inplace._scaled_add_in_place``): the
    midpoint is PyTorch's, the ball contains x + a y (x - a y) for every point, and the radius equals the general
    path's (functional rule, then written back) up to the order of the same six rounded operations."""

    @settings(max_examples=examples, deadline=None)
    @given(balls(dtype, (5,), allow_inf_radius=False), balls(dtype, (5,), allow_inf_radius=False),
           st.sampled_from([-1e-3, 0.1, -3.0, 2.0 ** -30, 1e30, 0.0]))
    def run(x, y, alpha):
        plain = x.mid.clone()
        getattr(plain, op)(y.mid, alpha=alpha)
        general = getattr(torch, op.rstrip("_"))(x, y, alpha=alpha)
        fast = bg.ball(x.mid.clone(), x.rad.clone())
        storages = (fast.mid.data_ptr(), fast.rad.data_ptr())
        getattr(fast, op)(y, alpha=alpha)
        assert storages == (fast.mid.data_ptr(), fast.rad.data_ptr())
        assert_same_bits(fast.mid, plain)
        finite = torch.isfinite(general.rad) & torch.isfinite(fast.rad)
        assert bool((torch.isinf(fast.rad) == torch.isinf(general.rad)).all())
        assert bool((fast.rad[finite] <= general.rad[finite] * (1 + 2.0 ** -20) + 1e-300).all())
        sign = 1 if op == "add_" else -1
        for i in range(5):
            values = [float(t[i]) for t in (x.mid, x.rad, y.mid, y.rad, fast.rad)]
            if not all(map(math.isfinite, values)):
                continue
            xm, xr, ym, yr, r = map(Fraction, values)
            for sx, sy in ((-1, 1), (1, -1), (0, 0), (1, 1)):  # exact corner points of the two balls
                exact = xm + sx * xr + sign * Fraction(alpha) * (ym + sy * yr)
                assert abs(exact - Fraction(float(fast.mid[i]))) <= r

    run()


def test_scaled_add_in_place_aliasing_and_broadcasting_take_the_general_path():
    """x.add_(x, alpha=2), a broadcast operand and an expanded (stride-0) radius all go through the general rule."""
    x = bg.ball(torch.tensor([1.0, -2.0, 3.0]), 2.0 ** -20)
    x.add_(x, alpha=2.0)
    assert_same_bits(x.mid, torch.tensor([3.0, -6.0, 9.0]))
    assert bool((x.rad >= 3 * 2.0 ** -20).all())
    y = bg.ball(torch.tensor([1.0, 2.0, 3.0]), 2.0 ** -20)
    y.add_(bg.ball(torch.tensor(0.5), 2.0 ** -10), alpha=-2.0)
    assert_same_bits(y.mid, torch.tensor([0.0, 1.0, 2.0]))
    assert bool((y.rad >= 2.0 ** -9).all())
    z = bg.BallTensor(torch.tensor([1.0, 2.0]), torch.zeros(()).expand(2))
    z.add_(bg.ball(torch.tensor([1.0, 1.0]), 2.0 ** -12), alpha=0.5)
    assert_same_bits(z.mid, torch.tensor([1.5, 2.5]))
    assert bool((z.rad >= 2.0 ** -13).all())


@pytest.mark.parametrize("shape", [(5,), (3, 7), (4, 1, 3)])
def test_add_abs_in_blocks_gives_the_unblocked_bits(monkeypatch, shape):
    """``common.add_abs_`` (acc += alpha |x| through a reused scratch block, for large tensors) is the unblocked
    ``add_(abs(x), alpha=alpha)`` bit for bit, with blocks that do not divide the size and with inf, NaN, -0.0 and
    subnormals in x; non-contiguous operands take the unblocked kernel."""
    from ballgrad.ops import common

    monkeypatch.setattr(common, "ABS_BLOCK", 2)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(shape, generator=g) * 1e3
    x.view(-1)[:4] = torch.tensor([math.inf, math.nan, -0.0, -1e-40])[: x.numel()]
    acc = torch.rand(shape, generator=g)
    for alpha in (1.0, 2.0 ** -24, 0.1):
        want = acc.clone().add_(torch.abs(x), alpha=alpha)
        got = acc.clone()
        assert common.add_abs_(got, x, alpha) is got
        assert_same_bits(got, want)
    if len(shape) >= 2:
        xt = x.transpose(0, 1).contiguous().transpose(0, 1)
        assert_same_bits(common.add_abs_(acc.clone(), xt, 0.5), acc.clone().add_(torch.abs(x), alpha=0.5))


def test_scaled_add_in_place_in_blocks(monkeypatch):
    """The optimizer step's fast path with ``add_abs_`` in blocks: the same bits as with the whole tensor at once."""
    from ballgrad.ops import common

    g = torch.Generator().manual_seed(4)
    x = bg.ball(torch.randn(9, 5, generator=g), torch.rand(9, 5, generator=g) * 1e-6)
    y = bg.ball(torch.randn(9, 5, generator=g), torch.rand(9, 5, generator=g) * 1e-6)
    whole = bg.ball(x.mid.clone(), x.rad.clone())
    whole.add_(y, alpha=-1e-3)
    monkeypatch.setattr(common, "ABS_BLOCK", 4)
    blocked = bg.ball(x.mid.clone(), x.rad.clone())
    blocked.add_(y, alpha=-1e-3)
    assert_same_bits(blocked.mid, whole.mid)
    assert_same_bits(blocked.rad, whole.rad)
