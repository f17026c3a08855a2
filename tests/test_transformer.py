"""Transformer rules (ops/transformer.py) against exact arithmetic: rationals, and mpmath at 256 bits for exp, log and
square roots.

Every test runs the op on balls and on the plain midpoints (midpoints bit for bit identical), then evaluates the
exact real function at whole-tensor sample points of the input balls (all lower ends, all upper ends, the midpoints,
random corners and interior points) and checks each output element's ball contains it. Adversarial cases: constant
rows (variance 0, eps alone), large offsets (cancellation in the variance), tiny eps, saturated softmax, causal and
-inf masks with fully masked rows, grouped-query heads, repeated embedding indices, dropout masks.
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
from torch import nn

import ballgrad as bg
from ballgrad.ops.registry import RULES
from ballgrad.tensor import BallTensor
from ballgrad.testing import contains_exact
from helpers import assert_same_bits, assert_valid_radius

aten = torch.ops.aten
mpmath.mp.prec = 256

needs_softmax = pytest.mark.skipif(aten._softmax.default not in RULES,
                                   reason="_safe_softmax is bounded through the _softmax rule (ops/nn.py)")


def needs(*ops):
    """Skip until the rules this test also reaches (owned by other modules) are registered."""
    missing = [str(op) for op in ops if op not in RULES]
    return pytest.mark.skipif(bool(missing), reason=f"needs rules for {', '.join(missing)}")


needs_relu_backward = needs(aten.relu.default, aten.threshold_backward.default)


# ----------------------------------------------------------------------------------------------------------------------
# Exact sample points and the containment check


def mp(v):
    if isinstance(v, Fraction):
        return mpmath.mpf(v.numerator) / v.denominator
    return mpmath.mpf(v)


def points(x, rng: random.Random, mode: str):
    """An object array of exact Fractions inside every element of ``x`` (ball or plain float tensor); None for an
    element that denotes any real."""
    m = x.mid if isinstance(x, BallTensor) else x
    r = x.rad if isinstance(x, BallTensor) else torch.zeros_like(m, dtype=torch.float64)
    mids = m.detach().to(torch.float64).reshape(-1).tolist()
    rads = r.detach().to(torch.float64).expand(m.shape).reshape(-1).tolist()
    vals = []
    for a, b in zip(mids, rads):
        if not (math.isfinite(a) and math.isfinite(b)):
            vals.append(None)  # any real: only arguments the exact function ignores may have these
            continue
        fa, fb = Fraction(a), Fraction(b)
        pick = mode if mode != "rand" else rng.choice(["lo", "hi", "in", "in"])
        if pick == "lo":
            vals.append(fa - fb)
        elif pick == "hi":
            vals.append(fa + fb)
        elif pick == "mid":
            vals.append(fa)
        else:
            vals.append(fa + fb * Fraction(rng.randint(-(2**20), 2**20), 2**20))
    return np.array(vals + [None], dtype=object)[:-1].reshape(tuple(m.shape))


def check(op, args, exact_fn, *, kwargs=None, modes=("lo", "hi", "mid", "rand", "rand"), seed=0):
    """Midpoint identity and valid radii for every output, then containment of ``exact_fn(*points)`` (a tuple with
    one object array or None per output; an element None means 'undefined', which needs an infinite radius)."""
    kwargs = kwargs or {}
    out = op(*args, **kwargs)
    ref = op(*[a.mid if isinstance(a, BallTensor) else a for a in args], **kwargs)
    outs = out if isinstance(out, (tuple, list)) else (out,)
    refs = ref if isinstance(ref, (tuple, list)) else (ref,)
    for o, r in zip(outs, refs):
        if r is None:
            assert o is None
            continue
        assert isinstance(o, BallTensor), type(o)
        assert_same_bits(o.mid, r)
        assert_valid_radius(o)
    rng = random.Random(seed)
    for mode in modes:
        pts = [points(a, rng, mode) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args]
        ys = exact_fn(*pts)
        ys = ys if isinstance(ys, tuple) else (ys,)
        for k, (o, y) in enumerate(zip(outs, ys)):
            if y is None or o is None:
                continue
            y = np.broadcast_to(np.asarray(y, dtype=object), tuple(o.shape)).reshape(-1)
            mids = o.mid.detach().to(torch.float64).reshape(-1).tolist()
            rads = o.rad.detach().to(torch.float64).reshape(-1).tolist()
            for i, (m, r) in enumerate(zip(mids, rads)):
                if math.isinf(r):
                    continue
                assert y[i] is not None, f"output {k} element {i}: finite radius {r} where the value is undefined"
                assert contains_exact(m, r, y[i]), (
                    f"output {k} element {i}: exact {mpmath.nstr(mp(y[i]) if isinstance(y[i], Fraction) else y[i], 20)}"
                    f" not in {m!r} ± {r!r} (mode {mode})")
    return out


vsqrt = np.vectorize(lambda v: mpmath.sqrt(mp(v)), otypes=[object])
vexp = np.vectorize(lambda v: mpmath.exp(v), otypes=[object])
vlog = np.vectorize(lambda v: mpmath.log(v), otypes=[object])
vmp = np.vectorize(mp, otypes=[object])


# ----------------------------------------------------------------------------------------------------------------------
# Layer norm


def exact_layer_norm(x, k, w, b, eps):
    axes = tuple(range(x.ndim - k, x.ndim))
    n = math.prod(x.shape[a] for a in axes)
    mean = x.sum(axis=axes, keepdims=True) / n
    var = ((x - mean) ** 2).sum(axis=axes, keepdims=True) / n
    rstd = 1 / vsqrt(var + Fraction(eps))
    out = (x - mean) * rstd
    if w is not None:
        out = out * w
    if b is not None:
        out = out + b
    return out, mean, rstd


def _ln_input(kind, dtype, shape=(3, 6)):
    g = torch.Generator().manual_seed(["normal", "constant", "offset", "mixed"].index(kind))
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    if kind == "constant":
        x = torch.full(shape, 3.0, dtype=torch.float64)
        x[1] = -0.125
    elif kind == "offset":
        x = 1000.0 + 1e-3 * x  # the variance cancels: 1e6-sized squares for a 1e-6 variance
    elif kind == "mixed":
        x = x * torch.tensor([1e-3, 1.0, 1e3], dtype=torch.float64).reshape(3, *([1] * (len(shape) - 1)))
    return x.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("kind", ["normal", "constant", "offset", "mixed"])
@pytest.mark.parametrize("rad", [0.0, 1e-6, 0.5])
def test_layer_norm_forward(dtype, kind, rad, ln_path):
    ln_path.expect_calls = dtype != torch.bfloat16  # (the kernels take float32 and float64)
    x = bg.ball(_ln_input(kind, dtype), rad)
    w = bg.ball(torch.linspace(-2, 2, 6, dtype=dtype), rad / 10)
    b = bg.ball(torch.linspace(0.5, 1, 6, dtype=dtype))
    for eps in (1e-5, 1e-12):
        out = check(aten.native_layer_norm.default, (x, [6], w, b, eps),
                    lambda x_, s_, w_, b_, e_: exact_layer_norm(x_, 1, w_, b_, e_))
        if rad == 0.0 and kind == "constant" and dtype != torch.float64:
            # constant point rows normalise to b: the float64 enclosure's width stays far below one ulp of out
            assert bool((out[0].rad <= 2.0**-24 * out[0].mid.abs().float()).all())
        if rad == 0.0:
            assert bool(torch.isfinite(out[0].rad).all())


def test_layer_norm_two_dims_no_affine_and_tightness(ln_path):
    x = bg.ball(torch.randn(2, 3, 4, dtype=torch.float32), 1e-7)
    check(aten.native_layer_norm.default, (x, [3, 4], None, None, 1e-5),
          lambda x_, s_, w_, b_, e_: exact_layer_norm(x_, 2, None, None, e_))
    # a point float32 input: the radius is the kernel's own error plus a float64-sized enclosure, a few ulps
    p = bg.ball(torch.randn(4, 64))
    out, _, rstd = aten.native_layer_norm.default(p, [64], None, None, 1e-5)
    assert float(out.rad.max()) < 64 * 2.0**-24 * float(out.mid.abs().max())
    assert float((rstd.rad / rstd.mid).max()) < 8 * 2.0**-24


def test_layer_norm_variance_ball_reaching_zero(ln_path):
    """A radius much larger than the spread: the variance ball is clipped at 0 and eps keeps rstd finite."""
    x = bg.ball(torch.tensor([[1.0, 1.0 + 2**-20, 1.0]]), 1e-3)
    out = check(aten.native_layer_norm.default, (x, [3], None, None, 1e-5),
                lambda x_, s_, w_, b_, e_: exact_layer_norm(x_, 1, None, None, e_))
    assert bool(torch.isfinite(out[2].rad).all())
    # eps = 0 on a constant row: rstd is unbounded, the radius says so
    c = bg.ball(torch.tensor([[2.0, 2.0, 2.0]]), 1e-6)
    _, _, rstd = aten.native_layer_norm.default(c, [3], None, None, 0.0)
    assert bool(torch.isinf(rstd.rad).all())


def exact_layer_norm_backward(gy, x, mean, rstd, w, k, recompute_mean):
    axes = tuple(range(x.ndim - k, x.ndim))
    lead = tuple(range(x.ndim - k))
    n = math.prod(x.shape[a] for a in axes)
    mu = x.sum(axis=axes, keepdims=True) / n if recompute_mean else mean
    xhat = (x - mu) * rstd
    g = gy * w if w is not None else gy
    gx = rstd / n * (g * n - g.sum(axis=axes, keepdims=True) - xhat * (g * xhat).sum(axis=axes, keepdims=True))
    gw = (gy * xhat).sum(axis=lead) if lead else gy * xhat
    gb = gy.sum(axis=lead) if lead else gy
    return gx, gw if w is not None else None, gb if w is not None else None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", ["normal", "constant", "offset"])
@pytest.mark.parametrize("rad", [0.0, 1e-6])
def test_layer_norm_backward(dtype, kind, rad, ln_path):
    x = bg.ball(_ln_input(kind, dtype, (2, 3, 5)), rad)
    w = bg.ball(torch.linspace(-2, 2, 5, dtype=dtype), rad)
    b = bg.ball(torch.zeros(5, dtype=dtype))
    _, mean, rstd = aten.native_layer_norm.default(x, [5], w, b, 1e-5)
    gy = bg.ball(torch.randn(2, 3, 5, dtype=dtype), rad)
    for recompute in (False, True):  # the literal op (saved mean) and the oracle's reading (exact mean of x)
        check(aten.native_layer_norm_backward.default, (gy, x, [5], mean, rstd, w, b, [True, True, True]),
              lambda g_, x_, s_, m_, r_, w_, b_, o_: exact_layer_norm_backward(g_, x_, m_, r_, w_, 1, recompute))
    # weight None: only grad_input
    check(aten.native_layer_norm_backward.default, (gy, x, [5], mean, rstd, None, None, [True, False, False]),
          lambda g_, x_, s_, m_, r_, w_, b_, o_: exact_layer_norm_backward(g_, x_, m_, r_, None, 1, False))


def test_layer_norm_module_forward_backward():
    torch.manual_seed(1)
    ln = nn.LayerNorm(8)
    with torch.no_grad():
        ln.weight.uniform_(0.5, 1.5)
        ln.bias.uniform_(-1, 1)
    plain = copy.deepcopy(ln)
    x = torch.randn(4, 8)
    bg.ballify(ln, rad=1e-6)
    y = ln(x)
    y_ref = plain(x)
    assert_same_bits(y.mid, y_ref.detach())
    (y * y).sum().backward()
    (y_ref * y_ref).sum().backward()
    assert isinstance(ln.weight.grad, BallTensor)
    assert_same_bits(ln.weight.grad.mid, plain.weight.grad)
    assert_same_bits(ln.bias.grad.mid, plain.bias.grad)


# ----------------------------------------------------------------------------------------------------------------------
# Embedding


def test_embedding_gather_is_exact():
    w = bg.ball(torch.randn(10, 3), torch.rand(10, 3) * 1e-3)
    idx = torch.tensor([[1, 2, 1], [9, 1, 0]])
    e = F.embedding(idx, w, padding_idx=0)
    assert_same_bits(e.mid, F.embedding(idx, w.mid, padding_idx=0))
    assert torch.equal(e.rad, w.rad[idx])


def exact_embedding_backward(g, idx, num_weights, padding_idx, scaled):
    flat = idx.reshape(-1).tolist()
    rows = g.reshape(len(flat), -1)
    out = np.array([[Fraction(0)] * rows.shape[1] for _ in range(num_weights)], dtype=object)
    counts = [0] * num_weights
    for p, i in enumerate(flat):
        if i == padding_idx:
            continue
        out[i] = out[i] + rows[p]
        counts[i] += 1
    if scaled:
        for i, c in enumerate(counts):
            if c:
                out[i] = out[i] / c
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scaled", [False, True])
@pytest.mark.parametrize("rad", [0.0, 1e-5])
def test_embedding_dense_backward(dtype, scaled, rad):
    g = torch.Generator().manual_seed(3)
    idx = torch.tensor([[1, 2, 1, 7], [9, 1, 0, 1], [3, 3, 3, 3]])
    grad = bg.ball((torch.randn(3, 4, 5, generator=g) * torch.logspace(-3, 3, 5)).to(dtype), rad)
    for padding_idx in (-1, 0, 3):
        out = check(aten.embedding_dense_backward.default, (grad, idx, 12, padding_idx, scaled),
                    lambda g_, i_, n_, p_, s_: exact_embedding_backward(g_, i_, n_, p_, s_))
        once = [i for i in range(12) if (idx == i).sum() == 1 and i != padding_idx]
        r_in = grad.rad.reshape(-1, 5)
        for i in once:  # a row hit once is a copy: its radius is the input's, nothing added
            p = int((idx.reshape(-1) == i).nonzero())
            assert torch.equal(out.rad[i], r_in[p]), (i, out.rad[i], r_in[p])
        never = [i for i in range(12) if (idx == i).sum() == 0 or i == padding_idx]
        assert bool((out.rad[never] == 0).all()) and bool((out.mid[never] == 0).all())


def test_embedding_module_backward():
    torch.manual_seed(2)
    emb = nn.Embedding(7, 4, padding_idx=2)
    plain = copy.deepcopy(emb)
    idx = torch.tensor([[0, 2, 2, 5], [5, 5, 1, 0]])
    bg.ballify(emb, rad=1e-6)
    out = emb(idx)
    ref = plain(idx)
    assert_same_bits(out.mid, ref.detach())
    (out * out).sum().backward()
    (ref * ref).sum().backward()
    assert isinstance(emb.weight.grad, BallTensor)
    assert_same_bits(emb.weight.grad.mid, plain.weight.grad)
    assert bool((emb.weight.grad.rad[2] == 0).all())


# ----------------------------------------------------------------------------------------------------------------------
# Attention: the fused CPU kernel


def _repeat_heads(t, heads):
    return np.repeat(t, heads // t.shape[1], axis=1) if t.shape[1] != heads else t


def exact_probs(q, k, scale, additive, excluded):
    """(P, lse, empty rows) in mpmath; ``excluded`` a bool numpy array broadcastable to the scores."""
    heads = q.shape[1]
    q, k = vmp(q), vmp(_repeat_heads(k, heads))
    s = np.matmul(q, np.swapaxes(k, -1, -2))
    s = vmp(s) * (mpmath.mpf(1) / mpmath.sqrt(q.shape[-1]) if scale is None else mp(Fraction(scale)))
    if additive is not None:
        s = s + vmp(additive)
    excluded = np.broadcast_to(excluded, s.shape)
    empty = excluded.all(axis=-1, keepdims=True)
    top = np.where(excluded, mpmath.mpf(-10**9), s).max(axis=-1, keepdims=True)
    e = np.where(excluded, mpmath.mpf(0), vexp(s - top))
    tot = e.sum(axis=-1, keepdims=True)
    tot_safe = np.where(empty, mpmath.mpf(1), tot)
    p = np.where(empty, mpmath.mpf(0), e / tot_safe)
    lse = np.where(empty, None, top + vlog(tot_safe))[..., 0]
    return p, lse, empty


def exact_attention(q, k, v, scale, additive, excluded):
    p, lse, _ = exact_probs(q, k, scale, additive, excluded)
    return np.matmul(p, vmp(_repeat_heads(v, q.shape[1]))), lse


def exact_attention_backward(g, q, k, v, scale, additive, excluded):
    heads, kv = q.shape[1], k.shape[1]
    g, q, k, v = vmp(g), vmp(q), vmp(k), vmp(v)
    p, _, _ = exact_probs(q, k, scale, additive, excluded)
    sc = mpmath.mpf(1) / mpmath.sqrt(q.shape[-1]) if scale is None else mp(Fraction(scale))
    kk, vv = _repeat_heads(k, heads), _repeat_heads(v, heads)
    tr = lambda t: np.swapaxes(t, -1, -2)  # noqa: E731
    dv = np.matmul(tr(p), g)
    dp = np.matmul(g, tr(vv))
    ds = p * (dp - (dp * p).sum(axis=-1, keepdims=True))
    dq = np.matmul(ds, kk) * sc
    dk = np.matmul(tr(ds), q) * sc
    if kv != heads:
        b, _, s_, e_ = dk.shape
        dk = dk.reshape(b, kv, heads // kv, s_, e_).sum(axis=2)
        dv = dv.reshape(b, kv, heads // kv, s_, dv.shape[-1]).sum(axis=2)
    return dq, dk, dv


def _mask_parts(attn_mask, is_causal, length, src):
    excluded = np.zeros((length, src), dtype=bool)
    if is_causal:
        excluded |= ~np.tril(np.ones((length, src), dtype=bool))
    additive = None
    if attn_mask is not None:
        m = attn_mask.to(torch.float64).numpy()
        excluded = excluded | (m == -math.inf)
        additive = np.where(m == -math.inf, 0.0, m)
        additive = np.vectorize(Fraction, otypes=[object])(additive)
    return additive, excluded


ATTENTION_CASES = {
    "plain": dict(),
    "causal": dict(is_causal=True),
    "causal_tall": dict(is_causal=True, shape=(1, 2, 5, 3, 4)),
    "float_mask": dict(mask="float"),
    "masked_rows": dict(mask="masked_rows"),
    "mask_and_causal": dict(mask="float", is_causal=True),
    "gqa": dict(kv_heads=1, heads=4),
    "scale": dict(scale=-0.75),
    "inexact_scale": dict(shape=(1, 2, 3, 5, 6)),  # 1/sqrt(6) is not a double: enclosed
    "saturated": dict(magnitude=12.0),
}


def _attention_inputs(case, dtype, rad):
    spec = ATTENTION_CASES[case]
    b, h, length, src, e = spec.get("shape", (2, spec.get("heads", 2), 3, 4, 4))
    kv = spec.get("kv_heads", h)
    g = torch.Generator().manual_seed(7)
    mag = spec.get("magnitude", 1.0)
    q = bg.ball((torch.randn(b, h, length, e, generator=g) * mag).to(dtype), rad)
    k = bg.ball((torch.randn(b, kv, src, e, generator=g) * mag).to(dtype), rad)
    v = bg.ball(torch.randn(b, kv, src, e, generator=g).to(dtype), rad)
    mask = None
    if spec.get("mask") == "float":
        mask = torch.randn(length, src, generator=g).to(dtype)
        mask[0, 1] = -math.inf
    elif spec.get("mask") == "masked_rows":
        mask = torch.zeros(b, 1, length, src, dtype=dtype)
        mask[0, 0, 1] = -math.inf  # batch 0: row 1 fully masked
        mask[1, 0, 2, 1:] = -math.inf  # batch 1: row 2 keeps one entry (P = 1 exactly there)
    return q, k, v, mask, spec.get("is_causal", False), spec.get("scale")


@pytest.mark.parametrize("case", list(ATTENTION_CASES))
@pytest.mark.parametrize("rad", [0.0, 1e-4])
def test_attention_forward_and_backward(case, rad):
    q, k, v, mask, causal, scale = _attention_inputs(case, torch.float32, rad)
    fwd = aten._scaled_dot_product_flash_attention_for_cpu.default
    bwd = aten._scaled_dot_product_flash_attention_for_cpu_backward.default
    length, src = q.shape[-2], k.shape[-2]
    additive, excluded = _mask_parts(mask, causal, length, src)
    out, lse = check(lambda q_, k_, v_: fwd(q_, k_, v_, 0.0, causal, attn_mask=mask, scale=scale), (q, k, v),
                     lambda q_, k_, v_: exact_attention(q_, k_, v_, scale, additive, excluded))
    g = bg.ball(torch.randn(out.shape, generator=torch.Generator().manual_seed(8)), rad)
    grads = check(lambda g_, q_, k_, v_, o_, l_: bwd(g_, q_, k_, v_, o_, l_, 0.0, causal, attn_mask=mask, scale=scale),
                  (g, q, k, v, out, lse),
                  lambda g_, q_, k_, v_, o_, l_: exact_attention_backward(g_, q_, k_, v_, scale, additive, excluded),
                  modes=("lo", "hi", "mid", "rand"))
    if case == "masked_rows":
        # the fully masked row: output and dq exactly 0 with radius 0; its logsumexp (-inf) unknown
        assert bool((out.mid[0, :, 1] == 0).all()) and bool((out.rad[0, :, 1] == 0).all())
        assert bool((grads[0].rad[0, :, 1] == 0).all())
        assert bool(torch.isinf(lse.rad[0, :, 1]).all())
        assert bool(torch.isfinite(lse.rad[1]).all())
    else:
        assert bool(torch.isfinite(out.rad).all()) and bool(torch.isfinite(lse.rad).all())


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_attention_other_dtypes(dtype):
    q, k, v, mask, causal, scale = _attention_inputs("mask_and_causal", dtype, 0.0)
    fwd = aten._scaled_dot_product_flash_attention_for_cpu.default
    additive, excluded = _mask_parts(mask, causal, q.shape[-2], k.shape[-2])
    check(lambda q_, k_, v_: fwd(q_, k_, v_, 0.0, causal, attn_mask=mask, scale=scale), (q, k, v),
          lambda q_, k_, v_: exact_attention(q_, k_, v_, scale, additive, excluded), modes=("mid",))


def test_attention_ball_mask():
    """A float mask that is itself a ball (e.g. a relative-position bias) is added as a ball."""
    q, k, v, _, _, _ = _attention_inputs("plain", torch.float32, 1e-5)
    mask = bg.ball(torch.randn(3, 4, generator=torch.Generator().manual_seed(14)), 1e-3)
    fwd = aten._scaled_dot_product_flash_attention_for_cpu.default
    excluded = np.zeros((3, 4), dtype=bool)
    check(lambda q_, k_, v_, m_: fwd(q_, k_, v_, 0.0, False, attn_mask=m_), (q, k, v, mask),
          lambda q_, k_, v_, m_: exact_attention(q_, k_, v_, None, m_, excluded))


def test_attention_point_inputs_are_tight():
    """Point float32 inputs: the radius is the kernel's rounding plus float64 enclosures: a few hundred ulps at most."""
    g = torch.Generator().manual_seed(11)
    q, k, v = (bg.ball(torch.randn(1, 2, 8, 16, generator=g)) for _ in range(3))
    out, lse = aten._scaled_dot_product_flash_attention_for_cpu.default(q, k, v, 0.0, True)
    assert float(out.rad.max()) < 256 * 2.0**-24 * float(out.mid.abs().max())
    assert float(lse.rad.max()) < 64 * 2.0**-24 * float(lse.mid.abs().max())


