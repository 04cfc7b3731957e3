"""``qbridge bench``: dequantization speed on the current GPU against the copy ceiling and the baselines.

Every kernel time is a median GPU time on random data, warm-up excluded: calls replayed from a CUDA
graph (so Python's launch overhead is not counted), or, for plain torch and torchao, CUDA events around
each call with L2 flushed between runs. Input sets are rotated, at least 256 MiB of them, so that
L2 does not flatter small shapes. Percentages are of the copy ceiling measured in the same run: a
device-to-device copy, counting bytes read plus bytes written. The end-to-end rows are wall-clock time
from a quantized weight to a ready ``jax.Array``, Python included.

Users call these functions one weight at a time, so every row also has the wall time per call of a loop
of back-to-back calls (host work included where it exceeds the GPU's), and fresh processes time the
first call of each format, Triton's compilation included, with an empty and with a warm Triton cache.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import math
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch

import torch_side

LLAMA_8B = [(4096, 4096), (1024, 4096), (14336, 4096), (4096, 14336)]
LLAMA_70B = [(8192, 8192), (1024, 8192), (28672, 8192), (8192, 28672)]
NF4_SHAPES = [*LLAMA_8B, *LLAMA_70B, (1000, 1001)]
FP8_SHAPES = [(8192, 8192), (18432, 7168), (7168, 2048), (24576, 1536), (576, 7168), (1000, 1001)]
QUICK_NF4 = [(8192, 8192), (14336, 4096), (1000, 1001)]
QUICK_FP8 = [(8192, 8192), (18432, 7168), (576, 7168), (1000, 1001)]
ROTATE_BYTES = 256 << 20  # input sets per measurement: at least this many bytes in all, far over L2


@dataclasses.dataclass
class Row:
    """One measurement: ``us`` is GPU time (graph replay where possible), ``us_per_call`` events around
    single calls (launch gaps and host syncs included), ``us_in_loop`` wall time per call of a Python loop
    calling it one weight after another, as users do (host work included wherever it exceeds the GPU
    work: :func:`_in_loop`); percentages are of ``us``. ``timing`` says how
    ``us`` was measured: ``"graph replay"``, ``"events"`` (code that syncs with the host), or
    ``"events (capture failed: ...)"`` where a CUDA graph could not be captured on this card."""

    fmt: str
    shape: tuple[int, int]
    method: str
    us: float
    us_per_call: float
    bytes: int
    pct_of_copy: float
    timing: str = "graph replay"
    us_in_loop: float = math.nan


def _per_call(fn: Callable[[], Any]) -> float:
    """Median milliseconds of single calls between CUDA events, L2 flushed before each."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median"))


def _do_bench(fn: Callable[[], Any], *, graph: bool = True) -> tuple[float, str]:
    """Median GPU milliseconds of ``fn`` and how they were timed, warm-up excluded: replayed from a CUDA
    graph, so that Python's launch overhead is not counted; with ``graph=False`` (code that syncs with the
    host and so cannot be captured), or where capturing fails on this card, CUDA events around each call,
    L2 flushed between runs."""
    import triton.testing

    fn()  # warm-up: compile kernels, build cached tables
    torch_side.wait_for_kernels()  # "auto" calls answer another way while a kernel compiles in the background
    fn()
    torch.cuda.synchronize()
    if not graph:
        return _per_call(fn), "events"
    try:
        return float(triton.testing.do_bench_cudagraph(fn, rep=200, return_mode="median")), "graph replay"
    except Exception as e:
        reason = str(e).strip().splitlines()[0][:120] if str(e).strip() else type(e).__name__
        torch.cuda.synchronize()  # the capture has ended; the stream is usable again
        return _per_call(fn), f"events (capture failed: {reason})"


