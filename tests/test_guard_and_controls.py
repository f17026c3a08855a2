"""The numerics guard refuses broken settings, and the containment suite catches a too-small radius."""

import pytest
import torch
from hypothesis import given, settings
from fractions import Fraction

import ballgrad as bg
from ballgrad import guard
from ballgrad.ops import registry
from ballgrad.testing import ball_pairs
from helpers import check_rule

aten = torch.ops.aten


FTZ_SCRIPT = """
import torch, ballgrad as bg
if not torch.set_flush_denormal(True):
    print("SKIP"); raise SystemExit(0)
try:
    bg.ball(torch.ones(2)) + 1.0
except bg.NumericsGuardError as e:
    print("REFUSED:", e)
"""


def test_flush_to_zero_is_refused_with_the_fix_named():
    """In a subprocess: FTZ leaks into intra-op worker threads created while it is on, and stays there."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", FTZ_SCRIPT], capture_output=True, text=True, timeout=120).stdout
    if out.startswith("SKIP"):
        pytest.skip("this CPU cannot flush denormals")
    assert out.startswith("REFUSED:") and "set_flush_denormal(False)" in out, out


def test_reduced_precision_matmul_is_refused():
    old = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("medium")
        with pytest.raises(bg.NumericsGuardError, match="highest"):
            bg.check_numerics()
    finally:
        torch.set_float32_matmul_precision(old)
    bg.check_numerics()


def test_mkldnn_reduced_precision_is_refused():
    mk = torch.backends.mkldnn.matmul
    if not hasattr(mk, "fp32_precision"):
        pytest.skip("no mkldnn fp32_precision setting in this torch")
    old = mk.fp32_precision
    try:
        mk.fp32_precision = "bf16"
        with pytest.raises(bg.NumericsGuardError, match="ieee"):
            bg.check_numerics()
    finally:
        mk.fp32_precision = old


def _shrunk(rule, ulps):
    """A copy of ``rule`` whose radius is smaller by ``ulps`` units in the last place."""

    def shrunk_rule(func, *args, **kwargs):
        out = rule(func, *args, **kwargs)
        rad = out.rad
        for _ in range(ulps):
            rad = torch.nextafter(rad, torch.zeros_like(rad))
        return bg.BallTensor(out.mid, rad)

    return shrunk_rule


@pytest.mark.parametrize("op, aten_op, exact", [
    (torch.add, aten.add.Tensor, lambda x, y: x + y),
    (torch.mul, aten.mul.Tensor, lambda x, y: x * y),
    (torch.sub, aten.sub.Tensor, lambda x, y: x - y),
])
def test_negative_control_shrunk_radius_is_caught(monkeypatch, op, aten_op, exact):
    """Shrink one rule's radius by 4 ulps: the same hypothesis containment test must now fail."""
    monkeypatch.setitem(registry.RULES, aten_op, _shrunk(registry.RULES[aten_op], 4))

    @settings(max_examples=200, database=None, report_multiple_bugs=False)
    @given(ball_pairs(torch.float32, (3,), allow_nonfinite=False))
    def suite(pair):
        check_rule(op, pair, exact)

    with pytest.raises(AssertionError):
        suite()


def test_negative_control_on_a_hand_picked_tight_case(monkeypatch):
    """1 ± 0.5 plus 1 ± 0.5: the exact sum 3 sits at distance 1 = ra + rb; 8 ulps less excludes it (the bound
    carries the midpoint's rounding term u|m| and the inflation of its own evaluation, about 5 ulps here)."""
    x = bg.ball(torch.tensor([1.0]), 0.5)
    check_rule(torch.add, [x, x], lambda a, b: a + b)
    monkeypatch.setitem(registry.RULES, aten.add.Tensor, _shrunk(registry.RULES[aten.add.Tensor], 8))
    with pytest.raises(AssertionError):
        check_rule(torch.add, [x, x], lambda a, b: a + b)
