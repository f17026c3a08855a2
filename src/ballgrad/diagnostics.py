"""Events that say where information was lost (DESIGN.md §6).

``with ballgrad.record() as rec:`` collects events from every ball op run inside the block:

================ ===================================================================================================
kind             emitted when
================ ===================================================================================================
``kink``         a ball straddles a kink (relu at 0, abs, clamp bounds, max/min ties): the result is a hull
``undecided``    a comparison, ``where`` or selection differs between points of the balls
``domain``       log/sqrt/div/pow... of a ball touching a singular point (the radius becomes infinite)
``overflow``     an op turned finite input radii into an infinite radius that no ``domain`` event explains
``nan``          an op created NaN midpoints: for pointwise ops the NaN elements whose inputs are not NaN; other
                 ops report only when no input midpoint is NaN (NaNs flowing in are not reported again)
``cancellation`` a pointwise op lost more than ``cancellation_bits`` bits of relative accuracy (see below)
================ ===================================================================================================

Each ``Event`` has ``kind``, ``op`` (aten overload), ``module`` (the ``nn.Module`` path, or None), ``count`` (elements
affected), ``detail``, ``phase`` (``"forward"`` or ``"backward"``), ``total`` (elements of the op's output, when
known) and ``thread`` (the name of the thread that ran the op). ``rec.summary()`` renders a table.

Cancellation. Relative accuracy is ``BallTensor.rel_accuracy_bits`` (floor(log2(|mid|/rad))). An exact input counts
as p bits (the dtype's precision: 24 for float32, 53 for float64, 11 for float16, 8 for bfloat16); an inexact input
counts with its actual bits, which can exceed p (x*x with its exact TwoProduct error); the output's bits are capped
at p. For an op tagged ``torch.Tag.pointwise`` (add, sub, mul, div, exp, log, where, ...), elementwise over the
broadcast shape: ``drop = b_in - max(b_out, 0)`` with b_in the least accurate floating ball input's bits, and an
element counts when ``drop > cancellation_bits`` (default 10) and the output has fewer than p bits (an op cannot lose
more bits than its inputs had, and an output still accurate to p bits lost nothing that matters). The reference is the *least* accurate input, not the best one: the relative
accuracy of a product or quotient is limited by its least accurate factor, so comparing against the best input would
flag every product of an accurate and an inaccurate factor; for a ± b the output keeps about min(bits) -
log2(max(|a|, |b|)/|a ± b|) bits, so the drop measures the cancellation itself. Elements where an input ball already
contains 0 (no relative accuracy), where the output radius is infinite (reported as overflow/domain/nan) or where
the output is exact are not counted; an output ball that contains 0 while the inputs had bits counts (a drop of
every bit they had: a 3-bit input whose sum crosses 0 lost 3 bits, not "more than 10"). Reductions and contractions (sum, mm, conv, ...) are not checked: an output element has no single input
element to compare with, and their worst-case rounding bound alone costs log2(k) bits for k terms, which this test
would confuse with cancellation; the per-layer report (``ballgrad.report``) shows the bits they keep. In-place
pointwise ops are compared with their inputs as they were before the op. Only the outermost op is scanned: the ball
ops a fused rule composes internally are implementation details (their explicit ``domain``/``kink`` events still
reach the recorder).

Modules. While at least one recorder is active, global module forward pre/post hooks
(``torch.nn.modules.module.register_module_forward_pre_hook`` / ``register_module_forward_hook``) keep a per-thread
stack of the modules being run, so forward events carry the innermost module's path (relative to ``record(model=)``'s
model, or to the outermost module being run; its own ops carry its class name). For backward ops: when a module's
forward finishes under a recorder, the autograd nodes it created (the nodes reachable from its outputs whose
sequence numbers are not older than the module's call, plus the ``AccumulateGrad`` nodes of its own parameters) are
tagged in their ``metadata``; an event raised while the autograd engine runs a node
(``torch._C._current_autograd_node()``) carries that node's module. This needs the forward to have run under a
recorder; ops the engine runs between nodes (summing gradient contributions of a tensor used several times) and nodes
created outside any module carry ``module=None``. Hooks are removed when the last recorder closes.

Threads. Recorders are global: an event from any thread (including autograd engine threads) goes to every recorder
active at that moment. Two threads recording at once therefore each see their own events and possibly the other's
(``Event.thread`` says which thread ran the op; ``rec.events_of_thread()`` filters). The module stack is per thread.

Cost. When no recorder is active, the dispatcher reads one module attribute (``diagnostics.active``) and nothing
else happens: no hooks are installed and no accuracy is computed.
"""

