"""Non-smooth rules (ops/nonsmooth.py): comparisons and bool balls, logical ops, any/all, where, masked_fill, clamp,
maximum/minimum/fmax/fmin, sign, isnan/isinf.

Numeric results are checked with ``check_numeric`` (``helpers.check_rule`` extended to non-finite inputs:
midpoint identity and exact containment). Bool results are
checked with ``check_bool_rule``: the midpoint equals PyTorch's decision, and for points sampled in every input ball
(end points, midpoint, random interior points) each element marked decided has the same exact real decision
(Fractions) as its midpoint. Logical ops and any/all are checked against brute-force three-valued logic.
"""

import itertools
import math
import operator
import random
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import ballgrad as bg
from ballgrad.tensor import BallTensor
from ballgrad.testing import ball_pairs, balls, contains_exact
from helpers import EXAMPLES, FLOAT_DTYPES, _points, assert_same_bits, assert_valid_radius, plain

DTYPES = FLOAT_DTYPES + [torch.float16]
SCALARS = [0, -0.0, 0.1, -0.5, 1 / 3, 1e-30, 1e30, 3, -7.25, 16777217, 2.0**-140, 65504.0, 70000]


# ----------------------------------------------------------------------------------------------------------------------
# Checkers


def check_bool_rule(op, args, exact_decision, *, n_random=2, seed=0, max_combos=12):
    """Midpoint identity; decided elements agree with the exact decision at sampled points; NaN/inf -> undecided."""
    out = op(*args)
    ref = op(*[plain(a) for a in args])
    assert isinstance(out, BallTensor) and out.dtype == torch.bool
    assert torch.equal(out.mid, ref)
    assert out.rad.dtype == torch.bool and out.rad.shape == out.shape
    rng = random.Random(seed)
    per_arg = [_points(a, out.shape, rng, n_random) for a in args]
    mids = out.mid.reshape(-1).tolist()
    undecided = out.rad.reshape(-1).tolist()
    for i, (m, und) in enumerate(zip(mids, undecided)):
        if und:
            continue
        options = []
        for a, pts in zip(args, per_arg):
            if pts is None:
                options.append([a])
            else:
                assert pts[i] is not None, f"element {i}: decided ({m}) although an input is NaN/inf or unbounded"
                options.append(pts[i])
            if isinstance(a, float) and math.isnan(a):
                raise AssertionError(f"element {i}: decided ({m}) against a NaN scalar")
        combos = list(itertools.product(*options))
        if len(combos) > max_combos:
            combos = combos[:4] + rng.sample(combos[4:], max_combos - 4)
        for pt in combos:
            assert exact_decision(*pt) == m, f"{op}: element {i} decided {m}, but exact decision at {pt} differs"
    return out


_WIDE = [Fraction(-(10**400)), Fraction(-1), Fraction(0), Fraction(1), Fraction(10**400)]


def _points_all(x, shape, rng, n_random):
    """``helpers._points``, extended to non-finite elements: a plain NaN is passed as math.nan and a plain +-inf as
    itself (exact extended values), and a ball that knows nothing (NaN/inf midpoint or infinite radius) denotes every
    real, represented by reals far beyond every float and a few ordinary ones."""
    base = _points(x, shape, rng, n_random)
    if base is None:
        return None
    m = plain(x).detach().to(torch.float64).expand(shape).reshape(-1).tolist()
    r = (x.rad.to(torch.float64) if isinstance(x, BallTensor) else torch.zeros(())).expand(shape).reshape(-1).tolist()
    out = []
    for pts, mi, ri in zip(base, m, r):
        if pts is not None:
            out.append(pts)
        elif ri == 0 and not math.isfinite(mi):
            out.append([mi])
        else:
            out.append(_WIDE)
    return out


def check_numeric(op, args, exact_fn, *, n_random=2, seed=0, max_combos=12):
    """``helpers.check_rule`` that also checks elements with non-finite inputs instead of requiring an infinite
    radius there: a rule may return a finite radius for them (clamp and sign of an unknown ball are bounded), and then
    the value at far-out points must be contained. ``exact_fn`` returns None (or gets NaN) where undefined."""
    out = op(*args)
    ref = op(*[plain(a) for a in args])
    assert isinstance(out, BallTensor)
    assert_same_bits(out.mid, ref)
    assert_valid_radius(out)
    rng = random.Random(seed)
    per_arg = [_points_all(a, out.shape, rng, n_random) for a in args]
    mids = out.mid.detach().to(torch.float64).reshape(-1).tolist()
    rads = out.rad.detach().to(torch.float64).reshape(-1).tolist()
    for i, (m, r) in enumerate(zip(mids, rads)):
        if math.isinf(r):
            continue
        options = [[a] if pts is None else pts[i] for a, pts in zip(args, per_arg)]
        combos = list(itertools.product(*options))
        if len(combos) > max_combos:
            combos = combos[:4] + rng.sample(combos[4:], max_combos - 4)
        for pt in combos:
            y = exact_fn(*pt)
            assert y is not None and not (isinstance(y, float) and math.isnan(y)), (
                f"element {i}: finite radius {r} but the function is undefined at {pt}")
            assert contains_exact(m, r, y), f"{op}: element {i}: exact value {float(y)} at {pt} not in {m!r} ± {r!r}"
    return out


