"""The fused radius kernels (ballgrad.fused) against their rules' reference formulas: bit for bit."""

from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import ballgrad as bg
from ballgrad import fused
from ballgrad.testing import ball_pairs
from ballgrad.tensor import BallTensor

pytestmark = pytest.mark.skipif(fused._numba() is None, reason="numba not installed or BALLGRAD_FUSED=0")

OPS = {"add": torch.add, "sub": torch.sub, "rsub": torch.rsub}


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