from __future__ import annotations

import contextlib
import math
import threading
from dataclasses import asdict, dataclass, field

import torch

__all__ = ["record", "Recorder", "Event", "emit", "emit_mask", "is_recording", "EVENT_KINDS",
           "DEFAULT_CANCELLATION_BITS", "precision_bits"]

EVENT_KINDS = ("kink", "undecided", "domain", "overflow", "nan", "cancellation")
DEFAULT_CANCELLATION_BITS = 10

_lock = threading.Lock()
_recorders: list["Recorder"] = []
#: True while at least one recorder is active. ``ops.registry.dispatch`` reads it (the only cost when not recording).
active = False

# ----------------------------------------------------------------------------------------------------------------------
# Events and recorders


@dataclass
class Event:
    kind: str
    op: str
    count: int
    detail: str = ""
    module: str | None = None
    phase: str = "forward"
    total: int | None = None
    thread: str | None = None

    def __str__(self):
        where = f" in {self.module}" if self.module else ""
        of = f"/{self.total}" if self.total else ""
        tail = f" — {self.detail}" if self.detail else ""
        return f"{self.kind:<12} {self.op}{where} ({self.phase}): {self.count}{of} element(s){tail}"

    def to_dict(self) -> dict:
        return asdict(self)


class Recorder:
    """The events of one ``record()`` block (thread-safe: events may arrive from several threads)."""

    def __init__(self, cancellation_bits: float = DEFAULT_CANCELLATION_BITS, model: torch.nn.Module | None = None):
        if not (cancellation_bits >= 0):
            raise ValueError(f"cancellation_bits must be >= 0, got {cancellation_bits}")
        self.cancellation_bits = float(cancellation_bits)
        self.model = model
        self._events: list[Event] = []
        self._lock = threading.Lock()

    @property
    def events(self) -> list[Event]:
        with self._lock:
            return list(self._events)

    def add(self, event: Event) -> None:
        with self._lock:
            self._events.append(event)

    def of_kind(self, kind: str) -> list[Event]:
        return [e for e in self.events if e.kind == kind]

    def kinds(self) -> set[str]:
        return {e.kind for e in self.events}

    def count(self, kind: str | None = None) -> int:
        """Elements affected, summed over events (of ``kind``, or all)."""
        return sum(e.count for e in self.events if kind is None or e.kind == kind)

    def events_of_thread(self, thread: str | None = None) -> list[Event]:
        """Events raised by ops run in ``thread`` (a thread name; default: the calling thread)."""
        name = threading.current_thread().name if thread is None else thread
        return [e for e in self.events if e.thread == name]

    def to_dict(self) -> dict:
        return {"cancellation_bits": self.cancellation_bits, "events": [e.to_dict() for e in self.events]}

    def summary(self) -> str:
        """A table: one row per (kind, op, module, phase) with the number of calls and of elements affected."""
        events = self.events
        if not events:
            return "no events"
        rows: dict[tuple, list] = {}
        for e in events:
            key = (e.kind, e.op, e.module or "-", e.phase)
            row = rows.setdefault(key, [0, 0, e.detail])
            row[0] += 1
            row[1] += e.count
        table = [["kind", "op", "module", "phase", "calls", "elements", "detail"]]
        order = {k: i for i, k in enumerate(EVENT_KINDS)}
        for (kind, op, module, phase), (calls, n, detail) in sorted(rows.items(),
                                                                     key=lambda kv: (order[kv[0][0]], kv[0])):
            table.append([kind, op, module, phase, str(calls), str(n), detail])
        return format_table(table, right=(4, 5))

    def __len__(self):
        return len(self.events)

    def __iter__(self):
        return iter(self.events)

    def __repr__(self):
        return f"Recorder({len(self)} events: {sorted(self.kinds())})"


