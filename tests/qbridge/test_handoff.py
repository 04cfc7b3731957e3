"""qbridge.to_jax / to_torch / dequantize_to_jax on the CPU (GPU behaviour: test_handoff_gpu.py)."""

from __future__ import annotations

import gc

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from helpers import bnb_quantize, bnb_reference, fp8_reference_loops, random_fp8, random_scales, to_numpy

import qbridge
import torch_side

ALIASABLE = [
    torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.float16, torch.bfloat16, torch.float32,
    torch.float8_e4m3fn, torch.float8_e5m2, torch.complex64,
]  # fmt: skip


def _random(shape, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.rand(shape, generator=gen) > 0.5
    if dtype.is_floating_point and dtype.itemsize == 1:
        return random_fp8(shape, seed=seed, dtype=dtype)
    if dtype.is_floating_point or dtype.is_complex:
        return (
            torch.randn(shape, generator=gen, dtype=torch.float32).to(dtype)
            if not dtype.is_complex
            else torch.randn(shape, generator=gen, dtype=dtype)
        )
    info = torch.iinfo(dtype)
    return torch.randint(
        max(info.min, -1000), min(info.max, 1000), shape, generator=gen, dtype=torch.int64
    ).to(dtype)


def _same(x: jax.Array, t: torch.Tensor) -> None:
    want = to_numpy(t)
    got = np.asarray(x)
    assert got.shape == want.shape and got.dtype == want.dtype, (got.dtype, want.dtype)
    assert np.array_equal(
        got.reshape(-1).view(f"u{got.dtype.itemsize}"), want.reshape(-1).view(f"u{want.dtype.itemsize}")
    )


@pytest.mark.parametrize("dtype", ALIASABLE, ids=str)
def test_zero_copy_for_every_aliasable_dtype(dtype):
    t = _random((64, 48), dtype)
    x = qbridge.to_jax(t, copy=False)
    assert x.unsafe_buffer_pointer() == t.data_ptr()
    assert x.devices() == {jax.devices("cpu")[0]}
    _same(x, t)


def test_permuted_views_alias_with_their_layout():
    t = torch.randn(64, 32)
    x = qbridge.to_jax(t.t(), copy=False)
    assert x.unsafe_buffer_pointer() == t.data_ptr() and x.shape == (32, 64)
    _same(x, t.t())
    np.testing.assert_allclose(
        np.asarray(jax.jit(lambda a: a @ a.T)(x)), (t.t() @ t).numpy(), rtol=1e-5, atol=1e-4
    )
    p = torch.randn(2, 3, 64).permute(2, 0, 1)
    y = qbridge.to_jax(p, copy=False)
    assert y.unsafe_buffer_pointer() == p.data_ptr()
    _same(y, p)


def test_zero_copy_result_aliases_the_tensor():
    t = torch.zeros(128)
    x = qbridge.to_jax(t)
    t.fill_(3.0)  # documented: writes to the torch tensor show in the JAX array
    assert float(x[5]) == 3.0


def test_copy_true_is_independent():
    t = torch.randn(64, 64)
    x = qbridge.to_jax(t, copy=True)
    assert x.unsafe_buffer_pointer() != t.data_ptr()
    before = np.asarray(x).copy()
    t.add_(1.0)
    assert np.array_equal(np.asarray(x), before)


@pytest.mark.parametrize("offset", [1, 2, 4, 8])
def test_misaligned_views_are_copied_once(offset):
    base = torch.randn(4096)
    v = base[offset : offset + 1000]  # 4 * offset bytes past a 64-byte boundary
    x = qbridge.to_jax(v)
    _same(x, v)
    assert x.unsafe_buffer_pointer() != v.data_ptr()
    with pytest.raises(BufferError, match=r"bytes past a 64-byte boundary.*copy=None"):
        qbridge.to_jax(v, copy=False)
    np.testing.assert_allclose(float(jax.jit(jnp.sum)(x)), float(v.sum()), rtol=1e-4)


def test_bf16_two_bytes_off():
    base = torch.randn(4097).to(torch.bfloat16)
    v = base[1:]
    x = qbridge.to_jax(v)
    _same(x, v)
    assert float(jax.jit(lambda a: (a.astype(jnp.float32) * 2).sum())(x)) == pytest.approx(
        float(v.float().sum() * 2), rel=1e-3
    )


def test_non_compact_views():
    t = torch.randn(16, 100)
    for v in (t[:, :30], t[::2], t[:, None, :].expand(16, 3, 100), t.unsqueeze(0).expand(4, 16, 100)):
        x = qbridge.to_jax(v)
        _same(x, v)
        with pytest.raises(BufferError, match="not compact"):
            qbridge.to_jax(v, copy=False)


def test_odd_shapes():
    for t in (torch.empty(0, 5), torch.tensor(3.5), torch.randn(1, 7), torch.randn(5, 1, 1, 3)):
        x = qbridge.to_jax(t)
        _same(x, t)
    weird = torch.as_strided(torch.randn(16 * 64), (1, 5), (777, 1))  # size-1 dims may have any stride
    x = qbridge.to_jax(weird, copy=False)
    assert x.unsafe_buffer_pointer() == weird.data_ptr()
    _same(x, weird)


def test_int64_and_float64_with_x64_off():
    assert not jax.config.jax_enable_x64
    t = torch.arange(-5, 5, dtype=torch.int64)
    x = qbridge.to_jax(t)
    assert x.dtype == jnp.int32 and np.array_equal(np.asarray(x), t.numpy())
    with pytest.raises(BufferError, match="x64 off"):
        qbridge.to_jax(t, copy=False)
    with pytest.raises(ValueError, match=r"outside torch.int32"):
        qbridge.to_jax(torch.tensor([2**40]))
    for values, shown in (
        ([5, 2**64 - 7], r"\[5, 18446744073709551609\]"),
        ([2**63], r"\[9223372036854775808, 9223372036854775808\]"),
    ):
        with pytest.raises(
            ValueError, match=shown + ", outside torch.uint32"
        ):  # uint64 has no min/max in torch
            qbridge.to_jax(torch.tensor(values, dtype=torch.uint64))
    assert np.array_equal(
        np.asarray(qbridge.to_jax(torch.tensor([1, 2**32 - 1], dtype=torch.uint64))), [1, 2**32 - 1]
    )
    with pytest.warns(UserWarning, match="rounded to torch.float32"):
        y = qbridge.to_jax(torch.tensor([1.0 + 2**-40], dtype=torch.float64))
    assert y.dtype == jnp.float32
    # the warning names the tensor and points at the caller's line, whichever path made the copy
    for call in (
        lambda t: qbridge.to_jax(t),
        lambda t: qbridge.to_jax(t, copy=True),
        lambda t: qbridge.to_jax_many([t])[0],
    ):
        with pytest.warns(
            UserWarning, match=r"torch.float64 tensor of shape \(3,\) on cpu is rounded"
        ) as seen:
            call(torch.ones(3, dtype=torch.float64))
        assert seen[0].filename == __file__, seen[0].filename


def test_int64_with_x64_on():
    jax.config.update("jax_enable_x64", True)
    try:
        t = torch.tensor([2**40, -3], dtype=torch.int64)
        x = qbridge.to_jax(t, copy=False)
        assert x.dtype == jnp.int64 and x.unsafe_buffer_pointer() == t.data_ptr()
        d = torch.randn(8, dtype=torch.float64)
        assert qbridge.to_jax(d, copy=False).unsafe_buffer_pointer() == d.data_ptr()
    finally:
        jax.config.update("jax_enable_x64", False)


def test_requires_grad_is_detached_zero_copy():
    p = torch.nn.Parameter(torch.randn(32, 16))
    x = qbridge.to_jax(p, copy=False)
    assert x.unsafe_buffer_pointer() == p.data_ptr()


@pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor")
def test_quantized_inputs_are_dequantized():
    ao = pytest.importorskip("torchao.quantization")
    nf4 = ao.NF4Tensor.from_tensor(torch.randn(128, 128, dtype=torch.bfloat16), 64, 256)
    _same(qbridge.to_jax(nf4), nf4.get_original_weight())
    with pytest.raises(TypeError, match="copy=False forbids"):
        qbridge.to_jax(nf4, copy=False)
    lin = torch.nn.Linear(64, 32, bias=False).to(torch.bfloat16)
    ao.quantize_(lin, ao.Int8WeightOnlyConfig())
    _same(qbridge.to_jax(lin.weight), lin.weight.dequantize())
    bnb = pytest.importorskip("bitsandbytes")
    p = bnb.nn.Params4bit(torch.randn(48, 64, dtype=torch.float16), requires_grad=False, quant_type="nf4").to(
        "cpu"
    )
    _same(qbridge.to_jax(p), bnb_reference(p.data, p.quant_state))
    q = torch.quantize_per_tensor(torch.randn(4, 4), 0.1, 0, torch.qint8)
    _same(qbridge.to_jax(q), q.dequantize())


def test_lifetime_after_the_tensor_is_gone():
    t = torch.randn(1 << 16)
    want = t.numpy().copy()
    x = qbridge.to_jax(t)
    del t
    gc.collect()
    junk = [torch.full((1 << 16,), 7.0) for _ in range(8)]
    assert np.array_equal(np.asarray(x), want)
    del junk


def test_explicit_cpu_device_and_sharding():
    t = torch.randn(8, 8)
    cpu = jax.devices("cpu")[0]
    assert qbridge.to_jax(t, device=cpu, copy=False).unsafe_buffer_pointer() == t.data_ptr()
    sharding = jax.sharding.SingleDeviceSharding(cpu)
    assert qbridge.to_jax(t, device=sharding, copy=False).unsafe_buffer_pointer() == t.data_ptr()


def test_sparse_tensor_is_densified():
    s = torch.randn(6, 6).to_sparse()
    _same(qbridge.to_jax(s), s.to_dense())
    with pytest.raises(BufferError, match="sparse"):
        qbridge.to_jax(s, copy=False)


def test_bad_arguments():
    with pytest.raises(TypeError, match=r"takes a torch.Tensor"):
        qbridge.to_jax(np.zeros(3))
    with pytest.raises(TypeError, match="copy must be"):
        qbridge.to_jax(torch.zeros(3), copy="yes")
    with pytest.raises(TypeError, match="JAX has no"):
        qbridge.to_jax(torch.zeros(3, dtype=torch.complex32))
    with pytest.raises(ValueError, match="meta tensor"):
        qbridge.to_jax(torch.empty(3, device="meta"))
    with pytest.raises(TypeError, match=r"jax.Device"):
        qbridge.to_jax(torch.zeros(3), device=0)
    with pytest.raises(ValueError, match="is not a device"):
        qbridge.to_jax(torch.zeros(3), device="gpu0")


def test_many_tensors_are_handed_over_as_one_at_a_time():
    base = torch.randn(4096)
    tensors = [
        torch.randn(64, 32),
        base[1:1001],
        torch.arange(10, dtype=torch.int32),
        torch.randn(8, 8).t(),
        torch.zeros(0),
    ]
    xs = qbridge.to_jax_many(tensors)
    for t, x in zip(tensors, xs, strict=True):
        one = qbridge.to_jax(t)
        _same(x, t)
        assert x.dtype == one.dtype and x.shape == one.shape
        # aliased exactly where to_jax aliases (the misaligned view is copied by both)
        assert (x.unsafe_buffer_pointer() == t.data_ptr()) == (one.unsafe_buffer_pointer() == t.data_ptr())
    assert xs[0].unsafe_buffer_pointer() == tensors[0].data_ptr()
    assert qbridge.to_jax_many([]) == []
    from_generator = qbridge.to_jax_many(t for t in tensors[:2])  # any iterable, made whole first
    assert [x.shape for x in from_generator] == [x.shape for x in xs[:2]]
    with pytest.raises(BufferError, match=r"tensors\[1\]: cannot hand .* without a copy"):
        qbridge.to_jax_many(tensors[:2], copy=False)
    with pytest.raises(TypeError, match=r"tensors\[0\]: to_jax takes a torch.Tensor"):
        qbridge.to_jax_many([np.zeros(3)])
    with pytest.raises(TypeError, match="takes a list of torch tensors, got a Tensor"):
        qbridge.to_jax_many(tensors[0])  # its rows are no tensors to hand over


def test_to_torch_zero_copy_round_trip():
    x = jax.device_put(jnp.arange(12, dtype=jnp.float32).reshape(3, 4), jax.devices("cpu")[0])
    t = qbridge.to_torch(x)
    assert t.data_ptr() == x.unsafe_buffer_pointer()
    assert torch.equal(t, torch.arange(12, dtype=torch.float32).reshape(3, 4))
    back = qbridge.to_jax(t)
    assert back.unsafe_buffer_pointer() == x.unsafe_buffer_pointer()
    b = qbridge.to_torch(jax.device_put(jnp.ones(5, jnp.bfloat16), jax.devices("cpu")[0]))
    assert b.dtype == torch.bfloat16
    with pytest.raises(TypeError, match=r"takes a jax.Array"):
        qbridge.to_torch(np.zeros(3))


def test_dequantize_to_jax():
    _, packed, qs = bnb_quantize((48, 80), nested=True)
    want = bnb_reference(packed, qs)
    x = qbridge.dequantize_to_jax(packed, qs)
    _same(x, want)
    xt = qbridge.dequantize_to_jax(packed, qs, transpose=True)
    assert xt.shape == (80, 48)
    _same(xt, want.t())
    x32 = qbridge.dequantize_to_jax(packed, qs, dtype=torch.float32)
    assert x32.dtype == jnp.float32 and np.array_equal(np.asarray(x32), want.float().numpy())
    w = torch.randn(8, 8)
    assert qbridge.dequantize_to_jax(w).unsafe_buffer_pointer() == w.data_ptr()  # plain weights alias


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, "bfloat16"])
@pytest.mark.parametrize("transpose", [False, True])
def test_an_fp8_weight_is_decoded_straight_to_the_dtype_asked_for(dtype, transpose):
    """float32(W) * scale rounded once to dtype (a breaker found float32 asked for and bf16-rounded values
    given: the bf16 decode widened, 2e-3 relative off)."""
    W, s = random_fp8((300, 500), seed=21), random_scales((3, 4), seed=22)
    want = fp8_reference_loops(W, s, (128, 128), getattr(torch, dtype) if isinstance(dtype, str) else dtype)
    got = qbridge.dequantize_to_jax(W, s, dtype=dtype, transpose=transpose)
    _same(got, want.t() if transpose else want)


