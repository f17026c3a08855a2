"""Tightness of ballgrad's gradient balls on the zoo, as in NumGeom-AD's Table 1 (../shared/BENCHMARKS.md).

For each parameter's gradient: observed = max_i |mid_i - exact_i| (exact from the verification oracle), predicted =
max_i rad_i, ratio = predicted / observed. Reported per model: the median ratio over parameter tensors and the
elementwise median of rad_i / |mid_i - exact_i| over elements with a non-zero error, next to the seed paper's
figures (its per-layer scalar functionals: mlp-small 524x, mlp-deep 36,000x).

    python benchmarks/tightness.py [--model mlp-small mlp-deep] [--dtype float32] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

from verification import check_model
from verification.zoo import NAMES, make

SEED_FIGURES = {"mlp-small": 524.0, "mlp-deep": 36_000.0}


def run(models, dtype, samples=None):
    rows = []
    for name in models:
        case = make(name, dtype=dtype)
        report = check_model(case.model, case.inputs, case.targets, case.loss_fn, samples=samples)
        report.model = name
        per_param = [
            {"tensor": t.name, "observed": t.observed, "predicted": t.predicted, "ratio": t.ratio,
             "elementwise_median": t.median_elementwise_ratio}
            for t in report.tensors if t.kind == "grad"
        ]
        rows.append({
            "model": name,
            "status": report.status if report.status != "unsupported" else f"unsupported: {report.unsupported_op}",
            "containment": report.containment,
            "median_ratio": report.median_ratio,
            "elementwise_median": report.median_elementwise_ratio,
            "seed_ratio": SEED_FIGURES.get(name),
            "parameters": per_param,
        })
    return rows


def format_rows(rows) -> str:
    lines = [f"{'model':<17} {'containment':>11} {'median ratio':>13} {'elementwise':>12} {'NumGeom-AD':>11}  status"]
    for r in rows:
        cont = "-" if r["containment"] is None else f"{r['containment']:.2f}%"
        med = "-" if r["median_ratio"] is None else f"{r['median_ratio']:,.0f}x"
        elem = "-" if r["elementwise_median"] is None else f"{r['elementwise_median']:,.0f}x"
        seed = "-" if r["seed_ratio"] is None else f"{r['seed_ratio']:,.0f}x"
        lines.append(f"{r['model']:<17} {cont:>11} {med:>13} {elem:>12} {seed:>11}  {r['status']}")
        for p in r["parameters"]:
            ratio = "-" if p["ratio"] is None else f"{p['ratio']:,.1f}x"
            lines.append(f"    {p['tensor']:<28} observed {p['observed']:.2e}  predicted {p['predicted']:.2e}  {ratio}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", nargs="+", default=["mlp-small", "mlp-deep"], choices=NAMES)
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--samples", type=int, default=None, help="elements checked per tensor (default: all)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    rows = run(args.model, getattr(torch, args.dtype), args.samples)
    print(format_rows(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2, default=str)
    return 0 if all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
