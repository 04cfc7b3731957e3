"""One process per GPU under ``jax.distributed`` (needs two GPUs; `pytest -m gpu` on a multi-GPU machine):
each process reads and decodes only its shards on its own GPU, its shards equal a whole load, and its
GPU's peak memory stays near its share of the model."""

from __future__ import annotations

import pytest
import torch
from checkpoints import bnb_llama, dense_llama, fp8_llama

from qbridge._multiprocess import check_multiprocess_load

pytestmark = pytest.mark.gpu

# Llama-3-8B's projection widths on two layers (4-bit blocks and FP8 tiles split evenly over two GPUs;
# 14336 = 112 tiles), vocabulary 32000
SIZES = dict(
    hidden_size=4096, intermediate_size=14336, vocab_size=32000, num_hidden_layers=2, num_attention_heads=32,
    num_key_value_heads=8,
)  # fmt: skip
ROWS_AND_COLUMNS = [
    (r"(q_proj|k_proj|v_proj|gate_proj|up_proj)\.kernel$", [None, "x"]),
    (r"(o_proj|down_proj)\.kernel$", ["x", None]),
    (r"embed_tokens\.embedding$", ["x", None]),
    (r"lm_head\.kernel$", [None, "x"]),
]


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    root = tmp_path_factory.mktemp("multiprocess_gpu")
    dense_llama(root / "dense", sizes=SIZES)
    bnb_llama(root / "dense", root / "nf4", quant_type="nf4", nested=True, device_map="cuda")
    fp8_llama(root / "dense", root / "fp8")
    return root


def test_one_process_per_gpu(made, tmp_path):
    reports = check_multiprocess_load(
        [made / "nf4", made / "fp8"], processes=2, gpus=True, mesh_shape=(2,), rules=ROWS_AND_COLUMNS,
        convert_dir=tmp_path, timeout=580,
    )  # fmt: skip
    for r in reports:
        print(r)
        assert r.ok and len(r.local_devices) == 1, r
        for load in r.loads:
            assert load["shards"] == load["leaves"] and not load["mismatched"]
            assert load["read_bytes"] <= 1.05 * load["share_bytes"] + (1 << 20), load
            assert load["share_bytes"] < 0.55 * load["stored_bytes"], load
        assert not r.convert["mismatched"]
    dense = 2 * (2 * 32000 * 4096 + 2 * (2 * 4096 * 4096 + 2 * 1024 * 4096 + 3 * 4096 * 14336))  # bf16 bytes
    for r in reports:  # each GPU holds half the model, plus the decode window and XLA's copy of a tensor
        for load in r.loads:
            assert 0.45 * dense < load["held_bytes"] < 0.55 * dense, (load["held_bytes"], dense)
            assert load["peak_bytes"] < 0.85 * dense, (load["peak_bytes"], dense)  # JAX + torch peaks
