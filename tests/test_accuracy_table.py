"""The trust table (src/ballgrad/accuracy.py) against mpmath: every CPU entry, on many points including hard cases.

For each library function the elementwise rules trust, torch's float64 CPU kernel is run on a seeded set of points
(random over the whole range plus the hard cases: near 0, subnormals, overflow/underflow thresholds, near 1 for log,
near -1 for log1p, large arguments for sin/cos up to 1e15 and near multiples of pi/2, the erfc tail up to 27.3, the
break points of the usual implementations), both as one large tensor (vector kernels: SLEEF / MKL VM) and in short
slices of 1 to 7 elements (scalar tail loops). The observed error |lib(x) - f(x)| / ulp(f(x)) (mpmath reference at
128 bits) must never exceed the DECLARED bound; the rules use twice that (the margin), so a failure here is an
assumption violated with the safety factor still intact, to be investigated before anything else.

Infinite or NaN library values are skipped: the rules treat them as "nothing known" (``accuracy.enclose`` gives a NaN
bound, hence an infinite radius), so no accuracy is assumed for them.

The default run uses about 5,000 points per function; ``-m slow`` runs 1,000,000 (several minutes: mpmath is the
reference for every point).
"""

from __future__ import annotations

import math
from fractions import Fraction

import mpmath
import numpy as np
import pytest
import torch

from ballgrad import accuracy, rounding

DEFAULT_POINTS = 5_000
SLOW_POINTS = 1_000_000
POINTS = [
    pytest.param(DEFAULT_POINTS, id="sampled"),
    pytest.param(SLOW_POINTS, marks=pytest.mark.slow, id="million"),
]
REFERENCE_PRECISION = 128
ETA = 2.0**-1074
DBL_MAX = float(np.finfo(np.float64).max)


# ----------------------------------------------------------------------------------------------------------------------
# Point sets (numpy float64, seeded)


def _signed(rng, x):
    return np.where(rng.random(x.shape) < 0.5, -x, x)


def _log_uniform(rng, n, lo_exp, hi_exp, signed=False):
    """|x| = 2^e, e uniform in [lo_exp, hi_exp] (down to the subnormal range when lo_exp < -1022)."""
    e = rng.uniform(lo_exp, hi_exp, n)
    x = np.ldexp(1.0 + rng.random(n), np.floor(e).astype(np.int64))
    x = np.where(np.isfinite(x), x, DBL_MAX)
    return _signed(rng, x) if signed else x


def _subnormals(rng, n, signed=False):
    x = rng.integers(1, 2**52, n).astype(np.float64) * ETA  # k * 2^-1074 exactly
    return _signed(rng, x) if signed else x


def _near(rng, n, centers, ulps=64):
    """Points within ``ulps`` ulps of the given centers (exact: k * spacing(c) is a small multiple of an ulp)."""
    c = rng.choice(np.asarray(centers, dtype=np.float64), n)
    k = rng.integers(-ulps, ulps + 1, n).astype(np.float64)
    step = np.spacing(np.minimum(np.abs(c), 2.0**1023))  # the ulp of [2^1023, DBL_MAX] without overflow
    with np.errstate(over="ignore"):
        return np.clip(c + k * step, -DBL_MAX, DBL_MAX)


def _uniform(rng, n, lo, hi):
    return rng.uniform(lo, hi, n)


def _nearest_multiples(rng, n, step, k_max):
    """Doubles nearest to k * step (step an mpmath constant) for random integers k: where sin/cos are tiny."""
    ks = rng.integers(1, k_max, n)
    return np.array([float(mpmath.mpf(int(k)) * step) for k in ks], dtype=np.float64)


def _mix(rng, n, parts):
    """Concatenate generators with the given weights (fractions of n), n points in all."""
    total = sum(w for w, _ in parts)
    out = []
    for i, (w, gen) in enumerate(parts):
        k = n - sum(len(o) for o in out) if i == len(parts) - 1 else int(round(n * w / total))
        out.append(np.asarray(gen(rng, k), dtype=np.float64))
    return np.concatenate(out)


LN2 = math.log(2)