def copy_ceiling(nbytes: int = 2 << 30) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read and written."""
    import triton.testing

    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = float(triton.testing.do_bench(lambda: dst.copy_(src), warmup=25, rep=200, return_mode="median"))
    return 2 * nbytes / (ms * 1e-3)


def _rotating(make: Callable[[int], Any], per_set: int) -> list[Any]:
    return [make(i) for i in range(max(2, math.ceil(ROTATE_BYTES / max(per_set, 1))))]


def _cycle(items: list[Any], fn: Callable[[Any], Any]) -> Callable[[], Any]:
    state = {"i": 0}

    def run() -> Any:
        state["i"] = (state["i"] + 1) % len(items)
        return fn(items[state["i"]])

    return run


def _nf4_sets(shape: tuple[int, int], index: int) -> tuple[torch.Tensor, Any, torch.Tensor]:
    import bitsandbytes.functional as F

    gen = torch.Generator(device="cuda").manual_seed(index)
    w = torch.randn(shape, device="cuda", generator=gen, dtype=torch.bfloat16)
    packed, qs = F.quantize_4bit(w, quant_type="nf4", compress_statistics=True)
    return packed, qs, torch.empty(shape, dtype=torch.bfloat16, device="cuda")


def _in_loop(fn: Callable[[], Any], calls: int = 200) -> float:
    """Median wall-clock microseconds per call of ``calls`` back-to-back calls (5 repetitions, one
    warm-up), the device synchronized before and after each repetition: what a loop over a model's
    weights sees, host work and GPU work overlapping as they do there."""
    times = []
    for i in range(6):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
        if i:
            times.append((time.perf_counter() - t0) / calls)
    return statistics.median(times) * 1e6


def _one_tile_per_program(w: torch.Tensor, s: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    from qbridge._bench_kernels import one_tile_per_program_fp8

    return one_tile_per_program_fp8(w, s, out)


def _wall_us(fn: Callable[[], Any], reps: int = 30) -> float:
    """Median wall-clock microseconds of ``fn`` (which must return when its result is ready)."""
    times = []
    for i in range(reps + 5):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if i >= 5:
            times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e6


def _end_to_end(
    fmt: str, shape: tuple[int, int], nbytes: int, ceiling: float, dequantize: Callable[[], torch.Tensor]
) -> list[Row]:
    """Wall-clock rows: dequantize alone (to a finished tensor), and on to a ready ``jax.Array``."""
    from qbridge import to_jax

    def dense() -> None:
        dequantize()
        torch.cuda.synchronize()

    rows = []
    for method, fn in (
        ("qbridge dequantize call (wall)", dense),
        (
            "qbridge end to end to jax.Array (wall)",
            lambda: to_jax(dequantize(), producer="current").block_until_ready(),
        ),
    ):
        us = _wall_us(fn)
        rows.append(
            Row(fmt, shape, method, us, us, nbytes, 100 * nbytes / (us * 1e-6) / ceiling, "wall clock")
        )
    return rows


def bench_nf4(shape: tuple[int, int], ceiling: float) -> list[Row]:
    """NF4 (nested absmax) to bf16 at ``shape``: qbridge against bitsandbytes, torchao and plain torch."""
    import bitsandbytes.functional as F

    n = math.prod(shape)
    nbytes = n // 2 + math.ceil(n / 64) + 4 * math.ceil(n / 64 / 256) + 2 * n
    sets = _rotating(lambda i: _nf4_sets(shape, i), nbytes)

    def qb(transpose: bool) -> Callable[[tuple], Any]:
        def run(s: tuple) -> Any:
            packed, qs, _ = s
            return torch_side.dequantize_nf4(
                packed, qs.absmax, shape=shape, nested_absmax=qs.state2.absmax, nested_code=qs.state2.code,
                offset=qs.offset, dtype=torch.bfloat16, transpose=transpose, backend="triton",
            )  # fmt: skip

        return run

    cases: dict[str, Callable[[], Any]] = {
        "qbridge": _cycle(sets, qb(False)),
        "qbridge transposed": _cycle(sets, qb(True)),
        "qbridge dequantize(out=)": _cycle(sets, lambda s: torch_side.dequantize(s[0], s[1], out=s[2])),
        "bitsandbytes dequantize_4bit(out=)": _cycle(sets, lambda s: F.dequantize_4bit(s[0], s[1], out=s[2])),
        "plain torch": _cycle(sets, lambda s: torch_side.dequantize(s[0], s[1], backend="torch")),
    }
    # these sync with the host (plain torch checks its scales) or may: timed per call, not captured
    uncapturable = {"plain torch", "torchao NF4 get_original_weight"}
    if n % (64 * 256) == 0:  # torchao's NF4Tensor needs whole scaler blocks
        from torchao.quantization import NF4Tensor

        nf4 = [NF4Tensor.from_tensor(F.dequantize_4bit(s[0], s[1]), 64, 256) for s in sets[:2]]
        cases["torchao NF4 get_original_weight"] = _cycle(nf4, lambda t: t.get_original_weight())
    rows = []
    for name, fn in cases.items():
        ms, timing = _do_bench(fn, graph=name not in uncapturable)
        rows.append(
            Row(
                "NF4 nested->bf16",
                shape,
                name,
                ms * 1e3,
                _per_call(fn) * 1e3,
                nbytes,
                100 * nbytes / (ms * 1e-3) / ceiling,
                timing,
                _in_loop(fn),
            )
        )
    packed, qs, _ = sets[0]
    rows += _end_to_end("NF4 nested->bf16", shape, nbytes, ceiling, lambda: torch_side.dequantize(packed, qs))
    return rows


def bench_fp8(shape: tuple[int, int], ceiling: float) -> list[Row]:
    """Block-128 FP8 to bf16 at ``shape``: qbridge against a one-tile-per-program kernel and plain torch."""
    n = math.prod(shape)
    grid = (math.ceil(shape[0] / 128), math.ceil(shape[1] / 128))
    nbytes = n + 4 * math.prod(grid) + 2 * n

    def make(i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        gen = torch.Generator(device="cuda").manual_seed(i)
        w = (torch.randn(shape, device="cuda", generator=gen) * 64).to(torch.float8_e4m3fn)
        s = torch.rand(grid, device="cuda", generator=gen) * 1e-2 + 1e-4
        return w, s, torch.empty(shape, dtype=torch.bfloat16, device="cuda")

    sets = _rotating(make, nbytes)
    cases = {
        "qbridge": lambda s: torch_side.dequantize_fp8(s[0], s[1], backend="triton"),
        "qbridge transposed": lambda s: torch_side.dequantize_fp8(
            s[0], s[1], backend="triton", transpose=True
        ),
        "one 128x128 tile per program (DeepSeek-style)": lambda s: _one_tile_per_program(*s),
        "plain torch": lambda s: torch_side.dequantize_fp8(s[0], s[1], backend="torch"),
    }
    rows = []
    for name, fn in cases.items():
        ms, timing = _do_bench(_cycle(sets, fn), graph=name != "plain torch")
        per_call = _per_call(_cycle(sets, fn))
        rows.append(
            Row(
                "FP8 block->bf16",
                shape,
                name,
                ms * 1e3,
                per_call * 1e3,
                nbytes,
                100 * nbytes / (ms * 1e-3) / ceiling,
                timing,
                _in_loop(_cycle(sets, fn)),
            )
        )
    w, s, _ = sets[0]
    rows += _end_to_end("FP8 block->bf16", shape, nbytes, ceiling, lambda: torch_side.dequantize_fp8(w, s))
    return rows


_PROCESS = r"""
import sys, time
t0 = time.perf_counter()
import torch
IMPORTS
torch.zeros(1, device="cuda")  # CUDA context
t1 = time.perf_counter()
SETUP
torch.cuda.synchronize()
t2 = time.perf_counter()
CALL
torch.cuda.synchronize()
t3 = time.perf_counter()
for _ in range(100):
    CALL
