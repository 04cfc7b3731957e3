"""The CPU kernel's decode times as built from several versions of its source, with chosen compiler flags.

Builds ``torch_side/kernels/cpu_4bit.c`` (with the library's other sources, as the working tree has them) as
each ``--revs`` git revision (``WORKTREE``: the working tree) has it, with ``_build_c.FLAGS`` less
``-march=native`` plus ``--flags`` (default ``-mno-avx512f``: a plain build, for CPUs with neither AVX-512 nor
AVX2, such as arm64 machines; ``-march=native`` for this CPU's vector paths), then times, in one process with the
builds alternating over ``--rounds`` rounds, each build's ``dequantize_4bit_native`` of a plain NF4 weight of
4096x4096 and ``torch_side.dequantize_fp8`` of an e4m3 2048x7168 weight with 128x128 scales, to bfloat16 and
float16 (median ms of 7 calls after one). A compiler's vectorization of a loop can come and go with a
change next to it (2f78848 made the FP8 loop 4x slower on AVX2): this shows it.

    python benchmarks/cpu_kernel_builds.py --revs 6bfd9d6 WORKTREE [--flags -march=native] [--rounds 3]
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--revs", nargs="+", default=["HEAD", "WORKTREE"])
    parser.add_argument("--flags", nargs="*", default=["-mno-avx512f"])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    import torch

    import torch_side
    from torch_side import _build_c, _native
    from torch_side._nf4 import dequantize_4bit_native
    from torch_side._plans import NF4_PLANS

    flags = [f for f in _build_c.FLAGS if f != "-march=native"] + args.flags
    libraries = {}
    with tempfile.TemporaryDirectory(prefix="qbridge-builds-") as tmp:
        for rev in args.revs:
            folder = pathlib.Path(tmp) / rev
            folder.mkdir()
            for source in _native.SOURCES:
                if rev == "WORKTREE" or source != _native.SOURCE:
                    text = source.read_text()
                else:
                    show = ["git", "-C", str(ROOT), "show", f"{rev}:torch_side/kernels/cpu_4bit.c"]
                    text = subprocess.run(show, check=True, capture_output=True, text=True).stdout
                (folder / source.name).write_text(text)
            target = folder / "kernel.so"
            sources = [str(folder / source.name) for source in _native.SOURCES]
            subprocess.run([*_build_c.compiler(), *flags, *sources, "-o", str(target)], check=True)
            libraries[rev] = _native.load(target, planned=False)  # earlier revisions lack plans' entry
        gen = torch.Generator().manual_seed(0)
        n = 4096 * 4096
        packed = torch.randint(0, 256, (n // 2,), dtype=torch.uint8, generator=gen)
        absmax = torch.rand(n // 64, generator=gen) + 0.5
        code = torch.tensor(torch_side.NF4_CODE, dtype=torch.float32)
        W = (torch.randn(2048, 7168, generator=gen) * 50).to(torch.float8_e4m3fn)
        S = torch.rand(16, 56, generator=gen) + 0.5
        calls = {
            "nf4 4096x4096 bf16": lambda: dequantize_4bit_native(packed, absmax, code, 64, n, torch.bfloat16),
            "nf4 4096x4096 f16": lambda: dequantize_4bit_native(packed, absmax, code, 64, n, torch.float16),
            "fp8 2048x7168 bf16": lambda: torch_side.dequantize_fp8(W, S, torch.bfloat16),
            "fp8 2048x7168 f16": lambda: torch_side.dequantize_fp8(W, S, torch.float16),
        }
        times: dict[tuple[str, str], list[float]] = {}
        saved = _native._FN, _native._FP8, _native._FN_T
        try:
            for _ in range(args.rounds):
                for rev, (fn, fp8, fn_t, *_) in libraries.items():
                    _native._FN, _native._FP8, _native._FN_T = fn, fp8, fn_t
                    NF4_PLANS.clear()
                    for name, call in calls.items():
                        call()
                        ts = []
                        for _ in range(7):
                            t0 = time.perf_counter()
                            call()
                            ts.append(time.perf_counter() - t0)
                        times.setdefault((rev, name), []).append(statistics.median(ts) * 1e3)
        finally:
            _native._FN, _native._FP8, _native._FN_T = saved
    print(
        f"flags: {' '.join(flags)}; torch {torch.__version__} ({torch.get_num_threads()} threads); median ms per round"
    )
    for name in calls:
        for rev in args.revs:
            print(f"{name:20s} {rev:10s} " + " ".join(f"{t:8.2f}" for t in times[(rev, name)]))


if __name__ == "__main__":
    main()
