"""The ``qbridge`` command: parses arguments and calls public functions, nothing more."""

from __future__ import annotations

import argparse
import sys


def _demo(args: argparse.Namespace) -> int:
    from qbridge._demo import format_report, run_demo

    report = run_demo(args.rows, args.cols, seed=args.seed, device=args.device)
    print(format_report(report))
    return 0 if all(r.equal for r in report) else 1


def _bench(args: argparse.Namespace) -> int:
    from qbridge._bench import dump_json, format_bench, run_bench

    try:
        result = run_bench(quick=args.quick)
    except RuntimeError as e:
        print(f"qbridge bench: {e}", file=sys.stderr)
        return 2
    print(dump_json(result) if args.json else format_bench(result))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qbridge", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="quantize a random weight with bitsandbytes and torchao, dequantize it, report")
    demo.add_argument("--rows", type=int, default=512)
    demo.add_argument("--cols", type=int, default=1024)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--device", default=None, help="torch device (default: cuda if present, else cpu)")
    demo.set_defaults(func=_demo)
    bench = sub.add_parser("bench", help="dequantization speed on this GPU against the copy ceiling and baselines")
    bench.add_argument("--json", action="store_true", help="print JSON instead of a table")
    bench.add_argument("--quick", action="store_true", help="fewer shapes")
    bench.set_defaults(func=_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
