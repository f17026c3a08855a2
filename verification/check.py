"""Whole-model checks against the exact oracle: ``check_model`` and its ``Report``.

``check_model`` runs one training step three ways on the same float parameters and inputs:

1. the plain model (eager PyTorch): the reference for midpoint identity;
2. a ballified deep copy (``ballgrad.ballify``): loss, outputs and gradients as balls;
3. the oracle (``verification.oracle``): the exact real-number loss, outputs and gradients, >= 256 bits.

Per tensor it decides |exact - mid| <= rad exactly (integers at a common power of two), measures observed =
max |mid - exact| and predicted = max rad (BENCHMARKS.md "Tightness"), and compares every midpoint with the plain
model's value bit for bit.

The oracle's "exact" values are exact except where the real result is not dyadic (exp, log, square roots,
division by non-powers of two), where each is rounded to >= 256 + 64 bits: a verdict could only be wrong for an
element whose |exact - mid| is within ~2^-300 relative of its radius, far below anything a float radius resolves.
"""

from __future__ import annotations

import copy
import json
import math
import statistics
import time
from dataclasses import asdict, dataclass, field

import mpmath
import numpy as np
import torch
from mpmath import libmp

from verification.dyadic import Dyadic, OracleTooExpensive
from verification.oracle import OracleUnsupportedOp, exact_training_step, trace_training_step

__all__ = ["check_model", "check_tensor", "Report", "TensorCheck", "Violation", "format_table"]


@dataclass
class Violation:
    """One element whose exact value lies outside its ball."""

    tensor: str
    index: list
    mid: float
    rad: float
    exact: str  # decimal, 25 significant digits
    excess: float  # |exact - mid| / rad (inf when rad is 0)

    def __str__(self):
        return (f"{self.tensor}{self.index}: ball {self.mid!r} ± {self.rad!r} but the exact value is {self.exact} "
                f"(|exact - mid| = {self.excess:.3g} x rad)")


@dataclass
class TensorCheck:
    """The verdict for one tensor (the loss, the outputs, or one parameter's gradient)."""

    name: str
    kind: str  # "loss" | "output" | "grad"
    shape: list
    numel: int
    checked: int
    contained: int
    mid_identical: bool  # torch.equal(ball.mid, plain)
    mid_identical_elements: int
    observed: float  # max |mid - exact| over checked elements
    predicted: float  # max rad over checked elements
    ratio: float | None  # predicted / observed (None when observed == 0)
    median_elementwise_ratio: float | None  # median of rad_i / |mid_i - exact_i| over errors != 0
    worst: Violation | None = None
    note: str = ""

    @property
    def ok(self) -> bool:
        return self.contained == self.checked and self.mid_identical


