"""Rules of ops/nn.py, ops/backward.py and the piecewise activations of ops/nonsmooth.py (issue 3).

(a) Per op: bit-identical midpoints, valid radii, and exact containment of the true real function (mpmath at 256 bits,
    or exact rationals where the function is rational/piecewise linear) at sampled points of adversarial hypothesis
    balls (float32 and float64; softmax rows with huge spreads, -inf entries and ties; losses with targets and
    probabilities at the edges of their domains).
(b) MUST-SHOW 1: random MLPs (Linear + relu/tanh/sigmoid/gelu/gelu-tanh/silu, MSE or cross-entropy): every gradient
    element of every parameter contains the exact gradient of an *independent* mpmath backprop written here (forward,
    loss, manual backward at 256 bits; no code shared with the rules), and every ``.grad.mid`` equals the plain
    model's gradient bit for bit.
(c) MUST-SHOW 2: a ReLU pre-activation exactly 0: the gradient ball contains both one-sided derivatives, and a
    ``kink`` event names aten.threshold_backward.
"""

from __future__ import annotations

import copy
import math
import random
from fractions import Fraction

import mpmath
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import ballgrad as bg
from ballgrad.tensor import BallTensor
from ballgrad.testing import balls, contains_exact, float_values, radii
from helpers import EXAMPLES, FLOAT_DTYPES, assert_same_bits, assert_valid_radius, check_rule, mp, plain

aten = torch.ops.aten
mpmath.mp.prec = 256

_TINY = mpmath.mpf(2) ** -1100
_TINY_Q = Fraction(1, 2**1100)


# ----------------------------------------------------------------------------------------------------------------------
# Exact values


def tame(y):
    """A value with the same containment answer as ``y`` that Fraction arithmetic can handle (ball end points are
    multiples of 2^-1074 and below 2^1025 in magnitude): 0 < |y| < 2^-1100 -> +-2^-1100, |y| > 2^1100 -> +-2^1100."""
    if y is None or isinstance(y, (Fraction, int)):
        return y
    y = mpmath.mpf(y)
    if y != 0 and abs(y) < _TINY:
        return _TINY_Q if y > 0 else -_TINY_Q
    if abs(y) > 2 ** mpmath.mpf(1100):
        return Fraction(2**1100) if y > 0 else -Fraction(2**1100)
    return bg.testing.exact(y)


def q(v) -> Fraction:
    return Fraction(v)


def to_mp(v):
    return v if isinstance(v, mpmath.mpf) else mp(Fraction(v))


def sigmoid_mp(z):
    z = to_mp(z)
    return 1 / (1 + mpmath.exp(-z))


def softplus_mp(z):
    """log(1 + e^z), overflow-free."""
    z = to_mp(z)
    return max(z, 0) + mpmath.log1p(mpmath.exp(-abs(z)))


# Smooth activations and their derivatives, written independently of ops/nn.py. Far tails return values with the
# same containment answer (see ``tame``): for x <= -40 (gelu) / -800 (silu) the value is in (-2^-1100, 0); for large
# positive x it is x - delta (or 1 +- delta for derivatives) with 0 < delta < 2^-1100.


def _near_half_x(f):
    """Evaluate f(x) = x (1/2 + O(x)) with -log2|x| extra bits: its x^2-sized part sits below x/2 by a factor |x|,
    so at the suite's 256 bits it keeps only 256 + log2|x| of them (7 digits at x = 7e-71, and a rule's radius can be
    that tight: gelu's is within 4e-6 of the exact error there)."""
    def exact(x):
        x = to_mp(x)
        with mpmath.workprec(mpmath.mp.prec + max(0, -int(mpmath.mag(x))) + 16 if x != 0 else mpmath.mp.prec):
            return f(x)
    return exact


@_near_half_x
def gelu_mp(x):
    if x <= -40:
        return -_TINY
    if x >= 40:
        return x - _TINY
    return x * mpmath.erfc(-x / mpmath.sqrt(2)) / 2


def gelu_d_mp(x):
    x = to_mp(x)
    if x <= -40:
        return -_TINY
    if x >= 40:
        return 1 + _TINY
    return mpmath.erfc(-x / mpmath.sqrt(2)) / 2 + x * mpmath.exp(-x * x / 2) / mpmath.sqrt(2 * mpmath.pi)


_K = mpmath.sqrt(2 / mpmath.pi)
_A = mpmath.mpf(44715) / 10**6


@_near_half_x
def gelu_tanh_mp(x):
    """x (1 + tanh u)/2 = x sigmoid(2u), u = sqrt(2/pi)(x + 0.044715 x^3)."""
    if x <= -40:
        return -_TINY
    if x >= 40:
        return x - _TINY
    return x * sigmoid_mp(2 * _K * (x + _A * x**3))


def gelu_tanh_d_mp(x):
    x = to_mp(x)
    if x <= -40:
        return -_TINY
    if x >= 40:
        return 1 + _TINY
    u = _K * (x + _A * x**3)
    s = sigmoid_mp(2 * u)
    return s + x * s * (1 - s) * 2 * _K * (1 + 3 * _A * x * x)


@_near_half_x
def silu_mp(x):
    if x <= -800:
        return -_TINY
    if x >= 800:
        return x - _TINY
    return x * sigmoid_mp(x)


def silu_d_mp(x):
    x = to_mp(x)
    if x <= -800:
        return -_TINY
    if x >= 800:
        return 1 + _TINY
    s = sigmoid_mp(x)
    return s + x * s * (1 - s)


# ----------------------------------------------------------------------------------------------------------------------
# Sampling exact points of whole tensors (for ops that are not elementwise)

ANY_REAL = [Fraction(-(10**40)), Fraction(-7), Fraction(0), Fraction(3, 2), Fraction(10**40)]


def exact_points(x, rng: random.Random, mode: str):
    """A numpy object array of exact values inside every element of ``x`` (a ball or plain tensor). Elements that
    denote any real (non-finite midpoint or infinite radius) get an arbitrary real. ``mode``: lo, hi, mid or rand."""
    if not isinstance(x, torch.Tensor):
        return x
    if not isinstance(x, BallTensor):
        flat = x.detach().reshape(-1).tolist()
        # plain floats are exact points; a plain inf/NaN denotes any real (as in the rules)
        vals = [(Fraction(v) if math.isfinite(v) else rng.choice(ANY_REAL)) if isinstance(v, float) else v
                for v in flat]
        return np.array(vals, dtype=object).reshape(tuple(x.shape))
    mids = x.mid.detach().to(torch.float64).reshape(-1).tolist()
    rads = x.rad.detach().to(torch.float64).reshape(-1).tolist()
    vals = []
    for m, r in zip(mids, rads):
        if not (math.isfinite(m) and math.isfinite(r)):
            vals.append(rng.choice(ANY_REAL))
            continue
        fm, fr = Fraction(m), Fraction(r)
        pick_mode = mode if mode != "rand" else rng.choice(["lo", "hi", "mid", "in", "in"])
        if pick_mode == "lo":
            vals.append(fm - fr)
        elif pick_mode == "hi":
            vals.append(fm + fr)
        elif pick_mode == "mid":
            vals.append(fm)
        else:
            vals.append(fm + fr * Fraction(rng.randint(-(2**20), 2**20), 2**20))
    return np.array(vals, dtype=object).reshape(tuple(x.shape))


def check_sampled(op, args, exact_fn, *, n_random=4, seed=0):
    """Midpoint identity, valid radii, and containment of ``exact_fn(*points)`` (a tuple of arrays, one per output;
    None = undefined there, which requires an infinite radius) at sampled exact points of all arguments."""
    out = op(*args)
    ref = op(*[plain(a) for a in args])
    outs = out if isinstance(out, tuple) else (out,)
    refs = ref if isinstance(ref, tuple) else (ref,)
    for o, r in zip(outs, refs):
        assert isinstance(o, BallTensor)
        assert_same_bits(o.mid, r)
        assert_valid_radius(o)
    rng = random.Random(seed)
    flat = [(o.mid.detach().to(torch.float64).reshape(-1).tolist(), o.rad.to(torch.float64).reshape(-1).tolist())
            for o in outs]
    for mode in ["lo", "hi", "mid"] + ["rand"] * n_random:
        pts = [exact_points(a, rng, mode) for a in args]
        ys = exact_fn(*pts)
        ys = ys if isinstance(ys, tuple) else (ys,)
        for k, (o, y) in enumerate(zip(outs, ys)):
            y = np.broadcast_to(np.asarray(y, dtype=object), tuple(o.shape)).reshape(-1)
            mids, rads = flat[k]
            for i, (m, r) in enumerate(zip(mids, rads)):
                if math.isinf(r):
                    continue
                assert y[i] is not None, f"output {k} element {i}: finite radius {r} where the function is undefined"
                assert contains_exact(m, r, tame(y[i])), (
                    f"output {k} element {i}: exact {mpmath.nstr(to_mp(tame(y[i])), 20)} not in {m!r} ± {r!r} "
                    f"(mode {mode})"
                )
    return out


