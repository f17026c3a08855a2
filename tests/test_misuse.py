"""Misuse: what a user may do to a BallTensor that the rules were not written for, and what ballgrad does."""

from __future__ import annotations

import io
import math
import pickle
import subprocess
import sys
import threading
from fractions import Fraction

import pytest
import torch
from torch import nn

import ballgrad as bg
from ballgrad import guard
from ballgrad.testing import contains_exact
from helpers import assert_same_bits, assert_valid_radius


def _ball(vals, rad=0.0, dtype=torch.float32):
    return bg.ball(torch.tensor(vals, dtype=torch.float64).to(dtype), rad)


def _contained(out: bg.BallTensor, exact_values):
    for m, r, e in zip(out.mid.double().reshape(-1).tolist(), out.rad.double().reshape(-1).tolist(), exact_values):
        assert contains_exact(m, r, e), (m, r, e)


# ----------------------------------------------------------------------------------------------------------------------
# Mixed dtypes


@pytest.mark.parametrize("plain_dtype", [torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32,
                                         torch.bool])
@pytest.mark.parametrize("ball_dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_mixing_balls_with_plain_tensors_of_other_dtypes(ball_dtype, plain_dtype):
    b = _ball([0.1, -3.0, 7.5], 2.0 ** -12, ball_dtype)
    p = torch.tensor([3, 1, 0]).to(plain_dtype)
    for op, exact in ((torch.add, lambda x, y: x + y), (torch.mul, lambda x, y: x * y),
                      (torch.sub, lambda x, y: y - x)):
        args = (b, p) if op is not torch.sub else (p, b)
        try:
            ref = op(*(a.mid if isinstance(a, bg.BallTensor) else a for a in args))
        except RuntimeError as exc:  # PyTorch refuses (bool - tensor): so does the ball, with PyTorch's message
            with pytest.raises(RuntimeError, match=str(exc)[:20]):
                op(*args)
            continue
        out = op(*args)
        assert isinstance(out, bg.BallTensor)
        assert_same_bits(out.mid, ref)  # PyTorch's type promotion, bit for bit
        assert_valid_radius(out)
        for sign in (-1, 0, 1):
            pts = [Fraction(m) + sign * Fraction(r) for m, r in zip(b.mid.double().tolist(), b.rad.double().tolist())]
            ys = [Fraction(v) for v in p.double().tolist()]
            _contained(out, [exact(x, y) for x, y in zip(pts, ys)])


def test_python_scalars_that_a_float32_ball_cannot_hold_are_covered():
    b = _ball([1.0, 2.0])
    out = b * 0.1  # 0.1 as a double is not a float32: the product's radius must cover the exact 0.1 (double)
    _contained(out, [Fraction(1) * Fraction(0.1), Fraction(2) * Fraction(0.1)])


# ----------------------------------------------------------------------------------------------------------------------
# In-place ops on views of balls


def test_inplace_on_a_view_updates_mid_and_rad_of_the_base():
    base = _ball([1.0, 2.0, 3.0, 4.0], 0.0, torch.float64)
    plain = base.mid.clone()
    v = base[1:3]
    v.mul_(3.0).add_(_ball([0.5, 0.5], 0.25, torch.float64))
    plain[1:3].mul_(3.0).add_(torch.tensor([0.5, 0.5], dtype=torch.float64))
    assert_same_bits(base.mid, plain)
    # the radius of the base saw the update through the view: exactly where the view is
    assert base.rad[0] == 0 and base.rad[3] == 0
    assert bool((base.rad[1:3] >= 0.25).all())
    # and the view still aliases its base (mid and rad alike)
    base[1:2].zero_()
    assert float(v.mid[0]) == 0.0 and float(v.rad[0]) == 0.0


def test_inplace_through_transposed_and_strided_views():
    base = bg.ball(torch.arange(6, dtype=torch.float64).reshape(2, 3), 0.0)
    plain = base.mid.clone()
    base.t()[::2].add_(1.0)  # rows 0 and 2 of the transpose = columns 0 and 2 of base
    plain.t()[::2].add_(1.0)
    assert_same_bits(base.mid, plain)
    assert torch.equal(base.rad[:, 1], torch.zeros(2, dtype=torch.float64))
    _contained(base, [Fraction(v) for v in plain.reshape(-1).tolist()])


def test_copy_into_a_view_of_a_ball_from_a_wider_ball():
    base = _ball([0.0, 0.0, 0.0], 0.0, torch.float32)
    src = bg.ball(torch.tensor([0.1, 0.2], dtype=torch.float64))
    base[:2].copy_(src)  # rounds to float32: the radius must cover the double values
    _contained(base, [Fraction(0.1), Fraction(0.2), Fraction(0)])


# ----------------------------------------------------------------------------------------------------------------------
# Grad modes


def test_no_grad_and_inference_mode_still_give_rigorous_balls():
    x = _ball([0.5, -1.5], 2.0 ** -20, torch.float64).requires_grad_(True)
    with torch.no_grad():
        y = torch.exp(x)
    assert isinstance(y, bg.BallTensor) and not y.requires_grad
    assert_same_bits(y.mid, torch.exp(x.mid))
    with torch.inference_mode():
        z = torch.exp(_ball([0.5, -1.5], 2.0 ** -20, torch.float64)) * 2
    assert isinstance(z, bg.BallTensor)
    assert_same_bits(z.mid, torch.exp(torch.tensor([0.5, -1.5], dtype=torch.float64)) * 2)
    assert bool((z.rad > 0).all())


def test_requires_grad_toggles():
    x = _ball([0.5, -1.5], 0.0, torch.float64)
    x.requires_grad_(True)
    (g,) = torch.autograd.grad(torch.tanh(x).sum(), x)
    assert isinstance(g, bg.BallTensor)
    ref = x.mid.detach().clone().requires_grad_(True)
    (gp,) = torch.autograd.grad(torch.tanh(ref).sum(), ref)
    assert_same_bits(g.mid, gp)
    x.requires_grad_(False)
    y = torch.tanh(x)
    assert not y.requires_grad and isinstance(y, bg.BallTensor)
    x.requires_grad_(True)
    y = torch.tanh(x).sum()
    y.backward()
    assert isinstance(x.grad, bg.BallTensor)
    plain = x.mid.detach().clone().requires_grad_(True)
    torch.tanh(plain).sum().backward()
    assert_same_bits(x.grad.mid, plain.grad)


# ----------------------------------------------------------------------------------------------------------------------
# Serialization


def test_pickle_round_trip_keeps_mid_rad_and_dtype():
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        b = _ball([0.1, -0.0, math.inf, 2.5], 2.0 ** -10, dtype)
        c = pickle.loads(pickle.dumps(b))
        assert isinstance(c, bg.BallTensor)
        assert_same_bits(c.mid, b.mid)
        assert torch.equal(c.rad, b.rad) and c.rad.dtype == b.rad.dtype


def test_torch_load_weights_only_of_a_ballified_state_dict():
    model = bg.ballify(nn.Sequential(nn.Linear(3, 2), nn.Tanh(), nn.Linear(2, 1)), rad=2.0 ** -16)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    buf.seek(0)
    sd = torch.load(buf, weights_only=True)
    for k, v in model.state_dict().items():
        assert isinstance(sd[k], bg.BallTensor), k
        assert_same_bits(sd[k].mid, v.mid)
        assert torch.equal(sd[k].rad, v.rad)
    fresh = bg.ballify(nn.Sequential(nn.Linear(3, 2), nn.Tanh(), nn.Linear(2, 1)))
    fresh.load_state_dict(sd)
    x = torch.randn(4, 3)
    assert_same_bits(fresh(x).mid, model(x).mid)


# ----------------------------------------------------------------------------------------------------------------------
# Threads


def test_two_threads_recording_at_once():
    results, errors = {}, []
    barrier = threading.Barrier(2)

    def work(name, make):
        try:
            with bg.record() as rec:
                barrier.wait(timeout=30)
                for _ in range(20):
                    make()
                barrier.wait(timeout=30)
            results[name] = rec
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    kink = lambda: torch.relu(_ball([0.0, 1.0], 0.5))  # noqa: E731 (straddles the kink: a kink event)
    domain = lambda: torch.log(_ball([0.0, 1.0], 0.5))  # noqa: E731 (touches 0: a domain event)
    t1 = threading.Thread(target=work, args=("kink", kink), name="ballgrad-kink")
    t2 = threading.Thread(target=work, args=("domain", domain), name="ballgrad-domain")
    t1.start(), t2.start(), t1.join(60), t2.join(60)
    assert not errors, errors
    kinds1 = {e.kind for e in results["kink"].events_of_thread("ballgrad-kink")}
    kinds2 = {e.kind for e in results["domain"].events_of_thread("ballgrad-domain")}
    assert "kink" in kinds1 and "domain" not in kinds1
    assert "domain" in kinds2 and "kink" not in kinds2


# ----------------------------------------------------------------------------------------------------------------------
# Narrow midpoints


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_and_bfloat16_midpoints_have_float32_radii(dtype):
    x = _ball([0.1, -2.0, 300.0], 2.0 ** -12, dtype)
    assert x.rad.dtype == torch.float32
    for op in (torch.exp, torch.tanh, lambda t: t * t + 1, lambda t: t.sum(), torch.relu,
               lambda t: torch.softmax(t, 0), lambda t: t @ t):
        out = op(x)
        assert out.mid.dtype == dtype and out.rad.dtype == torch.float32
        assert_same_bits(out.mid, op(x.mid))
        assert_valid_radius(out)


# ----------------------------------------------------------------------------------------------------------------------
# Numerics guard


FTZ_WORKERS = """
import torch, ballgrad as bg
torch.set_num_threads(4)
if not torch.set_flush_denormal(True):
    print("SKIP"); raise SystemExit(0)
torch.ones(1 << 20).mul(2.0).sum()  # intra-op worker threads start now, with FTZ on
torch.set_flush_denormal(False)     # switched off again on the main thread only
try:
    bg.ball(torch.ones(2)) + 1.0
    print("RAN")
except bg.NumericsGuardError as e:
    print("REFUSED:", e)
"""


def test_flush_to_zero_inherited_by_worker_threads_is_refused():
    out = subprocess.run([sys.executable, "-c", FTZ_WORKERS], capture_output=True, text=True, timeout=300)
    if out.stdout.startswith("SKIP"):
        pytest.skip("this CPU cannot flush denormals")
    if out.stdout.startswith("RAN"):
        # with a single intra-op thread (or workers created later), the main thread's flag is all there is
        pytest.skip(f"no worker thread kept FTZ here: {out.stdout.strip()}")
    assert out.stdout.startswith("REFUSED:") and "set_flush_denormal(False)" in out.stdout, out


def test_lowered_mkldnn_precision_refuses_the_first_ball_op_with_the_fix():
    mk = torch.backends.mkldnn.matmul
    if not hasattr(mk, "fp32_precision"):
        pytest.skip("no mkldnn fp32_precision setting in this torch")
    old = mk.fp32_precision
    try:
        mk.fp32_precision = "bf16"
        guard.reset()
        with pytest.raises(bg.NumericsGuardError, match="fp32_precision = 'ieee'"):
            _ball([1.0, 2.0]) @ _ball([3.0, 4.0])
    finally:
        mk.fp32_precision = old
        guard.reset()
    _ball([1.0, 2.0]) @ _ball([3.0, 4.0])


# ----------------------------------------------------------------------------------------------------------------------
# Ops without rules


@pytest.mark.parametrize("call", [
    lambda x: torch.linalg.svd(x.reshape(2, 2)),
    lambda x: torch.special.zeta(x, 2.0),
    lambda x: torch.special.bessel_j0(x),
    lambda x: torch.fft.rfft(x),
], ids=["svd", "zeta", "bessel_j0", "rfft"])
def test_op_without_a_rule_raises_naming_it(call):
    x = _ball([0.5, 1.5, 2.5, 3.5], 0.0, torch.float64)
    try:
        out = call(x)
    except bg.UnsupportedOpError as exc:
        msg = str(exc)
        assert "aten." in msg or "aten::" in msg, msg
        assert exc.op_name in msg
        assert "rule" in msg  # the hint: add a rule, or convert to a plain tensor on purpose
        return
    # a rule (or an audited decomposition) exists: then the answer must be a ball, never a plain midpoint
    outs = out if isinstance(out, tuple) else (out,)
    assert all(isinstance(o, bg.BallTensor) for o in outs if isinstance(o, torch.Tensor) and o.is_floating_point())


def test_nothing_runs_on_midpoints_alone():
    """Every floating output of an op on balls is a ball; unregistered ops raise instead of returning plain
    tensors computed from the midpoints."""
    from ballgrad.ops import registry

    x = _ball([0.5, 1.5], 0.0, torch.float64)
    fake = torch.library.Library("ballgrad_misuse", "DEF")
    fake.define("twice(Tensor x) -> Tensor")
    fake.impl("twice", lambda t: t * 2, "CompositeExplicitAutograd")
    op = torch.ops.ballgrad_misuse.twice.default
    assert op not in registry.RULES
    with pytest.raises(bg.UnsupportedOpError, match="ballgrad_misuse.twice"):
        op(x)
