"""The GEMM floor of ballgrad's overhead: what a zoo model's step costs when nothing but its GEMMs is counted.

A plain training step runs some GEMMs (forward, grad-input, grad-weight). A ball step must at least run the same
midpoint GEMMs plus, per GEMM,

- with the default ``measured`` bound: one float64 reference GEMM of the same shape (``ops/linalg.py``), and
- with either bound: at least one radius-propagation GEMM (one non-negative product when an operand is a point, two
  for ball x ball; in bfloat16 where Lemma B applies, i.e. for large GEMMs on AMX/AVX512-BF16 CPUs, else float32):
  counted here as one bfloat16 GEMM, the cheapest it can be.

This script records the GEMM shapes of one plain step (a dispatch mode on the plain model), times each GEMM kind on
those shapes in this process, and prints the step time of the plain model next to the sum of the GEMMs a ball step
cannot avoid. The ratio (floor GEMMs + nothing else) / plain step is a lower bound on the overhead that
``overhead.py`` can print, before a single elementwise radius pass is counted. No timing is asserted anywhere.

    python benchmarks/gemm_floor.py --model mlp-wide
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))

import overhead  # noqa: E402  (same model zoo and step as the overhead benchmark)

aten = torch.ops.aten
_GEMMS = {aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default}


class _Shapes(TorchDispatchMode):
    """Records (m, k, n) of every 2-D GEMM of the step (batched ones as their batch count times m)."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in _GEMMS:
            a, b = (args[1], args[2]) if func in (aten.addmm.default, aten.baddbmm.default) else (args[0], args[1])
            batch = a.shape[0] if a.dim() == 3 else 1
            self.shapes.append((batch * a.shape[-2], a.shape[-1], b.shape[-1]))
        return func(*args, **(kwargs or {}))


def _median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def floor(name: str, repeats: int = 7) -> dict:
    case, plain, _, opt_plain, _ = overhead._build(name, torch.float32)
    with _Shapes() as rec:
        overhead._step(plain, opt_plain, case)
    state = overhead._snapshot(plain)

    def plain_step():
        overhead._restore(plain, state)
        overhead._step(plain, opt_plain, case)

    step = _median_ms(plain_step, repeats)
    totals = {"float32": 0.0, "float64": 0.0, "bfloat16": 0.0}
    for m, k, n in rec.shapes:
        a, b = torch.rand(m, k), torch.rand(k, n)
        for dtype in totals:
            ad, bd = a.to(getattr(torch, dtype)), b.to(getattr(torch, dtype))
            totals[dtype] += _median_ms(lambda: torch.mm(ad, bd), repeats)
    return {"model": name, "gemms": len(rec.shapes), "plain_step_ms": step, "gemm_ms": totals,
            "measured_floor": (totals["float32"] + totals["float64"] + totals["bfloat16"]) / step,
            "a_priori_floor": (totals["float32"] + totals["bfloat16"]) / step}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", nargs="+", default=["mlp-wide"], choices=overhead.NAMES)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    rows = []
    print(f"{'model':16s} {'GEMMs':>5s} {'plain step':>11s} {'f32 GEMMs':>10s} {'f64 GEMMs':>10s} {'bf16 GEMMs':>11s}"
          f" {'floor measured':>15s} {'floor a-priori':>15s}")
    for name in args.model:
        r = floor(name, args.repeats)
        rows.append(r)
        g = r["gemm_ms"]
        print(f"{name:16s} {r['gemms']:5d} {r['plain_step_ms']:9.2f}ms {g['float32']:8.2f}ms {g['float64']:8.2f}ms"
              f" {g['bfloat16']:9.2f}ms {r['measured_floor']:14.2f}x {r['a_priori_floor']:14.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(),
                                               "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
