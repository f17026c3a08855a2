"""Reduction rules (sum, mean, prod, amax/amin/max/min, var/std, var_mean/std_mean, vector norms) against exact
rational arithmetic (mpmath at 256 bits for the square roots of std and the 2-norm).

``check_reduction`` samples whole-tensor points of the input ball (all-lower, all-upper, midpoint, random corners,
a random interior point), evaluates the exact reduction per output element and checks containment; outputs whose
slice holds a non-finite input must have an infinite radius. Midpoints are compared bit for bit with the plain op.
"""

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
from ballgrad import rounding
from ballgrad.ops import reductions
from ballgrad.ops.registry import RULES
from ballgrad.tensor import BallTensor
from ballgrad.testing import balls, contains_exact
from helpers import ALL_DTYPES, EXAMPLES, FLOAT_DTYPES, assert_same_bits, assert_valid_radius

aten = torch.ops.aten
needs_sqrt = pytest.mark.skipif(aten.sqrt.default not in RULES, reason="std and the 2-norm need the sqrt rule "
                                "(ops/elementwise.py), which is not registered")
mpmath.mp.prec = 256


def _points(x: BallTensor, rng: random.Random, n_random: int):
    """Whole-tensor exact points (object arrays of Fractions) and the mask of non-finite elements."""
    m = x.mid.detach().to(torch.float64).reshape(-1).tolist()
    r = x.rad.detach().to(torch.float64).reshape(-1).tolist()
    finite = [math.isfinite(a) and math.isfinite(b) for a, b in zip(m, r)]
    fm = [Fraction(a) if ok else Fraction(0) for a, ok in zip(m, finite)]
    fr = [Fraction(b) if ok else Fraction(0) for b, ok in zip(r, finite)]
    shape = tuple(x.shape)

    def arr(values):
        return np.array(values + [None], dtype=object)[:-1].reshape(shape)

    pts = [arr([a - b for a, b in zip(fm, fr)]), arr([a + b for a, b in zip(fm, fr)]), arr(fm)]
    for _ in range(n_random):
        pts.append(arr([a + b * rng.choice((-1, 1)) for a, b in zip(fm, fr)]))
        pts.append(arr([a + b * Fraction(rng.randint(-2**20, 2**20), 2**20) for a, b in zip(fm, fr)]))
    return pts, torch.tensor([not f for f in finite], dtype=torch.float64).reshape(shape)


def check_reduction(op, x, exact_fn, dims, *, n_random=2, seed=0, index_out=False):
    """``op(x)`` on the ball and on the midpoint; ``exact_fn(points)`` gives the exact results (an array broadcastable
    to the output, entries Fraction / mpf / None for 'undefined'); ``dims`` are the reduced dims (None: all)."""
    out = op(x)
    ref = op(x.mid)
    if index_out:
        assert not isinstance(out[1], BallTensor)
        assert torch.equal(out[1], ref[1]), "indices differ from the plain op"
        out, ref = out[0], ref[0]
    assert isinstance(out, BallTensor), type(out)
    assert_same_bits(out.mid, ref)
    assert_valid_radius(out)
    rng = random.Random(seed)
    points, bad_in = _points(x, rng, n_random)
    if bad_in.dim() == 0 or dims is None:
        bad = torch.full(out.shape, bool(bad_in.any()))
    else:
        bad = (torch.sum(bad_in, dim=dims, keepdim=True) > 0).reshape(out.shape) if bad_in.numel() else \
            torch.zeros(out.shape, dtype=torch.bool)
    assert bool(torch.isinf(out.rad[bad]).all()), "an output over a non-finite input has a finite radius"
    mids = out.mid.detach().to(torch.float64).reshape(-1).tolist()
    rads = out.rad.detach().to(torch.float64).reshape(-1).tolist()
    bad_flat = bad.reshape(-1).tolist()
    for p, pt in enumerate(points):
        exact = np.asarray(exact_fn(pt), dtype=object)
        exact = np.broadcast_to(exact, tuple(out.shape)).reshape(-1) if out.numel() else exact.reshape(-1)
        for i, (m, r) in enumerate(zip(mids, rads)):
            if bad_flat[i] or math.isinf(r):
                continue
            value = exact[i]
            assert value is not None, f"element {i}: finite ball {m} ± {r} where the exact value is undefined"
            if not contains_exact(m, r, value):
                raise AssertionError(f"element {i}: exact {float(value)!r} not in {m!r} ± {r!r} (sample {p})")
    return out


