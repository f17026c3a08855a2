"""Overhead of ballgrad on the zoo (../shared/BENCHMARKS.md, "Overhead").

For each zoo model: one training step (forward, cross-entropy loss, backward, one SGD step) on the ``ballify``-ed
model versus the same step on the plain model, same dtype, same inputs, same initial parameters, measured interleaved
in one process (the order inside each pair alternates), after warm-up. Reported: the median plain and ball step
times and the median of the per-pair ratios (>= 5 pairs by default).

**Which step.** Every timed step (and the memory and profiled steps) starts from the same parameters, restored
outside the timer: the ball parameters carry a radius of |p| 2^-24 (``--param-rad``; each is the float32 rounding of an
unknown real), so every GEMM is a ball-times-ball GEMM as in steady-state training, while the radii stay finite.
Timing consecutive steps instead would measure the wrapping effect: on cnn-small and transformer-tiny the radii
of a training run become infinite after two or three SGD steps (README, "Limits"), and infinite radii take the
rules' short cuts.

**Peak memory.** ``tracemalloc`` does not see PyTorch's allocator and RSS is blurred by the allocator's caching and by
the interpreter, so we count tensor bytes: torch.profiler with ``profile_memory=True`` records every CPU allocation and
free of the c10 allocator (every tensor storage, midpoints and radii alike) with its size; the step's peak is the
maximum over time of (bytes allocated - bytes freed) since the step began. We report ``static`` (parameter and input
bytes, radii included) + that peak, and the ratio ball / plain. Python objects (the BallTensor wrappers themselves,
a few hundred bytes each) are not counted.

**Cost split** (``--split``, default for mlp-small and mlp-wide). One profiled ball step: every rule call is wrapped
(by patching ``ballgrad.ops.registry.dispatch`` in this process only) in a ``record_function`` named after the aten op,
so the profiler tree shows, for every ball op O: the aten op's own event, the rule's event inside it, and the kernels
the rule runs. We classify
  - *midpoint kernels*: the rule's first direct child aten event named like O (rules compute ``func(mids)`` first),
  - *radius kernels*: every other aten event inside the rule (including the float64 reference GEMMs and ball ops
    that a rule composes from other rules),
  - *Python dispatch*: the rest of O's time (``__torch_dispatch__``, registry lookup, the rule's Python code, the
    BallTensor wrapper construction),
  - *outside rules*: everything else in the step (autograd engine, module and optimizer Python, plain ops).
The profiler slows Python more than kernels, so the split is given in fractions of the profiled step and next to it
the unprofiled plain/ball step times; the midpoint kernel time can be compared with the plain step.

    python benchmarks/overhead.py [--model mlp-small ...] [--repeats 15] [--warmup 3] [--dtype float32]
                                  [--gemm-bound measured a-priori] [--json out]

Both GEMM midpoint-error bounds are timed by default (``ballgrad.gemm_bound``): "measured" (the default, a float64
reference GEMM per GEMM: tight, and on its own at least 1.5-3x a float32 GEMM, so GEMM-bound models cannot come near
2x with it) and "a-priori" (gamma_k |A||B| with bfloat16 radius GEMMs: cheap, but far wider for long dot products).

A benchmark, not a test: nothing here asserts a timing.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from contextlib import contextmanager

import torch

import ballgrad
from verification.zoo import NAMES, make

SPLIT_DEFAULT = ("mlp-small", "mlp-wide")


PARAM_RAD = 2.0 ** -24  # relative: each parameter is the float32 rounding of an unknown real


def _build(name, dtype, batch=None, param_rad=PARAM_RAD):
    case = make(name, dtype=dtype, batch=batch)
    plain = case.model
    ball = ballgrad.ballify(copy.deepcopy(plain), rad=lambda p: p.detach().abs() * param_rad)
    opt_plain = torch.optim.SGD(plain.parameters(), lr=1e-3)
    opt_ball = torch.optim.SGD(ball.parameters(), lr=1e-3)
    return case, plain, ball, opt_plain, opt_ball


def _snapshot(model):
    """The parameters' values (midpoints and radii for balls), to restore before every timed step."""
    return [(p.mid.clone(), p.rad.clone()) if isinstance(p, ballgrad.BallTensor) else p.detach().clone()
            for p in model.parameters()]


@torch.no_grad()
def _restore(model, state) -> None:
    for p, saved in zip(model.parameters(), state):
        if isinstance(p, ballgrad.BallTensor):
            p.mid.copy_(saved[0])
            p.rad.copy_(saved[1])
        else:
            p.copy_(saved)


def _step(model, opt, case):
    opt.zero_grad(set_to_none=True)
    loss = case.loss_fn(model(case.inputs), case.targets)
    loss.backward()
    opt.step()
    return loss


def _timed(model, opt, case, state=None) -> float:
    if state is not None:
        _restore(model, state)
    t0 = time.perf_counter()
    _step(model, opt, case)
    return time.perf_counter() - t0


