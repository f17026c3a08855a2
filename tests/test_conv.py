"""CNN rules (ops/conv.py): convolution and its backward, batch norm and its backward, max/avg/adaptive pooling,
nearest upsampling -- against exact arithmetic.

Convolutions are exact in rational arithmetic: the reference here (``conv_int`` and friends) is a direct
implementation on Python integers (floats scaled by a power of two), checked by ``test_linalg.check_gemm`` at
whole-tensor sample points of the input balls (end points, the outward corner, random corners and interior points),
with bit-identical midpoints and infinite radii wherever a non-finite input is involved. Batch norm is checked
against mpmath at 256 bits (the square root is the only irrational step), pooling against exact Fractions.
"""

import copy
import itertools
import math
import random
from fractions import Fraction
from typing import NamedTuple

import mpmath
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import ballgrad as bg
from ballgrad import rounding
from ballgrad.errors import NumericsGuardError
from ballgrad.ops import conv as conv_ops
from ballgrad.ops.registry import RULES
from ballgrad.tensor import BallTensor
from ballgrad.testing import balls
from helpers import EXAMPLES, assert_same_bits, assert_valid_radius
from hypothesis import given, settings
from test_linalg import _values, check_gemm, make_operand

aten = torch.ops.aten
mpmath.mp.prec = 256


# ----------------------------------------------------------------------------------------------------------------------
# Exact convolution on integer object arrays


def _zeros(shape):
    return np.zeros(tuple(shape), dtype=object)


def _pad(x, padding, extra=None):
    """Zero-pad the spatial dims of an (N, C, *S) object array by ``padding`` (left) and padding + extra (right)."""
    d = x.ndim - 2
    extra = extra or [0] * d
    shape = list(x.shape[:2]) + [x.shape[2 + i] + 2 * padding[i] + extra[i] for i in range(d)]
    out = _zeros(shape)
    out[(slice(None), slice(None)) + tuple(slice(padding[i], padding[i] + x.shape[2 + i]) for i in range(d))] = x
    return out


def _taps(kappa, stride, dilation, count):
    return tuple(slice(k * dl, k * dl + s * (c - 1) + 1, s) for k, s, dl, c in zip(kappa, stride, dilation, count))


