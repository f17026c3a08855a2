"""ballify/unballify and the module workflow: parameters, gradients, accumulation, state dicts, saving."""

import copy
import io
from fractions import Fraction

import pytest
import torch
from torch import nn

import ballgrad as bg
from ballgrad.tensor import BallTensor
from helpers import assert_same_bits


class Affine(nn.Module):
    """y = w * x + b (elementwise), small enough for exact gradients by hand."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.tensor([0.3, -0.2, 1.5]))
        self.b = nn.Parameter(torch.tensor([0.1, 0.0, -0.7]))
        self.register_buffer("scale", torch.tensor(2.0))

    def forward(self, x):
        y = self.w * x + self.b
        return (y * y).sum() * self.scale


def _exact_grads(model, x):
    """d/dw and d/db of scale * sum (w x + b)^2, in exact rationals from the midpoints."""
    s = Fraction(float(model.scale))
    gw, gb = [], []
    for w, b, xi in zip(model.w.mid.tolist(), model.b.mid.tolist(), x.tolist()):
        w, b, xi = Fraction(w), Fraction(b), Fraction(xi)
        y = w * xi + b
        gw.append(2 * s * y * xi)
        gb.append(2 * s * y)
    return gw, gb


def test_ballify_parameters_are_ball_parameters():
    m = bg.ballify(Affine(), 1e-6)
    for name, p in m.named_parameters():
        assert isinstance(p, nn.Parameter) and isinstance(p, BallTensor), name
        assert float(p.rad.max()) >= 1e-6
    assert bg.is_ballified(m)
    assert not isinstance(m.scale, BallTensor)


def test_radius_specs():
    m = bg.ballify(Affine(), {"w": 0.5})
    assert float(m.w.rad.max()) == 0.5 and float(m.b.rad.max()) == 0
    m = bg.ballify(Affine(), lambda name, p: 1e-3 if name == "b" else 0.0)
    assert float(m.b.rad.max()) >= 1e-3 and float(m.w.rad.max()) == 0
    m = bg.ballify(Affine(), lambda p: p.detach().abs() * 2**-20)
    assert torch.equal(m.w.rad, (m.w.mid.abs() * 2**-20))
    m = bg.ballify(Affine(), buffers=True)
    assert isinstance(m.scale, BallTensor)
    with pytest.raises(ValueError):
        bg.ballify(Affine(), -1.0)


def test_gradients_are_balls_with_identical_midpoints_and_contain_exact():
    x = torch.tensor([1.0, 2.0, -3.0])
    plain = Affine()
    ref = plain(x)
    ref.backward()
    m = bg.ballify(Affine())
    loss = m(x)
    assert isinstance(loss, BallTensor)
    assert_same_bits(loss.mid, ref.detach())
    loss.backward()
    assert isinstance(m.w.grad, BallTensor) and isinstance(m.b.grad, BallTensor)
    assert_same_bits(m.w.grad.mid, plain.w.grad)
    assert_same_bits(m.b.grad.mid, plain.b.grad)
    gw, gb = _exact_grads(m, x)
    bg.testing.assert_contains(m.w.grad, gw, what="gradient")
    bg.testing.assert_contains(m.b.grad, gb, what="gradient")


def test_gradient_accumulation_zero_grad_and_autograd_grad():
    x = torch.tensor([1.0, 2.0, -3.0])
    m = bg.ballify(Affine())
    m(x).backward()
    m(x).backward()
    gw, gb = _exact_grads(m, x)
    bg.testing.assert_contains(m.w.grad, [2 * g for g in gw])
    plain = Affine()
    plain(x).backward()
    plain(x).backward()
    assert_same_bits(m.w.grad.mid, plain.w.grad)
    m.zero_grad()
    assert m.w.grad is None
    gw_ball, gb_ball = torch.autograd.grad(m(x), [m.w, m.b])
    assert isinstance(gw_ball, BallTensor)
    bg.testing.assert_contains(gw_ball, gw)


def test_plain_gradient_leak_is_detected():
    m = bg.ballify(nn.Linear(2, 2, bias=True))
    out = m.bias * 1.0 + 0.0
    with pytest.raises(bg.PlainGradientError, match="bias"):
        (m.bias + torch.zeros(2)).backward(torch.ones(2))


def test_state_dict_deepcopy_save_load_unballify(tmp_path):
    m = bg.ballify(Affine(), 1e-5)
    sd = m.state_dict()
    assert isinstance(sd["w"], BallTensor)
    m2 = bg.ballify(Affine())
    m2.load_state_dict(sd)
    assert torch.equal(m2.w.rad, m.w.rad)
    m3 = copy.deepcopy(m)
    assert isinstance(m3.w, nn.Parameter) and torch.equal(m3.w.rad, m.w.rad)
    path = tmp_path / "m.pt"
    torch.save(m.state_dict(), path)
    loaded = torch.load(path, weights_only=True)
    assert torch.equal(loaded["w"].rad, m.w.rad)
    whole = io.BytesIO()
    torch.save(m, whole)
    whole.seek(0)
    m4 = torch.load(whole, weights_only=False)
    assert isinstance(m4.w, BallTensor)
    bg.unballify(m)
    assert not isinstance(m.w, BallTensor) and isinstance(m.w, nn.Parameter)
    assert torch.equal(m.w, m3.w.mid)


def test_to_dtype_on_ballified_module():
    m = bg.ballify(Affine(), 1e-6).to(torch.float64)
    assert m.w.dtype == torch.float64 and isinstance(m.w, BallTensor) and m.w.rad.dtype == torch.float64
    m16 = bg.ballify(Affine(), 1e-6).to(torch.float16)
    assert m16.w.dtype == torch.float16 and m16.w.rad.dtype == torch.float32
    # the ball holds the float32 parameter values it was made from (the conversion widened the radius)
    assert bool(m16.w.contains(torch.tensor([0.3, -0.2, 1.5])).all())
