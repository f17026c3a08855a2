"""The verification oracle (DESIGN.md §7) and whole-model checks.

1. The oracle agrees with closed forms to >= 200 bits and with float64 PyTorch on every zoo architecture.
2. Negative controls: a radius shrunk below the true error is reported, with the element named.
3. ``ballgrad verify --json`` writes machine-readable results.
4. ``check_model`` passes on models whose ops have ballgrad rules (zoo models skip, naming the missing op, until
   their rules land).
"""

from __future__ import annotations

import json
import math
from fractions import Fraction
from pathlib import Path

import mpmath
import numpy as np
import pytest
import torch
from torch import nn
from torch.fx.experimental.proxy_tensor import make_fx

import ballgrad as bg
from verification import Oracle, OracleUnsupportedOp, check_model, check_tensor, exact_training_step, zoo
from verification.check import Report
from verification.dyadic import Dyadic, matmul

aten = torch.ops.aten
BITS = 200


def run_oracle(fn, *args, prec=256):
    gm = make_fx(fn)(*args)
    return Oracle(prec).run(gm, *args)


def mp_of(d: Dyadic, index=()):
    """One element of an oracle tensor as an exact mpmath number."""
    return mpmath.mpf(d.fraction(index).numerator) / d.fraction(index).denominator


def agree_bits(a, b) -> float:
    """-log2 of the relative difference (inf when equal)."""
    a, b = mpmath.mpf(a), mpmath.mpf(b)
    if a == b:
        return math.inf
    return float(-mpmath.log(abs(a - b) / max(abs(a), abs(b)), 2))


def mp_tensor(t: torch.Tensor):
    return np.vectorize(lambda v: mpmath.mpf(Fraction(v).numerator) / Fraction(v).denominator, otypes=[object])(
        t.detach().double().numpy())


# ----------------------------------------------------------------------------------------------------------------------
# 1. Closed forms


def test_dyadic_round_trip_and_exact_matmul():
    x = torch.tensor([[0.1, -3.0, 2.0 ** -140], [1e30, 0.0, -0.0]], dtype=torch.float32)
    d = Dyadic.from_torch(x)
    for i in range(2):
        for j in range(3):
            assert d.fraction((i, j)) == Fraction(float(x[i, j]))
    a = torch.randn(5, 7, dtype=torch.float64)
    b = torch.randn(7, 3, dtype=torch.float64)
    c = matmul(Dyadic.from_torch(a), Dyadic.from_torch(b))
    for i in range(5):
        for j in range(3):
            assert c.fraction((i, j)) == sum(Fraction(float(a[i, k])) * Fraction(float(b[k, j])) for k in range(7))


def test_derivative_of_x_squared_is_exactly_2x():
    x = torch.tensor([0.1, -3.5, 1e-30, 7.0], dtype=torch.float32, requires_grad=True)

    def f(x):
        y = (x * x).sum()
        return y, torch.autograd.grad(y, x)[0]

    y, g = run_oracle(f, x)
    for i in range(4):
        xi = Fraction(float(x.detach()[i]))
        assert g.fraction((i,)) == 2 * xi
    assert y.fraction(()) == sum(Fraction(float(v)) ** 2 for v in x.detach())


@pytest.mark.parametrize("log", [False, True])
def test_softmax_gradients_match_the_analytic_formula(log):
    torch.manual_seed(1)
    x = (torch.randn(3, 6, dtype=torch.float64) * 4).requires_grad_(True)
    v = torch.randn(3, 6, dtype=torch.float64)

    def f(x, v):
        s = torch.log_softmax(x, 1) if log else torch.softmax(x, 1)
        y = (s * v).sum()
        return y, torch.autograd.grad(y, x)[0]

    y, g = run_oracle(f, x, v)
    with mpmath.workprec(512):
        X, V = mp_tensor(x), mp_tensor(v)
        total = mpmath.mpf(0)
        for i in range(3):
            e = [mpmath.exp(X[i, j]) for j in range(6)]
            z = mpmath.fsum(e)
            s = [ej / z for ej in e]
            if log:
                total += mpmath.fsum(mpmath.log(s[j]) * V[i, j] for j in range(6))
                want = [V[i, j] - s[j] * mpmath.fsum(V[i]) for j in range(6)]
            else:
                total += mpmath.fsum(s[j] * V[i, j] for j in range(6))
                sv = mpmath.fsum(s[j] * V[i, j] for j in range(6))
                want = [s[j] * (V[i, j] - sv) for j in range(6)]
            for j in range(6):
                assert agree_bits(mp_of(g, (i, j)), want[j]) >= BITS
        assert agree_bits(mp_of(y), total) >= BITS


