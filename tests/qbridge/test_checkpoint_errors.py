"""Bad checkpoints: each gives a clear error naming the file and key; nothing partial is returned or
written; no pickle code is ever executed."""

from __future__ import annotations

import collections
import json
import os
import pathlib
import re
import shutil
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from checkpoints import bnb_llama, dense_llama, fp8_llama
from helpers import assert_same_bits, library_entry

import jax_side
import qbridge
from qbridge import CheckpointError, FormatError

pytest.importorskip("bitsandbytes")
st = pytest.importorskip("safetensors.torch")


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    root = tmp_path_factory.mktemp("made")
    dense_llama(root / "dense")
    bnb_llama(root / "dense", root / "nf4", quant_type="nf4", nested=True)
    bnb_llama(root / "dense", root / "sharded", quant_type="nf4", nested=True, shard=True)
    fp8_llama(root / "dense", root / "fp8")
    return root


def _copy(made, name, tmp_path):
    dst = tmp_path / name
    shutil.copytree(made / name, dst)
    return dst


def _rewrite(path, edit):
    state = st.load_file(path)
    edit(state)
    st.save_file(state, path, metadata={"format": "pt"})


def test_missing_shard(made, tmp_path):
    ck = _copy(made, "sharded", tmp_path)
    victim = sorted(ck.glob("*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=f"{victim.name}: file missing"):
        qbridge.load_checkpoint(ck, progress=False)


def test_a_torch_file_in_the_format_before_torch_1_6_is_read(tmp_path):
    """Files saved without the zip archive (transformers' old pytorch_model.bin files, or
    ``_use_new_zipfile_serialization=False``) cannot be mapped; they are read whole (they were refused as
    damaged)."""
    torch.manual_seed(0)
    state = {"fc.weight": torch.randn(4, 8), "fc.bias": torch.randn(4)}
    torch.save(state, tmp_path / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    assert (tmp_path / "pytorch_model.bin").read_bytes()[:2] != b"PK"
    loaded = qbridge.dequantized_state(tmp_path)
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)
    params = qbridge.load_checkpoint(tmp_path, device="cpu", progress=False)["params"]
    assert np.array_equal(np.asarray(params["fc"]["kernel"]), state["fc.weight"].numpy().T)
    data = (tmp_path / "pytorch_model.bin").read_bytes()
    (tmp_path / "pytorch_model.bin").write_bytes(data[:-10])  # cut short, in that format
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin: the file is damaged"):
        qbridge.load_checkpoint(tmp_path, device="cpu", progress=False)
    (tmp_path / "pytorch_model.bin").write_bytes(
        data[: len(data) // 2]
    )  # inside the pickle: a name cut short
    with pytest.raises(CheckpointError, match=r"refused it \(UnpicklingError: WeightsUnpickler error: Unsupported "
                       r"global: GLOBAL collections\.\w+ was not an allowed global"):  # fmt: skip
        qbridge.load_checkpoint(tmp_path, device="cpu", progress=False)


def test_tensor_files_that_are_no_regular_files(tmp_path):
    """A link to a missing blob of a Hugging Face cache (an interrupted download) says so; a FIFO is refused
    (reading it blocked forever); a missing file is missing, with the index named only where there is one."""
    snapshot = tmp_path / "models--org--tiny" / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    (tmp_path / "models--org--tiny" / "blobs").mkdir()
    (snapshot / "model.safetensors").symlink_to(pathlib.Path("..", "..", "blobs", "e" * 64))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: a link to \.\./\.\./blobs/e{64}, which does not "
                       r"exist \(an interrupted download leaves such links\): download the checkpoint again"):  # fmt: skip
        qbridge.load_checkpoint(snapshot, device="cpu", progress=False)
    fifo = tmp_path / "fifo"
    fifo.mkdir()
    os.mkfifo(fifo / "pytorch_model.bin")
    for call in (qbridge.load_checkpoint, qbridge.inspect_checkpoint):
        with pytest.raises(
            CheckpointError, match=r"pytorch_model\.bin: a FIFO, not a regular file, where a torch file"
        ):
            call(fifo)
        # named itself: the same words (they read "no such file or directory")
        with pytest.raises(
            CheckpointError, match=r"pytorch_model\.bin: a FIFO, not a regular file, where a checkpoint"
        ):
            call(fifo / "pytorch_model.bin")
        with pytest.raises(
            CheckpointError, match=r"model\.safetensors: a link to \.\./\.\./blobs/e{64}, which does not"
        ):
            call(snapshot / "model.safetensors")
    ck = tmp_path / "plain"
    ck.mkdir()
    st.save_file({"a": torch.zeros(2)}, ck / "model.safetensors")
    source = qbridge.open_checkpoint(ck).source
    with pytest.raises(CheckpointError, match=r"gone\.safetensors: file missing$"):
        source.add_safetensors(ck / "gone.safetensors")
    with pytest.raises(
        CheckpointError, match=r"gone\.bin: file missing \(listed in the checkpoint's index\)$"
    ):
        source.add_torch(ck / "gone.bin", keys=["a"])


@pytest.mark.parametrize("kind", ["qint8", "sparse_coo", "sparse_csr", "nested"])
def test_torch_files_holding_tensors_that_are_not_dense(tmp_path, kind):
    """A torch-quantized, sparse or nested tensor is refused when the file is opened, naming the file and key
    and saying how to save it (they crashed deep inside with errors naming neither, or, for dequantized_state,
    a qint8 tensor came back still quantized)."""
    t = torch.randn(3, 4)
    value = {
        "qint8": lambda: torch.quantize_per_tensor(t, 0.1, 0, torch.qint8),
        "sparse_coo": t.to_sparse,
        "sparse_csr": t.to_sparse_csr,
        "nested": lambda: torch.nested.nested_tensor([torch.randn(2), torch.randn(3)]),
    }[kind]()
    torch.save({"fc.weight": value, "fc.bias": torch.zeros(3)}, tmp_path / "model.pt")
    what = {"qint8": r"a torch-quantized tensor \(torch\.qint8\); .* save it with \.dequantize\(\)",
            "sparse_coo": r"a sparse tensor \(torch\.sparse_coo\); .* save it as t\.to_dense\(\)",
            "sparse_csr": r"a sparse tensor \(torch\.sparse_csr\)", "nested": r"a nested tensor; .*to_padded_tensor"}[kind]  # fmt: skip
    for call in (qbridge.load_checkpoint, qbridge.dequantized_state, qbridge.inspect_checkpoint):
        with pytest.raises(CheckpointError, match=rf"model\.pt \[fc\.weight\]: {what}"):
            call(tmp_path)
    # a load that does not need it: a target without that leaf takes the rest, strict=False saying what was
    # left out (the file was refused whole); strict, every tensor must be used, and it is refused
    target = {"fc": {"bias": jnp.zeros(3)}}
    with pytest.warns(
        UserWarning, match=rf"1 tensor\(s\) of the checkpoint cannot be read and are left out: .*{what}"
    ):
        loaded = qbridge.load_checkpoint(tmp_path, target=target, strict=False, device="cpu", progress=False)
    assert np.array_equal(np.asarray(loaded["fc"]["bias"]), np.zeros(3))
    with pytest.raises(CheckpointError, match=rf"\[fc\.weight\]: {what}"):
        qbridge.load_checkpoint(tmp_path, target=target, device="cpu", progress=False)


def test_truncated_file(made, tmp_path):
    ck = _copy(made, "nf4", tmp_path)
    f = ck / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[:-1000])
    with pytest.raises(
        CheckpointError,
        match=rf"model.safetensors: not a readable safetensors file .*; the file is {len(data) - 1000} bytes where "
        rf"its header describes {len(data)}: it was cut short",
    ):
        qbridge.load_checkpoint(ck, progress=False)
    header = int.from_bytes(data[:8], "little")
    f.write_bytes(data[: header // 2])  # inside the header
    with pytest.raises(
        CheckpointError,
        match=rf"the file is {header // 2} bytes, shorter than its {header}-byte header: it was cut",
    ):
        qbridge.inspect_checkpoint(ck)


def test_a_whole_file_whose_header_gives_a_tensor_more_bytes_is_not_called_cut_short(tmp_path):
    # all 64 bytes of its one tensor are there, but the header gives it 4064 where its shape says 16 float32
    header = json.dumps({"a": {"dtype": "F32", "shape": [16], "data_offsets": [0, 4064]}}).encode()
    header = header.ljust(-(-len(header) // 8) * 8)
    data = torch.arange(16, dtype=torch.float32).numpy().tobytes()
    (tmp_path / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + data)
    with pytest.raises(CheckpointError, match="not a readable safetensors file") as e:
        qbridge.load_checkpoint(tmp_path, progress=False)
    assert "cut short" not in str(e.value)


def test_corrupt_header(made, tmp_path):
    ck = _copy(made, "nf4", tmp_path)
    f = ck / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:40] = b"{not json at all}" + b" " * 15
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model.safetensors: not a readable safetensors file"):
        qbridge.inspect_checkpoint(ck)


def test_quant_state_that_does_not_match_its_tensor(made, tmp_path):
    ck = _copy(made, "nf4", tmp_path)
    key = "model.layers.0.mlp.down_proj.weight.quant_state.bitsandbytes__nf4"

    def edit(state):
        doc = json.loads(bytes(state[key].tolist()))
        doc["shape"] = [doc["shape"][0] + 8, doc["shape"][1]]
        state[key] = torch.tensor(list(json.dumps(doc).encode()), dtype=torch.uint8)

    _rewrite(ck / "model.safetensors", edit)
    with pytest.raises(
        CheckpointError, match=r"model.safetensors \[model.layers.0.mlp.down_proj.weight\]: .* needs"
    ):
        qbridge.load_checkpoint(ck, progress=False)


def test_quant_state_json_garbage(made, tmp_path):
    ck = _copy(made, "nf4", tmp_path)
    key = "model.layers.1.self_attn.q_proj.weight.quant_state.bitsandbytes__nf4"
    _rewrite(
        ck / "model.safetensors",
        lambda s: s.__setitem__(key, torch.tensor(list(b"{oops"), dtype=torch.uint8)),
    )
    with pytest.raises(CheckpointError, match=f"{key}.*not readable JSON"):
        qbridge.load_checkpoint(ck, progress=False)


def test_piece_without_its_quant_state(made, tmp_path):
    ck = _copy(made, "nf4", tmp_path)
    key = "model.layers.1.self_attn.q_proj.weight.quant_state.bitsandbytes__nf4"
    _rewrite(ck / "model.safetensors", lambda s: s.pop(key))
    with pytest.raises(
        CheckpointError,
        match=r"q_proj.weight.absmax\]: a piece of a quantized weight whose weight or quant state is missing: its "
        r"weight model.layers.1.self_attn.q_proj.weight is here, its quant state "
        r"model.layers.1.self_attn.q_proj.weight.quant_state.bitsandbytes__nf4 \(or __fp4\) is not",
    ):
        qbridge.load_checkpoint(ck, progress=False)


def test_a_quant_state_in_a_file_the_index_leaves_out_is_named_there(made, tmp_path):
    ck = _copy(made, "sharded", tmp_path)
    index_path = ck / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    key = next(k for k in sorted(index["weight_map"]) if k.endswith(".quant_state.bitsandbytes__nf4"))
    moved = {}
    _rewrite(ck / index["weight_map"].pop(key), lambda s: moved.update({key: s.pop(key)}))
    st.save_file(moved, ck / "extra.safetensors", metadata={"format": "pt"})
    index_path.write_text(json.dumps(index))
    with pytest.raises(
        CheckpointError,
        match=rf"its quant state {re.escape(key)} \(or __fp4\) is not .*extra.safetensors holds {re.escape(key)}",
    ):
        qbridge.load_checkpoint(ck, progress=False)


def test_a_quant_state_under_a_name_bitsandbytes_does_not_write_is_named_as_such(made, tmp_path):
    ck = _copy(made, "nf4", tmp_path)
    name = "model.layers.0.mlp.up_proj.weight"

    def edit(state):
        state[f"{name}.quant_state.bitsandbytes__int4"] = state.pop(f"{name}.quant_state.bitsandbytes__nf4")
        for piece in ("absmax", "quant_map", "nested_absmax", "nested_quant_map"):
            state.pop(f"{name}.{piece}")

    _rewrite(ck / "model.safetensors", edit)
    with pytest.raises(
        CheckpointError,
        match=rf"its weight {name} is here, but bitsandbytes names a quant state {name}.quant_state.bitsandbytes__nf4 "
        rf"or __fp4, not {name}.quant_state.bitsandbytes__int4",
    ):
        qbridge.load_checkpoint(ck, progress=False)


@pytest.mark.parametrize("missing", ["nested_absmax", "nested_quant_map", "nested_offset", "both tensors"])
def test_a_nested_absmax_without_one_of_its_pieces_names_it(made, tmp_path, missing):
    ck = _copy(made, "nf4", tmp_path)
    name = "model.layers.0.mlp.up_proj.weight"
    state_key = f"{name}.quant_state.bitsandbytes__nf4"

    def edit(state):
        if missing == "nested_offset":
            doc = json.loads(bytes(state[state_key].tolist()))
            del doc["nested_offset"]
            state[state_key] = torch.tensor(list(json.dumps(doc).encode()), dtype=torch.uint8)
        elif missing == "both tensors":
            state.pop(f"{name}.nested_absmax")
            state.pop(f"{name}.nested_quant_map")
        else:
            state.pop(f"{name}.{missing}")

    _rewrite(ck / "model.safetensors", edit)
    words = {
        "nested_absmax": rf"\[{name}\]: 4-bit weight with {name}.nested_quant_map but without {name}.nested_absmax",
        "nested_quant_map": rf"needs {name}.nested_quant_map and the quant state's nested_offset; "
        rf"{name}.nested_quant_map missing",
        "nested_offset": r"the quant state's nested_offset missing",
        "both tensors": rf"\[{name}.absmax\]: a nested absmax's uint8 codes, but {name}.nested_absmax and "
        rf"{name}.nested_quant_map, which decode them, are missing",
    }
    with pytest.raises(CheckpointError, match=words[missing]):  # on opening, before any weight is decoded
        qbridge.inspect_checkpoint(ck)


def _transposed_quant_state(state):
    key = "model.layers.0.mlp.down_proj.weight.quant_state.bitsandbytes__nf4"
    doc = json.loads(bytes(state[key].tolist()))
    doc["shape"] = doc["shape"][::-1]  # the same element count: only the config's model can tell
    state[key] = torch.tensor(list(json.dumps(doc).encode()), dtype=torch.uint8)


def _without_q_proj_of_layer_1(state):
    for key in [k for k in state if k.startswith("model.layers.1.self_attn.q_proj.weight")]:
        del state[key]


def test_without_a_target_the_checkpoint_is_checked_against_its_config_models_tensors(made, tmp_path):
    ck = _copy(made, "nf4", tmp_path)
    _rewrite(ck / "model.safetensors", lambda s: (_transposed_quant_state(s), _without_q_proj_of_layer_1(s)))
    with pytest.raises(CheckpointError) as info:
        qbridge.load_checkpoint(ck, progress=False)
    text = str(info.value)
    assert "LlamaForCausalLM" in text and "1 tensor of the model missing, 1 tensor of other sizes" in text
    assert "missing: model.layers.1.self_attn.q_proj.weight (the model's [64, 64])" in text
    assert "model.layers.0.mlp.down_proj.weight: the model's [64, 192], the checkpoint's [192, 64]" in text
    assert "strict=False" in text
    with pytest.raises(CheckpointError) as again:  # the model's record is named, should it be stale
        qbridge.load_checkpoint(ck, progress=False)
    assert re.search(
        r"remembered from an earlier build: \S+\.json\).*delete that record", str(again.value), re.S
    )
    summary = qbridge.inspect_checkpoint(ck)  # tells the same, without refusing
    assert summary.config_mismatches == [
        "missing: model.layers.1.self_attn.q_proj.weight (the model's [64, 64])",
        "other size: model.layers.0.mlp.down_proj.weight: the model's [64, 192], the checkpoint's [192, 64]",
    ]
    assert "does not fit the model of its config.json" in str(summary)
    assert qbridge.inspect_checkpoint(made / "nf4").config_mismatches == []
    # strict=False: what the checkpoint holds, as it holds it, with the same words in a warning
    words = r"(?s)missing: model.layers.1.self_attn.q_proj.weight.*the checkpoint's \[192, 64\]"
    with pytest.warns(UserWarning, match=words):
        params, report = qbridge.load_checkpoint(ck, progress=False, strict=False, return_report=True)
    layers = params["params"]["model"]["layers"]
    assert "q_proj" not in layers["1"]["self_attn"] and "q_proj" in layers["0"]["self_attn"]
    assert layers["0"]["mlp"]["down_proj"]["kernel"].shape == (64, 192)
    assert report.leaves == 20  # 21 parameters of the two-layer model, one missing
    assert "remembered" in report.classified_by  # the model's answers as a later process reads them back


def test_a_bitsandbytes_config_over_unquantized_weights_loads_them_and_over_bare_bytes_is_refused(
    made, tmp_path
):
    """transformers 5 quantizes none of Falcon's FalconLinear layers, and saves the float weights with a
    bitsandbytes quantization_config: transformers loads them as stored, and so does qbridge, with a warning.
    Packed 4-bit bytes whose quant states were all stripped stay refused, naming a weight, whatever dtype
    bnb_4bit_quant_storage packed them into (a bfloat16 column looked like unquantized weights)."""
    ck = _copy(made, "dense", tmp_path)
    config = json.loads((made / "nf4" / "config.json").read_text())
    (ck / "config.json").write_text(json.dumps({**json.loads((ck / "config.json").read_text()),
                                                "quantization_config": config["quantization_config"]}))  # fmt: skip
    # a float [N, 1] weight (Mamba's dt_proj at time_step_rank 1) is no packed column: storage is uint8
    column = torch.randn(8, 1, generator=torch.Generator().manual_seed(3)).bfloat16()
    _rewrite(ck / "model.safetensors", lambda s: s.__setitem__("model.column.weight", column))
    with pytest.warns(UserWarning, match="says bitsandbytes, but every weight is stored unquantized"):
        got = qbridge.load_checkpoint(ck, progress=False, device="cpu")
    assert_same_bits(
        np.asarray(got["params"]["model"]["column"]["kernel"]), column.float().numpy().T.astype(jnp.bfloat16)
    )
    del got["params"]["model"]["column"]
    want = qbridge.load_checkpoint(made / "dense", progress=False, device="cpu")
    jax.tree.map(lambda a, b: assert_same_bits(np.asarray(a), np.asarray(b)), got, want)
    bnb_llama(made / "dense", tmp_path / "bf16-storage", quant_type="nf4", nested=True,
              quant_storage=torch.bfloat16)  # fmt: skip
    for stored, dtype in (
        ("nf4", "uint8"),
        ("bf16-storage", "bfloat16"),
    ):  # packed in a column of the storage dtype
        bare = _copy(made, stored, tmp_path / "bare") if stored == "nf4" else tmp_path / stored
        _rewrite(bare / "model.safetensors", lambda s: [s.pop(k) for k in list(s) if k.rpartition(".")[2] != "weight"
                                                        and ".weight." in k])  # fmt: skip
        words = rf"no tensor carries a bitsandbytes quant state \(model\.\S+\.weight is stored as torch.{dtype} \[\d+, 1\], packed"
        for strict in (True, False):
            with pytest.raises(CheckpointError, match=words):
                qbridge.load_checkpoint(bare, progress=False, strict=strict)


def test_a_long_list_of_mismatches_is_cut_in_the_message_and_whole_in_lines():
    from qbridge._classify import ConfigMismatch

    unfit = ConfigMismatch("LlamaForCausalLM", {f"m{i}.weight": (4, 2) for i in range(11)},
                           [(f"s{i}.weight", (3,), (5,)) for i in range(9)])  # fmt: skip
    assert unfit.summary() == "11 tensors of the model missing, 9 tensors of other sizes"
    lines = unfit.describe().split("\n  ")
    assert lines[:8] == [f"missing: m{i}.weight (the model's [4, 2])" for i in range(8)]
    assert lines[8] == "... and 3 more missing" and lines[-1] == "... and 1 more of other sizes"
    assert lines[9:-1] == [
        f"other size: s{i}.weight: the model's [3], the checkpoint's [5]" for i in range(8)
    ]
    assert (
        len(unfit.lines()) == 20
        and unfit.lines()[-1] == "other size: s8.weight: the model's [3], the checkpoint's [5]"
    )
    one = ConfigMismatch("GPT2LMHeadModel", {"a.weight": (2,)}, [])
    assert (
        one.summary() == "1 tensor of the model missing"
        and one.describe() == "missing: a.weight (the model's [2])"
    )


def test_a_config_of_other_sizes_is_named_without_a_target(made, tmp_path):
    ck = _copy(made, "fp8", tmp_path)
    config = json.loads((ck / "config.json").read_text())
    (ck / "config.json").write_text(json.dumps({**config, "intermediate_size": 128}))
    with pytest.raises(CheckpointError) as info:
        qbridge.load_checkpoint(ck, progress=False)
    text = str(info.value)
    assert "6 tensors of other sizes" in text and "of the model missing" not in text
    assert "model.layers.1.mlp.up_proj.weight: the model's [128, 64], the checkpoint's [192, 64]" in text


@pytest.mark.parametrize("leaf", ["weight_scale_inv", "weight_scale"])
def test_fp8_scale_shape_that_does_not_fit(made, tmp_path, leaf):
    """The error names the scale tensor, and calls it by the checkpoint's name for it."""
    ck = _copy(made, "fp8", tmp_path)
    key = f"model.layers.0.mlp.gate_proj.{leaf}"

    def damage(s):
        s.pop("model.layers.0.mlp.gate_proj.weight_scale_inv")
        s[key] = torch.ones(3, 1)

    _rewrite(ck / "model.safetensors", damage)
    with pytest.raises(CheckpointError, match=rf"{key}\]: {leaf} has shape \(3, 1\).*block scales \(2, 1\)"):
        qbridge.inspect_checkpoint(ck)


@pytest.mark.parametrize("damaged", [False, True])
def test_fp8_scales_saved_as_parameters_in_a_torch_file(made, tmp_path, damaged):
    """A torch file may hold its scales as nn.Parameters (requires_grad): they are checked like others."""
    ck = _copy(made, "fp8", tmp_path)
    state = st.load_file(ck / "model.safetensors")
    (ck / "model.safetensors").unlink()
    key = "model.layers.1.mlp.up_proj.weight_scale_inv"
    if damaged:
        state[key][0, 0] = float("inf")
    state = {k: torch.nn.Parameter(v) if k.endswith("weight_scale_inv") else v for k, v in state.items()}
    torch.save(state, ck / "pytorch_model.bin")
    if damaged:
        with pytest.raises(CheckpointError, match=rf"{key}\]: 1 scale\(s\) are NaN or Inf"):
            qbridge.load_checkpoint(ck, progress=False)
    else:
        assert qbridge.load_checkpoint(ck, progress=False)["params"]


def test_fp8_nan_scale(made, tmp_path):
    ck = _copy(made, "fp8", tmp_path)
    key = "model.layers.1.mlp.up_proj.weight_scale_inv"

    def edit(state):
        state[key][0, 0] = float("nan")

    _rewrite(ck / "model.safetensors", edit)
    with pytest.raises(CheckpointError, match=rf"{key}\]: 1 scale\(s\) are NaN or Inf"):
        qbridge.load_checkpoint(ck, progress=False)


@pytest.mark.parametrize("layout", ["torch.save", "torchao safetensors"])
@pytest.mark.parametrize(("config", "bad"), [("int8", "nan"), ("float8", "inf"), ("intx", "nan")])
def test_torchao_nan_scale(tmp_path, config, bad, layout):
    """torchao weights' scales are checked as bitsandbytes' and FP8's are: a NaN or Inf refuses the load,
    naming the tensor (it loaded, its weight all NaN, before the check)."""
    ao = pytest.importorskip("torchao.quantization")
    from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict

    cfg = {
        "int8": ao.Int8WeightOnlyConfig(),
        "float8": ao.Float8WeightOnlyConfig(),
        "intx": ao.IntxWeightOnlyConfig(weight_dtype=torch.int4, granularity=ao.PerGroup(32)),
    }[config]
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32, bias=False), torch.nn.Linear(32, 16, bias=False))
    ao.quantize_(model, cfg)
    good = {k: v.dequantize() for k, v in model.state_dict().items()}
    model[1].weight.scale.view(-1)[3] = float(bad)
    state = model.state_dict()
    if layout == "torch.save":
        torch.save(state, tmp_path / "model.pt")
    else:
        data, meta = flatten_tensor_state_dict(state)
        st.save_file(data, tmp_path / "model.safetensors", metadata=meta)
    with pytest.raises(
        CheckpointError, match=r"\[1\.weight\]: 1 value\(s\) of its torchao \w+'s scale are NaN or Inf"
    ):
        qbridge.load_checkpoint(tmp_path, device="cpu", progress=False)
    with pytest.raises(CheckpointError, match=r"\[1\.weight\]: 1 value\(s\)"):
        qbridge.dequantized_state(tmp_path)
    # inspect too (a torch.save file's torchao weights were not checked, and `qbridge inspect` exited 0;
    # torchao's safetensors layout names the stored scale)
    with pytest.raises(CheckpointError, match=r"\[1\._?weight(_scale)?\]: 1 .*NaN or Inf"):
        qbridge.inspect_checkpoint(tmp_path)
    # a process of a multi-process job reads only its shards' slices: torchao slices the weight, and the
    # slice's scales are checked (rows 0-7 hold the damaged one; rows 8-15 load)
    from qbridge._sharding import load_shard

    with qbridge.open_checkpoint(tmp_path) as ckpt:
        entry, rule = ckpt.entries["1.weight"], jax_side.rule_for("param", "weight")
        with pytest.raises(CheckpointError, match=r"\[1\.weight\]: 1 value\(s\) of its torchao"):
            load_shard(ckpt, entry, rule, (slice(0, 8),), torch.device("cpu"))
        assert load_shard(ckpt, entry, rule, (slice(8, 16),), torch.device("cpu")).shape == (8, 32)
    model[1].weight.scale.view(-1)[3] = 1.0  # the same checkpoint undamaged loads, with torchao's values
    state = model.state_dict()
    if layout == "torch.save":
        torch.save(state, tmp_path / "model.pt")
    else:
        st.save_file(flatten_tensor_state_dict(state)[0], tmp_path / "model.safetensors", metadata=meta)
    loaded = qbridge.dequantized_state(tmp_path)
    assert torch.equal(loaded["0.weight"], good["0.weight"])
    assert qbridge.inspect_checkpoint(tmp_path).kinds["torchao"]["tensors"] == 2


def test_torchao_nf4_weights_with_infinite_quantization_factors_load(tmp_path):
    """An NF4Tensor's quantization_factor (256 / (2 * absmax range)) is infinite where a block's absmaxes are
    all equal (a ternary or constant weight): torchao decodes it exactly, and it is no damaged scale (it was
    refused as one)."""
    ao = pytest.importorskip("torchao.quantization")
    torch.manual_seed(0)
    for w in (
        (torch.randint(-1, 2, (256, 256)).float() * 0.02).bfloat16(),
        torch.ones(64, 256, dtype=torch.bfloat16),
    ):
        nf4 = ao.NF4Tensor.from_tensor(w, 64, 256)
        assert not torch.isfinite(nf4.quantization_factor).all()
        torch.save({"proj.weight": nf4}, tmp_path / "model.pt")
        assert torch.equal(qbridge.dequantized_state(tmp_path)["proj.weight"], nf4.get_original_weight())
        assert qbridge.inspect_checkpoint(tmp_path).kinds["torchao"]["tensors"] == 1
    # a NaN there, or in its 16-entry table, is never right: refused (they loaded, the weight partly NaN)
    for inner in ("quantization_factor", "nf4"):
        nf4 = ao.NF4Tensor.from_tensor(torch.randn(64, 256).bfloat16(), 64, 256)
        getattr(nf4, inner).view(-1)[0] = float("nan")
        torch.save({"proj.weight": nf4}, tmp_path / "model.pt")
        said = rf"\[proj\.weight\]: 1 value\(s\) of its torchao NF4Tensor's {inner} are NaN"
        with pytest.raises(CheckpointError, match=said):
            qbridge.load_checkpoint(tmp_path, device="cpu", progress=False)
        with pytest.raises(CheckpointError, match=said):
            qbridge.inspect_checkpoint(tmp_path)


def test_mixed_formats(made, tmp_path):
    ck = _copy(made, "nf4", tmp_path)
    fp8 = st.load_file(made / "fp8" / "model.safetensors")

    def edit(state):
        state["extra.weight"] = fp8["model.layers.0.mlp.up_proj.weight"]
        state["extra.weight_scale_inv"] = fp8["model.layers.0.mlp.up_proj.weight_scale_inv"]

    _rewrite(ck / "model.safetensors", edit)
    with pytest.raises(FormatError, match=r"mixes quantization formats \['bnb4', 'fp8'\]"):
        qbridge.load_checkpoint(ck, progress=False)


def test_unknown_quant_method(made, tmp_path):
    ck = _copy(made, "dense", tmp_path)
    config = json.loads((ck / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (ck / "config.json").write_text(json.dumps(config))
    with pytest.raises(FormatError, match="quant_method is 'gptq'"):
        qbridge.load_checkpoint(ck, progress=False)


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))  # would create the marker file if unpickled


def test_pickle_that_weights_only_refuses_is_never_run(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "model.pt"
    torch.save({"w": torch.ones(2), "evil": _Payload(str(marker))}, path)
    with pytest.raises(
        CheckpointError, match=r"model.pt: torch.load\(weights_only=True\) refused it.*never runs pickle code"
    ):
        qbridge.load_checkpoint(path, progress=False)
    assert not marker.exists()


def test_empty_directory_and_missing_path(tmp_path):
    with pytest.raises(CheckpointError, match=r"no .safetensors, .bin or .pt files$"):
        qbridge.load_checkpoint(tmp_path, progress=False)
    # a folder of checkpoints (what `qbridge demo --workdir` writes): the ones below it are named
    from safetensors.torch import save_file

    for name in ("llama-nf4", "llama-bf16"):
        (tmp_path / name).mkdir()
        save_file({"w": torch.ones(2)}, tmp_path / name / "model.safetensors")
    (tmp_path / "notes").mkdir()
    with pytest.raises(
        CheckpointError,
        match=r"no .safetensors, .bin or .pt files \(its folders llama-bf16, llama-nf4 hold tensor files: pass one",
    ):
        qbridge.open_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="no such file or directory"):
        qbridge.load_checkpoint(tmp_path / "nope", progress=False)


def test_failed_match_returns_nothing(made):
    config = jax_side.LlamaConfig.from_hf(json.loads((made / "nf4" / "config.json").read_text()))
    wrong = jax_side.LlamaConfig(**{**config.__dict__, "intermediate_size": 128})
    with pytest.raises(jax_side.MatchError) as info:
        qbridge.load_checkpoint(made / "nf4", target=jax_side.abstract_llama(wrong), progress=False)
    text = str(info.value)
    assert text.count("shape:") == 6 and "model.layers.0.mlp.down_proj.kernel" in text


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float8_e4m3fn])
def test_read_stacked_gives_each_tensor_as_read_gives_it(tmp_path, dtype):
    """Checkpoint.read_stacked (the grouped FP8 route's reader: positioned reads into one
    tensor) holds in row i what read(keys[i]) holds, padded to 16 bytes, from safetensors and torch files,
    counts bytes once per small key, and names a tensor whose bytes the file lacks."""
    from safetensors.torch import save_file

    from qbridge._checkpoint import open_checkpoint

    gen = torch.Generator().manual_seed(5)
    stored = {f"s{i}": (torch.randn(3, 5, generator=gen) * 40).to(dtype) for i in range(4)}
    stored["other"] = torch.randn(2, 2, generator=gen)
    if dtype.itemsize == 1:  # float8 weights come with their scales
        stored.update({f"s{i}_scale_inv": torch.ones(1) for i in range(4)})
    save_file(stored, tmp_path / "model.safetensors")
    torch.save(stored, tmp_path / "model.pt")
    keys = ["s2", "s0", "s3"]
    for file in ("model.safetensors", "model.pt"):
        with open_checkpoint(tmp_path / file) as ckpt:
            rows = ckpt.read_stacked(keys)
            assert rows.dtype == dtype and rows.shape[0] == 3 and rows.shape[1] * dtype.itemsize % 16 == 0
            for i, key in enumerate(keys):
                got = rows[i, :15].reshape(3, 5)
                assert torch.equal(got.view(torch.uint8), stored[key].view(torch.uint8)), (file, key)
            assert ckpt.bytes_read == 3 * 15 * dtype.itemsize
            ckpt.read_stacked(keys)  # small tensors are counted once, as read counts them
            assert ckpt.bytes_read == 3 * 15 * dtype.itemsize
            with pytest.raises(ValueError, match="'other' is"):
                ckpt.read_stacked(["s0", "other"])
    whole = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "cut").mkdir()
    (tmp_path / "cut" / "model.safetensors").write_bytes(whole)
    with open_checkpoint(tmp_path / "cut" / "model.safetensors") as ckpt:
        (tmp_path / "cut" / "model.safetensors").write_bytes(whole[: len(whole) - 8])  # cut after opening
        last = max(keys, key=lambda k: ckpt.source._offsets(ckpt.source.key_file[k])[k][1])
        with pytest.raises(
            CheckpointError,
            match=rf"reading '{last}' failed: {15 * dtype.itemsize - 8} of its {15 * dtype.itemsize} bytes read \(a truncated",
        ):
            ckpt.read_stacked(keys)


