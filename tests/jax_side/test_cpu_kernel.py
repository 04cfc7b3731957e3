"""jax_side's CPU decode through qbridge's C kernel (``jax_side/_cpu_kernel.py``): batching, derivatives,
its build in a fresh process without torch, and what answers when it cannot be had. Its values are checked
against bitsandbytes with every other decode test in ``test_dequant.py`` (run on both CPU paths)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from helpers import assert_same_bits, bnb_pieces, bnb_quantize, bnb_reference, to_numpy

import jax_side
from jax_side import _cpu_kernel

pytest.importorskip("bitsandbytes")


@pytest.fixture(autouse=True)
def kernel_ready():
    assert jax_side.wait_for_kernels(), "the CPU kernel could not be built here"


@pytest.mark.parametrize("nested", [True, False])
def test_kernel_under_vmap_and_grad(nested):
    """vmap over stacked weights, and derivatives with respect to the float pieces (absmax, nested_absmax,
    offset, code): the kernel's values, XLA's operations' derivatives. On the CPU, also where the default
    device is a GPU."""
    with jax.default_device(jax.devices("cpu")[0]):
        _vmap_and_grad(nested)


def _vmap_and_grad(nested):
    shape = (8, 96)
    stacks = [bnb_quantize(shape, nested=nested, dtype=torch.float32, seed=s) for s in (1, 2, 3)]
    pieces = [bnb_pieces(packed, qs) for _, packed, qs in stacks]
    kw = pieces[0][2]
    p = np.stack([pc[0] for pc in pieces])
    a = np.stack([pc[1] for pc in pieces])
    if nested:
        na = np.stack([pc[2]["nested_absmax"] for pc in pieces])
        offsets = np.array([pc[2]["offset"] for pc in pieces], np.float32)
        static = {k: v for k, v in kw.items() if k not in ("nested_absmax", "nested_code", "offset")}
        fn = lambda p, a, na, off: jax_side.dequantize_nf4(  # noqa: E731
            p, a, nested_absmax=na, nested_code=kw["nested_code"], offset=off, **static
        )
        args = (p, a, na, offsets)
    else:
        fn = lambda p, a: jax_side.dequantize_nf4(p, a, **kw)  # noqa: E731
        args = (p, a)
    got = jax.jit(jax.vmap(fn))(*args)
    for i, (_, packed, qs) in enumerate(stacks):
        assert_same_bits(got[i], to_numpy(bnb_reference(packed, qs)))
    # derivatives: the same on both paths (the kernel's are XLA's operations')
    code = jax_side.standard_code("nf4")
    if nested:
        loss = lambda na, off, code: jnp.sum(  # noqa: E731
            jax_side.dequantize_nf4(p[0], a[0], **{**static, "nested_absmax": na, "offset": off, "code": code,
                                                    "nested_code": kw["nested_code"]}) ** 2)  # fmt: skip
        primals = (jnp.asarray(na[0]), jnp.float32(kw["offset"]), jnp.asarray(code))
    else:
        loss = lambda a, code: jnp.sum(jax_side.dequantize_nf4(p[0], a, **{**kw, "code": code}) ** 2)  # noqa: E731
        primals = (jnp.asarray(a[0]), jnp.asarray(code))
    argnums = tuple(range(len(primals)))
    with_kernel = jax.grad(loss, argnums)(*primals)
    lowered = jax.jit(jax.grad(loss, argnums)).trace(*primals).lower(lowering_platforms=("cpu",))
    assert _cpu_kernel.TARGET in lowered.as_text()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_cpu_kernel, "_READY", False)
        mp.setattr(_cpu_kernel, "_UNAVAILABLE", True)
        with_xla = jax.grad(loss, argnums)(*primals)
    for g, h in zip(with_kernel, with_xla):  # two programs: their sums may be ordered differently
        assert float(jnp.abs(g).max()) > 0
        np.testing.assert_allclose(np.asarray(g), np.asarray(h), rtol=1e-6, atol=0)


_FALLBACK = """
import logging, sys
sys.modules["torch"] = None  # jax_side builds and calls the kernel without torch (or torch_side) imported
import numpy as np, jax, jax_side
from jax_side import _cpu_kernel
logging.basicConfig(level=logging.WARNING)
print("ready", jax_side.wait_for_kernels())
p = np.arange(48, dtype=np.uint8)
a = np.linspace(0.5, 2.0, 2, dtype=np.float32)
got = jax_side.dequantize_nf4(p, a, shape=(96,), dtype=jax.numpy.float32)
print("decoded", np.asarray(got).tobytes().hex(), "torch_side" in sys.modules)
print("kernel", _cpu_kernel.TARGET in jax.jit(lambda p, a: jax_side.dequantize_nf4(p, a, shape=(96,))).lower(p, a).as_text())
"""


@pytest.mark.parametrize(
    "env", [{}, {"CC": "false"}, {"QBRIDGE_CPU_KERNEL": "off"}, {"QBRIDGE_CACHE_DIR": "off"}]
)
def test_kernel_builds_without_torch_and_falls_back(env, tmp_path):
    """A fresh process builds the kernel without importing torch; a compiler that fails, the switch off,
    or no cache directory leave XLA's operations (a warning for the failure) or a private build."""
    base = {**os.environ, "QBRIDGE_CACHE_DIR": str(tmp_path / "cache"), "JAX_PLATFORMS": "cpu"}
    base.pop("CC", None)
    done = subprocess.run(
        [sys.executable, "-c", _FALLBACK], env={**base, **env}, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    lines = dict(line.split(" ", 1) for line in done.stdout.splitlines())
    want = jax_side.dequantize_nf4(np.arange(48, dtype=np.uint8), np.linspace(0.5, 2.0, 2, dtype=np.float32),
                                   shape=(96,), dtype=jnp.float32)  # fmt: skip
    assert lines["decoded"] == f"{np.asarray(want).tobytes().hex()} False"  # the bits, decoded without torch
    built = not env or "QBRIDGE_CACHE_DIR" in env
    assert lines["ready"] == str(built) and lines["kernel"] == str(built)
    assert ("unavailable" in done.stderr) == ("CC" in env), done.stderr[-2000:]
    if not env:
        assert list((tmp_path / "cache" / "cpu-kernels").glob("cpu_4bit_xla-*.so"))


@pytest.mark.parametrize(
    "value, off", [("", False), ("On", False), ("true", False), ("off", True), (" no", True)]
)
def test_the_switch_reads_on_and_off_values(monkeypatch, value, off):
    monkeypatch.setenv("QBRIDGE_CPU_KERNEL", value)
    assert _cpu_kernel.switched_off() is off


def test_a_misspelt_switch_fails_at_import_naming_it():
    """jax_side checks the switch it shares with torch_side itself: a typo fails its import without torch."""
    done = subprocess.run(
        [sys.executable, "-c", "import sys; sys.modules['torch'] = None; import jax_side"],
        env={**os.environ, "JAX_PLATFORMS": "cpu", "QBRIDGE_CPU_KERNEL": "offf"},
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode != 0
    assert "QBRIDGE_CPU_KERNEL must be unset, 'on' or 'off'" in done.stderr and "got 'offf'" in done.stderr


def test_programs_for_gpus_keep_xlas_operations():
    """The kernel is chosen as a program lowers: one lowered for CUDA never calls the CPU target."""
    p, a = np.arange(48, dtype=np.uint8), np.ones(2, np.float32)
    traced = jax.jit(lambda p, a: jax_side.dequantize_nf4(p, a, shape=(96,))).trace(p, a)
    assert _cpu_kernel.TARGET in traced.lower(lowering_platforms=("cpu",)).as_text()
    assert _cpu_kernel.TARGET not in traced.lower(lowering_platforms=("cuda",)).as_text()


def test_export_keeps_xlas_operations():
    """An exported program cannot call a target registered in one process: jax.export gets XLA's operations
    (the same values), while the same function jitted calls the kernel."""
    from jax import export

    p, a = np.arange(48, dtype=np.uint8), np.linspace(0.5, 2.0, 2, dtype=np.float32)
    with jax.default_device(jax.devices("cpu")[0]):
        f = jax.jit(lambda p, a: jax_side.dequantize_nf4(p, a, shape=(96,), dtype=jnp.float32))
        assert _cpu_kernel.TARGET in f.trace(p, a).lower(lowering_platforms=("cpu",)).as_text()
        for platforms in (["cpu"], ["cpu", "cuda"]):
            exported = export.export(f, platforms=platforms)(p, a)
            assert _cpu_kernel.TARGET not in exported.mlir_module()
        assert_same_bits(export.export(f, platforms=["cpu"])(p, a).call(p, a), f(p, a))


def test_vmap_is_one_kernel_call():
    """vmap over stacked weights is one call of the kernel, which loops over them (not one call per weight
    in a loop of XLA's)."""
    P = np.random.default_rng(0).integers(0, 256, (64, 128), dtype=np.uint8)
    A = np.random.default_rng(1).random((64, 4), dtype=np.float32)
    fn = jax.jit(jax.vmap(lambda p, a: jax_side.dequantize_nf4(p, a, shape=(256,))))
    text = fn.trace(P, A).lower(lowering_platforms=("cpu",)).as_text()
    assert text.count(_cpu_kernel.TARGET) == 1 and "stablehlo.while" not in text
    with jax.default_device(jax.devices("cpu")[0]):
        got = fn(P, A)
        for i in (0, 17, 63):
            assert_same_bits(got[i], jax_side.dequantize_nf4(P[i], A[i], shape=(256,)))


def test_shard_map_with_a_varying_weight():
    """Inside shard_map (check_vma=True) a weight passed in varying along a mesh axis decodes through the
    kernel, its result varying as the weight does."""
    from jax.sharding import Mesh
    from jax.sharding import PartitionSpec as P

    rng = np.random.default_rng(0)
    w = jax_side.NF4Weight(
        packed=jnp.asarray(rng.integers(0, 256, 32 * 256 // 2, dtype=np.uint8), device=jax.devices("cpu")[0]),
        absmax=jnp.asarray(rng.random(32 * 256 // 64, dtype=np.float32), device=jax.devices("cpu")[0]),
        shape=(32, 256),
    )
    mesh = Mesh(np.array(jax.devices("cpu")[:1]), ("x",))
    x = jnp.ones((2, 256), jnp.bfloat16, device=jax.devices("cpu")[0])
    for packed, absmax in ((P("x"), P()), (P(), P("x"))):  # the result varies as either piece does
        spec = jax_side.NF4Weight(packed=packed, absmax=absmax, shape=(32, 256))
        f = jax.jit(jax.shard_map(lambda w: w.dequantize(), mesh=mesh, in_specs=(spec,), out_specs=P("x")))
        assert (_cpu_kernel.TARGET in f.lower(w).as_text()) == _cpu_kernel.usable()
        assert_same_bits(f(w), w.dequantize())
        g = jax.jit(
            jax.shard_map(jax_side.quantized_matmul, mesh=mesh, in_specs=(P(), spec), out_specs=P(None, "x"))
        )
        assert_same_bits(g(x, w), jax_side.quantized_matmul(x, w))
        # a result that varies cannot be returned as replicated (the kernel's result must say it varies)
        h = jax.jit(jax.shard_map(lambda w: w.dequantize(), mesh=mesh, in_specs=(spec,), out_specs=P()))
        with pytest.raises(ValueError, match="out_specs"):
            h(w)


_SEVERAL_DEVICES = """
import numpy as np, jax, jax_side
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from jax_side import _cpu_kernel
print("ready", jax_side.wait_for_kernels(), "usable", _cpu_kernel.usable())
rng = np.random.default_rng(0); mesh = Mesh(np.array(jax.devices()), ("x",))
p = jax.device_put(rng.integers(0, 256, 8192, dtype=np.uint8), NamedSharding(mesh, P("x")))
a = jax.device_put(rng.random(256).astype(np.float32), NamedSharding(mesh, P("x")))
print("spec", *jax_side.dequantize_nf4(p, a, shape=(64, 256)).sharding.spec)
"""


def test_several_cpu_devices_keep_xlas_operations(tmp_path):
    """With a mesh of CPU devices the decode stays XLA's operations, which XLA partitions (the kernel would
    run whole on every device, its result replicated)."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    done = subprocess.run(
        [sys.executable, "-c", _SEVERAL_DEVICES], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines() == ["ready True usable False", "spec x"]


_SHORT = """
import sys, time
sys.modules["torch"] = None
import numpy as np, jax_side
from jax_side import _cpu_kernel
builder = _cpu_kernel._builder()
def compiler(found=builder.compiler):  # the build thread gets no CPU for a second before it starts the builder
    time.sleep(1.0)
    return found()
builder.compiler = compiler
jax_side.dequantize_nf4(np.arange(48, dtype=np.uint8), np.ones(2, np.float32), shape=(96,))
print("ready at exit", _cpu_kernel.cpu_kernel_ready())
"""


def test_a_process_that_exits_before_its_build_thread_starts_still_fills_the_cache(tmp_path):
    """The exit waits until the build thread has started the builder (in its own session), which then lands
    the library in the cache: a thread that got no CPU before the exit (seen under load) left no build."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "QBRIDGE_CACHE_DIR": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-c", _SHORT], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines() == ["ready at exit False"]
    folder = tmp_path / "cpu-kernels"
    deadline = time.monotonic() + 180  # the compiler shares the machine with the other test processes
    while not list(folder.glob("cpu_4bit_xla-*.so")) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(list(folder.glob("cpu_4bit_xla-*.so"))) == 1, (
        f"no build landed in 180 s: {done.stderr[-2000:]}"
    )


_REGISTERED = """
import logging, sys
logging.basicConfig(level=logging.DEBUG, stream=sys.stdout, format="%(message)s")
import jax_side
jax_side.wait_for_kernels()
"""


def test_a_group_writable_umask_still_reuses_the_build(tmp_path):
    """Under umask 002 the hash beside the library was written group-writable, which the check of a cached
    build refuses: every process built the kernel again (twice). Now the second process loads the first's."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "QBRIDGE_CACHE_DIR": str(tmp_path)}
    logs = []
    for _ in range(2):
        done = subprocess.run(
            [sys.executable, "-c", _REGISTERED], env=env, capture_output=True, text=True, timeout=300,
            preexec_fn=lambda: os.umask(0o002),
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-2000:]
        logs.append([line for line in done.stdout.splitlines() if "registered with XLA from" in line])
    for log in logs:
        assert len(log) == 1 and str(tmp_path / "cpu-kernels") in log[0], log
    (built,) = (tmp_path / "cpu-kernels").glob("cpu_4bit_xla-*.so")
    for f in (built, built.with_name(built.name + ".sha256")):
        assert f.stat().st_mode & 0o022 == 0


def test_kept_matmuls_decode_with_xlas_operations():
    """quantized_matmul on the CPU (forward and backward) leaves the decode to XLA's operations, which XLA
    fuses into its dot's operand; a call of the kernel, whose result XLA would convert in a pass of its own,
    measured slower there. A standalone decode calls the kernel, transposed decodes do not."""
    rng = np.random.default_rng(0)
    w = jax_side.NF4Weight(
        packed=jnp.asarray(rng.integers(0, 256, 64 * 256 // 2, dtype=np.uint8)),
        absmax=jnp.asarray(rng.random(64 * 256 // 64, dtype=np.float32)),
        shape=(64, 256),
    )
    x = jnp.ones((3, 256), jnp.bfloat16)

    def lowered(fn, *args):
        return jax.jit(fn).trace(*args).lower(lowering_platforms=("cpu",)).as_text()

    assert _cpu_kernel.TARGET not in lowered(jax_side.quantized_matmul, x, w)
    grad = jax.grad(lambda x, w: jnp.sum(jax_side.quantized_matmul(x, w).astype(jnp.float32)))
    assert _cpu_kernel.TARGET not in lowered(grad, x, w)
    assert _cpu_kernel.TARGET in lowered(lambda w: w.dequantize(), w)
    assert _cpu_kernel.TARGET not in lowered(lambda w: w.dequantize(transpose=True), w)


_EXITS_EARLY = """
import time
from jax_side import _cpu_kernel
_cpu_kernel.cpu_kernel_ready()  # starts a build for this process only (the cache is off)
time.sleep(0.2)
"""


def test_a_process_exiting_mid_build_leaves_no_private_build(tmp_path):
    """With no cache directory a process builds for itself in a temporary folder; one that exits while
    the build runs stops it and removes the folder (it was left behind, and the build finished into it)."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "QBRIDGE_CACHE_DIR": "off", "TMPDIR": str(tmp)}
    done = subprocess.run(
        [sys.executable, "-c", _EXITS_EARLY], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "unavailable" not in done.stderr
    time.sleep(3)  # what a build left running would need to finish
    assert not list(tmp.glob("qbridge-*")), list(tmp.rglob("*"))
