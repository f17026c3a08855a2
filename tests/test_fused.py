"""The fused radius kernels (ballgrad.fused) against their rules' reference formulas: bit for bit."""

import math
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import ballgrad as bg
from ballgrad import fused
from ballgrad.testing import ball_pairs, balls
from ballgrad.tensor import BallTensor

pytestmark = pytest.mark.skipif(fused._numba() is None, reason="numba not installed or BALLGRAD_FUSED=0")

OPS = {"add": torch.add, "sub": torch.sub, "rsub": torch.rsub}


def test_every_kernel_is_cached_on_disk_across_processes():
    """numba's disk cache keys a function with closure cells by pickling them, and a pickled compiled function
    differs in every process: kernels that closed over shared helpers were recompiled in every process (seconds
    each; the first transformer-tiny step took 6.8 s instead of 0.8 s) and added a cache file each time. Every
    compiled function is module-level, cells-free and cached."""
    import numba
    from ballgrad import fused_kernels

    compiled = [f for f in vars(fused_kernels).values() if isinstance(f, numba.core.dispatcher.Dispatcher)]
    assert len(compiled) >= 20
    for f in compiled:
        assert f.py_func.__closure__ is None, f.py_func.__name__
        assert type(f._cache).__name__ == "FunctionCache", f.py_func.__name__  # njit(cache=True)


def _reference(op, a, b):
    """The rule with the fused kernels switched off: its torch formula."""
    with mock.patch.object(fused, "applies", lambda *args: False):
        return OPS[op](a, b)


def _same(fast: BallTensor, slow: BallTensor):
    assert torch.equal(fast.mid, slow.mid) or (fast.mid.isnan() == slow.mid.isnan()).all()
    assert fast.rad.dtype == slow.rad.dtype
    assert torch.equal(fast.rad, slow.rad), (fast.rad, slow.rad)