def test_linear_cross_entropy_gradient_matches_hand_written_mpmath():
    torch.manual_seed(2)
    lin = nn.Linear(3, 4)
    x = torch.randn(5, 3)
    y = torch.tensor([0, 3, 1, 1, 2])
    ex = exact_training_step(lin, x, y, nn.functional.cross_entropy)
    with mpmath.workprec(512):
        W, b, X = mp_tensor(lin.weight), mp_tensor(lin.bias), mp_tensor(x)
        n = 5
        dW = [[mpmath.mpf(0)] * 3 for _ in range(4)]
        db = [mpmath.mpf(0)] * 4
        loss = mpmath.mpf(0)
        for i in range(n):
            z = [mpmath.fsum(W[c, k] * X[i, k] for k in range(3)) + b[c] for c in range(4)]
            e = [mpmath.exp(t) for t in z]
            p = [t / mpmath.fsum(e) for t in e]
            loss -= mpmath.log(p[int(y[i])]) / n
            for c in range(4):
                d = (p[c] - (1 if c == int(y[i]) else 0)) / n
                db[c] += d
                for k in range(3):
                    dW[c][k] += d * X[i, k]
        assert agree_bits(mp_of(ex["loss"]), loss) >= BITS
        for c in range(4):
            assert agree_bits(mp_of(ex["grad"]["bias"], (c,)), db[c]) >= BITS
            for k in range(3):
                assert agree_bits(mp_of(ex["grad"]["weight"], (c, k)), dW[c][k]) >= BITS


def _rel_max(exact: Dyadic, ref: torch.Tensor, scale: float) -> float:
    return float((exact.to_torch() - ref.detach().double()).abs().max()) / scale


@pytest.mark.parametrize("name,batch", [("mlp-small", 4), ("mlp-deep", 4), ("cnn-small", 4),
                                        ("transformer-tiny", 2)])
def test_oracle_agrees_with_float64_pytorch_on_the_zoo(name, batch):
    """Every op of every zoo architecture (conv, batch norm, max pool, layer norm, attention, ...) against float64
    PyTorch: agreement to ~1e-12 of the gradient scale rules out a wrong formula (float64 is the one inexact side)."""
    case = zoo.make(name, dtype=torch.float64, batch=batch)
    ex = exact_training_step(case.model, case.inputs, case.targets, case.loss_fn)
    model = case.model
    out = model(case.inputs)
    loss = case.loss_fn(out, case.targets)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    scale = max(float(g.abs().max()) for g in grads)
    assert _rel_max(ex["loss"], loss, float(loss.detach().abs())) < 1e-12
    assert _rel_max(ex["output"], out, float(out.detach().abs().max())) < 1e-12
    for (n, _), g in zip(model.named_parameters(), grads):
        assert _rel_max(ex["grad"][n], g, scale) < 1e-10, n


