"""CNN rules: convolution (+ backward), max/avg/adaptive pooling, nearest upsampling
(DESIGN.md §2 F3/F4, §4 "fused kernels" and "kinks"; issue 5).

**Convolutions are GEMMs** (``convolution``, ``convolution_backward``). Every output element of a convolution, and
of its two backward products, is a dot product: a sum of at most k products of one element of each operand, where
k is the op's *inner dimension*: (C_in/groups) x kernel volume for the forward (padding adds exact zeros, a
transposed convolution or a stride only drops terms), (C_out/groups) x kernel volume for grad_input, N x spatial
volume (of grad_output, or of the input for a transposed convolution) for grad_weight, N x spatial volume of
grad_output for grad_bias. Each such map B(a, b) is bilinear with non-negative coefficients, so the ball GEMM of
``linalg`` carries over word for word, with B in place of the matrix product: for x in X, w in W,

    |B(x, w) - m| <= B(|mX|, rW + g|mW|) + B(rX, |mW| + rW) + a,        (g, a) = linalg._mid_error(steps)

where the midpoint error model of ``linalg._mid_error`` holds because a convolution kernel (oneDNN direct/brgemm
convolution, slow_conv2d/3d = im2col + GEMM + col2im, slow_conv_dilated, slow_conv_transpose) forms each output as a
sum of these k products in *some* order, blocked or not, with or without FMA: each term passes through at most
``steps`` = k rounded operations (k + 1 with a bias, which the kernel adds once). The two B(.,.) of non-negative
tensors are evaluated by the op itself in round-to-nearest (``_bilinear_bracket``): again a sum of <= k non-negative
products in some order, so by F3 fl(B) >= (1 - gamma_k) B - k eta, i.e. B <= theta_k (fl(B) + k eta) with
theta_k = 1/(1 - gamma_k) (``rounding.theta``). This is ``linalg._bracket`` with its concatenated GEMM evaluated as
two calls (no concatenation dimension is common to the three maps), which gives theta_k instead of theta_2k; point
operands drop their terms exactly as there. float16/bfloat16 midpoints use linalg's reduced-dtype model (float32 or
storage-dtype roundings, AMX reading subnormal inputs as zero: ``linalg._daz_radius``). Midpoints narrower than float64
measure their rounding error against a float64 reference (``_measured_radius``), evaluated a block of samples (or, for
grad_weight, of input channels) at a time when large (``_blocked_residual``), so that the reference's output and
unfold buffer do not set the rule's peak memory.

What the bound needs from the kernel is that it *is* a sum of products. Winograd and FFT algorithms are not (their
error is not bounded by gamma_k |X||W|): on CPU only NNPACK uses them (``torch._C._select_conv_backend`` picks it for
float32, batch >= 16, no dilation, when oneDNN is disabled, and only when no gradient is needed -- so a ballified
model would even get different midpoints from the plain one). ``_check_conv`` refuses it with the fix, refuses a
lowered oneDNN float32 conv precision (``torch.backends.mkldnn.conv.fp32_precision``, inherited from
``torch.backends.mkldnn.fp32_precision``; measured: 'bf16' changes float32 results by 0.3) and non-CPU devices
(cuDNN chooses FFT/Winograd algorithms at will). oneDNN convolutions are called by PyTorch with
``algorithm::convolution_direct``.

**Batch norm** lives in ``normalization`` (with layer norm).

**Max pooling** (``max_pool2d/3d_with_indices`` and backward; max_pool1d reaches the 2-d op). The value is a max
over the window: monotone in every element, so with outward end points lo <= x <= hi the exact value lies in
[max lo, max hi] (at most the largest radius in the window, 1-Lipschitz in the max norm).
Indices are PyTorch's, from the midpoints. An element i of a window is a *candidate* arg-max when hi_i >= max_j lo_j
(for some point of the balls it is a maximum). A window is *undecided* when it has two or more candidates and one
of them is not an exact point: a ``kink`` event is recorded (forward and backward). Exact ties between exact points
are decided: PyTorch takes the first maximum in scan order, a Clarke subgradient, the convention of the oracle.
In a decided window every other element lies below lo_j of PyTorch's arg-max j (or is an exact point tied with an
exact j), so the exact value range is [max lo, hi_j] within m_j -+ r_j: radius r_j, exactly.
Backward: grad_input scatters grad_output by the indices; in an undecided window the gradient G goes to one
candidate and 0 to the others, so every candidate gets the hull of 0 and G (DESIGN §4): the deviation from the
midpoint's contribution is max(|m_G|, r_G) at the midpoint's winner and |m_G| + r_G at the other candidates; decided
windows contribute r_G at their winner. These deviations are summed per input position (windows overlap when
stride < kernel), with PyTorch's own rounding of those sums (``_mid_error``) and theta of the radius sum.

*How it is computed.* Point arguments: every window with a finite value is decided (radius 0). Balls: a screen in
the radius dtype certifies decided windows with whole-tensor float passes (``_screen``: upper end points bumped past
succ, the window maxima by the op's own geometry, disjoint windows by one scatter and one separable max, overlapping
ones by a running top-2); only the windows it cannot certify (overlapping or touching balls, NaN, infinities) get the
float64 candidate analysis above, gathered (``_precise``). The backward scatters the per-window deviations with the
pooling backward op itself on the radii (exact copies when windows are disjoint and decided) and adds the other
candidates of undecided windows with ``index_add_``.

**Linear pooling** (avg_pool2d/3d, _adaptive_avg_pool2d/3d, their backward ops, upsample_nearest*/backward): each
output is L(x) = sum_i c_i x_i with c_i >= 0, a sum of at most n terms each scaled by 1/divisor (``_linear_pool``):
the kernels sum and then divide (avg: s / div, adaptive: s / kh / kw; backward: each grad_output term divided, then
accumulated), so each term passes through at most n - 1 additions and at most 4 rounded scalings (two divisions
or reciprocal multiplications): |m - L(mX)| <= g L(|mX|) + a with (g, a) = _mid_error(n + 3). Applying the op
itself to T = rX + g|mX| >= 0 gives fl(L(T)) >= L(T) (1 - u)^4 / theta_(n-1) - 2 n eta (each scaling loses at most
eta/2 absolutely), so rad = phi (fl(L(T)) + 2 n eta) + a with phi = theta_(n-1)/(1 - u)^4. Nearest upsampling is a
copy (radius copied exactly) and its backward a sum (no scaling: phi = theta_(n-1), steps n - 1).
"""

from __future__ import annotations

import functools
import math
from fractions import Fraction
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ballgrad import diagnostics, rounding
from ballgrad.errors import NumericsGuardError, UnsupportedOpError
from ballgrad.ops.common import mid_of as _mid
from ballgrad.ops.common import operand, result
from ballgrad.ops.linalg import _check_fp32_gemm_precision, _daz_radius, _finite_only, _is_point, _mid_error
from ballgrad.ops.linalg import _ETA32, _RESIDUAL_FACTOR, _residual32
from ballgrad.ops.nonsmooth import _abs_diff_up
from ballgrad.ops.reductions import _sum_up
from ballgrad.ops.registry import current_op, rule
from ballgrad.tensor import BallTensor

aten = torch.ops.aten

_F64 = torch.float64


