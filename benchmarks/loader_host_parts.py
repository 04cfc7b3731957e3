"""Where a GPU load's host time goes, per checkpoint tensor, at DeepSeek-V3's layout in tiny shapes.

Seven parts, each printed (times in microseconds per checkpoint tensor unless said otherwise):

1. ``phases``: ``qbridge.load_checkpoint`` of one tiny DeepSeek-V3 MoE layer (``deepseek_v3_scale.py --tiny``:
   1558 tensors, 782 leaves; device work and reading negligible, so wall time is host work), with timers
   wrapped around the loader's steps (opening, planning, the FP8 groups' reads, allocation call, grouped
   launch ...), after every background compile. The timers add their own cost: the loads' time is printed
   without them (untimed, first) and with them.
2. ``group``: the steps of one group of 32 expert weights timed one by one (median of 200 calls), then the
   whole grouped decode (``FP8Groups`` decoding 32 weights), the arrays kept alive as a load keeps them.
3. ``allocation``: XLA programs that make n new arrays, kept alive (a load keeps its results): a broadcast of
   a distinct value per array against ``jax.lax.empty`` (XLA's AllocateBuffer on a GPU).
4. ``profile``: ``cProfile`` of the calling thread over ``--loads`` loads after every background compile, the
   functions that spend most of it themselves and with what they call, and what ``load_checkpoint`` and the
   groups' ``flush`` call (the profiler's own cost included: for where, not how much).
5. ``reads``: ``Checkpoint.read_stacked`` of a group's 32 scales and of its 32 tiny weights (no pinning, so any
   machine), microseconds per key.
6. ``threads``: each load's wall time against the CPU time of the whole process and of the calling thread,
   and the loader's steps by thread (the calling one or another), wall and CPU time inside each.
7. ``steps``: the host steps of a GPU load that need no GPU (opening, planning, names and routes, read-ahead
   lists, the FP8 groups' bookkeeping without their decode, nesting), timed one by one on any machine.

Usage (GPU machine): ``python benchmarks/loader_host_parts.py [--parts phases group allocation]``.
``phases``, ``profile``, ``reads``, ``threads`` and ``steps`` run on a CPU too (``--device cpu``: the CPU load decodes weight
by weight, without groups). ``--group N`` sets the FP8 groups' size (weights per grouped decode) for the process.
"""

from __future__ import annotations

import argparse
import collections
import functools
import itertools
import math
import pathlib
import statistics
import sys
import tempfile
import time
from typing import Any

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import deepseek_v3_scale

COUNT = 1558  # checkpoint tensors of one tiny layer with 256 routed experts


def _load(root: pathlib.Path, device: str) -> None:
    import jax

    import qbridge

    jax.block_until_ready(qbridge.load_checkpoint(root, device=device, progress=False))


def _warm(root: pathlib.Path, device: str) -> None:
    """Loads until every background compile the loads ask for is ready, and twice more."""
    import torch_side
    from qbridge._handoff import wait_for_allocators

    for _ in range(3):
        _load(root, device)
    torch_side.wait_for_kernels()
    wait_for_allocators()
    for _ in range(2):
        _load(root, device)


def _timed(owner: Any, name: str, record: Any) -> tuple[Any, str, Any]:
    """Wraps ``owner.name`` so that every call reports ``record(name, wall seconds, CPU seconds of its thread)``;
    returns ``(owner, name, original)`` to put back."""
    f = getattr(owner, name)

    @functools.wraps(f)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        wall, cpu = time.perf_counter(), time.thread_time()
        try:
            return f(*args, **kwargs)
        finally:
            record(name, time.perf_counter() - wall, time.thread_time() - cpu)

    setattr(owner, name, wrapper)
    return owner, name, f