@pytest.mark.parametrize("name,batch", [("cnn-small", 2), ("transformer-tiny", 2)])
def test_oracle_at_256_and_384_bits_agree_to_200_bits(name, batch):
    """Roundings (exp, log, sqrt, division) happen at prec + 64 bits; chaining them must keep >= 200 bits."""
    case = zoo.make(name, batch=batch)
    lo = exact_training_step(case.model, case.inputs, case.targets, case.loss_fn, prec=256)
    hi = exact_training_step(case.model, case.inputs, case.targets, case.loss_fn, prec=384)
    pairs = [(lo["loss"], hi["loss"]), (lo["output"], hi["output"])] + [(lo["grad"][n], hi["grad"][n]) for n in
                                                                        lo["grad"]]
    for a, b in pairs:
        (ia, ib), _ = Dyadic.align(a, b)
        ia, ib = (np.asarray(v, dtype=object).reshape(-1) for v in (ia, ib))
        scale = max(abs(int(v)) for v in ib.flat) or 1
        worst = max(abs(int(u) - int(v)) for u, v in zip(ia.flat, ib.flat))
        assert worst == 0 or worst * 2 ** BITS <= scale


def test_conv_bias_before_batch_norm_has_exactly_zero_gradient():
    """BatchNorm removes a per-channel constant: the exact gradient of the conv bias is 0, not float noise."""
    case = zoo.make("cnn-small", batch=2)
    ex = exact_training_step(case.model, case.inputs, case.targets, case.loss_fn)
    for n in ("0.bias", "4.bias"):
        assert all(int(v) == 0 for v in ex["grad"][n].m.flat)


def test_max_pool_takes_the_first_exact_maximum_like_pytorch():
    x = torch.tensor([[[[1.0, 3.0, 3.0, 0.0], [3.0, 2.0, 0.0, 0.0], [5.0, 5.0, 1.0, 2.0], [5.0, 5.0, 2.0, 1.0]]]])

    def f(x):
        return torch.ops.aten.max_pool2d_with_indices(x, [2, 2], [2, 2])

    out, idx = run_oracle(f, x)
    want_out, want_idx = f(x)
    assert np.array_equal(idx, want_idx.numpy())
    assert np.array_equal(out.to_float64(), want_out.double().numpy())


def test_unsupported_op_is_named():
    def f(x):
        return torch.cumsum(x, 0)

    with pytest.raises(OracleUnsupportedOp, match=r"aten\.cumsum\.default"):
        run_oracle(f, torch.ones(3))


def test_oracle_shares_no_code_with_the_rules():
    root = Path(__file__).resolve().parents[1] / "verification"
    for f in ("oracle.py", "dyadic.py"):
        text = (root / f).read_text()
        assert "ballgrad" not in "\n".join(l for l in text.splitlines() if l.startswith(("import", "from"))), f


# ----------------------------------------------------------------------------------------------------------------------
# 2. Negative controls


def _forward_exact(model, x):
    """Plain float32 outputs and the oracle's exact outputs of a small MLP."""
    y = torch.zeros(x.shape[0], dtype=torch.long)
    ex = exact_training_step(model, x, y)
    return model(x).detach(), ex["output"]


def test_shrunk_radius_is_not_contained_and_the_element_is_named():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(30, 20), nn.ReLU(), nn.Linear(20, 5))
    x = torch.randn(6, 30)
    mid, exact = _forward_exact(model, x)
    err = np.abs(exact.to_float64() - mid.double().numpy())
    assert err.max() > 0
    honest = bg.ball(mid, torch.from_numpy(err * 2 + 1e-30).float())
    assert check_tensor("output", "output", honest, exact, mid).contained == mid.numel()
    # shrink the radius of the worst element below its true error
    k = np.unravel_index(int(np.argmax(err)), err.shape)
    rad = torch.from_numpy(err * 2 + 1e-30).float()
    rad[k] = float(err[k]) * 0.5
    liar = bg.ball(mid, rad)
    tc = check_tensor("output", "output", liar, exact, mid)
    assert tc.contained == tc.checked - 1
    assert tc.worst.tensor == "output" and tc.worst.index == [int(i) for i in k]
    assert tc.worst.mid == float(mid[k]) and tc.worst.rad == float(rad[k])
    assert 1.5 < tc.worst.excess < 2.5
    # ballgrad's own exact containment agrees on that element
    assert not bool(liar.contains(np.array([[mp_of(exact, (i, j)) for j in range(5)] for i in range(6)],
                                           dtype=object))[k])
    report = Report("mlp", "float32", 0, status="fail", tensors=[tc])
    with pytest.raises(AssertionError, match=r"output\[%d, %d\]" % tuple(int(i) for i in k)):
        report.assert_ok()
    assert report.to_dict()["worst_violation"]["index"] == [int(i) for i in k]
    assert "NOT CONTAINED" in str(report)