def elementwise(fn):
    """Lift a scalar exact function to numpy object arrays (broadcasting)."""
    return np.frompyfunc(fn, fn.__code__.co_argcount, 1)


# ----------------------------------------------------------------------------------------------------------------------
# (a) Piecewise activations: exact rationals


def _relu(a):
    return max(a, 0)


ACT_CASES = {
    "relu": (torch.relu, _relu),
    "relu_": (lambda t: torch.relu_(t.clone()), _relu),
    "threshold": (lambda t: F.threshold(t, 0.1, 20.0), lambda a: a if a > q(0.1) else Fraction(20)),
    "threshold_neg": (lambda t: F.threshold(t, -2.5, -1.0), lambda a: a if a > q(-2.5) else Fraction(-1)),
    "threshold_": (lambda t: F.threshold(t.clone(), 1e-30, 0.0, inplace=True), lambda a: a if a > q(1e-30) else 0),
    "leaky_relu": (lambda t: F.leaky_relu(t, 0.01), lambda a: a if a > 0 else q(0.01) * a),
    "leaky_relu_big": (lambda t: F.leaky_relu(t, 1.5), lambda a: a if a > 0 else q(1.5) * a),
    "leaky_relu_neg": (lambda t: F.leaky_relu(t, -0.5), lambda a: a if a > 0 else q(-0.5) * a),
    "leaky_relu_": (lambda t: F.leaky_relu(t.clone(), 0.2, inplace=True), lambda a: a if a > 0 else q(0.2) * a),
    "hardtanh": (F.hardtanh, lambda a: min(max(a, -1), 1)),
    "relu6": (F.relu6, lambda a: min(max(a, 0), 6)),
    "hardtanh_odd": (lambda t: F.hardtanh(t, -0.1, 0.3), lambda a: min(max(a, q(-0.1)), q(0.3))),
    "hardtanh_": (lambda t: F.hardtanh(t.clone(), -2.0, 0.5, inplace=True), lambda a: min(max(a, -2), q(0.5))),
}


