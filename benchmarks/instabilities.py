"""Instability benchmark (issue 6): injected numerical faults in small models against clean models.

    python benchmarks/instabilities.py [--fast] [--dtype float32 float64] [--json results/instabilities.json]

Each case is one training step (forward, loss, backward) of a ballified model under ``ballgrad.record``. The same
model also runs in plain PyTorch, to show what it reports (``plain grads``: finite, or the share of NaN/inf
elements); most faults are silent there (a finite, wrong gradient).

The detector (one definition, the same for every case; ``detect`` below):

* any ``domain``, ``overflow`` or ``nan`` event: information was lost outright (an infinite radius, a NaN);
* a ``cancellation``, ``kink`` or ``undecided`` event covering at least 1% of its op's output elements
  (``Event.count / Event.total >= 0.01``). Isolated elements are expected in healthy models and are not a fault:
  a value that crosses zero by chance is near zero somewhere (its relative accuracy drops, or its ball touches a
  kink), with a density of about radius/spread (Lee, Park & Aiken: the non-differentiable set has density at most
  #kinks/|M|). An injected fault is systematic.

The faults (each in a small model, built by ``FAULTS[name](dtype)``): saturating softmax followed by log, log of a
value near 0 (hand-written binary cross-entropy), Johnson et al.'s h(x) = (x^2 - 4)/(x - 2) near x = 2 without and
with the eps-in-the-denominator fix, catastrophic cancellation (one-pass variance), exploding gradients (deep linear
chain), vanishing gradients (saturated sigmoids), overflow in exp (softmax without the max subtraction), ReLU exactly
at its kink (zero-initialised layer), 0 * inf (entropy p log p at p = 0), inf - inf (naive log-ratio of overflowed
sums), and the gradient of a norm at 0 (distance between identical embeddings). Negatives: the zoo models
(``verification.zoo``: all five, mlp-small, mlp-deep, mlp-wide, cnn-small, transformer-tiny) and clean twins of
some faults (the stable formulation of the same computation). ``--fast`` (the test suite's subset) runs the zoo MLPs
mlp-small and mlp-deep with batch 16 and skips the others.

dtype. Every case runs in float32 (the zoo's dtype, ../shared/BENCHMARKS.md) and in float64 by default; the rates
are printed per dtype and over both. float32 is the harder one for a ball-based detector: its balls are wider
(mlp-deep's gradient balls contain 0 there, wrapping) and the faults lose fewer bits (Johnson's x*x - 4 at
x = 2 + 2^-16 cancels 16 bits). The cancellation event therefore compares an input's *actual* accuracy, which can
exceed p for a result whose exact rounding error is tiny, and never counts more bits than the inputs had (see
``ballgrad.diagnostics``).

Prints one row per case, the true-positive rate (faults detected) and the false-positive rates (zoo models; clean
twins), and writes everything as JSON.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

SOFT_SHARE = 0.01
HARD_KINDS = ("domain", "overflow", "nan")
SOFT_KINDS = ("cancellation", "kink", "undecided")


def detect(events) -> tuple[bool, list[str]]:
    """The detector: (detected, reasons). See the module docstring."""
    reasons = []
    for e in events:
        if e.kind in HARD_KINDS:
            reasons.append(f"{e.kind} in {e.op}")
        elif e.kind in SOFT_KINDS:
            if e.total is None or e.count >= SOFT_SHARE * e.total:
                reasons.append(f"{e.kind} in {e.op} ({e.count}/{e.total})")
    return bool(reasons), sorted(set(reasons))


# ----------------------------------------------------------------------------------------------------------------------
# Cases: a builder returns (model, inputs, targets, loss_fn); the step is loss_fn(model(inputs), targets).backward()


@dataclass
class Case:
    name: str
    negative: bool  # True for clean models
    build: Callable
    description: str
    group: str = "fault"  # "fault" | "zoo" | "twin"


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _p(dtype) -> int:
    return {torch.float64: 53, torch.float32: 24}[dtype]


def _linear(i, o, dtype, seed, bias=True, scale=1.0):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        lin = nn.Linear(i, o, bias=bias)
    lin = lin.to(dtype)
    if scale != 1.0:
        with torch.no_grad():
            lin.weight.mul_(scale)
    return lin


def _data(n, d, dtype, seed=1, classes=3):
    g = _gen(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64).to(dtype)
    t = torch.randint(0, classes, (n,), generator=g)
    return x, t


class Lambda(nn.Module):
    def __init__(self, fn, name):
        super().__init__()
        self.fn = fn
        self.name = name

    def forward(self, *args):
        return self.fn(*args)

    def extra_repr(self):
        return self.name


# -- faults --


def saturating_softmax_log(dtype):
    """Large logits saturate the softmax, and log(softmax) is used instead of log_softmax: the probabilities of the
    losing classes underflow to 0 (log gives -inf) and the winners' round to 1 (log keeps no relative accuracy)."""
    model = nn.Sequential(_linear(8, 5, dtype, 0, scale=1000.0), nn.Softmax(dim=1))
    x, t = _data(16, 8, dtype, classes=5)
    return model, x, t, lambda p, t: F.nll_loss(torch.log(p), t)


