"""Shape, view and indexing rules are exact: (f(mid), f(rad)), with mid bit-identical and views aliased."""

import pytest
import torch
from hypothesis import given, settings

import ballgrad as bg
from ballgrad.testing import balls
from helpers import ALL_DTYPES, EXAMPLES, assert_same_bits

IDX = torch.tensor([2, 0, 2])

SHAPE_OPS = {
    "view": lambda x: x.view(4, 3),
    "reshape": lambda x: x.reshape(2, 6),
    "t": lambda x: x.t(),
    "transpose": lambda x: x.transpose(0, 1),
    "permute": lambda x: x.unsqueeze(0).permute(2, 0, 1),
    "expand": lambda x: x.unsqueeze(0).expand(2, 3, 4),
    "squeeze": lambda x: x.unsqueeze(1).squeeze(1),
    "squeeze_all": lambda x: x.unsqueeze(0).squeeze(),
    "unsqueeze": lambda x: x.unsqueeze(-1),
    "select": lambda x: x[1],
    "slice": lambda x: x[:, 1:3],
    "step_slice": lambda x: x[::2, ::3],
    "narrow": lambda x: x.narrow(1, 1, 2),
    "cat": lambda x: torch.cat([x, x.flip(0)], 0),
    "stack": lambda x: torch.stack([x, x], 1),
    "split": lambda x: torch.split(x, [1, 3], dim=1)[1],
    "chunk": lambda x: x.chunk(2, dim=1)[0],
    "unbind": lambda x: x.unbind(1)[2],
    "clone": lambda x: x.clone(),
    "contiguous": lambda x: x.t().contiguous(),
    "flip": lambda x: x.flip(0),
    "roll": lambda x: x.roll(1, 1),
    "repeat": lambda x: x.repeat(2, 1),
    "index_select": lambda x: x.index_select(0, IDX),
    "gather": lambda x: x.gather(1, torch.tensor([[0, 3], [1, 1], [2, 0]])),
    "advanced_index": lambda x: x[IDX, 1:],
    "bool_mask": lambda x: x[torch.tensor([True, False, True])],
    "flatten": lambda x: x.flatten(),
    "unflatten": lambda x: x.unflatten(1, (2, 2)),
    "movedim": lambda x: x.movedim(0, 1),
    "diagonal": lambda x: x.diagonal(),
    "pad": lambda x: torch.nn.functional.pad(x, (1, 2)),
    "unfold": lambda x: x.unfold(1, 2, 1),
}