def test_read_stacked_refuses_what_it_cannot_read_and_repeats_short_reads(tmp_path, monkeypatch):
    """Missing keys, no keys, a closed checkpoint: clear errors. Zero-element tensors read as empty rows.
    A positioned read returns at most about 2 GiB on Linux, so reads are repeated until done: here every
    read is cut to 7 bytes, and the rows are still whole."""
    from safetensors.torch import save_file

    from qbridge import _checkpoint
    from qbridge._checkpoint import open_checkpoint

    gen = torch.Generator().manual_seed(6)
    stored = {f"s{i}": torch.randn(5, 3, generator=gen) for i in range(3)}
    stored.update(z0=torch.empty(0, 4), z1=torch.empty(0, 4))
    save_file(stored, tmp_path / "model.safetensors")
    with open_checkpoint(tmp_path / "model.safetensors") as ckpt:
        with pytest.raises(CheckpointError, match="checkpoint has no tensor 'nope'"):
            ckpt.read_stacked(["s0", "nope"])
        for keys in ([], "s0"):
            with pytest.raises(ValueError, match="non-empty sequence of keys"):
                ckpt.read_stacked(keys)
        assert ckpt.read_stacked(["z0", "z1"]).shape == (2, 0)
        monkeypatch.setattr(_checkpoint, "_read_ranges", lambda *args: False)  # the reads from Python
        real = _checkpoint._PREADV
        if real is not None:
            monkeypatch.setattr(
                _checkpoint, "_PREADV", lambda fd, bufs, offset: real(fd, [bufs[0][:7]], offset)
            )
        rows = ckpt.read_stacked(["s2", "s1"])
        assert torch.equal(rows[0, :15].reshape(5, 3), stored["s2"]) and torch.equal(
            rows[1, :15].reshape(5, 3), stored["s1"]
        )
    with pytest.raises(CheckpointError, match="closed"):
        ckpt.read_stacked(["s0"])


