"""OpInfo coverage of ballgrad (issue 5): run every float op of PyTorch's op_db on balls and print the table.

    python benchmarks/opinfo_coverage.py [--samples N | --all] [--json out.json] [--only NAME ...] [--no-backward]

Prints one row per op (status, samples passed/run, backward, containment method or failure) and the summary: the
share of op_db's floating-point ops that are supported (every sample ran, midpoints identical, contained), the
partial ones, the unsupported ones (UnsupportedOpError naming the aten overload) and any error (a bug). See
``verification/opinfo.py`` for what is checked and how each containment reference is labelled.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings

warnings.filterwarnings("ignore")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=3, help="samples per op and dtype (default 3)")
    parser.add_argument("--all", action="store_true", help="every sample of every op (slow)")
    parser.add_argument("--json", metavar="PATH", help="write the per-op results and the summary as JSON")
    parser.add_argument("--only", nargs="*", help="op names (op_db names, with .variant)")
    parser.add_argument("--no-backward", action="store_true")
    parser.add_argument("--no-reference", action="store_true", help="skip containment references (faster)")
    args = parser.parse_args(argv)

    from verification import opinfo

    ops = opinfo.float_ops()
    if args.only:
        ops = [op for op in ops if opinfo.op_name(op) in set(args.only)]
    t0 = time.perf_counter()
    results = []
    for op in ops:
        results.append(opinfo.check_op(op, samples_per_dtype=None if args.all else args.samples,
                                       backward=not args.no_backward, reference=not args.no_reference))
    elapsed = time.perf_counter() - t0
    summary = opinfo.summarize(results)
    print(opinfo.format_table(results))
    print()
    print(f"op_db float ops: {summary['float_ops']}; with a floating tensor argument: {summary['applicable']}")
    print(f"supported: {summary['supported']} ({100 * summary['supported_share']:.1f}%), "
          f"supported or partial: {100 * summary['supported_or_partial_share']:.1f}%")
    for status in ("partial", "unsupported", "error"):
        names = summary["by_status"][status]
        print(f"{status} ({len(names)}): {' '.join(names)}")
    print(f"n/a (no floating tensor argument): {' '.join(summary['by_status']['n/a'])}")
    print(f"containment of supported ops (ops checked with each reference): {summary['containment_methods']}")
    print(f"strongest reference per supported op: {summary['strongest_containment']}")
    print(f"{elapsed:.1f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"summary": summary, "ops": [r.as_dict() for r in results], "seconds": elapsed}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