def _tensor_bytes(t) -> int:
    if isinstance(t, ballgrad.BallTensor):
        return _tensor_bytes(t.mid) + _tensor_bytes(t.rad)
    return t.numel() * t.element_size()


def _peak_step_bytes(model, opt, case) -> int:
    """Peak of (allocated - freed) tensor bytes during one step, from the profiler's memory events."""
    from torch.profiler import ProfilerActivity, profile

    opt.zero_grad(set_to_none=True)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        _step(model, opt, case)
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def measure(name, dtype=torch.float32, repeats=15, warmup=3, batch=None, memory=True, param_rad=PARAM_RAD):
    case, plain, ball, opt_plain, opt_ball = _build(name, dtype, batch, param_rad)
    state_plain, state_ball = _snapshot(plain), _snapshot(ball)
    for _ in range(warmup):
        _timed(plain, opt_plain, case, state_plain)
        _timed(ball, opt_ball, case, state_ball)
    plain_t, ball_t, ratios = [], [], []
    for i in range(repeats):
        if i % 2 == 0:
            tp = _timed(plain, opt_plain, case, state_plain)
            tb = _timed(ball, opt_ball, case, state_ball)
        else:
            tb = _timed(ball, opt_ball, case, state_ball)
            tp = _timed(plain, opt_plain, case, state_plain)
        plain_t.append(tp)
        ball_t.append(tb)
        ratios.append(tb / tp)
    row = {
        "model": name,
        "dtype": str(dtype).replace("torch.", ""),
        "batch": int(case.inputs.shape[0]),
        "parameters": case.parameters,
        "repeats": repeats,
        "param_rad": param_rad,
        "plain_s": statistics.median(plain_t),
        "ball_s": statistics.median(ball_t),
        "ratio": statistics.median(ratios),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
    }
    if memory:
        inputs = _tensor_bytes(case.inputs) + _tensor_bytes(case.targets)
        static_plain = inputs + sum(_tensor_bytes(p) for p in plain.parameters())
        static_ball = inputs + sum(_tensor_bytes(p) for p in ball.parameters())
        _restore(plain, state_plain)
        _restore(ball, state_ball)
        peak_plain = static_plain + _peak_step_bytes(plain, opt_plain, case)
        peak_ball = static_ball + _peak_step_bytes(ball, opt_ball, case)
        row.update({"peak_bytes_plain": peak_plain, "peak_bytes_ball": peak_ball, "memory_ratio": peak_ball / peak_plain})
    return row


# ----------------------------------------------------------------------------------------------------------------------
# Cost split


@contextmanager
def _labelled_rules():
    from ballgrad.ops import registry

    original = registry.dispatch

    def dispatch(func, args, kwargs):
        with torch.profiler.record_function("ballgrad.rule::" + func._schema.name):
            return original(func, args, kwargs)

    registry.dispatch = dispatch
    try:
        yield
    finally:
        registry.dispatch = original


def _under_restore(e) -> bool:
    while e is not None:
        if e.name == "restore":
            return True
        e = e.cpu_parent
    return False


def _is_rule(e) -> bool:
    return e.name.startswith("ballgrad.rule::")


def _contains_rule(e) -> bool:
    return any(_is_rule(c) or _contains_rule(c) for c in e.cpu_children)