@pytest.mark.parametrize("op", sorted(OPS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_add_radius_is_the_reference_bit_for_bit(op, dtype, data):
    """Adversarial balls (signed zeros, subnormals, near-overflow, inf, NaN; radii 0, eta, huge, inf)."""
    a, b = data.draw(ball_pairs(dtype, shape=(3, 5)))
    _same(OPS[op](a, b), _reference(op, a, b))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_add_radius_large_and_points(dtype):
    """A large operand pair, with point elements mixed in (p == 0 takes TwoSum's exact error, uninflated), overflow
    to inf (TwoSum's NaN -> +inf), and a plain-tensor operand (radius 0 everywhere)."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(257, 129, generator=gen, dtype=dtype) * 1e3
    y = torch.randn(257, 129, generator=gen, dtype=dtype)
    x[0, :4] = torch.finfo(dtype).max
    y[0, :4] = torch.finfo(dtype).max
    rx = (x.abs() * 2.0**-20).to(dtype)
    rx[1::3] = 0
    a, b = bg.ball(x, rx), bg.ball(y, torch.zeros_like(y))
    with mock.patch.object(fused, "add_radius", wraps=fused.add_radius) as kernel:
        a + b
    assert kernel.call_count == 1  # the fused path is the one compared here
    for left, right in ((a, b), (a, y), (x, b)):
        _same(left + right, _reference("add", left, right))
        _same(left - right, _reference("sub", left, right))
    assert bool(torch.isinf((a + b).rad[0, :4]).all())


BROADCASTS = [((3, 5), (5,)), ((5,), (3, 5)), ((3, 1), (1, 5)), ((2, 3, 5), (3, 1)), ((3, 5), ())]


@pytest.mark.parametrize("op", sorted(OPS))
@pytest.mark.parametrize("shapes", BROADCASTS, ids=str)
@pytest.mark.parametrize("plain", [None, "left", "right"])
@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_add_radius_broadcast_and_plain_operands(op, shapes, plain, data):
    """Broadcast operands (a bias row, outer sums, a 0-d ball) and plain-tensor operands (radius 0) go through the
    kernel on dense copies (``fused.dense_operands``): the reference bit for bit on adversarial balls."""
    a = data.draw(balls(torch.float32, shapes[0]))
    b = data.draw(balls(torch.float32, shapes[1]))
    a = a.mid.clone() if plain == "left" else a
    b = b.mid.clone() if plain == "right" else b
    with mock.patch.object(fused, "add_radius", wraps=fused.add_radius) as kernel:
        fast = OPS[op](a, b)
    assert kernel.call_count == 1
    _same(fast, _reference(op, a, b))


def test_dense_operands_copies_only_what_it_must():
    x, row = torch.ones(4, 4), torch.ones(4)
    dense = fused.dense_operands(x, x, row, x.t())
    assert dense[0] is x and dense[1].shape == (4, 4) and dense[2].is_contiguous()
    assert fused.dense_operands(x, x, row.double()) is None  # mixed dtypes
    assert fused.dense_operands(x.t(), x) is None  # the output must be contiguous
    assert fused.dense_operands(x.half(), x.half()) is None


def test_applies_only_to_dense_same_shape_cpu_tensors():
    x = torch.ones(4, 4)
    assert fused.applies(x, x, x)
    assert not fused.applies(x, x.t()[:, :4].contiguous().t())  # transposed layout
    assert not fused.applies(x, torch.ones(4))  # broadcast operand
    assert not fused.applies(x.half(), x.half())  # dtype without a kernel
    assert not fused.applies(x, x.double())  # mixed dtypes


def test_a_mismatched_midpoint_falls_back_to_the_reference():
    """The kernel reports an element where its x + y differs from m (the reference then takes |s - m| into account)."""
    x, y = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0])
    m = torch.tensor([4.0, 6.5])
    r = torch.zeros(2)
    assert fused.add_radius(x, y, 1.0, m, r, r, 1.0, 0.0) is None
    assert fused.add_radius(x, y, 1.0, torch.tensor([4.0, 6.0]), r, r, 1.0, 0.0) is not None


def _relu_backward(g, s):
    return torch.ops.aten.threshold_backward.default(g, s, 0)


def _without_kernels(f, *args):
    with mock.patch.object(fused, "applies", lambda *a: False):
        return f(*args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@settings(max_examples=80, deadline=None)
@given(data=st.data())
def test_relu_and_its_backward_are_the_reference_bit_for_bit(dtype, data):
    """relu (``nonsmooth._relu_fast``) and threshold_backward at 0 (``backward._relu_backward_fast``) on adversarial
    balls, with balls touching 0 (the hull cases), exact zeros of both signs and NaN midpoints."""
    x, g = data.draw(ball_pairs(dtype, shape=(4, 6)))
    _same(torch.relu(x), _without_kernels(torch.relu, x))
    s = torch.relu(x)
    _same(_relu_backward(g, s), _without_kernels(_relu_backward, g, s))
    _same(_relu_backward(g, x), _without_kernels(_relu_backward, g, x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_relu_kernels_on_a_layer_sized_ball(dtype):
    """A pre-activation ball with a fraction of its balls touching 0 (the hull and TwoSum paths) and exact points."""
    gen = torch.Generator().manual_seed(7)
    xm = torch.randn(64, 129, generator=gen, dtype=dtype)
    xr = (torch.rand(64, 129, generator=gen, dtype=dtype) * 0.05)
    xr[::5] = 0
    x = bg.ball(xm, xr)
    g = bg.ball(torch.randn(64, 129, generator=gen, dtype=dtype), torch.rand(64, 129, generator=gen, dtype=dtype))
    with mock.patch.object(fused, "relu_radius", wraps=fused.relu_radius) as kernel:
        y = torch.relu(x)
    assert kernel.call_count == 1
    _, touches = fused.relu_radius(xm, xr, y.mid, 1e-45)
    assert 0 < touches < xm.numel()
    _same(y, _without_kernels(torch.relu, x))
    _same(_relu_backward(g, y), _without_kernels(_relu_backward, g, y))


def test_recorded_kinks_take_the_reference_path():
    """The kink event needs the mask of touching elements: while diagnostics record, relu runs its torch formula."""
    x = bg.ball(torch.tensor([-1.0, 0.0, 1.0]), torch.tensor([0.5, 0.0, 2.0]))
    with mock.patch.object(fused, "relu_radius", wraps=fused.relu_radius) as kernel:
        with bg.diagnostics.record() as recorder:
            torch.relu(x)
    assert kernel.call_count == 0
    assert recorder.count("kink") == 2


# ----------------------------------------------------------------------------------------------------------------------
# Layer norm: not bit for bit (group sums in index order, a correctly rounded rsqrt enclosure: ``fused``'s header);
# containment is checked against mpmath by the layer-norm tests (``ln_path`` fixture, both paths), here the agreement
# with the reference formulas and the handling of special values.

LN = torch.ops.aten.native_layer_norm.default
LN_BACKWARD = torch.ops.aten.native_layer_norm_backward.default


def _ln_reference(op, *args):
    from ballgrad.ops import normalization
    with mock.patch.object(normalization, "_layer_norm_fused_forward", lambda *a, **k: None), \
            mock.patch.object(normalization, "_layer_norm_fused_backward", lambda *a, **k: None):
        return op(*args)


def _ln_calls(op, *args):
    with mock.patch.object(fused, "layer_norm_forward", wraps=fused.layer_norm_forward) as f, \
            mock.patch.object(fused, "layer_norm_backward", wraps=fused.layer_norm_backward) as b:
        out = op(*args)
    assert f.call_count + b.call_count == 1  # the fused path is the one compared
    return out


def _ln_case(dtype, rad, affine, gen, shape=(3, 5, 24)):
    x = bg.ball(torch.randn(shape, generator=gen, dtype=dtype) * 2 + 0.5, rad)
    w = bg.ball(torch.rand(shape[-1], generator=gen, dtype=dtype) + 0.5, rad) if affine else None
    b = bg.ball(torch.randn(shape[-1], generator=gen, dtype=dtype), rad) if affine else None
    gy = bg.ball(torch.randn(shape, generator=gen, dtype=dtype), rad)
    return x, w, b, gy


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("rad", [0.0, 2.0 ** -20])
@pytest.mark.parametrize("affine", [True, False])
def test_layer_norm_kernels_agree_with_the_reference(dtype, rad, affine):
    """Midpoints bit-identical; radii equal to the reference's up to the last bits of its group sums (for float32
    they round up to the same float32 radius almost everywhere; relative 1e-6 allows the rest)."""
    x, w, b, gy = _ln_case(dtype, rad, affine, torch.Generator().manual_seed(11))
    fast, slow = _ln_calls(LN, x, [24], w, b, 1e-5), _ln_reference(LN, x, [24], w, b, 1e-5)
    mask = [True, affine, affine]
    fast_b = _ln_calls(LN_BACKWARD, gy, x, [24], slow[1], slow[2], w, b, mask)
    slow_b = _ln_reference(LN_BACKWARD, gy, x, [24], slow[1], slow[2], w, b, mask)
    pairs = list(zip(fast, slow)) + [(p, q) for p, q in zip(fast_b, slow_b) if q is not None]
    # point inputs: the radii are a few ulps of the midpoints, where the rstd enclosures' last bits weigh (float32:
    # within 1e-4; float64: a few of its ulps are the whole radius, so only the order of magnitude is compared)
    tol = 1e-6 if rad else (1e-4 if dtype == torch.float32 else 1.0)
    for p, q in pairs:
        assert torch.equal(p.mid, q.mid)
        assert p.rad.dtype == q.rad.dtype and bool(torch.isfinite(p.rad).all())
        assert bool(((p.rad.double() - q.rad.double()).abs() <= tol * q.rad.double()).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@settings(max_examples=40, deadline=None)
@given(data=st.data(), affine=st.booleans())
def test_layer_norm_kernels_on_special_values(dtype, affine, data):
    """Adversarial balls with inf and NaN midpoints, infinite radii, subnormals, signed zeros, huge values: the
    midpoints are the reference's, the radii are valid (never NaN or negative), a row with a non-finite input or radius
    gets infinite radii wherever the reference's are infinite, and every radius the reference finds finite is also
    finite here unless its row holds a non-finite value."""
    x = data.draw(balls(dtype, (2, 6)))
    gy = data.draw(balls(dtype, (2, 6)))
    w = data.draw(balls(dtype, (6,), allow_nonfinite=False, allow_inf_radius=False)) if affine else None
    b = data.draw(balls(dtype, (6,), allow_nonfinite=False, allow_inf_radius=False)) if affine else None
    fast = LN(x, [6], w, b, 1e-5)
    slow = _ln_reference(LN, x, [6], w, b, 1e-5)
    mask = [True, affine, affine]
    fast_b = LN_BACKWARD(gy, x, [6], slow[1], slow[2], w, b, mask)
    slow_b = _ln_reference(LN_BACKWARD, gy, x, [6], slow[1], slow[2], w, b, mask)
    bad_rows = ~(torch.isfinite(x.mid) & torch.isfinite(x.rad)).all(-1)
    for p, q in list(zip(fast, slow)) + [(p, q) for p, q in zip(fast_b, slow_b) if q is not None]:
        assert torch.equal(p.mid.isnan(), q.mid.isnan()) and torch.equal(p.mid.nan_to_num(), q.mid.nan_to_num())
        assert not bool(p.rad.isnan().any()) and bool((p.rad >= 0).all())
        if p.shape == x.shape:
            assert bool(torch.isinf(p.rad[bad_rows]).all())
            assert bool(torch.isinf(p.rad[torch.isinf(q.rad) & bad_rows.unsqueeze(-1)]).all())


# ----------------------------------------------------------------------------------------------------------------------
# log_softmax's backward: the row sums in index order (not bit for bit); containment against mpmath runs through
# both paths in test_nn_ops.py (dim 1: the kernel; dim 0: the reference).

LSB = torch.ops.aten._log_softmax_backward_data.default


def _lsb_reference(g, z, dtype):
    from ballgrad.ops import nn as nn_rules
    with mock.patch.object(nn_rules, "_log_softmax_backward_fused", lambda *a, **k: None):
        return LSB(g, z, 1, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@settings(max_examples=60, deadline=None)
@given(data=st.data(), arbitrary=st.booleans())
def test_log_softmax_backward_kernel_against_the_reference(dtype, arbitrary, data):
    """Adversarial grads and saved outputs (inf, NaN, subnormals, huge radii): the midpoints are the reference's, and
    the radii equal its radii up to the last bits of the row sums (relative 1e-9) wherever it is finite -- the kernel
    declines exactly where a radius is not finite, and both paths then compose."""
    g = data.draw(balls(dtype, (3, 5)))
    x = data.draw(balls(dtype, (3, 5), max_magnitude=30))
    z = x if arbitrary else torch.log_softmax(x, 1)
    with mock.patch.object(fused, "log_softmax_backward_radius", wraps=fused.log_softmax_backward_radius) as kernel:
        fast = LSB(g, z, 1, dtype)
    slow = _lsb_reference(g, z, dtype)
    assert torch.equal(fast.mid.isnan(), slow.mid.isnan())
    assert torch.equal(fast.mid.nan_to_num(), slow.mid.nan_to_num())
    assert not bool(fast.rad.isnan().any()) and bool((fast.rad >= 0).all())
    finite = torch.isfinite(slow.rad)
    assert torch.equal(torch.isfinite(fast.rad), finite)
    close = (fast.rad.double() - slow.rad.double()).abs() <= 1e-9 * slow.rad.double()
    assert bool(close[finite].all())
    if g.is_floating_point() and bool(finite.all()):
        assert kernel.call_count == 1  # the case compared is the kernel's


# ----------------------------------------------------------------------------------------------------------------------
# The measured GEMM bound's passes (``linalg._residual32`` / ``_blocked_residual`` and ``_measured_radius_f32``'s sum):
# the residual bit for bit, the sum up to fused multiply-adds in the reference's torch ops; containment against mpmath
# runs through both paths in test_linalg.py (the "measured" and "measured-reference" configs).


def _gemm(op, args, fused_min, block=None):
    from ballgrad.ops import linalg
    patches = [mock.patch.object(linalg, "_FUSED_GEMM_MIN", fused_min)]
    if block is not None:
        patches += [mock.patch.object(linalg, "_REFERENCE_BLOCK", block), mock.patch.object(linalg, "_MIN_BLOCK", 1),
                    mock.patch.object(linalg, "_UNBLOCKED_MAX", block)]
    with patches[0], (patches[1] if block else mock.MagicMock()), (patches[2] if block else mock.MagicMock()), \
            (patches[3] if block else mock.MagicMock()), \
            mock.patch.object(fused, "gemm_finish", wraps=fused.gemm_finish) as finish, \
            mock.patch.object(fused, "gemm_residual_into", wraps=fused.gemm_residual_into) as residual:
        with bg.gemm_bound("measured"):
            out = op(*args)
    return out, finish.call_count, residual.call_count


GEMM_CASES = {
    "mm": lambda a, b, c: torch.mm(a, b),
    "addmm": lambda a, b, c: torch.addmm(c, a, b),
    "addmm-scaled": lambda a, b, c: torch.addmm(c, a, b, beta=0.5, alpha=-3.0),
    "linear": lambda a, b, c: torch.nn.functional.linear(a, b.t(), c),
}


@pytest.mark.parametrize("case", sorted(GEMM_CASES))
@pytest.mark.parametrize("points", ["balls", "a-point", "b-point", "points"])
@pytest.mark.parametrize("block", [None, 12], ids=["whole", "blocked"])
@settings(max_examples=15, deadline=None)
@given(data=st.data(), adversarial=st.booleans())
def test_gemm_kernels_agree_with_the_reference(case, points, block, data, adversarial):
    """Both operands and the bias balls or points, random or adversarial (inf and NaN midpoints, infinite radii,
    subnormals, signed zeros, huge values): midpoints bit-identical, radii never NaN or negative, infinite exactly
    where the reference's are, and within 2^-20 relative of them elsewhere (fused multiply-adds in the reference's
    torch ops round once where the kernel rounds twice); the kernels ran."""
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16)))
    n, k, p = 5, 6, 7
    if adversarial:
        a = data.draw(balls(torch.float32, (n, k)))
        b = data.draw(balls(torch.float32, (k, p)))
        c = data.draw(balls(torch.float32, (p,)))
    else:
        a, b, c = (bg.ball(torch.randn(s, generator=gen), torch.rand(s, generator=gen) * 2.0**-20)
                   for s in ((n, k), (k, p), (p,)))
    if points == "a-point":  # a plain tensor
        a = a.mid.clone()
    if points == "b-point":
        b = b.mid.clone()
    if points == "points":  # balls of radius 0
        a, b = bg.ball(a.mid.clone(), 0.0), bg.ball(b.mid.clone(), 0.0)
    op = GEMM_CASES[case]
    fast, finishes, residuals = _gemm(op, (a, b, c), 0, block)
    slow, slow_finishes, _ = _gemm(op, (a, b, c), float("inf"), block)
    assert finishes == 1 and slow_finishes == 0
    assert residuals == (1 if block is None else 4)  # A (5 x 6) is the smaller operand: blocks of 12 // 5 columns
    assert torch.equal(fast.mid.isnan(), slow.mid.isnan())
    assert torch.equal(fast.mid.nan_to_num(), slow.mid.nan_to_num())
    assert fast.rad.dtype == slow.rad.dtype == torch.float32
    assert not bool(fast.rad.isnan().any()) and bool((fast.rad >= 0).all())
    finite = torch.isfinite(slow.rad)
    assert torch.equal(torch.isfinite(fast.rad), finite)
    assert bool(((fast.rad[finite].double() - slow.rad[finite].double()).abs()
                 <= 2.0**-20 * slow.rad[finite].double()).all())


def test_gemm_kernels_run_from_the_size_threshold_on():
    """The fused GEMM passes run for 2-D float32 outputs of at least ``_FUSED_GEMM_MIN`` elements only."""
    from ballgrad.ops import linalg
    gen = torch.Generator().manual_seed(3)
    small = (bg.ball(torch.randn(4, 8, generator=gen), 2.0**-20), bg.ball(torch.randn(8, 4, generator=gen), 2.0**-20))
    rows = -(-linalg._FUSED_GEMM_MIN // 128)
    large = (bg.ball(torch.randn(rows, 8, generator=gen), 2.0**-20),
             bg.ball(torch.randn(8, 128, generator=gen), 2.0**-20))
    _, finishes, _ = _gemm(lambda a, b, c: torch.mm(a, b), small + (None,), linalg._FUSED_GEMM_MIN)
    assert finishes == 0
    _, finishes, _ = _gemm(lambda a, b, c: torch.mm(a, b), large + (None,), linalg._FUSED_GEMM_MIN)
    assert finishes == 1


# ----------------------------------------------------------------------------------------------------------------------
# log_softmax's pairwise forward: the reference bit for bit (containment against mpmath: test_nn_ops.py, whose float32
# rows along the last dim now take the kernels).

def _lsf_reference(x):
    from ballgrad.ops import nn as nn_rules
    with mock.patch.object(nn_rules, "_log_softmax_pairwise_fused", lambda *a, **k: None):
        return torch.log_softmax(x, -1)


@settings(max_examples=80, deadline=None)
@given(data=st.data(), shape=st.sampled_from([(1, 1), (3, 5), (2, 3, 4), (4, 10)]))
def test_log_softmax_pairwise_kernels_are_the_reference_bit_for_bit(shape, data):
    """Adversarial float32 logits (inf, NaN, subnormals, signed zeros, huge values and radii): midpoints and radii
    bit-identical to the torch formulas; the kernels run wherever the rows' pair differences are exact and finite
    (the reference's exact branch), and otherwise leave the call to the reference."""
    x = data.draw(balls(torch.float32, shape))
    with mock.patch.object(fused, "log_softmax_pairwise", wraps=fused.log_softmax_pairwise) as kernel:
        fast = torch.log_softmax(x, -1)
    slow = _lsf_reference(x)
    assert kernel.call_count == 1
    assert torch.equal(fast.mid.isnan(), slow.mid.isnan())
    assert torch.equal(fast.mid.nan_to_num(), slow.mid.nan_to_num())
    assert fast.rad.dtype == slow.rad.dtype == torch.float32
    assert torch.equal(fast.rad, slow.rad)


def test_log_softmax_pairwise_kernels_on_model_logits():
    """A classifier head's logits (64 x 10, a small radius, and exact points): bit-identical, and the kernels ran."""
    gen = torch.Generator().manual_seed(2)
    for rad in (2.0**-20, 0.0):
        x = bg.ball(torch.randn(64, 10, generator=gen) * 3, rad)
        returned = []
        original = fused.log_softmax_pairwise
        with mock.patch.object(fused, "log_softmax_pairwise", lambda *a: returned.append(original(*a)) or returned[-1]):
            fast = torch.log_softmax(x, -1)
        slow = _lsf_reference(x)
        assert len(returned) == 1 and returned[0] is not None  # the kernels' radius is the one returned
        assert torch.equal(fast.mid, slow.mid) and torch.equal(fast.rad, slow.rad)
        assert bool(torch.isfinite(fast.rad).all())


# ----------------------------------------------------------------------------------------------------------------------
# sum and mean over adjacent dims: the sums in index order (containment against mpmath: test_reductions.py, both
# paths)

SUM_CASES = [((3, 5), [0]), ((3, 5), [1]), ((2, 3, 4), [0, 1]), ((2, 3, 4), [1]), ((2, 3, 4), [1, 2]),
             ((2, 3, 4), None), ((7,), [0])]


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", SUM_CASES, ids=str)
@settings(max_examples=30, deadline=None)
@given(data=st.data())
def test_sum_kernel_against_the_reference(reduction, dtype, case, data):
    """Adversarial balls (inf and NaN midpoints, infinite radii, subnormals, huge values): midpoints bit-identical,
    radii never NaN or negative, within 2^-18 relative of the reference's where both are finite (the radius sums'
    order), and finite where the reference's are, except where a sum of |m| or r comes within a factor 2 of overflow
    (one order may overflow where another does not; either result is a bound); the kernel ran."""
    from ballgrad.ops import reductions
    shape, dims = case
    x = data.draw(balls(dtype, shape))
    f = getattr(torch, reduction)
    op = (lambda t: f(t)) if dims is None else (lambda t: f(t, dims))
    with mock.patch.object(fused, "sum_radius", wraps=fused.sum_radius) as kernel:
        fast = op(x)
    with mock.patch.object(reductions, "_sum_fused", lambda *a, **k: None):
        slow = op(x)
    assert kernel.call_count == 1
    assert torch.equal(fast.mid.isnan(), slow.mid.isnan())
    assert torch.equal(fast.mid.nan_to_num(), slow.mid.nan_to_num())
    assert fast.rad.dtype == slow.rad.dtype and fast.rad.shape == slow.rad.shape
    assert not bool(fast.rad.isnan().any()) and bool((fast.rad >= 0).all())
    big = 0.5 * torch.finfo(dtype).max
    reduced = list(range(x.dim())) if dims is None else dims
    near = ((x.mid.double().abs().sum(reduced) >= big) | (x.rad.double().sum(reduced) >= big)).reshape(slow.shape)
    assert bool((torch.isfinite(fast.rad) == torch.isfinite(slow.rad))[~near].all())
    both = torch.isfinite(slow.rad) & torch.isfinite(fast.rad)
    assert bool(((fast.rad[both].double() - slow.rad[both].double()).abs()
                 <= 2.0**-18 * slow.rad[both].double()).all())


def test_sum_kernel_declines_what_it_does_not_take():
    """Non-adjacent dims, a dtype argument, reduced dtypes and non-contiguous balls take the torch formulas."""
    x = bg.ball(torch.randn(2, 3, 4), 1e-6)
    with mock.patch.object(fused, "sum_radius", wraps=fused.sum_radius) as kernel:
        torch.sum(x, [0, 2])
        torch.sum(x, 1, dtype=torch.float64)
        torch.sum(bg.ball(torch.randn(2, 3).bfloat16(), 1e-3), 0)
        torch.sum(bg.ball(torch.randn(3, 2).t(), 1e-6), 0)
    assert kernel.call_count == 0


# ----------------------------------------------------------------------------------------------------------------------
# nll_loss on [N, C] float32 balls (containment against mpmath: test_nn_ops.py, whose float32 cases take the kernels)

def _nll_reference(f, *args):
    from ballgrad.ops import nn as nn_rules
    with mock.patch.object(nn_rules, "_nll_fused", lambda *a: False):
        return f(*args)


@pytest.mark.parametrize("reduction", [1, 2], ids=["mean", "sum"])
@settings(max_examples=60, deadline=None)
@given(data=st.data(), n=st.integers(1, 6), ignore=st.booleans())
def test_nll_kernels_against_the_reference(reduction, n, ignore, data):
    """Adversarial logits (inf, NaN, subnormals, huge values and radii) and ignored samples: forward midpoints
    bit-identical and radii within what two summation orders can move the float64 sum (4 n u64 sum|x| at most; the
    same where the sum is exact), the total weight identical; the backward's radii bit-identical; the kernels ran."""
    aten = torch.ops.aten
    x = data.draw(balls(torch.float32, (n, 4)))
    target = torch.tensor(data.draw(st.lists(st.integers(0, 3), min_size=n, max_size=n)))
    if ignore:
        target[data.draw(st.integers(0, n - 1))] = -100
    with mock.patch.object(fused, "nll_forward_stats", wraps=fused.nll_forward_stats) as stats:
        out, total = aten.nll_loss_forward(x, target, None, reduction, -100)
    slow_out, slow_total = _nll_reference(aten.nll_loss_forward, x, target, None, reduction, -100)
    assert stats.call_count == 1
    assert torch.equal(out.mid.isnan(), slow_out.mid.isnan()) and torch.equal(total.mid, slow_total.mid)
    assert torch.equal(total.rad, slow_total.rad)
    a, b = float(out.rad), float(slow_out.rad)
    kept = target != -100
    picked = x.mid.double()[torch.arange(n)[kept], target[kept]].abs().sum().item()
    assert a == b or abs(a - b) <= 4 * n * 2.0**-53 * picked + 2.0**-22 * b  # (+ one float32 ulp: rounded up)
    g = data.draw(balls(torch.float32, ()))
    with mock.patch.object(fused, "nll_backward_radius", wraps=fused.nll_backward_radius) as kernel:
        grad = aten.nll_loss_backward(g, x, target, None, reduction, -100, slow_total)
    slow_grad = _nll_reference(aten.nll_loss_backward, g, x, target, None, reduction, -100, slow_total)
    assert kernel.call_count == 1
    assert torch.equal(grad.mid.nan_to_num(), slow_grad.mid.nan_to_num())
    assert torch.equal(grad.rad, slow_grad.rad)


# ----------------------------------------------------------------------------------------------------------------------
# The optimizer's p.add_(g, alpha=a) (containment: test_inplace.py and test_optim.py, which now take the kernel)

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("alpha", [-0.01, 3.0, -1e-30])
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_scaled_add_kernel_against_the_reference(dtype, alpha, data):
    """Adversarial parameter and gradient balls: the updated midpoints bit-identical, radii never NaN or negative,
    infinite exactly where the reference's are, within 2^-20 relative elsewhere (the reference's add_ with alpha may
    round a product and a sum once); the kernel ran."""
    p = data.draw(balls(dtype, (3, 5)))
    g = data.draw(balls(dtype, (3, 5)))
    fast, slow = bg.ball(p.mid.clone(), p.rad.clone()), bg.ball(p.mid.clone(), p.rad.clone())
    with mock.patch.object(fused, "scaled_add_radius", wraps=fused.scaled_add_radius) as kernel:
        fast.add_(g, alpha=alpha)
    assert kernel.call_count == 1
    with mock.patch.object(fused, "applies", lambda *a: False):
        slow.add_(g, alpha=alpha)
    assert torch.equal(fast.mid.isnan(), slow.mid.isnan())
    assert torch.equal(fast.mid.nan_to_num(), slow.mid.nan_to_num())
    assert not bool(fast.rad.isnan().any()) and bool((fast.rad >= 0).all())
    finite = torch.isfinite(slow.rad)
    assert torch.equal(torch.isfinite(fast.rad), finite)
    assert bool(((fast.rad[finite].double() - slow.rad[finite].double()).abs()
                 <= 2.0**-20 * slow.rad[finite].double()).all())


# ----------------------------------------------------------------------------------------------------------------------
# A ball divided by a Python number (containment: test_arith.py's division tests, whose number divisors take the kernel)

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("divisor", [32, 3.0, 0.1, -7, 1e-30, 2.0**-140, 1e30, 3e38])
@pytest.mark.parametrize("expanded", [False, True], ids=["dense", "expanded"])
@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_division_by_a_number_is_the_reference_bit_for_bit(dtype, divisor, expanded, data):
    """Adversarial balls over numbers exact and inexact in the dtype (0.1: the divisor's own radius), tiny, huge and
    negative, dense or expanded (a mean's backward divides an expanded gradient): midpoints and radii bit-identical to
    the torch formulas; the kernel ran."""
    from ballgrad.ops import arith
    x = data.draw(balls(dtype, (3, 1) if expanded else (3, 5))).expand(3, 5)
    with mock.patch.object(fused, "div_number_radius", wraps=fused.div_number_radius) as kernel:
        fast = x / divisor
    with mock.patch.object(arith, "_divided_by_number", lambda *a: None):
        slow = x / divisor
    assert kernel.call_count == 1
    _same(fast, slow)


# ----------------------------------------------------------------------------------------------------------------------
# Lemma B's bfloat16 operands and finish (containment: test_linalg.py's GEMM tests, whose bfloat16 configs take them)

# (abs_x, abs_y, has_y, alpha): Y of the bracket (r + g'|m|), Y2 (r + |m|), Lemma B1's X (|mA| + c' rA), |m|, r
BF16_OPERANDS = [(False, True, True, 1.2e-4), (False, True, True, 1.0), (True, False, True, 8192.5), (True, False,
                 False, 1.0), (False, False, False, 1.0)]


@pytest.mark.parametrize("form", BF16_OPERANDS, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "broadcast"])
@settings(max_examples=40, deadline=None)
@given(data=st.data(), t=st.sampled_from([0.0, 2.0**-20, 1.0, math.inf]))
def test_bf16_operand_kernel_against_the_reference(form, layout, t, data):
    """Adversarial balls (midpoints: zeros of both signs, subnormals, huge values, inf, NaN; radii >= 0, inf too):
    the kernel's bfloat16 operand is the reference's bit for bit (NaN payloads aside) where the sum has one rounding,
    within one bfloat16 ulp where the reference's add with alpha may fuse the product (one rounding instead of two);
    the counts of not X <= t Y agree; the kernel ran except on a broadcast operand, which takes the reference."""
    from ballgrad.ops import linalg
    abs_x, abs_y, has_y, alpha = form
    b = data.draw(balls(torch.float32, (6, 5)))
    x, y = (b.mid, b.rad) if abs_x else (b.rad, b.mid)  # as the bracket uses them: |m| + c' r, r + a|m|, |m|, r
    if layout == "transposed":
        x, y = x.t().contiguous().t(), y.t().contiguous().t()
    if layout == "broadcast":
        x = x[:1].expand(x.shape)
    args = (x, y if has_y else None, alpha, abs_x, abs_y, t)
    with mock.patch.object(fused, "bf16_operand", wraps=fused.bf16_operand) as kernel:
        fast, wide_fast = linalg._bf16_sum(*args)
    assert kernel.call_count == 1
    with mock.patch.object(fused, "bf16_operand", lambda *a: None):
        slow, wide_slow = linalg._bf16_sum(*args)
    assert fast.dtype == slow.dtype == torch.bfloat16 and fast.shape == slow.shape
    assert (fused.bf16_operand(*args) is None) == (layout == "broadcast")
    if has_y:
        assert wide_fast == wide_slow
    f, s = fast.float(), slow.float()
    assert torch.equal(f.isnan(), s.isnan())
    assert bool((f[~f.isnan()] >= 2.0**-126).all()), "an operand entry below realmin_32 (Lemma B reads none)"
    if alpha == 1.0 or not has_y:
        assert torch.equal(f.nan_to_num(), s.nan_to_num())
    else:
        ok = f.isnan() | (f == s) | ((f - s).abs() <= 2.0**-7 * s.abs())
        assert bool(ok.all())