def _points_exp(rng, n):
    return _mix(rng, n, [
        (40, lambda r, k: _uniform(r, k, -745.2, 709.8)),
        (10, lambda r, k: _log_uniform(r, k, -60, 0, signed=True)),
        (5, lambda r, k: _subnormals(r, k, signed=True)),
        (10, lambda r, k: _uniform(r, k, 709.0, 709.79)),
        (10, lambda r, k: _uniform(r, k, -708.5, -708.3)),
        (10, lambda r, k: _uniform(r, k, -745.2, -744.0)),
        (10, lambda r, k: _near(r, k, [j * LN2 / 2 for j in range(-2100, 2048)], 8)),
        (5, lambda r, k: _near(r, k, [709.782712893384, -708.3964185322641, -745.1332191019411], 512)),
    ])


def _points_expm1(rng, n):
    return _mix(rng, n, [
        (40, lambda r, k: _uniform(r, k, -40, 709.78)),
        (20, lambda r, k: _log_uniform(r, k, -1074, -1, signed=True)),
        (10, lambda r, k: _uniform(r, k, -1, 1)),
        (10, lambda r, k: _uniform(r, k, 709.0, 709.79)),
        (10, lambda r, k: _uniform(r, k, -38, -36)),
        (5, lambda r, k: _log_uniform(r, k, -30, -10, signed=True)),
        (5, lambda r, k: _near(r, k, [-36.7368005696771014, -37.42994775023705], 64)),  # where SLEEF saturates to -1
    ])


def _points_log_family(base):
    powers = [2.0**j for j in range(-1074, 1024)] if base == 2 else [float(f"1e{j}") for j in range(-323, 309)]

    def points(rng, n):
        return np.maximum(ETA, _mix(rng, n, [
            (35, lambda r, k: _log_uniform(r, k, -1074, 1023.99)),
            (10, lambda r, k: _subnormals(r, k)),
            (15, lambda r, k: 1.0 + r.integers(-2**20, 2**20, k) * 2.0**-53),
            (10, lambda r, k: 1.0 + _uniform(r, k, -1e-3, 1e-3)),
            (10, lambda r, k: _near(r, k, powers, 8)),
            (10, lambda r, k: _uniform(r, k, 0.5, 2.0)),
            (10, lambda r, k: _near(r, k, [DBL_MAX, 2.0**-1022], 1000)),
        ]))  # (the near-2^-1074 points below 0 are moved to 2^-1074)

    return points


def _points_log1p(rng, n):
    return _mix(rng, n, [
        (15, lambda r, k: -1.0 + r.integers(1, 2**20, k) * 2.0**-53),
        (10, lambda r, k: -1.0 + _log_uniform(r, k, -53, -1)),
        (20, lambda r, k: _log_uniform(r, k, -1074, -1, signed=True)),
        (20, lambda r, k: _uniform(r, k, -1, 1)),
        (20, lambda r, k: _log_uniform(r, k, -1, 1023.99)),
        (10, lambda r, k: _near(r, k, [math.sqrt(2) / 2 - 1, math.sqrt(2) - 1, 1.0, -0.5], 64)),
        (5, lambda r, k: _subnormals(r, k, signed=True)),
    ])


def _points_tanh(rng, n):
    return _mix(rng, n, [
        (35, lambda r, k: _uniform(r, k, -25, 25)),
        (20, lambda r, k: _log_uniform(r, k, -1074, 2, signed=True)),
        (10, lambda r, k: _near(r, k, [0.5493061443340548, -0.5493061443340548, 1.0, -1.0, 22.0, -22.0], 4096)),
        (10, lambda r, k: _uniform(r, k, 18.5, 19.5) * np.where(r.random(k) < 0.5, -1, 1)),
        (10, lambda r, k: _log_uniform(r, k, -30, -1, signed=True)),
        (10, lambda r, k: _log_uniform(r, k, 4, 1023, signed=True)),
        (5, lambda r, k: _subnormals(r, k, signed=True)),
    ])


