"""Fixtures made by the real producers (bitsandbytes, torchao) and the references they are checked against."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch

DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def bnb_quantize(
    shape: tuple[int, ...],
    *,
    blocksize: int = 64,
    quant_type: str = "nf4",
    nested: bool = True,
    dtype: torch.dtype = torch.bfloat16,
    seed: int = 0,
    device: str = "cpu",
    scale: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, Any]:
    """A random weight quantized by bitsandbytes itself: (weight, packed [ceil(n/2), 1], QuantState)."""
    F = pytest.importorskip("bitsandbytes.functional")
    gen = torch.Generator().manual_seed(seed)
    w = (torch.randn(shape, generator=gen) * scale).to(dtype).to(device)
    packed, qs = F.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type, compress_statistics=nested)
    return w, packed, qs


def cuda_code(quant_type: str) -> torch.Tensor:
    """bitsandbytes' table as its CUDA kernel applies it: FP4 nibble 0b1000 is -0.0 there, +0.0 in the table."""
    F = pytest.importorskip("bitsandbytes.functional")
    code = F.get_4bit_type(quant_type, device="cpu").clone()
    if quant_type == "fp4":
        code[8] = -0.0
    return code


def flush(x: torch.Tensor) -> torch.Tensor:
    """float32 values below FLT_MIN as zeros of their sign: bitsandbytes' CUDA kernels flush denormals."""
    tiny = x.abs() < torch.finfo(torch.float32).tiny
    return torch.where(tiny, x * 0.0, x)


def bnb_reference(packed: torch.Tensor, qs: Any) -> torch.Tensor:
    """bitsandbytes' own pure-torch reference, run on the CPU, made to act as its CUDA kernels do: FP4's
    zero with the sign bit is -0.0 (see cuda_code) and float32 results below FLT_MIN flush to zero.

    The uncompiled functions behind ``bitsandbytes.backends.default.ops``: nested absmax decoded by
    ``dequantize_blockwise`` then ``+ offset``, then ``code[q] * absmax`` in float32, one rounding.
    """
    pytest.importorskip("bitsandbytes.functional")
    from bitsandbytes.backends.default import ops

    absmax = qs.absmax.cpu()
    if qs.nested:
        absmax = flush(ops._dequantize_blockwise_compute.__wrapped__(
            absmax, qs.state2.absmax.cpu(), qs.state2.code.cpu(), qs.state2.blocksize, torch.float32
        ))  # fmt: skip
        absmax = flush(absmax + qs.offset.cpu())
    code = cuda_code(qs.quant_type)
    flat = (
        packed.cpu().reshape(-1).view(torch.uint8)
        if packed.dtype != torch.uint8
        else packed.cpu().reshape(-1)
    )
    out = ops._dequantize_4bit_compute.__wrapped__(
        flat, absmax, code, qs.blocksize, list(qs.shape), torch.float32
    )
    return flush(out).to(qs.dtype).reshape(qs.shape)


