"""Where a Llama forward's GPU time goes: every kernel of a jitted forward, dense and kept quantized, read from
JAX's profiler trace.

Writes NF4 and FP8 checkpoints of N decoder layers of Llama-3-8B's shapes (``keep_quantized.py``'s writer),
loads them dense and kept quantized into jax_side's Llama, compiles ``jax.jit`` of the split state at each
token count, and traces ``--calls`` forwards queued back to back (``jax.profiler.trace``, after warm-up). From
the trace's GPU stream events it prints, per forward: the span from the first kernel's start to the last
one's end, the kernels' summed time (busy), their count, and the kernels that take the most time, grouped
by name. Busy time does not move with the host's noise, so it compares models and settings where wall times
of whole forwards (``keep_quantized.py``) spread more than the difference. Then every model's forward is
timed by wall clock, the models alternating in rounds (``keep_quantized.latency_ms``).

``--also-rows N`` compiles the kept models a second time with ``jax_side._mosaic.MAX_ROWS = N`` (the rows of
x kept layers hand the Mosaic GPU kernel; its default is 128), so that both limits are traced and timed in
one process; ``--options`` compiles every model again under XLA options (here with XLA's command buffers off)::

    python benchmarks/profile_forward.py --layers 2 --tokens 16 128 --also-rows 32 \
        --options "" "xla_gpu_enable_command_buffer=" --out profile.json

``--variants`` compiles the kept models once per setting of ``jax_side._mosaic`` (``NAME=INT,...``; models
named ``kept FP8 {_grid_scales=0}``), e.g. the FP8 kernel with its scales laid out by XLA against as stored::

    python benchmarks/profile_forward.py --models dense "kept FP8" --variants "" _grid_scales=0

The JSON holds the arguments and the module's row limit beside the results.
"""

from __future__ import annotations

import argparse
import collections
import functools
import glob
import gzip
import json
import os
import pathlib
import statistics
import tempfile
import time

import jax
import torch
from fused_matmul_mosaic import check_variants, variant
from keep_quantized import _forward, _ids, check_also_rows, latency_ms, load_model, write_checkpoint

from jax_side import _mosaic


def trace_events(trace_dir: str) -> tuple[list[dict], list[dict]]:
    """The kernel events (name, ts, dur in us) on the GPU stream lines of the one perfetto trace under
    ``trace_dir``, and the host's events."""
    (path,) = glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json.gz"), recursive=True)
    events = json.load(gzip.open(path))["traceEvents"]
    procs = {
        e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"
    }
    threads = {
        (e["pid"], e["tid"]): e["args"]["name"]
        for e in events
        if e.get("ph") == "M" and e.get("name") == "thread_name"
    }
    lines = {
        key
        for key, name in threads.items()
        if procs.get(key[0], "").startswith("/device:GPU") and "stream" in name.lower()
    }
    host = {pid for pid, name in procs.items() if name.startswith("/host")}
    done = [e for e in events if e.get("ph") == "X"]
    return [e for e in done if (e["pid"], e["tid"]) in lines], [e for e in done if e["pid"] in host]


def compiler_options(text: str) -> dict[str, str]:
    """``"KEY=VALUE;KEY=VALUE"`` (spaces around each pair ignored; ``""``: none) as a dict.

    Raises:
        ValueError: a pair without ``=`` or with an empty key.
    """
    out = {}
    for pair in filter(None, (p.strip() for p in text.split(";"))):
        key, eq, value = pair.partition("=")
        if not eq or not key.strip():
            raise ValueError(f"{pair!r} is no KEY=VALUE pair (in {text!r})")
        out[key.strip()] = value.strip()
    return out


def _by_name(events: list[dict]) -> list[tuple[str, list[float]]]:
    """``events`` grouped by name, their durations (us), the most time first."""
    groups: dict[str, list[float]] = collections.defaultdict(list)
    for e in events:
        groups[e["name"]].append(e["dur"])
    return sorted(groups.items(), key=lambda kv: -sum(kv[1]))


