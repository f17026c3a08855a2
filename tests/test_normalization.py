"""ballgrad.ops.normalization: adversarial (hypothesis) containment of batch norm and layer norm, forward and backward,
and the bounds' building blocks. The seeded per-feature tests of these rules (running statistics, eval mode, the
_legit variants, masks, modules) are with their model families in test_conv.py (batch norm) and test_transformer.py
(layer norm); they share the mpmath oracles imported here."""

from __future__ import annotations

import math
from fractions import Fraction

import mpmath
import numpy as np
import pytest
import torch

import ballgrad as bg
from ballgrad.ops import normalization
from ballgrad.tensor import BallTensor
from ballgrad.testing import balls
from helpers import EXAMPLES, assert_same_bits, assert_valid_radius
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from test_conv import (_bcast, _bn_inputs, assert_contains, check_bn_backward, exact_bn_stats, exact_bn_train,
                       joint_points, mp)
from test_linalg import make_operand
from test_transformer import check, exact_layer_norm, exact_layer_norm_backward

aten = torch.ops.aten

DTYPES = [torch.float32, torch.float64]


def _finite(b: BallTensor) -> bool:
    return bool(torch.isfinite(b.mid).all()) and bool(torch.isfinite(b.rad).all())


def _shifted(b: BallTensor, offset: float) -> BallTensor:
    """The ball moved by ``offset`` (exactly representable sums only: the test then drops the example otherwise)."""
    return bg.ball((b.mid.double() + offset).to(b.dtype), b.rad)


# magnitudes from subnormal to 1e6 offsets: a large common offset makes the variance cancel (mean >> spread)
OFFSETS = st.sampled_from([0.0, 1.0, -3.5, 1e3, 1e6])


@pytest.mark.parametrize("examples", EXAMPLES)
def test_batch_norm_training_adversarial(examples):
    """Training-mode forward and backward on adversarial balls (signed zeros, subnormals, wide radii, a common offset
    that makes the variance cancel): midpoints bit-identical, every point's exact outputs inside."""
    settings(max_examples=examples, deadline=None)(
        given(dtype=st.sampled_from(DTYPES), data=st.data(), offset=OFFSETS,
              eps=st.sampled_from([1e-5, 0.0, 0.5]))(_batch_norm_case))()


def _batch_norm_case(dtype, data, offset, eps):
    x = _shifted(data.draw(balls(dtype, (2, 2, 3), allow_nonfinite=False, allow_inf_radius=False,
                                 max_magnitude=1e4)), offset)
    w = data.draw(balls(dtype, (2,), allow_nonfinite=False, allow_inf_radius=False, max_magnitude=1e3))
    b = data.draw(balls(dtype, (2,), allow_nonfinite=False, allow_inf_radius=False, max_magnitude=1e3))
    gy = data.draw(balls(dtype, (2, 2, 3), allow_nonfinite=False, allow_inf_radius=False, max_magnitude=1e3))
    assume(_finite(x))
    out, mean, invstd = aten.native_batch_norm.default(x, w, b, None, None, True, 0.1, eps)
    ref = aten.native_batch_norm.default(x.mid, w.mid, b.mid, None, None, True, 0.1, eps)
    for o, r in zip((out, mean, invstd), ref):
        assert_same_bits(o.mid, r)
        assert_valid_radius(o)
    grads = aten.native_batch_norm_backward.default(gy, x, w, None, None, mean, invstd, True, eps, [True] * 3)
    ref_g = aten.native_batch_norm_backward.default(gy.mid, x.mid, w.mid, None, None, ref[1], ref[2], True, eps,
                                                    [True] * 3)
    for o, r in zip(grads, ref_g):
        assert_same_bits(o.mid, r)
        assert_valid_radius(o)
    nd = x.dim()
    for p, (xp, wp, bp, gyp) in enumerate(joint_points([x, w, b, gy], n_random=1)):
        try:
            stats = exact_bn_stats(xp, eps)
        except ZeroDivisionError:
            continue  # eps = 0 and a constant channel: 1/sqrt(0) is undefined at this point
        y, _ = exact_bn_train(xp, wp, bp, eps)
        assert_contains(out, y, f"point {p} out")
        assert_contains(mean, [s[0] for s in stats], f"point {p} mean")
        assert_contains(invstd, [s[2] for s in stats], f"point {p} invstd")
        invs = [s[2] for s in stats]
        xhat = (np.vectorize(mp, otypes=[object])(xp) - _bcast([mp(s[0]) for s in stats], nd)) * _bcast(invs, nd)
        g = np.vectorize(mp, otypes=[object])(gyp)
        axes = (0, 2)
        sum_g, sum_gx = np.sum(g, axis=axes), np.sum(g * xhat, axis=axes)
        n = x.numel() // x.shape[1]
        exact_gx = (_bcast([mp(v) for v in wp], nd) * _bcast(invs, nd) / n
                    * (g * n - _bcast(sum_g, nd) - xhat * _bcast(sum_gx, nd)))
        assert_contains(grads[0], exact_gx, f"point {p} grad_input")
        assert_contains(grads[1], list(sum_gx), f"point {p} grad_weight")
        assert_contains(grads[2], list(sum_g), f"point {p} grad_bias")


