"""Every op of PyTorch's ``op_db`` with float32/float64 samples, run on balls (issue 5; ``verification/opinfo.py``).

Per op: every sample either runs under ballgrad with midpoints bit-identical to the plain op, floating outputs that
are balls, and containment against the strongest reference available (mpmath for elementwise ops, the exact oracle
for what it can evaluate, the float64 reference -- weaker -- otherwise), forward and backward; or raises
``UnsupportedOpError`` naming the aten overload. Any other exception under ballgrad, a midpoint difference or a
containment failure fails the op's test.

The default run takes two seeded samples per op and dtype (plus one small-radius run per op); ``-m slow`` runs every
sample of every op.
"""

from __future__ import annotations

import pytest

pytest.importorskip("expecttest", reason="op_db needs expecttest (a dev dependency)")

from verification import opinfo  # noqa: E402

FLOAT_OPS = opinfo.float_ops()
NAMES = [opinfo.op_name(op) for op in FLOAT_OPS]

# The coverage floor this suite holds ballgrad to (supported ops / ops with a floating tensor argument). Raise it as
# rules land; never lower it to make a run pass.
COVERAGE_FLOOR = 0.75


def _assert_contract(res: opinfo.OpResult):
    assert not res.failures, "\n".join(f"{kind}: {detail}" for kind, detail in res.failures[:5])
    assert res.status in ("supported", "partial", "unsupported", "n/a"), res
    if res.status in ("partial", "unsupported"):
        assert res.unsupported_ops, f"{res.name}: UnsupportedOpError without an aten overload name"
        assert all("aten" in name or "." in name for name in res.unsupported_ops), res.unsupported_ops


_RESULTS: dict[str, opinfo.OpResult] = {}


def _sampled(op) -> opinfo.OpResult:
    name = opinfo.op_name(op)
    if name not in _RESULTS:
        _RESULTS[name] = opinfo.check_op(op, samples_per_dtype=2, seed=0)
    return _RESULTS[name]


@pytest.mark.parametrize("op", FLOAT_OPS, ids=NAMES)
def test_op_sampled(op):
    _assert_contract(_sampled(op))


@pytest.mark.slow
@pytest.mark.parametrize("op", FLOAT_OPS, ids=NAMES)
def test_op_exhaustive(op):
    _assert_contract(opinfo.check_op(op, samples_per_dtype=None, seed=0, radius_samples=3))


def test_coverage_floor():
    """The share of op_db's floating-point ops (with a floating tensor argument) that are fully supported, from the
    sampled per-op runs (computed here when this test runs alone)."""
    results = [_sampled(op) for op in FLOAT_OPS]
    summary = opinfo.summarize(results)
    assert summary["supported_share"] >= COVERAGE_FLOOR, (
        f"{summary['supported']}/{summary['applicable']} supported; unsupported: "
        f"{summary['by_status']['unsupported']}"
    )
    assert not summary["by_status"]["error"], summary["by_status"]["error"]


def test_wrapping_keeps_midpoints_and_marks_radius():
    import torch

    import ballgrad

    t = torch.tensor([1.0, -2.0, float("nan")], requires_grad=True)
    point = opinfo.wrap(t, False)
    assert isinstance(point, ballgrad.BallTensor) and point.requires_grad
    assert opinfo.same_bits(point.mid, t.detach())
    assert bool((point.rad[:2] == 0).all()) and bool(torch.isinf(point.rad[2]))
    wide = opinfo.wrap([t, 3], True)
    assert wide[1] == 3 and bool((wide[0].rad[:2] > 0).all())


def test_harness_catches_a_wrong_radius():
    """A negative control: a containment check must fail for a ball that does not contain the exact value."""
    import torch

    import ballgrad

    bad = ballgrad.ball(torch.tensor([1.0], dtype=torch.float64), 2.0**-60)
    ref = opinfo.ELEMENTWISE["exp"]
    failure = opinfo._check_against([bad], [lambda i: ref(__import__("mpmath").mpf(2.0**-50))])
    assert failure is not None and "not in" in failure
