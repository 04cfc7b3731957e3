"""``Checkpoint.stage_small``: a load's small pieces (a 4-bit weight's scales and tables) read in one pass into
one page-locked buffer and copied to the GPU at once; each staged tensor is handed out once, as the stored
bytes, checked in host memory, and counted once."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from helpers import assert_same_leaves
from safetensors.torch import save_file

import qbridge
from qbridge import CheckpointError, _checkpoint
from qbridge._checkpoint import open_checkpoint

gpu = pytest.mark.gpu


def _stored() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return {
        "scales": torch.rand(3584, generator=g) * 0.1,
        "table": torch.randn(256, generator=g),
        "codes": torch.randint(0, 256, (1001,), dtype=torch.uint8, generator=g),  # an odd size: the next is
        "half": torch.randn(33, 3, generator=g).to(torch.bfloat16),  # placed on a 16-byte boundary
        "large": torch.randn(40000, generator=g),  # over 64 KiB: not staged
    }


def _bits(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().reshape(-1).view(torch.uint8).numpy()


def test_staging_for_a_device_that_is_not_a_cuda_gpu_is_refused(tmp_path):
    save_file({"a": torch.zeros(4)}, tmp_path / "model.safetensors")
    with open_checkpoint(tmp_path / "model.safetensors") as ckpt:
        with pytest.raises(ValueError, match=r"stage_small\(device='cpu'\) stages for a CUDA device"):
            ckpt.stage_small(["a"], "cpu")


@gpu
def test_staged_tensors_are_the_stored_bytes_handed_out_once_and_counted_once(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (run `pytest -m gpu` on the GPU machine)")
    stored = _stored()
    save_file(stored, tmp_path / "model.safetensors")
    seen: dict[str, torch.Tensor] = {}
    with open_checkpoint(tmp_path / "model.safetensors") as ckpt:
        small = sum(v.numel() * v.element_size() for k, v in stored.items() if k != "large")
        torch.cuda._sleep(1 << 28)  # the device busy: the staged copy queues behind this work
        assert ckpt.stage_small([*stored, "scales", "nothing"], "cuda") == small
        got = {
            key: ckpt.read_to(key, torch.device("cuda"), check=seen.__setitem__)
            for key in ("scales", "codes", "half", "large")
        }
        got["table"] = ckpt.read("table")  # its host bytes, memory of its own
        got["table"].fill_(0)
        again = ckpt.read_to("table", torch.device("cuda"))  # handed out once: read from the file now
        for key, value in stored.items():
            assert got[key].dtype == value.dtype and got[key].shape == value.shape, key
            np.testing.assert_array_equal(
                _bits(got[key] if key != "table" else again), _bits(value), err_msg=key
            )
        assert {k: v.device.type for k, v in seen.items()} == dict.fromkeys(
            ("scales", "codes", "half", "large"), "cpu"
        )
        for key, value in seen.items():
            np.testing.assert_array_equal(_bits(value), _bits(stored[key]), err_msg=key)
        assert got["scales"].device.type == "cuda" and got["table"].device.type == "cpu"
        assert ckpt.bytes_read == sum(v.numel() * v.element_size() for v in stored.values())


@gpu
def test_a_staged_tensor_a_check_refuses_or_a_file_cut_short_is_an_error_naming_it(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (run `pytest -m gpu` on the GPU machine)")
    stored = _stored()
    stored["scales"][5] = float("nan")
    save_file(stored, tmp_path / "model.safetensors")
    with open_checkpoint(tmp_path / "model.safetensors") as ckpt:
        ckpt.stage_small(list(stored), "cuda")
        with pytest.raises(CheckpointError, match=r"scales.*1 scale\(s\) are NaN"):
            from qbridge._decode import check_scales

            ckpt.read_to("scales", torch.device("cuda"), check=lambda k, t: check_scales(ckpt, k, t))
    small = {k: v for k, v in stored.items() if k != "large"}
    (tmp_path / "cut").mkdir()
    save_file(small, tmp_path / "cut" / "model.safetensors")
    with open_checkpoint(tmp_path / "cut" / "model.safetensors") as ckpt:
        ends = {k: ckpt.source._offsets(ckpt.source.key_file[k])[k] for k in small}
        last = max(ends, key=lambda k: ends[k][1])
        os.truncate(tmp_path / "cut" / "model.safetensors", ends[last][1] - 2)  # the last 2 bytes
        n = ends[last][1] - ends[last][0]
        assert ckpt.stage_small(list(small), "cuda") == sum(
            v.numel() * v.element_size() for k, v in small.items() if k != last
        )
        with pytest.raises(
            CheckpointError, match=rf"reading '{last}' failed: the file ends after {n - 2} of its {n} bytes"
        ):
            ckpt.read_to(last, torch.device("cuda"))


@gpu
def test_a_load_staging_its_small_pieces_gives_the_same_arrays(tmp_path, monkeypatch):
    """The loader stages every 4-bit weight's scales and tables (a nested and a plain checkpoint): the
    arrays are bit for bit those of a load that reads and copies each piece on its own."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (run `pytest -m gpu` on the GPU machine)")
    from checkpoints import bnb_llama, dense_llama

    dense_llama(tmp_path / "dense", sizes={"hidden_size": 256, "intermediate_size": 512, "vocab_size": 384})
    staged: list[int] = []
    stage = _checkpoint._Source.stage_small

    def spy(self, keys, device):
        staged.append(stage(self, keys, device))
        return staged[-1]

    monkeypatch.setattr(_checkpoint._Source, "stage_small", spy)
    for nested in (True, False):
        folder = tmp_path / f"nf4-{nested}"
        bnb_llama(tmp_path / "dense", folder, quant_type="nf4", nested=nested, device_map="cuda")
        torch.cuda._sleep(1 << 28)
        with_staging = qbridge.load_checkpoint(folder, device="cuda", progress=False)
        assert staged and staged[-1] > 0
        with monkeypatch.context() as m:
            m.setattr(_checkpoint._Source, "stage_small", lambda self, keys, device: 0)
            without = qbridge.load_checkpoint(folder, device="cuda", progress=False)
        assert_same_leaves(with_staging, without)


@gpu
def test_close_drops_what_was_staged(tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (run `pytest -m gpu` on the GPU machine)")
    save_file(_stored(), tmp_path / "model.safetensors")
    ckpt = open_checkpoint(tmp_path / "model.safetensors")
    assert ckpt.stage_small(["scales", "table"], "cuda") > 0
    ckpt.close()
    assert not ckpt.source._staged
    for read in (lambda: ckpt.read_to("scales", torch.device("cuda")), lambda: ckpt.read("table")):
        with pytest.raises(CheckpointError, match="the checkpoint is closed"):
            read()
