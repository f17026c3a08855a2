"""Per-layer accuracy report and precision guidance (DESIGN.md §6).

``ballgrad.report(model, inputs, targets, loss_fn) -> LayerReport``
    Per leaf module (or chosen modules), from one ballified training step: the output's magnitude and radius, its
    relative accuracy in bits, the bits of the gradient flowing back through the module's output and of its
    parameter gradients, and the module's error functional Phi(eps) = L eps + Delta measured from the balls; along a
    chain of modules the composed Phi next to the radius measured directly.

``ballgrad.precision_plan(model, inputs, targets, loss_fn, target_bits=8) -> PrecisionPlan``
    Per layer, the narrowest of bfloat16/float16/float32/float64 that keeps every parameter gradient's certified
    accuracy at ``target_bits``, confirmed by running the model with those dtypes.

Statistics of bits. ``rel_accuracy_bits`` is floor(log2(|mid|/rad)); a zero midpoint has no relative accuracy (Arb
gives -inf for a ball around 0), so the statistics (median, min) are taken over the elements with a non-zero
midpoint (or an infinite radius: nothing known); ``nonzero`` counts them. -inf: a ball containing 0 (no certified
bit); +inf: exact.

The error functional (NumGeom-AD's Phi, measured rather than estimated). For a module f called on input midpoints
x (captured in the training step), run a copy of f alone, twice, without autograd:

- on the point balls (x, 0): its output radius r0 (elementwise). ``Delta = max r0``: the module's own rounding
  (and its parameters' radii);
- on the balls (x, eps_f) (every floating input element gets radius eps_f): its output radius r1.
  ``L = max over output elements of (r1 - r0) / eps_f``, rounded up: the extra output radius per unit of input
  radius, the sup-norm amplification of the ball rules (for Linear, about the largest row sum of |W|).

Then ``Phi_f(eps_f) = L eps_f + Delta >= max r1`` exactly (each element: r1 = (r1 - r0) + r0 <= L eps_f + Delta;
every operation rounded upward). Along a chain f_1, ..., f_n (each module's only floating input is the previous
module's output, the first's is the model input, the model output is the last's) the composition is
Phi_{g o f}(eps) = L_g (L_f eps + Delta_f) + Delta_g = Phi_g(Phi_f(eps)), i.e. eps_1 = eps and
eps_{i+1} = Phi_i(eps_i), each L_i measured at the eps_i it is composed at. The *direct* measurement runs the whole
model on (inputs, eps) and records each module's largest output radius. The composition bounds it whenever the rules
are inclusion-monotone in the input radii (a wider input ball never gives a narrower output ball): the direct run
feeds module i the same midpoints with radii <= eps_i elementwise. ``LayerReport.composition_holds`` checks it; the
loss is the chain's last stage (its L, Delta measured the same way with the targets fixed). For a model that is not
a chain (residual connections, several inputs per module), each module's L is measured at the largest input radius
it receives in the direct run and no composed value is given. ``eps`` defaults to u * max|inputs| (the inputs known
to the working precision). Modules must be deterministic (dropout off): the report checks that the isolated runs
reproduce the step's midpoints bit for bit.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field
from typing import Callable, Sequence

import torch
from torch import nn

from ballgrad import diagnostics
from ballgrad.diagnostics import format_table, precision_bits
from ballgrad.nn import ballify, is_ballified
from ballgrad.tensor import BallTensor, ball

__all__ = ["report", "LayerReport", "LayerStats", "precision_plan", "PrecisionPlan", "bits_stats"]


# ----------------------------------------------------------------------------------------------------------------------
# Small helpers


def _up(x: float) -> float:
    return math.nextafter(x, math.inf) if math.isfinite(x) else x


def _mul_up(a: float, b: float) -> float:
    if a == 0 or b == 0:
        return 0.0
    return _up(a * b)


def _add_up(a: float, b: float) -> float:
    return _up(a + b)


def bits_stats(x) -> dict:
    """Median and minimum of ``rel_accuracy_bits`` over the elements with a non-zero midpoint (see module docstring)."""
    if not isinstance(x, BallTensor):
        return {"median": math.inf, "min": math.inf, "nonzero": int((x != 0).sum()) if torch.is_tensor(x) else 0}
    mid = x.mid.detach()
    # zero midpoints have no relative accuracy and are left out, unless their radius is infinite (nothing known);
    # NaN midpoints count too (-inf bits)
    nz = (mid != 0) | torch.isinf(x.rad)
    n = int(nz.sum())
    if n == 0:
        return {"median": math.nan, "min": math.nan, "nonzero": 0}
    b = x.rel_accuracy_bits()[nz]
    return {"median": float(b.median()), "min": float(b.min()), "nonzero": n}


def _max(t: torch.Tensor) -> float:
    if t.numel() == 0:
        return 0.0
    t = t.detach()
    if t.is_floating_point() and torch.isnan(t).any():
        return math.nan
    return float(t.max())


def _floating_leaves(tree) -> list:
    return [t for t in diagnostics._leaves(tree) if isinstance(t, torch.Tensor) and t.is_floating_point()]


def _with_radius(tree, radius: float | None):
    """A copy of ``tree`` whose floating tensors become balls around their midpoints with radius ``radius``
    (0: point balls; None: leave them as they are)."""
    from torch.utils._pytree import tree_map

    def f(t):
        if isinstance(t, torch.Tensor) and t.is_floating_point() and radius is not None:
            mid = t.mid if isinstance(t, BallTensor) else t
            return ball(mid.detach(), None if radius == 0 else torch.full_like(mid, radius, dtype=torch.float64))
        return t

    return tree_map(f, tree)


def _loss(loss_fn, out, targets):
    return loss_fn(out) if targets is None else loss_fn(out, targets)


def _call_model(model, inputs):
    return model(*inputs) if isinstance(inputs, (tuple, list)) else model(inputs)


def _fmt(x, digits=3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if isinstance(x, float) and math.isinf(x):
        return "inf" if x > 0 else "-inf"
    if x == 0:
        return "0"
    return f"{x:.{digits - 1}e}"


def _fmt_bits(x) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if math.isinf(x):
        return "exact" if x > 0 else "none"
    return f"{x:.0f}"


def _leaf_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if not list(m.children())]


def _resolve(model: nn.Module, names) -> dict[str, nn.Module]:
    mods = dict(model.named_modules())
    out = {}
    for n in names:
        if n not in mods:
            raise KeyError(f"no module named {n!r} in the model (names: {', '.join(k for k in mods if k)})")
        out[n] = mods[n]
    return out


# ----------------------------------------------------------------------------------------------------------------------
# The report


@dataclass
class LayerStats:
    """One module call of the report (a module called k times has k rows, named ``name``, ``name#2``, ...)."""

    name: str
    type: str
    shape: list
    out_max_abs: float  # max |mid| of the output
    out_max_rad: float  # max radius of the output in the training step (point inputs)
    forward_bits: dict  # bits_stats of the output
    grad_out_bits: dict | None  # bits_stats of the gradient w.r.t. the output (None: no gradient flowed)
    param_grad_bits: dict  # parameter name -> bits_stats of its gradient
    eps_in: float  # input radius at which L was measured
    L: float
    delta: float
    phi: float  # Phi(eps_in) = L eps_in + Delta (rounded up)
    composed: float | None  # the composed Phi at this module's output (chain models), else None
    direct: float  # max output radius when the model input has radius eps
    reproduced: bool = True  # the isolated runs gave the step's midpoints bit for bit

    @property
    def param_grad_median(self) -> float:
        vals = [s["median"] for s in self.param_grad_bits.values() if not math.isnan(s["median"])]
        return min(vals) if vals else math.nan


@dataclass
class LayerReport:
    layers: list[LayerStats]
    eps: float
    dtype: str
    chain: bool
    loss: LayerStats | None
    output_composed: float | None
    output_direct: float
    loss_composed: float | None
    loss_direct: float | None
    events: list = field(default_factory=list)
    notes: list = field(default_factory=list)

    @property
    def composition_holds(self) -> bool | None:
        """True when every composed Phi bounds the directly measured radius (None for non-chain models)."""
        if not self.chain:
            return None
        rows = self.layers + ([self.loss] if self.loss is not None else [])
        return all(r.composed is not None and r.composed >= r.direct for r in rows)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["composition_holds"] = self.composition_holds
        d["events"] = [e.to_dict() if hasattr(e, "to_dict") else e for e in self.events]
        return d

    def table(self) -> str:
        rows = [["layer", "type", "|out| max", "rad max", "fwd bits", "grad-out bits", "param-grad bits",
                 "eps in", "L", "Delta", "Phi composed", "direct"]]
        for r in self.layers + ([self.loss] if self.loss is not None else []):
            go = r.grad_out_bits["median"] if r.grad_out_bits else None
            pg = [s for s in r.param_grad_bits.values()]
            pg_txt = (f"{_fmt_bits(min(s['median'] for s in pg))} / {_fmt_bits(min(s['min'] for s in pg))}"
                      if pg else "-")
            rows.append([r.name + ("" if r.reproduced else " (!)"), r.type, _fmt(r.out_max_abs), _fmt(r.out_max_rad),
                         f"{_fmt_bits(r.forward_bits['median'])} / {_fmt_bits(r.forward_bits['min'])}",
                         _fmt_bits(go), pg_txt, _fmt(r.eps_in), _fmt(r.L), _fmt(r.delta), _fmt(r.composed),
                         _fmt(r.direct)])
        return format_table(rows, right=tuple(range(2, 12)))

    def __str__(self):
        lines = [f"ballgrad layer report ({self.dtype}, input radius eps = {self.eps:.3e})", self.table(), ""]
        lines.append("bits: median / min over non-zero elements ('none': a ball contains 0; 'exact': radius 0); "
                     "param-grad: the worst parameter's median / min")
        if self.chain:
            verdict = "holds" if self.composition_holds else "VIOLATED"
            lines.append(f"end to end: composed Phi(eps) = {_fmt(self.output_composed)} at the output vs direct "
                         f"{_fmt(self.output_direct)}"
                         + (f"; loss {_fmt(self.loss_composed)} vs {_fmt(self.loss_direct)}"
                            if self.loss_direct is not None else "")
                         + f" (composition bound {verdict})")
        else:
            lines.append(f"not a chain of modules: no composed Phi; direct output radius {_fmt(self.output_direct)}")
        for n in self.notes:
            lines.append("note: " + n)
        if self.events:
            kinds = {}
            for e in self.events:
                kinds[e.kind] = kinds.get(e.kind, 0) + e.count
            lines.append("events in the step: " + ", ".join(f"{k} {v}" for k, v in sorted(kinds.items())))
        return "\n".join(lines)

    def plot(self, *, figsize=(9, 6)):
        """A matplotlib Figure: bits per layer (forward output, backward signal, parameter gradients) and, on a log
        scale, the composed Phi next to the direct radius. Nothing is shown; call ``fig.savefig``."""
        from matplotlib.figure import Figure

        fig = Figure(figsize=figsize, layout="constrained")
        ax1, ax2 = fig.subplots(2, 1, sharex=True)
        rows = self.layers + ([self.loss] if self.loss is not None else [])
        xs = list(range(len(rows)))
        cap = precision_bits(getattr(torch, self.dtype.replace("torch.", ""), torch.float64))

        def clip(v):
            if v is None or math.isnan(v):
                return math.nan
            return max(0.0, min(float(cap), v))

        ax1.plot(xs, [clip(r.forward_bits["median"]) for r in rows], "o-", label="forward output (median)")
        ax1.plot(xs, [clip(r.grad_out_bits["median"]) if r.grad_out_bits else math.nan for r in rows], "s-",
                 label="backward: grad w.r.t. output (median)")
        ax1.plot(xs, [clip(r.param_grad_median) for r in rows], "^", markersize=9,
                 label="parameter gradients (worst median)")
        ax1.set_ylabel("certified bits")
        ax1.set_ylim(-1, cap + 2)
        ax1.legend(fontsize=8)
        ax1.set_title(f"relative accuracy per layer ({self.dtype})")
        direct = [r.direct if r.direct > 0 else math.nan for r in rows]
        ax2.semilogy(xs, direct, "o-", label="direct radius (input radius eps)")
        if self.chain:
            ax2.semilogy(xs, [r.composed if r.composed else math.nan for r in rows], "x--",
                         label="composed Phi(eps)")
        ax2.semilogy(xs, [r.delta if r.delta > 0 else math.nan for r in rows], ".:", label="Delta (own rounding)")
        ax2.set_ylabel("radius")
        ax2.legend(fontsize=8)
        ax2.set_xticks(xs)
        ax2.set_xticklabels([f"{r.name} {r.type}" for r in rows], rotation=45, ha="right", fontsize=8)
        return fig


@dataclass
class _Call:
    name: str
    module: nn.Module
    args: tuple
    kwargs: dict
    output: object
    grad_out: object = None


def _measure(module: nn.Module, args, kwargs, eps: float, expected_out) -> tuple[float, float, bool, float]:
    """(L, Delta, reproduced, max r1) of ``module`` at the captured inputs (see the module docstring)."""
    mod = copy.deepcopy(module)
    with torch.no_grad():
        out0 = _call_on(mod, _with_radius(args, 0), _with_radius(kwargs, 0))
        out1 = _call_on(mod, _with_radius(args, eps), _with_radius(kwargs, eps)) if eps > 0 else out0
    o0 = [t for t in _floating_leaves(out0)]
    o1 = [t for t in _floating_leaves(out1)]
    exp = [t for t in _floating_leaves(expected_out)]
    reproduced = len(o0) == len(exp) and all(_same_bits(_mid(a), _mid(b)) for a, b in zip(o0, exp))
    delta = max((_max(_rad(t)) for t in o0), default=0.0)
    r1max = max((_max(_rad(t)) for t in o1), default=0.0)
    L = 0.0
    if eps > 0 and _floating_leaves(args) + _floating_leaves(kwargs):
        for a, b in zip(o0, o1):
            r0, r1 = _rad(a).to(torch.float64), _rad(b).to(torch.float64)
            if r1.numel() == 0:
                continue
            if not bool(torch.isfinite(r1).all()):
                L = math.inf
                break
            # (r1 - r0) / eps rounded up: each RN op bumped by one ulp (F2)
            from ballgrad import rounding

            per = rounding.div_up(torch.clamp_min(rounding.sub_up(r1, r0), 0), torch.tensor(eps, dtype=torch.float64))
            L = max(L, float(per.max()))
    return L, delta, reproduced, r1max


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    a, b = a.detach(), b.detach()
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    return bool(torch.equal(torch.isnan(a), torch.isnan(b)) and torch.equal(torch.nan_to_num(a), torch.nan_to_num(b)))


def _call_on(mod, args, kwargs):
    return mod(*args, **kwargs)


def _mid(t):
    return t.mid if isinstance(t, BallTensor) else t


def _rad(t):
    return t.rad if isinstance(t, BallTensor) else torch.zeros_like(t)


def _stats_row(name, call: _Call, eps_in, L, delta, composed, direct, reproduced, params) -> LayerStats:
    outs = _floating_leaves(call.output)
    o = outs[0] if outs else None
    fwd = bits_stats(o) if o is not None else {"median": math.nan, "min": math.nan, "nonzero": 0}
    grad_out = bits_stats(call.grad_out) if isinstance(call.grad_out, torch.Tensor) else None
    pg = {}
    for pname, p in params:
        if p.grad is not None:
            pg[pname] = bits_stats(p.grad)
    phi = _add_up(_mul_up(L, eps_in), delta)
    return LayerStats(
        name=name, type=type(call.module).__name__, shape=list(o.shape) if o is not None else [],
        out_max_abs=_max(_mid(o).abs()) if o is not None else math.nan,
        out_max_rad=_max(_rad(o)) if o is not None else math.nan,
        forward_bits=fwd, grad_out_bits=grad_out, param_grad_bits=pg, eps_in=eps_in, L=L, delta=delta, phi=phi,
        composed=composed, direct=direct, reproduced=reproduced)


def report(model: nn.Module, inputs, targets=None, loss_fn: Callable | None = None, *, eps: float | None = None,
           modules: Sequence[str] | None = None, seed: int = 0) -> LayerReport:
    """Per-layer accuracy and error functionals of one training step (see the module docstring).

    ``model`` is deep-copied (and ballified with exact parameters if it is not already; a ballified model keeps its
    parameter radii); ``inputs`` a tensor or a tuple of positional inputs; ``loss_fn(output, targets)`` (or
    ``loss_fn(output)`` when ``targets`` is None); without ``loss_fn`` only the forward columns are filled.
    ``modules``: module names (as in ``named_modules()``) to report instead of every leaf module.
    """
    m = copy.deepcopy(model)
    if not is_ballified(m):
        ballify(m)
    names = list(modules) if modules is not None else _leaf_names(m)
    chosen = _resolve(m, names)
    floats = _floating_leaves(inputs)
    dtype = floats[0].dtype if floats else torch.get_default_dtype()
    if eps is None:
        scale = max((_max(_mid(t).abs()) for t in floats), default=1.0) or 1.0
        eps = _up(scale * 2.0 ** -precision_bits(dtype))
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")

    # 1. the training step: point inputs, hooks capture every call of the chosen modules
    calls: list[_Call] = []
    counts: dict[str, int] = {}

    def make_hook(name):
        def hook(mod, args, kwargs, output):
            counts[name] = counts.get(name, 0) + 1
            label = name if counts[name] == 1 else f"{name}#{counts[name]}"
            call = _Call(label, mod, args, kwargs, output)
            calls.append(call)
            outs = _floating_leaves(output)
            if outs and outs[0].requires_grad:
                def grab(g, call=call):
                    call.grad_out = g
                outs[0].register_hook(grab)
        return hook

    handles = [mod.register_forward_hook(make_hook(n), with_kwargs=True) for n, mod in chosen.items()]
    try:
        with torch.random.fork_rng(devices=[]), diagnostics.record(model=m) as rec:
            torch.manual_seed(seed)
            out = _call_model(m, inputs)
            loss = None
            if loss_fn is not None:
                loss = _loss(loss_fn, out, targets)
                loss.backward()
    finally:
        for h in handles:
            h.remove()

    # 2. the direct run: every floating model input gets radius eps
    direct_calls: list[float] = []
    direct_inputs: list[float] = []

    def direct_hook(mod, args, kwargs, output):
        direct_calls.append(max((_max(_rad(t)) for t in _floating_leaves(output)), default=0.0))
        direct_inputs.append(max((_max(_rad(t)) for t in _floating_leaves((args, kwargs))), default=0.0))

    handles = [mod.register_forward_hook(direct_hook, with_kwargs=True) for mod in chosen.values()]
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(seed)
            out_eps = _call_model(m, _with_radius(inputs, eps))
            loss_eps = _loss(loss_fn, out_eps, targets) if loss_fn is not None else None
    finally:
        for h in handles:
            h.remove()
    notes = []
    if len(direct_calls) != len(calls):
        raise RuntimeError("the model called its modules differently in the two runs (data-dependent control flow?)")
    out_first = _floating_leaves(out)
    out_eps_first = _floating_leaves(out_eps)
    output_direct = _max(_rad(out_eps_first[0])) if out_eps_first else 0.0
    if out_first and out_eps_first and not torch.equal(torch.nan_to_num(_mid(out_first[0])),
                                                         torch.nan_to_num(_mid(out_eps_first[0]))):
        notes.append("the two runs gave different output midpoints (nondeterministic model?)")

    # 3. chain?
    chain = bool(calls)
    prev = inputs[0] if isinstance(inputs, (tuple, list)) and len(inputs) == 1 else inputs
    for c in calls:
        fl = _floating_leaves((c.args, c.kwargs))
        if len(fl) != 1 or fl[0] is not prev:
            chain = False
            break
        outs = _floating_leaves(c.output)
        if len(outs) != 1:
            chain = False
            break
        prev = outs[0]
    if chain and not (out_first and out_first[0] is prev):
        chain = False

    # 4. per call: L and Delta from isolated runs
    params_of = {n: list(mod.named_parameters(recurse=bool(list(mod.children())))) for n, mod in chosen.items()}
    seen_params: set[str] = set()
    layers = []
    eps_i = eps
    composed = None
    for k, c in enumerate(calls):
        base = c.name.split("#")[0]
        e_in = eps_i if chain else direct_inputs[k]
        L, delta, reproduced, _ = _measure(c.module, c.args, c.kwargs, e_in, c.output)
        if chain:
            composed = _add_up(_mul_up(L, e_in), delta)
        params = [] if base in seen_params else [(f"{base}.{pn}" if base else pn, p) for pn, p in params_of[base]]
        seen_params.add(base)
        row = _stats_row(c.name, c, e_in, L, delta, composed if chain else None, direct_calls[k], reproduced, params)
        layers.append(row)
        if chain:
            eps_i = composed
        if not reproduced:
            notes.append(f"{c.name}: the isolated run did not reproduce the step's midpoints (nondeterministic?)")

    # 5. the loss as the chain's last stage
    loss_row = None
    loss_direct = loss_composed = None
    output_composed = composed if chain else None
    if loss_fn is not None and out_first:
        loss_direct = _max(_rad(loss_eps)) if isinstance(loss_eps, BallTensor) else 0.0
        e_in = eps_i if chain else output_direct
        loss_mod = _LossStage(loss_fn, targets)
        L, delta, reproduced, _ = _measure(loss_mod, (_mid(out_first[0]),), {}, e_in, loss)
        if chain:
            loss_composed = _add_up(_mul_up(L, e_in), delta)
        call = _Call("loss", loss_mod, (), {}, loss, grad_out=None)
        loss_row = _stats_row("loss", call, e_in, L, delta, loss_composed, loss_direct, reproduced, [])
        loss_row.type = getattr(loss_fn, "__name__", type(loss_fn).__name__)
    return LayerReport(layers=layers, eps=eps, dtype=str(dtype).replace("torch.", ""), chain=chain, loss=loss_row,
                       output_composed=output_composed, output_direct=output_direct, loss_composed=loss_composed,
                       loss_direct=loss_direct, events=rec.events, notes=notes)


class _LossStage(nn.Module):
    """The loss with fixed targets, as a module of the model output (for its L and Delta)."""

    def __init__(self, loss_fn, targets):
        super().__init__()
        self.loss_fn = loss_fn
        self.targets = targets

    def forward(self, out):
        return _loss(self.loss_fn, out, self.targets)


# ----------------------------------------------------------------------------------------------------------------------
# Precision guidance

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32, "float64": torch.float64}