@pytest.mark.parametrize("block", [8, 16])
@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
def test_batch_norm_backward_in_channel_blocks(monkeypatch, dtype, train, block):
    """native_batch_norm_backward works on a block of whole channels at a time (``_CHANNEL_BLOCK`` elements). Forced to
    blocks of one channel (8) and of two channels with a remainder (16) on 3 channels of 8 elements: midpoints
    bit-identical, every point's exact gradients inside (mpmath), radii as in one block up to the summation order of
    the channel sums (every block wrote its own), and None where an output is not asked for."""
    monkeypatch.setattr(normalization, "_CHANNEL_BLOCK", block)
    x, w, _ = _bn_inputs(dtype, shape=(2, 3, 2, 2), seed=6)
    eps = 1e-5
    gen = torch.Generator().manual_seed(7)
    gy = make_operand(x.shape, dtype, gen, "ball")
    rm = bg.ball(torch.tensor([0.25, 0.5, -0.75], dtype=dtype), 2.0 ** -12)
    rv = bg.ball(torch.tensor([0.75, 1.25, 2.0], dtype=dtype), 2.0 ** -12)
    stats_args = (None, None) if train else (rm, rv)
    _, sm, si = aten.native_batch_norm.default(x, w, None, *stats_args, train, 0.1, eps)
    plain_stats = [None if a is None else a.mid for a in stats_args]
    _, psm, psi = aten.native_batch_norm.default(x.mid, w.mid, None, *plain_stats, train, 0.1, eps)
    outs = check_bn_backward(gy, x, w, rm, rv, (sm, si), (psm, psi), train, eps)
    mask = [True] * 3
    monkeypatch.setattr(normalization, "_CHANNEL_BLOCK", 2**16)
    whole = aten.native_batch_norm_backward.default(gy, x, w, rm, rv, sm, si, train, eps, mask)
    for o, one in zip(outs, whole):
        assert torch.allclose(o.rad, one.rad, rtol=1e-6, atol=0)
    monkeypatch.setattr(normalization, "_CHANNEL_BLOCK", block)
    for mask in ([True, False, False], [False, True, True]):
        outs = aten.native_batch_norm_backward.default(gy, x, w, rm, rv, sm, si, train, eps, mask)
        ref = aten.native_batch_norm_backward.default(gy.mid, x.mid, w.mid, rm.mid, rv.mid, psm, psi, train, eps, mask)
        for o, r, asked in zip(outs, ref, mask):
            assert (o is None) == (r is None) == (not asked)
            if asked:
                assert_same_bits(o.mid, r)
                assert_valid_radius(o)


@pytest.mark.parametrize("examples", EXAMPLES)
def test_batch_norm_adversarial_in_channel_blocks(monkeypatch, examples):
    """The adversarial training-mode case with one channel per block (``_CHANNEL_BLOCK`` = 1)."""
    monkeypatch.setattr(normalization, "_CHANNEL_BLOCK", 1)
    settings(max_examples=examples, deadline=None)(
        given(dtype=st.sampled_from(DTYPES), data=st.data(), offset=OFFSETS,
              eps=st.sampled_from([1e-5, 0.0, 0.5]))(_batch_norm_case))()


@pytest.mark.parametrize("examples", EXAMPLES)
def test_layer_norm_adversarial(examples, ln_path):
    """Layer norm forward and backward (saved statistics and the recomputed mean) on adversarial balls."""
    settings(max_examples=examples, deadline=None)(
        given(dtype=st.sampled_from(DTYPES), data=st.data(), offset=OFFSETS, affine=st.booleans())(
            _layer_norm_case))()