def test_sdpa_functional_with_masks_reaches_the_fused_rule():
    """F.scaled_dot_product_attention with a boolean mask (turned into 0/-inf by PyTorch) and is_causal."""
    g = torch.Generator().manual_seed(12)
    q, k, v = (bg.ball(torch.randn(1, 2, 3, 4, generator=g), 1e-5) for _ in range(3))
    bool_mask = torch.tensor([[True, False, True], [False, False, False], [True, True, True]])
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bool_mask)
    assert_same_bits(out.mid, F.scaled_dot_product_attention(q.mid, k.mid, v.mid, attn_mask=bool_mask))
    assert bool((out.rad[:, :, 1] == 0).all()), "the fully masked row is exactly 0"
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert_same_bits(out.mid, F.scaled_dot_product_attention(q.mid, k.mid, v.mid, is_causal=True))


def test_attention_refusals():
    q = bg.ball(torch.randn(2, 2, 3, 4))
    k1 = bg.ball(torch.randn(1, 2, 3, 4))
    with pytest.raises(bg.UnsupportedOpError, match="batch sizes"):
        aten._scaled_dot_product_flash_attention_for_cpu.default(q, k1, k1)
    nan_mask = torch.zeros(3, 3)
    nan_mask[0, 0] = math.inf
    out, lse = aten._scaled_dot_product_flash_attention_for_cpu.default(q, q, q, attn_mask=nan_mask)
    assert bool(torch.isinf(out.rad[:, :, 0]).all()) and bool(torch.isfinite(out.rad[:, :, 1:]).all())