torch.cuda.synchronize()
t4 = time.perf_counter()
print("QBRIDGE-PROCESS", t1 - t0, t3 - t2, t4 - t3)
"""

_PROCESS_CASES = {
    "NF4 nested 4096x4096: qbridge dequantize": (
        "import bitsandbytes.functional as F, torch_side",
        "p, qs = F.quantize_4bit(torch.randn(4096, 4096, device='cuda', dtype=torch.bfloat16), "
        "quant_type='nf4', compress_statistics=True)",
        "torch_side.dequantize(p, qs)",
    ),
    "NF4 nested 4096x4096: bitsandbytes dequantize_4bit": (
        "import bitsandbytes.functional as F",
        "p, qs = F.quantize_4bit(torch.randn(4096, 4096, device='cuda', dtype=torch.bfloat16), "
        "quant_type='nf4', compress_statistics=True)",
        "F.dequantize_4bit(p, qs)",
    ),
    "FP8 block 2048x7168: qbridge dequantize_fp8": (
        "import torch_side",
        "w = (torch.randn(2048, 7168, device='cuda') * 64).to(torch.float8_e4m3fn); s = torch.rand(16, 56, device='cuda')",
        "torch_side.dequantize_fp8(w, s)",
    ),
    "FP8 block 2048x7168: one 128x128 tile per program": (
        "import importlib.util; spec = importlib.util.spec_from_file_location('k', KERNELS); "
        "k = importlib.util.module_from_spec(spec); spec.loader.exec_module(k)",
        "w = (torch.randn(2048, 7168, device='cuda') * 64).to(torch.float8_e4m3fn); s = torch.rand(16, 56, device='cuda'); "
        "o = torch.empty(2048, 7168, device='cuda', dtype=torch.bfloat16)",
        "k.one_tile_per_program_fp8(w, s, o)",
    ),
}


def whole_process() -> list[dict[str, Any]]:
    """Fresh ``python`` processes that import, make one weight and dequantize it once, with an empty
    Triton cache and again with the cache that run left (warm): ``seconds`` for the whole process,
    ``import_s`` (imports and the CUDA context), ``first_call_s`` (the first call to a finished result,
    with whatever compiling it waits for) and ``next_100_calls_s`` (the 100 calls after it, while kernels
    may still be compiled in the background)."""
    kernels = repr(str(pathlib.Path(__file__).with_name("_bench_kernels.py")))
    rows = []
    with tempfile.TemporaryDirectory(prefix="qbridge-bench-triton-") as cache:
        env = {**os.environ, "TRITON_CACHE_DIR": cache}
        for state in ("empty", "warm"):
            for method, (imports, setup, call) in _PROCESS_CASES.items():
                script = (
                    _PROCESS.replace("IMPORTS", imports.replace("KERNELS", kernels))
                    .replace("SETUP", setup)
                    .replace("CALL", call)
                )
                t0 = time.perf_counter()
                done = subprocess.run(
                    [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600
                )
                seconds = time.perf_counter() - t0
                line = [x for x in done.stdout.splitlines() if x.startswith("QBRIDGE-PROCESS")]
                if done.returncode or not line:
                    raise RuntimeError(f"{method}: the process failed: {done.stderr.strip()[-400:]}")
                import_s, first, next_100 = (float(x) for x in line[0].split()[1:])
                rows.append(
                    {
                        "method": method,
                        "cache": state,
                        "seconds": seconds,
                        "import_s": import_s,
                        "first_call_s": first,
                        "next_100_calls_s": next_100,
                    }
                )
    return rows


def run_bench(*, quick: bool = False) -> dict[str, Any]:
    """Runs the benchmark on the current CUDA device (``qbridge.bench``; ``qbridge bench`` on the command line).

    Returns ``{"device", "versions", "copy_tb_s", "rows", "process", "skipped"}``; each row has ``fmt``,
    ``shape``, ``method``, ``us`` (GPU time), ``us_per_call``, ``us_in_loop``, ``bytes`` and
    ``pct_of_copy``; ``process`` holds the fresh-process rows (first call with an empty and a warm
    Triton cache).

    Raises:
        RuntimeError: no CUDA device is visible.
    """
    if not torch.cuda.is_available():
        raise RuntimeError(
            "it measures a CUDA GPU, and none is visible (the CPU decode: python benchmarks/cpu_decode.py)"
        )
    import bitsandbytes
    import jax
    import torchao
    import triton

    ceiling = copy_ceiling()
    rows: list[Row] = []
    skipped: list[str] = []
    plan = [(bench_nf4, shape) for shape in (QUICK_NF4 if quick else NF4_SHAPES)]
    plan += [(bench_fp8, shape) for shape in (QUICK_FP8 if quick else FP8_SHAPES)]
    for fn, shape in plan:
        try:
            rows += fn(shape, ceiling)
        except torch.OutOfMemoryError as e:  # record it and go on with the other shapes
            skipped.append(f"{fn.__name__} {shape}: out of memory ({e.args[0].splitlines()[0]})")
        except Exception as e:
            skipped.append(
                f"{fn.__name__} {shape}: {type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}"
            )
            try:
                torch.cuda.synchronize()
            except Exception:
                pass
        gc.collect()  # drop the input sets and CUDA graphs of this shape before the next
        torch.cuda.empty_cache()
    try:
        process = whole_process()
    except Exception as e:
        process = []
        skipped.append(f"whole process: {type(e).__name__}: {str(e).strip()[:300]}")
    return {
        "device": torch.cuda.get_device_name(),
        "versions": {
            "torch": torch.__version__,
            "triton": triton.__version__,
            "jax": jax.__version__,
            "bitsandbytes": bitsandbytes.__version__,
            "torchao": torchao.__version__,
        },
        "copy_tb_s": ceiling / 1e12,
        "rows": [dataclasses.asdict(r) for r in rows],
        "process": process,
        "skipped": skipped,
    }


def format_bench(result: dict[str, Any]) -> str:
    lines = [
        f"{result['device']}; copy ceiling {result['copy_tb_s']:.2f} TB/s (read + write); "
        + ", ".join(f"{k} {v}" for k, v in result["versions"].items()),
        "GPU us: graph replay (launch overhead excluded) unless the last column says otherwise; "
        "per call: CUDA events around each call",
        "in a loop: wall time per call of back-to-back calls, as a loop over a model's weights sees it",
        f"{'format':<18}{'shape':<14}{'method':<48}{'GPU us':>9}{'% of copy':>11}{'per call us':>13}"
        f"{'in a loop us':>14}  timing",
    ]
    for r in result["rows"]:
        shape = "x".join(map(str, r["shape"]))
        lines.append(
            f"{r['fmt']:<18}{shape:<14}{r['method']:<48}{r['us']:>9.1f}{r['pct_of_copy']:>10.0f}%{r['us_per_call']:>13.1f}"
            f"{r.get('us_in_loop', math.nan):>14.1f}  {r.get('timing', 'graph replay')}"
        )
    for p in result.get("process", []):
        after = f", next 100 calls {p['next_100_calls_s']:.3f} s" if "next_100_calls_s" in p else ""
        lines.append(
            f"whole process ({p['cache']} Triton cache): {p['method']}: {p['seconds']:.2f} s "
            f"(import {p['import_s']:.2f} s, first call {p['first_call_s']:.3f} s{after})"
        )
    lines += [f"skipped: {s}" for s in result.get("skipped", [])]
    return "\n".join(lines)


def dump_json(result: dict[str, Any]) -> str:
    return json.dumps(result, indent=2)