def _dtype_name(d: torch.dtype) -> str:
    return str(d).replace("torch.", "")


class _Cast(nn.Module):
    """Runs ``inner`` with midpoints in ``dtype``: floating inputs and parameters are cast as balls (the cast error
    goes into the radius, so the balls still contain the master values), gradients flow back to the master
    parameters through the cast."""

    def __init__(self, inner: nn.Module, dtype: torch.dtype):
        super().__init__()
        self.inner = inner
        self.dtype = dtype

    def forward(self, *args, **kwargs):
        from torch.func import functional_call
        from torch.utils._pytree import tree_map

        def cast(t):
            if isinstance(t, torch.Tensor) and t.is_floating_point():
                b = t if isinstance(t, BallTensor) else ball(t.detach())
                return b if b.dtype == self.dtype else b.to(self.dtype)
            return t

        params = {n: (p if p.dtype == self.dtype else p.to(self.dtype)) for n, p in self.inner.named_parameters()}
        return functional_call(self.inner, params, tree_map(cast, args), tree_map(cast, kwargs))


def _units(model: nn.Module, modules=None) -> list[str]:
    """Planned units: modules with parameters of their own, taken whole (a module with direct parameters keeps its
    children, e.g. MultiheadAttention's out_proj, which its forward uses without calling it)."""
    if modules is not None:
        return list(modules)
    units = []

    def walk(prefix, mod):
        if list(mod.parameters(recurse=False)):
            units.append(prefix)
            return
        for n, child in mod.named_children():
            walk(f"{prefix}.{n}" if prefix else n, child)

    walk("", model)
    return units