@pytest.mark.parametrize("examples", EXAMPLES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("name", sorted(ACT_CASES))
def test_piecewise_activations(name, dtype, examples):
    op, exact_fn = ACT_CASES[name]

    @settings(max_examples=examples)
    @given(balls(dtype, (6,)))
    def run(x):
        # bounded branches stay finite for inputs denoting any real (hardtanh in [-1, 1]): check_sampled, not
        # check_rule (which demands infinite radii there)
        check_sampled(op, [x], elementwise(exact_fn), n_random=4)

    run()


def test_piecewise_activation_radii_are_tight():
    x = bg.ball(torch.tensor([-2.0, 3.0, 0.0, -0.25, 0.25, 7.0]), torch.tensor([0.5, 0.5, 0.0, 0.5, 0.5, 1.0]))
    r = torch.relu(x)
    assert r.rad.tolist()[:2] == [0.0, 0.5]  # surely inactive: exact 0; surely active: the input radius
    assert r.rad[2] > 0  # the kink marker (exact 0 pre-activation)
    assert float(r.rad[3]) == 0.25 and float(r.rad[4]) == 0.5  # hull [0, 0.25] around 0 and [0, 0.75] around 0.25
    h = F.hardtanh(x)
    assert h.rad.tolist()[0] == 0.0 and h.rad.tolist()[5] == 0.0  # saturated at -1 and 1: exact


# ----------------------------------------------------------------------------------------------------------------------
# Smooth activations (mpmath)

SMOOTH = {
    "gelu": (F.gelu, gelu_mp),
    "gelu_tanh": (lambda t: F.gelu(t, approximate="tanh"), gelu_tanh_mp),
    "silu": (F.silu, silu_mp),
    "gelu_": (lambda t: torch.ops.aten.gelu_(t.clone()), gelu_mp),
    "silu_": (lambda t: F.silu(t.clone(), inplace=True), silu_mp),
}


@pytest.mark.parametrize("examples", EXAMPLES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("name", sorted(SMOOTH))
def test_smooth_activations(name, dtype, examples):
    op, exact_fn = SMOOTH[name]

    @settings(max_examples=examples)
    @given(balls(dtype, (5,)))
    def run(x):
        check_rule(op, [x], lambda a: tame(exact_fn(a)), n_random=2)

    run()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_smooth_activations_reduced_dtypes(dtype):
    x = bg.ball(torch.linspace(-6, 6, 13).to(dtype), 2.0**-9)
    for name in ("gelu", "gelu_tanh", "silu"):
        op, exact_fn = SMOOTH[name]
        check_rule(op, [x], lambda a: tame(exact_fn(a)))


def test_gelu_measures_the_cpu_erf_polynomial():
    """CPU float32 gelu uses an erf polynomial with ~1.5e-7 absolute error: the radius of a point ball must cover it
    (and stay within a few of its size)."""
    x = bg.ball(torch.linspace(-5, 5, 1001))
    out = check_rule(F.gelu, [x], lambda a: tame(gelu_mp(a)), n_random=0)
    assert float(out.rad.max()) < 2e-6


# ----------------------------------------------------------------------------------------------------------------------
# Backward of activations


def _threshold_bwd_exact(th):
    return lambda g, s: g if s > q(th) else Fraction(0)


BACKWARD_PIECEWISE = {
    "threshold_backward_0": (lambda g, s: aten.threshold_backward(g, s, 0), _threshold_bwd_exact(0.0)),
    "threshold_backward_0.1": (lambda g, s: aten.threshold_backward(g, s, 0.1), _threshold_bwd_exact(0.1)),
    "leaky_relu_backward": (lambda g, s: aten.leaky_relu_backward(g, s, 0.01, False),
                            lambda g, s: g if s > 0 else q(0.01) * g),
    "leaky_relu_backward_result": (lambda g, s: aten.leaky_relu_backward(g, s, 0.3, True),
                                   lambda g, s: g if s > 0 else q(0.3) * g),
    "hardtanh_backward": (lambda g, s: aten.hardtanh_backward(g, s, -1.0, 1.0),
                          lambda g, s: g if -1 < s < 1 else Fraction(0)),
    "hardtanh_backward_06": (lambda g, s: aten.hardtanh_backward(g, s, 0.0, 6.0),
                             lambda g, s: g if 0 < s < 6 else Fraction(0)),
}


@pytest.mark.parametrize("examples", EXAMPLES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("name", sorted(BACKWARD_PIECEWISE))
def test_piecewise_backward(name, dtype, examples):
    op, exact_fn = BACKWARD_PIECEWISE[name]

    @settings(max_examples=examples)
    @given(balls(dtype, (5,)), balls(dtype, (5,)))
    def run(g, s):
        check_sampled(op, [g, s], elementwise(exact_fn), n_random=4)

    run()


def test_piecewise_backward_kink_hulls():
    g = bg.ball(torch.tensor([2.0, 2.0, 2.0, 2.0, 2.0]), 1e-3)
    s = bg.ball(torch.tensor([0.0, -1e-3, 1e-3, 0.0, 0.5]), torch.tensor([0.0, 1e-2, 1e-2, 1e-9, 0.0]))
    with bg.record() as rec:
        out = aten.threshold_backward(g, s, 0.0)
    # point exactly 0 with threshold 0: relu's inactive output, exact 0
    assert out.mid[0] == 0 and out.rad[0] == 0
    for i in (1, 2, 3):  # straddling balls: both one-sided derivatives
        assert bool(out[i].contains(0.0)) and bool(out[i].contains(2.0))
    assert out.rad[4] == out.rad.new_tensor(1e-3)  # surely active: G itself
    assert sum(e.count for e in rec.of_kind("kink") if e.op == "aten.threshold_backward.default") == 3
    # a point exactly at a non-zero threshold (nn.Threshold's input) is a kink: hull
    out = aten.threshold_backward(g, bg.ball(torch.full((5,), 0.5)), 0.5)
    assert bool(out.contains(0.0).all()) and bool(out.contains(2.0).all())
    # leaky_relu / hardtanh: a point exactly at the kink gives the hull of the one-sided derivatives
    out = aten.leaky_relu_backward(g, bg.ball(torch.zeros(5)), 0.1, False)
    assert bool(out.contains(2.0).all()) and bool(out.contains(0.2).all())
    out = aten.hardtanh_backward(g, bg.ball(torch.tensor([-1.0, 1.0, 0.0, -2.0, 2.0])), -1.0, 1.0)
    assert bool(out[:2].contains(0.0).all()) and bool(out[:2].contains(2.0).all())
    assert out.rad[2] == out.rad.new_tensor(1e-3) and out.rad[3] == 0 and out.rad[4] == 0


def _tanh_bwd(g, y):
    return g * (1 - y * y)


def _sigmoid_bwd(g, y):
    return g * y * (1 - y)


BACKWARD_SMOOTH = {
    "tanh_backward": (aten.tanh_backward, _tanh_bwd, {}),
    "sigmoid_backward": (aten.sigmoid_backward, _sigmoid_bwd, {}),
    "gelu_backward": (aten.gelu_backward, lambda g, x: to_mp(g) * gelu_d_mp(x), {}),
    "gelu_backward_tanh": (lambda g, x: aten.gelu_backward(g, x, approximate="tanh"),
                           lambda g, x: to_mp(g) * gelu_tanh_d_mp(x), {}),
    "silu_backward": (aten.silu_backward, lambda g, x: to_mp(g) * silu_d_mp(x), {}),
}


@pytest.mark.parametrize("examples", EXAMPLES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("name", sorted(BACKWARD_SMOOTH))
def test_smooth_backward(name, dtype, examples):
    op, exact_fn, _ = BACKWARD_SMOOTH[name]
    saved = balls(dtype, (4,)) if name.startswith(("gelu", "silu")) else balls(dtype, (4,), max_magnitude=1.5)

    @settings(max_examples=examples)
    @given(balls(dtype, (4,)), saved)
    def run(g, x):
        check_rule(op, [g, x], lambda a, b: tame(exact_fn(a, b)), n_random=2)

    run()


def test_smooth_backward_tightness():
    """At small radii the mean value form keeps the radius near |f''| r |g| + rounding."""
    x = bg.ball(torch.linspace(-4, 4, 81, dtype=torch.float64), 1e-10)
    g = bg.ball(torch.ones(81, dtype=torch.float64))
    for approximate in ("none", "tanh"):
        out = aten.gelu_backward(g, x, approximate=approximate)
        assert float(out.rad.max()) < 1e-9
    assert float(aten.silu_backward(g, x).rad.max()) < 1e-9


# ----------------------------------------------------------------------------------------------------------------------
# softmax family


@st.composite
def softmax_rows(draw, dtype):
    """A [rows, n] ball: moderate values, huge spreads, ties, -inf entries (masked logits), adversarial radii."""
    rows = draw(st.integers(1, 3))
    n = draw(st.integers(1, 6))
    big = float(torch.finfo(dtype).max)
    kind = draw(st.sampled_from(["moderate", "spread", "ties", "masked", "adversarial"]))
    if kind == "adversarial":
        return draw(balls(dtype, (rows, n)))
    if kind == "moderate":
        values = st.floats(-30, 30, width=32)
    elif kind == "spread":
        values = st.sampled_from([0.0, -1e3, 1e3, -big / 4, big / 4, -3e4, 88.0, -745.0, 1e-30])
    elif kind == "ties":
        values = st.sampled_from([1.5, 1.5, 1.5, -2.0])
    else:
        values = st.one_of(st.floats(-10, 10, width=32), st.just(-math.inf))
    mids = draw(st.lists(values, min_size=rows * n, max_size=rows * n))
    rads = draw(st.lists(st.one_of(st.just(0.0), radii(dtype, allow_inf=False)), min_size=rows * n, max_size=rows * n))
    mid = torch.tensor(mids, dtype=torch.float64).to(dtype).reshape(rows, n)
    return bg.ball(mid, torch.tensor(rads, dtype=torch.float64).reshape(rows, n))


def _along(x, dim, fn):
    """Apply a row function (list -> list) along ``dim`` of a 2-D object array."""
    arr = np.asarray(x, dtype=object)
    if arr.ndim == 1:
        return np.array(fn(list(arr)), dtype=object)
    moved = np.moveaxis(arr, dim, -1)
    out = np.empty(moved.shape, dtype=object)
    for idx in np.ndindex(moved.shape[:-1]):
        out[idx] = np.array(fn(list(moved[idx])), dtype=object) if moved.shape[-1] else []
    return np.moveaxis(out, -1, dim)


def _softmax_row(xs):
    xs = [to_mp(v) for v in xs]
    top = max(xs)
    e = [mpmath.exp(v - top) for v in xs]
    s = mpmath.fsum(e)
    return [v / s for v in e]


def _log_softmax_row(xs):
    xs = [to_mp(v) for v in xs]
    top = max(xs)
    s = mpmath.fsum(mpmath.exp(v - top) for v in xs)
    return [v - top - mpmath.log(s) for v in xs]


def _lse_row(xs):
    xs = [to_mp(v) for v in xs]
    top = max(xs)
    return [top + mpmath.log(mpmath.fsum(mpmath.exp(v - top) for v in xs))]


@pytest.mark.parametrize("examples", EXAMPLES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("dim", [-1, 0])
@pytest.mark.parametrize("name", ["softmax", "log_softmax"])
def test_softmax_family(name, dim, dtype, examples):
    op = (lambda t: torch.softmax(t, dim)) if name == "softmax" else (lambda t: torch.log_softmax(t, dim))
    row = _softmax_row if name == "softmax" else _log_softmax_row

    @settings(max_examples=examples)
    @given(softmax_rows(dtype))
    def run(x):
        check_sampled(op, [x], lambda p: _along(p, dim, row), n_random=3)

    run()


@pytest.mark.parametrize("examples", EXAMPLES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_logsumexp(dtype, examples):
    @settings(max_examples=examples)
    @given(softmax_rows(dtype), st.booleans())
    def run(x, keepdim):
        def exact(p):
            out = np.array([_lse_row(list(row)) for row in np.asarray(p, dtype=object)], dtype=object)
            return out if keepdim else out.reshape(-1)

        check_sampled(lambda t: torch.logsumexp(t, 1, keepdim), [x], exact, n_random=3)

    run()


def test_softmax_masked_rows_and_tightness():
    x = bg.ball(torch.tensor([[1.0, 2.0, -math.inf, 0.5], [-math.inf, -math.inf, 3.0, -math.inf]]))
    y = torch.softmax(x, -1)
    assert bool(torch.isfinite(y.rad).all()) and float(y.rad.max()) <= 1 + 1e-6  # y in [0, 1], whatever is masked
    # a row of exact logits: only rounding and the trust-table margins, a few ulps of w = log(1/y - 1) in float64
    x = bg.ball(torch.tensor([[1.0, 2.0, 3.0, -40.0]], dtype=torch.float64))
    y = torch.softmax(x, -1)
    assert bool((y.rad <= 32 * 2.0**-53 * (1 + y.mid.log().abs()) * y.mid).all())
    z = torch.log_softmax(x, -1)
    assert bool((z.rad <= 64 * 2.0**-53 * z.mid.abs()).all())
    # propagation is the true worst case 2 y (1 - y) r for equal radii, not more than 10% above it
    x = bg.ball(torch.tensor([[0.3, -1.2, 2.0]], dtype=torch.float64), 1e-6)
    y = torch.softmax(x, -1)
    assert bool((y.rad <= 1.1 * 2 * y.mid * (1 - y.mid) * 1e-6).all())


def _general_log_softmax_path(monkeypatch):
    """Disable the pairwise fast path (rows of at most 0 classes), so that the general rule runs."""
    from ballgrad.ops import nn as nn_rules

    monkeypatch.setattr(nn_rules, "_PAIRWISE_MAX_CLASSES", 0)


def _adversarial_logits(dtype):
    """Seeded rows for the pairwise fast path and its fallbacks: ties, confident rows (y ~ -1e-13), exp overflow
    (gaps > 709: the general rule), tiny and wide radii, masked -inf and NaN entries, one class, 64 and 65 classes."""
    gen = torch.Generator().manual_seed(5)
    rows = [
        (torch.tensor([[1.5, 1.5, 1.5, -2.0], [30.0, 0.0, 0.0, 0.0]]), 0.0),
        (torch.tensor([[1.5, 1.5, 1.5, -2.0], [30.0, 0.0, 0.0, 0.0]]), 2.0**-20),
        (torch.tensor([[0.0, -700.0, 700.0], [3.0, 2.0, 1.0]]), 1e-3),
        (torch.tensor([[0.3, -1.2, 2.0]]), 1.0),
        (torch.tensor([[0.3, -math.inf, 2.0], [0.5, math.nan, 1.0]]), 1e-6),
        (torch.tensor([[0.7], [-3.0]]), 1e-6),
        (torch.randn(3, 64, generator=gen) * 4, 1e-5),
        (torch.randn(2, 65, generator=gen) * 4, 1e-5),
        (torch.randn(2, 3, 5, generator=gen), 1e-7),
    ]
    return [bg.ball(m.to(dtype), r) for m, r in rows]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES + [torch.float16])
def test_log_softmax_pairwise_fast_path(dtype, monkeypatch):
    """The pairwise form: mids bit-identical, exact values at the box's end points contained, and radii never wider
    than the general rule's (beyond one float32 ulp of a tiny radius: both are rounded up once)."""
    for x in _adversarial_logits(dtype):
        for dim in {-1, 0, x.dim() - 2}:
            fast = torch.log_softmax(x, dim)
            if dtype != torch.float16:
                check_sampled(lambda t: torch.log_softmax(t, dim), [x], lambda p: _along_nd(p, dim, _log_softmax_row),
                              n_random=2)
            with monkeypatch.context() as mctx:
                _general_log_softmax_path(mctx)
                slow = torch.log_softmax(x, dim)
            assert_same_bits(fast.mid, slow.mid)
            assert_valid_radius(fast)
            finite = torch.isfinite(slow.rad)
            assert bool((fast.rad[finite] <= slow.rad[finite] * (1 + 2.0**-20) + 1e-300).all()), (x, dim)
    x16 = bg.ball(torch.tensor([[0.5, -1.0, 2.0]], dtype=torch.float16), 1e-3)
    y = aten._log_softmax(x16, 1, False)
    assert y.rad.dtype == torch.float32 and float(y.rad.max()) <= 4e-3


def _along_nd(x, dim, fn):
    """``_along`` for arrays of any rank."""
    arr = np.asarray(x, dtype=object)
    moved = np.moveaxis(arr, dim, -1)
    out = np.empty(moved.shape, dtype=object)
    for idx in np.ndindex(moved.shape[:-1]):
        out[idx] = np.array(fn(list(moved[idx])), dtype=object)
    return np.moveaxis(out, -1, dim)


def test_log_softmax_backward_exact_range():
    """The backward of log_softmax is bounded over the exact range: G_i counted once (|1 - p| rG_i + p rT_i), not
    twice as a composition of ball rules would (rG_i (1 + p) + p rT_i); the worst case is attained at a vertex."""
    z = torch.log_softmax(bg.ball(torch.tensor([[2.0, 0.0, 0.0]], dtype=torch.float64)), 1)
    g = bg.ball(torch.tensor([[1.0, 0.0, 0.0]], dtype=torch.float64), 0.1)
    out = aten._log_softmax_backward_data(g, z, 1, torch.float64)
    p = float(torch.exp(z.mid[0, 0]))
    exact_worst = (1 - p) * 0.1 + p * 0.2  # at G = (1 -+ 0.1, +-0.1, +-0.1)
    assert exact_worst <= float(out.rad[0, 0]) <= exact_worst * (1 + 1e-12)
    check_sampled(lambda a, b: aten._log_softmax_backward_data(a, b, 1, torch.float64), [g, z],
                  lambda a, b: _log_softmax_bwd(a, b, 1), n_random=4)
    # non-finite arguments take the composition (infinite radii where they reach)
    gn = bg.ball(torch.tensor([[1.0, math.nan, 0.0]]))
    out = aten._log_softmax_backward_data(gn, z.mid.float(), 1, torch.float32)
    assert_valid_radius(out)
    assert bool(torch.isinf(out.rad).all())
    for dtype in FLOAT_DTYPES + [torch.float16]:
        gen = torch.Generator().manual_seed(2)
        x = bg.ball(torch.randn(4, 7, generator=gen).to(dtype), 1e-4)
        z = torch.log_softmax(x, 0)
        gg = bg.ball(torch.randn(4, 7, generator=gen).to(dtype), 2.0**-12)
        if dtype != torch.float16:
            check_sampled(lambda a, b: aten._log_softmax_backward_data(a, b, 0, dtype), [gg, z],
                          lambda a, b: _log_softmax_bwd(a, b, 0), n_random=2)
        else:
            out = aten._log_softmax_backward_data(gg, z, 0, dtype)
            assert_valid_radius(out)
            assert bool(torch.isfinite(out.rad).all())


def _softmax_bwd(g, y, dim):
    g, y = np.asarray(g, dtype=object), np.asarray(y, dtype=object)
    return y * (g - (g * y).sum(axis=dim, keepdims=True))


def _log_softmax_bwd(g, z, dim):
    g = np.frompyfunc(to_mp, 1, 1)(np.asarray(g, dtype=object))
    e = np.frompyfunc(lambda v: mpmath.exp(to_mp(v)), 1, 1)(np.asarray(z, dtype=object))
    return g - e * g.sum(axis=dim, keepdims=True)


@pytest.mark.parametrize("examples", EXAMPLES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("dim", [1, 0])
def test_softmax_backward_data(dim, dtype, examples):
    """The saved output is a forward rule's ball (from adversarial logits) or an arbitrary ball: the ops are real
    functions of (grad, output)."""

    @settings(max_examples=examples)
    @given(balls(dtype, (2, 3)), balls(dtype, (2, 3), max_magnitude=30), st.booleans())
    def run(g, x, arbitrary):
        y = x if arbitrary else torch.softmax(x, dim)
        check_sampled(lambda a, b: aten._softmax_backward_data(a, b, dim, dtype), [g, y],
                      lambda a, b: _softmax_bwd(a, b, dim), n_random=2)
        z = x if arbitrary else torch.log_softmax(x, dim)
        check_sampled(lambda a, b: aten._log_softmax_backward_data(a, b, dim, dtype), [g, z],
                      lambda a, b: _log_softmax_bwd(a, b, dim), n_random=2)

    run()


# ----------------------------------------------------------------------------------------------------------------------
# nll_loss


def _nll_exact(x, target, weight, reduction, ignore_index):
    x = np.asarray(x, dtype=object)
    t = np.asarray(target, dtype=object)
    one_d = x.ndim == 1
    if one_d:
        x, t = x[None], t[None]
    n = x.shape[0]
    losses, ws = [], []
    for i in range(n):
        ti = int(t[i])
        if ti == ignore_index:
            losses.append(Fraction(0))
            continue
        w = Fraction(1) if weight is None else weight[ti]
        ws.append(w)
        losses.append(-w * x[i, ti])
    total = sum(ws, Fraction(0))
    if reduction == 0:  # the kernel's total_weight is the placeholder 0 for batched input
        return np.array(losses, dtype=object).reshape(np.asarray(target).shape), (total if one_d else Fraction(0))
    s = sum(losses, Fraction(0))
    if reduction == 2:
        return s, total
    return (None if total == 0 else s / total), total


def _nll_bwd_exact(g, x, target, weight, reduction, ignore_index, total):
    x = np.asarray(x, dtype=object)
    t = np.asarray(target, dtype=object)
    out = np.full(x.shape, Fraction(0), dtype=object)
    g = np.asarray(g, dtype=object)
    one_d = x.ndim == 1
    if one_d:
        out, t = out[None], t[None]
        g = g.reshape(1) if reduction == 0 else g
    for i in range(out.shape[0]):
        ti = int(t[i])
        if ti == ignore_index:
            continue
        w = Fraction(1) if weight is None else weight[ti]
        gi = g[i] if reduction == 0 else g[()]
        if reduction == 1:
            if total == 0:
                return np.full(x.shape, None, dtype=object)
            out[i, ti] = -w * gi / total
        else:
            out[i, ti] = -w * gi
    return out[0] if one_d else out


@pytest.mark.parametrize("examples", EXAMPLES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("reduction", [0, 1, 2])
def test_nll_loss(reduction, dtype, examples):
    @settings(max_examples=examples)
    @given(st.integers(1, 4), st.integers(1, 4), st.data())
    def run(n, c, data):
        x = data.draw(balls(dtype, (n, c)))
        target = torch.tensor(data.draw(st.lists(st.integers(0, c - 1) | st.just(-100), min_size=n, max_size=n)))
        use_weight = data.draw(st.booleans())
        weight = torch.tensor(data.draw(st.lists(st.sampled_from([0.5, 1.0, 2.0, 0.1, 3.0]), min_size=c,
                                                 max_size=c)), dtype=dtype) if use_weight else None
        wq = None if weight is None else [Fraction(v) for v in weight.tolist()]
        if data.draw(st.booleans()):
            x, target = x[0], target[0]  # 1-D input, 0-D target
        out = check_sampled(lambda a: aten.nll_loss_forward(a, target, weight, reduction, -100), [x],
                            lambda p: _nll_exact(p, target.tolist(), wq, reduction, -100), n_random=2)
        total = out[1]
        g = data.draw(balls(dtype, tuple(out[0].shape), allow_nonfinite=False))
        check_sampled(
            lambda gg, xx, tw: aten.nll_loss_backward(gg, xx, target, weight, reduction, -100, tw), [g, x, total],
            lambda gg, xx, tw: _nll_bwd_exact(gg, xx, target.tolist(), wq, reduction, -100, tw), n_random=2)

    run()


def test_nll_loss_direct_paths():
    """The direct (unweighted) nll rules: exact total weight (radius 0), the picked radius exactly for reduction none,
    all samples ignored (mean 0/0: NaN, infinite radius), a NaN logit reaching the loss, the exact sum of float32
    values (no rounding slack), and a backward with an inexact total weight (the composition)."""
    x = bg.ball(torch.tensor([[-2.0, -0.5, -1.25], [-0.75, -3.0, -1.0], [-1.0, -1.0, -1.0]]), 2.0**-10)
    t = torch.tensor([1, 0, -100])
    out, total = aten.nll_loss_forward(x, t, None, 0, -100)
    assert torch.equal(out.rad, torch.tensor([2.0**-10, 2.0**-10, 0.0])) and float(total.rad) == 0
    out, total = aten.nll_loss_forward(x, t, None, 2, -100)
    assert float(total.mid) == 2 and float(total.rad) == 0
    assert float(out.mid) == 1.25 and float(out.rad) == 2.0**-9 * (1 + 2.0**-23)  # the value sum is exact: only
    # the radii sum's bound theta_2 fl(sum r) rounds up (to the next float32)
    out, total = aten.nll_loss_forward(x, t, None, 1, -100)
    assert float(out.mid) == 0.625 and 2.0**-10 <= float(out.rad) <= 2.0**-10 * (1 + 2.0**-20)
    g = bg.ball(torch.tensor(1.0))
    grad = aten.nll_loss_backward(g, x, t, None, 1, -100, total)
    assert torch.equal(grad.mid, torch.tensor([[0.0, -0.5, 0.0], [-0.5, 0.0, 0.0], [0.0, 0.0, 0.0]]))
    assert float(grad.rad.max()) <= 2.0**-53  # -1/2, exact but for the a priori bound u|q| of the division
    out, total = aten.nll_loss_forward(x, torch.tensor([-100, -100, -100]), None, 1, -100)
    assert math.isnan(float(out.mid)) and math.isinf(float(out.rad)) and float(total.rad) == 0
    xn = bg.ball(torch.tensor([[math.nan, 0.0], [-1.0, -2.0]]))
    out, _ = aten.nll_loss_forward(xn, torch.tensor([0, 1]), None, 2, -100)
    assert math.isinf(float(out.rad))
    out, _ = aten.nll_loss_forward(xn, torch.tensor([1, 1]), None, 2, -100)  # the NaN is not picked
    assert float(out.rad) == 0 and float(out.mid) == 2.0
    tw = bg.ball(torch.tensor(2.0), 1e-3)  # an inexact total weight: the composition (division by a ball)
    grad = aten.nll_loss_backward(bg.ball(torch.tensor(1.0), 1e-6), x, t, None, 1, -100, tw)
    assert_valid_radius(grad)
    for q in (2.0 - 1e-3, 2.0 + 1e-3):
        assert bool(grad[0, 1].contains(torch.tensor(-1.0 / q, dtype=torch.float64)))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES + [torch.float16, torch.bfloat16])
def test_nll_loss_direct_paths_targets_and_grads(dtype):
    """The direct nll rules on cases the hypothesis test does not draw: float16/bfloat16 logits (a float32 radius: the
    picked midpoints and radii gathered one at a time), an ignore_index that is a valid class and one beyond the
    classes (the clamped gather index), every sample ignored (mean 0/0), and plain and ball grads, 0-d for mean and
    sum (the backward's scalar path, Python floats), per sample for none."""
    gen = torch.Generator().manual_seed(7)
    x = bg.ball(torch.randn(5, 4, generator=gen).to(dtype), 2.0**-12)
    for ignore_index, target in ((2, [0, 2, 3, 2, 1]), (7, [7, 1, 3, 0, 7]), (-100, [-100] * 5)):
        t = torch.tensor(target)
        for reduction in (0, 1, 2):
            out = check_sampled(lambda a: aten.nll_loss_forward(a, t, None, reduction, ignore_index), [x],
                                lambda p: _nll_exact(p, target, None, reduction, ignore_index), n_random=1)
            g = bg.ball(torch.rand(tuple(out[0].shape), generator=gen).to(dtype) + 0.5, 2.0**-10)
            for grad in (g, g.mid):
                check_sampled(
                    lambda gg, xx, tw: aten.nll_loss_backward(gg, xx, t, None, reduction, ignore_index, tw),
                    [grad, x, out[1]],
                    lambda gg, xx, tw: _nll_bwd_exact(gg, xx, target, None, reduction, ignore_index, tw), n_random=1)


def test_log_softmax_backward_plain_arguments():
    """_log_softmax_backward_data with a plain grad (no radius terms) and with a plain saved output (exact end
    points of exp's argument), against the oracle."""
    for dtype in FLOAT_DTYPES:
        gen = torch.Generator().manual_seed(3)
        z = torch.log_softmax(bg.ball(torch.randn(3, 5, generator=gen).to(dtype), 1e-4), 1)
        g = torch.randn(3, 5, generator=gen).to(dtype)
        for args in ([g, z], [bg.ball(g, 2.0**-12), z.mid]):
            check_sampled(lambda a, b: aten._log_softmax_backward_data(a, b, 1, dtype), args,
                          lambda a, b: _log_softmax_bwd(a, b, 1), n_random=2)


def test_nll_loss2d_and_cross_entropy_variants():
    torch.manual_seed(0)
    x = bg.ball(torch.randn(2, 3, 2, 2, dtype=torch.float64), 1e-9)
    t = torch.randint(0, 3, (2, 2, 2))
    t[0, 0, 0] = -100
    flat_t = t.reshape(-1).tolist()
    for reduction in (0, 1, 2):
        def exact(p):
            rows = np.moveaxis(np.asarray(p, dtype=object), 1, -1).reshape(-1, 3)
            out, total = _nll_exact(rows, flat_t, None, reduction, -100)
            return (np.asarray(out, dtype=object).reshape(2, 2, 2) if reduction == 0 else out), total

        out = check_sampled(lambda a: aten.nll_loss2d_forward(a, t, None, reduction, -100), [x], exact)
        g = bg.ball(torch.rand(out[0].shape, dtype=torch.float64), 1e-12)
        grad = aten.nll_loss2d_backward(g, x, t, None, reduction, -100, out[1])
        assert_same_bits(grad.mid, aten.nll_loss2d_backward(g.mid, x.mid, t, None, reduction, -100, out[1].mid))
        assert bool((grad.rad <= 1e-10).all())
    # cross_entropy variants reach _log_softmax + nll or soft-target compositions
    logits = bg.ball(torch.randn(4, 5), 1e-7).requires_grad_()
    for kw in ({}, {"label_smoothing": 0.1}, {"weight": torch.rand(5), "ignore_index": 2}):
        y = torch.tensor([0, 2, 4, 1])
        loss = F.cross_entropy(logits, y, **kw)
        loss.backward()
        plain_logits = logits.mid.detach().clone().requires_grad_()
        F.cross_entropy(plain_logits, y, **kw).backward()
        assert_same_bits(logits.grad.mid, plain_logits.grad)
        logits.grad = None


# ----------------------------------------------------------------------------------------------------------------------
# Regression and binary losses


def _reduce(values, reduction):
    arr = np.asarray(values, dtype=object)
    if reduction == 0:
        return arr
    if any(v is None for v in arr.reshape(-1)):
        return None
    s = sum((to_mp(v) if isinstance(v, mpmath.mpf) else v for v in arr.reshape(-1)), Fraction(0))
    return s / arr.size if reduction == 1 else s


def _mse(x, t, reduction):
    return _reduce(elementwise(lambda a, b: (a - b) ** 2)(x, t), reduction)


def _mse_bwd(g, x, t, reduction):
    n = np.broadcast(x, t).size
    d = elementwise(lambda a, b: 2 * (a - b))(x, t) * np.asarray(g, dtype=object)
    return d / n if reduction == 1 else d


def _smooth_l1(beta):
    b = Fraction(beta)

    def f(a, c):
        d = abs(a - c)
        if b == 0:
            return d
        return d * d / (2 * b) if d < b else d - b / 2

    return f


def _huber(delta):
    dl = Fraction(delta)
    return lambda a, c: (abs(a - c) ** 2 / 2) if abs(a - c) < dl else dl * (abs(a - c) - dl / 2)


def _smooth_l1_d(beta):
    b = Fraction(beta)

    def f(a, c):
        d = a - c
        if b == 0:
            return Fraction(1 if d > 0 else -1 if d < 0 else 0)
        return max(min(d / b, 1), -1)

    return f


def _huber_d(delta):
    dl = Fraction(delta)
    return lambda a, c: max(min(a - c, dl), -dl)


REGRESSION = {
    "mse": (aten.mse_loss, lambda r: (lambda x, t: _mse(x, t, r)),
            aten.mse_loss_backward, lambda r: (lambda g, x, t: _mse_bwd(g, x, t, r)), ()),
    "smooth_l1": (aten.smooth_l1_loss, lambda r: (lambda x, t: _reduce(elementwise(_smooth_l1(1.0))(x, t), r)),
                  aten.smooth_l1_loss_backward, lambda r: _scaled_d(_smooth_l1_d(1.0), r), (1.0,)),
    "smooth_l1_beta0.25": (aten.smooth_l1_loss, lambda r: (lambda x, t: _reduce(elementwise(_smooth_l1(0.25))(x, t), r)),
                           aten.smooth_l1_loss_backward, lambda r: _scaled_d(_smooth_l1_d(0.25), r), (0.25,)),
    "smooth_l1_beta0": (aten.smooth_l1_loss, lambda r: (lambda x, t: _reduce(elementwise(_smooth_l1(0.0))(x, t), r)),
                        aten.smooth_l1_loss_backward, lambda r: _scaled_d(_smooth_l1_d(0.0), r), (0.0,)),
    "huber": (aten.huber_loss, lambda r: (lambda x, t: _reduce(elementwise(_huber(1.0))(x, t), r)),
              aten.huber_loss_backward, lambda r: _scaled_d(_huber_d(1.0), r), (1.0,)),
    "huber_delta3": (aten.huber_loss, lambda r: (lambda x, t: _reduce(elementwise(_huber(3.0))(x, t), r)),
                     aten.huber_loss_backward, lambda r: _scaled_d(_huber_d(3.0), r), (3.0,)),
}


def _scaled_d(d, reduction):
    def f(g, x, t):
        n = np.broadcast(x, t).size
        v = elementwise(d)(x, t) * np.asarray(g, dtype=object)
        return v / n if reduction == 1 else v

    return f


@pytest.mark.parametrize("examples", EXAMPLES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("reduction", [0, 1, 2])
@pytest.mark.parametrize("name", sorted(REGRESSION))
def test_regression_losses(name, reduction, dtype, examples):
    fwd, fwd_exact, bwd, bwd_exact, extra = REGRESSION[name]

    @settings(max_examples=examples)
    @given(balls(dtype, (2, 3)), balls(dtype, (2, 3)), balls(dtype, (2, 3)), st.booleans())
    def run(x, t, g, plain_target):
        if plain_target:
            t = t.mid
        check_sampled(lambda a, b: fwd(a, b, reduction, *extra), [x, t], fwd_exact(reduction), n_random=3)
        g = g if reduction == 0 else g[0, 0]
        check_sampled(lambda gg, a, b: bwd(gg, a, b, reduction, *extra), [g, x, t], bwd_exact(reduction),
                      n_random=3)

    run()


def test_smooth_l1_beta0_kink_hull():
    x = bg.ball(torch.tensor([0.0, 1.0, -1e-8]), torch.tensor([0.0, 0.0, 1e-6]))
    t = torch.zeros(3)
    with bg.record() as rec:
        out = aten.smooth_l1_loss_backward(torch.tensor(1.0), x, t, 2, 0.0)
    assert bool(out[0].contains(1.0)) and bool(out[0].contains(-1.0))
    assert float(out.rad[1]) <= 2.0**-52  # d = 1 surely: the derivative 1 up to float64 composition rounding
    assert sum(e.count for e in rec.of_kind("kink")) == 2


@st.composite
def probabilities(draw, dtype, shape):
    """Balls of probabilities, with the edges 0 and 1, tiny values, 1 - eps, and adversarial radii."""
    n = math.prod(shape)
    eps = float(torch.finfo(dtype).eps)
    vals = st.one_of(st.floats(0, 1, width=32), st.sampled_from([0.0, 1.0, 1e-30, 1 - eps, 0.5, 1e-45, 3e-39]))
    mids = draw(st.lists(vals, min_size=n, max_size=n))
    rads = draw(st.lists(st.sampled_from([0.0, 0.0, 1e-9, 1e-3, 0.6]), min_size=n, max_size=n))
    return bg.ball(torch.tensor(mids, dtype=torch.float64).to(dtype).reshape(shape),
                   torch.tensor(rads, dtype=torch.float64).reshape(shape))


def _bce_term(x, t):
    """-(t log x + (1 - t) log(1 - x)) with 0 log 0 = 0 for an exactly-zero coefficient; None where unbounded."""
    if not (0 <= x <= 1):
        return None
    total = mpmath.mpf(0)
    if t != 0:
        if x == 0:
            return None
        total -= to_mp(t) * mpmath.log(to_mp(x))
    if t != 1:
        if x == 1:
            return None
        total -= (1 - to_mp(t)) * mpmath.log1p(-to_mp(x))
    return total


def _bce_term_d(x, t):
    if not (0 <= x <= 1):
        return None
    total = Fraction(0)
    if t != 0:
        if x == 0:
            return None
        total -= t / x
    if t != 1:
        if x == 1:
            return None
        total += (1 - t) / (1 - x)
    return total


def _bce_exact(x, t, w, reduction):
    v = elementwise(_bce_term)(x, t)
    if w is not None:
        v = elementwise(lambda a, b: None if a is None else a * to_mp(b))(v, w)
    return _reduce(v, reduction)


def _bce_bwd_exact(g, x, t, w, reduction):
    v = elementwise(_bce_term_d)(x, t)
    v = elementwise(lambda a, b: None if a is None else a * b)(v, np.asarray(g, dtype=object))
    if w is not None:
        v = elementwise(lambda a, b: None if a is None else a * b)(v, w)
    n = np.asarray(x).size
    return elementwise(lambda a, b: None if a is None else a / b)(v, n) if reduction == 1 else v


@pytest.mark.parametrize("examples", EXAMPLES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("reduction", [0, 1, 2])
def test_binary_cross_entropy(reduction, dtype, examples):
    @settings(max_examples=examples)
    @given(probabilities(dtype, (2, 3)), probabilities(dtype, (2, 3)), balls(dtype, (2, 3), allow_nonfinite=False),
           st.booleans(), st.booleans())
    def run(x, t, g, plain_target, use_weight):
        if plain_target:
            t = t.mid
        w = torch.tensor([0.5, 1.0, 2.0], dtype=dtype) if use_weight else None
        wq = None if w is None else np.array([Fraction(v) for v in w.tolist()], dtype=object)
        with bg.record() as rec:
            out = check_sampled(lambda a, b: aten.binary_cross_entropy(a, b, w, reduction), [x, t],
                                lambda a, b: _bce_exact(a, b, wq, reduction), n_random=3)
        if bool(torch.isinf(out.rad).any()):
            assert rec.of_kind("domain")
        g = g if reduction == 0 else g[0, 0]
        check_sampled(lambda gg, a, b: aten.binary_cross_entropy_backward(gg, a, b, w, reduction), [g, x, t],
                      lambda gg, a, b: _bce_bwd_exact(gg, a, b, wq, reduction), n_random=3)

    run()


def test_binary_cross_entropy_clamp_is_measured():
    """PyTorch clamps log at -100; the true loss at x = 1e-60 (float64) is 138.15..., which the ball must contain."""
    x = bg.ball(torch.tensor([1e-60, 0.5], dtype=torch.float64))
    t = torch.tensor([1.0, 1.0], dtype=torch.float64)
    out = aten.binary_cross_entropy(x, t, None, 0)
    assert float(out.mid[0]) == 100.0
    assert bool(out[0].contains(tame(-mpmath.log(mpmath.mpf(1e-60)))))
    # and where the true loss is infinite (x exactly 0, t = 1) the radius is infinite with a domain event
    with bg.record() as rec:
        out = aten.binary_cross_entropy(bg.ball(torch.tensor([0.0, 0.5])), torch.tensor([1.0, 0.0]), None, 0)
    assert math.isinf(float(out.rad[0])) and math.isfinite(float(out.rad[1]))
    assert rec.of_kind("domain")
    # x exactly at the edge with the matching target: the loss is exactly 0 and the derivative 1 (resp. -1), which
    # PyTorch's clamped kernel reports as 0: finite balls containing the true values
    x = bg.ball(torch.tensor([0.0, 1.0]))
    t = torch.tensor([0.0, 1.0])
    out = aten.binary_cross_entropy(x, t, None, 0)
    assert float(out.rad.max()) < 1e-30
    grad = aten.binary_cross_entropy_backward(torch.ones(2), x, t, None, 0)
    assert grad.mid.tolist() == [0.0, 0.0] and bool(grad[0].contains(1.0)) and bool(grad[1].contains(-1.0))
    assert float(grad.rad.max()) <= 1 + 1e-6


def _bce_logits_term(x, t, p):
    return (1 - to_mp(t)) * softplus_mp(x) + to_mp(p) * to_mp(t) * softplus_mp(-to_mp(x))


@pytest.mark.parametrize("examples", EXAMPLES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
@pytest.mark.parametrize("reduction", [0, 1, 2])
def test_binary_cross_entropy_with_logits(reduction, dtype, examples):
    @settings(max_examples=examples)
    @given(balls(dtype, (2, 3)), probabilities(dtype, (2, 3)), st.booleans(), st.booleans())
    def run(x, t, use_pos, use_weight):
        pw = torch.tensor([0.5, 1.0, 3.0], dtype=dtype) if use_pos else None
        w = torch.tensor([2.0, 1.0, 0.25], dtype=dtype) if use_weight else None
        pq = np.array([Fraction(v) for v in (pw.tolist() if use_pos else [1, 1, 1])], dtype=object)

        def exact(a, b):
            v = np.frompyfunc(_bce_logits_term, 3, 1)(a, b, pq)
            if w is not None:
                v = v * np.array([to_mp(Fraction(c)) for c in w.tolist()], dtype=object)
            return _reduce(v, reduction)

        check_sampled(lambda a, b: aten.binary_cross_entropy_with_logits(a, b, w, pw, reduction), [x, t], exact,
                      n_random=3)

    run()


def test_binary_cross_entropy_with_logits_backward_is_composite():
    x = bg.ball(torch.randn(3, 4, dtype=torch.float64), 1e-12).requires_grad_()
    t = torch.rand(3, 4, dtype=torch.float64)
    F.binary_cross_entropy_with_logits(x, t, pos_weight=torch.rand(4, dtype=torch.float64)).backward()
    px = x.mid.detach().clone().requires_grad_()
    F.binary_cross_entropy_with_logits(px, t, pos_weight=torch.rand(4, dtype=torch.float64)).backward()
    assert isinstance(x.grad, BallTensor)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reduced_dtypes(dtype):
    """float16/bfloat16 midpoints (float32 radii): midpoint identity and containment for one op of each family."""
    torch.manual_seed(3)
    x = bg.ball((torch.randn(3, 4) * 3).to(dtype), 2.0**-10)
    y = bg.ball(torch.rand(3, 4).to(dtype), 2.0**-12)
    t = torch.randn(3, 4).to(dtype)
    g = bg.ball(torch.randn(3, 4).to(dtype))
    labels = torch.tensor([0, 3, 1])
    cases = [
        (lambda a: torch.relu(a), [x], lambda a: elementwise(_relu)(a)),
        (lambda a: F.leaky_relu(a, 0.1), [x], lambda a: elementwise(lambda v: v if v > 0 else q(0.1) * v)(a)),
        (lambda a: F.hardtanh(a), [x], lambda a: elementwise(lambda v: min(max(v, -1), 1))(a)),
        (lambda a: torch.softmax(a, -1), [x], lambda a: _along(a, 1, _softmax_row)),
        (lambda a: torch.log_softmax(a, 0), [x], lambda a: _along(a, 0, _log_softmax_row)),
        (lambda a, b: F.mse_loss(a, b), [x, t], lambda a, b: _mse(a, b, 1)),
        (lambda a: aten.nll_loss_forward(a, labels, None, 1, -100), [x],
         lambda a: _nll_exact(a, labels.tolist(), None, 1, -100)),
        (lambda a, b: F.binary_cross_entropy_with_logits(a, b), [x, y],
         lambda a, b: _reduce(np.frompyfunc(_bce_logits_term, 3, 1)(a, b, 1), 1)),
        (lambda a, b: aten.threshold_backward(a, b, 0), [g, torch.relu(x)],
         lambda a, b: elementwise(_threshold_bwd_exact(0.0))(a, b)),
        (lambda a, b: aten.tanh_backward(a, b), [g, torch.tanh(x)], lambda a, b: elementwise(_tanh_bwd)(a, b)),
    ]
    for op, args, exact_fn in cases:
        check_sampled(op, args, exact_fn, n_random=2)


# ----------------------------------------------------------------------------------------------------------------------
# argmax / argmin


def test_argmax_argmin():
    x = bg.ball(torch.tensor([[1.0, 3.0, 2.9], [0.0, -1.0, 5.0]]), torch.tensor([[0.0, 0.05, 0.05], [0.0, 0.0, 0.0]]))
    for fn, kwargs in [(torch.argmax, {"dim": 1}), (torch.argmin, {"dim": 1}), (torch.argmax, {}),
                       (torch.argmax, {"dim": 0, "keepdim": True})]:
        with bg.record() as rec:
            idx = fn(x, **kwargs)
        assert torch.equal(idx, fn(x.mid, **kwargs))
        assert not isinstance(idx, BallTensor)
    with bg.record() as rec:
        torch.argmax(x, dim=1)
    assert sum(e.count for e in rec.of_kind("kink")) == 1  # row 0: 3 ± 0.05 against 2.9 ± 0.05
    with bg.record() as rec:
        torch.argmin(x, dim=1)
    assert not rec.of_kind("kink")


# ----------------------------------------------------------------------------------------------------------------------
# (b) MUST-SHOW 1: random MLPs against an independent mpmath backprop


def _act_exact(name):
    """(f, f') of each activation on mpf values, written from the definitions (independent of ops/)."""
    if name == "relu":
        return (lambda z: z if z > 0 else mpmath.mpf(0)), (lambda z: mpmath.mpf(1) if z > 0 else mpmath.mpf(0))
    if name == "tanh":
        return mpmath.tanh, (lambda z: 1 - mpmath.tanh(z) ** 2)
    if name == "sigmoid":
        return sigmoid_mp, (lambda z: sigmoid_mp(z) * (1 - sigmoid_mp(z)))
    if name == "gelu":
        return gelu_mp, gelu_d_mp
    if name == "gelu_tanh":
        return gelu_tanh_mp, gelu_tanh_d_mp
    if name == "silu":
        return silu_mp, silu_d_mp
    if name == "leaky_relu":
        slope = mp(Fraction(0.1))
        return (lambda z: z if z > 0 else slope * z), (lambda z: mpmath.mpf(1) if z > 0 else slope)
    if name == "hardtanh":
        return (lambda z: min(max(z, -1), 1)), (lambda z: mpmath.mpf(1) if -1 < z < 1 else mpmath.mpf(0))
    raise KeyError(name)


ACT_MODULES = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "gelu": nn.GELU,
    "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
    "silu": nn.SiLU,
}
MORE_ACT_MODULES = {"leaky_relu": lambda: nn.LeakyReLU(0.1), "hardtanh": nn.Hardtanh}

# loss name -> (torch loss on (output, target), target kind). "bce" is BCE on sigmoid(output).
LOSSES = {
    "mse": (F.mse_loss, "real"),
    "ce": (F.cross_entropy, "class"),
    "bce": (lambda o, t: F.binary_cross_entropy(torch.sigmoid(o), t), "prob"),
    "bce_logits": (F.binary_cross_entropy_with_logits, "prob"),
    "l1": (F.l1_loss, "real"),
    "smooth_l1": (lambda o, t: F.smooth_l1_loss(o, t, beta=0.5), "real"),
    "huber": (lambda o, t: F.huber_loss(o, t, delta=0.5), "real"),
}


def _loss_gradient(loss, out, target):
    """dL/d(output) of each loss (mean reductions), from the definitions: MSE 2(o - t)/N; cross-entropy
    (softmax(o_n) - onehot(t_n))/B; BCE of sigmoid(o) and BCE-with-logits (sigmoid(o) - t)/N; L1 sign(o - t)/N;
    smooth L1 (beta 1/2) clamp(2(o - t), -1, 1)/N; Huber (delta 1/2) clamp(o - t, -1/2, 1/2)/N."""
    batch, classes = len(out), len(out[0])
    n = batch * classes
    half = mpmath.mpf(1) / 2
    if loss == "ce":
        delta = []
        for orow, t in zip(out, target):
            top = max(orow)
            e = [mpmath.exp(o - top) for o in orow]
            s = mpmath.fsum(e)
            delta.append([(ei / s - (1 if c == t else 0)) / batch for c, ei in enumerate(e)])
        return delta
    per = {
        "mse": lambda o, t: 2 * (o - t),
        "bce": lambda o, t: sigmoid_mp(o) - t,
        "bce_logits": lambda o, t: sigmoid_mp(o) - t,
        "l1": lambda o, t: mpmath.sign(o - t),
        "smooth_l1": lambda o, t: min(max(2 * (o - t), -1), 1),
        "huber": lambda o, t: min(max(o - t, -half), half),
    }[loss]
    return [[per(o, t) / n for o, t in zip(orow, trow)] for orow, trow in zip(out, target)]


def _mp_matrix(t: torch.Tensor):
    return [[mp(Fraction(v)) for v in row] for row in t.detach().to(torch.float64).tolist()]


def exact_mlp_gradients(layers, act, x, target, loss, relu_at_zero=0):
    """Exact gradients of loss(MLP(x)) w.r.t. every weight and bias, by a manual backprop in mpmath.

    ``layers``: [(W, b)] as mpf lists (W: out x in). Hidden layers apply ``act``; the last is linear; ``loss`` a key
    of ``LOSSES`` (``_loss_gradient``). ``relu_at_zero``: the one-sided derivative used where a relu pre-activation
    is exactly 0 (0 or 1)."""
    f, df = _act_exact(act)
    if act == "relu":
        df0 = df
        df = lambda z: mpmath.mpf(relu_at_zero) if z == 0 else df0(z)  # noqa: E731
    acts, pre = [x], []
    a = x
    for i, (w, b) in enumerate(layers):
        z = [[mpmath.fdot(row, wr) + bi for wr, bi in zip(w, b)] for row in a]
        pre.append(z)
        a = [[f(v) for v in row] for row in z] if i < len(layers) - 1 else z
        acts.append(a)
    out = acts[-1]
    batch = len(out)
    delta = _loss_gradient(loss, out, target)
    grads = [None] * len(layers)
    for i in range(len(layers) - 1, -1, -1):
        w, _ = layers[i]
        a_in = acts[i]
        g_w = [[mpmath.fdot([delta[n][o] for n in range(batch)], [a_in[n][j] for n in range(batch)])
                for j in range(len(w[0]))] for o in range(len(w))]
        g_b = [mpmath.fsum(delta[n][o] for n in range(batch)) for o in range(len(w))]
        grads[i] = (g_w, g_b)
        if i > 0:
            z = pre[i - 1]
            delta = [[mpmath.fdot([delta[n][o] for o in range(len(w))], [w[o][j] for o in range(len(w))])
                      * df(z[n][j]) for j in range(len(w[0]))] for n in range(batch)]
    return grads


def _random_mlp(seed):
    """Seed -> model configuration; seeds 0..11 cover every (activation, loss) pair of MUST-SHOW 1 once."""
    rng = random.Random(seed)
    acts = sorted(ACT_MODULES)
    act = acts[seed % len(acts)]
    loss = ("mse", "ce")[(seed // len(acts)) % 2]
    dtype = FLOAT_DTYPES[(seed + seed // len(acts)) % 2]
    depth = rng.randint(1, 5)
    widths = [rng.randint(1, 32) for _ in range(depth + 1)]
    classes = rng.randint(1, 8)
    batch = rng.randint(1, 16)
    radius = rng.choice([0.0, 0.0, 2.0**-30])
    return depth, widths, classes, act, loss, batch, dtype, radius


def _make_target(kind, batch, classes, dtype):
    if kind == "class":
        return torch.randint(0, classes, (batch,))
    if kind == "prob":
        return torch.rand(batch, classes, dtype=dtype)
    return torch.randn(batch, classes, dtype=dtype)


def _check_mlp(seed, depth, widths, classes, act, loss_name, batch, dtype, radius):
    torch.manual_seed(seed)
    modules = {**ACT_MODULES, **MORE_ACT_MODULES}
    mods = []
    for i in range(depth):
        mods += [nn.Linear(widths[i], widths[i + 1]), modules[act]()]
    mods.append(nn.Linear(widths[depth], classes))
    model = nn.Sequential(*mods).to(dtype)
    plain_model = copy.deepcopy(model)
    x = torch.randn(batch, widths[0], dtype=dtype)
    loss_fn, kind = LOSSES[loss_name]
    target = _make_target(kind, batch, classes, dtype)

    bg.ballify(model, rad=radius)
    loss_fn(model(x), target).backward()
    loss_fn(plain_model(x), target).backward()

    linears = [m for m in plain_model if isinstance(m, nn.Linear)]
    layers = [(_mp_matrix(m.weight), [mp(Fraction(v)) for v in m.bias.detach().to(torch.float64).tolist()])
              for m in linears]
    tgt = target.tolist() if kind == "class" else _mp_matrix(target)
    exact = exact_mlp_gradients(layers, act, _mp_matrix(x), tgt, loss_name)

    ball_linears = [m for m in model if isinstance(m, nn.Linear)]
    what = f"seed {seed} ({act}, {loss_name}, {dtype}, widths {widths}, {classes} outputs, batch {batch})"
    for i, (bm, pm) in enumerate(zip(ball_linears, linears)):
        for name, exact_grad in zip(("weight", "bias"), exact[i]):
            g = getattr(bm, name).grad
            assert isinstance(g, BallTensor), f"{what}: layer {i} {name}: plain gradient"
            assert torch.equal(g.mid, getattr(pm, name).grad), f"{what}: layer {i} {name}: midpoint differs"
            inside = g.contains(np.array(exact_grad, dtype=object))
            assert bool(inside.all()), f"{what}: layer {i} {name}: {int((~inside).sum())} element(s) miss the exact gradient"


MLP_SEEDS = [pytest.param(s, id=f"seed{s}") for s in range(12)] + [
    pytest.param(s, marks=pytest.mark.slow, id=f"seed{s}") for s in range(12, 212)
]


@pytest.mark.parametrize("seed", MLP_SEEDS)
def test_mlp_gradients_contain_exact_backprop(seed):
    _check_mlp(seed, *_random_mlp(seed))


@pytest.mark.parametrize("loss_name", sorted(LOSSES))
@pytest.mark.parametrize("act", sorted({**ACT_MODULES, **MORE_ACT_MODULES}))
def test_every_activation_and_loss(act, loss_name):
    """Every activation with every loss of issue 3, small models in both dtypes: bit-identical gradients and
    containment of the exact backprop."""
    seed = zlib_seed(act, loss_name)
    rng = random.Random(seed)
    for dtype in FLOAT_DTYPES:
        widths = [rng.randint(1, 6) for _ in range(3)]
        _check_mlp(seed, 2, widths, rng.randint(1, 4), act, loss_name, rng.randint(1, 4), dtype, 0.0)


def zlib_seed(*names) -> int:
    import zlib

    return zlib.crc32("/".join(names).encode())


def test_mlp_gradient_radii_are_informative():
    """Not just containment: for a small float64 relu MLP with exact parameters, every gradient keeps >= 40 bits."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3)).double()
    bg.ballify(model)
    F.cross_entropy(model(torch.randn(8, 6, dtype=torch.float64)), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])).backward()
    for p in model.parameters():
        scale = p.grad.mid.abs().max()
        assert float(p.grad.rad.max()) <= 2.0**-40 * float(scale)


# ----------------------------------------------------------------------------------------------------------------------
# (c) MUST-SHOW 2: a relu pre-activation exactly 0


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_relu_kink_at_exact_zero_preactivation(dtype):
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 1)).to(dtype)
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, -1.0], [0.5, 0.25]]))
        model[0].bias.copy_(torch.tensor([0.0, -3.0]))  # unit 0: z = x0 - x1 = 0 exactly; unit 1: z < 0
        model[2].weight.copy_(torch.tensor([[0.75, -2.0]]))
        model[2].bias.copy_(torch.tensor([0.125]))
    x = torch.tensor([[0.5, 0.5]], dtype=dtype)
    target = torch.tensor([[1.0]], dtype=dtype)
    plain_model = copy.deepcopy(model)
    bg.ballify(model)
    with bg.record() as rec:
        F.mse_loss(model(x), target).backward()
    F.mse_loss(plain_model(x), target).backward()
    kinks = [e for e in rec.of_kind("kink") if e.op == "aten.threshold_backward.default"]
    assert kinks and sum(e.count for e in kinks) == 1  # only unit 0; unit 1 is surely inactive

    layers = [(_mp_matrix(m.weight), [mp(Fraction(v)) for v in m.bias.detach().to(torch.float64).tolist()])
              for m in (plain_model[0], plain_model[2])]
    one_sided = [exact_mlp_gradients(layers, "relu", _mp_matrix(x), _mp_matrix(target), "mse", relu_at_zero=d)
                 for d in (0, 1)]
    assert one_sided[0][0][1][0] != one_sided[1][0][1][0]  # the two one-sided derivatives really differ
    for grads in one_sided:
        for layer, bm, pm in zip(grads, (model[0], model[2]), (plain_model[0], plain_model[2])):
            for name, exact_grad in zip(("weight", "bias"), layer):
                g = getattr(bm, name).grad
                assert torch.equal(g.mid, getattr(pm, name).grad)
                assert bool(g.contains(np.array(exact_grad, dtype=object)).all()), name
    # the surely-inactive unit 1 contributes exactly 0 to the first layer's gradient: no hull, only the absolute
    # (smallest-normal) terms of the sum/mm rules
    tiny = float(torch.finfo(dtype).tiny) * 4
    assert float(model[0].bias.grad.rad[1]) <= tiny and float(model[0].weight.grad.rad[1].max()) <= tiny


def test_relu_and_its_backward_gather_path_matches_the_full_size_path():
    """relu and threshold_backward compute the hull of touching elements on a gathered copy when few touch, with
    full-size passes otherwise: both paths must give the same radii (each element alone takes the full-size path)."""
    gen = torch.Generator().manual_seed(3)
    m = torch.randn(400, generator=gen, dtype=torch.float64)
    m[::97] = 0.0  # exact zeros (the kink marker) and tiny values that touch
    m[5::97] = 1e-4
    r = torch.rand(400, generator=gen, dtype=torch.float64) * 1e-3
    r[10::50] = 0.0
    x = bg.ball(m, r)
    g = bg.ball(torch.randn(400, generator=gen, dtype=torch.float64), torch.rand(400, generator=gen,
                                                                                  dtype=torch.float64) * 1e-2)
    y = torch.relu(x)
    gx = torch.ops.aten.threshold_backward.default(g, y, 0)
    assert 0 < int(((x.mid <= x.rad) & (-x.mid <= x.rad)).sum()) * 8 < 400  # the gather path ran
    for i in range(400):
        xi = bg.ball(m[i:i + 1], r[i:i + 1])
        yi = torch.relu(xi)
        gi = torch.ops.aten.threshold_backward.default(bg.ball(g.mid[i:i + 1], g.rad[i:i + 1]), yi, 0)
        assert torch.equal(yi.rad, y.rad[i:i + 1]) and torch.equal(yi.mid, y.mid[i:i + 1]), i
        assert torch.equal(gi.rad, gx.rad[i:i + 1]) and torch.equal(gi.mid, gx.mid[i:i + 1]), i