def check_select(cond, on_true, on_false, op=torch.where, *, n_random=2, seed=0):
    """``op(cond, on_true, on_false)`` selects per element; with an undecided condition the exact value may come from
    either branch. Checks midpoint identity and that every candidate exact value is contained."""
    out = op(cond, on_true, on_false)
    ref = op(plain(cond), plain(on_true), plain(on_false))
    assert isinstance(out, BallTensor)
    assert_same_bits(out.mid, ref)
    assert_valid_radius(out)
    rng = random.Random(seed)
    shape = out.shape
    sel = plain(cond).expand(shape).reshape(-1).tolist()
    und = (cond.rad if isinstance(cond, BallTensor) else torch.zeros((), dtype=torch.bool)).expand(shape)
    und = und.reshape(-1).tolist()
    pts_t, pts_f = _points(on_true, shape, rng, n_random), _points(on_false, shape, rng, n_random)
    mids, rads = out.mid.to(torch.float64).reshape(-1).tolist(), out.rad.to(torch.float64).reshape(-1).tolist()

    def candidates(x, pts, i):
        if pts is None:
            return [Fraction(x)]
        return pts[i]

    for i, (m, r) in enumerate(zip(mids, rads)):
        if math.isinf(r):
            continue
        chosen = (on_true, pts_t) if sel[i] else (on_false, pts_f)
        branches = [(on_true, pts_t), (on_false, pts_f)] if und[i] else [chosen]
        for x, pts in branches:
            vals = candidates(x, pts, i)
            assert vals is not None, f"element {i}: finite radius {r} although a possible branch is NaN/inf"
            for v in vals:
                assert contains_exact(m, r, v), f"element {i}: {float(v)} not in {m} ± {r} (undecided={und[i]})"
    return out


def bool_ball(mid, undecided):
    return BallTensor(torch.as_tensor(mid, dtype=torch.bool), torch.as_tensor(undecided, dtype=torch.bool))


def values_of(b, i):
    """The possible truth values of element i of a bool ball / plain bool tensor / Python bool."""
    if isinstance(b, BallTensor):
        return {False, True} if bool(b.rad.reshape(-1)[i]) else {bool(b.mid.reshape(-1)[i])}
    if isinstance(b, torch.Tensor):
        return {bool(b.reshape(-1)[i])}
    return {bool(b)}


def assert_kleene(out, expected_sets):
    """Decided exactly where the set of possible results is a singleton (and then equal to the midpoint)."""
    for i, vals in enumerate(expected_sets):
        m, und = bool(out.mid.reshape(-1)[i]), bool(out.rad.reshape(-1)[i])
        if len(vals) == 1:
            assert not und and vals == {m}, (i, vals, m, und)
        else:
            assert und, (i, vals, m)


# ----------------------------------------------------------------------------------------------------------------------
# Comparisons

CMP = {"eq": operator.eq, "ne": operator.ne, "lt": operator.lt, "le": operator.le, "gt": operator.gt,
       "ge": operator.ge}
TORCH_CMP = {"eq": torch.eq, "ne": torch.ne, "lt": torch.lt, "le": torch.le, "gt": torch.gt, "ge": torch.ge}