def cost_split(name, dtype=torch.float32, batch=None, steps=3, param_rad=PARAM_RAD):
    from torch.profiler import ProfilerActivity, profile

    case, plain, ball, opt_plain, opt_ball = _build(name, dtype, batch, param_rad)
    state_plain, state_ball = _snapshot(plain), _snapshot(ball)
    for _ in range(2):
        _timed(ball, opt_ball, case, state_ball)
        _timed(plain, opt_plain, case, state_plain)
    profiled = profiled_plain = 0.0
    with _labelled_rules():
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                with torch.profiler.record_function("restore"):
                    _restore(ball, state_ball)
                profiled += _timed(ball, opt_ball, case) / steps
    with profile(activities=[ProfilerActivity.CPU]) as prof_plain:
        for _ in range(steps):
            with torch.profiler.record_function("restore"):
                _restore(plain, state_plain)
            profiled_plain += _timed(plain, opt_plain, case) / steps
    events = prof.events()
    mid = rad = python = 0.0
    per_op: dict[str, dict] = {}
    n_rules = 0
    for e in events:
        if not _is_rule(e):
            continue
        parent = e.cpu_parent
        # only outermost rules: a rule inside another rule's composition is that rule's radius work
        p, nested = parent, False
        while p is not None:
            if _is_rule(p):
                nested = True
                break
            p = p.cpu_parent
        if nested:
            continue
        n_rules += 1
        op = e.name.split("::", 1)[1]
        outer = parent.cpu_time_total if parent is not None and parent.name == op else e.cpu_time_total
        m = r = 0.0
        found_mid = False
        for c in e.cpu_children:
            if not found_mid and c.name == op:
                m += c.cpu_time_total
                found_mid = True
            else:
                r += c.cpu_time_total
        py = max(outer - m - r, 0.0)
        mid, rad, python = mid + m, rad + r, python + py
        d = per_op.setdefault(op, {"calls": 0, "mid_us": 0.0, "rad_us": 0.0, "python_us": 0.0})
        d["calls"] += 1
        d["mid_us"] += m / steps
        d["rad_us"] += r / steps
        d["python_us"] += py / steps
    total = profiled * 1e6 * steps  # profiler times are in microseconds
    outside = max(total - mid - rad - python, 0.0)
    plain_kernels = sum(e.self_cpu_time_total for e in prof_plain.events()
                        if e.name.startswith("aten::") and not _under_restore(e))
    return {
        "model": name,
        "profiled_step_s": profiled,
        "profiled_plain_step_s": profiled_plain,
        "plain_step_aten_s": plain_kernels / steps / 1e6,
        "rule_calls_per_step": n_rules // steps,
        "mid_kernels_s": mid / steps / 1e6,
        "radius_kernels_s": rad / steps / 1e6,
        "python_dispatch_s": python / steps / 1e6,
        "outside_rules_s": outside / steps / 1e6,
        "fractions": {k: v / total for k, v in
                      (("mid_kernels", mid), ("radius_kernels", rad), ("python_dispatch", python),
                       ("outside_rules", outside))},
        "top_ops": dict(sorted(per_op.items(), key=lambda kv: -(kv[1]["rad_us"] + kv[1]["python_us"]))[:12]),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", nargs="+", default=NAMES, choices=NAMES)
    parser.add_argument("--repeats", type=int, default=15,
                        help="measured pairs (median); >= 5 for BENCHMARKS.md. On a shared 2-core VM single pairs of "
                             "the small models move by +-40%%, so the default takes 15 (a few seconds)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64", "float16", "bfloat16"])
    parser.add_argument("--batch", type=int, default=None, help="override the BENCHMARKS.md batch size")
    parser.add_argument("--split", nargs="*", default=None,
                        help="models for the cost split (default: mlp-small and mlp-wide among --model; none: --split)")
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--param-rad", type=float, default=PARAM_RAD,
                        help="relative radius of the ball parameters at the start of every timed step (0: points)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--gemm-bound", nargs="+", default=["measured", "a-priori"], choices=ballgrad.GEMM_BOUNDS,
                        help="GEMM midpoint-error bounds to time (ballgrad.gemm_bound): the tight default and the "
                             "cheap one, each a separate table")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)

    rows = []
    for bound in args.gemm_bound:
        with ballgrad.gemm_bound(bound):
            bound_rows = [dict(measure(name, dtype, args.repeats, args.warmup, args.batch,
                                       memory=not args.no_memory, param_rad=args.param_rad), gemm_bound=bound)
                          for name in args.model]
        rows += bound_rows
        print(f"\ngemm_bound = {bound!r}")
        print(f"{'model':18s} {'plain ms':>9s} {'ball ms':>9s} {'ratio':>7s} {'[min, max]':>15s} "
              f"{'peak mem ratio':>15s}")
        for r in bound_rows:
            mem = f"{r['memory_ratio']:.2f}x" if "memory_ratio" in r else "-"
            print(f"{r['model']:18s} {r['plain_s'] * 1e3:9.2f} {r['ball_s'] * 1e3:9.2f} {r['ratio']:6.2f}x "
                  f"[{r['ratio_min']:5.2f}, {r['ratio_max']:5.2f}] {mem:>15s}")

    split_models = [m for m in SPLIT_DEFAULT if m in args.model] if args.split is None else args.split
    splits = []
    for name in split_models:
        s = cost_split(name, dtype, args.batch, param_rad=args.param_rad)
        splits.append(s)
        f = s["fractions"]
        print(f"\ncost split {name} (profiled ball step {s['profiled_step_s'] * 1e3:.2f} ms, "
              f"{s['rule_calls_per_step']} rule calls; plain step aten time {s['plain_step_aten_s'] * 1e3:.2f} ms):")
        print(f"  midpoint kernels {s['mid_kernels_s'] * 1e3:8.2f} ms  {f['mid_kernels']:6.1%}")
        print(f"  radius kernels   {s['radius_kernels_s'] * 1e3:8.2f} ms  {f['radius_kernels']:6.1%}")
        print(f"  Python dispatch  {s['python_dispatch_s'] * 1e3:8.2f} ms  {f['python_dispatch']:6.1%}")
        print(f"  outside rules    {s['outside_rules_s'] * 1e3:8.2f} ms  {f['outside_rules']:6.1%}")
        for op, d in list(s["top_ops"].items())[:6]:
            print(f"    {op:34s} x{d['calls'] // 3:<3d} mid {d['mid_us'] / 1e3:7.2f} ms  rad {d['rad_us'] / 1e3:7.2f} ms  "
                  f"py {d['python_us'] / 1e3:6.2f} ms")

    out = {"torch": torch.__version__, "threads": torch.get_num_threads(), "rows": rows, "cost_split": splits}
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=2)
    return out


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