def phases(root: pathlib.Path, device: str, loads: int) -> None:
    from qbridge import _checkpoint, _group, _handoff, _loader

    spent: collections.defaultdict[str, float] = collections.defaultdict(float)
    calls: collections.Counter[str] = collections.Counter()

    def record(name: str, wall: float, cpu: float) -> None:
        spent[name] += wall
        calls[name] += 1

    _warm(root, device)
    plain = []  # without the timers, which add their own cost
    for _ in range(loads):
        t = time.perf_counter()
        _load(root, device)
        plain.append(time.perf_counter() - t)
    wall = statistics.median(plain)
    print(f"phases ({device}), untimed: {wall * 1e3:.1f} ms per load = {wall / COUNT * 1e6:.1f} us per tensor "
          f"(median of {loads})")  # fmt: skip
    originals = [
        _timed(owner, name, record)
        for owner, names in [
            (_loader, ["open_checkpoint", "plan_load", "materialize", "hand_over"]),
            (_loader._ReadAhead, ["advance"]),
            (_group.FP8Groups, ["flush", "kind", "_one", "_check"]),
            (_group, ["dequantize_fp8_group_into", "fp8_planned"]),
            (_checkpoint.Checkpoint, ["read_stacked", "read_into", "read_to", "stage_small", "close"]),
            (_handoff.XlaDestinations, ["take_many", "take", "settle"]),
        ]
        for name in names
    ]
    _warm(root, device)
    spent.clear()
    calls.clear()
    walls = []
    for _ in range(loads):
        t = time.perf_counter()
        _load(root, device)
        walls.append(time.perf_counter() - t)
    wall = statistics.median(walls)
    print(
        f"phases ({device}), timed: {wall * 1e3:.1f} ms per load = {wall / COUNT * 1e6:.1f} us per tensor (median of "
        f"{loads})"
    )
    for name, s in sorted(spent.items(), key=lambda kv: -kv[1]):
        print(
            f"  {name:28s} {s / loads / COUNT * 1e6:7.2f} us per tensor  {calls[name] // loads} calls per load"
        )
    for owner, name, f in originals:  # the later parts time the loader unwrapped
        setattr(owner, name, f)


def _median_us(fn: Any, repeat: int = 200) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e6


def reads(root: pathlib.Path, rounds: int = 21) -> None:
    """``Checkpoint.read_stacked`` of a group's 32 scales and of its 32 tiny weights, as the grouped FP8 route
    reads them (no pinning: any machine), microseconds per key, median of ``rounds`` passes over the layer."""
    from qbridge._checkpoint import open_checkpoint

    with open_checkpoint(root) as ckpt:
        for leaf in ("weight_scale_inv", "weight"):
            groups = [
                [f"model.layers.0.mlp.experts.{e}.{proj}.{leaf}" for e in range(g, g + 32)]
                for proj in ("gate_proj", "up_proj", "down_proj")
                for g in range(0, 256, 32)
            ]
            for keys in groups:  # the file's pages in the page cache, the byte ranges looked up
                ckpt.read_stacked(keys)
            times = []
            for _ in range(rounds):
                t = time.perf_counter()
                for keys in groups:
                    ckpt.read_stacked(keys)
                times.append((time.perf_counter() - t) / (32 * len(groups)))
            print(f"reads: read_stacked of 32 {leaf} tensors: {statistics.median(times) * 1e6:.2f} us per key "
                  f"(median of {rounds})")  # fmt: skip