def _set_module(root: nn.Module, name: str, new: nn.Module) -> nn.Module:
    if name == "":
        return new
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)
    return root


@dataclass
class PrecisionPlan:
    target_bits: float
    statistic: str
    master_dtype: str
    loss_dtype: str
    choices: dict  # unit -> dtype name
    tried: dict  # unit -> {dtype name: score with every other unit in float64}
    baseline: dict  # parameter -> score with every unit in float64
    achieved: dict  # parameter -> score with the plan
    feasible: bool  # the plan meets the target
    runs: int
    loss_scale: float = 1.0

    @property
    def achieved_bits(self) -> float:
        return min(self.achieved.values()) if self.achieved else math.nan

    def to_dict(self) -> dict:
        d = asdict(self)
        d["achieved_bits"] = self.achieved_bits
        return d

    def __str__(self):
        rows = [["layer", "dtype", *[n for n in _DTYPES], "plan bits (worst param)"]]
        for u, d in self.choices.items():
            tried = self.tried.get(u, {})
            prefix = f"{u}." if u else ""
            mine = [v for k, v in self.achieved.items() if k.startswith(prefix)]
            rows.append([u or "(model)", d, *[_fmt_bits(tried[n]) if n in tried else "" for n in _DTYPES],
                         _fmt_bits(min(mine)) if mine else "-"])
        head = (f"ballgrad precision plan: target {self.target_bits:g} certified bits ({self.statistic} over each "
                f"parameter gradient's non-zero elements), master weights {self.master_dtype}, loss in "
                f"{self.loss_dtype}" + (f", loss scale {self.loss_scale:g}" if self.loss_scale != 1 else ""))
        tail = (f"confirmed with the plan's dtypes: worst parameter gradient {_fmt_bits(self.achieved_bits)} bits "
                f"(all float64: {_fmt_bits(min(self.baseline.values()) if self.baseline else math.nan)}) -> "
                + ("target met" if self.feasible else "target NOT met (even float64 everywhere falls short)")
                + f"; {self.runs} ball runs")
        note = "columns per dtype: the score with that layer in that dtype and every other layer in float64"
        return "\n".join([head, format_table(rows, right=tuple(range(2, 7))), note, tail])