# ----------------------------------------------------------------------------------------------------------------------
# Kernel checks


_DOT_PRODUCT_BACKENDS = {"Empty", "Mkldnn", "MkldnnEmpty", "Slow2d", "Slow3d", "SlowDilated2d", "SlowDilated3d",
                         "SlowTranspose2d", "SlowTranspose3d"}
# The Python binding of ConvBackend omits MkldnnTranspose (its name reads '???'); in ConvUtils.h it is the value right
# after Mkldnn.
_MKLDNN_TRANSPOSE = int(torch._C._ConvBackend.Mkldnn) + 1


def _conv_precision():
    try:
        return torch.backends.mkldnn.conv.fp32_precision
    except AttributeError:
        return None


def _check_float_input(func, x):
    if isinstance(x, BallTensor) and not x.is_floating_point():
        raise UnsupportedOpError(func, "bool (comparison) balls are not numeric")


def _check_conv(x, w, bias, stride, padding, dilation, transposed, output_padding, groups, *, backward=False):
    """Refuse kernels whose error is not that of a sum of products (see the module docstring)."""
    if x.device.type != "cpu":
        raise UnsupportedOpError(
            aten.convolution.default,
            f"convolution on {x.device.type}: its libraries (cuDNN) may choose FFT/Winograd algorithms, whose error "
            "is not bounded by the dot-product model; only CPU convolutions have rules",
        )
    _check_fp32_gemm_precision()  # slow_conv2d/3d run their products through the float32 GEMM
    precision = _conv_precision()
    if precision not in (None, "ieee", "none"):
        raise NumericsGuardError(
            f"torch.backends.mkldnn.conv.fp32_precision is {precision!r}: float32 convolutions may run in reduced "
            "precision. Fix: torch.backends.mkldnn.conv.fp32_precision = 'ieee' (and torch.backends.mkldnn."
            "fp32_precision = 'ieee' if it was set there)."
        )
    backend = torch._C._select_conv_backend(x, w, bias, list(stride), list(padding), list(dilation), bool(transposed),
                                            list(output_padding), int(groups))
    if backend.name in _DOT_PRODUCT_BACKENDS or int(backend) == _MKLDNN_TRANSPOSE:
        return
    if backend.name == "NnpackSpatial":
        if backward:  # convolution_backward selects with need_backward=True, which never picks NNPACK
            return
        raise NumericsGuardError(
            "this convolution would run through NNPACK (oneDNN disabled, float32, batch >= 16, no gradient needed), "
            "whose Winograd/FFT algorithms have no dot-product error bound (and whose results differ from the "
            "kernel a model with gradients uses). Fix: torch.backends.nnpack.set_flags(False), or keep "
            "torch.backends.mkldnn enabled."
        )
    raise UnsupportedOpError(aten.convolution.default, f"convolution backend {backend.name} has no error model")


# ----------------------------------------------------------------------------------------------------------------------
# The ball bilinear map


def _bilinear_bracket(op, ma, ra, mb, rb, k: int, g: Fraction, rad_dtype: torch.dtype) -> torch.Tensor:
    """An upper bound, elementwise, of B(|mA|, rB + g|mB|) + B(rA, |mB| + rB) (exact), for a bilinear map ``op`` = B
    with non-negative coefficients whose outputs are sums of at most k products (module docstring). Point operands
    drop their terms: A point: B(|mA|, rB + g|mB|); B point: B(rA + g|mA|, |mB|); both: g B(|mA|, |mB|).
    Computed in ``work_dtype(rad_dtype, k)``: each call c satisfies B <= theta_k (fl(c) + k eta) (F3)."""
    a_point, b_point = _is_point(ra), _is_point(rb)
    wd = rounding.work_dtype(rad_dtype, k)
    u, eta = rounding.unit_roundoff_exact(wd), Fraction(rounding.eta(wd))
    th = rounding.theta(k, u)
    abs_ma, abs_mb = torch.abs(ma).to(wd), torch.abs(mb).to(wd)
    g_w = rounding.round_up_float(g, wd)
    if a_point and b_point:
        s = op(abs_ma, abs_mb)
        scaled = rounding.up(torch.mul(s, rounding.round_up_float(g * th, wd)))
        return rounding.up(torch.add(scaled, rounding.absolute_term(g * th * k * eta, wd)))
    ra, rb = ra.to(wd), rb.to(wd)
    if a_point:
        s, calls = op(abs_ma, rounding.up(torch.add(rb, rounding.up(torch.mul(abs_mb, g_w))))), 1
    elif b_point:
        s, calls = op(rounding.up(torch.add(ra, rounding.up(torch.mul(abs_ma, g_w)))), abs_mb), 1
    else:
        v = rounding.up(torch.add(rb, rounding.up(torch.mul(abs_mb, g_w))))
        w_u = rounding.up(torch.add(abs_mb, rb))
        s, calls = rounding.up(torch.add(op(abs_ma, v), op(ra, w_u))), 2
    scaled = rounding.up(torch.mul(s, rounding.round_up_float(th, wd)))
    return rounding.up(torch.add(scaled, rounding.absolute_term(th * calls * k * eta, wd)))


def _measured(m: torch.Tensor, op, ma: torch.Tensor, mb: torch.Tensor, k: int):
    """A posteriori midpoint error for midpoints narrower than float64 (as ``linalg._checked_bracket``): returns
    (g, a, residual) where residual = up(|m - R|), R = op(mA, mB) evaluated in float64 on the kernel's exact operands
    (products exact in float64), and (g, a) = ``_mid_error(k, float64)`` bound |R - exact|; the bracket then uses this
    g (about k 1e-16) instead of the a priori one. None for float64 midpoints (no wider format: a priori bound)."""
    if m.dtype == torch.float64:
        return None
    reference = op(ma.to(torch.float64), mb.to(torch.float64))
    g, a = _mid_error(k, torch.float64)
    return g, a, rounding.up(torch.abs(m.to(torch.float64) - reference))


# Float64 reference convolutions (the measured residual of narrow midpoints) are evaluated a slice at a time (samples,
# or input channels for grad_weight) when one call would otherwise hold more than this many float64 elements (its
# output, or the kernel's unfold buffer: slow_conv2d's im2col columns, C_in x kernel volume x output positions per
# sample, for the whole batch), so that the reference does not set the rule's peak memory.
_REFERENCE_BLOCK = 2**17


