"""The ``qbridge`` command: parses arguments and calls public functions, nothing more."""

from __future__ import annotations

import argparse
import re
import sys
import warnings
from collections.abc import Callable


def _demo(args: argparse.Namespace) -> int:
    from qbridge._demo import format_demo, run_demo

    result = run_demo(seed=args.seed, workdir=args.workdir, device=args.device, overwrite=args.overwrite)
    print(format_demo(result))
    return 0 if result.parity.ok and result.weights_equal == result.weights_checked else 1


def _inspect(args: argparse.Namespace) -> int:
    from qbridge import inspect_checkpoint

    summary = inspect_checkpoint(args.path)
    print(summary)
    return 1 if summary.config_mismatches else 0  # what a load without a target refuses


def _pairs(items: list[str] | None, flag: str) -> dict[str, str] | None:
    if not items:
        return None
    out = {}
    for item in items:
        # split at the first "=" that leaves a valid regex before it (a pattern may hold "=", as in "(?=")
        splits = [i for i, c in enumerate(item) if c == "=" and i > 0]
        if not splits:
            raise ValueError(f"{flag} takes PATTERN=VALUE, got {item!r}")
        for i in splits:
            try:
                re.compile(item[:i])
            except re.error as e:
                error = e
                continue
            out[item[:i]] = item[i + 1 :]
            break
        else:
            raise ValueError(f"{flag} {item!r}: no '=' in it follows a valid regular expression ({error})")
    return out


def _convert(args: argparse.Namespace) -> int:
    from qbridge import build_target, convert_checkpoint

    target = build_target(args.target, args.path, param_dtype=args.dtype) if args.target else None
    report = convert_checkpoint(
        args.path, args.out, target=target, device=args.device, dtype=args.dtype, strict=not args.no_strict,
        kinds=_pairs(args.kind, "--kind"), rename=_pairs(args.rename, "--rename"), overwrite=args.overwrite,
        keep_quantized=args.keep_quantized, progress=not args.quiet,
    )  # fmt: skip
    print(f"{report}\nwrote {args.out}")
    return 0


def _errors() -> tuple[type[BaseException], ...]:
    from jax_side import MatchError
    from qbridge import QBridgeError

    # OSError: a path the command was given cannot be made or written (a read-only or missing parent), named
    return (QBridgeError, MatchError, OSError, ValueError, ImportError, re.error)


def _parity(args: argparse.Namespace) -> int:
    from qbridge.parity import trace_checkpoint

    report = trace_checkpoint(args.path, model=args.model, keep_quantized=args.keep_quantized, tokens=args.tokens,
                              batch=args.batch, seed=args.seed)  # fmt: skip
    print(report)
    return 0 if report.first_divergence is None else 1


def _bench(args: argparse.Namespace) -> int:
    from qbridge._bench import dump_json, format_bench, run_bench

    try:
        result = run_bench(quick=args.quick)
    except RuntimeError as e:
        print(f"qbridge bench: {e}", file=sys.stderr)
        return 2
    print(dump_json(result) if args.json else format_bench(result))
    return 0


def _multiprocess(args: argparse.Namespace) -> int:
    from qbridge import check_multiprocess_load

    mesh = args.mesh
    pairs = _pairs(args.rule, "--rule") or {}
    rules = [(pattern, [None if a in ("", "none", "None") else a for a in axes.split(",")])
             for pattern, axes in pairs.items()] or None  # fmt: skip
    try:
        reports = check_multiprocess_load(
            args.paths, processes=args.processes, cpu_devices=args.cpu_devices, gpus=args.gpus, mesh_shape=mesh,
            rules=rules, convert_dir=args.convert_dir, timeout=args.timeout,
        )  # fmt: skip
    except RuntimeError as e:
        print(f"qbridge multiprocess: {e}", file=sys.stderr)
        return 1
    print("\n".join(str(r) for r in reports))
    return 0 if all(r.ok for r in reports) else 1


