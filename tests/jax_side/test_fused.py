"""The fused dequantize-matmul (``jax_side.quantized_matmul``) against expand-then-matmul in float32.

On the CPU the kernel runs through Pallas' interpreter (``matmul_path("interpret")``): the same kernel
code as on the GPU, the same tiles and masks. 4-bit pieces are made by bitsandbytes, FP8 values and scales
at random. The tolerance is float32 accumulation in another order, plus one rounding of the output to
its dtype.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import subprocess
import sys
import textwrap
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from helpers import assert_same_bits, bnb_quantize, random_fp8, random_scales, to_numpy
from jax.ad_checkpoint import print_saved_residuals

import jax_side
from jax_side import _casts, _fused, _mosaic
from jax_side._codes import dynamic_code, standard_code
from jax_side._quantized import from_pieces, meta_fields

pytest.importorskip("bitsandbytes")
nnx = pytest.importorskip("flax.nnx")

ROUNDING = {jnp.float32: 2e-6, jnp.bfloat16: 8e-3, jnp.float16: 1e-3}  # one rounding of the output, relative


@pytest.fixture(autouse=True)
def _on_jax_cpu_unless_gpu(request):
    """Tests without the gpu marker state CPU numerics (expand-then-matmul in float32 is exact there, where a
    GPU's default matmul precision rounds to TF32): they run on JAX's CPU device on any machine."""
    if request.node.get_closest_marker("gpu"):
        yield
        return
    with jax.default_device(jax.devices("cpu")[0]):
        yield


def nf4(shape, *, quant_type="nf4", nested=True, blocksize=64, dtype=torch.bfloat16, seed=0, storage=None):
    _, packed, qs = bnb_quantize(
        shape, quant_type=quant_type, nested=nested, blocksize=blocksize, dtype=dtype, seed=seed
    )
    kw = {}
    if qs.nested:
        d = qs.as_dict()
        kw = dict(nested_absmax=jnp.asarray(to_numpy(d["nested_absmax"])), nested_code=jnp.asarray(to_numpy(d["nested_quant_map"])),
                  offset=jnp.asarray(d["nested_offset"], jnp.float32), nested_blocksize=d["nested_blocksize"])  # fmt: skip
    packed = jnp.asarray(to_numpy(packed.reshape(-1)))
    if storage is not None:  # bitsandbytes' quant_storage: the same bytes held in wider elements
        packed = jax.lax.bitcast_convert_type(packed.reshape(-1, jnp.dtype(storage).itemsize), storage)
    return jax_side.NF4Weight(packed=packed, absmax=jnp.asarray(to_numpy(qs.absmax)), shape=tuple(shape),
                              blocksize=blocksize, quant_type=quant_type, dtype=jnp.dtype({torch.bfloat16: "bfloat16",
                              torch.float16: "float16", torch.float32: "float32"}[dtype]).name, **kw)  # fmt: skip


def fp8(shape, scale_shape, *, block=(128, 128), fmt=torch.float8_e4m3fn, seed=0):
    w = jnp.asarray(to_numpy(random_fp8(shape, seed=seed, dtype=fmt)))
    return jax_side.FP8Weight(
        w, jnp.asarray(to_numpy(random_scales(scale_shape, seed=seed + 1))), block=block
    )


def reference(x, w):
    """expand-then-matmul in float32: the weight as its dtype, then as x's dtype, products in float64."""
    dense = np.asarray(w.dequantize().astype(x.dtype).astype(jnp.float32), np.float64)
    return np.asarray(x.astype(jnp.float32), np.float64) @ dense.T


def assert_close(got, x, w):
    want = reference(x, w)
    assert got.dtype == x.dtype and got.shape == want.shape
    got = np.asarray(got.astype(jnp.float32), np.float64)
    scale = (
        np.abs(np.asarray(x.astype(jnp.float32), np.float64))
        @ np.abs(np.asarray(w.dequantize().astype(x.dtype).astype(jnp.float32), np.float64)).T
    )  # the size of the terms summed
    tol = ROUNDING[x.dtype.type] * np.abs(want) + 1e-6 * scale + 1e-30
    bad = np.abs(got - want) > tol
    assert not bad.any(), f"{bad.sum()} of {bad.size} outputs off; worst {np.abs(got - want).max()}"


def x_for(m, k, dtype, seed=0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal((m, k)), dtype)


WEIGHTS = {
    "nf4 nested, rows and columns past the tiles": lambda: nf4((70, 384)),
    "nf4 plain fp16 weight": lambda: nf4((33, 256), nested=False, dtype=torch.float16),
    "fp4 nested": lambda: nf4((48, 128), quant_type="fp4"),
    "nf4 blocksize 128, float32 weight": lambda: nf4((17, 640), blocksize=128, dtype=torch.float32),
    "nf4 blocksize 32, 3 groups": lambda: nf4((40, 96), blocksize=32),
    "nf4 bf16 quant_storage": lambda: nf4((64, 128), storage=jnp.bfloat16),
    "fp8 block 128, partial tiles": lambda: fp8((200, 300), (2, 3)),
    "fp8 e5m2 per-row": lambda: fp8((65, 129), (65, 1), fmt=torch.float8_e5m2),
    "fp8 per-tensor": lambda: fp8((40, 72), (1,)),
    "fp8 block 64x32": lambda: fp8((130, 100), (3, 4), block=(64, 32)),
    # a bfloat16/float16 checkpoint's weight in a float32 model: rounded to the checkpoint's dtype first
    "nf4 decoded through bfloat16 into float32": lambda: dataclasses.replace(
        nf4((70, 384)), dtype="float32", decode_dtype="bfloat16"
    ),
    "fp8 decoded through float16 into float32": lambda: dataclasses.replace(
        fp8((200, 300), (2, 3)), dtype="float32", decode_dtype="float16"
    ),
}


@pytest.mark.parametrize("name", list(WEIGHTS))
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
def test_kernel_equals_expand_then_matmul(name, dtype):
    w = WEIGHTS[name]()
    assert jax_side.fits_kernel(w) is None
    for m in (1, 19) if dtype == jnp.bfloat16 else (1, 3):
        x = x_for(m, w.shape[1], dtype, seed=m)
        with jax_side.matmul_path("interpret"):
            got = jax.jit(jax_side.quantized_matmul)(x, w)
        assert_close(got, x, w)


def test_fp8_steps_gather_no_scales_under_128_blocks():
    """Under 128x128 scale blocks the FP8 kernel's tiles take whole scale blocks at every row count of x:
    one scale per tile, or one per half of a 256-element step (up to 16 rows), and a pipelined loop; up to
    16 rows it once gathered a scale per element, unpipelined (0.79-1.0x the time per layer on an H200).
    Blocks the tiles cannot nest in keep per-element scales."""
    for m in (2, 16, 17, 128):
        t, scales = _fused._fp8_tiles(m, 4096, 14336, (128, 128))
        assert scales in (1, 2) and t.bk == 128 * scales and t.stages > 1, (m, t)
    t, scales = _fused._fp8_tiles(3, 200, 300, (128, 128))  # partial tiles along both sides
    assert scales == t.bk // 128
    t, scales = _fused._fp8_tiles(16, 130, 100, (64, 32))
    assert scales == 0 and t.stages == 1
    # above 64 rows, 64x128 output tiles where one scale still covers each (0.86-0.96x the time at 128 tokens)
    t, scales = _fused._fp8_tiles(128, 4096, 14336, (128, 128))
    assert (t.bm, t.bn, scales) == (64, 128, 1)
    t, scales = _fused._fp8_tiles(128, 4160, 256, (4160, 256))  # per tensor: 128-row tiles would not nest
    assert (t.bm, t.bn, scales) == (128, 64, 1)


def test_fp8_wide_tiles_above_64_rows_equal_expand_then_matmul():
    """70 rows of x take 64x128 output tiles: partial along x's rows, the weight's rows and its columns."""
    assert _fused._fp8_tiles(70, 200, 300, (128, 128))[0].bn == 128
    w = fp8((200, 300), (2, 3))
    x = x_for(70, 300, jnp.bfloat16, seed=6)
    with jax_side.matmul_path("interpret"):
        assert_close(jax.jit(lambda x, w: jax_side.quantized_matmul(x, w))(x, w), x, w)


@pytest.mark.parametrize("two_scales", [True, False])
def test_both_fp8_scale_loads_equal_expand_then_matmul(two_scales, monkeypatch):
    """Up to 16 rows under 128x128 blocks: two scales per 256-element step, and a scale per element (the
    rule for blocks the tiles do not nest in), on partial tiles, through the interpreter."""
    monkeypatch.setattr(_fused, "_fp8_two_scales", two_scales)
    w = fp8((200, 300), (2, 3))
    x = x_for(3, 300, jnp.bfloat16, seed=5)
    with jax_side.matmul_path("interpret"):  # a function of its own: the setting is not in jit's cache key
        assert_close(jax.jit(lambda x, w: jax_side.quantized_matmul(x, w))(x, w), x, w)


def test_a_jax_without_the_kernels_lowering_expands(monkeypatch):
    """JAX 0.11 deprecated Pallas' Triton lowering, which the kernel is written for. Where a JAX lacks it,
    kept layers expand their weights with one warning (the GPU branch is traced on every platform, so
    without this every kept matmul of more than one row failed), one row keeps the XLA reduction, and
    ``"interpret"`` says why it cannot run."""
    monkeypatch.setitem(sys.modules, _fused._TRITON_LOWERING, None)  # as if it did not exist
    _fused._kernel_unavailable.cache_clear()
    _fused._warn_expanding.cache_clear()
    try:
        w = WEIGHTS["nf4 nested, rows and columns past the tiles"]()
        for m in (1, 3):
            x = x_for(m, w.shape[1], jnp.bfloat16, seed=m)
            with (
                pytest.warns(RuntimeWarning, match="expanded before multiplying") if m > 1 else _no_warning()
            ):
                got = jax.jit(lambda x, w: jax_side.quantized_matmul(x, w))(x, w)
            assert_close(got, x, w)
        with jax_side.matmul_path("interpret"), pytest.raises(ValueError, match="cannot be built: this JAX"):
            jax.jit(lambda x, w: jax_side.quantized_matmul(x, w))(x_for(3, w.shape[1], jnp.float32), w)
    finally:
        _fused._kernel_unavailable.cache_clear()
        _fused._warn_expanding.cache_clear()


@contextlib.contextmanager
def _no_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        yield


@pytest.mark.parametrize("fmt", ["nf4", "fp8"])
def test_which_kernel_each_row_count_takes(fmt):
    """One row of x: a product and a sum that XLA compiles into one reduction (no Pallas kernel); more rows:
    the tensor-core kernel."""
    w = nf4((64, 128)) if fmt == "nf4" else fp8((64, 128), (1, 1))
    for m, names in ((1, set()), (5, {f"qbridge_{fmt}_matmul"}), (40, {f"qbridge_{fmt}_matmul"})):
        with jax_side.matmul_path("interpret"):
            jaxpr = str(jax.make_jaxpr(jax_side.quantized_matmul)(x_for(m, 128, jnp.bfloat16), w))
        assert set(re.findall(r"qbridge_\w+", jaxpr)) == names, m
        assert ("pallas_call" in jaxpr) == bool(names), m


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_exact_widening_of_every_value(dtype):
    """The one-row form widens with bit operations (XLA may drop a conversion pair, and with it a rounding):
    every bfloat16 and float16 value, subnormals, infinities and signed zeros included, gives the float32
    that a conversion gives; NaNs stay NaN."""
    v = jax.lax.bitcast_convert_type(jnp.arange(65536, dtype=jnp.uint32).astype(jnp.uint16), dtype)
    want = np.asarray(v.astype(jnp.float32))
    got = np.asarray(jax.jit(_casts.exact_f32)(v))
    nan = np.isnan(want)
    assert np.isnan(got[nan]).all()
    np.testing.assert_array_equal(got[~nan].view(np.uint32), want[~nan].view(np.uint32))


@pytest.mark.parametrize("path", ["auto", "interpret"])
def test_one_row_of_other_dtypes_and_strict_settings(path):
    """One row of x in a dtype the one-row form does not round to (float8, float64) takes the kernel as
    before; jitted under "auto" the CUDA branch is traced on every machine, so nothing in it may fail to
    trace. NF4 and FP8 weights, rank promotion "raise" and jax_debug_nans (no NaN made along the way)."""
    for w in (nf4((64, 128)), fp8((64, 128), (1, 1))):
        with jax_side.matmul_path(path):
            x8 = x_for(1, 128, jnp.float8_e4m3fn, seed=2)
            got = jax.jit(jax_side.quantized_matmul)(x8, w)
            assert got.dtype == x8.dtype and got.shape == (1, 64)
            if path == "interpret":
                assert "pallas_call" in str(jax.make_jaxpr(jax_side.quantized_matmul)(x8, w))
            with jax.numpy_rank_promotion("raise"):
                for dtype in (jnp.bfloat16, jnp.float16, jnp.float32):
                    x = x_for(1, 128, dtype, seed=3)
                    assert_close(jax.jit(jax_side.quantized_matmul)(x, w), x, w)
            jax.config.update("jax_debug_nans", True)
            try:
                x = x_for(1, 128, jnp.float16, seed=3)
                assert_close(jax_side.quantized_matmul(x, w), x, w)
            finally:
                jax.config.update("jax_debug_nans", False)
            jax.config.update("jax_enable_x64", True)
            try:
                x64 = jnp.asarray(np.random.default_rng(5).standard_normal((1, 128)), jnp.float64)
                y = jax.jit(jax_side.quantized_matmul)(x64, w)
                want = np.asarray(x64) @ np.asarray(w.dequantize(dtype=jnp.float32), np.float64).T
                assert y.dtype == jnp.float64 and y.shape == (1, 64)
                np.testing.assert_allclose(np.asarray(y), want, rtol=1e-5, atol=1e-5)
            finally:
                jax.config.update("jax_enable_x64", False)


def test_vmap_over_single_rows():
    """``jax.vmap`` over rows of x, one each, against one weight multiplies them together through the
    kernel (a batched one-row reduction would decode the weight once per row, and XLA then materializes
    it); over stacked weights too, each row meets its own weight. Gradients under vmap."""
    for w in (nf4((64, 128)), fp8((64, 128), (1, 1))):
        xb = x_for(6, 128, jnp.float32, seed=7).reshape(6, 1, 128)
        with jax_side.matmul_path("interpret"):
            f = jax.vmap(jax_side.quantized_matmul, in_axes=(0, None))
            assert "pallas_call" in str(jax.make_jaxpr(f)(xb, w))
            got = jax.jit(f)(xb, w)
            grads = jax.jit(
                jax.vmap(jax.grad(lambda x, w: jax_side.quantized_matmul(x, w).sum()), (0, None))
            )(xb, w)
            one = jax.jit(f)(xb[:1], w)  # a batch of one: the one-row form
            assert "pallas_call" not in str(jax.make_jaxpr(f)(xb[:1], w))
            stacked = jax.tree_util.tree_map(lambda a: jnp.stack([a, a]), w)
            two = jax.jit(jax.vmap(jax_side.quantized_matmul))(xb[:2], stacked)
        dense = np.asarray(w.dequantize(dtype=jnp.float32), np.float64)
        want = np.asarray(xb, np.float64) @ dense.T
        for y, ref in ((got, want), (one, want[:1]), (two, want[:2])):
            np.testing.assert_allclose(np.asarray(y, np.float64), ref, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.asarray(grads, np.float64), np.broadcast_to(dense.sum(0), (6, 1, 128)),
                                   rtol=1e-5, atol=1e-5)  # fmt: skip
        for path in ("interpret", "auto"):  # "auto": jit traces the CUDA branch on every machine
            with jax_side.matmul_path(path):
                # a cond with a batched predicate batches every operand, the 4-bit table included
                def pick(x, p, w):
                    return jax.lax.cond(
                        p, jax_side.quantized_matmul, lambda x, w: -jax_side.quantized_matmul(x, w), x, w
                    )

                signs = np.array([1.0, -1.0, 1.0, -1.0, 1.0, -1.0])[:, None, None]
                picked = jax.jit(jax.vmap(pick, in_axes=(0, 0, None)))(xb, jnp.asarray(signs[:, 0, 0] > 0), w)
                np.testing.assert_allclose(np.asarray(picked, np.float64), signs * want, rtol=1e-5, atol=1e-5)
                empty = jax.jit(f)(xb[:0], w)
                assert empty.shape == (0, 1, 64) and empty.dtype == xb.dtype
                # vmap of vmap whose inner batch is one row: the outer batch still reaches the kernel
                nested = jax.vmap(f, in_axes=(0, None))
                got2 = jax.jit(nested)(xb.reshape(6, 1, 1, 128), w)
                np.testing.assert_allclose(np.asarray(got2, np.float64).reshape(6, 64), want.reshape(6, 64),
                                           rtol=1e-5, atol=1e-5)  # fmt: skip
                if path == "interpret":
                    assert "pallas_call" in str(jax.make_jaxpr(nested)(xb.reshape(6, 1, 1, 128), w))


def test_cast_exactly_keeps_the_rounding():
    """A value rounded to bfloat16 or float16 and then used in float32 stays rounded (the expansion and the
    embedding tables cast so): XLA drops such a pair of conversions inside a reduction (off by about 0.6
    here without the bit widening)."""
    rng = np.random.default_rng(8)
    v = jnp.asarray(rng.standard_normal((64, 4096)) * 3, jnp.float32)
    x = jnp.asarray(rng.standard_normal(4096), jnp.float32)
    for narrow in (jnp.bfloat16, jnp.float16):
        want = np.asarray(v.astype(narrow).astype(jnp.float32), np.float64) @ np.asarray(x, np.float64)
        got = jax.jit(
            lambda v, x, n=narrow: jnp.sum(_casts.cast_exactly(v.astype(n), jnp.float32) * x, axis=1)
        )(v, x)
        assert np.abs(np.asarray(got, np.float64) - want).max() < 1e-2
    assert _casts.cast_exactly(v, jnp.float32) is v


def test_one_row_rounds_the_weight_and_x():
    """The one-row form rounds the decoded weight to its dtype and then to x's dtype, and takes x as
    rounded: its float32 sums equal the float64 sums of those rounded products, up to float32 accumulation."""
    w = nf4((48, 256), dtype=torch.float32)
    for wdtype, xdtype in (("float32", jnp.bfloat16), ("float32", jnp.float16), ("bfloat16", jnp.float16),
                           ("bfloat16", jnp.float32), ("float16", jnp.float32)):  # fmt: skip
        ww = dataclasses.replace(w, dtype=wdtype)
        x32 = x_for(1, 256, jnp.float32, seed=4)
        xr = np.asarray(x32.astype(xdtype).astype(jnp.float32), np.float64)
        dense = np.asarray(ww.dequantize().astype(xdtype).astype(jnp.float32), np.float64)
        want = (xr @ dense.T)[0]
        # x rounded inside the same program (a conversion pair XLA could drop), as a caller's x often is
        got = np.asarray(
            jax.jit(lambda x, w, dt=xdtype: _fused._one_row_sums(x.astype(dt), w))(x32, ww), np.float64
        )
        tol = 1e-5 * (np.abs(xr) @ np.abs(dense).T)[0]
        unrounded = (np.asarray(x32, np.float64) @ np.asarray(w.dequantize(), np.float64).T)[
            0
        ]  # float32 weight
        assert (np.abs(unrounded - want) > 3 * tol).any(), (wdtype, xdtype)  # the roundings matter here
        assert (np.abs(got - want) <= tol).all(), (wdtype, xdtype, np.abs(got - want).max())


@pytest.mark.parametrize("decode", ["bfloat16", "float16"])
@pytest.mark.parametrize("fmt", ["nf4", "fp8"])
def test_decode_dtype_rounds_first_on_every_path(fmt, decode):
    """A weight used in float32 whose checkpoint decodes to bfloat16 or float16 (``decode_dtype``) gives the
    checkpoint's decode widened, on every path: dequantize bit for bit, the expansion, the kernel, the
    one-row form, vmapped single rows and the gradient to x; the rounding moves these sums far more than
    float32 accumulation does."""
    base = nf4((64, 256), dtype=torch.float32) if fmt == "nf4" else fp8((64, 256), (1, 2))
    w = dataclasses.replace(base, dtype="float32", decode_dtype=decode)
    assert w.roundings == (jnp.dtype(decode), jnp.dtype(jnp.float32))
    narrow = dataclasses.replace(base, dtype=decode).dequantize()  # the checkpoint's own decode
    dense = np.asarray(narrow.astype(jnp.float32), np.float64)
    assert_same_bits(w.dequantize(), narrow.astype(jnp.float32))
    assert_same_bits(w.dequantize(dtype=jnp.float16), narrow.astype(jnp.float32).astype(jnp.float16))
    unrounded = np.asarray(dataclasses.replace(base, dtype="float32").dequantize(), np.float64)
    x = x_for(19, 256, jnp.float32, seed=3)
    want = np.asarray(x, np.float64) @ dense.T
    tol = 1e-5 * (np.abs(np.asarray(x, np.float64)) @ np.abs(dense).T)
    assert (np.abs(np.asarray(x, np.float64) @ unrounded.T - want) > 5 * tol).any()  # the rounding shows
    for path in ("expand", "interpret"):
        with jax_side.matmul_path(path):
            for m in (1, 5, 19):
                got = np.asarray(jax.jit(jax_side.quantized_matmul)(x[:m], w), np.float64)
                assert (np.abs(got - want[:m]) <= tol[:m]).all(), (path, m, np.abs(got - want[:m]).max())
            rows = jax.jit(jax.vmap(jax_side.quantized_matmul, (0, None)))(x[:6, None], w)
            assert (np.abs(np.asarray(rows, np.float64)[:, 0] - want[:6]) <= tol[:6]).all(), path
            grad = jax.jit(jax.grad(lambda x, w: jax_side.quantized_matmul(x, w).sum()))(x[:3], w)
            np.testing.assert_allclose(np.asarray(grad, np.float64), np.broadcast_to(dense.sum(0), (3, 256)),
                                       rtol=1e-5, atol=1e-5)  # fmt: skip
    with pytest.raises(ValueError, match=r"decode_dtype='int8'.*bfloat16, float16 or float32"):
        dataclasses.replace(w, decode_dtype="int8").dequantize()
    # the fields' record (Orbax files) names dtypes given as JAX types, and reads back the same weight
    typed = dataclasses.replace(w, dtype=jnp.float32, decode_dtype=getattr(jnp, decode))
    fields = meta_fields(typed)
    assert (fields["dtype"], fields["decode_dtype"]) == ("float32", decode)
    pieces = {
        f.name: getattr(typed, f.name)
        for f in dataclasses.fields(typed)
        if f.name not in fields and f.name != "shape"
    }
    again = from_pieces(type(typed).__name__, pieces, fields)
    assert again.roundings == w.roundings and "decode_dtype" not in meta_fields(base)
    with jax_side.matmul_path("interpret"), pytest.raises(ValueError, match="decode_dtype"):
        jax_side.quantized_matmul(x, dataclasses.replace(w, decode_dtype="float64"))


def test_many_tokens_split_and_leading_dimensions():
    w = nf4((96, 512))
    x = jnp.asarray(
        np.random.default_rng(3).standard_normal((2, 40, 512)), jnp.bfloat16
    )  # 80 rows: bm 64, 2 blocks
    with jax_side.matmul_path("interpret"):
        got = jax.jit(jax_side.quantized_matmul)(x, w)
    assert got.shape == (2, 40, 96)
    assert_close(got.reshape(80, 96), x.reshape(80, 512), w)
    with jax_side.matmul_path("interpret"):  # a split along the contraction (few output tiles, many steps)
        _fused._tiles_override = lambda m, n, k, step, gathers: _fused._Tiles(16, 32, max(step, 128), 3, 4, 1)
        try:
            split = jax.jit(jax_side.quantized_matmul)(x[0, :5], w)
        finally:
            _fused._tiles_override = None
    assert_close(split, x[0, :5], w)


def test_the_path_switch():
    w = nf4((32, 128))
    x = x_for(2, 128, jnp.float32)

    def has_kernel(path):
        with jax_side.matmul_path(path):
            return "pallas_call" in str(jax.make_jaxpr(jax_side.quantized_matmul)(x, w))

    assert jax_side.get_matmul_path() == "auto"
    assert has_kernel("interpret") and has_kernel("auto") and not has_kernel("expand")
    # "auto" compiles the kernel only for CUDA: on this CPU the expansion runs, with the same result
    with jax_side.matmul_path("auto"):
        auto = jax.jit(jax_side.quantized_matmul)(x, w)
    with jax_side.matmul_path("expand"):
        expand = jax.jit(jax_side.quantized_matmul)(x, w)
    np.testing.assert_array_equal(np.asarray(auto), np.asarray(expand))
    # one jitted function, traced again under each path (the path is part of jit's cache key)
    traced = []
    f = jax.jit(lambda x, w: (traced.append(jax_side.get_matmul_path()), jax_side.quantized_matmul(x, w))[1])
    for path in ("expand", "interpret", "expand"):
        with jax_side.matmul_path(path):
            f(x, w)
    assert traced == ["expand", "interpret"]
    jax_side.set_matmul_path("expand")
    try:
        assert jax_side.get_matmul_path() == "expand"
        with jax_side.matmul_path("interpret"):
            assert jax_side.get_matmul_path() == "interpret"
        assert not has_kernel("expand")
    finally:
        jax_side.set_matmul_path("auto")
    with pytest.raises(ValueError, match="matmul path must be one of"):
        jax_side.set_matmul_path("fast")
    code = "import jax_side; print(jax_side.get_matmul_path())"
    env = dict(os.environ, QBRIDGE_MATMUL="expand", JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "expand"
    env["QBRIDGE_MATMUL"] = ""  # `export QBRIDGE_MATMUL=`: as if unset
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "auto"
    env["QBRIDGE_MATMUL"] = "quick"
    code = "import jax_side; jax_side.get_matmul_path()"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode != 0 and "QBRIDGE_MATMUL" in out.stderr


def test_a_kept_layers_weight_variable_is_taken_as_its_weight():
    """quantized_matmul(s) take a kept layer's .weight (an nnx Variable) as fits_kernel does: the same bits."""
    w, v = nf4((8, 128)), fp8((24, 128), (1, 1))
    layers = [jax_side.QuantLinear(q, None, rngs=nnx.Rngs(0)) for q in (w, v)]
    x = x_for(3, 128, jnp.float32)
    assert_same_bits(jax_side.quantized_matmul(x, layers[0].weight), jax_side.quantized_matmul(x, w))
    got = jax.jit(lambda x: jax_side.quantized_matmuls(x, [layers[0].weight, v]))(x)
    for y, want in zip(got, jax.jit(lambda x: jax_side.quantized_matmuls(x, [w, v]))(x)):
        assert_same_bits(y, want)
    with pytest.raises(
        TypeError, match=r"sequence of weights, got QuantizedVariable \(one weight: quantized_matmul"
    ):
        jax_side.quantized_matmuls(x, layers[1].weight)
    with pytest.raises(
        TypeError,
        match=r"quantized_matmul takes an NF4Weight or FP8Weight \(or an nnx Variable holding one\), got Param",
    ):
        jax_side.quantized_matmul(x, nnx.Param(jnp.ones((8, 128))))


def test_weights_the_kernel_does_not_take():
    crossing = nf4((5, 100))  # in=100: absmax blocks of 64 run across rows
    assert "not a multiple of the blocksize" in jax_side.fits_kernel(crossing)
    stacked = fp8((2, 64, 128), (2, 1, 1))
    assert "3-D" in jax_side.fits_kernel(stacked)
    layer = jax_side.QuantLinear(crossing, None, rngs=nnx.Rngs(0))  # a kept layer's weight: an nnx Variable
    assert "not a multiple of the blocksize" in jax_side.fits_kernel(layer.weight)
    assert jax_side.fits_kernel(jax_side.QuantLinear(nf4((8, 128)), None, rngs=nnx.Rngs(0)).weight) is None
    with pytest.raises(TypeError, match="fits_kernel takes an NF4Weight or FP8Weight"):
        jax_side.fits_kernel(jnp.ones((5, 100)))
    x = x_for(3, 100, jnp.float32)
    with jax_side.matmul_path("auto"):  # falls back to expand-then-matmul
        assert_close(jax.jit(jax_side.quantized_matmul)(x, crossing), x, crossing)
    with (
        jax_side.matmul_path("interpret"),
        pytest.raises(ValueError, match=r"does not take this weight: in=100 .*use matmul_path\('auto'\)"),
    ):
        jax_side.quantized_matmul(x, crossing)
    with pytest.raises(ValueError, match="x has 99 features"):
        jax_side.quantized_matmul(x[:, :99], crossing)
    with pytest.raises(ValueError, match=r"2-D \[out, in\] weight, got shape \(2, 64, 128\)"):
        jax_side.quantized_matmul(x_for(2, 128, jnp.float32), stacked)
    with pytest.raises(
        TypeError, match=r"takes an NF4Weight or FP8Weight \(or an nnx Variable holding one\), got ArrayImpl"
    ):
        jax_side.quantized_matmul(x, jnp.ones((5, 100)))
    with pytest.raises(TypeError, match="x must be a floating-point array"):
        jax_side.quantized_matmul(jnp.ones((3, 100), jnp.int32), crossing)
    with pytest.raises(TypeError, match="x must be a floating-point array"):
        jax_side.quantized_matmul([[1.0] * 100], crossing)
    for path in ("auto", "interpret"):  # the error says which path gives forward mode
        with (
            jax_side.matmul_path(path),
            pytest.raises(
                TypeError, match=rf"matmul_path\('{path}'\) has reverse-mode .*matmul_path\('expand'\)"
            ),
        ):
            jax.jvp(
                lambda x: jax_side.quantized_matmul(x, nf4((8, 128))),
                (x_for(2, 128, jnp.float32),),
                (x_for(2, 128, jnp.float32),),
            )
    no_offset = dataclasses.replace(nf4((8, 128)), offset=None)  # nested: the offset shifts every scale
    for path in ("auto", "expand", "interpret"):
        with (
            jax_side.matmul_path(path),
            pytest.raises(ValueError, match=r"shape \(8, 128\) has a nested absmax but no offset"),
        ):
            jax.jit(jax_side.quantized_matmul)(x_for(2, 128, jnp.float32), no_offset)
    with pytest.raises(ValueError, match="nested absmax but no offset"):
        no_offset.dequantize()
    good = nf4((8, 128))
    bad = {  # pieces that make no weight: refused on every path, as dequantize refuses them
        "a table without a nested absmax": (
            dataclasses.replace(good, nested_absmax=None),
            ValueError,
            "needs both",
        ),
        "uint8 absmax, not nested": (
            dataclasses.replace(good, nested_absmax=None, nested_code=None, offset=None),
            TypeError,
            "absmax is uint8",
        ),
        "8-entry code": (dataclasses.replace(good, code=jnp.zeros(8, jnp.float32)), ValueError, "16 entries"),
        "int8 dtype": (
            dataclasses.replace(good, dtype="int8"),
            ValueError,
            r"dtype='int8'.*bfloat16, float16 or float32",
        ),
        "absmax too long": (
            dataclasses.replace(good, absmax=jnp.zeros(good.absmax.size + 3, jnp.uint8)),
            ValueError,
            "absmax has 19 entries",
        ),
        "fp8 int32 scales": (
            jax_side.FP8Weight(fp8((8, 128), (1, 1)).weight, jnp.ones((1, 1), jnp.int32)),
            TypeError,
            "scale_inv must be",
        ),
    }
    bad["float blocksize after a valid call"] = (
        dataclasses.replace(good, blocksize=64.0),
        ValueError,
        "blocksize must be one of the ints",
    )  # the checks are remembered per kind of weight: 64.0 is not 64's kind
    jax_side.quantized_matmul(x_for(2, 128, jnp.float32), good)
    for weight, error, message in bad.values():
        for path in ("auto", "expand", "interpret"):
            with jax_side.matmul_path(path), pytest.raises(error, match=message):
                jax.jit(jax_side.quantized_matmul)(x_for(2, 128, jnp.float32), weight)
    with jax_side.matmul_path("expand"):  # the documented way to forward-mode derivatives
        jax.jvp(
            lambda x: jax_side.quantized_matmul(x, nf4((8, 128))),
            (x_for(2, 128, jnp.float32),),
            (x_for(2, 128, jnp.float32),),
        )


@pytest.mark.parametrize("fmt", ["nf4", "fp8"])
def test_the_backward_pass_keeps_no_dense_weight_under_any_remat_policy(fmt, capsys):
    """On the kernel's path the forward pass keeps the stored pieces for the backward pass, never the
    expanded weight, also where a remat policy around the layer saves everything it may (a tangent
    computed with the expanded weight became such a saved value)."""
    w = nf4((256, 128), dtype=torch.float32) if fmt == "nf4" else fp8((256, 128), (2, 1))
    x = x_for(4, 128, jnp.float32)
    policies = [None, jax.checkpoint_policies.everything_saveable,
                jax.checkpoint_policies.save_anything_except_these_names("unrelated")]  # fmt: skip
    with jax_side.matmul_path("interpret"):
        for policy in policies:

            def loss(x, w):
                return jnp.sum(jnp.sin(jax_side.quantized_matmul(x, w)))

            capsys.readouterr()
            print_saved_residuals(loss if policy is None else jax.checkpoint(loss, policy=policy), x, w)
            kept = capsys.readouterr().out
            dense_sized = [ln for ln in kept.splitlines() if "[256,128]" in ln or "[128,256]" in ln]
            assert "from the argument w" in kept, kept
            assert all("from the argument w.weight" in ln for ln in dense_sized), (policy, kept)  # FP8's own


def test_gradients_vmap_and_layers():
    w = nf4((48, 128), dtype=torch.float32)
    x = x_for(3, 128, jnp.float32)
    dense = np.asarray(w.dequantize(), np.float64)
    with jax_side.matmul_path("interpret"):
        grad_x = jax.jit(jax.grad(lambda x: (jax_side.quantized_matmul(x, w) ** 2).sum()))(x)
        y = jax_side.quantized_matmul(x, w)
        batched = jax.jit(jax.vmap(jax_side.quantized_matmul, in_axes=(0, None)))(x.reshape(3, 1, 128), w)
        rows = [jax_side.quantized_matmul(x[i : i + 1], w) for i in range(3)]  # one row each
        layer = jax_side.QuantLinear(w, jnp.ones(48), lora=jax_side.LoraConfig(r=4), rngs=nnx.Rngs(0))
        grads = nnx.grad(lambda m, x: (m(x) ** 2).sum())(layer, x)
        fused_out = layer(x)
    # float32 sums of 48 products up to ~200: an element that cancels to ~0.2 carries their rounding errors
    y64 = 2 * np.asarray(y, np.float64)
    err = np.abs(np.asarray(grad_x, np.float64) - y64 @ dense)
    assert (err <= 1e-5 * (np.abs(y64) @ np.abs(dense))).all(), err.max()
    np.testing.assert_allclose(np.asarray(batched).reshape(3, 48), np.concatenate(rows), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(batched).reshape(3, 48), np.asarray(y), rtol=1e-5, atol=1e-5)
    names = {".".join(map(str, p)) for p, _ in nnx.to_flat_state(grads)}
    assert names == {"bias", "lora.lora_A", "lora.lora_B"}
    with jax_side.matmul_path("expand"):
        want = nnx.grad(lambda m, x: (m(x) ** 2).sum())(layer, x)
        np.testing.assert_allclose(np.asarray(fused_out), np.asarray(layer(x)), rtol=1e-5, atol=1e-5)
    for path in ("bias", "lora.lora_A", "lora.lora_B"):
        a = dict(nnx.to_flat_state(grads))[tuple(path.split("."))][...]
        b = dict(nnx.to_flat_state(want))[tuple(path.split("."))][...]
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4)


def test_the_stored_pieces_get_no_gradient_on_any_path():
    w = nf4((16, 128), dtype=torch.float32)
    x = x_for(3, 128, jnp.float32)
    for path in ("auto", "expand", "interpret"):
        with jax_side.matmul_path(path):
            g = jax.grad(lambda w: jax_side.quantized_matmul(x, w).sum(), allow_int=True)(w)
        assert float(jnp.abs(g.offset)) == 0.0, path
        assert float(jnp.abs(g.nested_absmax).sum()) == 0.0 and float(jnp.abs(g.nested_code).sum()) == 0.0, (
            path
        )


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_a_nested_absmax_without_its_table_decodes_with_the_standard_one(quant_type, monkeypatch):
    """``nested_code=None`` is bitsandbytes' dynamic map: the same bits as the table held, on every path and
    through the Mosaic kernel's lowering, with one array fewer in the tree; a table held is used."""
    w = nf4((128, 1024), quant_type=quant_type, seed=5)
    assert_same_bits(np.asarray(w.nested_code), dynamic_code())  # what bitsandbytes wrote
    bare = dataclasses.replace(w, nested_code=None)
    assert len(jax.tree_util.tree_leaves(bare)) == len(jax.tree_util.tree_leaves(w)) - 1
    for dtype in (None, jnp.float32):
        assert_same_bits(bare.dequantize(dtype=dtype), w.dequantize(dtype=dtype))
        assert_same_bits(jax.jit(lambda w: w.dequantize(transpose=True))(bare),
                         jax.jit(lambda w: w.dequantize(transpose=True))(w))  # fmt: skip
    other = dataclasses.replace(w, nested_code=w.nested_code * 0.5)  # a table of its own: used
    assert not np.array_equal(np.asarray(other.dequantize()), np.asarray(w.dequantize()))
    for m in (1, 19):
        x = x_for(m, 1024, jnp.bfloat16, seed=m)
        for path in ("auto", "expand", "interpret"):
            with jax_side.matmul_path(path):
                matmul = jax.jit(jax_side.quantized_matmul)
                assert_same_bits(matmul(x, bare), matmul(x, w))
                assert not np.array_equal(np.asarray(matmul(x, other)), np.asarray(matmul(x, w))), path
    monkeypatch.setattr(_mosaic, "_force", True)  # the Mosaic kernel's program, lowered on any machine
    x = x_for(16, 1024, jnp.bfloat16)
    text = _lowered(x, bare)
    assert "mosaic_gpu" in text and "gather" not in text  # the table reaches the kernel as a constant


def test_tied_output_layer_uses_the_kernel():
    table = nf4((50, 64))
    embed = jax_side.QuantEmbed(table)
    q = x_for(4, 64, jnp.bfloat16)
    with jax_side.matmul_path("interpret"):
        assert "pallas_call" in str(jax.make_jaxpr(embed.attend)(q))
        got = embed.attend(q)
    assert_close(got, q, table)


def test_embedding_lookups_take_integer_ids_only():
    """QuantEmbed (nnx) and QuantEmbedLinen look up the dequantized table's rows for integer ids (arrays or
    lists) as flax's Embed does (a one-row table's row for every id, NaN rows past a longer table), and
    refuse float, bool, None and string ids by the layer's name, with flax's error type."""
    table = nf4((50, 64))
    dense = np.asarray(table.dequantize())
    embed = jax_side.QuantEmbed(table)
    ids = np.array([[0, 49, 7], [3, 3, 12]], np.int32)
    assert_same_bits(embed(jnp.asarray(ids)), jnp.asarray(dense[ids]))
    assert_same_bits(embed([1, 2]), jnp.asarray(dense[[1, 2]]))
    linen_embed = jax_side.QuantEmbedLinen(name="embed")
    variables = {"quantized": {"embedding": table}}
    assert_same_bits(linen_embed.apply(variables, jnp.asarray(ids, jnp.uint8)), jnp.asarray(dense[ids]))
    # as flax's Embed: a one-row table gives its row for every id; ids past a longer table give NaN rows
    one = nf4((1, 64))
    for ids in (jnp.array([0, 1, 5]), jnp.array([[2], [0]], jnp.uint8)):
        want = nnx.Embed(1, 64, param_dtype=one.dequantize().dtype, rngs=nnx.Rngs(0))
        want.embedding[...] = one.dequantize()
        assert_same_bits(jax_side.QuantEmbed(one)(ids), want(ids))
        assert_same_bits(linen_embed.apply({"quantized": {"embedding": one}}, ids), want(ids))
    assert_same_bits(jax_side.QuantEmbed(one)(jnp.int32(3)), one.dequantize()[0])  # flax's Embed fails on 0-d
    assert np.isnan(np.asarray(embed(jnp.array([50])), np.float32)).all()
    for bad in (jnp.array([1.0, 2.0]), jnp.array([True, False]), [0.5], None, "abc"):
        with pytest.raises(ValueError, match="QuantEmbed: ids must be integers"):
            embed(bad)
        with pytest.raises(ValueError, match="embed: ids must be integers"):
            linen_embed.apply(variables, bad)


def test_fp8_blocks_past_the_matrix_in_every_matmul_path(monkeypatch):
    """An FP8 weight whose block is past a side (2**31 rows, say: one block along it) multiplies as the weight
    with the covering block, in every path, and the Hopper kernel lowers where it takes the call (each path
    overflowed JAX's int32 with the block as given)."""
    for block, covering in (((2**31, 128), (320, 128)), ((64, 2**31), (64, 512))):
        w = fp8((320, 512), (-(-320 // block[0]), -(-512 // block[1])), block=block)
        same = dataclasses.replace(w, block=covering)
        x = x_for(4, 512, jnp.bfloat16)
        for path in ("auto", "interpret", "expand"):
            with jax_side.matmul_path(path):
                assert_same_bits(
                    jax.jit(jax_side.quantized_matmul)(x, w), jax.jit(jax_side.quantized_matmul)(x, same)
                )
                assert_close(jax_side.quantized_matmul(x, w), x, w)
    w = fp8((320, 512), (1, 4), block=(2**31, 128))
    monkeypatch.setattr(_mosaic, "_force", True)
    assert _mosaic.grid_rows(w) == 320
    assert _kernels(x_for(16, 512, jnp.bfloat16), w) == {"mosaic"}


def test_sharded_weights():
    """Weights and inputs placed over 4 CPU devices, on meshes with automatic and with explicit axes (JAX's
    sharding in types), with the mesh set as the context's or not: the interpreted kernel, the expansion
    and ``dequantize`` give the unsharded results, under jit and eagerly."""
    code = textwrap.dedent(
        """
        import contextlib
        import jax, jax.numpy as jnp, numpy as np
        import jax_side
        from jax.sharding import NamedSharding, PartitionSpec as P
        rng = np.random.default_rng(0)
        n, k = 64, 256
        w = jax_side.NF4Weight(packed=jnp.asarray(rng.integers(0, 256, n * k // 2, dtype=np.uint8)),
                               absmax=jnp.asarray(rng.random(n * k // 64, dtype=np.float32)), shape=(n, k))
        f = jax_side.FP8Weight(jnp.asarray(rng.standard_normal((n, k)), jnp.float8_e4m3fn),
                               jnp.asarray(rng.random((1, 2)) * 0.1, jnp.float32))
        xs = jnp.asarray(rng.standard_normal((8, k)), jnp.float32)
        for kind in (jax.sharding.AxisType.Auto, jax.sharding.AxisType.Explicit):
            mesh = jax.make_mesh((4,), ("x",), axis_types=(kind,))
            shard = lambda a, *spec: jax.device_put(a, NamedSharding(mesh, P(*spec)))
            placed = [(w, jax_side.NF4Weight(packed=shard(w.packed, "x"), absmax=shard(w.absmax, "x"), shape=(n, k))),
                      (f, jax_side.FP8Weight(shard(f.weight, "x", None), shard(f.scale_inv)))]
            x = shard(xs, "x", None)
            for context, (whole, sw), path in [(c, p, m) for c in (True, False) for p in placed for m in ("interpret", "expand")]:
                with jax_side.matmul_path(path), jax.set_mesh(mesh) if context else contextlib.nullcontext():
                    kernel = "pallas_call" in str(jax.make_jaxpr(jax_side.quantized_matmul)(x, sw))
                    got = [jax.jit(jax_side.quantized_matmul)(x, sw), jax_side.quantized_matmul(x, sw)]
                    dense = [jax.jit(lambda s: s.dequantize(transpose=True))(sw), sw.dequantize()]
                want = np.asarray(xs) @ np.asarray(whole.dequantize(dtype=jnp.float32)).T
                for g in got:
                    np.testing.assert_allclose(np.asarray(g), want, rtol=1e-5, atol=1e-5)
                np.testing.assert_array_equal(np.asarray(dense[0]), np.asarray(whole.dequantize(transpose=True)))
                np.testing.assert_array_equal(np.asarray(dense[1]), np.asarray(whole.dequantize()))
                print(kind.name, context, type(whole).__name__, path, kernel, len(sw.weight.sharding.device_set if hasattr(sw, "weight") else sw.packed.sharding.device_set))
            x1 = shard(xs[:1], None, None)  # one row (XLA's reduction), replicated, against sharded weights
            for whole, sw in placed:
                with jax_side.matmul_path("interpret"), jax.set_mesh(mesh):
                    one = jax.jit(jax_side.quantized_matmul)(x1, sw)
                    assert "pallas_call" not in str(jax.make_jaxpr(jax_side.quantized_matmul)(x1, sw))
                np.testing.assert_allclose(np.asarray(one), np.asarray(xs[:1]) @ np.asarray(whole.dequantize(dtype=jnp.float32)).T,
                                           rtol=1e-5, atol=1e-5)
        # inside a shard_map over one axis of an explicit 2-D mesh: the manual axis stays manual
        mesh2 = jax.make_mesh((2, 2), ("a", "b"), axis_types=(jax.sharding.AxisType.Explicit,) * 2)
        x2 = jax.device_put(xs, NamedSharding(mesh2, P("a", None)))
        for path in ("expand", "interpret"):
            with jax.set_mesh(mesh2), jax_side.matmul_path(path):
                f = jax.shard_map(lambda x: jax_side.quantized_matmul(x, w), in_specs=P("a", None), out_specs=P("a", None),
                                  axis_names={"a"}, check_vma=False)
                np.testing.assert_allclose(np.asarray(jax.jit(f)(x2)), np.asarray(xs) @ np.asarray(w.dequantize(dtype=jnp.float32)).T, rtol=1e-5, atol=1e-5)
        try:
            jax_side.quantized_matmul(x2, placed[0][1])
        except ValueError as e:
            assert "different meshes" in str(e), e
        else:
            raise AssertionError("x and the weight on two meshes were accepted")
        """
    )
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [line.split() for line in out.stdout.splitlines()]
    assert len(lines) == 16, out.stdout
    for kind, context, fmt, path, kernel, devices in lines:
        assert kernel == str(path == "interpret") and devices == "4", (
            kind,
            context,
            fmt,
            path,
            kernel,
            devices,
        )


def test_inside_shard_map_with_varying_axes_checked():
    """``jax.shard_map`` with ``check_vma=True`` (its default) on four CPU devices: x varying, replicated,
    or unvarying after a ``psum``, against a replicated weight, forward and backward, under "auto" (whose
    jit also builds the CUDA branch's kernel call), "expand" and, where x varies along no axis,
    "interpret"; and weights split along ``out`` against the same x on each device, x's gradient summed over
    the devices, for ``quantized_matmul`` and ``quantized_matmuls``."""
    code = textwrap.dedent(
        """
        import sys
        sys.path.insert(0, "tests/jax_side"); sys.path.insert(0, "tests")
        import jax, jax.numpy as jnp, numpy as np
        from jax.sharding import PartitionSpec as P
        import jax_side
        import torch
        from test_fused import nf4, fp8
        mesh = jax.make_mesh((4,), ("x",))
        for w in (nf4((128, 256)), fp8((128, 256), (1, 2))):
            x = jnp.asarray(np.random.default_rng(0).standard_normal((8, 256)), jnp.float32)
            want = np.asarray(x, np.float64) @ np.asarray(w.dequantize(dtype=jnp.float32), np.float64).T
            cases = {
                "varying": ((P("x"), P()), P("x"), jax_side.quantized_matmul),
                "replicated": ((P(), P()), P(), jax_side.quantized_matmul),
                "after psum": ((P(), P()), P(), lambda x, w: jax_side.quantized_matmul(jax.lax.psum(x, "x") / 4, w)),
            }
            for path in ("auto", "expand", "interpret"):
                for name, (specs, out, fn) in cases.items():
                    if path == "interpret" and name == "varying":
                        continue  # the interpreter needs check_vma=False there (documented)
                    with jax_side.matmul_path(path):
                        f = jax.shard_map(fn, mesh=mesh, in_specs=specs, out_specs=out)
                        xs = jax.device_put(x, jax.sharding.NamedSharding(mesh, specs[0]))
                        y = jax.jit(f)(xs, w)
                        g = jax.jit(jax.grad(lambda x, w: f(x, w).sum()))(xs, w)
                    np.testing.assert_allclose(np.asarray(y, np.float64), want, rtol=1e-5, atol=1e-4)
                    assert np.isfinite(np.asarray(g)).all()
                    print(type(w).__name__, path, name)
        # tensor parallel: the weights split along out over the axis, x the same on each device; x's gradient
        # is the sum over every device's part (the backward's own psum), one weight and a group alike
        # (FP8 with per-row scales: pieces that split along out; a 4-bit weight's flat pieces carry its whole shape)
        ws = ([fp8((128, 256), (128, 1)), fp8((256, 256), (256, 1), seed=2)],
              [fp8((64, 256), (64, 1), fmt=torch.float8_e5m2), fp8((128, 256), (128, 1), seed=3)])
        x = jnp.asarray(np.random.default_rng(1).standard_normal((8, 256)), jnp.float32)
        for group in ws:
            rows = sum(np.asarray(w.dequantize(dtype=jnp.float32), np.float64).sum(0) for w in group)
            specs = (P(), [jax.tree.map(lambda _: P("x"), w) for w in group])
            group = jax.device_put(group, jax.tree.map(lambda p: jax.sharding.NamedSharding(mesh, p), specs[1]))
            x = jax.device_put(x, jax.sharding.NamedSharding(mesh, P()))
            for path in ("auto", "expand", "interpret"):
                for name, fn in (("one", lambda x, ws: [jax_side.quantized_matmul(x, w) for w in ws]),
                                 ("group", jax_side.quantized_matmuls)):
                    loss = lambda x, ws, fn=fn: sum(y.sum() for y in fn(x, ws))
                    with jax_side.matmul_path(path):
                        g = jax.jit(jax.shard_map(jax.grad(loss), mesh=mesh, in_specs=specs, out_specs=P()))(x, group)
                    np.testing.assert_allclose(np.asarray(g, np.float64), np.broadcast_to(rows, g.shape), rtol=1e-5, atol=1e-4)
                    print(type(group[0]).__name__, path, "weights split", name)
        """
    )
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert len(out.stdout.splitlines()) == 16 + 12, out.stdout


# ------------------------------------------------------------------------------ Mosaic GPU, on Hopper
# jax_side._mosaic: its table lookup, the PTX text itself run by a small interpreter for every pair of bytes
# against bitsandbytes' tables, and which calls reach it, lowered for CUDA (JAX lowers Mosaic GPU and Triton
# kernels without a GPU); on a Hopper GPU (gpu marker), its results against expand-then-matmul.


def _prmt(a: int, b: int, c: int) -> int:
    """PTX ``prmt.b32`` (default mode): byte i of the result is the byte of ``{b, a}`` that nibble i of ``c``
    names (0-3: ``a``'s bytes, 4-7: ``b``'s); a nibble's fourth bit asks for another mode, never used here."""
    assert c & 0x8888 == 0, hex(c)
    src = a | (b << 32)
    return sum(((src >> (8 * ((c >> (4 * i)) & 7))) & 0xFF) << (8 * i) for i in range(4))


_OPS = {
    "mov.b32": lambda v: v[0],
    "and.b32": lambda v: v[0] & v[1],
    "or.b32": lambda v: v[0] | v[1],
    "shr.b32": lambda v: v[0] >> v[1],
    "prmt.b32": lambda v: _prmt(*v),
}


def run_ptx(ptx: str, outputs: int, inputs: list[int]) -> list[int]:
    """Runs an inline-assembly PTX text as LLVM numbers its operands (``outputs`` results ``$0..``, then the
    ``inputs``); returns the results. Refuses any instruction it does not know, so a change to the text
    cannot pass unchecked, and any operand it was not given. (One lane of :func:`run_ptx_warp`.)"""
    return run_ptx_warp(ptx, outputs, [inputs])[0]


def _immediate(t: str) -> int:
    assert not t.startswith("$"), f"reads {t}, which is no operand"
    return int(t, 0)


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_the_permute_lookup_equals_the_table_for_every_pair_of_bytes(quant_type):
    table = standard_code(quant_type)
    want = table.view(np.uint32)
    ptx = _mosaic.lookup_ptx(table)
    for sel in range(1 << 16):  # two packed bytes: nibbles lo0, hi0, lo1, hi1
        nibbles = (sel & 15, (sel >> 4) & 15, (sel >> 8) & 15, sel >> 12)
        assert run_ptx(ptx, 4, [sel]) == [int(want[v]) for v in nibbles], hex(sel)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_the_product_tables_give_each_rounded_product(dtype):
    """The per-row tables of ``round(code[j] * absmax)``: built from the rounded pairs as the kernel makes
    them, then looked up for every pair of bytes, against the products rounded by numpy."""
    code = standard_code("nf4")
    for absmax in np.float32([0.0371, 3.1e-5, 17.25]):
        products = (
            (code * absmax).astype(dtype).view(np.uint16).astype(np.int64)
        )  # float32 product, one rounding
        pairs = [int(products[2 * i] | products[2 * i + 1] << 16) for i in range(8)]
        tables = run_ptx(_mosaic.PRODUCT_TABLES_PTX, 8, pairs)
        for sel in range(0, 1 << 16, 1 if absmax == np.float32(0.0371) else 97):
            lo0, hi0, lo1, hi1 = sel & 15, (sel >> 4) & 15, (sel >> 8) & 15, sel >> 12
            got = run_ptx(_mosaic.PRODUCT_LOOKUP_PTX, 2, [sel, *tables])
            want = [int(products[hi0] | products[hi1] << 16), int(products[lo0] | products[lo1] << 16)]
            assert got == want, (absmax, hex(sel))


def run_ptx_warp(ptx: str, outputs: int, inputs: list[list[int]]) -> list[list[int]]:
    """:func:`run_ptx` for lanes 0..len(inputs)-1 of one warp in step, ``inputs[lane]`` each lane's operands,
    with ``shfl.sync.idx.b32 d, a, b, c, 0xffffffff`` as PTX defines it (the source lane ``(lane & segmask) |
    (b & ~segmask)``, ``segmask = c[12:8]``, a lane's own value where that is beyond ``(lane & segmask) |
    c[4:0]`` or beyond the lanes run)."""
    regs = [{f"${outputs + i}": v for i, v in enumerate(own)} for own in inputs]

    def value(lane: int, t: str) -> int:
        return regs[lane][t] if t in regs[lane] else _immediate(t)

    for line in ptx.splitlines():
        op, _, rest = line.strip().rstrip(";").partition(" ")
        if op in ("{", "}", ".reg"):
            continue
        dest, *src = (t.strip() for t in rest.split(","))
        assert not dest.startswith("$") or int(dest[1:]) < outputs, f"writes the input {dest}"
        if op == "shfl.sync.idx.b32":
            a, b, c, mask = src
            assert int(mask, 0) == 0xFFFFFFFF, mask
            new = []
            for lane in range(len(regs)):
                seg, clamp, bv = (value(lane, c) >> 8) & 31, value(lane, c) & 31, value(lane, b) & 31
                j = (lane & seg) | (bv & ~seg & 31)
                ok = j <= ((lane & seg) | (clamp & ~seg & 31)) and j < len(regs)
                new.append(value(j if ok else lane, a))
            for lane, v in enumerate(new):
                regs[lane][dest] = v
        else:
            for lane in range(len(regs)):
                regs[lane][dest] = _OPS[op]([value(lane, t) for t in src])
    return [[lane_regs[f"${i}"] for i in range(outputs)] for lane_regs in regs]


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_a_quad_makes_each_row_table_a_quarter_each(quant_type, dtype):
    """QUAD_TABLES_PTX on two quads of a warp (each lane holding its quad's row, with its own absmax):
    every lane ends with the words PRODUCT_TABLES_PTX makes from all 16 products of its row."""
    code = standard_code(quant_type)
    rng = np.random.default_rng(0)
    for absmaxes in ([np.float32(0.0371), np.float32(17.25)], rng.random(2, np.float32) * 100):
        lanes, want = [], []
        for lane in range(8):
            products = (code * absmaxes[lane // 4]).astype(dtype).view(np.uint16).astype(np.int64)
            pairs = [int(products[2 * i] | products[2 * i + 1] << 16) for i in range(8)]
            want.append(run_ptx(_mosaic.PRODUCT_TABLES_PTX, 8, pairs))
            e = list(_mosaic.quad_entries(lane))  # the entries this lane multiplies
            lanes.append(
                [int(products[e[0]] | products[e[1]] << 16), int(products[e[2]] | products[e[3]] << 16)]
            )
        assert run_ptx_warp(_mosaic.QUAD_TABLES_PTX, 8, lanes) == want
    assert sorted(e for lane in range(4) for e in _mosaic.quad_entries(lane)) == list(range(16))


def test_the_warp_interpreter_shuffles_within_segments():
    def shuffle(b: int, c: int) -> list[int]:
        ptx = f"{{\nshfl.sync.idx.b32 $0, $1, {b}, {c:#x}, 0xffffffff;\n}}"
        return [got[0] for got in run_ptx_warp(ptx, 1, [[10 * lane] for lane in range(8)])]

    assert shuffle(2, 0x1C1F) == [20, 20, 20, 20, 60, 60, 60, 60]  # within each quad
    assert shuffle(5, 0x1F) == [50] * 8  # the whole warp
    assert shuffle(3, 0x1C01) == [0, 10, 20, 30, 40, 50, 60, 70]  # beyond the clamp: each lane its own


def test_the_interpreter_notices_a_changed_instruction():
    ptx = _mosaic.lookup_ptx(standard_code("nf4")).replace("$0, u01, u23, 0x5410", "$0, u01, u23, 0x5401")
    assert run_ptx(ptx, 4, [0x0001]) != [int(v) for v in standard_code("nf4")[[1, 0, 0, 0]].view(np.uint32)]


def _lowered(x, w) -> str:
    # a function of its own each time: the module's switches are read when a call is traced
    return (
        jax.jit(lambda x, w: jax_side.quantized_matmul(x, w))
        .trace(x, w)
        .lower(lowering_platforms=("cuda",))
        .as_text()
    )


def _kernels(x, w) -> set[str]:
    text = _lowered(x, w)
    return {
        name for name, key in (("mosaic", "mosaic_gpu"), ("triton", "__gpu$xla.gpu.triton")) if key in text
    }


@pytest.fixture(params=[False, True], ids=["lookup", "product tables"])
def hopper(monkeypatch, request):
    """As on a Hopper GPU: the kernel is chosen where a call fits it (with either decode)."""
    monkeypatch.setattr(_mosaic, "_force", True)
    monkeypatch.setattr(_mosaic, "_products", request.param)


@pytest.mark.parametrize("fmt", ["NF4", "FP8"])
def test_few_rows_split_the_contraction_for_several_programs_per_multiprocessor(hopper, fmt):
    """Up to 32 rows of x, the grid is split until it holds _SMALL_PROGRAMS programs (where the contraction
    allows: each program at least two pipeline steps); from 33 rows it fills the multiprocessors once. Read
    from the partial sums' shape in the lowered program (FP8: its block-scale grid read as stored)."""
    if fmt == "NF4":
        w = jax.eval_shape(lambda: jax_side.NF4Weight(packed=jnp.zeros((4096 * 4096 // 2,), jnp.uint8),
                                                      absmax=jnp.ones((4096 * 4096 // 64,)), shape=(4096, 4096)))  # fmt: skip
        steps = 4096 // (64 * _mosaic._BLOCKS)
    else:
        w = jax.eval_shape(
            lambda: jax_side.FP8Weight(jnp.zeros((4096, 4096), jnp.float8_e4m3fn), jnp.ones((32, 32)))
        )
        steps = 4096 // (128 * _mosaic._FP8_BLOCKS)

    def parts(m: int) -> int:
        text = _lowered(jax.ShapeDtypeStruct((m, 4096), jnp.bfloat16), w)
        assert "mosaic_gpu" in text
        return int(re.findall(r"tensor<(\d+)x4096x\d+xf32>", text)[0])

    tiles = 4096 // 64
    assert tiles * steps // 2 < _mosaic._SMALL_PROGRAMS  # so the split stops where the steps run out
    assert [parts(m) for m in (2, 16, 32)] == [steps // 2] * 3
    assert [parts(m) for m in (33, 64, 128)] == [4] * 3  # 64 tiles x 4 = 256 programs: the first past 132


def test_which_calls_take_it(hopper, monkeypatch):
    w = nf4((128, 512))
    fits = [(m, dt) for m in (2, 5, 16, 17, 33, 64, _mosaic.MAX_ROWS) for dt in (jnp.bfloat16, jnp.float16)]
    for m, dt in fits:  # a weight decoding to x's dtype (or float32): rounded once, as the kernel does
        weight = dataclasses.replace(w, dtype=jnp.dtype(dt).name)
        assert _kernels(x_for(m, 512, dt), weight) == {"mosaic"}, (m, dt)
    assert _kernels(x_for(5, 512, jnp.float16), dataclasses.replace(w, dtype="float32")) == {"mosaic"}
    others = {
        "more than MAX_ROWS rows": (x_for(_mosaic.MAX_ROWS + 1, 512, jnp.bfloat16), w),
        "float32 x": (x_for(5, 512, jnp.float32), w),
        "out not a multiple of 64": (x_for(5, 384, jnp.bfloat16), nf4((70, 384))),
        "in not a multiple of 256": (x_for(5, 384, jnp.bfloat16), nf4((64, 384))),
        "blocksize 128": (x_for(5, 512, jnp.bfloat16), nf4((64, 512), blocksize=128)),
        "a table of its own": (x_for(5, 512, jnp.bfloat16), dataclasses.replace(w, code=jnp.asarray(standard_code("nf4")))),
        "a bfloat16 weight in float16": (x_for(5, 512, jnp.float16), w),  # rounded twice
        "rounded through bfloat16 for float16 x": (
            x_for(5, 512, jnp.float16), dataclasses.replace(w, dtype="float32", decode_dtype="bfloat16")
        ),
    }  # fmt: skip
    for name, (x, weight) in others.items():
        assert _kernels(x, weight) == {"triton"}, name
    assert _kernels(x_for(1, 512, jnp.bfloat16), w) == set()  # one row: XLA's reduction
    w768, x768 = nf4((64, 768)), x_for(5, 768, jnp.bfloat16)
    assert _kernels(x768, w768) == {"mosaic"}  # three steps of 256 columns
    monkeypatch.setattr(_mosaic, "_BLOCKS", 8)  # steps of 512: 768 columns are not whole steps
    assert _kernels(x768, w768) == {"triton"}
    # fp4, plain absmax, a float32 weight used in bfloat16, leading dimensions: taken
    assert _kernels(x_for(3, 512, jnp.bfloat16), nf4((64, 512), quant_type="fp4", nested=False)) == {"mosaic"}
    f32 = dataclasses.replace(w, dtype="float32", decode_dtype="bfloat16")
    assert _kernels(x_for(6, 512, jnp.bfloat16).reshape(2, 3, 512), f32) == {"mosaic"}


def test_fp8_calls_it_takes(hopper):
    fits = {
        "block 128": fp8((256, 512), (2, 4)),
        "per-row": fp8((128, 512), (128, 1)),
        "per-tensor": fp8((64, 256), (1,)),
        "block 64x256": fp8((192, 512), (3, 2), block=(64, 256)),
    }
    for name, w in fits.items():
        for m in (2, 32):
            assert _kernels(x_for(m, w.shape[1], jnp.bfloat16), w) == {"mosaic"}, (name, m)
    others = {
        "e5m2": fp8((128, 512), (1, 4), fmt=torch.float8_e5m2),
        "block 64x32": fp8((128, 512), (2, 16), block=(64, 32)),
        "in not a multiple of 256": fp8((128, 384), (1, 3)),
        "out not a multiple of 64": fp8((200, 512), (2, 4)),
    }
    for name, w in others.items():
        assert _kernels(x_for(5, w.shape[1], jnp.bfloat16), w) == {"triton"}, name


def test_fp8_block_scales_read_as_stored(hopper, monkeypatch):
    """Block scales of 128 columns over whole 64-row tiles go to the kernel as the checkpoint stores them (no
    per-call XLA kernel laying them out per row); other layouts keep that layout."""
    as_stored = {
        "block 128": (fp8((256, 512), (2, 4)), 128),
        "block 192x128": (fp8((384, 512), (2, 4), block=(192, 128)), 192),
        "block 64x128": (fp8((128, 1024), (2, 8), block=(64, 128)), 64),
    }
    laid_out = {
        "per-row": fp8((128, 512), (128, 1)),
        "per-tensor": fp8((64, 256), (1,)),
        "block 64x256": fp8((192, 512), (3, 2), block=(64, 256)),
        "block 96x128": fp8((192, 512), (2, 4), block=(96, 128)),  # a 64-row tile spans two block rows
        "6 block columns": fp8((192, 768), (2, 6)),  # not whole 16 bytes a row
    }
    for name, (w, rows) in as_stored.items():
        n, k = w.shape
        assert _mosaic.grid_rows(w) == rows, name
        for grid in (True, False):
            monkeypatch.setattr(_mosaic, "_grid_scales", grid)
            text = _lowered(x_for(5, k, jnp.bfloat16), w)
            assert "mosaic_gpu" in text, name
            assert (f"tensor<{k // 128}x{n}xf32>" in text) != grid, (name, grid)  # the per-row layout
    for name, w in laid_out.items():
        assert _mosaic.grid_rows(w) is None, name
    # six steps over one tile: split in two, a program would copy 6 of the grid's scales, not whole 16 bytes
    w = fp8((64, 1536), (1, 12))
    for grid, parts in ((True, 1), (False, 2)):  # a function of its own each time: read when traced
        monkeypatch.setattr(_mosaic, "_grid_scales", grid)
        text = (
            jax.jit(lambda x, w: _mosaic.fp8_matmul(x, w))
            .trace(x_for(5, 1536, jnp.bfloat16), w)
            .lower(lowering_platforms=("cuda",))
            .as_text()
        )
        assert f"tensor<{parts}x64x16xf32>" in text, grid  # the kernel's partial sums, one per part
    with pytest.raises(ValueError, match="cannot read a block-scale grid"):
        _mosaic.fp8_kernel(x_for(5, 768, jnp.bfloat16), jnp.zeros((128, 768), jnp.float8_e4m3fn),
                           jnp.ones((1, 6), jnp.float32), scale_rows=128)  # fmt: skip
    # rows of the grid longer than one TMA copy takes (256 scales): the contraction is split until a program's
    # share fits, e.g. Llama-3.1-405B's down_proj (416 scales a row; enough tiles to fill the GPU unsplit at 64
    # rows of x: up to 32, the grid is split further for several programs per multiprocessor)
    monkeypatch.setattr(_mosaic, "_grid_scales", True)
    wide = jax.eval_shape(
        lambda: jax_side.FP8Weight(
            jnp.zeros((16384, 53248), jnp.float8_e4m3fn), jnp.ones((128, 416)), block=(128, 128)
        )
    )
    assert _mosaic.grid_rows(wide) == 128
    text = _lowered(jax.ShapeDtypeStruct((64, 53248), jnp.bfloat16), wide)
    assert "mosaic_gpu" in text and "tensor<2x16384x64xf32>" in text  # two parts of 208 scales
    text = _lowered(jax.ShapeDtypeStruct((16, 53248), jnp.bfloat16), wide)
    assert "mosaic_gpu" in text and "tensor<4x16384x16xf32>" in text  # few rows: four parts of 104 scales
    # no split gives whole 16-byte units of at most 256 scales (258 steps: 516, then 258 a program): laid out
    odd = jax.eval_shape(
        lambda: jax_side.FP8Weight(jnp.zeros((64, 66048), jnp.float8_e4m3fn), jnp.ones((1, 516)))
    )
    assert _mosaic.grid_rows(odd) is None
    assert "mosaic_gpu" in _lowered(jax.ShapeDtypeStruct((16, 66048), jnp.bfloat16), odd)


@pytest.mark.parametrize("layout", ["block 128", "per-row", "per-tensor", "block 64x256", "partial blocks"])
def test_fp8_scales_per_row_and_128_columns_equal_the_decode(layout):
    """The kernel's scales (each row's scale per 128 columns) times the float8 values are the weight
    ``dequantize()`` gives, bit for bit, for each scale layout the kernel takes."""
    w = {
        "block 128": lambda: fp8((256, 512), (2, 4)),
        "per-row": lambda: fp8((128, 512), (128, 1)),
        "per-tensor": lambda: fp8((64, 256), (1,)),
        "block 64x256": lambda: fp8((192, 512), (3, 2), block=(64, 256)),
        "partial blocks": lambda: fp8((192, 768), (2, 6)),  # 192 rows: the second block row is half full
    }[layout]()
    scales = np.repeat(np.asarray(_mosaic.fp8_scales_t(w)).T, 128, axis=1)  # [out, in]
    got = (np.asarray(w.weight.astype(jnp.float32)) * scales).astype(np.float32)  # float32 products
    for dt in w.roundings:  # then the weight's roundings, as the kernel rounds to x's dtype
        got = got.astype(dt)
    assert_same_bits(got.astype(np.float32), np.asarray(w.dequantize(dtype=jnp.float32)))


def test_nested_absmax_decoded_by_the_kernel_where_it_can(hopper, monkeypatch):
    """A nested absmax reaches the kernel as stored (no XLA gather of its table before the call) where each
    program's codes, nested absmax and table can be copied whole (TMA: 16-byte units; rows of codes a
    multiple of 16) and fit in shared memory beside the pipeline; elsewhere XLA decodes it first."""
    cases = {  # (out, in), rows of x: taken by the kernel either way
        "in 1024": ((128, 1024), 16),
        "in 3072, 64 rows": ((256, 3072), 64),
        "in 14336, 128 rows": ((64, 14336), 128),
    }
    for name, (shape, m) in cases.items():
        w, x = nf4(shape, seed=m), x_for(m, shape[1], jnp.bfloat16)
        text = _lowered(x, w)
        assert "mosaic_gpu" in text and "gather" not in text, name
        monkeypatch.setattr(_mosaic, "_nested_in_kernel", False)
        assert "gather" in _lowered(x, w), name  # the switch: XLA decodes it before the call
        monkeypatch.setattr(_mosaic, "_nested_in_kernel", True)
    for name, (w, x) in {
        "codes' rows not 16-byte units (in 512)": (nf4((128, 512)), x_for(16, 512, jnp.bfloat16)),
        "a program's columns not 16-byte units, and rows of 272 codes (in 17408)": (
            nf4((64, 17408)),
            x_for(16, 17408, jnp.bfloat16),
        ),
    }.items():
        text = _lowered(x, w)
        assert "mosaic_gpu" in text and "gather" in text, name
    # what a program holds: its own columns of codes where they are whole 16-byte units, else whole rows
    nested = _mosaic.Nested(jnp.zeros((64, 64), jnp.uint8), jnp.zeros(16), jnp.zeros(256), jnp.zeros(1), 256)
    assert _mosaic._nested_copy(nested, 64, 16, smem=0) == "own"
    assert _mosaic._nested_copy(nested, 64, 8, smem=0) == "rows"
    assert _mosaic._nested_copy(nested, 64, 8, smem=_mosaic._SMEM_LIMIT) is None
    assert _mosaic._nested_copy(nested._replace(nested_blocksize=128), 64, 16, smem=0) == "own"
    assert _mosaic._nested_copy(nested._replace(nested_blocksize=48), 64, 16, smem=0) is None  # 64 x 64 codes


def _kernel_ops(x, w) -> list[tuple[tuple[str, ...], str]]:
    """The kernel's operations with the operations that enclose each (``scan`` is the pipeline's loop,
    ``cond`` a ``pl.when``), from the traced program."""
    found: list[tuple[tuple[str, ...], str]] = []

    def walk(jaxpr, path):
        for eqn in jaxpr.eqns:
            found.append((path, eqn.primitive.name))
            for value in eqn.params.values():
                for sub in value if isinstance(value, (list, tuple)) else [value]:
                    sub = getattr(sub, "jaxpr", sub)
                    if hasattr(sub, "eqns"):
                        walk(sub, (*path, eqn.primitive.name))

    walk(jax.make_jaxpr(lambda x, w: jax_side.quantized_matmul(x, w))(x, w).jaxpr, ())
    kernel = next(i for i, (_, name) in enumerate(found) if name == "mpmd_map" or name == "pallas_call")
    depth = len(found[kernel + 1][0])  # the kernel body's own level
    return [(path[depth:], name) for path, name in found[kernel + 1 :] if len(path) >= depth]


def test_one_row_through_the_kernel_where_switched_on(hopper, monkeypatch):
    """One row of x goes to XLA's one-row reduction, or, with ``_mosaic._one_row``, to the Mosaic kernel
    (padded to 16 rows); ``jax.vmap`` over single rows hands the kernel the batch's rows together either way."""
    xb = x_for(3, 1024, jnp.bfloat16).reshape(3, 1, 1024)
    for w in (nf4((128, 1024), seed=1), fp8((256, 1024), (2, 8))):
        for one in (False, True):
            monkeypatch.setattr(_mosaic, "_one_row", one)
            assert ("mosaic_gpu" in _lowered(xb[0], w)) == one, (type(w).__name__, one)
            vmapped = jax.jit(jax.vmap(lambda x, w: jax_side.quantized_matmul(x, w), in_axes=(0, None)))
            assert "mosaic_gpu" in vmapped.trace(xb, w).lower(lowering_platforms=("cuda",)).as_text()
    # JAX 0.11 reuses a custom_vmap function's trace: each setting of the kernel's module gets a function
    # of its own, so that a setting read while the row is traced is read again
    monkeypatch.setattr(_mosaic, "_one_row", True)
    w = nf4((128, 1024), seed=1)
    _fused._one_row_batchable.cache_clear()
    for products in (True, False, True):
        monkeypatch.setattr(_mosaic, "_products", products)
        _lowered(xb[0], w)
    assert _fused._one_row_batchable.cache_info().currsize == 2


def test_grid_scales_are_waited_for_inside_the_pipeline(hopper, monkeypatch):
    """A program's row of an FP8 scale grid is waited for at the pipeline's first step, after the pipeline
    has issued its first copies of W and x (``_grid_wait_in_loop = False``: before the pipeline); a nested
    absmax's three copies are waited for, and decoded, before the pipeline either way."""
    x = x_for(16, 1024, jnp.bfloat16)
    for in_loop in (True, False):
        monkeypatch.setattr(_mosaic, "_grid_wait_in_loop", in_loop)
        for w, held, moves in (
            (fp8((256, 1024), (2, 8)), ["barrier_wait"], True),
            (nf4((128, 1024), seed=3), ["barrier_wait"] * 3 + ["inline_mgpu_p"], False),
        ):
            waits = [
                (path, name) for path, name in _kernel_ops(x, w) if name in ("barrier_wait", "inline_mgpu_p")
            ]
            at_first_step = [name for path, name in waits if path[-2:] == ("scan", "cond")]
            before_loop = [name for path, name in waits if "scan" not in path]
            want = (held, []) if in_loop and moves else ([], held)
            assert (at_first_step, before_loop) == want, (in_loop, held)


@pytest.mark.parametrize("span", [64, 128])
def test_x_ordered_for_the_nibbles(span):
    """Each ``span`` columns of x reach the 4-bit kernel evens first (they meet the high nibbles), then odds,
    transposed with x's rows padded to the MMA's N."""
    x = np.random.default_rng(span).standard_normal((5, 3 * span)).astype(np.float32)
    padded = np.zeros((16, 3 * span), np.float32)
    padded[:5] = x
    units = [padded[:, u * span : (u + 1) * span] for u in range(3)]
    want = np.concatenate([part.T for unit in units for part in (unit[:, 0::2], unit[:, 1::2])])
    got = np.asarray(_mosaic._paired_t(jnp.asarray(x, jnp.bfloat16), span).astype(jnp.float32))
    assert_same_bits(got, want.astype(jnp.bfloat16).astype(np.float32))
    with pytest.raises(ValueError, match="192 columns are not whole spans of 128"):
        _mosaic._paired_t(jnp.zeros((2, 192), jnp.bfloat16), 128)


def test_the_kernels_own_limits_are_refused_with_reasons():
    q, a = jnp.zeros((64, 256), jnp.uint8), jnp.zeros((8, 64), jnp.float32)
    with pytest.raises(ValueError, match="up to 128 rows of x, got 129"):
        _mosaic.kernel(jnp.zeros((129, 512), jnp.bfloat16), q, a, table=standard_code("nf4"))
    with pytest.raises(ValueError, match="split=3 does not divide the contraction's 2 steps"):
        _mosaic.kernel(jnp.zeros((4, 512), jnp.bfloat16), q, a, table=standard_code("nf4"), split=3)
    q, a = jnp.zeros((64, 384), jnp.uint8), jnp.zeros((12, 64), jnp.float32)  # 768 columns: 1.5 steps of 512
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_mosaic, "_BLOCKS", 8)
        with pytest.raises(ValueError, match="384 stored columns are not whole pipeline steps of 256"):
            _mosaic.kernel(jnp.zeros((4, 768), jnp.bfloat16), q, a, table=standard_code("nf4"))


def test_not_chosen_off_hopper_nor_where_x_varies(hopper, monkeypatch):
    from jax.sharding import PartitionSpec as P

    w = nf4((128, 512))
    x = x_for(4, 512, jnp.bfloat16)
    mesh = jax.sharding.Mesh(np.array(jax.devices("cpu")[:1]), ("d",))
    f = jax.shard_map(jax_side.quantized_matmul, mesh=mesh, in_specs=(P("d"), P()), out_specs=P("d"))
    text = jax.jit(f).trace(x, w).lower(lowering_platforms=("cuda",)).as_text()
    assert "mosaic_gpu" not in text and "__gpu$xla.gpu.triton" in text  # the Triton kernel declares variance
    monkeypatch.setattr(_mosaic, "_force", None)  # this machine's own devices decide
    assert _mosaic.takes(x, w) == _mosaic._hopper()
    monkeypatch.setattr(_mosaic, "_force", False)
    assert _kernels(x, w) == {"triton"}


# ------------------------------------------------------------------------------------- weights sharing x

GROUPS = {
    "nf4 nested q/k/v": lambda: [nf4((256, 1024)), nf4((64, 1024), seed=1), nf4((64, 1024), seed=2)],
    "nf4 plain gate/up": lambda: [nf4((192, 512), nested=False), nf4((192, 512), nested=False, seed=3)],
    "fp8 block 128": lambda: [fp8((256, 1024), (2, 8)), fp8((128, 1024), (1, 8), seed=3)],
    "fp8 per-row": lambda: [fp8((128, 512), (128, 1)), fp8((64, 512), (64, 1), seed=5)],
    "odd shapes (not the kernel's)": lambda: [nf4((70, 384)), nf4((33, 384), seed=1), fp8((40, 384), (1, 3))],
}


def _mosaic_launches(f, *args) -> int:
    text = jax.jit(f).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    return len(re.findall(r"custom_call @mosaic_gpu", text))


@pytest.mark.parametrize("name", list(GROUPS))
def test_weights_sharing_x_give_what_each_gives_alone(name):
    """``quantized_matmuls(x, ws)`` gives ``quantized_matmul(x, w)`` for each weight, bit for bit on the CPU
    (where each is expanded), on every path, jitted and not, for 1-3-D x; its gradient to x is the sum of
    theirs; vmap over x batches it."""
    ws = GROUPS[name]()
    k = ws[0].shape[1]
    for shape in ((5, k), (2, 3, k), (1, k), (k,)):
        x = jnp.asarray(np.random.default_rng(len(shape)).standard_normal(shape), jnp.bfloat16)
        for path in ("auto", "expand", "interpret"):
            if path == "interpret" and any(_fused.fits_kernel(w) for w in ws):
                continue
            with jax_side.matmul_path(path):
                for run in (
                    jax_side.quantized_matmuls,
                    jax.jit(lambda x, ws: jax_side.quantized_matmuls(x, ws)),
                ):
                    got = run(x, ws)
                    assert isinstance(got, tuple) and len(got) == len(ws)
                    for y, w in zip(got, ws):
                        assert_same_bits(y, jax.jit(jax_side.quantized_matmul)(x, w))
    x = x_for(6, k, jnp.bfloat16, seed=9)

    def total(f):
        return lambda x: sum(y.astype(jnp.float32).sum() for y in f(x))

    grad = np.asarray(jax.jit(jax.grad(total(lambda x: jax_side.quantized_matmuls(x, ws))))(x), np.float64)
    each = jax.jit(jax.grad(total(lambda x: [jax_side.quantized_matmul(x, w) for w in ws])))(x)
    # the sum over the weights' rows in float64, each weight decoded to x's dtype: the gradient rounded once
    want = sum(np.asarray(w.dequantize().astype(x.dtype).astype(jnp.float32), np.float64).sum(0) for w in ws)
    np.testing.assert_allclose(grad, np.broadcast_to(want, grad.shape), rtol=2**-8, atol=1e-6)
    # the weights' gradients each rounded, then added: within a few roundings of the largest
    np.testing.assert_allclose(grad, np.asarray(each, np.float64), rtol=0, atol=2**-6 * np.abs(want).max())
    xb = x.reshape(2, 3, k)
    batched = jax.jit(jax.vmap(lambda x: jax_side.quantized_matmuls(x, ws)))(xb)
    for y, w in zip(batched, ws):
        # against the same program of one weight, jitted too: XLA's CPU dot of a batch dispatched op by op may
        # round one element otherwise (seen on an AVX2 machine: 1 of 1536, FP8 block 128)
        assert_same_bits(y, jax.jit(jax.vmap(lambda x, w=w: jax_side.quantized_matmul(x, w)))(xb))


def test_weights_sharing_x_refuse_what_quantized_matmul_refuses():
    ws = GROUPS["nf4 nested q/k/v"]()
    x = x_for(4, 1024, jnp.bfloat16)
    with pytest.raises(ValueError, match="at least one weight"):
        jax_side.quantized_matmuls(x, [])
    with pytest.raises(
        ValueError, match="weights\\[1\\]: x has 1024 features, the weight \\(64, 512\\) takes 512"
    ):
        jax_side.quantized_matmuls(x, [ws[0], nf4((64, 512))])
    with pytest.raises(
        TypeError,
        match=r"quantized_matmuls takes an NF4Weight or FP8Weight \(or an nnx Variable holding one\), got ndarray",
    ):
        jax_side.quantized_matmuls(x, [ws[0], np.zeros((4, 1024))])
    with pytest.raises(TypeError, match="x must be a floating-point array"):
        jax_side.quantized_matmuls(jnp.zeros((4, 1024), jnp.int32), ws)
    with pytest.raises(
        TypeError, match="a sequence of weights, got NF4Weight \\(one weight: quantized_matmul"
    ):
        jax_side.quantized_matmuls(x, ws[0])
    with pytest.raises(TypeError, match=r"a sequence of weights, got generator$"):
        jax_side.quantized_matmuls(x, (w for w in ws))
    with pytest.raises(TypeError, match=r"^x is a torch tensor"):  # about x: no weight named
        jax_side.quantized_matmuls(torch.zeros(4, 1024), ws)
    with pytest.raises(TypeError, match="forward mode"):
        jax.jvp(lambda x: jax_side.quantized_matmuls(x, ws), (x,), (x,))
    with jax_side.matmul_path("expand"):  # forward mode where each weight is expanded
        jax.jvp(lambda x: jax_side.quantized_matmuls(x, ws), (x,), (x,))


@pytest.mark.parametrize("fmt", ["NF4", "FP8"])
def test_weights_sharing_x_go_to_the_hopper_kernel_in_one_launch(fmt, monkeypatch):
    """On a Hopper GPU (the kernel lowered here for CUDA), weights that share x and that the kernel takes
    are multiplied in one Mosaic launch; groups it cannot take together (another format, nested beside
    plain absmax, one row of x, rows not whole tiles) are multiplied one launch per weight, as alone."""
    monkeypatch.setattr(_mosaic, "_force", True)
    ws = GROUPS["nf4 nested q/k/v" if fmt == "NF4" else "fp8 block 128"]()
    k = ws[0].shape[1]

    def group(x, ws):
        return jax_side.quantized_matmuls(x, ws)

    for m in (2, 16, 33, 128):
        x = x_for(m, k, jnp.bfloat16)
        assert _mosaic_launches(group, x, ws) == 1, m
        assert _mosaic_launches(lambda x, ws: [jax_side.quantized_matmul(x, w) for w in ws], x, ws) == len(ws)
    x = x_for(16, k, jnp.bfloat16)
    other = fp8((64, k), (1, k // 128)) if fmt == "NF4" else nf4((64, k))
    assert _mosaic_launches(group, x, [*ws, other]) == len(ws) + 1
    if fmt == "NF4":
        assert _mosaic_launches(group, x, [ws[0], nf4((64, k), nested=False)]) == 2
    assert _mosaic_launches(group, x_for(1, k, jnp.bfloat16), ws) == 0  # XLA's one-row reduction
    assert _mosaic_launches(group, x, [ws[0], ws[1]]) == 1
    odd = GROUPS["odd shapes (not the kernel's)"]()
    assert _mosaic_launches(group, x_for(16, 384, jnp.bfloat16), odd) == 0
    with jax_side.matmul_path("interpret"):
        assert _mosaic_launches(group, x, ws) == 0


def test_fused_linears_keep_each_modules_bias_and_lora(monkeypatch):
    """``fused_linears`` gives each module's own output: QuantLinear modules with and without biases and LoRA
    adapters (non-zero ``lora_B``), bit for bit on the CPU; the biases' and adapters' gradients bit for bit,
    x's within the sum's rounding; dense ``nnx.Linear`` modules are called one by one. On a Hopper GPU the
    kept modules of one compute dtype take one launch, also beside a dense module; bad arguments are refused
    by name."""
    ws = GROUPS["nf4 nested q/k/v"]()
    rng = np.random.default_rng(0)
    mods = [
        jax_side.QuantLinear(ws[0], jnp.asarray(rng.standard_normal(256), jnp.float32)),
        jax_side.QuantLinear(ws[1], lora=jax_side.LoraConfig(r=4), rngs=nnx.Rngs(1)),
        jax_side.QuantLinear(ws[2], jnp.asarray(rng.standard_normal(64), jnp.float32)),
    ]
    mods[1].lora.lora_B[...] = jnp.asarray(rng.standard_normal((4, 64)) * 0.1, jnp.float32)
    x = x_for(5, 1024, jnp.bfloat16)
    got = jax_side.fused_linears(x, mods)
    for y, m in zip(got, mods):
        assert_same_bits(y, m(x))
    assert got[0].dtype == jnp.float32  # promoted with the float32 bias, as nnx.Linear does

    def loss(mods, x, fused):
        ys = jax_side.fused_linears(x, mods) if fused else [m(x) for m in mods]
        return sum(y.astype(jnp.float32).sum() for y in ys)

    graphdef, params, rest = nnx.split(tuple(mods), nnx.Param, ...)
    grads = {}
    for fused in (True, False):
        f = lambda p, x, fused=fused: loss(nnx.merge(graphdef, p, rest), x, fused)  # noqa: E731
        grads[fused] = jax.jit(jax.grad(f, argnums=(0, 1)))(params, x)
    # the biases' and adapters' gradients are the modules' own; x's sums the two float32 modules' products
    # (grouped) in one dot, so it is rounded once where the modules' calls round each
    for a, b in zip(jax.tree.leaves(grads[True][0]), jax.tree.leaves(grads[False][0])):
        assert_same_bits(a, b)
    gx, want = (np.asarray(grads[f][1], np.float64) for f in (True, False))
    np.testing.assert_allclose(gx, want, rtol=0, atol=2**-6 * np.abs(want).max())
    assert len(jax.tree.leaves(grads[True][0])) == 4  # two biases, lora_A, lora_B
    dense = nnx.Linear(1024, 32, rngs=nnx.Rngs(0))
    for y, m in zip(jax_side.fused_linears(x, [mods[0], dense]), [mods[0], dense]):
        assert_same_bits(y, m(x))
    with pytest.raises(ValueError, match="at least one module"):
        jax_side.fused_linears(x, [])
    with pytest.raises(
        TypeError,
        match=r"modules\[1\] is a NF4Weight \(kept weights themselves: jax_side.quantized_matmuls",
    ):
        jax_side.fused_linears(x, [mods[0], ws[1]])
    with pytest.raises(TypeError, match="a sequence of modules, got QuantLinear"):
        jax_side.fused_linears(x, mods[0])
    with pytest.raises(TypeError, match=r"modules\[1\] is a QuantizedVariable \(kept weights themselves"):
        jax_side.fused_linears(x, [mods[0], mods[1].weight])
    dense = nnx.Linear(256, 32, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"x has 256 features, the weight \(256, 1024\) takes 1024"):
        jax_side.fused_linears(
            x_for(3, 256, jnp.bfloat16), [dense, mods[0], mods[2]]
        )  # the module's own words
    monkeypatch.setattr(_mosaic, "_force", True)
    x16 = x_for(16, 1024, jnp.bfloat16)
    plain = [jax_side.QuantLinear(w, dtype=jnp.bfloat16) for w in ws]
    assert _mosaic_launches(lambda x: jax_side.fused_linears(x, plain), x16) == 1
    # a dense module among them is called alone; the kept ones still take one launch; a float32 one its own
    f32 = jax_side.QuantLinear(ws[1], dtype=jnp.float32)
    mixed = [plain[0], nnx.Linear(1024, 32, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)), plain[1], f32, plain[2]]
    assert _mosaic_launches(lambda x: jax_side.fused_linears(x, mixed), x16) == 1
    monkeypatch.setattr(_mosaic, "_force", None)
    for y, m in zip(jax_side.fused_linears(x16, mixed), mixed):
        assert_same_bits(y, m(x16))
    # a wrapped QuantLinear.__call__ (qbridge.parity's trace watches each module so) sees every module called
    seen = []
    own = jax_side.QuantLinear.__call__

    def watched(self, x):
        seen.append(self)
        return own(self, x)

    monkeypatch.setattr(jax_side.QuantLinear, "__call__", watched)
    got = jax_side.fused_linears(x16, plain)
    assert [id(m) for m in seen] == [id(m) for m in plain]
    for y, m in zip(got, plain):
        assert_same_bits(y, own(m, x16))


# ------------------------------------------------------------------------------------------------ GPU


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(WEIGHTS))
def test_kernel_on_the_gpu(name):
    w = jax.device_put(WEIGHTS[name](), jax.devices("gpu")[0])
    for dtype, m in ((jnp.bfloat16, 1), (jnp.bfloat16, 40), (jnp.bfloat16, 70), (jnp.float32, 5),
                     (jnp.float16, 16), (jnp.float32, 1), (jnp.float16, 1)):  # fmt: skip  # 70: FP8's 64x128 tiles
        x = jax.device_put(x_for(m, w.shape[1], dtype, seed=m), jax.devices("gpu")[0])
        with jax_side.matmul_path("auto"):
            lowered = jax.jit(jax_side.quantized_matmul).lower(x, w)
            # the kernel, not the expansion; one row: XLA's reduction
            assert ("__gpu$xla.gpu.triton" in lowered.as_text()) == (m > 1)
            got = lowered.compile()(x, w)
        assert_close(got, x, w)


@pytest.mark.gpu
def test_no_dense_weight_in_the_compiled_program():
    rng = np.random.default_rng(0)
    n, k = 4096, 4096
    w = jax_side.NF4Weight(packed=jnp.asarray(rng.integers(0, 256, n * k // 2, dtype=np.uint8)),
                           absmax=jnp.asarray(rng.integers(0, 256, n * k // 64, dtype=np.uint8)),
                           nested_absmax=jnp.asarray(rng.random(n * k // 64 // 256, dtype=np.float32) * 0.01),
                           nested_code=jnp.asarray(np.sort(rng.uniform(-1, 1, 256)).astype(np.float32)),
                           offset=jnp.float32(0.02), shape=(n, k))  # fmt: skip
    f = jax_side.FP8Weight(jnp.asarray(rng.standard_normal((n, k)), jnp.float8_e4m3fn),
                           jnp.asarray(rng.random((n // 128, k // 128), dtype=np.float32)))  # fmt: skip
    for weight in (w, f):
        for m in (1, 16):  # one row: XLA's reduction; 16: the kernel
            x = jnp.asarray(rng.standard_normal((m, k)), jnp.bfloat16)
            temp = {}
            for path in ("auto", "expand"):
                with jax_side.matmul_path(path):
                    compiled = jax.jit(jax_side.quantized_matmul).lower(x, weight).compile()
                    temp[path] = compiled.memory_analysis().temp_size_in_bytes
            assert temp["expand"] >= n * k * 2  # the expansion holds a dense bf16 weight
            assert temp["auto"] < n * k * 2 // 8, (type(weight).__name__, m, temp)
        xb = jnp.asarray(rng.standard_normal((8, 1, k)), jnp.bfloat16)  # vmap over single rows
        with jax_side.matmul_path("auto"):
            f = jax.jit(jax.vmap(jax_side.quantized_matmul, in_axes=(0, None)))
            assert f.lower(xb, weight).compile().memory_analysis().temp_size_in_bytes < n * k * 2 // 8


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["nf4", "fp8"])
def test_kernel_inside_shard_map_with_varying_axes_checked(fmt):
    """Inside ``jax.shard_map`` with ``check_vma=True`` (its default) the kernel's result is declared to
    vary as x does (Pallas cannot infer it), and a replicated weight is made to vary alike: the kernel runs,
    forward and backward, as it does outside."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    gpu = jax.devices("gpu")[0]
    mesh = jax.sharding.Mesh(np.array([gpu]), ("d",))
    w = jax.device_put(nf4((64, 128)) if fmt == "nf4" else fp8((64, 128), (1, 1)), gpu)
    for m in (16, 1):  # the kernel; one row: XLA's reduction
        x = jax.device_put(x_for(m, 128, jnp.float32, seed=2), NamedSharding(mesh, P("d")))
        with jax_side.matmul_path("auto"):
            f = jax.shard_map(jax_side.quantized_matmul, mesh=mesh, in_specs=(P("d"), P()), out_specs=P("d"))
            assert ("__gpu$xla.gpu.triton" in jax.jit(f).lower(x, w).as_text()) == (m > 1)
            got = jax.jit(f)(x, w)
            grad = jax.jit(jax.grad(lambda x, w, f=f: f(x, w).sum()))(x, w)
        assert_close(got, x, w)  # float64 reference (XLA's own float32 dot on a GPU rounds to TF32)
        dense = np.asarray(w.dequantize(dtype=jnp.float32), np.float64)
        np.testing.assert_allclose(np.asarray(grad, np.float64), np.broadcast_to(dense.sum(0), (m, 128)),
                                   rtol=1e-3, atol=1e-3)  # fmt: skip


@pytest.mark.gpu
def test_training_step_on_the_gpu():
    """QLoRA's step on the GPU: gradients through the kernel's backward equal those of expand-then-matmul."""
    gpu = jax.devices("gpu")[0]
    w = jax.device_put(nf4((256, 512)), gpu)
    layer = jax_side.QuantLinear(w, None, lora=jax_side.LoraConfig(r=8), rngs=nnx.Rngs(0))
    x = jax.device_put(x_for(24, 512, jnp.bfloat16), gpu)
    grads = {}
    for path in ("auto", "expand"):
        with jax_side.matmul_path(path):
            g = nnx.jit(nnx.grad(lambda m, x: (m(x).astype(jnp.float32) ** 2).sum()))(layer, x)
        grads[path] = {p: np.asarray(v[...], np.float32) for p, v in nnx.to_flat_state(g)}
    assert set(grads["auto"]) == {("lora", "lora_A"), ("lora", "lora_B")}
    for p in grads["auto"]:
        np.testing.assert_allclose(
            grads["auto"][p], grads["expand"][p], rtol=3e-2, atol=1e-2 * np.abs(grads["expand"][p]).max()
        )


def _on_hopper() -> bool:
    return _mosaic._hopper() and _mosaic._unavailable() is None


@pytest.mark.gpu
def test_a_quads_shared_tables_give_the_bits_of_each_threads_own():
    """The product tables made a quarter per thread and shared in the quad give the same outputs, bit for bit,
    as each thread making them whole: nested and plain absmax, NF4 and FP4, both dtypes, x's rows padded."""
    if not _on_hopper():
        pytest.skip(f"needs a Hopper GPU and Pallas' Mosaic GPU lowering ({_mosaic._unavailable()})")
    gpu = jax.devices("gpu")[0]
    weights = [
        nf4((192, 768), quant_type="fp4", nested=False),
        nf4((1024, 4096), seed=4),
        nf4((320, 1024), seed=6),
    ]
    for w in weights:
        w = jax.device_put(w, gpu)
        for m, dtype in ((2, jnp.bfloat16), (16, jnp.float16), (33, jnp.bfloat16), (128, jnp.bfloat16)):
            x = jax.device_put(x_for(m, w.shape[1], dtype, seed=m), gpu)
            weight = dataclasses.replace(w, dtype=jnp.dtype(dtype).name)
            got = {}
            for quad in (True, False):
                with pytest.MonkeyPatch.context() as mp:
                    mp.setattr(_mosaic, "_quad_tables", quad)
                    lowered = jax.jit(lambda x, w: _mosaic.nf4_matmul(x, w)).lower(x, weight)  # traced here
                got[quad] = np.asarray(lowered.compile()(x, weight).astype(jnp.float32))
            np.testing.assert_array_equal(got[True], got[False], err_msg=f"{w.shape} {m} {dtype}")
            assert np.abs(got[True]).max() > 0
            assert_close(got[True].astype(dtype), x, weight)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "make",
    [lambda: nf4((128, 512)), lambda: nf4((192, 768), quant_type="fp4", nested=False), lambda: nf4((4096, 4096), seed=3),
     lambda: nf4((1024, 4096), seed=4), lambda: dataclasses.replace(nf4((1024, 4096), seed=5), nested_code=None),
     lambda: fp8((256, 512), (2, 4)), lambda: fp8((128, 512), (128, 1)), lambda: fp8((4096, 4096), (32, 32), seed=3)],
    ids=["nf4 nested", "fp4 plain", "nf4 4096x4096", "nf4 1024x4096", "nf4 1024x4096 standard table left out",
         "fp8 block 128", "fp8 per-row", "fp8 4096x4096"],
)  # fmt: skip
@pytest.mark.parametrize(
    "products, quad", [(False, False), (True, True), (True, False)],
    ids=["lookup", "product tables", "product tables each thread makes whole"],
)  # fmt: skip
def test_on_a_hopper_gpu(make, products, quad, monkeypatch):
    monkeypatch.setattr(_mosaic, "_products", products)
    monkeypatch.setattr(_mosaic, "_quad_tables", quad)
    if not _on_hopper():
        pytest.skip(f"needs a Hopper GPU and Pallas' Mosaic GPU lowering ({_mosaic._unavailable()})")
    w = make()
    if products and isinstance(w, jax_side.FP8Weight):
        pytest.skip("the product tables are a 4-bit decode")
    gpu = jax.devices("gpu")[0]
    w = jax.device_put(w, gpu)
    # each call a function of its own: the module's switches are read when a call is traced
    for m, dtype in (
        (1, jnp.bfloat16),  # through the kernel where _mosaic._one_row is on, else XLA's one-row reduction
        (2, jnp.bfloat16),
        (5, jnp.float16),
        (16, jnp.bfloat16),
        (17, jnp.bfloat16),
        (64, jnp.bfloat16),
        (_mosaic.MAX_ROWS, jnp.float16),
    ):
        x = jax.device_put(x_for(m, w.shape[1], dtype, seed=m), gpu)
        weight = dataclasses.replace(w, dtype=jnp.dtype(dtype).name)  # decoding to x's dtype: rounded once
        lowered = jax.jit(lambda x, w: jax_side.quantized_matmul(x, w)).lower(x, weight)
        assert ("mosaic_gpu" in lowered.as_text()) == (m > 1 or _mosaic._one_row), m
        assert_close(lowered.compile()(x, weight), x, weight)
    matmul = _mosaic.nf4_matmul if isinstance(w, jax_side.NF4Weight) else _mosaic.fp8_matmul
    k = w.shape[1]
    dense = np.asarray(w.dequantize(), np.float32)  # bfloat16 values, widened
    for m in (16, 33, 64, 100, 128):  # also the kernel's own limit, called directly
        x = jax.device_put(x_for(m, k, jnp.bfloat16, seed=m), gpu)
        assert_close(jax.jit(lambda x, w: matmul(x, w))(x, w), x, w)
        # one-hot rows pick single columns of the weight: each output is one decoded element, bit for bit
        cols = np.random.default_rng(m).choice(k, m, replace=False)
        cols[:4] = [0, 1, 63 % k, k - 1]  # both nibbles, a block's last column, the row's last
        onehot = jax.device_put(jnp.asarray(np.eye(k, dtype=np.float32)[cols], jnp.bfloat16), gpu)
        got = np.asarray(jax.jit(lambda x, w: matmul(x, w))(onehot, w), np.float32)
        # a nested absmax the kernel decodes itself (in 4096: whole 16-byte units of codes, its own columns
        # at 4096 rows, whole rows at 1024) rounds twice, as the eager decode does
        by_kernel = getattr(w, "nested_absmax", None) is not None and k % 1024 == 0
        if (
            getattr(w, "nested_absmax", None) is None or by_kernel
        ):  # equal values: a -0.0 element sums to +0.0
            np.testing.assert_array_equal(got, dense[:, cols].T)
        else:  # a jitted nested absmax may round once where the eager decode rounds twice: one bf16 step
            np.testing.assert_allclose(got, dense[:, cols].T, rtol=2**-8, atol=0)
    xb = jax.device_put(x_for(12, k, jnp.bfloat16, seed=7).reshape(3, 4, k), gpu)
    got = jax.jit(jax.vmap(lambda x, w: jax_side.quantized_matmul(x, w), in_axes=(0, None)))(xb, w)
    for i in range(3):
        assert_close(got[i], xb[i], w)
    # value and gradient together: the forward (through the kernel) is kept, not cut away as unused
    value, grad = jax.jit(
        jax.value_and_grad(lambda x: jax_side.quantized_matmul(x, w).astype(jnp.float32).sum())
    )(xb[0])
    np.testing.assert_allclose(float(value), float(np.asarray(got[0], np.float64).sum()), rtol=1e-2)
    dense64 = np.asarray(w.dequantize(dtype=jnp.float32), np.float64)
    np.testing.assert_allclose(np.asarray(grad, np.float64), np.broadcast_to(dense64.sum(0), grad.shape),
                               rtol=2e-2, atol=2e-2 * np.abs(dense64.sum(0)).max())  # fmt: skip


def _alone(x, w, split):
    """:func:`_mosaic.matmul` of one weight with the contraction split ``split`` ways."""
    if isinstance(w, jax_side.NF4Weight):
        return _mosaic.kernel(x, *_mosaic._stored(w), table=standard_code(w.quant_type), split=split)
    rows = _mosaic.grid_rows(w)
    if rows is None:
        return _mosaic.fp8_kernel(x, w.weight, _mosaic.fp8_scales_t(w), split=split)
    return _mosaic.fp8_kernel(x, w.weight, _mosaic.scale_grid(w), scale_rows=rows, split=split)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "make",
    [lambda: [nf4((512, 4096)), nf4((128, 4096), seed=1), nf4((128, 4096), seed=2)],
     lambda: [nf4((192, 1024), nested=False), nf4((320, 1024), nested=False, seed=3)],
     lambda: [nf4((256, 2048), quant_type="fp4"), nf4((64, 2048), quant_type="fp4", seed=4)],
     lambda: [fp8((512, 4096), (4, 32)), fp8((128, 4096), (1, 32), seed=3), fp8((128, 4096), (1, 32), seed=4)],
     lambda: [fp8((128, 1024), (128, 1)), fp8((64, 1024), (64, 1), seed=5)]],
    ids=["nf4 nested q/k/v", "nf4 plain", "fp4 nested", "fp8 block 128 q/k/v", "fp8 per-row"],
)  # fmt: skip
def test_weights_sharing_x_on_a_hopper_gpu(make):
    """One Mosaic launch for weights that share x: each result equals expand-then-matmul within the
    accumulation's tolerance, and, with the contraction split alike, each weight's columns are the bits of
    the kernel on that weight alone; gradients to x and vmap over x as for one weight."""
    if not _on_hopper():
        pytest.skip(f"needs a Hopper GPU and Pallas' Mosaic GPU lowering ({_mosaic._unavailable()})")
    gpu = jax.devices("gpu")[0]
    ws = jax.device_put(make(), gpu)
    k = ws[0].shape[1]
    for m, dtype in (
        (2, jnp.bfloat16),
        (16, jnp.bfloat16),
        (33, jnp.float16),
        (_mosaic.MAX_ROWS, jnp.bfloat16),
    ):
        x = jax.device_put(x_for(m, k, dtype, seed=m), gpu)
        group = [dataclasses.replace(w, dtype=jnp.dtype(dtype).name) for w in ws]  # decoded to x's dtype
        lowered = jax.jit(lambda x, ws: jax_side.quantized_matmuls(x, ws)).lower(x, group)
        assert len(re.findall(r"custom_call @mosaic_gpu", lowered.as_text())) == 1, m
        for y, w in zip(lowered.compile()(x, group), group):
            assert_close(y, x, w)
        for split in (1, 2, 4):
            together = jax.jit(lambda x, ws, s=split: _mosaic.matmul_group(x, ws, split=s))(x, group)
            for y, w in zip(together, group):
                print(f"{m} rows, split {split}, weight {w.shape}")  # shown where the bits differ
                assert_same_bits(y, jax.jit(lambda x, w, s=split: _alone(x, w, s))(x, w))
    xb = jax.device_put(x_for(12, k, jnp.bfloat16, seed=7).reshape(3, 4, k), gpu)
    batched = jax.jit(jax.vmap(lambda x, ws: jax_side.quantized_matmuls(x, ws), in_axes=(0, None)))(xb, ws)
    for y, w in zip(batched, ws):
        for i in range(3):
            assert_close(y[i], xb[i], w)
    value, grad = jax.jit(jax.value_and_grad(
        lambda x: sum(y.astype(jnp.float32).sum() for y in jax_side.quantized_matmuls(x, ws))
    ))(xb[0])  # fmt: skip
    want = sum(float(np.asarray(y[0], np.float64).sum()) for y in batched)
    np.testing.assert_allclose(float(value), want, rtol=1e-2, atol=1e-2 * abs(want) + 1)
    rows = sum(np.asarray(w.dequantize(dtype=jnp.float32), np.float64).sum(0) for w in ws)
    np.testing.assert_allclose(np.asarray(grad, np.float64), np.broadcast_to(rows, grad.shape),
                               rtol=2e-2, atol=2e-2 * np.abs(rows).max())  # fmt: skip