def test_is_compact():
    t = torch.randn(4, 5, 6)
    assert qbridge.is_compact(t) and qbridge.is_compact(t.permute(2, 0, 1)) and qbridge.is_compact(t[1])
    assert not qbridge.is_compact(t[:, :, :3]) and not qbridge.is_compact(t[:, ::2])


def test_a_nested_tensor_is_refused_with_what_to_do():
    nested = torch.nested.nested_tensor([torch.ones(2), torch.ones(3)], layout=torch.jagged)
    with pytest.raises(TypeError, match=r"nested tensor of 2 components.*t.unbind\(\)"):
        qbridge.to_jax(nested)
    with pytest.raises(TypeError, match=r"tensors\[1\]: to_jax takes a regular tensor"):
        qbridge.to_jax_many([torch.ones(2), nested])


def test_arrays_xla_allocates_take_torch_writes_once_their_shape_is_compiled():
    """XlaDestinations (the loader's GPU route, exercised here on JAX's CPU): a shape's first two writes
    return None (the caller copies another way), and the second starts compiling its allocation; then every
    write is a new array holding exactly the tensor's bits, in its own buffer, which later writes leave
    alone."""
    from qbridge import _handoff

    cpu = jax.devices("cpu")[0]
    into = _handoff.XlaDestinations()
    gen = torch.Generator().manual_seed(11)
    shape = (37, 29)  # a shape no other test allocates, so the first write finds nothing compiled
    first = torch.randn(shape, generator=gen).bfloat16()
    assert into.write(first, cpu) is None
    assert not any(key[0] == shape for key in _handoff._compiling)  # seen once: not worth a compile yet
    assert into.write(first, cpu) is None  # seen twice: compiling
    _handoff.wait_for_allocators()
    tensors = [torch.randn(shape, generator=gen).to(dtype) for dtype in (torch.bfloat16, torch.bfloat16)]
    tensors += [
        torch.randn(shape, generator=gen).half(),
        torch.randint(-128, 128, shape, generator=gen).to(torch.int8),
    ]
    for t in tensors[2:] * 2:  # other dtypes, other programs: compiled from their second write
        assert into.write(t, cpu) is None
    _handoff.wait_for_allocators()
    arrays = [into.write(t, cpu) for t in tensors]
    into.settle()
    assert len({a.unsafe_buffer_pointer() for a in arrays}) == len(arrays)
    for t, a in zip(tensors, arrays):
        assert a.shape == shape and a.dtype == jax.numpy.dtype(str(t.dtype).replace("torch.", ""))
        np.testing.assert_array_equal(np.asarray(a).view(np.uint8), to_numpy(t).view(np.uint8))
    # an allocation that fails (out of device memory, say) leaves the caller its own route, not an error
    bf16 = jax.numpy.dtype(jax.numpy.bfloat16)
    key = (shape, bf16, cpu, _handoff._pooled(shape, bf16))

    def exhausted():
        raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: out of memory while trying to allocate")

    compiled, _handoff._allocators[key] = _handoff._allocators[key], exhausted
    try:
        assert _handoff.XlaDestinations().write(tensors[0], cpu) is None
    finally:
        _handoff._allocators[key] = compiled
    # what it does not take: the caller keeps its own route
    assert into.write(torch.randn(shape, dtype=torch.float64), cpu) is None
    assert into.write(torch.empty(0, 29, dtype=torch.bfloat16), cpu) is None