def conv_int(x, w, stride, padding, dilation, groups):
    """y[n, o, q] = sum_{c in group, kappa} xpad[n, c, q s + kappa d] w[o, c, kappa]."""
    d = x.ndim - 2
    n_out, cg = w.shape[:2]
    kernel = w.shape[2:]
    out = [(x.shape[2 + i] + 2 * padding[i] - dilation[i] * (kernel[i] - 1) - 1) // stride[i] + 1 for i in range(d)]
    xp = _pad(x, padding)
    og = n_out // groups
    y = _zeros([x.shape[0], n_out] + out)
    for g in range(groups):
        for kappa in np.ndindex(*kernel):
            xs = xp[(slice(None), slice(g * cg, (g + 1) * cg)) + _taps(kappa, stride, dilation, out)]
            ws = w[(slice(g * og, (g + 1) * og), slice(None)) + kappa]
            y[:, g * og:(g + 1) * og] += np.moveaxis(np.tensordot(xs, ws, axes=([1], [1])), -1, 1)
    return y


def conv_transpose_int(x, w, stride, padding, dilation, output_padding, groups):
    """y[n, o, i s - p + kappa d] += sum_{c in group} x[n, c, i] w[c, o, kappa], cropped to the output size."""
    d = x.ndim - 2
    cin, og = w.shape[:2]
    kernel = w.shape[2:]
    cg = cin // groups
    size = x.shape[2:]
    out = [(size[i] - 1) * stride[i] - 2 * padding[i] + dilation[i] * (kernel[i] - 1) + output_padding[i] + 1
           for i in range(d)]
    full = [max((size[i] - 1) * stride[i] + dilation[i] * (kernel[i] - 1) + 1, padding[i] + out[i]) for i in range(d)]
    yf = _zeros([x.shape[0], og * groups] + full)
    for g in range(groups):
        for kappa in np.ndindex(*kernel):
            contrib = np.moveaxis(np.tensordot(x[:, g * cg:(g + 1) * cg],
                                               w[(slice(g * cg, (g + 1) * cg), slice(None)) + kappa], axes=([1], [0])),
                                  -1, 1)
            yf[(slice(None), slice(g * og, (g + 1) * og)) + _taps(kappa, stride, dilation, size)] += contrib
    return yf[(slice(None), slice(None)) + tuple(slice(padding[i], padding[i] + out[i]) for i in range(d))]


def grad_weight_int(gy, x, w_shape, stride, padding, dilation, transposed, groups):
    """The weight gradient of sum(gy * conv(x, w)), directly from the definition of the (transposed) convolution."""
    d = x.ndim - 2
    kernel = w_shape[2:]
    gw = _zeros(w_shape)
    spatial = list(range(2, 2 + d))
    if not transposed:
        n_out, cg = w_shape[:2]
        og = n_out // groups
        xp = _pad(x, padding)
        out = gy.shape[2:]
        for g in range(groups):
            for kappa in np.ndindex(*kernel):
                xs = xp[(slice(None), slice(g * cg, (g + 1) * cg)) + _taps(kappa, stride, dilation, out)]
                gw[(slice(g * og, (g + 1) * og), slice(None)) + kappa] = np.tensordot(
                    gy[:, g * og:(g + 1) * og], xs, axes=([0] + spatial, [0] + spatial))
        return gw
    cin, og = w_shape[:2]
    cg = cin // groups
    size = x.shape[2:]
    out = gy.shape[2:]
    full = [max((size[i] - 1) * stride[i] + dilation[i] * (kernel[i] - 1) + 1, padding[i] + out[i]) for i in range(d)]
    gyf = _zeros(list(gy.shape[:2]) + full)
    gyf[(slice(None), slice(None)) + tuple(slice(padding[i], padding[i] + out[i]) for i in range(d))] = gy
    for g in range(groups):
        for kappa in np.ndindex(*kernel):
            gys = gyf[(slice(None), slice(g * og, (g + 1) * og)) + _taps(kappa, stride, dilation, size)]
            gw[(slice(g * cg, (g + 1) * cg), slice(None)) + kappa] = np.tensordot(
                x[:, g * cg:(g + 1) * cg], gys, axes=([0] + spatial, [0] + spatial))
    return gw


def _fractions(ints, denom):
    return np.vectorize(lambda v: Fraction(v, denom), otypes=[object])(ints) if ints.size else ints


class Conv(NamedTuple):
    d: int
    n: int
    cin: int
    cout: int
    size: tuple
    kernel: tuple
    stride: tuple = None
    padding: tuple = None
    dilation: tuple = None
    groups: int = 1
    transposed: bool = False
    output_padding: tuple = None
    bias: bool = True

    def p(self, name):
        v = getattr(self, name)
        return list(v) if v is not None else ([1] * self.d if name in ("stride", "dilation") else [0] * self.d)

    @property
    def x_shape(self):
        return (self.n, self.cin) + tuple(self.size)

    @property
    def w_shape(self):
        if self.transposed:
            return (self.cin, self.cout // self.groups) + tuple(self.kernel)
        return (self.cout, self.cin // self.groups) + tuple(self.kernel)

    def params(self):
        return (self.p("stride"), self.p("padding"), self.p("dilation"), self.transposed, self.p("output_padding"),
                self.groups)

    def forward(self, x, w, b=None):
        return aten.convolution.default(x, w, b, *self.params())

    def backward(self, gy, x, w, mask):
        return aten.convolution_backward.default(gy, x, w, [self.cout] if self.bias else None, *self.params(), mask)

    def exact_forward(self, xp, wp, bp=None):
        (xi, dx), (wi, dw) = xp, wp
        s, p, dl, tr, op, g = self.params()
        y = conv_transpose_int(xi, wi, s, p, dl, op, g) if tr else conv_int(xi, wi, s, p, dl, g)
        if bp is None:
            return _fractions(y, dx * dw)
        bi, db = bp
        y = y * db + bi.reshape((1, -1) + (1,) * self.d) * (dx * dw)
        return _fractions(y, dx * dw * db)

    def exact_grad_input(self, gyp, wp):
        (gi, dg), (wi, dw) = gyp, wp
        s, p, dl, tr, _, g = self.params()
        if tr:
            return _fractions(conv_int(gi, wi, s, p, dl, g), dg * dw)
        op = [self.size[i] - ((gi.shape[2 + i] - 1) * s[i] - 2 * p[i] + dl[i] * (self.kernel[i] - 1) + 1)
              for i in range(self.d)]
        return _fractions(conv_transpose_int(gi, wi, s, p, dl, op, g), dg * dw)

    def exact_grad_weight(self, gyp, xp):
        (gi, dg), (xi, dx) = gyp, xp
        s, p, dl, tr, _, g = self.params()
        return _fractions(grad_weight_int(gi, xi, self.w_shape, s, p, dl, tr, g), dg * dx)


CONVS = [
    Conv(2, 2, 3, 4, (5, 6), (3, 2)),
    Conv(2, 1, 4, 6, (7, 7), (3, 3), stride=(2, 1), padding=(1, 2), dilation=(2, 1), groups=2, bias=False),
    Conv(2, 2, 4, 4, (5, 5), (3, 3), padding=(1, 1), groups=4),  # depthwise
    Conv(1, 2, 3, 2, (9,), (4,), stride=(3,), padding=(2,), dilation=(2,), bias=False),
    Conv(3, 1, 2, 3, (3, 4, 4), (2, 2, 3), stride=(1, 2, 1), padding=(1, 0, 1)),
    Conv(2, 2, 4, 6, (3, 4), (3, 2), stride=(2, 3), padding=(1, 0), groups=2, transposed=True, output_padding=(1, 2)),
    Conv(1, 1, 2, 3, (5,), (3,), padding=(2,), dilation=(3,), transposed=True, bias=False),
    Conv(3, 1, 2, 2, (2, 2, 3), (2, 2, 2), stride=(2, 1, 2), transposed=True),
]
CONV_IDS = ["2d", "2d-strided-dilated-groups", "depthwise", "1d-dilated", "3d", "transposed-2d", "transposed-1d",
            "transposed-3d"]
CONV_MODES = [("ball", "ball", "ball"), ("plain", "ball", "plain"), ("ball", "plain", "ball"),
              ("point", "point", "point"), ("rel", "point", "plain")]


def _operands(cfg, dtype, modes, gen):
    x = make_operand(cfg.x_shape, dtype, gen, modes[0])
    w = make_operand(cfg.w_shape, dtype, gen, modes[1])
    args = [x, w]
    if cfg.bias:
        args.append(make_operand((cfg.cout,), dtype, gen, modes[2]))
    return args


# ----------------------------------------------------------------------------------------------------------------------
# Convolution


@pytest.mark.parametrize("cfg", CONVS, ids=CONV_IDS)
def test_exact_reference_matches_torch_on_small_integers(cfg):
    """The integer reference itself: on small integers float64 PyTorch is exact, so both must agree exactly."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randint(-8, 9, cfg.x_shape, generator=gen).double()
    w = torch.randint(-8, 9, cfg.w_shape, generator=gen).double()
    gy = torch.randint(-8, 9, cfg.forward(x, w).shape, generator=gen).double()
    ints = lambda t: (np.array(t.long().tolist(), dtype=object).reshape(tuple(t.shape)), 1)  # noqa: E731
    y = cfg.forward(x, w)
    assert np.array_equal(cfg.exact_forward(ints(x), ints(w)), np.array(y.long().tolist(), dtype=object))
    gx, gw, gb = cfg.backward(gy, x, w, [True, True, True])
    assert np.array_equal(cfg.exact_grad_input(ints(gy), ints(w)).astype(object),
                          np.array(gx.long().tolist(), dtype=object))
    assert np.array_equal(cfg.exact_grad_weight(ints(gy), ints(x)).astype(object),
                          np.array(gw.long().tolist(), dtype=object))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("cfg", CONVS, ids=CONV_IDS)
def test_convolution_contains_exact(cfg, dtype):
    gen = torch.Generator().manual_seed(hash((cfg, str(dtype))) % 2**31)
    for i, modes in enumerate(CONV_MODES):
        args = _operands(cfg, dtype, modes, gen)
        check_gemm(cfg.forward, args, cfg.exact_forward, seed=i, max_points=6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("cfg", CONVS, ids=CONV_IDS)
def test_convolution_backward_contains_exact(cfg, dtype):
    """grad_input (a function of grad_output and the weight), grad_weight (grad_output and the input) and grad_bias
    (grad_output), each with the other operand plain; then all three at once with balls everywhere."""
    gen = torch.Generator().manual_seed(hash((cfg, "bw", str(dtype))) % 2**31)
    y_shape = cfg.forward(torch.zeros(cfg.x_shape, dtype=dtype), torch.zeros(cfg.w_shape, dtype=dtype)).shape
    for i, modes in enumerate([("ball", "ball"), ("plain", "ball"), ("ball", "point"), ("rel", "plain")]):
        gy = make_operand(y_shape, dtype, gen, modes[0])
        w = make_operand(cfg.w_shape, dtype, gen, modes[1])
        x = make_operand(cfg.x_shape, dtype, gen, modes[1])
        x_plain = _values(cfg.x_shape, dtype, gen)
        w_plain = _values(cfg.w_shape, dtype, gen)
        check_gemm(lambda g, ww: cfg.backward(g, x_plain.to(g.dtype), ww, [True, False, False])[0], [gy, w],
                   cfg.exact_grad_input, seed=i, max_points=5)
        check_gemm(lambda g, xx: cfg.backward(g, xx, w_plain.to(g.dtype), [False, True, False])[1], [gy, x],
                   cfg.exact_grad_weight, seed=i, max_points=5)
        if cfg.bias and isinstance(gy, BallTensor):
            dims = [0] + list(range(2, 2 + cfg.d))

            def exact_bias(gp):
                ints, denom = gp
                return _fractions(np.sum(ints, axis=tuple(dims)), denom)

            check_gemm(lambda g: cfg.backward(g, x_plain, w_plain, [False, False, True])[2], [gy], exact_bias,
                       seed=i, max_points=5)
    # every output at once, balls everywhere: bit-identical midpoints, valid radii, None where not asked for
    gy, x, w = (make_operand(s, dtype, gen, "ball") for s in (y_shape, cfg.x_shape, cfg.w_shape))
    for mask in ([True, True, cfg.bias], [False, True, False], [True, False, False]):
        outs = cfg.backward(gy, x, w, mask)
        ref = cfg.backward(gy.mid, x.mid, w.mid, mask)
        for o, r, asked in zip(outs, ref, mask):
            assert (o is None) == (r is None) == (not asked)
            if o is not None:
                assert_same_bits(o.mid, r)
                assert_valid_radius(o)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_convolution_reduced_dtypes(dtype):
    """float16/bfloat16 midpoints (oneDNN, k = 16 x 9 = 144 >= 64: the AMX path where it exists), float32 radii."""
    gen = torch.Generator().manual_seed(4)
    cfg = Conv(2, 2, 16, 3, (4, 4), (3, 3), padding=(1, 1))
    for i, modes in enumerate([("ball", "ball", "ball"), ("plain", "ball", "point")]):
        args = _operands(cfg, dtype, modes, gen)
        out = check_gemm(cfg.forward, args, cfg.exact_forward, seed=i, max_points=4)
        assert out.rad.dtype == torch.float32
    gy = make_operand(out.shape, dtype, gen, "ball")
    x = make_operand(cfg.x_shape, dtype, gen, "plain")
    check_gemm(lambda g, ww: cfg.backward(g, x, ww, [True, False, False])[0],
               [gy, make_operand(cfg.w_shape, dtype, gen, "ball")], cfg.exact_grad_input, max_points=4)


@pytest.mark.parametrize("block", [1, 216])
def test_convolution_reference_in_blocks(monkeypatch, block):
    """Narrow midpoints: the float64 reference is evaluated a block of samples at a time (forward and grad_input) or of
    input channels (grad_weight, one group) when large (``conv._REFERENCE_BLOCK`` float64 elements). Forced to one
    sample / channel per block (1), and to two samples per block with a remainder (216: 108 elements per sample for
    this geometry), every configuration still contains the exact values with bit-identical midpoints."""
    monkeypatch.setattr(conv_ops, "_REFERENCE_BLOCK", block)
    for cfg in CONVS + [Conv(2, 5, 3, 2, (4, 4), (2, 2))]:
        test_convolution_contains_exact(cfg, torch.float32)
        test_convolution_backward_contains_exact(cfg, torch.float32)
    for dtype in (torch.bfloat16, torch.float16):
        test_convolution_reduced_dtypes(dtype)


def test_convolution_bfloat16_subnormal_inputs():
    """AMX may read bfloat16 subnormals as 0: 2^-130 * 2^20 terms must stay covered (k = 128)."""
    cfg = Conv(2, 1, 128, 2, (2, 2), (1, 1), bias=False)
    x = torch.full(cfg.x_shape, 2.0 ** -130, dtype=torch.bfloat16)
    w = torch.full(cfg.w_shape, 2.0 ** 20, dtype=torch.bfloat16)
    for args in ([bg.ball(x), w], [x, bg.ball(w)], [bg.ball(x), bg.ball(w)]):
        out = check_gemm(cfg.forward, args, cfg.exact_forward, max_points=3)
        assert bool(torch.isfinite(out.rad).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_convolution_adversarial_values(dtype):
    """Subnormal products, exact zeros, values near overflow, and inf/NaN inputs (with padding)."""
    eta = rounding.eta(dtype)
    big = float(torch.finfo(dtype).max)
    cfg = Conv(2, 1, 2, 2, (3, 3), (2, 2), padding=(1, 1))
    # products rounding in the subnormal range: an absolute error eta/2 per product
    x = torch.full(cfg.x_shape, 3 * eta, dtype=dtype)
    w = torch.full(cfg.w_shape, 0.5, dtype=dtype)
    b = torch.zeros(cfg.cout, dtype=dtype)
    out = check_gemm(cfg.forward, [bg.ball(x), w, b], cfg.exact_forward)
    assert bool((out.rad > 0).all())
    check_gemm(cfg.forward, [x, bg.ball(w), bg.ball(b)], cfg.exact_forward)
    # exact zeros: only the absolute allowance
    out = check_gemm(cfg.forward, [bg.ball(torch.zeros(cfg.x_shape, dtype=dtype)), bg.ball(w), b], cfg.exact_forward)
    assert bool((out.rad <= 4 * float(torch.finfo(dtype).smallest_normal)).all())
    # near overflow: overflowed midpoints get infinite radii, the others stay finite
    gen = torch.Generator().manual_seed(2)
    x = _values(cfg.x_shape, dtype, gen, scale_exp=2)
    x[0, 0, 1, 1] = big * 0.75
    x[0, 1, 1, 1] = big * 0.75
    w = torch.ones(cfg.w_shape, dtype=dtype)
    out = check_gemm(cfg.forward, [bg.ball(x, 2.0 ** -20), bg.ball(w, 2.0 ** -20), b], cfg.exact_forward)
    assert bool(torch.isinf(out.mid).any()) and bool(torch.isinf(out.rad[torch.isinf(out.mid)]).all())
    # inf and NaN inputs: every output reading them is infinite (check_gemm checks it), the others finite
    x = _values(cfg.x_shape, dtype, gen, scale_exp=2)
    x[0, 0, 0, 0] = math.inf
    x[0, 1, 2, 2] = math.nan
    out = check_gemm(cfg.forward, [bg.ball(x, 2.0 ** -20), bg.ball(w), b], cfg.exact_forward)
    assert bool(torch.isfinite(out.rad).any()) and bool(torch.isinf(out.rad).any())
    # an infinite radius with a finite midpoint
    xr = torch.zeros(cfg.x_shape, dtype=dtype)
    xr[0, 0, 2, 0] = math.inf
    out = check_gemm(cfg.forward, [bg.ball(_values(cfg.x_shape, dtype, gen), xr), w], cfg.exact_forward)
    assert bool(torch.isinf(out.rad).any()) and bool(torch.isfinite(out.rad).any())


@pytest.mark.parametrize("examples", EXAMPLES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_convolution_hypothesis_adversarial(dtype, examples):
    """Adversarial balls (zeros of both signs, subnormals, values near overflow, inf/NaN midpoints, infinite and
    relative radii) through a strided, padded 1-d convolution and both backward products."""
    cfg = Conv(1, 1, 2, 2, (5,), (3,), stride=(2,), padding=(1,))
    y_shape = (1, 2, 3)

    @settings(max_examples=max(3, examples // 3))
    @given(balls(dtype, cfg.x_shape), balls(dtype, cfg.w_shape), balls(dtype, (cfg.cout,)), balls(dtype, y_shape))
    def run(x, w, b, gy):
        check_gemm(cfg.forward, [x, w, b], cfg.exact_forward, max_points=4)
        check_gemm(lambda g, ww: cfg.backward(g, x.mid.to(g.dtype), ww, [True, False, False])[0], [gy, w],
                   cfg.exact_grad_input, max_points=3)
        check_gemm(lambda g, xx: cfg.backward(g, xx, w.mid.to(g.dtype), [False, True, False])[1], [gy, x],
                   cfg.exact_grad_weight, max_points=3)

    run()


def test_convolution_through_functional_api():
    """F.conv1d/2d/3d and F.conv_transpose2d (what nn.Conv*d calls) reach the rule, with bit-identical midpoints."""
    gen = torch.Generator().manual_seed(3)
    x2 = make_operand((2, 4, 6, 6), torch.float32, gen, "ball")
    w2 = make_operand((6, 2, 3, 3), torch.float32, gen, "ball")
    b2 = make_operand((6,), torch.float32, gen, "ball")
    for f in (lambda x, w, b: F.conv2d(x, w, b, stride=2, padding="valid", groups=2),
              lambda x, w, b: F.conv2d(x, w, b, padding="same", dilation=2, groups=2),
              lambda x, w, b: F.conv_transpose2d(x, w.transpose(0, 1).reshape(4, 3, 3, 3)[:, :3], b[:6],
                                                 stride=2, output_padding=1, groups=2)):
        out = f(x2, w2, b2)
        assert_same_bits(out.mid, f(x2.mid, w2.mid, b2.mid))
        assert_valid_radius(out)
    xc = bg.ball(x2.mid.contiguous(memory_format=torch.channels_last),
                 x2.rad.contiguous(memory_format=torch.channels_last))
    out = F.conv2d(xc, w2, b2, padding=1, groups=2)
    assert_same_bits(out.mid, F.conv2d(xc.mid, w2.mid, b2.mid, padding=1, groups=2))
    x1 = make_operand((2, 3, 8), torch.float64, gen, "ball")
    out = F.conv1d(x1, make_operand((4, 3, 3), torch.float64, gen, "ball"), padding=1)
    assert out.shape == (2, 4, 8) and isinstance(out, BallTensor)


def test_convolution_negative_control():
    """Shrinking one radius by (1 - 2^-10) loses the adversarial corner (everything positive, upper end points):
    the checker would catch a too-small bound."""
    gen = torch.Generator().manual_seed(5)
    cfg = Conv(2, 1, 3, 2, (4, 4), (3, 3))
    mx = torch.rand(cfg.x_shape, generator=gen, dtype=torch.float64) + 0.5
    mw = torch.rand(cfg.w_shape, generator=gen, dtype=torch.float64) + 0.5
    x, w = bg.ball(mx, mx * 2.0 ** -6), bg.ball(mw, mw * 2.0 ** -6)
    out = check_gemm(cfg.forward, [x, w], cfg.exact_forward)
    to_int = lambda t: (np.array([Fraction(v) for v in t.reshape(-1).tolist()], dtype=object)  # noqa: E731
                        .reshape(tuple(t.shape)))
    upper = conv_int(to_int(mx) + to_int(x.rad), to_int(mw) + to_int(w.rad), [1, 1], [0, 0], [1, 1], 1)
    corner = upper[0, 1, 1, 0]
    assert bool(out[0, 1, 1, 0].contains(corner))
    shrunk = BallTensor(out.mid, out.rad.clone())
    shrunk.rad[0, 1, 1, 0] *= 1 - 2.0 ** -10
    assert not bool(shrunk[0, 1, 1, 0].contains(corner))
    with pytest.raises(AssertionError, match="not in"):
        check_gemm(lambda a, b: shrunk if a is x else cfg.forward(a, b), [x, w], cfg.exact_forward)


def test_convolution_tightness():
    """float32: the radius is the propagation bound |mX| * rW + rX * |mW| + rX * rW plus the measured midpoint error
    |m - fl64(conv)| (up to 1 + O(k u)), never above the a priori bound with gamma_k |mX| * |mW|."""
    gen = torch.Generator().manual_seed(9)
    cfg = Conv(2, 2, 8, 4, (6, 6), (3, 3), padding=(1, 1), bias=False)
    mx, mw = torch.randn(cfg.x_shape, generator=gen), torch.randn(cfg.w_shape, generator=gen)
    rx, rw = mx.abs() * 2.0 ** -10, mw.abs() * 2.0 ** -10
    out = cfg.forward(bg.ball(mx, rx), bg.ball(mw, rw))
    c = lambda a, b: cfg.forward(a.double(), b.double())  # noqa: E731
    prop = c(mx.abs(), rw) + c(rx, mw.abs()) + c(rx, rw)
    k = 8 * 9
    gamma_k = k * 2.0 ** -24 / (1 - k * 2.0 ** -24)
    measured = (out.mid.double() - c(mx, mw)).abs()
    a_priori = prop + gamma_k * c(mx.abs(), mw.abs())
    assert bool((out.rad.double() >= prop + measured).all())
    assert bool((out.rad.double() <= (prop + measured) * (1 + 1e-4) + 1e-10).all())
    assert bool((out.rad.double() <= a_priori * (1 + 1e-4)).all())


def test_nnpack_and_reduced_precision_are_refused():
    """NNPACK (Winograd/FFT, chosen for float32 batch >= 16 without oneDNN and without gradients) and a lowered
    oneDNN conv precision have no dot-product error bound: refused with the fix named."""
    x = bg.ball(torch.randn(16, 3, 8, 8), 1e-6)
    w = torch.randn(4, 3, 3, 3)
    with torch.backends.mkldnn.flags(enabled=False):
        if torch.backends.nnpack.is_available():
            with pytest.raises(NumericsGuardError, match="nnpack"):
                F.conv2d(x, w)
        with torch.backends.nnpack.flags(enabled=False):
            out = F.conv2d(x, w)
            assert_same_bits(out.mid, F.conv2d(x.mid, w))
    try:
        old = torch.backends.mkldnn.conv.fp32_precision
    except AttributeError:
        pytest.skip("this PyTorch has no torch.backends.mkldnn.conv.fp32_precision")
    try:
        torch.backends.mkldnn.conv.fp32_precision = "bf16"
        with pytest.raises(NumericsGuardError, match="fp32_precision"):
            F.conv2d(x, w)
    finally:
        torch.backends.mkldnn.conv.fp32_precision = old
    F.conv2d(x, w)


# ----------------------------------------------------------------------------------------------------------------------
# Sample points of whole tensors (Fractions), for batch norm and pooling


def _frac_array(t):
    return np.array([Fraction(v) for v in t.detach().double().reshape(-1).tolist()], dtype=object).reshape(
        tuple(t.shape))


def sample_points(x, rng, n_random=2):
    """Whole-tensor exact points of an argument: lower, upper, midpoint, outward corner, random corners and interior
    points (a plain tensor or None: itself)."""
    if x is None or not isinstance(x, torch.Tensor):
        return [x]
    m = _frac_array(x.mid if isinstance(x, BallTensor) else x)
    if not isinstance(x, BallTensor):
        return [m]
    r = _frac_array(x.rad)
    sign = np.vectorize(lambda v: -1 if v < 0 else 1, otypes=[object])(m)
    pts = [m - r, m + r, m, m + sign * r]
    for _ in range(n_random):
        corner = np.array([rng.choice((-1, 1)) for _ in range(m.size)], dtype=object).reshape(m.shape)
        pts.append(m + r * corner)
        inner = np.array([Fraction(rng.randint(-2**20, 2**20), 2**20) for _ in range(m.size)],
                         dtype=object).reshape(m.shape)
        pts.append(m + r * inner)
    return pts


def joint_points(args, seed=0, n_random=2):
    rng = random.Random(seed)
    per = [sample_points(a, rng, n_random) for a in args]
    n = max(len(p) for p in per)
    return [[p[i % len(p)] for p in per] for i in range(n)]


def mp(v):
    v = Fraction(v)
    return mpmath.mpf(v.numerator) / v.denominator


def assert_contains(ball, exact, what=""):
    inside = ball.contains(exact)
    if not bool(inside.all()):
        i = tuple(int(j) for j in (~inside).nonzero()[0])
        e = np.asarray(exact, dtype=object)
        e = np.broadcast_to(e, tuple(ball.shape))[i] if e.shape else e
        value = mp(e) if isinstance(e, Fraction) else e
        raise AssertionError(f"{what}{list(i)}: exact {mpmath.nstr(value, 20)} not in {float(ball.mid[i])!r} ± "
                             f"{float(ball.rad[i])!r}")


# ----------------------------------------------------------------------------------------------------------------------
# Batch norm


def _channels(x):
    """(C, n) view of an (N, C, *S) object array as per-channel lists."""
    return [x[:, c].reshape(-1).tolist() for c in range(x.shape[1])]


def exact_bn_stats(x, eps):
    """Per channel: mean and biased variance (Fractions), invstd = 1/sqrt(var + eps) (mpmath, 256 bits)."""
    out = []
    for vals in _channels(x):
        n = len(vals)
        mean = sum(vals, Fraction(0)) / n
        var = sum(((v - mean) ** 2 for v in vals), Fraction(0)) / n
        out.append((mean, var, 1 / mpmath.sqrt(mp(var) + mp(Fraction(eps)))))
    return out


def _bcast(v, ndim):
    return np.asarray(v, dtype=object).reshape((1, -1) + (1,) * (ndim - 2))


def exact_bn_train(x, w, b, eps):
    stats = exact_bn_stats(x, eps)
    mean = _bcast([mp(s[0]) for s in stats], x.ndim)
    invstd = _bcast([s[2] for s in stats], x.ndim)
    xm = np.vectorize(mp, otypes=[object])(x)
    y = (xm - mean) * invstd
    if w is not None:
        y = y * _bcast([mp(v) for v in w], x.ndim)
    if b is not None:
        y = y + _bcast([mp(v) for v in b], x.ndim)
    return y, stats


def exact_bn_eval(x, w, b, rm, rv, eps):
    invstd = _bcast([1 / mpmath.sqrt(mp(v) + mp(Fraction(eps))) for v in rv], x.ndim)
    y = (np.vectorize(mp, otypes=[object])(x) - _bcast([mp(v) for v in rm], x.ndim)) * invstd
    if w is not None:
        y = y * _bcast([mp(v) for v in w], x.ndim)
    if b is not None:
        y = y + _bcast([mp(v) for v in b], x.ndim)
    return y


def _bn_inputs(dtype, shape=(3, 2, 2, 3), affine="ball", seed=0):
    gen = torch.Generator().manual_seed(seed)
    c = shape[1]
    x = make_operand(shape, dtype, gen, "ball")
    x = bg.ball(x.mid + 0.5 * torch.arange(c, dtype=dtype).reshape(1, c, *([1] * (len(shape) - 2))), x.rad)
    if affine == "none":
        return x, None, None
    w = bg.ball((torch.rand(c, generator=gen) + 0.5).to(dtype), 2.0 ** -12)
    b = bg.ball(torch.randn(c, generator=gen).to(dtype), 2.0 ** -14)
    if affine == "plain":
        return x, w.mid, b.mid
    return x, w, b


def _m(t):
    return t.mid if isinstance(t, BallTensor) else t


@pytest.mark.parametrize("affine", ["ball", "plain", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_batch_norm_training_contains_exact(dtype, affine):
    x, w, b = _bn_inputs(dtype, affine=affine)
    eps = 1e-5
    out, mean, invstd = aten.native_batch_norm.default(x, w, b, None, None, True, 0.1, eps)
    ref = aten.native_batch_norm.default(x.mid, _m(w), _m(b), None, None, True, 0.1, eps)
    for o, r in zip((out, mean, invstd), ref):
        assert_same_bits(o.mid, r)
        assert_valid_radius(o)
    for p, (xp, wp, bp) in enumerate(joint_points([x, w, b])):
        y, stats = exact_bn_train(xp, wp, bp, eps)
        assert_contains(out, y, f"point {p} out")
        assert_contains(mean, [s[0] for s in stats], f"point {p} save_mean")
        assert_contains(invstd, [s[2] for s in stats], f"point {p} save_invstd")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_batch_norm_eval_contains_exact(dtype):
    x, w, b = _bn_inputs(dtype, shape=(2, 3, 4), seed=1)
    eps = 1e-3
    rm_plain = torch.tensor([0.25, -1.0, 3.0], dtype=dtype)
    rv_plain = torch.tensor([0.5, 2.0, 0.125], dtype=dtype)
    for rm, rv in ((rm_plain, rv_plain), (bg.ball(rm_plain, 2.0 ** -10), bg.ball(rv_plain, 2.0 ** -12))):
        out, mean, invstd = aten.native_batch_norm.default(x, w, b, rm, rv, False, 0.1, eps)
        ref = aten.native_batch_norm.default(x.mid, w.mid, b.mid, _m(rm), _m(rv), False, 0.1, eps)
        for o, r in zip((out, mean, invstd), ref):
            assert_same_bits(o.mid, r)
        assert mean.shape == (0,) and invstd.shape == (0,)
        for p, (xp, wp, bp, rmp, rvp) in enumerate(joint_points([x, w, b, rm, rv])):
            assert_contains(out, exact_bn_eval(xp, wp, bp, rmp, rvp, eps), f"point {p}")
        # eval mode does not touch the running statistics
        assert_same_bits(_m(rm), rm_plain)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_batch_norm_running_statistics_ball_buffers(dtype):
    """Ball buffers: midpoints updated by the kernel exactly as plain PyTorch, radii by ball arithmetic
    ((1 - momentum) old + momentum stat, unbiased variance), in place: the same objects and storages."""
    x, w, b = _bn_inputs(dtype, seed=2)
    c = x.shape[1]
    n = x.numel() // c
    momentum, eps = 0.1, 1e-5
    rm = bg.ball(torch.tensor([0.5, -0.25], dtype=dtype), 2.0 ** -20)
    rv = bg.ball(torch.tensor([1.5, 0.75], dtype=dtype), 2.0 ** -20)
    old_rm, old_rv = bg.ball(rm.mid.clone(), rm.rad.clone()), bg.ball(rv.mid.clone(), rv.rad.clone())
    view = rm[1:]  # a view shares the update
    ptrs = (rm.mid.data_ptr(), rm.rad.data_ptr(), rv.mid.data_ptr(), rv.rad.data_ptr())
    plain_rm, plain_rv = rm.mid.clone(), rv.mid.clone()
    aten.native_batch_norm.default(x, w, b, rm, rv, True, momentum, eps)
    aten.native_batch_norm.default(x.mid, w.mid, b.mid, plain_rm, plain_rv, True, momentum, eps)
    assert_same_bits(rm.mid, plain_rm)
    assert_same_bits(rv.mid, plain_rv)
    assert ptrs == (rm.mid.data_ptr(), rm.rad.data_ptr(), rv.mid.data_ptr(), rv.rad.data_ptr())
    assert_same_bits(view.mid, rm.mid[1:])
    assert torch.equal(view.rad, rm.rad[1:])
    assert bool((rm.rad > old_rm.rad).all())
    mom = Fraction(momentum)
    for p, (xp, rmp, rvp) in enumerate(joint_points([x, old_rm, old_rv])):
        stats = exact_bn_stats(xp, eps)
        assert_contains(rm, [(1 - mom) * rmp[i] + mom * stats[i][0] for i in range(c)], f"point {p} running_mean")
        assert_contains(rv, [(1 - mom) * rvp[i] + mom * stats[i][1] * n / (n - 1) for i in range(c)],
                        f"point {p} running_var")


def test_batch_norm_plain_buffers_follow_plain_pytorch():
    """Plain buffers with a ball input: updated with the midpoints' statistics, bit-identical to plain PyTorch (not
    certified: they carry no radius); the outputs are balls as usual."""
    x, w, b = _bn_inputs(torch.float32, seed=3)
    rm, rv = torch.zeros(2), torch.ones(2)
    prm, prv = rm.clone(), rv.clone()
    out = aten.native_batch_norm.default(x, w, b, rm, rv, True, 0.3, 1e-5)
    aten.native_batch_norm.default(x.mid, w.mid, b.mid, prm, prv, True, 0.3, 1e-5)
    assert not isinstance(rm, BallTensor)
    assert_same_bits(rm, prm)
    assert_same_bits(rv, prv)
    assert all(isinstance(o, BallTensor) for o in out)


def exact_bn_backward(gyp, xp, wp, rmp, rvp, train: bool, eps: float):
    """(grad_input, grad_weight, grad_bias) of batch norm at one point (exact inputs, mpmath): with x^ = (x - mean)
    invstd over the channel's elements, grad_weight = sum g x^, grad_bias = sum g, and grad_input
    = w invstd / n (n g - sum g - x^ sum g x^) in training (the batch's own statistics), g w invstd in eval (the
    running statistics)."""
    nd = xp.ndim
    axes = (0,) + tuple(range(2, nd))
    n = xp.size // xp.shape[1]
    g = np.vectorize(mp, otypes=[object])(gyp)
    if train:
        stats = exact_bn_stats(xp, eps)
        mean, invstd = [mp(s[0]) for s in stats], [s[2] for s in stats]
    else:
        mean = [mp(v) for v in rmp]
        invstd = [1 / mpmath.sqrt(mp(v) + mp(Fraction(eps))) for v in rvp]
    xhat = (np.vectorize(mp, otypes=[object])(xp) - _bcast(mean, nd)) * _bcast(invstd, nd)
    sum_g, sum_gx = np.sum(g, axis=axes), np.sum(g * xhat, axis=axes)
    scale = _bcast([mp(v) for v in wp], nd) * _bcast(invstd, nd)
    exact_gx = scale / n * (g * n - _bcast(sum_g, nd) - xhat * _bcast(sum_gx, nd)) if train else g * scale
    return exact_gx, sum_gx, sum_g


def check_bn_backward(gy, x, w, rm, rv, saved, plain_saved, train: bool, eps: float):
    """native_batch_norm_backward on balls (all three outputs): midpoints bit-identical to the plain kernel's (given
    the plain forward's saved statistics), valid radii, and every joint point's exact gradients inside. Returns the
    three output balls."""
    mask = [True, True, True]
    outs = aten.native_batch_norm_backward.default(gy, x, w, rm, rv, *saved, train, eps, mask)
    ref = aten.native_batch_norm_backward.default(gy.mid, x.mid, w.mid, rm.mid, rv.mid, *plain_saved, train, eps,
                                                  mask)
    for o, r in zip(outs, ref):
        assert_same_bits(o.mid, r)
        assert_valid_radius(o)
    gx, gw, gb = outs
    for p, point in enumerate(joint_points([gy, x, w, rm, rv], n_random=1)):
        exact_gx, sum_gx, sum_g = exact_bn_backward(*point, train, eps)
        assert_contains(gx, exact_gx, f"point {p} grad_input")
        assert_contains(gw, list(sum_gx), f"point {p} grad_weight")
        assert_contains(gb, list(sum_g), f"point {p} grad_bias")
    return outs


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_batch_norm_backward_contains_exact(dtype, train):
    """native_batch_norm_backward with the forward's saved balls: every point of the argument balls (each x with its
    own exact statistics) gives an exact gradient inside."""
    x, w, b = _bn_inputs(dtype, shape=(2, 2, 3, 2), seed=4)
    eps = 1e-5
    gen = torch.Generator().manual_seed(5)
    gy = make_operand(x.shape, dtype, gen, "ball")
    rm = bg.ball(torch.tensor([0.25, 0.5], dtype=dtype), 2.0 ** -12)
    rv = bg.ball(torch.tensor([0.75, 1.25], dtype=dtype), 2.0 ** -12)
    _, sm, si = aten.native_batch_norm.default(x, w, b, rm if not train else None, rv if not train else None, train,
                                               0.1, eps)
    _, psm, psi = aten.native_batch_norm.default(x.mid, w.mid, b.mid, rm.mid if not train else None,
                                                 rv.mid if not train else None, train, 0.1, eps)
    check_bn_backward(gy, x, w, rm, rv, (sm, si), (psm, psi), train, eps)
    # output masks: None where not asked for, the rest identical
    outs = aten.native_batch_norm_backward.default(gy, x, None, rm, rv, sm, si, train, eps, [False, True, False])
    ref = aten.native_batch_norm_backward.default(gy.mid, x.mid, None, rm.mid, rv.mid, psm, psi, train, eps,
                                                  [False, True, False])
    assert outs[0] is None and outs[2] is None and ref[0] is None
    assert_same_bits(outs[1].mid, ref[1])


def test_batch_norm_legit_variants():
    """The _native_batch_norm_legit* overloads (what functionalised traces reach): midpoints identical, outputs
    contain the exact values; the functional form returns the new running statistics as balls."""
    x, w, b = _bn_inputs(torch.float64, seed=6)
    eps = 1e-5
    rm, rv = torch.tensor([0.5, -0.5], dtype=torch.float64), torch.tensor([2.0, 0.5], dtype=torch.float64)
    calls = [
        (aten._native_batch_norm_legit.default, True, lambda xx, r1, r2: (xx, w, b, r1, r2, True, 0.1, eps)),
        (aten._native_batch_norm_legit.no_stats, True, lambda xx, r1, r2: (xx, w, b, True, 0.1, eps)),
        (aten._native_batch_norm_legit_no_training.default, False, lambda xx, r1, r2: (xx, w, b, r1, r2, 0.1, eps)),
        (aten._native_batch_norm_legit_functional.default, True,
         lambda xx, r1, r2: (xx, w, b, r1, r2, True, 0.1, eps)),
        (aten._native_batch_norm_legit_functional.default, False,
         lambda xx, r1, r2: (xx, w, b, r1, r2, False, 0.1, eps)),
    ]
    keep = 1 - Fraction(0.1)  # 1 - momentum, exactly
    for op, training, make in calls:
        outs = op(*make(x, rm.clone(), rv.clone()))
        plain_args = [a.mid if isinstance(a, BallTensor) else a for a in make(x, rm.clone(), rv.clone())]
        ref = op(*plain_args)
        assert len(outs) == len(ref)
        for o, r in zip(outs, ref):
            assert isinstance(o, BallTensor)
            assert_same_bits(o.mid, r)
            assert_valid_radius(o)
        xp, wp, bp = x.mid, w.mid, b.mid
        pts = _frac_array(xp), _frac_array(wp), _frac_array(bp)
        if training:
            y, stats = exact_bn_train(*pts, eps)
            if len(outs) == 5:
                n = x.numel() // 2
                assert_contains(outs[3], [keep * Fraction(float(rm[i])) + Fraction(0.1) * stats[i][0]
                                          for i in range(2)])
                assert_contains(outs[4], [keep * Fraction(float(rv[i])) + Fraction(0.1) * stats[i][1] * n / (n - 1)
                                          for i in range(2)])
        else:
            y = exact_bn_eval(*pts, _frac_array(rm), _frac_array(rv), eps)
        assert_contains(outs[0], y, str(op))


def test_batch_norm_adversarial():
    """A constant channel (variance 0: invstd = 1/sqrt(eps)), a NaN in another channel (that channel's outputs and
    statistics get infinite radii), and variance overflow in float32."""
    x = torch.zeros(2, 3, 2, 2)
    x[:, 0] = 1.5
    x[:, 1] = torch.arange(8.0).reshape(2, 2, 2)
    x[:, 2] = torch.arange(8.0).reshape(2, 2, 2)
    x[1, 2, 0, 0] = math.nan
    xb = bg.ball(x, 2.0 ** -20)
    out, mean, invstd = aten.native_batch_norm.default(xb, None, None, None, None, True, 0.1, 1e-5)
    ref = aten.native_batch_norm.default(x, None, None, None, None, True, 0.1, 1e-5)
    for o, r in zip((out, mean, invstd), ref):
        assert_same_bits(o.mid, r)
        assert_valid_radius(o)
    assert bool(torch.isinf(out.rad[:, 2]).all()) and math.isinf(float(invstd.rad[2]))
    assert bool(torch.isfinite(out.rad[:, :2]).all())
    for p, (xp,) in enumerate(joint_points([bg.ball(x[:, :2].contiguous(), 2.0 ** -20)])):
        y, stats = exact_bn_train(xp, None, None, 1e-5)
        assert_contains(out[:, :2], y, f"point {p}")
    # float32 variance overflow (9e60): whatever the kernel returns, the ball holds the exact +-1
    huge = bg.ball(torch.tensor([[3e30], [-3e30]]), 1.0)
    out, _, _ = aten.native_batch_norm.default(huge, None, None, None, None, True, 0.1, 1e-5)
    assert_same_bits(out.mid, aten.native_batch_norm.default(huge.mid, None, None, None, None, True, 0.1, 1e-5)[0])
    assert_valid_radius(out)
    for p, (xp,) in enumerate(joint_points([huge])):
        assert_contains(out, exact_bn_train(xp, None, None, 1e-5)[0], f"huge point {p}")


# ----------------------------------------------------------------------------------------------------------------------
# Max pooling


def _pool_out(size, k, s, p, dl, ceil):
    num = size + 2 * p - dl * (k - 1) - 1 + (s - 1 if ceil else 0)
    out = num // s + 1
    if ceil and (out - 1) * s >= size + p:
        out -= 1
    return out


class Pool(NamedTuple):
    d: int
    shape: tuple
    kernel: tuple
    stride: tuple
    padding: tuple
    dilation: tuple
    ceil_mode: bool

    @property
    def out(self):
        return [_pool_out(self.shape[-self.d + i], self.kernel[i], self.stride[i], self.padding[i], self.dilation[i],
                          self.ceil_mode) for i in range(self.d)]

    def windows(self):
        """For each output position: the list of in-plane positions (tuples) of its window, in scan order."""
        size = self.shape[-self.d:]
        for o in itertools.product(*[range(v) for v in self.out]):
            slots = []
            for kappa in itertools.product(*[range(k) for k in self.kernel]):
                pos = tuple(o[i] * self.stride[i] - self.padding[i] + kappa[i] * self.dilation[i]
                            for i in range(self.d))
                if all(0 <= pos[i] < size[i] for i in range(self.d)):
                    slots.append(pos)
            yield o, slots

    def forward(self, x):
        op = aten.max_pool3d_with_indices.default if self.d == 3 else aten.max_pool2d_with_indices.default
        return op(x, list(self.kernel), list(self.stride), list(self.padding), list(self.dilation), self.ceil_mode)

    def backward(self, gy, x, indices):
        op = (aten.max_pool3d_with_indices_backward.default if self.d == 3
              else aten.max_pool2d_with_indices_backward.default)
        return op(gy, x, list(self.kernel), list(self.stride), list(self.padding), list(self.dilation), self.ceil_mode,
                  indices)


def exact_max_pool(pool, x, gy=None):
    """Exact values (first maximum in scan order, PyTorch's choice at exact ties) and, with gy, the exact gradient."""
    lead = x.shape[:-pool.d]
    values = np.empty(tuple(lead) + tuple(pool.out), dtype=object)
    grad = np.zeros(x.shape, dtype=object) if gy is not None else None
    for plane in np.ndindex(*lead):
        for o, slots in pool.windows():
            best = None
            for pos in slots:
                v = x[plane + pos]
                if best is None or v > x[plane + best]:
                    best = pos
            values[plane + o] = x[plane + best]
            if gy is not None:
                grad[plane + best] += gy[plane + o]
    return values, grad


POOLS = [
    Pool(2, (2, 2, 4, 5), (2, 2), (2, 2), (0, 0), (1, 1), False),
    Pool(2, (1, 2, 7, 7), (3, 3), (2, 2), (1, 1), (1, 1), True),
    Pool(2, (1, 2, 6, 7), (2, 3), (1, 1), (1, 1), (2, 1), False),
    Pool(3, (1, 1, 3, 4, 5), (2, 2, 2), (1, 2, 2), (0, 1, 1), (1, 1, 1), True),
    Pool(2, (3, 5, 5), (3, 2), (1, 2), (1, 0), (1, 1), True),  # unbatched
]
POOL_IDS = ["2x2", "3x3-s2-pad-ceil", "overlapping-dilated", "3d", "unbatched"]


def _pool_input(shape, dtype, seed, tie_scale=0.02):
    """Values on a coarse grid (so that many windows hold near-ties) with mixed radii, some large enough to
    overlap their neighbours."""
    gen = torch.Generator().manual_seed(seed)
    mid = (torch.randint(-2, 3, shape, generator=gen).to(torch.float64) * 0.5
           + torch.randint(-2, 3, shape, generator=gen) * tie_scale / 4).to(dtype)
    choice = torch.randint(0, 3, shape, generator=gen)
    rad = torch.where(choice == 0, torch.zeros(shape, dtype=torch.float64),
                      torch.where(choice == 1, torch.full(shape, 2.0 ** -20, dtype=torch.float64),
                                  torch.full(shape, tie_scale, dtype=torch.float64)))
    return bg.ball(mid, rad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("pool", POOLS, ids=POOL_IDS)
def test_max_pool_contains_exact(pool, dtype):
    x = _pool_input(pool.shape, dtype, seed=len(pool.shape) + pool.kernel[0])
    with bg.record() as rec:
        values, indices = pool.forward(x)
    ref_v, ref_i = pool.forward(x.mid)
    assert_same_bits(values.mid, ref_v)
    assert torch.equal(indices, ref_i) and not isinstance(indices, BallTensor)
    assert_valid_radius(values)
    assert rec.of_kind("kink"), "the coarse grid with large radii has undecided windows"
    gen = torch.Generator().manual_seed(1)
    gy = make_operand(tuple(values.shape), dtype, gen, "ball")
    with bg.record() as rec_bw:
        gx = pool.backward(gy, x, indices)
    assert_same_bits(gx.mid, pool.backward(gy.mid, x.mid, indices))
    assert_valid_radius(gx)
    assert sum(e.count for e in rec_bw.of_kind("kink")) == sum(e.count for e in rec.of_kind("kink"))
    for p, (xp, gyp) in enumerate(joint_points([x, gy], seed=p_seed(pool), n_random=3)):
        v, g = exact_max_pool(pool, xp, gyp)
        assert_contains(values, v, f"point {p} values")
        assert_contains(gx, g, f"point {p} grad_input")


def p_seed(pool):
    return sum(pool.shape) + sum(pool.kernel)


@pytest.mark.parametrize("examples", EXAMPLES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_pooling_hypothesis_adversarial(dtype, examples):
    """Adversarial finite balls (subnormals, values near overflow, zeros, wide radii) through max pooling (values and
    gradients) and average pooling (values)."""
    pool = Pool(2, (1, 1, 4, 5), (2, 3), (1, 2), (1, 1), (1, 1), True)
    y_shape = (1, 1) + tuple(pool.out)

    @settings(max_examples=max(3, examples // 3))
    @given(balls(dtype, pool.shape, allow_nonfinite=False, allow_inf_radius=False),
           balls(dtype, y_shape, allow_nonfinite=False, allow_inf_radius=False))
    def run(x, gy):
        # a relative radius of a value near overflow may itself overflow: keep the balls finite (still balls)
        x, gy = (bg.ball(t.mid, torch.where(torch.isinf(t.rad), 0.0, t.rad)) for t in (x, gy))
        values, indices = pool.forward(x)
        gx = pool.backward(gy, x, indices)
        avg = F.avg_pool2d(x, (2, 3), (1, 2), (1, 1), ceil_mode=True)
        assert_same_bits(values.mid, pool.forward(x.mid)[0])
        assert_same_bits(gx.mid, pool.backward(gy.mid, x.mid, indices))
        assert_same_bits(avg.mid, F.avg_pool2d(x.mid, (2, 3), (1, 2), (1, 1), ceil_mode=True))
        for r in (values, gx, avg):
            assert_valid_radius(r)
        for p, (xp, gyp) in enumerate(joint_points([x, gy], n_random=1)):
            v, g = exact_max_pool(pool, xp, gyp)
            assert_contains(values, v, f"point {p} values")
            assert_contains(gx, g, f"point {p} grad_input")
            assert_contains(avg, exact_avg_pool(xp, 2, (2, 3), (1, 2), (1, 1), True, True, None)[0], f"point {p} avg")

    run()


def test_max_pool_undecided_window_gives_the_hull():
    """Two overlapping balls in a window: a kink event, and both candidates' gradients contain 0 and the gradient;
    the non-candidates stay exact."""
    x = bg.ball(torch.tensor([[[[1.0, 0.9995], [0.0, -1.0]]]], dtype=torch.float64),
                torch.tensor([[[[1e-3, 1e-3], [1e-3, 0.0]]]], dtype=torch.float64))
    with bg.record() as rec:
        values, indices = F.max_pool2d(x, 2, return_indices=True)
    assert [e.count for e in rec.of_kind("kink")] == [1]
    assert int(indices.reshape(())) == 0
    assert bool(values.contains(torch.tensor(1.001, dtype=torch.float64)).all())  # the first element's upper end
    assert bool(values.contains(torch.tensor(0.999, dtype=torch.float64)).all())  # the first element's lower end
    gy = bg.ball(torch.full((1, 1, 1, 1), 2.0, dtype=torch.float64), 0.5)
    with bg.record() as rec:
        gx = aten.max_pool2d_with_indices_backward.default(gy, x, [2, 2], [2, 2], [0, 0], [1, 1], False, indices)
    assert [e.count for e in rec.of_kind("kink")] == [1]
    for pos in ((0, 0), (0, 1)):
        cell = gx[(0, 0) + pos]
        for v in (0.0, 1.5, 2.0, 2.5):
            assert bool(cell.contains(torch.tensor(v, dtype=torch.float64))), (pos, v, cell)
    assert float(gx.rad[0, 0, 1, 0]) == 0 and float(gx.rad[0, 0, 1, 1]) == 0
    assert float(gx.mid[0, 0, 1, 0]) == 0 and float(gx.mid[0, 0, 1, 1]) == 0
    # negative control: the plain scatter of the gradient ball (no hull) misses the exact gradient at a point of the
    # input balls where the second element wins
    flipped = np.array([[[[Fraction(1.0) - Fraction(1e-3), Fraction(0.9995) + Fraction(1e-3)], [0, -1]]]],
                       dtype=object)
    _, exact_grad = exact_max_pool(Pool(2, (1, 1, 2, 2), (2, 2), (2, 2), (0, 0), (1, 1), False), flipped,
                                   np.array([[[[Fraction(2)]]]], dtype=object))
    assert exact_grad[0, 0, 0, 1] == 2
    assert bool(gx.contains(exact_grad).all())
    naive = BallTensor(gx.mid, torch.tensor([[[[0.5, 0.0], [0.0, 0.0]]]], dtype=torch.float64))
    assert not bool(naive.contains(exact_grad).all())
    # through autograd (what a model's backward runs)
    xr = bg.ball(x.mid.clone(), x.rad.clone()).requires_grad_()
    (F.max_pool2d(xr, 2) * 2.0).sum().backward()
    assert bool(xr.grad[0, 0, 0, 1].contains(torch.tensor(2.0, dtype=torch.float64)))


def test_max_pool_exact_ties_between_points_are_decided():
    """Exact points with an exact tie: PyTorch's first maximum (the Clarke choice the oracle uses), no kink event, and
    a non-overlapping scatter copies the gradient exactly (radius 0)."""
    x = torch.tensor([[[[2.0, 2.0, -1.0, 3.0], [1.0, 0.0, 3.0, 3.0]]]])
    with bg.record() as rec:
        values, indices = F.max_pool2d(bg.ball(x), 2, return_indices=True)
        gx = aten.max_pool2d_with_indices_backward.default(bg.ball(torch.ones(1, 1, 1, 2)), bg.ball(x), [2, 2], [2, 2],
                                                            [0, 0], [1, 1], False, indices)
    assert not rec.of_kind("kink")
    assert float(values.rad.max()) == 0
    assert torch.equal(gx.mid, torch.tensor([[[[1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 0.0]]]]))
    assert float(gx.rad.max()) == 0


def test_max_pool_nonfinite_and_1d():
    """NaN/inf inputs give infinite radii where they reach; max_pool1d goes through the 2-d op."""
    x = torch.tensor([[[1.0, math.nan, 2.0, 0.5, math.inf, -1.0, 0.25, 0.0]]])
    xb = bg.ball(x, 1e-3)
    values, indices = F.max_pool1d(xb, 2, return_indices=True)
    ref_v, ref_i = F.max_pool1d(x, 2, return_indices=True)
    assert_same_bits(values.mid, ref_v)
    assert torch.equal(indices, ref_i)
    # windows [1, nan], [2, 0.5], [inf, -1], [0.25, 0]
    assert bool(torch.isinf(values.rad[0, 0, ::2]).all()) and bool(torch.isfinite(values.rad[0, 0, 1::2]).all())
    assert float(values.rad[0, 0, 1::2].max()) <= 2e-3
    xr = bg.ball(x.clone(), 1e-3).requires_grad_()
    F.max_pool1d(xr, 2).sum().backward()
    assert_valid_radius(xr.grad)
    assert math.isfinite(float(xr.grad.rad[0, 0, 6]))


def _exact_undecided(pool, x):
    """Per window (flat output order) the documented decision in exact rational arithmetic (finite balls only): an
    element is a candidate when hi_i >= max lo; undecided = two or more candidates, one of them not an exact point."""
    m, r = _frac_array(x.mid), _frac_array(x.rad)
    status = []
    for plane in np.ndindex(*x.shape[:-pool.d]):
        for _, slots in pool.windows():
            lo = [m[plane + p] - r[plane + p] for p in slots]
            f_lo = max(lo)
            cand = [p for p in slots if m[plane + p] + r[plane + p] >= f_lo]
            status.append(len(cand) > 1 and any(r[plane + p] > 0 for p in cand))
    return status


# Geometries of the fast paths: disjoint windows (the scatter-and-max screen) and overlapping / padded / dilated /
# ceil-mode / 3-d windows (the running top-2 screen).
SCREEN_POOLS = [
    Pool(2, (2, 3, 6, 6), (2, 2), (2, 2), (0, 0), (1, 1), False),
    Pool(2, (1, 2, 7, 7), (2, 2), (3, 3), (0, 0), (1, 1), True),
    Pool(2, (1, 2, 7, 7), (3, 3), (2, 2), (1, 1), (1, 1), True),
    Pool(2, (1, 2, 6, 7), (2, 3), (1, 1), (1, 1), (2, 1), False),
    Pool(2, (3, 5, 5), (3, 2), (1, 2), (1, 0), (1, 1), True),
    Pool(3, (1, 1, 3, 4, 5), (2, 2, 2), (1, 2, 2), (0, 1, 1), (1, 1, 1), True),
]


def _touching_input(shape, dtype, rng, all_exact=False):
    """Adversarial finite balls for the decided-window screen: midpoints on the grid k/4 (exact ties between points,
    zeros as after relu), radii that make neighbouring balls touch exactly (1/8 between grid neighbours), miss by
    one unit in the last place of the sum either way, overlap widely, or vanish. (Near misses in float64 midpoints
    are 2^-40, not one unit: the documented analysis uses float64 outward end points, which count a float64 one-ulp
    miss as touching, a conservative kink.)"""
    rd = rounding.rad_dtype(dtype)
    u = float(torch.finfo(rd).eps) / 2 if rd == torch.float32 else 2.0**-38
    n = math.prod(shape)
    mids = [rng.choice([0.0, 0.0, 0.25, 0.5, 0.75, 1.0, -0.25, -1.0]) for _ in range(n)]
    choices = [0.0, 0.0, 0.125, 0.125 - u / 4, 0.125 + u / 4, 0.125 - 2 * u, 2.0**-20, 0.25, 0.0625]
    rads = [0.0 if all_exact else rng.choice(choices) for _ in range(n)]
    mid = torch.tensor(mids, dtype=torch.float64).reshape(shape).to(dtype)
    return bg.ball(mid, torch.tensor(rads, dtype=torch.float64).reshape(shape).to(rd))


def _check_screen(pool, x, gy_mode, seed):
    """Midpoints and indices bit-identical; kink events (forward and backward) exactly those of the exact analysis;
    decided windows get exactly the radius of PyTorch's arg-max; values and gradients contain the exact ones at sample
    points; with disjoint windows all decided, grad radii are the radii of grad_output scattered exactly."""
    with bg.record() as rec:
        values, indices = pool.forward(x)
    ref_v, ref_i = pool.forward(x.mid)
    assert_same_bits(values.mid, ref_v)
    assert torch.equal(indices, ref_i)
    assert_valid_radius(values)
    undecided = _exact_undecided(pool, x)
    kinks = sum(e.count for e in rec.of_kind("kink"))
    assert kinks == sum(undecided), (kinks, sum(undecided))
    lead = _volume_of(indices.shape[:indices.dim() - pool.d])
    r_j = x.rad.reshape(lead, -1).gather(1, indices.reshape(lead, -1)).reshape(-1)
    decided = ~torch.tensor(undecided, dtype=torch.bool)
    assert torch.equal(values.rad.reshape(-1)[decided], r_j[decided]), "decided windows: radius r_j exactly"
    gen = torch.Generator().manual_seed(seed)
    gy = make_operand(tuple(values.shape), x.dtype, gen, gy_mode)
    with bg.record() as rec_bw:
        gx = pool.backward(gy, x, indices)
    assert_same_bits(gx.mid, pool.backward(gy.mid if isinstance(gy, BallTensor) else gy, x.mid, indices))
    assert_valid_radius(gx)
    assert sum(e.count for e in rec_bw.of_kind("kink")) == kinks
    disjoint = all(s >= k for s, k in zip(pool.stride, pool.kernel))
    if disjoint and not any(undecided) and isinstance(gy, BallTensor):
        assert torch.equal(gx.rad, pool.backward(gy.rad, x.mid.to(gy.rad.dtype), indices)), "exact scatter of r_G"
    for p, (xp, gyp) in enumerate(joint_points([x, gy], seed=seed, n_random=2)):
        v, g = exact_max_pool(pool, xp, gyp)
        assert_contains(values, v, f"point {p} values")
        assert_contains(gx, g, f"point {p} grad_input")


def _volume_of(shape):
    return math.prod(int(s) for s in shape)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("pool", SCREEN_POOLS, ids=[f"screen{i}" for i in range(len(SCREEN_POOLS))])
def test_max_pool_screen_seeded_adversarial(pool, dtype):
    """Seeded adversarial balls (exact touching, one-ulp misses both ways, ties between points, relu-like zeros)
    through both screens (disjoint and overlapping windows) and the precise analysis of the windows they leave."""
    rng = random.Random(1000 * SCREEN_POOLS.index(pool) + [torch.float32, torch.float64, torch.float16,
                                                           torch.bfloat16].index(dtype))
    for trial in range(4):
        x = _touching_input(pool.shape, dtype, rng, all_exact=(trial == 3))
        _check_screen(pool, x, ["ball", "point", "plain", "ball"][trial], seed=trial)


@pytest.mark.parametrize("examples", EXAMPLES)
def test_max_pool_screen_hypothesis(examples):
    """Hypothesis over geometry, dtype, the adversarial grid of ``_touching_input`` and the gradient's kind."""
    from hypothesis import strategies as st

    @settings(max_examples=max(5, examples), deadline=None)
    @given(st.sampled_from(SCREEN_POOLS), st.sampled_from([torch.float32, torch.float64, torch.float16]),
           st.integers(0, 2**32 - 1), st.sampled_from(["ball", "point", "plain"]))
    def run(pool, dtype, seed, gy_mode):
        _check_screen(pool, _touching_input(pool.shape, dtype, random.Random(seed)), gy_mode, seed % 1000)

    run()


def test_max_pool_touching_balls_are_undecided():
    """hi_i = lo_j exactly (touching balls) is undecided even though the rounded sum m_i + r_i is exact; one unit in
    the last place less (balls apart) is decided with the winner's radius exactly, through the precise analysis."""
    for gap, kink in ((0.0, 1), (2.0**-25, 0)):
        x = bg.ball(torch.tensor([[[[0.25, 0.5]]]]), torch.tensor([[[[0.125 - gap, 0.125]]]]))
        with bg.record() as rec:
            values, indices = F.max_pool2d(x, (1, 2), return_indices=True)
        assert sum(e.count for e in rec.of_kind("kink")) == kink
        assert float(values.rad) == (0.125 if not kink else float(values.rad)) and float(values.rad) >= 0.125
        gy = bg.ball(torch.ones(1, 1, 1, 1), 0.5)
        with bg.record() as rec:
            gx = aten.max_pool2d_with_indices_backward.default(gy, x, [1, 2], [1, 2], [0, 0], [1, 1], False, indices)
        assert sum(e.count for e in rec.of_kind("kink")) == kink
        assert bool(gx[0, 0, 0, 0].contains(torch.tensor(1.0))) == bool(kink)  # the loser can win only when touching
        assert bool(gx[0, 0, 0, 1].contains(torch.tensor(0.0))) == bool(kink)


def test_max_pool_specials_kinks_and_radii():
    """NaN, +-inf and infinite radii follow the documented analysis on the point fast path, the ball screen and the
    precise analysis: an element that denotes any real (NaN, or an infinite radius, which ``ball`` gives every
    non-finite midpoint) is an inexact candidate; exact -inf points are never candidates next to a finite value."""
    x = torch.tensor([[[1.0, math.nan, 2.0, 0.5, math.inf, -1.0, 0.25, 0.0, -math.inf, 3.0, -math.inf, -math.inf]]])
    # windows [1, nan], [2, .5], [inf, -1], [.25, 0], [-inf, 3], [-inf, -inf]
    for xb, kinks, inf_rad in (
            (BallTensor(x, torch.zeros_like(x)), 1, [True, False, True, False, False, True]),  # point fast path
            (bg.ball(x), 4, [True, False, True, False, True, True]),
            (bg.ball(x, 1e-3), 4, [True, False, True, False, True, True])):
        with bg.record() as rec:
            values, indices = F.max_pool1d(xb, 2, return_indices=True)
        assert_same_bits(values.mid, F.max_pool1d(x, 2))
        assert sum(e.count for e in rec.of_kind("kink")) == kinks
        assert_valid_radius(values)
        assert torch.isinf(values.rad[0, 0]).tolist() == inf_rad
    # a -inf midpoint with a finite radius (not made by ballgrad's rules, but a valid BallTensor) is below 3
    xb = BallTensor(torch.tensor([[[[1.0, 2.0, 0.5, 0.75, 3.0, -math.inf]]]]),
                    torch.tensor([[[[0.0, 0.0, math.inf, 0.0, 0.0, 1.0]]]]))
    with bg.record() as rec:
        values, indices = F.max_pool2d(xb, (1, 2), return_indices=True)
    assert sum(e.count for e in rec.of_kind("kink")) == 1  # [0.5 +- inf, 0.75]
    assert torch.equal(values.rad[0, 0, 0], torch.tensor([0.0, math.inf, 0.0]))
    gx = aten.max_pool2d_with_indices_backward.default(bg.ball(torch.ones(1, 1, 1, 3), 0.25), xb, [1, 2], [1, 2],
                                                        [0, 0], [1, 1], False, indices)
    assert_valid_radius(gx)
    assert float(gx.rad[0, 0, 0, 1]) == 0.25 and float(gx.rad[0, 0, 0, 4]) == 0.25  # decided winners: r_G exactly
    assert float(gx.rad[0, 0, 0, 2]) >= 1.25 and float(gx.rad[0, 0, 0, 3]) >= 1.0  # hull of 0 and 1 +- 0.25
    assert float(gx.rad[0, 0, 0, 0]) == 0 and float(gx.rad[0, 0, 0, 5]) == 0


def test_max_pool_channels_last_and_overlap_accumulation():
    """channels_last inputs give the same balls as contiguous ones; overlapping windows routing several gradients to
    one position bound PyTorch's accumulation (point gradient: a radius only where sums were rounded)."""
    gen = torch.Generator().manual_seed(3)
    x = make_operand((2, 3, 7, 7), torch.float32, gen, "ball")
    xc = BallTensor(x.mid.contiguous(memory_format=torch.channels_last),
                    x.rad.contiguous(memory_format=torch.channels_last))
    for args in (([2, 2], [2, 2]), ([3, 3], [1, 1], [1, 1])):
        v1, i1 = F.max_pool2d(x, *args, return_indices=True)
        v2, i2 = F.max_pool2d(xc, *args, return_indices=True)
        assert torch.equal(i1, i2) and torch.equal(v1.mid, v2.mid) and torch.equal(v1.rad, v2.rad)
    pool = Pool(2, (1, 1, 6, 6), (3, 3), (1, 1), (1, 1), (1, 1), False)
    x = bg.ball(torch.zeros(1, 1, 6, 6).index_fill_(3, torch.tensor([2]), 1.0))  # ties: one column wins many windows
    values, indices = pool.forward(x)
    gy = bg.ball(torch.full(tuple(values.shape), 0.1))
    gx = pool.backward(gy, x, indices)
    assert_same_bits(gx.mid, pool.backward(gy.mid, x.mid, indices))
    assert float(gx.rad.max()) > 0 and float(gx.rad.max()) < 1e-6  # 0.1 summed up to 9 times in float32
    for xp, gyp in joint_points([x, gy]):
        assert_contains(gx, exact_max_pool(pool, xp, gyp)[1])


# ----------------------------------------------------------------------------------------------------------------------
# Average pooling, adaptive average pooling, nearest upsampling


def exact_avg_pool(x, d, kernel, stride, padding, ceil_mode, count_include_pad, divisor_override, gy=None):
    """Exact avg_pool (and, with gy, its backward), with PyTorch's divisor rule."""
    size = x.shape[-d:]
    out = [_pool_out(size[i], kernel[i], stride[i], padding[i], 1, ceil_mode) for i in range(d)]
    lead = x.shape[:-d]
    y = np.empty(tuple(lead) + tuple(out), dtype=object)
    gx = np.zeros(x.shape, dtype=object) if gy is not None else None
    for o in itertools.product(*[range(v) for v in out]):
        start = [o[i] * stride[i] - padding[i] for i in range(d)]
        end = [min(start[i] + kernel[i], size[i] + padding[i]) for i in range(d)]
        pool_size = math.prod(end[i] - start[i] for i in range(d))
        lo = [max(start[i], 0) for i in range(d)]
        hi = [min(end[i], size[i]) for i in range(d)]
        if divisor_override:
            div = divisor_override
        elif count_include_pad:
            div = pool_size
        else:
            div = math.prod(hi[i] - lo[i] for i in range(d))
        region = tuple(slice(lo[i], hi[i]) for i in range(d))
        for plane in np.ndindex(*lead):
            y[plane + o] = Fraction(sum(x[plane + region].reshape(-1).tolist(), Fraction(0))) / div
            if gy is not None:
                gx[plane + region] += gy[plane + o] / Fraction(div)
    return y, gx


AVG_CASES = [
    (2, (2, 2, 5, 6), (2, 2), (2, 2), (0, 0), False, True, None),
    (2, (1, 3, 7, 5), (3, 3), (2, 1), (1, 1), True, True, None),
    (2, (1, 2, 6, 6), (3, 2), (2, 2), (1, 1), True, False, None),
    (2, (1, 1, 5, 5), (2, 3), (1, 2), (1, 1), False, True, 5),
    (2, (1, 1, 4, 4), (2, 2), (1, 1), (0, 0), False, True, -3),
    (3, (1, 2, 3, 4, 5), (2, 2, 3), (1, 2, 2), (1, 0, 1), True, False, None),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("case", AVG_CASES, ids=[f"avg{i}" for i in range(len(AVG_CASES))])
def test_avg_pool_contains_exact(case, dtype):
    d, shape, k, s, p, ceil_mode, cip, div = case
    if d == 3 and dtype == torch.bfloat16:
        pytest.skip("PyTorch has no CPU bfloat16 avg_pool3d")
    gen = torch.Generator().manual_seed(len(shape) * 7 + k[0])
    x = make_operand(shape, dtype, gen, "ball")
    op = aten.avg_pool3d.default if d == 3 else aten.avg_pool2d.default
    bw = aten.avg_pool3d_backward.default if d == 3 else aten.avg_pool2d_backward.default
    y = op(x, list(k), list(s), list(p), ceil_mode, cip, div)
    assert_same_bits(y.mid, op(x.mid, list(k), list(s), list(p), ceil_mode, cip, div))
    assert_valid_radius(y)
    gy = make_operand(tuple(y.shape), dtype, gen, "ball")
    gx = bw(gy, x, list(k), list(s), list(p), ceil_mode, cip, div)
    assert_same_bits(gx.mid, bw(gy.mid, x.mid, list(k), list(s), list(p), ceil_mode, cip, div))
    assert_valid_radius(gx)
    for pt, (xp, gyp) in enumerate(joint_points([x, gy], n_random=1)):
        ey, egx = exact_avg_pool(xp, d, k, s, p, ceil_mode, cip, div, gyp)
        assert_contains(y, ey, f"point {pt} avg_pool")
        assert_contains(gx, egx, f"point {pt} avg_pool_backward")


def _adaptive_ranges(n_in, n_out):
    return [(o * n_in // n_out, -(-(o + 1) * n_in // n_out)) for o in range(n_out)]


def exact_adaptive(x, out_size, gy=None):
    d = len(out_size)
    size = x.shape[-d:]
    lead = x.shape[:-d]
    ranges = [_adaptive_ranges(size[i], out_size[i]) for i in range(d)]
    y = np.empty(tuple(lead) + tuple(out_size), dtype=object)
    gx = np.zeros(x.shape, dtype=object) if gy is not None else None
    for o in itertools.product(*[range(v) for v in out_size]):
        region = tuple(slice(*ranges[i][o[i]]) for i in range(d))
        count = math.prod(ranges[i][o[i]][1] - ranges[i][o[i]][0] for i in range(d))
        for plane in np.ndindex(*lead):
            y[plane + o] = sum(x[plane + region].reshape(-1).tolist(), Fraction(0)) / count
            if gy is not None:
                gx[plane + region] += gy[plane + o] / Fraction(count)
    return y, gx


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape,out_size", [((2, 2, 7, 5), (3, 2)), ((1, 3, 4, 6), (4, 4)), ((2, 5, 9), (4, 3)),
                                            ((1, 1, 5, 3, 4), (2, 2, 3))], ids=str)
def test_adaptive_avg_pool_contains_exact(shape, out_size, dtype):
    gen = torch.Generator().manual_seed(sum(shape))
    x = make_operand(shape, dtype, gen, "ball")
    op = aten._adaptive_avg_pool3d.default if len(out_size) == 3 else aten._adaptive_avg_pool2d.default
    bw = (aten._adaptive_avg_pool3d_backward.default if len(out_size) == 3
          else aten._adaptive_avg_pool2d_backward.default)
    y = op(x, list(out_size))
    assert_same_bits(y.mid, op(x.mid, list(out_size)))
    gy = make_operand(tuple(y.shape), dtype, gen, "ball")
    gx = bw(gy, x)
    assert_same_bits(gx.mid, bw(gy.mid, x.mid))
    for r in (y, gx):
        assert_valid_radius(r)
    for pt, (xp, gyp) in enumerate(joint_points([x, gy], n_random=1)):
        ey, egx = exact_adaptive(xp, out_size, gyp)
        assert_contains(y, ey, f"point {pt} adaptive")
        assert_contains(gx, egx, f"point {pt} adaptive backward")


@pytest.mark.parametrize("mode,shape,kwargs", [
    ("nearest", (1, 2, 3, 4), dict(scale_factor=2)),
    ("nearest", (2, 1, 5, 3), dict(size=(7, 8))),
    ("nearest-exact", (1, 2, 4, 3), dict(size=(6, 5))),
    ("nearest", (1, 2, 5), dict(scale_factor=1.7)),
    ("nearest", (1, 1, 2, 3, 2), dict(size=(3, 5, 4))),
], ids=["2x", "sizes", "exact", "1d", "3d"])
def test_upsample_nearest_contains_exact(mode, shape, kwargs):
    """A copy (radius copied exactly) and its backward, a sum of the copies (source map read off an index-coded
    input)."""
    gen = torch.Generator().manual_seed(len(shape))
    x = make_operand(shape, torch.float32, gen, "ball")
    up = lambda t: F.interpolate(t, mode=mode, **kwargs)  # noqa: E731
    y = up(x)
    assert_same_bits(y.mid, up(x.mid))
    assert torch.equal(y.rad, up(x.rad))  # exact copy of the radii
    plane = math.prod(shape[2:])
    code = torch.arange(plane, dtype=torch.float64).reshape((1, 1) + tuple(shape[2:]))
    src = up(code).reshape(-1).long().tolist()
    xr = bg.ball(x.mid.clone(), x.rad.clone()).requires_grad_()
    gy = make_operand(tuple(y.shape), torch.float32, gen, "ball")
    up(xr).backward(gy)
    assert_same_bits(xr.grad.mid, _plain_upsample_grad(up, x.mid, gy.mid))
    assert_valid_radius(xr.grad)
    lead = shape[:2]
    for pt, (gyp,) in enumerate(joint_points([gy])):
        exact = np.zeros((math.prod(lead), plane), dtype=object)
        g2 = gyp.reshape(math.prod(lead), -1)
        for j, s in enumerate(src):
            exact[:, s] += g2[:, j]
        assert_contains(xr.grad, exact.reshape(shape), f"point {pt}")


def _plain_upsample_grad(up, x, g):
    xp = x.clone().requires_grad_()
    up(xp).backward(g)
    return xp.grad


# ----------------------------------------------------------------------------------------------------------------------
# End to end: a ballified small CNN


class _Square(nn.Module):
    def forward(self, x):
        return x * x


def _has(*ops):
    return all(op in RULES for op in ops)


def _activation():
    """ReLU when its rules (relu, threshold_backward) are registered, else x*x (mul only)."""
    return nn.ReLU() if _has(aten.relu.default, aten.threshold_backward.default) else _Square()


def _loss_fn():
    """Cross-entropy when its rules are registered, else a sum of squares (mul and sum only)."""
    if _has(aten._log_softmax.default, aten.nll_loss_forward.default, aten.nll_loss_backward.default,
            aten._log_softmax_backward_data.default):
        return F.cross_entropy
    return lambda out, target: (out * out).sum()


def _cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), _activation(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(4 * 3 * 3, 3))


def _cnn_data():
    gen = torch.Generator().manual_seed(1)
    return torch.randn(4, 2, 6, 6, generator=gen), torch.tensor([0, 1, 2, 1])


def test_cnn_end_to_end_midpoints_are_plain_pytorch():
    """Training step (forward + backward) and an eval forward of a ballified CNN with ball buffers: outputs, loss,
    every gradient and the running statistics are bit-identical to the plain model's; all radii are valid."""
    model = _cnn()
    x, y = _cnn_data()
    loss_fn = _loss_fn()
    plain = copy.deepcopy(model)
    ball = bg.ballify(copy.deepcopy(model), rad=2.0 ** -20, buffers=True)
    out_p, out_b = plain(x), ball(x)
    loss_p, loss_b = loss_fn(out_p, y), loss_fn(out_b, y)
    loss_p.backward()
    loss_b.backward()
    assert_same_bits(out_b.mid, out_p.detach())
    assert_same_bits(loss_b.mid, loss_p.detach())
    for (name, pp), (_, pb) in zip(plain.named_parameters(), ball.named_parameters()):
        assert isinstance(pb.grad, BallTensor), name
        assert_same_bits(pb.grad.mid, pp.grad)
        assert_valid_radius(pb.grad)
    for (name, bp), (_, bb) in zip(plain.named_buffers(), ball.named_buffers()):
        if bp.is_floating_point():
            assert isinstance(bb, BallTensor), name
            assert_same_bits(bb.mid, bp)
            assert bool(torch.isfinite(bb.rad).all()) and bool((bb.rad > 0).any()), name
        else:
            assert torch.equal(bb, bp), name
    plain.eval()
    ball.eval()
    with torch.no_grad():
        assert_same_bits(ball(x).mid, plain(x))


@pytest.mark.parametrize("rad", [0.0, 2.0 ** -16])
def test_cnn_end_to_end_exact_oracle(rad):
    """One training step checked element by element against the exact oracle (verification.check_model): loss,
    outputs and every parameter gradient inside their balls, midpoints identical to plain PyTorch."""
    from verification.check import check_model

    model = _cnn()
    x, y = _cnn_data()
    report = check_model(model, x, y, _loss_fn(), rad=rad, name="cnn")
    assert report.status == "ok", str(report)
    report.assert_ok()
    assert report.containment == 100 and report.midpoint_identity == 100