def test_radius_zero_where_rounding_happened_is_caught():
    torch.manual_seed(4)
    model = nn.Linear(50, 3)
    x = torch.randn(4, 50)
    mid, exact = _forward_exact(model, x)
    tc = check_tensor("output", "output", bg.ball(mid), exact, mid)  # a "ball" claiming to be exact
    assert tc.contained < tc.checked and tc.worst.excess == math.inf


def _mse(out, target):
    return ((out - target) ** 2).mean()


def _linear_case(dtype=torch.float32):
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(6, 9), nn.Linear(9, 4)).to(dtype)
    return model, torch.randn(8, 6, dtype=dtype), torch.randn(8, 4, dtype=dtype)


def _require(report: Report):
    if report.status == "unsupported":
        pytest.skip(f"ballgrad has no rule for {report.unsupported_op} yet")
    return report


def test_a_lying_rule_fails_check_model(monkeypatch):
    """End to end: a rule whose radius is 1000x too small is caught by check_model, which names the element."""
    from ballgrad.ops import registry
    from ballgrad.tensor import BallTensor

    model, x, y = _linear_case()
    honest = _require(check_model(model, x, y, _mse, name="linear"))
    assert honest.status == "ok", str(honest)
    real = registry.RULES[aten.addmm.default]

    def lying(func, *args, **kwargs):
        out = real(func, *args, **kwargs)
        return BallTensor(out.mid, out.rad / 1000)

    monkeypatch.setitem(registry.RULES, aten.addmm.default, lying)
    report = check_model(model, x, y, _mse, name="linear")
    assert report.status == "fail" and report.containment < 100
    w = report.worst_violation()
    assert w is not None and w.excess > 1
    with pytest.raises(AssertionError, match="not contained"):
        report.assert_ok()


# ----------------------------------------------------------------------------------------------------------------------
# 3. The CLI


def test_cli_verify_writes_json(tmp_path):
    from ballgrad.cli import main

    path = tmp_path / "verify.json"
    rc = main(["verify", "--model", "mlp-small", "--samples", "200", "--batch", "8", "--json", str(path), "--quiet"])
    data = json.loads(path.read_text())
    assert [m["model"] for m in data["models"]] == ["mlp-small"]
    m = data["models"][0]
    for key in ("status", "parameters", "checked", "containment_percent", "midpoint_identity_percent", "observed",
                "predicted", "median_ratio", "median_elementwise_ratio", "seconds", "tensors", "unsupported_op"):
        assert key in m
    assert m["parameters"] == 101_770
    if m["status"] == "unsupported":
        assert m["unsupported_op"].startswith("aten.") and rc == 0
    else:
        assert m["status"] == "ok" and m["containment_percent"] == 100 and rc == 0 and data["ok"]
        assert all(t["checked"] == min(200, t["numel"]) for t in m["tensors"])


def test_cli_verify_the_a_priori_gemm_bound(tmp_path, capsys):
    """``--gemm-bound a-priori`` verifies the cheap bound (ball parameters: the two-ball GEMM paths run), says so
    above the table and in the JSON, and leaves the process's bound as it was."""
    from ballgrad.cli import main
    from ballgrad.ops import linalg

    path = tmp_path / "verify.json"
    rc = main(["verify", "--model", "mlp-small", "--samples", "100", "--batch", "4", "--rad", "1e-7",
               "--gemm-bound", "a-priori", "--json", str(path), "--quiet"])
    data = json.loads(path.read_text())
    assert rc == 0 and data["ok"] and data["gemm_bound"] == "a-priori"
    assert data["models"][0]["containment_percent"] == 100
    assert "GEMM midpoint-error bound: a-priori" in capsys.readouterr().out
    assert linalg._gemm_bound == "measured"