@dataclass
class Report:
    """Verification of one model: per-tensor checks and the model's figures. ``str(report)`` is a text table,
    ``report.to_dict()`` / ``report.to_json()`` machine-readable results."""

    model: str
    dtype: str
    parameters: int
    status: str = "ok"  # ok | fail | unsupported | error | unchecked (the exact oracle gave up: OracleTooExpensive)
    unsupported_op: str | None = None
    error: str | None = None
    tensors: list = field(default_factory=list)
    seconds: dict = field(default_factory=dict)
    samples: int | None = None
    rad: float = 0.0
    prec: int = 256
    median_elementwise_ratio: float | None = None  # rad_i / |mid_i - exact_i|, pooled over gradient elements

    # -- figures -------------------------------------------------------------------------------------------------------
    @property
    def checked(self) -> int:
        return sum(t.checked for t in self.tensors)

    @property
    def contained(self) -> int:
        return sum(t.contained for t in self.tensors)

    @property
    def containment(self) -> float | None:
        """Share of checked elements whose exact value lies in the ball (percent)."""
        return 100.0 * self.contained / self.checked if self.checked else None

    @property
    def midpoint_identity(self) -> float | None:
        """Share of elements (all elements, not only the checked ones) whose midpoint equals the plain model's
        value bit for bit (percent)."""
        n = sum(t.numel for t in self.tensors)
        return 100.0 * sum(t.mid_identical_elements for t in self.tensors) / n if n else None

    def _grads(self):
        return [t for t in self.tensors if t.kind == "grad"]

    @property
    def observed(self) -> float | None:
        g = self._grads()
        return max(t.observed for t in g) if g else None

    @property
    def predicted(self) -> float | None:
        g = self._grads()
        return max(t.predicted for t in g) if g else None

    @property
    def median_ratio(self) -> float | None:
        """Median over parameter tensors of predicted / observed (tensors with observed > 0)."""
        r = [t.ratio for t in self._grads() if t.ratio is not None]
        return statistics.median(r) if r else None

    @property
    def ok(self) -> bool:
        """Nothing outside its ball and every midpoint identical (an unsupported model is not a failure)."""
        return self.status in ("ok", "unsupported")

    @property
    def failed(self) -> bool:
        return self.status in ("fail", "error")

    def violations(self) -> list[Violation]:
        return [t.worst for t in self.tensors if t.worst is not None]

    def worst_violation(self) -> Violation | None:
        """The non-contained element with the largest |exact - mid| / rad over all tensors."""
        v = self.violations()
        return max(v, key=lambda x: x.excess) if v else None

    def assert_ok(self) -> None:
        """Raise AssertionError naming the worst non-contained element (tensor, index, ball, exact value) or the
        first tensor whose midpoints differ from plain PyTorch."""
        if self.status == "error":
            raise AssertionError(f"{self.model}: {self.error}")
        w = self.worst_violation()
        if w is not None:
            bad = [t for t in self.tensors if t.contained < t.checked]
            n = sum(t.checked - t.contained for t in bad)
            raise AssertionError(f"{self.model}: {n} element(s) not contained in {len(bad)} tensor(s); worst: {w}")
        diff = [t.name for t in self.tensors if not t.mid_identical]
        if diff:
            raise AssertionError(f"{self.model}: midpoints differ from plain PyTorch in {', '.join(diff)}")

    # -- output --------------------------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        d = {
            "model": self.model, "dtype": self.dtype, "parameters": self.parameters, "status": self.status,
            "unsupported_op": self.unsupported_op, "error": self.error, "samples": self.samples, "rad": self.rad,
            "prec": self.prec, "checked": self.checked, "contained": self.contained,
            "containment_percent": self.containment, "midpoint_identity_percent": self.midpoint_identity,
            "observed": self.observed, "predicted": self.predicted, "median_ratio": self.median_ratio,
            "median_elementwise_ratio": self.median_elementwise_ratio, "seconds": self.seconds,
            "worst_violation": asdict(self.worst_violation()) if self.worst_violation() else None,
            "tensors": [asdict(t) for t in self.tensors],
        }
        return _json_safe(d)

    def to_json(self, **kwargs) -> str:
        return json.dumps(self.to_dict(), **kwargs)

    def __str__(self):
        head = f"{self.model} ({self.dtype}, {self.parameters:,} parameters): {self._status_text()}"
        if not self.tensors:
            return head
        rows = [["tensor", "checked", "contained", "mid identical", "observed", "predicted", "ratio", "median ratio"]]
        for t in self.tensors:
            rows.append([t.name, f"{t.checked:,}", f"{t.contained:,}", "yes" if t.mid_identical else "NO",
                         _fmt(t.observed), _fmt(t.predicted), _fmt_ratio(t.ratio), _fmt_ratio(t.median_elementwise_ratio)])
        lines = [head, _table(rows)]
        lines.append(f"containment {_pct(self.containment)}, midpoint identity {_pct(self.midpoint_identity)}, "
                     f"median ratio over parameters {_fmt_ratio(self.median_ratio)}, elementwise median "
                     f"{_fmt_ratio(self.median_elementwise_ratio)}, {self.seconds.get('total', 0):.1f} s")
        for v in self.violations():
            lines.append(f"  NOT CONTAINED: {v}")
        return "\n".join(lines)

    def _status_text(self) -> str:
        if self.status == "unsupported":
            return f"unsupported: {self.unsupported_op}"
        if self.status in ("error", "unchecked"):
            return f"{self.status}: {self.error}"
        return self.status


def _json_safe(x):
    if isinstance(x, float):
        if math.isnan(x):
            return None
        if math.isinf(x):
            return "inf" if x > 0 else "-inf"
        return x
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


def _fmt(x) -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and math.isinf(x):
        return "inf"
    return f"{x:.2e}"


def _fmt_ratio(x) -> str:
    if x is None:
        return "-"
    if math.isinf(x):
        return "inf"
    if x >= 1e6:
        return f"{x:.2e}x"
    return f"{x:,.0f}x" if x >= 10 else f"{x:.2f}x"


def _pct(x) -> str:
    return "-" if x is None else f"{x:.2f}%" if x not in (0.0, 100.0) else f"{x:.0f}%"


def _table(rows, left=(0,)) -> str:
    """Columns in ``left`` left-justified, the others right-justified."""
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    out = []
    for j, r in enumerate(rows):
        out.append("  " + "  ".join(str(c).ljust(w) if i in left else str(c).rjust(w) for i, (c, w) in
                                    enumerate(zip(r, widths))).rstrip())
        if j == 0:
            out.append("  " + "  ".join("-" * w for w in widths))
    return "\n".join(out)