def test_expected_arrays_of_a_shape_come_from_one_allocation_call():
    """XlaDestinations.expect (the loader says how many results of each shape it will hand over): a shape
    larger than POOL_BYTES, expected five times, is allocated four arrays at a time (the power of two at or
    below what is still expected), in one call once that call is compiled; each write is its own array with
    the tensor's bits; every write counts one down, also one whose array comes another way, so no call makes
    an array that will not be taken."""
    from qbridge import _handoff

    cpu = jax.devices("cpu")[0]
    shape = (2051, 2048)  # float32: over POOL_BYTES, so one array per call unless expected
    f32 = jax.numpy.dtype(jax.numpy.float32)
    kind = (shape, f32, cpu)
    assert _handoff._pooled(shape, f32) == 1
    gen = torch.Generator().manual_seed(12)
    tensors = [torch.randn(shape, generator=gen) for _ in range(5)]
    into = _handoff.XlaDestinations()
    for _ in range(2):  # two loads' first writes: the call for four is seen twice, and compiled
        into.expect(shape, torch.float32, cpu, 4)
        assert into.write(tensors[0], cpu) is None
        into.settle()
    _handoff.wait_for_allocators()
    assert (*kind, 4) in _handoff._allocators
    into.expect(shape, torch.float32, cpu, 5)
    arrays = [into.write(tensors[0], cpu)]
    assert len(into._spare[kind]) == 3  # the other three of the same call
    arrays += [into.write(t, cpu) for t in tensors[1:4]]
    assert not into._spare[kind] and into._expected[kind] == 1
    assert into.write(tensors[4], cpu) is None  # the last one: a call of one array, not compiled here
    assert into._expected[kind] == 0 and not into._spare.get(kind)  # counted down all the same; none left
    into.settle()
    assert len({a.unsafe_buffer_pointer() for a in arrays}) == 4
    for t, a in zip(tensors, arrays, strict=False):
        np.testing.assert_array_equal(np.asarray(a), t.numpy())
    # a write while a call is compiled still counts down: the next call is sized by what is left
    into.expect(shape, torch.float32, cpu, 3)
    assert into.write(tensors[0], cpu) is None  # the call for two (three expected) is not there
    assert into._expected[kind] == 2
    into.settle()