def _layer_norm_case(dtype, data, offset, affine):
    x = _shifted(data.draw(balls(dtype, (2, 4), allow_nonfinite=False, allow_inf_radius=False,
                                 max_magnitude=1e4)), offset)
    assume(_finite(x))
    w = data.draw(balls(dtype, (4,), allow_nonfinite=False, allow_inf_radius=False, max_magnitude=1e3))
    b = data.draw(balls(dtype, (4,), allow_nonfinite=False, allow_inf_radius=False, max_magnitude=1e3))
    gy = data.draw(balls(dtype, (2, 4), allow_nonfinite=False, allow_inf_radius=False, max_magnitude=1e3))
    w, b = (w, b) if affine else (None, None)
    eps = 1e-5
    check(aten.native_layer_norm.default, (x, [4], w, b, eps),
          lambda x_, s_, w_, b_, e_: exact_layer_norm(x_, 1, w_, b_, e_))
    _, mean, rstd = aten.native_layer_norm.default(x, [4], w, b, eps)
    mask = [True, affine, affine]
    for recompute in (False, True):
        check(aten.native_layer_norm_backward.default, (gy, x, [4], mean, rstd, w, b, mask),
              lambda g_, x_, s_, m_, r_, w_, b_, o_: exact_layer_norm_backward(g_, x_, m_, r_, w_, 1, recompute))


@pytest.mark.parametrize("dtype", DTYPES)
def test_non_finite_groups_get_infinite_radii_and_others_stay_finite(dtype, ln_path):
    """A NaN, an inf or an infinite radius in one group (a channel / a row) makes that group's outputs unknown
    (radius +inf, never NaN); the other groups keep finite radii."""
    for bad_mid, bad_rad in ((math.nan, 0.0), (math.inf, 0.0), (1.0, math.inf)):
        x = bg.ball(torch.arange(12, dtype=dtype).reshape(2, 2, 3) / 7, 2.0 ** -30)
        x.mid[1, 1, 2] = bad_mid
        x.rad[1, 1, 2] = bad_rad
        out, mean, invstd = aten.native_batch_norm.default(x, None, None, None, None, True, 0.1, 1e-5)
        for o in (out, mean, invstd):
            assert_valid_radius(o)
        assert bool(torch.isinf(out.rad[:, 1]).all())
        assert bool(torch.isfinite(out.rad[:, 0]).all())
        xl = bg.ball(torch.arange(8, dtype=dtype).reshape(2, 4) / 7, 2.0 ** -30)
        xl.mid[1, 3] = bad_mid
        xl.rad[1, 3] = bad_rad
        y, mu, rs = aten.native_layer_norm.default(xl, [4], None, None, 1e-5)
        assert bool(torch.isinf(y.rad[1]).all()) and bool(torch.isfinite(y.rad[0]).all())
        gy = bg.ball(torch.ones(2, 4, dtype=dtype))
        gx, _, _ = aten.native_layer_norm_backward.default(gy, xl, [4], mu, rs, None, None, [True, False, False])
        assert_valid_radius(gx)
        assert bool(torch.isinf(gx.rad[1]).all()) and bool(torch.isfinite(gx.rad[0]).all())


def test_cancelling_statistics_stay_tight():
    """A channel at 1e6 + O(1e-2) spread (float64): the a-posteriori mean error keeps the output radius near the
    kernel's own error instead of the 1e6-relative a-priori bound (gamma_n sum |m|), which would be ~1e-10 of 1e6."""
    g = torch.Generator().manual_seed(0)
    x = bg.ball(1e6 + 1e-2 * torch.randn(16, 1, 8, dtype=torch.float64, generator=g))
    out, mean, invstd = aten.native_batch_norm.default(x, None, None, None, None, True, 0.1, 1e-5)
    exact_stats = exact_bn_stats(np.vectorize(Fraction, otypes=[object])(x.mid.numpy()), 1e-5)
    assert float(mean.rad[0]) <= 1e-9  # ~ulp(1e6) = 1.2e-10
    assert float(invstd.rad[0]) <= 1e-6 * float(mpmath.mpf(exact_stats[0][2]))
    assert float(out.rad.max()) <= 1e-6


def test_sum_bounds_hold_for_adversarial_sums():
    """``_sum_up`` / ``_sum_down`` bracket exact sums of products (Fractions), including subnormal products."""
    g = torch.Generator().manual_seed(1)
    for scale in (1.0, 1e-160, 1e150):
        a = torch.rand(5, 37, dtype=torch.float64, generator=g) * scale
        b = torch.rand(5, 37, dtype=torch.float64, generator=g) * 1e-160
        s = torch.sum(a * b, dim=1, keepdim=True)
        hi = normalization._sum_up(s, 37, 1)
        lo = normalization._sum_down(s, 37)
        for i in range(5):
            exact = sum(Fraction(float(p)) * Fraction(float(q)) for p, q in zip(a[i], b[i]))
            assert Fraction(float(lo[i, 0])) <= exact <= Fraction(float(hi[i, 0]))