def group(root: pathlib.Path) -> None:
    import jax

    from qbridge import _handoff
    from qbridge._checkpoint import open_checkpoint
    from qbridge._group import FP8Groups
    from qbridge._loader import plan_load
    from torch_side._fp8 import dequantize_fp8_group_into, fp8_planned

    _warm(root, "cuda")
    dev, jdev = torch.device("cuda", 0), jax.devices("gpu")[0]
    with open_checkpoint(root) as ckpt:
        _, plan, _, _ = plan_load(ckpt, None)
        keys = [f"model.layers.0.mlp.experts.{i}.down_proj.weight" for i in range(32)]
        by_key = {p.key: p for p in plan}
        members = [by_key[k] for k in keys]
        entries = [ckpt.entries[k] for k in keys]
        skeys = [e.keys["scale"] for e in entries]
        (wshape, _), (sshape, _) = ckpt.source.shapes[keys[0]], ckpt.source.shapes[skeys[0]]
        shape, dtype = entries[0].shape, torch.bfloat16
        args = dict(block_size=entries[0].info["block_size"], transpose=True)
        kept: list[Any] = []

        def keep(x: Any) -> Any:
            kept.append(x)
            if len(kept) > 40:
                kept.pop(0)
            return x

        rows = ckpt.read_stacked(skeys)
        packed = ckpt.read_stacked(keys, pin=True).to(dev)
        W = packed[:, : math.prod(wshape)].unflatten(1, wshape)
        S = rows.to(dev)[:, : math.prod(sshape)].unflatten(1, sshape)
        destinations = _handoff.XlaDestinations()
        arrays = destinations.take_many(32, (shape[1], shape[0]), dtype, jdev, dev)
        addresses = [a.unsafe_buffer_pointer() for a in arrays]
        steps = {
            "read 32 scales (read_stacked)": lambda: ckpt.read_stacked(skeys),
            "read 32 tiny weights, pinned": lambda: ckpt.read_stacked(keys, pin=True),
            "scales to the GPU, [n, ...] view": lambda: rows.to(dev, non_blocking=True)[
                :, : math.prod(sshape)
            ].unflatten(1, sshape),
            "the kind's plan (fp8_planned)": lambda: fp8_planned(W[0], S[0], dtype, **args),
            "allocation call of 32 arrays (take_many)": lambda: keep(
                destinations.take_many(32, (shape[1], shape[0]), dtype, jdev, dev)
            ),
            "32 addresses (unsafe_buffer_pointer)": lambda: [a.unsafe_buffer_pointer() for a in arrays],
            "grouped launch (dequantize_fp8_group_into)": lambda: dequantize_fp8_group_into(
                W, S, addresses, dtype, **args
            ),
        }
        for label, fn in steps.items():
            print(f"group: {label:44s} {_median_us(fn):8.1f} us")

        def whole() -> float:
            into, values = _handoff.XlaDestinations(), {}
            groups = FP8Groups(ckpt, dev, jdev, into, values, 1 << 40)
            kinds = [groups.kind(ckpt.entries[p.key], p.rule, None) for p in members]
            for p, kind in zip(members[:-1], kinds[:-1]):
                groups.add(kind, p.leaf.path, ckpt.entries[p.key])
            t = time.perf_counter()
            groups.add(kinds[-1], members[-1].leaf.path, ckpt.entries[members[-1].key])  # decodes the 32
            took = time.perf_counter() - t
            into.settle()
            if any(v is None for v in values.values()):
                raise RuntimeError("a weight of the group was not decoded")
            keep(values)
            return took

        for _ in range(10):
            whole()
        took = sorted(whole() for _ in range(100))
        print(
            f"group: {'the whole grouped decode of 32 weights':44s} {took[50] * 1e6:8.1f} us (median of 100)"
        )


def allocation() -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np

    device = jax.devices()[0]
    shape, dtype = (256, 128), jnp.bfloat16
    out = (jax.sharding.SingleDeviceSharding(device),)
    fill = jax.device_put(np.zeros((), dtype), device)

    def broadcast(count: int) -> Any:
        return lambda f: tuple(jax.lax.broadcast(f + np.asarray(i, dtype), shape) for i in range(count))

    def empty(count: int) -> Any:
        return lambda f: tuple(jax.lax.empty(shape, dtype) for _ in range(count))

    for count in (1, 8, 32, 64):
        programs = {
            label: jax.jit(make(count), out_shardings=out * count).lower(fill).compile()
            for label, make in [("broadcast of a value per array", broadcast), ("jax.lax.empty", empty)]
        }
        for label, fn in programs.items():
            kept: list[Any] = [fn(fill) for _ in range(20)]
            jax.block_until_ready(kept)

            def call(fn: Any = fn, kept: list[Any] = kept) -> None:
                kept.append(fn(fill))
                if len(kept) > 60:
                    kept.pop(0)

            print(
                f"allocation: {count:3d} arrays kept alive, {label:32s} {_median_us(call):8.1f} us per call"
            )


def profile(root: pathlib.Path, device: str, loads: int) -> None:
    import cProfile
    import pstats

    _warm(root, device)
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(loads):
        _load(root, device)
    profiler.disable()
    stats = pstats.Stats(profiler)
    total = stats.total_tt  # type: ignore[attr-defined]
    print(
        f"profile ({device}): {total / loads / COUNT * 1e6:.1f} us per tensor under the profiler, {loads} loads"
    )
    for key in ("tottime", "cumulative"):
        print(f"  by {key}: us per checkpoint tensor, calls per load, function")
        rows = sorted(stats.stats.items(), key=lambda kv: -kv[1][2 if key == "tottime" else 3])  # type: ignore[attr-defined]
        for (file, line, name), (_, calls, tt, ct, _) in rows[:30]:
            spent = tt if key == "tottime" else ct
            where = f"{pathlib.Path(file).name}:{line}" if line else file
            print(f"    {spent / loads / COUNT * 1e6:7.2f} {calls // loads:6d}  {name} ({where})")
    # what the loader's main steps spend their time in: each one's callees, by time under the call
    for file_end, name in [
        ("_loader.py", "load_checkpoint"),
        ("_group.py", "flush"),
        ("_group.py", "_one"),
        ("_decode.py", "materialize"),
        ("_place.py", "hand_over"),
        ("_handoff.py", "take"),
        ("_checkpoint.py", "read_to"),
    ]:
        for caller in [k for k in stats.stats if k[0].endswith(file_end) and k[2] == name]:  # type: ignore[attr-defined]
            print(
                f"  callees of {name} ({file_end}:{caller[1]}): us per checkpoint tensor under it, calls per "
                "load, function"
            )
            callees = []
            for (file, line, callee), (*_, callers) in stats.stats.items():  # type: ignore[attr-defined]
                if caller in callers:
                    _, calls, _, under = callers[caller]
                    where = f"{pathlib.Path(file).name}:{line}" if line else file
                    callees.append((under, calls, f"{callee} ({where})"))
            for under, calls, label in sorted(callees, reverse=True)[:12]:
                print(f"    {under / loads / COUNT * 1e6:7.2f} {calls // loads:6d}  {label}")