def _count_preadv(monkeypatch):
    """A list that gets the number of buffers of each positioned read of many buffers from here on, where the
    tensors of a group are read from Python (torch_side's library's reads, tested below, kept out)."""
    from qbridge import _checkpoint

    monkeypatch.setattr(_checkpoint, "_read_ranges", lambda *args: False)
    calls = []
    real = _checkpoint._PREADV
    monkeypatch.setattr(
        _checkpoint, "_PREADV", lambda fd, bufs, at: calls.append(len(bufs)) or real(fd, bufs, at)
    )
    return calls


def test_read_stacked_reads_tensors_close_together_with_one_call_per_file(tmp_path, monkeypatch):
    """A group's scales are every third tensor of a layer's experts: read_stacked reads each file's run of them
    with one positioned read (the bytes between them into scratch), in any order asked, and gives each row
    what read() gives. Runs end at gaps over _GAP_READ, and a read that comes up short is repeated key by
    key (test above)."""
    from safetensors.torch import save_file

    from qbridge import _checkpoint
    from qbridge._checkpoint import open_checkpoint

    if _checkpoint._PREADV is None:
        pytest.skip("no os.preadv here: every tensor is read on its own")
    gen = torch.Generator().manual_seed(7)
    for part in range(2):
        stored = {f"e{e:03d}.{proj}.s": torch.rand(3, 7, generator=gen)
                  for e in range(20 * part, 20 * part + 20) for proj in ("down", "gate", "up")}  # fmt: skip
        save_file(stored, tmp_path / f"model-{part}.safetensors")
    keys = [f"e{e:03d}.gate.s" for e in range(40)]
    keys = keys[::2] + keys[1::2]  # not in file order
    calls = _count_preadv(monkeypatch)
    with open_checkpoint(tmp_path) as ckpt:
        rows = ckpt.read_stacked(keys)
        assert calls == [39, 39]  # per file: 20 rows and the 19 gaps between them
        for i, key in enumerate(keys):
            assert torch.equal(rows[i, :21], ckpt.read(key).reshape(-1)), key
        calls.clear()
        monkeypatch.setattr(_checkpoint, "_GAP_READ", 4 * 21 * 2 - 1)  # the gaps (two scales) no longer fit
        again = ckpt.read_stacked(keys)
        assert calls == [1] * 40 and torch.equal(again[:, :21], rows[:, :21])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int8])