def _points_trig(rng, n):
    half_pi = mpmath.pi / 2
    return _mix(rng, n, [
        (30, lambda r, k: _uniform(r, k, -10, 10)),
        (25, lambda r, k: _log_uniform(r, k, -1074, 49.8, signed=True)),
        (10, lambda r, k: _nearest_multiples(r, k, half_pi, 1000)),
        (10, lambda r, k: _nearest_multiples(r, k, half_pi, 2 * 10**14)),
        (5, lambda r, k: _near(r, k, [float(mpmath.mpf(j) * half_pi) for j in range(1, 64)], 16)),
        (10, lambda r, k: _log_uniform(r, k, 28, 32, signed=True)),
        (5, lambda r, k: _subnormals(r, k, signed=True)),
        (5, lambda r, k: _uniform(r, k, 9.9e14, 1e15)),
    ])


def _points_atan(rng, n):
    return _mix(rng, n, [
        (40, lambda r, k: _log_uniform(r, k, -1074, 1023.99, signed=True)),
        (20, lambda r, k: _uniform(r, k, -10, 10)),
        (15, lambda r, k: _near(r, k, [1.0, -1.0, 0.4375, 1.1875, 2.4375, -2.4375, 0.5, 2.0], 1024)),
        (15, lambda r, k: _log_uniform(r, k, -30, 60, signed=True)),
        (10, lambda r, k: _subnormals(r, k, signed=True)),
    ])


ERF_BREAKS = [0.84375, 1.25, 1 / 0.35, 6.0, 2.5, 4.0, 5.5, 1.0]


def _points_erf(rng, n):
    return _mix(rng, n, [
        (40, lambda r, k: _uniform(r, k, -6.5, 6.5)),
        (20, lambda r, k: _log_uniform(r, k, -1074, 1, signed=True)),
        (15, lambda r, k: _near(r, k, ERF_BREAKS + [-b for b in ERF_BREAKS], 2048)),
        (15, lambda r, k: _uniform(r, k, 5.5, 6.5) * np.where(r.random(k) < 0.5, -1, 1)),
        (5, lambda r, k: _log_uniform(r, k, -30, -2, signed=True)),
        (5, lambda r, k: _subnormals(r, k, signed=True)),
    ])


def _points_erfc(rng, n):
    return _mix(rng, n, [
        (30, lambda r, k: _uniform(r, k, -6, 27.3)),
        (25, lambda r, k: _uniform(r, k, 20, 27.3)),
        (10, lambda r, k: _uniform(r, k, 26.4, 27.3)),
        (15, lambda r, k: _near(r, k, ERF_BREAKS + [-b for b in ERF_BREAKS] + [26.55, 27.2, 28.0], 2048)),
        (15, lambda r, k: _log_uniform(r, k, -1074, 1, signed=True)),
        (5, lambda r, k: _uniform(r, k, -10, -5)),
    ])


def _points_sqrt(rng, n):
    squares = rng.integers(1, 2**26, 4096).astype(np.float64) ** 2
    return _mix(rng, n, [
        (50, lambda r, k: _log_uniform(r, k, -1074, 1023.99)),
        (15, lambda r, k: _subnormals(r, k)),
        (15, lambda r, k: _near(r, k, squares, 4)),
        (10, lambda r, k: _near(r, k, [DBL_MAX, 2.0**-1022, 1.0, 2.0, 4.0], 1000)),
        (10, lambda r, k: _uniform(r, k, 0, 100)),
    ])


def _points_sinh(rng, n):
    return _mix(rng, n, [
        (30, lambda r, k: _uniform(r, k, -710.4, 710.4)),
        (25, lambda r, k: _log_uniform(r, k, -1074, 3, signed=True)),
        (15, lambda r, k: _uniform(r, k, -3, 3)),
        (10, lambda r, k: _near(r, k, [0.5, 1.0, 22.0, 710.4758600739439, -710.4758600739439], 512)),
        (10, lambda r, k: _uniform(r, k, 700, 710.47) * np.where(r.random(k) < 0.5, -1, 1)),
        (10, lambda r, k: _subnormals(r, k, signed=True)),
    ])


