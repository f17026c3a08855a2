"""Testing helpers for users and for ballgrad's own suite.

- Hypothesis strategies: ``float_values``, ``radii``, ``balls`` (adversarial midpoints and radii of any float dtype).
- ``sample_points``: exact rational points inside a ball (both end points, the midpoint, random interior points).
- ``assert_contains``: a containment assertion whose failure names the worst element, its ball and the exact value.
- ``exact``: exact rational value of a float / mpmath number (for comparisons "checked exactly").
"""

from __future__ import annotations

import math
import random
from fractions import Fraction

import torch

from ballgrad import rounding
from ballgrad.tensor import BallTensor, _contains_scalar, _to_fraction, ball

try:  # hypothesis is a dev dependency; the strategies are only defined where it is installed
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover
    st = None

__all__ = [
    "float_values",
    "radii",
    "balls",
    "ball_pairs",
    "sample_points",
    "assert_contains",
    "exact",
    "special_values",
]


def exact(v) -> Fraction | float | None:
    """Exact rational value of a float, int, Fraction or mpmath number (inf kept as float, NaN -> None)."""
    return _to_fraction(v)


def special_values(dtype: torch.dtype) -> list[float]:
    """Adversarial midpoints of ``dtype``: zeros of both signs, subnormals, the normal boundary, values near
    overflow, ones, and the infinities and NaN."""
    fi = torch.finfo(dtype)
    tiny = float(fi.smallest_normal)
    sub = rounding.eta(dtype)
    big = float(fi.max)
    vals = [0.0, -0.0, sub, -sub, 3 * sub, tiny, -tiny, tiny * 0.75, 1.0, -1.0, 0.5, 2.0, big, -big, big / 2,
            float(fi.eps), 1.0 + float(fi.eps), 1e-3, 3.0, -7.25]
    vals = [float(torch.tensor(v, dtype=torch.float64).to(dtype)) for v in vals]
    return vals + [math.inf, -math.inf, math.nan]


if st is not None:

    def float_values(dtype: torch.dtype = torch.float32, *, allow_nonfinite: bool = True, max_magnitude=None):
        """Floats representable in ``dtype``: ordinary values, powers of two, and the special values."""
        fi = torch.finfo(dtype)
        width = {torch.float16: 16, torch.float32: 32, torch.float64: 64, torch.bfloat16: 32}[dtype]
        lim = float(fi.max) if max_magnitude is None else float(torch.tensor(max_magnitude, dtype=torch.float64).to(torch.float32 if width == 32 else torch.float64))
        if dtype == torch.float16:
            lim = min(lim, 65504.0)
        ordinary = st.floats(-lim, lim, width=width, allow_nan=False, allow_infinity=False)
        if dtype == torch.bfloat16:
            ordinary = ordinary.map(lambda v: float(torch.tensor(v).to(torch.bfloat16)))
        specials = [v for v in special_values(dtype) if (allow_nonfinite or math.isfinite(v))]
        if max_magnitude is not None:
            specials = [v for v in specials if not math.isfinite(v) or abs(v) <= max_magnitude]
        moderate = st.floats(-8, 8, width=min(width, 32), allow_nan=False).map(
            lambda v: float(torch.tensor(v).to(dtype))
        )
        return st.one_of(moderate, ordinary, st.sampled_from(specials))

    def radii(dtype: torch.dtype = torch.float32, *, allow_inf: bool = True):
        """Radii in the radius dtype of ``dtype``: 0, subnormal, 1-ulp-like, moderate, huge, and +inf."""
        rd = rounding.rad_dtype(dtype)
        fi = torch.finfo(rd)
        choices = [0.0, 0.0, rounding.eta(rd), float(fi.eps), 1e-7, 1e-3, 0.5, 2.0, 1e30 if rd == torch.float32 else 1e300]
        if allow_inf:
            choices.append(math.inf)
        width = 32 if rd == torch.float32 else 64
        return st.one_of(
            st.sampled_from(choices),
            st.floats(0, 10, width=width, allow_nan=False),
            st.floats(0, 2.0 ** -17, width=width, allow_nan=False),
        )

    @st.composite
    def balls(draw, dtype: torch.dtype = torch.float32, shape=(4,), *, allow_nonfinite: bool = True,
              allow_inf_radius: bool = True, relative_radius: bool = True, max_magnitude=None):
        """A BallTensor of ``dtype`` and ``shape`` with adversarial midpoints and radii. With ``relative_radius``
        some radii are a random fraction of |mid| (the common case in training)."""
        n = math.prod(shape)
        mids = draw(st.lists(float_values(dtype, allow_nonfinite=allow_nonfinite, max_magnitude=max_magnitude),
                             min_size=n, max_size=n))
        rads = draw(st.lists(radii(dtype, allow_inf=allow_inf_radius), min_size=n, max_size=n))
        if relative_radius:
            scales = draw(st.lists(st.sampled_from([None, 2.0 ** -20, 2.0 ** -10, 0.25, 1.5]), min_size=n, max_size=n))
            rads = [r if s is None or not math.isfinite(m) else abs(m) * s for r, m, s in zip(rads, mids, scales)]
        mid = torch.tensor(mids, dtype=torch.float64).to(dtype).reshape(shape)
        rad = torch.tensor(rads, dtype=torch.float64).reshape(shape)
        return ball(mid, rad)

    @st.composite
    def ball_pairs(draw, dtype: torch.dtype = torch.float32, shape=(4,), **kwargs):
        """Two balls of the same dtype and shape."""
        return draw(balls(dtype, shape, **kwargs)), draw(balls(dtype, shape, **kwargs))

