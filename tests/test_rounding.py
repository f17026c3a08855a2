"""ballgrad.rounding: the one-pass upper bounds (``inflate``, ``inflate_to``) against exact rational arithmetic, on
adversarial non-negative inputs (zeros, subnormals of both dtypes, values near overflow)."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch

from ballgrad import rounding
from helpers import EXAMPLES, assert_same_bits
from hypothesis import given, settings
from hypothesis import strategies as st

NONNEG = st.one_of(
    st.sampled_from([0.0, 5e-324, 2.0 ** -1022, 1.4e-45, 1.2e-38, 1.0, 3.4e38, 1e300, 1.7e308]),
    st.floats(0.0, 1e300, allow_nan=False, allow_infinity=False),
    st.floats(0.0, 1e-300, allow_nan=False, allow_infinity=False),
    st.floats(1e-50, 1e-30, allow_nan=False, allow_infinity=False),
)


def _expression(a, b, c, d):
    """a * b + c * d + a, evaluated in float64 round-to-nearest: 5 rounded operations, products of two inputs."""
    return a * b + c * d + a


def _exact(a, b, c, d):
    fa, fb, fc, fd = (Fraction(float(t)) for t in (a, b, c, d))
    return fa * fb + fc * fd + fa


@pytest.mark.parametrize("examples", EXAMPLES)
def test_inflate_and_inflate_to_bound_the_exact_value(examples):
    @settings(max_examples=examples * 4, deadline=None)
    @given(st.lists(st.tuples(NONNEG, NONNEG, NONNEG, NONNEG), min_size=1, max_size=8),
           st.sampled_from([0.0, 1e-40, 3.0]))
    def run(rows, extra):
        a, b, c, d = (torch.tensor([r[i] for r in rows], dtype=torch.float64) for i in range(4))
        expr = _expression(a, b, c, d)
        wide = rounding.inflate(expr, 5, extra)
        narrow = rounding.inflate_to(expr, 5, torch.float32, extra)
        assert narrow.dtype == torch.float32
        assert torch.equal(rounding.inflate_to_(expr.clone(), 5, torch.float32, extra), narrow)
        for i, row in enumerate(rows):
            exact = _exact(*row) + Fraction(extra)
            for bound in (wide[i], narrow[i]):
                v = float(bound)
                assert v == math.inf or Fraction(v) >= exact, (row, extra, v)

    run()


def test_inflate_to_turns_nan_into_inf_and_keeps_zero_small():
    t = torch.tensor([math.nan, math.inf, 0.0, 1.0], dtype=torch.float64)
    out = rounding.inflate_to(t, 3, torch.float32)
    assert out[0] == math.inf and out[1] == math.inf
    assert 0 < float(out[2]) <= 2.0 ** -125  # only the absolute term: tiny, and a normal float32 at most
    assert 1.0 < float(out[3]) <= 1.0 + 2.0 ** -20  # a few float32 ulps above 1


def test_inflate_to_same_dtype_is_inflate():
    t = torch.tensor([0.5, 3.0], dtype=torch.float32)
    assert torch.equal(rounding.inflate_to(t, 4, torch.float32), rounding.inflate(t, 4))


@pytest.mark.parametrize("layout", ["contiguous", "transposed", "permuted", "mixed", "broadcast"])
def test_sum_to_bf16_normal_is_the_add_then_the_conversion_in_any_layout(layout):
    """``sum_to_bf16_normal`` adds dense operands of one layout in their memory order (the casting store is slow on
    strided memory) and everything else through float32: either way the bits are to_bf16_normal(x + alpha y), of
    x's shape, on adversarial non-negative values (zeros, float32 subnormals, values near realmin and overflow)."""
    g = torch.Generator().manual_seed(5)
    special = torch.tensor([0.0, 1.4e-45, 1e-40, 1.1754942e-38, 1.2e-38, 1.0, 3.0e38, 3.4e38])

    def values(*shape):
        v = torch.rand(*shape, generator=g) * 10.0 ** torch.randint(-40, 38, shape, generator=g)
        n = min(v.numel(), special.numel())
        v.view(-1)[:n] = special[:n]
        return v

    if layout == "contiguous":
        x, y = values(6, 7), values(6, 7)
    elif layout == "transposed":
        x, y = values(7, 6).t(), values(7, 6).t()
    elif layout == "permuted":
        x, y = values(4, 5, 3).permute(2, 0, 1), values(4, 5, 3).permute(2, 0, 1)
    elif layout == "mixed":
        x, y = values(6, 7), values(7, 6).t()
    else:
        x, y = values(6, 7), values(7)
    assert rounding.memory_order(x) is not None or layout == "broadcast"
    for alpha in (1.0, 2.0 ** -13, 3.0):
        got = rounding.sum_to_bf16_normal(x, y, alpha)
        want = rounding.to_bf16_normal(torch.add(x, y, alpha=alpha))
        assert got.dtype == torch.bfloat16 and got.shape == x.shape
        assert torch.equal(got, want), (layout, alpha)
        assert bool((got >= rounding.REALMIN_32).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "broadcast"])
def test_abs_sums_to_bf16_normal_in_blocks_is_the_unblocked_bits(monkeypatch, dtype, layout):
    """``abs_sums_to_bf16_normal`` (|m| in reused scratch blocks) and ``abs_to_bf16_normal`` (the abs on the bfloat16
    copy) give to_bf16_normal of the float32 expressions bit for bit, with blocks that do not divide the size, on
    signed zeros, subnormals, inf and NaN midpoints, and never write to m (a bfloat16 m included)."""
    monkeypatch.setattr(rounding, "BF16_BLOCK", 5)
    g = torch.Generator().manual_seed(9)
    m = (torch.randn(9, 7, generator=g) * 10.0 ** torch.randint(-30, 30, (9, 7), generator=g)).to(dtype)
    m.view(-1)[:6] = torch.tensor([0.0, -0.0, -1e-40, math.inf, -math.inf, math.nan]).to(dtype)
    r = torch.rand(9, 7, generator=g) * 1e-6
    if layout == "transposed":
        m, r = m.t().contiguous().t(), r.t().contiguous().t()
    elif layout == "broadcast":
        r = r[0]
    before = m.clone()
    alphas = (2.0 ** -12, 1.0)
    abs_m = torch.abs(m).to(torch.float32)
    got = rounding.abs_sums_to_bf16_normal(r, m, alphas)
    for a, z in zip(alphas, got):
        assert_same_bits(z, rounding.sum_to_bf16_normal(r, abs_m, a))
        assert_same_bits(z, rounding.to_bf16_normal(torch.add(r, abs_m, alpha=a)))
    assert_same_bits(rounding.abs_to_bf16_normal(m), rounding.to_bf16_normal(abs_m))
    assert_same_bits(m, before)