@settings(max_examples=60, deadline=None)
@given(data=st.data(), c1=st.sampled_from([1.0, 1.0000305, 3.5]), c2=st.sampled_from([0.0, 2.0**-120, 1e-30]))
def test_bf16_finish_is_the_reference_bit_for_bit(c1, c2, data):
    """The bfloat16 GEMM output widened and scaled, fl(fl(S c1) + c2) with NaN -> +inf: the torch formula's bits on
    adversarial S (zeros, subnormals, huge values, inf, NaN)."""
    from ballgrad.ops import linalg
    s = data.draw(balls(torch.float32, (4, 7))).mid.abs().to(torch.bfloat16)
    with mock.patch.object(fused, "bf16_finish", wraps=fused.bf16_finish) as kernel:
        fast = linalg._bf16_finish(s, c1, c2)
    assert kernel.call_count == 1 and fused.bf16_finish(s, c1, c2) is not None
    with mock.patch.object(fused, "bf16_finish", lambda *a: None):
        slow = linalg._bf16_finish(s, c1, c2)
    assert torch.equal(fast, slow) and not bool(fast.isnan().any())
    assert fused.bf16_finish(s.t(), c1, c2) is None  # not contiguous: the torch formula


# ----------------------------------------------------------------------------------------------------------------------
# Fused attention's P ball and dS (containment: test_transformer.py's fast-path tests, whose unmasked calls take them)