def threads(root: pathlib.Path, device: str, loads: int) -> None:
    """Each load's wall time against the CPU time of the process (every thread) and of the calling thread,
    then the loader's steps by thread: wall time and that thread's CPU time inside each (a wall time above the
    CPU time is waiting: for the GIL, another thread, the device or the disk)."""
    import concurrent.futures
    import threading

    from qbridge import _checkpoint, _group, _handoff, _loader

    _warm(root, device)
    rows = []
    for _ in range(loads):
        w, p, c = time.perf_counter(), time.process_time(), time.thread_time()
        _load(root, device)
        rows.append((time.perf_counter() - w, time.process_time() - p, time.thread_time() - c))
    for i, label in enumerate(["wall", "process CPU (every thread)", "calling thread's CPU"]):
        v = statistics.median(r[i] for r in rows)
        print(
            f"threads ({device}): {label:28s} {v / COUNT * 1e6:7.1f} us per tensor (median of {loads} loads)"
        )
    spent: collections.defaultdict[tuple[str, str], list[float]] = collections.defaultdict(
        lambda: [0.0, 0.0, 0]
    )
    main = threading.main_thread()

    def record(name: str, wall: float, cpu: float) -> None:
        row = spent[("main" if threading.current_thread() is main else "other", name)]
        row[0] += wall
        row[1] += cpu
        row[2] += 1

    originals = [
        _timed(owner, name, record)
        for owner, names in [
            (_loader, ["open_checkpoint", "plan_load", "materialize", "hand_over"]),
            (_group.FP8Groups, ["flush", "_reads", "_check"]),
            (_group, ["dequantize_fp8_group_into"]),
            (_checkpoint._Source, ["read_stacked", "read_into", "read", "stage_small"]),
            (_checkpoint.Checkpoint, ["read_to", "close"]),
            (_handoff.XlaDestinations, ["take_many", "take", "settle"]),
            (concurrent.futures.Future, ["result"]),
        ]
        for name in names
    ]
    _warm(root, device)
    spent.clear()
    for _ in range(loads):
        _load(root, device)
    print("  thread  step                    wall us/tensor  CPU us/tensor  calls per load")
    for (thread, name), (w, c, n) in sorted(spent.items(), key=lambda kv: -kv[1][0]):
        print(f"  {thread:6s}  {name:22s} {w / loads / COUNT * 1e6:14.2f} {c / loads / COUNT * 1e6:14.2f} "
              f"{n // loads:15d}")  # fmt: skip
    for owner, name, f in originals:
        setattr(owner, name, f)


