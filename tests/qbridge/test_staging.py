"""The pinned staging region (``qbridge/_staging.py``): blocks handed out disjoint and page-aligned, merged
back when returned, reused only after the copy out of them has completed; the checkpoint's reads through it
give the stored bytes, counted once, and every block comes back. On the CPU the region is left pageable
(its bookkeeping is the same); the GPU test registers it and keeps the device busy while a load reuses it.
"""

from __future__ import annotations

import random
import threading

import numpy as np
import pytest
import torch
from checkpoints import fp8_experts, fp8_experts_decoded, loaded_weights
from helpers import to_numpy

import qbridge
from qbridge import _checkpoint, _staging

PAGE = _staging.ALIGN


class _Copy:
    """A copy out of a block, still running until someone waits for it (CUDA events' ``query`` and
    ``synchronize``: the two calls the region makes)."""

    def __init__(self) -> None:
        self.done = False
        self.waited = 0

    def query(self) -> bool:
        return self.done

    def synchronize(self) -> None:
        self.waited += 1
        self.done = True


def test_blocks_are_disjoint_page_aligned_and_merge_back():
    region = _staging.Region(64 * PAGE, register=False)
    rng = random.Random(0)
    held: list[_staging.Block] = []
    for _ in range(2000):
        if held and (rng.random() < 0.45 or region.free_bytes() < 8 * PAGE):
            held.pop(rng.randrange(len(held))).give_back()
            continue
        want = rng.randrange(1, 8 * PAGE)
        block = region.take(want)
        if block is None:  # no range left that fits, and nothing on its way back
            assert all(length < -(-want // PAGE) * PAGE for _, length in region._free)
            continue
        assert (
            block.offset % PAGE == 0 and block.nbytes >= want and block.offset + block.nbytes <= region.nbytes
        )
        for other in held:
            assert block.offset + block.nbytes <= other.offset or other.offset + other.nbytes <= block.offset
        held.append(block)
        assert region.free_bytes() + sum(b.nbytes for b in held) == region.nbytes
    for block in held:
        block.give_back()
    assert region._free == [(0, region.nbytes)]  # every neighbour merged: one range again
    assert region.take(region.nbytes) is not None


def test_a_block_is_reused_only_after_the_copy_out_of_it():
    region = _staging.Region(8 * PAGE, register=False)
    whole = region.take(8 * PAGE)
    assert whole is not None and region.take(1) is None  # full, nothing coming back: the caller pins itself
    whole.tensor(torch.uint8, (8 * PAGE,)).fill_(7)
    copy = _Copy()
    whole.give_back(copy)
    assert region.free_bytes() == 0  # the copy has not completed
    again = region.take(PAGE)  # waits for it
    assert copy.waited == 1 and again is not None and again.offset == 0
    view = again.tensor(torch.float32, (4, 8))
    assert view.data_ptr() == region.memory.data_ptr() and torch.all(view.view(torch.uint8) == 7)


def test_readers_share_the_region_from_many_threads():
    region = _staging.Region(32 * PAGE, register=False)
    errors = []

    def work(seed):
        rng = random.Random(seed)
        for _ in range(300):
            block = region.take(rng.randrange(1, 4 * PAGE))
            if block is None:
                continue
            mine = block.tensor(torch.uint8, (block.nbytes,))
            mine.fill_(seed)
            if not torch.all(mine == seed):  # another thread wrote into this block
                errors.append(seed)
            copy = _Copy()
            block.give_back(copy if rng.random() < 0.5 else None)
            copy.done = rng.random() < 0.5

    threads = [threading.Thread(target=work, args=(s,)) for s in range(1, 7)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for event, _ in list(region._returning):
        event.done = True
    assert region.free_bytes() == region.nbytes


@pytest.fixture
def cpu_region(monkeypatch):
    """A pageable region standing in for the process's pinned one, so that ``pin=True`` reads use it here."""
    region = _staging.Region(4 << 20, register=False)
    made = threading.Event()
    made.set()
    monkeypatch.setattr(_staging, "_region", region)
    monkeypatch.setattr(_staging, "_started", True)
    monkeypatch.setattr(_staging, "_made", made)
    monkeypatch.setattr(_checkpoint, "_cuda_here", lambda: True)  # the region takes pin=True reads here
    return region


def test_reads_through_the_region_give_the_stored_bytes_and_give_every_block_back(
    tmp_path, cpu_region, monkeypatch
):
    from safetensors.torch import save_file

    import qbridge._checkpoint as checkpoint

    monkeypatch.setattr(checkpoint, "READ_AHEAD_MIN_BYTES", 1024)
    g = torch.Generator().manual_seed(0)
    # larger than a small tensor (64 KiB), which read() copies anyway
    stored = {f"w{i}": torch.randn(137 + i, 261, generator=g).to(dtype)
              for i, dtype in enumerate([torch.float32, torch.bfloat16, torch.float16] * 3)}  # fmt: skip
    save_file(stored, tmp_path / "model.safetensors")
    with qbridge.open_checkpoint(tmp_path) as ckpt:
        for key in stored:
            assert ckpt.read_ahead(key, pin=True)
        got = ckpt.read("w0")  # its own memory, the block back at once
        assert got.data_ptr() != cpu_region.memory.data_ptr()
        outs = [torch.empty_like(stored[k]) for k in ("w1", "w2")]
        ckpt.read_into(["w1", "w2"], outs)
        moved = ckpt.read_to("w3", torch.device("cpu"))
        cpu_region.memory.fill_(0xFF)  # whatever the region holds now changes nothing handed out
        for key, value in {"w0": got, "w1": outs[0], "w2": outs[1], "w3": moved}.items():
            assert torch.equal(value.view(torch.uint8), stored[key].view(torch.uint8)), key
        assert ckpt.bytes_read == sum(
            stored[k].numel() * stored[k].element_size() for k in ("w0", "w1", "w2", "w3")
        )
        with pytest.raises(ValueError):
            ckpt.read_into(["w4", "w5"], [torch.empty_like(stored["w4"])])
        assert cpu_region.free_bytes() < cpu_region.nbytes  # w4..w8 still held
    assert cpu_region.free_bytes() == cpu_region.nbytes  # closing gave back what was never asked for


def test_a_read_that_fails_gives_its_block_back(tmp_path, cpu_region, monkeypatch):
    from safetensors.torch import save_file

    import qbridge._checkpoint as checkpoint

    monkeypatch.setattr(checkpoint, "READ_AHEAD_MIN_BYTES", 1024)
    save_file({"a": torch.randn(64, 64), "b": torch.randn(64, 64)}, tmp_path / "model.safetensors")
    with qbridge.open_checkpoint(tmp_path) as ckpt:
        assert ckpt.read_ahead("a", pin=True) and ckpt.read_ahead("b", pin=True)
        with pytest.raises(RuntimeError):  # torch refuses the copy (in place into a leaf that needs grad)
            ckpt.read_into(["a"], [torch.zeros(64, 64, requires_grad=True)])  # the block still comes back
        ckpt.read("b")
        assert cpu_region.free_bytes() == cpu_region.nbytes


@pytest.mark.gpu
def test_a_load_reuses_blocks_only_after_the_device_copied_out_of_them(tmp_path, monkeypatch):
    """A registered region with room for a few of the checkpoint's large weights, a read-ahead window of two,
    and the device kept busy before each load: every copy out of the region waits behind that work, so a
    reader reusing a block during the load must first wait for the copy out of it. A block reused early
    would hand the device another weight's bytes."""
    import torch_side
    from qbridge import _loader

    stored = fp8_experts(tmp_path / "ckpt")
    want = fp8_experts_decoded(stored)
    big = max(v.numel() * v.element_size() for v in stored.values())
    monkeypatch.setattr(_loader, "READ_AHEAD_BYTES", 2 * big)
    region = _staging.Region(8 * big)
    offsets: list[int | None] = []
    take = region.take

    def recorded(nbytes):
        block = take(nbytes)
        offsets.append(None if block is None else block.offset)
        return block

    monkeypatch.setattr(region, "take", recorded)
    made = threading.Event()
    made.set()
    monkeypatch.setattr(_staging, "_region", region)
    monkeypatch.setattr(_staging, "_started", True)
    monkeypatch.setattr(_staging, "_made", made)
    for load in range(3):
        offsets.clear()
        torch.cuda._sleep(1 << 30)  # about half a second of the device's time, queued before the load
        params = loaded_weights(qbridge.load_checkpoint(tmp_path / "ckpt", progress=False)["params"])
        for key, value in want.items():
            np.testing.assert_array_equal(
                np.asarray(params[key]).view(np.uint16), to_numpy(value).view(np.uint16), err_msg=key
            )
        used = [o for o in offsets if o is not None]
        assert len(used) > len(set(used)) + 20, offsets  # blocks reused within the load, the device busy
        if load == 0:
            torch_side.wait_for_kernels()
    assert region.free_bytes() == region.nbytes


def test_a_block_given_back_twice_or_too_large_a_request_is_refused():
    region = _staging.Region(4 * PAGE, register=False)
    block = region.take(PAGE)
    block.give_back()
    with pytest.raises(ValueError, match="given back already"):
        block.give_back()
    assert region._free == [(0, 4 * PAGE)]
    busy = region.take(4 * PAGE)
    copy = _Copy()
    busy.give_back(copy)
    assert region.take(5 * PAGE) is None and copy.waited == 0  # no copy could make room: none waited for
    other = _staging.Region(PAGE, register=False).take(PAGE)
    with pytest.raises(ValueError, match="not this region's"):
        region.give_back(other)


def test_read_into_refuses_tensors_of_another_shape_or_dtype_before_copying(tmp_path, cpu_region):
    from safetensors.torch import save_file

    stored = {"a": torch.arange(300 * 257, dtype=torch.int64).reshape(300, 257), "b": torch.randn(300, 257)}
    save_file(stored, tmp_path / "model.safetensors")
    with qbridge.open_checkpoint(tmp_path) as ckpt:
        assert ckpt.read_ahead("a", pin=True) and ckpt.read_ahead("b", pin=True)
        for outs in ([torch.zeros(300, 257, dtype=torch.int32), torch.zeros(300, 257)],
                     [torch.zeros(300, 257, dtype=torch.int64), torch.zeros(2, 300, 257)]):  # fmt: skip
            with pytest.raises(ValueError, match=r"read_into: '(a|b)' is \[300, 257\]"):
                ckpt.read_into(["a", "b"], outs)
            assert not any(o.any() for o in outs)  # nothing copied
        with pytest.raises(ValueError, match="a sequence of keys"):
            ckpt.read_into("a", [torch.zeros(300, 257, dtype=torch.int64)])
        outs = [torch.zeros(300, 257, dtype=torch.int64), torch.empty(300, 257, device="meta")]
        with pytest.raises(
            ValueError, match=r"read_into: the tensor for 'b' is a meta tensor, which holds no data"
        ):
            ckpt.read_into(["a", "b"], outs)  # it returned, having read nothing into it
        assert not outs[0].any()
        got = ckpt.read_to("a", "cpu")  # a device's name will do
        assert torch.equal(got, stored["a"])
        outs = [torch.zeros(300, 257, dtype=torch.int64), torch.zeros(300, 257)]
        ckpt.read_into(["a", "b"], outs)  # read twice: "a" from the file this time
        assert torch.equal(outs[0], stored["a"]) and torch.equal(outs[1], stored["b"])
    assert cpu_region.free_bytes() == cpu_region.nbytes


@pytest.mark.parametrize("child", ["close", "read"])
def test_a_forked_child_with_a_read_in_flight_neither_hangs_nor_waits(
    tmp_path, cpu_region, monkeypatch, child
):
    """A fork while a reading thread reads: the child has no such thread, so closing the checkpoint must not
    wait for it, and reading the tensor there reads it anew (it waited forever) with the stored values."""
    import os
    import time

    from safetensors.torch import save_file

    stored = torch.randn(300, 257)
    save_file({"w": stored}, tmp_path / "model.safetensors")
    ckpt = qbridge.open_checkpoint(tmp_path)
    read_bytes = ckpt.source._read_bytes

    def slow(*args):
        time.sleep(1.0)
        return read_bytes(*args)

    monkeypatch.setattr(ckpt.source, "_read_bytes", slow)
    assert ckpt.read_ahead("w", pin=True)
    time.sleep(0.2)
    pid = os.fork()
    if pid == 0:  # the child
        code = 1
        try:
            if child == "close":
                ckpt.close()
                code = 0
            else:
                # compared by numpy: torch's own threads (OpenMP) hang in a child forked after using them
                code = 0 if np.array_equal(ckpt.read("w").numpy(), stored.numpy()) else 2
        finally:
            os._exit(code)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        time.sleep(0.05)
    else:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        pytest.fail(f"{child} in the forked child hung")
    assert os.waitstatus_to_exitcode(status) == 0
    assert torch.equal(ckpt.read("w"), stored)  # the parent's own read ahead, as read
    ckpt.close()


def test_a_check_sees_each_tensor_in_host_memory_before_its_copy(tmp_path, cpu_region, monkeypatch):
    """``read_to``/``read_into`` with ``check``: it sees each stored tensor in host memory (read ahead into the
    region, or read when asked for) before the copy; a refusal propagates, nothing is copied for it, and
    the region gets its block back."""
    from safetensors.torch import save_file

    import qbridge._checkpoint as checkpoint

    monkeypatch.setattr(checkpoint, "READ_AHEAD_MIN_BYTES", 1024)
    g = torch.Generator().manual_seed(3)
    stored = {"a": torch.randn(300, 257, generator=g), "b": torch.randn(211, 263, generator=g)}
    save_file(stored, tmp_path / "model.safetensors")
    seen = []

    def check(key, t):
        seen.append((key, t.device.type, torch.equal(t, stored[key])))
        if key == "b":
            raise qbridge.CheckpointError(f"{key}: refused")

    with qbridge.open_checkpoint(tmp_path) as ckpt:
        for ahead in (True, False):
            if ahead:
                assert ckpt.read_ahead("a", pin=True) and ckpt.read_ahead("b", pin=True)
            assert torch.equal(ckpt.read_to("a", torch.device("cpu"), check=check), stored["a"])
            out = torch.zeros(211, 263)
            with pytest.raises(qbridge.CheckpointError, match="b: refused"):
                ckpt.read_into(["b"], [out], check=check)
            assert not out.any()  # refused before its copy
            assert seen == [("a", "cpu", True), ("b", "cpu", True)]
            seen.clear()
        assert cpu_region.free_bytes() == cpu_region.nbytes


@pytest.mark.skipif(
    torch.cuda.is_available(), reason="pinned memory is refused only where torch has no CUDA GPU"
)
def test_pinned_reads_without_a_cuda_gpu_are_refused_at_once(tmp_path):
    """``pin=True`` where torch sees no CUDA GPU fails when asked, naming what to use; it used to fail later,
    in a reading thread, as a failed read of the checkpoint."""
    from safetensors.torch import save_file

    save_file({"w": torch.randn(300, 257), "s": torch.randn(10)}, tmp_path / "model.safetensors")
    with qbridge.open_checkpoint(tmp_path) as ckpt:
        for call in (lambda: ckpt.read_ahead("w", pin=True), lambda: ckpt.read_stacked(["s"], pin=True)):
            with pytest.raises(
                ValueError, match=r"\(pin=True\): pinned memory is for copies to a CUDA GPU.*pin=False"
            ):
                call()
        assert ckpt.read_ahead("w", pin=False) and torch.equal(ckpt.read("w"), ckpt.read("w"))
