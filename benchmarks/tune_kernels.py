"""Tile and warp choices for the Triton kernels, measured on the current GPU (median CUDA-event times).

    python benchmarks/tune_kernels.py
Prints, per kernel and shape, each configuration's time and percent of the copy ceiling; the chosen
constants live in torch_side/_triton.py.
"""

from __future__ import annotations

import itertools
import math

import torch
import triton.testing

import torch_side
import torch_side._triton as T
from qbridge._bench import copy_ceiling


def _do_bench(fn):
    """GPU time alone: the calls are captured in a CUDA graph and replayed (median ms)."""
    return float(triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median"))


def _nf4(shape, transpose):
    import bitsandbytes.functional as F

    w = torch.randn(shape, device="cuda", dtype=torch.bfloat16)
    packed, qs = F.quantize_4bit(w, quant_type="nf4", compress_statistics=True)
    n = math.prod(shape)
    nbytes = n // 2 + n // 64 + 2 * n

    def run():
        return torch_side.dequantize_nf4(
            packed, qs.absmax, shape=shape, nested_absmax=qs.state2.absmax, nested_code=qs.state2.code,
            offset=qs.offset, transpose=transpose, backend="triton",
        )  # fmt: skip

    return run, nbytes


def _fp8(shape, transpose):
    w = (torch.randn(shape, device="cuda") * 64).to(torch.float8_e4m3fn)
    s = torch.rand((shape[0] + 127) // 128, (shape[1] + 127) // 128, device="cuda")
    return (lambda: torch_side.dequantize_fp8(w, s, transpose=transpose, backend="triton")), 3 * math.prod(
        shape
    )


def main():
    ceiling = copy_ceiling()
    print(f"{torch.cuda.get_device_name()}: copy ceiling {ceiling / 1e12:.2f} TB/s")
    for shape in [(8192, 8192), (14336, 4096), (576, 7168)]:
        run, nbytes = _nf4(shape, False)
        for block, warps in itertools.product([2048, 4096, 8192], [4, 8]):
            T.NF4_ROWS_BLOCK, T.NF4_ROWS_WARPS = block, warps
            ms = _do_bench(run)
            print(
                f"nf4 rows {shape} block={block} warps={warps}: {ms * 1e3:.1f} us {100 * nbytes / ms / 1e-3 / ceiling:.0f}%"
            )
        T.NF4_ROWS_BLOCK, T.NF4_ROWS_WARPS = 4096, 4
        run, nbytes = _nf4(shape, True)
        for tile, warps in itertools.product([(64, 32), (128, 32), (256, 32)], [4, 8]):
            T.NF4_T_TILE, T.NF4_T_WARPS = tile, warps
            ms = _do_bench(run)
            print(
                f"nf4 transposed {shape} tile={tile} warps={warps}: {ms * 1e3:.1f} us {100 * nbytes / ms / 1e-3 / ceiling:.0f}%"
            )
        T.NF4_T_TILE, T.NF4_T_WARPS = (128, 32), 4
    for shape in [(8192, 8192), (18432, 7168), (576, 7168)]:
        for transpose in (False, True):
            run, nbytes = _fp8(shape, transpose)
            tiles = (
                [(64, 64), (128, 64), (64, 128), (128, 128)]
                if transpose
                else [(32, 128), (64, 128), (128, 128)]
            )
            for tile, warps in itertools.product(tiles, [4, 8]):
                if transpose:
                    T.FP8_T_TILE, T.FP8_T_WARPS = tile, warps
                else:
                    T.FP8_TILE, T.FP8_WARPS = tile, warps
                ms = _do_bench(run)
                print(
                    f"fp8 {'transposed ' if transpose else ''}{shape} tile={tile} warps={warps}: {ms * 1e3:.1f} us {100 * nbytes / ms / 1e-3 / ceiling:.0f}%"
                )
            T.FP8_TILE, T.FP8_T_TILE, T.FP8_WARPS, T.FP8_T_WARPS = (64, 128), (128, 128), 4, 8


if __name__ == "__main__":
    main()