def _axis(dims, ndim):
    if dims is None:
        return None
    return tuple(d % ndim for d in ([dims] if isinstance(dims, int) else dims)) if ndim else None


def _keep(res, dims, ndim, keepdim):
    """numpy object reductions drop the axes; ``keepdim`` puts them back."""
    res = np.asarray(res, dtype=object)
    if keepdim and ndim:
        axes = range(ndim) if dims is None else [d % ndim for d in ([dims] if isinstance(dims, int) else dims)]
        for d in sorted(axes):
            res = np.expand_dims(res, d)
    return res


def exact_sum(pt, dims, keepdim=False):
    return _keep(np.sum(pt, axis=_axis(dims, pt.ndim)) if pt.ndim else pt, dims, pt.ndim, keepdim)


def _count(pt, dims):
    if not pt.ndim:
        return 1
    return math.prod(pt.shape[d] for d in (_axis(dims, pt.ndim) or range(pt.ndim)))


def exact_mean(pt, dims, keepdim=False):
    n = _count(pt, dims)
    s = exact_sum(pt, dims, keepdim)
    if n == 0:
        return np.full(s.shape, None, dtype=object)
    return np.vectorize(lambda v: v / n, otypes=[object])(s) if s.ndim else s / n


def exact_prod(pt, dims, keepdim=False):
    return _keep(np.prod(pt, axis=_axis(dims, pt.ndim)) if pt.ndim else pt, dims, pt.ndim, keepdim)


def exact_var(pt, dims, correction=1, keepdim=False):
    n = _count(pt, dims)
    dof = Fraction(n) - Fraction(correction)
    axis = _axis(dims, pt.ndim)
    if dof <= 0 or n == 0:
        shape = np.asarray(exact_sum(pt, dims, keepdim)).shape
        return np.full(shape, None, dtype=object)
    mean = np.sum(pt, axis=axis, keepdims=True) / n if pt.ndim else pt
    dev = (pt - mean) ** 2
    return _keep(np.sum(dev, axis=axis) / dof if pt.ndim else dev / dof, dims, pt.ndim, keepdim)


def _sqrt(v):
    if v is None:
        return None
    return mpmath.sqrt(mpmath.mpf(v.numerator) / v.denominator)


def exact_std(pt, dims, correction=1, keepdim=False):
    return np.vectorize(_sqrt, otypes=[object])(exact_var(pt, dims, correction, keepdim))


SHAPES_DIMS = [((5,), None), ((5,), 0), ((3, 4), None), ((3, 4), 1), ((3, 4), 0), ((2, 3, 4), (0, 2)),
               ((2, 3, 4), -1), ((), None), ((3, 0), 1), ((3, 0), 0)]


def _sum_op(dims, keepdim, dtype=None):
    if dims is None and not keepdim:
        return lambda t: torch.sum(t, dtype=dtype)
    return lambda t: torch.sum(t, dim=dims if dims is not None else list(range(t.dim())), keepdim=keepdim,
                               dtype=dtype)


def _mean_op(dims, keepdim, dtype=None):
    if dims is None and not keepdim:
        return lambda t: torch.mean(t, dtype=dtype)
    return lambda t: torch.mean(t, dim=dims if dims is not None else list(range(t.dim())), keepdim=keepdim,
                                dtype=dtype)


# ----------------------------------------------------------------------------------------------------------------------
# sum and mean


