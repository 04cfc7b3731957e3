"""Where a host-bound FP8 call's time goes, in a loop of back-to-back calls (GPU machine).

``qbridge bench``'s "in a loop" column times 200 back-to-back calls, inputs rotated over 256 MiB. At the small
FP8 shapes (576x7168, 1000x1001) the GPU time is a few microseconds and the loop is bound by the host, so
qbridge's ``dequantize_fp8`` is compared with a one-128x128-tile-per-program Triton launch (written from the
description of DeepSeek-V3's ``weight_dequant``, output given) on host work. This prints, per shape, the
loop's wall time per call for the two, and for the parts of qbridge's call taken one at a time (the
remembered plan's lookup, the allocation, the launch), the cases alternating in each of ``--rounds`` rounds,
median [range] of the rounds after the first, and the host's time per call. The ``BEFORE`` rows launch
through Triton's runner, as every planned launch did on Triton 3.5 and later until the launch-hook test
judged a ``HookChain`` by the calls it holds (``torch_side._launch.hooked``).

    python benchmarks/fp8_call_parts.py [--rounds 9]
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch

import torch_side
from qbridge._bench_kernels import one_tile_per_program_fp8
from torch_side import _fp8, _launch
from torch_side._plans import FP8_PLANS

SHAPES = [(576, 7168), (1000, 1001), (2048, 7168), (8192, 8192)]
ROTATE_BYTES = 256 << 20
CALLS = 200


def _loop_us(fn, items) -> tuple[float, float]:
    """Wall us per call of the loop, and the host's us per call (until the last call returned)."""
    n = len(items)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(CALLS):
        fn(items[i % n])
    t1 = time.perf_counter()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / CALLS * 1e6, (t1 - t0) / CALLS * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()
    torch_side.wait_for_kernels()
    print(
        f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, "
        f"triton {__import__('triton').__version__}; {CALLS} back-to-back calls, wall us per call"
    )
    for shape in SHAPES:
        measure(shape, args.rounds)


def measure(shape: tuple[int, int], rounds: int) -> None:
    grid = (math.ceil(shape[0] / 128), math.ceil(shape[1] / 128))
    per = math.prod(shape) * 3
    items = []
    for i in range(max(2, math.ceil(ROTATE_BYTES / per))):
        gen = torch.Generator(device="cuda").manual_seed(i)
        w = (torch.randn(shape, device="cuda", generator=gen) * 64).to(torch.float8_e4m3fn)
        s = torch.rand(grid, device="cuda", generator=gen) * 1e-2 + 1e-4
        items.append((w, s, torch.empty(shape, dtype=torch.bfloat16, device="cuda")))
    w0, s0, _ = items[0]
    torch_side.dequantize_fp8(w0, s0, backend="triton")  # the plan
    key = _fp8._plan_key(w0, s0, torch.bfloat16, None, False, "triton", False)
    plan = FP8_PLANS[key]
    launcher = plan.launcher
    dev = w0.device
    idx = dev.index
    ints = plan.ints
    cases = {
        "qbridge dequantize_fp8(backend='triton')": lambda it: torch_side.dequantize_fp8(
            it[0], it[1], backend="triton"
        ),
        "qbridge dequantize_fp8()": lambda it: torch_side.dequantize_fp8(it[0], it[1]),
        "one tile per program, out given": lambda it: one_tile_per_program_fp8(*it),
        "one tile per program + torch.empty_like": lambda it: one_tile_per_program_fp8(
            it[0], it[1], torch.empty_like(it[2])
        ),
        "plan(W, s, device)": lambda it: plan(it[0], it[1], dev),
        "launcher only, out given": lambda it: launcher(idx, it[0], it[1], it[2], *ints),
        "torch.empty only": lambda it: torch.empty(shape, dtype=torch.bfloat16, device=dev),
        "_plan_key + lookup only": lambda it: FP8_PLANS.get(
            _fp8._plan_key(it[0], it[1], torch.bfloat16, None, False, "triton", False)
        ),
        "empty Python call": lambda it: None,
    }
    # the launch-hook test as it was: an empty HookChain (Triton 3.5 and later) counted as a hook
    before = {
        "BEFORE qbridge dequantize_fp8(backend='triton')": cases["qbridge dequantize_fp8(backend='triton')"],
        "BEFORE launcher only, out given": cases["launcher only, out given"],
    }
    cases.update(before)
    hooked = _launch.hooked

    def old_hooked(hook: object) -> bool:
        return hook is not None

    for name, fn in cases.items():  # warm
        _launch.hooked = old_hooked if name in before else hooked
        _loop_us(fn, items)
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in cases}
    for r in range(rounds):
        for name, fn in cases.items():
            _launch.hooked = old_hooked if name in before else hooked
            t = _loop_us(fn, items)
            if r:
                times[name].append(t)
    _launch.hooked = hooked
    print(f"\n{shape[0]}x{shape[1]} ({len(items)} input sets): wall us per call median [range], host us")
    for name, ts in times.items():
        wall = [t[0] for t in ts]
        host = statistics.median(t[1] for t in ts)
        print(f"  {name:<44}{statistics.median(wall):>8.2f}  [{min(wall):.2f}-{max(wall):.2f}]  {host:>8.2f}")


if __name__ == "__main__":
    main()