def test_layer_norm_enclosure_matches_the_rule():
    """The composable enclosure (eval-mode encoder fast path) contains what the rule's ball contains: the same
    statistics and output expression, before re-centring."""
    g = torch.Generator().manual_seed(2)
    x = bg.ball(torch.randn(3, 5, generator=g), 2.0 ** -20)
    w = bg.ball(torch.rand(5, generator=g) + 0.5, 2.0 ** -22)
    enc = normalization.layer_norm_enclosure(BallTensor(x.mid.double(), x.rad.double()), 1, w, None, 1e-5)
    y, _, _ = aten.native_layer_norm.default(x, [5], w, None, 1e-5)
    # the rule's radius = the enclosure's radius + |c - mid|, up to the final conversion to float32
    assert bool((y.rad.double() >= enc.rad * (1 - 2.0 ** -20)).all())
    assert bool(((enc.mid - y.mid.double()).abs() <= y.rad.double()).all())


def test_layer_norm_plain_grad_point_input_and_the_point_probe(ln_path):
    """Layer norm paths the adversarial tests reach rarely: a plain grad_out (a point) with ball weights (the grad
    and bias sums with and without radii, stacked), a point input (statistics without radii), and an input whose radii
    are zero on a long prefix (more than 4096 elements: ``_is_point`` probes a prefix, then scans everything)."""
    gen = torch.Generator().manual_seed(4)
    for dtype in DTYPES:
        x = bg.ball(torch.randn(2, 3, 6, generator=gen, dtype=dtype), 2.0 ** -20)
        w = bg.ball(torch.rand(6, generator=gen, dtype=dtype) + 0.5, 2.0 ** -22)
        b = bg.ball(torch.randn(6, generator=gen, dtype=dtype), 2.0 ** -22)
        for xx in (x, bg.ball(x.mid)):
            check(aten.native_layer_norm.default, (xx, [6], w, b, 1e-5),
                  lambda x_, s_, w_, b_, e_: exact_layer_norm(x_, 1, w_, b_, e_))
            _, mean, rstd = aten.native_layer_norm.default(xx, [6], w, b, 1e-5)
            gy = torch.randn(2, 3, 6, generator=gen, dtype=dtype)
            for recompute in (False, True):
                check(aten.native_layer_norm_backward.default, (gy, xx, [6], mean, rstd, w, b, [True, True, True]),
                      lambda g_, x_, s_, m_, r_, w_, b_, o_: exact_layer_norm_backward(g_, x_, m_, r_, w_, 1,
                                                                                      recompute))
    x = bg.ball(torch.randn(2, 2100, generator=gen, dtype=torch.float64))
    x.rad[1, 1000:1010] = 2.0 ** -30
    assert not normalization._is_point(x) and normalization._is_point(bg.ball(x.mid)) and normalization._is_point(x.mid)
    check(aten.native_layer_norm.default, (x, [2100], None, None, 1e-5),
          lambda x_, s_, w_, b_, e_: exact_layer_norm(x_, 1, None, None, e_), modes=("lo", "hi", "rand"))
    y, _, _ = aten.native_layer_norm.default(x, [2100], None, None, 1e-5)
    assert float(y.rad[1].min()) > float(y.rad[0].max())  # the radii entered the second row's statistics