SDPA = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit for bit, NaN where NaN (signed zeros compared as values)."""
    return torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(nan=0.0, posinf=math.inf, neginf=-math.inf),
                                                             b.nan_to_num(nan=0.0, posinf=math.inf, neginf=-math.inf))


_SCORE_VALUES = st.one_of(st.sampled_from([0.0, -0.0, 2.0**-1074, 2.0**-1022, 1.0, -3.0, 2.0**40, -1e300]),
                          st.floats(-30, 30, allow_nan=False))


@settings(max_examples=60, deadline=None)
@given(data=st.data(), s=st.sampled_from([1, 4, 9]), given_=st.booleans(), nan=st.booleans())
def test_attention_shift_is_the_reference_bit_for_bit(s, given_, nan, data):
    """Adversarial scores and radii (zeros of both signs, subnormals, huge values, a NaN): the shifted end points
    max(sc -+ rad - M, -700) and the row maxima M are the torch formulas' bits (with the maxima computed, or read as the
    backward reads the forward's), and the statistics are (min sc, max sc, max rad), NaN where a NaN was met."""
    rows = 3
    sc = torch.tensor(data.draw(st.lists(_SCORE_VALUES, min_size=rows * s, max_size=rows * s)),
                      dtype=torch.float64).reshape(1, rows, s)
    radii = st.sampled_from([0.0, 2.0**-1074, 1e-300, 0.5, 3.0, 1e290])
    rad = torch.tensor(data.draw(st.lists(radii, min_size=rows * s, max_size=rows * s)),
                       dtype=torch.float64).reshape(1, rows, s)
    if nan:
        sc[0, data.draw(st.integers(0, rows - 1)), 0] = math.nan
    lo, hi = sc - rad, sc + rad
    m_lo, m_hi = lo.amax(-1, keepdim=True), hi.amax(-1, keepdim=True)
    if given_:  # the forward's maxima (any values: the kernel only subtracts them)
        m_lo, m_hi = m_lo - 1.5, m_hi.clone()
    out_lo, out_hi = (m_lo.clone(), m_hi.clone()) if given_ else (torch.empty_like(m_lo), torch.empty_like(m_hi))
    x_lo, x_hi = sc.clone(), rad.clone()
    stats = fused.attention_shift(x_lo, x_hi, out_lo, out_hi, given=given_)
    assert stats is not None
    if nan:
        assert all(math.isnan(v) for v in stats)
        return  # (the forward then declines to the composed rules: nothing else is read)
    assert stats == (sc.min().item(), sc.max().item(), rad.max().item())
    assert _same_bits(out_lo, m_lo) and _same_bits(out_hi, m_hi)
    assert _same_bits(x_lo, (lo - m_lo).clamp_min(-700.0)) and _same_bits(x_hi, (hi - m_hi).clamp_min(-700.0))
    assert fused.attention_shift(sc.mT, rad.mT, out_lo, out_hi, given=True) is None  # not contiguous: the torch path