def profile(run, calls: int, waited: bool = False) -> dict:
    """Per forward: span, busy time and kernel count of ``calls`` queued calls of ``run()`` (``waited``: each
    waited for), the kernels and the host's events grouped by name (us per forward, launches per forward)."""
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d, create_perfetto_trace=True):
            if waited:
                for _ in range(calls):
                    run().block_until_ready()
            else:
                jax.block_until_ready([run() for _ in range(calls)])
        kernels, host = trace_events(d)
    if not kernels:
        return {"kernels": 0}
    start = min(e["ts"] for e in kernels)
    end = max(e["ts"] + e["dur"] for e in kernels)
    top, host_top = _by_name(kernels), _by_name(host)
    return {
        "span_us": (end - start) / calls,
        "busy_us": sum(e["dur"] for e in kernels) / calls,
        "kernels": len(kernels) / calls,
        "by_name": [{"name": n, "us": sum(d) / calls, "launches": len(d) / calls} for n, d in top],
        "host_by_name": [
            {"name": n, "us": sum(d) / calls, "events": len(d) / calls} for n, d in host_top[:40]
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--layers", type=int, default=2, help="decoder layers of Llama-3-8B's shapes (default 2)"
    )
    parser.add_argument(
        "--tokens", type=int, nargs="+", default=[16, 128], help="tokens per forward, batch 1"
    )
    parser.add_argument("--calls", type=int, default=5, help="forwards traced back to back")
    parser.add_argument("--rounds", type=int, default=5, help="wall-clock rounds, the models alternating")
    parser.add_argument("--also-rows", type=int, default=None,
                        help="also compile the kept models with this many rows as the Mosaic GPU kernel's limit "
                             "(jax_side._mosaic.MAX_ROWS; the models are named '..., up to N rows')")  # fmt: skip
    parser.add_argument("--top", type=int, default=12, help="kernel names printed per model")
    parser.add_argument("--host-top", type=int, default=0, help="host event names printed per model")
    parser.add_argument("--options", nargs="+", default=[""],
                        help="XLA compiler options to compile every model under, each a semicolon-separated list of "
                             "KEY=VALUE ('' is XLA's defaults), e.g. xla_gpu_enable_command_buffer=")  # fmt: skip
    parser.add_argument("--waited", action="store_true", help="also trace calls each waited for")
    parser.add_argument(
        "--models",
        nargs="+",
        default=["dense", "kept NF4", "kept FP8"],
        help="of 'dense', 'kept NF4', 'kept FP8' (default all three)",
    )
    parser.add_argument("--variants", nargs="+", default=[""],
                        help="settings of jax_side._mosaic to compile the kept models under, each a comma-separated "
                             "list of NAME=INT ('' is the module as it is), e.g. _products=0")  # fmt: skip
    parser.add_argument("--dump", default=None,
                        help="write each compiled program's HLO into this directory (numbered files; index.txt "
                             "names the model, options and tokens of each)")  # fmt: skip
    parser.add_argument("--out", default=None, help="write the results here as JSON")
    args = parser.parse_args()
    if unknown := set(args.models) - {"dense", "kept NF4", "kept FP8"}:
        parser.error(f"--models: no model {sorted(unknown)}; the models: 'dense', 'kept NF4', 'kept FP8'")
    for name in ("layers", "calls", "rounds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    if bad := [t for t in args.tokens if t < 1]:
        parser.error(f"--tokens: at least 1 token per forward, got {bad}")
    max_rows = _mosaic.MAX_ROWS
    check_also_rows(parser, args.also_rows)
    try:
        options = {opts: compiler_options(opts) for opts in args.options}
    except ValueError as e:
        parser.error(f"--options: {e}")
    # a misspelt setting would fail only after the checkpoints are written
    check_variants(parser, args.variants)
    if not torch.cuda.is_available() or jax.devices()[0].platform != "gpu":
        raise SystemExit(
            "profile_forward.py needs a CUDA GPU seen by torch and JAX (it reads the forwards' GPU kernels from "
            f"JAX's profiler); this process has torch CUDA {torch.cuda.is_available()}, JAX {jax.devices()[0]}"
        )
    limits = [max_rows] + ([args.also_rows] if args.also_rows else [])
    compiled: dict[tuple[str, int], tuple] = {}  # (model, tokens) -> (compiled forward, state, ids)
    tmp = tempfile.TemporaryDirectory(dir=".")
    for fmt in ("nf4", "fp8"):
        path, config, target = write_checkpoint(pathlib.Path(tmp.name), args.layers, fmt)
        for kept in [False, True] if fmt == "nf4" else [True]:
            if (f"kept {fmt.upper()}" if kept else "dense") not in args.models:
                continue
            (graphdef, state), _, _ = load_model(path, config, target, kept)
            for limit, spec in [(r, v) for r in limits for v in args.variants] if kept else [(max_rows, "")]:
                # a jit of its own per limit and setting: a jit reuses its trace, in which the kernel was picked
                forward = jax.jit(functools.partial(_forward, graphdef))
                name = f"kept {fmt.upper()}" if kept else "dense"
                name += f", up to {limit} rows" if kept and limit != max_rows else ""
                name += f" {{{spec}}}" if spec else ""
                # jax_side._mosaic's settings while the model is traced
                with variant(f"MAX_ROWS={limit}"), variant(spec):
                    for opts, parsed in options.items():
                        for tokens in args.tokens:
                            ids = _ids(tokens)
                            fn = forward.lower(state, ids).compile(compiler_options=parsed or None)
                            key = name + (f" [{opts}]" if opts else "")
                            compiled[key, tokens] = (fn, state, ids)
                            if args.dump:  # numbered files, and an index of what each holds
                                os.makedirs(args.dump, exist_ok=True)
                                file = f"{len(compiled):03d}.txt"
                                pathlib.Path(args.dump, file).write_text(fn.as_text())
                                with open(pathlib.Path(args.dump, "index.txt"), "a") as index:
                                    index.write(f"{file}\t{key}, {tokens} tokens\n")
            print(f"{fmt} kept={kept}: compiled", flush=True)
    tmp.cleanup()
    results: dict[str, dict] = {}
    print(f"{torch.cuda.get_device_name()}, jax {jax.__version__}: {args.layers} Llama-3-8B layers (vocab 32000), "
          f"batch 1; per forward, {args.calls} forwards traced back to back")  # fmt: skip
    for (name, tokens), (fn, state, ids) in compiled.items():
        run = functools.partial(fn, state, ids)
        jax.block_until_ready([run() for _ in range(3)])
        row = profile(run, args.calls)
        if args.waited:
            row["waited"] = profile(run, args.calls, waited=True)
        results[f"{name}, {tokens} tokens"] = row
        if not row["kernels"]:
            print(f"  {name:<24} {tokens:>4} tokens: no GPU kernels in the trace")
            continue
        print(f"  {name:<24} {tokens:>4} tokens: span {row['span_us']:8.1f} us  busy {row['busy_us']:8.1f} us  "
              f"kernels {row['kernels']:.0f}")  # fmt: skip
        for k in row["by_name"][: args.top]:
            print(f"      {k['us']:8.1f} us  x{k['launches']:<5.1f} {k['name'][:110]}")
        for k in row["host_by_name"][: args.host_top]:
            print(f"      host {k['us']:8.1f} us  x{k['events']:<5.1f} {k['name'][:100]}")
        if args.waited:
            print("    each call waited for:")
            for k in row["waited"]["host_by_name"][: args.host_top]:
                print(f"      host {k['us']:8.1f} us  x{k['events']:<5.1f} {k['name'][:100]}")
    for _ in range(args.rounds):  # wall clock, the models alternating
        for (name, tokens), (fn, state, ids) in compiled.items():
            waited, queued = latency_ms(fn, state, ids)
            start = time.perf_counter()
            outs = [fn(state, ids) for _ in range(10)]
            enqueued = (time.perf_counter() - start) / 10 * 1e3
            jax.block_until_ready(outs)
            row = results[f"{name}, {tokens} tokens"]
            row.setdefault("waited_ms_rounds", []).append(waited)
            row.setdefault("back_to_back_ms_rounds", []).append(queued)
            row.setdefault("enqueue_ms_rounds", []).append(enqueued)
    print(f"wall clock, median of {args.rounds} rounds (10 calls each waited for; 10 back to back; the host's time "
          "to queue 10 calls)")  # fmt: skip
    for key, row in results.items():
        row["waited_ms"] = statistics.median(row["waited_ms_rounds"])
        row["back_to_back_ms"] = statistics.median(row["back_to_back_ms_rounds"])
        row["enqueue_ms"] = statistics.median(row["enqueue_ms_rounds"])
        spread = f"{min(row['back_to_back_ms_rounds']):.3f}-{max(row['back_to_back_ms_rounds']):.3f}"
        print(
            f"  {key:<36} waited {row['waited_ms']:7.3f} ms  back to back {row['back_to_back_ms']:7.3f} ms [{spread}]  "
            f"enqueued {row['enqueue_ms']:7.3f} ms"
        )
    if args.out:
        meta = {"device": torch.cuda.get_device_name(), "jax": jax.__version__, "torch": torch.__version__,
                "args": vars(args), "mosaic_max_rows": max_rows}  # fmt: skip
        pathlib.Path(args.out).write_text(json.dumps({**meta, "results": results}, indent=1))


if __name__ == "__main__":
    main()