def format_table(reports: list[Report]) -> str:
    """One line per model: the figures ``ballgrad verify`` prints."""
    rows = [["model", "parameters", "checked", "containment", "mid identity", "observed", "predicted", "ratio",
             "elem. ratio", "seconds", "status"]]
    for r in reports:
        rows.append([r.model, f"{r.parameters:,}", f"{r.checked:,}", _pct(r.containment), _pct(r.midpoint_identity),
                     _fmt(r.observed), _fmt(r.predicted), _fmt_ratio(r.median_ratio),
                     _fmt_ratio(r.median_elementwise_ratio), f"{r.seconds.get('total', 0):.1f}", r._status_text()])
    return _table(rows, left=(0, len(rows[0]) - 1))


# ----------------------------------------------------------------------------------------------------------------------
# Checking one tensor


def _split(x):
    """(mid, rad) of a ball, or a plain tensor as a point ball (flagged by the caller)."""
    from ballgrad import BallTensor

    if isinstance(x, BallTensor):
        return x.mid.detach(), x.rad.detach()
    return x.detach(), torch.zeros_like(x.detach())


def _identical(a: torch.Tensor, b: torch.Tensor) -> int:
    """Elements equal bit for bit (same value and sign of zero, or both NaN)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return 0
    same = (a == b) & (torch.signbit(a) == torch.signbit(b))
    same |= torch.isnan(a) & torch.isnan(b)
    return int(same.sum())


def check_tensor(name: str, kind: str, ball, exact: Dyadic, plain: torch.Tensor | None = None, *, samples=None,
                 seed: int = 0) -> TensorCheck:
    """Decide |exact - mid| <= rad for every element of ``ball`` (or ``samples`` seeded random ones), exactly:
    the exact value, the midpoint and the radius are integers times one common power of two."""
    return _check_tensor(name, kind, ball, exact, plain, samples=samples, seed=seed)[0]


def _sample(numel, samples, seed, name):
    if samples is None or samples >= numel:
        return np.arange(numel)
    rng = np.random.default_rng([seed, sum(map(ord, name))])
    return np.sort(rng.choice(numel, size=samples, replace=False))


def _check_tensor(name, kind, ball, exact, plain, *, samples, seed):
    from ballgrad import BallTensor

    mid, rad = _split(ball)
    note = "" if isinstance(ball, BallTensor) else "plain tensor (no radius): treated as rad 0"
    shape = tuple(mid.shape)
    if tuple(exact.shape) != shape:
        raise ValueError(f"{name}: oracle shape {exact.shape} but ball shape {shape}")
    numel = mid.numel()
    idx = _sample(numel, samples, seed, name)
    m64 = mid.to(torch.float64).reshape(-1).numpy()[idx]
    r64 = rad.to(torch.float64).reshape(-1).numpy()[idx]
    xm = exact.m.reshape(-1)[idx]
    mfin, rfin = np.isfinite(m64), np.isfinite(r64)
    M = Dyadic.from_numpy(np.where(mfin, m64, 0.0))
    R = Dyadic.from_numpy(np.where(rfin, r64, 0.0))
    (I, Mi, Ri), e = Dyadic.align(Dyadic(xm, exact.e), M, R)
    diff = np.abs(I - Mi)
    inside = np.asarray(diff <= Ri, dtype=bool)
    inside = np.where(rfin, inside & mfin, True)  # an infinite radius contains every real
    err = Dyadic(diff, e).to_float64() if idx.size else np.zeros(0)
    err = np.where(mfin, err, np.inf)
    contained = int(inside.sum())
    observed = float(err.max()) if err.size else 0.0
    predicted = float(r64.max()) if r64.size else 0.0
    ratio = predicted / observed if observed > 0 else None
    nz = err > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        elem = r64[nz] / err[nz]
    median_elem = float(np.median(elem)) if elem.size else None
    worst = None
    if contained < idx.size:
        with np.errstate(divide="ignore", invalid="ignore"):
            excess = np.where(inside, -np.inf, np.where(r64 > 0, err / np.where(r64 > 0, r64, 1), np.inf))
        j = int(np.argmax(excess))
        exact_val = mpmath.mp.make_mpf(libmp.from_man_exp(int(xm[j]), exact.e))
        worst = Violation(name, [int(i) for i in np.unravel_index(int(idx[j]), shape)] if shape else [],
                          float(m64[j]), float(r64[j]), mpmath.nstr(exact_val, 25), float(excess[j]))
    same = _identical(mid, plain.detach()) if plain is not None else numel
    mid_identical = bool(torch.equal(mid, plain.detach())) if plain is not None else True
    if plain is not None and not mid_identical and same == numel:
        mid_identical = True  # NaN in identical places: torch.equal says False, the bits agree
    return TensorCheck(name, kind, list(shape), numel, int(idx.size), contained, mid_identical, same, observed,
                       predicted, ratio, median_elem, worst, note), elem


# ----------------------------------------------------------------------------------------------------------------------
# Checking a model


def _step(model, inputs, targets, loss_fn, params):
    out = model(inputs)
    loss = loss_fn(out, targets)
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return loss, out, grads


def check_model(model: torch.nn.Module, inputs, targets, loss_fn=None, *, samples: int | None = None,
                rad: float = 0.0, seed: int = 0, name: str | None = None, prec: int = 256,
                progress=None) -> Report:
    """Verify one training step of ``model`` against the exact oracle (see the module docstring).

    ``loss_fn(outputs, targets)`` defaults to cross-entropy. ``samples``: check this many seeded random elements
    per tensor instead of all (the oracle still computes everything exactly: gradients need the whole batch).
    ``rad``: the parameters' ball radius (as ``ballgrad.ballify``). ``progress``: optional callable receiving a
    stage name. A model using an op without a ballgrad rule gives ``status == "unsupported"`` naming the op.
    """
    import ballgrad
    from ballgrad import UnsupportedOpError

    loss_fn = loss_fn or torch.nn.functional.cross_entropy
    say = progress or (lambda stage: None)
    t_start = time.perf_counter()
    dtype = next((p.dtype for p in model.parameters()), torch.float32)
    report = Report(name or type(model).__name__, str(dtype).replace("torch.", ""),
                    sum(p.numel() for p in model.parameters()), samples=samples, rad=float(rad), prec=prec)
    names = [n for n, p in model.named_parameters() if p.requires_grad]

    def finish():
        report.seconds["total"] = time.perf_counter() - t_start
        return report

    # 1. plain reference
    say("plain")
    plain = copy.deepcopy(model)
    p_params = [p for n, p in plain.named_parameters() if p.requires_grad]
    p_loss, p_out, p_grads = _step(plain, inputs, targets, loss_fn, p_params)

    # 2. ball model
    say("ball")
    t0 = time.perf_counter()
    try:
        ball_model = ballgrad.ballify(copy.deepcopy(model), rad=rad)
        b_params = [p for n, p in ball_model.named_parameters() if p.requires_grad]
        b_loss, b_out, b_grads = _step(ball_model, inputs, targets, loss_fn, b_params)
    except UnsupportedOpError as exc:
        report.status = "unsupported"
        report.unsupported_op = getattr(exc, "op_name", str(exc))
        report.seconds["ball"] = time.perf_counter() - t0
        return finish()
    except Exception as exc:  # a crash in a rule is a failure to report, not to hide
        report.status = "error"
        report.error = f"ball model raised {type(exc).__name__}: {exc}"
        report.seconds["ball"] = time.perf_counter() - t0
        return finish()
    report.seconds["ball"] = time.perf_counter() - t0

    # 3. oracle
    say("trace")
    t0 = time.perf_counter()
    try:
        traced = trace_training_step(model, inputs, targets, loss_fn)
        report.seconds["trace"] = time.perf_counter() - t0
        say("oracle")
        t0 = time.perf_counter()
        exact = exact_training_step(model, inputs, targets, loss_fn, prec=prec, traced=traced)
    except OracleUnsupportedOp as exc:
        report.status = "error"
        report.error = str(exc)
        return finish()
    except OracleTooExpensive as exc:  # not a verdict on the rules: nothing was compared
        report.status = "unchecked"
        report.error = f"the oracle gave up: {exc}"
        return finish()
    report.seconds["oracle"] = time.perf_counter() - t0

    # 4. compare
    say("compare")
    t0 = time.perf_counter()
    checks = [check_tensor("loss", "loss", b_loss, exact["loss"], p_loss, samples=samples, seed=seed),
              check_tensor("output", "output", b_out, exact["output"], p_out, samples=samples, seed=seed)]
    pooled = []
    for n, bg, pg in zip(names, b_grads, p_grads):
        if bg is None:  # a parameter the loss does not depend on
            continue
        tc, elem = _check_tensor(n, "grad", bg, exact["grad"][n], pg, samples=samples, seed=seed)
        checks.append(tc)
        pooled.append(elem)
    report.tensors = checks
    pooled = np.concatenate(pooled) if pooled else np.zeros(0)
    report.median_elementwise_ratio = float(np.median(pooled)) if pooled.size else None
    report.seconds["compare"] = time.perf_counter() - t0
    if any(not t.ok for t in checks):
        report.status = "fail"
    return finish()