def _bounds_reference(x_lo, v_lo, x_hi, v_hi, tl, tp, d, given, c):
    """``fused.attention_bounds``'s operations as separate torch operations (one rounding each, row sums in index
    order): (p_hi, pm, pr, tl, tp)."""
    g1, g2, b2, f1, nf2, a2, dn, up, lam, k1, k2, k3, k4, pr_coef, pr_phi, pr_a = c
    lo = (-b2 + v_lo * (g1 + g2 * x_lo)).clamp_min(0.0)
    hi = a2 + v_hi * (f1 + x_hi * nf2)
    if not given:
        sl, sh = torch.zeros_like(tl), torch.zeros_like(tp)
        for j in range(lo.shape[-1]):
            sl, sh = sl + lo[..., j:j + 1], sh + hi[..., j:j + 1]
        tl, tp = sl * dn, lam + sh * up
    p_hi = (k2 + k1 * (hi / (hi + (tl - lo).clamp_min(0.0) * d))).clamp_max(1.0)
    p_lo = (-k4 + k3 * (lo / ((tp - hi) / d + lo))).clamp_min(0.0)
    wc = p_hi - p_lo
    pm = p_lo + 0.5 * wc
    return p_hi, pm, pr_a + pr_phi * (wc + pr_coef * pm), tl, tp