else:  # pragma: no cover

    def _needs_hypothesis(*_a, **_k):
        raise ImportError("ballgrad.testing strategies need hypothesis: pip install hypothesis")

    float_values = radii = balls = ball_pairs = _needs_hypothesis


def sample_points(b: BallTensor, n_random: int = 2, seed: int = 0) -> list[list[Fraction]]:
    """Exact rational points of each element's ball: lower end, upper end, midpoint and ``n_random`` interior points.

    Returns one list per element (flattened order). Elements with a non-finite midpoint or an infinite radius get
    an empty list: every value is inside such a ball, so there is nothing to check.
    """
    rng = random.Random(seed)
    mids = b.mid.detach().reshape(-1).tolist()
    rads = b.rad.detach().reshape(-1).tolist()
    out = []
    for m, r in zip(mids, rads):
        if not (math.isfinite(m) and math.isfinite(r)):
            out.append([])
            continue
        fm, fr = Fraction(m), Fraction(r)
        pts = [fm - fr, fm + fr, fm]
        for _ in range(n_random):
            pts.append(fm + fr * Fraction(rng.randint(-2**20, 2**20), 2**20))
        out.append(pts)
    return out


def assert_contains(b: BallTensor, exact_values, *, what: str = "value") -> None:
    """Assert that every exact value lies in its ball; on failure name the worst element, its ball and the value.

    ``exact_values``: a tensor, or a nested sequence of numbers / Fractions / mpmath numbers broadcastable to ``b``.
    """
    inside = b.contains(exact_values)
    if bool(inside.all()):
        return
    import numpy as np

    bad = (~inside).nonzero(as_tuple=False).tolist()
    if isinstance(exact_values, torch.Tensor):
        vals = exact_values.detach().to(torch.float64).expand(b.shape)
        get = lambda i: Fraction(float(vals[tuple(i)])) if math.isfinite(float(vals[tuple(i)])) else float(vals[tuple(i)])
    else:
        arr = np.broadcast_to(np.asarray(exact_values, dtype=object), tuple(b.shape))
        get = lambda i: _to_fraction(arr[tuple(i)])
    worst, worst_excess = None, None
    for i in bad:
        m = Fraction(float(b.mid[tuple(i)])) if math.isfinite(float(b.mid[tuple(i)])) else None
        v = get(i)
        r = Fraction(float(b.rad[tuple(i)]))
        excess = (abs(v - m) - r) / (r if r else 1) if (m is not None and isinstance(v, Fraction)) else math.inf
        if worst_excess is None or excess > worst_excess:
            worst, worst_excess = i, excess
    i = tuple(worst)
    v = get(worst)
    raise AssertionError(
        f"{len(bad)} of {b.numel()} {what}(s) not contained; worst at index {list(i)}: ball "
        f"{float(b.mid[i])!r} ± {float(b.rad[i])!r} but exact {what} is {float(v) if v is not None else 'NaN'!r} "
        f"(|exact - mid| exceeds rad by a factor {float(worst_excess) + 1 if worst_excess != math.inf else 'inf'})"
    )


def contains_exact(mid: float, rad: float, value) -> bool:
    """|value - mid| <= rad decided exactly (value a Fraction/float/mpf; rad inf contains everything)."""
    return _contains_scalar(mid, rad, _to_fraction(value))