def test_read_stacked_reads_evenly_spaced_tensors_with_one_read(tmp_path, monkeypatch, dtype):
    """One projection's scales of one file's experts lie evenly spaced (a file stores one dtype's tensors
    together, by name): read_stacked reads them, asked in any order, with one positioned read of one buffer,
    gives each row what read() gives and counts each once; asked twice for one key, spaced unevenly or too far
    apart, or from a file cut short since opening, it reads as before (key by key, or naming the key that
    the file lacks, counting nothing)."""
    from safetensors.torch import save_file

    from qbridge import _checkpoint
    from qbridge._checkpoint import open_checkpoint

    if _checkpoint._PREADV is None:
        pytest.skip("no os.preadv here: every tensor is read on its own")
    gen = torch.Generator().manual_seed(8)
    stored = {f"e{e:03d}.{proj}.s": (torch.rand(3, 7, generator=gen) * 100).to(dtype)
              for e in range(40) for proj in ("down", "gate", "up")}  # fmt: skip
    stored["z.odd"] = torch.rand(5)  # another dtype (float32) or after the experts: not in the run
    save_file(stored, tmp_path / "model.safetensors")
    order = torch.randperm(40, generator=gen).tolist()
    keys = [f"e{e:03d}.gate.s" for e in order]
    nbytes = 21 * dtype.itemsize
    calls = _count_preadv(monkeypatch)
    with open_checkpoint(tmp_path) as ckpt:
        rows = ckpt.read_stacked(keys)
        assert calls == [1] and ckpt.bytes_read == 40 * nbytes
        for i, key in enumerate(keys):
            assert torch.equal(rows[i, :21].view(torch.uint8), stored[key].reshape(-1).view(torch.uint8)), key
        calls.clear()
        twice = ckpt.read_stacked([keys[0], *keys[:5]])  # a key twice: not evenly spaced
        assert calls and calls != [1]
        assert torch.equal(twice[1:, :21], rows[:5, :21]) and torch.equal(
            twice[0, :21], rows[0, :21]
        )  # padding: unset
        calls.clear()
        three = ["e001.gate.s", "e002.gate.s", "e005.gate.s"]  # spaced 3 and 9 tensors apart
        uneven = ckpt.read_stacked(three)
        assert calls != [1]
        for i, key in enumerate(three):
            assert torch.equal(uneven[i, :21].view(torch.uint8), stored[key].reshape(-1).view(torch.uint8)), (
                key
            )
        calls.clear()
        monkeypatch.setattr(_checkpoint, "_GAP_READ", 2 * nbytes - 1)  # two tensors between: too far apart
        apart = ckpt.read_stacked(keys)
        assert calls == [1] * 40 and torch.equal(apart[:, :21], rows[:, :21])
        monkeypatch.setattr(_checkpoint, "_GAP_READ", 16 << 10)
    _refuses_a_file_cut_after_opening(tmp_path, tmp_path / "model.safetensors", keys, nbytes, 3)


def _refuses_a_file_cut_after_opening(tmp_path, path, keys, nbytes, short):
    """Opens a copy of the safetensors file ``path``, cuts it ``short`` bytes before the end of the last of
    ``keys`` (``nbytes`` each) and checks that ``read_stacked(keys)`` names that key and the bytes of it read,
    and counts nothing."""
    from qbridge._checkpoint import open_checkpoint

    whole = path.read_bytes()
    cut = tmp_path / "cut" / "model.safetensors"
    cut.parent.mkdir()
    cut.write_bytes(whole)
    with open_checkpoint(cut) as ckpt:
        ends = {key: ckpt.source._offsets(ckpt.source.key_file[key])[key][1] for key in keys}
        last = max(keys, key=ends.__getitem__)
        cut.write_bytes(whole[: ends[last] - short])  # cut after opening
        with pytest.raises(
            CheckpointError, match=rf"reading '{last}' failed: {nbytes - short} of its {nbytes} bytes read"
        ):
            ckpt.read_stacked(keys)
        assert ckpt.bytes_read == 0


@pytest.fixture
def read_ranges():
    """torch_side's library's qb_read_ranges, built (or loaded) now; skipped where no C compiler is."""
    from torch_side import _native

    return library_entry(
        _native.read_ranges(wait=True),
        "no C compiler here: a group's tensors are read from Python (tested above)",
    )


def test_read_stacked_reads_a_group_in_one_call_of_the_library(tmp_path, monkeypatch, read_ranges):
    """A group's tensors that lie apart in their files (one projection of a layer's experts, the other two
    projections between them, too far apart to read in one run) are read by torch_side's library, one call per
    file for all of its rows, asked in any order; each row holds what read() gives, each key is counted once.
    Tensors back to back are read in one positioned read, without it; the tensors alone in their runs beside
    them, in one call.
    A file cut short since it was opened: the library's call fails, the reads from Python name the key, and
    nothing is counted."""
    from safetensors.torch import save_file

    from qbridge._checkpoint import open_checkpoint
    from torch_side import _native

    gen = torch.Generator().manual_seed(9)
    for part in range(2):  # 33 x 65 float32: 8580 bytes, two of them between (17160 > _GAP_READ)
        stored = {f"e{e:03d}.{proj}.w": torch.randn(33, 65, generator=gen)
                  for e in range(20 * part, 20 * part + 20) for proj in ("down", "gate", "up")}  # fmt: skip
        save_file(stored, tmp_path / f"model-{part}.safetensors")
    order = torch.randperm(40, generator=gen).tolist()
    keys = [f"e{e:03d}.up.w" for e in order]
    nbytes = 33 * 65 * 4
    calls: list[int] = []
    monkeypatch.setattr(_native, "_READ", lambda fd, n, *rest: calls.append(n) or read_ranges(fd, n, *rest))
    with open_checkpoint(tmp_path) as ckpt:
        rows = ckpt.read_stacked(keys)
        assert sorted(calls) == [20, 20] and ckpt.bytes_read == 40 * nbytes
        for i, key in enumerate(keys):
            assert torch.equal(
                rows[i, : 33 * 65].view(torch.uint8), ckpt.read(key).reshape(-1).view(torch.uint8)
            )
        pinned = torch.cuda.is_available()  # pinned rows are host memory too
        again = ckpt.read_stacked(keys[:7], pin=pinned)
        assert len(calls) == 4 and torch.equal(again[:, : 33 * 65], rows[:7, : 33 * 65])
        close = [f"e{e:03d}.{proj}.w" for e in range(3) for proj in ("down", "gate", "up")]
        together = ckpt.read_stacked(close)  # one run (back to back): one positioned read of many buffers
        assert len(calls) == 4
        for i, key in enumerate(close):
            assert torch.equal(together[i, : 33 * 65], ckpt.read(key).reshape(-1)), key
        mixed = ["e012.up.w", *close[:5], "e005.up.w", "e009.gate.w"]  # a run of five, three alone
        got = ckpt.read_stacked(mixed)  # the run in one positioned read, the three alone in one call
        assert calls[4:] == [3]
        for i, key in enumerate(mixed):
            assert torch.equal(got[i, : 33 * 65], ckpt.read(key).reshape(-1)), key
    calls.clear()
    keys = [f"e{e:03d}.up.w" for e in range(20, 40)]
    _refuses_a_file_cut_after_opening(tmp_path, tmp_path / "model-1.safetensors", keys, nbytes, 5)
    assert calls == [20]  # the library's call, which failed


def test_read_ranges_says_which_range_it_could_not_read(tmp_path, read_ranges):
    """qb_read_ranges reads each byte range into its buffer and returns -1; where a range cannot be read whole
    it returns that range's index, the bytes of it read and the errno (0: the file ended first), and reads no
    later range."""
    import ctypes
    import errno

    data = np.random.default_rng(10).integers(0, 256, 1000, dtype=np.uint8)
    (tmp_path / "f").write_bytes(data.tobytes())

    def call(fd, ranges):
        buffers = [np.zeros(max(n, 0), dtype=np.uint8) for _, n in ranges]
        begins = np.array([b for b, _ in ranges] or [0], dtype=np.int64)
        lengths = np.array([n for _, n in ranges] or [0], dtype=np.int64)
        dests = np.array([b.ctypes.data for b in buffers] or [0], dtype=np.int64)
        got, error = ctypes.c_int64(-7), ctypes.c_int(-7)
        first = read_ranges(fd, len(ranges), begins.ctypes.data, lengths.ctypes.data, dests.ctypes.data,
                            ctypes.byref(got), ctypes.byref(error))  # fmt: skip
        return first, got.value, error.value, buffers

    with open(tmp_path / "f", "rb") as f:
        ranges = [(500, 300), (10, 100), (0, 0), (990, 10)]
        first, got, error, buffers = call(f.fileno(), ranges)
        assert (first, got, error) == (-1, -7, -7)
        for (begin, n), buffer in zip(ranges, buffers):
            assert np.array_equal(buffer, data[begin : begin + n])
        first, got, error, buffers = call(f.fileno(), [(10, 100), (900, 200), (0, 50)])
        assert (first, got, error) == (1, 100, 0)  # the file ends 100 bytes into the second range
        assert np.array_equal(buffers[1][:100], data[900:]) and not buffers[2].any()
        assert call(f.fileno(), [])[0] == -1
        for bad in ([(10, 10), (-1, 5)], [(10, 10), (0, -5)]):  # a negative offset or length
            first, got, error, buffers = call(f.fileno(), bad)
            assert (first, got, error) == (1, 0, errno.EINVAL) and np.array_equal(buffers[0], data[10:20])
        got, error = ctypes.c_int64(-7), ctypes.c_int(-7)
        assert read_ranges(f.fileno(), -3, None, None, None, ctypes.byref(got), ctypes.byref(error)) == 0
        assert (got.value, error.value) == (0, errno.EINVAL)
        fd = os.dup(f.fileno())
    os.close(fd)
    first, got, error, _ = call(fd, [(0, 10)])
    assert (first, got, error) == (0, 0, errno.EBADF)


