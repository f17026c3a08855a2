"""Shared test machinery: midpoint identity and exact containment against mpmath / exact rationals.

``check_rule(op, args, exact_fn)`` runs ``op`` on the balls and on their plain midpoints, asserts the midpoints are
bit-identical, the radius is never NaN or negative, and that for points sampled in every input ball (end points,
midpoint, random interior points) the exact value ``exact_fn(*points)`` lies in the output ball, decided in exact
rational arithmetic. ``exact_fn`` receives Fractions (or the Python scalars passed as args) and returns a Fraction,
an mpmath number, or None where the real function is undefined (the ball must then have an infinite radius).
"""

from __future__ import annotations

import itertools
import math
import random
from fractions import Fraction

import mpmath
import torch

from ballgrad.tensor import BallTensor
from ballgrad.testing import contains_exact, exact

mpmath.mp.prec = 256

SAMPLES = 2  # random interior points per element (the slow suite uses more)


def mp(x: Fraction):
    """A Fraction as an mpmath number at the working precision (256 bits)."""
    return mpmath.mpf(x.numerator) / x.denominator


def plain(x):
    return x.mid if isinstance(x, BallTensor) else x


def assert_same_bits(a: torch.Tensor, b: torch.Tensor) -> None:
    """Bit-identical midpoints: same dtype, shape, values, signs of zeros, and NaN positions."""
    assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, b.dtype, a.shape, b.shape)
    if a.dtype == torch.bool or not a.is_floating_point():
        assert torch.equal(a, b)
        return
    nan_a, nan_b = torch.isnan(a), torch.isnan(b)
    assert torch.equal(nan_a, nan_b), "NaN positions differ"
    ok = nan_a | ((a == b) & (torch.signbit(a) == torch.signbit(b)))
    assert bool(ok.all()), f"midpoints differ: {a[~ok][:5]} vs {b[~ok][:5]}"


def assert_valid_radius(out: BallTensor) -> None:
    assert out.rad.dtype == (torch.float32 if out.dtype in (torch.float16, torch.bfloat16) else out.dtype)
    assert not bool(torch.isnan(out.rad).any()), "NaN radius"
    assert bool((out.rad >= 0).all()), "negative radius"
    nonfinite_mid = ~torch.isfinite(out.mid)
    assert bool(torch.isinf(out.rad[nonfinite_mid]).all()), "non-finite midpoint with a finite radius"


def _points(x, shape, rng, n_random):
    """Per-element exact sample points for one argument broadcast to ``shape`` (None: any value / not a tensor)."""
    if not isinstance(x, torch.Tensor):
        return None
    m = plain(x).detach().to(torch.float64).expand(shape).reshape(-1).tolist()
    r = (x.rad.to(torch.float64) if isinstance(x, BallTensor) else torch.zeros(())).expand(shape).reshape(-1).tolist()
    pts = []
    for mi, ri in zip(m, r):
        if not (math.isfinite(mi) and math.isfinite(ri)):
            pts.append(None)
            continue
        fm, fr = Fraction(mi), Fraction(ri)
        choice = [fm - fr, fm + fr, fm] + [fm + fr * Fraction(rng.randint(-2**20, 2**20), 2**20) for _ in range(n_random)]
        pts.append(choice)
    return pts


def check_rule(op, args, exact_fn, *, kwargs=None, n_random=SAMPLES, seed=0, max_combos=12):
    """See the module docstring. Returns the output ball."""
    kwargs = kwargs or {}
    out = op(*args, **kwargs)
    ref = op(*[plain(a) for a in args], **kwargs)
    assert isinstance(out, BallTensor), f"{op} returned {type(out).__name__}, not a BallTensor"
    assert_same_bits(out.mid, ref)
    assert_valid_radius(out)
    shape = out.shape
    rng = random.Random(seed)
    per_arg = [_points(a, shape, rng, n_random) for a in args]
    mid_flat = out.mid.detach().to(torch.float64).reshape(-1).tolist()
    rad_flat = out.rad.detach().to(torch.float64).reshape(-1).tolist()
    for i, (m, r) in enumerate(zip(mid_flat, rad_flat)):
        if math.isinf(r):
            continue
        assert math.isfinite(m)
        options = []
        for a, pts in zip(args, per_arg):
            if pts is None:
                # Python scalar: its exact double as a Fraction (Fraction + float would round to a float)
                options.append([Fraction(a) if isinstance(a, (int, float)) and not isinstance(a, bool)
                                and math.isfinite(a) else a])
            elif pts[i] is None:
                options.append(None)  # a non-finite input element: the output must be infinite
            else:
                options.append(pts[i])
        assert all(o is not None for o in options), f"element {i}: non-finite input but finite radius {r}"
        combos = list(itertools.product(*options))
        if len(combos) > max_combos:
            # keep the aligned end-point combinations and a seeded sample of the rest
            keep = combos[:4] + rng.sample(combos[4:], max_combos - 4)
            combos = keep
        for pt in combos:
            y = exact_fn(*pt)
            if y is None:
                raise AssertionError(f"element {i}: ball {m} ± {r} is finite but the function is undefined at {pt}")
            if not contains_exact(m, r, y):
                raise AssertionError(
                    f"{op}: element {i}: exact value {mpmath.nstr(mpmath.mpf(exact(y).numerator) / exact(y).denominator, 20) if isinstance(exact(y), Fraction) else y} "
                    f"at {[float(p) for p in pt]} not in {m!r} ± {r!r}"
                )
    return out


# Hypothesis example counts: the default CI run samples, ``pytest -m slow`` runs 10x more.
import pytest  # noqa: E402

DEFAULT_EXAMPLES = 25
EXAMPLES = [
    pytest.param(DEFAULT_EXAMPLES, id="sampled"),
    pytest.param(10 * DEFAULT_EXAMPLES, marks=pytest.mark.slow, id="exhaustive"),
]
FLOAT_DTYPES = [torch.float32, torch.float64]
ALL_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