def format_table(rows: list[list[str]], right=()) -> str:
    """Plain-text table: the first row is the header; columns in ``right`` are right-justified (numbers)."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for j, r in enumerate(rows):
        cells = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))]
        lines.append("  ".join(cells).rstrip())
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def is_recording() -> bool:
    return active


@contextlib.contextmanager
def record(model: torch.nn.Module | None = None, *, cancellation_bits: float = DEFAULT_CANCELLATION_BITS):
    """Collect events from every BallTensor op run inside the block (from any thread; see the module docstring).

    ``model``: module paths in events are taken from ``model.named_modules()`` (the root gets its class name).
    ``cancellation_bits``: the loss of relative accuracy in one pointwise op that makes a ``cancellation`` event.
    """
    global active
    rec = Recorder(cancellation_bits, model)
    with _lock:
        _recorders.append(rec)
        active = True
        _refresh_hooks_locked()
    try:
        yield rec
    finally:
        with _lock:
            _recorders.remove(rec)
            active = bool(_recorders)
            _refresh_hooks_locked()


def _active_recorders() -> list[Recorder]:
    with _lock:
        return list(_recorders)


# ----------------------------------------------------------------------------------------------------------------------
# Per-op frames (the dispatcher's hooks)


class _Frame:
    __slots__ = ("explained", "depth", "bits_in", "nan_in", "exact_in")

    def __init__(self, depth):
        self.explained = 0
        self.depth = depth
        self.bits_in = None  # pointwise ops: least accurate input bits per output element, taken before the rule
        self.nan_in = None  # ... whether an input midpoint is NaN
        self.exact_in = None  # ... whether every input is exact (radius 0)


_call = threading.local()


def _frames() -> list:
    f = getattr(_call, "frames", None)
    if f is None:
        f = _call.frames = []
    return f


def begin_op(func=None, args=(), kwargs=None) -> _Frame:
    """Called by the dispatcher before a rule runs (only while recording). Returns the frame to pass to
    ``scan_outputs`` and ``end_op``."""
    frames = _frames()
    if len(frames) > 256:  # frames left behind by exceptions outside dispatch's try/finally: never grow unbounded
        frames.clear()
    frame = _Frame(len(frames))
    frames.append(frame)
    if frame.depth == 0 and func is not None and _is_pointwise(func):
        try:
            frame.bits_in, frame.nan_in, frame.exact_in = _input_accuracy(args, kwargs)
        except RuntimeError:  # shapes that do not broadcast: leave the op unchecked
            frame.bits_in = frame.nan_in = frame.exact_in = None
    return frame


def end_op(frame: _Frame) -> None:
    frames = _frames()
    while frames:
        if frames.pop() is frame:
            break


def _top_frame():
    frames = getattr(_call, "frames", None)
    return frames[-1] if frames else None


def emit(kind: str, op: str, count: int, detail: str = "", *, total: int | None = None, recorders=None) -> None:
    """Record an event in every active recorder (no-op when none is active or ``count`` is 0)."""
    if kind not in EVENT_KINDS:
        raise ValueError(f"unknown event kind {kind!r}")
    if not active or count == 0:
        return
    if kind in ("domain", "overflow"):  # the kinds that explain an infinite radius (see scan_outputs)
        for frame in getattr(_call, "frames", ()):  # also the enclosing ops of a composed rule: it propagates
            frame.explained += int(count)
    module, phase = _where()
    event = Event(kind=kind, op=str(op), count=int(count), detail=detail, module=module, phase=phase,
                  total=total, thread=threading.current_thread().name)
    for rec in (_active_recorders() if recorders is None else recorders):
        rec.add(event)


def emit_mask(kind: str, op: str, mask: torch.Tensor, detail: str = "") -> None:
    """Record an event counting the True elements of ``mask`` (computed only while recording)."""
    if active:
        emit(kind, op, int(mask.sum()), detail, total=mask.numel())


def scan_outputs(op, args, out, frame: _Frame | None = None, kwargs=None) -> None:
    """Generic events after a rule: infinite radii from finite inputs (overflow), NaN midpoints created here (nan),
    and pointwise cancellation. Only the outermost op is scanned (see the module docstring)."""
    from ballgrad.tensor import BallTensor

    if frame is None:
        frame = _top_frame()
    if frame is not None and frame.depth > 0:
        return
    name = str(op)
    outs = out if isinstance(out, (tuple, list)) else (out,)
    balls = [a for a in _leaves((args, kwargs or {})) if isinstance(a, BallTensor) and a.dtype != torch.bool]
    inputs_finite = all(bool(torch.isfinite(a.rad).all()) for a in balls)
    inputs_nan = any(bool(torch.isnan(a.mid).any()) for a in balls if a.is_floating_point())
    explained = frame.explained if frame is not None else 0
    # empty_like / new_empty / new_empty_strided...: uninitialised memory is "nothing known" by design, neither
    # overflow nor a NaN the computation created (its garbage midpoints may be NaN: no event, whatever they hold)
    uninitialised = "empty" in name
    bits_in = frame.bits_in if frame is not None else None
    for o in outs:
        if not isinstance(o, BallTensor) or o.dtype == torch.bool or not o.is_floating_point():
            continue
        nan = torch.isnan(o.mid)
        if nan.any() and not uninitialised:
            new = nan
            if inputs_nan:  # only NaNs created by this op: elementwise for pointwise ops, else none
                nan_in = frame.nan_in if frame is not None else None
                new = nan & ~nan_in if nan_in is not None and nan_in.shape == nan.shape else torch.zeros_like(nan)
            n_new = int(new.sum())
            if n_new:
                emit("nan", name, n_new, "NaN midpoints created (radius set to inf)", total=o.numel())
        if inputs_finite and not uninitialised:
            # infinite radii not already explained by the rule's own events (e.g. ``domain``)
            n_inf = int((torch.isinf(o.rad) & ~nan).sum()) - explained
            if n_inf > 0:
                emit("overflow", name, n_inf, "finite input radii gave an infinite radius", total=o.numel())
        if bits_in is not None and o.numel() and tuple(bits_in.shape) == tuple(o.shape):
            _emit_cancellation(name, bits_in, frame.exact_in, o)


# ----------------------------------------------------------------------------------------------------------------------
# Cancellation


_PRECISION = {torch.float64: 53, torch.float32: 24, torch.float16: 11, torch.bfloat16: 8}


def precision_bits(dtype: torch.dtype) -> int:
    """p: the significand bits of a float dtype (u = 2^-p)."""
    return _PRECISION[dtype]


def _is_pointwise(func) -> bool:
    tags = getattr(func, "tags", None)
    return bool(tags) and torch.Tag.pointwise in tags


def _leaves(tree):
    from torch.utils._pytree import tree_leaves

    return tree_leaves(tree)


def capped_bits(x) -> torch.Tensor:
    """``x.rel_accuracy_bits()`` capped at the precision of x's dtype (exact values count as p bits)."""
    return torch.clamp_max(x.rel_accuracy_bits(), float(_PRECISION.get(x.dtype, 53)))


