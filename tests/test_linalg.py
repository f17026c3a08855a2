"""Linear algebra rules (mm, bmm, mv, dot, addmm, baddbmm, addmv, and what torch.matmul / F.linear reach) against
exact rational arithmetic.

Every output element is checked: for whole-matrix sample points of the input balls (all-lower, all-upper, midpoint,
the "outward" corner m + sign(m) r, random corners, random interior points) the exact product, computed with Python
integers (floats scaled by a power of two), must lie in the output ball. Output elements that depend on a non-finite
input must have an infinite radius. Midpoints are compared bit for bit with the plain op.
"""

import math
import random
from fractions import Fraction

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import ballgrad as bg
from ballgrad import guard, rounding
from ballgrad.errors import NumericsGuardError
from ballgrad.ops import linalg
from ballgrad.ops.registry import RULES
from ballgrad.tensor import BallTensor
from helpers import EXAMPLES, assert_same_bits, assert_valid_radius

aten = torch.ops.aten
RANDOM_BITS = 20  # interior points m + r j / 2^20


# ----------------------------------------------------------------------------------------------------------------------
# Exact checker


def _scale_bits(args) -> int:
    """Binary exponent S such that every midpoint and radius times 2^S is an integer."""
    s = 0
    for a in args:
        if isinstance(a, torch.Tensor):
            dt = a.dtype
            s = max(s, 1074 if dt == torch.float64 else 149)
    return s


