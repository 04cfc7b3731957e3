"""``Checkpoint.bytes_read`` counts a small tensor once however many threads read it together (``read`` and
``read_stacked`` from several threads, the check and the count under one lock), and a large one each time."""

from __future__ import annotations

import sys
import threading

import pytest
import torch

import qbridge

st = pytest.importorskip("safetensors.torch")


def test_threads_reading_the_same_tensors_count_each_small_one_once(tmp_path):
    small = {f"m.{i}.weight": torch.full((3,), float(i)) for i in range(400)}
    large = {"big.weight": torch.randn(129, 128)}  # over 64 KiB: counted at each read
    st.save_file({**small, **large}, tmp_path / "model.safetensors")
    keys = list(small)
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # threads switch as often as they can
    try:
        for _ in range(5):
            with qbridge.open_checkpoint(tmp_path) as ckpt:
                start = threading.Barrier(8)

                def work(i, ckpt=ckpt, start=start):
                    start.wait()
                    if i % 4 == 1:
                        ckpt.read_stacked(keys)
                    else:
                        for key in keys:
                            ckpt.read(key)
                    ckpt.read("big.weight")

                threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
                assert ckpt.bytes_read == 400 * 12 + 8 * 129 * 128 * 4
    finally:
        sys.setswitchinterval(interval)
