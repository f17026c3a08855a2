"""The BallTensor type: construction, validation, printing, containment, conversion, serialization, aliasing."""

import copy
import io
import math
import pickle
from fractions import Fraction

import mpmath
import pytest
import torch

import ballgrad as bg
from ballgrad.tensor import BallTensor
from helpers import assert_same_bits


def test_ball_exact_point_and_radius_dtype():
    x = bg.ball(torch.tensor([1.0, 2.0]))
    assert isinstance(x, BallTensor) and isinstance(x, torch.Tensor)
    assert torch.equal(x.rad, torch.zeros(2))
    assert x.shape == (2,) and x.dtype == torch.float32
    h = bg.ball(torch.tensor([1.0], dtype=torch.float16), 1e-3)
    assert h.rad.dtype == torch.float32
    assert bg.ball(torch.tensor([1.0], dtype=torch.bfloat16)).rad.dtype == torch.float32
    assert bg.ball(torch.tensor([1.0], dtype=torch.float64), 0.1).rad.dtype == torch.float64


def test_radius_rounded_up_when_narrowed():
    r = torch.tensor([0.1], dtype=torch.float64)
    x = bg.ball(torch.tensor([1.0]), r)
    assert Fraction(float(x.rad)) >= Fraction(0.1)
    # a Python float radius is an exact double: it must not round down through float32 on the way in
    for value in (1e-6, 0.1, 1 / 3):
        assert Fraction(float(bg.ball(torch.tensor([1.0]), value).rad)) >= Fraction(value)


@pytest.mark.parametrize(
    "mid, rad, error",
    [
        (torch.tensor([1, 2]), None, TypeError),
        (torch.tensor([1.0 + 1j]), None, TypeError),
        (torch.tensor([1.0]), -1.0, ValueError),
        (torch.tensor([1.0]), math.nan, ValueError),
        (torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.0, 3.0]), ValueError),
        (torch.tensor([1.0]), torch.tensor([1.0 + 0j]), TypeError),
    ],
)
def test_bad_input_is_rejected(mid, rad, error):
    with pytest.raises(error):
        bg.ball(mid, rad)


def test_device_mismatch_rejected():
    if not torch.cuda.is_available():
        meta_rad = torch.zeros(2, device="meta")
        with pytest.raises(ValueError, match="device"):
            bg.ball(torch.zeros(2), meta_rad)


def test_nonfinite_midpoint_gets_infinite_radius():
    x = bg.ball(torch.tensor([math.nan, math.inf, 1.0]), 0.0)
    assert torch.isinf(x.rad[:2]).all() and x.rad[2] == 0


def test_from_interval_contains_interval():
    lo = torch.tensor([0.1, -3.0, 1e-30], dtype=torch.float64)
    hi = torch.tensor([0.3, -2.9, 2e-30], dtype=torch.float64)
    x = bg.from_interval(lo, hi, dtype=torch.float32)
    assert x.dtype == torch.float32
    for i in range(3):
        for v in (lo[i], hi[i], (lo[i] + hi[i]) / 2):
            assert bool(x.contains(torch.tensor(float(v), dtype=torch.float64))[i])
    with pytest.raises(ValueError):
        bg.from_interval(1.0, 0.0)


def test_lower_upper_outward():
    x = bg.ball(torch.tensor([0.1]), 1e-9)
    lo, hi = float(x.lower()), float(x.upper())
    m, r = Fraction(float(x.mid)), Fraction(float(x.rad))
    assert Fraction(lo) <= m - r and Fraction(hi) >= m + r


def test_contains_is_exact_at_the_boundary():
    x = bg.ball(torch.tensor([1.0], dtype=torch.float64), 2.0 ** -60)
    edge = Fraction(1) + Fraction(2) ** -60
    assert bool(x.contains([edge]))
    assert not bool(x.contains([edge + Fraction(1, 2**200)]))
    assert bool(x.contains([mpmath.mpf(1) - mpmath.mpf(2) ** -60]))
    assert not bool(x.contains(torch.tensor([1.0 + 2.0 ** -52], dtype=torch.float64)))
    inf_ball = bg.ball(torch.tensor([0.0]), math.inf)
    assert bool(inf_ball.contains(torch.tensor([1e308], dtype=torch.float64)))
    assert not bool(bg.ball(torch.tensor([0.0])).contains(torch.tensor([math.nan])))


def test_rel_accuracy_bits():
    x = bg.ball(torch.tensor([1.0, 0.0, 1.0, 1.0]), torch.tensor([2.0 ** -20, 1.0, 0.0, math.inf]))
    bits = x.rel_accuracy_bits()
    assert bits[0] == 20 and bits[1] == -math.inf and bits[2] == math.inf and bits[3] == -math.inf


def test_repr_is_readable():
    assert repr(bg.ball(torch.tensor(1.25), 3e-8)) == "BallTensor(1.2500000 ± 3.0e-08)"
    s = repr(bg.ball(torch.arange(100.0), 1e-3))
    assert "shape=(100,)" in s and "max rad" in s
    assert "dtype=torch.float64" in repr(bg.ball(torch.tensor([1.0], dtype=torch.float64)))


def test_detach_clone_keep_balls():
    x = bg.ball(torch.tensor([1.0, 2.0]), 0.5)
    for y in (x.detach(), x.clone(), x.contiguous()):
        assert isinstance(y, BallTensor)
        assert torch.equal(y.mid, x.mid) and torch.equal(y.rad, x.rad)


