"""The C kernel that decodes 4-bit weights on the CPU (torch_side/_native.py, kernels/cpu_4bit.c).

Its bits are compared with the plain-torch reference (itself tested against bitsandbytes) on fresh random
data of many shapes, tables and scales, on one thread and on several; its build, its cache and its
absence are tested in fresh processes.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import math
import multiprocessing
import os
import pathlib
import platform
import random
import shutil
import subprocess
import sys
import textwrap
import threading
import time
import warnings
from typing import ClassVar

import pytest
import torch
from helpers import (
    DTYPES,
    as_bnb_returns,
    assert_bitwise_equal,
    bnb_quantize,
    bnb_reference,
    flush,
    library_entry,
)

import torch_side
from torch_side import _native
from torch_side._nf4 import dequantize_4bit_native
from torch_side._plans import NF4_PLANS

FLT_MIN = torch.finfo(torch.float32).tiny


_FE_UPWARD = {"x86_64": 0x800, "aarch64": 0x400000}  # fenv.h's FE_UPWARD (glibc)


@pytest.fixture(scope="module")
def kernel():
    return library_entry(
        _native.cpu_4bit(wait=True), "no C compiler here: CPU calls take the torch path (tested elsewhere)"
    )


def _pieces(n, blocksize, *, nested, seed, nested_blocksize=256, code=None):
    gen = torch.Generator().manual_seed(seed)
    packed = torch.randint(0, 256, ((n + 1) // 2,), dtype=torch.uint8, generator=gen)
    blocks = -(-n // blocksize)
    if code is None:
        code = torch.randn(16, generator=gen)
    if not nested:
        return packed, torch.randn(blocks, generator=gen) * 3, code, {}
    absmax = torch.randint(0, 256, (blocks,), dtype=torch.uint8, generator=gen)
    extra = dict(
        nested_absmax=torch.rand(-(-blocks // nested_blocksize), generator=gen) + 0.01,
        nested_code=torch.randn(256, generator=gen),
        nested_blocksize=nested_blocksize,
        offset=float(torch.randn((), generator=gen)),
    )
    return packed, absmax, code, extra


def _reference(packed, absmax, code, blocksize, n, dtype, extra):
    if extra:
        absmax = torch_side.decode_nested_absmax_reference(
            absmax, extra["nested_absmax"], extra["nested_code"], extra["nested_blocksize"], extra["offset"]
        )
    return torch_side.dequantize_4bit_reference(packed, absmax, code, blocksize, n, dtype)


def _plain(packed, absmax, code, blocksize, n, dtype):
    """Element by element as the format says: nibble, table, times the block's scale, flushed, rounded."""
    nibbles = torch.stack((packed >> 4, packed & 15), dim=-1).reshape(-1)[:n].long()
    return flush(code[nibbles] * absmax[torch.arange(n) // blocksize]).to(dtype)


@pytest.mark.parametrize("n", [1, 2, 3, 31, 32, 33, 63, 64, 65, 127, 4095, 4096, 4097, 100_001])
@pytest.mark.parametrize("blocksize", [32, 64, 256, 4096])
@pytest.mark.parametrize("nested", [False, True])
def test_matches_the_reference(kernel, n, blocksize, nested):
    """Every output dtype, random tables and scales, element counts around the 32-element vector steps
    and the blocks (the last block short, odd counts ending on a high nibble)."""
    for i, dtype in enumerate(DTYPES):
        packed, absmax, code, extra = _pieces(n, blocksize, nested=nested, seed=i, nested_blocksize=7)
        got = dequantize_4bit_native(packed, absmax, code, blocksize, n, dtype, **extra)
        assert got is not None
        assert_bitwise_equal(got, _reference(packed, absmax, code, blocksize, n, dtype, extra))


@pytest.mark.parametrize(
    "rows, cols", [(1, 1), (3, 5), (16, 64), (17, 63), (33, 130), (48, 96), (21, 33), (700, 1500)]
)
@pytest.mark.parametrize("blocksize", [32, 64, 4096])
@pytest.mark.parametrize("nested", [False, True])
def test_written_transposed_matches_the_reference(kernel, rows, cols, blocksize, nested):
    """The kernel's transposed entry point (a Linear's [out, in] weight written as its [in, out] kernel) gives
    the reference's transpose bit for bit, contiguous: rows past whole tiles of 16, columns past whole tiles
    of 64, odd columns (rows that start on a low nibble), blocks that end inside a row; one thread and
    several (700 x 1500 is past one thread's share)."""
    n = rows * cols
    before = torch.get_num_threads()
    try:
        for threads in (1, 3) if n > (1 << 18) else (before,):
            torch.set_num_threads(threads)
            for i, dtype in enumerate(DTYPES):
                packed, absmax, code, extra = _pieces(
                    n, blocksize, nested=nested, seed=i + rows, nested_blocksize=7
                )
                got = dequantize_4bit_native(
                    packed, absmax, code, blocksize, n, dtype, **extra, transposed=(rows, cols)
                )
                assert got is not None and got.shape == (cols, rows) and got.is_contiguous()
                want = _reference(packed, absmax, code, blocksize, n, dtype, extra).reshape(rows, cols).t()
                assert_bitwise_equal(got, want)
    finally:
        torch.set_num_threads(before)


ROUTES = ["main thread", "another thread"]


def _on(route, fn):
    """``fn()`` on the calling (main) thread or on a thread of its own: the kernel splits a call from the
    main thread over torch's OpenMP threads where torch runs on GNU OpenMP (``_native.torch_openmp_team``),
    and a call from another thread over its own pool."""
    if route == "main thread":
        assert threading.current_thread() is threading.main_thread()
        return fn()
    box = {}

    def run():
        try:
            box["result"] = fn()
        except BaseException as e:  # re-raised on the caller's thread
            box["error"] = e

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["result"]


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_several_threads_split_blocks_exactly(kernel, threads, route):
    """Large weights are split over threads by whole blocks (FP8 and the transposed decodes by rows, in
    whole tiles), several parts per thread: each thread count gives the same bits, on torch's OpenMP threads
    and on the kernel's own pool (n past the size from which threads are used, with a short last block;
    rows past whole tiles)."""
    n = (1 << 20) + 4097
    rows, cols = 1031, 1030
    gen = torch.Generator().manual_seed(threads)
    W = _fp8_weight((rows, cols), torch.float8_e4m3fn, gen)
    scale = torch.rand(9, 9, generator=gen)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for nested in (False, True):
            packed, absmax, code, extra = _pieces(n, 64, nested=nested, seed=threads)
            decode = functools.partial(
                dequantize_4bit_native, packed, absmax, code, 64, n, torch.bfloat16, **extra
            )
            assert_bitwise_equal(
                _on(route, decode), _reference(packed, absmax, code, 64, n, torch.bfloat16, extra)
            )
            packed, absmax, code, extra = _pieces(rows * cols, 64, nested=nested, seed=threads)
            decode = functools.partial(
                dequantize_4bit_native, packed, absmax, code, 64, rows * cols, torch.float16, **extra,
                transposed=(rows, cols),
            )  # fmt: skip
            want = _reference(packed, absmax, code, 64, rows * cols, torch.float16, extra)
            assert_bitwise_equal(_on(route, decode), want.reshape(rows, cols).t())
        for transpose in (False, True):
            decode = functools.partial(
                torch_side.dequantize_fp8, W, scale, torch.bfloat16, transpose=transpose
            )
            want = torch_side.dequantize_fp8(W, scale, torch.bfloat16, transpose=transpose, backend="torch")
            assert_bitwise_equal(_on(route, decode), want)
    finally:
        torch.set_num_threads(before)


def test_special_scales_and_tables(kernel):
    """NaN, infinite, zero and signed-zero scales, scales small enough to make denormal products (flushed
    to zeros of their sign, as bitsandbytes' CUDA kernel does), products past float16's and bfloat16's
    range, float16 subnormal results, and tables with zeros of both signs and tiny entries; row-major and
    written transposed."""
    n, blocksize = 64 * 40, 64
    specials = [math.nan, -math.nan, math.inf, -math.inf, 0.0, -0.0, 1e-38, -3e-39, 1e-45, 2.5e-38,
                7e-38, 1e30, -3e38, 1e-5, -6e-8, 65504.0, 3.3e38]  # fmt: skip
    gen = torch.Generator().manual_seed(5)
    absmax = torch.randn(n // blocksize, generator=gen)
    absmax[: len(specials)] = torch.tensor(specials)
    packed = torch.randint(0, 256, (n // 2,), dtype=torch.uint8, generator=gen)
    tables = [
        torch_side.standard_code("nf4"),
        torch_side.standard_code("fp4"),
        torch.tensor(
            [0.0, -0.0, 1e-30, -1e-30, 0.5, -0.5, 1.0, -1.0, 2.0, 3.0, 4.0, -4.0, 1e-3, 7.0, 8.0, 9.0]
        ),
        torch.zeros(16),
        torch.tensor([math.nan, math.inf] + [0.25] * 14),
    ]
    for code in tables:
        for dtype in DTYPES:
            want = _plain(packed, absmax, code, blocksize, n, dtype)
            got = dequantize_4bit_native(packed, absmax, code, blocksize, n, dtype)
            assert_bitwise_equal(got, want)
            assert_bitwise_equal(_reference(packed, absmax, code, blocksize, n, dtype, {}), want)
            torch_path = torch_side.dequantize_nf4(
                packed, absmax, shape=(n,), blocksize=blocksize, code=code, dtype=dtype, backend="torch"
            )
            assert_bitwise_equal(torch_path, want)
            # written transposed too ([40, 64]: blocks of one row, whole tiles), as a CPU load asks for it
            got_t = dequantize_4bit_native(packed, absmax, code, blocksize, n, dtype, transposed=(40, 64))
            assert_bitwise_equal(got_t, want.reshape(40, 64).t())


def test_nan_is_written_as_torch_writes_it(kernel):
    """A NaN result has torch's CPU bits, not only a NaN's place: 0xFFFF in bfloat16."""
    packed = torch.full((16,), 0x77, dtype=torch.uint8)
    got = dequantize_4bit_native(packed, torch.tensor([math.nan]), torch.ones(16), 32, 32, torch.bfloat16)
    want = torch.full((32,), math.nan).to(torch.bfloat16)
    assert torch.equal(got.view(torch.int16), want.view(torch.int16))


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [True, False])
def test_dequantize_uses_it_and_matches_bitsandbytes(kernel, quant_type, nested):
    """torch_side.dequantize on the CPU (backend="auto") goes through the kernel, and through a plan on
    the next call of the same kind, with bitsandbytes' values; out= is written in place; a [1, k] packed
    weight comes back transposed; backend="torch" keeps the torch path with the same bits."""
    for i, dtype in enumerate(DTYPES):
        for shape in [(33, 65), (576, 7168), (7,)]:
            _, packed, qs = bnb_quantize(shape, quant_type=quant_type, nested=nested, dtype=dtype, seed=i)
            want = as_bnb_returns(bnb_reference(packed, qs), packed)
            NF4_PLANS.clear()
            first = torch_side.dequantize(packed, qs)
            assert len(NF4_PLANS) == 1  # a plan exists only when the kernel answered
            again = torch_side.dequantize(packed, qs)  # through the plan
            out = torch.full(qs.shape, math.nan, dtype=dtype)
            into = torch_side.dequantize(packed, qs, out=out)
            assert into is out
            for got in (first, again, out, torch_side.dequantize(packed, qs, backend="torch")):
                assert_bitwise_equal(got, want)
            if len(shape) == 2:
                t = torch_side.dequantize(packed.t(), qs)  # bitsandbytes' W.t() convention
                assert_bitwise_equal(t, as_bnb_returns(bnb_reference(packed.t(), qs), packed.t()))


def test_transposed_and_offset_tensor_through_dequantize_nf4(kernel):
    """transpose=True (twice: the second call through the plan), an offset given as a tensor of another
    float dtype, and a non-contiguous out (written by a copy)."""
    _, packed, qs = bnb_quantize((96, 40), nested=True, seed=3)
    p = torch_side.parse_quant_state(qs)
    pieces = dict(
        shape=p.shape, blocksize=p.blocksize, nested_absmax=p.nested_absmax, nested_code=p.nested_code,
        nested_blocksize=p.nested_blocksize, quant_type=p.quant_type, dtype=torch.float16,
    )  # fmt: skip
    want = torch_side.dequantize_nf4(packed, p.absmax, **pieces, offset=p.offset, backend="torch")
    for offset in (p.offset, p.offset.double(), float(p.offset)):
        for _ in range(2):
            got = torch_side.dequantize_nf4(packed, p.absmax, **pieces, offset=offset, transpose=True)
            assert_bitwise_equal(got, want.t())
            assert not got.is_contiguous()  # 40 columns: a transposed view of the kernel's row-major result
    out = torch.empty(40, 96, dtype=torch.float16).t()
    torch_side.dequantize_nf4(packed, p.absmax, **pieces, offset=p.offset, out=out)
    assert_bitwise_equal(out, want)


def test_the_kernel_writes_transposes_where_that_pays(kernel):
    """dequantize_nf4(transpose=True) on the CPU: written transposed by the kernel (contiguous) for shapes
    whose rows fill its 16-row tiles and whose columns fill its vector steps; a transposed view of its
    row-major result otherwise (narrow, short or odd-width weights, where the element-by-element code would
    be slower). The same bits either way, through the plan on the second call too."""
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        for (rows, cols), written in [((64, 128), True), ((15, 128), False), ((64, 63), False),
                                      ((64, 32), False), ((700, 1500), True), ((31, 2**15), False)]:  # fmt: skip
            assert _native.transposes_well(rows, cols, nibbles=True) == written, (rows, cols)
            _, packed, qs = bnb_quantize((rows, cols), nested=True, seed=rows)
            p = torch_side.parse_quant_state(qs)
            kw = dict(shape=p.shape, blocksize=p.blocksize, nested_absmax=p.nested_absmax, nested_code=p.nested_code,
                      nested_blocksize=p.nested_blocksize, offset=p.offset, dtype=torch.bfloat16)  # fmt: skip
            want = torch_side.dequantize_nf4(packed, p.absmax, **kw, backend="torch").t()
            for _ in range(2):
                got = torch_side.dequantize_nf4(packed, p.absmax, **kw, transpose=True)
                assert got.is_contiguous() == written, (rows, cols)
                assert_bitwise_equal(got, want)
    finally:
        torch.set_num_threads(before)


def test_calls_from_several_threads_at_once(kernel):
    """Python threads calling at once (the loader's readers do): the pool serves one call, the others
    decode on their own thread; every result is right."""
    n = (1 << 19) + 33
    jobs = [_pieces(n, 64, nested=bool(i % 2), seed=i) for i in range(6)]
    results: dict[int, torch.Tensor] = {}

    def run(i):
        packed, absmax, code, extra = jobs[i]
        results[i] = dequantize_4bit_native(packed, absmax, code, 64, n, torch.bfloat16, **extra)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, (packed, absmax, code, extra) in enumerate(jobs):
        assert_bitwise_equal(results[i], _reference(packed, absmax, code, 64, n, torch.bfloat16, extra))


_FORKED: dict[str, object] = {}  # what a forked child decodes (it inherits the parent's memory)


def _decode_in_child(queue):
    # only the C kernel runs here: torch's own OpenMP threads do not survive a fork either
    packed, absmax, code, _ = _FORKED["job"]
    got = dequantize_4bit_native(packed, absmax, code, 64, _FORKED["n"], torch.float32)
    queue.put(None if got is None else hashlib.sha256(got.numpy().tobytes()).hexdigest())


@pytest.mark.skipif(sys.platform != "linux", reason="fork is Linux's default start method")
def test_a_forked_child_decodes_with_its_own_threads(kernel):
    """Neither the pool's threads nor torch's OpenMP threads survive a fork: a child forked after the parent
    used both starts a pool of its own (it would wait forever on the parent's threads otherwise)."""
    n = (1 << 20) + 1
    _FORKED.update(n=n, job=_pieces(n, 64, nested=False, seed=9))
    packed, absmax, code, _ = _FORKED["job"]
    want = _reference(packed, absmax, code, 64, n, torch.float32, {})
    for route in ROUTES:  # torch's OpenMP threads (where torch runs on GNU OpenMP), then the pool
        got = _on(
            route, functools.partial(dequantize_4bit_native, packed, absmax, code, 64, n, torch.float32)
        )
        assert_bitwise_equal(got, want)
    ctx = multiprocessing.get_context("fork")
    queue = ctx.SimpleQueue()
    child = ctx.Process(target=_decode_in_child, args=(queue,))
    child.start()
    child.join(60)
    if child.is_alive():
        child.kill()
    assert child.exitcode == 0, "the forked child did not finish"
    assert queue.get() == hashlib.sha256(want.numpy().tobytes()).hexdigest()


ROUTE_PROBE = """
    import functools, os, sys, threading, time, torch, torch_side
    from torch_side import _native
    from torch_side._nf4 import dequantize_4bit_native

    def comm(task):
        try:
            with open(f"/proc/self/task/{task}/comm") as f:
                return f.read().strip()
        except FileNotFoundError:  # a thread that ended (a joined one) after the listing
            return ""

    def named():  # the kernel's pool threads, by the name they are given (which may show a moment late)
        counts = []
        for _ in range(10):
            counts.append(sum(comm(t) == "qbridge-decode" for t in os.listdir("/proc/self/task")))
            time.sleep(0.01)
        return max(counts)

    torch.set_num_threads(2)
    torch_side.wait_for_kernels()
    n = 1 << 21
    packed = torch.randint(0, 256, (n // 2,), dtype=torch.uint8)
    absmax, code = torch.rand(n // 64), torch.tensor(torch_side.NF4_CODE, dtype=torch.float32)
    decode = functools.partial(dequantize_4bit_native, packed, absmax, code, 64, n, torch.float32)
    team = _native.torch_openmp_team() is not None
    print("team", team, "backend", torch.__config__.parallel_info().count("parallel backend: OpenMP"))
    torch.randn(1 << 22).sum()  # torch's own threads start
    results = [decode()]
    print("after main thread", named())
    worker = threading.Thread(target=lambda: results.append(decode()))
    worker.start(); worker.join()
    print("after another thread", named())
    torch.set_num_threads(3)
    worker = threading.Thread(target=lambda: results.append(decode()))
    worker.start(); worker.join()
    print("after 3 threads", named())
    print("same", all(torch.equal(r, results[0]) for r in results))
"""


@pytest.mark.skipif(sys.platform != "linux", reason="threads are named and listed through /proc on Linux")
@pytest.mark.parametrize("wait_policy", ["", "passive"])
def test_calls_from_the_main_thread_take_torchs_openmp_threads(kernel, wait_policy):
    """Where torch runs on GNU OpenMP (its Linux wheels) and its threads spin between parallel regions (as
    by default), a decode called from the main thread is split over torch's own threads (the kernel's pool
    beside them got no CPU while they spun), and one called from another thread over the kernel's pool,
    which grows to the thread count asked for. With OMP_WAIT_POLICY=passive torch's threads sleep at once,
    and the pool takes every call (waking them cost more)."""
    done = _run(ROUTE_PROBE, OMP_WAIT_POLICY=wait_policy)
    assert done.returncode == 0, done.stderr
    lines = dict(line.rsplit(" ", 1) for line in done.stdout.splitlines() if not line.startswith("team"))
    team = "team True" in done.stdout
    if "backend 1" in done.stdout and platform.machine() in ("x86_64", "AMD64"):
        # torch's x86-64 Linux wheels ship GNU OpenMP: the team must be found where its threads spin
        assert team == (wait_policy != "passive"), done.stdout
    assert lines["after main thread"] == ("0" if team else "1"), done.stdout
    assert lines["after another thread"] == "1", done.stdout
    assert lines["after 3 threads"] == "2", done.stdout
    assert lines["same"] == "True", done.stdout


@pytest.mark.parametrize(
    "value, brief",
    [(None, False), ("", False), ("0", True), ("99999", True), ("99k", True), ("100k", False), ("300000", False),
     ("1M", False), ("infinite", False), ("Infinity", False), ("lots", False)],
)  # fmt: skip
def test_a_short_gomp_spincount_keeps_the_pool(value, brief):
    """libgomp's GOMP_SPINCOUNT (a count with an optional k/M/G/T suffix, or infinite): under 100000 spins
    torch's threads sleep almost at once, and the kernel keeps its own pool; a value libgomp would not
    read either changes nothing."""
    assert _native._spins_briefly(value) is brief


FRESH_CHILD = """
    import hashlib, os, signal, sys, time, torch
    if sys.argv[1] == "parent":
        import torch_side
    torch.set_num_threads(2)
    n = 1 << 21
    packed = torch.randint(0, 256, (n // 2,), dtype=torch.uint8)
    absmax = torch.rand(n // 64)
    torch.randn(1 << 22).sum()  # torch's OpenMP threads run in the parent
    reading, writing = os.pipe()
    pid = os.fork()
    if pid == 0:  # the kernel's library is loaded here first (torch_side imported here first, or before the fork)
        import torch_side
        from torch_side._nf4 import dequantize_4bit_native
        torch_side.wait_for_kernels()
        code = torch.tensor(torch_side.NF4_CODE, dtype=torch.float32)
        got = dequantize_4bit_native(packed, absmax, code, 64, n, torch.float32)
        # numpy's hash of the bits: torch's own parallel operations wait forever in this child
        os.write(writing, hashlib.sha256(got.numpy().tobytes()).hexdigest().encode() if got is not None else b"none")
        os._exit(0)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            print("child", os.waitstatus_to_exitcode(status))
            break
        time.sleep(0.05)
    else:
        os.kill(pid, signal.SIGKILL)
        print("child hung")
        sys.exit()
    import torch_side
    want = torch_side.dequantize_4bit_reference(
        packed, absmax, torch.tensor(torch_side.NF4_CODE, dtype=torch.float32), 64, n, torch.float32
    )
    same = os.read(reading, 100).decode() == hashlib.sha256(want.numpy().tobytes()).hexdigest()
    print("the reference's bits", same)
"""


@pytest.mark.skipif(sys.platform != "linux", reason="fork is Linux's default start method")
@pytest.mark.parametrize("imported", ["parent", "child"])
def test_a_child_forked_before_the_kernel_is_loaded_decodes_on_its_own_pool(kernel, imported):
    """A forked child that loads the kernel's library itself keeps the kernel's own pool: libgomp's state in
    it still counts the parent's OpenMP threads, which the fork did not copy, and a decode on torch's team
    there waited forever. Also where torch_side is first imported in the child (no fork handler of its own
    ran): it knows the fork by its parent's libgomp, at the same addresses as its own."""
    done = _run(FRESH_CHILD, imported)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["child 0", "the reference's bits True"], done.stdout + done.stderr


@pytest.mark.skipif(sys.platform != "linux", reason="/proc/PID/maps is Linux's")
def test_a_process_run_by_exec_is_no_copy_of_its_parent():
    """This process's parent (a shell, pytest's runner) maps its libraries elsewhere, or not at all: it is no
    fork of it, and torch's team stays open to it; a library at the same addresses in the parent is a copy."""
    with open("/proc/self/maps") as maps:
        mapped = _native._libraries_mapped(maps)
    library, where = next(iter(mapped.items()))
    assert not _native._forked_from_parent(library, where)
    assert not _native._forked_from_parent("/no/such/library.so", where)
    reading, writing = os.pipe()
    pid = os.fork()
    if pid == 0:  # a fork without exec: the same libraries at the same addresses
        os.write(writing, b"1" if _native._forked_from_parent(library, where) else b"0")
        os._exit(0)
    os.waitpid(pid, 0)
    assert os.read(reading, 1) == b"1"


def _run(code: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    """Runs ``code`` in a new Python process (``args`` as its ``sys.argv[1:]``), on JAX's CPU, ``env`` added."""
    script = textwrap.dedent(code)
    return subprocess.run(
        [sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=300,
        env={**os.environ, "JAX_PLATFORMS": "cpu", **env},
    )  # fmt: skip


PROBE = """
    import logging, time, torch, torch_side
    from torch_side import _native
    logging.basicConfig(level=logging.WARNING)
    packed = torch.randint(0, 256, (2048,), dtype=torch.uint8)
    args = dict(shape=(64, 64), nested_absmax=None, dtype=torch.bfloat16)
    first = torch_side.dequantize_nf4(packed, torch.rand(64), **args)  # starts the build (or loads it)
    ready_at_once = _native._FN is not None
    torch_side.wait_for_kernels()
    print("at once", ready_at_once, "after waiting", _native._FN is not None, flush=True)
"""


def test_built_once_per_cache_then_loaded_at_once(tmp_path):
    """The first process builds the kernel in the background (its first call answered by the torch
    path) and keeps it in the cache; the next process loads it on its first call."""
    env = dict(QBRIDGE_CACHE_DIR=str(tmp_path))
    first = _run(PROBE, **env)
    assert first.returncode == 0, first.stderr
    assert "at once False after waiting True" in first.stdout
    assert list((tmp_path / "cpu-kernels").glob("cpu_4bit-*.so"))
    second = _run(PROBE, **env)
    assert second.returncode == 0, second.stderr
    assert "at once True after waiting True" in second.stdout


def test_a_damaged_build_in_the_cache_is_built_again(tmp_path):
    env = dict(QBRIDGE_CACHE_DIR=str(tmp_path))
    assert _run(PROBE, **env).returncode == 0
    (built,) = (tmp_path / "cpu-kernels").glob("cpu_4bit-*.so")
    built.write_bytes(b"not a library")
    again = _run(PROBE, **env)
    assert again.returncode == 0, again.stderr
    assert "after waiting True" in again.stdout


@pytest.mark.parametrize(
    "env, says",
    [
        (
            dict(CC="false"),
            "false failed to build cpu_4bit.c, stream_scan.c, read_ranges.c: it exited with 1 and printed nothing",
        ),
        (dict(CC="/nonexistent/cc"), "could not be run"),
        (dict(QBRIDGE_CPU_KERNEL="off"), None),
    ],
)
def test_without_a_kernel_the_torch_path_answers(tmp_path, env, says):
    """A failing or missing compiler is logged once and every call takes the torch path with the same
    bits; QBRIDGE_CPU_KERNEL=off builds nothing and logs nothing."""
    code = (
        PROBE
        + """
    want = torch_side.dequantize_nf4(packed, torch.linspace(-2, 2, 64), **args, backend="torch")
    got = torch_side.dequantize_nf4(packed, torch.linspace(-2, 2, 64), **args)
    print("same", torch.equal(got.view(torch.int16), want.view(torch.int16)))
    """
    )
    done = _run(code, QBRIDGE_CACHE_DIR=str(tmp_path), **env)
    assert done.returncode == 0, done.stderr
    assert "after waiting False" in done.stdout and "same True" in done.stdout
    if says is None:
        assert "unavailable" not in done.stderr
        assert not (tmp_path / "cpu-kernels").exists()
    else:
        assert done.stderr.count("CPU 4-bit kernel is unavailable") == 1 and says in done.stderr


@pytest.mark.parametrize(
    "value, off", [("", False), ("on", False), (" 1 ", False), ("Yes", False), ("off", True), ("OFF ", True),
                   ("0", True), ("disabled", True)],
)  # fmt: skip
def test_the_switch_reads_on_and_off_values(monkeypatch, value, off):
    monkeypatch.setenv("QBRIDGE_CPU_KERNEL", value)
    assert _native.switched_off() is off


def test_a_misspelt_switch_fails_at_import_naming_it():
    """A value that is neither on nor off (here a typo of off) must not leave the kernel silently on."""
    done = _run("import torch_side", QBRIDGE_CPU_KERNEL="of")
    assert done.returncode != 0
    assert "ValueError: QBRIDGE_CPU_KERNEL must be unset, 'on' or 'off'" in done.stderr
    assert "got 'of'" in done.stderr


def test_a_source_missing_from_the_install_leaves_the_torch_path(tmp_path):
    """A library source missing (a stripped install) is logged once, naming the file, and every call takes
    the torch path with the same bits, instead of failing the decode."""
    code = (
        """
    import pathlib
    from torch_side import _native
    _native.SOURCES = (_native.SOURCE, pathlib.Path("/nonexistent/stream_scan.c"))
    """
        + PROBE
        + """
    want = torch_side.dequantize_nf4(packed, torch.linspace(-2, 2, 64), **args, backend="torch")
    got = torch_side.dequantize_nf4(packed, torch.linspace(-2, 2, 64), **args)
    print("same", torch.equal(got.view(torch.int16), want.view(torch.int16)))
    """
    )
    done = _run(code, QBRIDGE_CACHE_DIR=str(tmp_path))
    assert done.returncode == 0, done.stderr
    assert "after waiting False" in done.stdout and "same True" in done.stdout
    assert done.stderr.count("CPU 4-bit kernel is unavailable") == 1 and "stream_scan.c" in done.stderr


def test_a_child_forked_while_a_build_starts_can_build():
    """A build holds its runner's lock while it starts the compiler; a child forked by another thread in that
    moment gets a lock of its own, not the parent's held one (its first build would wait forever)."""
    if not hasattr(os, "fork"):
        pytest.skip("no fork here")
    done = _run("""
    import os, threading
    from torch_side import _build_c
    builds = _build_c.Builds()
    held, forked = threading.Event(), threading.Event()
    def hold():
        with builds._lock:
            held.set()
            forked.wait(10)
    threading.Thread(target=hold).start()
    held.wait(10)
    pid = os.fork()
    if pid == 0:
        os._exit(0 if builds._lock.acquire(timeout=5) else 1)
    forked.set()
    print("child could take the lock", os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0)
    """)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "child could take the lock True" in done.stdout


@pytest.mark.parametrize("route", ROUTES)
def test_calls_of_changing_sizes_on_many_threads_never_return_early(kernel, route):
    """Each part of a call runs exactly once and the call returns after all of them, also when workers
    wake late and calls of different part counts follow each other (a busy thread preempts workers), on
    torch's OpenMP threads and on the kernel's own pool."""
    before = torch.get_num_threads()
    torch.set_num_threads(8)
    stop = threading.Event()

    def busy():
        x = 0
        while not stop.is_set():
            x += 1

    spinner = threading.Thread(target=busy)
    spinner.start()
    try:
        jobs = []
        for i, n in enumerate((1 << 19, 1 << 21, 3 << 19)):
            packed, absmax, code, _ = _pieces(n, 64, nested=False, seed=i)
            jobs.append((packed, absmax, code, n, _reference(packed, absmax, code, 64, n, torch.float32, {})))

        def calls():
            for _ in range(60):
                for packed, absmax, code, n, want in jobs:
                    got = dequantize_4bit_native(packed, absmax, code, 64, n, torch.float32)
                    assert torch.equal(got, want)

        _on(route, calls)
    finally:
        stop.set()
        spinner.join()
        torch.set_num_threads(before)


def _same_as_torch_path(call):
    """The default call and backend="torch" give the same bits, or raise the same error."""
    outcomes = []
    for backend in ("auto", "torch"):
        try:
            outcomes.append(call(backend))
        except Exception as e:
            outcomes.append(e)
    got, want = outcomes
    if isinstance(want, Exception):
        assert type(got) is type(want) and str(got) == str(want), (got, want)
    else:
        assert not isinstance(got, Exception), got
        assert_bitwise_equal(got, want)


def test_inputs_the_kernel_must_not_take_at_face_value(kernel):
    """Pieces with a lazy negation (their pointer holds other values), a blocksize of 64.0 after a call
    with 64 (equal hashes: a plan must not skip the check), nested_blocksize past C's int64, an offset of
    two numbers, negative shape sizes: as the torch path answers, every time."""
    n = 64 * 100
    gen = torch.Generator().manual_seed(3)
    packed = torch.randint(0, 256, (n // 2,), dtype=torch.uint8, generator=gen)
    absmax = torch.rand(100, generator=gen) + 0.1
    codes = torch.randint(0, 256, (100,), dtype=torch.uint8, generator=gen)
    nested = dict(
        nested_absmax=torch.rand(1, generator=gen), nested_code=torch.linspace(-1, 1, 256), offset=0.25
    )
    for _ in range(2):  # the second round meets the plans the first made
        _same_as_torch_path(lambda b: torch_side.dequantize_nf4(packed, absmax, shape=(n,), backend=b))
        _same_as_torch_path(
            lambda b: torch_side.dequantize_nf4(packed, torch._neg_view(absmax), shape=(n,), backend=b)
        )
        for storage in (torch.uint8, torch.bfloat16):  # a negated packed weight is other bytes
            neg = torch._neg_view(packed.view(storage))
            _same_as_torch_path(
                lambda b, neg=neg: torch_side.dequantize_nf4(neg, absmax, shape=(n,), backend=b)
            )
        _same_as_torch_path(lambda b: torch_side.dequantize_nf4(packed, absmax, shape=iter((n,)), backend=b))
        _same_as_torch_path(
            lambda b: torch_side.dequantize_nf4(
                packed, absmax, shape=(n,), code=torch._neg_view(torch_side.standard_code("nf4")), backend=b
            )
        )
        for name in ("nested_absmax", "nested_code"):
            changed = {**nested, name: torch._neg_view(nested[name])}
            _same_as_torch_path(
                lambda b, c=changed: torch_side.dequantize_nf4(packed, codes, shape=(n,), backend=b, **c)
            )
        _same_as_torch_path(
            lambda b: torch_side.dequantize_nf4(packed, absmax, shape=(n,), blocksize=64.0, backend=b)
        )
        _same_as_torch_path(
            lambda b: torch_side.dequantize_nf4(packed, codes, shape=(n,), backend=b, **nested)
        )
        for big in (2**64, 2**64 + 3, 2**63 - 1, 2**64 - 1):
            _same_as_torch_path(
                lambda b, big=big: torch_side.dequantize_nf4(
                    packed, codes, shape=(n,), nested_blocksize=big, backend=b, **{**nested}
                )
            )
        _same_as_torch_path(
            lambda b: torch_side.dequantize_nf4(
                packed, codes, shape=(n,), backend=b, **{**nested, "offset": [0.5, 1.0]}
            )
        )
        _same_as_torch_path(lambda b: torch_side.dequantize_nf4(packed, absmax, shape=(-80, -80), backend=b))
    with pytest.raises(ValueError, match="blocksize must be one of the ints"):
        torch_side.dequantize_nf4(packed, absmax, shape=(n,), blocksize=64.0)
    with pytest.raises(ValueError, match="negative size"):
        torch_side.dequantize_nf4(packed, absmax, shape=(-80, -80))


@pytest.mark.parametrize("transpose", [False, True])
def test_out_keeps_torchs_rules(kernel, transpose):
    """out= is filled as torch fills a tensor in place, on the first call and through the plan of later
    calls (the kernel writes a writable out itself; 64x64 takes its transposed writes): a leaf that requires
    grad is refused, the version counter moves (autograd notices a saved tensor was changed), an inference
    tensor is refused outside inference mode, a lazily negated out holds the values, and an out
    overlapping an input (absmax, or the packed bytes it would overwrite first) gets the torch path's
    values."""
    packed = torch.randint(0, 256, (2048,), dtype=torch.uint8)
    absmax = torch.rand(64)
    kw = dict(shape=(64, 64), dtype=torch.float32, transpose=transpose)
    want = torch_side.dequantize_nf4(packed, absmax, **kw, backend="torch")
    NF4_PLANS.clear()
    for call in ("first", "planned"):
        with pytest.raises(RuntimeError, match="leaf Variable that requires grad"):
            torch_side.dequantize_nf4(packed, absmax, **kw, out=torch.empty(64, 64, requires_grad=True))
        w = torch.rand(64, 64, requires_grad=True)
        out = torch.zeros(64, 64)
        y = (w * out).sum()
        version = out._version
        assert torch_side.dequantize_nf4(packed, absmax, **kw, out=out) is out
        assert_bitwise_equal(out, want)
        assert out._version > version, call
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            y.backward()
        with torch.inference_mode():
            inference = torch.zeros(64, 64)
            torch_side.dequantize_nf4(packed, absmax, **kw, out=inference)
        assert_bitwise_equal(inference, want)
        with pytest.raises(RuntimeError, match="Inplace update to inference tensor outside InferenceMode"):
            torch_side.dequantize_nf4(packed, absmax, **kw, out=inference)
        negated = torch.zeros(64, 64)._neg_view()
        torch_side.dequantize_nf4(packed, absmax, **kw, out=negated)
        assert_bitwise_equal(negated.resolve_neg(), want)
        assert len(NF4_PLANS) == 1, call  # the first call made the plan that later calls take

    def overlapping(backend):
        buf = torch.linspace(0.5, 2.0, 4096)
        return torch_side.dequantize_nf4(packed, buf[:64], **kw, out=buf.view(64, 64), backend=backend)

    def over_the_bytes(backend):
        buf = torch.empty(4096, dtype=torch.float32)
        buf.view(torch.uint8)[:2048] = packed  # the kernel's first writes would clobber bytes it reads later
        return torch_side.dequantize_nf4(
            buf.view(torch.uint8)[:2048], absmax, **kw, out=buf.view(64, 64), backend=backend
        )

    for _ in range(2):  # the first call, then through the plan
        _same_as_torch_path(overlapping)
        _same_as_torch_path(over_the_bytes)

    # an out that is not contiguous (a column slice, a transposed view, an expanded tensor) is filled by
    # torch's copy_ (or refused as torch refuses it), on the first call and through the plan that call made
    NF4_PLANS.clear()
    for call in ("first", "planned"):
        buf = torch.zeros(64, 160)
        assert torch_side.dequantize_nf4(packed, absmax, **kw, out=buf[:, 16:80]) is not None
        assert_bitwise_equal(buf[:, 16:80], want)
        assert not buf[:, :16].any() and not buf[:, 80:].any(), call  # nothing written beside the slice
        flipped = torch.zeros(64, 64).t()
        torch_side.dequantize_nf4(packed, absmax, **kw, out=flipped)
        assert_bitwise_equal(flipped, want)
        guard = torch.zeros(64 * 66)
        expanded = guard[64 : 2 * 64].view(1, 64).expand(64, 64)
        with pytest.raises(RuntimeError, match="more than one element of the written-to tensor"):
            torch_side.dequantize_nf4(packed, absmax, **kw, out=expanded)
        assert not guard.any(), call  # the kernel never wrote through the expanded tensor's pointer

    class Recording(torch.Tensor):  # a subclass that sees the operations on it
        seen: ClassVar[list[str]] = []

        @classmethod
        def __torch_function__(cls, func, types, args=(), kwargs=None):
            cls.seen.append(getattr(func, "__name__", ""))
            return super().__torch_function__(func, types, args, kwargs or {})

    NF4_PLANS.clear()
    for call in ("first", "planned"):  # a subclass's out is filled by torch's copy_, which it sees
        out = torch.zeros(64, 64).as_subclass(Recording)
        Recording.seen.clear()
        torch_side.dequantize_nf4(packed, absmax, **kw, out=out)
        assert "copy_" in Recording.seen, call
        assert_bitwise_equal(out.as_subclass(torch.Tensor), want)
    assert len(NF4_PLANS) == 1  # the second call went through the plan


@pytest.mark.parametrize("nested", [False, True])
def test_planned_calls_read_their_own_pieces_in_every_shape(kernel, nested):
    """After the first call of a kind, a call goes through its plan (the kernel's planned entry point, with
    what the key fixed held in the plan): new data of the same kind reads its own pieces and gives the
    torch path's bits, in every shape the plans take (0-d, 1-d, 3-d, odd sizes, a transposed result
    written by the kernel and one returned as a view), every dtype."""
    from torch_side._plans import NF4_PLANS

    cases = [((), False), ((7,), False), ((2, 3, 64), False), ((33, 130), False), ((33, 130), True)]
    cases.append(((700, 1500), True))  # written transposed by the kernel, on several threads
    NF4_PLANS.clear()
    for seed in range(3):
        for shape, transpose in cases:
            n = math.prod(shape)
            for dtype in DTYPES:
                packed, absmax, _, extra = _pieces(n, 64, nested=nested, seed=seed, nested_blocksize=7)
                kw = dict(shape=shape, dtype=dtype, transpose=transpose, **extra)
                want = torch_side.dequantize_nf4(packed, absmax, **kw, backend="torch")
                got = torch_side.dequantize_nf4(packed, absmax, **kw)
                assert got.shape == want.shape, (shape, transpose)
                assert_bitwise_equal(got, want)
    assert len(NF4_PLANS) == len(cases) * len(DTYPES)  # one plan per kind, taken by the later calls


def test_out_and_inputs_autograd_and_functorch_see_after_a_plan_exists(kernel):
    """What the torch path gives autograd, forward-mode AD and torch.func, a call through a plan gives too
    (a plan's kernel call would drop a graph, a tangent or a batch): an out with a tangent gets it zeroed,
    a zero tensor out is refused as immutable, vmap over out works, and scales that need a graph or carry a
    tangent get them (the torch path's operations), not a result without them, before and after a plan
    exists."""
    import torch.autograd.forward_ad as fwad

    packed = torch.randint(0, 256, (2048,), dtype=torch.uint8)
    absmax = torch.rand(64)
    kw = dict(shape=(64, 64), dtype=torch.float32)
    want = torch_side.dequantize_nf4(packed, absmax, **kw, backend="torch")
    NF4_PLANS.clear()
    for call in ("cold", "planned"):
        if call == "planned":  # plans for out= and for a new result
            torch_side.dequantize_nf4(packed, absmax, **kw, out=torch.empty(64, 64))
            torch_side.dequantize_nf4(packed, absmax, **kw)
            assert len(NF4_PLANS) == 2
        with fwad.dual_level():
            out = fwad.make_dual(torch.zeros(64, 64), torch.ones(64, 64))
            torch_side.dequantize_nf4(packed, absmax, **kw, out=out)
            primal, tangent = fwad.unpack_dual(out)
            assert_bitwise_equal(primal, want)
            assert tangent is None or not tangent.any(), call
            # a tangent on the scales is carried (the torch path's operations), planned or not: a plan must
            # not drop it
            primal, tangent = fwad.unpack_dual(
                torch_side.dequantize_nf4(packed, fwad.make_dual(absmax, torch.ones(64)), **kw)
            )
            assert_bitwise_equal(primal, want)
            assert tangent is not None and tangent.any(), call
        with pytest.raises(RuntimeError, match="ZeroTensors are immutable"):
            torch_side.dequantize_nf4(packed, absmax, **kw, out=torch._efficientzerotensor((64, 64)))
        outs = torch.zeros(3, 64, 64)
        torch.func.vmap(lambda o: torch_side.dequantize_nf4(packed, absmax, **kw, out=o))(outs)
        assert_bitwise_equal(outs, want.expand(3, 64, 64))
        needs_grad = absmax.clone().requires_grad_()  # a graph, as the torch path's operations build it
        for out in (None, torch.empty(64, 64)):
            got = torch_side.dequantize_nf4(packed, needs_grad, **kw, out=out)
            assert got.requires_grad and got.grad_fn is not None, call
            assert_bitwise_equal(got.detach(), want)


def test_traced_and_transformed_calls_take_the_torch_path(kernel):
    """Under functionalize, FakeTensorMode, make_fx and torch.jit.trace a call takes the torch path, as its
    tracer must see it, also where plans exist: the kernel wrote through a null pointer under the first two
    and left an empty result in the others' recordings."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    gen = torch.Generator().manual_seed(21)
    packed = torch.randint(0, 256, (2048,), dtype=torch.uint8, generator=gen)
    absmax = torch.rand(64, generator=gen)
    kw = dict(shape=(64, 64), dtype=torch.float32)
    W = _fp8_weight((64, 64), torch.float8_e4m3fn, gen)
    s = torch.rand(1, 1, generator=gen)
    want = torch_side.dequantize_nf4(packed, absmax, **kw, backend="torch")
    fwant = torch_side.dequantize_fp8(W, s, torch.float32, backend="torch")
    for _ in range(2):  # plans of each kind exist
        torch_side.dequantize_nf4(packed, absmax, **kw)
        torch_side.dequantize_nf4(packed, absmax, **kw, out=torch.empty(64, 64))
        torch_side.dequantize_fp8(W, s, torch.float32)
    nf4 = functools.partial(torch_side.dequantize_nf4, **kw)
    assert_bitwise_equal(torch.func.functionalize(nf4)(packed, absmax), want)
    assert_bitwise_equal(torch.func.functionalize(lambda: nf4(packed, absmax))(), want)  # closed over
    out = torch.zeros(64, 64)
    torch.func.functionalize(lambda o: nf4(packed, absmax, out=o))(out)
    assert_bitwise_equal(out, want)
    fp8 = functools.partial(torch_side.dequantize_fp8, dtype=torch.float32)
    assert_bitwise_equal(torch.func.functionalize(lambda: fp8(W, s))(), fwant)
    with FakeTensorMode() as mode:
        fake = fp8(mode.from_tensor(W), mode.from_tensor(s))
    assert type(fake).__name__ == "FakeTensor" and fake.shape == (64, 64)
    W2 = _fp8_weight((64, 64), torch.float8_e4m3fn, gen)
    s2 = torch.rand(1, 1, generator=gen)
    fwant2 = torch_side.dequantize_fp8(W2, s2, torch.float32, backend="torch")
    assert_bitwise_equal(make_fx(lambda w, x: fp8(w, x))(W, s)(W2, s2), fwant2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.trace's deprecation and tracer warnings
        traced = torch.jit.trace(lambda w, x: fp8(w, x), (W, s))
    assert_bitwise_equal(traced(W2, s2), fwant2)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_a_4bit_call_traced_first_leaves_later_calls_whole(kernel, quant_type):
    """A process's first 4-bit call made under FakeTensorMode cached its fake code table, and every later
    real call read it: the kernel crashed the process (SIGSEGV), the torch path raised. Traced 4-bit calls
    also failed (the check for denormal products asks the data, which FakeTensorMode cannot answer) or, under
    make_fx, recorded that check's answer for the example inputs. Now the tracer gets a table of its own and
    the torch path flushes unasked under it."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.proxy_tensor import make_fx

    from torch_side import _codes

    gen = torch.Generator().manual_seed(22)
    packed, absmax = (
        torch.randint(0, 256, (2048,), dtype=torch.uint8, generator=gen),
        torch.rand(64, generator=gen),
    )
    code = torch.tensor(_codes.CODES[quant_type])
    f = functools.partial(
        torch_side.dequantize_nf4, shape=(64, 64), quant_type=quant_type, dtype=torch.float32
    )
    _codes._code_on.cache_clear()  # this call is the process's first
    _codes._pairs_on.cache_clear()
    with FakeTensorMode() as mode:
        fake = f(mode.from_tensor(packed), mode.from_tensor(absmax))
    assert type(fake).__name__ == "FakeTensor" and fake.shape == (64, 64) and fake.dtype == torch.float32
    assert type(torch_side.standard_code(quant_type)) is torch.Tensor
    assert type(_codes.standard_pairs(quant_type)) is torch.Tensor
    assert_bitwise_equal(
        f(packed, absmax), _plain(packed, absmax, code, 64, 4096, torch.float32).view(64, 64)
    )
    p2, a2 = torch.randint(0, 256, (2048,), dtype=torch.uint8, generator=gen), torch.rand(64, generator=gen)
    tiny = torch.full((64,), 2.0**-130)  # every product denormal: flushed to zero
    for mode in ("fake", "real"):
        graph = make_fx(f, tracing_mode=mode)(packed, absmax)
        for a in (a2, tiny):
            assert_bitwise_equal(graph(p2, a), _plain(p2, a, code, 64, 4096, torch.float32).view(64, 64))
    assert not bool(_plain(p2, tiny, code, 64, 4096, torch.float32).any())


def test_the_torch_path_flushes_every_denormal_product(kernel):
    """A table entry above 1 makes FLT_MIN / entry itself denormal: the torch path's check for scales
    that need the flush must not round it away (the kernel and CUDA flush)."""
    code = torch.full((16,), 6.0)
    scale = torch.tensor([1398101], dtype=torch.int32).view(torch.float32)  # 1398101 * 2**-149
    packed = torch.zeros(32, dtype=torch.uint8)
    want = _plain(packed, scale, code, 64, 64, torch.float32)
    assert int((want == 0).sum()) == 64
    _same_as_torch_path(
        lambda b: torch_side.dequantize_nf4(
            packed, scale, shape=(64,), code=code, dtype=torch.float32, backend=b
        )
    )
    assert_bitwise_equal(
        torch_side.dequantize_nf4(
            packed, scale, shape=(64,), code=code, dtype=torch.float32, backend="torch"
        ),
        want,
    )


SHORT = """
import sys, time, torch, torch_side
from torch_side import _native
if sys.argv[1:] == ["starved"]:  # the build thread gets no CPU for a second before it starts the builder
    def compiler(found=_native.compiler):
        time.sleep(1.0)
        return found()
    _native.compiler = compiler
torch_side.dequantize_nf4(torch.zeros(2048, dtype=torch.uint8), torch.rand(64), shape=(4096,))
"""


@pytest.mark.parametrize("thread", ["quick", "starved"])
def test_a_short_process_still_fills_the_cache(tmp_path, thread):
    """A process that exits while its build runs leaves the build to finish (in its own session): the
    library lands whole in the cache, with nothing half-written beside it. Its exit waits until the build
    thread has started the builder: one that got no CPU before the exit (seen under load) left no build."""
    done = _run(SHORT, thread, QBRIDGE_CACHE_DIR=str(tmp_path))
    assert done.returncode == 0, done.stderr
    folder = tmp_path / "cpu-kernels"
    deadline = time.monotonic() + 180  # the compiler shares the machine with the other test processes
    while not list(folder.glob("cpu_4bit-*.so")) and time.monotonic() < deadline:
        time.sleep(0.1)
    found = sorted(p.name for p in folder.iterdir()) if folder.exists() else None
    assert len(list(folder.glob("cpu_4bit-*.so"))) == 1, f"no build landed in 180 s; the folder holds {found}"
    (built,) = folder.glob("cpu_4bit-*.so")
    assert (built.stat().st_mode & 0o777) == 0o755
    time.sleep(0.5)
    assert sorted(p.name for p in folder.iterdir()) == [built.name, built.name + ".sha256"]


@pytest.fixture(scope="module")
def built_cache(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """A cache folder holding the kernel as a process builds it (built once for the tests that damage it)."""
    folder = tmp_path_factory.mktemp("built-cache")
    assert _run(PROBE, QBRIDGE_CACHE_DIR=str(folder)).returncode == 0
    return folder


@pytest.mark.parametrize("damage", ["truncate", "world-writable", "no hash", "a link", "another library"])
def test_a_damaged_or_foreign_library_is_built_again_not_loaded(tmp_path, built_cache, damage):
    """A truncated library (dlopen of one can kill the process), one that others may write, or one
    without its hash is not loaded: it is built again."""
    env = dict(QBRIDGE_CACHE_DIR=str(tmp_path))
    shutil.copytree(built_cache / "cpu-kernels", tmp_path / "cpu-kernels")  # the build, its modes kept
    (built,) = (tmp_path / "cpu-kernels").glob("cpu_4bit-*.so")
    assert (built.stat().st_mode & 0o777) == 0o755
    if damage == "truncate":
        built.write_bytes(built.read_bytes()[:4096])
    elif damage == "world-writable":
        built.chmod(0o777)
    elif damage == "no hash":
        pathlib.Path(f"{built}.sha256").unlink()
    else:  # a library that is not the kernel, with its true hash beside it: linked to, or copied
        other = _some_library()
        built.unlink()
        if damage == "a link":
            built.symlink_to(other)
        else:
            shutil.copyfile(other, built)
            built.chmod(0o755)
        pathlib.Path(f"{built}.sha256").write_text(hashlib.sha256(other.read_bytes()).hexdigest())
    again = _run(PROBE, **env)
    assert again.returncode == 0, again.stderr
    # one that looks whole is loaded on the first call, fails, and is built again on the spot
    expected = "after waiting True" if damage == "another library" else "at once False after waiting True"
    assert expected in again.stdout
    assert (built.stat().st_mode & 0o777) == 0o755 and pathlib.Path(f"{built}.sha256").exists()
    assert not built.is_symlink() and b"qb_dequantize_4bit" in built.read_bytes()


def _some_library() -> pathlib.Path:
    """A shared library of the system's that is not the kernel (the math library)."""
    for folder in ("/lib/x86_64-linux-gnu", "/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib", "/lib"):
        for name in ("libm.so.6", "libm.dylib"):
            if (pathlib.Path(folder) / name).is_file():
                return (pathlib.Path(folder) / name).resolve()
    pytest.skip("no libm found to stand in for another library")


def test_a_cache_that_cannot_take_the_build_gets_none(tmp_path):
    """QBRIDGE_CACHE_DIR=off, or a path that cannot be a directory: the process builds a library for
    itself, in a temporary directory it removes."""
    for cache in ("off", "/dev/null/qbridge"):
        tmp = tmp_path / cache.replace("/", "_")
        tmp.mkdir()
        done = _run(PROBE, QBRIDGE_CACHE_DIR=cache, TMPDIR=str(tmp))
        assert done.returncode == 0, done.stderr
        assert "after waiting True" in done.stdout, done.stderr
        assert list(tmp.iterdir()) == []
        short = _run(SHORT, QBRIDGE_CACHE_DIR=cache, TMPDIR=str(tmp))  # ends while its build runs
        assert short.returncode == 0, short.stderr
        assert list(tmp.iterdir()) == []


@pytest.mark.skipif(not shutil.which("gcc"), reason="needs gcc")
def test_float16_nan_payloads_in_the_vector_part_and_the_scalar_tail(tmp_path):
    """The kernel's own float16 rounding (integer arithmetic, with any compiler; here one without _Float16)
    keeps NaN payloads as the hardware conversion (and torch) keep them, in the vector part and the scalar
    tail alike."""
    code = """
    import torch, torch_side
    torch_side.wait_for_kernels()  # the first call builds the kernel on the spot
    from torch_side import _native
    absmax = torch.tensor([0x3f800000, 0x7fc00001, 0xffa00000 - 2**32, 0x7fffffff], dtype=torch.int32).view(torch.float32)
    packed = torch.randint(0, 256, (125,), dtype=torch.uint8)
    a = torch_side.dequantize_nf4(packed, absmax, shape=(250,), dtype=torch.float16)
    b = torch_side.dequantize_nf4(packed, absmax, shape=(250,), dtype=torch.float16, backend="torch")
    print("kernel", _native._FN is not None, "same", torch.equal(a.view(torch.int16), b.view(torch.int16)))
    """
    done = _run(code, QBRIDGE_CACHE_DIR=str(tmp_path), CC="gcc -U__FLT16_MAX__")
    assert done.returncode == 0, done.stderr
    assert "kernel True same True" in done.stdout


@pytest.mark.skipif(
    sys.platform != "linux" or not shutil.which("pkill"), reason="uses a shell script and pkill"
)
def test_a_hanging_compiler_does_not_hold_the_process(tmp_path):
    """The build runs beside the process: one that ends while its compiler hangs ends at once (the build
    is left to its own time limit), and its first call was answered by the torch path."""
    hang = tmp_path / "hanging-cc"
    hang.write_text("#!/bin/sh\nwhile :; do sleep 1; done\n")
    hang.chmod(0o755)
    try:
        t0 = time.monotonic()
        done = _run(SHORT, QBRIDGE_CACHE_DIR=str(tmp_path / "cache"), CC=str(hang))
        assert done.returncode == 0, done.stderr
        assert time.monotonic() - t0 < 60
    finally:
        subprocess.run(["pkill", "-f", str(hang)], check=False)


# --- FP8 ---------------------------------------------------------------------------------------------

_SPECIAL_FP8 = [
    float("nan"),
    float("inf"),
    -float("inf"),
    0.0,
    -0.0,
    1e-3,
    -448.0,
    57344.0,
    2.0**-9,
    2.0**-16,
]


def _fp8_weight(shape, dtype, gen):
    """Random float8 bytes (every byte value appears, NaN encodings included), then special values."""
    w = torch.randint(0, 256, shape, dtype=torch.uint8, generator=gen).view(dtype)
    flat = w.view(-1)
    for i, v in enumerate(_SPECIAL_FP8[: flat.numel()]):
        flat[i * 7 % flat.numel()] = torch.tensor(v).to(dtype)
    return w


@pytest.mark.parametrize("fp8", [torch.float8_e4m3fn, torch.float8_e5m2])
@pytest.mark.parametrize(
    "shape, scale_shape, block",
    [
        ((1, 1), (1, 1), None),  # one scale
        ((3, 5), (), None),  # a 0-d per-tensor scale
        ((2, 3, 40), (), None),  # stacked experts under one scale: every element one row
        ((7, 33), (7, 1), None),  # per row
        ((257, 513), (3, 5), 128),  # partial tiles on both sides
        ((128, 256), (1, 2), 128),
        ((100, 300), (2, 5), 64),
        ((1031, 4100), (9, 33), 128),  # more than one thread's share (2**18 elements), odd rows
        ((50, 250), (1, 3), 100),  # scale blocks that start inside a group of 16 columns
        ((33, 70), (33, 1), None),  # per row, rows and columns past whole tiles of 16 x 64
    ],
)
def test_fp8_matches_the_reference_bit_for_bit(kernel, monkeypatch, fp8, shape, scale_shape, block):
    """dequantize_fp8 on the CPU takes the C kernel (the plain-torch decode raises if asked) and gives
    its bits for every output dtype, row-major and (2-D weights) written transposed, contiguous: all 256
    byte values (NaN, infinities, subnormals, -0), and scales that are NaN, infinite, zero, negative or
    tiny enough to make subnormal products."""
    from torch_side import _fp8

    gen = torch.Generator().manual_seed(sum(shape))
    W = _fp8_weight(shape, fp8, gen)
    scale = torch.rand(scale_shape, generator=gen) * 1e-2
    flat = scale.view(-1)
    for i, v in enumerate([float("nan"), float("inf"), 0.0, -3.0, 1e-38][: flat.numel() - 1]):
        flat[i + 1] = v
    monkeypatch.setattr(_fp8, "E5M2_NATIVE_FROM", 0)  # small e5m2 weights too (they take torch's path)
    monkeypatch.setattr(_fp8, "FP8_CPU_PLANS", {})  # plans of its own under that threshold, then dropped
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for transpose in (False, True) if W.dim() == 2 else (False,):
            kw = dict(block_size=block, transpose=transpose)
            want = torch_side.dequantize_fp8(W, scale, dtype, backend="torch", **kw)
            original = _fp8.dequantize_fp8_reference
            _fp8.dequantize_fp8_reference = None  # the C kernel must answer
            try:
                got = torch_side.dequantize_fp8(W, scale, dtype, **kw)
            finally:
                _fp8.dequantize_fp8_reference = original
            # written transposed by the kernel where that pays (else a transposed view of its result)
            assert got.is_contiguous() or not _native.transposes_well(*shape, nibbles=False)
            assert_bitwise_equal(got, want)


def test_fp8_other_inputs_take_the_torch_path_with_the_same_bits(kernel):
    """What the kernel does not read as it lies (a non-contiguous weight, e8m0 scales), and bf16 and f16
    scales and a transposed result, with several threads or one, come out bit-identical to the plain-torch
    decode."""
    gen = torch.Generator().manual_seed(5)
    W = _fp8_weight((600, 700), torch.float8_e4m3fn, gen)
    scale = torch.rand(5, 6, generator=gen) * 1e-2
    cases = [
        (W[:, ::2], torch.rand(5, 3, generator=gen), {}),
        (W, scale, {"transpose": True}),
        (W, scale.bfloat16(), {}),
        (W, scale.half(), {}),
        (W, (torch.rand(5, 6, generator=gen) * 8).exp2().to(torch.float8_e8m0fnu), {}),
    ]
    before = torch.get_num_threads()
    try:
        for threads in (1, 3):
            torch.set_num_threads(threads)
            for w, s, kw in cases:
                want = torch_side.dequantize_fp8(w, s, torch.bfloat16, backend="torch", **kw)
                assert_bitwise_equal(torch_side.dequantize_fp8(w, s, torch.bfloat16, **kw), want)
    finally:
        torch.set_num_threads(before)


def test_a_default_device_does_not_move_the_cpu_kernels_output(kernel):
    """The C kernel writes through a pointer into memory it was given: under another default device
    (torch.device("meta") or set_default_device) that memory, and the FP8 byte table, stay on the CPU."""
    from torch_side import _fp8

    gen = torch.Generator().manual_seed(8)
    W = _fp8_weight((300, 400), torch.float8_e4m3fn, gen)
    scale = torch.rand(3, 4, generator=gen)
    want = torch_side.dequantize_fp8(W, scale, backend="torch")
    packed, absmax, code, extra = _pieces(4097, 64, nested=True, seed=8)
    want4 = _reference(packed, absmax, code, 64, 4097, torch.bfloat16, extra)
    _fp8._byte_values.cache_clear()  # made under the default device below
    with torch.device("meta"):
        got = torch_side.dequantize_fp8(W, scale)
        got4 = dequantize_4bit_native(packed, absmax, code, 64, 4097, torch.bfloat16, **extra)
    assert got.device.type == "cpu" and got4.device.type == "cpu"
    assert_bitwise_equal(got, want)
    assert_bitwise_equal(got4, want4)


def test_planned_fp8_calls_read_their_own_pieces(kernel):
    """After the first CPU call of a kind, an FP8 call goes through its plan (``_plans.FP8_CPU_PLANS``):
    new data of the same kind gives the torch path's bits, for block scales with partial tiles, per-row and
    per-tensor scales (a 3-D weight too), bfloat16 and float16 scales, every output dtype, and both
    transposed routes (written by the kernel, and a view of its row-major result), and small float8_e5m2
    weights, which take the torch path by choice. What a plan's kernel call would drop still takes the
    torch path with a plan there: a scale that needs a graph, one with a tangent, check_finite's check."""
    import torch.autograd.forward_ad as fwad

    from torch_side._plans import FP8_CPU_PLANS

    cases = [
        ((300, 700), (3, 6), {}),  # partial tiles
        ((700, 1500), (6, 12), {"transpose": True}),  # written transposed by the kernel
        ((10, 130), (1, 2), {"transpose": True}),  # a transposed view (too few rows to write it)
        ((64, 100), (64, 1), {}),  # per row
        ((4, 5, 64), (1,), {}),  # one scale, any shape
        ((256, 256), (2, 2), {"scale_dtype": torch.bfloat16}),
        ((256, 256), (2, 2), {"scale_dtype": torch.float16}),
    ]
    FP8_CPU_PLANS.clear()
    for seed in range(3):
        gen = torch.Generator().manual_seed(seed)
        for shape, scale_shape, kw in cases:
            kw = dict(kw)
            scale_dtype = kw.pop("scale_dtype", torch.float32)
            W = _fp8_weight(shape, torch.float8_e4m3fn, gen)
            scale = (torch.rand(scale_shape, generator=gen) + 0.25).to(scale_dtype)
            for dtype in DTYPES:
                want = torch_side.dequantize_fp8(W, scale, dtype, backend="torch", **kw)
                got = torch_side.dequantize_fp8(W, scale, dtype, **kw)
                assert got.shape == want.shape
                assert_bitwise_equal(got, want)
    assert len(FP8_CPU_PLANS) == len(cases) * len(DTYPES)  # one per kind, taken by the later calls
    W = _fp8_weight((300, 700), torch.float8_e4m3fn, torch.Generator().manual_seed(5))
    scale = torch.rand(3, 6) + 0.25
    want = torch_side.dequantize_fp8(W, scale, backend="torch")
    got = torch_side.dequantize_fp8(W, scale.clone().requires_grad_())
    assert got.grad_fn is not None
    assert_bitwise_equal(got.detach(), want)
    with fwad.dual_level():
        primal, tangent = fwad.unpack_dual(
            torch_side.dequantize_fp8(W, fwad.make_dual(scale, torch.ones(3, 6)))
        )
    assert_bitwise_equal(primal, want)
    assert tangent is not None and tangent.any()
    with pytest.raises(ValueError, match="scale_inv"):
        torch_side.dequantize_fp8(W, torch.full((3, 6), float("nan")), check_finite=True)
    before = len(FP8_CPU_PLANS)
    for seed in range(3):  # small e5m2 weights take the torch path by choice, planned as well
        gen = torch.Generator().manual_seed(6 + seed)
        small_e5m2, scale = _fp8_weight((64, 100), torch.float8_e5m2, gen), torch.rand(64, 1, generator=gen)
        for transpose in (False, True):
            want = torch_side.dequantize_fp8(small_e5m2, scale, backend="torch", transpose=transpose)
            assert_bitwise_equal(torch_side.dequantize_fp8(small_e5m2, scale, transpose=transpose), want)
    assert len(FP8_CPU_PLANS) == before + 2


def test_first_fp8_calls_from_several_threads_at_once(kernel):
    """Threads that make the first FP8 call of a process together each get the right bits (the byte
    table a thread passes to the kernel stays alive through its call, whichever table the cache keeps)."""
    from torch_side import _fp8

    gen = torch.Generator().manual_seed(9)
    W = _fp8_weight((256, 256), torch.float8_e4m3fn, gen)
    scale = torch.rand(1, 1, generator=gen)
    want = torch_side.dequantize_fp8(W, scale, backend="torch")
    for _ in range(150):
        _fp8._byte_values.cache_clear()
        start = threading.Barrier(8)
        results: list = [None] * 8

        def work(i, start=start, results=results):
            start.wait()
            results[i] = torch_side.dequantize_fp8(W, scale)

        threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for got in results:
            assert_bitwise_equal(got, want)


def test_fp8_gradients_to_a_scale_flow_as_on_the_torch_path(kernel):
    """A scale that requires grad takes the torch path, which keeps the graph to it."""
    gen = torch.Generator().manual_seed(10)
    W = _fp8_weight((256, 384), torch.float8_e4m3fn, gen)
    W.view(torch.uint8)[W.view(torch.uint8) & 0x7F == 0x7F] = 0  # no NaN: gradients to compare
    grads = []
    for backend in ("auto", "torch"):
        scale = (torch.rand(2, 3, generator=torch.Generator().manual_seed(1)) + 0.5).requires_grad_()
        out = torch_side.dequantize_fp8(W, scale, torch.float32, backend=backend)
        assert out.requires_grad
        out.sum().backward()
        grads.append(scale.grad)
    assert_bitwise_equal(grads[0], grads[1])


def test_every_thread_of_a_call_computes_under_the_callers_flush_setting(kernel):
    """With torch.set_flush_denormal(True) on the calling thread, every part of a call (the pool's threads
    too, started before the setting changed) flushes denormal products, as the caller's thread does."""
    if not torch.set_flush_denormal(True):
        pytest.skip("this CPU cannot flush denormals")
    torch.set_flush_denormal(False)
    gen = torch.Generator().manual_seed(11)
    W = (torch.rand(2048, 1024, generator=gen) * 2.0**-4).to(torch.float8_e4m3fn)
    scale = torch.full((16, 8), 2.0**-120)  # a normal scale; products under 2**-6 * scale are denormal
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        torch_side.dequantize_fp8(W, scale, torch.float32)  # the pool's threads exist before the setting
        plain = torch_side.dequantize_fp8(W, scale, torch.float32, backend="torch")
        assert bool((plain != 0).any() & (plain.abs() < FLT_MIN).any())  # denormal products exist
        flushed = torch.where(plain.abs() < FLT_MIN, torch.zeros_like(plain).copysign(plain), plain)
        torch.set_flush_denormal(True)
        try:
            got = torch_side.dequantize_fp8(W, scale, torch.float32)
        finally:
            torch.set_flush_denormal(False)
        assert_bitwise_equal(got, flushed)
    finally:
        torch.set_num_threads(before)


def test_fp8_under_forward_mode_and_vmap_takes_the_torch_path(kernel):
    """A scale with a forward-mode tangent, or one that torch.func.vmap / jvp wraps (no storage of its
    own), is decoded by the torch path, which carries the tangent and the batch: as backend='torch'."""
    import torch.autograd.forward_ad as fwad

    gen = torch.Generator().manual_seed(12)
    W = _fp8_weight((64, 96), torch.float8_e4m3fn, gen)
    W.view(torch.uint8)[W.view(torch.uint8) & 0x7F == 0x7F] = 0
    scale = torch.rand(1, 1, generator=gen) + 0.5
    outs = {}
    for backend in ("auto", "torch"):
        with fwad.dual_level():
            out = torch_side.dequantize_fp8(W, fwad.make_dual(scale, torch.ones_like(scale)), torch.float32,
                                            backend=backend)  # fmt: skip
            primal, tangent = fwad.unpack_dual(out)
            assert tangent is not None, backend
            outs[backend] = (primal.clone(), tangent.clone())
    assert_bitwise_equal(outs["auto"][0], outs["torch"][0])
    assert_bitwise_equal(outs["auto"][1], outs["torch"][1])
    scales = torch.tensor([0.5, 2.0])
    batched = {
        b: torch.func.vmap(lambda s, b=b: torch_side.dequantize_fp8(W, s, torch.float32, backend=b))(scales)
        for b in ("auto", "torch")
    }
    assert batched["auto"].shape == (2, 64, 96)
    assert_bitwise_equal(batched["auto"], batched["torch"])
    _, tangent = torch.func.jvp(lambda s: torch_side.dequantize_fp8(W, s, torch.float32), (scale,),
                                (torch.ones_like(scale),))  # fmt: skip
    assert_bitwise_equal(tangent, W.float())


def test_the_plain_c_paths_match_the_reference_too(kernel, tmp_path, monkeypatch):
    """CPUs without AVX-512 (most laptops) run the kernel's plain C paths: built here without AVX-512 and
    put in the built kernel's place, they give the reference's bits too, row-major and written transposed,
    4-bit and FP8."""
    import platform

    from torch_side import _build_c, _fp8, _nf4

    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("the AVX-512 paths exist on x86-64 only: the build here is the plain one already")
    flags = [f for f in _build_c.FLAGS if f != "-march=native"] + ["-mno-avx512f"]
    target = tmp_path / "plain.so"
    subprocess.run([*_build_c.compiler(), *flags, *map(str, _native.SOURCES), "-o", str(target)], check=True)
    monkeypatch.setattr(_native, "_FN", None)
    fn, fp8, fn_t, *_, planned = _native.load(target)
    monkeypatch.setattr(_native, "_FN", fn)
    monkeypatch.setattr(_native, "_FP8", fp8)
    monkeypatch.setattr(_native, "_FN_T", fn_t)
    monkeypatch.setattr(_native, "_PLANNED", planned)
    # plans of its own, made here with the plain build's entry points, dropped after
    monkeypatch.setattr(_nf4, "NF4_PLANS", {})
    monkeypatch.setattr(_fp8, "FP8_CPU_PLANS", {})
    for rows, cols, blocksize, nested in [(33, 130, 64, True), (17, 63, 32, False), (300, 900, 4096, True)]:
        n = rows * cols
        for i, dtype in enumerate(DTYPES):
            packed, absmax, code, extra = _pieces(
                n, blocksize, nested=nested, seed=i + rows, nested_blocksize=7
            )
            want = _reference(packed, absmax, code, blocksize, n, dtype, extra)
            assert_bitwise_equal(
                dequantize_4bit_native(packed, absmax, code, blocksize, n, dtype, **extra), want
            )
            got = dequantize_4bit_native(
                packed, absmax, code, blocksize, n, dtype, **extra, transposed=(rows, cols)
            )
            assert_bitwise_equal(got, want.reshape(rows, cols).t())
    for transpose in (False, True):  # the second call of each through its plan: the planned entry point
        packed, absmax, _, extra = _pieces(700 * 1500, 64, nested=True, seed=3, nested_blocksize=7)
        kw = dict(shape=(700, 1500), transpose=transpose, **extra)
        want = torch_side.dequantize_nf4(packed, absmax, **kw, backend="torch")
        for _ in range(2):
            assert_bitwise_equal(torch_side.dequantize_nf4(packed, absmax, **kw), want)
    assert len(_nf4.NF4_PLANS) == 2
    gen = torch.Generator().manual_seed(12)
    W = _fp8_weight((257, 513), torch.float8_e4m3fn, gen)
    scale = torch.rand(3, 5, generator=gen) * 1e-2
    cases = [(dtype, transpose) for dtype in DTYPES for transpose in (False, True)]
    wants = [torch_side.dequantize_fp8(W, scale, d, transpose=t, backend="torch") for d, t in cases]
    monkeypatch.setattr(_fp8, "dequantize_fp8_reference", None)  # the plain C kernel must answer
    for (dtype, transpose), want in zip(cases, wants, strict=True):
        got = torch_side.dequantize_fp8(W, scale, dtype, transpose=transpose)
        assert got.is_contiguous()
        assert_bitwise_equal(got, want)


@pytest.mark.skipif(
    platform.machine() not in _FE_UPWARD, reason="rounding-mode constants known for x86-64 and arm64"
)
def test_float16_rounds_to_nearest_even_under_any_rounding_mode(kernel):
    """The float16 output rounds to nearest even whatever the calling thread's rounding mode (fesetround), in
    the vector part and the scalar tail alike, as torch's CPU conversion does; the float32 products follow the
    mode, as torch's own float32 products do. The 4-bit decode and the FP8 one (rows of 16k + 15 bytes: whole
    vector steps, then a tail; scales that make ties and float16 subnormals)."""
    import ctypes
    import ctypes.util
    import struct

    from torch_side._fp8 import dequantize_fp8_native

    libm = ctypes.CDLL(ctypes.util.find_library("m"))
    cases = [_pieces(64 * k + 15, 64, nested=False, seed=k) for k in range(40)]  # each with a tail of 15
    gen = torch.Generator().manual_seed(3)
    fp8 = []
    for k in range(1, 9):
        W = (torch.randn(5, 16 * k + 15, generator=gen) * 100).to(torch.float8_e4m3fn)
        scale = torch.tensor([1.0 + 1 / 3, 2.0**-20, 0.7, 3.0e-3])[torch.randint(0, 4, (5, 1), generator=gen)]
        fp8.append((W, scale, torch_side.fp8_scale_layout(W.shape, scale.shape, None)))
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # every part on this thread, under its mode
    mode = libm.fegetround()
    assert libm.fesetround(_FE_UPWARD[platform.machine()]) == 0
    try:
        outs = [
            (dequantize_4bit_native(packed, absmax, code, 64, len(packed) * 2 - 1, torch.float32),
             dequantize_4bit_native(packed, absmax, code, 64, len(packed) * 2 - 1, torch.float16))
            for packed, absmax, code, _ in cases
        ]  # fmt: skip
        outs += [
            (dequantize_fp8_native(W, scale, layout, torch.float32).reshape(-1),
             dequantize_fp8_native(W, scale, layout, torch.float16).reshape(-1))
            for W, scale, layout in fp8
        ]  # fmt: skip
    finally:
        libm.fesetround(mode)
        torch.set_num_threads(before)
    for f32, f16 in outs:
        # Python's float16 packing rounds to nearest even in exact steps, whatever the mode
        want = [struct.unpack("<h", struct.pack("<e", v))[0] for v in f32.tolist()]
        assert torch.equal(f16.view(torch.int16), torch.tensor(want, dtype=torch.int16))


def test_the_stream_scan_returns_the_first_stream_not_idle(kernel):
    """The library's stream scan (kernels/stream_scan.c, qbridge.to_jax's check of torch's CUDA streams) asks
    the query it is given of each handle in order and stops at the first that does not answer 0, returning
    its index; -1 when every one answers 0. The query here is a Python function standing in for the driver's
    ``cuStreamQuery`` (this machine may have no GPU): the loop under test is the library's own."""
    scan = _native.stream_scan(wait=True)
    query_t = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p)
    rng = random.Random(0)
    for n in [0, 1, 2, 128, 129]:
        handles = rng.sample(range(1, 1 << 47), n)  # as distinct as stream handles are
        cases = [
            [0] * n
        ]  # every stream idle, then the first busy one at each place, others at random after it
        cases += [[0] * i + [600] + rng.choices([0, 600, 700], k=n - i - 1) for i in range(n)]
        for answers in cases:
            answer_of = dict(zip(handles, answers, strict=True))
            asked: list[int] = []
            query = query_t(lambda h, asked=asked, answer_of=answer_of: asked.append(h) or answer_of[h])
            got = scan(ctypes.cast(query, ctypes.c_void_p), (ctypes.c_void_p * n)(*handles), n)
            first = next((i for i, a in enumerate(answers) if a), -1)
            assert got == first, (n, answers)
            assert asked == handles[: n if first < 0 else first + 1]  # in order, none after the first busy
    for error in (1, 700, 900, -1):  # any answer but idle counts: the caller asks torch, which raises it
        query = query_t(lambda h, error=error: error if h == 3 else 0)
        assert scan(ctypes.cast(query, ctypes.c_void_p), (ctypes.c_void_p * 4)(1, 2, 3, 4), 4) == 2


def test_the_stream_order_scans_then_records_on_current_and_makes_the_consumer_wait(kernel):
    """The library's ordering call (kernels/stream_scan.c, qbridge.to_jax's stream work for one tensor) scans
    as the scan above does; when no stream is busy it records the event on the current stream and then makes
    the consumer wait for that event, in this order and once each; a busy stream is reported with nothing
    recorded; a consumer that is the current stream needs nothing; a failed record or wait is reported (-2,
    -3), a failed record with no wait after it. The driver's functions are Python stand-ins here (this machine
    may have no GPU): the code under test is the library's own; the GPU suite runs it on the driver."""
    order = _native.stream_order(wait=True)
    p = ctypes.c_void_p
    query_t = ctypes.CFUNCTYPE(ctypes.c_int, p)
    record_t = ctypes.CFUNCTYPE(ctypes.c_int, p, p)
    wait_t = ctypes.CFUNCTYPE(ctypes.c_int, p, p, ctypes.c_uint)
    event, current, consumer = 0xE0, 0xC0, 0xD0
    rng = random.Random(1)
    for n in [0, 1, 128]:
        handles = rng.sample(range(1, 1 << 47), n)
        for busy_at in [None, *sorted({0, n // 2, n - 1} if n else set())]:
            for record_answer, wait_answer, on in [
                (0, 0, consumer),
                (0, 0, current),
                (1, 0, consumer),
                (0, 400, consumer),
            ]:
                calls: list[tuple] = []
                query = query_t(
                    lambda h, calls=calls, hit=None if busy_at is None else handles[busy_at]: (
                        calls.append(("query", h)) or (600 if h == hit else 0)
                    )
                )
                record = record_t(
                    lambda e, s, calls=calls, a=record_answer: calls.append(("record", e, s)) or a
                )
                wait = wait_t(
                    lambda s, e, f, calls=calls, a=wait_answer: calls.append(("wait", s, e, f)) or a
                )
                got = order(
                    ctypes.cast(query, p), (p * n)(*handles), n, ctypes.cast(record, p), ctypes.cast(wait, p),
                    event, current, on,
                )  # fmt: skip
                asked = [c for c in calls if c[0] == "query"]
                rest = [c for c in calls if c[0] != "query"]
                if busy_at is not None:
                    assert (got, rest) == (busy_at, []) and len(asked) == busy_at + 1
                    continue
                assert asked == [("query", h) for h in handles]
                if on == current:
                    assert (got, rest) == (-1, [])
                elif record_answer:
                    assert (got, rest) == (-2, [("record", event, current)])
                else:
                    assert rest == [("record", event, current), ("wait", consumer, event, 0)]
                    assert got == (-3 if wait_answer else -1)
    # the legacy default stream (a null handle) is recorded on as such
    calls = []
    record = record_t(lambda e, s: calls.append(s) or 0)
    wait = wait_t(lambda s, e, f: 0)
    query = query_t(lambda h: 0)
    assert (
        order(
            ctypes.cast(query, p),
            None,
            0,
            ctypes.cast(record, p),
            ctypes.cast(wait, p),
            event,
            None,
            consumer,
        )
        == -1
    )
    assert calls == [None]