def _input_bits(x) -> torch.Tensor:
    """An input's relative accuracy for the cancellation test: p bits where it is exact, else its actual bits, *not*
    capped at p (a rounded result whose exact error is tiny, like x*x from TwoProduct, really has more than p bits;
    capping it would hide the bits a following subtraction cancels)."""
    return torch.where(x.rad == 0, float(_PRECISION.get(x.dtype, 53)), x.rel_accuracy_bits())


def _input_accuracy(args, kwargs):
    """Per element of the broadcast shape of the floating ball inputs: (least accurate input's bits, whether an input
    midpoint is NaN, whether every input is exact)."""
    from ballgrad.tensor import BallTensor

    balls = [a for a in _leaves((args, kwargs or {}))
             if isinstance(a, BallTensor) and a.is_floating_point() and a.dtype in _PRECISION]
    if not balls:
        return None, None, None
    shape = torch.broadcast_shapes(*(a.shape for a in balls))
    worst = nan = exact = None
    for a in balls:
        b = _input_bits(a).expand(shape)
        n = torch.isnan(a.mid).expand(shape)
        e = (a.rad == 0).expand(shape)
        worst = b if worst is None else torch.minimum(worst, b)
        nan = n if nan is None else nan | n
        exact = e if exact is None else exact & e
    return worst, nan, exact


def _emit_cancellation(name: str, bits_in: torch.Tensor, exact_in, out) -> None:
    """Cancellation amplifies errors the inputs already carry: elements whose inputs are all exact are skipped (their
    result is accurate to the op's own rounding, or to the underflow threshold for results near 0)."""
    bits_out = capped_bits(out)
    p = float(_PRECISION.get(out.dtype, 53))
    counted = torch.isfinite(bits_in) & torch.isfinite(out.rad) & ~torch.isnan(out.mid) & (bits_out < p)
    if exact_in is not None:
        counted &= ~exact_in
    # an op cannot lose more bits than its inputs had: an output ball containing 0 (bits -inf) loses bits_in
    lost_bits = bits_in - torch.clamp_min(bits_out, 0.0)
    drop = torch.where(counted, lost_bits, torch.full_like(bits_out, -math.inf))
    worst = float(drop.max()) if drop.numel() else -math.inf
    if worst <= 0:
        return
    for rec in _active_recorders():
        over = drop > rec.cancellation_bits
        n = int(over.sum())
        if n:
            i = int(torch.argmax(torch.where(over, drop, torch.full_like(drop, -math.inf)).reshape(-1)))
            before = float(bits_in.reshape(-1)[i])
            after = float(bits_out.reshape(-1)[i])
            lost = f"all {before:.0f}" if after <= 0 else f"{before - after:.0f}"
            tiny = torch.finfo(out.dtype).tiny
            underflow = ", underflow" if 0 < abs(float(out.mid.reshape(-1)[i])) < tiny else ""
            detail = (f"relative accuracy dropped by > {rec.cancellation_bits:g} bits "
                      f"(worst: {before:.0f} -> {after:.0f} bits, {lost} lost{underflow})")
            emit("cancellation", name, n, detail, total=out.numel(), recorders=[rec])