def test_cli_exit_status(monkeypatch, capsys):
    import verification
    from ballgrad.cli import main

    def fake(status):
        def check(model, *a, name=None, **k):
            return Report(name, "float32", 1, status=status, unsupported_op="aten.fake.default")
        return check

    monkeypatch.setattr(verification, "check_model", fake("unsupported"))
    assert main(["verify", "--model", "mlp-small", "--quiet"]) == 0
    assert "unsupported: aten.fake.default" in capsys.readouterr().out
    monkeypatch.setattr(verification, "check_model", fake("fail"))
    assert main(["verify", "--model", "mlp-small", "--quiet"]) == 1
    assert main(["verify", "--model", "no-such-model", "--quiet"]) == 2


# ----------------------------------------------------------------------------------------------------------------------
# 4. check_model on models with rules


def test_zoo_models_are_seeded_and_match_benchmarks():
    sizes = {"mlp-small": 101_770, "mlp-deep": 233_866, "mlp-wide": 6_316_042, "cnn-small": 5_306,
             "transformer-tiny": 34_122}
    for name in zoo.NAMES:
        a, b = zoo.make(name, batch=2), zoo.make(name, batch=2)
        assert a.parameters == sizes[name] and a.model.training
        assert torch.equal(a.inputs, b.inputs) and torch.equal(a.targets, b.targets)
        assert all(torch.equal(p, q) for p, q in zip(a.model.parameters(), b.model.parameters()))
        assert a.inputs.dtype == torch.float32
    assert zoo.make("mlp-small", dtype=torch.float64).inputs.dtype == torch.float64
    assert zoo.make("cnn-small").inputs.shape == (32, 1, 28, 28)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("rad", [0.0, 1e-6])
def test_check_model_passes_on_a_linear_model(dtype, rad):
    model, x, y = _linear_case(dtype)
    report = _require(check_model(model, x, y, _mse, rad=rad, name="linear"))
    report.assert_ok()
    assert report.containment == 100 and report.midpoint_identity == 100
    assert report.checked == 1 + 32 + sum(p.numel() for p in model.parameters())
    assert report.median_ratio is None or report.median_ratio >= 1
    assert "linear" in str(report)
    json.dumps(report.to_dict())


@pytest.mark.parametrize("name,batch", [("mlp-small", 8), ("mlp-deep", 8), ("cnn-small", 4),
                                        ("transformer-tiny", 2)])
def test_check_model_passes_on_the_zoo(name, batch):
    case = zoo.make(name, batch=batch)
    report = _require(check_model(case.model, case.inputs, case.targets, case.loss_fn, samples=2000, name=name))
    report.assert_ok()
    assert report.containment == 100 and report.midpoint_identity == 100