def _at_least(least: int, below: int = 2**63) -> Callable[[str], int]:
    """An argparse type: an integer from ``least`` to under ``below`` (argparse names the option in its
    error); the default bound is what torch's and numpy's seeds and counts hold."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"an integer, got {text!r}") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"at least {least}, got {value}")
        if value >= below:
            raise argparse.ArgumentTypeError(f"below {below}, got {value}")
        return value

    return parse


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a number of seconds, got {text!r}") from None
    if not value > 0:  # NaN too
        raise argparse.ArgumentTypeError(f"a positive number of seconds, got {text}")
    return value


def _mesh(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(s) for s in text.lower().split("x"))
    except ValueError:
        shape = ()
    if not shape or any(n < 1 for n in shape):
        raise argparse.ArgumentTypeError(f"'N' or 'DxM' with positive integers, got {text!r}")
    return shape


class _Defaults(argparse.HelpFormatter):
    """Help that shows an option's default when it has a meaningful one (not None, not a switch)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if (
            action.default not in (None, False, argparse.SUPPRESS)
            and "%(default)" not in text
            and action.option_strings
        ):
            text += " (default: %(default)s)"
        return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qbridge",
        description="Quantized PyTorch checkpoints (bitsandbytes, FP8, torchao) into JAX/Flax: try, inspect, "
        "convert, compare, measure.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    defaults = _Defaults
    demo = sub.add_parser(
        "demo",
        formatter_class=defaults,
        help="a small Llama quantized to NF4, loaded into Flax through qbridge, compared",
    )
    demo.add_argument("--seed", type=_at_least(0), default=0, help="seed of the random model and inputs")
    demo.add_argument(
        "--workdir", default=None, help="keep the checkpoints here (default: a temporary directory)"
    )
    demo.add_argument(
        "--device", default=None, help="torch device for bitsandbytes (default: cuda if present)"
    )
    demo.add_argument(
        "--overwrite",
        action="store_true",
        help="replace checkpoints in WORKDIR/llama-bf16 and WORKDIR/llama-nf4 that an earlier demo did not write",
    )
    demo.set_defaults(func=_demo)
    inspect = sub.add_parser(
        "inspect",
        formatter_class=defaults,
        help="what a checkpoint holds: format, tensors by kind, sizes",
        description="Summarizes a checkpoint without reading its weights: its quantization format, its tensors "
        "by kind (bnb4, bnb8, fp8, torchao, dense) with stored and decoded sizes, the dtypes they decode to, "
        "and what needs care. Scales (absmax, scale_inv, SCB) are read and checked; a damaged file or scale "
        "is an error naming it (exit status 2). Tensors missing or of other sizes than the model config.json "
        "builds (what a load without a target refuses) are listed in the summary (exit status 1).",
    )
    inspect.add_argument(
        "path",
        help="a checkpoint: a folder (safetensors shards with their index, or a torch state dict) or one file",
    )
    inspect.set_defaults(func=_inspect)
    convert = sub.add_parser(
        "convert",
        formatter_class=defaults,
        help="a PyTorch checkpoint to an Orbax checkpoint of Flax parameters",
    )
    convert.add_argument("path")
    convert.add_argument("out")
    convert.add_argument(
        "--device", default=None, help="'cpu', 'cuda' or 'cuda:i' (default: the GPU if JAX and torch see it)"
    )
    convert.add_argument("--dtype", default=None, help="cast floating parameters (e.g. bfloat16)")
    convert.add_argument("--target", default=None,
                         help="lay out for this model: 'llama' (the built-in Flax Llama) or a Flax model class by import "
                              "path, 'package.module:ClassName' (transformers' Flax classes included), built from the "
                              "checkpoint's config.json")  # fmt: skip
    convert.add_argument(
        "--kind", action="append", metavar="PATTERN=KIND", help="module kind override (repeatable)"
    )
    convert.add_argument(
        "--rename", action="append", metavar="PATTERN=REPLACEMENT", help="checkpoint key rename (repeatable)"
    )
    convert.add_argument(
        "--no-strict",
        action="store_true",
        help="report mismatches instead of refusing (with a target: the target's; without: config.json's model's)",
    )
    convert.add_argument(
        "--overwrite", action="store_true", help="replace OUT once the new checkpoint is complete"
    )
    convert.add_argument(
        "--keep-quantized",
        action="store_true",
        help="write 4-bit and FP8 Linear kernels and embedding tables kept quantized (their stored pieces; "
        "restore_converted gives them back as jax_side.NF4Weight / FP8Weight)",
    )
    convert.add_argument("--quiet", action="store_true", help="no progress bar")
    convert.set_defaults(func=_convert)
    parity = sub.add_parser(
        "parity",
        formatter_class=defaults,
        help="layer-by-layer parity: transformers' torch model of a checkpoint vs a Flax model",
    )
    parity.add_argument("path", help="a transformers checkpoint directory (config.json and the weights)")
    parity.add_argument(
        "--model",
        default="llama",
        help="'llama' (built in) or an nnx Module class by import path, 'package.module:Name'",
    )
    parity.add_argument("--keep-quantized", action="store_true", help="load the Flax model kept quantized")
    parity.add_argument("--tokens", type=int, default=16, help="sequence length of the random token ids")
    parity.add_argument("--batch", type=int, default=2, help="sequences per batch")
    parity.add_argument("--seed", type=_at_least(0), default=0, help="seed of the random token ids")
    parity.set_defaults(func=_parity)
    bench = sub.add_parser(
        "bench",
        formatter_class=defaults,
        help="dequantization speed on this GPU against the copy ceiling and baselines",
    )
    bench.add_argument("--json", action="store_true", help="print JSON instead of a table")
    bench.add_argument("--quick", action="store_true", help="fewer shapes")
    bench.set_defaults(func=_bench)
    multi = sub.add_parser(
        "multiprocess",
        formatter_class=defaults,
        help="load checkpoints sharded over N local jax.distributed processes; check every shard, measure reads",
    )
    multi.add_argument("paths", nargs="+", help="checkpoint directories or files")
    multi.add_argument("--processes", type=_at_least(1), default=2, help="local processes to start")
    multi.add_argument("--cpu-devices", type=_at_least(1), default=4, help="CPU devices per process")
    multi.add_argument("--gpus", action="store_true", help="one GPU per process instead of CPU devices")
    multi.add_argument(
        "--mesh", default=None, type=_mesh, help="mesh shape over all devices: 'N' or 'DxM' (default: 1-D)"
    )
    multi.add_argument("--rule", action="append", metavar="PATTERN=AXES",
                       help="shard leaves matching PATTERN as AXES, mesh axes or 'none' per leaf axis: 'x' on a 1-D mesh, "
                            "'data' and 'model' on a 2-D one, e.g. 'down_proj\\.kernel$=model,none' (repeatable; "
                            "default: split the last axis, and the first on a 2-D mesh)")  # fmt: skip
    multi.add_argument(
        "--convert-dir",
        default=None,
        help="also convert the first checkpoint to DIR/NAME.orbax from all processes (created if "
        "missing; an existing NAME.orbax is replaced) and restore it onto another sharding",
    )
    multi.add_argument("--timeout", type=_positive_seconds, default=600.0, help="seconds before every process is stopped")  # fmt: skip
    multi.set_defaults(func=_multiprocess)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def one_line(message: Warning | str, category: type[Warning], *_: object, **__: object) -> None:
        print(f"qbridge {args.command}: {category.__name__}: {message}", file=sys.stderr)

    with warnings.catch_warnings():
        warnings.showwarning = one_line  # a warning reads as a line of the command, without Python's echo
        try:
            return args.func(args)
        except _errors() as e:
            print(f"qbridge {args.command}: {e}", file=sys.stderr)
            return 2


if __name__ == "__main__":
    sys.exit(main())
