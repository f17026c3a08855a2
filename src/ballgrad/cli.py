"""The ``ballgrad`` command line."""

from __future__ import annotations

import argparse
import sys


def _demo(args) -> int:
    import torch

    import ballgrad as bg

    print("ballgrad demo: balls carry PyTorch's midpoint and a rigorous radius\n")
    x = bg.ball(torch.tensor([0.1, 1.0, 3.0]), 1e-6)
    print("x             =", x)
    print("x * 3 + 0.1   =", x * 3 + 0.1)
    y = bg.ball(torch.tensor([1e-3, 2.0, -4.0], dtype=torch.float64))
    print("1 / y (f64)   =", 1 / y)
    with bg.record() as rec:
        z = x / bg.ball(torch.tensor([0.5, 1.0, 2.0]), torch.tensor([1.0, 0.0, 0.0]))
    print("x / (0.5±1)   =", z)
    print("events:\n" + rec.summary())
    return 0


def _ops(args) -> int:
    from ballgrad.ops.registry import supported_ops

    names = supported_ops()
    for n in names:
        print(n)
    print(f"\n{len(names)} aten overloads have rules", file=sys.stderr)
    return 0


def _verify(args) -> int:
    """Run zoo models through the exact oracle and print containment, tightness and midpoint identity."""
    import json

    import torch
    from tqdm import tqdm

    import ballgrad as bg
    from verification import check_model, format_table, zoo

    names = zoo.NAMES if (not args.model or "all" in args.model) else args.model
    unknown = [n for n in names if n not in zoo.ZOO]
    if unknown:
        print(f"unknown model(s): {', '.join(unknown)}; choose from {', '.join(zoo.NAMES)} or all", file=sys.stderr)
        return 2
    dtype = {"float32": torch.float32, "float64": torch.float64}[args.dtype]
    samples = None if args.samples == 0 else args.samples
    reports = []
    bar = tqdm(names, desc="verify", unit="model", file=sys.stderr, disable=args.quiet)
    with bg.gemm_bound(args.gemm_bound):
        for name in bar:
            case = zoo.make(name, dtype=dtype, seed=args.seed, batch=args.batch)
            bar.set_postfix_str(name)
            report = check_model(case.model, case.inputs, case.targets, case.loss_fn, samples=samples, rad=args.rad,
                                 seed=args.seed, name=name,
                                 progress=lambda stage, n=name: bar.set_postfix_str(f"{n}: {stage}"))
            reports.append(report)
    bar.close()
    if args.gemm_bound != "measured":
        print(f"GEMM midpoint-error bound: {args.gemm_bound}")
    print(format_table(reports))
    unsupported = [r for r in reports if r.status == "unsupported"]
    if unsupported:
        print("\nnot checked (no ballgrad rule yet; not counted as failures):")
        for r in unsupported:
            print(f"  {r.model}: unsupported: {r.unsupported_op}")
    failed = [r for r in reports if r.failed]
    for r in failed:
        print(f"\nFAILED {r.model}:")
        print(str(r))
    if args.json:
        payload = {
            "ok": not failed,
            "samples_per_tensor": samples,
            "dtype": args.dtype,
            "seed": args.seed,
            "gemm_bound": args.gemm_bound,
            "torch": torch.__version__,
            "models": [r.to_dict() for r in reports],
        }
        with open(args.json, "w") as fh:
            json.dump(payload, fh, indent=2)
        print(f"\nwrote {args.json}", file=sys.stderr)
    return 1 if failed else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="ballgrad", description="Rigorous ball arithmetic for PyTorch")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="a short tour of ball arithmetic").set_defaults(run=_demo)
    sub.add_parser("ops", help="list the aten overloads that have rules").set_defaults(run=_ops)
    v = sub.add_parser("verify", help="check the model zoo against the exact mpmath/FLINT oracle",
                       description="Run zoo models (BENCHMARKS.md) through one training step with ballified "
                       "parameters and compare every checked loss, output and gradient element with the exact "
                       "oracle. Exit status 1 if an element is not contained or a midpoint differs from plain "
                       "PyTorch; models using an op without a rule are listed, not failed.")
    v.add_argument("--model", nargs="+", metavar="NAME", help="zoo model names, or all (default: all)")
    v.add_argument("--samples", type=int, default=100_000,
                   help="elements checked per tensor, a seeded random sample where a tensor is larger "
                   "(0 = all; default 100000: every element except in mlp-wide's two large weight gradients)")
    v.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    v.add_argument("--json", metavar="PATH", help="also write machine-readable results to PATH")
    v.add_argument("--seed", type=int, default=0, help="seed of the data and the sample (default 0)")
    v.add_argument("--rad", type=float, default=0.0, help="radius of the parameter balls (default 0: exact points)")
    v.add_argument("--batch", type=int, default=None, help="override the zoo batch size (quick runs)")
    v.add_argument("--gemm-bound", choices=["measured", "a-priori"], default="measured",
                   help="the GEMMs' midpoint-error bound to verify (ballgrad.gemm_bound; default: measured)")
    v.add_argument("--quiet", action="store_true", help="no progress bar")
    v.set_defaults(run=_verify)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    raise SystemExit(main())