# The rules' fast path (``_FastAttention``: direct float64 bounds) against the oracle where its own lemmas are
# stressed: wide balls, large scores (exp arguments clamped at -700, Lemma E), grouped-query heads with per-head and
# broadcast masks, fully masked rows, float64 and bfloat16 inputs, an inexact and a negative scale.
FAST_CASES = {
    "wide_gqa_causal": dict(rel=0.3, mag=1.0, kv=2, causal=True),
    "wide_saturated_mask": dict(rel=0.05, mag=6.0, kv=2, mask="rows"),
    "huge_scores_mask": dict(rel=1e-3, mag=40.0, kv=4, mask="rows", causal=True),  # |scores| > 350: clamped
    "huge_wide_scores": dict(rel=0.5, mag=30.0, kv=1),  # score widths of hundreds: P in [0, 1], d underflows
    "per_head_mask_gqa": dict(rel=1e-4, mag=2.0, kv=2, mask="heads", scale=-0.6),
    "float64_inexact_scale": dict(rel=1e-9, mag=3.0, kv=4, dtype=torch.float64, e=6, causal=True),
    "bfloat16_gqa": dict(rel=0.0, mag=2.0, kv=1, dtype=torch.bfloat16, mask="rows"),
}


def _fast_inputs(spec, seed):
    g = torch.Generator().manual_seed(seed)
    b, h, length, src, e = 2, 4, 3, 5, spec.get("e", 4)
    dtype, rel, mag = spec.get("dtype", torch.float32), spec["rel"], spec["mag"]

    def ball_of(shape, scale):
        x = (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(dtype)
        return bg.ball(x, (x.abs().to(torch.float64) * rel + rel * 1e-2).to(x.dtype)) if rel else bg.ball(x)

    q = ball_of((b, h, length, e), mag)
    k = ball_of((b, spec["kv"], src, e), mag)
    v = ball_of((b, spec["kv"], src, e), 1.0)
    mask = None
    if spec.get("mask") == "rows":
        mask = torch.randn(b, 1, length, src, generator=g).to(dtype)
        mask[0, 0, 1] = -math.inf  # a fully masked row
        mask[1, 0, 0, :2] = -math.inf
    elif spec.get("mask") == "heads":
        mask = torch.randn(1, h, length, src, generator=g).to(dtype)
        mask[0, 1, 2, 1:] = -math.inf  # one entry left in a row of one head
    return q, k, v, mask, spec.get("causal", False)


@pytest.mark.parametrize("case", list(FAST_CASES))
def test_attention_fast_path_adversarial(case):
    import ballgrad.ops.transformer as tr

    spec = FAST_CASES[case]
    q, k, v, mask, causal = _fast_inputs(spec, seed=list(FAST_CASES).index(case))
    fwd = aten._scaled_dot_product_flash_attention_for_cpu.default
    bwd = aten._scaled_dot_product_flash_attention_for_cpu_backward.default
    scale = spec.get("scale")  # None: 1/sqrt(e), enclosed (e = 6: not a double)
    fast = tr._FastAttention.build(fwd, q, k, v, causal, mask, scale)
    assert fast is not None, "the fast path must run here"
    additive, excluded = _mask_parts(mask, causal, q.shape[-2], k.shape[-2])
    b, h, length, src = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
    gone = torch.from_numpy(np.ascontiguousarray(np.broadcast_to(excluded, (b, h, length, src))))
    for p in (fast.p_hi, fast.pm):  # excluded entries have P = 0 exactly (row layout back to (B, H, L, S))
        assert bool((p.reshape(b, h, length, src)[gone] == 0).all())
    out, lse = check(lambda q_, k_, v_: fwd(q_, k_, v_, 0.0, causal, attn_mask=mask, scale=scale), (q, k, v),
                     lambda q_, k_, v_: exact_attention(q_, k_, v_, scale, additive, excluded),
                     modes=("lo", "hi", "mid", "rand"))
    g = bg.ball(torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(out.dtype), spec["rel"] or None)
    check(lambda g_, q_, k_, v_, o_, l_: bwd(g_, q_, k_, v_, o_, l_, 0.0, causal, attn_mask=mask, scale=scale),
          (g, q, k, v, out, lse),
          lambda g_, q_, k_, v_, o_, l_: exact_attention_backward(g_, q_, k_, v_, scale, additive, excluded),
          modes=("lo", "hi", "rand"))


@pytest.mark.parametrize("rad", [1e-6, 0.05, 2.0])
def test_attention_fast_probabilities_contain_their_exact_extremes(rad):
    """Lemma P is tight when the score box is exactly attained: one key dimension, keys a and -a (their mean is 0, so
    centring is exact) give scores (a q, -a q) and P_1 = sigmoid(2 a q), whose extremes over the ball of q are attained
    at its end points. The fast path's P ball must contain both, and be wider only by float64 roundings (the largest:
    the rounding of the row sum, ~4u, relative to e^(M_lo - M_hi) in a saturated row, as in ``_Probs``)."""
    import ballgrad.ops.transformer as tr

    a = 1.5
    qm = torch.tensor([[-3.0], [0.25], [7.0], [0.0]], dtype=torch.float64)
    q = bg.ball(qm.reshape(1, 1, 4, 1), rad)
    k = bg.ball(torch.tensor([[a], [-a]], dtype=torch.float64).reshape(1, 1, 2, 1))
    v = bg.ball(torch.tensor([[1.0], [-2.0]], dtype=torch.float64).reshape(1, 1, 2, 1))
    fast = tr._FastAttention.build(aten._scaled_dot_product_flash_attention_for_cpu.default, q, k, v, False, None, 1.0)
    pm, pr = fast.pm.reshape(4, 2), fast.pr.reshape(4, 2)
    for i, qi in enumerate(qm.flatten().tolist()):
        ends = [1 / (1 + mpmath.exp(-2 * a * (mp(Fraction(qi)) + s * mp(Fraction(rad))))) for s in (-1, 1)]
        for j, (lo, hi) in enumerate([(ends[0], ends[1]), (1 - ends[1], 1 - ends[0])]):
            m, r = mp(Fraction(float(pm[i, j]))), mp(Fraction(float(pr[i, j])))
            assert m - r <= lo and hi <= m + r, (i, j)
            assert 2 * r <= (hi - lo) * (1 + mpmath.mpf(10) ** -9) + mpmath.mpf(10) ** -12


def test_attention_fast_path_matches_composed_bounds():
    """The fast path's radii against the composed ball rules' (``_SdpaCase``) on the same inputs: at most a few
    float64 roundings wider anywhere, and the same where the kernel's float32 rounding dominates."""
    import ballgrad.ops.transformer as tr

    q, k, v, mask, causal = _fast_inputs(dict(rel=1e-6, mag=2.0, kv=2, mask="rows"), seed=5)
    fwd = aten._scaled_dot_product_flash_attention_for_cpu.default
    bwd = aten._scaled_dot_product_flash_attention_for_cpu_backward.default
    g = bg.ball(torch.randn(2, 4, 3, 4, generator=torch.Generator().manual_seed(6)), 1e-6)
    fast = [fwd(q, k, v, 0.0, True, attn_mask=mask)]
    fast.append(bwd(g, q, k, v, *fast[0], 0.0, True, attn_mask=mask))
    build = tr._FastAttention.build
    tr._FastAttention.build = classmethod(lambda cls, *a, **kw: None)
    try:
        slow = [fwd(q, k, v, 0.0, True, attn_mask=mask)]
        slow.append(bwd(g, q, k, v, *slow[0], 0.0, True, attn_mask=mask))
    finally:
        tr._FastAttention.build = build
    for a, b in zip([*fast[0], *fast[1]], [*slow[0], *slow[1]]):
        assert_same_bits(a.mid, b.mid)
        finite = torch.isfinite(b.rad)
        assert torch.equal(finite, torch.isfinite(a.rad))
        ra, rb = a.rad[finite].double(), b.rad[finite].double()
        assert bool((ra <= rb * (1 + 1e-6) + 1e-13 * (a.mid[finite].double().abs() + 1)).all())


def test_attention_backward_reuses_forward_bounds_only_when_unchanged():
    """The backward reuses the forward's P bounds for the very same, unmodified q, k, v (same radii as recomputing),
    and recomputes after an in-place change (containment for the changed inputs)."""
    import ballgrad.ops.transformer as tr

    q, k, v, mask, causal = _fast_inputs(dict(rel=1e-4, mag=2.0, kv=2, causal=True), seed=9)
    for x in (q, k, v):
        x.requires_grad_()
    fwd = aten._scaled_dot_product_flash_attention_for_cpu.default
    bwd = aten._scaled_dot_product_flash_attention_for_cpu_backward.default
    g = bg.ball(torch.randn(2, 4, 3, 4, generator=torch.Generator().manual_seed(10)), 1e-4)
    out, lse = fwd(q, k, v, 0.0, True)
    assert id(q) in tr._REUSE
    reused = bwd(g, q, k, v, out, lse, 0.0, True)
    assert id(q) not in tr._REUSE  # used once
    fresh = bwd(g, q, k, v, out, lse, 0.0, True)  # recomputed
    for a, b in zip(reused, fresh):
        assert_same_bits(a.mid, b.mid)
        assert torch.equal(a.rad, b.rad)
    out, lse = fwd(q, k, v, 0.0, True)
    with torch.no_grad():
        k.mid.mul_(-1.5)  # an in-place change of k between forward and backward
    assert tr._recall(q, k, v, True, None, None) is None
    out, lse = fwd(q, k, v, 0.0, True)
    with torch.no_grad():
        q.rad.mul_(2.0)
    check(lambda g_, q_, k_, v_, o_, l_: bwd(g_, q_, k_, v_, o_, l_, 0.0, True), (g, q, k, v, out, lse),
          lambda g_, q_, k_, v_, o_, l_: exact_attention_backward(g_, q_, k_, v_, None, *_mask_parts(None, True, 3, 5)),
          modes=("lo", "hi", "rand"))


def _attention_balls(q, k, v, mask, causal, scale, g):
    fwd = aten._scaled_dot_product_flash_attention_for_cpu.default
    bwd = aten._scaled_dot_product_flash_attention_for_cpu_backward.default
    out, lse = fwd(q, k, v, 0.0, causal, attn_mask=mask, scale=scale)
    return (out, lse, *bwd(g, q, k, v, out, lse, 0.0, causal, attn_mask=mask, scale=scale))


# A block budget in scores (one byte a score): per kv head, per batch element, and uneven (two batch elements a block
# of three: blocks of 2 and 1)
BLOCK_BUDGETS = {"heads": lambda g, l, s, kv: g * l * s, "batch": lambda g, l, s, kv: kv * g * l * s,
                 "uneven": lambda g, l, s, kv: 2 * kv * g * l * s}


@pytest.mark.parametrize("budget", list(BLOCK_BUDGETS))
@pytest.mark.parametrize("case", list(FAST_CASES))
def test_attention_fast_path_blocks(case, budget, monkeypatch):
    """The fast path computed in blocks (``_blocks``: here forced small on small inputs) gives the very radii of one
    block, and they contain the exact values (the oracle), for every mask layout: per batch element, per head,
    broadcast, causal, grouped-query heads. The forward keeps only its row statistics for the backward (not P), and
    the backward gives the same radii with them as without them, also in other blocks than the forward's."""
    import ballgrad.ops.transformer as tr

    spec = FAST_CASES[case]
    q, k, v, mask, causal = _fast_inputs(spec, seed=list(FAST_CASES).index(case))
    if budget == "uneven":  # three batch elements: blocks of 2 and 1
        q2, k2, v2, mask2, _ = _fast_inputs(spec, seed=50 + list(FAST_CASES).index(case))
        q, k, v = (bg.ball(torch.cat([a.mid, b.mid[:1]]), torch.cat([a.rad, b.rad[:1]])) for a, b in
                   ((q, q2), (k, k2), (v, v2)))
        if mask is not None and mask.shape[0] != 1:
            mask = torch.cat([mask, mask2[:1]])
    for x in (q, k, v):
        x.requires_grad_()
    scale = spec.get("scale")
    b, h, length, e = q.shape
    kv, src = k.shape[1], k.shape[2]
    g = torch.randn(b, h, length, e, generator=torch.Generator().manual_seed(4)).to(q.dtype)
    g = bg.ball(g, spec["rel"] or None)
    whole = _attention_balls(q, k, v, mask, causal, scale, g)
    monkeypatch.setattr(tr, "_BYTES_PER_SCORE", {"forward": 1, "backward": 1})
    monkeypatch.setattr(tr, "_BLOCK_BYTES", BLOCK_BUDGETS[budget](h // kv, length, src, kv))
    blocks = tr._blocks(b, kv, h // kv, length, src, "forward")
    assert len(blocks) > 1 and blocks == tr._blocks(b, kv, h // kv, length, src, "backward")
    assert budget != "uneven" or [b1 - b0 for b0, b1, _, _ in blocks] == [2, 1]
    fwd = aten._scaled_dot_product_flash_attention_for_cpu.default
    bwd = aten._scaled_dot_product_flash_attention_for_cpu_backward.default
    tr._REUSE.clear()
    out, lse = fwd(q, k, v, 0.0, causal, attn_mask=mask, scale=scale)
    assert tr._REUSE[id(q)][2][0] == "rows"  # P is not kept across blocks, only the row statistics
    blocked = (out, lse, *bwd(g, q, k, v, out, lse, 0.0, causal, attn_mask=mask, scale=scale))
    assert id(q) not in tr._REUSE
    recomputed = bwd(g, q, k, v, out, lse, 0.0, causal, attn_mask=mask, scale=scale)  # no statistics: all recomputed
    for a, c in zip(whole, blocked):
        assert_same_bits(a.mid, c.mid)
        assert torch.equal(a.rad, c.rad)
    for a, c in zip(blocked[2:], recomputed):
        assert_same_bits(a.mid, c.mid)
        assert torch.equal(a.rad, c.rad)
    with monkeypatch.context() as m:  # the forward in one block (keeping the row statistics), the backward in blocks
        m.setattr(tr, "_REUSE_LIMIT", 0)
        m.setattr(tr, "_BYTES_PER_SCORE", {"forward": 1, "backward": 1000})
        m.setattr(tr, "_BLOCK_BYTES", 1000 * BLOCK_BUDGETS[budget](h // kv, length, src, kv))
        assert len(tr._blocks(b, kv, h // kv, length, src, "forward")) == 1
        assert tr._blocks(b, kv, h // kv, length, src, "backward") == blocks
        o, l_ = fwd(q, k, v, 0.0, causal, attn_mask=mask, scale=scale)
        assert tr._REUSE[id(q)][2][0] == "rows"
        for a, c in zip(whole[2:], bwd(g, q, k, v, o, l_, 0.0, causal, attn_mask=mask, scale=scale)):
            assert_same_bits(a.mid, c.mid)
            assert torch.equal(a.rad, c.rad)
    additive, excluded = _mask_parts(mask, causal, length, src)
    out, lse = check(lambda q_, k_, v_: fwd(q_, k_, v_, 0.0, causal, attn_mask=mask, scale=scale), (q, k, v),
                     lambda q_, k_, v_: exact_attention(q_, k_, v_, scale, additive, excluded),
                     modes=("lo", "hi", "rand"))
    check(lambda g_, q_, k_, v_, o_, l_: bwd(g_, q_, k_, v_, o_, l_, 0.0, causal, attn_mask=mask, scale=scale),
          (g, q, k, v, out, lse),
          lambda g_, q_, k_, v_, o_, l_: exact_attention_backward(g_, q_, k_, v_, scale, additive, excluded),
          modes=("lo", "hi", "rand"))


def test_attention_a_failing_block_sends_the_whole_call_to_the_composed_rules(monkeypatch):
    """Scores that overflow in the second block only: the whole call (every block) takes the composed rules, as it
    does with the fast path off."""
    import ballgrad.ops.transformer as tr

    q, k, v, _, _ = _fast_inputs(dict(rel=1e-4, mag=1.0, kv=2, dtype=torch.float64), seed=21)
    big = q.mid.clone()
    big[1, 0, 0] = 1e300  # batch element 1: scores of about 1e300 |k|, past the fast path's limit (``_probs``)
    q = bg.ball(big, q.rad)
    g = bg.ball(torch.randn(2, 4, 3, 4, generator=torch.Generator().manual_seed(22), dtype=torch.float64), 1e-4)
    monkeypatch.setattr(tr, "_BYTES_PER_SCORE", {"forward": 1, "backward": 1})
    monkeypatch.setattr(tr, "_BLOCK_BYTES", 4 * 3 * 5)  # one batch element a block
    assert tr._FastAttention.build(aten._scaled_dot_product_flash_attention_for_cpu.default, q[:1], k[:1], v[:1],
                                   False, None, None) is not None  # the first block alone takes the fast path
    blocked = _attention_balls(q, k, v, None, False, None, g)
    monkeypatch.setattr(tr._FastCall, "make", classmethod(lambda cls, *a, **kw: None))
    composed = _attention_balls(q, k, v, None, False, None, g)
    for a, c in zip(blocked, composed):
        assert_same_bits(a.mid, c.mid)
        assert torch.equal(a.rad, c.rad)


# ----------------------------------------------------------------------------------------------------------------------
# Attention: eval-mode fast paths


def _np_linear(x, w, b):
    y = np.matmul(x, w.T)
    return y + b if b is not None else y


def exact_mha(query, key, value, num_heads, qkv_w, qkv_b, proj_w, proj_b, excluded):
    """Fast-path multi-head attention (batch first), masks as bool 'excluded'; returns (out, P)."""
    e = qkv_w.shape[1]
    d = e // num_heads

    def project(x, i):
        y = _np_linear(x, qkv_w[i * e:(i + 1) * e], qkv_b[i * e:(i + 1) * e])
        return np.swapaxes(y.reshape(y.shape[0], y.shape[1], num_heads, d), 1, 2)

    q, k, v = project(query, 0), project(key, 1), project(value, 2)
    p, _, empty = exact_probs(q, k, None, None, excluded)
    o = np.matmul(p, v)
    o = np.swapaxes(o, 1, 2).reshape(q.shape[0], q.shape[2], e)
    out = _np_linear(o, proj_w, proj_b)
    if empty.any():  # the fast path's softmax gives NaN there: undefined
        rows = np.broadcast_to(empty[..., 0].any(axis=1)[..., None], out.shape)
        out = np.where(rows, None, out)
    return out, p


def exact_encoder_layer(src, num_heads, qkv_w, qkv_b, proj_w, proj_b, use_gelu, norm_first, eps, n1w, n1b, n2w, n2b,
                        f1w, f1b, f2w, f2b, excluded):
    def ln(x, w, b):
        return exact_layer_norm(x, 1, w, b, eps)[0]

    def mha(x):
        return exact_mha(x, x, x, num_heads, qkv_w, qkv_b, proj_w, proj_b, excluded)[0]

    def ffn(x):
        h = _np_linear(x, f1w, f1b)
        h = np.vectorize(lambda t: t * (1 + mpmath.erf(t / mpmath.sqrt(2))) / 2 if use_gelu else max(t, 0),
                         otypes=[object])(h)
        return _np_linear(h, f2w, f2b)

    if norm_first:
        x = src + mha(ln(src, n1w, n1b))
        return x + ffn(ln(x, n2w, n2b))
    x = ln(src + mha(src), n1w, n1b)
    return ln(x + ffn(x), n2w, n2b)


def _excluded_np(mask, mask_type, shape):
    if mask is None:
        return np.zeros(shape, dtype=bool)
    ex = (mask != 0).numpy()
    if mask_type == 1:
        ex = ex.reshape(shape[0], 1, 1, shape[-1])
    return np.broadcast_to(ex, shape)


@pytest.mark.parametrize("mask_kind", ["none", "causal", "padding", "nonzero_float"])
@pytest.mark.parametrize("need_weights,average", [(False, True), (True, True), (True, False)])
def test_native_multi_head_attention(mask_kind, need_weights, average):
    torch.manual_seed(4)
    mha = nn.MultiheadAttention(8, 2, batch_first=True).eval()
    w = [bg.ball(t.detach(), 1e-6) for t in (mha.in_proj_weight, mha.in_proj_bias, mha.out_proj.weight,
                                              mha.out_proj.bias)]
    x = torch.randn(2, 4, 8)
    mask, mask_type = None, None
    if mask_kind == "causal":
        mask, mask_type = nn.Transformer.generate_square_subsequent_mask(4), 0
    elif mask_kind == "padding":
        mask, mask_type = torch.tensor([[0.0, 0, 0, -math.inf], [0, -math.inf, 0, 0]]), 1
    elif mask_kind == "nonzero_float":  # the fast path excludes every non-zero entry, finite or not
        mask, mask_type = torch.tensor([[0.0, 0.5, 0, 0]] * 3 + [[-1.0, 2.0, 3.0, 4.0]]), 0

    def op(x_, *ws):
        return aten._native_multi_head_attention.default(x_, x_, x_, 8, 2, *ws, mask, need_weights, average, mask_type)

    def exact(x_, *ws):
        out, p = exact_mha(x_, x_, x_, 2, *ws, _excluded_np(mask, mask_type, (2, 2, 4, 4)))
        if not need_weights:
            return out, None
        return out, (p.sum(axis=1) / 2 if average else p)

    res = check(op, (x, *w), exact, modes=("lo", "hi", "mid"))
    if mask_kind == "nonzero_float":  # row 3 fully excluded: NaN in PyTorch, infinite radius here
        assert bool(torch.isinf(res[0].rad[:, 3]).all())


@needs(aten.relu.default, aten.gelu.default)
@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_transformer_encoder_layer_fast_path(norm_first, activation):
    """nn.TransformerEncoderLayer in eval mode without grad takes ``_transformer_encoder_layer_fwd`` with ball
    parameters (BallTensor disables __torch_function__): midpoints equal the plain fast path's, radii contain the
    exact layer."""
    torch.manual_seed(5)
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True, norm_first=norm_first,
                                       activation=activation).eval()
    plain = copy.deepcopy(layer)
    bg.ballify(layer, rad=1e-6)
    x = torch.randn(2, 4, 8)
    causal = nn.Transformer.generate_square_subsequent_mask(4)
    seen = []
    from ballgrad.ops import registry

    real = registry.dispatch

    def spy(func, args, kwargs):
        seen.append(func)
        return real(func, args, kwargs)

    registry.dispatch, saved = spy, registry.dispatch
    try:
        with torch.no_grad():
            out = layer(x, src_mask=causal)
            ref = plain(x, src_mask=causal)
    finally:
        registry.dispatch = saved
    assert aten._transformer_encoder_layer_fwd.default in seen
    assert_same_bits(out.mid, ref)
    assert_valid_radius(out)
    sa = layer.self_attn
    params = [sa.in_proj_weight, sa.in_proj_bias, sa.out_proj.weight, sa.out_proj.bias]
    params += [layer.norm1.weight, layer.norm1.bias, layer.norm2.weight, layer.norm2.bias, layer.linear1.weight,
               layer.linear1.bias, layer.linear2.weight, layer.linear2.bias]
    rng = random.Random(0)
    excluded = _excluded_np(causal, 0, (2, 2, 4, 4))
    for mode in ("lo", "mid", "rand"):
        pts = [points(p, rng, mode) for p in params]
        y = exact_encoder_layer(points(x, rng, "mid"), 2, *pts[:4], activation == "gelu", norm_first, 1e-5,
                                *pts[4:], excluded)
        for m, r, e in zip(out.mid.reshape(-1).tolist(), out.rad.reshape(-1).tolist(), y.reshape(-1)):
            assert contains_exact(m, r, e), (m, r, e, mode)


# ----------------------------------------------------------------------------------------------------------------------
# Safe softmax and dropout (SDPA's composite math path)


@needs_softmax
def test_safe_softmax_rows():
    x = bg.ball(torch.tensor([[0.5, -1.0, 2.0], [3.0, 3.0, -7.0]]), 1e-6)
    out = check(aten._safe_softmax.default, (x, -1), lambda x_, d_: (
        (lambda e: e / e.sum(axis=-1, keepdims=True))(vexp(vmp(x_)))))
    assert bool(torch.isfinite(out.rad).all())
    # a fully masked row: PyTorch gives 0; a -inf midpoint is an unknown real, so the radius is the range cap 1
    masked = bg.ball(torch.tensor([[-math.inf, -math.inf], [0.0, 1.0]]))
    res = aten._safe_softmax.default(masked, -1)
    assert_same_bits(res.mid, aten._safe_softmax.default(masked.mid, -1))
    assert torch.equal(res.rad[0], torch.ones(2)) and bool(torch.isfinite(res.rad[1]).all())


@needs_softmax
def test_sdpa_math_path_three_dims():
    """3-D inputs take SDPA's composite math path (mul.Scalar, bmm, _safe_softmax): midpoint identity."""
    g = torch.Generator().manual_seed(13)
    q, k, v = (bg.ball(torch.randn(2, 3, 4, generator=g), 1e-6) for _ in range(3))
    out = F.scaled_dot_product_attention(q, k, v)
    assert_same_bits(out.mid, F.scaled_dot_product_attention(q.mid, k.mid, v.mid))
    assert bool(torch.isfinite(out.rad).all())


def exact_dropout(x, p, mask):
    keep = mask.numpy()
    if p == 1:  # every entry dropped (the mask is all false)
        assert not keep.any()
        return np.full(x.shape, Fraction(0), dtype=object)
    return np.where(keep, x / (1 - Fraction(p)), Fraction(0))


@pytest.mark.parametrize("p", [0.0, 0.1, 0.5, 1.0])
@pytest.mark.parametrize("train", [True, False, None])
def test_native_dropout(p, train):
    x = bg.ball(torch.randn(4, 6, dtype=torch.float32), 1e-6)
    torch.manual_seed(9)
    out, mask = aten.native_dropout.default(x, p, train)
    torch.manual_seed(9)
    ref, ref_mask = aten.native_dropout.default(x.mid, p, train)
    assert torch.equal(mask, ref_mask)
    assert_same_bits(out.mid, ref)
    assert_valid_radius(out)
    rng = random.Random(1)
    for mode in ("lo", "hi", "mid", "rand"):
        y = exact_dropout(points(x, rng, mode), p if train is not False else 0.0, mask)
        for m, r, e in zip(out.mid.reshape(-1).tolist(), out.rad.reshape(-1).tolist(), y.reshape(-1)):
            assert contains_exact(m, r, e)
    if p == 0.0 or train is False:
        assert torch.equal(out.rad, x.rad)
    g = bg.ball(torch.randn(4, 6), 1e-7)
    scale = 1.0 / (1.0 - p) if p < 1 else 0.0
    check(aten.native_dropout_backward.default, (g, mask, scale),
          lambda g_, m_, s_: np.where(m_.numpy(), g_ * Fraction(s_), Fraction(0)))


def test_dropout_composite_path_masks_are_exact():
    """F.dropout on CPU reaches empty_like + bernoulli_ + div_ + mul: the Bernoulli draw is exact (radius 0) and
    consumes the random stream as plain PyTorch does."""
    x = bg.ball(torch.randn(5, 7), 1e-6)
    torch.manual_seed(3)
    y = F.dropout(x, 0.4, training=True)
    torch.manual_seed(3)
    y_ref = F.dropout(x.mid, 0.4, training=True)
    assert_same_bits(y.mid, y_ref)
    assert bool(torch.isfinite(y.rad).all())
    assert bool((y.rad[y.mid == 0] < 1e-30).all())  # dropped: x * 0 (the mul rule's underflow term only)
    noise = bg.ball(torch.empty(3, 3))
    noise.bernoulli_(0.5)
    assert bool((noise.rad == 0).all()) and set(noise.mid.unique().tolist()) <= {0.0, 1.0}


# ----------------------------------------------------------------------------------------------------------------------
# End to end: a ballified encoder layer + mean + Linear


class _Head(nn.Module):
    def __init__(self, causal: bool):
        super().__init__()
        self.enc = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.head = nn.Linear(16, 3)
        self.causal = causal

    def forward(self, x):
        if self.causal:
            mask = nn.Transformer.generate_square_subsequent_mask(x.shape[1])
            return self.head(self.enc(x, src_mask=mask, is_causal=True).mean(1))
        return self.head(self.enc(x).mean(1))


def _mse(out, target):
    return ((out - target) ** 2).mean()


@needs_relu_backward
@pytest.mark.parametrize("causal", [False, True])
def test_encoder_layer_training_step_midpoints(causal):
    torch.manual_seed(6)
    model = _Head(causal)
    x, y = torch.randn(2, 5, 16), torch.randn(2, 3)
    plain = copy.deepcopy(model)
    loss_ref = _mse(plain(x), y)
    loss_ref.backward()
    balled = bg.ballify(copy.deepcopy(model), rad=1e-6)
    loss = _mse(balled(x), y)
    loss.backward()
    assert_same_bits(loss.mid, loss_ref.detach())
    for (name, p), (_, p_ref) in zip(balled.named_parameters(), plain.named_parameters()):
        assert isinstance(p.grad, BallTensor), name
        assert_same_bits(p.grad.mid, p_ref.grad)
        assert bool(torch.isfinite(p.grad.rad).all()), name


@needs_relu_backward
@pytest.mark.parametrize("rad", [0.0, 1e-6])
def test_encoder_layer_check_model(rad):
    """The exact oracle (verification.check_model) on one training step: 100% containment and midpoint identity.
    (No mask: the oracle does not take -inf mask constants.)"""
    from verification import check_model

    torch.manual_seed(6)
    model = _Head(False)
    x, y = torch.randn(2, 5, 16), torch.randn(2, 3)
    report = check_model(model, x, y, _mse, rad=rad, name="encoder-layer")
    if report.status == "unsupported":
        pytest.skip(f"ballgrad has no rule for {report.unsupported_op} yet")
    report.assert_ok()
    assert report.containment == 100 and report.midpoint_identity == 100


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_nested_fast_path_is_refused_with_advice():
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True), 1).eval()
    bg.ballify(enc)
    padding = torch.tensor([[False, False, True], [False, False, False]])
    with torch.no_grad(), pytest.raises(bg.UnsupportedOpError, match="enable_nested_tensor=False"):
        enc(torch.randn(2, 3, 8), src_key_padding_mask=padding)