def _block_step(per_index: int) -> int:
    """Indices per reference block when one index of the split dim costs ``per_index`` float64 elements."""
    return max(1, _REFERENCE_BLOCK // max(per_index, 1))


def _per_sample(m: torch.Tensor, unfolded: torch.Tensor, positions: torch.Tensor, kernel_volume: int) -> int:
    """float64 elements per sample of a convolution-like reference with output ``m`` (samples on dim 0): the larger of
    the output per sample and the unfold buffer per sample, (channels of ``unfolded``) x kernel volume x (positions
    of ``positions``): slow_conv2d's im2col columns of the input over the output's positions for a forward, and the
    columns that col2im folds into grad_input (grad_input's channels over grad_output's positions) for a backward."""
    return max(_volume(m.shape[1:]), int(unfolded.shape[1]) * kernel_volume * _volume(positions.shape[2:]))


class _Split(NamedTuple):
    """The output's slices along ``dim`` depend only on the same slices (along ``dim``) of operand A (``of_a``) or
    B: the float64 reference may be evaluated ``step`` indices at a time (``_blocked_residual``)."""

    dim: int
    of_a: bool
    step: int


def _blocked_residual(m: torch.Tensor, reference, split: _Split | None) -> torch.Tensor:
    """``linalg._residual32(m, R)`` (float32 |m - R|, rounded to nearest, with the same bound) where
    ``reference(index)`` returns the float64 reference R[index] from the operands' matching slices (index a tuple of
    slices; all of R for the full slice). Each element of R is a float64 dot product of the same operand elements in
    a block as in the whole (here: one sample's, or one input channel's), and its error bound (``_mid_error``, F3)
    holds element by element in any evaluation order; each block's difference is written into the float32 result by
    ``copy_``, which rounds to nearest like ``.to``."""
    size = m.shape[split.dim] if split is not None else 0
    if split is None or split.step >= size:
        return _residual32(m, reference((slice(None),) * m.dim()))
    e = torch.empty_like(m, dtype=torch.float32)
    for i in range(0, size, split.step):
        index = (slice(None),) * split.dim + (slice(i, min(i + split.step, size)),)
        e[index].copy_(reference(index).sub_(m[index]).abs_())
    return e


def _measured_radius(m: torch.Tensor, e: torch.Tensor, op, ma, ra, mb, rb, k: int, steps: int,
                     bias=None) -> torch.Tensor:
    """The float32 radius of a convolution (or backward product) B(A, B') [+ bias] with narrow midpoints, measured:
    |m - R| for the float64 reference R (same op and operands, products exact), plus |R - exact| <= g64 B(|mA|, |mB|)
    + a64 ((g64, a64) = ``_mid_error(steps, float64)``), plus the propagation B(|mA|, rB) + B(rA, |mB| + rB), plus
    rb + g64 |mb| for a bias ball (mb, rb). As ``linalg._measured_radius_f32``, in one float32 buffer:
    t = e C_e + theta_k (s1 + s2) + bias + A, with e = ``linalg._residual32`` of R (given; ``_blocked_residual``,
    which this function overwrites), the bracket calls s1 = B(|mA|, V), s2 = B(rA, W), V >= rB + g64|mB|,
    W >= |mB| + rB (``inflate``d operands; one call with V or with rA + g64|mA| when an operand is a point,
    g64 B(|mA|, |mB|) when both are), each call <= theta_k (s + k eta32) (F3: sums of <= k non-negative products), and
    A the absolute terms, folded into one in-place ``inflate``."""
    f32 = torch.float32
    t = e.expand(m.shape).clone() if e.shape != m.shape else e
    t.mul_(_RESIDUAL_FACTOR)
    g64, a64 = _mid_error(steps, torch.float64)
    g_w = rounding.round_up_float(g64, f32)
    th = rounding.theta(k, rounding.unit_roundoff_exact(f32))
    absolute = _ETA32 / 2 * Fraction(_RESIDUAL_FACTOR) + a64
    abs_ma, abs_mb = torch.abs(ma).to(f32), torch.abs(mb).to(f32)
    a_point, b_point = _is_point(ra), _is_point(rb)
    if a_point and b_point:
        calls = [(op(abs_ma, abs_mb), th * Fraction(g_w))]
    elif a_point:
        calls = [(op(abs_ma, rounding.inflate(rb.to(f32) + abs_mb * g_w, 2)), th)]
    elif b_point:
        calls = [(op(rounding.inflate(ra.to(f32) + abs_ma * g_w, 2), abs_mb), th)]
    else:
        calls = [(op(abs_ma, rounding.inflate(rb.to(f32) + abs_mb * g_w, 2)), th),
                 (op(ra.to(f32).expand(abs_ma.shape), rounding.inflate(abs_mb + rb.to(f32), 1)), th)]
    n_ops = 1
    for s_call, coef in calls:
        t.add_(s_call, alpha=rounding.round_up_float(coef, f32))
        absolute += coef * k * _ETA32
        n_ops += 2
    if bias is not None:
        mb_bias, rb_bias = bias
        shape = _channel_shape(m.dim())
        bias_term = rounding.inflate(rb_bias.to(f32) + torch.abs(mb_bias).to(f32) * g_w, 2)
        t.add_(bias_term.reshape(shape) if bias_term.dim() else bias_term)
        n_ops += 1
    return rounding.inflate_(t, n_ops, extra=absolute)


def _product_ball(m: torch.Tensor, op, ma, ra, mb, rb, k: int, split: _Split | None = None) -> BallTensor:
    """The ball of one backward product B(A, B') of inner dimension k (no bias): measured and combined in float32 for
    narrow midpoints (``_measured_radius``, the float64 reference in blocks along ``split`` when given); otherwise
    (float64 midpoints, or k too long for float32 radius arithmetic) the bracket of ``_bilinear_bracket`` with the a
    posteriori residual where ``_measured`` gives one."""
    if m.dtype != torch.float64 and rounding.work_dtype(torch.float32, k) == torch.float32:
        whole = split is None or not split.of_a
        ma64 = ma.to(torch.float64) if whole else None
        mb64 = mb.to(torch.float64) if split is None or split.of_a else None

        def reference(index):
            if ma64 is None:
                return op(ma[index].to(torch.float64), mb64)
            return op(ma64, mb64 if mb64 is not None else mb[index].to(torch.float64))

        e = _blocked_residual(m, reference, split)
        del ma64, mb64
        return BallTensor(m, _measured_radius(m, e, op, ma, ra, mb, rb, k, k))
    measured = _measured(m, op, ma, mb, k)
    g, abs_err = measured[:2] if measured else _mid_error(k, m.dtype)
    bound = _with_residual(_bilinear_bracket(op, ma, ra, mb, rb, k, g, rounding.rad_dtype(m.dtype)), measured)
    rad = rounding.up(torch.add(bound, rounding.absolute_term(abs_err, bound.dtype)))
    return result(m, _finite_only(m, rounding.clean_rad(rad)))


def _with_residual(bound: torch.Tensor, measured) -> torch.Tensor:
    """bound (+ the measured residual, in float64, when there is one)."""
    if measured is None:
        return bound
    return rounding.add_up(bound.to(torch.float64), measured[2])


def _ball_operand(x, out_dtype):
    """(m, r) as the kernel uses the argument (``common.operand``), r covering subnormals read as zero."""
    m, r = operand(x, out_dtype)
    return m, _daz_radius(m, r, out_dtype)


def _volume(shape) -> int:
    return math.prod(int(s) for s in shape)


def _channel_shape(ndim: int) -> list[int]:
    return [1, -1] + [1] * (ndim - 2)


def _sum_error(n_terms: int, mid_dtype: torch.dtype) -> tuple[Fraction, Fraction]:
    """(g, a) of a sum of ``n_terms`` terms (n - 1 additions); a single term is copied exactly."""
    if n_terms <= 1:
        return Fraction(0), Fraction(0)
    return _mid_error(n_terms - 1, mid_dtype)


# ----------------------------------------------------------------------------------------------------------------------
# convolution


def _conv_args(stride, padding, dilation, transposed, output_padding, groups):
    return dict(stride=list(stride), padding=list(padding), dilation=list(dilation), transposed=bool(transposed),
                output_padding=list(output_padding), groups=int(groups))


def _plain_conv(x, w, *, stride, padding, dilation, transposed, output_padding, groups):
    """The convolution of two plain (non-negative radius) tensors, after the same kernel checks as the midpoint."""
    _check_conv(x, w, None, stride, padding, dilation, transposed, output_padding, groups)
    return aten.convolution.default(x, w, None, stride, padding, dilation, transposed, output_padding, groups)


@rule(aten.convolution.default)
def convolution(func, x, weight, bias, stride, padding, dilation, transposed, output_padding, groups):
    """Y = conv(X, W) + b (1-d/2-d/3-d, stride, padding, dilation, groups, transposed, output_padding).

    rY = bracket(conv, k, g) + rb + g|mb| + a, k = (C_in/groups) x kernel volume, (g, a) = _mid_error(k [+ 1 with a
    bias]); see the module docstring. The bias terms are summed with ``rounding.inflate`` (4 operations). Midpoints narrower
    than float64 measure their rounding error instead: |m - R| with R the same convolution (bias included) in float64
    on the kernel's exact operands, and (g, a) = _mid_error(k [+ 1], float64) for |R - exact| (``_measured``)."""
    args = _conv_args(stride, padding, dilation, transposed, output_padding, groups)
    mx0, mw0, mb0 = _mid(x), _mid(weight), _mid(bias)
    _check_conv(mx0, mw0, mb0, **args)
    m = func(mx0, mw0, mb0, stride, padding, dilation, transposed, output_padding, groups)
    mx, rx = _ball_operand(x, m.dtype)
    mw, rw = _ball_operand(weight, m.dtype)
    rd = rounding.rad_dtype(m.dtype)
    per_group = mw.shape[0] // args["groups"] if args["transposed"] else mw.shape[1]
    k = per_group * _volume(mw.shape[2:])
    steps = k + (1 if bias is not None else 0)
    g, abs_err = _mid_error(steps, m.dtype)
    measured = None
    if m.dtype != torch.float64:  # a posteriori: R = the same convolution (with the bias) in float64
        mb_used = None if bias is None else _ball_operand(bias, m.dtype)[0].to(torch.float64)
        mw64 = mw.to(torch.float64)

        def reference_of(index):  # the output's samples are the input's (each from its own sample)
            return func(mx[index[:1]].to(torch.float64), mw64, mb_used, stride, padding, dilation, transposed,
                        output_padding, groups)

        if rounding.work_dtype(rd, k) == torch.float32:
            bias_ball = None if bias is None else _ball_operand(bias, m.dtype)
            unfolded, positions = (m, mx) if args["transposed"] else (mx, m)
            split = _Split(0, True, _block_step(_per_sample(m, unfolded, positions, _volume(mw.shape[2:]))))
            e = _blocked_residual(m, reference_of, split)
            del mw64
            return BallTensor(m, _measured_radius(m, e, functools.partial(_plain_conv, **args), mx, rx, mw,
                                                  rw, k, steps, bias_ball))
        reference = reference_of((slice(None),))
        del mw64
        g, abs_err = _mid_error(steps, torch.float64)
        measured = (g, abs_err, rounding.up(torch.abs(m.to(torch.float64) - reference)))
    bound = _with_residual(_bilinear_bracket(functools.partial(_plain_conv, **args), mx, rx, mw, rw, k, g, rd),
                           measured)
    wd = bound.dtype
    if bias is None:
        rad = rounding.up(torch.add(bound, rounding.absolute_term(abs_err, wd)))
    else:
        mb, rb = _ball_operand(bias, m.dtype)
        shape = _channel_shape(m.dim())
        rb = rb.to(wd).reshape(shape) if rb.dim() else rb.to(wd)
        abs_mb = torch.abs(mb).to(wd).reshape(shape)
        c = bound + rb + abs_mb * rounding.round_up_float(g, wd) + rounding.absolute_term(abs_err, wd)
        rad = rounding.inflate(c, 4)
    return result(m, _finite_only(m, rounding.clean_rad(rad)))


@rule(aten.convolution_backward.default)
def convolution_backward(func, grad_output, x, weight, bias_sizes, stride, padding, dilation, transposed,
                         output_padding, groups, output_mask):
    """(grad_input, grad_weight, grad_bias) for the outputs asked for in ``output_mask``.

    grad_input = B_in(gY, W) (a transposed convolution of grad_output with the weight; a plain one for transposed
    convolutions), k = (C_out/groups) x kernel volume; grad_weight = B_w(gY, X) (a correlation of grad_output with the
    input), k = N x spatial volume of grad_output (of the input when transposed): each by ``_bilinear_bracket`` with
    the op itself (``convolution_backward`` with a one-output mask; the unused operand is a zero tensor that only
    gives the shape) and (g, a) = _mid_error(k). grad_bias = sum of grad_output over N and the spatial dims:
    theta_(n-1) fl(sum (r + g|m|)) + a with (g, a) of n - 1 additions."""
    args = _conv_args(stride, padding, dilation, transposed, output_padding, groups)
    mg0, mx0, mw0 = _mid(grad_output), _mid(x), _mid(weight)
    _check_conv(mx0, mw0, None, **args, backward=True)
    outs = func(mg0, mx0, mw0, bias_sizes, stride, padding, dilation, transposed, output_padding, groups, output_mask)
    gx_m, gw_m, gb_m = outs
    vol = _volume(mw0.shape[2:])
    balls = [None, None, None]

    if gx_m is not None:
        mg, rg = _ball_operand(grad_output, gx_m.dtype)
        mw, rw = _ball_operand(weight, gx_m.dtype)
        k = (mw.shape[1] if args["transposed"] else mw.shape[0] // args["groups"]) * vol

        def grad_input_op(a, b):  # sample by sample: a block of grad_output's samples gives grad_input's
            dummy = torch.zeros((a.shape[0], *mx0.shape[1:]), dtype=a.dtype, device=a.device)
            _check_conv(dummy, b, None, **args, backward=True)
            return func(a, dummy, b, None, stride, padding, dilation, transposed, output_padding, groups,
                        [True, False, False])[0]

        unfolded, positions = (mg, gx_m) if args["transposed"] else (gx_m, mg)
        split = _Split(0, True, _block_step(_per_sample(gx_m, unfolded, positions, vol)))
        balls[0] = _product_ball(gx_m, grad_input_op, mg, rg, mw, rw, k, split)

    if gw_m is not None:
        mg, rg = _ball_operand(grad_output, gw_m.dtype)
        mx, rx = _ball_operand(x, gw_m.dtype)
        spatial = mx0.shape[2:] if args["transposed"] else mg0.shape[2:]
        k = mx0.shape[0] * _volume(spatial)

        def grad_weight_op(a, b):  # one group, not transposed: a block of the input's channels gives grad_weight's
            shape = mw0.shape if b.shape[1] == mx0.shape[1] else (mw0.shape[0], b.shape[1], *mw0.shape[2:])
            dummy = torch.zeros(shape, dtype=a.dtype, device=a.device)
            _check_conv(b, dummy, None, **args, backward=True)
            return func(a, b, dummy, None, stride, padding, dilation, transposed, output_padding, groups,
                        [False, True, False])[1]

        split = None
        if args["groups"] == 1 and not args["transposed"]:
            # float64 elements per input channel: C_out x kernel volume outputs, N x kernel volume x positions unfolded
            per_channel = max(mw0.shape[0] * vol, mx0.shape[0] * vol * _volume(mg0.shape[2:]))
            split = _Split(1, False, _block_step(per_channel))
        balls[1] = _product_ball(gw_m, grad_weight_op, mg, rg, mx, rx, k, split)

    if gb_m is not None:
        mg, rg = _ball_operand(grad_output, gb_m.dtype)
        dims = [0] + list(range(2, mg.dim()))
        n = _volume(mg.shape) // max(mg.shape[1], 1)
        g, abs_err = _sum_error(n, gb_m.dtype)
        rd = rounding.rad_dtype(gb_m.dtype)
        t = rounding.up(torch.add(rg.expand(mg.shape), rounding.up(torch.mul(torch.abs(mg).to(rd),
                                                                              rounding.round_up_float(g, rd)))))
        s = _sum_up(t, dims, False, n)
        rad = rounding.up(torch.add(s, rounding.absolute_term(abs_err, s.dtype)))
        balls[2] = result(gb_m, _finite_only(gb_m, rounding.clean_rad(rad).reshape(gb_m.shape)))
    return tuple(balls)


# ----------------------------------------------------------------------------------------------------------------------
# Max pooling


def _tuple(v, d: int, default=None) -> list[int]:
    if v is None or (isinstance(v, (list, tuple)) and len(v) == 0):
        return list(default)
    v = list(v) if isinstance(v, (list, tuple)) else [v]
    return [int(t) for t in (v * d if len(v) == 1 else v)]


class _Pool:
    """Geometry of a pooling op over the last ``d`` dims: kernel, stride, padding, dilation, output size."""

    def __init__(self, d, in_size, out_size, kernel_size, stride, padding, dilation=1):
        self.d = d
        self.kernel = _tuple(kernel_size, d)
        self.stride = _tuple(stride, d, self.kernel)
        self.padding = _tuple(padding, d)
        self.dilation = _tuple(dilation, d)
        self.in_size = [int(s) for s in in_size]
        self.out_size = [int(s) for s in out_size]

    @property
    def key(self) -> tuple:
        """The geometry as a hashable tuple: ``_Pool(*key)`` rebuilds it (``_slot_table``'s cache key)."""
        return (self.d, tuple(self.in_size), tuple(self.out_size), tuple(self.kernel), tuple(self.stride),
                tuple(self.padding), tuple(self.dilation))

    def _padded(self, t: torch.Tensor, fill) -> torch.Tensor:
        """``t`` padded by ``fill`` so that every window slot lies inside (the padding, and ceil_mode's last windows);
        ``t`` itself when no padding is needed."""
        pads = []
        for i in reversed(range(self.d)):
            need = (self.out_size[i] - 1) * self.stride[i] + (self.kernel[i] - 1) * self.dilation[i] + 1
            pads += [self.padding[i], max(0, need - self.in_size[i] - self.padding[i])]
        return F.pad(t, pads, value=fill) if any(pads) else t

    def slot_views(self, t: torch.Tensor, fill) -> list[torch.Tensor]:
        """The prod(kernel) strided views (..., *out_size) of ``t``, one per window slot in scan order: view k holds
        slot k of every window (``fill`` outside the input). No copy unless padding is needed."""
        import itertools

        tp = self._padded(t, fill)
        lead = [slice(None)] * (t.dim() - self.d)
        views = []
        for kappa in itertools.product(*[range(k) for k in self.kernel]):
            starts = [kappa[i] * self.dilation[i] for i in range(self.d)]
            views.append(tp[tuple(lead + [slice(starts[i], starts[i] + (self.out_size[i] - 1) * self.stride[i] + 1,
                                                self.stride[i]) for i in range(self.d)])])
        return views

    def window_max(self, t: torch.Tensor, fill) -> torch.Tensor:
        """(..., *out_size): the max of ``t`` over every window (``fill`` outside the input), separably: a window is
        a product of one-dimensional windows, so one elementwise maximum of strided slices per kernel offset and dim
        (NaN propagates: ``torch.maximum``). No rounding: every result is one of the elements."""
        tp = self._padded(t, fill)
        lead = t.dim() - self.d
        for i in range(self.d):
            span = (self.out_size[i] - 1) * self.stride[i] + 1
            acc = None
            for kappa in range(self.kernel[i]):
                start = kappa * self.dilation[i]
                s = tp[(slice(None),) * (lead + i) + (slice(start, start + span, self.stride[i]),)]
                acc = s if acc is None else torch.maximum(acc, s)
            tp = acc
        return tp

    def windows(self, t: torch.Tensor, fill) -> torch.Tensor:
        """(..., *out_size, *kernel): the pooling windows of ``t`` (its last d dims), out-of-input slots ``fill``."""
        lead = t.dim() - self.d
        tp = self._padded(t, fill)
        for i in range(self.d):
            tp = tp.unfold(lead + i, (self.kernel[i] - 1) * self.dilation[i] + 1, self.stride[i])
        index = ([slice(None)] * lead + [slice(0, o) for o in self.out_size]
                 + [slice(None, None, dl) for dl in self.dilation])
        return tp[tuple(index)]

    def slot_index(self, device=None) -> torch.Tensor:
        """(*out_size, *kernel) int64: the flat in-plane index of every window slot, -1 outside the input."""
        plane = torch.arange(_volume(self.in_size), dtype=torch.int64, device=device).reshape(self.in_size)
        return self.windows(plane, -1)


def _max_pool_geometry(func, x, out_shape, kernel_size, stride, padding, dilation):
    d = 3 if func in (aten.max_pool3d_with_indices.default, aten.max_pool3d_with_indices_backward.default) else 2
    return _Pool(d, x.shape[-d:], out_shape[-d:], kernel_size, stride, padding, dilation)


@functools.lru_cache(maxsize=64)
def _slot_table(key: tuple) -> tuple[torch.Tensor, int]:
    """(slots, s_max) of a pooling geometry (``_Pool.key``): slots (n_out, K) int64, the in-plane flat index of every
    window slot in scan order (-1 outside the input); s_max the most windows that hold one input position. A pure
    function of the geometry, cached (callers never modify ``slots``)."""
    pool = _Pool(*key)
    slots = pool.slot_index().reshape(_volume(pool.out_size), -1)
    inside = slots[slots >= 0]
    s_max = int(torch.bincount(inside, minlength=_volume(pool.in_size)).max()) if inside.numel() else 0
    return slots, s_max


@functools.lru_cache(maxsize=None)
def _succ_constants(dtype: torch.dtype) -> tuple[float, float]:
    """(phi, e0) with fl(c + fl(fl(phi |c|) + e0)) >= succ(c) and fl(c - fl(fl(phi |c|) + e0)) <= pred(c) for every
    finite float c of ``dtype`` (DESIGN F2: Rump, Zimmermann, Boldo & Melquiond 2009, phi = u(1 + 2u), with their eta
    raised to realmin, which only enlarges the step and keeps it normal)."""
    u = rounding.unit_roundoff_exact(dtype)
    return rounding.round_up_float(u * (1 + 2 * u), dtype), float(torch.finfo(dtype).smallest_normal)


def _at_winners(pool: _Pool, t: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """``t`` (..., *in_size) read at PyTorch's arg-max ``indices`` (..., *out_size) (in-plane flat indices)."""
    planes = _volume(indices.shape[:indices.dim() - pool.d])
    return t.reshape(planes, -1).gather(1, indices.reshape(planes, -1)).view(indices.shape)


def _screen(pool: _Pool, mx: torch.Tensor, rx: torch.Tensor, values: torch.Tensor, indices: torch.Tensor):
    """(d, r_j): a certificate of decided windows computed in the radius dtype with full-size float passes only (no
    float64 end points, no per-slot masks), and r_j = rx at PyTorch's arg-max j.

    hi'_i = h_i + sign(r_i) (phi |h_i| + e0) with h_i = fl(m_i + r_i): exactly m_i for a point, else >= succ(h_i) >
    m_i + r_i (``_succ_constants``; succ of a round-to-nearest result exceeds the exact value). Likewise
    lo'_j = l - sign(r_j) (phi |l| + e0), l = fl(m_j - r_j): m_j for a point, else < m_j - r_j. With t1 >= t2 the two
    largest hi' of the window (a running top-2 over the slot views; NaN propagates), d = max(t1 - hi'_j, t2 - lo'_j)
    (float subtractions keep the sign exactly; overflow gives inf, NaN anything unknown: both fail d <= 0).
    d <= 0 implies hi'_i <= lo'_j for every i != j (r_j > 0: hi'_j > lo'_j >= t2, so j is the unique top; r_j = 0:
    t1 <= hi'_j = lo'_j), hence exact hi_i < lo_j <= max lo for every inexact i, and hi_i = m_i <= m_j = lo_j with
    equality only for exact ties between points when r_i = 0: the window is decided (j the only candidate, or all
    candidates exact points), and its exact value range is [max lo, hi_j] within [m_j - r_j, m_j + r_j]: radius r_j,
    exactly. A non-finite m_j makes d NaN (inf - inf): such windows always go to the precise analysis.
    Disjoint windows (no input position in two windows) use d = max_i hi''_i - lo'_j instead, hi'' = hi' with each
    window's winner overwritten by its own lo'_j (which touches no other window): d <= 0 iff hi'_i <= lo'_j for i != j.
    """
    rd = rx.dtype
    phi, e0 = _succ_constants(rd)
    hi = mx.to(rd) + rx  # h, then in place h + sign(r) e (sign(r) e exact, one rounded addition)
    hi.add_(torch.abs(hi).mul_(phi).add_(e0).mul_(torch.sign(rx)))
    hi = hi.contiguous()
    r_j = _at_winners(pool, rx, indices)
    lo = values.to(rd) - r_j
    lo_j = torch.addcmul(lo, torch.sign(r_j), torch.abs(lo).mul_(phi).add_(e0), value=-1)
    if _slot_table(pool.key)[1] <= 1:  # disjoint windows: overwrite each winner's hi' by lo'_j, then one max (t1)
        planes = _volume(indices.shape[:indices.dim() - pool.d])
        hi.view(planes, -1).scatter_(1, indices.reshape(planes, -1), lo_j.reshape(planes, -1))
        return pool.window_max(hi, -math.inf) - lo_j, r_j
    views = pool.slot_views(hi, -math.inf)
    t1, t2 = views[0], None
    for s in views[1:]:
        t2 = torch.minimum(t1, s) if t2 is None else torch.maximum(t2, torch.minimum(t1, s))
        t1 = torch.maximum(t1, s)
    d = t1 - _at_winners(pool, hi, indices)
    if t2 is not None:
        d = torch.maximum(d, t2 - lo_j)
    return d, r_j


def _decided(pool: _Pool, x, values: torch.Tensor, indices: torch.Tensor):
    """(rad, suspects): rad = the radius of PyTorch's arg-max per window (a fresh contiguous radius-dtype tensor of
    the output's shape), which is the exact radius of every decided window (``_screen``), and the flat indices of
    the windows not certified decided (None when every window is). A point argument (plain tensor or all radii 0):
    a window with a finite value is decided (its candidates are exact points tied at the maximum), radius 0."""
    rd = rounding.rad_dtype(values.dtype)
    rx = x.rad if isinstance(x, BallTensor) else None
    if rx is None or not float(torch.amax(rx)) > 0:
        rad = torch.zeros(values.shape, dtype=rd, device=values.device)
        d = values * 0  # NaN exactly where the value is not finite
        if float(torch.sum(d)) == 0:
            return rad, None
        return rad, torch.nonzero(d.reshape(-1) != 0).squeeze(1)
    d, rad = _screen(pool, _mid(x).detach(), rx.to(rd), values, indices)
    if float(torch.amax(d)) <= 0:
        return rad.contiguous(), None
    return rad.contiguous(), torch.nonzero(~(d.reshape(-1) <= 0)).squeeze(1)


def _precise(pool: _Pool, x, flat: torch.Tensor):
    """The candidate analysis of the module docstring on the windows ``flat`` (flat indices into (planes, n_out))
    only, gathered: float64 outward end points lo <= x <= hi (NaN or infinite radius: -inf, +inf), candidates
    hi_i >= max lo, undecided = two or more candidates, one of them inexact. Returns (undecided (n,), cand (n, K),
    pos (n, K) flat input index, slots (n, K) in-plane index (-1 outside), f_lo, f_hi (n,))."""
    n_out = _volume(pool.out_size)
    slots = _slot_table(pool.key)[0].to(flat.device)[flat % n_out]
    valid = slots >= 0
    pos = (flat // n_out).unsqueeze(1) * _volume(pool.in_size) + slots.clamp_min(0)
    m = _mid(x).detach().reshape(-1)[pos].to(_F64)
    r = x.rad.reshape(-1)[pos].to(_F64) if isinstance(x, BallTensor) else torch.zeros_like(m)
    hi = torch.where(r == 0, m, rounding.add_up(m, r))
    lo = torch.where(r == 0, m, rounding.sub_down(m, r))
    unknown = torch.isnan(m) | torch.isinf(r)
    inexact = ((r > 0) | unknown) & valid
    lo = torch.where(unknown, -math.inf, lo).masked_fill_(~valid, -math.inf)
    hi = torch.where(unknown, math.inf, hi).masked_fill_(~valid, -math.inf)
    f_lo, f_hi = torch.amax(lo, 1), torch.amax(hi, 1)
    cand = (hi >= f_lo.unsqueeze(1)) & valid
    undecided = (cand.sum(1) > 1) & (cand & inexact).any(1)
    return undecided, cand, pos, slots, f_lo, f_hi


def _emit_kink(count: int, total: int):
    if diagnostics.is_recording():
        diagnostics.emit("kink", current_op(), count, "max-pool arg-max not decided (overlapping balls in a window); "
                         "gradients take the hull of 0 and the gradient at every candidate", total=total)


@rule(aten.max_pool2d_with_indices.default, aten.max_pool3d_with_indices.default)
def max_pool_with_indices(func, x, kernel_size, stride=(), padding=0, dilation=1, ceil_mode=False):
    """(values, indices): rad = r_j (PyTorch's arg-max) in decided windows (exact: ``_screen``), and in undecided
    windows the hull [max lo, max hi] around the value: max(f_hi - v, v - f_lo) rounded up (float64, ``_precise``).
    Indices are PyTorch's (a plain integer tensor). Undecided windows record a ``kink`` event."""
    _check_float_input(func, x)
    values, indices = func(_mid(x), kernel_size, stride, padding, dilation, ceil_mode)
    rd = rounding.rad_dtype(values.dtype)
    if values.numel() == 0:
        return result(values, torch.zeros((), dtype=rd, device=values.device)), indices
    pool = _max_pool_geometry(func, x, values.shape, kernel_size, stride, padding, dilation)
    rad, suspects = _decided(pool, x, values, indices)
    if suspects is None:  # every window decided: values finite, radii r_j exact (no NaN)
        return BallTensor(values, rad), indices
    undecided, _, _, _, f_lo, f_hi = _precise(pool, x, suspects)
    v64 = values.reshape(-1)[suspects].to(_F64)
    hull = rounding.to_dtype_up(torch.maximum(_abs_diff_up(f_hi, v64), _abs_diff_up(v64, f_lo)), rd)
    flat = rad.view(-1)
    flat[suspects] = torch.where(undecided, rounding.clean_rad(hull), flat[suspects])
    _emit_kink(int(undecided.sum()), values.numel())
    return result(values, _finite_only(values, rad)), indices


def _take(t: torch.Tensor, shape, flat: torch.Tensor) -> torch.Tensor:
    """Elements ``flat`` of ``t`` broadcast to ``shape`` (without materialising a broadcast 0-d tensor)."""
    return t.expand(flat.shape) if t.dim() == 0 else t.expand(shape).reshape(-1)[flat]


@rule(aten.max_pool2d_with_indices_backward.default, aten.max_pool3d_with_indices_backward.default)
def max_pool_with_indices_backward(func, grad_output, x, kernel_size, stride, padding, dilation, ceil_mode, indices):
    """grad_input: grad_output scattered by ``indices``; every candidate of an undecided window gets the hull of 0 and
    the gradient (module docstring). Per window a deviation T (r_G + g|m_G| at the winner of a decided window,
    max(|m_G|, r_G) + g|m_G| at the winner of an undecided one) is scattered by the op itself on the radii, the other
    candidates of undecided windows add |m_G| + r_G (``index_add_``); rad = theta_(n-1) fl(sum) + a, with n the most
    terms one position receives (c_max, the windows routing to one position, or s_max, the windows holding it, when
    a window is undecided) and (g, a) the rounding of PyTorch's own accumulation of up to c_max gradients."""
    m = func(_mid(grad_output), _mid(x), kernel_size, stride, padding, dilation, ceil_mode, indices)
    rd = rounding.rad_dtype(m.dtype)
    if m.numel() == 0 or indices.numel() == 0:
        return result(m, torch.zeros((), dtype=rd, device=m.device))
    pool = _max_pool_geometry(func, x, grad_output.shape, kernel_size, stride, padding, dilation)
    out_shape = indices.shape
    _, s_max = _slot_table(pool.key)
    _, suspects = _decided(pool, x, _at_winners(pool, _mid(x).detach(), indices), indices)
    undecided_flat = None
    if suspects is not None:
        undecided, cand, pos, slots, _, _ = _precise(pool, x, suspects)
        n_undecided = int(undecided.sum())
        _emit_kink(n_undecided, out_shape.numel())
        if n_undecided:
            undecided_flat = suspects[undecided]
            cand, pos, slots = cand[undecided], pos[undecided], slots[undecided]
    mg, rg = operand(grad_output, m.dtype)
    # c_max: the most windows routing their gradient to one position (PyTorch adds them); <= s_max
    x_like = torch.empty(x.shape, dtype=rd, device=m.device)
    c_max = min(s_max, 1) if s_max <= 1 else int(func(torch.ones((), dtype=rd, device=m.device).expand(out_shape),
                                                       x_like, kernel_size, stride, padding, dilation, ceil_mode,
                                                       indices).max())
    n_terms = c_max if undecided_flat is None else s_max
    g, abs_err = _sum_error(c_max, m.dtype)
    wd = rounding.work_dtype(rd, max(n_terms - 1, 0))
    if wd != rd:
        x_like = x_like.to(wd)
    rg = rg.to(wd)
    finite_g = bool(torch.sum(mg * 0) == 0)  # then the midpoint's copies (c_max <= 1) are finite and T has no NaN
    if g == 0:
        dev = rg
    else:  # PyTorch's accumulation error, per term: up(|m_G| g), added rounded up (F2)
        own = rounding.up(torch.mul(torch.abs(mg).to(wd), rounding.round_up_float(g, wd)))
        dev = rounding.up(torch.add(rg, own))
    extra = None
    if undecided_flat is not None:
        dev = dev.expand(out_shape).clone(memory_format=torch.contiguous_format)
        abs_u = torch.abs(_take(mg, out_shape, undecided_flat)).to(wd)
        rg_u = _take(rg, out_shape, undecided_flat)
        winner = torch.maximum(abs_u, rg_u)
        if g != 0:
            winner = rounding.up(torch.add(winner, _take(own, out_shape, undecided_flat)))
        dev.view(-1)[undecided_flat] = winner
        others = cand & (slots != indices.reshape(-1)[undecided_flat].unsqueeze(1))
        extra = (pos[others], rounding.up(torch.add(abs_u, rg_u)).unsqueeze(1).expand(others.shape)[others])
    if extra is None and float(torch.amax(dev)) == 0:  # point gradient, decided windows: exact zeros
        total = torch.zeros(x.shape, dtype=wd, device=m.device)
    else:
        total = func(dev.expand(out_shape), x_like, kernel_size, stride, padding, dilation, ceil_mode,
                     indices).contiguous()
    if extra is not None:
        total.view(-1).index_add_(0, extra[0], extra[1])
    if n_terms <= 1 and abs_err == 0:  # at most one term per position: the scatter and the midpoint are exact copies
        rad = total
    else:  # theta S + a <= succ(succ(fl(S theta_up)) + a_up) (F2); without a, one succ (0 becomes eta)
        th = rounding.theta(max(n_terms - 1, 0), rounding.unit_roundoff_exact(wd))
        rad = rounding.up(total.mul_(rounding.round_up_float(th, wd)))
        if abs_err:
            rad = rounding.up(rad.add_(rounding.absolute_term(abs_err, wd)))
    if finite_g and c_max <= 1 and rad.dtype == rd:
        return BallTensor(m, rad)
    return result(m, _finite_only(m, rounding.clean_rad(rad)))


# ----------------------------------------------------------------------------------------------------------------------
# Linear pooling: avg_pool, adaptive avg_pool, nearest upsampling


def _linear_pool(m: torch.Tensor, x, apply, n: int, scaled: bool) -> BallTensor:
    """The ball of L(x) for a linear op L with non-negative coefficients whose outputs are sums of at most ``n``
    terms, each (``scaled``) divided in at most two rounded operations; ``apply`` is the op itself (module
    docstring): rad = phi (fl(L(T)) + 2 n eta) + a, T = rX + g|mX|."""
    mx, rx = operand(x, m.dtype)
    rd = rounding.rad_dtype(m.dtype)
    if scaled:
        g, abs_err = _mid_error(n + 3, m.dtype)
    else:
        g, abs_err = _sum_error(n, m.dtype)
    wd = rounding.work_dtype(rd, max(n - 1, 0))
    u, eta = rounding.unit_roundoff_exact(wd), Fraction(rounding.eta(wd))
    phi = rounding.theta(max(n - 1, 0), u)
    slack = Fraction(0)
    if scaled:
        phi = phi / (1 - u) ** 4
        slack = 2 * n * eta
    if g == 0:
        t = rx.to(wd)
    else:
        scaled = rounding.up(torch.mul(torch.abs(mx).to(wd), rounding.round_up_float(g, wd)))
        t = rounding.up(torch.add(rx.to(wd), scaled))
    s = apply(t.expand(mx.shape).contiguous())
    if phi == 1 and slack + abs_err == 0:  # copies of single terms (n <= 1, no scaling): exact
        rad = s
    else:
        rad = rounding.up(torch.add(rounding.up(torch.mul(s, rounding.round_up_float(phi, wd))),
                                    rounding.absolute_term(phi * slack + abs_err, wd)))
    return result(m, _finite_only(m, rounding.clean_rad(rad)))


def _check_divisor(func, divisor_override):
    if divisor_override is not None and divisor_override == 0:
        raise UnsupportedOpError(func, "divisor_override=0")


@rule(aten.avg_pool2d.default, aten.avg_pool3d.default)
def avg_pool(func, x, kernel_size, stride=(), padding=0, ceil_mode=False, count_include_pad=True,
             divisor_override=None):
    """Window sums divided by the window count (or ``divisor_override``): ``_linear_pool`` with n = kernel volume.
    A negative divisor_override flips signs only: the radius op uses its absolute value."""
    _check_float_input(func, x)
    _check_divisor(func, divisor_override)
    m = func(_mid(x), kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override)
    d = 3 if func is aten.avg_pool3d.default else 2
    n = _volume(_tuple(kernel_size, d))
    div = None if divisor_override is None else abs(int(divisor_override))
    return _linear_pool(m, x, lambda t: func(t, kernel_size, stride, padding, ceil_mode, count_include_pad, div), n,
                        True)


@rule(aten.avg_pool2d_backward.default, aten.avg_pool3d_backward.default)
def avg_pool_backward(func, grad_output, x, kernel_size, stride, padding, ceil_mode, count_include_pad,
                      divisor_override):
    """grad_input = sum over the windows containing a position of grad_output / divisor: ``_linear_pool`` with
    n = prod ceil(kernel / stride) (the most windows that contain one position)."""
    _check_divisor(func, divisor_override)
    m = func(_mid(grad_output), _mid(x), kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override)
    d = 3 if func is aten.avg_pool3d_backward.default else 2
    k = _tuple(kernel_size, d)
    s = _tuple(stride, d, k)
    n = math.prod(-(-ki // si) for ki, si in zip(k, s))
    div = None if divisor_override is None else abs(int(divisor_override))
    shape = _mid(x).shape

    def apply(t):
        return func(t, torch.zeros(shape, dtype=t.dtype, device=t.device), kernel_size, stride, padding, ceil_mode,
                    count_include_pad, div)

    return _linear_pool(m, grad_output, apply, n, True)


def _adaptive_windows(in_size: int, out_size: int) -> tuple[int, int]:
    """(largest window, most windows containing one input position) of adaptive pooling along one dim: window o is
    [floor(o in/out), ceil((o + 1) in/out))."""
    if out_size == 0 or in_size == 0:
        return 0, 0
    cover = [0] * in_size
    largest = 0
    for o in range(out_size):
        start = (o * in_size) // out_size
        end = -(-((o + 1) * in_size) // out_size)
        largest = max(largest, end - start)
        for i in range(start, end):
            cover[i] += 1
    return largest, max(cover)


@rule(aten._adaptive_avg_pool2d.default, aten._adaptive_avg_pool3d.default)
def adaptive_avg_pool(func, x, output_size):
    """Adaptive average pooling (sum / kh / kw per window): ``_linear_pool`` with n = the largest window."""
    _check_float_input(func, x)
    m = func(_mid(x), output_size)
    d = len(output_size)
    n = math.prod(_adaptive_windows(int(i), int(o))[0] for i, o in zip(x.shape[-d:], m.shape[-d:]))
    return _linear_pool(m, x, lambda t: func(t, output_size), n, True)


@rule(aten._adaptive_avg_pool2d_backward.default, aten._adaptive_avg_pool3d_backward.default)
def adaptive_avg_pool_backward(func, grad_output, x):
    """Each grad_output term divided by its window size, accumulated: ``_linear_pool`` with n = the most windows
    containing one input position."""
    m = func(_mid(grad_output), _mid(x))
    d = 3 if func is aten._adaptive_avg_pool3d_backward.default else 2
    shape = _mid(x).shape
    n = math.prod(_adaptive_windows(int(i), int(o))[1] for i, o in zip(shape[-d:], grad_output.shape[-d:]))
    return _linear_pool(m, grad_output, lambda t: func(t, torch.zeros(shape, dtype=t.dtype, device=t.device)), n,
                        True)


_UPSAMPLE = [aten.upsample_nearest1d.default, aten.upsample_nearest2d.default, aten.upsample_nearest3d.default,
             aten._upsample_nearest_exact1d.default, aten._upsample_nearest_exact2d.default,
             aten._upsample_nearest_exact3d.default]
_UPSAMPLE_BACKWARD = [aten.upsample_nearest1d_backward.default, aten.upsample_nearest2d_backward.default,
                      aten.upsample_nearest3d_backward.default, aten._upsample_nearest_exact1d_backward.default,
                      aten._upsample_nearest_exact2d_backward.default, aten._upsample_nearest_exact3d_backward.default]


@rule(*_UPSAMPLE)
def upsample_nearest(func, x, output_size, *scales):
    """Nearest upsampling copies elements (the source index depends on the sizes and scales, not on the dtype):
    the radius is the same op applied to the radius, exactly."""
    _check_float_input(func, x)
    m = func(_mid(x), output_size, *scales)
    if not isinstance(x, BallTensor):
        return m
    return result(m, _finite_only(m, func(x.rad.expand(x.shape).contiguous(), output_size, *scales)))


@rule(*_UPSAMPLE_BACKWARD)
def upsample_nearest_backward(func, grad_output, output_size, input_size, *scales):
    """grad_input = the sum of the grad_output elements copied from each input position: ``_linear_pool`` without
    scaling, n = the most copies of one element (the op applied to ones, exact small integers in float64)."""
    m = func(_mid(grad_output), output_size, input_size, *scales)
    d = len(output_size)
    ones = torch.ones([1, 1] + [int(s) for s in output_size], dtype=_F64)
    counts = func(ones, output_size, [1, 1] + [int(s) for s in input_size[-d:]], *scales)
    n = int(counts.max()) if counts.numel() else 0
    return _linear_pool(m, grad_output, lambda t: func(t, output_size, input_size, *scales), n, False)
