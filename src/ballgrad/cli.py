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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="ballgrad", description="Rigorous ball arithmetic for PyTorch")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("demo", help="a short tour of ball arithmetic").set_defaults(run=_demo)
    sub.add_parser("ops", help="list the aten overloads that have rules").set_defaults(run=_ops)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    raise SystemExit(main())