def log_near_zero(dtype):
    """Binary cross-entropy written by hand: log(1 - sigmoid(z)) with z = 50, where sigmoid rounds to 1."""
    lin = _linear(8, 1, dtype, 0)
    with torch.no_grad():
        lin.bias.fill_(50.0)
    model = nn.Sequential(lin, nn.Sigmoid(), nn.Flatten(0))
    x, _ = _data(16, 8, dtype)
    t = (torch.arange(16) % 2).to(dtype)

    def bce(p, t):
        return -(t * torch.log(p) + (1 - t) * torch.log(1 - p)).mean()

    return model, x, t, bce


class JohnsonH(nn.Module):
    """h(x) = (x^2 - 4)/(x - 2 + eps) with x a parameter (Johnson et al.; eps = 0 is the original)."""

    def __init__(self, x0: float, eps: float, dtype):
        super().__init__()
        self.x = nn.Parameter(torch.tensor(x0, dtype=dtype))
        self.eps = eps

    def forward(self, _=None):
        x = self.x
        den = x - 2 if self.eps == 0 else x - 2 + self.eps
        return (x * x - 4) / den


def _johnson_gamma(dtype) -> float:
    return 2.0 ** (-round(2 * _p(dtype) / 3))  # x*x - 4 keeps about p/3 of p bits


def johnson(dtype):
    """h(x) = (x^2 - 4)/(x - 2) at x = 2 + gamma: PyTorch's h'(x) is 2 instead of 1."""
    return JohnsonH(2.0 + _johnson_gamma(dtype), 0.0, dtype), None, None, lambda h, t: h


def johnson_eps(dtype):
    """The eps-in-the-denominator fix (eps = 1e-6): h' is off by O(1/eps) and x*x - 4 still cancels."""
    return JohnsonH(2.0 + _johnson_gamma(dtype), 1e-6, dtype), None, None, lambda h, t: h


class NaiveStandardize(nn.Module):
    """(x - mean) / sqrt(E[x^2] - E[x]^2 + 1e-5): the one-pass variance."""

    def forward(self, x):
        m = x.mean(1, keepdim=True)
        v = (x * x).mean(1, keepdim=True) - m * m
        return (x - m) / torch.sqrt(v + 1e-5)


def catastrophic_cancellation(dtype):
    """A normalisation with the one-pass variance after a layer whose outputs share a large offset (its bias):
    E[x^2] - E[x]^2 cancels."""
    lin = _linear(8, 8, dtype, 0)
    with torch.no_grad():
        lin.bias.fill_(2.0 ** round(0.4 * _p(dtype)))
    model = nn.Sequential(lin, NaiveStandardize(), _linear(8, 3, dtype, 1))
    x, t = _data(16, 8, dtype)
    return model, x, t, F.cross_entropy


def _orthogonal(n, seed, dtype):
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=_gen(seed), dtype=torch.float64))
    return q.to(dtype)


def exploding_gradients(dtype):
    """A deep bias-free linear chain with gain 2^10 per layer: the forward stays finite (tiny input), the gradient
    with respect to the early activations overflows."""
    emax = math.frexp(torch.finfo(dtype).max)[1]  # max < 2^emax
    layers = emax // 10 + 2
    model = nn.Sequential(*[nn.Linear(8, 8, bias=False) for _ in range(layers)]).to(dtype)
    with torch.no_grad():
        for i, lin in enumerate(model):
            lin.weight.copy_(_orthogonal(8, i, dtype) * 1024.0)
    x, _ = _data(4, 8, dtype)
    x = x * 2.0 ** -(10 * layers - 40)
    return model, x, None, lambda out, t: out.sum()