def test_a_small_shape_expected_once_gets_a_call_of_one_array():
    """A small shape (a norm's weight) that the loader expects once is allocated by a call making one array,
    not a pool of 32 (a call's host time grows with its arrays, and the other 31 would be dropped); a small
    shape nobody said would come still gets the pool."""
    from qbridge import _handoff

    cpu = jax.devices("cpu")[0]
    shape = (3, 77)
    f32 = jax.numpy.dtype(jax.numpy.float32)
    kind = (shape, f32, cpu)
    assert _handoff._pooled(shape, f32) == 32
    gen = torch.Generator().manual_seed(13)
    t = torch.randn(shape, generator=gen)
    for expected in (1, 0):
        into = _handoff.XlaDestinations()
        for _ in range(2):  # seen twice: compiled
            into.expect(shape, torch.float32, cpu, expected)
            assert into.write(t, cpu) is None
            into.settle()
        _handoff.wait_for_allocators()
        assert (*kind, 1 if expected else 32) in _handoff._allocators
        into.expect(shape, torch.float32, cpu, expected)
        a = into.write(t, cpu)
        assert len(into._spare[kind]) == (0 if expected else 31)
        into.settle()
        np.testing.assert_array_equal(np.asarray(a), t.numpy())


def test_no_thread_for_the_stream_scan_leaves_torch_asking_each_stream(monkeypatch):
    """Loading the compiled stream scan takes a thread at a process's first handoff; where none can be
    started (a process limit, or at interpreter exit on Python 3.12+), the handoff goes on with torch's
    queries instead of failing."""
    import threading

    from qbridge import _handoff

    def refuse(self):
        raise RuntimeError("can't create new thread at interpreter shutdown")

    monkeypatch.setattr(threading.Thread, "start", refuse)
    assert _handoff.load_library.__wrapped__() is None