@pytest.mark.parametrize("examples", EXAMPLES)
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("name", sorted(SHAPE_OPS))
def test_shape_op_is_exact(name, dtype, examples):
    op = SHAPE_OPS[name]

    @settings(max_examples=max(3, examples // 5))
    @given(balls(dtype, (3, 4)))
    def run(x):
        out = op(x)
        assert isinstance(out, bg.BallTensor)
        assert_same_bits(out.mid, op(x.mid))
        assert torch.equal(out.rad, op(x.rad))

    run()


def test_mixed_cat_promotes_exactly():
    x = bg.ball(torch.tensor([1.0], dtype=torch.float16), 1e-3)
    y = torch.tensor([0.1], dtype=torch.float64)
    out = torch.cat([x, y])
    assert out.dtype == torch.float64 and out.rad.dtype == torch.float64
    assert out.rad[1] == 0 and out.rad[0] == x.rad[0].double()


def test_backward_of_indexing_is_exact():
    x = bg.ball(torch.randn(3, 4), 0.01).requires_grad_()
    y = x[1:, ::2].sum() if False else (x[1:, ::2] * 1.0)
    g = bg.ball(torch.ones(2, 2), 0.5)
    (grad,) = torch.autograd.grad(y, x, g)
    assert isinstance(grad, bg.BallTensor)
    expected = torch.zeros(3, 4)
    expected[1:, ::2] = 1.0
    assert_same_bits(grad.mid, expected)


def test_undecided_mask_cannot_index():
    x = bg.ball(torch.tensor([1.0, 2.0]))
    mask = bg.BallTensor(torch.tensor([True, False]), torch.tensor([True, False]))
    with pytest.raises(bg.UndecidedComparisonError):
        x[mask]


def test_as_strided_on_view_uses_rad_offset():
    x = bg.ball(torch.arange(12.0), torch.arange(12.0) / 100)
    v = x[3:]
    out = torch.as_strided(v, (2, 2), (1, 2), 5)
    assert torch.equal(out.mid, torch.as_strided(v.mid, (2, 2), (1, 2), 5))
    assert torch.equal(out.rad, out.mid / 100)


def test_zeros_ones_full_empty_like():
    x = bg.ball(torch.ones(3), 0.1)
    assert torch.equal(torch.zeros_like(x).rad, torch.zeros(3))
    assert torch.equal(torch.ones_like(x).mid, torch.ones(3))
    f = torch.full_like(x, 0.1)
    assert bool(f.contains([__import__("fractions").Fraction(1, 10)] * 3).all())
    assert bool(torch.isinf(torch.empty_like(x).rad).all())
    z = torch.empty_like(x)
    z.copy_(torch.ones(3))
    assert torch.equal(z.rad, torch.zeros(3))


def test_inplace_view_ops_update_wrapper_mid_and_rad():
    x = bg.ball(torch.randn(3, 1, 2), torch.rand(3, 1, 2))
    m, r = x.mid.clone(), x.rad.clone()
    x.squeeze_(1)
    assert x.shape == (3, 2) and torch.equal(x.mid, m.squeeze(1)) and torch.equal(x.rad, r.squeeze(1))
    x.t_()
    assert x.shape == (2, 3) and x.stride() == x.mid.stride() and torch.equal(x.rad, r.squeeze(1).t())
    x.unsqueeze_(0)
    assert x.shape == (1, 2, 3) and torch.equal((x * 1.0).mid, m.squeeze(1).t().unsqueeze(0))


def test_linear_with_1d_input_uses_squeeze_():
    w = bg.ball(torch.randn(3, 4), 0.01).requires_grad_()
    x = torch.randn(4)
    y = torch.nn.functional.linear(x, w)
    assert_same_bits(y.mid, torch.nn.functional.linear(x, w.mid))
    y.sum().backward()
    assert isinstance(w.grad, bg.BallTensor) and w.grad.shape == (3, 4)


def test_view_methods_are_their_aten_ops():
    """``structural`` calls the commonest views as Tensor methods (``_AS_METHOD``): each gives what its aten overload
    gives on the same arguments (shape, strides, offset, values, aliasing), and a ball's view is the pair of them."""
    from ballgrad.ops import shape

    aten = torch.ops.aten
    x = torch.randn(2, 3, 4)
    cases = {aten.view.default: ([6, 4],), aten.reshape.default: ([4, 6],), aten.t.default: None,
             aten.transpose.int: (0, 2), aten.permute.default: ([2, 0, 1],), aten.unsqueeze.default: (1,),
             aten.squeeze.dim: (0,), aten.select.int: (1, 2), aten.clone.default: (), aten.detach.default: ()}
    assert set(cases) == set(shape._AS_METHOD)
    for op, args in cases.items():
        base = x[0] if op is aten.t.default else x
        args = () if args is None else args
        kwargs = {"memory_format": torch.contiguous_format} if op is aten.clone.default else {}
        want, got = op(base, *args, **kwargs), shape._AS_METHOD[op](base, *args, **kwargs)
        assert (got.shape, got.stride(), got.storage_offset()) == (want.shape, want.stride(), want.storage_offset())
        assert torch.equal(got, want) and (got.data_ptr() == base.data_ptr()) == (want.data_ptr() == base.data_ptr())
        b = bg.ball(base, base.abs() * 2.0**-10)
        out = op(b, *args, **kwargs)
        assert torch.equal(out.mid, want) and torch.equal(out.rad, op(b.rad, *args, **kwargs))