@settings(max_examples=60, deadline=None)
@given(data=st.data(), s=st.sampled_from([1, 4, 9]), given_=st.booleans())
def test_attention_bounds_is_the_reference_bit_for_bit(s, given_, data):
    """Shifted scores x in [-700, 0] (0, -0, subnormals, -700) with v = torch's exp(x), and row vectors TL, T', d
    (computed, or read as the backward reads them: 0, tiny, 1, huge; d = 0 included): the kernel's p_hi, pm, pr and
    row sums are the bits of the same operations done one by one, the sums in index order."""
    import ballgrad.ops.transformer as tr
    rows = 3
    xs = st.one_of(st.sampled_from([0.0, -0.0, -2.0**-1074, -1e-300, -700.0, -699.9, -1.0]), st.floats(-700, 0))
    draw_x = lambda: torch.tensor(data.draw(st.lists(xs, min_size=rows * s, max_size=rows * s)),  # noqa: E731
                                  dtype=torch.float64).reshape(1, rows, s)
    x_lo, x_hi = draw_x(), draw_x()
    x_lo[..., 0] = 0.0  # each row's maxima (the shifted end points reach 0 somewhere)
    x_hi[..., 0] = 0.0
    entries = st.sampled_from([0.0, 1e-300, 2.0**-512, 0.5, 1.0, 9.0, 1e300])
    vector = lambda: torch.tensor(data.draw(st.lists(entries, min_size=rows, max_size=rows)),  # noqa: E731
                                  dtype=torch.float64).reshape(1, rows, 1)
    d = vector().clamp_max(1.0)
    tl, tp = (vector(), vector()) if given_ else (torch.empty(1, rows, 1, dtype=torch.float64),
                                                   torch.empty(1, rows, 1, dtype=torch.float64))
    c = tr._bounds_constants("cpu", s)
    v_lo, v_hi = torch.exp(x_lo), torch.exp(x_hi)
    want = _bounds_reference(x_lo, v_lo, x_hi, v_hi, tl, tp, d, given_, c)
    got = [x_hi.clone(), x_lo.clone(), v_lo.clone()]  # p_hi over x_hi, pm over x_lo, pr over v_lo
    assert fused.attention_bounds(got[1], got[2], got[0], v_hi.clone(), tl, tp, d, given_, c)
    for a, b in zip(got + [tl, tp], want):
        assert _same_bits(a, b)
    strided = torch.zeros(1, rows, 2, dtype=torch.float64)[..., :1]
    assert not fused.attention_bounds(x_lo, v_lo, x_hi, v_hi, strided, tp, d, given_, c)  # a row vector not dense