def test_layer_norm_stacked_helpers_keep_the_bits():
    """Stacking group quantities (``_recentre_balls``, ``_sum_balls``) and the per-slot sum bounds (``_sum_bounds``)
    are the same float64 operations as one at a time: the same bits."""
    gen = torch.Generator().manual_seed(5)
    balls = [normalization._Ball(torch.rand(4, 1, dtype=torch.float64, generator=gen),
                                 torch.rand(4, 1, dtype=torch.float64, generator=gen) * 1e-9) for _ in range(2)]
    mids = [torch.rand(4, 1, generator=gen) for _ in range(2)]
    for one, stacked in zip([normalization._recentre_ball(m, bl) for m, bl in zip(mids, balls)],
                            normalization._recentre_balls(mids, balls)):
        assert_same_bits(one.rad, stacked.rad)
    g = [normalization._Ball(torch.randn(3, 5, dtype=torch.float64, generator=gen), r)
         for r in (torch.rand(3, 5, dtype=torch.float64, generator=gen), None)]
    for one, stacked in zip([normalization._sum_ball(gi, [0], 3) for gi in g], normalization._sum_balls(g, [0], 3)):
        assert_same_bits(one.total.c, stacked.total.c)
        assert_same_bits(one.total.r, stacked.total.r)
    s = torch.rand(3, 2, 1, dtype=torch.float64, generator=gen) * torch.tensor([1.0, 1e-300, 1e300]).reshape(3, 1, 1)
    bounds = normalization._sum_bounds(s, 7, (0, 1, -1))
    assert_same_bits(bounds[0], normalization._sum_up(s[0], 7, 0))
    assert_same_bits(bounds[1], normalization._sum_up(s[1], 7, 1))
    assert_same_bits(bounds[2], normalization._sum_down(s[2], 7))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_layer_norm_owned_buffer_forms_keep_the_bits(dtype):
    """The memory-saving forms are the same float64 operations as the generic ones: ``_grad_times_xhat`` as the nested
    ``_mul_full``, ``_dot_ball`` with its own |g.c| as scratch as with the caller's, and ``_affine_terms`` (its scale's
    scratch reused in place) as the plain expression; float32 operands (widened once) and float64 ones, point and ball
    radii, with tiny and huge magnitudes."""
    gen = torch.Generator().manual_seed(11)
    scales = torch.tensor([1.0, 1e-300, 1e30, 2.0 ** -1070]).reshape(4, 1)
    m = (torch.randn(4, 6, generator=gen, dtype=torch.float64) * scales).to(dtype)
    mu = normalization._Ball(torch.randn(4, 1, dtype=torch.float64, generator=gen),
                             torch.rand(4, 1, dtype=torch.float64, generator=gen) * 1e-9)
    s = normalization._Ball(torch.rand(4, 1, dtype=torch.float64, generator=gen) + 0.5,
                            torch.rand(4, 1, dtype=torch.float64, generator=gen) * 1e-12)
    for r in (None, (torch.rand(4, 6, generator=gen, dtype=torch.float64) * 1e-6).to(dtype)):
        for g_r in (None, (torch.rand(4, 6, generator=gen, dtype=torch.float64) * 1e-6).to(dtype)):
            gc = (torch.randn(4, 6, generator=gen, dtype=torch.float64) * scales.flip(0)).to(dtype)
            gy = normalization._Ball(gc, g_r)
            z = normalization._centred(m, r, mu)
            rho = torch.mul(torch.abs(z.d), normalization._U)
            if r is not None:
                rho += r
            rho += z.mu_r
            inner = normalization._mul_full(normalization._Ball(z.d, normalization._inflated_(rho, 3)), s,
                                            torch.abs(z.d))
            want = normalization._mul_full(gy, inner, torch.abs(gc))
            got = normalization._grad_times_xhat(gy, z, s)
            assert_same_bits(got.c, want.c)
            assert_same_bits(got.r, want.r)
            g = normalization._mul_full(gy, normalization._Ball(torch.randn(6, dtype=torch.float64, generator=gen),
                                                                torch.rand(6, dtype=torch.float64,
                                                                           generator=gen) * 1e-12))
            sums = normalization._sum_ball(g, [1], 6)
            want = normalization._dot_ball(g, z, sums, [1], 6, torch.abs(g.c))
            got = normalization._dot_ball(g, z, sums, [1], 6)
            assert_same_bits(got.c, want.c)
            assert_same_bits(got.r, want.r)
            scale = normalization._mul_full(s, normalization._Ball(torch.randn(6, dtype=torch.float64, generator=gen),
                                                                    torch.rand(6, dtype=torch.float64,
                                                                               generator=gen) * 1e-9))
            for bias in (None, normalization._Ball(torch.randn(6, dtype=torch.float64, generator=gen),
                                                   torch.rand(6, dtype=torch.float64, generator=gen) * 1e-9)):
                f = scale.c
                h = normalization._inflated_(torch.abs(f) + scale.r, 1)
                gg = normalization._inflated_(torch.mul(h, normalization._U).add_(scale.r)
                                              .add_(torch.abs(f).mul_(normalization._THREE_U)), 4)
                want = torch.abs(z.d).mul_(gg)
                if r is not None:
                    want.addcmul_(r, h)
                if bias is None:
                    want += z.mu_r * h
                else:
                    want += z.mu_r * h + normalization._inflated(bias.r + torch.abs(bias.c) * (2 * normalization._U),
                                                                 2, normalization._ETA)
                want_c = z.d * f if bias is None else z.d * f + bias.c
                c, expr, extra = normalization._affine_terms(normalization._centred(m, r, mu), scale, bias)
                assert_same_bits(expr, want)
                assert_same_bits(c, want_c)
                assert extra == (normalization._ETA if bias is None else 0.0)