def _to_ints(t: torch.Tensor, s: int) -> np.ndarray:
    """Exact integers t * 2^s (object array); non-finite entries become 0 (they are checked separately)."""
    flat = t.detach().to(torch.float64).reshape(-1).tolist()
    out = []
    for v in flat:
        if not math.isfinite(v):
            out.append(0)
            continue
        num, den = v.as_integer_ratio()
        out.append(num * (2 ** s // den))
    return np.array(out, dtype=object).reshape(tuple(t.shape))


def _sample_points(x, s: int, rng: random.Random, n_random: int):
    """Whole-tensor sample points of one argument, as integers scaled by 2^(s + RANDOM_BITS)."""
    if not isinstance(x, torch.Tensor):
        return None
    m = _to_ints(x.mid if isinstance(x, BallTensor) else x, s)
    r = _to_ints(x.rad, s) if isinstance(x, BallTensor) else np.zeros(m.shape, dtype=object)
    one = 2 ** RANDOM_BITS
    sign = np.vectorize(lambda v: 1 if v > 0 else (-1 if v < 0 else 1), otypes=[object])(m) if m.size else m
    pts = [m * one - r * one, m * one + r * one, m * one, m * one + sign * r * one]
    for _ in range(n_random):
        corner = np.array([rng.choice((-one, one)) for _ in range(m.size)], dtype=object).reshape(m.shape)
        pts.append(m * one + r * corner)
        inner = np.array([rng.randint(-one, one) for _ in range(m.size)], dtype=object).reshape(m.shape)
        pts.append(m * one + r * inner)
    return pts


def _nonfinite(x) -> torch.Tensor | None:
    if not isinstance(x, torch.Tensor):
        return None
    bad = ~torch.isfinite(x.mid if isinstance(x, BallTensor) else x)
    if isinstance(x, BallTensor):
        bad = bad | ~torch.isfinite(x.rad)
    return bad.to(torch.float64)


def _plain(x):
    return x.mid if isinstance(x, BallTensor) else x


def check_gemm(op, args, exact_fn, *, n_random=1, seed=0, max_points=8):
    """Run ``op`` on the balls and on the midpoints; check bit-identical midpoints, valid radii, infinite radii where a
    non-finite input is involved, and exact containment of ``exact_fn(*points)`` (a Fraction array, the points being
    Fraction arrays) for whole-tensor sample points."""
    out = op(*args)
    ref = op(*[_plain(a) for a in args])
    assert isinstance(out, BallTensor)
    assert_same_bits(out.mid, ref)
    assert_valid_radius(out)
    # Dependencies on non-finite inputs: the op applied to the non-finite masks (ones elsewhere).
    masks = [_nonfinite(a) for a in args]
    ones = [torch.ones_like(_plain(a), dtype=torch.float64) if isinstance(a, torch.Tensor) else a for a in args]
    bad = torch.zeros(out.shape, dtype=torch.bool)
    for i, mask in enumerate(masks):
        if mask is None or not bool(mask.any()):
            continue
        probe = [(ones[j] + mask) if j == i else ones[j] for j in range(len(args))]
        bad |= op(*probe).reshape(out.shape) != op(*ones).reshape(out.shape)
    assert bool(torch.isinf(out.rad[bad]).all()), "an output depending on a non-finite input has a finite radius"
    s = _scale_bits(args)
    rng = random.Random(seed)
    per_arg = [_sample_points(a, s, rng, n_random) for a in args]
    n_pts = min(max_points, max(len(p) for p in per_arg if p is not None))
    denom = 2 ** (s + RANDOM_BITS)
    mids = out.mid.detach().to(torch.float64).reshape(-1).tolist()
    rads = out.rad.detach().to(torch.float64).reshape(-1).tolist()
    bad_flat = bad.reshape(-1).tolist()
    for p in range(n_pts):
        point = [a if pts is None else pts[p % len(pts)] for a, pts in zip(args, per_arg)]
        fracs = [pt if not isinstance(pt, np.ndarray) else (pt, denom) for pt in point]
        exact = np.asarray(exact_fn(*fracs), dtype=object).reshape(-1)
        for i, (m, r) in enumerate(zip(mids, rads)):
            if bad_flat[i] or math.isinf(r):
                continue
            value = exact[i]
            if abs(value - Fraction(m)) > Fraction(r):
                raise AssertionError(
                    f"element {i}: exact {float(value)!r} not in {m!r} ± {r!r} "
                    f"(|exact - mid| = {float(abs(value - Fraction(m)))!r}), sample {p}"
                )
    return out


def _frac(pt):
    """(integer array, denominator) -> Fraction array; Python numbers -> Fraction."""
    if isinstance(pt, tuple):
        ints, denom = pt
        return np.vectorize(lambda v: Fraction(v, denom), otypes=[object])(ints) if ints.size else ints
    return Fraction(pt)


def exact_matmul(a, b):
    """Exact matmul with numpy's (= torch's) broadcasting and 1-D rules, products of integers, one division."""
    (ia, da), (ib, db) = a, b
    prod = np.matmul(ia, ib) if ia.size and ib.size else np.zeros(_matmul_shape(ia.shape, ib.shape), dtype=object)
    d = da * db
    if isinstance(prod, np.ndarray):
        return np.vectorize(lambda v: Fraction(v, d), otypes=[object])(prod) if prod.size else prod
    return Fraction(prod, d)


def _matmul_shape(sa, sb):
    return torch.matmul(torch.empty(sa), torch.empty(sb)).shape


def exact_addmm(bias, a, b, beta, alpha, bias_shape_out):
    prod = np.asarray(exact_matmul(a, b), dtype=object)
    c = np.broadcast_to(np.asarray(_frac(bias), dtype=object), bias_shape_out)
    beta_f, alpha_f = Fraction(beta), Fraction(alpha)
    out = np.empty(bias_shape_out, dtype=object)
    for idx in np.ndindex(*bias_shape_out):
        out[idx] = (beta_f * c[idx] if beta_f else Fraction(0)) + (alpha_f * prod[idx] if alpha_f else Fraction(0))
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Inputs


def _values(shape, dtype, gen, scale_exp=8):
    """Mid values: signed normals scaled by random powers of two, exact zeros and small integers."""
    n = math.prod(shape)
    base = torch.randn(n, generator=gen, dtype=torch.float64)
    exps = torch.randint(-scale_exp, scale_exp + 1, (n,), generator=gen).to(torch.float64)
    vals = base * torch.exp2(exps)
    kind = torch.randint(0, 10, (n,), generator=gen)
    vals = torch.where(kind == 0, torch.zeros_like(vals), vals)
    vals = torch.where(kind == 1, torch.round(base * 4), vals)
    return vals.to(dtype).reshape(shape)


def make_operand(shape, dtype, gen, mode):
    """mode: 'ball' (mixed relative/absolute/zero radii), 'point' (a ball with radius identically 0), 'plain'
    (a plain tensor), 'rel' (relative radii only)."""
    mid = _values(shape, dtype, gen)
    if mode == "plain":
        return mid
    if mode == "point":
        return bg.ball(mid)
    m64 = mid.to(torch.float64).abs()
    rel = m64 * torch.exp2(-torch.randint(2, 24, tuple(shape), generator=gen).to(torch.float64))
    if mode == "rel":
        return bg.ball(mid, rel)
    absolute = torch.exp2(-torch.randint(5, 30, tuple(shape), generator=gen).to(torch.float64))
    choice = torch.randint(0, 4, tuple(shape), generator=gen)
    rad = torch.where(choice == 0, rel, torch.where(choice == 1, absolute, torch.where(choice == 2, rel + absolute,
                                                                                        torch.zeros_like(rel))))
    return bg.ball(mid, rad)


K_CHOICES = [1, 64, 0, 7, 31, 2]  # the first cases of every combination, then random k in [0, 64]
OPERAND_MODES = [("ball", "ball"), ("point", "ball"), ("ball", "point"), ("plain", "ball"), ("ball", "plain"),
                 ("point", "point")]


def _shapes(op, k, gen):
    n = int(torch.randint(0, 5, (1,), generator=gen)) if op != "dot" else None
    p = int(torch.randint(1, 5, (1,), generator=gen))
    b = int(torch.randint(1, 3, (1,), generator=gen))
    if op == "mm":
        return (n, k), (k, p)
    if op == "bmm":
        return (b, n, k), (b, k, p)
    if op == "mv":
        return (n, k), (k,)
    return (k,), (k,)


GEMM_OPS = {"mm": torch.mm, "bmm": torch.bmm, "mv": torch.mv, "dot": torch.dot}


def _cases(examples):
    return max(2, examples // 4)


# ----------------------------------------------------------------------------------------------------------------------
# Tests

# Every GEMM test runs with each midpoint-error bound: "measured" (float64 reference, the default) and "a-priori"
# (gamma_k |A||B|). Radius GEMMs run in bfloat16 (Lemma B) only from ``_BF16_MIN_MACS_*`` multiply-adds on, far
# larger than these tests' GEMMs, so the configs pin them: "measured" and "a-priori-float32" keep float32 radius
# GEMMs (the fallback elsewhere too), "measured-bfloat16" and "a-priori" force bfloat16 where this CPU allows.
# The measured bound's passes over 2-D float32 outputs run as ``fused``'s GEMM kernels from ``_FUSED_GEMM_MIN``
# elements on: "measured" and "measured-bfloat16" force them for every size, "measured-reference" never.
# "a-priori-one-gemm" forces Lemma B1 (two balls in one bfloat16 GEMM) wherever both operands are balls; "a-priori"
# takes it only where B's radius is small, which these tests' random radii seldom are.
GEMM_CONFIGS = ["measured", "measured-bfloat16", "measured-reference", "a-priori", "a-priori-one-gemm",
                "a-priori-float32"]


@pytest.fixture(params=GEMM_CONFIGS)
def gemm_config(request, monkeypatch):
    if request.param in ("measured", "measured-bfloat16"):
        monkeypatch.setattr(linalg, "_FUSED_GEMM_MIN", 0)
    if request.param == "measured-reference":
        monkeypatch.setattr(linalg, "_FUSED_GEMM_MIN", math.inf)
    if request.param == "a-priori-float32":
        monkeypatch.setattr(linalg, "_BF16_RADIUS", False)
    if request.param == "measured-bfloat16":
        monkeypatch.setattr(linalg, "_BF16_MIN_MACS_MEASURED", 0)
    if request.param in ("a-priori", "a-priori-one-gemm"):
        monkeypatch.setattr(linalg, "_BF16_MIN_MACS_A_PRIORI", 0)
    if request.param == "a-priori-one-gemm":
        monkeypatch.setattr(linalg, "_ONE_GEMM", True)
    with bg.gemm_bound("measured" if request.param.startswith("measured") else "a-priori"):
        yield request.param


@pytest.mark.parametrize("examples", EXAMPLES)
@pytest.mark.parametrize("modes", OPERAND_MODES, ids=lambda m: f"{m[0]}-{m[1]}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("op", sorted(GEMM_OPS))
def test_gemm_random(op, dtype, modes, examples, gemm_config):
    gen = torch.Generator().manual_seed(hash((op, str(dtype), modes)) % 2**31)
    for case in range(_cases(examples)):
        k = K_CHOICES[case] if case < len(K_CHOICES) else int(torch.randint(0, 65, (1,), generator=gen))
        sa, sb = _shapes(op, k, gen)
        a = make_operand(sa, dtype, gen, modes[0])
        b = make_operand(sb, dtype, gen, modes[1])
        check_gemm(GEMM_OPS[op], [a, b], exact_matmul, seed=case)


@pytest.mark.parametrize("examples", EXAMPLES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("op", ["mm", "bmm", "mv", "dot"])
def test_gemm_reduced_dtypes(op, dtype, examples, gemm_config):
    """float16/bfloat16 midpoints (oneDNN/AMX kernels for k >= 64), radii in float32."""
    gen = torch.Generator().manual_seed(7)
    for case, k in enumerate([1, 8, 64, 100][: max(2, examples // 6)]):
        sa, sb = _shapes(op, k, gen)
        a = make_operand(sa, dtype, gen, "ball")
        b = make_operand(sb, dtype, gen, "point" if case % 2 else "ball")
        out = check_gemm(GEMM_OPS[op], [a, b], exact_matmul, seed=case)
        assert out.rad.dtype == torch.float32


@pytest.mark.parametrize("op", ["mm", "mv", "bmm"])
def test_bfloat16_subnormal_inputs_read_as_zero(op, gemm_config):
    """AMX reads bfloat16 subnormals as 0 (measured: 2^-130 * 2^20 terms vanish for k >= 64): the radius covers it."""
    k, n = 128, 64
    a = torch.full((n, k), 2.0 ** -130, dtype=torch.bfloat16)
    b = torch.full((k, n), 2.0 ** 20, dtype=torch.bfloat16)
    if op == "mv":
        b = b[:, 0].contiguous()
    if op == "bmm":
        a, b = a[None], b[None]
    for args in ([bg.ball(a), b], [a, bg.ball(b)], [bg.ball(a), bg.ball(b)]):
        out = check_gemm(GEMM_OPS[op], args, exact_matmul, max_points=3)
        assert bool(torch.isfinite(out.rad).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_subnormal_products(dtype, gemm_config):
    """Products that round in the subnormal range: 3 eta * 0.5 = 1.5 eta rounds to 2 eta (an absolute error eta/2
    per product that no relative bound covers); exact k-term sums must stay inside."""
    eta = rounding.eta(dtype)
    for k in (1, 7, 64):
        a = torch.full((3, k), 3 * eta, dtype=dtype)
        b = torch.full((k, 2), 0.5, dtype=dtype)
        out = check_gemm(torch.mm, [bg.ball(a), b], exact_matmul)
        assert bool((out.rad > 0).all())
        check_gemm(torch.mm, [a, bg.ball(b)], exact_matmul)
        tiny = torch.full((4,), eta, dtype=dtype) * torch.tensor([1.0, 3.0, 5.0, 7.0], dtype=dtype)
        check_gemm(torch.dot, [bg.ball(tiny, eta), bg.ball(torch.full((4,), 0.25, dtype=dtype), 2 ** -30)],
                   exact_matmul)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_near_overflow_and_nonfinite(dtype, gemm_config):
    big = float(torch.finfo(dtype).max)
    a = torch.tensor([[big / 4, big / 4, 1.0], [1.0, 2.0, 3.0], [-big / 2, big / 2, 0.5]], dtype=dtype)
    b = torch.tensor([[3.0, 3.0], [3.0, 0.5], [2.0, -1.0]], dtype=dtype)
    out = check_gemm(torch.mm, [bg.ball(a, torch.full((3, 3), 1e-3)), bg.ball(b, 1e-3)], exact_matmul)
    assert math.isinf(float(out.mid[0, 0])) and math.isinf(float(out.rad[0, 0]))  # 1.5 max overflows
    assert math.isfinite(float(out.rad[1, 0]))
    check_gemm(torch.mm, [a, bg.ball(b)], exact_matmul)
    # inf and NaN entries: their row / column becomes infinite, the rest stays finite and contained
    a2 = a.clone()
    a2[0, 0] = math.inf
    a2[2, 2] = math.nan
    a2[2, 0] = 1.0
    a2[2, 1] = 1.0
    out = check_gemm(torch.mm, [bg.ball(a2, 1e-3), b], exact_matmul)
    assert bool(torch.isinf(out.rad[0]).all()) and bool(torch.isinf(out.rad[2]).all())
    assert bool(torch.isfinite(out.rad[1]).all())
    # an infinite radius with a finite midpoint
    out = check_gemm(torch.mm, [bg.ball(torch.ones(2, 3, dtype=dtype), torch.tensor([[0, math.inf, 0], [0, 0, 0]])),
                                bg.ball(torch.ones(3, 2, dtype=dtype))], exact_matmul)
    assert bool(torch.isinf(out.rad[0]).all()) and bool(torch.isfinite(out.rad[1]).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_zero_radii_empty_dims(dtype, gemm_config):
    a = torch.randn(3, 0, dtype=dtype)
    b = torch.randn(0, 4, dtype=dtype)
    out = check_gemm(torch.mm, [bg.ball(a), bg.ball(b)], exact_matmul)
    assert torch.equal(out.mid, torch.zeros(3, 4, dtype=dtype))
    assert bool((out.rad <= 2 * float(torch.finfo(dtype).smallest_normal)).all())  # only the absolute allowance
    out = check_gemm(torch.mm, [bg.ball(torch.randn(0, 5, dtype=dtype)), bg.ball(torch.randn(5, 2, dtype=dtype))],
                     exact_matmul)
    assert out.shape == (0, 2)
    out = check_gemm(torch.dot, [bg.ball(torch.zeros(0, dtype=dtype)), torch.zeros(0, dtype=dtype)], exact_matmul)
    # exact small integers: the product is exact, the radius is only the (tiny) rounding allowance
    a = torch.arange(12, dtype=dtype).reshape(3, 4)
    out = check_gemm(torch.mm, [bg.ball(a), a.t().contiguous()], exact_matmul)
    exact = a.double() @ a.t().double()
    assert bool((out.rad.double() <= exact.abs() * 1e-5 + 1e-300).all())


ALPHA_BETA = [(1, 1), (0.5, 2), (0.1, -0.3), (0, 1), (1, 0), (-1, 3)]


@pytest.mark.parametrize("examples", EXAMPLES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.filterwarnings("ignore:An output with one or more elements was resized:UserWarning")
@pytest.mark.parametrize("beta,alpha", ALPHA_BETA)
@pytest.mark.parametrize("op", ["addmm", "baddbmm", "addmv"])
def test_addmm_family(op, beta, alpha, dtype, examples, gemm_config):
    gen = torch.Generator().manual_seed(11)
    for case in range(max(2, examples // 10)):
        k = [0, 1, 4, 33, 64][case % 5]
        n, p, bt = 3, 2, 2
        if op == "addmm":
            sa, sb, out_shape = (n, k), (k, p), (n, p)
            bias_shape = [(p,), (n, p), (1, p)][case % 3]
            torch_op = torch.addmm
        elif op == "baddbmm":
            sa, sb, out_shape = (bt, n, k), (bt, k, p), (bt, n, p)
            bias_shape = [(p,), (bt, n, p), (n, 1)][case % 3]
            torch_op = torch.baddbmm
        else:
            sa, sb, out_shape = (n, k), (k,), (n,)
            bias_shape = [(n,), (1,)][case % 2]
            torch_op = torch.addmv
        bias = make_operand(bias_shape, dtype, gen, ["ball", "plain", "point"][case % 3])
        a = make_operand(sa, dtype, gen, ["ball", "point", "plain"][case % 3])
        b = make_operand(sb, dtype, gen, ["ball", "ball", "point"][case % 3])

        def run(c, x, y):
            return torch_op(c, x, y, beta=beta, alpha=alpha)

        check_gemm(run, [bias, a, b],
                   lambda c, x, y: exact_addmm(c, x, y, beta, alpha, out_shape), seed=case)


def test_addmm_reduced_dtype_and_prescaling_underflow():
    """bfloat16 addmm; and alpha pre-scaling an operand into the subnormal range (3-factor products)."""
    gen = torch.Generator().manual_seed(3)
    a = make_operand((4, 70), torch.bfloat16, gen, "ball")
    b = make_operand((70, 3), torch.bfloat16, gen, "ball")
    c = make_operand((3,), torch.bfloat16, gen, "ball")
    check_gemm(lambda z, x, y: torch.addmm(z, x, y, beta=0.5, alpha=0.1), [c, a, b],
               lambda z, x, y: exact_addmm(z, x, y, 0.5, 0.1, (4, 3)))
    eta = rounding.eta(torch.float64)
    a = torch.full((2, 5), 3 * eta, dtype=torch.float64)
    b = torch.full((5, 2), 2.0 ** 40, dtype=torch.float64)
    for alpha in (0.5, 0.3, 2.0 ** -10):
        zeros = torch.zeros(2, dtype=torch.float64)
        check_gemm(lambda z, x, y: torch.addmm(z, x, y, alpha=alpha), [zeros, bg.ball(a), b],
                   lambda z, x, y: exact_addmm(z, x, y, 1, alpha, (2, 2)))


MATMUL_SHAPES = [((3,), (3,)), ((2, 3), (3,)), ((3,), (3, 4)), ((2, 3), (3, 4)), ((5, 2, 3), (3, 4)),
                 ((2, 3), (5, 3, 4)), ((5, 2, 3), (5, 3, 4)), ((2, 2, 2, 3), (2, 2, 3, 4)), ((2, 2, 2, 3), (3,)),
                 ((3,), (2, 2, 3, 4)), ((2, 1, 2, 3), (3, 3, 2))]


@pytest.mark.parametrize("shapes", MATMUL_SHAPES, ids=str)
def test_matmul_shapes(shapes, gemm_config):
    """torch.matmul for 1-D..4-D: dot, mv, mm, bmm after exact views (1-D @ N-D uses squeeze_ after mm)."""
    sa, sb = shapes
    if len(sa) == 1 and len(sb) == 2 and aten.squeeze_.dim not in RULES:
        pytest.skip("1-D @ 2-D matmul ends with aten.squeeze_.dim, an in-place view op without a rule yet")
    gen = torch.Generator().manual_seed(len(sa) * 10 + len(sb))
    for modes in (("ball", "ball"), ("plain", "ball"), ("ball", "point")):
        a = make_operand(sa, torch.float32, gen, modes[0])
        b = make_operand(sb, torch.float32, gen, modes[1])
        check_gemm(torch.matmul, [a, b], exact_matmul, max_points=5)


@pytest.mark.parametrize("x_shape", [(4,), (2, 4), (3, 2, 4), (2, 2, 2, 4)], ids=str)
@pytest.mark.parametrize("with_bias", [False, True])
def test_linear(x_shape, with_bias, gemm_config):
    """F.linear: mm / addmm (bias) after views; weight ball or input ball."""
    if len(x_shape) == 1 and not with_bias and aten.squeeze_.dim not in RULES:
        pytest.skip("1-D F.linear without bias ends with aten.squeeze_.dim, which has no rule yet")
    gen = torch.Generator().manual_seed(len(x_shape))
    out_shape = x_shape[:-1] + (3,)
    for x_mode, w_mode in (("ball", "plain"), ("plain", "ball"), ("ball", "ball")):
        x = make_operand(x_shape, torch.float64, gen, x_mode)
        w = make_operand((3, 4), torch.float64, gen, w_mode)
        if with_bias:
            bias = make_operand((3,), torch.float64, gen, "ball")
            check_gemm(F.linear, [x, w, bias],
                       lambda xx, ww, bb: exact_addmm(bb, xx, (ww[0].T, ww[1]), 1, 1, out_shape), max_points=5)
        else:
            check_gemm(F.linear, [x, w], lambda xx, ww: exact_matmul(xx, (ww[0].T, ww[1])), max_points=5)


@pytest.mark.parametrize("radius_gemm,shrink_bits", [("float32", 10), ("bfloat16", 4), ("bfloat16-one-gemm", 4)])
def test_negative_control_too_small_radius_is_caught(radius_gemm, shrink_bits, monkeypatch):
    """Scaling one computed mm radius by (1 - 2^-shrink_bits) must make containment fail at the adversarial corner
    (positive midpoints, upper end points): the checker would catch a too-small bound. With float32 radius GEMMs the
    bound is within 2^-10 of that corner; bfloat16 radius GEMMs (Lemma B) are up to about 3% wider (operands rounded
    to 8 bits, 3 bfloat16 roundings in the constants), so there a 2^-4 shrink must already fail; so too for Lemma
    B1's one GEMM (B nearly a point, radius 2^-30 |mB|)."""
    if radius_gemm == "float32":
        monkeypatch.setattr(linalg, "_BF16_RADIUS", False)
    elif not linalg._bf16_radius_gemms():
        pytest.skip("no fast bfloat16 GEMM on this CPU: radius GEMMs run in float32")
    else:
        monkeypatch.setattr(linalg, "_gemm_bound", "a-priori")
        monkeypatch.setattr(linalg, "_BF16_MIN_MACS_A_PRIORI", 0)  # this small GEMM would otherwise keep float32
    gen = torch.Generator().manual_seed(5)
    k = 32
    ma = torch.rand(4, k, generator=gen) + 0.5
    mb = torch.rand(k, 3, generator=gen) + 0.5
    a = bg.ball(ma, ma * 2.0 ** -6)
    b = bg.ball(mb, mb * 2.0 ** (-30 if radius_gemm == "bfloat16-one-gemm" else -6))
    if radius_gemm == "bfloat16-one-gemm":  # B1 must be the path taken
        monkeypatch.setitem(linalg._ACCUMULATE, aten.mm.default, None)
    out = check_gemm(torch.mm, [a, b], exact_matmul)
    shrunk = BallTensor(out.mid, out.rad.clone())
    shrunk.rad[1, 2] = out.rad[1, 2] * (1 - 2.0 ** -shrink_bits)
    upper_a = [Fraction(v) + Fraction(r) for v, r in zip(ma[1].tolist(), a.rad[1].tolist())]
    upper_b = [Fraction(v) + Fraction(r) for v, r in zip(mb[:, 2].tolist(), b.rad[:, 2].tolist())]
    worst = sum(x * y for x, y in zip(upper_a, upper_b))
    assert bool(out.contains([[worst if (i, j) == (1, 2) else Fraction(float(out.mid[i, j])) for j in range(3)]
                              for i in range(4)]).all())
    assert not bool(shrunk.contains(worst)[1, 2]), "the shrunk radius still contains the adversarial value"
    # and the generic checker reports it
    with pytest.raises(AssertionError, match="not in"):
        check_gemm(lambda x, y: shrunk if x is a else torch.mm(x, y), [a, b], exact_matmul)


@pytest.mark.parametrize("b_scale,one_gemm", [(2.0**-24, True), (2.0**-8, False)])
def test_one_gemm_for_two_balls_only_where_b_is_nearly_a_point(b_scale, one_gemm, monkeypatch):
    """Lemma B1 (a-priori bound, bfloat16 radius GEMMs), k = 512 (g' ~ 3e-5): with B's radius 2^-24 |mB| (a
    parameter, < 2^-8 g') the two balls' bracket is one GEMM, contains every exact product, and is no wider than the
    two-GEMM bracket beyond the bfloat16 roundings of its operands (2^-6 relative); with B's radius 2^-8 |mB| the two
    GEMMs run."""
    if not linalg._bf16_radius_gemms():
        pytest.skip("no fast bfloat16 GEMM on this CPU: radius GEMMs run in float32")
    monkeypatch.setattr(linalg, "_BF16_MIN_MACS_A_PRIORI", 0)
    gen = torch.Generator().manual_seed(11)
    ma, mb = torch.randn(24, 512, generator=gen), torch.randn(512, 16, generator=gen)
    a, b = bg.ball(ma, ma.abs() * 2.0**-8), bg.ball(mb, mb.abs() * b_scale)
    accumulated = []
    real_accumulate = linalg._ACCUMULATE[aten.mm.default]
    monkeypatch.setitem(linalg._ACCUMULATE, aten.mm.default,
                        lambda *args: accumulated.append(1) or real_accumulate(*args))
    with bg.gemm_bound("a-priori"):
        one = check_gemm(torch.mm, [a, b], exact_matmul, max_points=4)
        assert bool(accumulated) != one_gemm
        monkeypatch.setattr(linalg, "_ONE_GEMM", False)
        two = torch.mm(a, b)
    assert torch.equal(one.mid, two.mid)
    assert bool((one.rad <= two.rad * (1 + 2.0**-6)).all())


def test_radius_tightness():
    """Second to soundness. float32: the radius is the propagation bound |mA| rB + rA |mB| + rA rB plus the *measured*
    midpoint error |m - fl64(mA mB)| (and a ~1e-13 relative float64 allowance), never more than the a priori F4 bound;
    float64: the F4 bound up to (1 + O(ku))."""
    gen = torch.Generator().manual_seed(9)
    ma, mb = torch.randn(8, 64, generator=gen), torch.randn(64, 5, generator=gen)
    ra, rb = ma.abs() * 2.0 ** -10, mb.abs() * 2.0 ** -10
    out = torch.mm(bg.ball(ma, ra), bg.ball(mb, rb))
    prop = ma.double().abs() @ rb.double() + ra.double() @ mb.double().abs() + ra.double() @ rb.double()
    measured = (out.mid.double() - ma.double() @ mb.double()).abs()
    gamma_k = 64 * 2.0 ** -24 / (1 - 64 * 2.0 ** -24)
    a_priori = prop + gamma_k * (ma.double().abs() @ mb.double().abs())  # the F4 bound before its own rounding
    assert bool((out.rad.double() >= prop + measured).all())
    assert bool((out.rad.double() <= (prop + measured) * (1 + 2e-5) + 1e-10).all())
    assert bool((out.rad.double() <= a_priori * (1 + 2e-5)).all())
    # point operands: the measured rounding error only (an a priori bound would be about k u |mA||mB|)
    out = torch.mm(bg.ball(ma), mb)
    measured = (out.mid.double() - ma.double() @ mb.double()).abs()
    assert bool((out.rad.double() <= measured * (1 + 1e-6) + 1e-11).all())
    # float64 keeps the a priori F4 bound
    ma64, mb64 = ma.double(), mb.double()
    out = torch.mm(bg.ball(ma64, ra.double()), bg.ball(mb64, rb.double()))
    g64 = 64 * 2.0 ** -53 / (1 - 64 * 2.0 ** -53)
    expected = prop + g64 * (ma64.abs() @ mb64.abs())
    ratio = out.rad / expected
    assert bool((ratio >= 1).all()) and bool((ratio <= 1 + 1e-12).all()), (ratio.min(), ratio.max())


def test_long_dot_uses_float64_radius_path():
    """k = 2^22 + 3 float32 terms: k u >= 1/4, so the growth factor is an upward power and the radius GEMM runs in
    float64. Small integers keep the exact value computable in int64."""
    k = 2 ** 22 + 3
    gen = torch.Generator().manual_seed(1)
    ia = torch.randint(-64, 65, (k,), generator=gen)
    ib = torch.randint(-64, 65, (k,), generator=gen)
    a = bg.ball(ia.to(torch.float32) + 0.5, 2.0 ** -4)
    b = ib.to(torch.float32) * 3.0
    out = torch.dot(a, b)
    assert_same_bits(out.mid, torch.dot(a.mid, b))
    # exact at mid, lower and upper ends: sum (ia + 0.5 + s/16) * 3 ib, scaled by 32
    base = int(((2 * ia.to(torch.int64) + 1) * 16 * 3 * ib.to(torch.int64)).sum())  # (ia+0.5)*3ib * 32
    spread = int((2 * 3 * ib.to(torch.int64).abs()).sum())  # (1/16)*3|ib| * 32
    m, r = Fraction(float(out.mid)), Fraction(float(out.rad))
    for value in (base, base + spread, base - spread):
        assert abs(Fraction(value, 32) - m) <= r
    assert math.isfinite(float(out.rad))


def test_float32_gemm_guard_refuses_reduced_precision():
    """The numerics guard refuses float32 GEMMs in bf16 (oneDNN) before any rule runs."""
    try:
        old = torch.backends.mkldnn.matmul.fp32_precision
    except AttributeError:
        pytest.skip("this PyTorch has no torch.backends.mkldnn.matmul.fp32_precision")
    try:
        torch.backends.mkldnn.matmul.fp32_precision = "bf16"
        guard.reset()
        with pytest.raises(NumericsGuardError, match="fp32_precision"):
            torch.mm(bg.ball(torch.ones(2, 2)), torch.ones(2, 2))
    finally:
        torch.backends.mkldnn.matmul.fp32_precision = old
        guard.reset()
    torch.mm(bg.ball(torch.ones(2, 2)), torch.ones(2, 2))


def test_precision_lowered_after_first_use_is_refused():
    """The guard itself runs once per process; the GEMM rules re-read the float32 precision on every call."""
    torch.mm(bg.ball(torch.ones(2, 2)), torch.ones(2, 2))  # guard passed and cached
    try:
        torch.set_float32_matmul_precision("medium")
        for op in (lambda: torch.mm(bg.ball(torch.ones(2, 2)), torch.ones(2, 2)),
                   lambda: torch.addmm(torch.ones(2), bg.ball(torch.ones(2, 2)), torch.ones(2, 2)),
                   lambda: torch.mm(bg.ball(torch.ones(2, 2, dtype=torch.bfloat16)), torch.ones(2, 2,
                                                                                        dtype=torch.bfloat16))):
            with pytest.raises(NumericsGuardError):
                op()
    finally:
        torch.set_float32_matmul_precision("highest")
        guard.reset()
    torch.mm(bg.ball(torch.ones(2, 2)), torch.ones(2, 2))


def test_linear_backward_gradients_contain_exact(gemm_config):
    """Forward and backward of F.linear with ball parameters (mm, t, sum.dim_IntList in backward): the gradient balls
    contain the exact gradient of sum((x W^T + b)^2) at sampled parameter points, and their midpoints are PyTorch's."""
    gen = torch.Generator().manual_seed(8)
    x = _values((5, 4), torch.float64, gen, scale_exp=2)
    w = bg.ball(_values((3, 4), torch.float64, gen, scale_exp=2), 2.0 ** -20).requires_grad_()
    b = bg.ball(_values((3,), torch.float64, gen, scale_exp=2), 2.0 ** -20).requires_grad_()
    y = F.linear(x, w, b)
    (y * y).sum().backward()
    wp, bp = w.mid.clone().requires_grad_(), b.mid.clone().requires_grad_()
    yp = F.linear(x, wp, bp)
    (yp * yp).sum().backward()
    assert_same_bits(w.grad.mid, wp.grad)
    assert_same_bits(b.grad.mid, bp.grad)
    xs = [[Fraction(v) for v in row] for row in x.tolist()]
    for sign in (-1, 0, 1):
        ws = [[Fraction(m) + sign * Fraction(r) for m, r in zip(mr, rr)]
              for mr, rr in zip(w.mid.tolist(), w.rad.tolist())]
        bs = [Fraction(m) - sign * Fraction(r) for m, r in zip(b.mid.tolist(), b.rad.tolist())]
        y = [[sum(xi[k] * ws[j][k] for k in range(4)) + bs[j] for j in range(3)] for xi in xs]
        grad_w = [[sum(2 * y[i][j] * xs[i][k] for i in range(5)) for k in range(4)] for j in range(3)]
        grad_b = [sum(2 * y[i][j] for i in range(5)) for j in range(3)]
        assert bool(w.grad.contains(grad_w).all())
        assert bool(b.grad.contains(grad_b).all())


@pytest.mark.parametrize("fused_min", [0, math.inf], ids=["fused", "reference"])
@pytest.mark.parametrize("block", [10, 12], ids=["rows", "columns"])  # A 7x6 vs B 6x5: rows; B 6x7: columns
@pytest.mark.parametrize("bias_shape", [None, (5,), (7, 5), (1, 5)])
def test_blocked_float64_reference_contains_exact(bias_shape, block, fused_min, monkeypatch):
    """Outputs larger than ``_UNBLOCKED_MAX`` get their float64 reference a block of rows at a time (memory); forced
    here on small shapes (blocks of 2 rows out of 7): containment and midpoints as in the unblocked rule, and radii
    equal to the unblocked ones up to the reference's own float64 rounding. Blocks run over rows when B is the
    smaller operand (B 6x5 < A 7x6) and over columns otherwise (B 6x9 > A 7x6)."""
    gen = torch.Generator().manual_seed(11)
    n = 5 if block == 10 else 9
    a = make_operand((7, 6), torch.float32, gen, "ball")
    b = make_operand((6, n), torch.float32, gen, "ball")
    bias_shape = None if bias_shape is None else tuple(n if d == 5 else d for d in bias_shape)
    bias = None if bias_shape is None else make_operand(bias_shape, torch.float32, gen, "ball")
    monkeypatch.setattr(linalg, "_FUSED_GEMM_MIN", fused_min)
    unblocked = torch.mm(a, b) if bias is None else torch.addmm(bias, a, b, beta=0.5, alpha=-2.0)
    monkeypatch.setattr(linalg, "_REFERENCE_BLOCK", block)
    monkeypatch.setattr(linalg, "_UNBLOCKED_MAX", block)
    monkeypatch.setattr(linalg, "_MIN_BLOCK", 1)
    with bg.gemm_bound("measured"):
        if bias is None:
            out = check_gemm(torch.mm, [a, b], exact_matmul)
        else:
            out = check_gemm(lambda c, x, y: torch.addmm(c, x, y, beta=0.5, alpha=-2.0), [bias, a, b],
                             lambda c, x, y: exact_addmm(c, x, y, 0.5, -2.0, (7, n)))
    finite = torch.isfinite(unblocked.rad)
    assert torch.equal(torch.isfinite(out.rad), finite)
    assert torch.allclose(out.rad[finite], unblocked.rad[finite], rtol=2.0 ** -20, atol=0)


def test_point_probe_in_any_layout():
    """``linalg._is_point`` decides "not a point" from a 16 x 16 corner in any layout (a transposed weight's radius
    included), and answers "point" only after a full scan: radii that are zero on the corner but not elsewhere, in
    contiguous, transposed and batched layouts, are not points."""
    from ballgrad.ops.linalg import _is_point

    for shape, view in (((80, 70), lambda t: t), ((70, 80), lambda t: t.t()), ((3, 40, 50), lambda t: t.transpose(1, 2)),
                        ((5000,), lambda t: t)):
        r = torch.zeros(shape)
        assert _is_point(view(r))
        r.view(-1)[-1] = 2.0 ** -40  # outside every corner
        assert not _is_point(view(r))
        r.zero_()
        r.view(-1)[0] = 1e-45  # inside the corner (a subnormal counts)
        assert not _is_point(view(r))