def _points_asinh(rng, n):
    return _mix(rng, n, [
        (40, lambda r, k: _log_uniform(r, k, -1074, 1023.99, signed=True)),
        (20, lambda r, k: _uniform(r, k, -10, 10)),
        (15, lambda r, k: _near(r, k, [0.125, 0.5, 1.0, 2.0, 2.0**28, -0.5, -2.0], 512)),
        (15, lambda r, k: _log_uniform(r, k, -30, 30, signed=True)),
        (10, lambda r, k: _subnormals(r, k, signed=True)),
    ])


def _points_acosh(rng, n):
    return _mix(rng, n, [
        (30, lambda r, k: 1.0 + _log_uniform(r, k, -52, 0)),
        (15, lambda r, k: 1.0 + r.integers(0, 2**20, k) * 2.0**-52),
        (30, lambda r, k: _log_uniform(r, k, 0, 1023.99)),
        (15, lambda r, k: _near(r, k, [1.0, 1.5, 2.0, 2.0**28, DBL_MAX], 512)),
        (10, lambda r, k: _uniform(r, k, 1, 10)),
    ])


def _points_exp2(rng, n):
    return _mix(rng, n, [
        (40, lambda r, k: _uniform(r, k, -1075, 1024)),
        (20, lambda r, k: _log_uniform(r, k, -1074, 0, signed=True)),
        (15, lambda r, k: _uniform(r, k, -2, 2)),
        (15, lambda r, k: _near(r, k, [float(j) / 2 for j in range(-2150, 2048)], 8)),
        (10, lambda r, k: _uniform(r, k, 1022, 1024)),
    ])


POINTS_FOR = {
    "sinh": _points_sinh,
    "asinh": _points_asinh,
    "acosh": _points_acosh,
    "exp2": _points_exp2,
    "exp": _points_exp,
    "expm1": _points_expm1,
    "log": _points_log_family(2),
    "log2": _points_log_family(2),
    "log10": _points_log_family(10),
    "log1p": _points_log1p,
    "tanh": _points_tanh,
    "sin": _points_trig,
    "cos": _points_trig,
    "atan": _points_atan,
    "erf": _points_erf,
    "erfc": _points_erfc,
    "sqrt": _points_sqrt,
}

EXACT = {
    "sinh": mpmath.sinh,
    "asinh": mpmath.asinh,
    "acosh": mpmath.acosh,
    "exp2": lambda v: mpmath.power(2, v),
    "exp": mpmath.exp,
    "expm1": mpmath.expm1,
    "log": mpmath.log,
    "log2": lambda v: mpmath.log(v, 2),
    "log10": mpmath.log10,
    "log1p": mpmath.log1p,
    "tanh": mpmath.tanh,
    "sin": mpmath.sin,
    "cos": mpmath.cos,
    "atan": mpmath.atan,
    "erf": mpmath.erf,
    "erfc": mpmath.erfc,
    "sqrt": mpmath.sqrt,
}


# pow: the three call forms the rules use. Exponents of torch.pow(x, p) are never ones PyTorch special-cases
# (integers, +-1/2 go elsewhere in the rules).
POW_SCALAR_EXPONENTS = [2.5, -1.3, 1 / 3, 0.1, 7.25, -0.7, 1e-3, 123.456, -33.3, 0.75]
POW_SCALAR_BASES = [2.0, 0.5, 10.0, math.e, 1.5, 1e-3, 0.999, 1.001, 3.0]


def _points_pow_tensor(rng, n):
    """(x, y) with x^y mostly in the float64 range: y = t / log2(x) for a target exponent t, plus x near 1 with large
    |y|, small x with small y, and integer-valued y."""
    x = _mix(rng, n, [
        (60, lambda r, k: _log_uniform(r, k, -1074, 1023.99)),
        (20, lambda r, k: 1.0 + r.integers(-2**30, 2**30, k) * 2.0**-52),
        (20, lambda r, k: _uniform(r, k, 0, 10)),
    ])
    x = np.where(x == 1.0, 1.5, np.where(x == 0.0, 0.25, x))
    t = rng.uniform(-1080, 1023, n)
    y = t / np.log2(x)
    integer = rng.random(n) < 0.1
    y = np.where(integer, np.round(y), y)
    return x, y