def vanishing_gradients(dtype):
    """30 saturated sigmoid layers (bias 30): sigmoid'(z) = y (1 - y) is about 1e-13 per layer and is computed
    from y = 1 - tiny, which cancels; the gradient of the first layers underflows."""
    layers = []
    for i in range(30):
        lin = _linear(8, 8, dtype, i)
        with torch.no_grad():
            lin.bias.fill_(30.0)
        layers += [lin, nn.Sigmoid()]
    model = nn.Sequential(*layers, _linear(8, 3, dtype, 99))
    x, t = _data(16, 8, dtype)
    return model, x, t, F.cross_entropy


def exp_overflow(dtype):
    """Softmax written without subtracting the max: exp(z) of logits near 1.1 log(max float) overflows."""
    lin = _linear(8, 5, dtype, 0)
    with torch.no_grad():
        lin.bias.fill_(1.1 * math.log(torch.finfo(dtype).max))
    naive = Lambda(lambda z: torch.exp(z) / torch.exp(z).sum(1, keepdim=True), "naive softmax")
    x, t = _data(16, 8, dtype, classes=5)
    return nn.Sequential(lin, naive), x, t, lambda p, t: F.nll_loss(torch.log(p), t)


def relu_at_kink(dtype):
    """A zero-initialised hidden layer: every pre-activation is exactly 0, every ReLU sits on its kink and autograd
    silently returns the subgradient 0."""
    hidden = _linear(8, 16, dtype, 0)
    with torch.no_grad():
        hidden.weight.zero_()
        hidden.bias.zero_()
    model = nn.Sequential(hidden, nn.ReLU(), _linear(16, 3, dtype, 1))
    x, t = _data(16, 8, dtype)
    return model, x, t, F.cross_entropy


def zero_times_inf(dtype):
    """An entropy bonus sum p log p where a saturated softmax gives p = 0 exactly: 0 * log(0) = 0 * (-inf)."""
    model = nn.Sequential(_linear(8, 5, dtype, 0, scale=2000.0), nn.Softmax(dim=1))
    x, t = _data(16, 8, dtype, classes=5)

    def loss(p, t):
        return F.nll_loss(p, t) + 0.1 * (p * torch.log(p)).sum(1).mean()

    return model, x, t, loss