def as_bnb_returns(ref: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """bitsandbytes transposes a 2-D result whenever the packed weight is [1, k] (its ``W.t()`` convention)."""
    return ref.t() if packed.dim() == 2 and packed.shape[0] == 1 and ref.dim() == 2 else ref


def legacy_list(qs: Any) -> list[Any]:
    """The same state in the list layout of bitsandbytes <= 0.41 (its quantize_4bit / quantize_blockwise)."""
    compressed = None
    if qs.nested:
        s2 = qs.state2
        compressed = [qs.offset, [s2.absmax, s2.code, s2.blocksize, False, torch.float32, None, None]]
    return [qs.absmax, qs.shape, qs.dtype, qs.blocksize, compressed, qs.quant_type, qs.code]


def fp8_reference_loops(
    w: torch.Tensor, scale: torch.Tensor, block: tuple[int, int], dtype: torch.dtype
) -> torch.Tensor:
    """A float32 reference written tile by tile, independent of the library's vectorized code."""
    wf = w.cpu().to(torch.float32)
    s = (
        scale.cpu()
        .to(torch.float32)
        .reshape(math.ceil(w.shape[0] / block[0]), math.ceil(w.shape[1] / block[1]))
    )
    out = torch.empty_like(wf)
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            rows = slice(i * block[0], (i + 1) * block[0])
            cols = slice(j * block[1], (j + 1) * block[1])
            out[rows, cols] = wf[rows, cols] * s[i, j]
    return out.to(dtype)


def random_fp8(
    shape: tuple[int, ...], *, seed: int = 0, dtype: torch.dtype = torch.float8_e4m3fn
) -> torch.Tensor:
    """Random FP8 values spread over the format's range (never zeros only)."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen) * 64).to(dtype)


def random_scales(shape: tuple[int, ...], *, seed: int = 1) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=gen) * 1e-2 + 1e-4


def assert_bitwise_equal(got: torch.Tensor, want: torch.Tensor) -> None:
    """Equal shape, dtype and bits (signed zeros included). NaNs must sit at the same places; their
    payloads are not compared: GPUs and CPUs canonicalize them differently."""
    assert got.shape == want.shape, f"shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert got.dtype == want.dtype, f"dtype {got.dtype} != {want.dtype}"
    g, w = got.detach().cpu().contiguous(), want.detach().cpu().contiguous()
    bits = {2: torch.int16, 4: torch.int32, 1: torch.uint8, 8: torch.int64}[g.element_size()]
    differ = g.view(bits) != w.view(bits)
    if g.is_floating_point():
        g_nan, w_nan = torch.isnan(g), torch.isnan(w)
        assert torch.equal(g_nan, w_nan), f"NaN at {int((g_nan != w_nan).sum())} differing places"
        differ &= ~g_nan
    diff = int(differ.sum())
    assert diff == 0, f"{diff} of {g.numel()} elements differ in their bits"


def to_numpy(t: torch.Tensor):
    """A torch tensor's values as a numpy array with the same bits (bf16 and float8 through ml_dtypes)."""
    import ml_dtypes
    import numpy as np

    t = t.detach().cpu().contiguous()
    special = {
        torch.bfloat16: (torch.int16, ml_dtypes.bfloat16),
        torch.float8_e4m3fn: (torch.uint8, ml_dtypes.float8_e4m3fn),
        torch.float8_e5m2: (torch.uint8, ml_dtypes.float8_e5m2),
    }
    if t.dtype in special:
        carrier, target = special[t.dtype]
        return t.view(carrier).numpy().view(target)
    return np.asarray(t.numpy())


def jnp_dtype(dtype: torch.dtype):
    import jax.numpy as jnp

    return {torch.bfloat16: jnp.bfloat16, torch.float16: jnp.float16, torch.float32: jnp.float32}[dtype]


def assert_same_bits(got, want) -> None:
    """numpy/JAX arrays: equal shape, dtype and bits (NaN payloads aside, as in assert_bitwise_equal)."""
    import numpy as np

    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape, f"shape {got.shape} != {want.shape}"
    assert got.dtype == want.dtype, f"dtype {got.dtype} != {want.dtype}"
    g = got.reshape(-1).view(f"u{got.dtype.itemsize}")
    w = want.reshape(-1).view(f"u{want.dtype.itemsize}")
    differ = g != w
    if np.issubdtype(got.dtype, np.floating) or got.dtype.kind == "V" or "float" in str(got.dtype):
        g_nan = np.isnan(got.reshape(-1).astype(np.float32))
        assert np.array_equal(g_nan, np.isnan(want.reshape(-1).astype(np.float32))), "NaN at differing places"
        differ &= ~g_nan
    diff = int(differ.sum())
    assert diff == 0, f"{diff} of {got.size} elements differ in their bits"


def assert_same_leaves(a, b, device=None) -> None:
    """Two pytrees of arrays: the same leaf paths, and leaf by leaf the same dtype, shape and bytes (NaN
    payloads included), each on ``device`` when one is given."""
    import jax
    import numpy as np

    a, b = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
    assert [path for path, _ in a] == [path for path, _ in b]
    for (path, x), (_, y) in zip(a, b, strict=True):
        assert device is None or x.devices() == {device}, path
        assert x.dtype == y.dtype and x.shape == y.shape, path
        np.testing.assert_array_equal(
            np.asarray(x).view(np.uint8), np.asarray(y).view(np.uint8), err_msg=str(path)
        )


def bnb_pieces(packed, qs):
    """The pieces a serialized bitsandbytes checkpoint holds, as numpy arrays."""
    kw = dict(
        shape=tuple(qs.shape), blocksize=qs.blocksize, quant_type=qs.quant_type, dtype=jnp_dtype(qs.dtype)
    )
    if qs.nested:
        d = qs.as_dict()
        kw.update(
            nested_absmax=to_numpy(d["nested_absmax"]),
            nested_code=to_numpy(d["nested_quant_map"]),
            nested_blocksize=d["nested_blocksize"],
            offset=d["nested_offset"],
        )
    return to_numpy(packed), to_numpy(qs.absmax), kw


def library_entry(entry: Any, without_compiler: str) -> Any:
    """``entry``, an entry point of torch_side's library asked for with ``wait=True`` (None where it did not
    load): returned where it loaded; else the test is skipped where no C compiler is here (saying
    ``without_compiler``), and fails where one is (the build failed)."""
    from torch_side import _native

    if entry is None:
        try:
            compiler = _native._compiler()
        except _native.BuildError:
            pytest.skip(without_compiler)
        pytest.fail(f"torch_side's library could not be built with {compiler} (see the warning it logged)")
    return entry