@pytest.mark.parametrize("examples", EXAMPLES)
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("shape_dims", SHAPES_DIMS, ids=str)
@pytest.mark.parametrize("path", ["fused", "reference"])
def test_sum_mean(shape_dims, dtype, examples, path, monkeypatch):
    """Containment on adversarial balls, through the fused sum kernel (``reductions._sum_fused``: float32/float64 over
    adjacent dims) and through the torch formulas."""
    shape, dims = shape_dims
    if 0 in shape and dims is None:
        pytest.skip("covered by the dim cases")
    if path == "reference":
        monkeypatch.setattr(reductions, "_sum_fused", lambda *args, **kwargs: None)

    @settings(max_examples=max(3, examples // 5))
    @given(balls(dtype, shape), st.booleans())
    def run(x, keepdim):
        check_reduction(_sum_op(dims, keepdim), x, lambda p: exact_sum(p, dims, keepdim), dims)
        check_reduction(_mean_op(dims, keepdim), x, lambda p: exact_mean(p, dims, keepdim), dims)

    run()


@pytest.mark.parametrize("src,dst", [(torch.float64, torch.float32), (torch.float32, torch.float64),
                                     (torch.bfloat16, torch.float32), (torch.float16, torch.float64),
                                     (torch.float32, torch.bfloat16)])
def test_sum_mean_dtype_argument(src, dst):
    """dtype= converts the input first (the cast error is in the radius) or accumulates wider: both are covered."""
    gen = torch.Generator().manual_seed(0)
    mid = (torch.randn(4, 7, generator=gen, dtype=torch.float64) * torch.exp2(
        torch.randint(-30, 30, (4, 7), generator=gen).double())).to(src)
    x = bg.ball(mid, mid.double().abs() * 2.0 ** -30)
    for keepdim in (False, True):
        out = check_reduction(_sum_op(1, keepdim, dst), x, lambda p: exact_sum(p, 1, keepdim), 1)
        assert out.dtype == dst
        out = check_reduction(_mean_op(1, keepdim, dst), x, lambda p: exact_mean(p, 1, keepdim), 1)
        assert out.dtype == dst
    check_reduction(lambda t: torch.sum(t, dtype=dst), x, lambda p: exact_sum(p, None), None)


def test_reduced_dtype_sum_rounds_once_more():
    """5000 bfloat16 ones sum to 4992, 2049 float16 ones to 2048 (float32 accumulation, one final rounding)."""
    for dtype, n in ((torch.bfloat16, 5000), (torch.float16, 2049), (torch.bfloat16, 3)):
        x = bg.ball(torch.ones(n, dtype=dtype))
        out = check_reduction(torch.sum, x, lambda p: exact_sum(p, None), None, n_random=0)
        assert bool(out.contains(n).all())
        check_reduction(torch.mean, x, lambda p: exact_mean(p, None), None, n_random=0)


def test_long_sum_uses_float64_radius_path():
    """n = 2^22 + 5 float32 terms: (n - 1) u >= 1/4 for float32 radius sums, which then run in float64."""
    n = 2 ** 22 + 5
    gen = torch.Generator().manual_seed(2)
    ints = torch.randint(-1000, 1001, (n,), generator=gen)
    x = bg.ball(ints.to(torch.float32) * 0.125 + 1 / 1024, 2.0 ** -12)
    for op, scale in ((torch.sum, 1), (torch.mean, n)):
        out = op(x)
        assert_same_bits(out.mid, op(x.mid))
        exact = Fraction(int(ints.sum()), 8) + Fraction(n, 1024)
        for value in (exact, exact + Fraction(n, 2 ** 12), exact - Fraction(n, 2 ** 12)):
            assert contains_exact(float(out.mid), float(out.rad), value / scale)


def test_sum_adversarial_cancellation_and_overflow():
    big = float(torch.finfo(torch.float32).max)
    x = bg.ball(torch.tensor([big, big, -big, 1.0]))
    out = check_reduction(torch.sum, x, lambda p: exact_sum(p, None), None)
    assert math.isinf(float(out.rad))  # big + big overflows in one order, sum |m| does in every order
    x = bg.ball(torch.tensor([1.0, 2.0 ** -24, 2.0 ** -24, -1.0] * 8), 0.0)
    out = check_reduction(torch.sum, x, lambda p: exact_sum(p, None), None)
    gamma_31 = 31 * 2.0 ** -24 / (1 - 31 * 2.0 ** -24)
    assert float(out.rad) <= 1.001 * gamma_31 * (16 + 16 * 2.0 ** -24)  # gamma_(n-1) sum|x|, nothing more
    x = bg.ball(torch.tensor([3 * rounding.eta(torch.float32)] * 5))  # subnormal sums are exact
    out = check_reduction(torch.sum, x, lambda p: exact_sum(p, None), None)
    assert float(out.rad) <= 2 * float(torch.finfo(torch.float32).smallest_normal)  # only the absolute allowance


def test_sum_of_undecided_bool_ball_is_refused():
    """Counting undecided comparison results has no decided value: a clear ballgrad error, not a number."""
    x = bg.ball(torch.tensor([1.0, 2.0]), 0.5)
    with pytest.raises(bg.UndecidedComparisonError):
        torch.sum(x > 1.2)


# ----------------------------------------------------------------------------------------------------------------------
# prod


@pytest.mark.parametrize("examples", EXAMPLES)
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("shape_dims", [((5,), None), ((3, 4), 1), ((3, 4), 0), ((), None), ((3, 0), 1),
                                        ((2, 3, 2), 1)], ids=str)
def test_prod(shape_dims, dtype, examples):
    shape, dims = shape_dims

    @settings(max_examples=max(3, examples // 5))
    @given(balls(dtype, shape, max_magnitude=1e3 if dtype != torch.float16 else 8.0), st.booleans())
    def run(x, keepdim):
        if dims is None:
            op = torch.prod
            check_reduction(op, x, lambda p: exact_prod(p, None), None)
        else:
            check_reduction(lambda t: torch.prod(t, dims, keepdim=keepdim), x,
                            lambda p: exact_prod(p, dims, keepdim), dims)

    run()


def test_prod_underflow_overflow_dtype():
    eta = rounding.eta(torch.float64)
    x = bg.ball(torch.tensor([3 * eta, 0.5, 0.75, 2.0 ** 1000, 2.0 ** 70], dtype=torch.float64))
    check_reduction(torch.prod, x, lambda p: exact_prod(p, None), None)
    x = bg.ball(torch.tensor([1e30, 1e30, 1e-30]), 1e20)
    out = check_reduction(torch.prod, x, lambda p: exact_prod(p, None), None)
    assert math.isinf(float(out.rad))
    x = bg.ball(torch.tensor([[1.5, -2.0, 0.1], [3.0, 0.25, 7.0]]), 1e-3)
    out = check_reduction(lambda t: torch.prod(t, 1, dtype=torch.float64), x, lambda p: exact_prod(p, 1), 1)
    assert out.dtype == torch.float64


# ----------------------------------------------------------------------------------------------------------------------
# max / min


@pytest.mark.parametrize("examples", EXAMPLES)
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("shape_dims", [((5,), None), ((3, 4), 1), ((3, 4), 0), ((2, 3, 4), (0, 2)), ((), None)],
                         ids=str)
def test_max_min(shape_dims, dtype, examples):
    shape, dims = shape_dims

    @settings(max_examples=max(3, examples // 5))
    @given(balls(dtype, shape), st.booleans())
    def run(x, keepdim):
        for fn, npfn in ((torch.amax, np.max), (torch.amin, np.min)):
            d = list(range(x.dim())) if dims is None else dims
            check_reduction(lambda t: fn(t, d, keepdim), x,
                            lambda p: _keep(npfn(p, axis=_axis(dims, p.ndim)) if p.ndim else p, dims, p.ndim, keepdim),
                            dims)
        if dims is None:
            check_reduction(torch.max, x, lambda p: np.max(p) if p.ndim else p, None)
            check_reduction(torch.min, x, lambda p: np.min(p) if p.ndim else p, None)
        if isinstance(dims, int):
            for fn, npfn in ((torch.max, np.max), (torch.min, np.min)):
                check_reduction(lambda t: fn(t, dims, keepdim), x,
                                lambda p: _keep(npfn(p, axis=dims), dims, p.ndim, keepdim), dims, index_out=True)

    run()


def test_max_radius_is_tight_when_winner_is_clear():
    x = bg.ball(torch.tensor([10.0, 0.0, 1.0]), torch.tensor([0.1, 5.0, 0.5]))
    out = torch.amax(x, 0)
    assert abs(float(out.rad) - 0.1) < 1e-6  # not max r = 5
    out = torch.amin(x, 0)
    assert abs(float(out.rad) - 5.0) < 1e-5


def test_max_dim_kink_events():
    x = bg.ball(torch.tensor([[1.0, 1.0005, 0.2], [3.0, 1.0, 2.0], [0.0, 0.0, -1.0]]), 1e-3)
    with bg.record() as rec:
        values, indices = torch.max(x, 1)
    kinks = rec.of_kind("kink")
    assert len(kinks) == 1 and kinks[0].count == 2 and kinks[0].op == "aten.max.dim"
    assert torch.equal(indices, torch.max(x.mid, 1).indices)
    with bg.record() as rec:
        torch.min(x, 0)  # every column's minimum is decided
    assert rec.of_kind("kink") == []
    with bg.record() as rec:
        torch.min(bg.ball(torch.tensor([[0.0, 5.0], [0.0005, 1.0]]), 1e-3), 0)
    assert [e.count for e in rec.of_kind("kink")] == [1]
    with bg.record() as rec:
        torch.max(bg.ball(torch.tensor([[1.0, 2.0]]), 0.1), 1)
    assert rec.of_kind("kink") == []


# ----------------------------------------------------------------------------------------------------------------------
# var / std


VAR_CASES = [((6,), None, 1), ((6,), None, 0), ((3, 4), 1, 1), ((3, 4), 0, 2), ((2, 3, 4), (0, 2), 1),
             ((1,), None, 1), ((3, 2), 1, 0.5), ((3, 2), 1, 3)]


@pytest.mark.filterwarnings("ignore:.*degrees of freedom:UserWarning")
@pytest.mark.parametrize("examples", EXAMPLES)
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("case", VAR_CASES, ids=str)
def test_var(case, dtype, examples):
    shape, dims, correction = case

    @settings(max_examples=max(3, examples // 5))
    @given(balls(dtype, shape, max_magnitude=1e6 if dtype != torch.float16 else 100.0), st.booleans())
    def run(x, keepdim):
        check_reduction(lambda t: torch.var(t, dim=dims, correction=correction, keepdim=keepdim), x,
                        lambda p: exact_var(p, dims, correction, keepdim), dims)

    run()


@needs_sqrt
@pytest.mark.parametrize("examples", EXAMPLES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES + [torch.bfloat16])
@pytest.mark.parametrize("case", VAR_CASES[:5], ids=str)
def test_std(case, dtype, examples):
    shape, dims, correction = case

    @settings(max_examples=max(3, examples // 8))
    @given(balls(dtype, shape, max_magnitude=1e6), st.booleans())
    def run(x, keepdim):
        check_reduction(lambda t: torch.std(t, dim=dims, correction=correction, keepdim=keepdim), x,
                        lambda p: exact_std(p, dims, correction, keepdim), dims, n_random=1)

    run()


def test_var_tightness_no_dependency_loss():
    """var of m ± r: the radius is about (2 sum|d_i| r_i + sum r_i^2)/(n-1), not the naive (x - mean)^2 blow-up."""
    mid = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    x = bg.ball(mid, 1e-6)
    out = torch.var(x)
    expected = (2 * (1.5 + 0.5 + 0.5 + 1.5) * 1e-6 + 4e-12) / 3
    assert expected <= float(out.rad) <= expected * 1.001


def test_var_mean_std_mean():
    gen = torch.Generator().manual_seed(4)
    mid = torch.randn(3, 5, generator=gen)
    x = bg.ball(mid, mid.abs() * 2.0 ** -12)
    for keepdim in (False, True):
        v, m = torch.var_mean(x, 1, keepdim=keepdim)
        rv, rm = torch.var_mean(mid, 1, keepdim=keepdim)
        assert_same_bits(v.mid, rv)
        assert_same_bits(m.mid, rm)
        check_reduction(lambda t: torch.var_mean(t, 1, keepdim=keepdim)[0], x,
                        lambda p: exact_var(p, 1, 1, keepdim), 1)
        check_reduction(lambda t: torch.var_mean(t, 1, keepdim=keepdim)[1], x,
                        lambda p: exact_mean(p, 1, keepdim), 1)
        if aten.sqrt.default in RULES:
            check_reduction(lambda t: torch.std_mean(t, 1, keepdim=keepdim)[0], x,
                            lambda p: exact_std(p, 1, 1, keepdim), 1)


# ----------------------------------------------------------------------------------------------------------------------
# norms


def _exact_norm(pt, ord, dims, keepdim):
    axis = _axis(dims, pt.ndim)
    absolute = np.asarray(np.vectorize(abs, otypes=[object])(pt), dtype=object)
    if ord == 1:
        return exact_sum(absolute, dims, keepdim)
    if ord == math.inf:
        return _keep(np.max(absolute, axis=axis) if pt.ndim else absolute, dims, pt.ndim, keepdim)
    if ord == -math.inf:
        return _keep(np.min(absolute, axis=axis) if pt.ndim else absolute, dims, pt.ndim, keepdim)
    squares = exact_sum(np.asarray(pt * pt, dtype=object), dims, keepdim)
    return np.vectorize(_sqrt, otypes=[object])(squares)


NORM_CASES = [((5,), None), ((3, 4), 1), ((3, 4), (0, 1)), ((2, 3, 2), 0), ((), None)]


@pytest.mark.parametrize("examples", EXAMPLES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES + [torch.float16])
@pytest.mark.parametrize("ord", [1, 2, math.inf, -math.inf], ids=str)
@pytest.mark.parametrize("case", NORM_CASES, ids=str)
def test_vector_norm(case, ord, dtype, examples):
    if ord == 2 and aten.sqrt.default not in RULES:
        pytest.skip("the 2-norm needs the sqrt rule (ops/elementwise.py), which is not registered")
    shape, dims = case

    @settings(max_examples=max(3, examples // 8))
    @given(balls(dtype, shape, max_magnitude=1e6 if dtype != torch.float16 else 100.0), st.booleans())
    def run(x, keepdim):
        check_reduction(lambda t: torch.linalg.vector_norm(t, ord, dim=dims, keepdim=keepdim), x,
                        lambda p: _exact_norm(p, ord, dims, keepdim), dims, n_random=1)

    run()


def test_norm_entry_points_and_dtype():
    x = bg.ball(torch.tensor([[3.0, -4.0], [1.0, 0.5]]), 1e-4)
    check_reduction(lambda t: torch.norm(t, 1), x, lambda p: _exact_norm(p, 1, None, False), None)
    check_reduction(lambda t: torch.norm(t, float("inf"), dim=1), x, lambda p: _exact_norm(p, math.inf, 1, False), 1)
    out = check_reduction(lambda t: torch.linalg.vector_norm(t, 1, dtype=torch.float64), x,
                          lambda p: _exact_norm(p, 1, None, False), None)
    assert out.dtype == torch.float64
    if aten.sqrt.default in RULES:
        check_reduction(torch.norm, x, lambda p: _exact_norm(p, 2, None, False), None)
        check_reduction(lambda t: torch.linalg.norm(t, dim=0), x, lambda p: _exact_norm(p, 2, 0, False), 0)
        out = torch.linalg.vector_norm(bg.ball(torch.zeros(3)))  # sqrt at 0: exact
        assert float(out.mid) == 0 and float(out.rad) < 1e-30
    # other orders go through the audited p-norm decomposition (ops/decompositions.py)
    out = torch.linalg.vector_norm(x, 3)
    mids = [Fraction(v) for v in x.mid.reshape(-1).tolist()]
    exact3 = mpmath.root(mpmath.fsum(abs(mpmath.mpf(v.numerator) / v.denominator) ** 3 for v in mids), 3)
    assert bool(out.contains(exact3))