def test_a_library_load_refused_by_a_misspelt_switch_is_logged_not_raised_in_its_thread(monkeypatch, caplog):
    """QBRIDGE_CPU_KERNEL misspelt after import: the library's load (in a thread, from a first handoff or a
    GPU load's groups) logs why it is not loaded instead of ending its thread with a traceback; torch's
    queries and reads from Python answer instead."""
    import logging

    from qbridge import _handoff
    from torch_side import _native

    for name, value in (("_FN", None), ("_UNAVAILABLE", False), ("_BUILDING", None)):  # not loaded yet
        monkeypatch.setattr(_native, name, value)
    monkeypatch.setenv("QBRIDGE_CPU_KERNEL", "of")
    with caplog.at_level(logging.WARNING, logger="qbridge"):
        _handoff._load_library()
    assert "torch_side's library is not loaded" in caplog.text and "got 'of'" in caplog.text


def test_a_dtensor_is_no_quantized_tensor_and_the_error_says_how_to_hand_it_over(tmp_path):
    """A DTensor (FSDP2's parameters) is a tensor subclass without a decode: to_jax said it could not
    "dequantize" it and named torchao's version; it now says how to take its values."""
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available():
        pytest.skip("torch without torch.distributed")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, distribute_tensor

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        d = distribute_tensor(torch.randn(4, 4), init_device_mesh("cpu", (1,)), [Replicate()])
        for call in (torch_side.dequantize_weight, qbridge.to_jax):
            with pytest.raises(
                NotImplementedError,
                match=r"^cannot dequantize a torch\.distributed\.tensor\.DTensor: it is no quantized tensor "
                r"qbridge knows .*: hand over W\.full_tensor\(\) \(the whole tensor\) or W\.to_local\(\)",
            ):
                call(d)
        assert np.array_equal(np.asarray(qbridge.to_jax(d.full_tensor())), d.full_tensor().numpy())
    finally:
        dist.destroy_process_group()