def test_to_dtype_narrowing_widens_radius():
    x = bg.ball(torch.tensor([0.1, 1 / 3], dtype=torch.float64), 1e-12)
    y = x.to(torch.float32)
    assert y.dtype == torch.float32
    assert_same_bits(y.mid, x.mid.to(torch.float32))
    exact = [Fraction(0.1) + Fraction(1, 10**12), Fraction(1 / 3) - Fraction(1, 10**12)]
    assert bool(y.contains(exact).all())
    h = x.to(torch.float16)
    assert h.rad.dtype == torch.float32 and bool(h.contains([Fraction(0.1), Fraction(1 / 3)]).all())
    w = y.double()
    assert torch.equal(w.rad, y.rad.double())
    # to an integer dtype: a plain tensor where truncation is decided over the whole ball, else refused
    assert torch.equal(x.to(torch.int64), torch.tensor([0, 0]))
    with pytest.raises(bg.UndecidedComparisonError):
        bg.ball(torch.tensor([2.5, 3.0]), 0.6).to(torch.int64)


def test_save_load_weights_only_and_pickle_and_deepcopy(tmp_path):
    x = bg.ball(torch.tensor([1.0, -2.0]), torch.tensor([0.0, 1e-3]))
    path = tmp_path / "x.pt"
    torch.save({"w": x}, path)
    y = torch.load(path, weights_only=True)["w"]
    assert isinstance(y, BallTensor) and torch.equal(y.mid, x.mid) and torch.equal(y.rad, x.rad)
    z = pickle.loads(pickle.dumps(x))
    assert torch.equal(z.rad, x.rad)
    d = copy.deepcopy(x)
    assert torch.equal(d.mid, x.mid) and d.mid.data_ptr() != x.mid.data_ptr()
    buf = io.BytesIO()
    p = torch.nn.Parameter(x)
    torch.save(p, buf)
    buf.seek(0)
    q = torch.load(buf, weights_only=True)
    assert isinstance(q, torch.nn.Parameter) and isinstance(q, BallTensor) and q.requires_grad


def test_views_alias_mid_and_rad():
    x = bg.ball(torch.zeros(2, 3), 0.0)
    row = x[1]
    row.add_(1.0)
    col = x.t()[2]
    col.mul_(bg.ball(torch.tensor(2.0), 0.25))
    assert torch.equal(x.mid, torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 2.0]]))
    assert x.rad[0, 2] < 1e-36 and x.rad[1, 2] >= 0.25 and x.rad[1, 0] <= 2 ** -23 and x.rad[0, 0] == 0


def test_copy_into_ball_and_refuse_into_plain():
    x = bg.ball(torch.zeros(3), 1.0)
    x.copy_(torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64))
    assert bool(x.contains(torch.tensor([0.1, 0.2, 0.3], dtype=torch.float64)).all())
    assert_same_bits(x.mid, torch.tensor([0.1, 0.2, 0.3]))
    plain = torch.zeros(3)
    with pytest.raises(TypeError, match="drop its radius"):
        plain.copy_(x)


def test_inplace_on_plain_with_ball_refused():
    with pytest.raises(TypeError, match="radius"):
        torch.zeros(2).add_(bg.ball(torch.ones(2)))


def test_unsupported_op_names_overload_and_hint():
    x = bg.ball(torch.eye(2) * 2)  # torch.cholesky itself is gone from PyTorch 2.15: its successor's aten overload
    with pytest.raises(bg.UnsupportedOpError, match=r"aten\.linalg_cholesky_ex\.default") as info:
        torch.linalg.cholesky(x)
    assert "src/ballgrad/ops" in str(info.value)


def test_item_and_bool():
    x = bg.ball(torch.tensor(2.0), 0.5)
    assert x.item() == 2.0
    assert bool(x)
    with pytest.raises(bg.UndecidedComparisonError):
        bool(bg.ball(torch.tensor(0.1), 0.5))


def test_parameter_and_module_state_dict():
    lin = torch.nn.Linear(2, 2)
    lin.weight = torch.nn.Parameter(bg.ball(lin.weight.detach(), 1e-6))
    sd = lin.state_dict()
    assert isinstance(sd["weight"], BallTensor)
    lin2 = torch.nn.Linear(2, 2)
    lin2.weight = torch.nn.Parameter(bg.ball(torch.zeros(2, 2)))
    lin2.load_state_dict(sd)
    assert torch.equal(lin2.weight.mid, lin.weight.mid) and torch.equal(lin2.weight.rad, lin.weight.rad)


def test_python_numbers_are_exact_doubles():
    """ball(0.1) means the real number 0.1's double; a float32 ball's radius covers the rounding to float32."""
    x = bg.ball([0.1, 1.0])
    assert x.dtype == torch.float32
    assert bool(x.contains([Fraction(0.1), Fraction(1)]).all())
    assert x.rad[1] == 0
    y = bg.from_interval(0.1, 0.2)
    assert bool(y.contains([Fraction(0.1)])) and bool(y.contains([Fraction(0.2)]))


def test_exact_conversion_keeps_the_sign_of_mpmath_values():
    """Regression: mpf.man_exp drops the sign; -0.75 must not be read as 0.75."""
    from ballgrad.testing import exact

    assert exact(mpmath.mpf(-0.75)) == Fraction(-3, 4)
    assert exact(mpmath.mpf("-1e-30")) < 0
    assert not bool(bg.ball(torch.tensor([0.75])).contains([mpmath.mpf(-0.75)]))
    assert bool(bg.ball(torch.tensor([-0.75])).contains([mpmath.mpf(-0.75)]))