class _Assorted(nn.Module):
    """Ops beyond the zoo: grouped/strided/dilated convolution, padded ceil-mode pooling, eval-mode batch norm,
    both GELUs, tanh, sigmoid, softmax, causal attention, cat/split."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, stride=2, padding=1, dilation=2, groups=2)
        self.bn = nn.BatchNorm2d(4)
        self.pool = nn.MaxPool2d(3, stride=2, padding=1, ceil_mode=True)
        self.conv1d = nn.Conv1d(4, 4, 2, padding=1)
        self.ln = nn.LayerNorm(8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        h = self.pool(torch.relu(self.bn(self.conv(x))))  # (N, 4, 3, 3)
        h = nn.functional.gelu(h.flatten(2), approximate="tanh")  # (N, 4, 9)
        h = torch.tanh(self.conv1d(h))[..., :8]  # (N, 4, 8)
        q, k = torch.split(self.ln(h), 2, dim=1)
        a = nn.functional.scaled_dot_product_attention(q[:, None], k[:, None], torch.sigmoid(k)[:, None],
                                                       is_causal=True)[:, 0]
        h = torch.cat([a, nn.functional.gelu(torch.softmax(q, -1))], 1).mean(-1)  # (N, 4)
        return self.head(torch.cat([h, h * h], 1))


def test_oracle_agrees_with_float64_pytorch_on_assorted_ops():
    torch.manual_seed(6)
    model = _Assorted().double()
    model.bn.eval()
    model.bn.running_mean.uniform_(-0.5, 0.5)
    model.bn.running_var.uniform_(0.5, 2.0)
    x = torch.randn(3, 2, 11, 11, dtype=torch.float64)
    y = torch.tensor([0, 2, 1])
    ex = exact_training_step(model, x, y)
    out = model(x)
    loss = nn.functional.cross_entropy(out, y)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    scale = max(float(g.abs().max()) for g in grads)
    assert _rel_max(ex["loss"], loss, float(loss.detach().abs())) < 1e-12
    for (n, _), g in zip(model.named_parameters(), grads):
        assert _rel_max(ex["grad"][n], g, scale) < 1e-10, n


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_oracle_gelu_far_tails_do_not_cancel(approximate):
    """Regression (fuzzer, seed 3): the oracle computed gelu(x) = x/2 (1 + erf(x/sqrt 2)) and Phi(x) in its backward
    as 1 + erf(...) at the working precision, which for x = -23.3 cancels ~400 bits and returned rounding noise
    (~1e-100 instead of -3.1e-119): a correct ball was reported as not containing the "exact" value. Now erfc (and
    2/(1 + exp(-2u)) for the tanh form) keep every bit; compared with mpmath at 600 digits."""
    x = torch.tensor([-23.3217943063836, -12.0, -3.0, 0.5, 30.0], dtype=torch.float64, requires_grad=True)

    def f(x):
        y = torch.nn.functional.gelu(x, approximate=approximate)
        return y, torch.autograd.grad(y.sum(), x)[0]

    y, g = run_oracle(f, x)
    with mpmath.workdps(600):
        for i, xv in enumerate(x.detach().tolist()):
            t = mpmath.mpf(xv)
            if approximate == "none":
                cdf = mpmath.erfc(-t / mpmath.sqrt(2)) / 2
                val, der = t * cdf, cdf + t * mpmath.npdf(t)
            else:
                k = mpmath.sqrt(2 / mpmath.pi)
                u = k * (t + mpmath.mpf("0.044715") * t**3)
                one_plus = 2 / (1 + mpmath.exp(-2 * u))
                sech2 = 4 / (mpmath.exp(u) + mpmath.exp(-u)) ** 2
                val = t / 2 * one_plus
                der = one_plus / 2 + t / 2 * sech2 * k * (1 + 3 * mpmath.mpf("0.044715") * t**2)
            for got, want in ((y.fraction((i,)), val), (g.fraction((i,)), der)):
                got = mpmath.mpf(got.numerator) / got.denominator
                assert abs(got - want) <= abs(want) * mpmath.mpf(2) ** -200, (xv, got, want)


def test_oracle_gives_up_on_exponent_spans_it_cannot_afford():
    """Regression (fuzzer, seed 1): exp of a difference near -1e6 next to exp(0) in one softmax made the oracle build
    million-bit integers and stall for hours. It now raises OracleTooExpensive (check_model: status "unchecked")."""
    from verification.dyadic import MAX_ALIGN_BITS, OracleTooExpensive

    tiny = Dyadic(np.array([1], dtype=object), -(MAX_ALIGN_BITS + 10))
    one = Dyadic(np.array([1], dtype=object), 0)
    with pytest.raises(OracleTooExpensive):
        tiny + one
    assert (Dyadic(np.array([1], dtype=object), -1000) + one).fraction((0,)) == 1 + Fraction(1, 2**1000)