# ----------------------------------------------------------------------------------------------------------------------
# Modules: global forward hooks while recording, autograd-node tags for backward


_NODE_KEY = "ballgrad.module"
_hook_handles: list = []
_names: dict[int, str] = {}  # id(module) -> path, from record(model=...)
_generation = 0  # bumped whenever hooks are (re)installed: stale per-thread stacks are dropped
_stack_local = threading.local()


def _refresh_hooks_locked() -> None:
    """Install the global module hooks while a recorder is active, remove them after the last one (lock held)."""
    global _generation, _names
    names: dict[int, str] = {}
    for rec in _recorders:
        if rec.model is not None:
            root = type(rec.model).__name__
            for path, mod in rec.model.named_modules():
                names.setdefault(id(mod), path or root)
    _names = names  # swapped whole: hooks running in other threads read one dict or the other
    if _recorders and not _hook_handles:
        from torch.nn.modules import module as nn_module

        _generation += 1
        _hook_handles.append(nn_module.register_module_forward_pre_hook(_forward_pre_hook))
        _hook_handles.append(nn_module.register_module_forward_hook(_forward_hook, always_call=True))
    elif not _recorders and _hook_handles:
        for h in _hook_handles:
            h.remove()
        _hook_handles.clear()


def _stack() -> list:
    st = getattr(_stack_local, "stack", None)
    if st is None or getattr(_stack_local, "generation", None) != _generation:
        st = _stack_local.stack = []
        _stack_local.generation = _generation
    return st


def current_module() -> str | None:
    """Path of the innermost module whose forward is running in this thread (while recording), else None."""
    if not active:
        return None
    st = _stack()
    return st[-1][1] if st else None


def _where() -> tuple[str | None, str]:
    """(module, phase) of the op being run."""
    if torch._C._current_graph_task_id() != -1:
        node = torch._C._current_autograd_node()
        module = node.metadata.get(_NODE_KEY) if node is not None else None
        return module, "backward"
    return current_module(), "forward"


def _module_path(module, parent) -> tuple[str, str]:
    """(path, display name) of ``module`` called while ``parent`` (a stack entry or None) runs."""
    known = _names.get(id(module))
    if known is not None:
        return known, known
    if parent is None:
        return "", type(module).__name__
    parent_module, parent_path = parent[0], parent[2]
    child = next((n for n, m in parent_module._modules.items() if m is module), None)
    if child is None:
        child = type(module).__name__
    path = f"{parent_path}.{child}" if parent_path else child
    return path, path


def _next_sequence_nr() -> int | None:
    """The sequence number the next autograd node created in this thread will get (None without grad mode)."""
    if not torch.is_grad_enabled():
        return None
    dummy = getattr(_stack_local, "dummy", None)
    if dummy is None:
        dummy = _stack_local.dummy = torch.zeros((), requires_grad=True)
    return dummy.view_as(dummy).grad_fn._sequence_nr() + 1


def _forward_pre_hook(module, args):
    st = _stack()
    path, name = _module_path(module, st[-1] if st else None)
    st.append((module, name, path, _next_sequence_nr()))


def _forward_hook(module, args, output):
    st = _stack()
    for i in range(len(st) - 1, -1, -1):
        if st[i][0] is module:
            entry = st[i]
            del st[i:]
            break
    else:
        return
    start = entry[3]
    if start is not None and output is not None:
        _tag_nodes(output, module, entry[1], start)


def _tag_nodes(output, module, name: str, start: int) -> None:
    """Tag the autograd nodes ``module``'s forward created (innermost module first: tags are never overwritten)."""
    roots = [t.grad_fn for t in _leaves(output) if isinstance(t, torch.Tensor) and t.grad_fn is not None]
    params = None
    seen: dict[int, object] = {}
    todo = list(roots)
    while todo:
        node = todo.pop()
        if node is None or id(node) in seen:
            continue
        seen[id(node)] = node  # keeps the Python wrapper alive while ids are compared
        if hasattr(node, "variable"):  # AccumulateGrad: the module's own parameters only
            if params is None:
                params = {id(p) for p in module.parameters()}
            if id(node.variable) in params:
                node.metadata.setdefault(_NODE_KEY, name)
            continue
        if node._sequence_nr() < start:  # created before the module was called
            continue
        node.metadata.setdefault(_NODE_KEY, name)
        todo.extend(n for n, _ in node.next_functions if n is not None)