@settings(max_examples=20, deadline=None)
@given(data=st.data(), rel=st.sampled_from([0.0, 1e-6, 0.25]))
def test_attention_probs_take_the_kernels(rel, data):
    """Unmasked calls take both kernels (forward and backward blocks), and their P ball lies within the reference's
    (which sums TL, T' in torch's order, and whose addcmul may fuse) up to what those departures can move: both are
    rigorous bounds (the transformer tests check containment), so here only that they agree where no cancellation
    amplifies a last-bit difference (T' - Eh_up): p_hi, whose formula has none, within 2^-48 p_hi."""
    import ballgrad.ops.transformer as tr
    m = lambda shape: torch.tensor(data.draw(st.lists(st.floats(-4, 4), min_size=math.prod(shape),  # noqa: E731
                                                      max_size=math.prod(shape))), dtype=torch.float64).reshape(shape)
    q, k, v = (bg.ball(t, t.abs() * rel) for t in (m((1, 2, 3, 2)), m((1, 2, 5, 2)), m((1, 2, 5, 2))))
    with mock.patch.object(fused, "attention_shift", wraps=fused.attention_shift) as shift, \
            mock.patch.object(fused, "attention_bounds", wraps=fused.attention_bounds) as bounds:
        fast = tr._FastAttention.build(SDPA, q, k, v, False, None, None)
    assert shift.call_count == 1 and bounds.call_count == 1
    with mock.patch.object(fused, "attention_shift", lambda *a, **kw: None):
        slow = tr._FastAttention.build(SDPA, q, k, v, False, None, None)
    assert bool(((fast.p_hi - slow.p_hi).abs() <= 2.0**-48 * slow.p_hi).all())
    assert bool((fast.pm - fast.pr <= slow.pm + slow.pr + 2.0**-48).all())  # the balls overlap
    assert bool((slow.pm - slow.pr <= fast.pm + fast.pr + 2.0**-48).all())