def _points_pow_scalar_exponent(rng, n, p):
    t = rng.uniform(-1080, 1023, n)
    return np.exp2(np.clip(t / p, -1074, 1023.9))


def _points_pow_scalar_base(rng, n, s):
    return rng.uniform(-1080, 1023, n) / math.log2(s)


def _pow_cases(rng, n):
    """[(label, x, y, values_fn)] covering tensor^tensor, tensor^scalar and scalar^tensor."""
    cases = []
    x, y = _points_pow_tensor(rng, n // 2)
    cases.append(("tensor^tensor", x, y, lambda xs, ys: torch.pow(xs, ys)))
    m = n // (4 * len(POW_SCALAR_EXPONENTS))
    for p in POW_SCALAR_EXPONENTS:
        xs = _points_pow_scalar_exponent(rng, m, p)
        cases.append((f"tensor^{p}", xs, np.full_like(xs, p), lambda xs, ys, p=p: torch.pow(xs, p)))
    m = n // (4 * len(POW_SCALAR_BASES))
    for s in POW_SCALAR_BASES:
        ys = _points_pow_scalar_base(rng, m, s)
        cases.append((f"{s}^tensor", np.full_like(ys, s), ys, lambda xs, ys, s=s: torch.pow(s, ys)))
    return cases


# ----------------------------------------------------------------------------------------------------------------------
# Measuring


def _ulp(e):
    """ulp of an exact (mpmath) value in float64: 2^(floor(log2|e|) - 52), eta in the subnormal range."""
    if e == 0:
        return mpmath.mpf(ETA)
    _, ex = mpmath.frexp(e)  # |e| = f 2^ex, 1/2 <= f < 1
    return mpmath.ldexp(1, max(int(ex) - 1, -1022) - 52)


def _errors(values, args, exact_fn):
    """(max error in ulps, its arguments, number skipped) over points with a finite library value."""
    worst, worst_args, skipped = 0.0, None, 0
    with mpmath.workprec(REFERENCE_PRECISION):
        for v, a in zip(values, zip(*args)):
            if not math.isfinite(v):
                skipped += 1
                continue
            e = exact_fn(*[mpmath.mpf(t) for t in a])
            err = float(abs(mpmath.mpf(v) - e) / _ulp(e))
            if err > worst:
                worst, worst_args = err, a
    return worst, worst_args, skipped


def _chunked(fn, *tensors, rng):
    """fn applied to slices of 1 to 7 elements (scalar tails and short vector loops), concatenated."""
    n = tensors[0].numel()
    out, i = [], 0
    while i < n:
        k = int(rng.integers(1, 8))
        out.append(fn(*[t[i:i + k] for t in tensors]))
        i += k
    return torch.cat(out)


def _measure(fn, arrays, exact_fn, rng, n_chunked):
    """Max error of fn on the points, through the vector path (all points) and the short-slice path (the first
    n_chunked points; only the values that differ from the vector path need the reference again)."""
    tensors = [torch.from_numpy(np.ascontiguousarray(a)) for a in arrays]
    vector = fn(*tensors)
    worst, where, skipped = _errors(vector.tolist(), [a.tolist() for a in arrays], exact_fn)
    k = min(n_chunked, tensors[0].numel())
    short = _chunked(fn, *[t[:k] for t in tensors], rng=rng)
    differ = (short != vector[:k]) & ~(torch.isnan(short) & torch.isnan(vector[:k]))
    if bool(differ.any()):
        idx = differ.nonzero().flatten()
        w2, where2, _ = _errors(short[idx].tolist(), [t[:k][idx].tolist() for t in tensors], exact_fn)
        if w2 > worst:
            worst, where = w2, where2
    return worst, where, skipped


OBSERVED: dict[str, float] = {}


def _report(name, worst, where, skipped, n, declared):
    OBSERVED[name] = worst
    message = (
        f"{name}: max observed error {worst:.4f} ulps over {n} points (declared {declared} ulps) "
        f"at {[float(v) for v in where] if where else None}; {skipped} infinite/NaN values skipped"
    )
    print(message)
    return message


@pytest.mark.parametrize("n_points", POINTS)
@pytest.mark.parametrize("name", sorted(POINTS_FOR))
def test_declared_bound_holds(name, n_points):
    declared = accuracy.entry(name, "cpu").declared_ulps
    rng = np.random.default_rng(sum(map(ord, name)) * 7919 + n_points)
    x = POINTS_FOR[name](rng, n_points)
    fn = accuracy.EVALUATORS[name]
    exact_fn = EXACT[name]
    worst, where, skipped = _measure(fn, [x], exact_fn, rng, n_chunked=min(n_points, 20_000))
    message = _report(name, worst, where, skipped, n_points, declared)
    assert worst <= declared, message
    assert skipped < n_points // 4, message  # the point sets are meant to hit finite values


@pytest.mark.parametrize("n_points", POINTS)
def test_declared_bound_holds_pow(n_points):
    declared = accuracy.entry("pow", "cpu").declared_ulps
    rng = np.random.default_rng(4242 + n_points)
    worst_all, where_all, skipped_all, labels = 0.0, None, 0, []
    for label, x, y, fn in _pow_cases(rng, n_points):
        worst, where, skipped = _measure(fn, [x, y], mpmath.power, rng, n_chunked=min(len(x), 5_000))
        labels.append(f"{label}: {worst:.3f}")
        skipped_all += skipped
        if worst > worst_all:
            worst_all, where_all = worst, where
    message = _report("pow", worst_all, where_all, skipped_all, n_points, declared) + " [" + ", ".join(labels) + "]"
    assert worst_all <= declared, message
    assert skipped_all < n_points // 4, message


# ----------------------------------------------------------------------------------------------------------------------
# The table itself


def test_table_entries_are_complete_and_sourced():
    for name in accuracy.EVALUATORS:
        for backend in ("cpu", "cuda"):
            e = accuracy.entry(name, backend)
            assert e.declared_ulps > 0 and e.margin_ulps >= 2 * e.declared_ulps, e
            assert len(e.source) > 10, e
    assert set(POINTS_FOR) | {"pow"} == set(accuracy.EVALUATORS)


def test_unknown_backend_is_rejected():
    from ballgrad.errors import UnsupportedOpError

    with pytest.raises(UnsupportedOpError, match="accuracy table"):
        accuracy.entry("exp", "mps")


@pytest.mark.parametrize("name", sorted(accuracy.EVALUATORS))
def test_error_bound_formula(name):
    """err(v) >= K (2u(|v| + err) + eta) exactly (the fixed point behind ``f64_error_bound``), so that for every
    exact value e with |v - e| <= K ulp(e) <= K(2u|e| + eta) and |e| <= |v| + err, |v - e| <= err."""
    vals = [0.0, ETA, 3 * ETA, 2.0**-1022, 1e-300, 0.1, 1.0, 1.5, 2.0**52, 1e300, DBL_MAX, -1.0, -DBL_MAX]
    v = torch.tensor(vals, dtype=torch.float64)
    err = accuracy.f64_error_bound(name, v, "cpu")
    k = Fraction(accuracy.entry(name, "cpu").margin_ulps)
    u = rounding.unit_roundoff_exact(torch.float64)
    for vi, ei in zip(vals, err.tolist()):
        assert ei >= 0
        if math.isinf(ei):
            assert abs(vi) > 1e307
            continue
        assert Fraction(ei) >= k * (2 * u * (abs(Fraction(vi)) + Fraction(ei)) + Fraction(ETA)), (name, vi, ei)
    special = accuracy.f64_error_bound(name, torch.tensor([math.inf, -math.inf, math.nan], dtype=torch.float64))
    assert bool(torch.isinf(special).all())


def test_enclose_brackets_mpmath():
    x = torch.tensor([-3.0, -1e-5, 0.0, 1e-300, 0.7, 5.0, 700.0], dtype=torch.float64)
    lower, upper = accuracy.enclose("exp", x)
    with mpmath.workprec(REFERENCE_PRECISION):
        for xi, lo, hi in zip(x.tolist(), lower.tolist(), upper.tolist()):
            e = mpmath.exp(mpmath.mpf(xi))
            assert mpmath.mpf(lo) <= e <= mpmath.mpf(hi)