def steps(root: pathlib.Path, loads: int) -> None:
    """The host steps of a GPU load that need no GPU, timed one by one on any machine: opening, planning, the
    names and routes (the FP8 groups' kinds), the read-ahead lists, the groups' bookkeeping of every FP8
    weight (their flush, the decode, left out), nesting the results; us per checkpoint tensor, median of
    ``loads`` passes after five."""
    import jax

    import jax_side
    from qbridge import _gc, _group, _loader
    from qbridge._checkpoint import open_checkpoint
    from qbridge._handoff import XlaDestinations

    jdev = jax.devices("cpu")[0]

    class Bookkeeping(_group.FP8Groups):
        def flush(self, kind: tuple[Any, ...]) -> None:  # no decode: the groups' bookkeeping alone
            self.pending.pop(kind)
            self.total -= self.pending_bytes.pop(kind)

    def one() -> list[float]:
        marks = [time.perf_counter()]
        with _gc.older_generations_deferred(), open_checkpoint(root) as ckpt:  # as load_checkpoint runs them
            marks.append(time.perf_counter())
            _, plan, _, _ = _loader.plan_load(ckpt, None)
            marks.append(time.perf_counter())
            names = [jax_side.dotted(p.leaf.path[1:]) for p in plan]
            values: dict[Any, Any] = {}
            into = XlaDestinations()
            groups = Bookkeeping(ckpt, torch.device("cpu"), jdev, into, values, _loader.READ_AHEAD_BYTES)
            routes = _loader._routes(ckpt, plan, names, None, None, False, groups, into, jdev)
            marks.append(time.perf_counter())
            _loader._ReadAhead(
                ckpt,
                [
                    ()
                    if isinstance(route, tuple) and _group._weights_stacked(route)
                    else _loader._stored_keys(ckpt.entries[p.key])
                    for p, (_, _, route) in zip(plan, routes, strict=True)
                ],
                pin=False,
            )
            marks.append(time.perf_counter())
            for p, (_, _, route) in zip(plan, routes, strict=True):
                if route is not None:
                    values[p.leaf.path] = None
                    groups.add(route, p.leaf.path, ckpt.entries[p.key])
            marks.append(time.perf_counter())
            jax_side.nest(values)
            marks.append(time.perf_counter())
        return [b - a for a, b in itertools.pairwise(marks)]

    for _ in range(5):
        one()
    runs = [one() for _ in range(loads)]
    labels = ["opening", "planning", "names and routes", "read-ahead lists", "groups' bookkeeping", "nesting"]
    for label, times in zip(labels, zip(*runs)):
        print(f"steps: {label:20s} {statistics.median(times) / COUNT * 1e6:6.2f} us per tensor")
    total = statistics.median(sum(r) for r in runs)
    print(f"steps: {'all of them':20s} {total / COUNT * 1e6:6.2f} us per tensor (median of {loads})")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )  # the parts, what each prints and which run without a GPU
    parser.add_argument("--parts", nargs="+", default=["phases", "group", "allocation"],
                        choices=["phases", "group", "allocation", "profile", "reads", "threads", "steps"])  # fmt: skip
    parser.add_argument("--device", default="cuda", help="the device of the phases, profile and threads parts' loads: cuda (default) or cpu; "
                        "--device cpu for any part on a machine without a GPU")  # fmt: skip
    parser.add_argument("--loads", type=int, default=8, help="timed loads of the phases, profile and threads parts (default 8); passes of the steps "
                        "part: at least 20")  # fmt: skip
    parser.add_argument("--group", type=int, default=None,
                        help="weights per grouped FP8 decode (default: the loader's, qbridge._group.GROUP)")  # fmt: skip
    args = parser.parse_args()
    if args.device == "cpu" and not set(args.parts) <= {"phases", "profile", "reads", "threads", "steps"}:
        parser.error(
            "--device cpu runs the phases, profile, reads, threads and steps parts only (groups and XLA's allocation calls are "
            "the GPU's)"
        )
    if args.loads < 1:
        parser.error(f"--loads must be at least 1, got {args.loads}")
    from qbridge import _group

    if args.group is not None:
        if args.group < 2:
            parser.error(f"--group must be at least 2, got {args.group}")
        _group.GROUP = args.group
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error(
            "torch sees no CUDA GPU here: use --device cpu --parts phases (or profile, reads, threads, steps)"
        )
    import jax

    print(f"{torch.cuda.get_device_name() if args.device == 'cuda' else 'CPU'}; torch {torch.__version__}, "
          f"jax {jax.__version__}; the loader's FP8 groups hold up to {_group.GROUP} weights")  # fmt: skip
    deepseek_v3_scale.use_tiny_shapes()
    with tempfile.TemporaryDirectory(prefix="qbridge-loader-host-") as tmp:
        root = pathlib.Path(tmp)
        deepseek_v3_scale.write_checkpoint(root, 1, 256, "cpu")
        if "phases" in args.parts:
            phases(root, args.device, args.loads)
        if "profile" in args.parts:
            profile(root, args.device, args.loads)
        if "threads" in args.parts:
            threads(root, args.device, args.loads)
        if "steps" in args.parts:
            steps(root, max(args.loads, 20))
        if "reads" in args.parts:
            reads(root)
        if "group" in args.parts:
            group(root)
    if "allocation" in args.parts:
        allocation()


if __name__ == "__main__":
    main()