@settings(max_examples=60, deadline=None)
@given(data=st.data(), s=st.sampled_from([1, 3, 8]))
def test_attention_ds_kernel_against_the_reference(s, data):
    """Adversarial P balls and dP balls (zeros, subnormals, huge values, inf, NaN): the kernel's dS centre, radius and
    |dS| against the reference formulas: the same non-finite entries, and within what the order of the row sum
    Dm = sum W can change (s 2^-52 sum |W| times pm for the centre; a few roundings for the radius)."""
    import types

    import ballgrad.ops.transformer as tr
    rows = 2
    draw = lambda: data.draw(balls(torch.float64, (rows, s)))  # noqa: E731
    p, dp = draw(), draw()
    pm, pr = p.mid.abs().clamp(max=1.0), p.rad
    p_hi = pm + pr
    args = (p_hi, pm, pr)
    slow = tr._FastAttention._ds(types.SimpleNamespace(s=s), *args, dp.mid.clone(), dp.rad.clone())
    dp_c, dp_r = dp.mid.clone(), dp.rad.clone()
    abs_fast = fused.attention_ds(*args, dp_c, dp_r, tr._gamma(s), tr._inflation(6 * s, s * tr._ETA64 / 2),
                                  tr._DS_INFLATION)
    assert abs_fast is not None
    w_abs = (dp.mid * pm).abs().sum(-1, keepdim=True)
    for fast, ref, slack in ((dp_c, slow[0], s * 2.0**-52 * pm * w_abs), (abs_fast, slow[2], s * 2.0**-52 * pm * w_abs),
                             (dp_r, slow[1], None)):
        finite = torch.isfinite(ref)
        assert torch.equal(finite, torch.isfinite(fast)) and torch.equal(ref.isnan(), fast.isnan())
        if slack is None:  # the radius: rd's sum in another order and dm's change in |Xm|
            slack = 2.0**-40 * ref.abs() + s * 2.0**-50 * pr * pm * w_abs
        assert bool(((fast - ref).abs()[finite] <= slack.expand(ref.shape)[finite] + 2.0**-1070).all())