def _score(stats: dict, statistic: str) -> float:
    v = stats["median"] if statistic == "median" else stats["min"]
    return math.inf if math.isnan(v) else v  # an all-zero gradient constrains nothing


def precision_plan(model: nn.Module, inputs, targets, loss_fn: Callable, target_bits: float = 8, *,
                   dtypes: Sequence = ("bfloat16", "float16", "float32", "float64"), statistic: str = "median",
                   modules: Sequence[str] | None = None, loss_dtype=None, loss_scale: float = 1.0,
                   seed: int = 0) -> PrecisionPlan:
    """Per layer, the narrowest midpoint dtype that keeps the gradient's certified accuracy, then a confirming run.

    Criterion: every parameter gradient's certified relative accuracy (``statistic="median"``: the median over its
    non-zero elements of ``rel_accuracy_bits``; ``"min"``: every such element) is >= ``target_bits``.
    Layers (``modules`` or, by default, every module with parameters of its own, taken whole) are tried one at a time
    from the narrowest dtype up, with every other layer in float64; the first dtype meeting the target is chosen.
    The plan is then run as a whole (each layer's inputs and parameters cast as balls to its dtype, radii in float32
    for half types, master parameters and the loss in the model's dtype unless ``loss_dtype``); while it misses the
    target, the chosen layer with the smallest margin is widened one step and the plan re-run. The certified
    accuracy of the confirming run is reported (``achieved``), and ``feasible`` says whether it meets the target.

    ``loss_scale``: a power of two multiplying the loss before backward (static loss scaling, as mixed-precision
    training does for float16). It is exact, so relative accuracies need no unscaling; it keeps small float16
    gradients above the underflow threshold, whose absolute error terms otherwise swallow them.
    """
    if statistic not in ("median", "min"):
        raise ValueError("statistic must be 'median' or 'min'")
    mantissa, _ = math.frexp(loss_scale)
    if not (loss_scale > 0 and mantissa == 0.5):
        raise ValueError(f"loss_scale must be a power of two (exact scaling), got {loss_scale}")
    order = [(_DTYPES[d] if isinstance(d, str) else d) for d in dtypes]
    order.sort(key=lambda d: precision_bits(d))
    master = copy.deepcopy(model)
    if not is_ballified(master):
        ballify(master)
    mdt = next((p.dtype for p in master.parameters() if p.is_floating_point()), torch.float32)
    ldt = loss_dtype or mdt
    units = _units(master, modules)
    _resolve(master, units)
    runs = 0

    def run(config: dict) -> dict:
        nonlocal runs
        runs += 1
        m = copy.deepcopy(master)
        for u in sorted(config, key=lambda s: -s.count(".")):
            m = _set_module(m, u, _Cast(m.get_submodule(u) if u else m, config[u]))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            out = _call_model(m, inputs)
            outs = _floating_leaves(out)
            if outs and outs[0].dtype != ldt:
                out = outs[0].to(ldt)
            loss = _loss(loss_fn, out, targets)
            (loss * loss_scale if loss_scale != 1 else loss).backward()
        result = {}
        for n, p in m.named_parameters():
            clean = ".".join(part for part in n.split(".") if part != "inner")
            result[clean] = _score(bits_stats(p.grad), statistic) if p.grad is not None else math.inf
        return result

    widest = order[-1]
    base_config = {u: widest for u in units}
    baseline = run(base_config)
    choices: dict[str, torch.dtype] = {}
    tried: dict[str, dict] = {}
    margins: dict[str, float] = {}
    for u in units:
        tried[u] = {}
        for d in order:
            if d == widest:
                score = min(baseline.values()) if baseline else math.inf
            else:
                score = min(run({**base_config, u: d}).values())
            tried[u][_dtype_name(d)] = score
            if score >= target_bits or d == widest:
                choices[u] = d
                margins[u] = score - target_bits
                break
    achieved = run(choices)
    while min(achieved.values(), default=math.inf) < target_bits:
        widenable = [u for u in units if choices[u] != widest]
        if not widenable:
            break
        u = min(widenable, key=lambda v: (margins[v], precision_bits(choices[v])))
        choices[u] = order[order.index(choices[u]) + 1]
        margins[u] = tried[u].get(_dtype_name(choices[u]), math.inf) - target_bits
        achieved = run(choices)
    feasible = min(achieved.values(), default=math.inf) >= target_bits
    return PrecisionPlan(target_bits=target_bits, statistic=statistic, master_dtype=_dtype_name(mdt),
                         loss_dtype=_dtype_name(ldt), choices={u: _dtype_name(d) for u, d in choices.items()},
                         tried=tried, baseline=baseline, achieved=achieved, feasible=feasible, runs=runs,
                         loss_scale=loss_scale)
