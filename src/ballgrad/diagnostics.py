"""Events that say where information was lost (DESIGN.md §6).

``with ballgrad.record() as rec:`` collects events of kind ``kink``, ``undecided``, ``domain``, ``overflow``, ``nan``
and ``cancellation``. Recording is thread-safe; when no recorder is active, ``is_recording()`` is a single attribute
read and rules skip all event work.
"""

from __future__ import annotations

import contextlib
import math
import threading
from dataclasses import dataclass, field

import torch

EVENT_KINDS = ("kink", "undecided", "domain", "overflow", "nan", "cancellation")

_lock = threading.Lock()
_recorders: list["Recorder"] = []


@dataclass
class Event:
    kind: str
    op: str
    count: int
    detail: str = ""
    module: str | None = None

    def __str__(self):
        where = f" in {self.module}" if self.module else ""
        return f"{self.kind:<12} {self.op}{where}: {self.count} element(s){' — ' + self.detail if self.detail else ''}"


@dataclass
class Recorder:
    events: list[Event] = field(default_factory=list)

    def add(self, event: Event) -> None:
        with _lock:
            self.events.append(event)

    def of_kind(self, kind: str) -> list[Event]:
        return [e for e in self.events if e.kind == kind]

    def kinds(self) -> set[str]:
        return {e.kind for e in self.events}

    def summary(self) -> str:
        if not self.events:
            return "no events"
        rows = {}
        for e in self.events:
            key = (e.kind, e.op, e.module or "")
            rows[key] = rows.get(key, 0) + e.count
        width = max(len(k[1]) for k in rows)
        lines = [f"{'kind':<12} {'op':<{width}}  {'module':<20} elements"]
        for (kind, op, module), n in sorted(rows.items()):
            lines.append(f"{kind:<12} {op:<{width}}  {module:<20} {n}")
        return "\n".join(lines)

    def __len__(self):
        return len(self.events)

    def __iter__(self):
        return iter(list(self.events))


def is_recording() -> bool:
    return bool(_recorders)


@contextlib.contextmanager
def record():
    """Collect events from every BallTensor op run inside the block (from any thread)."""
    rec = Recorder()
    with _lock:
        _recorders.append(rec)
    try:
        yield rec
    finally:
        with _lock:
            _recorders.remove(rec)


_call = threading.local()


def begin_op() -> None:
    """Called by the dispatcher before a rule runs (only while recording)."""
    _call.explained = 0


def emit(kind: str, op: str, count: int, detail: str = "") -> None:
    """Record an event in every active recorder (no-op when none is active)."""
    if kind not in EVENT_KINDS:
        raise ValueError(f"unknown event kind {kind!r}")
    if not _recorders or count == 0:
        return
    if kind in ("domain", "overflow"):  # the kinds that explain an infinite radius (see scan_outputs)
        _call.explained = getattr(_call, "explained", 0) + int(count)
    event = Event(kind=kind, op=op, count=int(count), detail=detail, module=current_module())
    with _lock:
        recs = list(_recorders)
    for rec in recs:
        rec.add(event)


def emit_mask(kind: str, op: str, mask: torch.Tensor, detail: str = "") -> None:
    """Record an event counting the True elements of ``mask`` (computed only while recording)."""
    if _recorders:
        emit(kind, op, int(mask.sum()), detail)


_module_stack = threading.local()


def current_module() -> str | None:
    stack = getattr(_module_stack, "names", None)
    return stack[-1] if stack else None


def scan_outputs(op: str, args, out) -> None:
    """Generic events after a rule: infinite radii from finite inputs (overflow) and NaN midpoints (nan)."""
    from ballgrad.tensor import BallTensor

    outs = out if isinstance(out, (tuple, list)) else (out,)
    inputs_finite = all(
        bool(torch.isfinite(a.rad).all()) for a in args if isinstance(a, BallTensor) and a.dtype != torch.bool
    )
    for o in outs:
        if not isinstance(o, BallTensor) or o.dtype == torch.bool:
            continue
        nan = torch.isnan(o.mid)
        if nan.any():
            emit("nan", op, int(nan.sum()), "NaN midpoints (radius set to inf)")
        if inputs_finite:
            # infinite radii not already explained by the rule's own events (e.g. ``domain``)
            n_inf = int((torch.isinf(o.rad) & ~nan).sum()) - getattr(_call, "explained", 0)
            if n_inf > 0:
                emit("overflow", op, n_inf, "finite input radii gave an infinite radius")


__all__ = ["record", "Recorder", "Event", "emit", "emit_mask", "is_recording", "EVENT_KINDS", "math"]