def test_a_read_never_sets_up_the_library(tmp_path):
    """read_stacked uses torch_side's library only once something else loaded it (a GPU load starts that): a
    read in a process where it is not built yet starts no build (a forked worker would leave its folder
    behind) and reads from Python, and a misspelt QBRIDGE_CPU_KERNEL set after import does not fail it."""
    import subprocess
    import textwrap

    from safetensors.torch import save_file

    # 20 kB each, two between: too far apart for one run, as where the library would read them
    save_file({f"e{e}.{p}": torch.full((5000,), e * 3.0 + i) for e in range(8) for i, p in enumerate("abc")},
              tmp_path / "model.safetensors")  # fmt: skip
    code = textwrap.dedent(f"""
        import os, torch
        from qbridge._checkpoint import open_checkpoint
        from torch_side import _native
        os.environ["QBRIDGE_CPU_KERNEL"] = "of"  # misspelt after import
        with open_checkpoint({str(tmp_path / "model.safetensors")!r}) as ckpt:
            rows = ckpt.read_stacked([f"e{{e}}.b" for e in range(8)])
        assert all(bool((rows[e, :5000] == e * 3.0 + 1).all()) for e in range(8))
        print("building", _native._BUILDING is not None, "private", _native._PRIVATE is not None)
        """)  # fmt: skip
    cache = tmp_path / "cache"  # empty: nothing built yet
    env = {**os.environ, "QBRIDGE_CACHE_DIR": str(cache), "JAX_PLATFORMS": "cpu"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "building False private False" in done.stdout
    assert not cache.exists() or not any(cache.rglob("*.so"))


_MANY_FILES = """
import resource, sys, pathlib, torch
from safetensors.torch import save_file
import qbridge
folder, files = pathlib.Path(sys.argv[1]), int(sys.argv[2])
for i in range(files):  # tensors of 80 KiB: read ahead, through the file's memory
    save_file({f"w{i}": torch.full((20480,), float(i))}, folder / f"part-{i:04d}.safetensors")
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (min(files + 120, hard), hard))
params = qbridge.load_checkpoint(folder, device="cpu", progress=False)["params"]
assert all(float(params[f"w{i}"][0]) == i for i in range(files))
print("LOADED", files)
"""


def test_a_checkpoint_of_many_files_loads_with_one_descriptor_per_file(tmp_path):
    """A checkpoint keeps one open file per safetensors file; mapping tensors for the read-ahead threads
    must not hold another per file (a checkpoint of N files then needs 2N descriptors: 500 files failed
    under the usual limit of 1024)."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", _MANY_FILES, str(tmp_path), "300"], capture_output=True,
                       text=True, timeout=600, env={**os.environ, "JAX_PLATFORMS": "cpu"})  # fmt: skip
    assert "LOADED 300" in r.stdout, r.stdout + r.stderr[-3000:]


_TRUNCATED = """
import os, sys, pathlib, torch
from safetensors.torch import save_file
from qbridge import CheckpointError
from qbridge._checkpoint import open_checkpoint
folder = pathlib.Path(sys.argv[1])
stored = {"a": torch.ones(40000), "b": torch.ones(40000), "c": torch.ones(40000), "z": torch.ones(10)}
save_file(stored, folder / "model.safetensors")
with open_checkpoint(folder / "model.safetensors") as ckpt:
    ckpt.read_ahead("a", pin=False)
    assert ckpt.read("a").sum() == 40000
    size = (folder / "model.safetensors").stat().st_size
    os.truncate(folder / "model.safetensors", size - 200_000)  # cut in place while the load runs: into b
    ckpt.read_ahead("b", pin=False)
    try:
        ckpt.read("b")
    except CheckpointError as e:
        print("REFUSED", e)
    try:  # a large tensor not read ahead is read the same way, not through the file's map
        print("LARGE READ", float(ckpt.read("c").sum()))
    except CheckpointError as e:
        print("LARGE REFUSED", e)
    try:  # a small tensor (the file's last) is read with a positioned read, not through the file's map
        ckpt.read("z")
    except CheckpointError as e:
        print("SMALL REFUSED", e)
"""


def test_a_file_cut_in_place_during_a_load_is_an_error_not_a_crash(tmp_path):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", _TRUNCATED, str(tmp_path)], capture_output=True, text=True,
                       timeout=300, env={**os.environ, "JAX_PLATFORMS": "cpu"})  # fmt: skip
    assert r.returncode == 0 and "reading 'b' failed: the file ends after 120040 of its 160000" in r.stdout, (
        r.returncode,
        r.stdout + r.stderr[-3000:],
    )
    assert (
        "LARGE REFUSED" in r.stdout and "reading 'c' failed: the file ends after 0 of its 160000" in r.stdout
    ), (
        r.returncode,
        r.stdout + r.stderr[-3000:],
    )
    assert (
        "SMALL REFUSED" in r.stdout
        and "reading 'z' failed: the file ends after 0 of its 40 bytes" in r.stdout
    ), (
        r.returncode,
        r.stdout + r.stderr[-3000:],
    )


def test_a_device_that_is_not_there_is_named_with_what_to_use(tmp_path):
    """device= strings fail with qbridge's message, not torch's or JAX's: JAX's name 'gpu', a device kind
    qbridge does not load onto, and (on a machine without one) a CUDA GPU."""
    from safetensors.torch import save_file

    save_file({"w": torch.ones(3)}, tmp_path / "model.safetensors")
    cases = [("gpu", r"device 'gpu' is JAX's name for a GPU; qbridge takes torch's names: use 'cpu', 'cuda'"),
             ("gpu:1", "JAX's name for a GPU"), ("mps", "qbridge loads onto the CPU or CUDA GPUs"),
             ("cpu0", r"'cpu', 'cuda' or 'cuda:i'")]  # fmt: skip
    if not torch.cuda.is_available():
        cases += [("cuda", "sees no CUDA GPU here; use 'cpu'"), ("cuda:0", "sees no CUDA GPU here")]
    for device, message in cases:
        with pytest.raises(ValueError, match=message):
            qbridge.load_checkpoint(tmp_path, device=device, progress=False)


def _fp8_dir(path, tensors, block=(128, 128)):
    from safetensors.torch import save_file

    path.mkdir()
    save_file(tensors, path / "model.safetensors")
    qc = {"quant_method": "fp8"} | ({"weight_block_size": list(block)} if block else {})
    (path / "config.json").write_text(json.dumps({"quantization_config": qc}))
    return path


def test_an_fp8_weight_with_two_scales_is_refused_naming_both(tmp_path):
    W, s = torch.randn(300, 500).to(torch.float8_e4m3fn), torch.rand(3, 4)
    ck = _fp8_dir(tmp_path / "ck", {"k.weight": W, "k.weight_scale_inv": s, "k.weight_scale": s * 2})
    with pytest.raises(CheckpointError, match=r"k.weight.*two scales, k.weight_scale_inv and k.weight_scale"):
        qbridge.load_checkpoint(ck, device="cpu")


@pytest.mark.parametrize("stored", ["missing", "bfloat16"])
def test_an_fp8_scale_whose_weight_is_not_float8_is_refused(tmp_path, stored):
    """Before, the scale became a Flax parameter of its own (and a bf16 weight beside it loaded unscaled)."""
    W, s = torch.randn(300, 500).to(torch.float8_e4m3fn), torch.rand(3, 4)
    tensors = {"k.weight": W, "k.weight_scale_inv": s, "m.weight_scale_inv": s.clone()}
    if stored == "bfloat16":
        tensors["m.weight"] = torch.randn(300, 500).bfloat16()
    ck = _fp8_dir(tmp_path / "ck", tensors)
    held = "is missing" if stored == "missing" else "is stored as torch.bfloat16, not float8"
    with pytest.raises(CheckpointError, match=rf"\[m.weight_scale_inv\]: the scale of a float8 weight, but its "
                       rf"weight m.weight {held}"):  # fmt: skip
        qbridge.load_checkpoint(ck, device="cpu")


def test_an_ambiguous_scale_grid_points_to_the_config_not_to_an_argument(tmp_path):
    # a [300, 300] weight with a 2x2 grid: square blocks of 150 up to 299 all fit
    W, s = torch.randn(300, 300).to(torch.float8_e4m3fn), torch.rand(2, 2)
    ck = _fp8_dir(tmp_path / "ck", {"k.weight": W, "k.weight_scale_inv": s}, block=None)
    with pytest.raises(CheckpointError, match=r"quantization_config.weight_block_size") as e:
        qbridge.load_checkpoint(ck, device="cpu")
    assert "block_size=" not in str(e.value)


def test_tensors_a_listed_file_holds_but_the_index_leaves_out_are_loaded_with_a_warning(made, tmp_path):
    """A piece (an absmax) and a dense tensor (a norm) present in their shards but missing from
    model.safetensors.index.json: transformers loads every tensor of a shard the index names, so they are
    loaded (they had been refused, and the norm dropped silently), with one warning naming them and their
    files; the result is the whole checkpoint's."""
    want = qbridge.load_checkpoint(made / "sharded", progress=False)
    ck = _copy(made, "sharded", tmp_path)
    index = json.loads((ck / "model.safetensors.index.json").read_text())
    absmax = next(k for k in index["weight_map"] if k.endswith("down_proj.weight.absmax"))
    norm = next(k for k in index["weight_map"] if k.endswith("input_layernorm.weight"))
    shards = [index["weight_map"].pop(k) for k in (absmax, norm)]
    (ck / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.warns(UserWarning, match="the index does not list 2 tensor") as caught:
        got = qbridge.load_checkpoint(ck, progress=False)
    (said,) = [str(w.message) for w in caught if "does not list" in str(w.message)]
    assert f"{absmax} in {shards[0]}" in said and f"{norm} in {shards[1]}" in said
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert_same_bits(np.asarray(a), np.asarray(b))


def test_a_shard_the_index_no_longer_names_is_warned_about(made, tmp_path):
    """An index that names no tensor of one shard of its series leaves that file unread (as transformers
    does): a load without a target had lost its tensors without a word; now a warning names the file, and
    the tensors the config's model has and the load lacks are refused (strict=False: warned about)."""
    ck = _copy(made, "sharded", tmp_path)
    index = json.loads((ck / "model.safetensors.index.json").read_text())
    dropped = sorted(set(index["weight_map"].values()))[-1]
    index["weight_map"] = {k: f for k, f in index["weight_map"].items() if f != dropped}
    (ck / "model.safetensors.index.json").write_text(json.dumps(index))
    with (
        pytest.warns(UserWarning, match=rf"does not name {re.escape(dropped)}, a shard of the same series"),
        pytest.raises(CheckpointError, match=r"tensors? of the model missing"),  # and the load refuses
    ):
        qbridge.load_checkpoint(ck, progress=False)
    (number,) = re.fullmatch(r".*-(\d+)-of-\d+\.safetensors", dropped).groups()
    unpadded = dropped.replace(f"-{number}-of-", f"-{int(number)}-of-")  # the same shard, another padding
    (ck / dropped).rename(ck / unpadded)
    with pytest.warns(UserWarning) as warned:
        qbridge.load_checkpoint(ck, progress=False, strict=False)
    said = [str(w.message) for w in warned]
    assert any(f"does not name {unpadded}, a shard of the same series" in m for m in said), said
    assert any("of the model missing" in m for m in said), said
    (ck / unpadded).unlink()  # gone: nothing to say
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        qbridge.inspect_checkpoint(ck)


def test_a_stray_tensor_in_a_listed_file_is_named_as_unlisted_when_a_target_refuses_it(tmp_path):
    """A tensor a listed shard holds beside the model's, that the index omits (an optimizer's leftover), is
    loaded; against a strict target it is unused, and the error says it is not in the index."""
    import jax_side

    ck = tmp_path / "ck"
    dense_llama(ck)
    state = st.load_file(ck / "model.safetensors")
    keys = sorted(state)
    halves = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for name, part in halves.items():
        extra = {"optimizer.exp_avg": torch.zeros(3)} if name.startswith("model-00001") else {}
        st.save_file({**{k: state[k] for k in part}, **extra}, ck / name, metadata={"format": "pt"})
    (ck / "model.safetensors").unlink()
    weight_map = {k: name for name, part in halves.items() for k in part}
    (ck / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    config = jax_side.LlamaConfig.from_hf(json.loads((ck / "config.json").read_text()))
    with (
        pytest.warns(UserWarning, match="does not list 1 tensor"),
        pytest.raises(
            jax_side.MatchError,
            match=r"'optimizer.exp_avg' in model-00001-of-00002.safetensors, are not listed",
        ),
    ):
        qbridge.load_checkpoint(ck, target=jax_side.abstract_llama(config), progress=False)


def test_a_tensor_two_listed_files_hold_that_the_index_leaves_out_is_refused(made, tmp_path):
    """Left out of the index and held by two of its files: which one is the model's is not known."""
    ck = _copy(made, "sharded", tmp_path)
    index = json.loads((ck / "model.safetensors.index.json").read_text())
    norm = next(k for k in index["weight_map"] if k.endswith("input_layernorm.weight"))
    home = index["weight_map"].pop(norm)
    (ck / "model.safetensors.index.json").write_text(json.dumps(index))
    other = next(f for f in sorted(set(index["weight_map"].values())) if f != home)
    value = st.load_file(ck / home)[norm]
    _rewrite(ck / other, lambda s: s.update({norm: value}))
    with pytest.raises(
        CheckpointError, match=rf"holds {norm!r}, which .* holds too.*the checkpoint's index lists neither"
    ):
        qbridge.load_checkpoint(ck, progress=False)


def test_a_tensor_the_index_lists_in_the_wrong_file_is_loaded_from_its_holder_with_a_warning(made, tmp_path):
    """The index names a file for an absmax and a norm that another listed file holds: transformers loads
    them (it reads every tensor of each listed file), and so does qbridge, with a warning naming both
    files; the result is the whole checkpoint's. It had been refused without naming the holder."""
    want = qbridge.load_checkpoint(made / "sharded", progress=False)
    ck = _copy(made, "sharded", tmp_path)
    index = json.loads((ck / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    moved = [next(k for k in index["weight_map"] if k.endswith(end)) for end in ("down_proj.weight.absmax",
                                                                                   "input_layernorm.weight")]  # fmt: skip
    holders = [index["weight_map"][k] for k in moved]
    for k, holder in zip(moved, holders):
        index["weight_map"][k] = next(f for f in files if f != holder)
    (ck / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.warns(UserWarning, match="lists 2 tensor.*in a file that does not hold them") as caught:
        got = qbridge.load_checkpoint(ck, progress=False)
    (said,) = [str(w.message) for w in caught if "does not hold them" in str(w.message)]
    for k, holder in zip(moved, holders):
        assert f"{k} in {index['weight_map'][k]}, held by {holder}" in said
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert_same_bits(np.asarray(a), np.asarray(b))
    # held by two other listed files: which one is the model's is not known
    other = next(f for f in files if f not in (holders[1], index["weight_map"][moved[1]]))
    value = st.load_file(ck / holders[1])[moved[1]]
    _rewrite(ck / other, lambda s: s.update({moved[1]: value}))
    with pytest.raises(CheckpointError, match=rf"lists {moved[1]!r}, which this file does not hold, while .* and "
                                              r".* each hold it"):  # fmt: skip
        qbridge.load_checkpoint(ck, progress=False)
    # held by no listed file
    for f in (holders[1], other):
        _rewrite(ck / f, lambda s: s.pop(moved[1]))
    with pytest.raises(
        CheckpointError, match=rf"lists {moved[1]!r}, which this file does not hold, nor does any.*download"
    ):
        qbridge.load_checkpoint(ck, progress=False)
    # held by a file beside that the index never names: that file is named
    st.save_file({moved[1]: value}, ck / "stray.safetensors")
    with pytest.raises(
        CheckpointError,
        match=r"nor does any other file the index names; .*stray.safetensors holds it, but the index never names",
    ):
        qbridge.load_checkpoint(ck, progress=False)


def test_a_tensor_two_listed_files_hold_loads_when_the_copies_match_and_is_refused_when_they_differ(
    made, tmp_path
):
    """A listed norm and absmax that another listed file holds as well: the same bits load as the intact
    checkpoint; other bits (a stale copy) are refused naming both files. The index's copy had been loaded
    silently, where transformers loads the later file's."""
    want = qbridge.load_checkpoint(made / "sharded", progress=False)
    ck = _copy(made, "sharded", tmp_path)
    index = json.loads((ck / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    copied = [next(k for k in index["weight_map"] if k.endswith(end)) for end in ("down_proj.weight.absmax",
                                                                                   "input_layernorm.weight")]  # fmt: skip
    for key in copied:
        home = index["weight_map"][key]
        value = st.load_file(ck / home)[key]
        for other in (f for f in files if f != home):  # before and after the home file
            _rewrite(ck / other, lambda s, key=key, value=value: s.update({key: value.clone()}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a copy with the same bits is no cause for a warning
        got = qbridge.load_checkpoint(ck, progress=False)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert_same_bits(np.asarray(a), np.asarray(b))
    for key in copied:
        home = index["weight_map"][key]
        stale = next(f for f in files if f != home)
        for changed in (
            lambda v: v + 1,
            lambda v: v.to(torch.float32),
            lambda v: v[:-1],
        ):  # bits, dtype, shape
            _rewrite(ck / stale, lambda s, key=key, changed=changed: s.update({key: changed(s[key])}))
            with pytest.raises(
                CheckpointError,
                match=rf"{re.escape(stale)}: holds {key!r} too, with other values than .*{re.escape(home)}, the "
                r"file the index lists it in",
            ):
                qbridge.load_checkpoint(ck, progress=False)
            _rewrite(ck / stale, lambda s, key=key, home=home: s.update({key: st.load_file(ck / home)[key]}))


def test_model_safetensors_beside_an_index_is_read_as_transformers_reads_it(made, tmp_path):
    """A folder holding model.safetensors and a stale model.safetensors.index.json with its shards:
    transformers reads model.safetensors, and so does qbridge, warning that the index is not read (it had
    read the index's shards); likewise pytorch_model.bin beside pytorch_model.bin.index.json."""
    transformers = pytest.importorskip("transformers")
    ck = _copy(made, "dense", tmp_path)
    state = st.load_file(ck / "model.safetensors")
    keys = sorted(state)
    halves = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for name, part in halves.items():  # the stale shards: the old values
        st.save_file({k: state[k] for k in part}, ck / name, metadata={"format": "pt"})
    weight_map = {k: name for name, part in halves.items() for k in part}
    (ck / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    new = {k: v * 2 for k, v in state.items()}
    st.save_file(new, ck / "model.safetensors", metadata={"format": "pt"})
    with pytest.warns(
        UserWarning, match=r"reading model.safetensors; model.safetensors.index.json beside it is not read"
    ):
        got = qbridge.dequantized_state(ck, device="cpu")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(ck, device_map="cpu").state_dict()
    for k, v in new.items():
        assert torch.equal(got[k], v), k
        assert torch.equal(theirs[k], v), k  # what transformers reads, so that the test shows the same choice
    (ck / "model.safetensors").unlink()  # the index alone: its shards, no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = qbridge.dequantized_state(ck, device="cpu")
    assert all(torch.equal(got[k], v) for k, v in state.items())
    for f in ck.glob("*.safetensors*"):
        f.unlink()
    torch.save(new, ck / "pytorch_model.bin")
    for name, part in halves.items():
        torch.save({k: state[k] for k in part}, ck / name.replace(".safetensors", ".bin"))
    (ck / "pytorch_model.bin.index.json").write_text(
        json.dumps({"weight_map": {k: v.replace(".safetensors", ".bin") for k, v in weight_map.items()}})
    )
    with pytest.warns(
        UserWarning, match=r"reading pytorch_model.bin; pytorch_model.bin.index.json beside it is not read"
    ):
        got = qbridge.dequantized_state(ck, device="cpu")
    assert all(torch.equal(got[k], v) for k, v in new.items())


def test_a_piece_in_a_file_the_index_never_names_is_named_with_that_file(made, tmp_path):
    """A scale moved into a safetensors file that model.safetensors.index.json does not name at all (so it is
    never opened): the error says which file holds it."""
    ck = _copy(made, "sharded", tmp_path)
    index = json.loads((ck / "model.safetensors.index.json").read_text())
    key = next(k for k in index["weight_map"] if k.endswith("down_proj.weight.absmax"))
    shard = ck / index["weight_map"].pop(key)
    (ck / "model.safetensors.index.json").write_text(json.dumps(index))
    moved = {}
    _rewrite(shard, lambda s: moved.update({key: s.pop(key)}))
    st.save_file(moved, ck / "extra.safetensors")
    (ck / "broken.safetensors").write_bytes(b"not a safetensors file")  # skipped in the search
    os.symlink("loop.safetensors", ck / "loop.safetensors")  # a link loop: skipped
    os.mkfifo(ck / "pipe.safetensors")  # reading it would wait for a writer forever: skipped
    match = rf"without {key}.*extra.safetensors holds {key}, but the"
    with pytest.raises(CheckpointError, match=match):
        qbridge.load_checkpoint(ck, progress=False)
    with pytest.raises(CheckpointError, match=match):  # the index given itself: the same
        qbridge.load_checkpoint(ck / "model.safetensors.index.json", progress=False)


def test_the_search_asks_the_index_that_chose_the_files(tmp_path):
    """A custom index given as the path is searched beside; an index of torch files and a directory whose
    name ends in .index.json are not mistaken for one; an adapter reached through a link is passed over;
    a missing weight is looked for too."""
    scale = {"b.weight_scale_inv": torch.ones(2, 2)}
    ck = _fp8_missing_scale(tmp_path / "custom.index.json")  # a directory with an index-like name
    (ck / "model.safetensors").rename(ck / "s1.safetensors")
    index = json.dumps({"weight_map": {"b.weight": "s1.safetensors"}})
    (ck / "weights.index.json").write_text(index)
    (ck / "model.safetensors.index.json").write_text(index)
    st.save_file(scale, ck / "extra.safetensors")
    for path in (ck, ck / "weights.index.json"):
        with pytest.raises(CheckpointError, match=r"extra.safetensors holds b.weight_scale_inv, but"):
            qbridge.load_checkpoint(path, device="cpu")
    (ck / "extra.safetensors").rename(ck / "adapter_model.safetensors")
    os.symlink("adapter_model.safetensors", ck / "zz.safetensors")
    with pytest.raises(
        CheckpointError, match=r"or b.weight_scale; an FP8 checkpoint .* this one is incomplete"
    ):
        qbridge.load_checkpoint(ck, device="cpu")  # no file named: the adapter is passed over
    W = torch.randn(256, 192).to(torch.float8_e4m3fn)  # now the weight is the missing piece
    lone = tmp_path / "lone"
    lone.mkdir()
    (lone / "config.json").write_text((ck / "config.json").read_text())
    st.save_file(scale, lone / "s1.safetensors")
    st.save_file({"b.weight": W}, lone / "extra.safetensors")
    (lone / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"b.weight_scale_inv": "s1.safetensors"}})
    )
    with pytest.raises(
        CheckpointError, match=r"its weight b.weight is missing .*extra.safetensors holds b.weight,"
    ):
        qbridge.load_checkpoint(lone, device="cpu")


def _fp8_missing_scale(path, **more):
    W = torch.randn(256, 192).to(torch.float8_e4m3fn)
    ck = _fp8_dir(path, {"b.weight": W})
    for name, tensors in more.items():
        st.save_file(tensors, ck / name)
    return ck


def test_files_the_model_does_not_come_from_are_not_offered(tmp_path):
    """Without an index every file of the model is read already: another file holding the scale (an
    adapter, a copy) is not the model's and is not named; nor is a file a link leads to outside the
    checkpoint directory."""
    scale = {"b.weight_scale_inv": torch.ones(2, 2)}
    # no other file named: only that the checkpoint is incomplete
    no_scale = (
        r"without b.weight_scale_inv or b.weight_scale; an FP8 checkpoint stores each weight's scale beside it: "
        r"this one is incomplete \(download or save it again\)$"
    )
    ck = _fp8_missing_scale(tmp_path / "ck", **{"adapter_model.safetensors": scale})
    with pytest.raises(CheckpointError, match=no_scale):
        qbridge.load_checkpoint(ck, device="cpu")
    ck = _fp8_missing_scale(tmp_path / "sharded")
    (ck / "model.safetensors").rename(ck / "s1.safetensors")
    (ck / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"b.weight": "s1.safetensors"}})
    )
    st.save_file(scale, tmp_path / "outside.safetensors")
    os.symlink(tmp_path / "outside.safetensors", ck / "link.safetensors")
    with pytest.raises(CheckpointError, match=no_scale):
        qbridge.load_checkpoint(ck, device="cpu")


def test_a_stacked_weights_scales_and_an_unknown_block_size_are_named_as_stored(tmp_path):
    W = torch.randn(2, 256, 192).to(torch.float8_e4m3fn)
    ck = _fp8_dir(tmp_path / "stacked", {"m.experts": W, "m.experts_scale_inv": torch.ones(2, 3, 1)})
    with pytest.raises(
        CheckpointError,
        match=r"experts_scale_inv has shape \(2, 3, 1\): each matrix's scales have shape \(3, 1\);",
    ):
        qbridge.inspect_checkpoint(ck)
    W = torch.randn(300, 300).to(torch.float8_e4m3fn)
    ck = _fp8_dir(tmp_path / "unknown", {"a.weight": W, "a.weight_scale": torch.ones(2, 2)}, block=None)
    with pytest.raises(CheckpointError, match=r"\[a.weight_scale\]: weight_scale has shape \(2, 2\): square"):
        qbridge.inspect_checkpoint(ck)


@pytest.mark.parametrize("scale_dtype", [torch.int32, torch.float64, torch.bool])
def test_a_scale_of_a_dtype_no_decode_takes_is_refused_on_every_path(tmp_path, scale_dtype):
    """Inspection, the dense load and a kept load refuse it alike (a kept load converted it to float32)."""
    W = torch.randn(256, 192).to(torch.float8_e4m3fn)
    ck = _fp8_dir(tmp_path / "ck", {"b.weight": W, "b.weight_scale_inv": torch.ones(2, 2).to(scale_dtype)})
    match = rf"\[b.weight_scale_inv\]: weight_scale_inv must be float32, .* got {scale_dtype}"
    with pytest.raises(CheckpointError, match=match):
        qbridge.inspect_checkpoint(ck)
    for keep in (False, True):
        with pytest.raises(CheckpointError, match=match):
            qbridge.load_checkpoint(ck, device="cpu", keep_quantized=keep)


def test_header_keys_never_waits_and_reads_only_regular_safetensors_files(tmp_path):
    """The search opens each file without waiting and checks its type on the open file, so a pipe (even
    one put in a file's place after a check) is passed over at once."""
    from qbridge._checkpoint import _header_keys

    st.save_file({"a": torch.ones(2), "b": torch.zeros(3)}, tmp_path / "ok.safetensors")
    os.mkfifo(tmp_path / "pipe.safetensors")
    (tmp_path / "short.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    assert _header_keys(tmp_path / "ok.safetensors") == {"a", "b"}
    assert _header_keys(tmp_path / "pipe.safetensors") is None
    assert _header_keys(tmp_path / "short.safetensors") is None
    assert _header_keys(tmp_path) is None  # a directory


@pytest.mark.parametrize("name", ["config.json", "model.safetensors.index.json"])
def test_a_pipe_for_the_config_or_the_index_is_refused_at_once(tmp_path, name):
    ck = _fp8_missing_scale(tmp_path / "ck")
    if name.endswith(".index.json"):  # beside model.safetensors an index is not read
        (ck / "model.safetensors").rename(ck / "model-00001-of-00001.safetensors")
    (ck / name).unlink(missing_ok=True)
    os.mkfifo(ck / name)
    with pytest.raises(CheckpointError, match=rf"{name}: .*not a regular file"):
        qbridge.load_checkpoint(ck, device="cpu")


def test_close_waits_for_a_read_running_in_another_thread(tmp_path, monkeypatch):
    """close() while another thread reads: the read finishes with the checkpoint's own bytes. Closing the
    file under it let a file opened meanwhile take its descriptor, and the read returned that file's bytes
    without an error. A read started after close() is refused."""
    import threading

    from safetensors.torch import save_file

    from qbridge import _checkpoint
    from qbridge._checkpoint import open_checkpoint

    if _checkpoint._PREADV is None:
        pytest.skip("positioned reads (os.preadv) are not available here")
    gen = torch.Generator().manual_seed(14)
    a, b = torch.randn(64, 32, generator=gen), torch.randn(64, 32, generator=gen)
    save_file({"w": a}, tmp_path / "a.safetensors")
    save_file({"w": b}, tmp_path / "b.safetensors")
    real, started, other_open = _checkpoint._PREADV, threading.Event(), threading.Event()

    def slow_preadv(fd, bufs, offset):
        started.set()
        other_open.wait(0.5)  # the other file is opened while this read waits (at most 0.5 s)
        return real(fd, bufs, offset)

    first = open_checkpoint(tmp_path / "a.safetensors")
    monkeypatch.setattr(_checkpoint, "_PREADV", slow_preadv)
    got: list[object] = []
    reader = threading.Thread(target=lambda: got.append(_try(first.read, "w")))
    reader.start()
    assert started.wait(10)
    first.close()
    with open_checkpoint(tmp_path / "b.safetensors") as second:
        other_open.set()
        reader.join(10)
        monkeypatch.setattr(_checkpoint, "_PREADV", real)
        assert torch.equal(second.read("w"), b)
    assert len(got) == 1 and isinstance(got[0], torch.Tensor), got
    assert torch.equal(got[0], a)
    with pytest.raises(CheckpointError, match="reading 'w' failed: the checkpoint is closed"):
        first.read("w")


def _try(fn, *args):
    try:
        return fn(*args)
    except Exception as e:
        return e


def test_close_while_reads_ahead_run_refuses_new_ones_and_reads(tmp_path, monkeypatch):
    """While close() waits for reads ahead that are running, read_ahead adds none (it added a read that
    close() then dropped, its staging block lost) and reading a key whose read ahead close() dropped says
    the checkpoint is closed (it said "CancelledError"). A second close() at the same time returns without
    error (both went through the same dictionaries: "dictionary changed size during iteration")."""
    import threading
    import time

    from safetensors.torch import save_file

    from qbridge import _checkpoint
    from qbridge._checkpoint import READ_AHEAD_MIN_BYTES, open_checkpoint

    if _checkpoint._PREADV is None:
        pytest.skip("positioned reads (os.preadv) are not available here")
    gen = torch.Generator().manual_seed(15)
    rows = READ_AHEAD_MIN_BYTES // (4 * 64) + 1  # over the size read ahead
    tensors = {f"w{i}": torch.randn(rows, 64, generator=gen) for i in range(12)}
    save_file(tensors, tmp_path / "m.safetensors")
    real, release = _checkpoint._PREADV, threading.Event()

    def slow_preadv(fd, bufs, offset):
        release.wait(10)
        return real(fd, bufs, offset)

    ckpt = open_checkpoint(tmp_path / "m.safetensors")
    monkeypatch.setattr(_checkpoint, "_PREADV", slow_preadv)
    keys = list(tensors)
    for key in keys[:10]:  # the reading threads wait in slow_preadv; the rest wait for a thread
        assert ckpt.read_ahead(key) > 0
    errors: list[BaseException] = []

    def close() -> None:
        try:
            ckpt.close()
        except BaseException as e:
            errors.append(e)

    closers = [threading.Thread(target=close) for _ in range(2)]
    waiting = ckpt.source._ahead[keys[9]]  # no reading thread is free for it
    closers[0].start()
    deadline = time.monotonic() + 5
    while not waiting.cancelled() and time.monotonic() < deadline:  # close() has begun
        time.sleep(0.001)
    assert waiting.cancelled() and not release.is_set()
    closers[1].start()
    try:
        assert ckpt.read_ahead(keys[11]) == 0
        for key in (keys[9], keys[11]):  # dropped by close(); never read ahead
            with pytest.raises(CheckpointError, match=f"reading '{key}' failed: the checkpoint is closed"):
                ckpt.read(key)
    finally:
        release.set()
        for closer in closers:
            closer.join(10)
    assert not errors, errors
    assert not any(closer.is_alive() for closer in closers)
    assert not ckpt.source._files and not ckpt.source._ahead


def _close_at_each_step(ckpt_path, read) -> collections.Counter:
    """Opens ``ckpt_path`` again for each step of ``read(ckpt)`` (each bytecode of qbridge's checkpoint code it
    runs) and starts close() in another thread at that step, giving it a moment before the read goes on (a
    close() waiting for the read lets it go on); returns what each run gave."""
    import threading

    from qbridge import _checkpoint

    outcomes: collections.Counter = collections.Counter()
    step = 0
    while True:
        step += 1
        ckpt = qbridge.open_checkpoint(ckpt_path)
        closer = threading.Thread(target=ckpt.close)
        seen = [0]

        def tracer(frame, event, arg, seen=seen, step=step, closer=closer):
            if frame.f_code.co_filename != _checkpoint.__file__:
                return None
            frame.f_trace_opcodes = True
            if event == "opcode":
                seen[0] += 1
                if seen[0] == step:
                    closer.start()
                    closer.join(0.02)
            return tracer

        sys.settrace(tracer)
        try:
            read(ckpt)
            outcomes["ok"] += 1
        except CheckpointError as e:
            assert re.fullmatch("reading 'w' failed: the checkpoint is closed", str(e)), e
            outcomes["closed"] += 1
        finally:
            sys.settrace(None)
            if closer.is_alive() or seen[0] >= step:
                closer.join(10)
                assert not closer.is_alive()
            ckpt.close()
        if seen[0] < step:  # the read ran to its end before this step: every step was tried
            outcomes["steps"] = step - 1
            return outcomes


@pytest.mark.parametrize("kind", ["safetensors", "torch"])
@pytest.mark.parametrize("method", ["read", "read_slice", "read_window", "map_tensor"])
def test_close_at_any_step_of_a_read_gives_the_tensor_or_says_closed(tmp_path, kind, method):
    """close() landing at any point of a read in another thread: the read returns the stored bytes or raises
    CheckpointError "the checkpoint is closed", nothing else (a torch file's read raised AttributeError when
    close() cleared its tensors between two looks; read_window raised a ValueError-wrapped error after
    close() had waited for it)."""
    from safetensors.torch import save_file

    w = torch.randn(16, 8, generator=torch.Generator().manual_seed(16))
    if kind == "safetensors":
        path = tmp_path / "model.safetensors"
        save_file({"w": w}, path)
    else:
        path = tmp_path / "pytorch_model.bin"
        torch.save({"w": w}, path)
    raw = w.reshape(-1).view(torch.uint8).view(16, 32)
    read, expected = {
        "read": (lambda c: c.read("w"), w),
        "read_slice": (lambda c: c.read_slice("w", (slice(2, 5),)), w[2:5]),
        "read_window": (lambda c: c.read_window("w", 32, (1, 3), (4, 12)), raw[1:3, 4:12]),
        "map_tensor": (lambda c: c.source.map_tensor("w").clone(), w),
    }[method]

    def checked(ckpt):
        t = read(ckpt)
        assert torch.equal(t, expected)

    outcomes = _close_at_each_step(path, checked)
    assert outcomes["closed"] > 0 and outcomes["ok"] > 0, outcomes


@pytest.mark.parametrize("name", ["nf4", "fp8"])
def test_entries_name_a_stored_piece_asked_for_as_a_weight(made, name):
    """entries is keyed by weight name: a stored piece's key (an absmax, a scale_inv) names the weight it
    belongs to, and a near miss names the closest weight, instead of a bare KeyError."""
    with qbridge.open_checkpoint(made / name) as ckpt:
        weight = next(e for e in ckpt.entries.values() if e.kind != "dense")
        role, piece = next((r, k) for r, k in weight.keys.items() if r != "weight")
        with pytest.raises(KeyError, match=rf"{re.escape(repr(piece))} is the '{role}' piece of weight"):
            ckpt.entries[piece]
        assert piece not in ckpt.entries and ckpt.entries.get(piece) is None
        with pytest.raises(KeyError, match=rf"no weight .*; did you mean {re.escape(repr(weight.name))}"):
            ckpt.entries[weight.name[:-1] + "s"]
        assert ckpt.entries[weight.name] is weight


@pytest.mark.parametrize(
    ("asked", "meant", "why"),
    [
        ("model.layers.0.mlp.up_proj", "model.layers.0.mlp.up_proj.weight", ""),
        (
            "model.layers.0.mlp.up_proj.kernel",
            "model.layers.0.mlp.up_proj.weight",
            " (torch's checkpoints store Flax's 'kernel' as 'weight', as [out, in]: the kernel's transpose)",
        ),
        ("model.norm.scale", "model.norm.weight", " (torch's checkpoints store Flax's 'scale' as 'weight')"),
        (
            "model.embed_tokens.embedding",
            "model.embed_tokens.weight",
            " (torch's checkpoints store Flax's 'embedding' as 'weight')",
        ),
        ("model.norm.weights", "model.norm.weight", ""),
        ("lm_head.bias", None, ""),
    ],
)
def test_a_module_or_flax_name_is_answered_with_the_stored_name(tmp_path, asked, meant, why):
    """A module's name without ``.weight``, or a Flax leaf name (kernel, scale, embedding), read from a
    checkpoint or looked up in entries names the stored key it meant; a name with nothing near gets no guess."""
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(17)
    save_file(
        {
            "model.layers.0.mlp.up_proj.weight": torch.randn(8, 4, generator=gen),
            "model.norm.weight": torch.randn(4, generator=gen),
            "model.embed_tokens.weight": torch.randn(16, 4, generator=gen),
        },
        tmp_path / "model.safetensors",
    )
    hint = f"; did you mean {meant!r}?{why}" if meant else ""
    with qbridge.open_checkpoint(tmp_path) as ckpt:
        with pytest.raises(CheckpointError) as raised:
            ckpt.read(asked)
        assert str(raised.value) == f"checkpoint has no tensor {asked!r}{hint}"
        with pytest.raises(KeyError) as missing:
            ckpt.entries[asked]
        assert missing.value.args[0] == f"the checkpoint has no weight {asked!r}{hint}"


@pytest.mark.skipif(torch.cuda.is_available(), reason="torch has a CUDA GPU here")
def test_read_to_a_gpu_torch_does_not_have_says_so(tmp_path):
    """read_to(key, "cuda") with a CPU build of torch: a ValueError naming the key and the device (it was
    torch's bare AssertionError "Torch not compiled with CUDA enabled")."""
    from safetensors.torch import save_file

    save_file({"w": torch.randn(4, 4)}, tmp_path / "model.safetensors")
    with qbridge.open_checkpoint(tmp_path) as ckpt:
        with pytest.raises(ValueError, match=r"read_to\('w', 'cuda:1'\): torch sees no CUDA GPU here"):
            ckpt.read_to("w", "cuda:1")
        assert torch.equal(ckpt.read_to("w", "cpu"), ckpt.read("w"))


@pytest.mark.parametrize("key", [b"model.norm.weight", ("model.norm.weight",), 7])
def test_a_key_that_is_not_a_string_is_not_in_the_checkpoint(tmp_path, key):
    """The hint for a missing key (a module or Flax name) matched a pattern against it: a bytes or tuple key
    raised TypeError from the pattern instead of the reader's CheckpointError."""
    from safetensors.torch import save_file

    save_file({"model.norm.weight": torch.randn(4)}, tmp_path / "model.safetensors")
    with qbridge.open_checkpoint(tmp_path) as ckpt:
        for read in (ckpt.read, ckpt.read_ahead, ckpt.source.map_tensor, lambda k: ckpt.read_stacked([k])):
            with pytest.raises(CheckpointError, match=re.escape(f"checkpoint has no tensor {key!r}")):
                read(key)


@pytest.mark.parametrize("method", ["read", "read_stacked", "map_tensor"])
def test_a_file_emptied_before_its_first_read_is_a_checkpoint_error_naming_the_key(tmp_path, method):
    """read_stacked and map_tensor read the header's byte ranges on first use: a file cut short before then
    raised a bare ValueError (a header of 0 bytes; a map past the end) where read says which file and key."""
    from safetensors.torch import save_file

    save_file({"a": torch.randn(40, 40), "b": torch.randn(40, 40)}, tmp_path / "model.safetensors")
    with qbridge.open_checkpoint(tmp_path) as ckpt:
        os.truncate(tmp_path / "model.safetensors", 0)
        read = {"read": lambda: ckpt.read("a"), "read_stacked": lambda: ckpt.read_stacked(["a", "b"]),
                "map_tensor": lambda: ckpt.source.map_tensor("a")}[method]  # fmt: skip
        with pytest.raises(CheckpointError, match=r"model\.safetensors: reading 'a' failed"):
            read()


def test_stage_small_refuses_a_string_a_closed_checkpoint_and_a_device_that_is_not_a_gpu(tmp_path):
    from safetensors.torch import save_file

    save_file(
        {"ab": torch.randn(4), "a": torch.randn(4), "b": torch.randn(4)}, tmp_path / "model.safetensors"
    )
    with qbridge.open_checkpoint(tmp_path) as ckpt:
        with pytest.raises(ValueError, match=r"stage_small takes a sequence of keys, got the string 'ab'"):
            ckpt.stage_small("ab", "cuda")
        for device in ("gpu", "meta", "cpu") if torch.cuda.is_available() else (0, "gpu", "meta", "cpu"):
            with pytest.raises(ValueError, match=rf"stage_small\(device={re.escape(repr(device))}\)"):
                ckpt.stage_small(["a"], device)
    with pytest.raises(CheckpointError, match="staging failed: the checkpoint is closed"):
        ckpt.stage_small(["a"], "cuda")


def test_a_hugging_face_cache_snapshot_loads_and_other_links_out_stay_refused(tmp_path):
    """What ``huggingface_hub.snapshot_download`` returns, ``<repo>/snapshots/<revision>/`` whose files are
    links to ``<repo>/blobs/``, loads as the files themselves do (it was refused as links leading outside
    the checkpoint); a link to a blob of another repository, or out of the snapshot otherwise, is refused."""
    import hashlib

    import jax

    dense_llama(tmp_path / "dense")
    bnb_llama(tmp_path / "dense", tmp_path / "nf4", quant_type="nf4", nested=True, shard=True)
    source = tmp_path / "nf4"
    repo = tmp_path / "hub" / "models--org--tiny"
    (repo / "blobs").mkdir(parents=True)
    snapshot = repo / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    for f in sorted(source.iterdir()):
        digest = hashlib.sha256(f.read_bytes()).hexdigest()
        shutil.copyfile(f, repo / "blobs" / digest)
        os.symlink(f"../../blobs/{digest}", snapshot / f.name)
    want = qbridge.load_checkpoint(source, device="cpu", progress=False)
    got = qbridge.load_checkpoint(snapshot, device="cpu", progress=False)
    assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want), strict=True):
        assert a.dtype == b.dtype and (a == b).all()
    assert qbridge.inspect_checkpoint(snapshot).kinds == qbridge.inspect_checkpoint(source).kinds
    # the same files in a folder of the snapshot (as huggingface_hub lays out text_encoder/, say): loaded
    sub = snapshot / "text_encoder"
    sub.mkdir()
    for f in sorted(source.iterdir()):
        os.symlink(f"../../../blobs/{hashlib.sha256(f.read_bytes()).hexdigest()}", sub / f.name)
    got = qbridge.load_checkpoint(sub, device="cpu", progress=False)
    assert jax.tree_util.tree_structure(got) == jax.tree_util.tree_structure(want)
    # the layout outside a cache (no models--... repository) or a blob not named by a hash: refused
    home = tmp_path / "home"
    shutil.copytree(repo, home, symlinks=True)
    with pytest.raises(CheckpointError, match=r"is a link to .*outside the checkpoint directory"):
        qbridge.inspect_checkpoint(home / "snapshots" / "0123abcd")
    named = tmp_path / "hub" / "models--org--named"
    shutil.copytree(repo, named, symlinks=True)
    blob = next((named / "blobs").iterdir())
    blob.rename(named / "blobs" / "weights")
    (named / "snapshots" / "0123abcd" / "config.json").unlink()
    link = next(f for f in (named / "snapshots" / "0123abcd").iterdir() if os.readlink(f).endswith(blob.name))
    link.unlink()
    os.symlink("../../blobs/weights", link)
    with pytest.raises(CheckpointError, match=r"is a link to .*weights, outside the checkpoint directory"):
        qbridge.load_checkpoint(named / "snapshots" / "0123abcd", device="cpu", progress=False)
    # the repository folder itself: the snapshot to pass is named
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    with pytest.raises(
        CheckpointError, match=r"a Hugging Face cache repository: pass its snapshot, .*snapshots/0123abcd"
    ):
        qbridge.load_checkpoint(repo, device="cpu", progress=False)
    # a blob of another repository in the cache: refused
    other = tmp_path / "hub" / "models--org--other" / "blobs"
    other.mkdir(parents=True)
    config = snapshot / "config.json"
    shutil.copyfile(config, other / "cfg")
    config.unlink()
    os.symlink(other / "cfg", config)
    with pytest.raises(CheckpointError, match=r"config.json is a link to .*outside the checkpoint directory"):
        qbridge.inspect_checkpoint(snapshot)


def test_torch_files_beside_safetensors_files_are_named_as_left_out(tmp_path):
    """A folder without an index holding .safetensors files and a torch file: the .safetensors files are the
    checkpoint, as before, and a warning names the torch file left out (its tensors were lost silently)."""
    st.save_file({"a.weight": torch.randn(4, 4)}, tmp_path / "part-a.safetensors")
    st.save_file({"c.weight": torch.randn(4, 4)}, tmp_path / "part-c.safetensors")
    torch.save({"b.weight": torch.randn(4, 4)}, tmp_path / "extra.bin")
    with pytest.warns(
        UserWarning, match=r"reading its 2 \.safetensors file\(s\); extra\.bin beside them are left out"
    ) as caught:
        params = qbridge.load_checkpoint(tmp_path, device="cpu", progress=False)
    assert caught[0].filename == __file__
    assert sorted(params["params"]) == ["a", "c"]


@pytest.mark.parametrize("kind", ["safetensors", "torch"])
def test_a_checkpoint_without_tensors_is_refused(tmp_path, kind):
    """An empty file (no tensors) loaded, inspected and converted as an empty model, with exit status 0 from
    the command line; now refused, naming the file."""
    from qbridge._cli import main

    if kind == "safetensors":
        st.save_file({}, tmp_path / "model.safetensors")
    else:
        torch.save({}, tmp_path / "pytorch_model.bin")
    for call in (qbridge.inspect_checkpoint, lambda p: qbridge.load_checkpoint(p, progress=False)):
        with pytest.raises(
            CheckpointError, match=r"holds no tensors \((model\.safetensors|pytorch_model\.bin): empty\)"
        ):
            call(tmp_path)
    assert main(["convert", str(tmp_path), str(tmp_path / "out.orbax"), "--quiet"]) == 2
    assert not (tmp_path / "out.orbax").exists()


@pytest.mark.parametrize("name", ["model-00002.safetensors", "part.bin"])
def test_a_directory_named_as_a_tensor_file_is_named_as_such(tmp_path, name):
    """A directory where a shard belongs (no index): "file missing (listed in the checkpoint's index)"
    became what it is."""
    other = "model-00001.safetensors" if name.endswith(".safetensors") else "other.bin"
    if other.endswith(".safetensors"):
        st.save_file({"a.weight": torch.randn(2, 2)}, tmp_path / other)
    else:
        torch.save({"a.weight": torch.randn(2, 2)}, tmp_path / other)
    (tmp_path / name).mkdir()
    with pytest.raises(CheckpointError, match=rf"{re.escape(name)}: a directory where a .* file belongs"):
        qbridge.inspect_checkpoint(tmp_path)


@pytest.mark.parametrize("bad", [3, None, ["model-00001-of-00001.safetensors"], {"file": "x"}, True])
@pytest.mark.parametrize("where", ["first", "last"])
def test_an_index_mapping_a_tensor_to_no_file_name_is_refused(tmp_path, bad, where):
    from safetensors.torch import save_file

    save_file({"a": torch.randn(4, 4), "b": torch.randn(3)}, tmp_path / "model-00001-of-00001.safetensors")
    entries = [("a", "model-00001-of-00001.safetensors"), ("b", bad)]
    weight_map = dict(entries if where == "last" else entries[::-1])
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError, match=r"index\.json: weight_map must map tensor names to file names"):
        qbridge.open_checkpoint(tmp_path)


@pytest.mark.parametrize("weight_map", [["a"], "model-00001-of-00001.safetensors", None])
def test_an_index_whose_weight_map_is_no_mapping_is_refused(tmp_path, weight_map):
    from safetensors.torch import save_file

    save_file({"a": torch.randn(4, 4)}, tmp_path / "model-00001-of-00001.safetensors")
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError, match=r"index\.json: weight_map must map tensor names to file names"):
        qbridge.open_checkpoint(tmp_path)