@pytest.mark.parametrize("examples", EXAMPLES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_comparisons_ball_ball(dtype, examples):
    @settings(max_examples=examples)
    @given(ball_pairs(dtype, (6,)), st.booleans())
    def run(pair, same_mid):
        a, b = pair
        if same_mid:  # ties and overlapping balls
            b = bg.ball(a.mid.clone(), b.rad.clone())
        for name in CMP:
            check_bool_rule(TORCH_CMP[name], [a, b], CMP[name])

    run()


@pytest.mark.parametrize("examples", EXAMPLES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_comparisons_ball_scalar(dtype, examples):
    """Python scalars are exact doubles; the kernel casts them, so the midpoint's decision may differ from the exact
    one."""

    @settings(max_examples=examples)
    @given(balls(dtype, (5,)), st.sampled_from(SCALARS + [math.inf, -math.inf, math.nan]))
    def run(x, s):
        for name in CMP:
            check_bool_rule(lambda a, b: TORCH_CMP[name](a, b), [x, s], CMP[name])
        # the reflected form (s < x is x > s) and point balls at the cast of the scalar
        check_bool_rule(lambda a, b: b < a, [x, s], lambda a, b: b < a)
        if math.isfinite(s):
            p = bg.ball(torch.full((2,), float(torch.tensor(float(s), dtype=torch.float64).to(dtype)), dtype=dtype))
            for name in CMP:
                check_bool_rule(lambda a, b: TORCH_CMP[name](a, b), [p, s], CMP[name])

    run()


@pytest.mark.parametrize("examples", EXAMPLES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_comparisons_ball_plain_tensor(dtype, examples):
    @settings(max_examples=examples)
    @given(ball_pairs(dtype, (5,), allow_nonfinite=False))
    def run(pair):
        a, b = pair
        for name in CMP:
            check_bool_rule(TORCH_CMP[name], [a, b.mid], CMP[name])
            check_bool_rule(TORCH_CMP[name], [b.mid, a], CMP[name])
            check_bool_rule(TORCH_CMP[name], [a, a.mid], CMP[name])  # the midpoints themselves: ties

    run()


def test_point_balls_compare_exactly():
    """Exact points give fully decided answers, equal to PyTorch's on plain tensors (no spurious undecided)."""
    for dtype in DTYPES:
        a = torch.tensor([0.0, -0.0, 1.0, 2.0, -3.5, 1e-3, float(torch.finfo(dtype).tiny)], dtype=dtype)
        b = torch.tensor([-0.0, 0.0, 1.0, 1.0, -3.5, 2e-3, 0.0], dtype=dtype)
        for name, f in TORCH_CMP.items():
            out = f(bg.ball(a), bg.ball(b))
            assert torch.equal(out.mid, f(a, b)) and not bool(out.rad.any()), (name, dtype)
            out = f(bg.ball(a), b)
            assert not bool(out.rad.any())


def test_scalar_cast_is_not_trusted():
    """float32(0.1) == 0.1 is True for PyTorch but False exactly: undecided. Integers beyond the dtype likewise."""
    p = bg.ball(torch.tensor([0.1, 0.5]))
    out = p == 0.1
    assert out.mid.tolist() == [True, False] and out.rad.tolist() == [True, False]
    assert (p != 0.1).rad.tolist() == [True, False]
    big = bg.ball(torch.tensor([16777216.0]))  # 2^24; the kernel casts 16777217 to 2^24
    out = big < 16777217
    assert out.mid.tolist() == [False] and out.rad.tolist() == [True]
    x64 = bg.ball(torch.tensor([2.0**53], dtype=torch.float64))
    out = x64 == torch.tensor([2**53 + 1])  # int64 tensor cast to float64 by the kernel
    assert out.mid.tolist() == [True] and out.rad.tolist() == [True]
    out = x64 == torch.tensor([2**53])
    assert out.mid.tolist() == [True] and out.rad.tolist() == [False]
    out = p > torch.tensor(0.1, dtype=torch.float64)  # 0-dim float64: the kernel compares in float32
    assert out.mid.tolist() == [False, True] and out.rad.tolist() == [True, False]


def test_nan_and_infinite_radius_are_undecided_but_plain_inf_decides():
    x = bg.ball(torch.tensor([1.0, float("nan"), 2.0, float("inf")]), torch.tensor([0.1, 0.0, math.inf, 0.0]))
    for name, f in TORCH_CMP.items():
        out = f(x, 0.0)
        assert out.rad.tolist()[1:] == [True, True, True], name
    assert (x < math.inf).rad.tolist() == [False, True, True, True]
    assert (x < torch.tensor(math.inf)).mid.tolist()[0] is True
    assert (x < math.nan).rad.all()


def test_bool_of_comparisons():
    x = bg.ball(torch.tensor(0.5), 0.1)
    assert bool(x > 0) is True and bool(x < 0) is False and bool(x != 0.2) is True and bool(x == 2) is False
    with pytest.raises(bg.UndecidedComparisonError):
        bool(x > 0.5)
    with pytest.raises(bg.UndecidedComparisonError):
        bool(x == 0.5)
    taken = "positive" if x > 0 else "other"
    assert taken == "positive"
    with pytest.raises(bg.UndecidedComparisonError):
        if x > 0.45:
            pass
    assert bool(bg.ball(torch.tensor(0.5)) == 0.5) is True  # exact point, exact scalar


def test_comparison_events():
    x = bg.ball(torch.tensor([0.5, 0.0, -1.0]), 0.1)
    with bg.record() as rec:
        out = x > 0
    assert out.rad.tolist() == [False, True, False]
    ev = rec.of_kind("undecided")
    assert len(ev) == 1 and ev[0].count == 1 and ev[0].op == "aten.gt.Scalar"
    with bg.record() as rec:
        x > 10
    assert rec.of_kind("undecided") == []


def test_bool_ball_comparisons():
    """eq/ne between bool balls: undecided elements can be either value."""
    combos = list(itertools.product([False, True], repeat=2))
    a = bool_ball([m for m, _ in combos for _ in combos], [u for _, u in combos for _ in combos])
    b = bool_ball([m for _ in combos for m, _ in combos], [u for _ in combos for _, u in combos])
    for f, op in [(torch.eq, operator.eq), (torch.ne, operator.ne)]:
        out = f(a, b)
        assert torch.equal(out.mid, f(a.mid, b.mid))
        assert_kleene(out, [{op(p, q) for p in values_of(a, i) for q in values_of(b, i)} for i in range(16)])
    out = a == True  # noqa: E712  (eq.Scalar with a Python bool)
    assert_kleene(out, [{p for p in values_of(a, i)} for i in range(16)])


# ----------------------------------------------------------------------------------------------------------------------
# Logical ops, any, all

LOGICAL = {
    "and": (torch.logical_and, operator.and_), "or": (torch.logical_or, operator.or_),
    "xor": (torch.logical_xor, operator.xor), "&": (operator.and_, operator.and_), "|": (operator.or_, operator.or_),
    "^": (operator.xor, operator.xor),
}


def _all_bool_pairs():
    states = list(itertools.product([False, True], repeat=2))  # (mid, undecided)
    pairs = list(itertools.product(states, repeat=2))
    a = bool_ball([p[0][0] for p in pairs], [p[0][1] for p in pairs])
    b = bool_ball([p[1][0] for p in pairs], [p[1][1] for p in pairs])
    return a, b


@pytest.mark.parametrize("name", sorted(LOGICAL))
def test_logical_binary_three_valued(name):
    f, op = LOGICAL[name]
    a, b = _all_bool_pairs()
    n = a.numel()
    for x, y in [(a, b), (a, b.mid), (a.mid, b)]:
        out = f(x, y)
        assert torch.equal(out.mid, f(plain(x), plain(y)))
        assert_kleene(out, [{op(p, q) for p in values_of(x, i) for q in values_of(y, i)} for i in range(n)])
    if name in ("&", "|", "^"):
        for s in (False, True):
            out = f(a, s)
            assert torch.equal(out.mid, f(a.mid, s))
            assert_kleene(out, [{op(p, s) for p in values_of(a, i)} for i in range(n)])


def test_logical_not_and_float_truth():
    a, _ = _all_bool_pairs()
    for f in (torch.logical_not, operator.invert):
        out = f(a)
        assert torch.equal(out.mid, f(a.mid)) and torch.equal(out.rad, a.rad)
    # a float ball as a truth value: x != 0
    x = bg.ball(torch.tensor([0.0, 0.0, 1.0, -2.0, 0.5, float("nan")]), torch.tensor([0.0, 0.1, 0.5, 0.1, 1.0, 0]))
    out = torch.logical_and(x, torch.tensor(True))
    assert torch.equal(out.mid, torch.logical_and(x.mid, torch.tensor(True)))
    assert out.rad.tolist() == [False, True, False, False, True, True]
    out = torch.logical_or(x, torch.tensor([True] * 6))
    assert not bool(out.rad.any()) and bool(out.mid.all())


def test_logical_inplace():
    x = bg.ball(torch.tensor([0.5, 0.0, -1.0, 2.0]), 0.1)
    m = x > 0
    m &= x < 1
    assert m.mid.tolist() == [True, False, False, False] and m.rad.tolist() == [False, True, False, False]
    m = x > 0
    m.logical_or_(x > 1.95)
    assert m.rad.tolist() == [False, True, False, False]
    m.logical_not_()
    assert m.mid.tolist() == [False, True, True, False] and m.rad.tolist() == [False, True, False, False]
    plain_mask = torch.tensor([True, True, True, True])
    plain_mask.logical_and_(x < 3)  # fully decided: fine in place
    assert plain_mask.tolist() == [True] * 4
    with pytest.raises(bg.UndecidedComparisonError):
        plain_mask.logical_and_(x > 0)


def _brute_force_reduce(b, reduce, dim, keepdim):
    """Set of possible results per output element, by enumerating every completion of the undecided elements."""
    und_idx = b.rad.reshape(-1).nonzero().reshape(-1).tolist()
    results = None
    for bits in itertools.product([False, True], repeat=len(und_idx)):
        full = b.mid.clone().reshape(-1)
        for k, v in zip(und_idx, bits):
            full[k] = v
        full = full.reshape(b.shape)
        r = reduce(full) if dim is None else reduce(full, dim, keepdim=keepdim)
        flat = r.reshape(-1).tolist()
        results = [{v} for v in flat] if results is None else [s | {v} for s, v in zip(results, flat)]
    return results


@pytest.mark.parametrize("reduce", [torch.any, torch.all])
def test_any_all(reduce):
    rng = random.Random(0)
    for trial in range(30):
        shape = (2, 3)
        mid = [rng.random() < 0.5 for _ in range(6)]
        und = [rng.random() < 0.3 for _ in range(6)]
        b = bool_ball(torch.tensor(mid).reshape(shape), torch.tensor(und).reshape(shape))
        for dim, keepdim in [(None, False), (0, False), (1, True), ((0, 1), False), ((1,), True)]:
            out = reduce(b) if dim is None else reduce(b, dim, keepdim=keepdim)
            ref = reduce(b.mid) if dim is None else reduce(b.mid, dim, keepdim=keepdim)
            assert torch.equal(out.mid, ref) and out.rad.shape == ref.shape
            assert_kleene(out, _brute_force_reduce(b, reduce, dim, keepdim))


def test_any_all_of_comparisons():
    x = bg.ball(torch.tensor([0.5, 0.0, -1.0]), 0.1)
    assert bool((x > 0.3).any()) is True
    assert bool((x > -2).all()) is True
    assert bool((x > 1).any()) is False
    with pytest.raises(bg.UndecidedComparisonError):
        bool((x > -1.05).all())
    assert bool((x > -0.05).all()) is False  # -1 is decided False


def test_isnan_isinf_describe_the_midpoint():
    x = bg.ball(torch.tensor([1.0, float("nan"), float("inf"), -float("inf"), 0.0]), 0.5)
    for f in (torch.isnan, torch.isinf, torch.isposinf, torch.isneginf):
        out = f(x)
        assert torch.equal(out.mid, f(x.mid)) and not bool(out.rad.any())


# ----------------------------------------------------------------------------------------------------------------------
# where, masked_fill


def _conditions(c, thresholds):
    return [c > t for t in thresholds] + [c.mid > 0]


@pytest.mark.parametrize("examples", EXAMPLES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_where(dtype, examples):
    @settings(max_examples=examples)
    @given(balls(dtype, (5,)), ball_pairs(dtype, (5,)), st.sampled_from([0.0, 0.1, -3]))
    def run(c, pair, s):
        a, b = pair
        for cond in _conditions(c, [0]):
            check_select(cond, a, b)
            check_select(cond, a, b.mid)
            check_select(cond, a.mid, b)
            # a scalar branch reaches the rule already wrapped into a tensor of the result dtype (see below)
            t = torch.tensor(s, dtype=dtype)
            check_select(cond, a, t, op=lambda k, p, q: torch.ops.aten.where.ScalarOther(k, p, s))
            check_select(cond, t, b, op=lambda k, p, q: torch.ops.aten.where.ScalarSelf(k, s, q))

    run()


@pytest.mark.parametrize("examples", EXAMPLES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_masked_fill(dtype, examples):
    @settings(max_examples=examples)
    @given(balls(dtype, (5,)), balls(dtype, (5,)), st.sampled_from([0.0, 0.1, -1e30, 3, -0.5]),
           balls(dtype, ()))
    def run(c, x, s, v):
        for mask in _conditions(c, [0, -1]):
            if abs(s) <= torch.finfo(dtype).max:  # PyTorch refuses fill values that overflow the dtype
                check_select(mask, s, x, op=lambda k, p, q: torch.masked_fill(q, k, p))
            check_select(mask, v, x, op=lambda k, p, q: torch.masked_fill(q, k, p))
            check_select(mask, v.mid, x, op=lambda k, p, q: torch.masked_fill(q, k, p))
            check_select(mask, v, x.mid, op=lambda k, p, q: torch.masked_fill(q, k, p))

    run()


def test_where_hull_and_events():
    c = bg.ball(torch.tensor([1.0, 0.0, -1.0]), 0.5)
    a = bg.ball(torch.tensor([10.0, 10.0, 10.0]), 0.25)
    b = bg.ball(torch.tensor([2.0, 2.0, 2.0]), 1.0)
    with bg.record() as rec:
        out = torch.where(c > 0, a, b)
    assert out.mid.tolist() == [10.0, 2.0, 2.0]
    assert out.rad.tolist()[0] == 0.25 and out.rad.tolist()[2] == 1.0
    assert out.rad.tolist()[1] >= 8.25  # |10 - 2| + 0.25: the hull of both branches
    assert bool(out[1].contains(10.25)) and bool(out[1].contains(1.0))
    ev = rec.of_kind("undecided")
    assert [e.op for e in ev] == ["aten.gt.Scalar", "aten.where.self"] and all(e.count == 1 for e in ev)
    filled = torch.masked_fill(a, c > 0, 0.0)
    assert filled.mid.tolist() == [0.0, 10.0, 10.0]
    assert filled.rad.tolist()[0] == 0 and filled.rad.tolist()[1] >= 10.0 and filled.rad.tolist()[2] == 0.25


def test_where_python_scalar_is_cast_before_dispatch():
    """torch.where(cond, x, 0.1) and the composite aten.where.Scalar* overloads wrap 0.1 into a float32 tensor before
    ballgrad sees it: the rule can only treat float32(0.1) as the exact value, like any plain tensor. (masked_fill's
    Scalar overload does reach the rule with the exact double.)"""
    cond = bg.ball(torch.tensor([1.0, -1.0]), 0.5) > 0
    a = bg.ball(torch.tensor([1.0, 2.0]))
    via_python = torch.where(cond, a, 0.1)
    via_aten = torch.ops.aten.where.ScalarOther(cond, a, 0.1)
    assert torch.equal(via_aten.mid, via_python.mid)
    assert via_python.rad.tolist() == [0.0, 0.0] and via_aten.rad.tolist() == [0.0, 0.0]
    filled = torch.masked_fill(a, ~cond, 0.1)
    assert filled.rad.tolist()[0] == 0.0 and filled.rad.tolist()[1] > 0
    assert bool(filled[1].contains(Fraction(1, 10)))


def test_where_bool_and_integer_results():
    c = bg.ball(torch.tensor([1.0, 0.0]), 0.5) > 0
    t, f = torch.tensor([True, True]), torch.tensor([False, True])
    out = torch.where(c, t, f)
    assert out.mid.tolist() == [True, True] and out.rad.tolist() == [False, False]  # both branches True at [1]
    out = torch.where(c, f, t)
    assert out.rad.tolist() == [False, False]
    out = torch.where(c, torch.tensor([True, False]), t)
    assert out.rad.tolist() == [False, True]
    with pytest.raises(bg.UndecidedComparisonError):
        torch.where(c, torch.tensor([1, 2]), torch.tensor([3, 4]))
    decided = bg.ball(torch.tensor([1.0, -1.0]), 0.5) > 0
    assert torch.equal(torch.where(decided, torch.tensor([1, 2]), torch.tensor([3, 4])), torch.tensor([1, 4]))


def test_where_broadcast_and_promotion():
    c = bg.ball(torch.tensor([[1.0], [0.0]]), 0.5) > 0
    a = bg.ball(torch.tensor([1.0, 2.0, 3.0]), 1e-3)
    b64 = torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64)
    out = check_select(c, a, b64)
    assert out.shape == (2, 3) and out.dtype == torch.float64
    h = bg.ball(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float16), 1e-3)
    out = check_select(c, h, torch.tensor(0.5, dtype=torch.float16))
    assert out.dtype == torch.float16 and out.rad.dtype == torch.float32


# ----------------------------------------------------------------------------------------------------------------------
# clamp, maximum, minimum, fmax, fmin, sign


def _isnan(v):
    return isinstance(v, float) and math.isnan(v)


def exact_max(*xs):
    """Real max; NaN propagates (torch.maximum, clamp)."""
    return None if any(map(_isnan, xs)) else max(xs)


def exact_min(*xs):
    return None if any(map(_isnan, xs)) else min(xs)


def exact_fmax(*xs):
    """NaN-ignoring max (torch.fmax)."""
    kept = [x for x in xs if not _isnan(x)]
    return max(kept) if kept else None


def exact_fmin(*xs):
    kept = [x for x in xs if not _isnan(x)]
    return min(kept) if kept else None


def exact_clamp(x, lo, hi):
    """min(max(x, lo), hi), as PyTorch defines clamp (hi when lo > hi); NaN anywhere -> undefined."""
    return exact_min(exact_max(x, lo), hi)


def _clamp_exact(lo, hi):
    def f(x):
        y = x if lo is None else exact_max(x, Fraction(lo))
        return y if (hi is None or y is None) else exact_min(y, Fraction(hi))

    return f


CLAMP_BOUNDS = [(-0.5, 0.5), (0.1, None), (None, 1 / 3), (0, 6), (1e-30, 1e30), (2, 1), (-7.25, -0.0), (-3, 65504.0)]


@pytest.mark.parametrize("examples", EXAMPLES)
@pytest.mark.parametrize("dtype", DTYPES + [torch.bfloat16])
def test_clamp_scalar_bounds(dtype, examples):
    @settings(max_examples=examples)
    @given(balls(dtype, (6,)))
    def run(x):
        big = float(torch.finfo(dtype).max)
        for lo, hi in CLAMP_BOUNDS:
            if any(v is not None and abs(v) > big for v in (lo, hi)):  # PyTorch refuses bounds that overflow
                continue
            check_numeric(lambda a: torch.clamp(a, lo, hi), [x], _clamp_exact(lo, hi))
        for s in (0.1, -2, 0.0):
            check_numeric(lambda a: torch.clamp_min(a, s), [x], _clamp_exact(s, None))
            check_numeric(lambda a: torch.clamp_max(a, s), [x], _clamp_exact(None, s))

    run()


@pytest.mark.parametrize("examples", EXAMPLES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_clamp_tensor_bounds(dtype, examples):
    @settings(max_examples=examples)
    @given(balls(dtype, (4,)), balls(dtype, (4,)), balls(dtype, (4,)))
    def run(x, lo, hi):
        check_numeric(lambda a, b, c: torch.clamp(a, b, c), [x, lo, hi], exact_clamp, max_combos=8)
        check_numeric(lambda a, b, c: torch.clamp(a, b, c), [x, lo.mid, hi.mid], exact_clamp, max_combos=8)
        check_numeric(lambda a, b: torch.clamp(a, min=b), [x, lo], exact_max)
        check_numeric(lambda a, b: torch.clamp(a, max=b), [x.mid, hi], exact_min)
        check_numeric(torch.clamp_min, [x, lo], exact_max)
        check_numeric(torch.clamp_max, [x, hi], exact_min)
        check_numeric(lambda a, b: torch.clamp(a, min=b), [x, lo.mid[0]], exact_max)  # 0-dim bound

    run()


MAX_MIN = {"maximum": (torch.maximum, exact_max), "minimum": (torch.minimum, exact_min),
           "fmax": (torch.fmax, exact_fmax), "fmin": (torch.fmin, exact_fmin)}


@pytest.mark.parametrize("examples", EXAMPLES)
@pytest.mark.parametrize("dtype", DTYPES + [torch.bfloat16])
@pytest.mark.parametrize("name", sorted(MAX_MIN))
def test_maximum_minimum(name, dtype, examples):
    op, exact_fn = MAX_MIN[name]

    @settings(max_examples=examples)
    @given(ball_pairs(dtype, (6,)), st.booleans())
    def run(pair, tie):
        a, b = pair
        if tie:
            b = bg.ball(a.mid.clone(), b.rad.clone())
        check_numeric(op, [a, b], exact_fn)
        check_numeric(op, [a, b.mid], exact_fn)
        check_numeric(op, [a.mid, b], exact_fn)

    run()


def test_max_min_mixed_dtypes_and_plain_infinities():
    x = bg.ball(torch.tensor([1.0, -2.0, 0.1]), 1e-3)
    out = check_numeric(torch.maximum, [x, torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64)], exact_max)
    assert out.dtype == torch.float64
    out = check_numeric(torch.clamp, [x, torch.tensor(-math.inf), torch.tensor(math.inf)], exact_clamp)
    assert torch.equal(out.mid, x.mid) and torch.equal(out.rad, x.rad)
    out = check_numeric(torch.maximum, [x, torch.tensor([math.inf, -math.inf, math.nan])], exact_max)
    assert math.isinf(out.mid[0]) and out.rad.tolist()[1] == x.rad.tolist()[1] and math.isnan(out.mid[2])
    h = bg.ball(torch.tensor([0.0, 1.0, -1.0], dtype=torch.float16))
    check_numeric(lambda a: torch.clamp(a, min=0.1), [h], _clamp_exact(0.1, None))  # float32 opmath then float16


def test_max_min_tightness_and_nan():
    """Saturated elements are exact (monotone end points); NaN midpoints have infinite radius."""
    x = bg.ball(torch.tensor([-1.0, 0.25, 3.0, float("nan")]), 0.5)
    out = torch.clamp(x, 0.0, 1.0)
    assert out.rad.tolist()[:3] == [0.0, 0.5, 0.0] and math.isinf(out.rad.tolist()[3])
    out = torch.maximum(x, torch.zeros(4))
    assert out.rad.tolist()[0] == 0.0 and math.isinf(out.rad.tolist()[3])
    y = torch.tensor([0.0, float("nan"), 1.0, 1.0])
    out = torch.maximum(x, y)
    assert math.isnan(out.mid.tolist()[1]) and math.isinf(out.rad.tolist()[1])
    out = torch.fmax(x, y)  # fmax skips a plain NaN like PyTorch; a NaN ball stays unknown
    assert out.mid.tolist()[1] == 0.25 and out.rad.tolist()[1] == 0.5
    assert out.mid.tolist()[3] == 1.0 and math.isinf(out.rad.tolist()[3])


def test_kink_events():
    x = bg.ball(torch.tensor([-1.0, 0.0, 0.45, 2.0]), 0.1)
    with bg.record() as rec:
        torch.clamp(x, -0.5, 0.5)
    ev = rec.of_kind("kink")
    assert len(ev) == 1 and ev[0].count == 1 and ev[0].op == "aten.clamp.default"
    with bg.record() as rec:
        torch.maximum(x, bg.ball(torch.tensor([5.0, 0.05, 0.0, 1.0]), 0.1))
    assert [e.count for e in rec.of_kind("kink")] == [1]
    with bg.record() as rec:
        torch.relu(x.mid)  # plain tensors record nothing
        torch.sign(x)
    assert [(e.op, e.count) for e in rec.of_kind("kink")] == [("aten.sign.default", 1)]
    with bg.record() as rec:
        torch.clamp(x, -5, 5)
    assert rec.of_kind("kink") == []


def _sign(a):
    return None if _isnan(a) else Fraction((a > 0) - (a < 0))


@pytest.mark.parametrize("examples", EXAMPLES)
@pytest.mark.parametrize("dtype", DTYPES + [torch.bfloat16])
def test_sign(dtype, examples):
    @settings(max_examples=examples)
    @given(balls(dtype, (6,)))
    def run(x):
        for f in (torch.sign, torch.sgn):
            out = check_numeric(f, [x], _sign)
            assert bool((out.rad <= 2).all() | torch.isnan(out.mid).any())

    run()


def test_sign_values():
    x = bg.ball(torch.tensor([2.0, -2.0, 0.0, 0.0, 0.5, 0.5, float("nan")]),
                torch.tensor([1.0, 1.0, 0.0, 1.0, 0.5, 1.0, 0.0]))
    out = torch.sign(x)
    assert out.mid.tolist() == [1.0, -1.0, 0.0, 0.0, 1.0, 1.0, 0.0]
    assert out.rad.tolist() == [0.0, 0.0, 0.0, 1.0, 1.0, 2.0, 1.0]


# ----------------------------------------------------------------------------------------------------------------------
# Autograd through the rules (backward uses comparisons, where, masked_fill_, logical_and_)


@pytest.mark.parametrize("name", ["clamp", "clamp_tensor", "maximum", "minimum", "fmax", "where", "masked_fill"])
def test_backward_midpoints_and_clarke_hull(name):
    xm = torch.tensor([-1.0, 0.0, 0.05, 0.3, 2.0, 0.5])
    ym = torch.tensor([0.5, 0.0, 0.06, 0.1, 1.0, 0.5])
    fns = {
        "clamp": lambda x, y: torch.clamp(x, -0.5, 0.5),
        "clamp_tensor": lambda x, y: torch.clamp(x, min=y),
        "maximum": torch.maximum,
        "minimum": torch.minimum,
        "fmax": torch.fmax,
        "where": lambda x, y: torch.where(x > 0.1, x, y),
        "masked_fill": lambda x, y: x.masked_fill(x > 0.2, 1.0),
    }
    f = fns[name]
    x = bg.ball(xm.clone(), 1e-2).requires_grad_()
    y = bg.ball(ym.clone(), 1e-2).requires_grad_()
    px, py = xm.clone().requires_grad_(), ym.clone().requires_grad_()
    g = torch.ones(6)
    out = f(x, y)
    out.backward(g)
    ref = f(px, py)
    ref.backward(g)
    assert_same_bits(out.mid, ref.detach())
    for ball_grad, plain_grad, leaf in [(x.grad, px.grad, x), (y.grad, py.grad, y)]:
        if plain_grad is None:
            continue
        assert isinstance(ball_grad, BallTensor)
        assert_same_bits(ball_grad.mid, plain_grad)
        # the exact derivative on each side of a kink is 0 or 1: both must be inside wherever the ball straddles it
        for i in range(6):
            assert bool(ball_grad[i].contains(plain_grad[i]))


def test_undecided_gradient_contains_both_one_sided_derivatives():
    x = bg.ball(torch.tensor([0.5, -0.5, 1e-3]), 1e-2).requires_grad_()
    torch.clamp(x, min=0.0).backward(torch.ones(3))
    assert x.grad.mid.tolist() == [1.0, 0.0, 1.0]
    assert x.grad.rad.tolist()[:2] == [0.0, 0.0]
    assert bool(x.grad[2].contains(0.0)) and bool(x.grad[2].contains(1.0))