def inf_minus_inf(dtype):
    """A log-ratio of sums of exponentials computed naively: log(sum exp(a)) - log(sum exp(b)) with both sums
    overflowing gives inf - inf."""
    big = 1.1 * math.log(torch.finfo(dtype).max)
    lin_a, lin_b = _linear(8, 4, dtype, 0), _linear(8, 4, dtype, 1)
    with torch.no_grad():
        lin_a.bias.fill_(big)
        lin_b.bias.fill_(big)

    class LogRatio(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = lin_a, lin_b

        def forward(self, x):
            return torch.log(torch.exp(self.a(x)).sum(1)) - torch.log(torch.exp(self.b(x)).sum(1))

    x, _ = _data(16, 8, dtype)
    return LogRatio(), x, None, lambda r, t: (r * r).mean()


def norm_at_zero(dtype):
    """A distance loss ||f(a) - f(b)|| on pairs of identical inputs: the norm's gradient x/||x|| is 0/0."""
    emb = _linear(8, 4, dtype, 0)

    class Siamese(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = emb

        def forward(self, pair):
            a, b = pair.unbind(1)
            return torch.linalg.vector_norm(self.emb(a) - self.emb(b), dim=1)

    x, _ = _data(16, 8, dtype)
    pairs = torch.stack([x, x], dim=1)  # identical pairs
    return Siamese(), pairs, None, lambda d, t: d.mean()


# -- clean twins --


def stable_cross_entropy(dtype):
    """Twin of saturating-softmax-log: the same saturated logits through F.cross_entropy (log_softmax)."""
    model = _linear(8, 5, dtype, 0, scale=100.0)
    x, t = _data(16, 8, dtype, classes=5)
    return model, x, t, F.cross_entropy


def johnson_simplified(dtype):
    """Twin of johnson: h(x) = x + 2, the same function simplified."""

    class H(nn.Module):
        def __init__(self):
            super().__init__()
            self.x = nn.Parameter(torch.tensor(2.0 + _johnson_gamma(dtype), dtype=dtype))

        def forward(self, _=None):
            return self.x + 2

    return H(), None, None, lambda h, t: h


def centred_variance(dtype):
    """Twin of catastrophic-cancellation: the same layers without the offset (default bias)."""
    model = nn.Sequential(_linear(8, 8, dtype, 0), NaiveStandardize(), _linear(8, 3, dtype, 1))
    x, t = _data(16, 8, dtype)
    return model, x, t, F.cross_entropy


def shallow_sigmoid(dtype):
    """Twin of vanishing-gradients: three sigmoid layers with their default initialisation."""
    model = nn.Sequential(_linear(8, 8, dtype, 0), nn.Sigmoid(), _linear(8, 8, dtype, 1), nn.Sigmoid(),
                          _linear(8, 3, dtype, 2))
    x, t = _data(16, 8, dtype)
    return model, x, t, F.cross_entropy


def stable_softmax(dtype):
    """Twin of exp-overflow: the same huge logits through torch.log_softmax (max subtracted)."""
    lin = _linear(8, 5, dtype, 0)
    with torch.no_grad():
        lin.bias.fill_(1.1 * math.log(torch.finfo(dtype).max))
    x, t = _data(16, 8, dtype, classes=5)
    return lin, x, t, lambda z, t: F.nll_loss(torch.log_softmax(z, 1), t)


def _zoo_builder(name, fast):
    def build(dtype):
        from verification import zoo

        case = zoo.make(name, dtype=dtype, batch=16 if fast else None)
        return case.model, case.inputs, case.targets, case.loss_fn

    return build


FAULTS = {
    "saturating-softmax-log": saturating_softmax_log,
    "log-near-zero": log_near_zero,
    "johnson-h": johnson,
    "johnson-h-eps-fix": johnson_eps,
    "catastrophic-cancellation": catastrophic_cancellation,
    "exploding-gradients": exploding_gradients,
    "vanishing-gradients": vanishing_gradients,
    "exp-overflow": exp_overflow,
    "relu-at-kink": relu_at_kink,
    "zero-times-inf": zero_times_inf,
    "inf-minus-inf": inf_minus_inf,
    "norm-at-zero": norm_at_zero,
}
TWINS = {
    "stable-cross-entropy": stable_cross_entropy,
    "johnson-simplified": johnson_simplified,
    "centred-variance": centred_variance,
    "shallow-sigmoid": shallow_sigmoid,
    "stable-softmax": stable_softmax,
}
ZOO_FAST = ("mlp-small", "mlp-deep")
ZOO_FULL = ("mlp-small", "mlp-deep", "mlp-wide", "cnn-small", "transformer-tiny")


def cases(fast: bool = False) -> list[Case]:
    out = [Case(n, False, f, (f.__doc__ or "").strip().split("\n")[0]) for n, f in FAULTS.items()]
    out += [Case(n, True, f, (f.__doc__ or "").strip().split("\n")[0], "twin") for n, f in TWINS.items()]
    out += [Case(n, True, _zoo_builder(n, fast), f"zoo model {n}", "zoo") for n in (ZOO_FAST if fast else ZOO_FULL)]
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Running


def _step(model, inputs, targets, loss_fn):
    out = model(inputs) if inputs is not None else model()
    loss = loss_fn(out, targets)
    loss.backward()
    return loss


def _plain_grads(model, inputs, targets, loss_fn) -> str:
    m = copy.deepcopy(model)
    m.zero_grad(set_to_none=True)
    _step(m, inputs, targets, loss_fn)
    grads = [p.grad for p in m.parameters() if p.grad is not None]
    n = sum(g.numel() for g in grads)
    bad = sum(int((~torch.isfinite(g)).sum()) for g in grads)
    return "finite" if bad == 0 else f"{bad}/{n} non-finite"


def run_case(case: Case, dtype=torch.float64) -> dict:
    import ballgrad as bg
    from ballgrad.precision import bits_stats

    t0 = time.perf_counter()
    result = {"name": case.name, "group": case.group, "negative": case.negative, "dtype": str(dtype).split(".")[-1],
              "description": case.description}
    try:
        model, inputs, targets, loss_fn = case.build(dtype)
        model.train()
        result["plain_grads"] = _plain_grads(model, inputs, targets, loss_fn)
        bg.ballify(model)
        with bg.record(model=model) as rec:
            _step(model, inputs, targets, loss_fn)
    except bg.UnsupportedOpError as e:
        result.update(skipped=f"rule missing: {e}", seconds=time.perf_counter() - t0)
        return result
    detected, reasons = detect(rec.events)
    kinds = {}
    for e in rec.events:
        kinds[e.kind] = kinds.get(e.kind, 0) + e.count
    worst = math.inf
    for p in model.parameters():
        if p.grad is not None:
            s = bits_stats(p.grad)["median"]
            if not math.isnan(s):
                worst = min(worst, s)
    result.update(skipped=None, detected=detected, reasons=reasons, events=kinds,
                  worst_grad_bits=worst, seconds=time.perf_counter() - t0)
    return result


def summarize(results: list[dict]) -> dict:
    ran = [r for r in results if not r.get("skipped")]
    faults = [r for r in ran if not r["negative"]]
    zoo = [r for r in ran if r["group"] == "zoo"]
    twins = [r for r in ran if r["group"] == "twin"]

    def rate(rows):
        return sum(r["detected"] for r in rows) / len(rows) if rows else math.nan

    return {"faults": len(faults), "true_positives": sum(r["detected"] for r in faults), "tpr": rate(faults),
            "zoo_negatives": len(zoo), "zoo_false_positives": sum(r["detected"] for r in zoo), "fpr_zoo": rate(zoo),
            "twin_negatives": len(twins), "twin_false_positives": sum(r["detected"] for r in twins),
            "fpr_twins": rate(twins), "skipped": [r["name"] for r in results if r.get("skipped")],
            "detector": {"hard_kinds": list(HARD_KINDS), "soft_kinds": list(SOFT_KINDS), "soft_share": SOFT_SHARE}}


def run(fast: bool = False, dtypes=(torch.float32, torch.float64), only=None, progress=None) -> tuple[list[dict], dict]:
    """Every case in every dtype: (results, summary); the summary is over all rows, with ``by_dtype`` summaries."""
    if isinstance(dtypes, torch.dtype):
        dtypes = (dtypes,)
    results = []
    for dtype in dtypes:
        for case in cases(fast):
            if only and case.name not in only:
                continue
            if progress:
                progress(f"{case.name} ({str(dtype).split('.')[-1]})")
            results.append(run_case(case, dtype))
    summary = summarize(results)
    summary["by_dtype"] = {d: summarize([r for r in results if r["dtype"] == d])
                           for d in dict.fromkeys(r["dtype"] for r in results)}
    return results, summary


def format_results(results: list[dict], summary: dict) -> str:
    from ballgrad.diagnostics import format_table

    rows = [["case", "dtype", "group", "detected", "plain grads", "grad bits", "events", "seconds"]]
    for r in results:
        if r.get("skipped"):
            rows.append([r["name"], r["dtype"], r["group"], "skipped", "", "", r["skipped"][:60],
                         f"{r['seconds']:.1f}"])
            continue
        wb = r["worst_grad_bits"]
        wb_txt = "exact" if wb == math.inf else ("none" if wb == -math.inf else f"{wb:.0f}")
        ev = ", ".join(f"{k} {v}" for k, v in sorted(r["events"].items())) or "-"
        mark = "yes" if r["detected"] else "no"
        if r["detected"] == r["negative"]:
            mark += " (!)"  # a miss or a false positive
        rows.append([r["name"], r["dtype"], r["group"], mark, r["plain_grads"], wb_txt, ev, f"{r['seconds']:.1f}"])
    table = format_table(rows, right=(5, 7))
    pct = lambda x: "n/a" if math.isnan(x) else f"{100 * x:.0f}%"

    def rates(label, s):
        return (f"{label}: TPR {pct(s['tpr'])} ({s['true_positives']}/{s['faults']} faults detected); "
                f"FPR on zoo models {pct(s['fpr_zoo'])} ({s['zoo_false_positives']}/{s['zoo_negatives']}); "
                f"FPR on clean twins {pct(s['fpr_twins'])} ({s['twin_false_positives']}/{s['twin_negatives']})")

    lines = [table, "", "grad bits: the worst parameter gradient's median certified bits ('none': its balls contain 0)"]
    lines += [rates(d, s) for d, s in summary.get("by_dtype", {}).items()]
    lines.append(rates("all", summary))
    if summary["skipped"]:
        lines.append("skipped (a rule is missing): " + ", ".join(summary["skipped"]))
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fast", action="store_true", help="the test suite's subset (zoo MLPs at batch 16)")
    parser.add_argument("--dtype", nargs="+", default=["float32", "float64"], choices=["float32", "float64"])
    parser.add_argument("--json", metavar="PATH", default=os.path.join("results", "instabilities.json"),
                        help="where to write the results (default results/instabilities.json)")
    parser.add_argument("--only", nargs="*", help="case names")
    args = parser.parse_args(argv)
    dtypes = tuple(getattr(torch, d) for d in args.dtype)
    results, summary = run(args.fast, dtypes, args.only,
                           progress=lambda n: print(f"  running {n} ...", file=sys.stderr, flush=True))
    print(format_results(results, summary))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"summary": summary, "results": results}, f, indent=2, default=str)
        print(f"wrote {args.json}")
    ok = all(s["tpr"] == 1.0 and not (s["fpr_zoo"] > 0.05) for s in [summary, *summary["by_dtype"].values()])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
